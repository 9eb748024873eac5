"""Closed-loop evaluation over several tasks of one environment family, and its table.

An environment family (e.g. ``diffto/Metaworld-v0``) takes its task as a keyword argument
(``task_kwarg``, default ``"task"``). :func:`evaluate_on_tasks` runs a controller on the same
held-out seeds ``EVAL_SEED_BASE + j`` in every task, one batch of lockstep environments per
task (:func:`~diffto.learning.goal_evaluation.rollout_episodes`), and returns one
:class:`~diffto.learning.goal_evaluation.Evaluation` per task. With
``terminate_on_success=True`` in the environment's keyword arguments an episode ends at its
first success, so the success of its last step is success at *any* step, the convention of
Metaworld's benchmark, and ``steps_to_success`` is the time to success.

The scripted or otherwise cheap expert of each task (a class built with ``task=<name>`` whose
``act(observation (B, o)) -> (B, a)`` is stateless) is evaluated on the same episodes by
:func:`evaluate_task_experts`, cached as JSON per task and seed list, so every learner's
figure stands next to the expert's on identical episodes.

:func:`format_task_table` lays the controllers' per-task success side by side with their
mean and, where an expert row exists, the fraction of the expert's success.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffto.learning.goal_evaluation import (
    Controller,
    Evaluation,
    _write_json,
    rollout_episodes,
    split_observation,
    time_policy,
)
from diffto.tasks.registry import import_class, make_env

__all__ = [
    "evaluate_on_tasks",
    "evaluate_task_experts",
    "build_task_expert",
    "format_task_table",
    "mean_summary",
]

ControllerFactory = Callable[[str], tuple[Controller, Callable[[], None] | None]]
"""``task name -> (controller, on_reset or None)``: a fresh controller for one task's batch."""


def evaluate_on_tasks(
    make_controller: ControllerFactory,
    env_id: str,
    tasks: Sequence[str],
    seeds: Sequence[int],
    env_kwargs: dict[str, Any] | None = None,
    task_kwarg: str = "task",
    max_steps: int | None = None,
    video_episodes: int = 0,
    progress: bool = False,
    observation_keys: Sequence[str] = ("observation",),
) -> tuple[dict[str, Evaluation], dict[str, list[np.ndarray]]]:
    """Evaluate the controller of each task on ``seeds``; returns ``({task: Evaluation},
    {task: video frames})`` (frames only where ``video_episodes > 0`` and rendering works)."""
    if not tasks:
        raise ValueError("tasks must name at least one task")
    results, videos = {}, {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(tasks, desc="evaluating tasks", unit="task", leave=False)
    for task in tasks:
        controller, on_reset = make_controller(task)
        kwargs = {**dict(env_kwargs or {}), task_kwarg: task}
        results[task], frames = rollout_episodes(
            controller, env_id, seeds, kwargs, max_steps, video_episodes, on_reset=on_reset,
            observation_keys=observation_keys)
        if frames:
            videos[task] = frames
        if bar is not None:
            bar.update(1)
            bar.set_postfix(task=task, success=f"{results[task].summary()['success']:.2f}")
    if bar is not None:
        bar.close()
    return results, videos


def build_task_expert(expert: dict[str, Any], task: str):
    """The expert ``{class_path, init_args}`` of one task: built with ``task=task``."""
    if not isinstance(expert, dict) or not isinstance(expert.get("class_path"), str):
        raise ValueError(f"expert must be a dict {{class_path, init_args}}, got {expert!r}")
    built = import_class(expert["class_path"], "expert")(
        task=task, **dict(expert.get("init_args") or {}))
    if not callable(getattr(built, "act", None)):
        raise ValueError(f"expert {expert['class_path']} has no act(observation) method")
    return built


def evaluate_task_experts(
    env_id: str,
    tasks: Sequence[str],
    seeds: Sequence[int],
    expert: dict[str, Any],
    env_kwargs: dict[str, Any] | None = None,
    task_kwarg: str = "task",
    max_steps: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Evaluation]:
    """Each task's expert on ``seeds`` (cached as JSON per task in ``cache_dir``)."""
    out: dict[str, Evaluation] = {}
    for task in tasks:
        key = {"env_id": env_id, "env_kwargs": {**dict(env_kwargs or {}), task_kwarg: task},
               "expert": {"class_path": expert.get("class_path"),
                          "init_args": dict(expert.get("init_args") or {})},
               "max_steps": max_steps, "seeds": [int(s) for s in seeds]}
        path = None
        if cache_dir is not None:
            digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
            path = Path(cache_dir) / f"task_expert_{task}_{digest}.json"
            if path.exists():
                payload = json.loads(path.read_text())
                if payload.get("key") == key:
                    out[task] = Evaluation.from_json(payload["result"])
                    continue
        model = build_task_expert(expert, task)
        result, _ = rollout_episodes(lambda o, g, envs, m=model: m.act(o), env_id, seeds,
                                     key["env_kwargs"], max_steps, progress=progress)
        result.timing["time_per_action_s"] = _time_act(model, env_id, key["env_kwargs"],
                                                       int(seeds[0]))
        out[task] = result
        if path is not None:
            _write_json(path, {"key": key, "result": result.to_json()})
    return out


def _time_act(model, env_id: str, env_kwargs: dict[str, Any], seed: int) -> float:
    """The expert's time per action on a batch of one (its first observation)."""
    env = make_env(env_id, env_kwargs)
    try:
        obs, _ = split_observation(env.reset(seed=seed)[0])
    finally:
        env.close()
    return time_policy(lambda o, g: model.act(o), obs[None], None)


def mean_summary(results: dict[str, Evaluation]) -> dict[str, float]:
    """Task-averaged ``success`` and ``steps_to_success`` (mean over tasks with a success)."""
    success = [r.summary()["success"] for r in results.values()]
    steps = [r.summary()["steps_to_success"] for r in results.values()]
    steps = [s for s in steps if np.isfinite(s)]
    return {"success": float(np.mean(success)),
            "steps_to_success": float(np.mean(steps)) if steps else float("nan")}


def format_task_table(rows: dict[str, dict[str, Evaluation]], expert: str | None = None,
                      title: str = "") -> str:
    """A markdown table: one row per controller, one column per task (success rate), then
    the mean; with ``expert`` (a row name) a last column gives the number of tasks on which
    the controller reaches at least 0.9 of that row's success."""
    tasks = list(next(iter(rows.values())))
    head = ["controller", *tasks, "mean"]
    if expert is not None:
        head.append("tasks ≥ 0.9 × expert")
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, res in rows.items():
        cells = [f"{res[t].summary()['success']:.2f}" if t in res else "—" for t in tasks]
        cells.append(f"{mean_summary(res)['success']:.3f}")
        if expert is not None:
            ref = rows[expert]
            n = sum(res[t].summary()["success"] >= 0.9 * ref[t].summary()["success"] - 1e-12
                    for t in tasks if t in res)
            cells.append(f"{n}/{len(tasks)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
