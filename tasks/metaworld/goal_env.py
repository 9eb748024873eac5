"""Metaworld v3 tasks as goal-conditioned gymnasium environments with honoured reset seeds.

Construction
    The task's Sawyer environment class is built directly from Metaworld's
    ``ALL_V3_ENVIRONMENTS`` (no benchmark object, about a tenth of a second), with the goal
    observable (``_partially_observable = False``: ``observation[36:39]`` is the goal) and the
    task marked as set. Episodes last ``max_episode_steps <= 500`` steps (Metaworld's own
    ``max_path_length``; it raises when stepped past it), then ``truncated``.

Seeding (Metaworld ignores ``reset(seed=)``; this wrapper does not)
    A task *variant* is the random vector ``rand_vec`` (object and goal positions) Metaworld
    draws in ``reset_model``. Metaworld's benchmarks draw their 50 variants by unfreezing it and
    calling the env's own ``reset`` with a seeded generator, so each task's rejection rules
    (e.g. object at least 15 cm from the goal for push) hold. Here the same mechanism runs at
    every reset: ``reset(seed=s)`` re-seeds the Sawyer env's own generator (``env.seed(s)``,
    ``seeded_rand_vec = True``) and lets its ``reset`` draw the vector, so the variant is a
    deterministic function of ``s`` (same ``s``, same first observation) and the global
    ``np.random`` state plays no part (hammer-v3's goal is fixed: its variants move the
    hammer). ``reset(seed=None)`` continues the stream of the last
    seed (from OS entropy before any seed). Training data uses seeds ``0, 1, ...`` and
    evaluation ``1_000_000 + j`` (:data:`diffto.data.trajectories.EVAL_SEED_BASE`).

Goal-env API (gymnasium-robotics' conventions, duck-typed)
    Observations are dicts: ``observation (39,)`` (Metaworld's, float64), ``desired_goal (3,)``
    (the task's target ``_target_pos``) and ``achieved_goal (3,)`` (per task, see
    :mod:`diffto.tasks.metaworld.success`). ``info`` is Metaworld's plus ``is_success``
    (0.0/1.0 from the success table, equal to ``info["success"]``), ``distance`` (the test's
    error), ``metaworld_reward`` (Metaworld's dense reward), ``goal`` (the desired goal) and
    ``elapsed_steps``. Rewards: ``"dense"`` = Metaworld's (a function of the whole simulator
    state, so :meth:`compute_reward` returns it only for the episode's own goal); ``"sparse"``
    = 0 on success, else −1 (relabelable for tasks whose test is a function of the goals).
    ``terminated = terminate_on_success and success``.

Rendering
    ``render_mode="rgb_array"`` returns ``(height, width, 3)`` uint8 images from ``camera``
    (default ``"corner2"``: the table and the arm seen from the front corner). Metaworld's
    ``corner*`` cameras are defined upside down (their image-up axis points at the floor), so
    their images are rotated by 180° to show the scene upright (gymnasium's MuJoCo renderer
    has already put OpenGL's bottom-up rows in order; flipping rows only would mirror it). The GL
    back-end is chosen when ``mujoco`` is first imported (``MUJOCO_GL``; ``make_env`` picks
    OSMesa on a headless machine). With ``render_mode=None`` nothing touches GL; where no
    offscreen context can be made, ``render()`` raises
    :class:`~diffto.tasks.rendering.RenderingUnavailableError`.

Construction cost
    Metaworld compiles its scene from XML in every new environment (about 0.4 s here, longer
    than an expert episode). Each task's scene is compiled once per process and every further
    environment gets a copy of the compiled model (about 20 ms): evaluations that build tens of
    environments per task stay cheap. The copy is deep, so environments never share state.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from diffto.tasks.metaworld.success import evaluate_state, goal_success, is_goal_function
from diffto.tasks.rendering import RenderingUnavailableError

__all__ = ["MetaworldGoalEnv", "METAWORLD_TASKS", "MT10"]

_COMPILED: dict[str, mujoco.MjModel] = {}
"""Compiled scene per XML path: the master copy, never handed to an environment."""
_SAWYER_CLASSES: dict[str, type] = {}


def _initialize_simulation(self) -> tuple[mujoco.MjModel, mujoco.MjData]:
    """gymnasium's ``MujocoEnv._initialize_simulation`` from a copy of the compiled scene."""
    compiled = _COMPILED.get(self.fullpath)
    if compiled is None:
        compiled = _COMPILED[self.fullpath] = mujoco.MjModel.from_xml_path(self.fullpath)
    model = copy.deepcopy(compiled)
    # as gymnasium does: only grow the offscreen framebuffer to the requested image size
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
    model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
    return model, mujoco.MjData(model)


def _sawyer_class(task: str) -> type:
    """Metaworld's class of ``task`` with the compiled-scene cache (same name, same code)."""
    if task not in _SAWYER_CLASSES:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        base = ALL_V3_ENVIRONMENTS[task]
        _SAWYER_CLASSES[task] = type(base.__name__, (base,),
                                     {"_initialize_simulation": _initialize_simulation})
    return _SAWYER_CLASSES[task]


METAWORLD_TASKS: tuple[str, ...] = (
    "assembly-v3", "basketball-v3", "bin-picking-v3", "box-close-v3",
    "button-press-topdown-v3", "button-press-topdown-wall-v3", "button-press-v3",
    "button-press-wall-v3", "coffee-button-v3", "coffee-pull-v3", "coffee-push-v3",
    "dial-turn-v3", "disassemble-v3", "door-close-v3", "door-lock-v3", "door-open-v3",
    "door-unlock-v3", "hand-insert-v3", "drawer-close-v3", "drawer-open-v3", "faucet-open-v3",
    "faucet-close-v3", "hammer-v3", "handle-press-side-v3", "handle-press-v3",
    "handle-pull-side-v3", "handle-pull-v3", "lever-pull-v3", "pick-place-wall-v3",
    "pick-out-of-hole-v3", "pick-place-v3", "plate-slide-v3", "plate-slide-side-v3",
    "plate-slide-back-v3", "plate-slide-back-side-v3", "peg-insert-side-v3",
    "peg-unplug-side-v3", "soccer-v3", "stick-push-v3", "stick-pull-v3", "push-v3",
    "push-wall-v3", "push-back-v3", "reach-v3", "reach-wall-v3", "shelf-place-v3",
    "sweep-into-v3", "sweep-v3", "window-open-v3", "window-close-v3",
)  # fmt: skip
"""Every v3 task, in the order of Metaworld's ``ALL_V3_ENVIRONMENTS`` (its ``task_id``s);
a task's global id in diffto is its index here. Fixed in code so ids survive upgrades."""

MT10: tuple[str, ...] = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
    "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3",
    "window-close-v3",
)  # fmt: skip
"""The MT10 tasks in Metaworld's MT10 order."""

_MAX_PATH_LENGTH = 500  # SawyerXYZEnv.max_path_length: stepping past it raises
_MIN_SIZE = 84


class MetaworldGoalEnv(gym.Env):
    """One Metaworld v3 task as a seeded goal-conditioned env (see the module docstring).

    Args:
        task: a name in :data:`METAWORLD_TASKS`.
        reward_type: ``"dense"`` (Metaworld's reward) or ``"sparse"`` (0 on success, else −1).
        max_episode_steps: episode length before ``truncated``, ``1 <= . <= 500``.
        terminate_on_success: end the episode (``terminated``) at the first success.
        render_mode: ``None`` or ``"rgb_array"``.
        width, height: image size in pixels, at least 84.
        camera: a camera of Metaworld's scene (``"corner"``, ``"corner2"``, ``"corner3"``,
            ``"corner4"``, ``"topview"``, ``"behindGripper"``, ``"gripperPOV"``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(
        self,
        task: str = "reach-v3",
        reward_type: Literal["dense", "sparse"] = "dense",
        max_episode_steps: int = 500,
        terminate_on_success: bool = False,
        render_mode: Literal["rgb_array"] | None = None,
        width: int = 224,
        height: int = 224,
        camera: str = "corner2",
    ) -> None:
        if task not in METAWORLD_TASKS:
            raise ValueError(f"task must be a Metaworld v3 task name, one of "
                             f"{list(METAWORLD_TASKS)}, got {task!r}")
        if reward_type not in ("dense", "sparse"):
            raise ValueError(f"reward_type must be 'dense' or 'sparse', got {reward_type!r}")
        if not isinstance(max_episode_steps, int) or not 1 <= max_episode_steps <= 500:
            raise ValueError(f"max_episode_steps must be an int in [1, {_MAX_PATH_LENGTH}] "
                             f"(Metaworld's max_path_length), got {max_episode_steps!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        for name, size in (("width", width), ("height", height)):
            if not isinstance(size, int) or size < _MIN_SIZE:
                raise ValueError(f"{name} must be an int >= {_MIN_SIZE}, got {size!r}")
        self.task_name = task
        self.task_id = METAWORLD_TASKS.index(task)
        self.reward_type = reward_type
        self.max_episode_steps = max_episode_steps
        self.terminate_on_success = bool(terminate_on_success)
        self.render_mode = render_mode
        self.camera = camera
        sawyer = _sawyer_class(task)(
            render_mode=render_mode, camera_name=camera, width=width, height=height
        )
        cameras = [sawyer.model.camera(i).name for i in range(sawyer.model.ncam)]
        if camera not in cameras:
            raise ValueError(f"camera must be one of Metaworld's cameras {cameras}, got {camera!r}")
        # Metaworld's "corner" cameras are defined upside down: their image-up axis (second
        # column of cam_xmat) points towards the floor. Rotating their images by 180° (both
        # axes reversed; a row flip alone would mirror the scene) shows the scene upright.
        mujoco.mj_forward(sawyer.model, sawyer.data)
        up = sawyer.data.cam_xmat[cameras.index(camera)].reshape(3, 3)[:, 1]
        self._rotate_image = bool(up[2] < 0.0)
        # What Benchmark.set_task does for MT tasks, without a pickled Task: goal observable
        # (drop the cached space computed with the goal hidden), task set, variants drawn
        # from the env's own seeded generator at every reset.
        sawyer._partially_observable = False
        sawyer.__dict__.pop("sawyer_observation_space", None)
        sawyer._set_task_called = True
        sawyer._freeze_rand_vec = False
        sawyer.seeded_rand_vec = True
        self._sawyer = sawyer
        self._fast_render_set = False
        self.dt = float(sawyer.dt)

        sawyer_space = sawyer.sawyer_observation_space
        goal_space = sawyer.goal_space
        self.observation_space = spaces.Dict(
            {
                "observation": spaces.Box(sawyer_space.low, sawyer_space.high, dtype=np.float64),
                "desired_goal": spaces.Box(goal_space.low, goal_space.high, dtype=np.float64),
                "achieved_goal": spaces.Box(-np.inf, np.inf, (3,), dtype=np.float64),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)
        self._elapsed = 0
        self._needs_reset = True

    # ------------------------------------------------------------------ episode
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self._sawyer.seed(int(seed))
        obs, info = self._sawyer.reset()
        self._elapsed = 0
        self._needs_reset = False
        achieved, success, distance = self._evaluate(obs, None)
        info = dict(info)
        info.update(self._goal_info(success, distance, 0.0))
        return self._observation(obs, achieved), info

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise ValueError("reset the environment before step (episode over or not started)")
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(4), -1.0, 1.0)
        obs, mw_reward, _, _, info = self._sawyer.step(action)
        self._elapsed += 1
        achieved, success, distance = self._evaluate(obs, info)
        info = dict(info)
        info.update(self._goal_info(success, distance, float(mw_reward)))
        reward = float(mw_reward) if self.reward_type == "dense" else (0.0 if success else -1.0)
        terminated = self.terminate_on_success and success
        truncated = self._elapsed >= self.max_episode_steps
        self._needs_reset = terminated or truncated
        return self._observation(obs, achieved), reward, terminated, truncated, info

    def _evaluate(
        self, obs: np.ndarray, info: Mapping[str, Any] | None
    ) -> tuple[np.ndarray, bool, float]:
        achieved, success, distance = evaluate_state(self._sawyer, obs, self.task_name)
        if success is None:  # task outside the table: Metaworld's own decision
            success = bool(info is not None and info.get("success", 0.0) > 0)
        return achieved, bool(success), float(distance)

    def _observation(self, obs: np.ndarray, achieved: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "observation": np.asarray(obs, dtype=np.float64),
            "desired_goal": np.array(self._sawyer._target_pos, dtype=np.float64),
            "achieved_goal": achieved,
        }

    def _goal_info(self, success: bool, distance: float, mw_reward: float) -> dict[str, Any]:
        return {
            "is_success": float(success),
            "distance": distance,
            "metaworld_reward": mw_reward,
            "goal": np.array(self._sawyer._target_pos, dtype=np.float64),
            "elapsed_steps": self._elapsed,
        }

    # ------------------------------------------------------------------ goal API
    def _infos(self, info: Any, batch: tuple[int, ...]) -> list[Mapping[str, Any]]:
        """``info`` as a flat list of dicts: one dict (shared) or one per batch row."""
        if isinstance(info, Mapping):
            return [info] * int(np.prod(batch, dtype=int))
        infos = list(np.asarray(info, dtype=object).reshape(-1))
        if len(infos) != int(np.prod(batch, dtype=int)):
            raise ValueError(f"info must be a dict or one dict per goal ({batch}), "
                             f"got {len(infos)}")
        return infos

    def _own_goal_values(self, desired: np.ndarray, info: Any, key: str, why: str) -> np.ndarray:
        """``info[key]`` per row, where every desired goal is the episode's own goal."""
        batch = desired.shape[:-1]
        infos = self._infos(info, batch)
        rows = desired.reshape(-1, 3)
        for goal, row_info in zip(rows, infos, strict=True):
            if "goal" not in row_info or not np.allclose(goal, row_info["goal"], atol=1e-9):
                raise ValueError(f"task {self.task_name!r}: {why}")
        return np.array([float(i[key]) for i in infos]).reshape(batch)

    def _success(self, achieved: Any, desired: Any, info: Any) -> np.ndarray:
        achieved = np.asarray(achieved, dtype=np.float64)
        desired = np.asarray(desired, dtype=np.float64)
        if is_goal_function(self.task_name):
            return goal_success(self.task_name, achieved, desired)[0]
        why = ("its success depends on the simulator state, not only on (achieved_goal, "
               "desired_goal), so it is known only for the episode's own goal "
               "(info['goal']); relabelled goals cannot be evaluated")
        return self._own_goal_values(desired, info, "is_success", why) > 0

    def compute_reward(self, achieved_goal: Any, desired_goal: Any, info: Any) -> np.ndarray:
        """Reward ``(B,)`` (or scalar) of goals ``(B, 3)`` or ``(3,)``, as ``step`` returns it.

        ``"sparse"``: 0 where the table's test succeeds, else −1. ``"dense"``: Metaworld's
        reward, a function of the whole simulator state: returned from
        ``info["metaworld_reward"]`` where ``desired_goal`` is the episode's own goal
        (``info["goal"]``), a ``ValueError`` otherwise. ``info``: a step's info dict or an
        array of them, one per row.
        """
        if self.reward_type == "sparse":
            return self._success(achieved_goal, desired_goal, info).astype(np.float64) - 1.0
        why = ("the dense Metaworld reward is a function of the whole simulator state and is "
               "known only for the episode's own goal (info['goal']); relabel goals with "
               "reward_type='sparse'")
        desired = np.asarray(desired_goal, dtype=np.float64)
        return self._own_goal_values(desired, info, "metaworld_reward", why)

    def compute_terminated(self, achieved_goal: Any, desired_goal: Any, info: Any) -> np.ndarray:
        """``terminate_on_success and success`` per row (bool, shape of the goal batch)."""
        success = self._success(achieved_goal, desired_goal, info)
        return success & self.terminate_on_success

    def compute_truncated(self, achieved_goal: Any, desired_goal: Any, info: Any) -> np.ndarray:
        """Time-limit truncation per row: ``info["elapsed_steps"] >= max_episode_steps``
        (it does not depend on the goals)."""
        desired = np.asarray(desired_goal, dtype=np.float64)
        infos = self._infos(info, desired.shape[:-1])
        steps = np.array([int(i.get("elapsed_steps", 0)) for i in infos])
        return (steps >= self.max_episode_steps).reshape(desired.shape[:-1])

    # ------------------------------------------------------------------ rendering
    def render(self) -> np.ndarray | None:
        """``(height, width, 3)`` uint8 image from ``camera`` (``render_mode="rgb_array"``),
        ``None`` without a render mode; :class:`RenderingUnavailableError` without GL."""
        if self.render_mode is None:
            return None
        try:
            if not self._fast_render_set:
                # Reflections and shadows are most of an OSMesa frame's cost (0.40 s -> 0.08 s
                # at 84 x 84 here); evaluation videos and image observations do without them.
                scene = self._sawyer.mujoco_renderer._get_viewer("rgb_array").scn
                scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
                scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
                self._fast_render_set = True
            frame = self._sawyer.render()
        except Exception as err:  # GL back-ends fail with assorted types (FatalError, ...)
            raise RenderingUnavailableError(
                f"MuJoCo could not render offscreen ({type(err).__name__}: {err}). On a "
                f"headless machine set MUJOCO_GL=osmesa (or egl) before anything imports "
                f"mujoco (diffto.tasks.registry.make_env does it for a fresh process)."
            ) from err
        image = np.asarray(frame, dtype=np.uint8)
        if self._rotate_image:
            image = image[::-1, ::-1]
        return np.ascontiguousarray(image)

    def close(self) -> None:
        self._sawyer.close()

    @property
    def sawyer(self) -> Any:
        """The wrapped Metaworld ``SawyerXYZEnv`` (read-only use: sites, model, data)."""
        return self._sawyer

