"""Batched MuJoCo stepping and transition Jacobians: which way should MujocoDynamics go?

For N rows ``(x_i, u_i)`` one dynamics call runs ``substeps`` physics steps per row, and one
Jacobian call runs ``mjd_transitionFD`` per row and substep. Ways compared, at N = 1, 16, 64,
256 on the same rows:

- stepping: ``mujoco.rollout`` on the calling thread (``Rollout(nthread=0)``) and on a pool of
  ``--threads`` threads; a thread pool (``concurrent.futures``) over per-thread ``MjData``
  running a Python loop over its rows; a plain Python loop (``mj_setState`` + ``mj_step``);
  and ``MujocoDynamics.forward`` itself (torch in and out, input checks, failed-row tests).
- Jacobians: a plain loop of ``mjd_transitionFD``, the same loop on a thread pool, and
  ``MujocoDynamics.jacobians`` with ``nthread=0`` and ``nthread=--threads`` (each includes the
  rollout that finds the intermediate states).

The ways alternate within each round, so load from other processes hits all alike; each call
is timed in wall-clock and process-CPU time (the CPU time of every thread of the process), and
the median over rounds is reported as microseconds per row. MuJoCo releases the GIL, so threads
can overlap, but only where cores are idle: on a 2-core machine shared with other jobs the
thread figures say little about a many-core one. Results go atomically to
``benchmarks/results/mujoco_dynamics.json``.

Usage::

    python benchmarks/bench_mujoco_dynamics.py [--model panda|pendulum] [--substeps 1 10]
        [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import mujoco
import numpy as np
import torch
from _results import machine_info, write_atomic
from mujoco import rollout as mj_rollout

from diffto.layers.mujoco_dynamics import MujocoDynamics

RESULTS = Path(__file__).resolve().parent / "results" / "mujoco_dynamics.json"
BATCHES = (1, 16, 64, 256)
_SPEC = int(
    mujoco.mjtState.mjSTATE_QPOS | mujoco.mjtState.mjSTATE_QVEL | mujoco.mjtState.mjSTATE_CTRL
)

PENDULUM_XML = """
<mujoco model="pendulum">
  <option timestep="0.01" integrator="Euler"/>
  <worldbody>
    <body><joint name="hinge" axis="0 1 0" damping="0.1"/>
      <inertial pos="0 0 1" mass="1" diaginertia="0.01 0.01 0.01"/></body>
  </worldbody>
  <actuator><motor joint="hinge"/></actuator>
</mujoco>
"""


def load(name: str) -> tuple[mujoco.MjModel, np.ndarray]:
    """The model and a nominal state around which rows are drawn."""
    if name == "panda":
        from diffto.tasks.panda.model import HOME, load_model

        model = load_model(scene=False)
        return model, np.concatenate([np.asarray(HOME, dtype=float), np.zeros(model.nv)])
    model = mujoco.MjModel.from_xml_string(PENDULUM_XML)
    return model, np.zeros(model.nq + model.nv)


# ------------------------------------------------------------------ the ways, raw numpy
def loop_rows(model, d, xu, out, substeps, rows) -> None:
    """Plain loop: one MjData, one row after the other."""
    nq = model.nq
    for i in rows:
        mujoco.mj_resetData(model, d)
        mujoco.mj_setState(model, d, xu[i], _SPEC)
        mujoco.mj_step(model, d, nstep=substeps)
        out[i, :nq], out[i, nq:] = d.qpos, d.qvel


def fd_rows(model, d, xu, A, B, substeps, rows, eps=1e-6) -> None:
    """Plain loop of mjd_transitionFD, chained over the substeps along the row's path."""
    n, m = A.shape[1], B.shape[2]
    A_j, B_j = np.empty((n, n)), np.empty((n, m))
    state = np.empty(xu.shape[1])
    for i in rows:
        A_i, B_i = np.eye(n), np.zeros((n, m))
        state[:] = xu[i]
        for _ in range(substeps):
            mujoco.mj_resetData(model, d)
            mujoco.mj_setState(model, d, state, _SPEC)
            mujoco.mjd_transitionFD(model, d, eps, True, A_j, B_j, None, None)
            A_i, B_i = A_j @ A_i, A_j @ B_i + B_j
            mujoco.mj_step(model, d)
            state[: n // 2], state[n // 2 : n] = d.qpos, d.qvel
        A[i], B[i] = A_i, B_i


def ways(model, xu, substeps, nthread, pool) -> dict[str, dict[str, Callable[[], object]]]:
    """Closures, one per way, over the same rows ``xu (N, n + m)``."""
    N, n, m = xu.shape[0], model.nq + model.nv, model.nu
    datas = [mujoco.MjData(model) for _ in range(nthread)]
    chunks = np.array_split(np.arange(N), nthread)
    out, A, B = np.empty((N, n)), np.empty((N, n, n)), np.empty((N, n, m))
    state0 = np.zeros((N, 1 + n))
    state0[:, 1:] = xu[:, :n]
    ctrl = np.ascontiguousarray(xu[:, None, n:])
    serial, threaded = mj_rollout.Rollout(nthread=0), mj_rollout.Rollout(nthread=nthread)
    mod0 = MujocoDynamics(model, substeps=substeps)
    modk = MujocoDynamics(model, substeps=substeps, nthread=nthread)
    x, u = torch.from_numpy(xu[:, :n].copy()), torch.from_numpy(xu[:, n:].copy())

    def on_pool(fn, *args):
        list(pool.map(lambda dc: fn(model, dc[0], xu, *args, substeps, dc[1]),
                      zip(datas, chunks, strict=True)))

    return {
        "step": {
            "rollout": lambda: serial.rollout(model, datas[0], state0, ctrl, nstep=substeps),
            f"rollout_{nthread}_threads": lambda: threaded.rollout(
                model, datas, state0, ctrl, nstep=substeps),
            f"thread_pool_{nthread}": lambda: on_pool(loop_rows, out),
            "loop": lambda: loop_rows(model, datas[0], xu, out, substeps, range(N)),
            "MujocoDynamics": lambda: mod0(x, u),
            f"MujocoDynamics_nthread_{nthread}": lambda: modk(x, u),
        },
        "jacobians": {
            "loop": lambda: fd_rows(model, datas[0], xu, A, B, substeps, range(N)),
            f"thread_pool_{nthread}": lambda: on_pool(fd_rows, A, B),
            "MujocoDynamics": lambda: mod0.jacobians(x, u),
            f"MujocoDynamics_nthread_{nthread}": lambda: modk.jacobians(x, u),
        },
    }


def measure(fns: dict[str, Callable[[], object]], N: int, rounds: int, budget: float) -> dict:
    """Median wall / CPU microseconds per row of each way, the ways interleaved per round."""
    for fn in fns.values():
        fn()  # warm-up
    t = time.perf_counter()
    next(iter(fns.values()))()
    reps = max(1, min(200, int(budget / max(time.perf_counter() - t, 1e-6))))
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            for _ in range(reps):
                fn()
            wall[name].append((time.perf_counter() - w) / reps / N * 1e6)
            cpu[name].append((time.process_time() - c) / reps / N * 1e6)
    return {
        name: {"wall_us_per_row": statistics.median(wall[name]),
               "cpu_us_per_row": statistics.median(cpu[name])}
        for name in fns
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("panda", "pendulum"), default="panda")
    parser.add_argument("--substeps", type=int, nargs="+", default=[1, 10],
                        help="physics steps per call (the Panda env: 10 = 50 Hz over 0.002 s)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="threads of the threaded ways")
    parser.add_argument("--budget", type=float, default=0.02,
                        help="seconds per timed sample (repetitions are sized to it)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if min(args.substeps) < 1 or min(args.batches) < 1 or args.rounds < 1 or args.threads < 1:
        raise ValueError("--substeps, --batches, --rounds and --threads must be >= 1")
    torch.set_num_threads(1)

    model, nominal = load(args.model)
    n, m = model.nq + model.nv, model.nu
    rng = np.random.default_rng(0)
    pool = ThreadPoolExecutor(args.threads)
    cases = []
    for substeps in args.substeps:
        for N in args.batches:
            xu = np.empty((N, n + m))
            xu[:, :n] = nominal + 0.1 * rng.standard_normal((N, n))
            xu[:, n:] = rng.uniform(-1.0, 1.0, (N, m))  # within every ctrlrange here
            case = {"substeps": substeps, "N": N}
            for kind, fns in ways(model, xu, substeps, args.threads, pool).items():
                case[kind] = measure(fns, N, args.rounds, args.budget)
                for clock in ("wall", "cpu"):
                    case[f"{kind}_fastest_{clock}"] = min(
                        case[kind], key=lambda k, c=clock: case[kind][k][f"{c}_us_per_row"])
            cases.append(case)
            print(f"substeps={substeps} N={N}: " + "; ".join(
                f"{kind} " + ", ".join(f"{k} {v['wall_us_per_row']:.1f}"
                                       for k, v in case[kind].items())
                for kind in ("step", "jacobians")) + " (us/row, wall)", flush=True)

    write_atomic(args.out, {
        "benchmark": "mujoco_dynamics",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_mujoco_dynamics.py " + " ".join(
            f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
            for k, v in vars(args).items() if k != "out"),
        "model": args.model,
        "n": n,
        "m": m,
        "timestep": model.opt.timestep,
        "integrator": mujoco.mjtIntegrator(model.opt.integrator).name,
        "rounds": args.rounds,
        "threads": args.threads,
        "units": "microseconds per row (one row = one (x, u) pair of a batch of N), median over "
                 "rounds; cpu = process CPU time, all threads",
        "cases": cases,
        "machine": machine_info(mujoco=mujoco.__version__, torch=torch.__version__),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
