"""Goal-conditioned RL on Metaworld MT1 tasks: contrastive RL, its remedies and SAC + HER.

Every variant (``--variants``, from :data:`VARIANTS`: a shipped config plus overrides) is run
with ``lightning fit`` on ``--task`` (the Panda variants: ``panda_crl.yaml`` from scratch or
with the critic pre-trained on ``runs/datasets/panda_reach``, the TO dataset of
``panda_to_dataset.yaml``; ``--task`` then only labels the results; the ``_demos`` variants:
the task's scripted-expert episodes in the replay buffer from the start) for ``--iterations``
iterations of 1,000 environment steps and every ``--seeds``, validation every ``--val-every``
iterations. Each run's end-of-fit report (final and best checkpoints and the scripted
expert, on the same held-out episodes) and learning curve are collected into
``benchmarks/results/<name>.{json,md}`` with ``<name>.png`` (success over environment
steps and wall time, every run). A run whose report exists is not run again (rerun the
command after a kill).

Usage::

    python benchmarks/bench_crl_metaworld.py --task reach-v3 --variants crl sac_her \\
        --seeds 0 1 2 --iterations 50 --name crl_reach
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml
from _results import fit_once, machine_info, write_atomic

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
VARIANTS: dict[str, tuple[str, dict]] = {
    "crl": ("metaworld_crl.yaml", {}),
    "crl_hand_goal": ("metaworld_crl.yaml", {"goal_features": "achieved_goal_and_hand"}),
    "crl_utd_1_4": ("metaworld_crl.yaml", {"env_steps_per_update": 4}),
    "crl_deep_residual": ("metaworld_crl.yaml", {"depth": 4, "residual": True}),
    "crl_hand_goal_deep": ("metaworld_crl.yaml", {"goal_features": "achieved_goal_and_hand",
                                                  "depth": 4, "residual": True}),
    # the task's scripted-expert episodes in the buffer from the start (runs/datasets/
    # metaworld_{task}, e.g. metaworld_pick_place: see demos_command): futures in which the
    # object moves, for the critic; with the actor pre-trained on them as well
    "crl_hand_goal_demos": ("metaworld_crl.yaml", {
        "goal_features": "achieved_goal_and_hand",
        "pretrain_dataset": "runs/datasets/metaworld_{task}", "pretrain_updates": 2000}),
    "crl_hand_goal_demos_actor": ("metaworld_crl.yaml", {
        "goal_features": "achieved_goal_and_hand",
        "pretrain_dataset": "runs/datasets/metaworld_{task}", "pretrain_updates": 2000,
        "pretrain_actor": True}),
    # the same demonstrations keeping a quarter of every batch once online episodes arrive
    "crl_hand_goal_demos_fraction": ("metaworld_crl.yaml", {
        "goal_features": "achieved_goal_and_hand",
        "pretrain_dataset": "runs/datasets/metaworld_{task}", "pretrain_updates": 2000,
        "dataset_fraction": 0.25}),
    # ... and the actor pulled towards the demonstrations' actions on those rows (bc_weight)
    "crl_hand_goal_demos_bc": ("metaworld_crl.yaml", {
        "goal_features": "achieved_goal_and_hand",
        "pretrain_dataset": "runs/datasets/metaworld_{task}", "pretrain_updates": 2000,
        "dataset_fraction": 0.25, "bc_weight": 1.0}),
    "crl_hand_goal_demos_bc_0_1": ("metaworld_crl.yaml", {
        "goal_features": "achieved_goal_and_hand",
        "pretrain_dataset": "runs/datasets/metaworld_{task}", "pretrain_updates": 2000,
        "dataset_fraction": 0.25, "bc_weight": 0.1}),
    # the rollout goal's hand part where the demonstrations end (the hand above the held
    # object, goal_hand_offset="dataset") instead of at the object's centre, out of reach
    "crl_hand_goal_demos_offset": ("metaworld_crl.yaml", {
        "goal_features": "achieved_goal_and_hand", "goal_hand_offset": "dataset",
        "pretrain_dataset": "runs/datasets/metaworld_{task}", "pretrain_updates": 2000}),
    "crl_hand_goal_demos_bc_offset": ("metaworld_crl.yaml", {
        "goal_features": "achieved_goal_and_hand", "goal_hand_offset": "dataset",
        "pretrain_dataset": "runs/datasets/metaworld_{task}", "pretrain_updates": 2000,
        "dataset_fraction": 0.25, "bc_weight": 1.0}),
    "sac_her": ("metaworld_sac_her.yaml", {}),
    "sac_her_utd_1_2": ("metaworld_sac_her.yaml", {"env_steps_per_update": 2}),
    "sac_her_hand_goal": ("metaworld_sac_her.yaml",
                          {"goal_features": "achieved_goal_and_hand"}),
    # SAC + HER given what crl_hand_goal_demos_bc_offset is given: the same demonstrations,
    # share of every batch, pull towards their actions and reachable rollout goal
    "sac_her_hand_goal_demos_bc_offset": ("metaworld_sac_her.yaml", {
        "goal_features": "achieved_goal_and_hand", "goal_hand_offset": "dataset",
        "pretrain_dataset": "runs/datasets/metaworld_{task}", "pretrain_updates": 2000,
        "dataset_fraction": 0.25, "bc_weight": 1.0}),
    # the Panda reach task (--task is then only the results' label)
    "panda_crl": ("panda_crl.yaml", {}),
    "panda_crl_pretrained": ("panda_crl.yaml", {"pretrain_dataset": "runs/datasets/panda_reach",
                                                "pretrain_updates": 2000}),
    "panda_crl_pretrained_actor": ("panda_crl.yaml", {
        "pretrain_dataset": "runs/datasets/panda_reach", "pretrain_updates": 2000,
        "pretrain_actor": True, "warmup_steps": 0}),
}
"""name -> (config, model overrides)."""


def variant_config(variant: str, task: str, iterations: int, val_every: int, seed: int,
                   root: Path, episodes: int) -> dict:
    config, overrides = VARIANTS[variant]
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    cfg = copy.deepcopy(cfg)
    cfg["seed_everything"] = seed
    tr = cfg["trainer"]
    tr.update(max_steps=iterations, val_check_interval=val_every, enable_progress_bar=False)
    tr["logger"] = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                     "init_args": {"save_dir": str(root), "name": "logs"}}]
    for cb in tr.get("callbacks", []):
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(root / "checkpoints")
    args = cfg["model"]["init_args"]
    if args["env_id"] == "diffto/Metaworld-v0":
        args["env_kwargs"]["task"] = task
    args["report_episodes"] = episodes
    short = task.removesuffix("-v3").replace("-", "_")
    args.update({k: v.replace("{task}", short) if isinstance(v, str) else v
                 for k, v in overrides.items()})
    data = args.get("pretrain_dataset")
    if data is not None and not Path(data).exists():
        make = demos_command(task, data) if "{task}" in overrides.get("pretrain_dataset", "") \
            else "lightning predict --config lightning_configs/panda_to_dataset.yaml"
        raise SystemExit(f"variant {variant}: {data} does not exist; make it with\n  {make}")
    return cfg


def demos_command(task: str, folder: str) -> str:
    """The command that collects ``task``'s scripted-expert episodes into ``folder``."""
    return (f"lightning predict --config lightning_configs/metaworld_experts.yaml "
            f"--data.tasks='[{task}]' --data.output_dir={folder} "
            f"--trainer.default_root_dir={folder}")


def first_reaching(history: list[dict], level: float) -> dict | None:
    """The first validation point with success >= level."""
    return next((p for p in history if p["success"] >= level), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="reach-v3")
    parser.add_argument("--variants", nargs="+", default=["crl"], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--val-every", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--name", default=None)
    parser.add_argument("--runs-dir", default="runs/bench_crl")
    args = parser.parse_args()
    name = args.name or f"crl_{args.task.removesuffix('-v3').replace('-', '_')}"
    out = Path(__file__).resolve().parent / "results"
    runs: dict[str, dict] = {}
    t_start = time.perf_counter()
    configs = {(variant, seed): variant_config(  # every config checked before the first run
        variant, args.task, args.iterations, args.val_every, seed,
        Path(args.runs_dir) / args.task / variant / f"seed{seed}", args.episodes)
        for variant in args.variants for seed in args.seeds}
    for variant in args.variants:
        for seed in args.seeds:
            root = Path(args.runs_dir) / args.task / variant / f"seed{seed}"
            cfg = configs[variant, seed]
            log = root / "fit.log"
            root.mkdir(parents=True, exist_ok=True)
            report = fit_once(cfg, root, log)
            curves = sorted(root.glob("logs/version_*/curves.json"))
            history = json.loads(curves[-1].read_text())["history"] if curves else []
            metrics = sorted(root.glob("logs/version_*/metrics.csv"))
            runs[f"{variant}/seed{seed}"] = {
                "variant": variant, "seed": seed, "report": report, "history": history,
                "first_0.9": first_reaching(history, 0.9),
                "throughput": _throughput(metrics[-1]) if metrics else {}}
            print(f"{variant} seed {seed}: final {report['results']['final policy']}")
    payload = {"benchmark": "bench_crl_metaworld", "task": args.task,
               "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": machine_info(), "iterations": args.iterations,
               "env_steps_per_iteration": 1000, "episodes": args.episodes,
               "wall_time_s": time.perf_counter() - t_start, "runs": runs}
    write_atomic(out / f"{name}.json", payload)
    (out / f"{name}.md").write_text(table(payload))
    from diffto.learning.learning_curves import plot_runs

    expert = next((r["report"]["results"].get("scripted expert") for r in runs.values()), None)
    plot_runs({k: r["history"] for k, r in runs.items()}, out / f"{name}.png",
              title=f"{args.task}: success on held-out episodes",
              baselines={"scripted expert": expert["success_any"]} if expert else None)
    print(table(payload))


def _throughput(metrics_csv: Path) -> dict[str, float]:
    import csv

    rows = list(csv.DictReader(open(metrics_csv)))

    def med(key: str) -> float:
        v = [float(r[key]) for r in rows if r.get(key)]
        return float(np.median(v)) if v else float("nan")

    return {"collect_steps_per_s": med("time/collect_steps_per_s"),
            "env_steps_per_s": med("time/env_steps_per_s"), "update_ms": med("time/update_ms")}


def table(payload: dict) -> str:
    lines = [f"### {payload['task']}: {payload['iterations']} k environment steps per run, "
             f"{payload['episodes']} held-out episodes", "",
             "| run | final: success any / last step | time at goal | best ckpt success | "
             "first val ≥ 0.9 (k steps, training min) | training min | collect / overall steps/s | "
             "ms per update |", "|---|---|---|---|---|---|---|---|"]
    expert = None
    for key, r in payload["runs"].items():
        res = r["report"]["results"]
        expert = res.get("scripted expert", expert)
        f, b = res["final policy"], res.get("best checkpoint")
        first = r["first_0.9"]
        reach = (f"{first['env_steps'] / 1e3:.0f} k, {first['wall_time_s'] / 60:.1f} min"
                 if first else "never")
        th = r["throughput"]
        lines.append(
            f"| {key} | {f['success_any']:.2f} / {f['success']:.2f} | "
            f"{f.get('time_at_goal', float('nan')):.2f} | "
            f"{b['success_any'] if b else float('nan'):.2f} | {reach} | "
            f"{r['history'][-1]['wall_time_s'] / 60 if r['history'] else float('nan'):.1f} | "
            f"{th.get('collect_steps_per_s', float('nan')):.0f} / "
            f"{th.get('env_steps_per_s', float('nan')):.0f} | "
            f"{th.get('update_ms', float('nan')):.1f} |")
    if expert:
        lines.append(f"| scripted expert | {expert['success_any']:.2f} / {expert['success']:.2f} "
                     f"| {expert.get('time_at_goal', float('nan')):.2f} | | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
