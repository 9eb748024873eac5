"""LQR and box-constrained MPC on a GPU: diffto against mpc.pytorch on the same GPU and against
diffto on the same machine's CPU, forward + backward, over batch sizes.

The problems are ``bench_lqr_mpc.py``'s (random stable dynamics, positive definite costs with
linear terms, a terminal cost; box bounds at about half of the unconstrained plan's median
control, so about half the bounds bind), drawn on the CPU in float64 and moved to the device in
the dtype of the case, so every solver solves the same problem. Each case runs the solvers
round-robin inside every repeat (a warm-up run, then the median of ``--repeats``), with
``torch.cuda.synchronize()`` around every timed section. CPU rows use all the machine's cores
(``--cpu-threads``, default: every core), since that is what a user compares a GPU with.

Agreement: the largest plan and gradient differences of each solver to diffto on the GPU, the
gradients of ``ℓ = Σ w_x·x + Σ w_u·u`` w.r.t. the cost factor ``L``, the linear cost ``c``
and ``x0`` (as ``bench_lqr_mpc.py``). A solver whose previous case took longer than
``--max-case-s`` per run (extrapolated by B) is skipped, and the reason recorded.

Run (on a machine with a CUDA device): ``python benchmarks/bench_gpu_layers.py [--batches 64
1024 8192] [--dtypes float32 float64] [--problems lqr mpc_box]``. Results:
``benchmarks/results/gpu_layers.json`` (rewritten atomically after every case, so a run cut
short keeps the cases it finished) and a table on stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from _results import machine_info, write_atomic
from bench_lqr_mpc import (
    GRAD_KEYS,
    make_problem,
    max_diff,
    run_diffto_lqr,
    run_diffto_mpc,
    run_mpc_pytorch,
)

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_layers.json"
RUNNERS = {"lqr": run_diffto_lqr, "mpc_box": run_diffto_mpc}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(runner, p: dict, u_max: float | None, device: torch.device) -> dict:
    """One forward and one backward pass, timed with the device synchronized."""
    leaves = {k: v.detach().clone().requires_grad_(k in GRAD_KEYS) for k, v in p.items()}
    _sync(device)
    t0 = time.perf_counter()
    x, u, info = runner(leaves, u_max)
    _sync(device)
    t1 = time.perf_counter()
    loss = (leaves["wx"] * x).sum() + (leaves["wu"] * u).sum()
    grads = torch.autograd.grad(loss, [leaves[k] for k in GRAD_KEYS], allow_unused=True)
    _sync(device)
    t2 = time.perf_counter()
    grads = {k: torch.zeros_like(p[k]) if g is None else g
             for k, g in zip(GRAD_KEYS, grads, strict=True)}
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "x": x.detach().cpu(),
            "u": u.detach().cpu(), "grads": {k: g.cpu() for k, g in grads.items()}, "info": info}


def bench_case(problem: str, B: int, n: int, m: int, T: int, dtype: torch.dtype,
               solvers: dict, repeats: int, skip: dict[str, str]) -> dict:
    """Every solver on one problem, round-robin; ``solvers`` maps a row name to
    ``(runner, device)``."""
    p64 = make_problem(B, n, m, T, seed=0)
    u_max = None
    if problem == "mpc_box":  # about half the bounds active, as in bench_lqr_mpc.py
        u_max = 0.5 * run_diffto_lqr(p64)[1].abs().median().item()
    inputs = {dev: {k: v.to(device=dev, dtype=dtype) for k, v in p64.items()}
              for dev in {d for _, d in solvers.values()}}
    runs: dict[str, list[dict]] = {name: [] for name in solvers}
    errors: dict[str, str] = dict(skip)
    for i in range(1 + repeats):
        for name, (runner, dev) in solvers.items():
            if name in errors:
                continue
            try:
                run = run_once(runner, inputs[dev], u_max, dev)
            except Exception as err:  # a solver failing is a result, not a crash
                errors[name] = f"{type(err).__name__}: {err}"[:300]
                continue
            run["timed"] = i > 0
            runs[name].append(run)
    rows = {}
    reference = runs.get("diffto (GPU)") and runs["diffto (GPU)"][-1]
    for name in solvers:
        if name in errors:
            rows[name] = {"skipped" if name in skip else "error": errors[name]}
            continue
        timed = [r for r in runs[name] if r["timed"]]
        fwd = statistics.median(r["forward_s"] for r in timed)
        bwd = statistics.median(r["backward_s"] for r in timed)
        last = runs[name][-1]
        row = {"forward_ms": 1e3 * fwd, "backward_ms": 1e3 * bwd, "total_ms": 1e3 * (fwd + bwd),
               **{k: v for k, v in last["info"].items()}}
        if reference is not None and name != "diffto (GPU)":
            row["vs_diffto_gpu"] = max_diff(reference, last)
        rows[name] = row
    return {"problem": problem, "B": B, "n": n, "m": m, "T": T, "dtype": str(dtype)[6:],
            "u_max": u_max, "repeats": repeats, "solvers": rows}


def print_table(cases: list[dict]) -> None:
    names = list(cases[0]["solvers"]) if cases else []
    head = "| problem | (B, n, m, T) | dtype | " + " | ".join(f"{s} fwd + bwd" for s in names)
    print(head + " | diffto GPU vs mpc.pytorch GPU | diffto GPU vs CPU |")
    print("|" + "---|" * (5 + len(names)))
    for c in cases:
        cells, totals = [], {}
        for s in names:
            r = c["solvers"][s]
            if "total_ms" in r:
                totals[s] = r["total_ms"]
                cells.append(f"{r['forward_ms']:.1f} + {r['backward_ms']:.1f} ms")
            else:
                cells.append("skipped" if "skipped" in r else "error")
        gpu = totals.get("diffto (GPU)")

        def ratio(other: str, gpu=gpu, totals=totals) -> str:
            return f"{totals[other] / gpu:.1f}×" if gpu and other in totals else "—"

        print(f"| {c['problem']} | ({c['B']}, {c['n']}, {c['m']}, {c['T']}) | {c['dtype']} | "
              + " | ".join(cells) + f" | {ratio('mpc.pytorch (GPU)')} | {ratio('diffto (CPU)')} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1024, 8192])
    parser.add_argument("--sizes", nargs="+", default=["4,2,20", "12,4,50"],
                        help="n,m,T per size")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--problems", nargs="+", default=["lqr", "mpc_box"], choices=RUNNERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-case-s", type=float, default=20.0,
                        help="skip a solver whose time per run, extrapolated by B, exceeds this")
    parser.add_argument("--no-peer", action="store_true", help="leave mpc.pytorch out")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark compares the GPU with the CPU")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.cpu_threads)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    payload = {
        "setup": {"repeats": args.repeats, "cpu_threads": args.cpu_threads,
                  "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "machine": machine_info()},
    }
    cases: list[dict] = []
    for problem in args.problems:
        for size in args.sizes:
            n, m, T = (int(v) for v in size.split(","))
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                last_per_row: dict[str, float] = {}  # seconds per run per batch row
                for B in sorted(args.batches):
                    solvers = {"diffto (GPU)": (RUNNERS[problem], gpu)}
                    if not args.no_peer:
                        solvers["mpc.pytorch (GPU)"] = (run_mpc_pytorch, gpu)
                    solvers["diffto (CPU)"] = (RUNNERS[problem], cpu)
                    skip = {name: f"{last_per_row[name] * B:.0f} s per run estimated from the "
                                  f"previous batch size, over --max-case-s {args.max_case_s}"
                            for name in solvers
                            if last_per_row.get(name, 0.0) * B > args.max_case_s}
                    case = bench_case(problem, B, n, m, T, dtype, solvers, args.repeats, skip)
                    for name, row in case["solvers"].items():
                        if "total_ms" in row:
                            last_per_row[name] = row["total_ms"] / 1e3 / B
                    cases.append(case)
                    print_table([case])
                    write_atomic(args.out, {**payload, "cases": cases})  # a killed run keeps
    print()
    print_table(cases)
    print(f"wrote {args.out}")
    return {**payload, "cases": cases}


if __name__ == "__main__":
    main()
