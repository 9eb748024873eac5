"""Policies that warm-start trajectory optimization: a learned policy rolled out through the
expert's planning model proposes the whole control sequence an MPC solve starts from.

A receding-horizon MPC solve starts from a guess ``u_init (B, T, m)``: zeros (the cold start),
or the previous plan shifted one step. A goal-conditioned policy ``π(o, g)`` trained on the
expert's actions (:mod:`diffto.learning.gcbc`) knows roughly what the expert does from any
state, so rolling it out through the planning model ``f``,

.. math::

    \\hat x_0 = x, \\qquad \\hat u_t = \\mathrm{clip}\\big(c(π(o(\\hat x_t), g)),
    \\underline u, \\overline u\\big), \\qquad \\hat x_{t+1} = f(\\hat x_t, \\hat u_t),
    \\quad t = 0, …, T-1,

(``o`` the observation of a planning state, ``c`` the map from environment actions to the
expert's controls) gives a whole dynamically consistent plan near the expert's: the solver
then only refines it (Mansard et al., 2018, "Using a memory of motion to efficiently warm-start
a nonlinear predictive controller": 9.5 → 3.0 Crocoddyl iterations). Unlike the shifted previous
plan it exists on the first step of an episode and after a goal change, and unlike a
regressor of whole plans it stays consistent with the model and the bounds by construction.

:class:`PolicyWarmStart` is the proposer that :class:`diffto.tasks.mpc_expert.RecedingHorizon`
takes with ``warm_start="policy"``: ``proposer(states (B, n), goals (B, g)) -> u_init
(B, T, m)``. :class:`PlanWarmStart` is the other proposer: a network that regresses the
expert's whole plan (:class:`diffto.learning.plan_imitation.PlanImitation`), with no rollout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PolicyWarmStart", "PlanWarmStart", "rollout_policy", "load_policy"]

Policy = Callable[[Tensor, Tensor], Tensor]


def rollout_policy(
    policy: Policy,
    dynamics: Callable[[Tensor, Tensor], Tensor],
    state: Tensor,
    goal: Tensor,
    horizon: int,
    to_control: Callable[[Tensor], Tensor] | None = None,
    observation_of: Callable[[Tensor], Tensor] | None = None,
    u_lower: Tensor | None = None,
    u_upper: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Closed-loop rollout of ``policy`` through the planning model ``dynamics``.

    Args:
        policy: ``(observation (B, o), goal (B, g)) -> action (B, a)``.
        dynamics: the planning model ``(x (B, n), u (B, m)) -> x_next (B, n)``.
        state: ``(B, n)`` initial planning states.
        goal: ``(B, g)`` goals.
        horizon: ``T``, steps to roll out.
        to_control: actions ``(B, a)`` -> controls ``(B, m)`` (``None``: the same units).
        observation_of: planning states ``(B, n)`` -> policy observations ``(B, o)``
            (``None``: the planning state is the observation).
        u_lower, u_upper: control bounds broadcasting to ``(B, m)``; controls are clipped to
            them before they are applied (``None``: unbounded).

    Returns:
        ``u (B, T, m)`` and ``x (B, T+1, n)`` (``x[:, 0] = state``), in ``state``'s dtype.
    """
    if state.dim() != 2:
        raise ValueError(f"state must have shape (B, n), got {tuple(state.shape)}")
    if goal.dim() != 2 or goal.shape[0] != state.shape[0]:
        raise ValueError(f"goal must have shape ({state.shape[0]}, g), got {tuple(goal.shape)}")
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
    xs, us = [state], []
    for _ in range(horizon):
        obs = xs[-1] if observation_of is None else observation_of(xs[-1])
        action = torch.as_tensor(policy(obs, goal))
        u = action if to_control is None else torch.as_tensor(to_control(action))
        u = u.to(state)
        if u.dim() != 2 or u.shape[0] != state.shape[0]:
            raise ValueError(f"the policy's controls must have shape ({state.shape[0]}, m), got "
                             f"{tuple(u.shape)}")
        if u_lower is not None or u_upper is not None:
            u = torch.clamp(u, None if u_lower is None else u_lower.to(u),
                            None if u_upper is None else u_upper.to(u))
        us.append(u)
        xs.append(dynamics(xs[-1], u))
    return torch.stack(us, 1), torch.stack(xs, 1)


def load_policy(checkpoint: str) -> nn.Module:
    """The policy network ``(observation, goal) -> action`` of a goal-conditioned BC
    checkpoint (:class:`diffto.learning.gcbc.GoalConditionedBC`), in eval mode on the CPU;
    its attribute ``observation_keys`` names the goal-env entries its observation
    concatenates (``("observation",)`` unless the learner was told otherwise)."""
    from diffto.learning.gcbc import GoalConditionedBC

    module = GoalConditionedBC.load_from_checkpoint(checkpoint, map_location="cpu")
    module.eval()
    policy = module.policy
    policy.observation_keys = tuple(getattr(module, "observation_keys", ("observation",)))
    return policy


def _as_batches(states, goals) -> tuple[Tensor, Tensor]:
    """Planning states ``(B, n)`` and goals ``(B, g)`` as float64 tensors (a single state or
    goal is a batch of one): what both proposers take."""
    x0 = torch.as_tensor(states, dtype=torch.float64)
    g = torch.as_tensor(goals, dtype=torch.float64)
    return (x0.unsqueeze(0) if x0.dim() == 1 else x0), (g.unsqueeze(0) if g.dim() == 1 else g)


def _observation_from_keys(expert: Any, keys: tuple[str, ...]) -> Callable[[Tensor], Tensor]:
    """Planning states ``(B, n)`` -> the policy's observation: the goal-env entries ``keys``
    of the states (the expert's ``observation_of`` and ``achieved_goal_of``), concatenated."""
    maps = {"observation": "observation_of", "achieved_goal": "achieved_goal_of"}
    unknown = [k for k in keys if k not in maps]
    if unknown:
        raise ValueError(f"observation_keys may name {sorted(maps)}, got {list(keys)}")
    fns = [getattr(expert, maps[k]) for k in keys]
    if len(fns) == 1:
        return fns[0]
    return lambda x: torch.cat([f(x) for f in fns], -1)


class PolicyWarmStart(nn.Module):
    """A learned policy as the warm start of an MPC expert: its rollout through the expert's
    planning model (:func:`rollout_policy`) is the whole ``u_init``.

    Args:
        policy: the policy network ``(observation (B, o), goal (B, g)) -> action (B, a)`` in
            environment action units, or the path of a goal-conditioned BC checkpoint
            (:func:`load_policy`).
        expert: the :class:`~diffto.tasks.mpc_expert.MPCExpert` whose solves are warm-started:
            its planning model, control bounds, action-to-control map and horizon are used.
        horizon: ``T`` of the proposals; ``None``: the expert's.
        observation_of: planning states ``(B, n)`` -> the policy's observations ``(B, o)``;
            ``None``: built from the expert's ``observation_of`` (and ``achieved_goal_of``
            where the policy's ``observation_keys`` name ``achieved_goal``), or the identity
            for an expert without them.

    ``proposer(states (B, n), goals (B, g)) -> u_init (B, T, m)`` (float64, within the
    expert's bounds), under ``torch.no_grad``.
    """

    def __init__(
        self,
        policy: nn.Module | str,
        expert: Any,
        horizon: int | None = None,
        observation_of: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        for name in ("dynamics", "u_lower", "u_upper", "to_control", "horizon", "n_ctrl"):
            if not hasattr(expert, name):
                raise ValueError(f"expert must be an MPCExpert (with {name}), got "
                                 f"{type(expert).__name__}")
        if isinstance(policy, str):
            policy = load_policy(policy)
        if not callable(policy):
            raise ValueError(f"policy must be a module (observation, goal) -> action or a "
                             f"checkpoint path, got {type(policy).__name__}")
        T = expert.horizon if horizon is None else horizon
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"horizon must be an int >= 1 or None, got {horizon!r}")
        if observation_of is None and hasattr(expert, "observation_of"):
            keys = tuple(getattr(policy, "observation_keys", ("observation",)))
            observation_of = _observation_from_keys(expert, keys)
        if observation_of is not None and not callable(observation_of):
            raise ValueError(f"observation_of must be callable or None, got {observation_of!r}")
        self.policy = policy.eval() if isinstance(policy, nn.Module) else policy
        self.expert = expert
        self.horizon = T
        self.observation_of = observation_of

    def _policy(self, observation: Tensor, goal: Tensor) -> Tensor:
        # The network runs in its own dtype (float32 usually); the rollout stays in float64.
        dtype = next((p.dtype for p in self.policy.parameters()), observation.dtype) \
            if isinstance(self.policy, nn.Module) else observation.dtype
        return self.policy(observation.to(dtype), goal.to(dtype)).to(observation.dtype)

    @torch.no_grad()
    def rollout(self, states: Tensor, goals: Tensor) -> tuple[Tensor, Tensor]:
        """``u (B, T, m)`` and the predicted ``x (B, T+1, n)`` of the policy's rollout from
        ``states (B, n)`` to ``goals (B, g)``."""
        e = self.expert
        x0, g = _as_batches(states, goals)
        u, x = rollout_policy(self._policy, e.dynamics, x0, g, self.horizon, e.to_control,
                              self.observation_of, e.u_lower, e.u_upper)
        if u.shape[-1] != e.n_ctrl:
            raise ValueError(f"the policy's controls have {u.shape[-1]} entries, the expert "
                             f"plans {e.n_ctrl}")
        return u, x

    def forward(self, states: Tensor, goals: Tensor) -> Tensor:
        """The proposal ``u_init (B, T, m)`` for ``states (B, n)`` and ``goals (B, g)``."""
        return self.rollout(states, goals)[0]

    def extra_repr(self) -> str:
        return f"horizon={self.horizon}, expert={type(self.expert).__name__}"


class PlanWarmStart(nn.Module):
    """A regressed plan as the warm start of an MPC expert: the whole ``u_init`` in one forward
    pass of a :class:`~diffto.learning.plan_imitation.PlanImitation` network.

    Args:
        plan: a trained ``PlanImitation`` module, or the path of its checkpoint.
        expert: the :class:`~diffto.tasks.mpc_expert.MPCExpert` whose solves are
            warm-started: its ``observation_of`` / ``achieved_goal_of`` give the network's
            observation of a planning state, its ``to_control`` maps actions to controls, and
            its horizon must be the plan's.

    ``proposer(states (B, n), goals (B, g)) -> u_init (B, T, m)`` (float64, within the
    expert's bounds), under ``torch.no_grad``; the same call as :class:`PolicyWarmStart`, so
    ``RecedingHorizon(expert, warm_start="policy", proposer=PlanWarmStart(...))`` and
    ``benchmarks/bench_warm_start.py --plan CKPT`` take it.
    """

    def __init__(self, plan: nn.Module | str, expert: Any) -> None:
        super().__init__()
        from diffto.learning.plan_imitation import PlanImitation

        for name in ("to_control", "horizon", "n_ctrl", "observation_of"):
            if not hasattr(expert, name):
                raise ValueError(f"expert must be an MPCExpert (with {name}), got "
                                 f"{type(expert).__name__}")
        if isinstance(plan, str):
            plan = PlanImitation.load_from_checkpoint(plan, map_location="cpu")
        if not isinstance(plan, PlanImitation):
            raise ValueError(f"plan must be a PlanImitation module or its checkpoint path, got "
                             f"{type(plan).__name__}")
        if plan.hparams.horizon != expert.horizon:
            raise ValueError(f"the plan network proposes {plan.hparams.horizon} stages, the "
                             f"expert plans {expert.horizon}: give the expert horizon="
                             f"{plan.hparams.horizon}")
        self.plan = plan.eval()
        self.expert = expert
        self.horizon = expert.horizon
        self.observation_of = _observation_from_keys(expert, tuple(plan.observation_keys))

    @torch.no_grad()
    def forward(self, states: Tensor, goals: Tensor) -> Tensor:
        """The proposal ``u_init (B, T, m)`` for ``states (B, n)`` and ``goals (B, g)``."""
        x0, g = _as_batches(states, goals)
        actions = self.plan.proposal(self.observation_of(x0), g)  # (B, T, a)
        B, T, a = actions.shape
        u = torch.as_tensor(self.expert.to_control(actions.reshape(B * T, a).double().cpu()))
        return u.reshape(B, T, -1).to(x0)

    def extra_repr(self) -> str:
        return f"horizon={self.horizon}, expert={type(self.expert).__name__}"
