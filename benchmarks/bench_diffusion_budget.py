"""Why the diffusion policy trails BC on Metaworld's precision tasks: training budget or
open-loop action chunks.

One ``metaworld_diffusion.yaml`` policy for ``--tasks`` (default push, pick-place and
peg-insert-side, the three where it trails BC in the MT10 table) is trained for ``--epochs``
epochs with a checkpoint every ``--every``; each checkpoint is evaluated on the same
``--episodes`` held-out variants per task executing 4 actions of each 8-action chunk (as
trained) and 1 (predicting again at every step: closed loop). ``metaworld_bc.yaml`` on the
same tasks and demonstrations is the reference row. An epoch passes once over every task's
demonstrations, so after 60 epochs (the config's default) each task has been seen as often
as in the MT10 run, and the later checkpoints give 2, 3 and 4 times that budget. A finished
fit or evaluation is not repeated (rerun after a kill). Results:
``benchmarks/results/<name>.{json,md}``.

Usage::

    python benchmarks/bench_diffusion_budget.py --epochs 240 --every 60 --episodes 50
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml
from _results import command_line, fit_once, machine_info, run_config, write_atomic, write_results

from diffto.cli import resolve_config
from diffto.learning.evaluate_offline import evaluate_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
PRECISION_TASKS = ["push-v3", "pick-place-v3", "peg-insert-side-v3"]


def config(name: str, root: Path, tasks: list[str], demos: int, epochs: int, every: int,
           seed: int, episodes: int, keep_every: bool) -> dict:
    """The shipped config ``name`` on ``tasks`` with ``demos`` demonstrations per task; with
    ``keep_every``, a checkpoint ``keep-epoch=<e>.ckpt`` kept every ``every`` epochs."""
    cfg = run_config(yaml.safe_load(Path(resolve_config(name)).read_text()), root, epochs,
                     every, seed)
    cfg["model"]["init_args"].update(tasks=tasks, report_episodes=episodes, video_episodes=0)
    cfg["data"]["init_args"]["demos_per_task"] = demos
    if keep_every:
        cfg["trainer"]["callbacks"].append({
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "checkpoints"), "filename": "keep-{epoch}",
                          "save_top_k": -1, "every_n_epochs": every,
                          "save_on_train_epoch_end": True}})
    return cfg


def evaluate_once(ckpt: Path, episodes: int, steps: int, cache: Path) -> dict:
    """``evaluate_checkpoint`` of ``ckpt`` with ``steps`` actions per chunk, cached."""
    if cache.exists():
        return json.loads(cache.read_text())
    out = evaluate_checkpoint(ckpt, episodes, expert=True, progress=False, action_steps=steps)
    out.pop("table", None)
    write_atomic(cache, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=PRECISION_TASKS)
    p.add_argument("--demos", type=int, default=50, help="demonstrations per task")
    p.add_argument("--epochs", type=int, default=240)
    p.add_argument("--every", type=int, default=60, help="epochs between checkpoints")
    p.add_argument("--action-steps", type=int, nargs="+", default=[4, 1])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--episodes", type=int, default=50, help="held-out variants per task")
    p.add_argument("--root", default="runs/bench/diffusion_budget")
    p.add_argument("--name", default="metaworld_diffusion_budget", help="results file name")
    args = p.parse_args()
    if min(args.demos, args.episodes) < 1 or args.every < 2 or args.epochs % args.every:
        p.error("--demos and --episodes must be >= 1, --every >= 2 (the config's own "
                "checkpoint saves every epoch) and --epochs a multiple of --every")
    diffusion_cfg = yaml.safe_load(Path(resolve_config("metaworld_diffusion.yaml")).read_text())
    chunk = diffusion_cfg["model"]["init_args"]["action_horizon"]
    if any(not 1 <= s <= chunk for s in args.action_steps):
        p.error(f"--action-steps must lie in [1, {chunk}] (the chunk's length), got "
                f"{args.action_steps}")
    t0 = time.perf_counter()
    root = Path(args.root)
    bc = fit_once(config("metaworld_bc.yaml", root / "bc", args.tasks, args.demos, 50, 10,
                         args.seed, args.episodes, False), root / "bc", root / "bc" / "fit.log")
    diffusion = root / "diffusion"
    fitted = fit_once(config("metaworld_diffusion.yaml", diffusion, args.tasks, args.demos,
                             args.epochs, args.every, args.seed, args.episodes, True),
                      diffusion, diffusion / "fit.log")
    rows = {"scripted expert": {t: bc["results"]["expert"][t]["success"] for t in args.tasks},
            "bc (50 epochs), last": {t: bc["results"]["last checkpoint"][t]["success"]
                                     for t in args.tasks}}
    kept = {}  # Lightning's {epoch} counts from 0: keep-epoch=59 closes epoch 60
    for ckpt in diffusion.glob("checkpoints/keep-epoch=*.ckpt"):
        match = re.fullmatch(r"keep-epoch=(\d+)", ckpt.stem)
        if match is None:  # e.g. keep-epoch=59-v1 from a fit restarted beside an old one
            raise RuntimeError(f"{ckpt} is not a checkpoint of this fit: clear {diffusion}")
        kept[int(match.group(1)) + 1] = ckpt
    for epoch, ckpt in sorted(kept.items()):
        for steps in args.action_steps:
            out = evaluate_once(ckpt, args.episodes, steps, diffusion / (
                f"eval_epochs{epoch}_steps{steps}_episodes{args.episodes}.json"))
            policy = next(k for k in out["results"] if k.startswith("policy"))
            rows[f"diffusion, {epoch} epochs, {steps} of {chunk} actions per chunk"] = {
                t: out["results"][policy][t]["success"] for t in args.tasks}
        print(f"epoch {epoch} evaluated ({time.perf_counter() - t0:.0f} s)", flush=True)
    short = [t.removesuffix("-v3") for t in args.tasks]
    lines = ["| controller | " + " | ".join(short) + " | mean |", "|---" * (len(short) + 2) + "|"]
    for name, res in rows.items():
        values = [res[t] for t in args.tasks]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values)
                     + f" | {sum(values) / len(values):.3f} |")
    md = "\n".join(lines)
    payload = {"benchmark": "metaworld_diffusion_budget",
               "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "command": command_line(), "tasks": args.tasks, "demos_per_task": args.demos,
               "episodes_per_task": args.episodes, "success": rows,
               "fit_wall_time_s": {"bc": bc.get("wall_time_s"),
                                   "diffusion": fitted.get("wall_time_s")},
               "wall_time_s": time.perf_counter() - t0, "machine": machine_info()}
    write_results(RESULTS, args.name, payload, md)


if __name__ == "__main__":
    main()
