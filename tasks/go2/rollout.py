"""Closed-loop and open-loop rollouts of a Go2 reference, returned like a simulation would.

Both functions return the same tuple, so a trained tracking policy drops into a pipeline that
consumes open-loop simulations:

    qpos_traj (T, 19), qvel_traj (T, 18), grf_traj (T, 12), images (list of (H, W, 3) uint8)

Row ``k`` is sampled at time ``k · dt`` (``dt`` = the reference's 0.02 s), i.e. at reference
knot ``start_phase + k``; row 0 is the initial state, so ``T = steps + 1``. ``grf_traj[k]`` is
the force the ground exerts on each foot (FL, FR, RL, RR × xyz, world frame) in the contacts
at that instant, read from MuJoCo's constraint forces.

- :func:`execute_policy_rollout`: the residual policy acting in
  :class:`~diffto.tasks.go2.env.Go2TrackingEnv` (PD + feedforward + residual). By default the
  env's early-termination rules are switched off, so the rollout covers the whole clip like an
  open-loop simulation; physics divergence still ends it.
- :func:`execute_open_loop_rollout`: the baseline without feedback. ``mode="inverse_dynamics"``
  (default) holds, per 20 ms interval, the joint torques that MuJoCo's inverse dynamics
  (``mj_inverse``, contacts off) needs to follow the reference motion while the reference GRF
  act on the feet: ``τ = [M q̈ + c − Σ_feet J_footᵀ f_foot]_joints`` with ``q̈`` from finite
  differences of the reference velocities. ``mode="feedforward"`` holds the reference's
  ``tau_ff = −Jᵀ f`` (the same torque the tracking controller adds), without the leg dynamics.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import mujoco
import numpy as np

from diffto.tasks.go2 import model as go2_model
from diffto.tasks.rendering import GHOST_RGB, add_ghost, make_renderer

__all__ = [
    "execute_policy_rollout",
    "play_policy",
    "PolicyRollout",
    "execute_open_loop_rollout",
    "inverse_dynamics_forces",
    "foot_contact_forces",
    "load_policy",
    "resolve_reference",
]

Policy = Callable[[np.ndarray], np.ndarray]
RolloutResult = tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]


@dataclass
class PolicyRollout:
    """What :func:`play_policy` recorded: the arrays of :func:`execute_policy_rollout` and
    whether the rollout played the clip to its end without failing (``clip_completed``: the
    env's ``info["clip_completed"]`` at the last step; a failure on the very last step, or a
    rollout shorter than the clip, is not a completed clip)."""

    qpos: np.ndarray
    qvel: np.ndarray
    grf: np.ndarray
    images: list[np.ndarray]
    clip_completed: bool

# TrackingConfig overrides that switch the env's early termination off (a rollout for
# evaluation should cover the clip; training uses termination to cut hopeless episodes).
_NO_TERMINATION = {
    "termination_sigmas": 1e9,
    "terminate_on_contact_mismatch": False,
    "min_body_height": -1e9,
}


def load_policy(policy: Any) -> Policy:
    """An ``obs -> action (12,)`` function from a trained policy module or a callable (``obs``
    is ``(39,)`` by default, see ``Go2TrackingEnv``).

    A policy module is anything with an ``act(obs)`` method (e.g. a loaded
    :class:`~diffto.learning.ppo.PPO`); an ``nn.Module`` is put in eval mode. A plain callable
    is returned as is. Checkpoints are loaded by the learner that wrote them
    (``PPO.load_from_checkpoint(path)``): the tasks do not depend on the learners.
    """
    return _load_policy(policy)[0]


def _load_policy(policy: Any) -> tuple[Policy, dict[str, Any]]:
    """The policy function and the env kwargs it was evaluated with (``{}`` for callables)."""
    if isinstance(policy, str | os.PathLike):
        raise ValueError(
            f"policy {str(policy)!r} is a path: load the checkpoint with its learner first, "
            "e.g. diffto.learning.PPO.load_from_checkpoint(path), and pass the module"
        )
    act = getattr(policy, "act", None)
    if callable(act):
        if callable(getattr(policy, "eval", None)):
            policy.eval()
        return act, dict(getattr(policy, "eval_env_kwargs", None) or {})
    if callable(policy):
        return policy, {}
    raise ValueError(
        "policy must be a module with an act(obs) method (e.g. a trained PPO) or a callable "
        f"obs -> action, got {type(policy).__name__}"
    )


def foot_contact_forces(
    model: mujoco.MjModel, data: mujoco.MjData, foot_geoms: np.ndarray
) -> np.ndarray:
    """Ground reaction force on each foot ``(12,)`` = 4 feet × xyz, world frame.

    ``mj_contactForce`` gives a contact's force in its frame (rows of ``contact.frame``:
    normal, tangent 1, tangent 2; the normal points from ``geom1`` to ``geom2``), as exerted
    by ``geom1`` on ``geom2``. In world frame that is ``frameᵀ f``; the force on the foot is
    ``+`` that when the foot is ``geom2`` and ``−`` when it is ``geom1``. Only foot contacts
    with a body that is not the robot count (the floor).
    """
    out = np.zeros((4, 3))
    f6 = np.zeros(6)
    foot_of = {int(g): i for i, g in enumerate(foot_geoms)}
    robot_root = model.body_rootid[model.geom_bodyid[int(foot_geoms[0])]]
    for i in range(data.ncon):
        c = data.contact[i]
        g1, g2 = int(c.geom1), int(c.geom2)
        if g2 in foot_of:
            foot, other, sign = foot_of[g2], g1, 1.0
        elif g1 in foot_of:
            foot, other, sign = foot_of[g1], g2, -1.0
        else:
            continue
        if model.body_rootid[model.geom_bodyid[other]] == robot_root:
            continue
        mujoco.mj_contactForce(model, data, i, f6)
        out[foot] += sign * (c.frame.reshape(3, 3).T @ f6[:3])
    return out.reshape(12)


# Go2TrackingEnv's own arguments in a dict of env kwargs; every other key is a TrackingConfig field.
_ENV_ARGUMENTS = ("reference", "randomize", "render_mode")


def resolve_reference(reference: Any, env_kwargs: dict[str, Any] | None = None) -> Any:
    """The ``ReferenceTrajectory`` that an env built with ``env_kwargs`` tracks, from itself, a
    motion name, a ``.npz`` path or a folder of raw ``.npy`` files:
    :func:`~diffto.tasks.go2.reference_source.load_tracked_reference` with the
    :class:`TrackingConfig` of ``env_kwargs`` (its ``reference_duration``, ``control_dt``,
    ``reference_cache_dir`` and ``planner_options``; ``reference``, ``randomize`` and
    ``render_mode`` are ignored)."""
    from diffto.tasks.go2.reference_source import load_tracked_reference
    from diffto.tasks.go2.tracking_config import TrackingConfig

    overrides = {k: v for k, v in (env_kwargs or {}).items() if k not in _ENV_ARGUMENTS}
    return load_tracked_reference(reference, TrackingConfig().replace(**overrides))


def _check_steps(steps: int | None, start_phase: int, num_phases: int) -> int:
    if not 0 <= start_phase < num_phases:
        raise ValueError(f"start_phase must lie in [0, {num_phases}), got {start_phase}")
    available = num_phases - start_phase
    if steps is None:
        return available
    if not 1 <= steps <= available:
        raise ValueError(
            f"steps must lie in [1, {available}] (reference has {num_phases} phases, start "
            f"{start_phase}), got {steps}"
        )
    return int(steps)


def _safe_render(render_fn: Callable[[], np.ndarray | None], images: list[np.ndarray]) -> bool:
    """Append a frame; on a GL failure warn once and report that rendering is off."""
    try:
        frame = render_fn()
    except Exception as err:  # OSMesa/EGL/GLFW failures come as assorted types
        warnings.warn(f"rendering unavailable, no video frames: {err}", RuntimeWarning,
                      stacklevel=3)
        return False
    if frame is not None:
        images.append(np.asarray(frame).copy())
    return True


def execute_policy_rollout(policy: Any, reference: Any, **options: Any) -> RolloutResult:
    """:func:`play_policy` (same arguments) returned as a simulation's tuple.

    Returns:
        ``(qpos_traj (T, 19), qvel_traj (T, 18), grf_traj (T, 12), images)``, ``T ≤ steps+1``.
    """
    out = play_policy(policy, reference, **options)
    return out.qpos, out.qvel, out.grf, out.images


def play_policy(
    policy: Any,
    reference: Any,
    *,
    steps: int | None = None,
    render: bool = False,
    randomize: bool = False,
    seed: int = 0,
    start_phase: int = 0,
    terminate: bool = False,
    env_kwargs: dict[str, Any] | None = None,
) -> PolicyRollout:
    """Run a tracking policy on ``reference`` in :class:`Go2TrackingEnv`.

    Args:
        policy: a trained policy module with ``act(obs)`` and ``eval_env_kwargs`` (e.g. a
            :class:`~diffto.learning.ppo.PPO`), or a callable ``obs (39,) -> action (12,)``.
        reference: a ``ReferenceTrajectory``, a reference ``.npz`` path, a motion name
            (planned with the policy's training ``reference_duration`` where known), or
            ``None`` for the reference a PPO policy was trained on.
        steps: control steps (default: to the end of the reference).
        render: also return RGB frames (initial state and after every step), each with the
            reference pose of its phase drawn as a translucent ghost (``render_ghost_alpha``
            in ``env_kwargs``, 0 for none; see :meth:`Go2TrackingEnv.render`); if rendering
            is unavailable a warning is issued and ``images`` stays empty.
        randomize: draw the env's domain randomization (seeded by ``seed``).
        seed: reset seed. start_phase: reference phase to start from.
        terminate: keep the env's early-termination rules (the rollout may end early).
        env_kwargs: :class:`TrackingConfig` overrides; a PPO policy's own training env
            settings (gains, limits, ...) apply by default.

    Returns:
        a :class:`PolicyRollout`: ``qpos (T, 19)``, ``qvel (T, 18)``, ``grf (T, 12)``,
        ``images`` and ``clip_completed``, ``T ≤ steps+1``.
    """
    from diffto.tasks.go2.env import Go2TrackingEnv

    act, trained_kwargs = _load_policy(policy)
    # a PPO policy runs with the env settings it was trained with, unless overridden
    overrides = {**trained_kwargs, **(env_kwargs or {})}
    if reference is None:
        reference = overrides.get("reference", "trot")
    for key in _ENV_ARGUMENTS:
        overrides.pop(key, None)
    reference = resolve_reference(reference, overrides)
    if not terminate:
        overrides.update(_NO_TERMINATION)
    env = Go2TrackingEnv(
        reference=reference, randomize=randomize,
        render_mode="rgb_array" if render else None, **overrides,
    )
    try:
        steps = _check_steps(steps, start_phase, env.num_phases)
        feet = go2_model.foot_geom_ids(env.model)
        obs, _ = env.reset(seed=seed, options={"phase": start_phase})
        qpos, qvel, grf, images = [], [], [], []

        def record() -> None:
            qpos.append(env.data.qpos.copy())
            qvel.append(env.data.qvel.copy())
            grf.append(foot_contact_forces(env.model, env.data, feet))

        record()
        rendering = render and _safe_render(env.render, images)
        completed = False
        for _ in range(steps):
            action = np.asarray(act(obs), dtype=np.float32).reshape(-1)
            if action.shape != env.action_space.shape:
                raise ValueError(
                    f"policy must return an action of shape {env.action_space.shape}, "
                    f"got {action.shape}"
                )
            obs, _, terminated, truncated, info = env.step(action)
            completed = bool(info["clip_completed"])
            record()
            if rendering:
                rendering = _safe_render(env.render, images)
            if terminated or truncated:
                break
    finally:
        env.close()
    return PolicyRollout(np.asarray(qpos), np.asarray(qvel), np.asarray(grf), images, completed)


def inverse_dynamics_forces(reference: Any, model: mujoco.MjModel | None = None) -> np.ndarray:
    """Generalized forces ``(N, 18)`` that realize the reference motion under its GRF.

    For interval ``k``: state ``(q_k, v_k)`` from the reference, ``q̈_k = (v_{k+1} − v_k)/dt``
    (free-joint angular velocity in the body frame, as MuJoCo's ``qvel``), and MuJoCo's
    inverse dynamics with contacts disabled gives ``τ_all = M q̈ + c − τ_passive``. The ground
    is replaced by the reference forces: ``τ = τ_all − Σ_feet J_footᵀ f_foot`` (``J_foot`` the
    translational Jacobian at the foot sphere centre). ``τ[:, 6:]`` are the joint torques
    (joint order); ``τ[:, :6]`` is what the base would need beyond the GRF (unactuated: zero
    for a dynamically consistent reference, so it measures the reference's inconsistency).
    """
    model = go2_model.load_model() if model is None else model
    m = model
    flags_before = m.opt.disableflags
    m.opt.disableflags = flags_before | int(mujoco.mjtDisableBit.mjDSBL_CONTACT)
    try:
        data = mujoco.MjData(m)
        sites = go2_model.foot_site_ids(m)
        n, dt = int(reference.num_phases), float(reference.dt)
        jac = np.zeros((3, m.nv))
        tau = np.zeros((n, m.nv))
        for k in range(n):
            data.qpos[:] = reference.qpos(k)
            data.qvel[:] = reference.qvel(k)
            data.qacc[:] = (reference.qvel(k + 1) - reference.qvel(k)) / dt
            mujoco.mj_inverse(m, data)
            total = data.qfrc_inverse.copy()
            f = np.asarray(reference.get_grf(k)).reshape(4, 3)
            for foot, site in enumerate(sites):
                mujoco.mj_jacSite(m, data, jac, None, int(site))
                total -= jac.T @ f[foot]
            tau[k] = total
    finally:
        m.opt.disableflags = flags_before
    return tau


def execute_open_loop_rollout(
    reference: Any,
    *,
    steps: int | None = None,
    mode: Literal["inverse_dynamics", "feedforward"] = "inverse_dynamics",
    render: bool = False,
    start_phase: int = 0,
    width: int = 320,
    height: int = 240,
    camera: str = "track",
    ghost_alpha: float = 0.3,
) -> RolloutResult:
    """Play ``reference`` open loop: precomputed joint torques, no feedback (see module doc).

    Starts from the reference state at ``start_phase``; torques are clipped to the actuator
    limits (the motors' ``ctrlrange``) and held for each 20 ms interval at 1 kHz physics.
    Returns the same tuple as :func:`execute_policy_rollout`. Frames (``render=True``) show
    the reference knot of each row as a translucent ghost of opacity ``ghost_alpha`` (0: none),
    as :meth:`~diffto.tasks.go2.env.Go2TrackingEnv.render` does.
    """
    if mode not in ("inverse_dynamics", "feedforward"):
        raise ValueError(f"mode must be 'inverse_dynamics' or 'feedforward', got {mode!r}")
    if not 0.0 <= ghost_alpha <= 1.0:
        raise ValueError(f"ghost_alpha must lie in [0, 1], got {ghost_alpha!r}")
    reference = resolve_reference(reference)
    model = go2_model.load_model(timestep=0.001)
    n = int(reference.num_phases)
    steps = _check_steps(steps, start_phase, n)
    substeps = int(round(float(reference.dt) / model.opt.timestep))
    if mode == "inverse_dynamics":
        tau = inverse_dynamics_forces(reference, model)[:, 6:]
    else:
        tau = np.array([reference.get_feedforward_torque(k) for k in range(n)])
    a2j = go2_model.actuator_joint_order(model)  # joint driven by each actuator
    gear = model.actuator_gear[:, 0]
    data = mujoco.MjData(model)
    data.qpos[:] = reference.qpos(start_phase)
    data.qvel[:] = reference.qvel(start_phase)
    mujoco.mj_forward(model, data)
    feet = go2_model.foot_geom_ids(model)
    renderer = None
    images: list[np.ndarray] = []
    rendering = render
    if render:
        try:
            renderer = make_renderer(model, height, width)
        except Exception as err:
            warnings.warn(f"rendering unavailable, no video frames: {err}", RuntimeWarning,
                          stacklevel=2)
            rendering = False
    ghost = mujoco.MjData(model) if rendering and ghost_alpha > 0.0 else None

    def frame(knot: int) -> np.ndarray:
        assert renderer is not None
        renderer.update_scene(data, camera=camera)
        if ghost is not None:
            ghost.qpos[:] = reference.qpos(knot)
            mujoco.mj_kinematics(model, ghost)
            add_ghost(renderer.scene, model, ghost, (*GHOST_RGB, ghost_alpha))
        return renderer.render()

    qpos, qvel, grf = [data.qpos.copy()], [data.qvel.copy()], [
        foot_contact_forces(model, data, feet)
    ]
    if rendering:
        rendering = _safe_render(functools.partial(frame, start_phase), images)
    try:
        for k in range(start_phase, start_phase + steps):
            data.ctrl[:] = tau[k][a2j] / gear  # motors: force = gear · ctrl, ctrlrange clips
            mujoco.mj_step(model, data, nstep=substeps)
            qpos.append(data.qpos.copy())
            qvel.append(data.qvel.copy())
            grf.append(foot_contact_forces(model, data, feet))
            if rendering:
                rendering = _safe_render(functools.partial(frame, k + 1), images)
            if not np.all(np.isfinite(data.qpos)):
                warnings.warn("open-loop rollout diverged; stopping", RuntimeWarning,
                              stacklevel=2)
                break
    finally:
        if renderer is not None:
            renderer.close()
    return np.asarray(qpos), np.asarray(qvel), np.asarray(grf), images
