"""SAC with hindsight experience replay (HER): the reward-based baseline of contrastive RL.

Twin critics ``Q_1, Q_2(s, a, g)`` (:class:`~diffto.learning.residual_mlp.ResidualMLP` of the
base's width and depth) learn the goal-conditioned value of the sparse reward

    ``r(s', g) = 0`` if ``‖achieved(s') − g‖ <= success_radius``, else ``−1``,

where ``achieved`` is the first ``env_goal_dim`` entries of the goal-space features (with
``goal_features="achieved_goal_and_hand"`` the goal also carries a hand offset, which the
reward ignores). The actor is the SAC tanh-Gaussian of
:class:`~diffto.learning.goal_off_policy.GoalOffPolicy` with its learned temperature α,
maximizing ``min_i Q_i(s, π(s, g), g) − α log π``.

Relabelling (HER, "future" strategy)
    Each transition of a batch gets, with probability ``her_ratio``, the goal of a state drawn
    uniformly from its own episode's future (``future_offset = "uniform"``), else its
    episode's desired goal. Critic and actor use the same relabelled goals.

TD target
    The soft Bellman equation of the entropy-regularized return is
    ``Q(s, a, g) = r + γ (1 − terminal) E_{a' ~ π(·|s', g)}[Q(s', a', g) − α log π(a'|s', g)]``.
    With Polyak-averaged target critics ``Q̄_i`` (``Q̄ ← (1 − τ) Q̄ + τ Q`` after every update)
    and one sample ``a' ~ π(·|s', g)`` the regression target is

        ``y = r + γ (1 − terminal) (min_i Q̄_i(s', a', g) − α log π(a'|s', g))``

    and the critic loss is ``Σ_i mean (Q_i(s, a, g) − y)²``. The return of rewards in
    ``[−1, 0]`` lies in ``[−Σ_k γ^k, 0] = [−1/(1 − γ), 0]``, so ``y`` is clipped to that
    interval: the entropy bonus ``−α log π`` can push an unclipped target above 0 (or, with a
    negative entropy, below the floor), and the clip keeps early bootstrapping errors from
    growing beyond the values any policy can reach.

Health metrics (logged at an iteration's last update): ``critic/q_mean``,
``critic/target_mean``, ``critic/reward_mean`` and ``critic/reached`` (the share of relabelled
goals reached at the next state, ``reward_mean + 1``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from diffto.learning.goal_off_policy import GoalOffPolicy
from diffto.learning.residual_mlp import ResidualMLP

__all__ = ["GoalSAC"]


class GoalSAC(GoalOffPolicy):
    """SAC with HER over a goal env (see the module docstring; the environment, buffer,
    evaluation and continual-learning arguments are :class:`GoalOffPolicy`'s).

    Args:
        her_ratio: probability that a transition's goal is relabelled with a future goal of
            its episode (else the episode's desired goal), in ``[0, 1]``.
        success_radius: distance between the achieved and the relabelled goal at which the
            reward is 0 (else −1). It must match the task's success test: 0.05 is Metaworld's
            reach and push radius (pick-place too); other tasks and envs differ.
        tau: Polyak rate of the target critics, in ``(0, 1]``.
        **kwargs: :class:`GoalOffPolicy` arguments.
    """

    future_offset = "uniform"

    def __init__(self, her_ratio: float = 0.8, success_radius: float = 0.05,
                 tau: float = 0.005, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if not 0.0 <= her_ratio <= 1.0:
            raise ValueError(f"her_ratio must be in [0, 1], got {her_ratio}")
        if not success_radius > 0.0:
            raise ValueError(f"success_radius must be > 0, got {success_radius}")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        self.q = nn.ModuleList(self._make_q() for _ in range(2))
        self.q_target = copy.deepcopy(self.q)  # in the state_dict, not in the optimizer
        self.q_target.requires_grad_(False)

    def _make_q(self) -> ResidualMLP:
        hp = self.hparams
        return ResidualMLP(self.state_dim + self.action_dim + self.goal_dim, 1, hp.width,
                           hp.depth, hp.residual)

    # ------------------------------------------------------------------ the critic
    @staticmethod
    def _q_values(nets: nn.ModuleList, obs: Tensor, action: Tensor, goal: Tensor) -> Tensor:
        """``(2, B)``: both critics at ``(s, a, g)``."""
        x = torch.cat([obs, action, goal], -1)
        return torch.stack([net(x).squeeze(-1) for net in nets])

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.q.parameters())

    def reset_critic(self) -> None:
        self.reset_in_place(self.q, nn.ModuleList(self._make_q() for _ in range(2)))
        self.reset_targets()

    @torch.no_grad()
    def reset_targets(self) -> None:
        """Copy the critics into the target critics."""
        for t, p in zip(self.q_target.parameters(), self.q.parameters(), strict=True):
            t.copy_(p)

    @torch.no_grad()
    def after_update(self) -> None:
        """Polyak averaging: ``Q̄ ← (1 − τ) Q̄ + τ Q``."""
        tau = self.hparams.tau
        for t, p in zip(self.q_target.parameters(), self.q.parameters(), strict=True):
            t.lerp_(p, tau)

    # ------------------------------------------------------------------ relabelling, reward
    def relabel(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's HER goals ``(B, goal_dim)``: the future goal with probability
        ``her_ratio``, else the desired goal. Drawn once per batch (stored in it as
        ``"her_goal"``), so the critic and the actor see the same goals."""
        if "her_goal" not in batch:
            future = batch["future_goal"]
            use_future = torch.rand(future.shape[0], 1, device=future.device) \
                < self.hparams.her_ratio
            batch["her_goal"] = torch.where(use_future, future, batch["desired_goal"])
        return batch["her_goal"]

    def reward(self, next_goal: Tensor, goal: Tensor) -> Tensor:
        """``(B,)``: 0 where the achieved part of ``next_goal`` is within ``success_radius``
        of ``goal``'s, else −1."""
        d = self.env_goal_dim
        dist = torch.linalg.vector_norm(next_goal[:, :d] - goal[:, :d], dim=-1)
        return (dist <= self.hparams.success_radius).float() - 1.0

    @torch.no_grad()
    def td_target(self, batch: dict[str, Tensor], goal: Tensor) -> tuple[Tensor, Tensor]:
        """The clipped soft TD target ``(B,)`` and the rewards ``(B,)`` (module docstring)."""
        gamma = self.hparams.gamma
        reward = self.reward(batch["next_goal"], goal)
        next_action, next_log_prob = self.actor(batch["next_observation"], goal)
        next_q = self._q_values(self.q_target, batch["next_observation"], next_action,
                                goal).min(0).values
        soft_value = next_q - self.log_alpha.exp() * next_log_prob
        target = reward + gamma * (1.0 - batch["terminal"].float()) * soft_value
        return target.clamp(-1.0 / (1.0 - gamma), 0.0), reward

    def critic_loss(self, batch: dict[str, Tensor], with_metrics: bool = False
                    ) -> tuple[Tensor, dict[str, float]]:
        goal = self.relabel(batch)
        target, reward = self.td_target(batch, goal)
        q = self._q_values(self.q, batch["observation"], batch["action"], goal)
        loss = ((q - target) ** 2).mean(-1).sum()
        if not with_metrics:
            return loss, {}
        return loss, {"critic/q_mean": float(q.detach().mean()),
                      "critic/target_mean": float(target.mean()),
                      "critic/reward_mean": float(reward.mean()),
                      "critic/reached": float(reward.mean() + 1.0)}

    # ------------------------------------------------------------------ the actor
    def actor_goals(self, batch: dict[str, Tensor]) -> Tensor:
        return self.relabel(batch)

    def actor_value(self, obs: Tensor, action: Tensor, goal: Tensor) -> Tensor:
        return self._q_values(self.q, obs, action, goal).min(0).values
