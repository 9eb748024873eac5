"""A learned cost-to-go as the terminal cost of a short-horizon MPC: success, closed-loop cost
and time per control step against the full-horizon expert and the short horizon without it.

Controllers (all in receding horizon with the shifted warm start and the expert's iteration
cap per control step, on the same held-out episodes, env seeds ``EVAL_SEED_BASE + j``)
    ``full``: the task's expert with its own horizon ``T``.
    ``short``: the same cost over ``T' = round(T · --fraction)`` steps (a quarter by default).
    ``short+V``: the same ``T'`` plus the learned terminal value ``V(x_T', g)`` of a
    :class:`diffto.learning.value.CostToGoCritic` checkpoint (trained with
    ``pendulum_value.yaml`` / ``panda_value.yaml`` on the expert's cost-to-go), as a
    :class:`~diffto.NonlinearCost` terminal term beside the task's own terminal cost
    (:class:`diffto.learning.value.LearnedTerminalValue`, evaluated in float64).
    Several ``--critic`` checkpoints (training seeds) each give a ``short+V`` row and their
    mean and spread.

Measured per controller: success rate (``is_success`` at the episode's last step), mean final
distance, the closed-loop cost (the sum over the episode of the *full-horizon expert's* stage
cost ``ℓ(x_t, u_t; g)`` at the executed states and controls, the same yardstick for all), and
the wall time per control step (one batched solve of all episodes in lockstep: the same batch
for every controller, so the times compare).

Results go atomically to ``benchmarks/results/value_terminal_<task>.json``.

Usage::

    python benchmarks/bench_value_terminal.py --env-id diffto/PendulumSwingUp-v0 \\
        --critic runs/pendulum_value/checkpoints/last.ckpt [--critic seed1.ckpt ...] \\
        [--episodes 16] [--fraction 0.25]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from _results import machine_info, write_atomic
from tqdm import tqdm

from diffto.data.to_expert import stage_cost
from diffto.data.trajectories import EVAL_SEED_BASE
from diffto.learning.goal_evaluation import rollout_episodes
from diffto.learning.value import CostToGoCritic, LearnedTerminalValue
from diffto.tasks.mpc_expert import RecedingHorizon
from diffto.tasks.registry import make_expert

RESULTS = Path(__file__).resolve().parent / "results"


def run_episodes(expert, env_id: str, seeds: list[int], steps: int, horizon: int,
                 terminal_value, bar) -> dict:
    """Lockstep receding-horizon episodes (``rollout_episodes``); the controller's figures."""
    controller = RecedingHorizon(expert, warm_start="shifted", horizon=horizon,
                                 terminal_value=terminal_value)
    cost = np.zeros(len(seeds))  # the expert's stage costs along the executed episode
    times, conv, its = [], [], []

    def act(observation, goals, envs):
        states = np.stack([expert.state_of(env) for env in envs])
        t0 = time.perf_counter()
        actions, sol = controller.act(states, goals)
        times.append(time.perf_counter() - t0)
        conv.extend(sol.converged.tolist())
        its.extend(sol.iterations.tolist())
        cost[:] += stage_cost(expert, states, expert.to_control(actions), goals)
        bar.update(1)
        return actions

    evaluation, _ = rollout_episodes(act, env_id, seeds, max_steps=steps)
    success = [bool(s) for s in evaluation.success]
    return {
        "horizon": horizon,
        "success_rate": statistics.fmean(success),
        "final_distance_mean": float(np.mean(evaluation.final_distance)),
        "closed_loop_cost_mean": float(cost.mean()),
        "closed_loop_cost_median": float(np.median(cost)),
        "time_per_control_step_s": statistics.fmean(times),
        "iterations_per_step_mean": statistics.fmean(its),
        "converged_step_fraction": statistics.fmean(conv),
        "per_episode": {"success": success, "closed_loop_cost": cost.tolist()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-id", default="diffto/PendulumSwingUp-v0")
    parser.add_argument("--critic", action="append", required=True,
                        help="CostToGoCritic checkpoint (repeat for several training seeds)")
    parser.add_argument("--episodes", type=int, default=16, help="held-out episodes")
    parser.add_argument("--steps", type=int, default=100, help="control steps per episode")
    parser.add_argument("--fraction", type=float, default=0.25,
                        help="short horizon as a fraction of the expert's")
    parser.add_argument("--weight", type=float, default=1.0, help="factor on V")
    parser.add_argument("--skip-full", action="store_true",
                        help="leave out the full-horizon expert (the slowest)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.steps < 1:
        parser.error("--episodes and --steps must be >= 1")
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must be in (0, 1]")
    torch.set_num_threads(1)
    task = args.env_id.split("/")[-1].split("-")[0].lower()
    out_path = args.out or RESULTS / f"value_terminal_{task}.json"

    expert = make_expert(args.env_id)
    T = expert.horizon
    T_short = max(1, round(T * args.fraction))
    seeds = [EVAL_SEED_BASE + j for j in range(args.episodes)]
    obs_map = expert.observation_of  # planning state -> the env observation V was fit on
    runs: list[tuple[str, int, object]] = []
    if not args.skip_full:
        runs.append(("full", T, None))
    runs.append(("short", T_short, None))
    for k, path in enumerate(args.critic):
        critic = CostToGoCritic.load_from_checkpoint(path, map_location="cpu")
        runs.append((f"short+V[{k}]", T_short,
                     LearnedTerminalValue(critic, obs_map, weight=args.weight)))

    started = time.perf_counter()
    controllers = {}
    for name, horizon, value in runs:
        with tqdm(total=args.steps, desc=f"{name} (T={horizon})", unit="step") as bar:
            controllers[name] = run_episodes(expert, args.env_id, seeds, args.steps, horizon,
                                             value, bar)
    with_v = [c for n, c in controllers.items() if n.startswith("short+V")]
    summary = {n: {k: v for k, v in c.items() if k != "per_episode"}
               for n, c in controllers.items()}
    if with_v:
        summary["short+V over critic seeds"] = {
            key: {"mean": statistics.fmean(c[key] for c in with_v),
                  "std": statistics.pstdev(c[key] for c in with_v), "seeds": len(with_v)}
            for key in ("success_rate", "closed_loop_cost_mean", "time_per_control_step_s")
        }
    result = {
        "benchmark": "value_terminal",
        "env_id": args.env_id,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "expert": repr(expert),
        "horizons": {"full": T, "short": T_short},
        "closed_loop_cost": "sum over the episode of the full-horizon expert's stage cost at "
                            "the executed states and controls",
        "summary": summary,
        "per_episode": {n: c["per_episode"] for n, c in controllers.items()},
        "wall_time_s": time.perf_counter() - started,
        "machine": machine_info(torch=torch.__version__),
    }
    write_atomic(out_path, result)
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
