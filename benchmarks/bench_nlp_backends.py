"""Every solver backend on one problem: plan time, gradient time, agreement with LQR.

Problems (float64, CPU, one intra-op thread):

* ``lq``: ``B = 64`` rows, ``n = 4``, ``m = 2``, ``T = 20``; random stable linear dynamics,
  positive definite stage costs ``C_t = L_tᵀL_t + 0.1 I`` with linear terms, a terminal cost,
  random initial states (the shared problem of ``bench_lqr_mpc.py``). Backends: ``LQR``
  (the exact reference), ``MPC`` (iLQR, ``LinearDynamics``), ``QPMPC`` (cvxpylayers,
  Clarabel, dense derivative), ``TheseusTO`` (Gauss-Newton, ``implicit`` and ``unroll``) and
  ``CasadiTO`` (IPOPT, ``tol=1e-10``).
* ``pendulum``: ``B = 8`` damped-pendulum swing-ups, ``T = 20``, ``dt = 0.1``, unbounded
  torque (so Theseus, which has no inequality constraints, can take part) and a torque-bounded
  variant (MPC and CasADi only). Reference: CasADi/IPOPT. Local optima can differ between
  solvers, so the table also gives the largest cost difference.

Gradient: of ``ℓ = Σ w_u·u + Σ cost`` (fixed random ``w_u``) w.r.t. ``x0``, ``C`` (its
symmetric part) and ``c``. ``plan_s`` is the forward call on inputs that require grad (as in
training), ``grad_s`` the backward call, both the median of ``--repeats`` calls after one
warm-up call; ``setup_s`` is the layer's construction, once (canonicalization for QPMPC, the
symbolic NLP and the IPOPT instance for CasADi). Agreement: the maximum absolute difference of
``u`` and of each gradient to the reference, relative to the reference's largest entry.

Run: ``python benchmarks/bench_nlp_backends.py [--repeats 3]``; writes
``benchmarks/results/nlp_backends.json`` atomically and prints a table.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import casadi as ca
import torch
from _results import write_atomic
from torch import Tensor, nn

from diffto.layers.casadi_to import CasadiTO
from diffto.layers.lqr import LQR
from diffto.layers.mpc import MPC
from diffto.layers.qp import QPMPC
from diffto.layers.theseus import TheseusTO
from diffto.problem import LinearDynamics, QuadraticCost

RESULTS = Path(__file__).resolve().parent / "results" / "nlp_backends.json"
D = torch.float64
DT = 0.1


def lq_problem(B: int = 64, n: int = 4, m: int = 2, T: int = 20, seed: int = 0) -> dict:
    """The shared LQ problem: ``x0 (B, n)``, ``C (B, T, k, k)``, ``c (B, T, k)``, ``C_f``,
    ``c_f``, ``dyn`` (time-invariant ``LinearDynamics``), loss weights ``w_u (B, T, m)``."""
    g = torch.Generator().manual_seed(seed)
    k = n + m

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=D)

    A = torch.eye(n, dtype=D) + 0.1 * randn(n, n)
    A = A / max(1.0, torch.linalg.eigvals(A).abs().max().item())  # spectral radius <= 1
    L = randn(B, T, k, k) / k**0.5
    Lf = randn(B, n, n) / n**0.5
    return {
        "x0": 2.0 * randn(B, n),
        "C": L.transpose(-1, -2) @ L + 0.1 * torch.eye(k, dtype=D),
        "c": randn(B, T, k),
        "C_f": Lf.transpose(-1, -2) @ Lf + 0.1 * torch.eye(n, dtype=D),
        "c_f": randn(B, n),
        "dyn": LinearDynamics.time_invariant(A, 0.3 * randn(n, m), T),
        "w_u": randn(B, T, m),
        "dims": (B, n, m, T),
    }


def pendulum_problem(B: int = 8, T: int = 20, seed: int = 1) -> dict:
    """Swing-ups to the upright ``(π, 0)`` from random states near the bottom."""
    g = torch.Generator().manual_seed(seed)
    goal = torch.tensor([math.pi, 0.0], dtype=D)
    C = torch.diag(torch.tensor([1.0, 0.1, 0.02], dtype=D)).expand(B, T, 3, 3).clone()
    c = torch.cat([-(C[..., :2, :2] @ goal), torch.zeros(B, T, 1, dtype=D)], -1)
    C_f = 10 * torch.diag(torch.tensor([1.0, 0.1], dtype=D)).expand(B, 2, 2).clone()
    return {
        "x0": 0.5 * torch.randn(B, 2, generator=g, dtype=D),
        "C": C,
        "c": c,
        "C_f": C_f,
        "c_f": -(C_f @ goal),
        "w_u": torch.randn(B, T, 1, generator=g, dtype=D),
        "dims": (B, 2, 1, T),
    }


class Pendulum(nn.Module):
    """Damped pendulum, explicit Euler: ``θ' = θ + dt ω``, ``ω' = ω + dt (−g sin θ + u − 0.1ω)``."""

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        th, om = x[..., 0], x[..., 1]
        return torch.stack([th + DT * om, om + DT * (-9.81 * torch.sin(th) + u[..., 0]
                                                     - 0.1 * om)], -1)


def pendulum_ca(x, u):
    return ca.vertcat(x[0] + DT * x[1], x[1] + DT * (-9.81 * ca.sin(x[0]) + u[0] - 0.1 * x[1]))


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(make: Callable[[], Callable], p: dict, repeats: int) -> dict:
    """Build the layer once (timed), warm up with one call, then time ``repeats`` forward and
    backward calls; return the last plan, gradients and median times."""
    layer, t_setup = timed(make)
    plan, grad = [], []
    for i in range(repeats + 1):
        inputs = [p[k].detach().clone().requires_grad_(True) for k in ("x0", "C", "c")]
        cost = QuadraticCost(inputs[1], inputs[2], p["C_f"], p["c_f"])
        sol, t_plan = timed(lambda inputs=inputs, cost=cost: layer(inputs[0], cost))
        loss = (sol.u * p["w_u"]).sum() + sol.cost.sum()
        grads, t_grad = timed(lambda loss=loss, inputs=inputs: torch.autograd.grad(loss, inputs))
        if i > 0:  # the first call is a warm-up (imports, caches)
            plan.append(t_plan)
            grad.append(t_grad)
    sym = 0.5 * (grads[1] + grads[1].transpose(-1, -2))
    return {
        "u": sol.u.detach(),
        "cost": sol.cost.detach(),
        "grads": {"x0": grads[0], "C": sym, "c": grads[2]},
        "converged": int(sol.converged.sum()),
        "iterations_max": int(sol.iterations.max()),
        "setup_s": t_setup,
        "plan_s": statistics.median(plan),
        "grad_s": statistics.median(grad),
    }


def agreement(res: dict, ref: dict) -> dict:
    def rel(a: Tensor, b: Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    out = {
        "u_rel": rel(res["u"], ref["u"]),
        "cost_abs": (res["cost"] - ref["cost"]).abs().max().item(),
    }
    for k in ("x0", "C", "c"):
        out[f"grad_{k}_rel"] = rel(res["grads"][k], ref["grads"][k])
    return out


def lq_suite(repeats: int) -> dict:
    p = lq_problem()
    B, n, m, T = p["dims"]
    dyn = p["dyn"]
    def with_dyn(layer: Callable) -> Callable:
        return lambda x0, cost: layer(x0, cost, dyn)

    makers = {
        "LQR": lambda: with_dyn(LQR()),
        "MPC": lambda: MPC(dyn, T, tol=1e-9),
        "QPMPC": lambda: with_dyn(QPMPC(T, n, m)),
        "TheseusTO(implicit)": lambda: TheseusTO(dyn, T),
        "TheseusTO(unroll)": lambda: TheseusTO(dyn, T, backward="unroll"),
        "CasadiTO": lambda: with_dyn(CasadiTO(None, T, n, m)),
    }
    results = {name: run(make, p, repeats) for name, make in makers.items()}
    ref = results["LQR"]
    return {name: _summary(r, ref) for name, r in results.items()}


def pendulum_suite(repeats: int) -> dict:
    p = pendulum_problem()
    B, n, m, T = p["dims"]
    makers = {
        "CasadiTO": lambda: CasadiTO(pendulum_ca, T, n, m),
        "MPC": lambda: MPC(Pendulum(), T, max_iter=100, tol=1e-9),
        "TheseusTO(implicit)": lambda: TheseusTO(Pendulum(), T, max_iter=100),
        "CasadiTO(|u|<=4)": lambda: CasadiTO(pendulum_ca, T, n, m, u_lower=-4.0,
                                                 u_upper=4.0),
        "MPC(|u|<=4)": lambda: MPC(Pendulum(), T, u_lower=-4.0, u_upper=4.0, max_iter=100,
                                   tol=1e-9),
    }
    results = {name: run(make, p, repeats) for name, make in makers.items()}
    out = {}
    for name, r in results.items():
        ref = results["CasadiTO(|u|<=4)" if "<=" in name else "CasadiTO"]
        out[name] = _summary(r, ref)
    return out


def _summary(r: dict, ref: dict) -> dict:
    keep = ("converged", "iterations_max", "setup_s", "plan_s", "grad_s")
    return {**{k: r[k] for k in keep}, **agreement(r, ref)}


def print_table(title: str, rows: dict) -> None:
    print(f"\n{title}")
    head = (f"{'backend':<22}{'conv':>5}{'setup s':>9}{'plan s':>9}{'grad s':>9}"
            f"{'u rel':>10}{'dx0 rel':>10}{'dC rel':>10}{'dc rel':>10}{'|dcost|':>10}")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        print(f"{name:<22}{r['converged']:>5}{r['setup_s']:>9.3f}{r['plan_s']:>9.3f}"
              f"{r['grad_s']:>9.3f}{r['u_rel']:>10.1e}{r['grad_x0_rel']:>10.1e}"
              f"{r['grad_C_rel']:>10.1e}{r['grad_c_rel']:>10.1e}{r['cost_abs']:>10.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # One intra-op thread: the shared 2-core machine gives wrong batched LAPACK results at 2.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lq = lq_suite(args.repeats)
    pend = pendulum_suite(args.repeats)
    data = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "repeats": args.repeats,
        "lq_B64_n4_m2_T20": lq,
        "pendulum_B8_T20": pend,
    }
    write_atomic(RESULTS, data)
    print_table("LQ, B=64 n=4 m=2 T=20, float64 (reference: LQR)", lq)
    print_table("Pendulum swing-up, B=8 T=20 (reference: CasADi/IPOPT)", pend)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
