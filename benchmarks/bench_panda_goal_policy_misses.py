"""Why a trained via-point policy still collides: the model's fault or the policy's?

For a checkpoint of :class:`~diffto.learning.mpc_goal_policy.MPCGoalPolicy` (a
``panda_goal_policy.yaml`` run), on its report's held-out episodes (seeds after the validation
ones), each episode is run twice:

- in MuJoCo, closed loop, as the report runs it: the closest approach of the flange ball to
  the sphere (clearance, cm, ``< 0`` inside) and whether it collided;
- in the training's model rollout (the linearized MPC's plans, the loss the policy was
  trained on): the same closest approach.

If the colliding episodes clear the sphere in the model rollout, the model misleads the policy
(a model gap). If they collide there too, the policy misses what its training loss asks for;
then each colliding episode's via-point is optimized alone through its rollout
(:meth:`MPCGoalPolicy.refine`, ``--refine-steps`` Adam steps from the policy's output) and run
in MuJoCo again: a via-point that clears the sphere there shows the miss is the policy's
(amortization), not the schedule's.

Usage (about 2 min per checkpoint here)::

    OMP_NUM_THREADS=1 python benchmarks/bench_panda_goal_policy_misses.py \\
        runs/panda_goal_policy/checkpoints/last.ckpt --name panda_goal_policy_misses

writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _results import machine_info, write_atomic

RESULTS = Path(__file__).parent / "results"


def closed_loop(module, seeds: list[int], via: np.ndarray) -> list[dict]:
    """One MuJoCo episode per seed: the MPC aims at ``via[i]`` for the first ``via_steps``
    control steps, then at the goal. Closest approach (m), collision, success, final distance."""
    from diffto.tasks.panda import keep_out_penetration
    from diffto.tasks.registry import make_env

    hp = module.hparams
    env = make_env(hp.env_id, hp.env_kwargs)
    flange_radius = env.unwrapped.flange_radius
    rows = []
    try:
        for i, seed in enumerate(seeds):
            obs, _ = env.reset(seed=seed)
            centre, radius = obs["observation"][14:17], obs["observation"][17]
            start = -keep_out_penetration(obs["achieved_goal"], centre, radius, flange_radius)
            clearance, info, k, done = [], {}, 0, False
            while not done:
                target = via[i:i + 1] if k < hp.via_steps else obs["desired_goal"][None]
                action = module.mpc.act(obs["observation"][None, :14], target)[0]
                obs, _, terminated, truncated, info = env.step(action)
                clearance.append(-keep_out_penetration(obs["achieved_goal"], centre, radius,
                                                       flange_radius))
                k, done = k + 1, terminated or truncated
            rows.append({"seed": seed, "via_point": via[i].tolist(),
                         "start_clearance": float(start), "clearance": float(min(clearance)),
                         "closest_step": int(np.argmin(clearance)) + 1,
                         "collided": bool(env.unwrapped.collided),
                         "success": bool(info["is_success"]),
                         "final_distance": float(np.linalg.norm(obs["achieved_goal"]
                                                                - obs["desired_goal"]))})
    finally:
        env.close()
    return rows


def model_clearance(module, observation: torch.Tensor, goal: torch.Tensor,
                    via: torch.Tensor) -> np.ndarray:
    """Closest approach (m) of the training's model rollout following ``via``, per episode."""
    with torch.no_grad():
        path = module.rollout(observation, goal, via).double()
    obs = observation.double()
    distance = torch.linalg.vector_norm(path - obs[:, None, 14:17], dim=-1)
    return (distance - obs[:, None, 17] - module.flange_radius).min(1).values.numpy()


def main() -> None:
    from diffto.learning.goal_evaluation import eval_seeds
    from diffto.learning.mpc_goal_policy import MPCGoalPolicy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--episodes", type=int, default=None,
                        help="held-out episodes (default: the run's report_episodes)")
    parser.add_argument("--refine-steps", type=int, default=30)
    parser.add_argument("--refine-lr", type=float, default=None,
                        help="Adam's step (m; default: the checkpoint's refine_lr)")
    parser.add_argument("--name", default="panda_goal_policy_misses")
    args = parser.parse_args()
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} is not a file")
    if args.episodes is not None and args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.refine_steps < 1:
        parser.error(f"--refine-steps must be >= 1, got {args.refine_steps}")
    torch.set_num_threads(1)
    module = MPCGoalPolicy.load_from_checkpoint(args.checkpoint, map_location="cpu")
    module.eval()
    hp = module.hparams
    if args.refine_lr is not None:
        if not args.refine_lr > 0:
            parser.error(f"--refine-lr must be > 0, got {args.refine_lr}")
        hp.refine_lr = args.refine_lr
    episodes_n = args.episodes if args.episodes is not None else hp.report_episodes
    if episodes_n < 1:
        parser.error(f"the checkpoint's report_episodes is {episodes_n}: give --episodes")
    seeds = eval_seeds(episodes_n, hp.eval_episodes)
    observation, goal = module.episode_starts(seeds).tensors
    with torch.no_grad():
        via = module.via_point(observation.to(module._dtype), goal.to(module._dtype))
    episodes = closed_loop(module, seeds, via.double().numpy())
    in_model = model_clearance(module, observation, goal, via)
    for row, c in zip(episodes, in_model, strict=True):
        row["model_clearance"] = float(c)
    missed = [i for i, row in enumerate(episodes) if row["collided"]]
    refined = []
    if missed:
        idx = torch.tensor(missed)
        w = module.refine(observation[idx], goal[idx], args.refine_steps)
        refined = closed_loop(module, [seeds[i] for i in missed], w.double().numpy())
        for row, c in zip(refined, model_clearance(module, observation[idx], goal[idx], w),
                          strict=True):
            row["model_clearance"] = float(c)
    mujoco = np.array([r["clearance"] for r in episodes])
    payload = {
        "benchmark": "bench_panda_goal_policy_misses", "checkpoint": str(args.checkpoint),
        "machine": machine_info(), "refine_steps": args.refine_steps,
        "refine_lr": hp.refine_lr, "max_offset": hp.max_offset, "episodes": episodes,
        "collided": len(missed),
        "collided_in_model_too": sum(episodes[i]["model_clearance"] < 0 for i in missed),
        "clearance_correlation": float(np.corrcoef(mujoco, in_model)[0, 1]),
        "refined": refined,
    }
    write_atomic(RESULTS / f"{args.name}.json", payload)
    lines = [f"### Misses of {args.checkpoint} on {len(seeds)} held-out episodes", "",
             f"{len(missed)} collide in MuJoCo, {payload['collided_in_model_too']} of them in "
             f"the training's model rollout too; closest approach, MuJoCo against the model "
             f"rollout, correlation {payload['clearance_correlation']:.2f} over all episodes.",
             "", f"| seed | clearance at the start (cm) | MuJoCo: closest (cm), at step | "
             f"model: closest (cm) | refined ({args.refine_steps} Adam steps): model (cm) | "
             f"refined: MuJoCo (cm) | refined: success | refined via-point − goal (cm) |",
             "|---|---|---|---|---|---|---|---|"]
    goals = goal.double().numpy()
    for i, r in zip(missed, refined, strict=True):
        e = episodes[i]
        offset = ", ".join(f"{100 * x:+.0f}" for x in np.asarray(r["via_point"]) - goals[i])
        lines.append(f"| {e['seed']} | {100 * e['start_clearance']:.1f} | "
                     f"{100 * e['clearance']:.1f}, {e['closest_step']} | "
                     f"{100 * e['model_clearance']:.1f} | {100 * r['model_clearance']:.1f} | "
                     f"{100 * r['clearance']:.1f} | {r['success']} | {offset} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
