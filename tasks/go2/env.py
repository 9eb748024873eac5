"""OPT-Mimic residual tracking of a trajectory-optimized reference on the Go2, as a gymnasium env.

A 50 Hz policy adds a bounded residual ``a = action_limit · clip(action, -1, 1)`` to the
reference joint targets; a PD + feedforward law turns it into torques at 1 kHz in MuJoCo. Per
control step from phase ``p`` to ``p + 1``, in joint (qpos) order:

.. math::

    τ = s \\cdot \\operatorname{clip}\\big(K_p (q^\\text{ref}_{p+1} + a + o - q)
        + K_d (\\dot q^\\text{ref}_p - \\dot q) + τ^\\text{ff}_p,\\; \\pm τ_\\max\\big)

with ``s`` the randomized torque scale, ``o`` the randomized joint offset and ``τ_max`` the Go2's
actuator limits. The target is the knot the step should reach (``p + 1``); joint velocity and
feedforward torque belong to the interval ``p`` being simulated.

Substeps out of Python
    The law runs as MuJoCo actuators on the env's own model copy, so the 20 substeps are one
    ``mujoco.mj_step(model, data, nstep=20)`` call. Each motor becomes a general actuator,
    ``force = gain · ctrl + b1 · q + b2 · q̇`` clamped to ``forcerange``, with ``gain = s Kp``,
    ``b1 = -s Kp``, ``b2 = -s Kd``, ``forcerange = ±s τ_max`` and, held over the substeps,
    ``ctrl = q^ref_{p+1} + a + o + (Kd q̇^ref_p + τ^ff_p) / Kp``. So ``force = s (Kp (q^ref + a
    + o - q) + Kd (q̇^ref - q̇) + τ^ff)`` clamped to ``±s τ_max``, which for ``s > 0`` equals
    ``s · clip(·, ±τ_max)`` exactly: clipping at the scaled limit after scaling is clipping at
    the limit before scaling. Against a per-substep Python loop only float rounding differs
    (MuJoCo reads ``q``, ``q̇`` as the actuator length and velocity, gear 1).

Sensing
    The joint offset is an encoder calibration error: the robot reads ``q̃ = q - o``, and a PD
    law on the reading, ``Kp (q^ref + a - q̃)``, is the law above. The observation carries
    ``q̃``; rewards use the true state (privileged, as in OPT-Mimic).

Reward and termination (constants in :class:`TrackingConfig`)
    Five terms ``w_k exp(-e_k² / (2 σ_k²))``, weights summing to one: position
    ``‖p_base - p^ref_{p+1}‖``; orientation ``‖vec(q^ref⁻¹ ⊗ q)‖ = sin(θ/2)``; joint
    ``‖q - q^ref_{p+1}‖``; action rate ``‖Δa‖`` in rad (0 on the first step after a reset);
    max torque ``max_j |τ_j|`` of ``data.actuator_force`` (after clip and scale) at the last
    substep (the maximum over all 20 would need a Python loop). Termination: any
    ``e_k > 2.5 σ_k``, base below 5 cm, a foot's floor contact disagreeing with the reference
    contact of interval ``p`` outside ±3 steps of a reference transition (or of the clip's
    ends), or a MuJoCo state reset on NaN/Inf (``info["physics_diverged"]``). Truncation at the
    end of the clip.

Domain randomization (``randomize=True``; drawn at reset from the seeded ``np_random``)
    Ground friction ``μ ~ N(0.8, 0.25)`` clipped to [0.1, 1], set as the sliding friction of the
    floor and every robot geom, so every floor contact uses ``μ`` (the feet have contact
    priority and would otherwise impose their own 0.8). Restitution ``e ~ N(0, 0.25)`` clipped to
    [0, 1]: MuJoCo has no restitution coefficient, so ``e`` sets the damping ratio ``ζ`` of the
    contact spring at MuJoCo's default stiffness, ``solref = (-1/c², -2ζ/c)``, ``c = 0.02`` s,
    on the floor and robot geoms (derivation in :func:`restitution_to_damping_ratio`; ``e = 0``
    is the model's default contact exactly). Joint offsets ``o ~ N(0, 0.02)`` per joint; torque
    scale ``s ~ N(1, 0.1)``, one scalar clipped to [0.5, 1.5].
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from diffto.tasks.go2 import model as go2_model
from diffto.tasks.go2.reference_source import load_tracked_reference
from diffto.tasks.go2.tracking_config import (
    TrackingConfig,
    restitution_to_damping_ratio,
)
from diffto.tasks.rendering import (
    GHOST_RGB,
    RenderingUnavailableError,
    add_ghost,
    make_renderer,
)

__all__ = ["Go2TrackingEnv", "RenderingUnavailableError", "restitution_to_damping_ratio"]

ACTION_DIM = 12


class Go2TrackingEnv(gym.Env):
    """Residual tracking of a Go2 reference (OPT-Mimic), 50 Hz policy over 1 kHz MuJoCo physics.

    Args:
        reference: a ``ReferenceTrajectory``; a motion name planned (and cached) by
            ``plan_reference`` with ``config.reference_duration`` and
            ``config.planner_options``; a reference ``.npz``; or a folder of a user's raw
            ``state_traj.npy``, ``grf_traj.npy``, ``joint_vel_traj.npy`` (and optionally
            ``contact_sequence.npy``), read at ``config.control_dt`` (see
            :func:`~diffto.tasks.go2.reference_source.load_tracked_reference`).
        randomize: draw friction, restitution, joint offsets and torque scale at every reset.
        render_mode: ``None`` or ``"rgb_array"`` (frames show the reference as a translucent
            ghost beside the robot, ``config.render_ghost_alpha``; see :meth:`render`).
        config: base constants (defaults: :class:`TrackingConfig`).
        **overrides: :class:`TrackingConfig` fields to replace, e.g. ``kp=80.0``.

    Spaces:
        observation ``(39,) float32`` = body quaternion (4, w x y z) + joint positions as read
        with the offset ``q - o`` (12) + joint velocities (12) + phase encoding
        ``[cos, sin](2π p / N)`` (2) + base linear velocity (3) and angular velocity (3), both
        in the base frame (``config.observe_base_velocity``) + the reference base position at
        phase ``p`` minus the base position, in the base frame (3,
        ``config.observe_position_error``) + optionally the reference joint angles at the
        next knot minus the joint positions as read (12, ``config.observe_joint_error``);
        ``(30,)`` with none of these (OPT-Mimic's observation);
        action ``(12,) float32`` in ``[-1, 1]``, joint order.

    ``reset(seed=...)`` fully determines the initial phase and the randomization: phase 0
    with probability ``config.clip_start_share``, else uniform over the clip;
    ``reset(options={"phase": p})`` starts at phase ``p``. ``info`` at reset: ``phase``,
    ``friction``, ``restitution``, ``contact_damping_ratio``, ``joint_offset (12,)``,
    ``torque_scale``; per step: ``phase``, ``pos_error``, ``orient_error``, ``joint_error``,
    ``action_rate_error``, ``max_torque``, ``reward_<term>`` for the five terms, ``contact (4,)``,
    ``contact_mismatch (4,)``, ``physics_diverged``, ``clip_completed`` (the step reached
    the clip's end: ``truncated``, or ``terminated`` with ``config.terminal_at_clip_end``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        reference: Any = "trot",
        randomize: bool = True,
        render_mode: str | None = None,
        *,
        config: TrackingConfig | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        base = config if config is not None else TrackingConfig()
        if not isinstance(base, TrackingConfig):
            raise ValueError(f"config must be a TrackingConfig, got {type(base).__name__}")
        self.config = base.replace(**overrides) if overrides else base
        self.randomize = bool(randomize)
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": round(1.0 / self.config.control_dt)}
        self.reference = load_tracked_reference(reference, self.config)
        if abs(float(self.reference.dt) - self.config.control_dt) > 1e-9:
            raise ValueError(
                f"reference.dt ({self.reference.dt}) must equal config.control_dt "
                f"({self.config.control_dt}): one reference knot per policy step"
            )
        self.num_phases = int(self.reference.num_phases)

        self.model = go2_model.load_model(timestep=self.config.physics_dt)
        self.data = mujoco.MjData(self.model)
        self._a2j = go2_model.actuator_joint_order(self.model)  # (12,) joint index per actuator
        self._torque_limits = go2_model.torque_limits(self.model)  # (12,) joint order
        self._foot_geoms = go2_model.foot_geom_ids(self.model)  # (4,)
        self._floor_geom = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_GEOM, "floor")
        if self._floor_geom < 0:
            raise ValueError("the Go2 model has no geom named 'floor'")
        # (geom1, geom2) -> foot 0..3 for foot-floor pairs (faster than numpy for a few contacts)
        floor, feet = int(self._floor_geom), [int(g) for g in self._foot_geoms]
        self._foot_of_pair = {**{(floor, g): i for i, g in enumerate(feet)},
                              **{(g, floor): i for i, g in enumerate(feet)}}
        # Live views into MjData (its buffers are never reallocated).
        self._qpos, self._qvel = self.data.qpos, self.data.qvel
        self._actuator_force = self.data.actuator_force
        self._make_pd_actuators()
        self._tabulate_reference()

        # Quaternion and phase encoding lie in [-1, 1]; joint readings and velocities are unbounded.
        self.obs_dim = (30 + 6 * self.config.observe_base_velocity
                        + 3 * self.config.observe_position_error
                        + 12 * self.config.observe_joint_error)
        high = np.full(self.obs_dim, np.inf, dtype=np.float32)
        high[0:4] = high[28:30] = 1.0
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)

        c = self.config
        sigmas = (c.sigma_position, c.sigma_orientation, c.sigma_joint, c.sigma_action_rate,
                  c.sigma_torque)
        self._inv_two_sigma_sq = tuple(1.0 / (2.0 * sig * sig) for sig in sigmas)
        self._error_limits = tuple(c.termination_sigmas * sig for sig in sigmas)
        self._weights = (c.w_position, c.w_orientation, c.w_joint, c.w_action_rate, c.w_torque)
        self._substeps = c.substeps
        self._phase, self._needs_reset = 0, True
        self._prev_residual: np.ndarray | None = None
        self._renderer: mujoco.Renderer | None = None
        # The draws of the last reset (nominal values without randomization).
        self.friction = float(self.model.geom_friction[self._foot_geoms[0], 0])
        self.restitution, self.torque_scale, self._zeta = 0.0, 1.0, 1.0
        self.joint_offset = np.zeros(ACTION_DIM)

    # ------------------------------------------------------------------ set-up
    def _make_pd_actuators(self) -> None:
        """Turn the model's torque motors into PD + feedforward actuators (see module doc)."""
        m = self.model
        m.actuator_gaintype[:] = mujoco.mjtGain.mjGAIN_FIXED
        m.actuator_biastype[:] = mujoco.mjtBias.mjBIAS_AFFINE
        m.actuator_dyntype[:] = mujoco.mjtDyn.mjDYN_NONE
        m.actuator_ctrllimited[:] = 0  # ctrl carries a joint target plus a feedforward term
        m.actuator_forcelimited[:] = 1
        m.actuator_gainprm[:] = m.actuator_biasprm[:] = 0.0
        if not np.allclose(m.actuator_gear[:, 0], 1.0) or np.any(m.actuator_gear[:, 1:] != 0):
            raise ValueError("Go2TrackingEnv expects unit-gear joint actuators")
        self._set_torque_scale(1.0)

    def _set_torque_scale(self, scale: float) -> None:
        """Fold the torque scale ``s`` into gains, bias and force range (all actuators)."""
        m, c = self.model, self.config
        m.actuator_gainprm[:, 0] = scale * c.kp
        m.actuator_biasprm[:, 1] = -scale * c.kp
        m.actuator_biasprm[:, 2] = -scale * c.kd
        limits = scale * self._torque_limits[self._a2j]  # (12,) actuator order
        m.actuator_forcerange[:, 0], m.actuator_forcerange[:, 1] = -limits, limits

    def _tabulate_reference(self) -> None:
        """Reference arrays over phases, so a step only indexes (no accessor calls)."""
        ref, c, n = self.reference, self.config, self.num_phases

        def stack(name: str, phases: int, cols: int, dtype: type = np.float64) -> np.ndarray:
            arr = np.array([getattr(ref, name)(p) for p in range(phases)], dtype=dtype)
            if arr.shape != (phases, cols) or not np.all(np.isfinite(arr)):
                raise ValueError(f"reference.{name}(p) for p < {phases} must give finite "
                                 f"({cols},) arrays; stacked {arr.shape}")
            return arr

        self._ref_pos = stack("get_body_pos", n + 1, 3)  # (N+1, 3)
        self._ref_quat = stack("get_body_quat", n + 1, 4)  # (N+1, 4)
        self._ref_quat /= np.linalg.norm(self._ref_quat, axis=1, keepdims=True)
        self._ref_joint = stack("get_joint_pos", n + 1, 12)  # (N+1, 12)
        self._init_qpos = stack("qpos", n + 1, 19)  # (N+1, 19)
        self._init_qvel = stack("qvel", n + 1, 18)  # (N+1, 18)
        self._ref_pos[:, 2] += c.body_height_offset
        self._init_qpos[:, 2] += c.body_height_offset
        self._ref_pos_rows, self._ref_quat_rows = self._ref_pos.tolist(), self._ref_quat.tolist()
        self._phase_enc = stack("get_phase_encoding", n + 1, 2, np.float32)  # (N+1, 2)
        ref_dq = stack("get_joint_vel", n, 12)  # (N, 12)
        tau_ff = stack("get_feedforward_torque", n, 12)  # (N, 12)
        self._ref_contact = stack("get_contact_state", n, 4, bool)  # (N, 4)
        self._contact_grace = np.array(
            [[ref.is_near_contact_transition(p, f, c.contact_grace_steps) for f in range(4)]
             for p in range(n)],
            dtype=bool,
        )  # (N, 4)
        # The reference's window is clamped at the clip's ends, so it cannot see a foot lift off
        # at knot 0 or touch down at knot N, which periodic gaits do. Both ends get the grace of
        # a transition at k (intervals k-w..k+w-1) for every foot: else a clip tracked to its
        # end would "terminate" on its last step, and PPO would not bootstrap from it.
        if (w := c.contact_grace_steps) > 0:
            self._contact_grace[:w] = self._contact_grace[-w:] = True
        self._contact_checked = ~self._contact_grace  # (N, 4): feet whose contact must match
        # Actuator ctrl per interval before offset and residual, joint order (see module doc):
        # q^ref_{p+1} + (Kd q̇^ref_p + τ^ff_p) / Kp.
        vel_ff = c.kd * ref_dq if c.use_velocity_feedforward else 0.0
        ctrl_base = self._ref_joint[1:] + (vel_ff + tau_ff) / c.kp  # (N, 12)
        self._ctrl_base = ctrl_base[:, self._a2j]  # (N, 12) actuator order
        self._ctrl_table = self._ctrl_base.copy()  # plus the joint offset of the episode

    # ------------------------------------------------------------------ randomization
    def _randomize(self, rng: np.random.Generator) -> None:
        """Draw and apply friction, restitution, joint offsets and torque scale (one RNG call)."""
        c = self.config
        z = rng.standard_normal(3 + ACTION_DIM)  # friction, restitution, torque scale, offsets
        self.friction = _clip(c.friction_mean + c.friction_std * z[0], c.friction_range)
        self.restitution = _clip(c.restitution_mean + c.restitution_std * z[1],
                                 c.restitution_range)
        self.torque_scale = _clip(c.torque_scale_mean + c.torque_scale_std * z[2],
                                  c.torque_scale_range)
        self.joint_offset = c.joint_offset_std * z[3:]
        m = self.model
        m.geom_friction[:, 0] = self.friction
        self._zeta = zeta = restitution_to_damping_ratio(self.restitution)
        tc = c.contact_timeconst
        m.geom_solref[:, 0] = -1.0 / tc**2
        m.geom_solref[:, 1] = -2.0 * zeta / tc
        self._set_torque_scale(self.torque_scale)
        np.add(self._ctrl_base, self.joint_offset[self._a2j], out=self._ctrl_table)

    # ------------------------------------------------------------------ gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start at a reference state: a random phase in ``[0, N)`` or ``options["phase"]``."""
        super().reset(seed=seed)
        options = options or {}
        if set(options) - {"phase"}:
            raise ValueError(f"reset options may only contain 'phase', got {sorted(options)}")
        # both always drawn, so the RNG stream does not depend on the options
        drawn = int(self.np_random.integers(0, self.num_phases))
        if self.np_random.random() < self.config.clip_start_share:
            drawn = 0
        phase = options.get("phase", drawn)
        if not (isinstance(phase, int | np.integer) and 0 <= phase < self.num_phases):
            raise ValueError(f"options['phase'] must be an int in [0, {self.num_phases}), "
                             f"got {phase!r}")
        phase = int(phase)
        if self.randomize:
            self._randomize(self.np_random)
        d = self.data
        mujoco.mj_resetData(self.model, d)
        d.qpos[:], d.qvel[:] = self._init_qpos[phase], self._init_qvel[phase]
        d.ctrl[:] = self._ctrl_table[min(phase, self.num_phases - 1)]
        mujoco.mj_forward(self.model, d)
        self._phase = phase
        self._prev_residual = None
        self._needs_reset = False
        info = {
            "phase": phase, "friction": self.friction, "restitution": self.restitution,
            "contact_damping_ratio": self._zeta,
            "joint_offset": self.joint_offset.copy(), "torque_scale": self.torque_scale,
        }
        return self._observation(), info

    def step(
        self, action: np.ndarray
    ) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """One 50 Hz control step (20 physics substeps in one ``mj_step`` call)."""
        if self._needs_reset:
            raise RuntimeError("Go2TrackingEnv.step called before reset() or after an episode "
                               "ended; call reset() first")
        residual = self._residual(action)
        p = self._phase
        d = self.data
        self._set_controls(p, residual)
        t_end = d.time + self._substeps * self.config.physics_dt
        mujoco.mj_step(self.model, d, nstep=self._substeps)
        # MuJoCo resets the state (time 0) when it meets NaN/Inf or a huge acceleration.
        diverged = d.time < t_end - 0.5 * self.config.physics_dt
        p1 = p + 1
        self._phase = p1

        # Python floats rather than tiny numpy arrays: this block runs at every control step.
        qpos = self._qpos
        base = qpos[:7].tolist()  # position, quaternion as floats
        pos_err = math.dist(base[0:3], self._ref_pos_rows[p1])
        orient_err = _quat_error(base[3:7], self._ref_quat_rows[p1])
        dq = qpos[7:] - self._ref_joint[p1]
        joint_err = math.sqrt(dq @ dq)
        prev = self._prev_residual
        if prev is None:
            rate_err = 0.0
        else:
            da = residual - prev
            rate_err = math.sqrt(da @ da)
        force = self._actuator_force
        max_torque = max(float(force.max()), -float(force.min()))
        errors = (pos_err, orient_err, joint_err, rate_err, max_torque)
        terms = [math.exp(-e * e * k) for e, k in zip(errors, self._inv_two_sigma_sq, strict=True)]
        reward = sum(w * t for w, t in zip(self._weights, terms, strict=True))
        over = any(e > lim for e, lim in zip(errors, self._error_limits, strict=True))

        contact = self._foot_contacts()
        mismatch = (contact != self._ref_contact[p]) & self._contact_checked[p]
        failed = bool(
            over
            or base[2] < self.config.min_body_height
            or (self.config.terminate_on_contact_mismatch and mismatch.any())
            or diverged
        )
        clip_end = p1 >= self.num_phases
        terminated = failed or (clip_end and self.config.terminal_at_clip_end)
        truncated = clip_end and not self.config.terminal_at_clip_end
        self._needs_reset = terminated or truncated
        self._prev_residual = residual
        info = {
            "phase": p1, "pos_error": pos_err, "orient_error": orient_err,
            "joint_error": joint_err, "action_rate_error": rate_err, "max_torque": max_torque,
            "reward_position": terms[0], "reward_orientation": terms[1], "reward_joint": terms[2],
            "reward_action_rate": terms[3], "reward_torque": terms[4],
            "contact": contact, "contact_mismatch": mismatch, "physics_diverged": diverged,
            "clip_completed": clip_end and not failed,
        }
        return self._observation(), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """RGB frame ``(H, W, 3) uint8`` from the model's tracking camera.

        With ``config.render_ghost_alpha > 0`` the frame also shows the reference pose of the
        current phase, ``qpos^ref_p`` with ``config.body_height_offset`` (the pose the
        position, orientation and joint errors of the last step were measured against), as a
        translucent light-blue copy of the robot. The camera follows the robot, so the ghost's
        offset from the robot is the tracking error.

        Raises:
            RenderingUnavailableError: MuJoCo cannot create an offscreen GL context here
                (set ``MUJOCO_GL=osmesa`` before importing mujoco and install OSMesa).
            ValueError: ``config.render_camera`` names no camera, or
                ``config.render_ghost_alpha`` lies outside [0, 1].
        """
        if self.render_mode is None:
            gym.logger.warn("Go2TrackingEnv.render() called with render_mode=None; pass "
                            "render_mode='rgb_array' to the constructor")
            return None
        c = self.config
        alpha = c.render_ghost_alpha
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"config.render_ghost_alpha must lie in [0, 1], got {alpha!r}")
        if self._renderer is None:
            # The default capacity (10 000 geoms) holds the robot twice, with the ghost.
            self._renderer = make_renderer(self.model, c.render_height, c.render_width)
            self._ghost_data = mujoco.MjData(self.model)  # the reference pose, kinematics only
        try:
            self._renderer.update_scene(self.data, camera=c.render_camera)
        except Exception as err:
            raise ValueError(f"config.render_camera {c.render_camera!r}: {err}") from err
        if alpha > 0.0:
            ghost = self._ghost_data
            ghost.qpos[:] = self._init_qpos[self._phase]  # (19,), body height offset included
            mujoco.mj_kinematics(self.model, ghost)
            add_ghost(self._renderer.scene, self.model, ghost, (*GHOST_RGB, alpha))
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
            self._ghost_data = None
        super().close()

    # ------------------------------------------------------------------ inspection
    @property
    def phase(self) -> int:
        """Current reference phase ``p`` (the next action acts on interval ``p``)."""
        return self._phase

    @property
    def control_table(self) -> np.ndarray:
        """Actuator controls ``(N, 12)`` (actuator order) per interval for a zero residual.

        Includes the joint offset drawn at the last reset; ``step`` adds the residual to row
        ``phase``. A read-only view.
        """
        view = self._ctrl_table.view()
        view.setflags(write=False)
        return view

    def actuator_torques(self, action: np.ndarray) -> np.ndarray:
        """Joint torques ``(12,)`` (joint order) that ``action`` produces at the current state.

        Sets the actuator controls for the current phase and evaluates MuJoCo's forward
        dynamics without advancing time: the torque the first substep of :meth:`step` applies.
        """
        self._set_controls(min(self._phase, self.num_phases - 1), self._residual(action))
        mujoco.mj_forward(self.model, self.data)
        tau = np.empty(ACTION_DIM)
        tau[self._a2j] = self.data.actuator_force
        return tau

    # ------------------------------------------------------------------ helpers
    def _residual(self, action: np.ndarray) -> np.ndarray:
        """Validated action ``(12,)`` clipped to [-1, 1] and scaled to radians."""
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (ACTION_DIM,):
            raise ValueError(f"action must have shape ({ACTION_DIM},), got {a.shape}")
        if not math.isfinite(a.sum()) and not np.isfinite(a).all():  # one reduction usually
            raise ValueError(f"action contains NaN/Inf entries: {a}")
        return a.clip(-1.0, 1.0) * self.config.action_limit

    def _set_controls(self, phase: int, residual: np.ndarray) -> None:
        """Actuator controls for interval ``phase``: reference row plus residual (radians)."""
        self.data.ctrl[:] = self._ctrl_table[phase] + residual[self._a2j]

    def _foot_contacts(self) -> np.ndarray:
        """Which feet (FL, FR, RL, RR) touch the floor, ``(4,) bool``."""
        slots = np.zeros(5, dtype=bool)  # slot 4 collects every contact that is not foot-floor
        if self.data.ncon:
            lookup = self._foot_of_pair.get
            for g1, g2 in self.data.contact.geom.tolist():  # (ncon, 2) geom ids
                slots[lookup((g1, g2), 4)] = True
        return slots[:4]

    def _observation(self) -> np.ndarray:
        obs = np.empty(self.obs_dim, dtype=np.float32)
        obs[0:4] = self._qpos[3:7]
        obs[4:16] = self._qpos[7:] - self.joint_offset
        obs[16:28] = self._qvel[6:]
        obs[28:30] = self._phase_enc[self._phase]
        if self.obs_dim == 30:
            return obs
        # World vectors go into the base frame by the conjugate of the base quaternion.
        q = self._qpos[3:7]
        conj = np.array([q[0], -q[1], -q[2], -q[3]])
        v = np.empty(3)
        i = 30
        if self.config.observe_base_velocity:
            # Free joint: qvel[0:3] is the world-frame linear velocity; qvel[3:6] the angular
            # velocity, already in the base frame.
            mujoco.mju_rotVecQuat(v, self._qvel[0:3], conj)
            obs[i : i + 3] = v
            obs[i + 3 : i + 6] = self._qvel[3:6]
            i += 6
        if self.config.observe_position_error:
            mujoco.mju_rotVecQuat(v, self._ref_pos[self._phase] - self._qpos[0:3], conj)
            obs[i : i + 3] = v
            i += 3
        if self.config.observe_joint_error:
            # the clip's last knot at the end: its target row is the last one
            knot = min(self._phase + 1, self.num_phases)
            obs[i : i + 12] = self._ref_joint[knot] - (self._qpos[7:] - self.joint_offset)
        return obs


def _clip(value: float, bounds: tuple[float, float]) -> float:
    return min(max(float(value), bounds[0]), bounds[1])


def _quat_error(q: list[float], q_ref: list[float]) -> float:
    """``‖vec(q_ref⁻¹ ⊗ q)‖ = sin(θ/2)`` for the rotation angle ``θ`` between two unit quaternions.

    With ``q = (w, v)`` and ``q_ref⁻¹ = (w_r, -v_r)``, the vector part of the product is
    ``w_r v - w v_r - v_r × v``; its norm does not depend on either quaternion's sign.
    """
    w, x, y, z = q
    wr, xr, yr, zr = q_ref
    ex = wr * x - w * xr - (yr * z - zr * y)
    ey = wr * y - w * yr - (zr * x - xr * z)
    ez = wr * z - w * zr - (xr * y - yr * x)
    return math.sqrt(ex * ex + ey * ey + ez * ez)
