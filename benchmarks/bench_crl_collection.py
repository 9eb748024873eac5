"""Collection speed of the goal-conditioned off-policy learners against raw environment stepping.

For each task, one :class:`~diffto.learning.crl.ContrastiveRL` module (the shipped
``metaworld_crl.yaml`` settings: 8 in-process environments) is built and, alternating in one
process so that machine load hits both alike, ``--rounds`` times:

- **raw**: its own vector environment stepped with uniform random actions drawn beforehand
  (nothing else);
- **collect**: :meth:`GoalOffPolicy.collect` after warm-up: policy inference on the batch,
  the vector step, final-observation handling, buffer writes and episode statistics (no
  gradient updates).

Reported: environment steps per second of each (median over rounds) and their ratio.
Results: ``benchmarks/results/crl_collection.{json,md}``.

Usage::

    python benchmarks/bench_crl_collection.py --tasks reach-v3 push-v3 --steps 4000 --rounds 5
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from _results import machine_info, write_atomic

CONFIG = Path(__file__).resolve().parents[1] / "lightning_configs" / "metaworld_crl.yaml"


def measure(task: str, steps: int, rounds: int) -> dict[str, float]:
    from diffto.learning.crl import ContrastiveRL

    args = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]
    args["env_kwargs"]["task"] = task
    args.update(report_episodes=0, video_episodes=0, warmup_steps=0)
    model = ContrastiveRL(**args)
    model.trainer = None
    model._start_task(0)
    envs, E = model.envs, model.hparams.num_envs
    model.collect(10 * E)  # warm caches up
    raw, collect = [], []
    for _ in range(rounds):
        actions = np.random.default_rng(0).uniform(-1, 1, (steps // E, E, 4)).astype(np.float32)
        t0 = time.perf_counter()
        for a in actions:
            envs.step(a)
        raw.append(steps / (time.perf_counter() - t0))
        model._start_task(0)  # the buffer's episodes restart with fresh ones (not timed)
        envs = model.envs
        t0 = time.perf_counter()
        model.collect(steps)
        collect.append(steps / (time.perf_counter() - t0))
    model.teardown("fit")
    r, c = float(np.median(raw)), float(np.median(collect))
    return {"raw_steps_per_s": r, "collect_steps_per_s": c, "ratio": c / r,
            "raw_all": raw, "collect_all": collect}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["reach-v3", "push-v3"])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {t: measure(t, args.steps, args.rounds) for t in args.tasks}
    payload = {"benchmark": "bench_crl_collection",
               "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": machine_info(), "steps": args.steps, "rounds": args.rounds,
               "num_envs": 8, "results": results}
    out = Path(__file__).resolve().parent / "results"
    write_atomic(out / "crl_collection.json", payload)
    lines = ["| task | raw stepping (steps/s) | collection (steps/s) | ratio |",
             "|---|---|---|---|"]
    lines += [f"| {t} | {r['raw_steps_per_s']:.0f} | {r['collect_steps_per_s']:.0f} | "
              f"{r['ratio']:.2f} |" for t, r in results.items()]
    (out / "crl_collection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
