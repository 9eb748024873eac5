"""Reaching with the Franka Panda: a goal-conditioned gymnasium environment over MuJoCo.

Task
    Bring the flange (site ``attachment_site``) to a goal position within
    ``distance_threshold`` (2 cm). Goals are the flange positions of joint configurations drawn
    around ``home`` inside the joint limits, so every goal is reachable; initial states are
    drawn around ``home`` at rest. 100 control steps per episode (then ``truncated``).

Control
    An action ``a ∈ [−1, 1]⁷`` (clipped) is the joint torque ``τ = a ⊙ τ_max`` with the
    published limits ``τ_max = (87, 87, 87, 87, 12, 12, 12)`` Nm, held for ``substeps = 10``
    MuJoCo steps of 0.002 s (50 Hz control; one ``mj_step(model, data, nstep)`` call, the loop
    stays out of Python). With ``gravity_compensation=True`` (default) the physics adds the
    arm's gravity torques on top at every physics step, MuJoCo's body ``gravcomp``: the gravity
    part of ``qfrc_bias``, ``g(q)``, recomputed each 2 ms from the current ``q`` and applied as
    a passive force outside the motor limits, as the Panda's own controller does under
    libfranka's torque interface. A zero action then holds the arm where it is, up to damping
    and an unknown payload. With ``False`` the action alone fights gravity (the 12 Nm wrist
    motors can hold the arm at ``home``; the 87 Nm ones need about 25 Nm of it).

Goal-env API (gymnasium-robotics' ``GoalEnv``, duck-typed: gymnasium 1.x has no such class)
    Observations are dicts: ``observation (14,)`` = ``[qpos (7); qvel (7)]``,
    ``achieved_goal (3,)`` = flange position, ``desired_goal (3,)`` = goal (world frame,
    metres, float64). ``compute_reward``, ``compute_terminated`` and ``compute_truncated``
    take batches ``(..., 3)`` of achieved and desired goals (for hindsight relabelling) and
    agree with what ``step`` returns. Rewards: ``"sparse"``: 0 within the threshold, else −1;
    ``"dense"``: minus the distance in metres.

Model mismatch (for robustness studies; each argument a fixed value or a ``(low, high)``
range drawn uniformly at every reset from the seeded ``np_random``)
    * ``payload_mass`` (kg, ``>= 0``): a sphere at the flange that gravity compensation does not
      know about (an unmodelled tool or object; Franka's hand weighs about 0.73 kg).
    * ``frictionloss`` (Nm, ``>= 0``): MuJoCo's dry joint friction ``dof_frictionloss``, drawn
      independently per joint (Coulomb friction up to that torque opposes motion).
    * ``actuator_gain`` (``> 0``): multiplier of each motor's gain ``actuator_gainprm[:, 0]``,
      drawn independently per joint: the delivered torque is ``clip(s τ, ±τ_max)``.
    The defaults (0, 0, 1) are the nominal model. :meth:`PandaReachEnv.nominal_model` returns
    it (same gravity compensation and timestep), e.g. for ``MujocoDynamics`` in an MPC;
    ``env.unwrapped.model`` is the env's own copy with the mismatch of the current episode.

Safety (constraint violations and an optional safety filter)
    Every step counts which constraint classes the new state violates, against a
    :class:`~diffto.tasks.panda.safety_filter.PandaConstraintSet` (``safety_constraints``, a
    dict of its options; by default joint positions 0.05 rad inside the joint ranges, Franka's
    published joint velocity limits, and a flange workspace box around the goal region):
    ``info["violations"]`` is an int from 0 to 3 (joint position, joint velocity, workspace),
    checked at the control steps. ``safety_filter=True`` (or a dict of
    :class:`~diffto.tasks.panda.safety_filter.PandaSafetyFilter` options) passes every action
    through a safety filter first: the closest action keeping discrete-time CBF conditions of
    that set over the next step, predicted with the nominal model (it does not know the
    episode's mismatch). ``info["filtered"]`` says whether it changed the (clipped) action,
    ``info["action_correction"]`` by how much (Euclidean norm, action units),
    ``info["filter_infeasible"]`` whether it found no action keeping every condition and used
    the one with the smallest shortfall. The filter costs about 1 ms per step where it changes
    the action and one nominal MuJoCo step where it does not. With the filter off (default)
    the dynamics are unchanged, ``filtered`` is ``False`` and ``action_correction`` 0; the
    constraint set is the same either way, so violations compare.

Rendering
    ``render_mode="rgb_array"`` renders the fixed camera ``"overview"`` with the goal as a red
    sphere. MuJoCo picks its GL back-end when first imported (``MUJOCO_GL``; ``osmesa`` or
    ``egl`` on a machine without display, set before anything imports mujoco). Where no
    offscreen context can be made, ``render()`` raises :class:`RenderingUnavailableError`;
    stepping never depends on rendering.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from diffto.tasks.panda._checks import is_number, nonneg, positive
from diffto.tasks.panda.model import (
    FLANGE_SITE,
    HOME,
    JOINT_LOWER,
    JOINT_UPPER,
    PAYLOAD_BODY,
    TIMESTEP,
    TORQUE_LIMITS,
    load_model,
    set_payload,
)
from diffto.tasks.panda.safety_filter import PandaConstraintSet, PandaSafetyFilter
from diffto.tasks.rendering import RenderingUnavailableError, make_renderer

__all__ = ["PandaReachEnv", "RenderingUnavailableError", "goal_distance"]

_JOINT_MARGIN = 0.05  # rad kept from every joint limit when sampling configurations
_GOAL_TRIES = 1000
_MAX_WIDTH, _MAX_HEIGHT = 1280, 720  # the model's <global offwidth offheight>


def goal_distance(achieved_goal: np.ndarray, desired_goal: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(...)`` between goal batches ``(..., 3)``."""
    a, d = np.asarray(achieved_goal, dtype=np.float64), np.asarray(desired_goal, dtype=np.float64)
    if a.shape[-1:] != (3,) or d.shape[-1:] != (3,):
        raise ValueError(
            f"achieved_goal and desired_goal must have shape (..., 3), got {a.shape} and {d.shape}"
        )
    return np.linalg.norm(a - d, axis=-1)


def _range(name: str, value: Any, *, positive: bool = False) -> tuple[float, float]:
    """A fixed value or a ``(low, high)`` range as ``(low, high)``, validated."""
    lo_hi = (value, value) if is_number(value) else value
    if not (
        isinstance(lo_hi, Sequence)
        and len(lo_hi) == 2
        and all(is_number(v) and math.isfinite(v) for v in lo_hi)
    ):
        raise ValueError(f"{name} must be a finite float or a (low, high) pair, got {value!r}")
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    if lo > hi:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    if (positive and lo <= 0) or lo < 0:
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return lo, hi


class PandaReachEnv(gym.Env):
    """Torque-controlled Panda reaching a flange position, 50 Hz over 500 Hz MuJoCo physics.

    Args:
        reward_type: ``"sparse"`` (0 at success, −1 otherwise) or ``"dense"`` (−distance, m).
        render_mode: ``None`` or ``"rgb_array"``.
        gravity_compensation: add the arm's gravity torques inside the physics (see the module
            docstring); ``False``: the action is the whole joint torque.
        distance_threshold: success radius in metres (2 cm).
        max_episode_steps: control steps per episode before ``truncated`` (100).
        substeps: physics steps of 0.002 s per control step (10: 50 Hz).
        goal_joint_range: half-width (rad) of the box around ``home`` (clipped to the joint
            limits less 0.05 rad) from which goal configurations are drawn.
        init_joint_range: the same for initial configurations (initial velocity zero).
        min_goal_distance: a goal is redrawn while it is closer than this to the initial
            flange position (m), so an episode does not start solved.
        min_goal_height: a goal is redrawn while below this height above the floor (m).
        terminate_on_success: end the episode (``terminated``) at the first success; by
            default, as gymnasium-robotics' reach tasks, the goal is to be held until truncation.
        payload_mass: kg, value or ``(low, high)``; see the module docstring.
        frictionloss: Nm, value or ``(low, high)``, per joint.
        actuator_gain: torque multiplier, value or ``(low, high)``, per joint.
        safety_filter: ``None`` or ``False`` (off), ``True`` (on, default options) or a dict of
            :class:`~diffto.tasks.panda.safety_filter.PandaSafetyFilter` options (on).
        safety_constraints: ``None`` (defaults) or a dict of
            :class:`~diffto.tasks.panda.safety_filter.PandaConstraintSet` options: the set whose
            violations are counted and which the filter enforces.
        width, height: rendered frame size in pixels.

    ``info`` from ``reset`` and ``step``: ``is_success`` (bool), ``distance`` (m),
    ``elapsed_steps``, ``violations`` (int), ``filtered`` (bool), ``action_correction``
    (float), ``filter_infeasible`` (bool) (see the module docstring), and from ``reset`` also
    ``goal_qpos (7,)`` (a configuration whose flange is at the goal), ``payload_mass``,
    ``frictionloss (7,)``, ``actuator_gain (7,)``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        reward_type: Literal["sparse", "dense"] = "sparse",
        render_mode: Literal["rgb_array"] | None = None,
        *,
        gravity_compensation: bool = True,
        distance_threshold: float = 0.02,
        max_episode_steps: int = 100,
        substeps: int = 10,
        goal_joint_range: float = 0.5,
        init_joint_range: float = 0.1,
        min_goal_distance: float = 0.05,
        min_goal_height: float = 0.1,
        terminate_on_success: bool = False,
        payload_mass: float | tuple[float, float] = 0.0,
        frictionloss: float | tuple[float, float] = 0.0,
        actuator_gain: float | tuple[float, float] = 1.0,
        safety_filter: bool | Mapping[str, Any] | None = None,
        safety_constraints: Mapping[str, Any] | None = None,
        width: int = 480,
        height: int = 480,
    ) -> None:
        if reward_type not in ("sparse", "dense"):
            raise ValueError(f"reward_type must be 'sparse' or 'dense', got {reward_type!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        for name, flag in (
            ("gravity_compensation", gravity_compensation),
            ("terminate_on_success", terminate_on_success),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        self.reward_type = reward_type
        self.render_mode = render_mode
        self.gravity_compensation = gravity_compensation
        self.terminate_on_success = terminate_on_success
        self.distance_threshold = positive("distance_threshold", distance_threshold)
        self.max_episode_steps = positive("max_episode_steps", max_episode_steps, integer=True)
        self.substeps = positive("substeps", substeps, integer=True)
        self.goal_joint_range = positive("goal_joint_range", goal_joint_range)
        self.init_joint_range = nonneg("init_joint_range", init_joint_range)
        self.min_goal_distance = nonneg("min_goal_distance", min_goal_distance)
        if not is_number(min_goal_height) or not math.isfinite(min_goal_height):
            raise ValueError(f"min_goal_height must be a finite float, got {min_goal_height!r}")
        self.min_goal_height = float(min_goal_height)
        self.payload_mass_range = _range("payload_mass", payload_mass)
        self.frictionloss_range = _range("frictionloss", frictionloss)
        self.actuator_gain_range = _range("actuator_gain", actuator_gain, positive=True)
        self.safety_constraints = PandaConstraintSet.from_options(safety_constraints)
        if safety_filter is not None and not isinstance(safety_filter, bool | Mapping):
            raise ValueError(
                f"safety_filter must be None, a bool or a dict of filter options, got "
                f"{safety_filter!r}"
            )
        self.width = positive("width", width, integer=True)
        self.height = positive("height", height, integer=True)
        if self.width > _MAX_WIDTH or self.height > _MAX_HEIGHT:
            raise ValueError(
                f"width and height must be at most {_MAX_WIDTH} x {_MAX_HEIGHT} (the model's "
                f"offscreen buffer), got {width} x {height}"
            )

        self.model = load_model(TIMESTEP, gravity_compensation=gravity_compensation)
        self.data = mujoco.MjData(self.model)
        self._scratch = mujoco.MjData(self.model)  # goal FK without touching the episode state
        self._site = self.model.site(FLANGE_SITE).id
        self._goal_site = self.model.site("goal").id
        self._payload = self.model.body(PAYLOAD_BODY).id
        self._nominal_gain = self.model.actuator_gainprm[:, 0].copy()
        self.control_dt = self.substeps * float(self.model.opt.timestep)
        self.safety_filter: PandaSafetyFilter | None = None
        if safety_filter is not None and safety_filter is not False:
            options = {} if safety_filter is True else safety_filter
            self.safety_filter = PandaSafetyFilter.from_options(
                self.nominal_model(), self.substeps, self.safety_constraints, options
            )
        self.metadata = {**self.metadata, "render_fps": round(1.0 / self.control_dt)}
        # Sampling boxes around home, inside the joint limits with a margin.
        self._q_lo = JOINT_LOWER + _JOINT_MARGIN
        self._q_hi = JOINT_UPPER - _JOINT_MARGIN

        inf = np.inf
        self.observation_space = spaces.Dict(
            {
                "observation": spaces.Box(-inf, inf, (14,), np.float64),
                "achieved_goal": spaces.Box(-inf, inf, (3,), np.float64),
                "desired_goal": spaces.Box(-inf, inf, (3,), np.float64),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (7,), np.float32)
        self.goal = np.array(self.model.site_pos[self._goal_site])
        self.goal_qpos = HOME.copy()
        self._elapsed = 0
        self._renderer: mujoco.Renderer | None = None
        mujoco.mj_resetDataKeyframe(self.model, self.data, 0)
        mujoco.mj_kinematics(self.model, self.data)

    # ------------------------------------------------------------------ goal-env API
    def compute_reward(
        self, achieved_goal: np.ndarray, desired_goal: np.ndarray, info: Any = None
    ) -> np.ndarray:
        """Rewards ``(...)`` for goal batches ``(..., 3)``; ``info`` is not used."""
        d = goal_distance(achieved_goal, desired_goal)
        if self.reward_type == "sparse":
            return -(d > self.distance_threshold).astype(np.float64)
        return -d

    def compute_terminated(
        self, achieved_goal: np.ndarray, desired_goal: np.ndarray, info: Any = None
    ) -> np.ndarray:
        """``(...)`` bool: success when ``terminate_on_success``, else all ``False``."""
        d = goal_distance(achieved_goal, desired_goal)
        if self.terminate_on_success:
            return d <= self.distance_threshold
        return np.zeros(d.shape, dtype=bool)

    def compute_truncated(
        self, achieved_goal: np.ndarray, desired_goal: np.ndarray, info: Any = None
    ) -> np.ndarray:
        """``(...)`` bool: the episode reached ``max_episode_steps``, read from
        ``info["elapsed_steps"]`` (a step's info dict, or a sequence of them for a batch);
        goals do not enter. Without ``info``: the env's own step count."""
        shape = goal_distance(achieved_goal, desired_goal).shape
        if info is None:
            elapsed = np.asarray(self._elapsed)
        elif isinstance(info, Mapping):
            elapsed = np.asarray(info["elapsed_steps"])
        else:
            elapsed = np.asarray([i["elapsed_steps"] for i in np.ravel(info)]).reshape(shape)
        return np.broadcast_to(elapsed >= self.max_episode_steps, shape).copy()

    # ------------------------------------------------------------------ gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Draw the mismatch, an initial configuration at rest and a goal, in that order."""
        super().reset(seed=seed)
        rng = self.np_random
        payload = float(rng.uniform(*self.payload_mass_range))
        friction = rng.uniform(*self.frictionloss_range, size=7)
        gain = rng.uniform(*self.actuator_gain_range, size=7)
        if payload != self.model.body_mass[self._payload]:
            set_payload(self.model, payload)
        self.model.dof_frictionloss[:] = friction
        self.model.actuator_gainprm[:, 0] = self._nominal_gain * gain

        q0 = self._sample_configuration(self.init_joint_range)
        start = self._flange_at(q0)
        for _ in range(_GOAL_TRIES):
            q_goal = self._sample_configuration(self.goal_joint_range)
            goal = self._flange_at(q_goal)
            if goal[2] >= self.min_goal_height and np.linalg.norm(goal - start) >= (
                self.min_goal_distance
            ):
                break
        else:
            raise RuntimeError(
                f"no goal found in {_GOAL_TRIES} draws with min_goal_distance="
                f"{self.min_goal_distance} and min_goal_height={self.min_goal_height} inside "
                f"goal_joint_range={self.goal_joint_range}: loosen them"
            )
        self.goal, self.goal_qpos = goal, q_goal
        self.model.site_pos[self._goal_site] = goal  # shown by render(); no physical effect
        mujoco.mj_resetDataKeyframe(self.model, self.data, 0)
        self.data.qpos[:] = q0
        mujoco.mj_forward(self.model, self.data)
        self._elapsed = 0
        obs = self._observation()
        info = self._info(obs)
        info.update(
            goal_qpos=q_goal.copy(), payload_mass=payload, frictionloss=friction, actuator_gain=gain
        )
        return obs, info

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (7,):
            raise ValueError(f"action must have shape (7,), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"action must be finite, got {a}")
        a = np.clip(a, -1.0, 1.0)
        filtered, correction, infeasible = False, 0.0, False
        if self.safety_filter is not None:
            result = self.safety_filter(self.state, a)
            a, filtered, correction = result.action, result.filtered, result.correction
            infeasible = not result.feasible
        self.data.ctrl[:] = a * TORQUE_LIMITS
        mujoco.mj_step(self.model, self.data, nstep=self.substeps)
        # mj_step leaves positions-derived quantities at the start of its last substep.
        mujoco.mj_kinematics(self.model, self.data)
        self._elapsed += 1
        obs = self._observation()
        info = self._info(obs)
        info.update(filtered=filtered, action_correction=correction, filter_infeasible=infeasible)
        achieved, desired = obs["achieved_goal"], obs["desired_goal"]
        reward = float(self.compute_reward(achieved, desired, info))
        terminated = bool(self.compute_terminated(achieved, desired, info))
        truncated = bool(self.compute_truncated(achieved, desired, info))
        return obs, reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """RGB frame ``(height, width, 3) uint8`` from the camera ``"overview"``.

        Raises:
            RenderingUnavailableError: MuJoCo cannot create an offscreen GL context here.
        """
        if self.render_mode is None:
            gym.logger.warn(
                "PandaReachEnv.render() called with render_mode=None; pass "
                "render_mode='rgb_array' to the constructor"
            )
            return None
        if self._renderer is None:
            self._renderer = make_renderer(self.model, self.height, self.width)
        self._renderer.update_scene(self.data, camera="overview")
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        super().close()

    # ------------------------------------------------------------------ helpers for control
    def nominal_model(self) -> mujoco.MjModel:
        """A fresh Panda model without mismatch (payload 0, frictionloss 0, gain 1), with this
        env's gravity compensation and timestep: the model a controller would be given."""
        return load_model(TIMESTEP, gravity_compensation=self.gravity_compensation)

    @property
    def state(self) -> np.ndarray:
        """Physics state ``x = [qpos; qvel] (14,)``, the state of ``MujocoDynamics`` (a copy)."""
        return np.concatenate([self.data.qpos, self.data.qvel])

    @staticmethod
    def torque_to_action(tau: np.ndarray) -> np.ndarray:
        """Action ``(..., 7)`` that commands the joint torque ``tau (..., 7)`` (Nm); outside
        ``[−1, 1]`` where ``tau`` exceeds the limits (``step`` clips)."""
        return np.asarray(tau, dtype=np.float64) / TORQUE_LIMITS

    # ------------------------------------------------------------------ internals
    def _sample_configuration(self, half_width: float) -> np.ndarray:
        q = HOME + self.np_random.uniform(-half_width, half_width, size=7)
        return np.clip(q, self._q_lo, self._q_hi)

    def _flange_at(self, qpos: np.ndarray) -> np.ndarray:
        self._scratch.qpos[:] = qpos
        mujoco.mj_kinematics(self.model, self._scratch)
        return self._scratch.site_xpos[self._site].copy()

    def _observation(self) -> dict[str, np.ndarray]:
        return {
            "observation": np.concatenate([self.data.qpos, self.data.qvel]),
            "achieved_goal": self.data.site_xpos[self._site].copy(),
            "desired_goal": self.goal.copy(),
        }

    def _info(self, obs: dict[str, np.ndarray]) -> dict[str, Any]:
        distance = float(goal_distance(obs["achieved_goal"], obs["desired_goal"]))
        violations = self.safety_constraints.violations(
            self.data.qpos, self.data.qvel, obs["achieved_goal"]
        )
        return {
            "is_success": distance <= self.distance_threshold,
            "distance": distance,
            "elapsed_steps": self._elapsed,
            "violations": violations,
            "filtered": False,
            "action_correction": 0.0,
            "filter_infeasible": False,
        }


