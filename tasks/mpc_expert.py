"""Trajectory-optimization experts: a task's MPC problem, and the receding-horizon controller.

An expert is the local, expensive teacher of the learners: for a batch of states and goals it
solves

.. math::

    \\min_{u_{0:T-1}} \\sum_{t=0}^{T-1} \\ell(x_t, u_t; g) + \\ell_T(x_T; g) + V(x_T)
    \\quad \\text{s.t.} \\quad x_{t+1} = f(x_t, u_t),\\; x_0 = x,\\;
    \\underline u \\le u_t \\le \\overline u,

with :class:`diffto.layers.MPC` over the task's planning model ``f`` (:attr:`MPCExpert.dynamics`)
and the task's cost ``ℓ``, ``ℓ_T`` (:meth:`MPCExpert.cost`). ``V`` is an optional learned
terminal value (a critic ``V(x_T)`` with the goal closed over) added as a
:class:`~diffto.NonlinearCost` terminal term, so a shorter horizon can stand in for a long one.

:class:`MPCExpert` is the generic part (the layer, the bounds, the solve, the cold start);
a task subclass gives the cost, the planning state of an environment (:meth:`~MPCExpert.state_of`)
and the map between the planner's controls and the environment's actions
(:meth:`~MPCExpert.to_action`, :meth:`~MPCExpert.to_control`). :class:`RecedingHorizon` closes
the loop: at each control step it solves from the current states and returns the first
controls as actions, warm-started with the previous plans shifted one step (per batch row, so
vectorized episodes that reset at different times keep their own plans), from a cold start, or
from a proposer (a learned policy rolled out into a control sequence).

Every expert plans in float64 on the CPU (MuJoCo models run there in float64 anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from diffto.costs import NonlinearCost
from diffto.layers.mpc import MPC, HessianMode
from diffto.problem import Solution

__all__ = ["MPCExpert", "RecedingHorizon", "terminal_value_cost", "WarmStart"]

WarmStart = Literal["shifted", "cold", "policy"]
TerminalValue = Callable[[Tensor], Tensor]


def terminal_value_cost(terminal_value: TerminalValue) -> NonlinearCost:
    """``V(x_T)`` as a cost term: a :class:`~diffto.NonlinearCost` with a zero stage and
    ``terminal_value (x_T (B, n)) -> (B,)`` as its terminal function, to add (``+``) to a
    task's cost."""
    if not callable(terminal_value):
        raise ValueError(
            f"terminal_value must be callable x_T (B, n) -> (B,), got "
            f"{type(terminal_value).__name__}"
        )
    return NonlinearCost(_zero_stage, terminal=terminal_value)


def _zero_stage(x: Tensor, u: Tensor) -> Tensor:
    # Multiplied in, not a fresh zeros tensor: the stage stays in the autograd graph, so its
    # derivatives are exact zeros rather than missing.
    return 0.0 * x.sum(-1)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _bound(name: str, value) -> Tensor:
    # Bounds given in float32 would widen in float64 (4.905 -> 4.9050002): plans would leave
    # the env's limits by that rounding. Tensors must be float64 already; numbers are cast.
    if isinstance(value, Tensor) and value.dtype != torch.float64:
        raise ValueError(f"{name} must be a float64 tensor (m,), got {value.dtype}")
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() != 1 or not torch.isfinite(t).all():
        raise ValueError(f"{name} must be a finite tensor of shape (m,), got {tuple(t.shape)}")
    return t.clone()


class MPCExpert(nn.Module):
    """A task's MPC problem over its planning model: the generic base of the experts.

    Args:
        dynamics: the planning model ``(x (N, n), u (N, m)) -> x_next (N, n)``, batched; one
            call spans one environment control step.
        horizon: ``T``, planning steps per solve.
        u_lower, u_upper: control bounds ``(m,)``, float64, in the planner's units (e.g. Nm).
        max_iter: iterations of the MPC per solve (per control step in receding horizon).
        tol: convergence tolerance of the MPC (its relative Newton step on the controls).
        hessian: ``"exact"`` or ``"gauss_newton"`` dynamics curvature in the forward solve
            (see :class:`diffto.layers.MPC`).

    Subclasses set ``n_state``, ``n_ctrl``, ``goal_dim``, ``action_dim`` and ``dt`` and
    implement :meth:`cost`, :meth:`state_of`, :meth:`to_action`, :meth:`to_control` and
    :meth:`achieved_goal_of` (and :meth:`observation_of` where the observation is not the
    planning state).
    """

    n_state: int
    n_ctrl: int
    goal_dim: int
    action_dim: int
    dt: float

    def __init__(
        self,
        dynamics: nn.Module,
        horizon: int,
        u_lower: Tensor,
        u_upper: Tensor,
        max_iter: int,
        tol: float,
        hessian: HessianMode = "exact",
    ) -> None:
        super().__init__()
        if not callable(dynamics):
            raise ValueError(f"dynamics must be callable (x, u) -> x_next, got {dynamics!r}")
        self.horizon = _positive_int("horizon", horizon)
        self.max_iter = _positive_int("max_iter", max_iter)
        if not (isinstance(tol, int | float) and not isinstance(tol, bool) and tol > 0):
            raise ValueError(f"tol must be a float > 0, got {tol!r}")
        self.tol = float(tol)
        if hessian not in ("exact", "gauss_newton"):
            raise ValueError(f"hessian must be 'exact' or 'gauss_newton', got {hessian!r}")
        self.hessian: HessianMode = hessian
        self.dynamics = dynamics
        self.register_buffer("u_lower", _bound("u_lower", u_lower))
        self.register_buffer("u_upper", _bound("u_upper", u_upper))
        self._layers: dict[tuple[int, int], MPC] = {}

    # ------------------------------------------------------------------ task-specific
    def cost(self, goal: Tensor, horizon: int, terminal_value: TerminalValue | None = None):
        """The task's cost for goals ``(B, goal_dim)`` over ``horizon`` steps, with
        ``terminal_value (x_T (B, n)) -> (B,)`` added as a terminal term when given (use
        :func:`terminal_value_cost`). Every shipped expert overrides it."""
        raise NotImplementedError(f"{type(self).__name__} must implement cost()")

    def state_of(self, env) -> np.ndarray:
        """Planning state ``(n,)`` of one environment (the unwrapped env or a wrapper)."""
        raise NotImplementedError(f"{type(self).__name__} must implement state_of()")

    def to_action(self, u: Tensor) -> np.ndarray:
        """Environment actions ``(B, action_dim)`` commanding the controls ``u (B, m)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement to_action()")

    def to_control(self, action) -> Tensor:
        """Controls ``(B, m)`` (float64) that environment actions ``(B, action_dim)`` command
        (after the environment's own clipping)."""
        raise NotImplementedError(f"{type(self).__name__} must implement to_control()")

    def observation_of(self, x: Tensor) -> Tensor:
        """The environment's ``observation`` ``(..., o)`` of planning states ``x (..., n)``,
        differentiable in torch (so a policy or a critic on observations can be evaluated on
        planned states). Default: the planning state itself."""
        return x

    def achieved_goal_of(self, x: Tensor) -> Tensor:
        """The environment's ``achieved_goal`` ``(..., goal_dim)`` of planning states
        ``x (..., n)``, differentiable in torch."""
        raise NotImplementedError(f"{type(self).__name__} must implement achieved_goal_of()")

    def initial_controls(self, state: Tensor, goal: Tensor, horizon: int) -> Tensor:
        """The cold start ``(B, T, m)``: zeros (a subclass may know better)."""
        return state.new_zeros(state.shape[0], horizon, self.n_ctrl)

    # ------------------------------------------------------------------ generic
    def layer(self, horizon: int | None = None, max_iter: int | None = None) -> MPC:
        """The :class:`~diffto.layers.MPC` layer of this horizon and iteration cap (cached)."""
        T = self.horizon if horizon is None else _positive_int("horizon", horizon)
        k = self.max_iter if max_iter is None else _positive_int("max_iter", max_iter)
        key = (T, k)
        if key not in self._layers:
            self._layers[key] = MPC(
                horizon=T, u_lower=self.u_lower, u_upper=self.u_upper, max_iter=k,
                tol=self.tol, hessian=self.hessian,
            )
        return self._layers[key]

    def solve(
        self,
        state,
        goal,
        u_init: Tensor | None = None,
        horizon: int | None = None,
        terminal_value: TerminalValue | None = None,
        max_iter: int | None = None,
    ) -> Solution:
        """One MPC solve per row.

        Args:
            state: ``(B, n)`` planning states (tensor or array; a single ``(n,)`` is B = 1).
            goal: ``(B, goal_dim)`` goals.
            u_init: ``(B, T, m)`` warm start; ``None``: :meth:`initial_controls`.
            horizon: ``T``; ``None``: the expert's.
            terminal_value: ``x_T (B, n) -> (B,)`` added to the terminal cost.
            max_iter: iteration cap of this solve; ``None``: the expert's.

        Returns:
            The layer's :class:`~diffto.Solution` (``x (B, T+1, n)``, ``u (B, T, m)``,
            ``cost``, ``converged``, ``iterations`` per row). Differentiable when called with
            gradients enabled (the MPC's implicit backward); controllers call it under
            ``torch.no_grad``.
        """
        x0 = self._batch("state", state, self.n_state)
        g = self._batch("goal", goal, self.goal_dim)
        if g.shape[0] != x0.shape[0]:
            raise ValueError(
                f"state and goal must share the batch size, got {x0.shape[0]} and {g.shape[0]}"
            )
        T = self.horizon if horizon is None else _positive_int("horizon", horizon)
        if u_init is None:
            u_init = self.initial_controls(x0, g, T)
        elif not isinstance(u_init, Tensor) or u_init.shape != (x0.shape[0], T, self.n_ctrl):
            shape = tuple(u_init.shape) if isinstance(u_init, Tensor) else type(u_init).__name__
            raise ValueError(
                f"u_init must be a tensor of shape (B, T, m) = {(x0.shape[0], T, self.n_ctrl)}, "
                f"got {shape}"
            )
        cost = self.cost(g, T, terminal_value)
        return self.layer(T, max_iter)(x0, cost, self.dynamics, u_init=u_init.to(x0))

    def rollout(self, state: Tensor, u: Tensor) -> Tensor:
        """States ``(B, T+1, n)`` of the planning model from ``state (B, n)`` under controls
        ``u (B, T, m)`` (``x[:, 0] = state``): how a policy's actions become a plan."""
        x0 = self._batch("state", state, self.n_state)
        if not isinstance(u, Tensor) or u.dim() != 3 or u.shape[0] != x0.shape[0]:
            shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(f"u must have shape (B={x0.shape[0]}, T, m), got {shape}")
        xs = [x0]
        for t in range(u.shape[1]):
            xs.append(self.dynamics(xs[-1], u[:, t].to(x0)))
        return torch.stack(xs, 1)

    def _batch(self, name: str, value, dim: int) -> Tensor:
        t = torch.as_tensor(value, dtype=torch.float64)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.shape[-1] != dim:
            raise ValueError(f"{name} must have shape (B, {dim}), got {tuple(t.shape)}")
        return t

    def extra_repr(self) -> str:
        return (
            f"horizon={self.horizon}, max_iter={self.max_iter}, tol={self.tol:g}, "
            f"hessian={self.hessian!r}, dt={getattr(self, 'dt', None)}"
        )


class RecedingHorizon:
    """Closed-loop MPC around an expert, for a batch of environments stepped in lockstep.

    Args:
        expert: the :class:`MPCExpert`.
        warm_start: what each solve starts from: ``"shifted"`` the row's previous plan moved one
            step forward (on a row's first step: ``proposer``'s controls if given, else the
            expert's cold start), ``"cold"`` the expert's cold start every step, ``"policy"``
            the controls ``proposer`` returns at every step.
        proposer: ``(states (B, n), goals (B, g)) -> u_init (B, T, m)``, needed for
            ``"policy"`` (e.g. a policy network rolled out through :attr:`MPCExpert.dynamics`,
            :class:`diffto.learning.warm_start.PolicyWarmStart`). With ``"shifted"`` it seeds
            only the first step, where no previous plan exists: measured on the pendulum
            swing-up, a learned proposal needs about a quarter of the cold start's iterations
            there, while the shifted plan is the better start afterwards.
        max_iter: iterations per control step; ``None``: the expert's.
        first_max_iter: iterations of a solve in which some row has no previous plan (an
            episode's first step, from a cold start, usually needs many more); ``None``:
            ``max_iter``.
        horizon: planning horizon; ``None``: the expert's.
        terminal_value: ``(x_T (B, n), goals (B, g)) -> (B,)``, e.g. a learned ``V(s, g)``;
            the goals of each step are closed over before it reaches the expert.

    ``act(states, goals)`` returns the actions ``(B, action_dim)`` (numpy) and the
    :class:`~diffto.Solution` (whose ``u`` is the plan of each row, in the expert's control
    units). ``reset(mask)`` forgets the plans of the rows in ``mask`` (all when ``None``), as
    done when those environments reset. Control steps run under ``torch.no_grad``.
    """

    def __init__(
        self,
        expert: MPCExpert,
        warm_start: WarmStart = "shifted",
        proposer: Callable[[Tensor, Tensor], Tensor] | None = None,
        max_iter: int | None = None,
        horizon: int | None = None,
        terminal_value: Callable[[Tensor, Tensor], Tensor] | None = None,
        first_max_iter: int | None = None,
    ) -> None:
        if not isinstance(expert, MPCExpert):
            raise ValueError(f"expert must be an MPCExpert, got {type(expert).__name__}")
        if warm_start not in ("shifted", "cold", "policy"):
            raise ValueError(
                f"warm_start must be 'shifted', 'cold' or 'policy', got {warm_start!r}"
            )
        if warm_start == "policy" and not callable(proposer):
            raise ValueError("warm_start='policy' needs a proposer (states, goals) -> u_init")
        if proposer is not None and not callable(proposer):
            raise ValueError(f"proposer must be callable or None, got {type(proposer).__name__}")
        if terminal_value is not None and not callable(terminal_value):
            raise ValueError(
                f"terminal_value must be callable or None, got {type(terminal_value).__name__}"
            )
        self.expert, self.warm_start, self.proposer = expert, warm_start, proposer
        self.max_iter = None if max_iter is None else _positive_int("max_iter", max_iter)
        self.first_max_iter = (None if first_max_iter is None
                               else _positive_int("first_max_iter", first_max_iter))
        self.horizon = expert.horizon if horizon is None else _positive_int("horizon", horizon)
        self.terminal_value = terminal_value
        self._plan: Tensor | None = None  # (B, T, m) last plan per row
        self._valid: Tensor | None = None  # (B,) bool: the row's plan may warm-start it

    def reset(self, mask=None) -> None:
        """Forget the plans of the rows where ``mask (B,)`` is true (all rows when ``None``)."""
        if mask is None or self._valid is None:
            self._plan = self._valid = None
            return
        m = torch.as_tensor(np.asarray(mask, dtype=bool))
        if m.shape != self._valid.shape:
            raise ValueError(
                f"mask must have shape {tuple(self._valid.shape)}, got {tuple(m.shape)}"
            )
        self._valid = self._valid & ~m

    def act(self, states, goals) -> tuple[np.ndarray, Solution]:
        """Solve from ``states (B, n)`` to ``goals (B, g)``; returns the actions
        ``(B, action_dim)`` that apply each row's first control, and the solution."""
        expert = self.expert
        x0 = expert._batch("states", states, expert.n_state)
        g = expert._batch("goals", goals, expert.goal_dim)
        if g.shape[0] != x0.shape[0]:
            raise ValueError(
                f"states and goals must share the batch size, got {x0.shape[0]} and {g.shape[0]}"
            )
        B, T = x0.shape[0], self.horizon
        with torch.no_grad():
            has_plan = (self._valid if self._plan is not None and self._plan.shape[0] == B
                        else torch.zeros(B, dtype=torch.bool))
            if self.warm_start == "policy" or (
                self.warm_start == "shifted" and self.proposer is not None and not has_plan.all()
            ):
                u_init = torch.as_tensor(self.proposer(x0, g)).to(x0)
            else:
                u_init = expert.initial_controls(x0, g, T)
            if self.warm_start == "shifted" and has_plan.any():
                shifted = torch.cat([self._plan[:, 1:], self._plan[:, -1:]], 1)
                u_init = torch.where(has_plan.view(B, 1, 1), shifted, u_init)
            max_iter = self.max_iter
            if self.first_max_iter is not None and not has_plan.all():
                max_iter = self.first_max_iter
            value = None
            if self.terminal_value is not None:
                critic = self.terminal_value

                def value(xT: Tensor) -> Tensor:
                    return critic(xT, g.to(xT))

            sol = expert.solve(x0, g, u_init=u_init, horizon=T, terminal_value=value,
                               max_iter=max_iter)
        # A row whose plan is not finite (failed solve) must not warm-start the next step.
        finite = torch.isfinite(sol.u).all(-1).all(-1)
        self._plan = torch.where(finite.view(B, 1, 1), sol.u.detach(), u_init)
        self._valid = finite
        return expert.to_action(sol.u[:, 0].detach()), sol
