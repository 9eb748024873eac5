"""How much Gaussian noise on the joint targets the Go2's PD + feedforward tracking tolerates.

PPO explores by adding ``N(0, std²)`` to every residual action; on the Go2 that noise lands on
the joint targets of a Kp-100 PD law. This script plays the zero residual plus such noise (no
learning) through :func:`diffto.tasks.go2.tracking_table.tracking_table`, the table a training
run ends with: the nominal clip and 20 randomized clips from phase 0 with termination on, for
a range of standard deviations in radians on the joint targets. A std that already ends most
randomized clips is one under which PPO optimizes a policy that weathers its own noise rather
than the deterministic policy a user deploys.

    python benchmarks/bench_go2_exploration_noise.py [--seeds 20] [--motion trot]

Writes ``results/go2_exploration_noise.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from diffto.tasks.go2.reference_source import load_reference
from diffto.tasks.go2.tracking_config import TrackingConfig
from diffto.tasks.go2.tracking_table import format_table, tracking_table, zero_residual

RESULTS = Path(__file__).parent / "results"


def noisy_zero_residual(std_rad: float, seed: int):
    """A zero residual plus ``N(0, std_rad²)`` on every joint target, in action units."""
    rng = np.random.default_rng(seed)
    std_action = std_rad / TrackingConfig().action_limit

    def act(obs: np.ndarray) -> np.ndarray:
        return (std_action * rng.standard_normal(12)).astype(np.float32)

    return act


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--motion", default="trot")
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--stds", type=float, nargs="+", default=[0.02, 0.03, 0.04, 0.08],
                        help="noise std on the joint targets, radians")
    args = parser.parse_args()
    reference = load_reference(args.motion, duration=args.duration)
    controllers = {"PD + feedforward alone": zero_residual}
    for std in args.stds:
        controllers[f"+ noise {std:g} rad"] = noisy_zero_residual(std, seed=0)
    t0 = time.perf_counter()
    rows = tracking_table(controllers, reference, seeds=args.seeds,
                          env_kwargs={"reference_duration": args.duration})
    elapsed = time.perf_counter() - t0
    table = format_table(rows)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    header = (f"# Zero residual plus exploration noise, {args.duration:g} s {args.motion}\n\n"
              f"`python benchmarks/bench_go2_exploration_noise.py --seeds {args.seeds}` "
              f"({elapsed:.0f} s)\n\n")
    (RESULTS / "go2_exploration_noise.md").write_text(header + table + "\n")
    (RESULTS / "go2_exploration_noise.json").write_text(json.dumps(
        {"motion": args.motion, "duration": args.duration, "seeds": args.seeds,
         "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
