"""Goal-conditioned Q-learning with hindsight relabelling: what SAC, TD3+BC and IQL share.

A :class:`~diffto.learning.goal_off_policy.GoalOffPolicy` with twin critics
``Q_1, Q_2(s, a, g)`` (:class:`~diffto.learning.residual_mlp.ResidualMLP` of the base's width
and depth; ``num_critics`` > 2 makes an ensemble ``Q_1 … Q_N``, each fitted to the same
target, whose minimum bootstraps and whose spread a subclass may use as pessimism), their
Polyak-averaged targets ``Q̄_i`` (``Q̄ ← (1 − τ) Q̄ + τ Q`` after every
update), hindsight goals and a reward computed from the relabelled goal. Subclasses give the
TD target (:meth:`td_target`) and the actor's loss:
:class:`~diffto.learning.goal_sac.GoalSAC`, :class:`~diffto.learning.td3bc.GoalTD3BC`,
:class:`~diffto.learning.iql.GoalIQL`.

Relabelling (HER, "future" strategy)
    Each transition of a batch gets, with probability ``her_ratio``, the goal of a state drawn
    uniformly from its own episode's future (by episode id in the replay buffer), else its
    episode's desired goal. Critic and actor use the same relabelled goals.

Reward of a transition ``(s, a, s')`` for the goal ``g`` (``reward_type``)
    * ``"sparse"``, the task's success: ``0`` if ``‖achieved(s') − g‖ <= success_radius``,
      else ``−1``, where ``achieved`` is the first ``env_goal_dim`` entries of the goal-space
      features (a hand offset in the goal is ignored).
    * ``"graded"``: ``−min(1, ‖achieved(s') − g‖ / success_radius)``, the sparse reward
      outside the radius and a linear pull to the goal itself inside it. The sparse reward
      is indifferent between any two points within the radius, so a policy (a residual on an
      exact base, say) may settle anywhere in it; this one is not.
    * ``"stage_cost"``, minus a TO expert's stage cost
      ``½ w_g² ‖achieved(s') − g‖² + ½ w_v² ‖v(s')‖²`` with ``v`` the entries
      ``velocity_slice`` of the state the networks see. With the Panda expert's weights
      (``w_g = 10``, ``w_v = 0.3``, and ``action_weight = 0.05`` below) this is its running
      cost, evaluated at the state the action leads to.

    Both subtract ``½ action_weight² ‖a‖²`` (a penalty on the action, e.g. on a residual).
    Every reward is ``<= 0``, so TD targets are clipped at 0 from above; the sparse (or
    graded) reward without an action penalty lies in ``[−1, 0]`` and its return in
    ``[−1/(1 − γ), 0]``, which clips from below too (an early bootstrapping error never leaves
    the values any policy can reach).

The critics read the actor's :class:`~diffto.learning.goal_inputs.GoalInputs` features (one
instance: the same relative goal and normalization), with the action in front.

Health metrics (logged at an iteration's last update): ``critic/q_mean``,
``critic/target_mean``, ``critic/reward_mean`` and ``critic/reached`` (the share of relabelled
goals reached at the next state).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffto.learning.goal_off_policy import GoalOffPolicy
from diffto.learning.residual_mlp import ResidualMLP

__all__ = ["GoalQLearning"]

RewardType = Literal["sparse", "graded", "stage_cost"]
REWARD_TYPES = ("sparse", "graded", "stage_cost")


class GoalQLearning(GoalOffPolicy):
    """Twin goal-conditioned critics with HER and a goal reward (see the module docstring).

    Args:
        her_ratio: probability that a transition's goal is relabelled with a future goal of
            its episode (else the episode's desired goal), in ``[0, 1]``.
        success_radius: distance between the achieved and the relabelled goal at which the
            task counts as solved: the sparse reward's 0 (and ``critic/reached``). It must
            match the task's success test: 0.05 is Metaworld's reach and push radius, 0.02 the
            Panda reach's.
        reward_type: ``"sparse"``, ``"graded"`` or ``"stage_cost"`` (module docstring).
        goal_weight, velocity_weight: ``w_g``, ``w_v`` of the stage cost.
        velocity_slice: ``[start, stop]`` of the networks' state that the stage cost's
            velocity term penalizes (``None``: no velocity term).
        action_weight: the action penalty's weight (both reward types).
        tau: Polyak rate of the target critics, in ``(0, 1]``.
        num_critics: critics in the ensemble (2: twin critics), at least 2.
        **kwargs: :class:`GoalOffPolicy` arguments.
    """

    future_offset = "uniform"

    def __init__(self, her_ratio: float = 0.8, success_radius: float = 0.05,
                 reward_type: RewardType = "sparse", goal_weight: float = 10.0,
                 velocity_weight: float = 0.0, velocity_slice: tuple[int, int] | None = None,
                 action_weight: float = 0.0, tau: float = 0.005, num_critics: int = 2,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if not 0.0 <= her_ratio <= 1.0:
            raise ValueError(f"her_ratio must be in [0, 1], got {her_ratio}")
        if not success_radius > 0.0:
            raise ValueError(f"success_radius must be > 0, got {success_radius}")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        if reward_type not in REWARD_TYPES:
            raise ValueError(f"reward_type must be one of {REWARD_TYPES}, got {reward_type!r}")
        for name, value in (("goal_weight", goal_weight), ("velocity_weight", velocity_weight),
                            ("action_weight", action_weight)):
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if velocity_slice is not None and not (
                len(velocity_slice) == 2 and 0 <= velocity_slice[0] < velocity_slice[1]
                <= self.state_dim):
            raise ValueError(f"velocity_slice must be [start, stop] within the networks' "
                             f"{self.state_dim} state entries, got {velocity_slice}")
        if isinstance(num_critics, bool) or not isinstance(num_critics, int) or num_critics < 2:
            raise ValueError(f"num_critics must be an int >= 2, got {num_critics!r}")
        self.q = nn.ModuleList(self._make_q() for _ in range(num_critics))
        self.q_target = copy.deepcopy(self.q)  # in the state_dict, not in the optimizer
        self.q_target.requires_grad_(False)

    def _make_q(self) -> ResidualMLP:
        hp = self.hparams
        return ResidualMLP(self.action_dim + self.actor.inputs.out_dim, 1, hp.width, hp.depth,
                           hp.residual)

    # ------------------------------------------------------------------ the critics
    def q_values(self, nets: nn.ModuleList, obs: Tensor, action: Tensor, goal: Tensor) -> Tensor:
        """``(len(nets), B)``: the critics ``nets`` at ``(s, a, g)``."""
        x = torch.cat([action, self.actor.inputs(obs, goal)], -1)
        return torch.stack([net(x).squeeze(-1) for net in nets])

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.q.parameters())

    def reset_critic(self) -> None:
        self.reset_in_place(self.q, nn.ModuleList(
            self._make_q() for _ in range(self.hparams.num_critics)))
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

    def actor_goals(self, batch: dict[str, Tensor]) -> Tensor:
        return self.relabel(batch)

    def goal_distance(self, next_goal: Tensor, goal: Tensor) -> Tensor:
        """``(B,)``: distance between the achieved parts of two goal-space batches."""
        d = self.env_goal_dim
        return torch.linalg.vector_norm(next_goal[:, :d] - goal[:, :d], dim=-1)

    def reward(self, batch: dict[str, Tensor], goal: Tensor) -> Tensor:
        """``(B,)``: the reward of the batch's transitions for ``goal`` (module docstring)."""
        hp = self.hparams
        dist = self.goal_distance(batch["next_goal"], goal)
        if hp.reward_type == "sparse":
            reward = (dist <= hp.success_radius).float() - 1.0
        elif hp.reward_type == "graded":
            reward = -(dist / hp.success_radius).clamp(max=1.0)
        else:
            reward = -0.5 * (hp.goal_weight * dist) ** 2
            if hp.velocity_slice is not None and hp.velocity_weight > 0:
                v = batch["next_observation"][:, slice(*hp.velocity_slice)]
                reward = reward - 0.5 * hp.velocity_weight ** 2 * (v ** 2).sum(-1)
        if hp.action_weight > 0:
            reward = reward - 0.5 * hp.action_weight ** 2 * (batch["action"] ** 2).sum(-1)
        return reward

    def clip_target(self, target: Tensor) -> Tensor:
        """Clip a TD target to the returns the reward allows (module docstring)."""
        hp = self.hparams
        if hp.reward_type in ("sparse", "graded") and hp.action_weight == 0:
            return target.clamp(-1.0 / (1.0 - hp.gamma), 0.0)
        return target.clamp(max=0.0)

    def td_target(self, batch: dict[str, Tensor], goal: Tensor, reward: Tensor) -> Tensor:
        """The regression target ``(B,)`` of both critics for ``goal``, unclipped."""
        raise NotImplementedError

    def critic_loss(self, batch: dict[str, Tensor], with_metrics: bool = False
                    ) -> tuple[Tensor, dict[str, float]]:
        goal = self.relabel(batch)
        reward = self.reward(batch, goal)
        with torch.no_grad():
            target = self.clip_target(self.td_target(batch, goal, reward))
        q = self.q_values(self.q, batch["observation"], batch["action"], goal)
        loss = ((q - target) ** 2).mean(-1).sum()
        loss = loss + self.extra_critic_loss(batch, goal)
        if not with_metrics:
            return loss, {}
        reached = self.goal_distance(batch["next_goal"], goal) <= self.hparams.success_radius
        return loss, {"critic/q_mean": float(q.detach().mean()),
                      "critic/target_mean": float(target.mean()),
                      "critic/reward_mean": float(reward.mean()),
                      "critic/reached": float(reached.float().mean())}

    def extra_critic_loss(self, batch: dict[str, Tensor], goal: Tensor) -> Tensor:
        """Further value-function losses of a subclass (e.g. IQL's state value)."""
        return torch.zeros((), device=goal.device)

    def actor_value(self, obs: Tensor, action: Tensor, goal: Tensor) -> Tensor:
        return self.q_values(self.q, obs, action, goal).min(0).values
