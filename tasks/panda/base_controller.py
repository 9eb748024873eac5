"""A cheap model-based Panda reaching controller: operational-space control on the nominal model.

The base of residual learning on ``diffto/PandaReach-v0`` (see
:mod:`diffto.tasks.panda.residual_env`): fast enough to run at every environment step of RL
(a fraction of a millisecond), exact on the nominal model, and blind to the env's mismatch
(payload, friction, actuator gain), which the residual is left to learn.

Control law
    Rigid-body dynamics of the arm in joint space, as the env's physics has them with its
    gravity compensation on (the gravity torques ``g(q)`` are added by the physics, so they
    cancel)::

        M(q) q̈ + c(q, q̇) = τ,        c = C(q, q̇) q̇ + D q̇  (Coriolis/centrifugal, joint damping)

    with ``M`` including the rotor armature. The task is the flange position ``p(q) ∈ R³``,
    ``ṗ = J q̇`` and ``p̈ = J q̈ + J̇ q̇`` (``J``: the 3 × 7 translational Jacobian of the site
    ``attachment_site``). Wanted: the error ``e = g − p`` to obey the critically damped
    (``ζ = 1`` by default) second-order law ``ë + 2ζω ė + ω² e = 0`` towards a fixed goal
    ``g``, i.e. the flange acceleration ::

        a_x = k_p (g − p) − k_d ṗ,        k_p = ω²,  k_d = 2ζω,

    and, in the 4-dimensional null space of ``J`` that the position task leaves free, the
    joints to be drawn to a posture ``q₀`` (``home``) with ``a₀ = k_n (q₀ − q) − 2ζ√k_n q̇``.
    The joint acceleration is the one closest to ``a₀`` in the metric of the mass matrix
    that achieves ``a_x`` exactly (Gauss's principle of least constraint)::

        q̈* = argmin_q̈ ½ (q̈ − a₀)ᵀ M (q̈ − a₀)   s.t.   J q̈ + J̇ q̇ = a_x.

    Stationarity of the Lagrangian gives ``M (q̈ − a₀) = Jᵀ μ``, so ``q̈ = a₀ + M⁻¹ Jᵀ μ``;
    the constraint then gives ``J M⁻¹ Jᵀ μ = a_x − J̇ q̇ − J a₀``, and with the task-space
    inertia ``Λ = (J M⁻¹ Jᵀ)⁻¹`` the torque ``τ = M q̈* + c`` is ::

        τ = Jᵀ Λ (a_x − J̇ q̇ − J a₀) + M a₀ + c.

    This is Khatib's operational-space control with the dynamically consistent null-space
    projection: the task force is ``Jᵀ Λ (a_x − J̇ q̇)`` and the posture torque ``M a₀`` enters
    through ``Nᵀ = I − Jᵀ Λ J M⁻¹`` (``Nᵀ M a₀ = M a₀ − Jᵀ Λ J a₀``), so it cannot disturb the
    flange. Near a singularity ``Λ`` is regularized, ``Λ = (J M⁻¹ Jᵀ + λ I)⁻¹``. The torque
    is clipped to ``±τ_max`` and returned as the env's action ``τ / τ_max ∈ [−1, 1]⁷``.

    ``M`` (``mj_fullM``), ``c`` (``qfrc_bias − qfrc_passive``: MuJoCo's bias forces less the
    passive ones, where the gravity compensation and the gravity cancel and the joint damping
    remains), ``J`` (``mj_jacSite``) and ``J̇ q̇`` (``mj_jacDot``) are MuJoCo's, evaluated on a
    private ``MjData`` of the nominal model (:func:`diffto.tasks.panda.load_model`, no
    payload, no friction, unit gains) at the observed ``[q; q̇]``: one ``mj_fwdPosition`` and
    one ``mj_fwdVelocity`` per row, no acceleration or integration. On the nominal model the
    only departure from the law is the zero-order hold: the torque is computed at the start of
    each 20 ms control step and held; with ``ω = 15 rad/s`` (``ω Δt = 0.3``) the nominal goals
    are still reached and held to 0.1 mm (below).

What it does not know
    An unmodelled payload of mass ``m_L`` at the flange pulls with ``Jᵀ m_L g`` that nothing
    cancels; at rest the task law balances it with ``Λ k_p e = m_L g`` (projected), so the
    flange sags by about ``‖Λ⁻¹ m_L g‖ / k_p``: a few centimetres for 1–3 kg at the default
    gains. Joint friction leaves a dead band, and actuator gains below 1 scale every torque,
    softening both loops. The residual policy is there to learn these corrections.

Alternatives measured and not taken
    LQR about the current state from ``MujocoDynamics``' Jacobians needs, per step, a
    finite-difference linearization over the 10 substeps of a control step (1.6 ms CPU) and a
    14-state discrete Riccati solve (1.5 ms), about 30 times the law above, and a goal
    configuration (inverse kinematics) to regulate to; the law above needs neither.

Measured (``OMP_NUM_THREADS=1 python benchmarks/bench_panda_base.py``, about a minute; 2 shared
cores, load average 6; 50 held-out goals, seeds ``1_000_000 + j``, 50-step episodes; all
figures in ``benchmarks/results/panda_base.md``), default gains:

    ==============================  ==========  ==========  ================  ===============
    env                             success     success     final distance    steps to first
                                    (last step) (any step)  mean (max), mm    success
    ==============================  ==========  ==========  ================  ===============
    nominal                         1.00        1.00        0.02 (0.1)        14.9
    payload_mass=(1, 3)             0.46        0.70        21.3 (34.8)       15.0
    frictionloss=(0.5, 2)           1.00        1.00        5.3 (11.4)        16.5
    actuator_gain=(0.7, 1)          1.00        1.00        0.09 (0.3)        14.7
    the three together              0.24        0.34        28.0 (49.2)       16.7
    ==============================  ==========  ==========  ================  ===============

    The payload dominates (about 12 mm of sag per kg at ``ω = 15 rad/s``); stiffer gains
    shrink it as ``1/k_p`` (the three together: 0.78 at ``k_p = 400``, 1.00 with 9.5 mm left at
    ``k_p = 625``; 0.00 at ``k_p = 100``). Cost per call on one row: 0.11 ms CPU (0.06 ms per
    row of a batch of 50), against 0.21 ms for ``PandaReachEnv.step`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import mujoco
import numpy as np

from diffto.tasks.panda._checks import nonneg, positive
from diffto.tasks.panda.model import (
    FLANGE_SITE,
    HOME,
    JOINT_LOWER,
    JOINT_UPPER,
    TIMESTEP,
    TORQUE_LIMITS,
    load_model,
)

__all__ = ["PandaBaseController"]


class PandaBaseController:
    """Operational-space control of the flange position on the nominal Panda model.

    Args:
        position_gain: ``k_p = ω²`` of the flange error law (1/s²); 225 is ``ω = 15 rad/s``.
        damping_ratio: ``ζ`` of both the flange and the posture law (1: critically damped).
        posture_gain: ``k_n`` of the null-space posture law (1/s²), ``>= 0`` (0: damping only).
        posture: the joint configuration ``q₀ (7,)`` the null space is drawn to (rad), inside
            the joint limits; default the ``home`` keyframe.
        regularization: ``λ`` added to ``J M⁻¹ Jᵀ`` (1/kg) before inverting it, ``>= 0``.
        gravity_compensation: whether the physics compensates the arm's gravity, as the env's
            argument of that name (default ``True``, the env's default). With ``False`` the
            controller adds ``g(q)`` of the nominal model to its torque itself.

    Call with ``observation`` ``(B, 14)`` or ``(14,)`` (the env's ``[qpos; qvel]``) and
    ``desired_goal`` ``(B, 3)`` or ``(3,)`` (m): returns actions ``(B, 7)`` or ``(7,)`` in
    ``[−1, 1]`` (float64), the env's units (``τ / τ_max``). The object holds one private
    ``MjData`` (not thread-safe: one controller per thread or process) and pickles as its
    constructor arguments, so a vector-env worker rebuilds it in a millisecond.
    """

    def __init__(
        self,
        position_gain: float = 225.0,
        damping_ratio: float = 1.0,
        posture_gain: float = 25.0,
        posture: Sequence[float] | np.ndarray | None = None,
        regularization: float = 1e-4,
        gravity_compensation: bool = True,
    ) -> None:
        self.position_gain = positive("position_gain", position_gain)
        self.damping_ratio = positive("damping_ratio", damping_ratio)
        self.posture_gain = nonneg("posture_gain", posture_gain)
        self.regularization = nonneg("regularization", regularization)
        if not isinstance(gravity_compensation, bool):
            raise ValueError(f"gravity_compensation must be a bool, got {gravity_compensation!r}")
        self.gravity_compensation = gravity_compensation
        if posture is None:
            q0 = np.array(HOME)
        else:
            try:
                q0 = np.array(posture, dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"posture must be 7 joint angles (rad), got {posture!r}") from err
        if q0.shape != (7,) or not np.isfinite(q0).all():
            raise ValueError(f"posture must be 7 finite joint angles (rad), got {posture!r}")
        if (q0 < JOINT_LOWER).any() or (q0 > JOINT_UPPER).any():
            raise ValueError(f"posture must lie inside the joint limits [{JOINT_LOWER.tolist()}, "
                             f"{JOINT_UPPER.tolist()}], got {q0.tolist()}")
        self.posture = q0
        self.kd = 2.0 * self.damping_ratio * math.sqrt(self.position_gain)
        self.kd_posture = 2.0 * self.damping_ratio * math.sqrt(self.posture_gain)

        self.model = load_model(TIMESTEP, gravity_compensation=gravity_compensation, scene=False)
        self.data = mujoco.MjData(self.model)
        self._site = self.model.site(FLANGE_SITE).id
        self._body = int(self.model.site_bodyid[self._site])
        self._M = np.zeros((7, 7))
        self._J = np.zeros((3, 7))
        self._Jdot = np.zeros((3, 7))
        self._JMinv = np.zeros((3, 7))
        self._reg = self.regularization * np.eye(3)

    # Pickled as the constructor's arguments: MjModel/MjData are rebuilt, not copied.
    def _kwargs(self) -> dict[str, Any]:
        return {
            "position_gain": self.position_gain,
            "damping_ratio": self.damping_ratio,
            "posture_gain": self.posture_gain,
            "posture": self.posture.tolist(),
            "regularization": self.regularization,
            "gravity_compensation": self.gravity_compensation,
        }

    def __getstate__(self) -> dict[str, Any]:
        return self._kwargs()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._kwargs().items() if k != "posture")
        return f"PandaBaseController({args})"

    # ------------------------------------------------------------------ control
    def __call__(self, observation: np.ndarray, desired_goal: np.ndarray) -> np.ndarray:
        obs = np.asarray(observation, dtype=np.float64)
        goal = np.asarray(desired_goal, dtype=np.float64)
        if obs.ndim not in (1, 2) or obs.shape[-1] != 14:
            raise ValueError(f"observation must have shape (B, 14) or (14,) ([qpos; qvel]), got "
                             f"{obs.shape}")
        if goal.ndim != obs.ndim or goal.shape[-1] != 3 or goal.shape[:-1] != obs.shape[:-1]:
            raise ValueError(f"desired_goal must have shape {(*obs.shape[:-1], 3)} to match "
                             f"observation {obs.shape}, got {goal.shape}")
        if not (np.isfinite(obs).all() and np.isfinite(goal).all()):
            raise ValueError("observation and desired_goal must be finite")
        if obs.ndim == 1:
            return self.torque(obs, goal) / TORQUE_LIMITS
        out = np.empty((obs.shape[0], 7))
        for i in range(obs.shape[0]):
            out[i] = self.torque(obs[i], goal[i])
        return out / TORQUE_LIMITS

    def torque(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """The clipped torque command ``τ (7,)`` (Nm) for one state ``[q; q̇] (14,)`` and goal
        ``(3,)``; the law of the module docstring, without checks (``__call__`` checks)."""
        m, d = self.model, self.data
        q, qd = state[:7], state[7:]
        d.qpos[:] = q
        d.qvel[:] = qd
        mujoco.mj_fwdPosition(m, d)  # kinematics, M and its factorization, passive forces...
        mujoco.mj_fwdVelocity(m, d)  # ... bias forces c(q, q̇) + g(q), velocity-dependent passive
        J, Jdot = self._J, self._Jdot
        mujoco.mj_jacSite(m, d, J, None, self._site)
        mujoco.mj_jacDot(m, d, Jdot, None, d.site_xpos[self._site], self._body)
        mujoco.mj_fullM(m, self._M, d.qM)
        mujoco.mj_solveM(m, d, self._JMinv, J)  # rows of J M⁻¹ (M is symmetric)

        a_x = self.position_gain * (goal - d.site_xpos[self._site]) - self.kd * (J @ qd)
        a_0 = self.posture_gain * (self.posture - q) - self.kd_posture * qd
        lam = np.linalg.inv(self._JMinv @ J.T + self._reg)
        tau = J.T @ (lam @ (a_x - Jdot @ qd - J @ a_0)) + self._M @ a_0
        tau += d.qfrc_bias - d.qfrc_passive  # c(q, q̇); with gravcomp on, g cancels inside
        return np.clip(tau, -TORQUE_LIMITS, TORQUE_LIMITS)
