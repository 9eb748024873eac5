"""The MPC expert of Panda reaching: box-DDP over the MuJoCo model, an end-effector cost.

Planning model
    The env's nominal model (:func:`diffto.tasks.panda.load_model`, with gravity compensation as
    the env has it by default) with its timestep set to ``control_dt / plan_substeps`` and
    ``MujocoDynamics(model, substeps=plan_substeps)``, so one planning step spans one 20 ms
    control step. ``plan_substeps=10`` is the env's own 2 ms physics (an exact model when no
    mismatch option is on). The default, 2 steps of 10 ms, is an integration mismatch that
    showed no cost in closed loop (20 of 20 held-out goals held at the end of 50-step
    episodes, as the benchmark found with 10) and needs a fifth of the finite-difference
    Jacobians, which dominate batched solves: one ``mjd_transitionFD`` per row, stage,
    substep and linearization. State ``x = [qpos; qvel] (14,)``,
    control the torque command ``u (7,)`` in Nm within ``±τ_max``, on top of the physics'
    gravity compensation (what the env's action scales: ``action = u / τ_max``); a zero
    control holds the arm, so the cold start is zeros.

Cost (``hessian="gauss_newton"`` in the solver)
    ``Σ_t ½‖w_p (p(q_t) − g)‖² + ½‖w_v q̇_t‖² + ½‖w_u u_t / τ_max‖²`` plus the terminal
    ``½ (w_f / w_p)² (‖w_p (p(q_T) − g)‖² + ‖w_v q̇_T‖²)`` [``+ V(x_T)``], with ``p`` the flange
    position by the pytorch-kinematics chain (:func:`diffto.tasks.panda.panda_chain`) and
    ``g`` the goal ``(B, 3)``: :func:`diffto.layers.ee_pose_cost` for the position and
    velocity residuals, and a :class:`~diffto.QuadraticCost` for the torques. The weights are
    those of ``benchmarks/bench_panda_mpc.py``, which measured them (T = 15, 3 iterations per
    control step, shifted warm start): all of 20 goals reached and held.

Measured with the defaults (2 shared cores, load average 5-7; CPU time per control step), in
closed loop over 50-step episodes on the held-out seeds ``1_000_000 + j`` with the shifted
warm start: 20 of 20 goals held at the last step (B = 20; and 32 of 32 with B = 32), first
reached after 9.3 steps on average, 1.4 iterations per step. One control step costs 96 ms for
B = 1, 286 ms for B = 8 (36 ms per row), 515 ms for B = 20 and 792 ms for B = 32 (25 ms per
row): batching amortizes the Python of the sweeps and the FK cost derivatives, and what
remains per row is mostly ``mjd_transitionFD``. So 200 episodes of 50 steps take about
200 · 50 · 25 ms ≈ 4 min of one core in batches of 32 (16 min one episode at a time).
``nthread=2`` showed no clear gain on the shared cores.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from diffto.layers.mpc import HessianMode
from diffto.layers.mujoco_dynamics import MujocoDynamics
from diffto.layers.robot_costs import ee_pose_cost
from diffto.problem import QuadraticCost
from diffto.tasks.mpc_expert import MPCExpert, TerminalValue, terminal_value_cost
from diffto.tasks.panda._checks import nonneg, positive
from diffto.tasks.panda.kinematics import flange_position, panda_chain
from diffto.tasks.panda.model import TIMESTEP, TORQUE_LIMITS, load_model

__all__ = ["PandaReachExpert"]


class PandaReachExpert(MPCExpert):
    """MPC for ``diffto/PandaReach-v0``: flange goals ``(B, 3)``, joint torques ``(B, 7)``.

    Args:
        horizon: ``T`` planning steps of ``control_dt``.
        max_iter: box-DDP iterations per solve (per control step in receding horizon).
        tol: convergence tolerance (relative Newton step on the torques).
        plan_substeps: MuJoCo steps per planning step (10: the env's 2 ms physics; 2: 10 ms
            steps, five times fewer Jacobians).
        control_dt: seconds per planning step; the env's control step (10 × 2 ms).
        gravity_compensation: plan on the model with MuJoCo's gravity compensation, as the
            env (``True``, its default); must match the env's setting.
        position_weight, final_weight, velocity_weight, control_weight: ``w_p``, ``w_f``,
            ``w_v``, ``w_u`` of the module docstring.
        nthread: threads of ``MujocoDynamics`` for rollouts and Jacobians (0: the caller's).
        hessian: dynamics curvature in the forward solve; MuJoCo gives none, so
            ``"gauss_newton"``.

    Controls are torque commands in Nm; actions are ``τ / τ_max``.
    """

    n_state = 14
    n_ctrl = 7
    goal_dim = 3
    action_dim = 7

    def __init__(
        self,
        horizon: int = 15,
        max_iter: int = 3,
        tol: float = 1e-4,
        plan_substeps: int = 2,
        control_dt: float = 0.02,
        gravity_compensation: bool = True,
        position_weight: float = 10.0,
        final_weight: float = 30.0,
        velocity_weight: float = 0.3,
        control_weight: float = 0.05,
        nthread: int = 0,
        hessian: HessianMode = "gauss_newton",
    ) -> None:
        if isinstance(plan_substeps, bool) or not isinstance(plan_substeps, int) or (
            plan_substeps < 1
        ):
            raise ValueError(f"plan_substeps must be an int >= 1, got {plan_substeps!r}")
        if not isinstance(gravity_compensation, bool):
            raise ValueError(f"gravity_compensation must be a bool, got {gravity_compensation!r}")
        control_dt = positive("control_dt", control_dt)
        model = load_model(TIMESTEP, gravity_compensation=gravity_compensation)
        model.opt.timestep = control_dt / plan_substeps
        dynamics = MujocoDynamics(model, substeps=plan_substeps, nthread=nthread)
        limits = torch.tensor(np.array(TORQUE_LIMITS, dtype=np.float64))
        super().__init__(dynamics, horizon, -limits, limits, max_iter, tol, hessian)
        self.dt = control_dt
        self.plan_substeps = plan_substeps
        self.gravity_compensation = gravity_compensation
        self.weights = {
            "position_weight": positive("position_weight", position_weight),
            "final_weight": nonneg("final_weight", final_weight),
            "velocity_weight": nonneg("velocity_weight", velocity_weight),
            "control_weight": nonneg("control_weight", control_weight),
        }
        self.chain = panda_chain(model)
        self.register_buffer("torque_limits", limits.clone())

    def cost(self, goal: Tensor, horizon: int, terminal_value: TerminalValue | None = None):
        """The end-effector cost of the module docstring for flange goals ``(B, 3)`` (m)."""
        w = self.weights
        w_p, w_v = w["position_weight"], w["velocity_weight"]
        position = ee_pose_cost(
            self.chain,
            goal,
            position_weight=w_p**2,
            velocity_weight=w_v**2,
            control_weight=0.0,
            terminal_weight=(w["final_weight"] / w_p) ** 2,
        )
        # ½‖w_u u / τ_max‖² per stage: a constant diagonal C on the control block of [x; u].
        limits = self.torque_limits.to(goal.dtype)
        diag = torch.cat([limits.new_zeros(self.n_state), (w["control_weight"] / limits) ** 2])
        k = self.n_state + self.n_ctrl
        cost = position + QuadraticCost(torch.diag(diag).expand(horizon, k, k))
        if terminal_value is not None:
            cost = cost + terminal_value_cost(terminal_value)
        return cost

    def state_of(self, env) -> np.ndarray:
        """``[qpos; qvel] (14,)`` of a :class:`PandaReachEnv` (or a wrapper of one)."""
        return np.asarray(env.unwrapped.state, dtype=np.float64)

    def achieved_goal_of(self, x: Tensor) -> Tensor:
        """Flange positions ``(..., 3)`` (m, world frame) of states ``x (..., 14)``, by FK."""
        q = x[..., :7]
        return flange_position(self.chain, q.reshape(-1, 7)).reshape(*q.shape[:-1], 3)

    def to_action(self, u: Tensor) -> np.ndarray:
        """``τ / τ_max`` as ``(B, 7)`` float64 actions."""
        u = u.detach().to(torch.float64).reshape(-1, self.n_ctrl).cpu()
        return (u / self.torque_limits.cpu()).numpy()

    def to_control(self, action) -> Tensor:
        """Torques ``(B, 7)`` of actions ``(B, 7)``, clipped to ``[−1, 1]`` as the env does."""
        a = torch.as_tensor(np.asarray(action), dtype=torch.float64).reshape(-1, self.n_ctrl)
        return a.clamp(-1.0, 1.0) * self.torque_limits.cpu()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, plan_substeps={self.plan_substeps}"
