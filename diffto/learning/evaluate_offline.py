"""Evaluate an offline policy checkpoint on held-out task variants, next to the expert.

``python -m diffto.learning.evaluate_offline CKPT [--episodes 50] [--tasks push-v3 ...]
[--action-steps N] [--video out.mp4] [--json figures.json]``

loads a checkpoint of :class:`~diffto.learning.bc.BehaviorCloning` or
:class:`~diffto.learning.diffusion_policy.DiffusionPolicy` (``best.ckpt``, ``last.ckpt`` ...),
runs the policy in closed loop on the held-out seeds ``EVAL_SEED_BASE + j`` (``j <
episodes``: object and goal positions no demonstration had) of every task it learned (or
those named by ``--tasks``), and the expert it names on the same seeds (cached), then prints
the per-task success table, the mean time to success and the time per action of each.
``--action-steps`` executes another number of each predicted chunk's actions than the policy
was trained with (1: predict again at every step, closed loop; at most the chunk's length).
``--video`` films the first ``--video-episodes`` episodes of each evaluated task side by side,
the tasks one after another (skipped with a warning where rendering is unavailable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from diffto.learning.goal_evaluation import (
    eval_seeds,
    make_env_fps,
    print_evaluation,
    save_video,
)
from diffto.learning.offline_policy import OfflinePolicy
from diffto.learning.task_evaluation import (
    evaluate_task_experts,
    format_task_table,
    mean_summary,
)
from diffto.tasks.registry import import_class

__all__ = ["load_offline_policy", "evaluate_checkpoint", "main"]


def load_offline_policy(path: str | Path) -> OfflinePolicy:
    """The :class:`OfflinePolicy` stored in checkpoint ``path``, on the CPU, in eval mode."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    kind = ckpt.get("diffto_offline_policy")
    if not isinstance(kind, str):
        raise ValueError(f"checkpoint {path} was not written by an offline policy of "
                         f"diffto.learning (no diffto_offline_policy entry)")
    model = import_class(kind, "checkpoint's policy").load_from_checkpoint(path,
                                                                         map_location="cpu")
    model.eval()
    return model


def evaluate_checkpoint(
    path: str | Path,
    episodes: int = 50,
    tasks: list[str] | None = None,
    video: str | Path | None = None,
    video_episodes: int = 3,
    expert: bool = True,
    expert_cache_dir: str | None = None,
    progress: bool = True,
    action_steps: int | None = None,
) -> dict[str, Any]:
    """Evaluate the checkpoint's policy (and its expert) on ``episodes`` held-out seeds per
    task, executing ``action_steps`` actions of each predicted chunk (``None``: the
    checkpoint's setting). Returns ``{"results": {row: {task: summary}}, "mean": ...,
    "table": markdown, "video": path or None, "action_steps": ..., ...}``."""
    model = load_offline_policy(path)
    hp = model.hparams
    if action_steps is not None:
        if (isinstance(action_steps, bool) or not isinstance(action_steps, int)
                or not 1 <= action_steps <= model.action_horizon):
            raise ValueError(f"action_steps must be an int in [1, {model.action_horizon}] (the "
                             f"policy's action_horizon), got {action_steps!r}")
        model.action_steps = action_steps
    learned = model.task_list()
    if tasks is not None:
        unknown = [t for t in tasks if t not in learned]
        if unknown:
            raise ValueError(f"tasks {unknown} were not learned by this policy, which knows "
                             f"{learned}")
    rows = {}
    if expert and hp.expert is not None:
        rows["expert"] = evaluate_task_experts(
            hp.env_id, tasks or learned, eval_seeds(episodes), hp.expert, model.env_kwargs,
            hp.task_kwarg, hp.eval_max_steps,
            hp.expert_cache_dir if expert_cache_dir is None else expert_cache_dir, progress)
    results, videos = model.evaluate(episodes=episodes, video_episodes=video_episodes if video
                                     else 0, progress=progress, tasks=tasks)
    rows[f"policy ({Path(path).name})"] = results
    saved = None
    if video and videos:
        frames = [f for clip in videos.values() for f in clip]
        fps = make_env_fps(hp.env_id, model.task_env_kwargs(model.task_list()[0]))
        saved = str(save_video(frames, video, fps=int(fps)))
    title = (f"{type(model).__name__} on {hp.env_id}: success over {episodes} held-out episodes "
             f"per task")
    table = format_task_table({k: {str(t): e for t, e in v.items()} for k, v in rows.items()},
                              expert="expert" if "expert" in rows else None, title=title)
    timing = {k: next(iter(v.values())).timing.get("time_per_action_s") for k, v in rows.items()}
    steps = {k: mean_summary(v)["steps_to_success"] for k, v in rows.items()}
    table += "\n" + "\n".join(
        f"{k}: mean steps to success {steps[k]:.1f}, time per action "
        f"{timing[k] * 1e3:.3g} ms" for k in rows if timing[k] is not None) + "\n"
    return {"checkpoint": str(path), "env_id": hp.env_id, "episodes": episodes,
            "results": {k: {str(t): e.summary() for t, e in v.items()} for k, v in rows.items()},
            "mean": {k: mean_summary(v) for k, v in rows.items()}, "table": table,
            "video": saved, "action_steps": model.action_steps}


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    from diffto.tasks.registry import use_osmesa_if_headless

    use_osmesa_if_headless()  # before anything imports mujoco, so videos render headless
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(prog="python -m diffto.learning.evaluate_offline",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a BehaviorCloning or DiffusionPolicy checkpoint (.ckpt)")
    p.add_argument("--episodes", type=int, default=50,
                   help="held-out episodes per task (default 50)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="evaluate only these of the policy's tasks")
    p.add_argument("--action-steps", type=int, default=None,
                   help="actions executed per predicted chunk (default: the checkpoint's)")
    p.add_argument("--video", default=None, help="write an MP4 of the first episodes here")
    p.add_argument("--video-episodes", type=int, default=3,
                   help="episodes filmed per task (default 3)")
    p.add_argument("--no-expert", action="store_true", help="skip the expert's evaluation")
    p.add_argument("--expert-cache-dir", default=None,
                   help="cache of expert evaluations (default: the checkpoint's setting)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.episodes < 1:
        p.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.action_steps is not None and args.action_steps < 1:
        p.error(f"--action-steps must be >= 1, got {args.action_steps}")
    out = evaluate_checkpoint(args.checkpoint, args.episodes, args.tasks, args.video,
                              args.video_episodes, expert=not args.no_expert,
                              expert_cache_dir=args.expert_cache_dir,
                              action_steps=args.action_steps)
    print_evaluation(out, args.json)


if __name__ == "__main__":
    main()
