"""DAgger against behaviour cloning at the same number of expert labels, over training seeds.

One expert label is one MPC solve. DAgger spends ``initial_transitions`` labels on expert
episodes (round 0), then ``rounds × episodes_per_round × episode length`` labels on the
states its learner visits; plain BC (``GoalConditionedBC``) gets the *same total* as expert
transitions from the same dataset (``data.max_transitions``), and the same number of epochs
(so at least as many gradient steps: its data are that large from the start). Optionally BC
on the whole dataset (``--full-bc``) gives the figure of BC without a label budget.

Every run is a ``lightning fit`` (``python -m diffto fit``) of a config generated from a BC
config (``--config``, e.g. ``pendulum_bc.yaml``): the DAgger config copies its model
settings and adds DAgger's. Each run's end-of-fit report (expert, best and last checkpoint on
the same held-out episodes, seeds ``EVAL_SEED_BASE + j``) is collected; the table gives
means and standard deviations over training seeds. A run whose report exists is not run
again (rerun the command after a kill). Results: ``benchmarks/results/<name>.json``.

Usage::

    python benchmarks/bench_dagger_vs_bc.py --config pendulum_bc.yaml \\
        --data runs/datasets/pendulum_swingup --seeds 0 1 2 --initial-transitions 500 \\
        --rounds 2 --episodes-per-round 8 --epochs-per-round 100 --beta 1 --beta-decay 0.5 \\
        --label-tol 1e-3 --label-max-iter 10 --label-first-max-iter 200
"""

from __future__ import annotations

import argparse
import copy
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml
from _results import fit_once, machine_info, run_config, write_atomic

from diffto.cli import resolve_config

RESULTS = Path(__file__).resolve().parent / "results"


def bc_config(base: dict, root: Path, seed: int, epochs: int, val_every: int,
              data: str | None, max_transitions: int | None) -> dict:
    cfg = run_config(base, root, epochs, val_every, seed)
    cfg["model"]["init_args"]["video_episodes"] = 0
    d = cfg["data"]["init_args"]
    if data is not None:
        d["path"] = data
    d["max_transitions"] = max_transitions
    d["val_fraction"] = 0.0  # every label trains; validation is the closed-loop evaluation
    return cfg


def dagger_config(base: dict, root: Path, seed: int, args: argparse.Namespace) -> dict:
    epochs = (args.rounds + 1) * args.epochs_per_round
    cfg = run_config(base, root, epochs, args.epochs_per_round, seed)
    cfg["trainer"]["reload_dataloaders_every_n_epochs"] = 1
    model = copy.deepcopy(cfg["model"]["init_args"])
    model.update(
        initial_data=args.data or cfg["data"]["init_args"]["path"],
        initial_transitions=args.initial_transitions, rounds=args.rounds,
        epochs_per_round=args.epochs_per_round, episodes_per_round=args.episodes_per_round,
        beta=args.beta, beta_decay=args.beta_decay, keep_unconverged=args.keep_unconverged,
        data_dir=str(root / "labels"),
        label_max_iter=args.label_max_iter, label_first_max_iter=args.label_first_max_iter,
        label_expert=_label_expert(model.get("expert"), args.label_tol),
        label_warm_start=args.label_warm_start,
        batch_size=cfg["data"]["init_args"].get("batch_size", 256), lr_schedule="constant",
        video_episodes=0)
    cfg["model"] = {"class_path": "diffto.learning.dagger.DAgger", "init_args": model}
    cfg.pop("data", None)
    return cfg


def _label_expert(expert: dict | None, tol: float | None) -> dict | None:
    """The labelling expert: the config's evaluated ``expert`` with ``tol`` (the TO dataset's
    tolerance) when given, else ``None`` (DAgger then labels with ``expert`` itself)."""
    if tol is None:
        return None
    if expert is None:
        raise ValueError("--label-tol needs the config's model.init_args.expert to be set")
    spec = copy.deepcopy(expert)
    spec.setdefault("init_args", {})["tol"] = tol
    return spec


def summarize(reports: list[dict]) -> dict:
    """Mean and standard deviation over seeds of the best and last checkpoints' figures."""
    out: dict = {"seeds": len(reports), "labels": [r.get("labels") for r in reports],
                 "wall_time_s": [r.get("wall_time_s") for r in reports]}
    for which in ("best checkpoint", "last checkpoint"):
        for key in ("success", "final_distance", "time_per_action_s"):
            vals = [r["results"][which][key] for r in reports if which in r["results"]]
            if vals:
                out[f"{which.split()[0]}_{key}"] = {"mean": float(np.mean(vals)),
                                                    "std": float(np.std(vals)),
                                                    "values": vals}
    return out


def _mean_std(s: dict, key: str, fmt: str = "{:.1%}") -> str:
    if key not in s:
        return "—"
    return f"{fmt.format(s[key]['mean'])} ± {fmt.format(s[key]['std'])}"


def table(summary: dict) -> str:
    ms = _mean_std
    lines = ["| method | labels | success, best ckpt | success, last ckpt | final distance, "
             "last ckpt | time per action |", "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        labels = s["labels"]
        label = "—" if labels is None else str(labels)
        lines.append(f"| {name} | {label} | {ms(s, 'best_success')} | "
                     f"{ms(s, 'last_success')} | {ms(s, 'last_final_distance', '{:.3g}')} | "
                     f"{ms(s, 'last_time_per_action_s', '{:.2g} s')} |")
    return "\n".join(lines)


def make_data(path: Path, env_id: str, expert: dict | None, episodes: int,
              keep_unconverged: bool) -> None:
    """Expert episodes (seeds ``0 .. episodes−1``, the expert acting: β = 1) in the dataset
    format, for a run without a TO dataset from ``lightning predict``."""
    import torch

    from diffto.data.trajectories import save_trajectories
    from diffto.learning.dagger import collect_labels
    from diffto.learning.goal_evaluation import build_expert

    torch.set_num_threads(1)
    data, counts = collect_labels(lambda o, g: np.zeros((len(o), 1)), build_expert(env_id, expert),
                                  env_id, list(range(episodes)), beta=1.0,
                                  keep_unconverged=keep_unconverged)
    data.meta.update(labels=counts["labels"], converged=counts["converged"])
    save_trajectories(path, data)
    print(f"expert data: {path} ({counts})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="pendulum_bc.yaml", help="the BC config (a shipped name)")
    p.add_argument("--data", default=None, help="dataset path (default: the config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--initial-transitions", type=int, default=500)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--episodes-per-round", type=int, default=8)
    p.add_argument("--epochs-per-round", type=int, default=100)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--beta-decay", type=float, default=0.5,
                   help="beta_r = beta * beta_decay^(r-1): beta 1 lets the expert act in round 1")
    p.add_argument("--label-max-iter", type=int, default=None,
                   help="MPC iterations per DAgger label (default: the expert's per-step cap)")
    p.add_argument("--label-first-max-iter", type=int, default=None,
                   help="iterations of each labelled episode's first, cold solve")
    p.add_argument("--label-warm-start", choices=["shifted", "nearest", "policy"],
                   default="shifted",
                   help="each label's solve starts from the expert's shifted plan along the "
                        "visited trajectory, from the plan of the nearest labelled row, or "
                        "from the learner's rollout through the planning model")
    p.add_argument("--label-tol", type=float, default=None,
                   help="the labelling expert's tolerance (the TO dataset's, e.g. 1e-3; default: "
                        "the evaluated expert's own)")
    p.add_argument("--keep-unconverged", action="store_true",
                   help="DAgger keeps labels of solves stopped at the iteration cap (use it "
                        "when the BC data keep them too)")
    p.add_argument("--make-data", type=int, default=None, metavar="EPISODES",
                   help="if --data does not exist, write that many expert episodes there first "
                        "(the expert acting in closed loop, seeds 0 ..)")
    p.add_argument("--full-bc", action="store_true", help="also BC on the whole dataset")
    p.add_argument("--full-bc-epochs", type=int, default=200)
    p.add_argument("--bc-only", action="store_true",
                   help="only BC on the whole dataset (the plain BC figure over seeds)")
    p.add_argument("--root", default="runs/bench_dagger_vs_bc")
    p.add_argument("--name", default=None, help="results file stem (default from the config)")
    args = p.parse_args()

    base = yaml.safe_load(Path(resolve_config(args.config)).read_text())
    env_id = base["model"]["init_args"]["env_id"]
    stem = args.name or f"dagger_vs_bc_{Path(args.config).stem}"
    if args.make_data and args.data and not Path(args.data).exists():
        make_data(Path(args.data), env_id, base["model"]["init_args"].get("expert"),
                  args.make_data, args.keep_unconverged)
    root = Path(args.root) / stem
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {"DAgger": [], "BC, same labels": [], "BC, all data": []}
    epochs = (args.rounds + 1) * args.epochs_per_round
    for seed in args.seeds:
        if not args.bc_only:
            d_root = root / f"dagger_seed{seed}"
            rep = fit_once(dagger_config(base, d_root, seed, args), d_root,
                      root / f"dagger_seed{seed}.log")
            runs["DAgger"].append(rep)
            labels = int(rep["labels"])
            b_root = root / f"bc{labels}_seed{seed}"
            runs["BC, same labels"].append(fit_once(
                bc_config(base, b_root, seed, epochs, args.epochs_per_round, args.data, labels),
                b_root, root / f"bc{labels}_seed{seed}.log"))
        if args.full_bc or args.bc_only:
            f_root = root / f"bc_all_seed{seed}"
            runs["BC, all data"].append(fit_once(
                bc_config(base, f_root, seed, args.full_bc_epochs, args.full_bc_epochs // 4,
                          args.data, None), f_root, root / f"bc_all_seed{seed}.log"))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = {k: summarize(v) for k, v in runs.items() if v}
    for k, v in runs.items():  # labels of full-data BC: the dataset's rows
        if v and k == "BC, all data":
            summary[k]["labels"] = [r.get("labels") for r in v]
    first = next(v[0] for v in runs.values() if v)
    expert = first["results"].get("TO expert (MPC)")
    rows = dict(summary)
    if expert is not None:
        rows = {"TO expert (MPC)": {"seeds": 1, "labels": None,
                                    **{f"{w}_{k}": {"mean": expert[k], "std": 0.0}
                                       for w in ("best", "last")
                                       for k in ("success", "final_distance",
                                                 "time_per_action_s")}}, **summary}
    for s in rows.values():
        if isinstance(s.get("labels"), list):
            s["labels"] = s["labels"][0] if len(set(map(str, s["labels"]))) == 1 else s["labels"]
    md = table(rows)
    payload = {
        "benchmark": "dagger_vs_bc", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "env_id": env_id, "config": args.config, "settings": vars(args),
        "eval_episodes": base["model"]["init_args"].get("eval_episodes"),
        "wall_time_s": time.perf_counter() - t0, "machine": machine_info(),
        "summary": rows, "table": md,
        "runs": {k: [{kk: r.get(kk) for kk in ("labels", "results", "wall_time_s",
                                               "best_checkpoint", "rounds")} for r in v]
                 for k, v in runs.items() if v},
    }
    write_atomic(RESULTS / f"{stem}.json", payload)
    print(md)
    print(f"results: {RESULTS / f'{stem}.json'}")


if __name__ == "__main__":
    main()
