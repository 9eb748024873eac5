"""Several Metaworld tasks (e.g. MT10) stepped together as one gymnasium vector env.

Built from single :class:`~diffto.tasks.metaworld.goal_env.MetaworldGoalEnv` instances (each
made through :func:`diffto.tasks.registry.make_env`, so subprocess workers also pick the
headless GL back-end), not from Metaworld's ``make_vec`` (about 30 s for MT10, task sampling
wrappers this project does not want). Env index ``i`` runs task
``tasks[i // envs_per_task]``: task-major, ``envs_per_task`` consecutive copies per task. The
returned env's ``task_names`` and ``task_ids`` (global ids, indices in
:data:`~diffto.tasks.metaworld.goal_env.METAWORLD_TASKS`) list them per index.
Observations are dicts of batched arrays (``observation (E, 39)``, ``desired_goal (E, 3)``,
``achieved_goal (E, 3)``); the single observation space is the hull of the tasks' spaces
(their goal bounds differ). Seed with ``reset(seed=s)``: gymnasium gives env ``i`` seed
``s + i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from diffto.tasks.metaworld.goal_env import METAWORLD_TASKS, MT10, MetaworldGoalEnv

__all__ = ["make_metaworld_vector_env"]

ENV_ID = "diffto/Metaworld-v0"


def make_metaworld_vector_env(
    tasks: Sequence[str] | Literal["MT10"],
    envs_per_task: int = 1,
    strategy: Literal["sync", "async"] = "sync",
    **env_kwargs: Any,
) -> gym.vector.VectorEnv:
    """A vector env of ``len(tasks) * envs_per_task`` Metaworld goal envs.

    Args:
        tasks: task names (:data:`METAWORLD_TASKS`) or ``"MT10"`` (:data:`MT10`, in order).
        envs_per_task: copies of each task, ``>= 1``.
        strategy: ``"sync"`` (in-process, the faster choice when a learner shares the cores)
            or ``"async"`` (one subprocess per env).
        env_kwargs: constructor arguments of every env (``reward_type``,
            ``max_episode_steps``, ...), not ``task``.

    Env ``i`` runs ``tasks[i // envs_per_task]``; ``env.task_names`` and ``env.task_ids``
    (tuples, one entry per index) say so.
    """
    if isinstance(tasks, str):
        if tasks != "MT10":
            raise ValueError(f"tasks must be 'MT10' or a sequence of task names, got {tasks!r}")
        names = MT10
    else:
        names = tuple(tasks)
    if not names:
        raise ValueError("tasks must name at least one task, got an empty sequence")
    unknown = [t for t in names if t not in METAWORLD_TASKS]
    if unknown:
        raise ValueError(f"tasks must be Metaworld v3 task names, unknown: {unknown}")
    if not isinstance(envs_per_task, int) or envs_per_task < 1:
        raise ValueError(f"envs_per_task must be an int >= 1, got {envs_per_task!r}")
    if strategy not in ("sync", "async"):
        raise ValueError(f"strategy must be 'sync' or 'async', got {strategy!r}")
    if "task" in env_kwargs:
        raise ValueError("env_kwargs must not contain 'task' (tasks chooses it per env)")
    from diffto.tasks.registry import make_env

    per_index = tuple(t for t in names for _ in range(envs_per_task))
    if strategy == "sync":
        envs = [make_env(ENV_ID, {**env_kwargs, "task": t}) for t in per_index]
        single = _union_space([e.observation_space for e in envs[::envs_per_task]])
        mode = (batch_space(single, len(envs)), single)
        venv = gym.vector.SyncVectorEnv([partial(_built, e) for e in envs], observation_mode=mode)
    else:
        # The parent only needs each task's spaces: build each task once without rendering.
        probes = [MetaworldGoalEnv(task=t) for t in names]
        single = _union_space([p.observation_space for p in probes])
        for probe in probes:
            probe.close()
        mode = (batch_space(single, len(per_index)), single)
        fns = [partial(make_env, ENV_ID, {**env_kwargs, "task": t}) for t in per_index]
        venv = gym.vector.AsyncVectorEnv(fns, context="spawn", observation_mode=mode)
    venv.task_names = per_index
    venv.task_ids = tuple(METAWORLD_TASKS.index(t) for t in per_index)
    return venv


def _built(env: gym.Env) -> gym.Env:
    """An env factory for SyncVectorEnv that returns an env built already."""
    return env


def _union_space(task_spaces: list[spaces.Dict]) -> spaces.Dict:
    """The smallest Dict of Boxes containing every task's observation space.

    Tasks differ in their goal bounds (``desired_goal`` and ``observation[36:39]``), so the
    vector env's single observation space is the elementwise hull of theirs.
    """
    keys = list(task_spaces[0].spaces)
    return spaces.Dict(
        {
            k: spaces.Box(
                np.min([s[k].low for s in task_spaces], axis=0),
                np.max([s[k].high for s in task_spaces], axis=0),
                dtype=np.float64,
            )
            for k in keys
        }
    )
