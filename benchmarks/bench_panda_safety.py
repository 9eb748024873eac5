"""Constraint violations on the Panda reach task with and without the safety filter.

``PandaReachEnv(safety_filter=...)`` passes every action through
:class:`diffto.tasks.panda.safety_filter.PandaSafetyFilter` (joint positions, joint velocities
and a flange workspace box, discrete-time CBF conditions over the nominal model). This script
drives the 50 held-out evaluation episodes (seeds ``1_000_000 + j``, the learners' evaluation
seeds) with three policies that violate the constraints on their own, once without and once
with the filter, and reports per policy:

* violations per episode (the sum over steps of ``info["violations"]``, the number of
  constraint classes the state violates after the step: joint position, joint velocity,
  workspace), the share of episodes with any, and the steps per class;
* success (at the last step, and at any step), final distance and the first step of success:
  the cost of filtering on the task;
* how often the filter changed the action, by how much, how often it found no action that
  keeps every CBF condition, and its wall time per control step (the time of the filter call,
  over all steps and over the steps where it projected).

Policies (each a function of the observation; the random one draws from a generator seeded by
the episode's seed, so both runs see the same actions where the filter leaves them alone):

* ``random``: uniform actions in ``[-1, 1]^7``;
* ``aggressive_pd``: a task-space PD ``tau = J^T (k_p (g - p) - k_d v) - k_n qdot`` with
  ``k_p = 3000`` N/m, ``k_d = 60`` N s/m, ``k_n = 0.5`` N m s, saturating the torque limits: it
  reaches every goal but overshoots the joint velocity limits on the way;
* ``limit_push``: full torque, one random sign per joint held for the whole episode, the
  adversary that pins several joints at their limits at once.

Both projection paths run: ``nnls`` (exact NumPy projection) on all 50 episodes, the layer
(``diffto.layers.SafetyFilter``) on the first ``--layer-episodes`` to time it and compare. One
more set runs the aggressive PD and random policies on a mismatched arm (payload up to 1 kg,
Coulomb friction up to 0.5 Nm, torque gain 0.95 to 1.05), which the filter does not know:
without the filter, with its defaults, and with a velocity buffer of 0.5 rad/s.

Run ``OMP_NUM_THREADS=1 python benchmarks/bench_panda_safety.py``; writes
``benchmarks/results/panda_safety.json`` and ``.md``. A few minutes on one core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mujoco
import numpy as np
from _results import machine_info, write_atomic

from diffto.learning.goal_evaluation import eval_seeds
from diffto.tasks.panda.model import FLANGE_SITE, TIMESTEP, TORQUE_LIMITS, load_model
from diffto.tasks.panda.reach_env import PandaReachEnv
from diffto.tasks.panda.safety_filter import PandaConstraintSet

OUT = Path(__file__).parent / "results"
MISMATCH = {"payload_mass": (0.0, 1.0), "frictionloss": (0.0, 0.5), "actuator_gain": (0.95, 1.05)}

Policy = Callable[[dict, np.random.Generator], np.ndarray]


class TaskSpacePD:
    """``tau = J^T (k_p (g - p) - k_d v) - k_n qdot`` as an action, from the nominal model."""

    def __init__(self, kp: float = 3000.0, kd: float = 60.0, kn: float = 0.5) -> None:
        self.kp, self.kd, self.kn = kp, kd, kn
        self.model = load_model(TIMESTEP, gravity_compensation=True)
        self.data = mujoco.MjData(self.model)
        self.site = self.model.site(FLANGE_SITE).id
        self.jac = np.zeros((3, 7))

    def __call__(self, obs: dict, rng: np.random.Generator) -> np.ndarray:
        q, qdot = obs["observation"][:7], obs["observation"][7:]
        self.data.qpos[:] = q
        mujoco.mj_kinematics(self.model, self.data)
        mujoco.mj_comPos(self.model, self.data)
        mujoco.mj_jacSite(self.model, self.data, self.jac, None, self.site)
        p = self.data.site_xpos[self.site]
        force = self.kp * (obs["desired_goal"] - p) - self.kd * (self.jac @ qdot)
        return (self.jac.T @ force - self.kn * qdot) / TORQUE_LIMITS


def random_policy(obs: dict, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, 7)


class LimitPush:
    """Full torque with one random sign per joint, drawn at the episode's first step."""

    def __init__(self) -> None:
        self.signs: np.ndarray | None = None

    def __call__(self, obs: dict, rng: np.random.Generator) -> np.ndarray:
        if self.signs is None:  # run() clears it at every reset
            self.signs = rng.choice([-1.0, 1.0], 7)
        return self.signs


class Recorder:
    """Wraps the env's filter to keep every :class:`FilterResult`."""

    def __init__(self, inner) -> None:
        self.inner, self.results = inner, []

    def __call__(self, state, action):
        result = self.inner(state, action)
        self.results.append(result)
        return result


def run(policy: Policy, seeds: list[int], env_kwargs: dict) -> dict:
    """One episode per seed; per-episode arrays and the filter's per-call records."""
    env = PandaReachEnv(**env_kwargs)
    recorder = None
    if env.safety_filter is not None:
        recorder = env.safety_filter = Recorder(env.safety_filter)
    cs: PandaConstraintSet = env.safety_constraints
    per_class = dict.fromkeys(PandaConstraintSet.CLASSES, 0)
    rows = {k: [] for k in ("violations", "success", "success_any", "final_distance",
                            "steps_to_success", "filtered", "correction", "infeasible")}
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(seed)
        if isinstance(policy, LimitPush):
            policy.signs = None
        violations = filtered = infeasible = 0
        correction, first = 0.0, np.nan
        for t in range(env.max_episode_steps):
            obs, _, terminated, truncated, info = env.step(policy(obs, rng))
            violations += info["violations"]
            for name, bad in cs.violated(env.data.qpos, env.data.qvel,
                                         obs["achieved_goal"]).items():
                per_class[name] += bad
            filtered += info["filtered"]
            infeasible += info["filter_infeasible"]
            correction += info["action_correction"]
            if info["is_success"] and np.isnan(first):
                first = t + 1
            if terminated or truncated:
                break
        rows["violations"].append(violations)
        rows["success"].append(bool(info["is_success"]))
        rows["success_any"].append(not np.isnan(first))
        rows["final_distance"].append(info["distance"])
        rows["steps_to_success"].append(first)
        rows["filtered"].append(filtered)
        rows["correction"].append(correction / max(filtered, 1))
        rows["infeasible"].append(infeasible)
    env.close()
    out = {"per_episode": rows, "steps_per_class": per_class}
    if recorder is not None:
        out["filter_calls"] = [(r.seconds, r.projections) for r in recorder.results]
    return out


def summary(result: dict) -> dict:
    rows = result["per_episode"]
    v = np.array(rows["violations"])
    steps = np.array(rows["steps_to_success"], dtype=float)
    out = {
        "episodes": len(v),
        "violations_per_episode": float(v.mean()),
        "episodes_with_violations": int((v > 0).sum()),
        "steps_per_class": result["steps_per_class"],
        "success": float(np.mean(rows["success"])),
        "success_any": float(np.mean(rows["success_any"])),
        "final_distance_m": float(np.mean(rows["final_distance"])),
        "steps_to_success": float(np.nanmean(steps)) if np.isfinite(steps).any() else None,
        "filtered_steps_per_episode": float(np.mean(rows["filtered"])),
        "mean_correction_when_filtered": float(np.mean(rows["correction"])),
        "infeasible_steps": int(np.sum(rows["infeasible"])),
    }
    calls = result.get("filter_calls")
    if calls:
        seconds = np.array([c[0] for c in calls])
        projected = np.array([c[1] > 0 for c in calls])
        out["filter_ms_per_step"] = {
            "mean": 1e3 * float(seconds.mean()),
            "median": 1e3 * float(np.median(seconds)),
            "p95": 1e3 * float(np.percentile(seconds, 95)),
            "mean_when_projecting": (1e3 * float(seconds[projected].mean())
                                     if projected.any() else None),
            "share_projecting": float(projected.mean()),
            "projections_when_projecting": (float(np.mean([c[1] for c in calls if c[1]]))
                                            if projected.any() else None),
        }
    return out


def env_step_ms(env_kwargs: dict, steps: int = 300) -> float:
    """Median wall time of ``env.step`` under uniform random actions (ms)."""
    env = PandaReachEnv(**env_kwargs)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        a = rng.uniform(-1.0, 1.0, 7)
        t0 = time.perf_counter()
        *_, truncated, _ = env.step(a)
        times.append(time.perf_counter() - t0)
        if truncated:
            env.reset(seed=len(times))
    return 1e3 * statistics.median(times)


def table(payload: dict) -> str:
    lines = [
        "| setting | policy | filter | violations / episode | episodes with any | "
        "joint pos. / vel. / workspace steps | success | success (any step) | final dist. (m) "
        "| filtered steps / ep. | infeasible steps | filter ms / step (mean, median, p95) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        s = row["summary"]
        c = s["steps_per_class"]
        t = s.get("filter_ms_per_step")
        ms = f"{t['mean']:.2f}, {t['median']:.2f}, {t['p95']:.2f}" if t else "–"
        lines.append(
            f"| {row['setting']} ({s['episodes']} ep.) | {row['policy']} | {row['filter']} | "
            f"{s['violations_per_episode']:.2f} | {s['episodes_with_violations']} | "
            f"{c['joint_position']} / {c['joint_velocity']} / {c['workspace']} | "
            f"{s['success']:.2f} | {s['success_any']:.2f} | {s['final_distance_m']:.3f} | "
            f"{s['filtered_steps_per_episode']:.1f} | {s['infeasible_steps']} | {ms} |"
        )
    steps, machine = payload["env_step_ms_median"], payload["machine"]
    lines += ["", f"Median `env.step` under random actions: {steps['off']:.2f} ms without the "
              f"filter, {steps['nnls']:.2f} ms with it (nnls), {steps['layer']:.2f} ms (layer). "
              f"Machine: {machine['cpu']}, load {machine['load_average_1min']:.1f}."]
    return "\n".join(lines) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--layer-episodes", type=int, default=5)
    args = parser.parse_args()
    seeds = eval_seeds(args.episodes)
    policies: dict[str, Policy] = {
        "random": random_policy, "aggressive_pd": TaskSpacePD(), "limit_push": LimitPush(),
    }
    filters = {"off": {}, "nnls": {"safety_filter": {"projection": "nnls"}},
               "layer": {"safety_filter": {"projection": "layer"}}}
    plan = [("nominal", name, f, seeds if f != "layer" else seeds[: args.layer_episodes], {})
            for name in policies for f in filters]
    filters["nnls, velocity_buffer 0.5"] = {
        "safety_filter": {"projection": "nnls", "velocity_buffer": 0.5}
    }
    plan += [("mismatch", name, f, seeds, MISMATCH) for name in ("random", "aggressive_pd")
             for f in ("off", "nnls", "nnls, velocity_buffer 0.5")]
    rows = []
    start = time.perf_counter()
    for setting, name, f, run_seeds, extra in plan:
        t0 = time.perf_counter()
        result = run(policies[name], run_seeds, {**filters[f], **extra})
        s = summary(result)
        rows.append({"setting": setting, "policy": name, "filter": f,
                     "seeds": [run_seeds[0], run_seeds[-1]], "summary": s,
                     "per_episode": result["per_episode"], "wall_s": time.perf_counter() - t0})
        print(f"{setting:8s} {name:14s} {f:26s} violations/ep {s['violations_per_episode']:7.2f} "
              f"success {s['success']:.2f} infeasible {s['infeasible_steps']} "
              f"ms/step {s.get('filter_ms_per_step', {}).get('mean', float('nan')):.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    payload = {
        "benchmark": "panda_safety",
        "description": __doc__.split("\n\n")[0],
        "env": "diffto/PandaReach-v0 (PandaReachEnv, default kwargs unless noted)",
        "seeds": "eval_seeds(50): 1_000_000 + j",
        "mismatch_kwargs": MISMATCH,
        "filter_defaults": "PandaSafetyFilter defaults (alpha 0.5, joint_lookahead 0.05 s, "
                           "workspace_lookahead 0.1 s, buffers 0.005 rad / 0.02 rad/s / 0.005 m)",
        "constraints": {k: np.asarray(getattr(PandaConstraintSet(), k)).tolist()
                        for k in ("joint_margin", "velocity_limits", "workspace_low",
                                  "workspace_high")},
        "env_step_ms_median": {f: env_step_ms(filters[f]) for f in ("off", "nnls", "layer")},
        "rows": rows,
        "wall_time_s": time.perf_counter() - start,
        "machine": machine_info(mujoco=mujoco.__version__),
    }
    write_atomic(OUT / "panda_safety.json", payload)
    write_text_atomic(OUT / "panda_safety.md", table(payload))
    print(table(payload))


if __name__ == "__main__":
    main()
