"""The Panda base controller alone: reaching under the nominal model and under a mismatch it
does not know, the model gap it leaves, and what one step of it costs.

:class:`diffto.tasks.panda.PandaBaseController` (operational-space control on the nominal
model) drives ``diffto/PandaReach-v0`` on the held-out evaluation goals (seeds
``1_000_000 + j``, :func:`diffto.learning.goal_evaluation.eval_seeds`), ``--steps`` control
steps per episode, all episodes in lockstep (one batched controller call per step), under:

- ``nominal``: the env's model is the controller's;
- ``payload``, ``friction``, ``gain``: one mismatch at a time (``payload_mass=(1, 3)`` kg at the
  flange, ``frictionloss=(0.5, 2)`` Nm per joint, ``actuator_gain=(0.7, 1)`` per joint);
- ``mismatch``: the three together (the mismatch proposed for residual-RL studies);

and the gain sweep ``--gains`` (``position_gain``) under ``nominal`` and ``mismatch``. Then,
on ``diffto/PandaResidualReach-v0`` under ``mismatch``, for each ``--residual-scales`` ``ρ``: a
residual that knows the episode's payload and actuator gains (not its friction) and cancels
them, clipped to ``[−1, 1]``: whether a residual bounded by ``ρ`` can undo the mismatch.

Per condition: success at the last step and at any step, final distance, steps to first
success, the tracking error (flange distance averaged over all steps) and the steady-state
error (over the last 10 steps), the effort (mean ``‖a‖² / 7`` of the actions) and the share of
saturated action entries. The model gap: at every step the nominal model is stepped from the
env's state with the same action and compared with the env's next state (RMS of the joint
acceleration error ``‖Δq̇‖ / Δt`` in rad/s², mean flange error after one step in mm; both zero
in ``nominal``), and at each episode's final configuration the static torque the payload adds,
``max_j |Δg_j| / τ_max,j`` (the share of the action range a residual must supply to hold it).
The default controller's ``nominal`` and ``mismatch`` figures are cross-checked against the
project's evaluation (:func:`diffto.learning.goal_evaluation.evaluate_policy`, same seeds).

Costs (wall and CPU time, one thread; medians of blocks): one base call on one row and per row
of a batch of ``--episodes``, a ``PandaReachEnv.step``, a ``PandaResidualReachEnv.step`` (env
step plus base call), and, for comparison, one step of the alternative not taken: a
finite-difference linearization over a control step (``MujocoDynamics.jacobians``, 10
substeps) and a 14-state discrete Riccati solve (LQR about the current state).

Results go atomically to ``benchmarks/results/panda_base.{json,md}``. About a minute::

    OMP_NUM_THREADS=1 python benchmarks/bench_panda_base.py [--episodes 50] [--steps 50]
        [--gains 100 225 400 625] [--residual-scales 0.1 0.2 0.3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import mujoco
import numpy as np
import scipy
import scipy.linalg
import torch
from _results import machine_info, write_atomic

from diffto.layers.mujoco_dynamics import MujocoDynamics
from diffto.learning.goal_evaluation import eval_seeds, evaluate_policy
from diffto.tasks.panda import (
    FLANGE_SITE,
    TORQUE_LIMITS,
    PandaBaseController,
    PandaReachEnv,
    PandaResidualReachEnv,
)

RESULTS = Path(__file__).resolve().parent / "results"
MISMATCH = {"payload_mass": (1.0, 3.0), "frictionloss": (0.5, 2.0), "actuator_gain": (0.7, 1.0)}
CONDITIONS = {
    "nominal": {},
    "payload": {"payload_mass": MISMATCH["payload_mass"]},
    "friction": {"frictionloss": MISMATCH["frictionloss"]},
    "gain": {"actuator_gain": MISMATCH["actuator_gain"]},
    "mismatch": MISMATCH,
}
STEADY_STEPS = 10


def run(controller: PandaBaseController, env_kwargs: dict, seeds: list[int], steps: int) -> dict:
    """All episodes in lockstep under ``controller``; the figures of the module docstring."""
    envs = [PandaReachEnv(max_episode_steps=steps, **env_kwargs) for _ in seeds]
    obs = [env.reset(seed=s)[0] for env, s in zip(envs, seeds, strict=True)]
    nominal = envs[0].nominal_model()
    nd = mujoco.MjData(nominal)
    site = nominal.site(FLANGE_SITE).id
    dt = envs[0].control_dt
    B = len(seeds)
    dist = np.zeros((steps, B))
    success = np.zeros((steps, B), bool)
    effort, saturated, acc_gap, flange_gap = [], [], [], []
    for t in range(steps):
        actions = controller(np.stack([o["observation"] for o in obs]),
                             np.stack([o["desired_goal"] for o in obs]))
        effort.append(np.mean(actions**2, axis=1))
        saturated.append(np.mean(np.abs(actions) >= 1.0 - 1e-12, axis=1))
        for i, env in enumerate(envs):
            # The nominal model's prediction of this step, from the env's state.
            nd.qpos[:], nd.qvel[:] = env.data.qpos, env.data.qvel
            nd.ctrl[:] = np.clip(actions[i], -1.0, 1.0) * TORQUE_LIMITS
            mujoco.mj_step(nominal, nd, nstep=env.substeps)
            mujoco.mj_kinematics(nominal, nd)
            o, _, _, _, info = env.step(actions[i])
            obs[i] = o
            acc_gap.append(np.linalg.norm(o["observation"][7:] - nd.qvel) / dt)
            flange_gap.append(np.linalg.norm(o["achieved_goal"] - nd.site_xpos[site]))
            dist[t, i], success[t, i] = info["distance"], info["is_success"]
    # Static torque of what the nominal model lacks (the payload's gravity) at the final
    # configurations, as a share of the action range: g_env(q) − g_nominal(q).
    torque_gap = []
    for env in envs:
        nd.qpos[:], nd.qvel[:] = env.data.qpos, 0.0
        scratch = mujoco.MjData(env.model)
        scratch.qpos[:] = env.data.qpos
        mujoco.mj_forward(nominal, nd)
        mujoco.mj_forward(env.model, scratch)
        torque_gap.append(np.max(np.abs(scratch.qfrc_bias - nd.qfrc_bias) / TORQUE_LIMITS))
    for env in envs:
        env.close()
    first = np.where(success.any(0), success.argmax(0) + 1.0, np.nan)
    reached = first[np.isfinite(first)]
    return {
        "success": float(success[-1].mean()),
        "success_any": float(success.any(0).mean()),
        "final_distance_mm": float(1e3 * dist[-1].mean()),
        "final_distance_median_mm": float(1e3 * np.median(dist[-1])),
        "final_distance_max_mm": float(1e3 * dist[-1].max()),
        "steps_to_success": float(reached.mean()) if reached.size else None,
        "time_at_goal": float(success.mean()),
        "tracking_error_mm": float(1e3 * dist.mean()),
        "steady_state_error_mm": float(1e3 * dist[-STEADY_STEPS:].mean()),
        "effort": float(np.mean(effort)),
        "saturated_fraction": float(np.mean(saturated)),
        "model_gap": {
            "one_step_acceleration_rms": float(np.sqrt(np.mean(np.square(acc_gap)))),
            "one_step_flange_mm": float(1e3 * np.mean(flange_gap)),
            "static_torque_share_mean": float(np.mean(torque_gap)),
            "static_torque_share_max": float(np.max(torque_gap)),
        },
        "per_episode_final_distance_mm": (1e3 * dist[-1]).round(3).tolist(),
    }


def _clock(fns: dict, calls: int, blocks: int = 7) -> dict:
    """Wall and CPU time (ms) per call of each function of ``fns``, the median over ``blocks``
    blocks of ``calls`` calls; the functions take turns block by block, so a change of the
    machine's load meets them all."""
    wall: dict = {k: [] for k in fns}
    cpu: dict = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(blocks):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            wall[name].append((time.perf_counter() - w0) / calls * 1e3)
            cpu[name].append((time.process_time() - c0) / calls * 1e3)
    return {k: {"wall_ms": float(np.median(wall[k])), "cpu_ms": float(np.median(cpu[k]))}
            for k in fns}


def timings(seeds: list[int]) -> dict:
    controller = PandaBaseController()
    env = PandaReachEnv()
    obs = [env.reset(seed=s)[0] for s in seeds]
    states = np.stack([o["observation"] for o in obs])
    states[:, 7:] = np.random.default_rng(0).uniform(-0.5, 0.5, states[:, 7:].shape)
    goals = np.stack([o["desired_goal"] for o in obs])
    B = len(seeds)
    residual = PandaResidualReachEnv()
    env.reset(seed=seeds[0])
    residual.reset(seed=seeds[0])
    zero = np.zeros(7)

    def env_step():
        if env.step(zero)[3]:
            env.reset(seed=seeds[0])

    def residual_step():
        if residual.step(zero)[3]:
            residual.reset(seed=seeds[0])

    out = _clock({"base_one_row": lambda: controller(states[0], goals[0]),
                  "reach_env_step": env_step, "residual_env_step": residual_step}, 200)
    batch = _clock({"batch": lambda: controller(states, goals)}, 5)["batch"]
    out["base_per_row_of_batch"] = {k: v / B for k, v in batch.items()}
    out["batch"] = B
    # The alternative: LQR about the current state (linearize one control step, then DARE).
    dynamics = MujocoDynamics(env.nominal_model(), substeps=env.substeps)
    x = torch.as_tensor(states[:1])
    u = torch.zeros(1, 7, dtype=torch.float64)
    A, Bm = (m[0].numpy() for m in dynamics.jacobians(x, u))
    Q, R = np.eye(14), np.diag(1.0 / TORQUE_LIMITS**2)
    out.update(_clock({"lqr_linearization": lambda: dynamics.jacobians(x, u),
                       "lqr_riccati": lambda: scipy.linalg.solve_discrete_are(A, Bm, Q, R)}, 20))
    env.close()
    residual.close()
    return out


def run_oracle(residual_scale: float, seeds: list[int], steps: int) -> dict:
    """``PandaResidualReachEnv`` under :data:`MISMATCH` with a residual that knows the episode's
    payload and actuator gains (not its friction): the action ``a* = (a_base + Δg / τ_max) / s``
    (``Δg``: the payload's gravity torque at ``q``, ``s``: the gains), as the residual
    ``clip((a* − a_base) / ρ, −1, 1)``. Whether a residual bounded by ``ρ`` can undo the
    mismatch's static part."""
    envs = [PandaResidualReachEnv(residual_scale=residual_scale, max_episode_steps=steps,
                                  **MISMATCH) for _ in seeds]
    for env, seed in zip(envs, seeds, strict=True):
        env.reset(seed=seed)
    nominal = envs[0].nominal_model()
    nd = mujoco.MjData(nominal)
    clipped, final, success, reached = [], [], [], []
    for env in envs:
        true = mujoco.MjData(env.model)
        gain = env.model.actuator_gainprm[:, 0] / nominal.actuator_gainprm[:, 0]
        hit = False
        for _ in range(steps):
            q = env.data.qpos
            for m, d in ((nominal, nd), (env.model, true)):
                d.qpos[:], d.qvel[:] = q, 0.0
                mujoco.mj_fwdPosition(m, d)
                mujoco.mj_fwdVelocity(m, d)
            base = env.base_action()
            target = (base + (true.qfrc_bias - nd.qfrc_bias) / TORQUE_LIMITS) / gain
            r = (target - base) / residual_scale
            clipped.append(np.mean(np.abs(r) > 1.0))
            _, _, _, _, info = env.step(np.clip(r, -1.0, 1.0))
            hit |= info["is_success"]
        final.append(info["distance"])
        success.append(info["is_success"])
        reached.append(hit)
        env.close()
    return {"success": float(np.mean(success)), "success_any": float(np.mean(reached)),
            "final_distance_mm": float(1e3 * np.mean(final)),
            "final_distance_max_mm": float(1e3 * np.max(final)),
            "residual_clipped_fraction": float(np.mean(clipped))}


def project_evaluation(env_kwargs: dict, seeds: list[int], steps: int) -> dict:
    controller = PandaBaseController()
    result, _ = evaluate_policy(lambda o, g: controller(o, g), "diffto/PandaReach-v0", seeds,
                                {"max_episode_steps": steps, **env_kwargs})
    return {**result.summary(), "per_episode_success": result.success.astype(bool).tolist()}


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _row(name: str, r: dict) -> str:
    g = r["model_gap"]
    steps = "—" if r["steps_to_success"] is None else f"{r['steps_to_success']:.1f}"
    return (f"| {name} | {r['success']:.2f} | {r['success_any']:.2f} | "
            f"{r['final_distance_mm']:.2f} ({r['final_distance_max_mm']:.1f}) | {steps} | "
            f"{r['tracking_error_mm']:.1f} | {r['steady_state_error_mm']:.2f} | "
            f"{r['effort']:.4f} | {r['saturated_fraction']:.3f} | "
            f"{g['one_step_acceleration_rms']:.2f} | {g['one_step_flange_mm']:.3f} | "
            f"{g['static_torque_share_mean']:.3f} ({g['static_torque_share_max']:.3f}) |")


HEADER = ("| condition | success (last) | success (any) | final distance mm, mean (max) | "
          "steps to success | tracking error mm | steady-state error mm | effort ‖a‖²/7 | "
          "saturated | model gap: q̈ error RMS rad/s² | one-step flange error mm | "
          "static torque share, mean (max) |\n|" + "---|" * 12)


def markdown(payload: dict) -> str:
    a = payload["args"]
    lines = [
        "# Panda base controller (operational-space control on the nominal model)",
        "",
        f"`{payload['command']}` on {payload['date']}; {a['episodes']} held-out goals (seeds "
        f"{payload['seeds'][0]}…{payload['seeds'][-1]}), {a['steps']}-step episodes, default "
        f"controller `{payload['controller']}`. Machine: {payload['machine']['cpu']}, "
        f"{payload['machine']['cores']} cores, load average "
        f"{payload['machine']['load_average_1min']:.1f}.",
        "",
        f"Mismatch (`mismatch`): `{MISMATCH}`; each range drawn per reset (friction and gain "
        "per joint).",
        "",
        HEADER,
    ]
    lines += [_row(name, r) for name, r in payload["conditions"].items()]
    lines += ["", "## Position gain (`position_gain = ω²`), nominal and mismatch", "", HEADER]
    for gain, rows in payload["gain_sweep"].items():
        lines += [_row(f"{cond}, k_p = {gain}", r) for cond, r in rows.items()]
    lines += [
        "",
        "## A residual that knows the payload and the gains (not the friction), under `mismatch`",
        "",
        "| residual_scale ρ | success (last) | success (any) | final distance mm, mean (max) | "
        "residual entries clipped |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {rho} | {r['success']:.2f} | {r['success_any']:.2f} | "
              f"{r['final_distance_mm']:.2f} ({r['final_distance_max_mm']:.1f}) | "
              f"{r['residual_clipped_fraction']:.3f} |"
              for rho, r in payload["oracle_residual"].items()]
    t = payload["timing"]
    lines += [
        "",
        "## Cost per step (one thread; ms, median of blocks)",
        "",
        "| what | wall | CPU |",
        "|---|---|---|",
    ]
    names = {
        "base_one_row": "base controller, one row",
        "base_per_row_of_batch": f"base controller, per row of a batch of {t['batch']}",
        "reach_env_step": "PandaReachEnv.step",
        "residual_env_step": "PandaResidualReachEnv.step (env step + base)",
        "lqr_linearization": "alternative: linearization over one control step (10 substeps)",
        "lqr_riccati": "alternative: 14-state discrete Riccati solve",
    }
    lines += [f"| {label} | {t[k]['wall_ms']:.3f} | {t[k]['cpu_ms']:.3f} |"
              for k, label in names.items()]
    lines += ["", "Cross-check with `evaluate_policy` (the project's evaluation, same seeds): "]
    for cond, s in payload["project_evaluation"].items():
        lines.append(f"- {cond}: success {s['success']:.2f}, success_any {s['success_any']:.2f}, "
                     f"final distance {1e3 * s['final_distance']:.2f} mm, time per action "
                     f"{1e3 * s['time_per_action_s']:.3f} ms")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--gains", type=float, nargs="+", default=[100.0, 225.0, 400.0, 625.0])
    parser.add_argument("--residual-scales", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = eval_seeds(args.episodes)
    t0 = time.perf_counter()
    controller = PandaBaseController()
    conditions = {}
    for name, kwargs in CONDITIONS.items():
        conditions[name] = run(controller, kwargs, seeds, args.steps)
        r = conditions[name]
        print(f"{name:9s} success {r['success']:.2f} (any {r['success_any']:.2f}) final "
              f"{r['final_distance_mm']:.2f} mm steady {r['steady_state_error_mm']:.2f} mm",
              flush=True)
    sweep = {}
    for gain in args.gains:
        c = PandaBaseController(position_gain=gain)
        sweep[f"{gain:g}"] = {cond: run(c, CONDITIONS[cond], seeds, args.steps)
                              for cond in ("nominal", "mismatch")}
        print(f"k_p {gain:g}: " + ", ".join(f"{c} {r['success']:.2f} {r['final_distance_mm']:.1f}"
                                           f" mm" for c, r in sweep[f'{gain:g}'].items()),
              flush=True)
    project = {name: project_evaluation(CONDITIONS[name], seeds, args.steps)
               for name in ("nominal", "mismatch")}
    for name, s in project.items():
        # The project's evaluation must see the same episodes as the lockstep loop.
        mine = np.asarray(conditions[name]["per_episode_final_distance_mm"])
        if not np.allclose(1e3 * s["final_distance"], mine.mean(), rtol=1e-6, atol=1e-3):
            raise RuntimeError(f"evaluate_policy disagrees on {name}: {s['final_distance']} m "
                               f"against {mine.mean()} mm")
    oracle = {f"{rho:g}": run_oracle(rho, seeds, args.steps) for rho in args.residual_scales}
    for rho, r in oracle.items():
        print(f"oracle residual, scale {rho}: success {r['success']:.2f} final "
              f"{r['final_distance_mm']:.2f} mm", flush=True)
    timing = timings(seeds)
    payload = {
        "benchmark": "panda_base",
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_panda_base.py "
                   f"--episodes {args.episodes} --steps {args.steps} --gains "
                   + " ".join(f"{g:g}" for g in args.gains) + " --residual-scales "
                   + " ".join(f"{g:g}" for g in args.residual_scales),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(mujoco=mujoco.__version__, numpy=np.__version__,
                                scipy=scipy.__version__, torch=torch.__version__),
        "args": vars(args),
        "seeds": seeds,
        "controller": repr(controller),
        "mismatch": {k: list(v) for k, v in MISMATCH.items()},
        "conditions": conditions,
        "gain_sweep": sweep,
        "project_evaluation": project,
        "oracle_residual": oracle,
        "timing": timing,
        "runtime_s": time.perf_counter() - t0,
    }
    write_atomic(RESULTS / "panda_base.json", payload)
    _write_text(RESULTS / "panda_base.md", markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
