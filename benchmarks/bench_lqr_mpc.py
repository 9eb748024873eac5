"""LQR and box-constrained MPC, forward + backward, side by side with mpc.pytorch, Theseus and
cvxpylayers; nonlinear box-MPC on the classic systems against mpc.pytorch.

Problems (CPU, one intra-op thread): random stable linear dynamics, random positive definite
stage costs ``C_t = L_tᵀL_t + εI`` with linear terms, a terminal cost, random initial states.

* ``lqr``: unconstrained. diffto ``LQR`` vs ``mpc.MPC`` (one LQR iteration on ``LinDx``) vs
  cvxpylayers (vs Theseus in the size grid).
* ``mpc_box``: the same problem with control bounds ``|u| <= u_max`` chosen so that about half
  the bounds are active. diffto ``MPC`` (on ``LinearDynamics``) vs ``mpc.MPC`` (box-DDP on
  ``LinDx``) vs cvxpylayers.

Default run: ``B = 64``, ``n = 4``, ``m = 2``, ``T = 20``, float64, the solvers interleaved
round-robin inside every repeat (load hits them alike). ``--grid``: the size grid
``(B, n, m, T)`` in ``GRID_CASES`` × float32/float64 × lqr/mpc_box, each (case, solver) in its
own subprocess so that its peak memory can be read (the increase of ``ru_maxrss`` over the
forward + backward pass; tracemalloc does not see torch's allocations); a solver whose time per
run, extrapolated from its previous case by ``B·T``, would exceed ``--max-case-s`` is skipped
and the reason recorded; results in ``results/lqr_mpc_grid.json``. Theseus runs through
diffto's ``TheseusTO`` adapter (Gauss-Newton, Theseus's own implicit backward), LQ only: it has
no inequality constraints.

``--pendulum`` / ``--cartpole``: nonlinear box-MPC (pendulum swing-up from ``|θ0| <= 1`` with
``|τ| <= 3``; cart-pole balancing from ``|p0|, |θ0| <= 0.5`` with ``|F| <= 5``), diffto at
several tolerances vs mpc.pytorch at its defaults and tighter. Each setting is scored against a
reference plan (diffto, tol 1e-12) by cost gap and plan error, and its gradients w.r.t. the
cost weights and (along a random direction) ``x0`` against central differences of reference
re-solves. diffto receives the system itself (with its analytic ``jacobians``); mpc.pytorch a
wrapper without them (it linearizes by autograd).

Backward: the gradient of ``ℓ = Σ w_x·x + Σ w_u·u`` (fixed random weights) w.r.t. the cost
factor ``L``, the linear cost ``c`` and the initial state ``x0`` (the weights ``q`` and ``x0``
for the nonlinear problems). Accuracy: the maximum absolute difference of plans and gradients
to diffto's (and, for cvxpylayers, to exact re-solves). Timing: warm-up, then the median of
``--repeats`` runs, wall time and the process's CPU time (with one thread, the figure to
compare on a machine that other processes share). Results go to
``benchmarks/results/lqr_mpc.json`` (written atomically) and a table is printed.

mpc.pytorch is time-major and has no separate terminal cost: its horizon ``T' = T + 1`` has
``T + 1`` states and controls, the last stage costing ``[x_T; u_T]`` with ``blockdiag(C_f, I)``.
The extra control ``u_T`` only enters that stage, so its optimum is 0 and the plans coincide.

Run: ``python benchmarks/bench_lqr_mpc.py [--quick] [--pendulum] [--cartpole]`` or
``python benchmarks/bench_lqr_mpc.py --grid [--cases small,medium] [--dtypes float64]
[--problems lqr] [--solvers diffto,mpc.pytorch]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from _results import write_atomic
from torch import Tensor, nn

from diffto.layers.lqr import LQR
from diffto.problem import LinearDynamics, QuadraticCost

RESULTS = Path(__file__).resolve().parent / "results" / "lqr_mpc.json"
DTYPE = torch.float64


# ------------------------------------------------------------------------------ problems
def make_problem(B: int, n: int, m: int, T: int, seed: int,
                 dtype: torch.dtype = DTYPE) -> dict[str, Tensor]:
    """Random well-posed problem; ``L (B, T, n+m, n+m)``, ``c (B, T, n+m)``,
    ``Lf (B, n, n)``, ``cf (B, n)``, ``A (n, n)``, ``Bm (n, m)``, ``x0 (B, n)``. Drawn in
    float64 and cast, so float32 and float64 cases solve the same problem."""
    g = torch.Generator().manual_seed(seed)
    k = n + m

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=DTYPE)

    A = torch.eye(n, dtype=DTYPE) + 0.1 * randn(n, n)
    A = A / max(1.0, torch.linalg.eigvals(A).abs().max().item())  # spectral radius <= 1
    problem = {
        "L": randn(B, T, k, k) / k**0.5,
        "c": randn(B, T, k),
        "Lf": randn(B, n, n) / n**0.5,
        "cf": randn(B, n),
        "A": A,
        "Bm": 0.3 * randn(n, m),
        "x0": 2.0 * randn(B, n),
        "wx": randn(B, T + 1, n),
        "wu": randn(B, T, m),
    }
    return {key: value.to(dtype) for key, value in problem.items()}


def stage_matrices(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``C = LᵀL + 0.1 I`` and ``C_f = L_fᵀL_f + 0.1 I`` (positive definite)."""
    k, n = p["L"].shape[-1], p["Lf"].shape[-1]
    like = dict(dtype=p["L"].dtype, device=p["L"].device)
    C = p["L"].transpose(-1, -2) @ p["L"] + 0.1 * torch.eye(k, **like)
    C_f = p["Lf"].transpose(-1, -2) @ p["Lf"] + 0.1 * torch.eye(n, **like)
    return C, C_f


# ------------------------------------------------------------------------------ solvers
# Each runner takes the problem with leaves requiring grad and returns (x (B,T+1,n), u (B,T,m),
# extra info dict). The loss and gradients are taken by the harness.
GRAD_KEYS = ("L", "c", "x0")


def run_diffto_lqr(p, u_max=None):
    C, C_f = stage_matrices(p)
    T = C.shape[1]
    dyn = LinearDynamics.time_invariant(p["A"], p["Bm"], T)
    sol = LQR()(p["x0"], QuadraticCost(C, p["c"], C_f, p["cf"]), dyn)
    return sol.x, sol.u, {"converged": int(sol.converged.sum())}


def _tol(p) -> float:
    """Stopping tolerance of the iterative solvers: tight, but reachable in the dtype."""
    return 1e-9 if p["L"].dtype == torch.float64 else 1e-5


def run_diffto_mpc(p, u_max):
    from diffto.layers.mpc import MPC

    C, C_f = stage_matrices(p)
    T = C.shape[1]
    dyn = LinearDynamics.time_invariant(p["A"], p["Bm"], T)
    layer = MPC(dyn, T, u_lower=-u_max, u_upper=u_max, max_iter=50, tol=_tol(p))
    sol = layer(p["x0"], QuadraticCost(C, p["c"], C_f, p["cf"]))
    return sol.x, sol.u, {
        "converged": int(sol.converged.sum()),
        "iterations_max": int(sol.iterations.max()),
    }


def _mpc_pytorch_inputs(p):
    """Time-major, horizon ``T + 1`` version of the problem for mpc.pytorch."""
    C, C_f = stage_matrices(p)
    B, T, k, _ = C.shape
    n = C_f.shape[-1]
    m = k - n
    last = C.new_zeros(B, 1, k, k)
    last[:, 0, :n, :n] = C_f
    last[:, 0, n:, n:] = torch.eye(m, dtype=C.dtype, device=C.device)
    C_all = torch.cat([C, last], 1)  # (B, T+1, k, k)
    c_all = torch.cat([p["c"], torch.cat([p["cf"], p["cf"].new_zeros(B, m)], -1)[:, None]], 1)
    F = torch.cat([p["A"], p["Bm"]], -1).expand(T, B, n, k)
    return C_all.transpose(0, 1), c_all.transpose(0, 1), F, n, m, T, B


def run_mpc_pytorch(p, u_max=None):
    from mpc import mpc

    C, c, F, n, m, T, B = _mpc_pytorch_inputs(p)
    kw = dict(lqr_iter=1) if u_max is None else dict(
        u_lower=-u_max * C.new_ones(T + 1, B, m),
        u_upper=u_max * C.new_ones(T + 1, B, m),
        lqr_iter=50,
        eps=_tol(p),
    )
    ctrl = mpc.MPC(n, m, T + 1, n_batch=B, verbose=-1, exit_unconverged=False,
                   detach_unconverged=False, backprop=True, **kw)
    x, u, _ = ctrl(p["x0"], mpc.QuadCost(C, c), mpc.LinDx(F))
    return x.transpose(0, 1), u.transpose(0, 1)[:, :T], {}


def _cvxpy_layer(B, n, m, T, u_max):
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    k = n + m
    x = cp.Variable((T + 1, n))
    u = cp.Variable((T, m))
    L = [cp.Parameter((k, k)) for _ in range(T)]
    c = cp.Parameter((T, k))
    Lf = cp.Parameter((n, n))
    cf = cp.Parameter(n)
    x0 = cp.Parameter(n)
    A = cp.Parameter((n, n))
    Bm = cp.Parameter((n, m))
    obj, cons = 0, [x[0] == x0]
    for t in range(T):
        tau = cp.hstack([x[t], u[t]])
        obj += 0.5 * cp.sum_squares(L[t] @ tau) + 0.05 * cp.sum_squares(tau) + c[t] @ tau
        cons.append(x[t + 1] == A @ x[t] + Bm @ u[t])
    obj += 0.5 * cp.sum_squares(Lf @ x[T]) + 0.05 * cp.sum_squares(x[T]) + cf @ x[T]
    if u_max is not None:
        cons += [u <= u_max, u >= -u_max]
    prob = cp.Problem(cp.Minimize(obj), cons)
    assert prob.is_dpp()
    return CvxpyLayer(prob, parameters=[*L, c, Lf, cf, x0, A, Bm], variables=[x, u])


_CVX_CACHE: dict = {}


def run_cvxpylayers(p, u_max=None):
    B, T, k, _ = p["L"].shape
    n = p["Lf"].shape[-1]
    key = (B, n, k - n, T, u_max)
    if key not in _CVX_CACHE:
        _CVX_CACHE[key] = _cvxpy_layer(B, n, k - n, T, u_max)
    layer = _CVX_CACHE[key]
    A = p["A"].expand(B, -1, -1)
    Bm = p["Bm"].expand(B, -1, -1)
    args = [*p["L"].unbind(1), p["c"], p["Lf"], p["cf"], p["x0"], A, Bm]
    x, u = layer(*args, solver_args={"solve_method": "Clarabel", "mode": "dense"})
    return x, u, {}


def run_theseus(p, u_max=None):
    """Theseus (Gauss-Newton, its own implicit backward) through diffto's ``TheseusTO``
    adapter: shooting on the controls with the states rolled out, LQ problems only (Theseus
    has no inequality constraints)."""
    from diffto.layers.theseus import TheseusTO

    if u_max is not None:
        raise ValueError("Theseus has no inequality constraints: no box-constrained problem")
    C, C_f = stage_matrices(p)
    T = C.shape[1]
    dyn = LinearDynamics.time_invariant(p["A"], p["Bm"], T)
    sol = TheseusTO(dyn, T, backward="theseus_implicit")(
        p["x0"], QuadraticCost(C, p["c"], C_f, p["cf"]))
    return sol.x, sol.u, {"converged": int(sol.converged.sum())}


# ------------------------------------------------------------------------------ harness
def _run_once(runner: Callable, p: dict[str, Tensor], u_max: float | None) -> dict:
    """One forward + backward; returns times, plan and gradients."""
    leaves = {k: v.detach().clone().requires_grad_(k in GRAD_KEYS) for k, v in p.items()}
    c0, t0 = time.process_time(), time.perf_counter()
    x, u, info = runner(leaves, u_max)
    c1, t1 = time.process_time(), time.perf_counter()
    loss = (leaves["wx"] * x).sum() + (leaves["wu"] * u).sum()
    grads = torch.autograd.grad(loss, [leaves[k] for k in GRAD_KEYS], allow_unused=True)
    c2, t2 = time.process_time(), time.perf_counter()
    grads = {k: torch.zeros_like(p[k]) if g is None else g
             for k, g in zip(GRAD_KEYS, grads, strict=True)}
    return {"fwd": t1 - t0, "bwd": t2 - t1, "cpu_fwd": c1 - c0, "cpu_bwd": c2 - c1,
            "x": x.detach(), "u": u.detach(), "grads": grads, "info": info}


def measure(
    runners: dict[str, Callable],
    p: dict[str, Tensor],
    u_max: float | None,
    repeats: int,
    warmup: int,
    slow: dict[str, int],
) -> dict[str, dict]:
    """Median forward and backward times of each runner, plus its last plan and gradients.

    Runs are interleaved round-robin (solver A, B, C, A, B, C, ...), so that load from other
    processes on a shared machine affects every solver alike and the ratios stay meaningful.
    ``slow`` caps the number of timed repeats for slow peers."""
    runs: dict[str, list[dict]] = {k: [] for k in runners}
    errors: dict[str, str] = {}
    # slow peers: one warm-up run and their own (smaller) number of timed repeats
    plan = {k: ((min(warmup, 1), slow[k]) if k in slow else (warmup, repeats)) for k in runners}
    for i in range(max(w + r for w, r in plan.values())):
        for name, runner in runners.items():
            w, r = plan[name]
            if name in errors or i >= w + r:
                continue
            try:
                run = _run_once(runner, p, u_max)
            except Exception as err:  # a peer failing is a result, not a crash of the benchmark
                errors[name] = f"{type(err).__name__}: {err}"
                continue
            run["timed"] = i >= w
            runs[name].append(run)
    out = {}
    for name in runners:
        if name in errors:
            out[name] = {"error": errors[name]}
            continue
        timed = [r for r in runs[name] if r["timed"]]
        last = runs[name][-1]
        out[name] = {
            "forward_ms": 1e3 * statistics.median(r["fwd"] for r in timed),
            "backward_ms": 1e3 * statistics.median(r["bwd"] for r in timed),
            "forward_cpu_ms": 1e3 * statistics.median(r["cpu_fwd"] for r in timed),
            "backward_cpu_ms": 1e3 * statistics.median(r["cpu_bwd"] for r in timed),
            "x": last["x"], "u": last["u"], "grads": last["grads"], "info": last["info"],
        }
    return out


def max_diff(a: dict, b: dict) -> dict[str, float]:
    out = {"plan": max((a["x"] - b["x"]).abs().max().item(), (a["u"] - b["u"]).abs().max().item())}
    for k in GRAD_KEYS:
        out[f"grad_{k}"] = (a["grads"][k] - b["grads"][k]).abs().max().item()
    scale = max(g.abs().max().item() for g in a["grads"].values())
    out["grad_max_rel"] = max(out[f"grad_{k}"] for k in GRAD_KEYS) / max(scale, 1e-300)
    return out


def bench_problem(name, runners, p, u_max, repeats, warmup, slow_repeats):
    rows = measure(runners, p, u_max, repeats, warmup, {"cvxpylayers": slow_repeats})
    ref = rows.get("diffto", {})
    out = {}
    for solver, r in rows.items():
        if "error" in r:
            out[solver] = {"error": r["error"]}
            continue
        entry = {"forward_ms": r["forward_ms"], "backward_ms": r["backward_ms"],
                 "total_ms": r["forward_ms"] + r["backward_ms"],
                 "forward_cpu_ms": r["forward_cpu_ms"], "backward_cpu_ms": r["backward_cpu_ms"],
                 "total_cpu_ms": r["forward_cpu_ms"] + r["backward_cpu_ms"], **r["info"]}
        if solver != "diffto" and "x" in ref:
            entry["max_abs_diff_vs_diffto"] = max_diff(ref, r)
            ref_total = ref["forward_ms"] + ref["backward_ms"]
            entry["speedup_of_diffto"] = entry["total_ms"] / ref_total
            entry["cpu_speedup_of_diffto"] = entry["total_cpu_ms"] / (
                ref["forward_cpu_ms"] + ref["backward_cpu_ms"])
        if u_max is not None:
            active = (r["u"].abs() - u_max).abs() < 1e-6
            entry["active_bound_frac"] = active.double().mean().item()
        out[solver] = entry
    return {name: out}


def print_table(results: dict) -> None:
    head = (f"{'problem':<14}{'solver':<14}{'fwd ms':>10}{'bwd ms':>10}{'total':>10}"
            f"{'diffto x':>10}{'plan diff':>11}{'grad diff':>11}")
    print(head)
    print("-" * len(head))
    for prob, rows in results.items():
        for solver, r in rows.items():
            if "error" in r:
                print(f"{prob:<14}{solver:<14} error: {r['error'][:60]}")
                continue
            d = r.get("max_abs_diff_vs_diffto", {})
            grad = max((v for k, v in d.items() if k.startswith("grad_") and k != "grad_max_rel"),
                       default=float("nan"))
            print(f"{prob:<14}{solver:<14}{r['forward_ms']:>10.2f}{r['backward_ms']:>10.2f}"
                  f"{r['total_ms']:>10.2f}{r.get('speedup_of_diffto', 1.0):>10.1f}"
                  f"{d.get('plan', 0.0):>11.1e}{grad:>11.1e}")


# ------------------------------------------------------------------------------ size grid
# (B, n, m, T) of the grid; every case runs in its own subprocess, so that the peak resident
# memory it reports (getrusage's ru_maxrss, a high-water mark) belongs to that case alone.
GRID_CASES = {"small": (64, 4, 2, 20), "medium": (1024, 12, 4, 50), "large": (4096, 12, 4, 50)}
GRID_RUNNERS = {
    "lqr": {"diffto": run_diffto_lqr, "mpc.pytorch": run_mpc_pytorch, "theseus": run_theseus},
    "mpc_box": {"diffto": run_diffto_mpc, "mpc.pytorch": run_mpc_pytorch},
}
GRID_OUT = Path(__file__).resolve().parent / "results" / "lqr_mpc_grid.json"


def grid_one(problem: str, solver: str, case: str, dtype_name: str, repeats: int,
             save: Path) -> dict:
    """One grid case in this process: warm-up (which sets the memory high-water mark), then
    the median of ``repeats`` timed runs. Saves the plan and gradients to ``save``."""
    import gc
    import resource

    B, n, m, T = GRID_CASES[case]
    dtype = getattr(torch, dtype_name)
    p = make_problem(B, n, m, T, seed=0, dtype=dtype)
    u_max = None
    if problem == "mpc_box":  # about half the bounds active, as in the B=64 problem
        with torch.no_grad():
            u_max = 0.5 * run_diffto_lqr(p)[1].abs().median().item()
    runner = GRID_RUNNERS[problem][solver]
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    first = _run_once(runner, p, u_max)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runs = [first] if repeats == 0 else [_run_once(runner, p, u_max) for _ in range(repeats)]
    torch.save({"x": first["x"], "u": first["u"], "grads": first["grads"]}, save)
    fwd = statistics.median(r["fwd"] for r in runs)
    bwd = statistics.median(r["bwd"] for r in runs)
    cpu = statistics.median(r["cpu_fwd"] + r["cpu_bwd"] for r in runs)
    return {"forward_ms": 1e3 * fwd, "backward_ms": 1e3 * bwd, "total_ms": 1e3 * (fwd + bwd),
            "total_cpu_ms": 1e3 * cpu, "timed_runs": len(runs),
            "peak_rss_increase_mb": (rss1 - rss0) / 1024.0, "u_max": u_max, **first["info"]}


def run_grid(args: argparse.Namespace) -> dict:
    """Every (problem, case, dtype, solver) of the selection, each in a subprocess, solvers of
    one case back to back. A solver whose estimated time per run (from its previous, smaller
    case, scaled by ``B·T``) exceeds ``--max-case-s`` is skipped and the reason recorded."""
    import subprocess
    import sys

    results = json.loads(args.grid_out.read_text()) if args.grid_out.exists() else {}
    results.setdefault("cases", {})
    tmp = Path(tempfile.mkdtemp(prefix="bench_grid_"))
    for problem in args.problems.split(","):
        last_s: dict[str, tuple[float, int]] = {}  # solver -> (seconds per run, B·T)
        for case in args.cases.split(","):
            B, n, m, T = GRID_CASES[case]
            for dtype_name in args.dtypes.split(","):
                key = f"{problem}/{case}/{dtype_name}"
                rows = {}
                for solver in args.solvers.split(","):
                    if solver not in GRID_RUNNERS[problem]:
                        continue
                    if solver in last_s:
                        sec, bt = last_s[solver]
                        estimate = sec * (B * T) / bt
                        if estimate > args.max_case_s:
                            rows[solver] = {"skipped": f"estimated {estimate:.0f} s per run "
                                            f"(from {sec:.1f} s at B·T = {bt}) > "
                                            f"{args.max_case_s:.0f} s"}
                            print(f"{key:<28}{solver:<13} skipped ({estimate:.0f} s est.)")
                            continue
                    save = tmp / f"{solver}.pt"
                    # large cases: one run, timed (a warm-up is negligible next to seconds)
                    repeats = args.grid_repeats if B * T <= 64 * 20 else 0
                    cmd = [sys.executable, __file__, "--one",
                           json.dumps([problem, solver, case, dtype_name, repeats, str(save)])]
                    load = os.getloadavg()[0]
                    try:
                        proc = subprocess.run(cmd, capture_output=True, text=True,
                                              timeout=args.case_timeout_s)
                    except subprocess.TimeoutExpired:
                        rows[solver] = {"skipped": f"ran past {args.case_timeout_s} s (wall)"}
                        last_s[solver] = (float(args.case_timeout_s), B * T)
                        print(f"{key:<28}{solver:<13} ran past {args.case_timeout_s} s")
                        continue
                    if proc.returncode != 0:
                        rows[solver] = {"error": proc.stderr.strip().splitlines()[-1][:300]}
                        print(f"{key:<28}{solver:<13} error: {rows[solver]['error']}")
                        continue
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    row["load_average_1min"] = load
                    last_s[solver] = (row["total_cpu_ms"] / 1e3, B * T)
                    if solver != "diffto" and (tmp / "diffto.pt").exists() and "diffto" in rows:
                        ref, got = torch.load(tmp / "diffto.pt"), torch.load(save)
                        row["max_abs_diff_vs_diffto"] = max_diff(ref, got)
                        row["speedup_of_diffto"] = row["total_ms"] / rows["diffto"]["total_ms"]
                        row["cpu_speedup_of_diffto"] = (row["total_cpu_ms"]
                                                        / rows["diffto"]["total_cpu_ms"])
                    rows[solver] = row
                    print(f"{key:<28}{solver:<13}{row['forward_ms']:>11.1f}"
                          f"{row['backward_ms']:>11.1f} ms  cpu {row['total_cpu_ms']:.1f} ms"
                          f"  peak +{row['peak_rss_increase_mb']:.0f} MB"
                          f"  x{row.get('cpu_speedup_of_diffto', 1.0):.1f} (cpu)", flush=True)
                (tmp / "diffto.pt").unlink(missing_ok=True)
                # merge: solvers measured in an earlier run of this case keep their rows
                results["cases"][key] = {**results["cases"].get(key, {}), "B": B, "n": n,
                                         "m": m, "T": T, "dtype": dtype_name, **rows}
                results["setup"] = {
                    "threads": 1, "torch": torch.__version__,
                    "machine": platform.processor() or platform.machine(),
                    "memory": "peak resident set increase over the process's state before "
                              "the first forward+backward (getrusage ru_maxrss), one "
                              "subprocess per case",
                    "timing": "at B·T <= 1280 one warm-up run, then the median of 3 timed "
                              "runs; larger cases one timed run; wall time and the process's "
                              "CPU time (one thread: the figure to compare on a shared "
                              "machine); solvers of a case run back to back; skip estimates "
                              "use CPU time",
                }
                write_atomic(args.grid_out, results)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, no cvxpylayers")
    parser.add_argument("--pendulum", action="store_true",
                        help="also the nonlinear pendulum at several settings of both solvers")
    parser.add_argument("--cartpole", action="store_true", help="also the nonlinear cart-pole")
    parser.add_argument("--only-nonlinear", action="store_true",
                        help="skip the LQ problems (with --pendulum / --cartpole)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--horizon", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    grid = parser.add_argument_group("size grid (--grid): LQR and box-MPC at larger sizes")
    grid.add_argument("--grid", action="store_true", help="run the size grid instead")
    grid.add_argument("--cases", default="small,medium,large",
                      help=f"subset of {','.join(f'{k}={v}' for k, v in GRID_CASES.items())}")
    grid.add_argument("--dtypes", default="float32,float64")
    grid.add_argument("--problems", default="lqr,mpc_box")
    grid.add_argument("--solvers", default="diffto,mpc.pytorch,theseus")
    grid.add_argument("--grid-repeats", type=int, default=3)
    grid.add_argument("--max-case-s", type=float, default=180.0,
                      help="skip a solver whose estimated time per run exceeds this")
    grid.add_argument("--case-timeout-s", type=int, default=600)
    grid.add_argument("--grid-out", type=Path, default=GRID_OUT)
    grid.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case, in a subprocess
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # see the note in tests/conftest.py: never more on these machines
    warnings.filterwarnings("ignore")
    if args.one:
        problem, solver, case, dtype_name, repeats, save = json.loads(args.one)
        row = grid_one(problem, solver, case, dtype_name, repeats, Path(save))
        print(json.dumps(row))
        return row
    if args.grid:
        return run_grid(args)
    repeats = args.repeats or (3 if args.quick else 10)
    warmup, slow_repeats = (1, 1) if args.quick else (2, 2)
    B, n, m, T = args.batch, 4, 2, args.horizon
    p = make_problem(B, n, m, T, seed=0)
    u_max = 0.5 * run_diffto_lqr(p)[1].abs().median().item()  # about half the bounds active

    runners_lqr = {"diffto": run_diffto_lqr, "mpc.pytorch": run_mpc_pytorch}
    runners_mpc = {"diffto": run_diffto_mpc, "mpc.pytorch": run_mpc_pytorch}
    if not args.quick:
        runners_lqr["cvxpylayers"] = run_cvxpylayers
        runners_mpc["cvxpylayers"] = run_cvxpylayers
    results = {}
    if not args.only_nonlinear:
        results.update(bench_problem("lqr", runners_lqr, p, None, repeats, warmup,
                                     slow_repeats))
        results.update(bench_problem("mpc_box", runners_mpc, p, u_max, repeats, warmup,
                                     slow_repeats))
    for system in ("pendulum", "cartpole"):
        if getattr(args, system):
            results.update(bench_nonlinear(system, B, T, min(repeats, 5), min(warmup, 1)))
    payload = {
        "setup": {"B": B, "n": n, "m": m, "T": T, "dtype": "float64", "device": "cpu",
                  "threads": torch.get_num_threads(), "u_max": u_max, "repeats": repeats,
                  "quick": args.quick, "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine()},
        "results": results,
    }
    write_atomic(args.out, payload)
    print_table({k: v for k, v in results.items() if not k.startswith("nonlinear_")})
    print_nonlinear(results)
    print(f"wrote {args.out}")
    return payload


# ------------------------------------------------------------------------------ nonlinear
# Nonlinear box-MPC on the classic systems, diffto vs mpc.pytorch. Each solver runs at a few
# settings (tolerances, iteration caps, mpc.pytorch's defaults); every setting is timed
# (interleaved round-robin) and scored against a reference plan (diffto at tol 1e-12) by its
# cost gap, plan error and gradient error (vs central differences of reference re-solves).
# "At equal accuracy" compares mpc.pytorch's most accurate setting (its plan error stops at
# about 1e-4..1e-5 whatever its eps and iteration cap: Gauss-Newton steps and an inexact box
# QP) with diffto's fastest setting that is at least as accurate, in plan error and cost gap.
NONLINEAR = {
    # today's --pendulum problem: swing to upright from |θ0| <= 1, torque |τ| <= 3
    "pendulum": {"q": (10.0, 1.0), "r": (0.1,), "u_max": 3.0, "x0_scale": (1.0, 0.0)},
    # cart-pole balancing from |p0|, |θ0| <= 0.5, force |F| <= 5
    "cartpole": {"q": (1.0, 10.0, 0.1, 0.1), "r": (0.01,), "u_max": 5.0,
                 "x0_scale": (0.5, 0.5, 0.0, 0.0)},
}
DIFFTO_SETTINGS = {"diffto tol=1e-4": 1e-4, "diffto tol=1e-6": 1e-6,
                   "diffto tol=1e-7 (default)": 1e-7, "diffto tol=1e-9": 1e-9}
MPC_PYTORCH_SETTINGS = {  # lqr_iter, eps, detach_unconverged
    "mpc.pytorch defaults (10 it, eps 1e-7)": (10, 1e-7, True),
    "mpc.pytorch 50 it, eps 1e-9": (50, 1e-9, False),
    "mpc.pytorch 200 it, eps 1e-11": (200, 1e-11, False),
}


class _Wrapped(nn.Module):
    """The system without its ``jacobians`` (mpc.pytorch linearizes by autograd anyway)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, u):
        return self.inner(x, u)


def nonlinear_problem(system: str, B: int, T: int) -> dict:
    from diffto.tasks.classic import CartPole, Pendulum

    spec = NONLINEAR[system]
    dyn = (Pendulum(dt=0.05) if system == "pendulum" else CartPole(dt=0.05)).double()
    n = dyn.n_state
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor(spec["x0_scale"], dtype=DTYPE)
    return {
        "dyn": dyn, "n": n, "T": T, "B": B, "u_max": spec["u_max"],
        "x0": (torch.rand(B, n, generator=g, dtype=DTYPE) - 0.5) * 2.0 * scale,
        "q": torch.tensor(spec["q"], dtype=DTYPE), "r": torch.tensor(spec["r"], dtype=DTYPE),
        "wx": torch.randn(B, T + 1, n, generator=g, dtype=DTYPE),
        "wu": torch.randn(B, T, 1, generator=g, dtype=DTYPE),
        "v": torch.randn(B, n, generator=g, dtype=DTYPE),  # direction for the x0-gradient check
    }


def solve_nonlinear(pr: dict, setting, q: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
    """One solve: ``setting`` is a diffto tolerance (float) or an mpc.pytorch tuple."""
    T, B, n, u_max = pr["T"], pr["B"], pr["n"], pr["u_max"]
    if isinstance(setting, float):
        from diffto import QuadraticCost
        from diffto.layers.mpc import MPC

        cost = QuadraticCost.tracking(torch.diag(q), torch.diag(pr["r"]), T)
        sol = MPC(pr["dyn"], T, u_lower=-u_max, u_upper=u_max,
                  max_iter=200 if setting < 1e-10 else 50, tol=setting)(x0, cost)
        return sol.x, sol.u
    from mpc import mpc

    lqr_iter, eps, detach = setting
    k = n + 1
    C = torch.diag(torch.cat([q, pr["r"]])).expand(T + 1, B, k, k).clone()
    C[-1, :, n, n] = 1.0  # the extra control u_T of the terminal stage: optimum 0
    ctrl = mpc.MPC(n, 1, T + 1, u_lower=-u_max, u_upper=u_max, lqr_iter=lqr_iter, eps=eps,
                   n_batch=B, verbose=-1, exit_unconverged=False, detach_unconverged=detach,
                   grad_method=mpc.GradMethods.AUTO_DIFF)
    x, u, _ = ctrl(x0, mpc.QuadCost(C, x0.new_zeros(T + 1, B, k)), _Wrapped(pr["dyn"]))
    return x.transpose(0, 1), u.transpose(0, 1)[:, :T]


def _objective(pr: dict, x: Tensor, u: Tensor) -> Tensor:
    """The cost both solvers minimize, per row ``(B,)``."""
    q, r = pr["q"], pr["r"]
    return 0.5 * ((x**2 * q).sum((1, 2)) + (u**2 * r).sum((1, 2)))


def _loss(pr, x, u):
    return (pr["wx"] * x).sum() + (pr["wu"] * u).sum()


def bench_nonlinear(system: str, B: int, T: int, repeats: int, warmup: int) -> dict:
    pr = nonlinear_problem(system, B, T)
    settings = {**DIFFTO_SETTINGS, **MPC_PYTORCH_SETTINGS}
    # Reference plan and central differences of exact re-solves: dℓ/dq (one pair of solves per
    # weight) and the directional derivative of ℓ along v in x0.
    ref_tol, h = 1e-12, 1e-6
    with torch.no_grad():
        x_ref, u_ref = solve_nonlinear(pr, ref_tol, pr["q"], pr["x0"])
        cost_ref = _objective(pr, x_ref, u_ref)
        fd_q = torch.zeros_like(pr["q"])
        for i in range(len(pr["q"])):
            dq = torch.zeros_like(pr["q"])
            dq[i] = h * pr["q"][i]
            up = _loss(pr, *solve_nonlinear(pr, ref_tol, pr["q"] + dq, pr["x0"]))
            down = _loss(pr, *solve_nonlinear(pr, ref_tol, pr["q"] - dq, pr["x0"]))
            fd_q[i] = (up - down) / (2 * dq[i])
        up = _loss(pr, *solve_nonlinear(pr, ref_tol, pr["q"], pr["x0"] + h * pr["v"]))
        down = _loss(pr, *solve_nonlinear(pr, ref_tol, pr["q"], pr["x0"] - h * pr["v"]))
        fd_v = (up - down) / (2 * h)

    def run(setting):
        q = pr["q"].clone().requires_grad_()
        x0 = pr["x0"].clone().requires_grad_()
        c0, t0 = time.process_time(), time.perf_counter()
        x, u = solve_nonlinear(pr, setting, q, x0)
        c1, t1 = time.process_time(), time.perf_counter()
        gq, gx = torch.autograd.grad(_loss(pr, x, u), [q, x0], allow_unused=True)
        c2, t2 = time.process_time(), time.perf_counter()
        gq = torch.zeros_like(q) if gq is None else gq
        gx = torch.zeros_like(x0) if gx is None else gx
        return {"fwd": t1 - t0, "bwd": t2 - t1, "cpu_fwd": c1 - c0, "cpu_bwd": c2 - c1,
                "cpu": c2 - c0, "x": x.detach(),
                "u": u.detach(), "gq": gq, "gv": (gx * pr["v"]).sum()}

    runs: dict[str, list] = {name: [] for name in settings}
    for _ in range(warmup + repeats):  # round-robin: load hits every setting alike
        for name, setting in settings.items():
            runs[name].append(run(setting))
    out = {}
    for name, rs in runs.items():
        timed, last = rs[warmup:], rs[-1]
        cost = _objective(pr, last["x"], last["u"])
        gap = (cost - cost_ref) / (1.0 + cost_ref.abs())
        out[name] = {
            "forward_ms": 1e3 * statistics.median(r["fwd"] for r in timed),
            "backward_ms": 1e3 * statistics.median(r["bwd"] for r in timed),
            "total_ms": 1e3 * statistics.median(r["fwd"] + r["bwd"] for r in timed),
            "forward_cpu_ms": 1e3 * statistics.median(r["cpu_fwd"] for r in timed),
            "backward_cpu_ms": 1e3 * statistics.median(r["cpu_bwd"] for r in timed),
            "total_cpu_ms": 1e3 * statistics.median(r["cpu"] for r in timed),
            "cost_gap_max_rel": gap.max().item(),
            "cost_gap_median_rel": gap.median().item(),
            "plan_max_abs_err": max((last["x"] - x_ref).abs().max().item(),
                                    (last["u"] - u_ref).abs().max().item()),
            "grad_q_rel_err_vs_fd": ((last["gq"] - fd_q).norm() / fd_q.norm()).item(),
            "grad_x0_dir_rel_err_vs_fd": (abs(last["gv"].item() - fd_v.item())
                                          / abs(fd_v.item())),
        }
    # at equal accuracy: mpc.pytorch's most accurate setting against diffto's fastest setting
    # with no larger plan error and cost gap
    peer = min((k for k in out if k.startswith("mpc.pytorch")),
               key=lambda k: (out[k]["plan_max_abs_err"], out[k]["total_cpu_ms"]))
    ok = [k for k in out if k.startswith("diffto")
          and out[k]["plan_max_abs_err"] <= out[peer]["plan_max_abs_err"]
          and out[k]["cost_gap_max_rel"] <= max(out[peer]["cost_gap_max_rel"], 1e-14)]
    mine = min(ok, key=lambda k: out[k]["total_cpu_ms"]) if ok else None
    summary = {"mpc.pytorch": peer, "diffto": mine}
    if mine:
        summary["speedup_of_diffto_wall"] = out[peer]["total_ms"] / out[mine]["total_ms"]
        summary["speedup_of_diffto_cpu"] = out[peer]["total_cpu_ms"] / out[mine]["total_cpu_ms"]
    defaults = out["mpc.pytorch defaults (10 it, eps 1e-7)"]
    summary["speedup_of_diffto_default_vs_mpc_pytorch_default_cpu"] = (
        defaults["total_cpu_ms"] / out["diffto tol=1e-7 (default)"]["total_cpu_ms"])
    today = out["mpc.pytorch 50 it, eps 1e-9"]
    summary["speedup_of_diffto_like_for_like_cpu"] = (  # the settings of today's --pendulum
        today["total_cpu_ms"] / out["diffto tol=1e-9"]["total_cpu_ms"])
    summary["speedup_of_diffto_like_for_like_wall"] = (
        today["total_ms"] / out["diffto tol=1e-9"]["total_ms"])
    return {f"nonlinear_{system}": {"settings": out, "summary": summary,
                                    "reference_grad_q_fd": fd_q.tolist()}}


def print_nonlinear(results: dict) -> None:
    for prob, res in results.items():
        if not prob.startswith("nonlinear_"):
            continue
        print(f"\n{prob} (B, T as in setup; cost gap / plan error vs the tol-1e-12 reference)")
        print(f"{'setting':<40}{'fwd ms':>9}{'bwd ms':>9}{'cpu ms':>9}{'cost gap':>10}"
              f"{'plan err':>10}{'grad q':>9}{'grad x0':>9}")
        for name, r in res["settings"].items():
            print(f"{name:<40}{r['forward_ms']:>9.1f}{r['backward_ms']:>9.1f}"
                  f"{r['total_cpu_ms']:>9.1f}{r['cost_gap_max_rel']:>10.1e}"
                  f"{r['plan_max_abs_err']:>10.1e}{r['grad_q_rel_err_vs_fd']:>9.1e}"
                  f"{r['grad_x0_dir_rel_err_vs_fd']:>9.1e}")
        print({k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in res["summary"].items()})


if __name__ == "__main__":
    main()
