"""Learned warm starts of trajectory optimization: iterations, time and final cost of MPC solves
started cold, from the shifted previous plan, and from a goal-conditioned policy's rollout.

States
    Held-out episodes (env seeds ``EVAL_SEED_BASE + j``, never in training data) of the task's
    expert in receding horizon (its own horizon, iteration cap and shifted warm start), run in
    lockstep; every ``--every``-th control step, the states of all episodes are taken, with
    the expert's previous plan (the step before) for the shifted start.

Solves (one batch of all episodes per sampled step, to the expert's tolerance, at most
``--max-iter`` iterations)
    ``cold``: the expert's cold start (:meth:`MPCExpert.initial_controls`: zeros for the Panda,
    whose gravity compensation is inside the physics and the planning model, so zero torque is
    the natural cold start there; a small constant torque toward the goal's side for the
    pendulum, whose hanging rest is a stationary point of zero controls). ``shifted``: the
    previous plan moved one step, its last control repeated (from the second control step on,
    as in receding horizon). ``learned``: :class:`diffto.learning.warm_start.PolicyWarmStart`,
    the policy of a goal-conditioned BC checkpoint rolled out through the expert's planning
    model over the horizon; its rollout time is reported and included in its wall time.
    ``plan``: :class:`diffto.learning.warm_start.PlanWarmStart`, the whole plan regressed by a
    :class:`diffto.learning.plan_imitation.PlanImitation` checkpoint (``--plan``).

How accurate a start must be (``--optimum-noise σ …``)
    The cold solve's own optimum with Gaussian noise of standard deviation ``σ`` (in control
    half-ranges: the torque limits on the Panda; clipped to the bounds) added to every
    control, solved again: the iterations a proposal with that error would need
    (``optimum+σ``), a yardstick for the learned ones. Rows whose cold solve did not converge
    (no optimum to perturb) are left out of these summaries.

Per method: iterations per solve (mean, median), the fraction converged, the wall time of the
batched solves (summed over sampled steps), and the final cost against the cold start's on the
same rows (median ratio, fraction within 0.1 %, and the same restricted to rows where both
converged). The headlines are ``iterations_ratio_cold_over_<start>`` at equal final cost,
over all sampled steps and (``first_step_...``) at the first control step, where no previous
plan exists (an episode's start, a new goal): the case a learned start is for.

Closed loop (``--closed-loop``)
    The same held-out episodes run in receding horizon with the expert's iteration cap per
    step: shifted (the expert), cold every step, and each learned proposal every step
    (``RecedingHorizon(warm_start="policy")``); success (``is_success`` at the last step),
    mean iterations and time per control step, and the fraction of converged steps.

Results go atomically to ``benchmarks/results/warm_start_<task>.json``.

Usage::

    python benchmarks/bench_warm_start.py --env-id diffto/PendulumSwingUp-v0 \\
        --policy runs/pendulum_bc/checkpoints/last.ckpt [--plan PLAN_CKPT] [--episodes 8] \\
        [--every 10] [--max-iter 100] [--closed-loop] [--optimum-noise 0.01 0.001]
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

from diffto.data.trajectories import EVAL_SEED_BASE
from diffto.learning.goal_evaluation import rollout_episodes
from diffto.learning.warm_start import PlanWarmStart, PolicyWarmStart, load_policy
from diffto.tasks.mpc_expert import RecedingHorizon
from diffto.tasks.registry import make_expert

RESULTS = Path(__file__).resolve().parent / "results"


def expert_states(expert, env_id: str, seeds: list[int], steps: int, every: int, bar) -> dict:
    """Lockstep receding-horizon episodes of the expert (``rollout_episodes``); returns, per
    sampled step, the states ``(E, n)``, goals ``(E, g)`` and previous plans ``(E, T, m)``
    (``None`` at step 0)."""
    controller = RecedingHorizon(expert, warm_start="shifted")
    samples: list[dict] = []
    last = {"step": 0, "plan": None}  # the step about to be taken and the previous plans

    def act(observation, goals, envs):
        states = np.stack([expert.state_of(env) for env in envs])
        if last["step"] % every == 0:
            samples.append({"step": last["step"], "states": states, "goals": goals,
                            "previous": last["plan"]})
        actions, sol = controller.act(states, goals)
        last["step"], last["plan"] = last["step"] + 1, sol.u.detach().clone()
        bar.update(1)
        return actions

    evaluation, _ = rollout_episodes(act, env_id, seeds, max_steps=steps)
    return {"samples": samples, "expert_success": [bool(x) for x in evaluation.success]}


def solve_from(expert, states, goals, u_init, max_iter: int) -> tuple[dict, torch.Tensor]:
    """The solve's iterations, convergence, cost and wall time per row, and its plan."""
    t0 = time.perf_counter()
    with torch.no_grad():
        sol = expert.solve(states, goals, u_init=u_init, max_iter=max_iter)
    return {
        "wall_s": time.perf_counter() - t0,
        "iterations": sol.iterations.tolist(),
        "converged": sol.converged.tolist(),
        "cost": sol.cost.detach().tolist(),
    }, sol.u.detach()


def perturbed(expert, u: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``u`` plus Gaussian noise of ``sigma`` control half-ranges, clipped to the bounds."""
    lo, hi = expert.u_lower.to(u), expert.u_upper.to(u)
    noise = torch.randn(u.shape, generator=generator, dtype=u.dtype).to(u.device)
    return torch.maximum(torch.minimum(u + noise * sigma * (hi - lo) / 2, hi), lo)


def summarize(rows: list[dict], method: str) -> dict:
    its = [r[method]["iterations"] for r in rows if method in r]
    conv = [r[method]["converged"] for r in rows if method in r]
    ratio = [r[method]["cost"] / r["cold"]["cost"] for r in rows if method in r]
    both = [r[method]["cost"] / r["cold"]["cost"] for r in rows
            if method in r and r[method]["converged"] and r["cold"]["converged"]]
    out = {
        "solves": len(its),
        "iterations_mean": statistics.fmean(its),
        "iterations_median": statistics.median(its),
        "converged_fraction": statistics.fmean(conv),
        "cost_ratio_over_cold_median": statistics.median(ratio),
        "cost_within_0.1pct_of_cold_fraction": statistics.fmean(
            abs(r - 1) <= 1e-3 for r in ratio),
        "cost_below_cold_fraction": statistics.fmean(r < 1 - 1e-3 for r in ratio),
        "both_converged_rows": len(both),
        "cost_ratio_over_cold_median_both_converged": statistics.median(both) if both else None,
    }
    return out


def closed_loop(expert, env_id: str, seeds: list[int], steps: int, warm_start: str,
                proposer, bar) -> dict:
    controller = RecedingHorizon(expert, warm_start=warm_start, proposer=proposer)
    times, its, conv = [], [], []

    def act(observation, goals, envs):
        states = np.stack([expert.state_of(env) for env in envs])
        t0 = time.perf_counter()
        actions, sol = controller.act(states, goals)
        times.append(time.perf_counter() - t0)
        its.extend(sol.iterations.tolist())
        conv.extend(sol.converged.tolist())
        bar.update(1)
        return actions

    evaluation, _ = rollout_episodes(act, env_id, seeds, max_steps=steps)
    return {
        "success_rate": float(np.mean(evaluation.success)),
        "iterations_per_step_mean": statistics.fmean(its),
        "converged_step_fraction": statistics.fmean(conv),
        "time_per_control_step_s": statistics.fmean(times),
        "batch": len(seeds),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-id", default="diffto/PendulumSwingUp-v0")
    parser.add_argument("--policy", default=None,
                        help="goal-conditioned BC checkpoint: its rollout is the 'learned' start")
    parser.add_argument("--plan", default=None,
                        help="PlanImitation checkpoint: its regressed plan is the 'plan' start")
    parser.add_argument("--episodes", type=int, default=8, help="held-out episodes")
    parser.add_argument("--steps", type=int, default=100, help="control steps per episode")
    parser.add_argument("--every", type=int, default=10, help="sample every k-th step")
    parser.add_argument("--max-iter", type=int, default=100,
                        help="iteration cap of the compared solves (to the expert's tol)")
    parser.add_argument("--closed-loop", action="store_true",
                        help="also run the episodes with each warm start in receding horizon")
    parser.add_argument("--optimum-noise", type=float, nargs="+", default=[], metavar="SIGMA",
                        help="also start from the cold solve's optimum plus Gaussian noise of "
                             "these standard deviations (in control half-ranges)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if any(not sigma > 0 for sigma in args.optimum_noise):
        parser.error(f"--optimum-noise values must be > 0, got {args.optimum_noise}")
    for name in ("episodes", "steps", "every", "max_iter"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.policy is None and args.plan is None and not args.optimum_noise:
        parser.error("give --policy, --plan or both (the learned warm starts to measure), or "
                     "--optimum-noise")
    torch.set_num_threads(1)
    task = args.env_id.split("/")[-1].split("-")[0].lower()
    out_path = args.out or RESULTS / f"warm_start_{task}.json"

    expert = make_expert(args.env_id)
    # The policy's observation of planned states comes from the expert's maps and the
    # network's observation_keys (both proposers build it).
    proposers = {}
    if args.policy is not None:
        proposers["learned"] = PolicyWarmStart(load_policy(args.policy), expert)
    if args.plan is not None:
        proposers["plan"] = PlanWarmStart(args.plan, expert)
    seeds = [EVAL_SEED_BASE + j for j in range(args.episodes)]
    started = time.perf_counter()
    with tqdm(total=args.steps, desc="expert episodes", unit="step") as bar:
        traj = expert_states(expert, args.env_id, seeds, args.steps, args.every, bar)

    rows = []
    noisy = [f"optimum+{sigma:g}" for sigma in args.optimum_noise]
    wall = {m: 0.0 for m in ("cold", "zeros", "shifted", *proposers, *noisy,
                             *(f"{m}_proposal" for m in proposers))}
    generator = torch.Generator().manual_seed(0)
    for sample in tqdm(traj["samples"], desc="solves", unit="step"):
        x = torch.as_tensor(sample["states"])
        g = torch.as_tensor(sample["goals"])
        cold, optimum = solve_from(expert, x, g, None, args.max_iter)
        results = {"cold": cold}
        zeros = torch.zeros(x.shape[0], expert.horizon, expert.n_ctrl, dtype=x.dtype)
        if not torch.equal(expert.initial_controls(x, g, expert.horizon), zeros):
            results["zeros"] = solve_from(expert, x, g, zeros, args.max_iter)[0]
        if sample["previous"] is not None:
            prev = sample["previous"]
            shifted = torch.cat([prev[:, 1:], prev[:, -1:]], 1)
            results["shifted"] = solve_from(expert, x, g, shifted, args.max_iter)[0]
        for name, proposer in proposers.items():
            t0 = time.perf_counter()
            proposal = proposer(x, g)
            wall[f"{name}_proposal"] += time.perf_counter() - t0
            results[name] = solve_from(expert, x, g, proposal, args.max_iter)[0]
        for name, sigma in zip(noisy, args.optimum_noise, strict=True):
            start = perturbed(expert, optimum, sigma, generator)
            results[name] = solve_from(expert, x, g, start, args.max_iter)[0]
            results[name]["has_optimum"] = cold["converged"]
        for method, res in results.items():
            wall[method] += res["wall_s"]
        for i in range(x.shape[0]):
            rows.append({"step": sample["step"], "episode": i, **{
                m: {k: r[k][i] for k in ("iterations", "converged", "cost")}
                for m, r in results.items() if r.get("has_optimum", [True] * (i + 1))[i]}})
    for name in proposers:
        wall[name] += wall[f"{name}_proposal"]

    methods = [m for m in ("cold", "zeros", "shifted", *proposers, *noisy)
               if any(m in r for r in rows)]
    summary = {m: summarize(rows, m) for m in methods}
    for m in methods:
        summary[m]["wall_time_s"] = wall[m]
    # Iterations by sampled control step (the swing-up, then holding at the goal).
    summary["iterations_mean_by_step"] = {
        str(step): {m: statistics.fmean(r[m]["iterations"] for r in rows
                                        if r["step"] == step and m in r)
                    for m in methods if any(m in r for r in rows if r["step"] == step)}
        for step in sorted({r["step"] for r in rows})}
    # Same rows for every ratio: the shifted start does not exist at step 0, where a learned
    # start matters most (no previous plan: an episode's start, a new goal).
    later = [r for r in rows if "shifted" in r]
    first = [r for r in rows if "shifted" not in r]
    if later:  # none with --steps 1
        summary["steps_after_first"] = {m: summarize(later, m) for m in methods}
    summary["first_step"] = {m: summarize(first, m) for m in methods if m != "shifted"}

    def ratio(part: dict, a: str, b: str) -> float:
        return part[a]["iterations_mean"] / max(part[b]["iterations_mean"], 1e-12)

    for name in proposers:
        summary[name]["proposal_time_s"] = wall[f"{name}_proposal"]
        summary[f"iterations_ratio_cold_over_{name}"] = ratio(summary, "cold", name)
        summary[f"first_step_iterations_ratio_cold_over_{name}"] = ratio(
            summary["first_step"], "cold", name)
        if later:
            summary[f"iterations_ratio_shifted_over_{name}_after_first"] = ratio(
                summary["steps_after_first"], "shifted", name)
    if args.steps > 1:  # success at the end of a one-step episode means nothing
        summary["expert_success_rate"] = statistics.fmean(traj["expert_success"])

    result = {
        "benchmark": "warm_start",
        "env_id": args.env_id,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "expert": repr(expert),
        "expert_tol": expert.tol,
        "cold_start": "expert.initial_controls (zeros for the Panda: gravity compensation is "
                      "inside its physics and planning model)",
        "summary": summary,
    }
    if args.closed_loop:
        loops = {}
        starts = [("shifted", "shifted", None), ("cold", "cold", None),
                  *((name, "policy", prop) for name, prop in proposers.items())]
        for name, ws, prop in starts:
            with tqdm(total=args.steps, desc=f"closed loop ({name})", unit="step") as bar:
                loops[name] = closed_loop(expert, args.env_id, seeds, args.steps, ws, prop, bar)
        result["closed_loop"] = loops
    result["wall_time_s"] = time.perf_counter() - started
    result["machine"] = machine_info(torch=torch.__version__)
    result["per_state"] = rows
    write_atomic(out_path, result)
    print(json.dumps({"summary": summary, "closed_loop": result.get("closed_loop")}, indent=2))
    return result


if __name__ == "__main__":
    main()
