"""A safety filter for the torque-controlled Panda: joint, velocity and workspace limits.

The constraint set
    :class:`PandaConstraintSet` says which states are safe. With ``q`` the joint angles,
    ``q̇`` the joint velocities and ``p`` the flange position (world frame):

    * joint positions ``L ≤ q ≤ U`` with ``L = lower + joint_margin``, ``U = upper − joint_margin``
      (the model's joint ranges, a margin of 0.05 rad by default);
    * joint velocities ``|q̇| ≤ v̄``, Franka's published limits (2.175 rad/s on joints 1–4,
      2.61 rad/s on 5–7) by default;
    * a workspace box ``lo ≤ p ≤ hi`` for the flange, by default
      ``(0, −0.6, 0.05) ≤ p ≤ (0.85, 0.6, 1.15)`` m: every goal of ``PandaReachEnv``'s default
      sampling (flange positions of configurations within 0.5 rad of ``home``: x from 0.09 to
      0.72 m, |y| up to 0.51 m, z from 0.17 to 1.08 m over 3,000 draws) with about 0.08 m to
      spare, and above the floor.

    :meth:`PandaConstraintSet.violations` counts how many of these three classes a state
    violates; the environment reports it at every step whether or not it filters actions.

The filter
    :class:`PandaSafetyFilter` replaces a proposed action ``a ∈ [−1, 1]⁷`` by the closest action
    (Euclidean) that keeps discrete-time control-barrier-function (CBF) conditions over the
    next control step, computed with the *nominal* model (the filter does not know an
    episode's payload, friction or gain mismatch).

Prediction: the nominal control step, linearized in the action
    The outputs ``y = (q, q̇, p, v) ∈ ℝ²⁰`` (``v = J_p(q) q̇``, the flange velocity) after one
    control step are ``y⁺ = Φ(x, a)``: ``substeps`` implicit-fast MuJoCo steps of 2 ms with the
    torque ``τ_max ⊙ a`` held. Within one step ``M(q) q̈ = τ_max ⊙ a + τ₀(q, q̇)`` is affine in
    ``a``, but over 20 ms ``M(q)``, the bias forces, the joint damping and ``J_p`` change with the
    state the action produces, and a single Euler step of the zero-action acceleration
    (``q̇⁺ = q̇ + Δt M⁻¹(τ_max ⊙ a + τ₀)``) mispredicts ``q̇⁺`` by 0.45 rad/s (median over random
    actions; up to 1.6 rad/s, measured here), a fifth of a velocity limit.
    The filter instead linearizes the nominal step itself around an action ``ā``:

    .. math:: y^+ \\approx \\Phi(x, \\bar a) + B\\,(a - \\bar a), \\qquad
              B_{:,i} = (\\Phi(x, \\bar a + \\epsilon_i e_i) - \\Phi(x, \\bar a)) / \\epsilon_i,

    one-sided differences directed into the action box (``ε_i = −ε`` where ``ā_i > 0``: MuJoCo
    clamps a torque beyond its limit, which would zero the difference): seven nominal steps
    beside the one at ``ā``. The filter's copy of the model has its joint stops disabled
    (``mjDSBL_LIMIT``): inside the constraint set they never act, and without them ``Φ`` is
    smooth in ``a`` even at a proposal that would drive a joint into its stop, where a slope
    taken with the stop would describe the stop and not the arm. Without mismatch, and inside
    the set, the nominal step is the environment's step, so what the filter checks is what
    happens.

Iteration
    The slope ``B`` is taken at the proposal; the offset ``Φ(x, ā)`` is renewed at every
    iterate (a chord method on the exact nominal step): project the proposal onto the
    conditions linearized at ``ā``, simulate the nominal step at the result, make it the new
    ``ā`` and project the *proposal* again, until the conditions hold on the simulated step up
    to 1e-5 (rad, rad/s, m), at most ``iterations`` times. An iterate that does not shrink the
    shortfall fourfold takes a new slope where it stands. Where the projections stall short of
    the conditions (their fixed point ignores the curvature of ``Φ``), up to two Newton steps
    from the best iterate finish the job: the smallest change of it that meets the conditions
    linearized there. The answer meets the conditions on the simulated step and is the
    projection of the proposal up to the curvature of ``Φ`` between the two.

CBF rows
    Every constraint of the set is a barrier ``b(y) = c − P y ≥ 0``. Joint positions and the
    workspace have relative degree two (torque changes acceleration): a one-step condition on
    ``q⁺`` alone admits a state at full speed just short of a limit, from which no admissible
    torque stops the joint within the next step. Each is therefore paired with a lookahead
    barrier on the position ``κ`` seconds ahead at the current velocity,

    .. math:: b^{\\uparrow}_i = U_i - q_i - \\kappa_q \\dot q_i, \\qquad
              b^{\\downarrow}_i = q_i - L_i + \\kappa_q \\dot q_i

    (and ``hi_j − p_j − κ_w v_j``, ``p_j − lo_j + κ_w v_j`` for the box). Keeping
    ``b^↑(y⁺) ≥ 0`` with ``q⁺ = q + Δt q̇⁺`` (the semi-implicit step) bounds
    ``q⁺ ≤ U − κ q̇⁺``, so ``q`` itself never passes ``U``; on the boundary ``b^↑ = 0`` it asks
    ``q̇⁺ ≤ q̇ κ/(Δt + κ)``, a deceleration of ``q̇/(Δt + κ) ≤ v̄/(Δt + κ)``, which the torque
    limits supply when ``κ ≥ v̄/ā − Δt`` for the smallest braking deceleration ``ā`` (at
    ``home`` about 73 rad/s² on joint 2 and 100 on the wrist joints; ``κ_q`` = 0.05 s asks for
    at most 31 and 37 rad/s², half of that, a reserve for the coupling between joints). The
    velocity limits ``v̄ ∓ q̇ ≥ 0`` have relative degree one. Each barrier gets the
    discrete-time CBF condition

    .. math:: b(y^+) \\ge (1 - \\alpha)\\, b(y),

    linear in ``a`` through the prediction: with ``y⁺ = y + B a + f``,
    ``f = Φ(x, ā) − B ā − y``, :func:`diffto.layers.safety.cbf_constraints` (``A = I``) turns
    it into ``P B a ≤ α c − P(y + f) + (1 − α) P y`` and adds the action box ``−1 ≤ a ≤ 1``.
    ``α ∈ (0, 1]`` bounds how fast a barrier may shrink per step (``α = 1``: only stay inside).
    The filter enforces the set shrunk by small buffers (``joint_buffer``, ``velocity_buffer``,
    ``workspace_buffer``), a reserve against a mismatched episode and the linearization's
    residual. Rows that no action in the box can violate (``‖P B‖₁ ≤ h``) are dropped.

Projection
    A proposal that keeps every condition on the simulated nominal step is returned as it is
    (one nominal step, no projection: the common case under a reasonable policy). Otherwise
    each projection is the Euclidean projection onto the linearized conditions, computed one
    of two ways that give the same action (to 1e-8 on the same rows):

    * ``projection="nnls"`` (default): exactly in NumPy, as a least-distance program solved by
      NNLS (:meth:`PandaSafetyFilter._project_nnls`), with :class:`diffto.layers.SafetyFilter`
      answering where the set is empty;
    * ``projection="layer"``: every projection by :class:`diffto.layers.SafetyFilter`
      (float64, batch 1), whose interior point at batch 1 is dominated by torch's
      per-operation overhead on a 7-variable problem.

    On a shared 2-core machine (``benchmarks/bench_panda_safety.py``) the filter took 1.2 ms
    per step under uniformly random actions (nearly every step projected, 2.7 projections
    each) and 0.25 ms under an aggressive task-space PD controller (15 % of the steps
    projected) with ``"nnls"``; 20 ms and 2.2 ms with ``"layer"``. Where the linearized
    conditions admit no action, the layer answers with its least-violating action (on either
    path), clipped to the box, and the iteration goes on from there; the filter returns the
    iterate with the smallest shortfall on the simulated step (never NaN) and reports whether
    it meets them (:attr:`FilterResult.feasible`).

Limits
    The conditions are one step deep and each barrier is kept on its own, so the set is not
    certified invariant: where several limits meet, the coupling of the joints can leave no
    admissible action, and the filter then reports the shortfall. No closed-loop violation
    was seen on the 50 evaluation episodes under random actions, the aggressive PD and full
    torque held on every joint. A mismatched episode (an unknown payload, friction or gain)
    steps differently from the nominal prediction; the buffers absorb that, and under a payload
    up to 1 kg, friction up to 0.5 Nm and gains within 5 % it took ``velocity_buffer`` = 0.5
    rad/s (the default 0.02 leaves about two velocity violations per episode); under the
    residual task's 1-3 kg, 0.5-2 Nm and gains of 70-100 % it takes 1.0 rad/s (0.5 leaves
    0.3-0.4 per episode; ``benchmarks/bench_panda_filter_margin.py``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mujoco
import numpy as np
import torch
from scipy.optimize import nnls

from diffto.layers.safety import INFEASIBLE, SafetyFilter
from diffto.tasks.panda._checks import is_finite_number, nonneg
from diffto.tasks.panda.model import (
    FLANGE_SITE,
    JOINT_LOWER,
    JOINT_UPPER,
    TORQUE_LIMITS,
    VELOCITY_LIMITS,
)

__all__ = [
    "PandaConstraintSet",
    "PandaSafetyFilter",
    "DEFAULT_WORKSPACE_LOW",
    "DEFAULT_WORKSPACE_HIGH",
    "FilterResult",
]

DEFAULT_WORKSPACE_LOW = (0.0, -0.6, 0.05)
DEFAULT_WORKSPACE_HIGH = (0.85, 0.6, 1.15)

_RESIDUAL = 1e-5  # accepted shortfall of a condition on the simulated step (rad, rad/s, m)
_RESTORATION_STEPS = 2  # Newton steps from the best iterate when the chord iteration stalls
_CONTRACTION = 0.25  # a chord iterate must shrink the shortfall this much, else re-linearize
_N_OUT = 20  # y = (q 7, qdot 7, p 3, v 3)
_Q, _QD, _P, _V = slice(0, 7), slice(7, 14), slice(14, 17), slice(17, 20)


def _vector(name: str, value: Any, size: int) -> np.ndarray:
    """A scalar (broadcast) or a length-``size`` sequence of finite floats."""
    if is_finite_number(value):
        return np.full(size, float(value))
    if isinstance(value, Sequence | np.ndarray) and not isinstance(value, str):
        arr = np.asarray(value, dtype=object).ravel()
        if arr.shape == (size,) and all(is_finite_number(v) for v in arr):
            return arr.astype(np.float64)
    raise ValueError(f"{name} must be a finite float or {size} finite floats, got {value!r}")


def _options(name: str, options: Any, allowed: Sequence[str]) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{name} must be None or a dict of options, got {options!r}")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{name} has unknown options {unknown}; allowed: {sorted(allowed)}")
    return dict(options)


@dataclass(frozen=True, eq=False)
class PandaConstraintSet:
    """The safe states of the Panda reach task (see the module docstring).

    Args:
        joint_margin: rad kept from every joint limit (``>= 0``, less than half of every range).
        velocity_limits: ``|q̇|`` bound, rad/s: a positive float or 7 of them.
        workspace_low, workspace_high: corners of the flange box (m, world frame), ``low < high``.
    """

    joint_margin: float = 0.05
    velocity_limits: np.ndarray = field(default_factory=lambda: np.array(VELOCITY_LIMITS))
    workspace_low: np.ndarray = field(default_factory=lambda: np.array(DEFAULT_WORKSPACE_LOW))
    workspace_high: np.ndarray = field(default_factory=lambda: np.array(DEFAULT_WORKSPACE_HIGH))

    CLASSES = ("joint_position", "joint_velocity", "workspace")

    def __post_init__(self) -> None:
        margin = nonneg("joint_margin", self.joint_margin)
        if 2 * margin >= float((JOINT_UPPER - JOINT_LOWER).min()):
            raise ValueError(
                f"joint_margin must be less than half of the narrowest joint range "
                f"({float((JOINT_UPPER - JOINT_LOWER).min()) / 2:.4f} rad), got {margin!r}"
            )
        vel = _vector("velocity_limits", self.velocity_limits, 7)
        if (vel <= 0).any():
            raise ValueError(f"velocity_limits must be > 0, got {self.velocity_limits!r}")
        low = _vector("workspace_low", self.workspace_low, 3)
        high = _vector("workspace_high", self.workspace_high, 3)
        if (low >= high).any():
            raise ValueError(
                f"workspace_low must be < workspace_high in every axis, got {low} and {high}"
            )
        for name, value in (
            ("joint_margin", margin),
            ("velocity_limits", vel),
            ("workspace_low", low),
            ("workspace_high", high),
        ):
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
            object.__setattr__(self, name, value)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> PandaConstraintSet:
        """The set from a dict of the constructor's arguments (``None``: the defaults); a bad
        option raises ``ValueError`` naming ``safety_constraints``."""
        opts = _options(
            "safety_constraints",
            options,
            ("joint_margin", "velocity_limits", "workspace_low", "workspace_high"),
        )
        try:
            return cls(**opts)
        except ValueError as err:
            raise ValueError(f"safety_constraints: {err}") from None

    @property
    def joint_lower(self) -> np.ndarray:
        """``L = lower + joint_margin`` (7,) rad."""
        return JOINT_LOWER + self.joint_margin

    @property
    def joint_upper(self) -> np.ndarray:
        """``U = upper − joint_margin`` (7,) rad."""
        return JOINT_UPPER - self.joint_margin

    def violated(self, q: np.ndarray, qdot: np.ndarray, p: np.ndarray) -> dict[str, bool]:
        """Which classes the state ``(q, q̇, p)`` violates, by name (:attr:`CLASSES`)."""
        return {
            "joint_position": bool(((q < self.joint_lower) | (q > self.joint_upper)).any()),
            "joint_velocity": bool((np.abs(qdot) > self.velocity_limits).any()),
            "workspace": bool(((p < self.workspace_low) | (p > self.workspace_high)).any()),
        }

    def violations(self, q: np.ndarray, qdot: np.ndarray, p: np.ndarray) -> int:
        """The number of classes (0 to 3) the state ``(q, q̇, p)`` violates."""
        return sum(self.violated(q, qdot, p).values())


@dataclass
class FilterResult:
    """What one call of :class:`PandaSafetyFilter` did.

    ``action``: the safe action (7,); ``filtered``: it differs from the clipped proposal;
    ``correction``: ``‖action − clip(proposal)‖``; ``feasible``: the action keeps every CBF
    condition on the simulated nominal step (up to 1e-5); ``shortfall``: the largest
    violation of a condition there (≤ 0 when all hold; positive where no action was found
    that keeps them all, and the one with the smallest shortfall was used); ``projections``:
    projections made (0 when the proposal was safe); ``seconds``: wall time of the call.
    """

    action: np.ndarray
    filtered: bool
    correction: float
    feasible: bool
    shortfall: float
    projections: int
    seconds: float


class PandaSafetyFilter:
    """Projects Panda actions onto the one-step CBF conditions of a :class:`PandaConstraintSet`.

    Args:
        model: the nominal model the filter predicts with (``PandaReachEnv.nominal_model()``;
            the filter keeps its own ``MjData``).
        substeps: physics steps per control step (the environment's).
        constraints: the safe set (default: :class:`PandaConstraintSet`'s defaults).
        alpha: CBF rate in ``(0, 1]``: a barrier may shrink by this fraction per step.
        joint_lookahead: ``κ_q`` (s, ``>= 0``) of the joint-position lookahead barriers.
        workspace_lookahead: ``κ_w`` (s, ``>= 0``) of the workspace lookahead barriers.
        joint_buffer, velocity_buffer, workspace_buffer: how much the filter shrinks the set
            (rad, rad/s, m; ``>= 0``) against mismatch and linearization error.
        iterations: at most this many projections of the proposal per call (``>= 1``), then
            at most two Newton steps (module docstring, "Iteration").
        fd_step: the finite-difference step ``ε`` in action units (``(0, 0.5]``).
        tol: the projection layer's KKT tolerance (``> 0``).
        projection: ``"nnls"`` (default), the Euclidean projection computed exactly in NumPy,
            with :class:`diffto.layers.SafetyFilter` answering where the set is empty, or
            ``"layer"``: every projection by the layer (the same actions, about ten times the
            cost at batch 1; see the module docstring).

    Call ``filter(state, action)`` with ``state = [q; q̇] (14,)`` and a proposed action (7,)
    (clipped to ``[−1, 1]`` first); returns a :class:`FilterResult`.
    """

    OPTIONS = (
        "alpha",
        "joint_lookahead",
        "workspace_lookahead",
        "joint_buffer",
        "velocity_buffer",
        "workspace_buffer",
        "iterations",
        "fd_step",
        "tol",
        "projection",
    )

    def __init__(
        self,
        model: mujoco.MjModel,
        substeps: int,
        constraints: PandaConstraintSet | None = None,
        *,
        alpha: float = 0.5,
        joint_lookahead: float = 0.05,
        workspace_lookahead: float = 0.1,
        joint_buffer: float = 0.005,
        velocity_buffer: float = 0.02,
        workspace_buffer: float = 0.005,
        iterations: int = 5,
        fd_step: float = 1e-6,
        tol: float = 1e-9,
        projection: str = "nnls",
    ) -> None:
        if not isinstance(model, mujoco.MjModel) or model.nu != 7 or model.nv != 7:
            raise ValueError(f"model must be the Panda's MjModel (nv = nu = 7), got {model!r}")
        if isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1:
            raise ValueError(f"substeps must be a positive int, got {substeps!r}")
        if constraints is None:
            constraints = PandaConstraintSet()
        if not isinstance(constraints, PandaConstraintSet):
            raise ValueError(f"constraints must be a PandaConstraintSet, got {constraints!r}")
        if not is_finite_number(alpha) or not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be a float in (0, 1], got {alpha!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
        if not is_finite_number(fd_step) or not 0.0 < fd_step <= 0.5:
            raise ValueError(f"fd_step must be a float in (0, 0.5], got {fd_step!r}")
        if not is_finite_number(tol) or tol <= 0:
            raise ValueError(f"tol must be a finite float > 0, got {tol!r}")
        if projection not in ("layer", "nnls"):
            raise ValueError(f"projection must be 'layer' or 'nnls', got {projection!r}")
        self.projection, self.tol = projection, float(tol)
        self.substeps, self.constraints = substeps, constraints
        self.alpha, self.iterations, self.fd_step = float(alpha), iterations, float(fd_step)
        k_q = nonneg("joint_lookahead", joint_lookahead)
        k_w = nonneg("workspace_lookahead", workspace_lookahead)
        d_q = nonneg("joint_buffer", joint_buffer)
        d_v = nonneg("velocity_buffer", velocity_buffer)
        d_w = nonneg("workspace_buffer", workspace_buffer)
        self.joint_lookahead, self.workspace_lookahead = k_q, k_w
        self.joint_buffer, self.velocity_buffer, self.workspace_buffer = d_q, d_v, d_w
        c = constraints
        if (c.velocity_limits <= d_v).any():
            raise ValueError(
                f"velocity_buffer must be below every velocity limit, got {velocity_buffer!r}"
            )
        if ((c.joint_upper - c.joint_lower) <= 2 * d_q).any():
            raise ValueError(f"joint_buffer leaves an empty joint range, got {joint_buffer!r}")
        if ((c.workspace_high - c.workspace_low) <= 2 * d_w).any():
            raise ValueError(f"workspace_buffer leaves an empty box, got {workspace_buffer!r}")

        self.P, self.c = self._barriers()
        # The joint stops are inactive inside the set; without them the step is smooth in ``a``.
        self.model = copy.deepcopy(model)
        self.model.opt.disableflags |= mujoco.mjtDisableBit.mjDSBL_LIMIT
        self.data = mujoco.MjData(self.model)
        self._site = model.site(FLANGE_SITE).id
        self._jacp = np.zeros((3, model.nv))
        self.layer = SafetyFilter(tol=float(tol))

    @classmethod
    def from_options(
        cls,
        model: mujoco.MjModel,
        substeps: int,
        constraints: PandaConstraintSet,
        options: Mapping[str, Any] | None,
    ) -> PandaSafetyFilter:
        """A filter from a dict of keyword options (:attr:`OPTIONS`); a bad option raises
        ``ValueError`` naming ``safety_filter``."""
        opts = _options("safety_filter", options, cls.OPTIONS)
        try:
            return cls(model, substeps, constraints, **opts)
        except ValueError as err:
            raise ValueError(f"safety_filter: {err}") from None

    # ------------------------------------------------------------------ barriers
    def _barriers(self) -> tuple[np.ndarray, np.ndarray]:
        """``P (k, 20)``, ``c (k,)`` with barriers ``b(y) = c − P y`` (module docstring)."""
        cs = self.constraints
        eye7, eye3 = np.eye(7), np.eye(3)
        upper, lower = cs.joint_upper - self.joint_buffer, cs.joint_lower + self.joint_buffer
        vbar = cs.velocity_limits - self.velocity_buffer
        hi, lo = cs.workspace_high - self.workspace_buffer, cs.workspace_low + self.workspace_buffer
        rows, rhs = [], []

        def add(*blocks: tuple[slice, np.ndarray], c: np.ndarray) -> None:
            P = np.zeros((len(c), _N_OUT))
            for sl, value in blocks:
                P[:, sl] = value
            rows.append(P)
            rhs.append(c)

        k_q, k_w = self.joint_lookahead, self.workspace_lookahead
        add((_Q, eye7), c=upper)  # q ≤ U
        add((_Q, -eye7), c=-lower)  # q ≥ L
        add((_Q, eye7), (_QD, k_q * eye7), c=upper)  # q + κ q̇ ≤ U
        add((_Q, -eye7), (_QD, -k_q * eye7), c=-lower)  # q + κ q̇ ≥ L
        add((_QD, eye7), c=vbar)  # q̇ ≤ v̄
        add((_QD, -eye7), c=vbar)  # q̇ ≥ −v̄
        add((_P, eye3), c=hi)  # p ≤ hi
        add((_P, -eye3), c=-lo)  # p ≥ lo
        add((_P, eye3), (_V, k_w * eye3), c=hi)  # p + κ v ≤ hi
        add((_P, -eye3), (_V, -k_w * eye3), c=-lo)  # p + κ v ≥ lo
        return np.concatenate(rows), np.concatenate(rhs)

    def barrier_values(self, y: np.ndarray) -> np.ndarray:
        """``b(y) = c − P y`` (k,) at outputs ``y (20,)``."""
        return self.c - self.P @ y

    # ------------------------------------------------------------------ nominal prediction
    def outputs(self, state: np.ndarray, action: np.ndarray | None = None) -> np.ndarray:
        """``y = (q, q̇, p, v) (20,)`` of ``state``, or after one nominal control step with
        ``action`` held when one is given."""
        m, d = self.model, self.data
        d.qpos[:] = state[:7]
        d.qvel[:] = state[7:]
        if action is not None:
            d.ctrl[:] = action * TORQUE_LIMITS
            mujoco.mj_step(m, d, nstep=self.substeps)
        mujoco.mj_kinematics(m, d)
        mujoco.mj_comPos(m, d)
        mujoco.mj_jacSite(m, d, self._jacp, None, self._site)
        return np.concatenate([d.qpos, d.qvel, d.site_xpos[self._site], self._jacp @ d.qvel])

    def jacobian(self, state: np.ndarray, action: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``B = ∂Φ/∂a (20, 7)`` at ``action`` (``y = Φ(state, action)``): one-sided finite
        differences directed into the box ``[−1, 1]``."""
        B = np.empty((_N_OUT, 7))
        for i in range(7):
            eps = -self.fd_step if action[i] > 0 else self.fd_step
            a = action.copy()
            a[i] += eps
            B[:, i] = (self.outputs(state, a) - y) / eps
        return B

    def cbf_rows(
        self, y_now: np.ndarray, action: np.ndarray, y_lin: np.ndarray, B: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``G (k', 7)``, ``h (k',)``: the CBF conditions ``b(y⁺) ≥ (1 − α) b(y)`` of the
        prediction ``y⁺ = y_lin + B (a − action)`` and the action box ``−1 ≤ a ≤ 1``, less the
        barrier rows no action in the box can violate. The rows are those of
        :func:`diffto.layers.safety.cbf_constraints` for ``x⁺ = x + B a + f`` with
        ``f = y_lin − B action − y_now``, written out in NumPy:
        ``P B a ≤ α c − P (y_lin − B action) + (1 − α) P y_now``."""
        G = self.P @ B
        h = (
            self.alpha * self.c
            - self.P @ (y_lin - B @ action)
            + (1.0 - self.alpha) * (self.P @ y_now)
        )
        keep = np.abs(G).sum(1) > h
        eye = np.eye(7)
        return (
            np.concatenate([G[keep], eye, -eye]),
            np.concatenate([h[keep], np.ones(7), np.ones(7)]),
        )

    def shortfall(self, y_now: np.ndarray, y_next: np.ndarray) -> float:
        """Largest violation of ``b(y⁺) ≥ (1 − α) b(y)`` over the barriers, on outputs
        ``y_next`` after the step from ``y_now`` (≤ 0: every condition kept)."""
        target = (1.0 - self.alpha) * self.barrier_values(y_now)
        return float((target - self.barrier_values(y_next)).max())

    def _project(self, a: np.ndarray, G: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, bool]:
        """The projection of ``a`` onto ``{G y ≤ h}`` clipped to the box, and whether that set
        is nonempty (else the layer's least-violating action)."""
        safe = self._project_nnls(a, G, h) if self.projection == "nnls" else None
        feasible = True
        if safe is None:  # the layer; also where the exact path finds no feasible action
            with torch.no_grad():
                out, info = self.layer(
                    torch.as_tensor(a)[None],
                    torch.as_tensor(G)[None],
                    torch.as_tensor(h)[None],
                    return_info=True,
                )
            safe = out[0].numpy()
            feasible = int(info["status"][0]) != INFEASIBLE
        return np.clip(safe, -1.0, 1.0), feasible

    def _project_nnls(self, a: np.ndarray, G: np.ndarray, h: np.ndarray) -> np.ndarray | None:
        """The projection of ``a`` onto ``{y : G y ≤ h}`` as a least-distance program solved
        by NNLS (Lawson and Hanson, *Solving Least Squares Problems*, ch. 23); ``None`` where
        the set is empty or the answer misses the tolerance (the layer decides then).

        With ``x = y − a`` the program is ``min ‖x‖ s.t. E x ≥ f``, ``E = −G``,
        ``f = G a − h``. For ``u = argmin_{u ≥ 0} ‖M u − d‖`` with ``M = [Eᵀ; fᵀ]`` and
        ``d = e_{n+1}``, the residual ``r = M u − d`` is zero iff the set is empty, and
        otherwise ``x = −r_{1..n} / r_{n+1}``.
        """
        norms = np.linalg.norm(G, axis=1)
        if (norms == 0).any():  # pruning keeps a zero row only when it reads 0 ≤ h < 0
            return None
        G, h = G / norms[:, None], h / norms
        f = G @ a - h
        if (f <= 0).all():
            return a.copy()
        M = np.vstack([-G.T, f[None]])
        d = np.zeros(M.shape[0])
        d[-1] = 1.0
        u, _ = nnls(M, d)
        r = M @ u - d
        if abs(r[-1]) <= 1e-12:
            return None
        y = a - r[:-1] / r[-1]
        scale = 1.0 + np.abs(a).max() + np.abs(h).max()
        return y if (G @ y - h).max() <= 1e3 * self.tol * scale else None

    # ------------------------------------------------------------------ the filter
    def __call__(self, state: np.ndarray, action: np.ndarray) -> FilterResult:
        start = time.perf_counter()
        state = np.asarray(state, dtype=np.float64)
        proposal = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        if state.shape != (14,) or not np.isfinite(state).all():
            raise ValueError(f"state must be 14 finite floats [q; qdot], got {state!r}")
        if proposal.shape != (7,) or not np.isfinite(proposal).all():
            raise ValueError(f"action must be 7 finite floats, got {action!r}")
        y_now = self.outputs(state)
        y_next = self.outputs(state, proposal)
        if self.shortfall(y_now, y_next) <= 0.0:  # the common case: a safe proposal
            gap = self.shortfall(y_now, y_next)
            return FilterResult(proposal, False, 0.0, True, gap, 0, time.perf_counter() - start)

        B = self.jacobian(state, proposal, y_next)
        a_lin, y_lin = proposal, y_next
        best, best_y, best_gap = proposal, y_next, math.inf
        previous, projections = math.inf, 0
        # Projections of the proposal (the chord iteration of the module docstring) ...
        for _ in range(self.iterations):
            a_new, feasible = self._project(proposal, *self.cbf_rows(y_now, a_lin, y_lin, B))
            y_new = self.outputs(state, a_new)
            gap = self.shortfall(y_now, y_new)
            projections += 1
            if gap < best_gap:
                best, best_y, best_gap = a_new, y_new, gap
            if gap <= _RESIDUAL:
                break
            if not feasible or gap > _CONTRACTION * previous:  # the slope is off: take it here
                B = self.jacobian(state, a_new, y_new)
            a_lin, y_lin, previous = a_new, y_new, gap
        # ... then, where they stalled short of the conditions, Newton steps towards them from
        # the best action (the smallest change that meets the conditions linearized there).
        for _ in range(_RESTORATION_STEPS if best_gap > _RESIDUAL else 0):
            B = self.jacobian(state, best, best_y)
            a_new, _ = self._project(best, *self.cbf_rows(y_now, best, best_y, B))
            y_new = self.outputs(state, a_new)
            gap = self.shortfall(y_now, y_new)
            projections += 1
            if gap >= best_gap:
                break
            best, best_y, best_gap = a_new, y_new, gap
            if gap <= _RESIDUAL:
                break
        correction = float(np.linalg.norm(best - proposal))
        return FilterResult(
            best,
            correction > 0.0,
            correction,
            best_gap <= _RESIDUAL,
            best_gap,
            projections,
            time.perf_counter() - start,
        )
