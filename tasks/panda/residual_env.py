"""Residual reaching with the Panda: the action corrects a model-based base controller.

``diffto/PandaResidualReach-v0`` is ``diffto/PandaReach-v0`` (:class:`PandaReachEnv`, same
episodes for the same seed, same dict observations, rewards and goal-env API) whose action is a
residual ``r ∈ [−1, 1]⁷`` on top of :class:`PandaBaseController`, an operational-space
controller on the nominal model. At every step, from the current state ``s = [q; q̇]`` and goal
``g`` ::

    a_base = π_base(s, g) ∈ [−1, 1]⁷
    a      = clip(a_base + ρ · clip(r, −1, 1), −1, 1)     (ρ = residual_scale)

and ``a`` is applied to the wrapped reach env (torque ``a ⊙ τ_max``). A zero residual is the
base controller exactly, so a residual policy that starts at zero starts at the base's
success, and ``ρ`` bounds how far it may move the command: ``ρ τ_max`` per joint (17 Nm on
joints 1–4 and 2.4 Nm on joints 5–7 at ρ = 0.2). The base does not see the env's model
mismatch (``payload_mass``, ``frictionloss``, ``actuator_gain``), which is what the residual
is for.

How large ``ρ`` must be (``benchmarks/bench_panda_base.py``, 50 held-out goals, 50-step
episodes, ``payload_mass=(1, 3)``, ``frictionloss=(0.5, 2)``, ``actuator_gain=(0.7, 1)``, where
the base alone holds 0.24 of the goals at the last step): a residual that knows each episode's
payload and gains, cancels them and is clipped to ``[−1, 1]`` holds 0.90 of the goals at
``ρ = 0.1`` (a third of its entries clipped), 1.00 at ``ρ = 0.2`` (the default; 5 mm final
distance, the friction's share) and 1.00 at ``ρ = 0.3``. The payload's gravity alone needs up
to a quarter of a joint's torque range at the goals.

A memoryless residual cannot be exact both on the nominal arm and under an unknown payload: at
the goal it sees the same state in both, so whatever it adds there for the payload's weight
moves the nominal arm off the goal (the base's task-space stiffness turns a torque bias into a
position offset, about 1 cm here). ``observe_error_integral`` gives it the missing memory, the
integral action of a PI controller: the observation gains

    e_int ← clip(e_int + Δt · (g − p) / (0.01 m·s), −10, 10)   while ‖g − p‖ < 5 cm,

reset to 0 with the episode (``p`` the flange after the step, integrated only near the goal, so
the approach, the same on every arm, does not wind it up). It stays near 0 where the base
alone is exact and grows while a payload holds the flange off the goal. Measured with
``panda_residual_mpc.yaml`` (3 seeds, README): the mismatch figure rises on average within the
seeds' spread, and the nominal offset of 8-9 mm stays, so memory is not what it lacks.

``residual_gate = d₀`` (metres) fades the residual out at the goal instead, so that it cannot
hold an arm off the goal where the base alone is exact:

    a = clip(a_base + ρ · min(1, (d / d₀)²) · clip(r, −1, 1), −1, 1),   d = ‖g − p‖,

with ``p`` the flange before the step. Why the square: near the goal the base's pull grows as
``d`` (its task-space stiffness), and a residual weighted by ``d / d₀`` grows as fast, so a
residual that learned a lift for the payload can still balance the base a few millimetres off
the goal (measured: 5 mm on the nominal arm, against 8 mm ungated); weighted by ``(d / d₀)²``
it vanishes faster than the pull, and the goal stays the nominal arm's rest point as long as
the residual's push at ``d₀`` is weaker than the base's pull there (a constant residual of 0.1
on every joint: 0.02 mm from the goal gated, 7.8 mm ungated; one of 0.3 holds the arm 16 mm
off either way, outside ``d₀`` where the gate is open). Under a payload the flange settles
where the base's pull and the gated residual together carry the load. ``d`` is the distance of
the observation the residual was computed from. Measured with ``panda_residual_mpc.yaml`` and
``d₀ = 1 cm`` (3 seeds, README): the nominal offset falls to 4, 8 and 4 mm from 8, 11 and 9,
with the mismatch figure unchanged; within the training radius the sparse reward asks for no
more.

``step``'s ``info`` adds ``base_action (7,)``, ``residual_action (7,)`` (the residual after
clipping to ``[−1, 1]``), ``residual_gate`` (``min(1, (d / d₀)²)``, 1 without a gate) and
``action (7,)`` (what the reach env received, before its safety filter where one is on) to the
reach env's own (``is_success``, ``distance``, ...).
``compute_reward``, ``compute_terminated``, ``compute_truncated``, ``render``,
``max_episode_steps``, ``state``, ``nominal_model`` and the episode's ``goal`` are the reach
env's.
"""

from __future__ import annotations

import inspect
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from diffto.tasks.panda._checks import positive
from diffto.tasks.panda.base_controller import PandaBaseController
from diffto.tasks.panda.reach_env import PandaReachEnv

__all__ = ["PandaResidualReachEnv"]

_BASE_ARGS = tuple(inspect.signature(PandaBaseController).parameters)
# the error integral (module docstring): integrated within this distance of the goal (m), in
# units of 1 cm for 1 s, clipped (anti-windup)
_INTEGRAL_RADIUS = 0.05
_INTEGRAL_UNIT = 0.01
_INTEGRAL_CLIP = 10.0


class PandaResidualReachEnv(gym.Env):
    """:class:`PandaReachEnv` with residual actions on :class:`PandaBaseController`.

    Args:
        reward_type, render_mode: as :class:`PandaReachEnv`.
        residual_scale: ``ρ > 0``, the weight of the residual in the action (module docstring).
        base: keyword arguments of :class:`PandaBaseController` (gains, posture, ...); its
            ``gravity_compensation`` is the env's and may not be given otherwise.
        observe_error_integral: append the flange error's integral ``e_int (3,)`` (module
            docstring) to ``observation``, which then has 17 entries.
        residual_gate: ``d₀ > 0`` (m) of the gated residual (module docstring); ``None``:
            the residual acts with its full weight everywhere.
        **kwargs: every other argument of :class:`PandaReachEnv` (``max_episode_steps``,
            ``payload_mass``, ``frictionloss``, ``actuator_gain``, ...).

    The wrapped reach env is :attr:`reach`; the base controller :attr:`base_controller`.
    """

    metadata = dict(PandaReachEnv.metadata)

    def __init__(
        self,
        reward_type: str = "sparse",
        render_mode: str | None = None,
        *,
        residual_scale: float = 0.2,
        base: dict[str, Any] | None = None,
        observe_error_integral: bool = False,
        residual_gate: float | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(observe_error_integral, bool):
            raise ValueError(f"observe_error_integral must be a bool, got "
                             f"{observe_error_integral!r}")
        residual_scale = positive("residual_scale", residual_scale)
        if residual_gate is not None:
            residual_gate = positive("residual_gate", residual_gate)
        if base is not None and not isinstance(base, dict):
            raise ValueError(f"base must be a dict of PandaBaseController arguments or None, got "
                             f"{type(base).__name__}")
        base = dict(base or {})
        unknown = sorted(set(base) - set(_BASE_ARGS))
        if unknown:
            raise ValueError(f"base has unknown keys {unknown}: PandaBaseController takes "
                             f"{list(_BASE_ARGS)}")
        self.reach = PandaReachEnv(reward_type, render_mode, **kwargs)
        gravity = self.reach.gravity_compensation
        if base.get("gravity_compensation", gravity) != gravity:
            raise ValueError(f"base['gravity_compensation'] must match the env's "
                             f"gravity_compensation={gravity}, got "
                             f"{base['gravity_compensation']!r}")
        base["gravity_compensation"] = gravity
        self.base_controller = PandaBaseController(**base)
        self.residual_scale = float(residual_scale)
        self.residual_gate = residual_gate
        self._distance = np.inf  # flange to goal at the current state (m)
        self.render_mode = self.reach.render_mode
        self.metadata = dict(self.reach.metadata)
        self.observe_error_integral = observe_error_integral
        self._error_integral = np.zeros(3)
        self.observation_space = self.reach.observation_space
        if observe_error_integral:
            inner = self.reach.observation_space["observation"]
            n = inner.shape[0] + 3
            self.observation_space = spaces.Dict({
                **self.reach.observation_space.spaces,
                "observation": spaces.Box(-np.inf, np.inf, (n,), np.float64)})
        self.action_space = spaces.Box(-1.0, 1.0, (7,), np.float32)

    # ------------------------------------------------------------------ the reach env's
    @property
    def max_episode_steps(self) -> int:
        return self.reach.max_episode_steps

    @property
    def distance_threshold(self) -> float:
        return self.reach.distance_threshold

    @property
    def reward_type(self) -> str:
        return self.reach.reward_type

    @property
    def gravity_compensation(self) -> bool:
        return self.reach.gravity_compensation

    @property
    def control_dt(self) -> float:
        return self.reach.control_dt

    @property
    def goal(self) -> np.ndarray:
        """The episode's goal (3,) (m)."""
        return self.reach.goal

    @property
    def state(self) -> np.ndarray:
        """Physics state ``[qpos; qvel] (14,)`` (a copy)."""
        return self.reach.state

    @property
    def model(self) -> mujoco.MjModel:
        """The reach env's model, with the current episode's mismatch."""
        return self.reach.model

    @property
    def data(self) -> mujoco.MjData:
        return self.reach.data

    def nominal_model(self) -> mujoco.MjModel:
        return self.reach.nominal_model()

    def compute_reward(self, achieved_goal, desired_goal, info=None) -> np.ndarray:
        return self.reach.compute_reward(achieved_goal, desired_goal, info)

    def compute_terminated(self, achieved_goal, desired_goal, info=None) -> np.ndarray:
        return self.reach.compute_terminated(achieved_goal, desired_goal, info)

    def compute_truncated(self, achieved_goal, desired_goal, info=None) -> np.ndarray:
        return self.reach.compute_truncated(achieved_goal, desired_goal, info)

    # ------------------------------------------------------------------ gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The reach env's reset: the same mismatch, initial state and goal for a seed."""
        super().reset(seed=seed)
        obs, info = self.reach.reset(seed=seed, options=options)
        self._error_integral = np.zeros(3)
        self._distance = float(np.linalg.norm(obs["desired_goal"] - obs["achieved_goal"]))
        return self._observe(obs), info

    @property
    def error_integral(self) -> np.ndarray:
        """``e_int (3,)`` of the module docstring (a copy; zeros unless observed)."""
        return self._error_integral.copy()

    def _observe(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.observe_error_integral:
            return obs
        return {**obs, "observation": np.concatenate([obs["observation"],
                                                      self._error_integral])}

    def _integrate(self, obs: dict[str, np.ndarray]) -> None:
        error = obs["desired_goal"] - obs["achieved_goal"]
        if np.linalg.norm(error) < _INTEGRAL_RADIUS:
            self._error_integral = np.clip(
                self._error_integral + self.control_dt * error / _INTEGRAL_UNIT,
                -_INTEGRAL_CLIP, _INTEGRAL_CLIP)

    def base_action(self) -> np.ndarray:
        """The base controller's action ``(7,)`` at the current state and goal."""
        return self.base_controller(self.reach.state, self.reach.goal)

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        r = np.asarray(action, dtype=np.float64)
        if r.shape != (7,):
            raise ValueError(f"action (the residual) must have shape (7,), got {r.shape}")
        if not np.isfinite(r).all():
            raise ValueError(f"action (the residual) must be finite, got {r}")
        r = np.clip(r, -1.0, 1.0)
        base = self.base_action()
        gate = 1.0 if self.residual_gate is None \
            else min(1.0, (self._distance / self.residual_gate) ** 2)
        applied = np.clip(base + self.residual_scale * gate * r, -1.0, 1.0)
        obs, reward, terminated, truncated, info = self.reach.step(applied)
        self._distance = float(np.linalg.norm(obs["desired_goal"] - obs["achieved_goal"]))
        info.update(base_action=base, residual_action=r, action=applied, residual_gate=gate)
        if self.observe_error_integral:
            self._integrate(obs)
        return self._observe(obs), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """The reach env's frame (see :meth:`PandaReachEnv.render`)."""
        return self.reach.render()

    def close(self) -> None:
        self.reach.close()
        super().close()
