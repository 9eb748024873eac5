"""Offline learners on Metaworld MT10 against the scripted expert, by number of demonstrations.

For every learner (``bc``: ``metaworld_bc.yaml``, ``diffusion``: ``metaworld_diffusion.yaml``,
or any config given as ``name=config.yaml``), every number of demonstrations per task
(``--demos``) and every training seed, one ``lightning fit`` of the shipped config with
``data.demos_per_task`` set (with ``--per-task``, one per task); the number of gradient
steps is kept equal across demonstration counts (the config's epochs at 50 demonstrations,
scaled by 50 / demos), with five validations per run. Each run's end-of-fit report (the
expert, the best and the last checkpoint on the same ``--episodes`` held-out variants per
task, seeds ``EVAL_SEED_BASE + j``) is collected into one table per task: success and the
number of tasks on which a learner reaches 0.9 of the expert's success. With ``--per-task``
each task gets its own single-task policy (same epochs, so each sees its own demonstrations
as often as the multi-task policy does); ``--set KEY=YAML`` overrides a config entry in every
run (``trainer.max_epochs=50``, ``model.init_args.input_indices=[...]``). A run whose report
exists is not run again (rerun the command after a kill). Results:
``benchmarks/results/<name>.{json,md}``.

Usage::

    python benchmarks/bench_metaworld_offline.py --learners bc diffusion --demos 10 50 100 \\
        --seeds 1 --episodes 50
    python benchmarks/bench_metaworld_offline.py --learners bc --demos 10 --seeds 1 2 3 \\
        --per-task --set "model.init_args.input_indices=[2, 3, 6, 39, 40, 41, 42, 43, 44, \\
        45, 46, 47]" --name metaworld_offline_bc_relative_per_task
"""

from __future__ import annotations

import argparse
import copy
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml
from _results import command_line, fit_once, machine_info, run_config, write_results

from diffto.cli import resolve_config

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {"bc": "metaworld_bc.yaml", "diffusion": "metaworld_diffusion.yaml"}


def learner_config(base: dict, root: Path, demos: int, seed: int, episodes: int,
                   data: str | None, task: str | None = None,
                   overrides: dict[str, object] | None = None) -> dict:
    """The shipped config for ``demos`` demonstrations per task, equal gradient steps, then
    ``overrides`` (dotted keys such as ``model.init_args.hidden`` -> values); only ``task``
    when given. Validation stays within the run when an override shortens it."""
    epochs = max(5, int(round(base["trainer"]["max_epochs"] * 50 / demos / 5)) * 5)
    cfg = apply_overrides(run_config(base, root, epochs, epochs // 5, seed), overrides or {})
    model = cfg["model"]["init_args"]
    model.update(report_episodes=episodes, video_episodes=0)
    if task is not None:
        model["tasks"] = [task]
    d = cfg["data"]["init_args"]
    d["demos_per_task"] = demos
    if data is not None:
        d["path"] = data
    trainer = cfg["trainer"]
    if trainer["check_val_every_n_epoch"] > trainer["max_epochs"]:
        trainer["check_val_every_n_epoch"] = max(1, trainer["max_epochs"] // 5)
    return cfg


def apply_overrides(cfg: dict, overrides: dict[str, object]) -> dict:
    """``cfg`` (changed in place and returned) with each dotted key set to its value."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"--set {key}: {part!r} is not a section of the config")
            node = node[part]
        node[leaf] = value
    return cfg


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``["a.b=YAML", ...]`` -> ``{"a.b": value}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=YAML (e.g. model.init_args.lr=3e-4), got "
                             f"{item!r}")
        out[key] = yaml.safe_load(value)
    return out


def table(rows: dict[str, dict[str, float]], tasks: list[str]) -> str:
    """Markdown: one row per controller, success per task, mean, tasks >= 0.9 x expert."""
    short = [t.removesuffix("-v3") for t in tasks]
    lines = ["| controller | " + " | ".join(short) + " | mean | tasks ≥ 0.9 × expert |",
             "|---" * (len(tasks) + 3) + "|"]
    expert = rows.get("scripted expert")
    for name, res in rows.items():
        cells = [f"{res[t]:.2f}" for t in tasks]
        n = "—" if expert is None else str(sum(res[t] >= 0.9 * expert[t] - 1e-12
                                               for t in tasks))
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {np.mean([res[t] for t in tasks]):.3f} | {n}/{len(tasks)} |")
    return "\n".join(lines)


def merge_reports(reports: list[dict]) -> dict:
    """One report of several single-task reports (one of them: itself): per-task results
    side by side, wall times summed, the time per action of the first."""
    if len(reports) == 1:
        return reports[0]
    merged = {"results": {}, "tasks": [], "epochs": reports[0]["epochs"],
              "wall_time_s": sum(r.get("wall_time_s") or 0.0 for r in reports),
              "time_per_action_s": reports[0].get("time_per_action_s")}
    for r in reports:
        merged["tasks"] += r["tasks"]
        for row, per_task in r["results"].items():
            merged["results"].setdefault(row, {}).update(per_task)
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--learners", nargs="+", default=["bc", "diffusion"],
                   help="bc, diffusion, or name=config.yaml")
    p.add_argument("--demos", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--episodes", type=int, default=50, help="held-out variants per task")
    p.add_argument("--data", default=None, help="dataset (default: the configs')")
    p.add_argument("--root", default="runs/bench/metaworld_offline")
    p.add_argument("--name", default="metaworld_offline", help="results file name")
    p.add_argument("--per-task", action="store_true",
                   help="one single-task policy per task instead of one for all")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML",
                   help="config overrides, e.g. model.init_args.hidden=[256,256]")
    args = p.parse_args()
    try:
        overrides = parse_overrides(args.set)
    except ValueError as err:
        p.error(str(err))
    for n in args.demos:
        if n < 1:
            p.error(f"--demos must be >= 1, got {n}")
    learners = {}
    for item in args.learners:
        name, _, config = item.partition("=")
        if not config and name not in CONFIGS:
            p.error(f"--learners: {item!r} is neither one of {sorted(CONFIGS)} nor name=config")
        learners[name] = config or CONFIGS[name]
    t0 = time.perf_counter()
    runs: dict[str, dict] = {}
    tasks: list[str] = []
    for name, config in learners.items():
        base = yaml.safe_load(Path(resolve_config(config)).read_text())
        try:
            tasks = tasks or list(apply_overrides(copy.deepcopy(base), overrides)[
                "model"]["init_args"]["tasks"])
        except ValueError as err:
            p.error(str(err))
        for demos in args.demos:
            for seed in args.seeds:
                key = f"{name}_{demos}_s{seed}"
                parts = {}
                for task in (tasks if args.per_task else [None]):
                    sub = key if task is None else f"{key}_{task}"
                    root = Path(args.root) / sub
                    print(f"{sub} ...", flush=True)
                    cfg = learner_config(base, root, demos, seed, args.episodes, args.data,
                                         task, overrides)
                    parts[sub] = fit_once(cfg, root, root / "fit.log")
                    parts[sub]["epochs"] = cfg["trainer"]["max_epochs"]
                    print(f"{sub} done ({time.perf_counter() - t0:.0f} s)", flush=True)
                runs[key] = merge_reports(list(parts.values()))
                runs[key].update(learner=name, demos=demos, seed=seed)
    first = next(iter(runs.values()))
    rows: dict[str, dict[str, float]] = {}
    if "expert" in first["results"]:
        rows["scripted expert"] = {t: first["results"]["expert"][t]["success"] for t in tasks}
    for which in ("last checkpoint", "best checkpoint"):
        for name in learners:
            for demos in args.demos:
                keys = [f"{name}_{demos}_s{s}" for s in args.seeds]
                rows[f"{name}, {demos} demos, {which.split()[0]}"] = {
                    t: float(np.mean([runs[k]["results"][which][t]["success"] for k in keys]))
                    for t in tasks}
    md = table(rows, tasks)
    timing = {k: {"wall_time_s": r.get("wall_time_s"), "epochs": r["epochs"],
                  "time_per_action_s": r.get("time_per_action_s")} for k, r in runs.items()}
    payload = {"benchmark": "metaworld_offline",
               "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "command": command_line(),
               "episodes_per_task": args.episodes, "seeds": args.seeds, "tasks": tasks,
               "success": rows, "runs": timing,
               "per_run_success": {k: {w: {t: r["results"][w][t]["success"] for t in tasks}
                                       for w in ("best checkpoint", "last checkpoint")}
                                   for k, r in runs.items()},
               "wall_time_s": time.perf_counter() - t0, "machine": machine_info()}
    write_results(RESULTS, args.name, payload, md)


if __name__ == "__main__":
    main()
