"""LQR and box-constrained MPC, forward + backward, side by side with mpc.pytorch and cvxpylayers.

Problems (float64, CPU, one intra-op thread): ``B = 64`` rows, ``n = 4`` states, ``m = 2``
controls, horizon ``T = 20``; random stable linear dynamics, random positive definite stage
costs ``C_t = L_tᵀL_t + εI`` with linear terms, a terminal cost, random initial states.

* ``lqr``: unconstrained. diffto ``LQR`` vs ``mpc.MPC`` (one LQR iteration on ``LinDx``) vs
  cvxpylayers.
* ``mpc_box``: the same problem with control bounds ``|u| <= u_max`` chosen so that many
  bounds are active. diffto ``MPC`` (on ``LinearDynamics``) vs ``mpc.MPC`` (box-DDP on
  ``LinDx``) vs cvxpylayers.
* ``mpc_pendulum`` (optional, ``--pendulum``): nonlinear pendulum swing-up with torque bounds,
  diffto ``MPC`` vs ``mpc.MPC`` (autograd Jacobians); local optima may differ, so plans are
  compared only where both solvers converged to the same cost.

Backward: the gradient of ``ℓ = Σ w_x·x + Σ w_u·u`` (fixed random weights) w.r.t. the cost
factor ``L``, the linear cost ``c`` and the initial state ``x0``. Accuracy: the maximum
absolute difference of plans and gradients to diffto's (and, for cvxpylayers, to exact
re-solves). Timing: warm-up, then the median of ``--repeats`` runs. Results go to
``benchmarks/results/lqr_mpc.json`` (written atomically) and a table is printed.

mpc.pytorch is time-major and has no separate terminal cost: its horizon ``T' = T + 1`` has
``T + 1`` states and controls, the last stage costing ``[x_T; u_T]`` with ``blockdiag(C_f, I)``.
The extra control ``u_T`` only enters that stage, so its optimum is 0 and the plans coincide.

Run: ``python benchmarks/bench_lqr_mpc.py [--quick] [--pendulum]``.
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
from torch import Tensor, nn

from diffto.layers.lqr import LQR
from diffto.problem import LinearDynamics, QuadraticCost

RESULTS = Path(__file__).resolve().parent / "results" / "lqr_mpc.json"
DTYPE = torch.float64


# ------------------------------------------------------------------------------ problems
def make_problem(B: int, n: int, m: int, T: int, seed: int) -> dict[str, Tensor]:
    """Random well-posed problem; ``L (B, T, n+m, n+m)``, ``c (B, T, n+m)``,
    ``Lf (B, n, n)``, ``cf (B, n)``, ``A (n, n)``, ``Bm (n, m)``, ``x0 (B, n)``."""
    g = torch.Generator().manual_seed(seed)
    k = n + m

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=DTYPE)

    A = torch.eye(n, dtype=DTYPE) + 0.1 * randn(n, n)
    A = A / max(1.0, torch.linalg.eigvals(A).abs().max().item())  # spectral radius <= 1
    return {
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


def stage_matrices(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``C = LᵀL + 0.1 I`` and ``C_f = L_fᵀL_f + 0.1 I`` (positive definite)."""
    k, n = p["L"].shape[-1], p["Lf"].shape[-1]
    C = p["L"].transpose(-1, -2) @ p["L"] + 0.1 * torch.eye(k, dtype=DTYPE)
    C_f = p["Lf"].transpose(-1, -2) @ p["Lf"] + 0.1 * torch.eye(n, dtype=DTYPE)
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


def run_diffto_mpc(p, u_max):
    from diffto.layers.mpc import MPC

    C, C_f = stage_matrices(p)
    T = C.shape[1]
    dyn = LinearDynamics.time_invariant(p["A"], p["Bm"], T)
    layer = MPC(dyn, T, u_lower=-u_max, u_upper=u_max, max_iter=50, tol=1e-9)
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
    last = torch.zeros(B, 1, k, k, dtype=DTYPE)
    last[:, 0, :n, :n] = C_f
    last[:, 0, n:, n:] = torch.eye(m, dtype=DTYPE)
    C_all = torch.cat([C, last], 1)  # (B, T+1, k, k)
    c_all = torch.cat([p["c"], torch.cat([p["cf"], p["cf"].new_zeros(B, m)], -1)[:, None]], 1)
    F = torch.cat([p["A"], p["Bm"]], -1).expand(T, B, n, k)
    return C_all.transpose(0, 1), c_all.transpose(0, 1), F, n, m, T, B


def run_mpc_pytorch(p, u_max=None):
    from mpc import mpc

    C, c, F, n, m, T, B = _mpc_pytorch_inputs(p)
    kw = dict(lqr_iter=1) if u_max is None else dict(
        u_lower=-u_max * torch.ones(T + 1, B, m, dtype=DTYPE),
        u_upper=u_max * torch.ones(T + 1, B, m, dtype=DTYPE),
        lqr_iter=50,
        eps=1e-9,
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


# ------------------------------------------------------------------------------ harness
def _run_once(runner: Callable, p: dict[str, Tensor], u_max: float | None) -> dict:
    """One forward + backward; returns times, plan and gradients."""
    leaves = {k: v.detach().clone().requires_grad_(k in GRAD_KEYS) for k, v in p.items()}
    t0 = time.perf_counter()
    x, u, info = runner(leaves, u_max)
    t1 = time.perf_counter()
    loss = (leaves["wx"] * x).sum() + (leaves["wu"] * u).sum()
    grads = torch.autograd.grad(loss, [leaves[k] for k in GRAD_KEYS], allow_unused=True)
    t2 = time.perf_counter()
    grads = {k: torch.zeros_like(p[k]) if g is None else g
             for k, g in zip(GRAD_KEYS, grads, strict=True)}
    return {"fwd": t1 - t0, "bwd": t2 - t1, "x": x.detach(), "u": u.detach(), "grads": grads,
            "info": info}


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
                 "total_ms": r["forward_ms"] + r["backward_ms"], **r["info"]}
        if solver != "diffto" and "x" in ref:
            entry["max_abs_diff_vs_diffto"] = max_diff(ref, r)
            ref_total = ref["forward_ms"] + ref["backward_ms"]
            entry["speedup_of_diffto"] = entry["total_ms"] / ref_total
        if u_max is not None:
            active = (r["u"].abs() - u_max).abs() < 1e-6
            entry["active_bound_frac"] = active.double().mean().item()
        out[solver] = entry
    return {name: out}


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, no cvxpylayers")
    parser.add_argument("--pendulum", action="store_true", help="also the nonlinear pendulum")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--horizon", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # see the note in tests/conftest.py: never more on these machines
    warnings.filterwarnings("ignore")
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
    results.update(bench_problem("lqr", runners_lqr, p, None, repeats, warmup, slow_repeats))
    results.update(bench_problem("mpc_box", runners_mpc, p, u_max, repeats, warmup, slow_repeats))
    if args.pendulum:
        results.update(bench_pendulum(B, T, repeats, warmup))
    payload = {
        "setup": {"B": B, "n": n, "m": m, "T": T, "dtype": "float64", "device": "cpu",
                  "threads": torch.get_num_threads(), "u_max": u_max, "repeats": repeats,
                  "quick": args.quick, "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine()},
        "results": results,
    }
    write_json_atomic(args.out, payload)
    print_table(results)
    print(f"wrote {args.out}")
    return payload


# ------------------------------------------------------------------------------ pendulum
class _TorquePendulum(nn.Module):
    """The classic pendulum for both solvers (state (θ, ω), θ = 0 upright)."""

    def __init__(self, dt: float = 0.05) -> None:
        super().__init__()
        from diffto.tasks.classic.pendulum import Pendulum

        self.inner = Pendulum(dt=dt).double()

    def forward(self, x, u):
        return self.inner(x, u)


def bench_pendulum(B: int, T: int, repeats: int, warmup: int) -> dict:
    from mpc import mpc

    from diffto.layers.mpc import MPC

    g = torch.Generator().manual_seed(1)
    x0 = torch.stack([(torch.rand(B, generator=g, dtype=DTYPE) - 0.5) * 2.0,
                      torch.zeros(B, dtype=DTYPE)], -1)
    q = torch.tensor([10.0, 1.0], dtype=DTYPE)
    r = torch.tensor([0.1], dtype=DTYPE)
    u_max = 3.0
    dyn = _TorquePendulum()
    wx = torch.randn(B, T + 1, 2, generator=g, dtype=DTYPE)
    wu = torch.randn(B, T, 1, generator=g, dtype=DTYPE)

    def cost_diffto(qq):
        return QuadraticCost.tracking(torch.diag(qq), torch.diag(r), T)

    def run(which):
        qq = q.clone().requires_grad_()
        xi = x0.clone().requires_grad_()
        t0 = time.perf_counter()
        if which == "diffto":
            sol = MPC(dyn, T, u_lower=-u_max, u_upper=u_max, max_iter=50, tol=1e-9)(
                xi, cost_diffto(qq))
            x, u = sol.x, sol.u
        else:
            C = torch.diag(torch.cat([qq, r])).expand(T + 1, B, 3, 3).clone()
            C[-1, :, 2, 2] = 1.0
            c = torch.zeros(T + 1, B, 3, dtype=DTYPE)
            ctrl = mpc.MPC(2, 1, T + 1, u_lower=-u_max, u_upper=u_max, lqr_iter=50, eps=1e-9,
                           n_batch=B, verbose=-1, exit_unconverged=False,
                           detach_unconverged=False, grad_method=mpc.GradMethods.AUTO_DIFF)
            x, u, _ = ctrl(xi, mpc.QuadCost(C, c), dyn)
            x, u = x.transpose(0, 1), u.transpose(0, 1)[:, :T]
        t1 = time.perf_counter()
        gq, gx = torch.autograd.grad((wx * x).sum() + (wu * u).sum(), [qq, xi])
        return t1 - t0, time.perf_counter() - t1, x.detach(), u.detach(), gq, gx

    out = {}
    for which in ("diffto", "mpc.pytorch"):
        times = [run(which) for _ in range(warmup + repeats)][warmup:]
        f = statistics.median(t[0] for t in times)
        b = statistics.median(t[1] for t in times)
        out[which] = {"forward_ms": 1e3 * f, "backward_ms": 1e3 * b, "total_ms": 1e3 * (f + b),
                      "_last": times[-1]}
    a, b = out["diffto"].pop("_last"), out["mpc.pytorch"].pop("_last")
    out["mpc.pytorch"]["speedup_of_diffto"] = out["mpc.pytorch"]["total_ms"] / out["diffto"][
        "total_ms"]
    out["mpc.pytorch"]["max_abs_diff_vs_diffto"] = {
        "plan": max((a[2] - b[2]).abs().max().item(), (a[3] - b[3]).abs().max().item()),
        "grad_q": (a[4] - b[4]).abs().max().item(),
        "grad_x0": (a[5] - b[5]).abs().max().item(),
    }
    # Which gradient is right? Central differences of exact re-solves (diffto, tight tol)
    # w.r.t. the weights q: the loss is a sum over rows, so 2 x 2 re-solves give dℓ/dq.
    h = 1e-5
    fd = torch.zeros(2, dtype=DTYPE)
    with torch.no_grad():
        for i in range(2):
            vals = []
            for sign in (1.0, -1.0):
                qq = q.clone()
                qq[i] += sign * h
                sol = MPC(dyn, T, u_lower=-u_max, u_upper=u_max, max_iter=100, tol=1e-12)(
                    x0, cost_diffto(qq))
                vals.append(((wx * sol.x).sum() + (wu * sol.u).sum()).item())
            fd[i] = (vals[0] - vals[1]) / (2 * h)
    for which, res in (("diffto", a), ("mpc.pytorch", b)):
        out[which]["grad_q_max_abs_err_vs_finite_diff"] = (res[4] - fd).abs().max().item()
    return {"mpc_pendulum": out}


if __name__ == "__main__":
    main()
