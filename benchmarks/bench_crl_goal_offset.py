"""The same contrastive policies asked for another rollout goal: the hand's part of the goal.

With ``goal_features="achieved_goal_and_hand"`` a :class:`~diffto.learning.crl.ContrastiveRL`
policy is conditioned on ``[target, goal_hand_offset]``: the object at the target and the hand
at that offset from it. This script evaluates trained checkpoints twice on the same held-out
episodes (the report's: seeds ``EVAL_SEED_BASE + eval_episodes + j``, deterministic policy):
with the rollout goal they were trained with, and with the hand offset given by
``--hand-offset`` (three numbers, or ``dataset``: the mean offset at the final states of the
checkpoint's ``pretrain_dataset`` episodes, :func:`~diffto.learning.goal_off_policy.
dataset_hand_offset`). Nothing is retrained: a change in success is the goal alone.

Usage (about 10 min per checkpoint at 50 episodes with six training runs sharing the 2
cores here)::

    OMP_NUM_THREADS=1 python benchmarks/bench_crl_goal_offset.py \\
        runs/bench_crl/push-v3/crl_hand_goal_demos/seed*/checkpoints/last.ckpt \\
        --hand-offset dataset --episodes 50 --name crl_push_goal_offset

writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _results import machine_info, write_atomic

RESULTS = Path(__file__).parent / "results"


def run_label(checkpoint: Path) -> str:
    """``variant/seedK`` for a ``bench_crl_metaworld.py`` run's checkpoint, else the path."""
    parts = checkpoint.parts
    if len(parts) >= 4 and parts[-2] == "checkpoints" and parts[-3].startswith("seed"):
        return f"{parts[-4]}/{parts[-3]}"
    return str(checkpoint)


def rescore(checkpoint: Path, hand_offset: list[str], episodes: int) -> dict:
    """The checkpoint's final policy on ``episodes`` report episodes, with its own rollout goal
    and with ``hand_offset``."""
    from diffto.learning.crl import ContrastiveRL
    from diffto.learning.goal_off_policy import dataset_hand_offset

    # the dataset is not read (a checkpoint records a "dataset" hand offset as numbers)
    module = ContrastiveRL.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    hp = module.hparams
    if hp.goal_features != "achieved_goal_and_hand":
        raise SystemExit(f"{checkpoint}: goal_features is {hp.goal_features!r}; the goal has "
                         f"no hand part")
    if hand_offset == ["dataset"]:
        if hp.pretrain_dataset is None:
            raise SystemExit(f"--hand-offset dataset: {checkpoint} was trained without "
                             f"pretrain_dataset")
        other = dataset_hand_offset(hp.pretrain_dataset, hp.hand_slice)
    else:
        other = np.asarray([float(x) for x in hand_offset], dtype=np.float32)
    if other.shape != module.goal_hand_offset.shape:
        raise SystemExit(f"--hand-offset must have {module.goal_hand_offset.size} numbers, "
                         f"got {hand_offset}")
    row = {"checkpoint": str(checkpoint), "label": run_label(checkpoint)}
    for name, offset in (("own", module.goal_hand_offset.copy()), ("other", other)):
        module.goal_hand_offset = offset
        s = module.evaluate(episodes=episodes, offset=hp.eval_episodes)[0].summary()
        row[name] = {"hand_offset": [round(float(x), 4) for x in offset], "success_any":
                     s["success_any"], "success": s["success"],
                     "time_at_goal": s["time_at_goal"], "final_distance": s["final_distance"]}
        print(f"{row['label']}: hand offset {row[name]['hand_offset']}: success "
              f"{s['success_any']:.2f} (any) / {s['success']:.2f} (last)", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| checkpoint | own goal: hand offset | success any / last | time at goal "
             "| other goal: hand offset | success any / last | time at goal |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["label"]]
        for name in ("own", "other"):
            e = r[name]
            cells += [str(e["hand_offset"]), f"{e['success_any']:.2f} / {e['success']:.2f}",
                      f"{e['time_at_goal']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--hand-offset", nargs="+", default=["dataset"],
                        help="three numbers (hand − object), or 'dataset'")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--name", default="crl_goal_offset")
    args = parser.parse_args()
    missing = [str(c) for c in args.checkpoints if not c.is_file()]
    if missing:
        raise SystemExit(f"checkpoints: no file at {missing}")
    if args.episodes < 1:
        raise SystemExit(f"--episodes must be >= 1, got {args.episodes}")
    if args.hand_offset != ["dataset"]:
        try:
            [float(x) for x in args.hand_offset]
        except ValueError:
            raise SystemExit(f"--hand-offset must be 'dataset' or numbers, got "
                             f"{args.hand_offset}") from None
    torch.set_num_threads(1)
    rows = [rescore(c, args.hand_offset, args.episodes) for c in args.checkpoints]
    payload = {"benchmark": "bench_crl_goal_offset", "episodes": args.episodes,
               "hand_offset": args.hand_offset, "machine": machine_info(), "runs": rows}
    write_atomic(RESULTS / f"{args.name}.json", payload)
    (RESULTS / f"{args.name}.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
