"""The MPC expert of the pendulum swing-up: box-DDP over the analytic pendulum, wrapped-angle cost.

Problem (per row, goal angle ``g``, planning model :class:`~diffto.tasks.classic.Pendulum`
with the env's parameters, ``|u| <= τ_max``)

.. math::

    \\sum_{t<T} w_θ (1 - \\cos(θ_t - g)) + ½ w_ω ω_t^2 + ½ w_u (u_t / τ_{max})^2
    \\;+\\; w_f (1 - \\cos(θ_T - g)) + ½ w_{fω} ω_T^2 \\;[+ V(x_T)].

``1 − cos(θ − g)`` is the angle error that does not see the wrap: ``≈ ½(θ − g)²`` near the goal,
periodic, largest (2) at the opposite angle. Its curvature is negative beyond ``±π/2`` from
the goal, where the pendulum starts: the MPC projects indefinite stage Hessians onto the PSD
cone (box-DDP's ``"convex"`` quadratization), so steps stay descent directions.

Horizon and the stall at the bottom. Hanging at rest is a stationary point of this cost for the
zero control sequence (by symmetry the gradient in ``u`` vanishes there), so iLQR from a zero
cold start at exactly ``θ = π, ω = 0`` does not move. The environment's initial noise breaks
the symmetry; for exactly hanging states the cold start here is not zero but a constant torque
of ``cold_start`` · ``τ_max`` (default 0.1) in the direction that moves the pendulum toward
the goal's side, ``sign(wrap(g − θ))`` (positive when that is 0). The horizon (60 steps, 3 s)
covers a whole swing-up with pumping, so the plan reaches the goal inside the horizon from the
first control step; with the shifted warm start 3 iterations per control step suffice.

Measured with the defaults (2 shared cores, load average about 6; CPU time), in closed loop
on the held-out episodes ``1_000_000 + j``, j < 50, with the shifted warm start: 50 of 50
succeed (within 0.1 rad at the last step), the goal is first reached after 51.9 steps on
average (2.6 s, at most 54), 1.8 iterations per control step. A control step costs 0.21 s for
one row and 0.30 s for the 50 rows in one batch (6 ms per row): the work is the Python of the
60-stage sweeps, nearly independent of ``B``, so batch the episodes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from diffto.costs import NonlinearCost
from diffto.layers.mpc import HessianMode
from diffto.tasks.classic.pendulum import Integrator, Pendulum
from diffto.tasks.mpc_expert import MPCExpert, TerminalValue, terminal_value_cost

__all__ = ["SwingUpExpert"]


def _weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        math.isfinite(value) and value >= 0
    ):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


class SwingUpExpert(MPCExpert):
    """MPC swing-up of ``diffto/PendulumSwingUp-v0`` to goal angles ``(B, 1)``.

    Args:
        horizon: ``T`` planning steps of ``dt`` (60: 3 s).
        max_iter: box-DDP iterations per solve (per control step in receding horizon).
        tol: convergence tolerance (relative Newton step on the torques).
        hessian: dynamics curvature in the forward solve: ``"gauss_newton"`` (default) drops
            it. Measured from near the goal, exact Newton steps (the costates times the
            pendulum's curvature ``g sin θ / l``) led some rows into a full extra revolution
            (a worse local optimum), which Gauss-Newton steps did not; in closed loop both
            swung up 50 of 50 held-out episodes, Gauss-Newton with cheaper iterations.
        angle_weight, rate_weight, control_weight: ``w_θ``, ``w_ω``, ``w_u`` of the stage.
        final_angle_weight, final_rate_weight: ``w_f``, ``w_fω`` of the terminal cost.
        cold_start: the cold start's constant torque as a fraction of ``τ_max`` (see the module
            docstring); 0 gives zeros.
        dt, mass, length, gravity, damping, integrator: the planning model; by default the
            environment's (so the model is exact).
        torque_limit: ``τ_max`` (Nm); ``None``: ``m g l / 2`` as the environment.

    Controls are torques in Nm; actions are ``τ / τ_max`` (the env's action).
    """

    n_state = 2
    n_ctrl = 1
    goal_dim = 1
    action_dim = 1

    def __init__(
        self,
        horizon: int = 60,
        max_iter: int = 3,
        tol: float = 1e-6,
        hessian: HessianMode = "gauss_newton",
        angle_weight: float = 1.0,
        rate_weight: float = 0.01,
        control_weight: float = 0.01,
        final_angle_weight: float = 10.0,
        final_rate_weight: float = 1.0,
        cold_start: float = 0.1,
        dt: float = 0.05,
        mass: float = 1.0,
        length: float = 1.0,
        gravity: float = 9.81,
        damping: float = 0.0,
        integrator: Integrator = "rk4",
        torque_limit: float | None = None,
    ) -> None:
        pendulum = Pendulum(dt=dt, mass=mass, length=length, gravity=gravity, damping=damping,
                            integrator=integrator).double()
        limit = 0.5 * mass * gravity * length if torque_limit is None else torque_limit
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not limit > 0:
            raise ValueError(f"torque_limit must be a float > 0 or None, got {torque_limit!r}")
        self.torque_limit = float(limit)
        bound = torch.tensor([float(limit)], dtype=torch.float64)
        super().__init__(pendulum, horizon, -bound, bound,
                         max_iter, tol, hessian)
        self.dt = pendulum.dt
        self.weights = {
            "angle_weight": _weight("angle_weight", angle_weight),
            "rate_weight": _weight("rate_weight", rate_weight),
            "control_weight": _weight("control_weight", control_weight),
            "final_angle_weight": _weight("final_angle_weight", final_angle_weight),
            "final_rate_weight": _weight("final_rate_weight", final_rate_weight),
        }
        self.cold_start = _weight("cold_start", cold_start)
        if self.cold_start > 1:
            raise ValueError(f"cold_start must be in [0, 1], got {cold_start!r}")

    def cost(self, goal: Tensor, horizon: int, terminal_value: TerminalValue | None = None):
        """The wrapped-angle cost of the module docstring for goals ``(B, 1)``."""
        w = self.weights
        g = goal.reshape(-1, 1)  # (B, 1): broadcasts over the T stages
        scale = 1.0 / self.torque_limit

        def stage(x: Tensor, u: Tensor) -> Tensor:  # (B, T, 2), (B, T, 1) -> (B, T)
            angle = 1.0 - torch.cos(x[..., 0] - g.to(x))
            return (w["angle_weight"] * angle + 0.5 * w["rate_weight"] * x[..., 1] ** 2
                    + 0.5 * w["control_weight"] * (scale * u[..., 0]) ** 2)

        def terminal(xT: Tensor) -> Tensor:  # (B, 2) -> (B,)
            angle = 1.0 - torch.cos(xT[:, 0] - g[:, 0].to(xT))
            return w["final_angle_weight"] * angle + 0.5 * w["final_rate_weight"] * xT[:, 1] ** 2

        cost = NonlinearCost(stage, terminal)
        if terminal_value is not None:
            cost = cost + terminal_value_cost(terminal_value)
        return cost

    def initial_controls(self, state: Tensor, goal: Tensor, horizon: int) -> Tensor:
        """Constant ``cold_start · τ_max`` toward the goal's side, ``(B, T, 1)``."""
        error = torch.remainder(goal[:, 0] - state[:, 0] + math.pi, 2 * math.pi) - math.pi
        direction = torch.where(error < 0, -1.0, 1.0).to(state)
        u = direction * (self.cold_start * self.torque_limit)
        return u.view(-1, 1, 1).expand(-1, horizon, 1).clone()

    def state_of(self, env) -> np.ndarray:
        """``[θ, θ̇] (2,)`` of a :class:`PendulumSwingUpEnv` (or a wrapper of one)."""
        return np.asarray(env.unwrapped.state, dtype=np.float64)

    def observation_of(self, x: Tensor) -> Tensor:
        """``[cos θ, sin θ, θ̇] (..., 3)`` of states ``x (..., 2)``, as the env observes."""
        return torch.stack([torch.cos(x[..., 0]), torch.sin(x[..., 0]), x[..., 1]], -1)

    def achieved_goal_of(self, x: Tensor) -> Tensor:
        """``θ`` wrapped onto ``[−π, π)``, ``(..., 1)``."""
        return torch.remainder(x[..., :1] + math.pi, 2 * math.pi) - math.pi

    def to_action(self, u: Tensor) -> np.ndarray:
        """``τ / τ_max`` as ``(B, 1)`` float64 actions."""
        return (u.detach().double().reshape(-1, 1) / self.torque_limit).cpu().numpy()

    def to_control(self, action) -> Tensor:
        """Torques ``(B, 1)`` of actions ``(B, 1)``, clipped to ``[−1, 1]`` as the env does."""
        a = torch.as_tensor(np.asarray(action), dtype=torch.float64).reshape(-1, 1)
        return a.clamp(-1.0, 1.0) * self.torque_limit
