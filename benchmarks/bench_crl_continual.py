"""Continual contrastive RL over MT10: the critic kept across tasks against the critic reset.

Runs ``metaworld_crl_continual.yaml`` once per ``--variants`` entry (``keep``:
``continual_reset=none``, ``reset_critic``: ``critic``, ``reset_all``: ``all``, a learner
started afresh per task) with ``--iterations-per-task`` iterations of 1,000 environment steps
per task, and collects each run's ``continual.json``: the success on every task after each
task, average performance, forgetting, and forward transfer of each variant against
``reset_all`` where that ran, else against ``reset_critic`` (said in the output). Results:
``benchmarks/results/<name>.{json,md}`` and ``<name>.png`` (the success matrices).
A finished run is not repeated; an unfinished one (killed, or stopped at a session's end)
goes on from its last checkpoint, with its replay buffer (``checkpoint_buffer``).

Usage::

    python benchmarks/bench_crl_continual.py --variants keep reset_critic \\
        --iterations-per-task 50 --name crl_continual
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml
from _results import fit_once, machine_info, write_atomic

CONFIG = Path(__file__).resolve().parents[1] / "lightning_configs" / "metaworld_crl_continual.yaml"
RESETS = {"keep": "none", "reset_critic": "critic", "reset_all": "all"}


def config(variant: str, iterations_per_task: int, seed: int, root: Path) -> dict:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["seed_everything"] = seed
    args = cfg["model"]["init_args"]
    args.update(continual_reset=RESETS[variant], iterations_per_task=iterations_per_task,
                checkpoint_buffer=True)
    tr = cfg["trainer"]
    tr.update(max_steps=iterations_per_task * len(args["task_sequence"]),
              val_check_interval=max(1, iterations_per_task // 5),  # 5 points per task curve
              enable_progress_bar=False)
    tr["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(root), "name": "logs"}}
    for cb in tr.get("callbacks", []):
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(root / "checkpoints")
    return cfg


def main() -> None:
    from diffto.learning.continual_metrics import forward_transfer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["keep", "reset_critic"],
                        choices=list(RESETS))
    parser.add_argument("--iterations-per-task", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="crl_continual")
    parser.add_argument("--runs-dir", default="runs/bench_crl_continual")
    args = parser.parse_args()
    t0 = time.perf_counter()
    runs = {}
    for variant in args.variants:
        root = Path(args.runs_dir) / f"{variant}_{args.iterations_per_task}" / f"seed{args.seed}"
        cfg = config(variant, args.iterations_per_task, args.seed, root)
        tasks = [t["task"] for t in cfg["model"]["init_args"]["task_sequence"]]
        n_tasks = len(tasks)
        runs[variant] = fit_once(
            cfg, root, root / "fit.log", report="continual.json", resume=True,
            finished=lambda report, n_tasks=n_tasks: len(report["after_task"]) == n_tasks)
        print(variant, runs[variant]["metrics"])
    ref_name = "reset_all" if "reset_all" in runs else "reset_critic"
    if ref_name in runs:
        ref = [r["auc"] for r in runs[ref_name]["after_task"]]
        for variant, r in runs.items():
            if variant != ref_name:
                ft = forward_transfer([x["auc"] for x in r["after_task"]], ref)
                r["forward_transfer_per_task"] = ft
                r["forward_transfer"] = float(np.nanmean(ft))
                r["forward_transfer_reference"] = ref_name
    payload = {"benchmark": "bench_crl_continual", "tasks": tasks,
               "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": machine_info(), "iterations_per_task": args.iterations_per_task,
               "seed": args.seed, "wall_time_s": time.perf_counter() - t0, "runs": runs}
    out = Path(__file__).resolve().parent / "results"
    write_atomic(out / f"{args.name}.json", payload)
    (out / f"{args.name}.md").write_text(table(payload))
    plot(payload, out / f"{args.name}.png")
    print(table(payload))


def table(payload: dict) -> str:
    tasks = [t.removesuffix("-v3") for t in payload["tasks"]]
    lines = [f"### MT10 in sequence, {payload['iterations_per_task']} k environment steps per "
             f"task, seed {payload['seed']}", "",
             "| variant | average performance | forgetting | forward transfer | training min |",
             "|---|---|---|---|---|"]
    for v, r in payload["runs"].items():
        m = r["metrics"]
        ft = (f"{r['forward_transfer']:.2f} (vs {r['forward_transfer_reference']})"
              if "forward_transfer" in r else "reference")
        lines.append(f"| {v} | {m['average_performance']:.2f} | {m['forgetting']:.2f} | {ft} | "
                     f"{training_minutes(r):.0f} |")
    for v, r in payload["runs"].items():
        lines += ["", f"{v}: success on each task (columns) after training task k (rows)", "",
                  "| after | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for row in r["after_task"]:
            lines.append(f"| {tasks[row['task']]} | "
                         + " | ".join(f"{x:.1f}" for x in row["success"]) + " |")
    return "\n".join(lines) + "\n"


def training_minutes(run: dict) -> float:
    """Training minutes of a run over all its resumes (evaluations excluded), or the wall time
    of its last process for reports that predate the per-task training time."""
    seconds = run["after_task"][-1].get("training_time_s", run.get("wall_time_s", float("nan")))
    return seconds / 60


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 5), squeeze=False)
    tasks = [t.removesuffix("-v3") for t in payload["tasks"]]
    for ax, (v, r) in zip(axes[0], runs.items(), strict=True):
        R = np.full((len(tasks), len(tasks)), np.nan)
        for row in r["after_task"]:
            R[row["task"]] = row["success"]
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after training task")
        ax.set_title(f"{v}: average performance {r['metrics']['average_performance']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
