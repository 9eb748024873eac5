"""Receding-horizon MPC over a MuJoCo Panda reaching random goals of ``PandaReachEnv``.

The showcase of MPC on a MuJoCo model: at every 50 Hz control step of the environment,
``diffto.layers.MPC`` plans ``T`` steps of 20 ms of joint torques over ``MujocoDynamics`` of
the env's nominal model (state ``[qpos; qvel]``, control the torque command), for an
end-effector cost, and the first torque is applied; the next call is warm-started with the
previous plan shifted one step (``u_init=previous.shifted()``).

Expert
    :class:`diffto.tasks.panda.PandaReachExpert` holds the planning model and the cost (see
    its module docstring): the env's nominal model with gravity compensation (the MPC plans
    the torque command on top of it, the quantity the env's action scales, within the
    published limits ``±τ_max``), ``MujocoDynamics`` with ``--plan-substeps`` physics steps
    per 20 ms planning step, and the end-effector cost ``Σ_t ½‖w_p (p(q_t) − g)‖² +
    ½‖w_v q̇_t‖² + ½‖w_u u_t / τ_max‖²`` plus its terminal term (Gauss-Newton in the solver).
    ``--plan-substeps 10`` is the env's own 2 ms physics (an exact model); the expert's
    default, 2 steps of 10 ms, needs a fifth of the finite-difference Jacobians and rollouts,
    which dominate batched solves.

Measured, per goal and over all goals: success (the flange within the env's 2 cm of the goal
within ``--max-steps`` steps and still there ``--hold`` steps later), steps to reach, final
distance, solve time per control step (mean, median, and the factor over the 20 ms of real
time a 50 Hz loop allows), iterations per control step; and, at every ``--compare-every``-th
step, the same state solved to convergence (``--compare-iterations``) twice: from a cold start
(zero torques) and from the shifted previous plan, reporting iterations, convergence and cost.

Results go atomically to ``benchmarks/results/panda_mpc.json``.

Usage::

    python benchmarks/bench_panda_mpc.py [--goals 20] [--horizon 15] [--iterations 3]
        [--plan-substeps 2] [--max-steps 100] [--hold 10] [--compare-every 5] [--tol 1e-4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import mujoco
import torch
from _results import write_atomic
from tqdm import tqdm

from diffto.tasks.panda import PandaReachEnv, PandaReachExpert

RESULTS = Path(__file__).resolve().parent / "results" / "panda_mpc.json"
CONTROL_DT = 0.02  # s, the env's 50 Hz


def machine() -> dict:
    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mujoco": mujoco.__version__,
    }


def run_goal(env, seed: int, expert: PandaReachExpert, args, bar) -> dict:
    obs, info = env.reset(seed=seed)
    initial_distance = info["distance"]
    goal = torch.as_tensor(obs["desired_goal"]).unsqueeze(0)
    prev = None
    times, cpu, iters, converged, distances, compare = [], [], [], [], [], []
    reached = None
    for step in range(args.max_steps):
        x0 = torch.as_tensor(expert.state_of(env)).unsqueeze(0)
        warm = None if prev is None else prev.shifted()
        with torch.no_grad():
            t0, c0 = time.perf_counter(), time.process_time()
            sol = expert.solve(x0, goal, u_init=warm)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if warm is not None and step % args.compare_every == 0:
                cold_sol = expert.solve(x0, goal, max_iter=args.compare_iterations)
                warm_sol = expert.solve(x0, goal, u_init=warm, max_iter=args.compare_iterations)
                compare.append(
                    {
                        "step": step,
                        "cold_iterations": int(cold_sol.iterations[0]),
                        "warm_iterations": int(warm_sol.iterations[0]),
                        "cold_converged": bool(cold_sol.converged[0]),
                        "warm_converged": bool(warm_sol.converged[0]),
                        "cold_cost": float(cold_sol.cost[0]),
                        "warm_cost": float(warm_sol.cost[0]),
                    }
                )
        iters.append(int(sol.iterations[0]))
        converged.append(bool(sol.converged[0]))
        prev = sol
        obs, _, _, _, info = env.step(expert.to_action(sol.u[:, 0])[0])
        distances.append(info["distance"])
        bar.set_postfix(step=step + 1, distance=f"{info['distance']:.3f}")
        if reached is None and info["is_success"]:
            reached = step + 1
        if reached is not None and step + 1 >= reached + args.hold:
            break
    held = (
        reached is not None
        and all(d <= env.distance_threshold for d in distances[reached - 1 :])
        and len(distances) >= reached + args.hold
    )
    return {
        "seed": seed,
        "goal": obs["desired_goal"].tolist(),
        "initial_distance": initial_distance,
        "success": bool(held),
        "steps_to_reach": reached,
        "final_distance": distances[-1],
        "steps": len(distances),
        "solve_time_s": times,
        "solve_cpu_time_s": cpu,
        "iterations": iters,
        "converged": converged,
        "compare": compare,
    }


def summarize(goals: list[dict]) -> dict:
    times = [t for g in goals for t in g["solve_time_s"]]
    cpu = [t for g in goals for t in g["solve_cpu_time_s"]]
    iters = [i for g in goals for i in g["iterations"]]
    first = [g["iterations"][0] for g in goals]
    later = [i for g in goals for i in g["iterations"][1:]]
    comp = [c for g in goals for c in g["compare"]]
    reached = [g["steps_to_reach"] for g in goals if g["steps_to_reach"] is not None]
    out = {
        "goals": len(goals),
        "success_rate": sum(g["success"] for g in goals) / len(goals),
        "reached_rate": len(reached) / len(goals),
        "steps_to_reach_mean": statistics.fmean(reached) if reached else None,
        "time_to_reach_mean_s": statistics.fmean(reached) * CONTROL_DT if reached else None,
        "final_distance_mean_m": statistics.fmean(g["final_distance"] for g in goals),
        "control_steps": len(times),
        "solve_time_mean_s": statistics.fmean(times),
        "solve_time_median_s": statistics.median(times),
        "real_time_factor_mean": statistics.fmean(times) / CONTROL_DT,
        "solve_cpu_time_mean_s": statistics.fmean(cpu),
        "real_time_factor_cpu_mean": statistics.fmean(cpu) / CONTROL_DT,
        "iterations_mean": statistics.fmean(iters),
        "iterations_first_step_mean": statistics.fmean(first),
        "iterations_warm_steps_mean": statistics.fmean(later) if later else None,
        "converged_fraction": sum(c for g in goals for c in g["converged"]) / len(times),
    }
    if comp:
        out["compare"] = {
            "states": len(comp),
            "cold_iterations_mean": statistics.fmean(c["cold_iterations"] for c in comp),
            "warm_iterations_mean": statistics.fmean(c["warm_iterations"] for c in comp),
            "cold_converged_fraction": statistics.fmean(c["cold_converged"] for c in comp),
            "warm_converged_fraction": statistics.fmean(c["warm_converged"] for c in comp),
            "cost_ratio_warm_over_cold_median": statistics.median(
                c["warm_cost"] / c["cold_cost"] for c in comp if c["cold_cost"] > 0
            ),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--goals", type=int, default=20, help="random goals (env seeds)")
    parser.add_argument("--seed", type=int, default=0, help="first env seed")
    parser.add_argument("--horizon", type=int, default=15, help="MPC horizon T (steps of 20 ms)")
    parser.add_argument(
        "--iterations", type=int, default=3, help="max box-DDP iterations per control step"
    )
    parser.add_argument(
        "--plan-substeps",
        type=int,
        default=2,
        help="physics steps per 20 ms planning step (10: the env's own 2 ms)",
    )
    parser.add_argument("--max-steps", type=int, default=100, help="control steps per goal")
    parser.add_argument(
        "--hold", type=int, default=10, help="steps the flange must stay within 2 cm after reaching"
    )
    parser.add_argument(
        "--compare-every",
        type=int,
        default=5,
        help="cold vs warm comparison at every k-th control step",
    )
    parser.add_argument(
        "--compare-iterations",
        type=int,
        default=20,
        help="max iterations of the cold/warm comparison solves",
    )
    parser.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="MPC convergence tolerance (relative Newton step on the torques)",
    )
    parser.add_argument("--w-p", type=float, default=10.0, help="stage position weight")
    parser.add_argument("--w-f", type=float, default=30.0, help="terminal position weight")
    parser.add_argument("--w-v", type=float, default=0.3, help="joint velocity weight")
    parser.add_argument("--w-u", type=float, default=0.05, help="torque weight (of u / τ_max)")
    parser.add_argument("--nthread", type=int, default=0, help="MujocoDynamics threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for name in (
        "goals",
        "horizon",
        "iterations",
        "plan_substeps",
        "max_steps",
        "compare_every",
        "compare_iterations",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(1)

    env = PandaReachEnv()
    expert = PandaReachExpert(
        horizon=args.horizon,
        max_iter=args.iterations,
        tol=args.tol,
        plan_substeps=args.plan_substeps,
        control_dt=CONTROL_DT,
        position_weight=args.w_p,
        final_weight=args.w_f,
        velocity_weight=args.w_v,
        control_weight=args.w_u,
        nthread=args.nthread,
    )

    goals = []
    started = time.perf_counter()
    with tqdm(total=args.goals, unit="goal", desc="panda mpc") as bar:
        for g in range(args.goals):
            goals.append(run_goal(env, args.seed + g, expert, args, bar))
            bar.update(1)
    result = {
        "benchmark": "panda_mpc",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "planning_dt_s": CONTROL_DT,
        "planning_timestep_s": CONTROL_DT / args.plan_substeps,
        "expert": repr(expert),
        "gravity_compensation": "inside the env and the planning model (MuJoCo gravcomp)",
        "wall_time_s": time.perf_counter() - started,
        "machine": machine(),
        "summary": summarize(goals),
        "per_goal": goals,
    }
    write_atomic(args.out, result)
    print(json.dumps(result["summary"], indent=2))
    return result


if __name__ == "__main__":
    main()
