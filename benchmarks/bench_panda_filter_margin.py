"""The safety filter's velocity buffer under the residual task's unknown mismatch.

The filter (``PandaSafetyFilter``) predicts each step on the nominal arm; the residual task's
evaluation arm carries a payload of 1-3 kg, joint friction of 0.5-2 Nm and actuator gains of
70-100 %, which it does not know. The velocity buffer (``velocity_buffer``, rad/s below every
joint's rate limit) is the reserve against that. This script evaluates, on the held-out
episodes of ``panda_residual_mpc.yaml``'s report (seeds ``EVAL_SEED_BASE + 10 + j``), with
the evaluation mismatch:

* the base controller alone (a zero residual), without the filter and with each buffer of
  ``--buffers``;
* each trained residual checkpoint of ``--checkpoints`` (``GoalSAC`` of
  ``panda_residual_mpc.yaml``), in its own evaluation environment (its options, e.g. the
  residual gate, kept), without the filter and with each buffer;

and reports violations per episode, success (last step, any step) and final distance: the
buffer that brings violations to zero and what it costs the task.

Run ``OMP_NUM_THREADS=1 python benchmarks/bench_panda_filter_margin.py --checkpoints
RUN/checkpoints/last.ckpt ... --labels NAME ...``; writes
``benchmarks/results/panda_filter_margin.{json,md}``. About 1 min per policy and buffer here.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml
from _results import command_line, machine_info, write_results

from diffto.learning.goal_evaluation import eval_seeds, evaluate_policy

CONFIG = Path(__file__).resolve().parents[1] / "lightning_configs" / "panda_residual_mpc.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--buffers", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    parser.add_argument("--checkpoints", nargs="*", default=[])
    parser.add_argument("--labels", nargs="*", default=None,
                        help="a name per checkpoint for the table (default: its path)")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--name", default="panda_filter_margin")
    args = parser.parse_args()
    init = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]
    env_kwargs = {**init["env_kwargs"], **init["eval_env_kwargs"]}
    seeds = eval_seeds(args.episodes, init["eval_episodes"])
    policies = {"base alone (zero residual)": None}
    if args.checkpoints:
        from diffto.learning.goal_sac import GoalSAC

        labels = args.checkpoints if args.labels is None else args.labels
        if len(labels) != len(args.checkpoints):
            parser.error(f"--labels needs one name per checkpoint ({len(args.checkpoints)}), "
                         f"got {len(labels)}")
        for path, label in zip(args.checkpoints, labels, strict=True):
            policies[f"base + residual, {label}"] = GoalSAC.load_from_checkpoint(
                path, map_location="cpu").eval()
    rows = []
    for name, learner in policies.items():
        if learner is None:
            act, own_kwargs = (lambda o, g: np.zeros((len(o), 7))), env_kwargs
            keys = ("observation", "achieved_goal") if init["achieved_in_state"] else (
                "observation",)
        else:  # the learner's own evaluation env (e.g. with its residual gate)
            act, own_kwargs = learner.act, learner.task_env_kwargs(0, evaluation=True)
            keys = learner.observation_keys
        for buffer in [None, *args.buffers]:
            kwargs = dict(own_kwargs)
            if buffer is not None:
                kwargs["safety_filter"] = {"velocity_buffer": buffer}
            summary = evaluate_policy(act, init["env_id"], seeds, kwargs,
                                      observation_keys=keys)[0].summary()
            rows.append({"policy": name, "velocity_buffer": buffer, **summary})
            print(rows[-1], flush=True)
    lines = [f"### Safety filter under the residual task's mismatch ({args.episodes} held-out "
             "episodes)", "",
             "| policy | filter (velocity buffer) | violations / episode | success (last step) "
             "| success (any step) | final distance |", "|---|---|---|---|---|---|"]
    for r in rows:
        vb = "off" if r["velocity_buffer"] is None else f"{r['velocity_buffer']:.1f} rad/s"
        lines.append(f"| {r['policy']} | {vb} | {r['violations']:.2f} | {r['success']:.2f} | "
                     f"{r['success_any']:.2f} | {1e3 * r['final_distance']:.0f} mm |")
    payload = {"benchmark": "bench_panda_filter_margin", "command": command_line(),
               "checkpoints": dict(zip(list(policies)[1:], args.checkpoints, strict=True)),
               "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": machine_info(), "env_kwargs": env_kwargs, "seeds": seeds,
               "rows": rows}
    write_results(Path(__file__).resolve().parent / "results", args.name, payload,
                  "\n".join(lines))


if __name__ == "__main__":
    main()
