"""Nonlinear box-MPC over a learned (MLP) dynamics model at scale: forward + backward time.

Problem (CPU, one intra-op thread, unless ``--device`` / ``--threads`` say otherwise): ``B`` rows
(default 1024), ``n = 12`` states, ``m = 4`` controls, horizon ``T = 50``, default float32. The
dynamics are a residual MLP

    x_next = x + dt · W₃ tanh(W₂ tanh(W₁ [x; u] + b₁) + b₂),   dt = 0.1,

with ``--hidden`` (default 64) units per layer and fixed random weights (seed 0, scaled so that
one step changes the state by O(dt)): the kind of model a learned-dynamics MPC plans over.
Cost: tracking of a random goal state per row, ``Σ ½‖x_t − x_g‖²_Q + ½‖u_t‖²_R`` with
``Q = I``, ``R = 0.1 I`` and a terminal ``10·Q``; bounds ``|u| <= 1``. Initial states are random.

Timing: wall time and this process's CPU time (``time.process_time``) of one forward and one
backward pass, after nothing but the imports; with one torch thread, CPU time is the figure to
compare on a machine other processes share. Memory: the increase of the peak resident set
(``getrusage``'s ``ru_maxrss``) over the call.

Backward: the gradient of ``ℓ = Σ w_x·x + Σ w_u·u`` (fixed random weights) w.r.t. ``x0``, the
goal and the MLP's weights.

One run measures one configuration (``--hessian``, ``--max-iter``) of whatever ``diffto`` is
importable, so the same script times the code before and after a change: run it with
``PYTHONPATH`` pointing at an older checkout to get the "before" figure (``--label`` names the
entry). ``--max-iter`` below the solver's need gives a time per iteration to extrapolate from
when a full solve is too slow; the entry records the iterations taken and whether rows
converged. Results are merged into ``benchmarks/results/mlp_mpc.json`` under the label.

Run: ``python benchmarks/bench_mlp_mpc.py [--label after] [--hessian gauss_newton]``; on a GPU
``--device cuda`` (the timer waits for the device), against the same machine's CPU with
``--threads N``. CPU time means little on a GPU: compare wall times there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import time
import warnings
from pathlib import Path

import torch
from _results import write_atomic
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results" / "mlp_mpc.json"


class ResidualMLP(nn.Module):
    """``x_next = x + dt · mlp([x; u])``: ``x (N, n)``, ``u (N, m)`` -> ``(N, n)``."""

    def __init__(self, n: int, m: int, hidden: int, dt: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dt = dt
        self.net = nn.Sequential(
            nn.Linear(n + m, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, n),
        )
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fan_in = layer.weight.shape[1]
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / fan_in**0.5)
                    layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))
            # the controls reach the state about as strongly as the state itself (an actuated
            # system), and the step's Jacobian stays near the identity (spectral radius ~1)
            self.net[0].weight[:, n:] *= 3.0
            self.net[-1].weight *= 0.5

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        return x + self.dt * self.net(torch.cat([x, u], dim=-1))


def make_problem(B: int, n: int, m: int, T: int, hidden: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> dict:
    """Drawn on the CPU, then moved: every device solves the same problem."""
    g = torch.Generator().manual_seed(1)
    return {
        "dyn": ResidualMLP(n, m, hidden).to(dtype=dtype, device=device),
        "x0": torch.randn(B, n, generator=g).to(dtype=dtype, device=device),
        "x_goal": 0.5 * torch.randn(B, n, generator=g).to(dtype=dtype, device=device),
        "wx": torch.randn(B, T + 1, n, generator=g).to(dtype=dtype, device=device),
        "wu": torch.randn(B, T, m, generator=g).to(dtype=dtype, device=device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _norm(grads) -> float:
    """Euclidean norm of a list of gradients (``None`` counts as zero)."""
    return float(sum(float(g.double().pow(2).sum()) for g in grads if g is not None) ** 0.5)


def run(args: argparse.Namespace) -> dict:
    import diffto
    from diffto import QuadraticCost
    from diffto.layers.mpc import MPC

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    B, n, m, T = args.batch, args.n, args.m, args.horizon
    p = make_problem(B, n, m, T, args.hidden, dtype, device)
    x0 = p["x0"].clone().requires_grad_()
    x_goal = p["x_goal"].clone().requires_grad_()
    Q = args.q * torch.eye(n, dtype=dtype, device=device)
    R = args.r * torch.eye(m, dtype=dtype, device=device)
    kw = {"u_lower": -args.u_max, "u_upper": args.u_max, "max_iter": args.max_iter}
    if args.hessian is not None:
        kw["hessian"] = args.hessian
    if args.tol is not None:
        kw["tol"] = args.tol
    layer = MPC(p["dyn"], T, **kw)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    cost = QuadraticCost.tracking(Q, R, T, x_goal=x_goal, Q_final=10.0 * Q)
    sol = layer(x0, cost)
    _sync(device)
    c1, t1 = time.process_time(), time.perf_counter()
    loss = (p["wx"] * sol.x).sum() + (p["wu"] * sol.u).sum()
    params = list(p["dyn"].parameters())
    grads = torch.autograd.grad(loss, [x0, x_goal, *params], allow_unused=True)
    _sync(device)
    c2, t2 = time.process_time(), time.perf_counter()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        # the objective the solver minimizes, the same for every configuration
        dx = sol.x - p["x_goal"][:, None]
        obj = 0.5 * args.q * ((dx[:, :-1] ** 2).sum((1, 2)) + 10.0 * (dx[:, -1] ** 2).sum(-1)) \
            + 0.5 * args.r * (sol.u**2).sum((1, 2))
    return {
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "total_s": t2 - t0,
        # CPU time of this single-threaded process: far less sensitive than wall time to the
        # other processes sharing the machine's cores
        "forward_cpu_s": c1 - c0,
        "backward_cpu_s": c2 - c1,
        "total_cpu_s": c2 - c0,
        "iterations_max": int(sol.iterations.max()),
        "iterations_mean": float(sol.iterations.float().mean()),
        "converged_frac": float(sol.converged.float().mean()),
        "objective_mean": float(obj.double().mean()),
        "grad_norms": {"x0": _norm(grads[:1]), "x_goal": _norm(grads[1:2]),
                       "mlp": _norm(grads[2:])},
        "peak_rss_increase_mb": (rss1 - rss0) / 1024.0,  # ru_maxrss is in KiB on Linux
        "diffto_path": str(Path(diffto.__file__).resolve().parent),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--horizon", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--hessian", choices=["exact", "gauss_newton"], default=None,
                        help="passed to MPC when given; otherwise the layer's default")
    parser.add_argument("--q", type=float, default=0.1, help="state weight Q = q I")
    parser.add_argument("--r", type=float, default=1.0, help="control weight R = r I")
    parser.add_argument("--u-max", type=float, default=2.0, help="bounds |u| <= u_max")
    parser.add_argument("--max-iter", type=int, default=50)
    parser.add_argument("--tol", type=float, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 on these shared machines)")
    parser.add_argument("--label", default="run")
    parser.add_argument("--commit", default=None,
                        help="the commit of the diffto measured, when it is not this checkout")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # see tests/conftest.py: 1 on these machines
    warnings.filterwarnings("ignore")
    result = run(args)
    entry = {
        "setup": {"B": args.batch, "n": args.n, "m": args.m, "T": args.horizon,
                  "hidden": args.hidden, "dtype": args.dtype, "hessian": args.hessian,
                  "q": args.q, "r": args.r, "u_max": args.u_max,
                  "max_iter": args.max_iter, "tol": args.tol, "threads": args.threads,
                  "device": args.device,
                  "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                  else None,
                  "torch": torch.__version__, "git_commit": args.commit or git_commit(),
                  "load_average": os.getloadavg(),
                  "machine": platform.processor() or platform.machine()},
        **result,
    }
    payload = json.loads(args.out.read_text()) if args.out.exists() else {}
    payload[args.label] = entry
    write_atomic(args.out, payload)
    print(json.dumps({args.label: entry}, indent=2))
    return entry


if __name__ == "__main__":
    main()
