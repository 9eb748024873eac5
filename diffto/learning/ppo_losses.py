"""PPO's losses and returns as pure functions: every tensor shape in the docstrings.

Names follow the paper and CleanRL: ``pg_loss`` (clipped surrogate), ``v_loss``, ``approx_kl``;
each loss returns named terms, those that sum into the optimized total start with ``loss_``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["approx_kl", "pg_loss", "v_loss", "discounted_returns"]


def approx_kl(logratio: Tensor) -> Tensor:
    """Estimate ``KL(π_old ‖ π_new)`` from ``logratio = log π_new(a|s) − log π_old(a|s)`` ``(B,)``.

    Uses the unbiased, always non-negative estimator ``E[(r − 1) − log r]`` with
    ``r = exp(logratio)`` (Schulman, "Approximating KL divergence"). Returns a scalar.
    """
    return ((logratio.exp() - 1.0) - logratio).mean()


def pg_loss(
    logprob: Tensor, old_logprob: Tensor, advantages: Tensor, clip_coef: float
) -> dict[str, Tensor]:
    """PPO clipped surrogate: ``E[max(−A r, −A clip(r, 1−ε, 1+ε))]`` with ``r = π/π_old``.

    Args:
        logprob: ``(B,)`` log-probabilities of the taken actions under the current policy.
        old_logprob: ``(B,)`` log-probabilities under the policy that collected them.
        advantages: ``(B,)`` advantage estimates (normalize them before, if wanted).
        clip_coef: ``ε``.

    Returns:
        ``loss_actor`` (scalar, minimized), diagnostics ``approx_kl`` and ``clip_fraction``
        (share of samples where the ratio left ``[1−ε, 1+ε]``), all scalars.
    """
    if not logprob.shape == old_logprob.shape == advantages.shape:
        raise ValueError(
            "logprob, old_logprob and advantages must all have shape (B,), got "
            f"{tuple(logprob.shape)}, {tuple(old_logprob.shape)}, {tuple(advantages.shape)}"
        )
    if clip_coef <= 0:
        raise ValueError(f"clip_coef must be > 0, got {clip_coef}")
    logratio = logprob - old_logprob
    ratio = logratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    with torch.no_grad():
        kl = approx_kl(logratio)
        clip_fraction = ((ratio - 1.0).abs() > clip_coef).to(ratio.dtype).mean()
    return {
        "loss_actor": torch.maximum(unclipped, clipped).mean(),
        "approx_kl": kl,
        "clip_fraction": clip_fraction,
    }


def v_loss(values: Tensor, returns: Tensor) -> dict[str, Tensor]:
    """Critic regression ``0.5 E[(V(s) − R)²]``.

    Args:
        values: ``(B,)`` current value predictions.
        returns: ``(B,)`` return targets.

    Returns:
        ``loss_critic`` (scalar, minimized) and ``explained_variance`` ``1 − Var[R − V]/Var[R]``
        (1 is perfect, ≤ 0 no better than a constant; NaN when the returns are constant).
    """
    if values.shape != returns.shape or values.dim() != 1:
        raise ValueError(
            f"values and returns must both have shape (B,), got {tuple(values.shape)} and "
            f"{tuple(returns.shape)}"
        )
    with torch.no_grad():
        var_r = returns.var(unbiased=False)
        explained = 1.0 - (returns - values).var(unbiased=False) / var_r
    return {"loss_critic": 0.5 * ((values - returns) ** 2).mean(), "explained_variance": explained}


def discounted_returns(
    rewards: Tensor,
    values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    final_values: Tensor,
    next_value: Tensor,
    gamma: float,
    gae_lambda: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns and advantages of a rollout of ``T`` steps in ``E`` environments.

    Args:
        rewards, values: ``(T, E)``; ``values[t]`` is ``V(s_t)``.
        terminated: ``(T, E)`` bool, the episode ended in a terminal state at step ``t``.
        truncated: ``(T, E)`` bool, the episode was cut (time limit) at step ``t``.
        final_values: ``(T, E)``, ``V`` of the last observation of an episode truncated at
            ``t`` (read only where ``truncated``).
        next_value: ``(E,)``, ``V`` of the observation after the last step (bootstrap).
        gamma: discount ``γ``.
        gae_lambda: ``None`` for plain discounted returns (OPT-Mimic), else GAE(λ).

    Returns:
        ``(advantages, returns)``, both ``(T, E)``.

    A truncated episode did not end: its tail is worth ``V(s_final)``, so the reward of the
    truncating step becomes ``r̃_t = r_t + γ V(s_final)``. A terminated one is worth nothing
    after ``t``. Either way nothing flows back from the next episode (``d_t = 1``):

        R_t = r̃_t + γ (1 − d_t) R_{t+1},    R_T = V(s_T)                      (returns)
        A_t = R_t − V(s_t)

    and with GAE, ``δ_t = r̃_t + γ (1 − d_t) V_{t+1} − V_t``,
    ``A_t = δ_t + γ λ (1 − d_t) A_{t+1}``, ``R_t = A_t + V_t``. GAE with ``λ = 1`` equals the
    plain discounted returns.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (T, E), got {tuple(rewards.shape)}")
    T, E = rewards.shape
    for name, x in (
        ("values", values),
        ("terminated", terminated),
        ("truncated", truncated),
        ("final_values", final_values),
    ):
        if tuple(x.shape) != (T, E):
            raise ValueError(f"{name} must have shape ({T}, {E}), got {tuple(x.shape)}")
    if tuple(next_value.shape) != (E,):
        raise ValueError(f"next_value must have shape ({E},), got {tuple(next_value.shape)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if gae_lambda is not None and not 0.0 <= gae_lambda <= 1.0:
        raise ValueError(f"gae_lambda must be in [0, 1] or None, got {gae_lambda}")
    trunc = truncated.to(rewards.dtype)
    # a step can be both terminated and truncated: termination wins (no bootstrap)
    boot = trunc * (1.0 - terminated.to(rewards.dtype))
    r = rewards + gamma * boot * final_values
    cont = 1.0 - torch.maximum(terminated.to(rewards.dtype), trunc)
    returns = torch.empty_like(rewards)
    advantages = torch.empty_like(rewards)
    if gae_lambda is None:
        running = next_value
        for t in reversed(range(T)):
            running = r[t] + gamma * cont[t] * running
            returns[t] = running
        advantages = returns - values
    else:
        nxt_v, running = next_value, torch.zeros_like(next_value)
        for t in reversed(range(T)):
            delta = r[t] + gamma * cont[t] * nxt_v - values[t]
            running = delta + gamma * gae_lambda * cont[t] * running
            advantages[t] = running
            nxt_v = values[t]
        returns = advantages + values
    return advantages, returns
