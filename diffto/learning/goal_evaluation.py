"""Closed-loop evaluation of goal-conditioned controllers on held-out episodes.

A controller (a learned policy, or the TO expert in receding horizon) drives ``B``
environments in lockstep, one per evaluation seed ``EVAL_SEED_BASE + j``: the seeds fix the
initial states and goals, so every controller meets the same episodes and no training
episode (seeds ``seed + i`` from 0) is among them. Per episode:

- ``success``: the environment's own ``info["is_success"]`` at the episode's last step (the
  goal is to be reached *and held*, as in gymnasium-robotics' reach tasks);
- ``final_distance``: ``info["distance"]`` at the last step (else ``‖achieved − desired‖``);
- ``steps_to_success``: the first step at which ``is_success`` held (NaN if never), so the
  summary's ``success_any`` is the share of episodes that succeeded at some step (Metaworld's
  convention);
- ``time_at_goal``: the fraction of the episode's steps at which ``is_success`` held;
- ``return``: the sum of rewards; ``cost``: the sum of ``info["cost"]`` where the
  environment reports a stage cost (closed-loop cost), else absent.

The expert is expensive (one MPC solve per control step), so its evaluation is cached on disk
as JSON, keyed by the env id, env kwargs, the expert's settings and the seeds
(:func:`evaluate_expert`). Beside the success figures go the costs of acting: the policy's
inference time per action (batch of one) and one expert solve per control step in receding
horizon (batch of one, warm-started from the shifted previous plan, along the first
evaluation episode).

A video of the first episodes (side by side) is rendered with ``render_mode="rgb_array"``
where the environment supports it; where rendering is unavailable the video is skipped with
a ``RuntimeWarning``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffto.data.trajectories import EVAL_SEED_BASE
from diffto.tasks.registry import build_expert, make_env

__all__ = [
    "EVAL_SEED_BASE",
    "Evaluation",
    "Controller",
    "eval_seeds",
    "split_observation",
    "rollout_episodes",
    "evaluate_policy",
    "evaluate_expert",
    "build_expert",
    "expert_spec",
    "time_policy",
    "save_video",
    "make_env_fps",
    "print_evaluation",
]

Controller = Callable[[np.ndarray, "np.ndarray | None", list], np.ndarray]
"""``(observation (B, o), desired_goal (B, g) or None, envs) -> actions (B, a)``; ``envs`` are
the unwrapped environments of the batch (an expert reads its planning state from them)."""

_SUMMARY_KEYS = ("success", "final_distance", "steps_to_success", "return", "cost")


def eval_seeds(episodes: int, offset: int = 0) -> list[int]:
    """The held-out evaluation seeds ``EVAL_SEED_BASE + offset + j``, ``j < episodes``."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    return [EVAL_SEED_BASE + offset + j for j in range(episodes)]


@dataclass
class Evaluation:
    """Per-episode results ``(E,)`` of one controller on ``seeds``, and their summary."""

    seeds: list[int]
    success: np.ndarray
    final_distance: np.ndarray
    steps_to_success: np.ndarray
    ep_return: np.ndarray
    length: np.ndarray
    cost: np.ndarray | None = None
    timing: dict[str, float] = field(default_factory=dict)
    extras: dict[str, float] = field(default_factory=dict)
    time_at_goal: np.ndarray | None = None
    violations: np.ndarray | None = None  # constraint violations per episode (env's count)

    def summary(self) -> dict[str, float]:
        """Means over episodes: ``success`` (rate, at the last step), ``success_any`` (rate,
        at any step), ``final_distance``, ``steps_to_success`` (over the episodes that
        succeeded at some step; NaN if none), ``return``, ``cost`` and ``time_at_goal`` (where
        recorded), ``violations`` (constraint violations per episode, summed over steps from
        the env's ``info["violations"]``, where it reports them), plus the timings and
        extras."""
        reached = self.steps_to_success[np.isfinite(self.steps_to_success)]
        out = {
            "episodes": float(len(self.seeds)),
            "success": float(np.mean(self.success)),
            "success_any": float(np.mean(np.isfinite(self.steps_to_success))),
            "final_distance": float(np.mean(self.final_distance)),
            "steps_to_success": float(np.mean(reached)) if reached.size else float("nan"),
            "return": float(np.mean(self.ep_return)),
        }
        if self.cost is not None:
            out["cost"] = float(np.mean(self.cost))
        if self.time_at_goal is not None:
            out["time_at_goal"] = float(np.mean(self.time_at_goal))
        if self.violations is not None:
            out["violations"] = float(np.mean(self.violations))
        out.update(self.timing)
        out.update(self.extras)
        return out

    def to_json(self) -> dict[str, Any]:
        d = {
            "seeds": list(map(int, self.seeds)),
            "success": self.success.astype(bool).tolist(),
            "final_distance": self.final_distance.tolist(),
            "steps_to_success": [None if not np.isfinite(v) else float(v)
                                 for v in self.steps_to_success],
            "ep_return": self.ep_return.tolist(),
            "length": self.length.astype(int).tolist(),
            "cost": None if self.cost is None else self.cost.tolist(),
            "timing": self.timing,
            "extras": self.extras,
            "time_at_goal": None if self.time_at_goal is None else self.time_at_goal.tolist(),
            "violations": None if self.violations is None else self.violations.tolist(),
        }
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Evaluation:
        steps = np.array([np.nan if v is None else v for v in d["steps_to_success"]], float)
        return cls(
            seeds=list(d["seeds"]),
            success=np.asarray(d["success"], bool),
            final_distance=np.asarray(d["final_distance"], float),
            steps_to_success=steps,
            ep_return=np.asarray(d["ep_return"], float),
            length=np.asarray(d["length"], int),
            cost=None if d.get("cost") is None else np.asarray(d["cost"], float),
            timing=dict(d.get("timing", {})),
            extras=dict(d.get("extras", {})),
            time_at_goal=(None if d.get("time_at_goal") is None
                          else np.asarray(d["time_at_goal"], float)),
            violations=(None if d.get("violations") is None
                        else np.asarray(d["violations"], float)),
        )


# ----------------------------------------------------------------------------- rollouts
def split_observation(obs: Any, observation_keys: Sequence[str] = ("observation",)
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """``(policy observation, desired_goal)`` of a goal-env dict observation: the entries
    ``observation_keys`` concatenated (e.g. ``["observation", "achieved_goal"]``); a flat
    observation is returned as it is, with goal ``None``."""
    if isinstance(obs, dict):
        return (np.concatenate([np.asarray(obs[k], np.float64).reshape(-1)
                                for k in observation_keys]),
                np.asarray(obs["desired_goal"], np.float64))
    return np.asarray(obs, np.float64), None


_split = split_observation


def _distance(obs: Any, info: dict[str, Any]) -> float:
    if "distance" in info:
        return float(info["distance"])
    if isinstance(obs, dict) and "achieved_goal" in obs:
        return float(np.linalg.norm(np.asarray(obs["achieved_goal"]) -
                                    np.asarray(obs["desired_goal"])))
    return float("nan")


def _make_envs(env_id: str, env_kwargs: dict[str, Any] | None, n: int, n_video: int) -> tuple[
        list, int]:
    """``n`` environments; the first ``n_video`` render ``rgb_array`` where they can (else
    none renders, with a warning). Returns the envs and how many render."""
    kwargs = dict(env_kwargs or {})
    envs: list = [make_env(env_id, kwargs)]
    if n_video > 0 and "rgb_array" not in envs[0].metadata.get("render_modes", []):
        warnings.warn(f"rendering unavailable for {env_id}: it has no rgb_array render mode; "
                      f"no video", RuntimeWarning, stacklevel=3)
        n_video = 0
    if n_video > 0:
        envs.pop().close()
        try:
            envs = [make_env(env_id, {**kwargs, "render_mode": "rgb_array"})
                    for _ in range(min(n_video, n))]
        except Exception as err:  # an env that rejects the argument after all
            warnings.warn(f"rendering unavailable for {env_id}: {err}; no video",
                          RuntimeWarning, stacklevel=3)
            envs = []
    n_video = len(envs) if n_video > 0 else 0
    envs += [make_env(env_id, kwargs) for _ in range(n - len(envs))]
    return envs, n_video


def rollout_episodes(
    controller: Controller,
    env_id: str,
    seeds: Sequence[int],
    env_kwargs: dict[str, Any] | None = None,
    max_steps: int | None = None,
    video_episodes: int = 0,
    on_reset: Callable[[], None] | None = None,
    progress: bool = False,
    observation_keys: Sequence[str] = ("observation",),
) -> tuple[Evaluation, list[np.ndarray]]:
    """Run one episode per seed, all environments stepped in lockstep by ``controller``.

    Args:
        controller: ``(observation (B, o), goal (B, g), envs) -> actions (B, a)``; it always
            receives every row (rows whose episode ended repeat their last observation, and
            their actions are ignored), so a controller with per-row state keeps its rows.
        env_id, env_kwargs: the environment (``diffto.tasks.registry.make_env``).
        seeds: reset seed of each episode (``B = len(seeds)``).
        max_steps: cap on the episode length (``None``: until the environment ends it).
        video_episodes: render the first ones (tiled side by side) where possible.
        on_reset: called once after the environments reset (e.g. a controller's ``reset``).
        progress: show a progress bar over control steps.
        observation_keys: the dict entries concatenated into the controller's observation.

    Returns:
        The :class:`Evaluation` and the video frames ``[(H, k W, 3) uint8]`` (empty without video).
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one episode")
    B = len(seeds)
    envs, n_video = _make_envs(env_id, env_kwargs, B, video_episodes)
    frames: list[np.ndarray] = []
    try:
        first = [env.reset(seed=s) for env, s in zip(envs, seeds, strict=True)]
        obs = [o for o, _ in first]
        active = np.ones(B, bool)
        success = np.array([bool(info.get("is_success", False)) for _, info in first])
        distance = np.array([_distance(o, info) for o, info in first])
        steps_to = np.full(B, np.nan)
        ret, cost, violations = np.zeros(B), np.zeros(B), np.zeros(B)
        has_cost = has_violations = False
        length = np.zeros(B, int)
        at_goal = np.zeros(B, int)
        unwrapped = [env.unwrapped for env in envs]
        if on_reset is not None:
            on_reset()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"evaluating {B} episodes", unit="step", leave=False)
        while active.any() and (max_steps is None or int(length.max()) < max_steps):
            if n_video:
                try:
                    frames.append(np.concatenate([envs[i].render() for i in range(n_video)], 1))
                except Exception as err:  # no GL context, or an env that cannot render
                    warnings.warn(f"rendering unavailable for {env_id}: {err}; no video",
                                  RuntimeWarning, stacklevel=2)
                    n_video, frames = 0, []
            parts = [_split(o, observation_keys) for o in obs]
            ob = np.stack([p[0] for p in parts])
            goal = None if parts[0][1] is None else np.stack([p[1] for p in parts])
            actions = np.asarray(controller(ob, goal, unwrapped))
            for i in np.flatnonzero(active):
                o, r, term, trunc, info = envs[i].step(actions[i])
                obs[i] = o
                ret[i] += float(r)
                if "cost" in info:
                    cost[i] += float(info["cost"])
                    has_cost = True
                if "violations" in info:
                    violations[i] += float(info["violations"])
                    has_violations = True
                length[i] += 1
                success[i] = bool(info.get("is_success", False))
                distance[i] = _distance(o, info)
                at_goal[i] += success[i]
                if success[i] and np.isnan(steps_to[i]):
                    steps_to[i] = length[i]
                if term or trunc:
                    active[i] = False
            if bar is not None:
                bar.update(1)
        if n_video:
            try:
                frames.append(np.concatenate([envs[i].render() for i in range(n_video)], 1))
            except Exception:  # noqa: BLE001 (the warning was given at the first frame)
                frames = []
        if bar is not None:
            bar.close()
    finally:
        for env in envs:
            env.close()
    result = Evaluation(seeds, success, distance, steps_to, ret, length,
                        cost if has_cost else None,
                        time_at_goal=at_goal / np.maximum(length, 1),
                        violations=violations if has_violations else None)
    return result, frames


def time_policy(act: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
                observation: np.ndarray, goal: np.ndarray | None, repeats: int = 50) -> float:
    """Median wall time (s) of ``act`` on one row ``observation (1, o)``, ``goal (1, g)``."""
    times = []
    for _ in range(repeats + 3):
        t0 = time.perf_counter()
        act(observation, goal)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[3:]))  # the first calls warm caches up


def evaluate_policy(
    act: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
    env_id: str,
    seeds: Sequence[int],
    env_kwargs: dict[str, Any] | None = None,
    max_steps: int | None = None,
    video_episodes: int = 0,
    progress: bool = False,
    observation_keys: Sequence[str] = ("observation",),
) -> tuple[Evaluation, list[np.ndarray]]:
    """Evaluate a batched policy ``act(observation (B, o), goal (B, g)) -> (B, a)`` on
    ``seeds`` (``observation``: the entries ``observation_keys`` of the env's dict,
    concatenated); ``timing["time_per_action_s"]`` is its inference time on a batch of one."""
    result, frames = rollout_episodes(lambda o, g, envs: act(o, g), env_id, seeds, env_kwargs,
                                      max_steps, video_episodes, progress=progress,
                                      observation_keys=observation_keys)
    env = make_env(env_id, env_kwargs)
    try:
        ob, goal = _split(env.reset(seed=int(seeds[0]))[0], observation_keys)
    finally:
        env.close()
    result.timing["time_per_action_s"] = time_policy(act, ob[None], None if goal is None else
                                                     goal[None])
    return result, frames


# ----------------------------------------------------------------------------- the expert
def expert_spec(env_id: str, expert: dict[str, Any] | None = None) -> dict[str, Any]:
    """The expert's description as stored in caches and reports: ``{"class_path",
    "init_args"}`` as given, or ``{"default_for": env_id}`` (``make_expert(env_id)``)."""
    if expert is None:
        return {"default_for": env_id}
    if not isinstance(expert, dict) or "class_path" not in expert:
        raise ValueError(f"expert must be None or {{class_path, init_args}}, got {expert!r}")
    return {"class_path": str(expert["class_path"]),
            "init_args": dict(expert.get("init_args") or {})}


def _expert_controller(controller, stats: dict[str, list[float]]) -> Controller:
    """A :data:`Controller` over a ``RecedingHorizon``: planning states from the envs, one
    batched solve per step; appends each step's mean iterations and converged fraction."""

    def act(observation: np.ndarray, goal: np.ndarray | None, envs: list) -> np.ndarray:
        states = np.stack([controller.expert.state_of(env) for env in envs])
        actions, sol = controller.act(states, goal)
        stats["iterations"].append(float(np.asarray(sol.iterations, float).mean()))
        stats["converged"].append(float(np.asarray(sol.converged, float).mean()))
        return actions

    return act


def _cache_path(cache_dir: str | os.PathLike, key: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(cache_dir) / f"expert_{key['env_id'].replace('/', '_')}_{digest[:12]}.json"


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic JSON write (temporary sibling, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, default=float)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; reports are for every reader
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def evaluate_expert(
    env_id: str,
    seeds: Sequence[int],
    env_kwargs: dict[str, Any] | None = None,
    expert: dict[str, Any] | None = None,
    warm_start: str = "shifted",
    max_iter: int | None = None,
    max_steps: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    timing_steps: int = 5,
    progress: bool = True,
) -> Evaluation:
    """The TO expert in receding horizon on ``seeds``, cached as JSON in ``cache_dir``.

    ``timing["time_per_action_s"]`` is the wall time of one control step of the expert on a
    batch of one (median over the first ``timing_steps`` steps of the first episode, warm
    started as in closed loop); ``extras`` holds the mean MPC iterations per step and the
    fraction of converged solves of the batched evaluation.
    """
    from diffto.tasks.mpc_expert import RecedingHorizon

    key = {"env_id": env_id, "env_kwargs": dict(env_kwargs or {}),
           "expert": expert_spec(env_id, expert), "warm_start": warm_start,
           "max_iter": max_iter, "max_steps": max_steps, "seeds": [int(s) for s in seeds]}
    path = None if cache_dir is None else _cache_path(cache_dir, key)
    if path is not None and path.exists():
        payload = json.loads(path.read_text())
        if payload.get("key") == json.loads(json.dumps(key, default=str)):
            return Evaluation.from_json(payload["result"])
    model = build_expert(env_id, expert)
    controller = RecedingHorizon(model, warm_start=warm_start, max_iter=max_iter)
    stats: dict[str, list[float]] = {"iterations": [], "converged": []}
    result, _ = rollout_episodes(_expert_controller(controller, stats), env_id, seeds,
                                 env_kwargs, max_steps, on_reset=controller.reset,
                                 progress=progress)
    result.extras = {"iterations_per_step": float(np.mean(stats["iterations"])),
                     "converged_fraction": float(np.mean(stats["converged"]))}
    result.timing["time_per_action_s"] = _time_expert(model, env_id, env_kwargs, int(seeds[0]),
                                                      warm_start, max_iter, timing_steps)
    if path is not None:
        _write_json(path, {"key": key, "result": result.to_json()})
    return result


def _time_expert(model, env_id: str, env_kwargs: dict[str, Any] | None, seed: int,
                 warm_start: str, max_iter: int | None, steps: int) -> float:
    """Median wall time of one receding-horizon control step on a batch of one."""
    from diffto.tasks.mpc_expert import RecedingHorizon

    controller = RecedingHorizon(model, warm_start=warm_start, max_iter=max_iter)
    env = make_env(env_id, env_kwargs)
    times = []
    try:
        obs, _ = env.reset(seed=seed)
        for _ in range(max(steps, 1)):
            _, goal = _split(obs)
            state = model.state_of(env.unwrapped)[None]
            t0 = time.perf_counter()
            actions, _ = controller.act(state, None if goal is None else goal[None])
            times.append(time.perf_counter() - t0)
            obs, *_ = env.step(actions[0])
    finally:
        env.close()
    return float(np.median(times))


# ----------------------------------------------------------------------------- video
def save_video(frames: list[np.ndarray], path: str | os.PathLike, fps: int = 20) -> Path:
    """Frames ``(H, W, 3) uint8`` to an MP4 (written to a temporary sibling, then renamed)."""
    import imageio.v2 as imageio

    path = Path(path)
    if not frames:
        raise ValueError("frames must hold at least one frame")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".mp4",
                               dir=path.parent)
    os.close(fd)
    try:
        with imageio.get_writer(tmp, fps=fps, macro_block_size=8) as writer:
            for frame in frames:
                writer.append_data(np.asarray(frame))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def make_env_fps(env_id: str, env_kwargs: dict[str, Any]) -> float:
    """The environment's ``metadata["render_fps"]`` (20 where it does not say)."""
    env = make_env(env_id, env_kwargs)
    try:
        return float(env.unwrapped.metadata.get("render_fps", 20))
    finally:
        env.close()


def print_evaluation(out: dict[str, Any], json_path: str | None = None) -> None:
    """What the evaluation commands print: ``out["table"]``, the video's path and, with
    ``json_path``, the figures written there (every entry of ``out`` but the table)."""
    print(out["table"])
    if out.get("video"):
        print(f"video: {out['video']}")
    if json_path:
        _write_json(Path(json_path), {k: v for k, v in out.items() if k != "table"})
        print(f"figures: {json_path}")
