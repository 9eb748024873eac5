"""Whole-plan imitation: a network that proposes the TO expert's open-loop plan, to warm-start it.

A TO dataset stores, beside each applied action, the expert's converged open-loop plan
``u^*_{0:T}`` at that state (``plan (N, T, m)``, :mod:`diffto.data.trajectories`). The plan is
what a warm start needs, so the network regresses it directly,

.. math::

    \\min_θ \\; \\frac{1}{N T} \\sum_i \\sum_{t<T}
    \\big\\lVert (π_θ(o_i, g_i)_t − a(u^*_{i,t})) / h \\big\\rVert^2 ,

with ``a(u)`` the expert's controls mapped affinely into the environment's action box (half
width ``h``): torque / limit on the Panda. It is :class:`~diffto.learning.gcbc.GoalConditionedBC`
with a ``T``-times wider output (the same inputs, normalization, relative goal, data module and
report): its first stage is the expert's action, so the closed-loop evaluation on held-out
goals runs it as a policy (the first control of each proposal) next to the expert, and
:class:`~diffto.learning.warm_start.PlanWarmStart` turns a checkpoint into the ``u_init`` of
the expert's solves.

Rolled out through the planning model (:class:`~diffto.learning.warm_start.PolicyWarmStart`),
a one-step policy's errors compound over the horizon; a regressed plan carries no such drift,
but is only as consistent with the model as the regression is accurate. On the Panda reach the
plan regressor is the better start (``benchmarks/bench_warm_start.py --plan``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffto.data.trajectories import TrajectorySet
from diffto.learning.gcbc import GoalConditionedBC
from diffto.learning.goal_policy import GoalPolicy
from diffto.tasks.registry import build_expert

__all__ = ["PlanImitation", "FirstControl"]


class FirstControl(nn.Module):
    """A plan network as a policy: the first stage ``(B, a)`` of its proposal ``(B, T·a)``
    (what the closed-loop evaluation calls through :meth:`act`)."""

    def __init__(self, plan_policy: GoalPolicy, action_dim: int) -> None:
        super().__init__()
        self.plan_policy, self.action_dim = plan_policy, action_dim

    def forward(self, observation: Tensor, goal: Tensor | None = None) -> Tensor:
        return self.plan_policy(observation, goal)[..., :self.action_dim]

    def act(self, observation, goal=None) -> np.ndarray:
        return self.plan_policy.act(observation, goal)[..., :self.action_dim]


class PlanImitation(GoalConditionedBC):
    """Regression of ``(observation, desired_goal) -> the expert's plan (T, a)`` in action
    units (module docstring).

    Args:
        horizon: ``T``, the stages of the dataset's ``plan`` (the expert's horizon).
        **kwargs: :class:`~diffto.learning.gcbc.GoalConditionedBC` arguments; ``expert`` is
            also the expert whose control bounds define the map from plans to actions.

    The policy's output is ``(B, T·a)``, stage after stage; :meth:`proposal` reshapes it.
    """

    def __init__(self, horizon: int, **kwargs: Any) -> None:
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
        super().__init__(**kwargs)
        self.save_hyperparameters()
        one = self.policy  # the environment's one-step policy: its sizes and action box
        expert = build_expert(self.hparams.env_id, self.hparams.expert)
        lo = torch.as_tensor(expert.u_lower, dtype=torch.float32).reshape(-1)
        hi = torch.as_tensor(expert.u_upper, dtype=torch.float32).reshape(-1)
        if lo.numel() != self.action_dim or not bool(torch.isfinite(lo).all()
                                                     & torch.isfinite(hi).all()):
            raise ValueError(f"the expert's control bounds must be finite and have the "
                             f"action's {self.action_dim} entries, got {lo.tolist()}, "
                             f"{hi.tolist()}")
        # u -> a: the control box onto the action box, entry by entry
        self.register_buffer("control_centre", (hi + lo) / 2)
        self.register_buffer("control_half", (hi - lo) / 2)
        self.policy = GoalPolicy(
            one.obs_dim, one.goal_dim, one.action_low.repeat(horizon),
            one.action_high.repeat(horizon), hidden=tuple(self.hparams.hidden or (256, 256)),
            activation=self.hparams.activation, head=self.hparams.head,
            squash=self.hparams.squash, relative_goal_at=one.relative_goal_at)

    # ------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        data = self.training_data()
        if data is not None:
            self._check_plan(data)
        super().setup(stage)

    def _check_plan(self, data: TrajectorySet) -> None:
        if data.plan is None:
            raise ValueError("the dataset has no 'plan' array: PlanImitation learns the "
                             "expert's open-loop plans (a TO dataset from lightning predict "
                             "stores them)")
        if data.plan.shape[1:] != (self.hparams.horizon, self.action_dim):
            raise ValueError(f"the dataset's plan has shape (N, T, m) = "
                             f"{(len(data.plan), *data.plan.shape[1:])}, the model expects "
                             f"T = {self.hparams.horizon} (horizon), m = {self.action_dim}")

    def plan_in_action_units(self, plan: Tensor) -> Tensor:
        """``plan (B, T·m)`` or ``(B, T, m)`` of controls -> ``(B, T·a)`` actions."""
        B, a = plan.shape[0], self.action_dim
        u = plan.reshape(B, -1, a)
        low, high = self.policy.action_low[:a].to(u), self.policy.action_high[:a].to(u)
        unit = (u - self.control_centre.to(u)) / self.control_half.to(u)  # in [-1, 1]
        return ((high + low) / 2 + (high - low) / 2 * unit).reshape(B, -1)

    def _terms(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "plan" not in batch:
            raise ValueError("the batch has no 'plan': PlanImitation needs a TO dataset with "
                             "the expert's plans")
        return self.policy.loss(self.policy_observation(batch), batch.get("desired_goal"),
                                self.plan_in_action_units(batch["plan"]))

    # ------------------------------------------------------------------ optimization
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        terms = self._terms(batch)
        B = batch["observation"].shape[0]
        self.log("train/loss_plan", terms["loss_bc"], prog_bar=True, batch_size=B)
        self.log("train/plan_mse", terms["action_mse"], batch_size=B)
        return terms["loss_bc"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if not batch:
            return
        with torch.no_grad():
            terms = self._terms(batch)
        B = batch["observation"].shape[0]
        self.log("val/loss_plan", terms["loss_bc"], batch_size=B)
        self.log("val/plan_mse", terms["action_mse"], batch_size=B)

    # ------------------------------------------------------------------ as a policy
    def evaluate(self, policy: GoalPolicy | None = None, episodes: int | None = None,
                 video_episodes: int = 0, progress: bool = False):
        """The first control of each proposal, in closed loop on the held-out seeds."""
        plan_policy = self.policy if policy is None else policy
        return super().evaluate(FirstControl(plan_policy, self.action_dim), episodes,
                                video_episodes, progress)

    @torch.no_grad()
    def proposal(self, observation: Tensor, goal: Tensor | None) -> Tensor:
        """Proposed plans ``(B, T, a)`` in action units for ``observation (B, o)``,
        ``goal (B, g)``."""
        out = self.policy(observation.to(self.policy.action_low), None if goal is None
                          else goal.to(self.policy.action_low))
        return out.reshape(out.shape[0], self.hparams.horizon, self.action_dim)
