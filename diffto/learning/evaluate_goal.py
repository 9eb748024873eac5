"""Evaluate a goal-conditioned policy checkpoint against its TO expert on held-out episodes.

``python -m diffto.learning.evaluate_goal CKPT [--episodes 50] [--video out.mp4]``

loads a checkpoint of :class:`~diffto.learning.gcbc.GoalConditionedBC` or
:class:`~diffto.learning.dagger.DAgger` (``best.ckpt``, ``last.ckpt`` ...), runs the policy
in closed loop on the held-out seeds ``EVAL_SEED_BASE + j`` (``j < episodes``) of the
environment it was trained on, and the expert on the same seeds (cached on disk, see
:func:`~diffto.learning.goal_evaluation.evaluate_expert`), then prints a table: success rate,
final distance, steps to success, return, and the time per action (policy forward pass vs one
MPC solve). ``--video`` films the first ``--video-episodes`` episodes side by side (skipped
with a warning where the environment cannot render); ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from diffto.learning.gcbc import GoalConditionedBC, format_report
from diffto.learning.goal_evaluation import (
    eval_seeds,
    evaluate_expert,
    evaluate_policy,
    make_env_fps,
    print_evaluation,
    save_video,
)

__all__ = ["load_learner", "evaluate_checkpoint", "main"]


def load_learner(path: str | Path) -> GoalConditionedBC:
    """The module stored in checkpoint ``path`` (GoalConditionedBC or DAgger), on the CPU,
    in eval mode."""
    from diffto.learning.dagger import DAgger

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    kind = ckpt.get("diffto_goal_learner")
    classes = {"GoalConditionedBC": GoalConditionedBC, "DAgger": DAgger}
    if kind not in classes:
        raise ValueError(f"checkpoint {path} was not written by GoalConditionedBC or DAgger "
                         f"(its diffto_goal_learner entry is {kind!r})")
    model = classes[kind].load_from_checkpoint(path, map_location="cpu")
    model.eval()
    return model


def evaluate_checkpoint(
    path: str | Path,
    episodes: int = 50,
    video: str | Path | None = None,
    video_episodes: int = 4,
    expert: bool = True,
    expert_cache_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the checkpoint's policy (and the expert) on ``episodes`` held-out seeds.

    Returns ``{"results": {name: summary}, "table": markdown, "video": path or None}``.
    """
    model = load_learner(path)
    hp = model.hparams
    seeds = eval_seeds(episodes)
    rows: dict[str, dict[str, float]] = {}
    if expert:
        cache = hp.expert_cache_dir if expert_cache_dir is None else expert_cache_dir
        rows["TO expert (MPC)"] = evaluate_expert(
            hp.env_id, seeds, model.env_kwargs, hp.expert, max_iter=hp.expert_max_iter,
            max_steps=hp.eval_max_steps, cache_dir=cache, progress=progress).summary()
    result, frames = evaluate_policy(model.policy.act, hp.env_id, seeds, model.env_kwargs,
                                     hp.eval_max_steps,
                                     video_episodes=video_episodes if video else 0,
                                     progress=progress,
                                     observation_keys=model.observation_keys)
    rows[f"policy ({Path(path).name})"] = result.summary()
    saved = None
    if video and frames:
        saved = str(save_video(frames, video, fps=int(make_env_fps(hp.env_id,
                                                                   model.env_kwargs))))
    title = f"{type(model).__name__} on {hp.env_id}: {episodes} held-out episodes"
    return {"results": rows, "table": format_report(rows, title), "video": saved,
            "checkpoint": str(path), "env_id": hp.env_id, "seeds": seeds}


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    from diffto.tasks.registry import use_osmesa_if_headless

    use_osmesa_if_headless()  # before anything imports mujoco, so videos render headless
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(prog="python -m diffto.learning.evaluate_goal",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a GoalConditionedBC or DAgger checkpoint (.ckpt)")
    p.add_argument("--episodes", type=int, default=50, help="held-out episodes (default 50)")
    p.add_argument("--video", default=None, help="write an MP4 of the first episodes here")
    p.add_argument("--video-episodes", type=int, default=4, help="episodes filmed (default 4)")
    p.add_argument("--no-expert", action="store_true", help="skip the expert's evaluation")
    p.add_argument("--expert-cache-dir", default=None,
                   help="cache of expert evaluations (default: the checkpoint's setting)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = evaluate_checkpoint(args.checkpoint, args.episodes, args.video, args.video_episodes,
                              expert=not args.no_expert, expert_cache_dir=args.expert_cache_dir)
    print_evaluation(out, args.json)


if __name__ == "__main__":
    main()
