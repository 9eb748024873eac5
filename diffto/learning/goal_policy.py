"""The goal-conditioned policy network: ``(observation, desired_goal) -> action``.

A multilayer perceptron over the normalized observation and goal,

.. math::

    z = \\mathrm{MLP}\\big([\\,\\bar o;\\ \\bar g\\,]\\big), \\qquad
    \\bar o = (o - μ_o) / σ_o,\\quad \\bar g = (g - μ_g) / σ_g,

squashed into the action box ``[a_lo, a_hi]``: ``"tanh"`` maps ``a = c + h \\tanh z`` with
centre ``c = (a_hi + a_lo)/2`` and half-width ``h = (a_hi − a_lo)/2`` (smooth, never outside
the box), ``"clip"`` clamps ``a = clip(z, a_lo, a_hi)`` (the identity inside the box, so an
expert that saturates often is still fit exactly there; the deterministic head's loss is taken
on ``z`` itself, so an output past a bound still gets a gradient).

The statistics ``μ, σ`` are :class:`~diffto.learning.normalizer.RunningNormalizer` buffers,
fitted once from the training data, so a checkpoint carries them with the weights and the
policy acts on raw environment observations.

Relative goal
    With ``relative_goal_at = k`` the observation holds the achieved goal at ``o[k : k+g]``
    (e.g. the flange position) and the input gains the normalized offset ``g − o[k : k+g]``,
    ``[ō; ḡ; (g − o_{k:k+g}) normalized]``. A reach is translation invariant in that offset: the
    expert's torques depend mostly on where the target lies relative to the hand, which the
    network would otherwise have to form by subtracting two separately normalized inputs.

Heads
    ``"deterministic"``: the network outputs ``z (B, a)``; the loss is the mean squared error
    of the action, measured in half-widths ``(a − a^*)/h`` so every action dimension counts
    alike whatever its units. ``"gaussian"``: the network outputs ``z`` and a log-std
    ``s (B, a)`` (clamped to ``[−5, 1]`` half-widths); the policy is ``N(squash(z), e^{2s})``
    in half-width units and the loss is its negative log-likelihood of the expert's action
    (a noisy expert no longer inflates the fit of the mean; the mean is what acts).
    ``"mixture"``: ``K`` Gaussian components (``mixtures``) with logits ``π_k``, squashed means
    ``μ_k`` and log-stds ``s_k``; the loss is the mixture's negative log-likelihood

    .. math::

        −\\log \\sum_k \\operatorname{softmax}(π)_k \\prod_j N(a^*_j; μ_{kj}, e^{2 s_{kj}})

    (a logsumexp over components), so an expert that goes left or right from the same state
    is fit by two components instead of averaged into the invalid middle. The mean of the
    most probable component acts (deterministic, and never an average of two modes).
    Expert actions are clipped to the box first: the environment applies only that part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from diffto.learning.normalizer import RunningNormalizer
from diffto.policies import MLP

__all__ = ["GoalPolicy", "Head", "Squash", "ACTIVATIONS"]

Head = Literal["deterministic", "gaussian", "mixture"]
Squash = Literal["tanh", "clip"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}
_LOG_STD_MIN, _LOG_STD_MAX = -5.0, 1.0


class GoalPolicy(nn.Module):
    """Goal-conditioned MLP policy with its input normalization and action box.

    Args:
        obs_dim: ``o``, size of the observation vector.
        goal_dim: ``g``, size of the desired goal (0: a policy of the observation alone).
        action_low, action_high: the action box ``(a,)`` (finite for ``squash="tanh"``).
        hidden: widths of the hidden layers.
        activation: ``"relu"``, ``"tanh"`` or ``"elu"``.
        head: ``"deterministic"`` (MSE), ``"gaussian"`` or ``"mixture"`` (NLL); see the module
            docstring.
        mixtures: components of the ``"mixture"`` head.
        squash: ``"tanh"`` or ``"clip"`` into the action box.
        relative_goal_at: index ``k`` of the achieved goal inside the observation; the input
            then includes ``goal − observation[k : k+g]`` (``None``: not).
    """

    action_low: Tensor
    action_high: Tensor

    def __init__(
        self,
        obs_dim: int,
        goal_dim: int,
        action_low: Sequence[float] | np.ndarray | Tensor,
        action_high: Sequence[float] | np.ndarray | Tensor,
        hidden: Sequence[int] = (256, 256),
        activation: Literal["relu", "tanh", "elu"] = "relu",
        head: Head = "deterministic",
        squash: Squash = "tanh",
        relative_goal_at: int | None = None,
        mixtures: int = 5,
    ) -> None:
        super().__init__()
        if obs_dim < 1 or goal_dim < 0:
            raise ValueError(f"obs_dim must be >= 1 and goal_dim >= 0, got {obs_dim}, {goal_dim}")
        if head not in ("deterministic", "gaussian", "mixture"):
            raise ValueError(f"head must be 'deterministic', 'gaussian' or 'mixture', got "
                             f"{head!r}")
        if isinstance(mixtures, bool) or not isinstance(mixtures, int) or mixtures < 1:
            raise ValueError(f"mixtures must be an int >= 1, got {mixtures!r}")
        if squash not in ("tanh", "clip"):
            raise ValueError(f"squash must be 'tanh' or 'clip', got {squash!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        if relative_goal_at is not None and (
                goal_dim < 1 or not 0 <= relative_goal_at <= obs_dim - goal_dim):
            raise ValueError(f"relative_goal_at must index a goal-sized slice of the "
                             f"observation (0..{obs_dim - goal_dim}) with goal_dim >= 1, got "
                             f"{relative_goal_at} (goal_dim {goal_dim})")
        low = torch.as_tensor(np.asarray(action_low, dtype=np.float32)).reshape(-1)
        high = torch.as_tensor(np.asarray(action_high, dtype=np.float32)).reshape(-1)
        if low.shape != high.shape or low.numel() < 1 or not bool((low < high).all()):
            raise ValueError(
                f"action_low and action_high must be (a,) with low < high, got "
                f"{low.tolist()} and {high.tolist()}"
            )
        if squash == "tanh" and not bool(torch.isfinite(low).all() & torch.isfinite(high).all()):
            raise ValueError("squash='tanh' needs a finite action box; use squash='clip'")
        self.obs_dim, self.goal_dim, self.act_dim = obs_dim, goal_dim, int(low.numel())
        self.head, self.squash = head, squash
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)
        # The loss's unit per action dimension: the half-width of the box (1 where unbounded).
        finite = torch.isfinite(low) & torch.isfinite(high)
        scale = torch.where(finite, (high - low) / 2, torch.ones_like(low))
        self.register_buffer("action_scale", scale)
        self.obs_normalizer = RunningNormalizer(obs_dim)
        self.goal_normalizer = RunningNormalizer(goal_dim) if goal_dim > 0 else None
        self.relative_goal_at = relative_goal_at
        self.relative_normalizer = (RunningNormalizer(goal_dim) if relative_goal_at is not None
                                    else None)
        self.mixtures = mixtures if head == "mixture" else 1
        # per component: mean and log-std per action dimension, plus one logit
        out = {"deterministic": self.act_dim, "gaussian": 2 * self.act_dim,
               "mixture": mixtures * (2 * self.act_dim + 1)}[head]
        n_in = obs_dim + goal_dim * (1 if relative_goal_at is None else 2)
        self.net = MLP(n_in, out, list(hidden), ACTIVATIONS[activation])

    # ------------------------------------------------------------------ normalization
    @property
    def normalization_fitted(self) -> bool:
        """Whether the input statistics have been fitted (a checkpoint restores them)."""
        return bool(self.obs_normalizer.count > 0)

    @torch.no_grad()
    def fit_normalization(self, observation: Tensor, goal: Tensor | None = None) -> None:
        """Set the input statistics from training data ``observation (N, o)``, ``goal (N, g)``."""
        self.obs_normalizer.update(observation)
        if self.goal_normalizer is not None:
            if goal is None:
                raise ValueError(f"goal (N, {self.goal_dim}) is needed: goal_dim > 0")
            self.goal_normalizer.update(goal)
            if self.relative_normalizer is not None:
                self.relative_normalizer.update(self._relative_goal(observation, goal))

    def _relative_goal(self, observation: Tensor, goal: Tensor) -> Tensor:
        """``goal − observation[:, k : k+g]`` ``(B, g)``: the target relative to the hand."""
        k = int(self.relative_goal_at)  # type: ignore[arg-type]
        return goal - observation[..., k:k + self.goal_dim]

    def features(self, observation: Tensor, goal: Tensor | None = None) -> Tensor:
        """Normalized network input ``(B, o + g)`` (``(B, o + 2g)`` with the relative goal)
        of ``observation (B, o)``, ``goal (B, g)``."""
        parts = [self.obs_normalizer(observation)]
        if self.goal_normalizer is not None:
            if goal is None:
                raise ValueError(f"goal (B, {self.goal_dim}) is needed: goal_dim > 0")
            parts.append(self.goal_normalizer(goal))
            if self.relative_normalizer is not None:
                parts.append(self.relative_normalizer(self._relative_goal(observation, goal)))
        return torch.cat(parts, -1).to(self.action_low.dtype)

    # ------------------------------------------------------------------ actions
    def _squash(self, z: Tensor) -> Tensor:
        if self.squash == "tanh":
            centre = (self.action_high + self.action_low) / 2
            return centre + self.action_scale * torch.tanh(z)
        return torch.maximum(torch.minimum(z, self.action_high), self.action_low)

    def mean_and_log_std(self, observation: Tensor, goal: Tensor | None = None
                         ) -> tuple[Tensor, Tensor | None]:
        """Action mean ``(B, a)`` inside the box and, for the Gaussian head, the log-std
        ``(B, a)`` in half-width units (``None`` for the deterministic head). For the mixture
        head: the mean and log-std of the most probable component."""
        out = self.net(self.features(observation, goal))
        if self.head == "deterministic":
            return self._squash(out), None
        if self.head == "mixture":
            logits, mean, log_std = self._components(out)
            pick = logits.argmax(-1)[:, None, None].expand(-1, 1, self.act_dim)
            return mean.gather(1, pick)[:, 0], log_std.gather(1, pick)[:, 0]
        z, log_std = out.split(self.act_dim, -1)
        return self._squash(z), log_std.clamp(_LOG_STD_MIN, _LOG_STD_MAX)

    def _components(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mixture head output ``(B, K(2a+1))`` -> logits ``(B, K)``, squashed means ``(B, K,
        a)`` and log-stds ``(B, K, a)`` in half-width units."""
        K, a = self.mixtures, self.act_dim
        logits, z, log_std = out.split([K, K * a, K * a], -1)
        z, log_std = z.reshape(-1, K, a), log_std.reshape(-1, K, a)
        return logits, self._squash(z), log_std.clamp(_LOG_STD_MIN, _LOG_STD_MAX)

    def forward(self, observation: Tensor, goal: Tensor | None = None) -> Tensor:
        """The acting action ``(B, a)`` (the mean for the Gaussian head, the most probable
        component's mean for the mixture)."""
        return self.mean_and_log_std(observation, goal)[0]

    @torch.no_grad()
    def act(self, observation: np.ndarray | Tensor, goal: np.ndarray | Tensor | None = None
            ) -> np.ndarray:
        """Numpy actions ``(B, a)`` for raw ``observation (B, o)`` and ``goal (B, g)``."""
        dev = self.action_low.device
        obs = torch.as_tensor(np.asarray(observation), dtype=torch.float32, device=dev)
        g = None if goal is None else torch.as_tensor(np.asarray(goal), dtype=torch.float32,
                                                      device=dev)
        return self(obs, g).cpu().numpy()

    # ------------------------------------------------------------------ loss
    def loss(self, observation: Tensor, goal: Tensor | None, action: Tensor) -> dict[str, Tensor]:
        """Behaviour-cloning loss on expert ``action (B, a)``.

        Returns ``loss_bc`` (what is optimized: MSE in half-widths, or the Gaussian / mixture
        NLL per action dimension) and the diagnostic ``action_mse`` (MSE in the action's own
        units, of the acting action).
        """
        target = torch.maximum(torch.minimum(action.to(self.action_low), self.action_high),
                               self.action_low)
        if self.head == "mixture":
            return self._mixture_loss(observation, goal, target)
        if self.head == "deterministic" and self.squash == "clip":
            return self._clipped_loss(observation, goal, target)
        mean, log_std = self.mean_and_log_std(observation, goal)
        err = (mean - target) / self.action_scale  # (B, a) in half-widths
        if log_std is None:
            loss = (err**2).mean()
        else:
            # −log N(err; 0, e^{2s}) = ½ (err / e^s)² + s + ½ log 2π, per action dimension
            loss = (0.5 * (err * torch.exp(-log_std)) ** 2 + log_std).mean() + 0.5 * math.log(
                2 * math.pi
            )
        return {"loss_bc": loss, "action_mse": ((mean - target) ** 2).mean().detach()}

    def _clipped_loss(self, observation: Tensor, goal: Tensor | None, target: Tensor
                      ) -> dict[str, Tensor]:
        """MSE of the clipped deterministic head without its dead zone.

        ``(clip(z) − a^*)²`` has no gradient once ``z`` leaves the box, so an output pushed
        past a bound stays there even where the expert's action is inside. The loss is taken
        on the raw output instead, as the squared distance from ``z`` to the set of outputs
        that clip onto the target: the target itself inside the box, the ray beyond the bound
        where the expert saturates (``[a_hi, ∞)`` for ``a^* = a_hi``). It equals the clipped
        error inside the box, bounds it from above outside, and is zero exactly where the
        clipped action is the expert's.
        """
        z = self.net(self.features(observation, goal))
        err = z - target
        # saturated: at a bound to float32 rounding of the map from controls to actions
        slack = 1e-6 * self.action_scale
        err = torch.where(target >= self.action_high - slack, torch.clamp(err, max=0.0), err)
        err = torch.where(target <= self.action_low + slack, torch.clamp(err, min=0.0), err)
        mean = self._squash(z)
        return {"loss_bc": ((err / self.action_scale) ** 2).mean(),
                "action_mse": ((mean - target) ** 2).mean().detach()}

    def _mixture_loss(self, observation: Tensor, goal: Tensor | None, target: Tensor
                      ) -> dict[str, Tensor]:
        logits, mean, log_std = self._components(self.net(self.features(observation, goal)))
        err = (mean - target[:, None]) / self.action_scale  # (B, K, a) in half-widths
        # log N(err; 0, e^{2s}) summed over action dimensions: (B, K)
        log_prob = -(0.5 * (err * torch.exp(-log_std)) ** 2 + log_std).sum(-1) - (
            0.5 * self.act_dim * math.log(2 * math.pi))
        nll = -torch.logsumexp(torch.log_softmax(logits, -1) + log_prob, -1)  # (B,)
        pick = logits.argmax(-1)[:, None, None].expand(-1, 1, self.act_dim)
        acting = mean.gather(1, pick)[:, 0]
        return {"loss_bc": nll.mean() / self.act_dim,
                "action_mse": ((acting - target) ** 2).mean().detach()}

    def extra_repr(self) -> str:
        return (f"head={self.head!r}, mixtures={self.mixtures}, squash={self.squash!r}, "
                f"relative_goal_at={self.relative_goal_at}")
