"""Policy networks, including :class:`SolverPolicy`: a network whose output layer is a solver.

``SolverPolicy`` follows Amos et al. (2018), "Differentiable MPC for end-to-end planning and
control": a network maps the observation (and a goal) to the parameters of a tracking cost,

.. math::

    \\min_{x, u} \\sum_{t=0}^{T-1} ½ (x_t - x_g)^\\top \\operatorname{diag}(q) (x_t - x_g)
        + ½ u_t^\\top \\operatorname{diag}(r) u_t + ½ (x_T - x_g)^\\top \\operatorname{diag}(q)
        (x_T - x_g),

with ``q = exp(log q) > 0`` and ``r = exp(log r) > 0`` (log-parameterized, so always positive
definite), optionally a goal ``x_g`` and a warm start ``u_init``; a solver layer (MPC, LQR)
then returns the plan, and its first control is the action. Gradients of any loss on the plan
flow back through the solver into the network.

A plan is invariant to scaling all weights by the same factor, so by default the weights are
normalized to geometric mean one (``log w ← log w − mean(log w)``); this removes the one
direction in which a loss on the plan is flat and makes learned weights comparable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffto.problem import LinearDynamics, QuadraticCost, Solution

__all__ = ["MLP", "SolverPolicy", "SolverPolicyOutput", "normalized_log_weights"]


class MLP(nn.Sequential):
    """Fully connected network ``(B, in_dim) -> (B, out_dim)`` with ``hidden`` layer widths.

    Args:
        in_dim: input size.
        out_dim: output size.
        hidden: widths of the hidden layers (empty: a single linear map).
        activation: module class applied after every hidden layer.
        small_last: scale the output layer's initial weight by 0.01, so the output starts
            near its bias whatever the input (to start a parameter head near given values)
            while every layer still receives gradient.
        orthogonal_out_gain: if given, orthogonal initialization as in PPO implementations:
            hidden layers with gain √2, the output layer with this gain, zero biases.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.Tanh,
        small_last: bool = False,
        orthogonal_out_gain: float | None = None,
    ) -> None:
        if in_dim < 1 or out_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                f"in_dim, out_dim and hidden widths must be >= 1, got {in_dim}, {out_dim}, "
                f"{list(hidden)}"
            )
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), activation()]
            width = h
        last = nn.Linear(width, out_dim)
        if orthogonal_out_gain is not None:
            for layer in layers[::2]:
                nn.init.orthogonal_(layer.weight, math.sqrt(2))
                nn.init.zeros_(layer.bias)
            nn.init.orthogonal_(last.weight, orthogonal_out_gain)
            nn.init.zeros_(last.bias)
        if small_last:
            with torch.no_grad():
                last.weight.mul_(0.01)
        layers.append(last)
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim


def normalized_log_weights(log_w: Tensor) -> Tensor:
    """Shift log-weights ``(..., k)`` to zero mean, i.e. weights of geometric mean one."""
    return log_w - log_w.mean(-1, keepdim=True)


@dataclass
class SolverPolicyOutput:
    """What :class:`SolverPolicy` returns.

    Attributes:
        action: ``(B, m)`` first control of the plan.
        solution: the solver's :class:`~diffto.problem.Solution` (plan ``x (B, T+1, n)``,
            ``u (B, T, m)``, per-row ``converged`` and ``iterations``).
        q: ``(B, n)`` state weights used.
        r: ``(B, m)`` control weights used.
        x_goal: ``(B, n)`` goal state used.
        u_init: ``(B, T, m)`` warm start passed to the solver, or ``None``.
    """

    action: Tensor
    solution: Solution
    q: Tensor
    r: Tensor
    x_goal: Tensor
    u_init: Tensor | None


class SolverPolicy(nn.Module):
    """``obs[, goal] -> net -> (q, r, x_goal, u_init) -> solver -> plan, action``.

    Args:
        solver: any diffto layer: it is called with the common contract
            ``solver(x0, cost, dynamics, u_init) -> Solution`` (:mod:`diffto.layers`), so MPC,
            LQR, QPMPC, TheseusTO and CasadiTO are interchangeable here.
        n_state: ``n``.
        n_ctrl: ``m``.
        horizon: ``T`` of the cost built for the solver.
        obs_dim: size of the observation fed to the network; ``None`` means *no network*: the
            parameters are free ``nn.Parameter`` s shared by every row (the classic
            "learn the cost of an expert" setting).
        goal_dim: size of a goal appended to the observation (0: no goal input). A goal of
            size ``n`` is also used as the cost's ``x_goal``.
        hidden: hidden widths of the network.
        init_q: ``(n,)`` initial state weights (default ones).
        init_r: ``(m,)`` initial control weights (default ones).
        learn_goal: also output an offset added to the goal (given, or ``default_goal``).
        default_goal: ``(n,)`` goal when none is passed (default the origin).
        warm_start: also output a warm start ``u_init (B, T, m)`` for the solver (only
            meaningful for an iterative solver with an unrolled or warm-started backward).
        normalize_weights: divide ``[q; r]`` by its geometric mean (the plan does not change).
        dynamics: dynamics passed to the solver with every call; ``None`` uses the solver's
            own (given at its construction).

    Call: ``policy(x0 (B, n), obs=None (B, obs_dim), goal=None (B, goal_dim))``; with
    ``obs=None`` the state ``x0`` is the observation.
    """

    def __init__(
        self,
        solver: nn.Module,
        n_state: int,
        n_ctrl: int,
        horizon: int,
        obs_dim: int | None = None,
        goal_dim: int = 0,
        hidden: Sequence[int] = (64, 64),
        init_q: Sequence[float] | Tensor | None = None,
        init_r: Sequence[float] | Tensor | None = None,
        learn_goal: bool = False,
        default_goal: Sequence[float] | Tensor | None = None,
        warm_start: bool = False,
        normalize_weights: bool = True,
        dynamics: LinearDynamics | nn.Module | None = None,
    ) -> None:
        super().__init__()
        if n_state < 1 or n_ctrl < 1 or horizon < 1:
            raise ValueError(
                f"n_state, n_ctrl and horizon must be >= 1, got {n_state}, {n_ctrl}, {horizon}"
            )
        if goal_dim < 0:
            raise ValueError(f"goal_dim must be >= 0, got {goal_dim}")
        self.solver = solver
        self.n, self.m, self.T = n_state, n_ctrl, horizon
        self.obs_dim, self.goal_dim = obs_dim, goal_dim
        self.learn_goal, self.warm_start = learn_goal, warm_start
        self.normalize_weights = normalize_weights
        self.dynamics = dynamics

        q0 = self._positive_vector("init_q", init_q, n_state)
        r0 = self._positive_vector("init_r", init_r, n_ctrl)
        goal0 = (
            torch.zeros(n_state)
            if default_goal is None
            else torch.as_tensor(default_goal, dtype=torch.get_default_dtype())
        )
        if goal0.shape != (n_state,):
            raise ValueError(f"default_goal must have shape ({n_state},), got {tuple(goal0.shape)}")
        self.register_buffer("default_goal", goal0)

        # Output layout of the head: [log q (n) | log r (m) | goal offset (n)? | u_init (T m)?]
        bias = [q0.log(), r0.log()]
        if learn_goal:
            bias.append(torch.zeros(n_state))
        if warm_start:
            bias.append(torch.zeros(horizon * n_ctrl))
        bias_t = torch.cat(bias)
        if obs_dim is None:
            if goal_dim:
                raise ValueError("goal_dim > 0 needs a network: set obs_dim")
            self.net = None
            self.params = nn.Parameter(bias_t)
        else:
            if obs_dim < 1:
                raise ValueError(f"obs_dim must be >= 1 or None, got {obs_dim}")
            self.net = MLP(obs_dim + goal_dim, bias_t.numel(), hidden, small_last=True)
            with torch.no_grad():
                self.net[-1].bias.copy_(bias_t)
            self.params = None

    @staticmethod
    def _positive_vector(name: str, value, k: int) -> Tensor:
        if value is None:
            return torch.ones(k)
        v = torch.as_tensor(value, dtype=torch.get_default_dtype()).flatten()
        if v.shape != (k,) or not torch.isfinite(v).all() or (v <= 0).any():
            raise ValueError(f"{name} must be {k} positive finite numbers, got {value}")
        return v

    def head(self, x0: Tensor, obs: Tensor | None = None, goal: Tensor | None = None) -> Tensor:
        """Raw head output ``(B, k)`` (log-weights, goal offset, warm start, in that order)."""
        B = x0.shape[0]
        if self.net is None:
            return self.params.to(x0.dtype).expand(B, -1)
        obs = x0 if obs is None else obs
        if obs.dim() != 2 or obs.shape != (B, self.obs_dim):
            raise ValueError(f"obs must have shape (B={B}, {self.obs_dim}), got {tuple(obs.shape)}")
        inp = obs
        if self.goal_dim:
            if goal is None:
                raise ValueError(f"goal of shape (B, {self.goal_dim}) is required (goal_dim > 0)")
            inp = torch.cat([obs, goal], -1)
        net_dtype = self.net[-1].weight.dtype
        return self.net(inp.to(net_dtype)).to(x0.dtype)

    def cost_parameters(
        self, x0: Tensor, obs: Tensor | None = None, goal: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``q (B, n)``, ``r (B, m)``, ``x_goal (B, n)``, ``u_init (B, T, m) | None``."""
        n, m, T = self.n, self.m, self.T
        if x0.dim() != 2 or x0.shape[-1] != n:
            raise ValueError(f"x0 must have shape (B, {n}), got {tuple(x0.shape)}")
        if goal is not None and (goal.dim() != 2 or goal.shape[0] != x0.shape[0]):
            raise ValueError(f"goal must have shape (B={x0.shape[0]}, g), got {tuple(goal.shape)}")
        out = self.head(x0, obs, goal)
        log_w = out[:, : n + m]
        if self.normalize_weights:
            log_w = normalized_log_weights(log_w)
        w = log_w.exp()
        q, r = w[:, :n], w[:, n:]
        if goal is not None and goal.shape[-1] == n:
            x_goal = goal.to(x0.dtype)
        else:
            x_goal = self.default_goal.to(x0.dtype).expand(x0.shape[0], n)
        k = n + m
        if self.learn_goal:
            x_goal = x_goal + out[:, k : k + n]
            k += n
        u_init = out[:, k : k + T * m].reshape(-1, T, m) if self.warm_start else None
        return q, r, x_goal, u_init

    def forward(
        self,
        x0: Tensor,
        obs: Tensor | None = None,
        goal: Tensor | None = None,
        u_init: Tensor | None = None,
    ) -> SolverPolicyOutput:
        """Plan from ``x0 (B, n)``; an explicit ``u_init (B, T, m)`` overrides the network's."""
        q, r, x_goal, u_net = self.cost_parameters(x0, obs, goal)
        # explicit (B, k, k) matrices: a (B, k) batch of diagonals is ambiguous when B == k
        Q, R = torch.diag_embed(q), torch.diag_embed(r)
        cost = QuadraticCost.tracking(Q, R, self.T, x_goal=x_goal)
        u_init = u_net if u_init is None else u_init
        solution = self.solver(x0, cost, self.dynamics, u_init)
        return SolverPolicyOutput(solution.u[:, 0], solution, q, r, x_goal, u_init)
