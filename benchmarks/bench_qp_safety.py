"""QPMPC and SafetyFilter against their peers on one machine, one run.

* QPMPC (cvxpylayers) vs LQR (unconstrained) and vs MPC (box-constrained) on B=64, n=4, m=2,
  T=20, float64: forward and backward time, and the largest plan / gradient difference.
* SafetyFilter vs a cvxpylayers projection (Clarabel at tight tolerances, dense derivative) on
  B=256 actions, m=2, k=6: forward + backward time and the largest output / gradient
  difference.

Run ``python benchmarks/bench_qp_safety.py``; writes ``benchmarks/results/qp_safety.json``.
Timings are medians over repeats (QPMPC and cvxpylayers: one run, they take seconds).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from _results import write_atomic

from diffto.layers.lqr import LQR
from diffto.layers.mpc import MPC
from diffto.layers.qp import QPMPC
from diffto.layers.safety import SafetyFilter
from diffto.problem import LinearDynamics, QuadraticCost

DT = torch.float64
OUT = Path(__file__).parent / "results" / "qp_safety.json"


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def mpc_problem(B=64, n=4, m=2, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(n, dtype=DT) + 0.1 * torch.randn(n, n, generator=g, dtype=DT)
    Bu = 0.5 * torch.randn(n, m, generator=g, dtype=DT)
    dyn = LinearDynamics.time_invariant(A, Bu, T)
    Q = torch.rand(n, generator=g, dtype=DT) + 0.5
    R = 0.1 * torch.rand(m, generator=g, dtype=DT) + 0.05
    cost = QuadraticCost.tracking(Q, R, T)
    x0 = 2.0 * torch.randn(B, n, generator=g, dtype=DT)
    return x0, cost, dyn


def solve_and_grad(solve, x0, cost, dyn, repeats):
    """Forward time, backward time, plan and gradients w.r.t. (x0, C, c, F)."""
    C, c, F = (t.detach().clone().requires_grad_(True) for t in (cost.C, cost.c, dyn.F))
    x0 = x0.clone().requires_grad_(True)
    cost = QuadraticCost(C, c, cost.C_final, cost.c_final)
    dyn = LinearDynamics(F, dyn.f)
    t_fwd, sol = timed(lambda: solve(x0, cost, dyn), repeats)
    w = torch.randn_like(sol.u, generator=torch.Generator().manual_seed(1))
    loss = lambda s: (s.u * w).sum() + s.x.pow(2).sum()  # noqa: E731
    t_bwd, grads = timed(
        lambda: torch.autograd.grad(loss(solve(x0, cost, dyn)), (x0, C, c, F)), repeats
    )
    return {"forward_s": t_fwd, "forward_backward_s": t_bwd,
            "converged": bool(sol.converged.all())}, sol, grads


def max_rel(a, b) -> float:
    return ((a - b).abs().max() / (1 + b.abs().max())).item()


def bench_mpc() -> dict:
    x0, cost, dyn = mpc_problem()
    T, n, m = 20, 4, 2
    out = {}
    start = time.perf_counter()
    qp_free = QPMPC(T, n, m)
    out["qpmpc_construction_s"] = time.perf_counter() - start
    qp_box = QPMPC(T, n, m, u_lower=-0.5, u_upper=0.5)
    lqr = LQR()
    r_lqr, s_lqr, g_lqr = solve_and_grad(lambda x, c, d: lqr(x, c, d), x0, cost, dyn, 5)
    r_qp, s_qp, g_qp = solve_and_grad(lambda x, c, d: qp_free(x, c, d), x0, cost, dyn, 1)
    out["unconstrained"] = {
        "lqr": r_lqr,
        "qpmpc": r_qp,
        "plan_max_rel_diff": max_rel(s_qp.u, s_lqr.u),
        "grad_max_rel_diff": {k: max_rel(a, b) for k, a, b in
                              zip(("x0", "C", "c", "F"), g_qp, g_lqr, strict=True)},
    }
    r_mpc, s_mpc, g_mpc = solve_and_grad(
        lambda x, c, d: MPC(d, T, u_lower=-0.5, u_upper=0.5)(x, c), x0, cost, dyn, 3
    )
    r_qpb, s_qpb, g_qpb = solve_and_grad(lambda x, c, d: qp_box(x, c, d), x0, cost, dyn, 1)
    out["box"] = {
        "active_fraction": ((s_mpc.u.abs() > 0.5 - 1e-6).double().mean()).item(),
        "mpc": r_mpc,
        "qpmpc": r_qpb,
        "plan_max_rel_diff": max_rel(s_qpb.u, s_mpc.u),
        "grad_max_rel_diff": {k: max_rel(a, b) for k, a, b in
                              zip(("x0", "C", "c", "F"), g_qpb, g_mpc, strict=True)},
    }
    return out


def bench_safety(N=256, k=6, m=2) -> dict:
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    g = torch.Generator().manual_seed(0)
    G = torch.randn(N, k, m, generator=g, dtype=DT)
    z = torch.randn(N, m, generator=g, dtype=DT)
    h = (G @ z.unsqueeze(-1)).squeeze(-1) + torch.rand(N, k, generator=g, dtype=DT)
    a = z + 2.0 * torch.randn(N, m, generator=g, dtype=DT)
    y, a_p, G_p, h_p = cp.Variable(m), cp.Parameter(m), cp.Parameter((k, m)), cp.Parameter(k)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - a_p)), [G_p @ y <= h_p])
    layer = CvxpyLayer(prob, parameters=[a_p, G_p, h_p], variables=[y])
    # Tight tolerances: at Clarabel's defaults the reference itself is off by ~1e-3 here.
    args = {"solve_method": "Clarabel", "mode": "dense", "tol_gap_abs": 1e-12,
            "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "tol_ktratio": 1e-10}
    shield = SafetyFilter()

    def run(solve):
        inputs = [t.clone().requires_grad_(True) for t in (a, G, h)]
        out = solve(*inputs)
        return out, torch.autograd.grad(out.pow(2).sum(), inputs)

    t_ours, (y_ours, g_ours) = timed(lambda: run(lambda *t: shield(*t)), 20)
    t_fwd, _ = timed(lambda: shield(a, G, h), 20)
    t_cvx, (y_cvx, g_cvx) = timed(lambda: run(lambda *t: layer(*t, solver_args=args)[0]), 1)
    _, info = shield(a, G, h, return_info=True)
    return {
        "N": N, "k": k, "m": m,
        "safety_filter_forward_s": t_fwd,
        "safety_filter_forward_backward_s": t_ours,
        "cvxpylayers_forward_backward_s": t_cvx,
        "speedup": t_cvx / t_ours,
        "active_fraction": info["active"].any(-1).double().mean().item(),
        "interior_point_iterations_max": int(info["iterations"].max()),
        "output_max_abs_diff": (y_ours - y_cvx).abs().max().item(),
        "grad_max_rel_diff": {k: max_rel(a_, b_) for k, a_, b_ in
                              zip(("a", "G", "h"), g_ours, g_cvx, strict=True)},
    }


def main() -> None:
    torch.set_num_threads(1)  # see benchmarks/README: batched MKL solves on this machine
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "mpc_B64_n4_m2_T20": bench_mpc(), "safety_filter": bench_safety()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(OUT, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
