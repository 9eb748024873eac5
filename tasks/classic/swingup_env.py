"""Pendulum swing-up to a target angle: a small goal-conditioned gymnasium environment.

Task
    A torque-limited pendulum starts hanging (``θ = π``, the pendulum of
    :class:`diffto.tasks.classic.Pendulum`, ``θ = 0`` upright) with a little noise and must
    reach a goal angle near upright and stay there. 100 control steps of 0.05 s (5 s) per
    episode, then ``truncated``.

Dynamics
    Exactly :class:`~diffto.tasks.classic.Pendulum` (RK4, float64): ``m l² θ̈ = m g l sin θ − b θ̇
    + τ``, with the torque held over a step. The env steps with the same module and parameters
    a planner gets by default, so an MPC over ``Pendulum()`` has an exact model. ``mass_scale``
    (a value or a ``(low, high)`` range drawn at every reset) multiplies the true mass for
    model-mismatch studies.

Torque limit and goals
    ``|τ| <= torque_limit``, by default ``m g l / 2`` (4.905 Nm): half the torque that holds the
    pendulum horizontal, so it cannot be lifted directly from hanging and must pump energy in
    over a few swings (the interesting part of swing-up). Holding the pendulum at an angle
    ``θ`` takes ``m g l |sin θ|``, so goals are drawn uniformly in ``[−goal_range,
    goal_range]`` (0.3 rad by default: holding needs at most 59% of the limit) and a
    ``goal_range`` whose holding torque exceeds the limit is refused.

Observations and actions
    ``observation (3,) = [cos θ, sin θ, θ̇]``: continuous in the angle. The wrapped angle itself
    jumps from ``π`` to ``−π`` exactly where every episode starts (hanging), a discontinuity a
    network would have to learn around. ``achieved_goal (1,)`` is the angle wrapped to
    ``[−π, π)``, ``desired_goal (1,)`` the goal angle. An action ``a ∈ [−1, 1]`` (clipped) is
    the torque ``τ = a · torque_limit``.

Goal-env API (as :class:`diffto.tasks.panda.PandaReachEnv`)
    ``compute_reward``, ``compute_terminated`` and ``compute_truncated`` take batches
    ``(..., 1)`` of achieved and desired angles and agree with ``step``. Distances are wrapped:
    ``|wrap(θ − g)|`` with ``wrap`` onto ``[−π, π)``, so 3.1 and −3.1 are 0.08 rad apart.
    ``info["is_success"]``: the wrapped distance is at most ``angle_threshold`` (0.1 rad). The
    rate does not enter (rewards are functions of the goals alone, for hindsight
    relabelling): a pendulum swinging through the goal succeeds only for that step, and as in
    the Panda task the goal is to be held until truncation, so an episode's success is
    ``is_success`` at its last step. Rewards: ``"sparse"`` 0 within the threshold, else −1;
    ``"dense"`` minus the wrapped distance (rad).

Rendering
    ``render_mode="rgb_array"`` draws the pendulum (dark rod, blue bob) and the goal direction
    (a thin red line) with numpy: no GL, works anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from diffto.tasks.classic.pendulum import Integrator, Pendulum

__all__ = ["PendulumSwingUpEnv", "wrap_angle", "angle_distance"]


def wrap_angle(angle) -> np.ndarray:
    """Angles wrapped onto ``[−π, π)``, same shape."""
    a = np.asarray(angle, dtype=np.float64)
    return np.mod(a + np.pi, 2.0 * np.pi) - np.pi


def angle_distance(achieved_goal, desired_goal) -> np.ndarray:
    """Wrapped angle distances ``(...)`` in ``[0, π]`` between batches ``(..., 1)``."""
    a, d = np.asarray(achieved_goal, dtype=np.float64), np.asarray(desired_goal, dtype=np.float64)
    if a.shape[-1:] != (1,) or d.shape[-1:] != (1,):
        raise ValueError(
            f"achieved_goal and desired_goal must have shape (..., 1), got {a.shape} and {d.shape}"
        )
    return np.abs(wrap_angle(a - d))[..., 0]


def _number(name: str, value: Any, *, low: float = 0.0, strict: bool = True) -> float:
    ok = isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or (value <= low if strict else value < low):
        raise ValueError(f"{name} must be a finite float {'>' if strict else '>='} {low}, got "
                         f"{value!r}")
    return float(value)


class PendulumSwingUpEnv(gym.Env):
    """Swing a torque-limited pendulum up from hanging to a goal angle near upright.

    Args:
        reward_type: ``"sparse"`` (0 at success, −1 otherwise) or ``"dense"`` (−distance, rad).
        render_mode: ``None`` or ``"rgb_array"``.
        dt: control step (s); one RK4 step of the dynamics.
        mass, length, gravity, damping: the pendulum's parameters (kg, m, m/s², N·m·s).
        integrator: ``"rk4"`` or ``"semi_implicit_euler"``.
        torque_limit: ``|τ|`` bound (Nm); ``None``: ``m g l / 2``.
        goal_range: goals are drawn uniformly in ``[−goal_range, goal_range]`` rad; holding the
            farthest one (``m g l sin(goal_range)``) must be within ``torque_limit``.
        init_angle_noise, init_rate_noise: half-widths of the uniform noise on the initial
            angle (around ``π``) and rate (around 0).
        angle_threshold: success radius (rad) of the wrapped angle error.
        max_episode_steps: control steps before ``truncated``.
        terminate_on_success: end the episode at the first success (default: hold it).
        mass_scale: true mass = ``mass_scale · mass``; a value or a ``(low, high)`` range drawn
            at every reset (model mismatch for a planner that assumes ``mass``).
        width, height: rendered frame size in pixels.

    ``info``: ``is_success``, ``distance`` (rad), ``elapsed_steps``, and from ``reset`` also
    ``mass_scale``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        reward_type: Literal["sparse", "dense"] = "sparse",
        render_mode: Literal["rgb_array"] | None = None,
        *,
        dt: float = 0.05,
        mass: float = 1.0,
        length: float = 1.0,
        gravity: float = 9.81,
        damping: float = 0.0,
        integrator: Integrator = "rk4",
        torque_limit: float | None = None,
        goal_range: float = 0.3,
        init_angle_noise: float = 0.1,
        init_rate_noise: float = 0.1,
        angle_threshold: float = 0.1,
        max_episode_steps: int = 100,
        terminate_on_success: bool = False,
        mass_scale: float | tuple[float, float] = 1.0,
        width: int = 256,
        height: int = 256,
    ) -> None:
        if reward_type not in ("sparse", "dense"):
            raise ValueError(f"reward_type must be 'sparse' or 'dense', got {reward_type!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if not isinstance(terminate_on_success, bool):
            raise ValueError(f"terminate_on_success must be a bool, got {terminate_on_success!r}")
        self.reward_type, self.render_mode = reward_type, render_mode
        self.terminate_on_success = terminate_on_success
        self.pendulum = Pendulum(dt=_number("dt", dt), mass=mass, length=length, gravity=gravity,
                                 damping=damping, integrator=integrator).double()
        self.dt = self.pendulum.dt
        self.mass = float(mass)
        mgl = mass * gravity * length
        self.torque_limit = 0.5 * mgl if torque_limit is None else _number(
            "torque_limit", torque_limit)
        self.goal_range = _number("goal_range", goal_range, strict=False)
        if mgl * math.sin(min(self.goal_range, math.pi / 2)) > self.torque_limit:
            raise ValueError(
                f"goal_range must be held within torque_limit={self.torque_limit:.4g} Nm "
                f"(m g l sin(goal_range) <= torque_limit), got goal_range={goal_range!r}"
            )
        self.init_angle_noise = _number("init_angle_noise", init_angle_noise, strict=False)
        self.init_rate_noise = _number("init_rate_noise", init_rate_noise, strict=False)
        self.angle_threshold = _number("angle_threshold", angle_threshold)
        if (isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int)
                or max_episode_steps < 1):
            raise ValueError(f"max_episode_steps must be an int >= 1, got {max_episode_steps!r}")
        self.max_episode_steps = max_episode_steps
        lo_hi = mass_scale if isinstance(mass_scale, Sequence) else (mass_scale, mass_scale)
        if len(lo_hi) != 2:
            raise ValueError(
                f"mass_scale must be a float or a (low, high) pair, got {mass_scale!r}"
            )
        lo, hi = (_number("mass_scale", v) for v in lo_hi)
        if lo > hi:
            raise ValueError(f"mass_scale must have low <= high, got {mass_scale!r}")
        self.mass_scale_range = (lo, hi)
        self.width = int(_number("width", width))
        self.height = int(_number("height", height))

        inf = np.inf
        self.observation_space = spaces.Dict(
            {
                "observation": spaces.Box(np.array([-1.0, -1.0, -inf]),
                                          np.array([1.0, 1.0, inf]), (3,), np.float64),
                "achieved_goal": spaces.Box(-np.pi, np.pi, (1,), np.float64),
                "desired_goal": spaces.Box(-np.pi, np.pi, (1,), np.float64),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self._x = np.array([np.pi, 0.0])  # (θ wrapped, θ̇)
        self.goal = np.zeros(1)
        self._elapsed = 0

    # ------------------------------------------------------------------ goal-env API
    def compute_reward(self, achieved_goal, desired_goal, info: Any = None) -> np.ndarray:
        """Rewards ``(...)`` for angle batches ``(..., 1)``; ``info`` is not used."""
        d = angle_distance(achieved_goal, desired_goal)
        if self.reward_type == "sparse":
            return -(d > self.angle_threshold).astype(np.float64)
        return -d

    def compute_terminated(self, achieved_goal, desired_goal, info: Any = None) -> np.ndarray:
        """``(...)`` bool: success when ``terminate_on_success``, else all ``False``."""
        d = angle_distance(achieved_goal, desired_goal)
        if self.terminate_on_success:
            return d <= self.angle_threshold
        return np.zeros(d.shape, dtype=bool)

    def compute_truncated(self, achieved_goal, desired_goal, info: Any = None) -> np.ndarray:
        """``(...)`` bool: ``info["elapsed_steps"] >= max_episode_steps`` (``info`` a step's
        dict or a sequence of them; without it, the env's own count); goals do not enter."""
        shape = angle_distance(achieved_goal, desired_goal).shape
        if info is None:
            elapsed = np.asarray(self._elapsed)
        elif isinstance(info, Mapping):
            elapsed = np.asarray(info["elapsed_steps"])
        else:
            elapsed = np.asarray([i["elapsed_steps"] for i in np.ravel(info)]).reshape(shape)
        return np.broadcast_to(elapsed >= self.max_episode_steps, shape).copy()

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Draw the mass scale, the initial state and the goal, in that order."""
        super().reset(seed=seed)
        rng = self.np_random
        scale = float(rng.uniform(*self.mass_scale_range))
        self.pendulum.mass.fill_(scale * self.mass)
        theta = np.pi + rng.uniform(-self.init_angle_noise, self.init_angle_noise)
        rate = rng.uniform(-self.init_rate_noise, self.init_rate_noise)
        self._x = np.array([float(wrap_angle(theta)), rate])
        self.goal = np.array([rng.uniform(-self.goal_range, self.goal_range)])
        self._elapsed = 0
        obs = self._observation()
        info = self._info(obs)
        info["mass_scale"] = scale
        return obs, info

    def step(self, action):
        a = np.asarray(action, dtype=np.float64)
        if a.shape not in ((1,), ()):
            raise ValueError(f"action must have shape (1,), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"action must be finite, got {a}")
        tau = float(np.clip(a.reshape(()), -1.0, 1.0)) * self.torque_limit
        with torch.no_grad():
            x = self.pendulum(torch.from_numpy(self._x).view(1, 2),
                              torch.tensor([[tau]], dtype=torch.float64))[0].numpy()
        self._x = np.array([float(wrap_angle(x[0])), float(x[1])])
        self._elapsed += 1
        obs = self._observation()
        info = self._info(obs)
        achieved, desired = obs["achieved_goal"], obs["desired_goal"]
        reward = float(self.compute_reward(achieved, desired, info))
        terminated = bool(self.compute_terminated(achieved, desired, info))
        truncated = bool(self.compute_truncated(achieved, desired, info))
        return obs, reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """RGB frame ``(height, width, 3) uint8``: rod, bob and goal direction."""
        if self.render_mode is None:
            gym.logger.warn("PendulumSwingUpEnv.render() called with render_mode=None; pass "
                            "render_mode='rgb_array' to the constructor")
            return None
        H, W = self.height, self.width
        frame = np.full((H, W, 3), 245, dtype=np.uint8)
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
        c = np.array([W / 2.0, H / 2.0])
        r = 0.4 * min(H, W)

        def tip(angle: float) -> np.ndarray:  # θ = 0 up; image y grows downwards
            return c + r * np.array([math.sin(angle), -math.cos(angle)])

        def segment(p, q, width):
            d = q - p
            s = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / (d @ d), 0.0, 1.0)
            return np.hypot(xx - p[0] - s * d[0], yy - p[1] - s * d[1]) <= width

        frame[segment(c, tip(float(self.goal[0])), 1.0)] = (220, 40, 40)
        end = tip(float(self._x[0]))
        frame[segment(c, end, max(2.0, 0.02 * r))] = (40, 40, 40)
        frame[np.hypot(xx - end[0], yy - end[1]) <= 0.08 * r] = (40, 90, 200)
        return frame

    # ------------------------------------------------------------------ helpers for control
    @property
    def state(self) -> np.ndarray:
        """Planning state ``x = [θ, θ̇] (2,)``, ``θ`` wrapped onto ``[−π, π)`` (a copy)."""
        return self._x.copy()

    def torque_to_action(self, tau) -> np.ndarray:
        """Action ``(..., 1)`` commanding the torque ``tau (..., 1)`` (Nm)."""
        return np.asarray(tau, dtype=np.float64) / self.torque_limit

    # ------------------------------------------------------------------ internals
    def _observation(self) -> dict[str, np.ndarray]:
        theta, rate = self._x
        return {
            "observation": np.array([math.cos(theta), math.sin(theta), rate]),
            "achieved_goal": np.array([theta]),
            "desired_goal": self.goal.copy(),
        }

    def _info(self, obs: dict[str, np.ndarray]) -> dict[str, Any]:
        distance = float(angle_distance(obs["achieved_goal"], obs["desired_goal"]))
        return {
            "is_success": distance <= self.angle_threshold,
            "distance": distance,
            "elapsed_steps": self._elapsed,
        }
