"""Metaworld expert demonstrations as a Lightning job: ``lightning predict --config
metaworld_experts.yaml``.

Metaworld's scripted policies (:class:`~diffto.tasks.metaworld.expert.ScriptedExpert`, one
per task, stateless) run episodes of the goal environment ``diffto/Metaworld-v0``
(:class:`~diffto.tasks.metaworld.MetaworldGoalEnv`) and the successful ones become
:class:`~diffto.data.trajectories.TrajectorySet` shards, one folder for every task::

    lightning predict --config metaworld_experts.yaml             # MT10, 120 slots per task
    lightning predict --config metaworld_experts.yaml --data.tasks='[push-v3]' \\
        --data.output_dir=runs/datasets/metaworld_push
    python -c "from diffto.data.trajectories import load_trajectories as load; \\
        print(load('runs/datasets/metaworld_mt10'))"

Three Lightning pieces, the same as for TO datasets (:mod:`diffto.data.to_dataset`):

* :class:`MetaworldDemoProblems` (``data``): demonstration slot ``i`` (``0 <= i <
  episodes_per_task``) of task ``k`` (the global id, the index of the task in
  :data:`~diffto.tasks.metaworld.METAWORLD_TASKS`) resets its environment with seed
  ``seed + i`` and becomes episode ``k * 100_000 + i`` (:data:`TASK_EPISODE_STRIDE`). Slots
  are grouped per task in chunks of ``episodes_per_shard``; a chunk is one predict batch and
  one shard ``<task>_episodes_<first>-<last>.npz``. Shards of different tasks and runs
  therefore never collide and merge without renumbering, and a slot's data depend only on
  ``(task, i)``. Finished shards are skipped (resume after a kill).
* :class:`MetaworldDemoCollector` (``model``): ``predict_step`` runs one chunk's episodes in
  lockstep (:func:`collect_demos`: one environment per episode, one batched call of the
  scripted policy per step) and keeps the shard for the writer; it returns nothing.
* :class:`~diffto.data.shard_writer.TrajectoryShardWriter` (callback): writes each shard
  atomically (compressed when it holds images).

**Cut after success.** Metaworld's scripted policies reach the goal within 40-150 steps and
then often drift away from it (the push expert succeeds at some step in every episode but
is still at the goal at step 500 in about half): the rest of a 500-step episode would teach
a learner to drift. An episode is therefore cut ``steps_after_success`` steps after its first
success: the last kept transition is ``success_step + steps_after_success`` (or the step
limit), and it is marked ``truncated`` (the state has a value beyond it; nothing terminated).
The few steps after success teach "stay at the goal". Where the expert leaves the goal
within those steps (peg-insert-side in about one episode of ten within 10 steps, see the
README), the episode ends before the transition that leaves it: no kept transition teaches
leaving the goal.

**Failures are kept out, not replaced.** An episode without success within ``max_steps``
steps is left out and counted (``meta["episodes_failed"]``, ids in
``meta["failed_episodes"]``); its slot stays empty. Requesting more until
``episodes_per_task`` succeed would make slot ``i``'s data depend on the failures before it
and on the chunking; with empty slots the data depend only on ``(task, i)``. Learners that
want ``N`` demonstrations per task take the first ``N`` successful episodes of each task
(the scripted experts succeed in 80-100% of episodes, see the notes in the README).

**Noisy demonstrations** (``action_noise: σ``, DART). Gaussian noise of standard deviation
``σ`` is added to the expert's action before it is applied, so the episodes visit states
just off the expert's path, where a cloned policy's own errors lead it, and the label of
every visited state stays the expert's clean action there: the recoveries a learner needs
are in the data. ``action`` is that label; ``extras["executed_action"]`` is what was applied
and produced ``next_observation`` (what an offline RL learner replays). The noise of an
episode comes from a generator keyed by its reset seed, so a slot's data still depend only
on ``(task, i)``.

Per transition ``t``: ``observation`` (Metaworld's 39 numbers, goal at ``[36:39]``),
``action`` (the expert's action, clipped to ``[-1, 1]``, float32; without noise, the applied
one), ``next_observation``,
``desired_goal``, ``achieved_goal`` (at ``t + 1``), ``reward`` (Metaworld's dense reward),
``task`` (global id), ``terminal`` (False), ``truncated`` (True on the last row), optional
``images`` (the frame at ``t``, uint8). Per episode: ``seed``, ``length``, ``success_step``
(the ``t`` whose next state first succeeds). ``meta``: ``env_id``, ``task_names`` (``{id:
name}`` of the tasks present), ``dt``, the counts, ``generator`` (settings, compared on
resume), ``versions``.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from diffto.data.shard_writer import (
    ShardChunk,
    ShardProducer,
    TOProblems,
)
from diffto.data.to_expert import _int
from diffto.data.trajectories import TrajectorySet
from diffto.tasks.metaworld import METAWORLD_TASKS, MT10
from diffto.tasks.metaworld.expert import ScriptedExpert
from diffto.tasks.registry import make_env

__all__ = [
    "ENV_ID",
    "TASK_EPISODE_STRIDE",
    "MetaworldDemoCollector",
    "MetaworldDemoProblems",
    "collect_demos",
    "task_id",
]

ENV_ID = "diffto/Metaworld-v0"
"""The goal environment every demonstration runs in."""

TASK_EPISODE_STRIDE = 100_000
"""Episode id of demonstration ``i`` of task ``k``: ``k * TASK_EPISODE_STRIDE + i``."""


_MAX_STEPS = 500  # Metaworld's max_path_length: its envs raise when stepped past it
_NOISE_STREAM = 0x6E6F6973  # with the reset seed, the key of an episode's action-noise stream


def task_id(name: str) -> int:
    """Global id of a Metaworld task: its index in ``METAWORLD_TASKS``."""
    if name not in METAWORLD_TASKS:
        raise ValueError(f"tasks: {name!r} is not a Metaworld v3 task (one of "
                         f"{', '.join(METAWORLD_TASKS)})")
    return METAWORLD_TASKS.index(name)


def _action_noise(value: Any) -> float:
    """``value`` as a noise standard deviation (a finite float >= 0), or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 <= value < float("inf")):
        raise ValueError(f"action_noise must be a finite float >= 0, got {value!r}")
    return float(value)


def _env_kwargs(task: str, max_steps: int, images: bool, image_size: int,
                camera: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"task": task, "max_episode_steps": max_steps,
                              "reward_type": "dense"}
    if images:
        kwargs.update(render_mode="rgb_array", width=image_size, height=image_size)
        if camera is not None:
            kwargs["camera"] = camera
    return kwargs


def collect_demos(
    task: str,
    index: Sequence[int],
    seeds: Sequence[int],
    steps_after_success: int = 10,
    max_steps: int = 500,
    images: bool = False,
    image_size: int = 84,
    camera: str | None = None,
    envs: list | None = None,
    action_noise: float = 0.0,
) -> tuple[TrajectorySet, dict[str, Any]]:
    """Scripted-expert episodes of one task in lockstep, cut after success, successes only.

    Args:
        task: Metaworld task name (``"push-v3"``).
        index: ``(E,)`` demonstration slots ``i``; episode ids are
            ``task_id(task) * TASK_EPISODE_STRIDE + i``.
        seeds: ``(E,)`` reset seeds (``seed + i``).
        steps_after_success: transitions kept after the first successful one (fewer where
            the expert leaves the goal again: the transition that leaves it ends the episode
            and is not kept).
        max_steps: step limit of an episode; one without success by then is dropped.
        images: keep the rendered frame of every step, ``images (N, S, S, 3)`` uint8.
        image_size: frame side ``S`` in pixels.
        camera: camera of the frames; ``None``: the environment's default.
        envs: at least ``E`` environments of ``task`` made with the same settings, reused
            (``reset(seed=)`` fixes the variant, so an episode does not depend on what ran
            in its environment before); ``None``: made here and closed at the end.
        action_noise: standard deviation of Gaussian noise added to the expert's action
            before it is applied (clipped to ``[-1, 1]``; drawn from a generator seeded by
            the episode's reset seed). ``action`` keeps the expert's own action (the label)
            and ``extras["executed_action"]`` what was applied. 0: none.

    Returns:
        ``(data, counts)``: the successful episodes (rows as described in the module
        docstring) and ``{"episodes_requested", "episodes_failed", "failed_episodes"}``.
    """
    k = task_id(task)
    index, seeds = [int(i) for i in index], [int(s) for s in seeds]
    if len(index) != len(seeds):
        raise ValueError(f"index and seeds must have one entry each, got {len(index)} and "
                         f"{len(seeds)}")
    E = len(index)
    action_noise = _action_noise(action_noise)
    noise = [np.random.default_rng([_NOISE_STREAM, s]) for s in seeds]
    own = envs is None
    kwargs = _env_kwargs(task, max_steps, images, image_size, camera)
    if own:
        envs = [make_env(ENV_ID, kwargs) for _ in range(E)]
    elif len(envs) < E:
        raise ValueError(f"envs must hold at least {E} environments, got {len(envs)}")
    expert = ScriptedExpert(task)
    columns: dict[str, list] = {k_: [[] for _ in range(E)] for k_ in (
        "observation", "action", "next_observation", "desired_goal", "achieved_goal",
        "reward", "images", "executed_action")}
    success_step = np.full(E, -1, dtype=np.int64)
    try:
        obs = [envs[j].reset(seed=seeds[j])[0] for j in range(E)]
        running = np.ones(E, bool)
        for t in range(max_steps):
            rows = np.flatnonzero(running)
            if not len(rows):
                break
            batch = np.stack([obs[j]["observation"] for j in rows])  # (B, 39)
            # Metaworld's env clips to the action space: the label is the expert's action clipped.
            actions = np.clip(expert.act(batch), -1.0, 1.0).astype(np.float32)  # (B, 4)
            for j, action in zip(rows, actions, strict=True):
                if images:
                    columns["images"][j].append(np.asarray(envs[j].render(), dtype=np.uint8))
                applied = action
                if action_noise > 0:
                    applied = np.clip(action + action_noise * noise[j].standard_normal(
                        action.shape), -1.0, 1.0).astype(np.float32)
                    columns["executed_action"][j].append(applied)
                nxt, reward, terminated, truncated, info = envs[j].step(applied)
                columns["observation"][j].append(obs[j]["observation"])
                columns["desired_goal"][j].append(obs[j]["desired_goal"])
                columns["action"][j].append(action)
                columns["next_observation"][j].append(nxt["observation"])
                columns["achieved_goal"][j].append(nxt["achieved_goal"])
                columns["reward"][j].append(float(reward))
                obs[j] = nxt
                success = float(info["is_success"]) > 0.5
                if success_step[j] < 0 and success:
                    success_step[j] = t
                elif success_step[j] >= 0 and not success:
                    # the expert left the goal: this transition teaches drifting, drop it
                    for column in columns.values():
                        del column[j][t:]
                    running[j] = False
                    continue
                cut = success_step[j] >= 0 and t >= success_step[j] + steps_after_success
                if cut or terminated or truncated:
                    running[j] = False
    finally:
        if own:
            for env in envs:
                env.close()
    dt = float(envs[0].unwrapped.dt)
    keep = [j for j in range(E) if success_step[j] >= 0]
    counts = {"episodes_requested": E, "episodes_failed": E - len(keep),
              "failed_episodes": [k * TASK_EPISODE_STRIDE + index[j] for j in range(E)
                                  if success_step[j] < 0]}
    lengths = np.array([len(columns["reward"][j]) for j in keep], dtype=np.int64)
    N = int(lengths.sum())

    def cat(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        parts = [np.asarray(columns[name][j], dtype=dtype) for j in keep]
        return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype)

    truncated = np.zeros(N, bool)
    truncated[np.cumsum(lengths) - 1] = True
    ids = np.array([k * TASK_EPISODE_STRIDE + index[j] for j in keep], dtype=np.int64)
    data = TrajectorySet(
        observation=cat("observation", (39,), np.float64),
        action=cat("action", (4,), np.float32),
        next_observation=cat("next_observation", (39,), np.float64),
        episode=np.repeat(ids, lengths),
        timestep=np.concatenate([np.arange(n) for n in lengths]) if N else np.zeros(0, int),
        terminal=np.zeros(N, bool),
        truncated=truncated,
        desired_goal=cat("desired_goal", (3,), np.float64),
        achieved_goal=cat("achieved_goal", (3,), np.float64),
        reward=cat("reward", (), np.float64),
        task=np.full(N, k, dtype=np.int64),
        images=(cat("images", (image_size, image_size, 3), np.uint8) if images else None),
        extras=({"executed_action": cat("executed_action", (4,), np.float32)}
                if action_noise > 0 else {}),
        episode_info={"seed": np.array([seeds[j] for j in keep], dtype=np.int64),
                      "length": lengths, "success_step": success_step[keep]},
        meta={"env_id": ENV_ID, "task_names": {str(k): task}, "dt": dt},
    )
    return data, counts


def _versions() -> dict[str, str]:
    out = {}
    for name in ("diffto", "metaworld", "mujoco", "gymnasium", "numpy", "torch", "lightning"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class MetaworldDemoProblems(TOProblems):
    """Demonstration slots of Metaworld tasks, in per-task shards, resumable.

    Args:
        output_dir: folder of the shards of every task (created when needed);
            ``load_trajectories`` reads it whole.
        tasks: Metaworld task names; ``None``: the MT10 tasks.
        episodes_per_task: demonstration slots per task; slot ``i`` resets with seed
            ``seed + i`` and is episode ``task_id * 100_000 + i``. Slots whose episode never
            succeeds stay empty (counted in ``meta["episodes_failed"]``).
        episodes_per_shard: episodes run together (one environment each) and written as one
            shard; keep it fixed for a folder.
        seed: base of the reset seeds (evaluation uses ``1_000_000 + j``, far above).

    Batches are ``{"episode", "seed", "task", "index"}``, each ``(E,) int64``, one per
    pending shard, task after task. Adding tasks to the list of a finished folder collects
    only the new ones.
    """

    def __init__(
        self,
        output_dir: str,
        tasks: list[str] | None = None,
        episodes_per_task: int = 100,
        episodes_per_shard: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__(output_dir, episodes=episodes_per_task,
                         episodes_per_shard=episodes_per_shard, seed=seed)
        if episodes_per_task > TASK_EPISODE_STRIDE:
            raise ValueError(f"episodes_per_task must be <= {TASK_EPISODE_STRIDE} (episode ids "
                             f"are task_id * {TASK_EPISODE_STRIDE} + i), got {episodes_per_task}")
        tasks = list(MT10) if tasks is None else tasks
        if isinstance(tasks, str) or not tasks:
            raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
        for name in tasks:
            task_id(name)
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must not repeat a name, got {tasks!r}")
        self.tasks = list(tasks)

    def shards(self) -> list[ShardChunk]:
        """Every planned shard: the chunks of each task, task after task."""
        return [ShardChunk(a, b, task=task_id(name), prefix=name,
                           episode_offset=task_id(name) * TASK_EPISODE_STRIDE)
                for name in self.tasks for a, b in self.chunks()]


class MetaworldDemoCollector(ShardProducer, L.LightningModule):
    """Metaworld's scripted experts as a ``LightningModule``: ``predict_step`` collects one
    shard of demonstrations (see the module docstring).

    Args:
        steps_after_success: transitions kept after the first successful one (the scripted
            policies drift off the goal later; these few teach staying).
        max_steps: step limit of an episode; episodes without success by then are dropped.
        images: store the rendered frame of every step (``images (N, S, S, 3)`` uint8;
            shards are then written compressed).
        image_size: frame side ``S`` in pixels (at least 84).
        camera: Metaworld camera of the frames; ``None``: the environment's default.
        action_noise: standard deviation of Gaussian noise on the applied actions (the
            expert's clean action stays the label; see the module docstring). 0: none.

    Batches come from :class:`MetaworldDemoProblems`; the shard waits in the module until
    :class:`~diffto.data.shard_writer.TrajectoryShardWriter` takes it (:meth:`take_shard`).
    """

    def __init__(
        self,
        steps_after_success: int = 10,
        max_steps: int = 500,
        images: bool = False,
        image_size: int = 84,
        camera: str | None = None,
        action_noise: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.steps_after_success = _int("steps_after_success", steps_after_success, 0)
        self.max_steps = _int("max_steps", max_steps, 1)
        if max_steps > _MAX_STEPS:
            raise ValueError(f"max_steps must be an int <= {_MAX_STEPS} (Metaworld's episode "
                             f"length), got {max_steps}")
        self.images = bool(images)
        self.image_size = _int("image_size", image_size, 84)
        if camera is not None and (not isinstance(camera, str) or not camera):
            raise ValueError(f"camera must be a camera name or None, got {camera!r}")
        self.camera = camera
        self.action_noise = _action_noise(action_noise)
        self._shard: tuple[str, TrajectorySet] | None = None
        self._envs: tuple[str, list] | None = None  # (task, environments) reused by chunks

    def settings(self) -> dict[str, Any]:
        """What determines the data (compared when a run resumes into an existing folder)."""
        # LightningCLI adds "_class_path" and "_instantiator" to hparams: not settings. No
        # noise is left out, so folders collected before the option existed still resume.
        return json.loads(json.dumps({k: self.hparams[k] for k in sorted(self.hparams)
                                      if not k.startswith("_")
                                      and not (k == "action_noise" and self.action_noise == 0)}))

    def _environments(self, task: str, count: int) -> list:
        if self._envs is not None and self._envs[0] != task:
            self._close()
        if self._envs is None:
            self._envs = (task, [])
        envs = self._envs[1]
        kwargs = _env_kwargs(task, self.max_steps, self.images, self.image_size, self.camera)
        envs.extend(make_env(ENV_ID, kwargs) for _ in range(count - len(envs)))
        return envs

    def _close(self) -> None:
        if self._envs is not None:
            for env in self._envs[1]:
                env.close()
        self._envs = None

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int = 0) -> None:
        """Collect the chunk's episodes and keep the shard for the writer; returns nothing,
        since Lightning keeps whatever ``predict_step`` returns in memory until the end."""
        if self._shard is not None:
            raise ValueError(f"the shard {self._shard[0]} was not written: add a "
                             "TrajectoryShardWriter to trainer.callbacks")
        if len(batch["episode"]) == 0:  # padding chunk of a rank with nothing left to do
            return None
        tasks = batch["task"].unique().tolist()
        if len(tasks) != 1:
            raise ValueError(f"batch must hold episodes of one task, got task ids {tasks}")
        name = METAWORLD_TASKS[tasks[0]]
        index, seeds = batch["index"].tolist(), batch["seed"].tolist()
        start = time.perf_counter()
        data, counts = collect_demos(
            name, index, seeds, steps_after_success=self.steps_after_success,
            max_steps=self.max_steps, images=self.images, image_size=self.image_size,
            camera=self.camera, envs=self._environments(name, len(index)),
            action_noise=self.action_noise)
        meta = dict(data.meta)
        meta.update(counts)
        meta.update({
            "env_kwargs": _env_kwargs(name, self.max_steps, self.images, self.image_size,
                                      self.camera),
            "expert": "diffto.tasks.metaworld.expert.ScriptedExpert (metaworld.policies)",
            "cut": f"{self.steps_after_success} steps after the first success; episodes "
                   "without success in max_steps are left out",
            "generator": self.settings(),
            "seed_base": seeds[0] - index[0],
            "episode_range": [int(batch["episode"][0]), int(batch["episode"][-1]) + 1],
            "wall_time_s": round(time.perf_counter() - start, 3),
            "versions": _versions(),
        })
        if len(data):
            meta["normalization"] = data.normalization_stats(
                ["observation", "action", "desired_goal"])
        data.meta = meta
        self._shard = (ShardChunk(index[0], index[-1] + 1, prefix=name).filename, data)
        return None

    def on_predict_end(self) -> None:
        self._close()

    def teardown(self, stage: str) -> None:
        self._close()
