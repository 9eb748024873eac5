"""A differentiable Panda MPC that drives the flange to a target, on a model linearized per call.

The controller a policy steers on ``diffto/PandaReach-v0`` and ``diffto/PandaObstacleReach-v0``:
the policy chooses *where* the flange should go (a target ``r ∈ R³``), this MPC turns it into
joint torques, and gradients of anything computed from the plan flow back to ``r`` (and to the
initial state) through :class:`diffto.layers.MPC`'s implicit backward. The model is rebuilt at
every call about the current state, so one solve is a box-constrained convex QP (a few batched
LQR sweeps: tens of milliseconds for a batch of 32 over 20 steps here) instead of an MPC over
``MujocoDynamics`` (seconds per batch with finite-difference Jacobians).

Model (state ``x = [q; v] ∈ R¹⁴``, control ``u ∈ [−1, 1]⁷`` = the env's action, torque
``τ = τ_max ⊙ u``)
    The arm's joint-space dynamics with the env's gravity compensation on (gravity cancels) are
    ``M(q) v̇ + b(q, v) + D v = τ`` with ``b`` the Coriolis and centrifugal torques and ``D``
    the joint damping. Frozen at the linearization point ``(q̄, v̄)`` (``M̄ = M(q̄)``,
    ``b̄ = b(q̄, v̄)``) and discretized over one control step ``h`` with the damping implicit
    (as MuJoCo's ``implicitfast`` integrator treats it) and the position by the trapezoidal
    rule (exact under constant acceleration; ``q + h v'`` would overshoot by ``h (v' − v) / 2``,
    about 1 cm of a joint per fast step)::

        v' = (M̄ + h D)⁻¹ (M̄ v + h (τ_max ⊙ u − b̄)),      q' = q + h (v + v') / 2.

    That is a :class:`~diffto.LinearDynamics` ``x' = F [x; u] + f`` with
    ``A_v = (M̄ + hD)⁻¹ M̄``, ``B_v = h (M̄ + hD)⁻¹ diag(τ_max)``, ``f_v = −h (M̄ + hD)⁻¹ b̄``::

        F = [[I, h (I + A_v) / 2, h B_v / 2], [0, A_v, B_v]],        f = [h f_v / 2; f_v].

    ``M̄`` (``mj_fullM``, armature included) and ``b̄`` (``qfrc_bias − qfrc_passive − D v̄``:
    the bias forces less gravity compensation and damping) are MuJoCo's, from the nominal
    model of :func:`~diffto.tasks.panda.load_model`.

Cost
    The flange position is linearized too, ``p(q) ≈ p̄ + J̄ (q − q̄)`` (``p̄``, ``J̄`` from the
    pytorch-kinematics chain :func:`~diffto.tasks.panda.panda_chain`), so the stage cost ::

        ℓ_t = w_p ‖p̄ + J̄ (q_t − q̄) − r‖² + w_v ‖v_t‖² + w_u ‖u_t‖² + w_q ‖q_t − q̄‖²

    (and ``w_f`` times its state part at ``t = T``) is quadratic: with ``e = p̄ − J̄ q̄ − r``,
    ``ℓ_t = qᵀ(w_p J̄ᵀJ̄ + w_q I)q + 2 (w_p J̄ᵀe − w_q q̄)ᵀ q + w_v vᵀv + w_u uᵀu + const``, i.e.
    a :class:`~diffto.QuadraticCost` with ``C_qq = 2 (w_p J̄ᵀJ̄ + w_q I)``, ``C_vv = 2 w_v I``,
    ``C_uu = 2 w_u I`` and ``c_q = 2 (w_p J̄ᵀe − w_q q̄)``. The target enters only ``c_q``,
    linearly. ``w_q`` holds the four joint directions the position leaves free near ``q̄``,
    where the linearization is valid. Gradients reach ``r`` and ``x0``; the linearization
    (``F``, ``f``, ``J̄`` and the combination ``p̄ − J̄ q̄``, whose derivative in ``q̄`` is zero to
    first order) is held fixed.

In receding horizon (:meth:`PandaTargetMPC.act`) the model is rebuilt at each control step from
the measured state, so the linearization error is that of one horizon, not of the whole
motion.
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np
import torch
from torch import Tensor, nn

from diffto.layers.mpc import MPC
from diffto.problem import LinearDynamics, QuadraticCost, Solution
from diffto.tasks.panda._checks import positive
from diffto.tasks.panda.kinematics import panda_chain
from diffto.tasks.panda.model import TIMESTEP, TORQUE_LIMITS, load_model

__all__ = ["PandaTargetMPC", "Linearization"]

N_STATE, N_CTRL = 14, 7


@dataclass
class Linearization:
    """The model of one call, held fixed under differentiation: ``F (B, 14, 21)``,
    ``f (B, 14)``, flange Jacobian ``J (B, 3, 7)`` and ``offset = p̄ − J̄ q̄ (B, 3)``."""

    F: Tensor
    f: Tensor
    J: Tensor
    offset: Tensor


class PandaTargetMPC(nn.Module):
    """Torque MPC of the Panda towards a flange target, linearized about each call's state.

    Args:
        horizon: ``T``, control steps planned.
        control_dt: ``h`` (s), the env's control step (0.02: 10 physics steps of 2 ms).
        position_weight: ``w_p`` (per m²).
        velocity_weight: ``w_v`` (per (rad/s)²).
        control_weight: ``w_u`` (per squared action unit; the action is ``τ / τ_max``).
        posture_weight: ``w_q`` (per rad²), on joint motion away from the linearization point.
        terminal_weight: ``w_f``, factor of the state cost at ``t = T``.
        max_iter: active-set sweeps per solve.
        gravity_compensation: whether the env compensates gravity (the model assumes it does:
            ``False`` is refused, the model has no gravity term).

    ``mpc(x0 (B, 14), target (B, 3))`` returns the :class:`~diffto.Solution` (``x (B, T+1, 14)``,
    ``u (B, T, 7)`` in action units); :meth:`act` is the receding-horizon action.
    """

    def __init__(
        self,
        horizon: int = 20,
        control_dt: float = 0.02,
        position_weight: float = 100.0,
        velocity_weight: float = 1.0,
        control_weight: float = 0.1,
        posture_weight: float = 0.1,
        terminal_weight: float = 5.0,
        max_iter: int = 50,
        gravity_compensation: bool = True,
    ) -> None:
        super().__init__()
        if gravity_compensation is not True:
            raise ValueError("gravity_compensation must be True: the linearized model has no "
                             f"gravity term, got {gravity_compensation!r}")
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
        self.horizon = horizon
        self.control_dt = positive("control_dt", control_dt)
        self.position_weight = positive("position_weight", position_weight)
        self.velocity_weight = positive("velocity_weight", velocity_weight)
        self.control_weight = positive("control_weight", control_weight)
        self.posture_weight = positive("posture_weight", posture_weight)
        self.terminal_weight = positive("terminal_weight", terminal_weight)
        self.model = load_model(TIMESTEP, gravity_compensation=True)
        self._data = mujoco.MjData(self.model)
        self.chain = panda_chain()
        self.layer = MPC(None, horizon, u_lower=-1.0, u_upper=1.0, max_iter=max_iter)

    # ------------------------------------------------------------------ model
    def flange(self, q: Tensor) -> Tensor:
        """Flange positions ``(..., 3)`` of joint angles ``q (..., 7)`` (or states
        ``(..., 14)``), differentiable."""
        lead = q.shape[:-1]
        return self.chain.position(q[..., :7].reshape(-1, 7)).reshape(*lead, 3)

    @torch.no_grad()
    def linearize(self, x: Tensor) -> Linearization:
        """The model about states ``x (B, 14)`` (see the module docstring), on ``x``'s dtype
        and device."""
        _check_state("x", x)
        h = self.control_dt
        xs = x.detach().cpu().double().numpy()
        B = xs.shape[0]
        M, bias = np.empty((B, 7, 7)), np.empty((B, 7))
        damping = self.model.dof_damping
        for i in range(B):
            self._data.qpos[:], self._data.qvel[:] = xs[i, :7], xs[i, 7:]
            mujoco.mj_fwdPosition(self.model, self._data)
            mujoco.mj_fwdVelocity(self.model, self._data)
            mujoco.mj_fullM(self.model, M[i], self._data.qM)
            # qfrc_passive = −D v + gravity compensation; qfrc_bias = Coriolis + gravity.
            bias[i] = self._data.qfrc_bias - self._data.qfrc_passive - damping * xs[i, 7:]
        K = np.linalg.inv(M + h * np.diag(damping))  # (M̄ + hD)⁻¹, (B, 7, 7)
        A_v = K @ M
        B_v = h * K * TORQUE_LIMITS  # K diag(τ_max) h
        f_v = -h * np.einsum("bij,bj->bi", K, bias)
        eye, zero = np.broadcast_to(np.eye(7), (B, 7, 7)), np.zeros((B, 7, 7))
        F = np.concatenate([np.concatenate([eye, 0.5 * h * (eye + A_v), 0.5 * h * B_v], -1),
                            np.concatenate([zero, A_v, B_v], -1)], -2)  # (B, 14, 21)
        f = np.concatenate([0.5 * h * f_v, f_v], -1)  # (B, 14)
        q = x[:, :7].detach().double()
        p, J = self.chain.position_jacobian(q)  # (B, 3), (B, 3, 7)
        offset = p - (J @ q.unsqueeze(-1)).squeeze(-1)
        like = dict(dtype=x.dtype, device=x.device)
        return Linearization(torch.as_tensor(F, **like), torch.as_tensor(f, **like),
                             J.to(**like), offset.to(**like))

    def cost(self, x0: Tensor, target: Tensor, lin: Linearization) -> QuadraticCost:
        """The quadratic cost of the module docstring for targets ``target (B, 3)``."""
        B, T = x0.shape[0], self.horizon
        wp, wq = self.position_weight, self.posture_weight
        eye = torch.eye(7, dtype=x0.dtype, device=x0.device)
        Jt = lin.J.transpose(-1, -2)  # (B, 7, 3)
        C = x0.new_zeros(B, N_STATE + N_CTRL, N_STATE + N_CTRL)
        C[:, :7, :7] = 2 * (wp * Jt @ lin.J + wq * eye)
        C[:, 7:14, 7:14] = 2 * self.velocity_weight * eye
        C[:, 14:, 14:] = 2 * self.control_weight * eye
        e = lin.offset - target  # (B, 3)
        q_bar = x0[:, :7].detach()
        c_q = 2 * (wp * (Jt @ e.unsqueeze(-1)).squeeze(-1) - wq * q_bar)  # (B, 7)
        c = torch.cat([c_q, x0.new_zeros(B, N_STATE + N_CTRL - 7)], -1)  # (B, 21)
        w_f = self.terminal_weight
        return QuadraticCost(C.unsqueeze(1).expand(B, T, -1, -1), c.unsqueeze(1).expand(B, T, -1),
                             w_f * C[:, :N_STATE, :N_STATE], w_f * c[:, :N_STATE])

    # ------------------------------------------------------------------ solve
    def forward(self, x0: Tensor, target: Tensor, lin: Linearization | None = None,
                u_init: Tensor | None = None) -> Solution:
        """Plan from ``x0 (B, 14)`` towards ``target (B, 3)``; ``lin`` defaults to the model
        about ``x0``. Differentiable in ``x0`` and ``target``."""
        _check_state("x0", x0)
        if not isinstance(target, Tensor) or target.shape != (x0.shape[0], 3):
            got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(f"target must be a tensor of shape (B, 3) = ({x0.shape[0]}, 3), "
                             f"got {got}")
        if target.dtype != x0.dtype:
            raise ValueError(f"target must have x0's dtype {x0.dtype}, got {target.dtype}")
        lin = self.linearize(x0) if lin is None else lin
        T = self.horizon
        dyn = LinearDynamics(lin.F.unsqueeze(1).expand(-1, T, -1, -1),
                             lin.f.unsqueeze(1).expand(-1, T, -1))
        return self.layer(x0, self.cost(x0, target, lin), dyn, u_init)

    @torch.no_grad()
    def act(self, state: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Receding horizon: the first planned action ``(B, 7)`` in ``[−1, 1]`` from measured
        states ``state (B, 14)`` towards ``target (B, 3)`` (NumPy, float64)."""
        x0 = torch.as_tensor(np.asarray(state, np.float64))
        r = torch.as_tensor(np.asarray(target, np.float64))
        return self(x0, r).u[:, 0].numpy()


def _check_state(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != N_STATE:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (B, 14) = [qpos; qvel], got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
