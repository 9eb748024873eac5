"""Panda reaching past an obstacle: the reach task with a spherical keep-out region on the way.

Task
    :class:`~diffto.tasks.panda.reach_env.PandaReachEnv` (torque control at 50 Hz, gravity
    compensation, goal = flange position within 2 cm, held until truncation) with a sphere of
    centre ``o`` and radius ``ρ`` placed on the straight segment from the initial flange
    position ``p₀`` to the goal ``g``::

        o = p₀ + s (g − p₀) + δ,    s ~ U(obstacle_fraction),  δ ⊥ (g − p₀), ‖δ‖ ≤ obstacle_offset,
        ρ ~ U(obstacle_radius).

    The flange, taken as a ball of radius ``flange_radius`` (a tool's size), must stay out of
    it: the episode *collides* at the first control step at which ``‖p − o‖ < ρ +
    flange_radius``; a collision ends the episode (``terminated``) and the episode fails
    (``is_success`` is ``False`` at that step, and the goal can no longer be held). A
    controller that heads straight for the goal therefore hits the sphere; one that passes
    beside, above or below it can succeed. Each draw of ``(s, δ, ρ)`` is repeated (and, after
    ``_OBSTACLE_TRIES`` failures, the start and goal are redrawn) until both ``p₀`` and ``g``
    lie at least ``obstacle_clearance`` outside the keep-out region, so no episode starts in
    collision or has its goal unreachable.

    The region is checked at the control steps (every 20 ms), on the flange only: the links
    do not collide (the model has no contacts, see :mod:`diffto.tasks.panda.model`). At the
    speeds of this task (below 1.5 m/s, 3 cm per step) a crossing of the sphere cannot fall
    between two checks when ``ρ + flange_radius`` is 6 cm or more (the defaults).

Observations
    ``observation (18,)`` = ``[qpos (7); qvel (7); o (3); ρ (1)]`` (the obstacle is part of
    the state a policy sees, so a goal-conditioned learner that reads only ``observation`` and
    the goals knows where it is); ``achieved_goal`` and ``desired_goal (3,)`` as in the reach
    task. ``info`` adds ``collision`` (bool, this step), ``obstacle_center (3,)`` and
    ``obstacle_radius``.

Goal-env API
    ``compute_reward`` is the reach task's (goals only, so hindsight relabelling works; the
    collision shows through termination). ``compute_terminated`` is ``True`` where
    ``info["collision"]`` is (plus the reach task's success termination when asked), so it
    agrees with ``step``.

Rendering draws the obstacle as a translucent grey sphere of radius ``ρ`` beside the red goal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mujoco
import numpy as np
from gymnasium import spaces

from diffto.tasks.panda.reach_env import PandaReachEnv, _range
from diffto.tasks.rendering import make_renderer

__all__ = ["PandaObstacleReachEnv", "keep_out_penetration"]

_OBSTACLE_TRIES = 100
_EPISODE_TRIES = 100


def keep_out_penetration(
    position: np.ndarray, center: np.ndarray, radius: np.ndarray | float, flange_radius: float
) -> np.ndarray:
    """How deep ``(...)`` (m, ``> 0`` inside) flange balls at ``position (..., 3)`` reach into
    spheres ``center (..., 3)``, ``radius (...)``: ``ρ + flange_radius − ‖p − o‖``."""
    p, o = np.asarray(position, np.float64), np.asarray(center, np.float64)
    if p.shape[-1:] != (3,) or o.shape[-1:] != (3,):
        raise ValueError(f"position and center must have shape (..., 3), got {p.shape} and "
                         f"{o.shape}")
    return np.asarray(radius, np.float64) + flange_radius - np.linalg.norm(p - o, axis=-1)


class PandaObstacleReachEnv(PandaReachEnv):
    """Panda reach with a keep-out sphere between start and goal (see the module docstring).

    Args:
        obstacle_radius: ``ρ`` in metres, a value or a ``(low, high)`` range drawn per episode.
        obstacle_fraction: ``(low, high)`` range (or value) of ``s``, where along the segment
            from the initial flange position to the goal the centre sits (0: start, 1: goal).
        obstacle_offset: largest distance (m) of the centre from that segment, drawn
            uniformly in the disc perpendicular to it.
        flange_radius: radius (m) of the ball around the flange that must stay outside.
        obstacle_clearance: smallest distance (m) of the initial flange position and of the
            goal from the keep-out region (sphere radius ``ρ + flange_radius``).
        min_goal_distance, goal_joint_range, max_episode_steps: the reach task's, with larger
            defaults so that the obstacle fits between start and goal.
        **kwargs: every other :class:`PandaReachEnv` argument.
    """

    def __init__(
        self,
        *args: Any,
        obstacle_radius: float | tuple[float, float] = (0.05, 0.07),
        obstacle_fraction: float | tuple[float, float] = (0.4, 0.6),
        obstacle_offset: float = 0.02,
        flange_radius: float = 0.02,
        obstacle_clearance: float = 0.03,
        min_goal_distance: float = 0.3,
        goal_joint_range: float = 0.7,
        max_episode_steps: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, min_goal_distance=min_goal_distance,
                         goal_joint_range=goal_joint_range,
                         max_episode_steps=max_episode_steps, **kwargs)
        self.obstacle_radius_range = _range("obstacle_radius", obstacle_radius, positive=True)
        self.obstacle_fraction_range = _range("obstacle_fraction", obstacle_fraction)
        if self.obstacle_fraction_range[1] > 1.0:
            raise ValueError(f"obstacle_fraction must lie in [0, 1], got {obstacle_fraction!r}")
        self.obstacle_offset = _range("obstacle_offset", obstacle_offset)[0]
        self.flange_radius = _range("flange_radius", flange_radius)[0]
        self.obstacle_clearance = _range("obstacle_clearance", obstacle_clearance)[0]
        self.obstacle_center = np.zeros(3)
        self.obstacle_radius = float(self.obstacle_radius_range[0])
        self.collided = False
        inf = np.inf
        self.observation_space = spaces.Dict(
            {**self.observation_space.spaces,
             "observation": spaces.Box(-inf, inf, (18,), np.float64)}
        )

    # ------------------------------------------------------------------ goal-env API
    def compute_terminated(
        self, achieved_goal: np.ndarray, desired_goal: np.ndarray, info: Any = None
    ) -> np.ndarray:
        """``(...)`` bool: a collision (``info["collision"]``; without ``info`` the env's own
        flag), or success where ``terminate_on_success``."""
        done = super().compute_terminated(achieved_goal, desired_goal, info)
        if info is None:
            collision = np.asarray(self.collided)
        elif isinstance(info, Mapping):
            collision = np.asarray(info.get("collision", False))
        else:
            collision = np.asarray([i.get("collision", False) for i in np.ravel(info)]
                                   ).reshape(done.shape)
        return done | np.broadcast_to(collision, done.shape)

    # ------------------------------------------------------------------ gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Draw the reach episode (mismatch, start, goal), then the obstacle."""
        for attempt in range(_EPISODE_TRIES):
            obs, info = super().reset(seed=seed if attempt == 0 else None, options=options)
            if self._place_obstacle(obs["achieved_goal"], obs["desired_goal"]):
                break
        else:
            raise RuntimeError(
                f"no obstacle fits in {_EPISODE_TRIES} episodes: obstacle_radius="
                f"{self.obstacle_radius_range}, flange_radius={self.flange_radius} and "
                f"obstacle_clearance={self.obstacle_clearance} need a larger min_goal_distance "
                f"(now {self.min_goal_distance})"
            )
        self.collided = False
        obs = self._observation()
        info.update(self._obstacle_info(collision=False))
        return obs, info

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        obs, reward, _, truncated, info = super().step(action)
        collision = bool(keep_out_penetration(obs["achieved_goal"], self.obstacle_center,
                                              self.obstacle_radius, self.flange_radius) > 0)
        self.collided = self.collided or collision
        info.update(self._obstacle_info(collision))
        info["is_success"] = bool(info["is_success"]) and not self.collided
        terminated = bool(self.compute_terminated(obs["achieved_goal"], obs["desired_goal"],
                                                  info))
        return obs, reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """RGB frame as :meth:`PandaReachEnv.render`, with the obstacle drawn."""
        if self.render_mode is None:
            return super().render()
        if self._renderer is None:
            self._renderer = make_renderer(self.model, self.height, self.width)
        self._renderer.update_scene(self.data, camera="overview")
        scene = self._renderer.scene
        if scene.ngeom < scene.maxgeom:
            mujoco.mjv_initGeom(scene.geoms[scene.ngeom], mujoco.mjtGeom.mjGEOM_SPHERE,
                                np.full(3, self.obstacle_radius), self.obstacle_center,
                                np.eye(3).reshape(-1), np.array([0.5, 0.5, 0.55, 0.6], np.float32))
            scene.ngeom += 1
        return self._renderer.render()

    # ------------------------------------------------------------------ internals
    def _place_obstacle(self, start: np.ndarray, goal: np.ndarray) -> bool:
        """Draw ``(s, δ, ρ)`` until start and goal clear the keep-out region; ``False`` if
        none of :data:`_OBSTACLE_TRIES` draws does."""
        rng = self.np_random
        axis = (goal - start) / np.linalg.norm(goal - start)
        # Two unit vectors spanning the plane perpendicular to the segment.
        helper = np.eye(3)[int(np.argmin(np.abs(axis)))]
        e1 = np.cross(axis, helper)
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(axis, e1)
        for _ in range(_OBSTACLE_TRIES):
            s = rng.uniform(*self.obstacle_fraction_range)
            angle = rng.uniform(0.0, 2.0 * np.pi)
            offset = self.obstacle_offset * np.sqrt(rng.uniform())  # uniform in the disc
            center = start + s * (goal - start) + offset * (np.cos(angle) * e1 +
                                                            np.sin(angle) * e2)
            radius = float(rng.uniform(*self.obstacle_radius_range))
            depth = keep_out_penetration(np.stack([start, goal]), center, radius,
                                         self.flange_radius)
            if (depth <= -self.obstacle_clearance).all():
                self.obstacle_center, self.obstacle_radius = center, radius
                return True
        return False

    def _observation(self) -> dict[str, np.ndarray]:
        obs = super()._observation()
        obs["observation"] = np.concatenate(
            [obs["observation"], getattr(self, "obstacle_center", np.zeros(3)),
             [getattr(self, "obstacle_radius", 0.0)]]
        )
        return obs

    def _obstacle_info(self, collision: bool) -> dict[str, Any]:
        return {"collision": collision, "obstacle_center": self.obstacle_center.copy(),
                "obstacle_radius": self.obstacle_radius}
