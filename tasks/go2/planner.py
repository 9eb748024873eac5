"""Go2 reference motions from a single-rigid-body trajectory optimization (CasADi + IPOPT).

With a fixed contact schedule ``c_{k,i}`` (interval ``k``, foot ``i``) the planner solves

.. math::

    \\min \\sum_k \\|x_k - x^\\text{ref}_k\\|^2_W + w_f \\|f_k - f^\\text{nom}_k\\|^2
        + w_s \\|p_{k+1} - p_k\\|^2 + w_h (p^z_k - z^\\text{swing}_k)^2 + w_n \\|r_k\\|^2

over body states ``x_k = [p, v, rpy, ω_body]`` (CoM position and velocity in the world, ZYX
Euler angles, body-frame angular velocity) at knots ``k = 0..N``, foot forces ``f_{k,i}``
(world) per interval and foot-centre positions ``p_{k,i}`` (world) per knot, subject to

* semi-implicit Euler rigid-body dynamics with the Go2's mass and composite inertia:
  ``v⁺ = v + dt (Σf/m + g)``, ``p⁺ = p + dt v⁺``,
  ``ω⁺ = ω + dt I⁻¹ (Rᵀ Σ (p_i - p) × f_i - ω × I ω)``, ``rpy⁺ = rpy + dt E(rpy)⁻¹ ω⁺``;
* stance (``c = 1``): ``0 ≤ f_z ≤ f_max``, the friction pyramid ``|f_x|, |f_y| ≤ μ/√2 f_z``
  (inscribed in the cone ``‖f_xy‖ ≤ μ f_z``), the foot on the ground at both knots and not
  sliding;
* swing (``c = 0``): ``f = 0``, foot above the ground;
* each foot inside a box around its hip, in the body frame (keeps the leg IK reachable).

Joint angles come from analytic leg IK of the optimized feet, joint velocities from finite
differences and feedforward torques ``-Jᵀ f`` (:class:`FeedforwardComputer`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import casadi as cs
import numpy as np

from diffto.tasks.go2.legs import PARAMS_PATH, go2_legs, rpy_to_rotation
from diffto.tasks.go2.reference import ReferenceTrajectory

__all__ = [
    "MOTIONS",
    "PlannerError",
    "PlannerOptions",
    "contact_schedule",
    "default_cache_dir",
    "plan_reference",
]

logger = logging.getLogger(__name__)

_PLANNER_VERSION = 1  # bump when the formulation changes: it is part of the cache key
GRAVITY = 9.81

# Gait: (phase offset of FL, FR, RL, RR as a fraction of the period); a leg is in stance
# while its phase (t / period + offset mod 1) is below the duty factor.
_GAIT_OFFSETS = {
    "stand": (0.0, 0.0, 0.0, 0.0),
    "trot_in_place": (0.0, 0.5, 0.5, 0.0),
    "trot": (0.0, 0.5, 0.5, 0.0),
    "pronk": (0.0, 0.0, 0.0, 0.0),
    "bound": (0.0, 0.0, 0.5, 0.5),
}
MOTIONS = tuple(_GAIT_OFFSETS)
_MOTION_DEFAULTS = {
    "stand": dict(duty_factor=1.0),
    "trot_in_place": dict(speed=0.0),
    "trot": dict(speed=0.5),
    "pronk": dict(gait_period=0.4, duty_factor=0.6, swing_height=0.06, weight_height=20.0),
    "bound": dict(speed=0.5, gait_period=0.3, weight_height=50.0),
}


class PlannerError(RuntimeError):
    """IPOPT did not converge, or the solution cannot be turned into joint targets."""


@dataclass(frozen=True)
class PlannerOptions:
    """Options of :func:`plan_reference` (each motion overrides some defaults).

    Attributes:
        speed: forward body speed target in m/s, body frame (``trot``: 0.5).
        lateral_speed: sideways body speed target in m/s, body frame (+ to the left).
        yaw_rate: turning rate target in rad/s (+ counter-clockwise seen from above).
        height: base-origin height target in m, as MuJoCo reports it (home keyframe 0.27).
        gait_period: seconds per gait cycle.
        duty_factor: fraction of the cycle each foot is in stance (1 = always).
        swing_height: peak foot lift above the ground during swing, m.
        mu: friction coefficient of the pyramid (inscribed: ``μ/√2`` per axis).
        f_max: maximum normal force per foot, N.
        foot_sink: how far the soft foot spheres sink into the MuJoCo floor at rest, m.
        weight_height: cost weight of the body height error (pronk lowers it).
        weight_force: cost weight of the normalized force deviation ``(f - f_nom)/(m g)``.
        weight_foot: cost weight of foot motion between knots.
        max_iter: IPOPT iteration cap.
        tol: IPOPT convergence tolerance.
    """

    speed: float = 0.0
    lateral_speed: float = 0.0
    yaw_rate: float = 0.0
    height: float = 0.27
    gait_period: float = 0.4
    duty_factor: float = 0.5
    swing_height: float = 0.07
    mu: float = 0.6
    f_max: float = 250.0
    foot_sink: float = 0.0175
    weight_height: float = 200.0
    weight_force: float = 1.0
    weight_foot: float = 20.0
    max_iter: int = 300
    tol: float = 1e-7

    def __post_init__(self) -> None:
        positive = ("height", "gait_period", "duty_factor", "mu", "f_max", "max_iter", "tol")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.duty_factor > 1:
            raise ValueError(f"duty_factor must be in (0, 1], got {self.duty_factor}")
        for name in ("swing_height", "foot_sink", "weight_height", "weight_force", "weight_foot"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _srb_params() -> dict:
    params = json.loads(PARAMS_PATH.read_text())["derived"]
    return dict(
        mass=float(params["total_mass"]),
        com=np.array(params["com_in_base_frame_at_home"], dtype=float),
        inertia=np.array(params["srb_composite_inertia_about_com_base_frame_at_home"]),
    )


def contact_schedule(motion: str, num_phases: int, dt: float, opts: PlannerOptions) -> np.ndarray:
    """Stance flags ``(N, 4)`` bool per interval, feet FL, FR, RL, RR.

    Interval ``k`` is judged at its midpoint ``(k + ½) dt``.
    """
    offsets = np.array(_GAIT_OFFSETS[motion])
    t = (np.arange(num_phases)[:, None] + 0.5) * dt
    phase = (t / opts.gait_period + offsets) % 1.0
    return phase < opts.duty_factor - 1e-9 if opts.duty_factor < 1 else np.ones_like(phase, bool)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of True in a 1-D bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def _body_targets(motion, contact, dt, opts, srb):
    """CoM position, CoM velocity, roll-pitch-yaw and body angular velocity targets.

    All ``(N+1, 3)``. The base follows the commanded body-frame velocity ``(speed,
    lateral_speed)`` while turning at ``yaw_rate``: with heading ``ψ = ω t`` its world
    velocity is ``Rz(ψ) v`` and its path the integral of that (an arc when ``ω ≠ 0``).
    """
    n = contact.shape[0]
    t = np.arange(n + 1) * dt
    yaw, w = opts.yaw_rate * t, opts.yaw_rate
    vx, vy = opts.speed, opts.lateral_speed
    c, s = np.cos(yaw), np.sin(yaw)
    if abs(w) > 1e-12:
        base_x, base_y = (vx * s + vy * (c - 1)) / w, (vx * (1 - c) + vy * s) / w
    else:
        base_x, base_y = vx * t, vy * t
    com = srb["com"]
    com_xy = np.stack([c * com[0] - s * com[1], s * com[0] + c * com[1]], 1)  # Rz(ψ) c
    pos = np.stack(
        [base_x + com_xy[:, 0], base_y + com_xy[:, 1], np.full_like(t, opts.height + com[2])], 1
    )
    # CoM velocity = base velocity + ω ẑ × Rz(ψ) c
    vel = np.stack(
        [c * vx - s * vy - w * com_xy[:, 1], s * vx + c * vy + w * com_xy[:, 0], np.zeros_like(t)],
        1,
    )
    rpy = np.stack([np.zeros_like(t), np.zeros_like(t), yaw], 1)
    ang_vel = np.zeros_like(rpy)
    ang_vel[:, 2] = w
    if motion == "pronk":
        # Ballistic arcs over every flight phase: take off with v = g T_f / 2, land at the
        # stance height after T_f, so the target itself is dynamically consistent.
        for start, end in _runs(~contact.any(axis=1)):
            tau = (np.arange(start, end + 1) - start) * dt
            v0 = GRAVITY * (end - start) * dt / 2
            pos[start : end + 1, 2] += v0 * tau - GRAVITY * tau**2 / 2
            vel[start : end + 1, 2] = v0 - GRAVITY * tau
    return pos, vel, rpy, ang_vel


def _swing_targets(contact, ground, opts):
    """Foot height targets ``(N+1, 4)`` (NaN where none) and the knot's ground pinning."""
    n = contact.shape[0]
    pinned = np.zeros((n + 1, 4), bool)
    pinned[:-1] |= contact
    pinned[1:] |= contact
    target = np.full((n + 1, 4), np.nan)
    for leg in range(4):
        for start, end in _runs(~contact[:, leg]):
            lift = (np.arange(start, end + 1) - start) / (end - start)  # 0 lift-off, 1 landing
            target[start : end + 1, leg] = ground + opts.swing_height * np.sin(np.pi * lift)
    target[pinned] = np.nan
    return target, pinned


def _euler_rate_matrix(rpy):
    """``E⁻¹`` with ``d rpy/dt = E⁻¹ ω_body`` for ZYX angles (singular at pitch ±90°)."""
    r, p = rpy[0], rpy[1]
    return cs.vertcat(
        cs.horzcat(1, cs.sin(r) * cs.tan(p), cs.cos(r) * cs.tan(p)),
        cs.horzcat(0, cs.cos(r), -cs.sin(r)),
        cs.horzcat(0, cs.sin(r) / cs.cos(p), cs.cos(r) / cs.cos(p)),
    )


def _rotation(rpy):
    cr, sr = cs.cos(rpy[0]), cs.sin(rpy[0])
    cp, sp = cs.cos(rpy[1]), cs.sin(rpy[1])
    cy, sy = cs.cos(rpy[2]), cs.sin(rpy[2])
    rz = cs.vertcat(cs.horzcat(cy, -sy, 0), cs.horzcat(sy, cy, 0), cs.horzcat(0, 0, 1))
    ry = cs.vertcat(cs.horzcat(cp, 0, sp), cs.horzcat(0, 1, 0), cs.horzcat(-sp, 0, cp))
    rx = cs.vertcat(cs.horzcat(1, 0, 0), cs.horzcat(0, cr, -sr), cs.horzcat(0, sr, cr))
    return rz @ ry @ rx


def _step_functions(dt, srb, hip_nominal):
    """CasADi functions: one dynamics step and the feet relative to their hips (body frame)."""
    x, u, feet = cs.SX.sym("x", 12), cs.SX.sym("u", 12), cs.SX.sym("feet", 12)
    mass, inertia = srb["mass"], cs.DM(srb["inertia"])
    inertia_inv = cs.DM(np.linalg.inv(srb["inertia"]))
    p, v, rpy, w = x[0:3], x[3:6], x[6:9], x[9:12]
    rot = _rotation(rpy)
    forces = [u[3 * i : 3 * i + 3] * mass * GRAVITY for i in range(4)]  # u is f / (m g)
    v_next = v + dt * (sum(forces) / mass + cs.DM([0, 0, -GRAVITY]))
    p_next = p + dt * v_next
    torque_world = sum(cs.cross(feet[3 * i : 3 * i + 3] - p, forces[i]) for i in range(4))
    torque = rot.T @ torque_world - cs.cross(w, inertia @ w)
    w_next = w + dt * inertia_inv @ torque
    rpy_next = rpy + dt * _euler_rate_matrix(rpy) @ w_next
    step = cs.Function("srb_step", [x, u, feet], [cs.vertcat(p_next, v_next, rpy_next, w_next)])
    base = p - rot @ cs.DM(srb["com"])
    rel = cs.vertcat(
        *[rot.T @ (feet[3 * i : 3 * i + 3] - base) - cs.DM(hip_nominal[i]) for i in range(4)]
    )
    return step, cs.Function("foot_in_hip", [x, feet], [rel])


# Foot box around (hip x, hip y + thigh offset, 0) in the body frame, metres. Its far corner
# stays inside the knee's extension limit, so IK of any feasible plan is within joint range.
_BOX_LO = np.array([-0.13, -0.05, -0.33])
_BOX_HI = np.array([0.13, 0.05, -0.12])


def _solve(motion: str, num_phases: int, dt: float, opts: PlannerOptions) -> ReferenceTrajectory:
    """Build and solve the NLP; return the reference (no caching)."""
    n = num_phases
    build_start = time.perf_counter()
    srb, legs = _srb_params(), go2_legs()
    mass = srb["mass"]
    # MuJoCo's soft foot spheres rest `foot_sink` below the surface, so a stance foot's centre
    # is at radius - sink (4.5 mm), not at the radius: planning with that ground makes the
    # reference body height the one MuJoCo shows with the same joint angles.
    ground = legs.foot_radius - opts.foot_sink
    hip_nominal = legs.hip_pos.copy()
    hip_nominal[:, 1] += legs.thigh_offset
    contact = contact_schedule(motion, n, dt, opts)
    pos_ref, vel_ref, rpy_ref, ang_vel_ref = _body_targets(motion, contact, dt, opts, srb)
    swing_ref, pinned = _swing_targets(contact, ground, opts)
    step, foot_in_hip = _step_functions(dt, srb, hip_nominal)

    X, U, P = cs.SX.sym("X", 12, n + 1), cs.SX.sym("U", 12, n), cs.SX.sym("P", 12, n + 1)
    # Constraints: dynamics, friction pyramid and no-slip on stance legs, kinematic box.
    g, lbg, ubg = [], [], []
    g.append(cs.vec(X[:, 1:] - step.map(n)(X[:, :-1], U, P[:, :-1])))
    lbg.append(np.zeros(12 * n))
    ubg.append(np.zeros(12 * n))
    stance_idx = np.flatnonzero(contact.T.reshape(-1))  # index leg * n + k
    if stance_idx.size:
        mu = opts.mu / np.sqrt(2.0)
        comps = [cs.vec(U[a::3, :].T)[stance_idx.tolist()] for a in range(3)]  # x, y, z
        for a in (0, 1):
            for sign in (1.0, -1.0):
                g.append(sign * comps[a] - mu * comps[2])
                lbg.append(np.full(stance_idx.size, -np.inf))
                ubg.append(np.zeros(stance_idx.size))
        for a in (0, 1):
            diff = cs.vec((P[a::3, 1:] - P[a::3, :-1]).T)[stance_idx.tolist()]
            g.append(diff)
            lbg.append(np.zeros(stance_idx.size))
            ubg.append(np.zeros(stance_idx.size))
    rel = foot_in_hip.map(n + 1)(X, P)  # (12, N+1)
    g.append(cs.vec(rel))
    lbg.append(np.tile(_BOX_LO, 4 * (n + 1)))
    ubg.append(np.tile(_BOX_HI, 4 * (n + 1)))

    # Cost, each term normalized per knot.
    w_pos = cs.DM([50.0, 50.0, opts.weight_height])
    w_vel = cs.DM([5.0, 5.0, 0.1 * opts.weight_height])
    w_rpy, w_ang = 100.0, 1.0
    cost = cs.sum2(cs.sum1(cs.times(w_pos, (X[0:3, 1:] - pos_ref[1:].T) ** 2)))
    cost += cs.sum2(cs.sum1(cs.times(w_vel, (X[3:6, 1:] - vel_ref[1:].T) ** 2)))
    cost += w_rpy * cs.sumsqr(X[6:9, 1:] - rpy_ref[1:].T)
    cost += w_ang * cs.sumsqr(X[9:12, 1:] - ang_vel_ref[1:].T)
    n_stance = np.maximum(contact.sum(axis=1), 1)
    u_nom = np.zeros((12, n))
    u_nom[2::3, :] = (contact / n_stance[:, None]).T
    cost += opts.weight_force * cs.sumsqr(U - u_nom)
    cost += opts.weight_foot * cs.sumsqr(P[:, 1:] - P[:, :-1])
    has_target = ~np.isnan(swing_ref)
    if has_target.any():
        flat = np.flatnonzero(has_target.T.reshape(-1))  # leg * (n+1) + k
        z = cs.vec(P[2::3, :].T)[flat.tolist()]
        cost += 1e3 * cs.sumsqr(z - swing_ref.T.reshape(-1)[flat])
    cost += 2.0 * cs.sumsqr(rel[0::3, :]) + 2.0 * cs.sumsqr(rel[1::3, :])

    # Variable bounds: initial CoM x, y and yaw fixed; forces; foot heights.
    inf = np.inf
    x_lb, x_ub = np.full((12, n + 1), -inf), np.full((12, n + 1), inf)
    for row, value in ((0, pos_ref[0, 0]), (1, pos_ref[0, 1]), (8, 0.0)):
        x_lb[row, 0] = x_ub[row, 0] = value
    x_lb[6:8, :], x_ub[6:8, :] = -1.0, 1.0  # roll, pitch away from the Euler singularity
    u_lb, u_ub = np.zeros((12, n)), np.zeros((12, n))
    fz_max = opts.f_max / (mass * GRAVITY)
    for leg in range(4):
        u_lb[3 * leg : 3 * leg + 2, :] = np.where(contact[:, leg], -fz_max, 0.0)
        u_ub[3 * leg : 3 * leg + 2, :] = np.where(contact[:, leg], fz_max, 0.0)
        u_ub[3 * leg + 2, :] = np.where(contact[:, leg], fz_max, 0.0)
    p_lb, p_ub = np.full((12, n + 1), -inf), np.full((12, n + 1), inf)
    p_lb[2::3, :] = ground
    p_ub[2::3, :] = np.where(pinned.T, ground, inf)

    # Initial guess: the body on its target, feet under the hips, forces shared evenly.
    x0 = np.zeros((12, n + 1))
    x0[0:3], x0[3:6], x0[6:9], x0[9:12] = pos_ref.T, vel_ref.T, rpy_ref.T, ang_vel_ref.T
    heading = rpy_to_rotation(rpy_ref)  # (N+1, 3, 3)
    hips_world = pos_ref[:, None] + np.einsum("kij,fj->kfi", heading, hip_nominal - srb["com"])
    p0 = np.zeros((12, n + 1))
    for leg in range(4):
        p0[3 * leg : 3 * leg + 2] = hips_world[:, leg, :2].T
        p0[3 * leg + 2] = np.where(has_target[:, leg], np.nan_to_num(swing_ref[:, leg]), ground)

    def flat(*mats):
        return np.concatenate([np.asarray(m, dtype=float).reshape(-1, order="F") for m in mats])

    nlp = {"x": cs.vertcat(cs.vec(X), cs.vec(U), cs.vec(P)), "f": cost, "g": cs.vertcat(*g)}
    # The graph is SX (expand=True keeps any mapped call flat), so IPOPT's derivatives run as
    # flat SX code. IPOPT's default linear solver is MUMPS, bundled with casadi's wheel.
    ipopt = {"print_level": 0, "sb": "yes", "max_iter": opts.max_iter, "tol": opts.tol}
    solver = cs.nlpsol(
        "go2_srb", "ipopt", nlp, {"expand": True, "print_time": False, "ipopt": ipopt}
    )
    start = time.perf_counter()
    build_seconds = start - build_start
    bounds = dict(lbx=flat(x_lb, u_lb, p_lb), ubx=flat(x_ub, u_ub, p_ub))
    sol = solver(x0=flat(x0, u_nom, p0), lbg=np.concatenate(lbg), ubg=np.concatenate(ubg), **bounds)
    seconds = time.perf_counter() - start
    stats = solver.stats()
    status, iterations = stats["return_status"], int(stats["iter_count"])
    if status not in ("Solve_Succeeded", "Solved_To_Acceptable_Level"):
        raise PlannerError(
            f"IPOPT failed to plan motion {motion!r} ({n} phases of {dt} s): "
            f"status {status} after {iterations} iterations"
        )
    message = "planned %s: %d phases, IPOPT %s in %d iterations, %.2f s (NLP build %.2f s)"
    logger.info(message, motion, n, status, iterations, seconds, build_seconds)
    if status != "Solve_Succeeded":
        logger.warning("motion %r converged only to IPOPT's acceptable tolerance", motion)
    w = np.asarray(sol["x"]).ravel()
    nx = 12 * (n + 1)
    xs = w[:nx].reshape(n + 1, 12)
    us = w[nx : nx + 12 * n].reshape(n, 12)
    ps = w[nx + 12 * n :].reshape(n + 1, 4, 3)
    achieved = np.linalg.norm(xs[-1, :2] - xs[0, :2]) / (n * dt)
    commanded = np.linalg.norm(pos_ref[-1, :2] - pos_ref[0, :2]) / (n * dt)
    if abs(achieved - commanded) > 0.1 * max(commanded, 0.1):
        logger.warning(
            "motion %r covers %.2f m/s instead of the commanded %.2f m/s: steps are limited by "
            "the leg workspace; a shorter gait_period allows faster motion",
            motion,
            achieved,
            commanded,
        )
    meta = dict(motion=motion, num_phases=n, dt=dt, options=asdict(opts), ipopt_status=status)
    meta.update(ipopt_iterations=iterations, ipopt_seconds=seconds, ground_height=ground)
    meta["feet"] = ps.reshape(n + 1, 12).tolist()
    return _to_reference(xs, us * mass * GRAVITY, ps, contact, dt, srb["com"], meta)


def _to_reference(xs, grf, feet, contact, dt, com, meta) -> ReferenceTrajectory:
    """Turn the SRB solution into a reference: base-origin states and leg joint targets.

    Args: ``xs (N+1, 12)`` CoM states ``[p, v, rpy, ω_body]``, ``grf (N, 12)`` world forces,
    ``feet (N+1, 4, 3)`` world foot centres, ``contact (N, 4)``, ``com (3,)`` the CoM in the
    base frame.
    """
    rot = rpy_to_rotation(xs[:, 6:9])  # (N+1, 3, 3)
    base_pos = xs[:, 0:3] - rot @ com
    # The base origin moves with the CoM minus the rotating offset: ṗ_base = v - R (ω × c).
    base_vel = xs[:, 3:6] - np.einsum("kij,kj->ki", rot, np.cross(xs[:, 9:12], com))
    feet_body = np.einsum("kji,kfj->kfi", rot, feet - base_pos[:, None, :])  # Rᵀ (p - base)
    try:
        joint_pos = go2_legs().inverse_kinematics(feet_body)
    except ValueError as err:
        raise PlannerError(f"motion {meta['motion']!r}: planned feet not reachable: {err}") from err
    return ReferenceTrajectory(
        body_pos=base_pos,
        body_vel=base_vel,
        body_euler=xs[:, 6:9],
        body_ang_vel=xs[:, 9:12],
        joint_pos=joint_pos,
        joint_vel=np.diff(joint_pos, axis=0) / dt,
        grf=grf,
        contact=contact,
        dt=dt,
        meta=meta,
    )


def default_cache_dir() -> Path:
    """``$DIFFTO_CACHE`` if set, else ``~/.cache/diffto/references``."""
    env = os.environ.get("DIFFTO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "diffto" / "references"


def _cache_key(motion: str, num_phases: int, dt: float, opts: PlannerOptions) -> str:
    payload = {
        "version": _PLANNER_VERSION,
        "motion": motion,
        "num_phases": num_phases,
        "dt": dt,
        "options": asdict(opts),
        "model": hashlib.sha256(PARAMS_PATH.read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def plan_reference(
    motion: str,
    duration: float,
    *,
    dt: float = 0.02,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    **options,
) -> ReferenceTrajectory:
    """Plan (or load from the cache) a Go2 reference motion.

    Args:
        motion: one of :data:`MOTIONS`: ``"stand"`` (four feet down), ``"trot_in_place"``
            and ``"trot"`` (diagonal pairs, 0.4 s period; trot 0.5 m/s), ``"pronk"`` (all
            four feet together, 0.24 s stance then 0.16 s flight), ``"bound"`` (front and
            rear pairs alternating, 0.3 s period, 0.5 m/s).
        duration: seconds; must be a whole number of ``dt`` steps (N = duration / dt >= 2).
        dt: interval length (50 Hz reference by default).
        cache_dir: folder of cached ``.npz`` references (default :func:`default_cache_dir`).
        use_cache: read and write the cache; ``False`` always solves.
        **options: fields of :class:`PlannerOptions` (``speed``, ``height``, ``gait_period``,
            ``duty_factor``, ``swing_height``, ``mu``, ``f_max``, ``foot_sink``, ...).

    Returns:
        The reference; ``meta`` holds the options and the IPOPT status.

    Raises:
        ValueError: unknown motion or option, or a duration that is not a multiple of ``dt``.
        PlannerError: IPOPT did not converge (the message names the motion and status).
    """
    if motion not in _GAIT_OFFSETS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    known = {f.name for f in fields(PlannerOptions)}
    if unknown := set(options) - known:
        raise ValueError(f"unknown planner options {sorted(unknown)}; known: {sorted(known)}")
    if not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a positive number, got {dt}")
    num_phases = int(round(duration / dt))
    if num_phases < 2 or abs(num_phases * dt - duration) > 1e-6 * max(1.0, duration):
        raise ValueError(
            f"duration must be a multiple of dt = {dt} covering >= 2 phases, got {duration}"
        )
    opts = PlannerOptions(**{**_MOTION_DEFAULTS[motion], **options})
    if not use_cache:
        return _solve(motion, num_phases, dt, opts)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{motion}_{num_phases}x{dt:g}_{_cache_key(motion, num_phases, dt, opts)}.npz"
    if path.exists():
        try:
            ref = ReferenceTrajectory.load(path)
            logger.info("loaded cached %s reference from %s", motion, path)
            return ref
        except (ValueError, OSError) as err:
            logger.warning("ignoring unreadable cached reference %s (%s); re-planning", path, err)
    ref = _solve(motion, num_phases, dt, opts)
    ref.save(path)
    return ref
