"""Throughput of Go2TrackingEnv against raw MuJoCo stepping of the same physics.

Both sides run the env's own model (PD + feedforward actuators, 1 kHz, 20 substeps per control
step) on one thread, over the very same trajectory:

- env: ``env.step(action)`` with random actions (drawn beforehand: the policy's cost is not the
  env's) and ``env.reset()`` whenever an episode ends, resets counted in its time. Two kinds:
  uniform over the action box (the headline; episodes end within a few steps, so it is the
  strictest case for the env's overhead) and Gaussian with a fresh PPO policy's std.
- raw: the same run replayed as bare ``mujoco.mj_step(model, data, nstep=20)`` calls: at each
  episode start the recorded model parameters (randomization) and reference state are set,
  then each step only writes the recorded controls and steps. Random actions make the robot
  stumble and fall, which costs the contact solver far more than steady walking; replaying
  makes the raw side pay exactly the same physics, so the ratio isolates the env's overhead.

The two sides alternate in chunks of 50 control steps, so load from other processes hits both
alike, and each is timed in thread CPU time (wall clock reported alongside), which leaves out
time spent waiting for a core on a shared machine. The ratio is taken per round and its median
reported. Results go atomically to ``benchmarks/results/go2_env.json``.

Usage::

    python benchmarks/bench_go2_env.py [--reference trot] [--rounds 5] [--steps 1000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import mujoco
import numpy as np
from _results import machine_info, write_atomic

from diffto.tasks.go2.env import Go2TrackingEnv

RESULTS = Path(__file__).resolve().parent / "results" / "go2_env.json"
# Model arrays the env's randomization writes at reset; the replay restores them per episode.
_RANDOMIZED = ("geom_friction", "geom_solref", "actuator_gainprm", "actuator_biasprm",
               "actuator_forcerange")


def record_run(env: Go2TrackingEnv, actions: np.ndarray, seed: int) -> tuple[dict, np.ndarray]:
    """Run the env untimed; record each episode's start (model parameters, state) and controls."""
    def episode_start() -> tuple:
        params = tuple(getattr(env.model, name).copy() for name in _RANDOMIZED)
        return params, env.data.qpos.copy(), env.data.qvel.copy()

    env.reset(seed=seed)
    starts = {0: episode_start()}
    ctrl = np.empty((len(actions), env.model.nu))
    for k, a in enumerate(actions):
        _, _, terminated, truncated, _ = env.step(a)
        ctrl[k] = env.data.ctrl
        if terminated or truncated:
            env.reset()
            starts[k + 1] = episode_start()
    return starts, ctrl


def timed_rounds(env: Go2TrackingEnv, actions: np.ndarray, seed: int, chunk: int) -> dict:
    """Time the env run and its raw replay, interleaved in chunks of ``chunk`` steps.

    Returns wall and thread-CPU seconds of each side. Interleaving at a fine grain makes load
    from other processes hit both sides alike; CPU time leaves out time spent waiting for a core.
    """
    starts, ctrl = record_run(env, actions, seed)
    model, substeps = env.model, env.config.substeps
    raw_data = mujoco.MjData(model)
    env.reset(seed=seed)  # the same run again (same seed, same actions)
    totals = {"env_wall": 0.0, "env_cpu": 0.0, "raw_wall": 0.0, "raw_cpu": 0.0}
    for lo in range(0, len(actions), chunk):
        hi = min(lo + chunk, len(actions))
        wall, cpu = time.perf_counter(), time.thread_time()
        for a in actions[lo:hi]:
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                env.reset()
        totals["env_wall"] += time.perf_counter() - wall
        totals["env_cpu"] += time.thread_time() - cpu
        # the env's model now holds the parameters of its current episode; the replay sets its
        # own per episode below, and the env resets (and re-randomizes) before it steps again
        saved = tuple(getattr(model, name).copy() for name in _RANDOMIZED)
        wall, cpu = time.perf_counter(), time.thread_time()
        for k in range(lo, hi):
            if k in starts:
                params, qpos, qvel = starts[k]
                for name, value in zip(_RANDOMIZED, params, strict=True):
                    getattr(model, name)[:] = value
                mujoco.mj_resetData(model, raw_data)
                raw_data.qpos[:], raw_data.qvel[:] = qpos, qvel
                mujoco.mj_forward(model, raw_data)
            raw_data.ctrl[:] = ctrl[k]
            mujoco.mj_step(model, raw_data, nstep=substeps)
        totals["raw_wall"] += time.perf_counter() - wall
        totals["raw_cpu"] += time.thread_time() - cpu
        for name, value in zip(_RANDOMIZED, saved, strict=True):
            getattr(model, name)[:] = value
    totals["episodes"] = len(starts)
    return totals


def scenario(env: Go2TrackingEnv, name: str, args: argparse.Namespace, rng) -> dict:
    """Median figures over ``args.rounds`` rounds of one kind of random action."""
    def draw() -> np.ndarray:
        if name == "uniform":  # the action space's own random sample
            a = rng.uniform(-1.0, 1.0, size=(args.steps, 12))
        else:  # a fresh PPO policy: mean 0, fixed exploration std (action units), clipped
            a = np.clip(rng.normal(0.0, args.action_std, size=(args.steps, 12)), -1.0, 1.0)
        return a.astype(np.float32)

    rounds = [timed_rounds(env, draw(), 1000 + r, args.chunk) for r in range(args.rounds)]
    steps = args.steps
    ratios = [t["raw_cpu"] / t["env_cpu"] for t in rounds]
    wall_ratios = [t["raw_wall"] / t["env_wall"] for t in rounds]
    return {
        "raw_steps_per_s": statistics.median(steps / t["raw_cpu"] for t in rounds),
        "env_steps_per_s": statistics.median(steps / t["env_cpu"] for t in rounds),
        "ratio": statistics.median(ratios),
        "ratio_rounds": ratios,
        "raw_steps_per_s_wall": statistics.median(steps / t["raw_wall"] for t in rounds),
        "env_steps_per_s_wall": statistics.median(steps / t["env_wall"] for t in rounds),
        "ratio_wall_clock": statistics.median(wall_ratios),
        "ratio_wall_clock_rounds": wall_ratios,
        "mean_episode_length": statistics.mean(steps / t["episodes"] for t in rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", default="trot",
                        help="motion name (planned and cached) or path to a reference .npz")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000, help="control steps per round")
    parser.add_argument("--chunk", type=int, default=50, help="steps per interleaved chunk")
    parser.add_argument("--action-std", type=float, default=0.08,
                        help="std of the Gaussian scenario, action units (OPT-Mimic's PPO: 0.08)")
    parser.add_argument("--randomize", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.chunk < 1 or args.action_std <= 0:
        raise ValueError("--rounds, --steps and --chunk must be >= 1 and --action-std > 0")

    env = Go2TrackingEnv(args.reference, randomize=args.randomize)
    rng = np.random.default_rng(0)
    timed_rounds(env, rng.uniform(-1.0, 1.0, size=(100, 12)).astype(np.float32), 0, 50)  # warm-up
    uniform = scenario(env, "uniform", args, rng)
    gaussian = scenario(env, "gaussian", args, rng)

    result = {
        "benchmark": "go2_env",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "reference": str(args.reference),
        "num_phases": env.num_phases,
        "randomize": args.randomize,
        "substeps": env.config.substeps,
        "physics_dt": env.config.physics_dt,
        "action_limit": env.config.action_limit,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        # headline: uniformly random actions (the action space's sample), the strictest case
        # (episodes of a few steps, so resets weigh most)
        "raw_steps_per_s": uniform["raw_steps_per_s"],
        "env_steps_per_s": uniform["env_steps_per_s"],
        "ratio": uniform["ratio"],
        "uniform_actions": uniform,
        f"gaussian_actions_std_{args.action_std:g}": gaussian,
        "method": "raw = replay of the env's own run (same model parameters, states, controls) "
                  "as bare mj_step(nstep=20) calls, interleaved with the env in chunks; steps/s "
                  "are control steps per thread-CPU second (wall-clock figures alongside)",
        "machine": machine_info(mujoco=mujoco.__version__, numpy=np.__version__),
    }
    write_atomic(args.out, result)

    n = env.config.substeps
    print(f"Go2TrackingEnv throughput ({args.reference}, {n} substeps at "
          f"{1 / env.config.physics_dt:.0f} Hz; thread CPU time, median of {args.rounds} rounds "
          f"x {args.steps} steps)")
    print(f"{'random actions':22}{'episode':>9}{'raw steps/s':>13}{'env steps/s':>13}"
          f"{'env/raw':>9}{'(wall)':>8}")
    for label, res in (("uniform [-1, 1]", uniform), (f"gaussian std {args.action_std:g}",
                                                       gaussian)):
        print(f"{label:22}{res['mean_episode_length']:9.1f}{res['raw_steps_per_s']:13.0f}"
              f"{res['env_steps_per_s']:13.0f}{res['ratio']:9.2f}{res['ratio_wall_clock']:8.2f}")
    print(f"control steps/s x {n} = physics steps/s; load average (1 min) "
          f"{result['machine']['load_average_1min']}; wrote {args.out}")


if __name__ == "__main__":
    main()
