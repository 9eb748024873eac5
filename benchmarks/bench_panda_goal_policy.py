"""A policy steering a differentiable MPC vs the MPC alone vs SAC: the Panda past an obstacle.

On ``diffto/PandaObstacleReach-v0`` (reach a goal behind a keep-out sphere the MPC's cost does
not know; a collision ends the episode as a failure), on the same held-out episodes (seeds
``EVAL_SEED_BASE + j``):

- direct MPC: :class:`~diffto.tasks.panda.target_mpc.PandaTargetMPC` aimed at the goal;
- learned via-point MPC: :class:`~diffto.learning.mpc_goal_policy.MPCGoalPolicy` trained for
  ``--steps`` gradient steps through the MPC on model rollouts (no environment steps), with the
  MPC layer's share of training time;
- SAC + HER (:class:`~diffto.learning.goal_sac.GoalSAC`), torques directly from
  ``[observation; goal]``, for ``--sac-env-steps`` environment steps, its success measured
  every ``--sac-eval-every`` steps (samples to success: the first measurement at or above the
  learned via-point MPC's success).

One seed (the budget of this machine); ``OMP_NUM_THREADS=1 python
benchmarks/bench_panda_goal_policy.py`` (defaults: 200 via-point steps, SAC for 30 000
environment steps, 32 episodes; 6 min here) writes
``benchmarks/results/panda_goal_policy.{json,md}``. Last run: the learned via-point MPC 1.00
success and no collision after 3.6 min of training, the direct MPC 0.06 (94 % collisions),
SAC + HER 0.00 at 10 000, 20 000 and 30 000 environment steps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _results import machine_info, write_atomic

RESULTS = Path(__file__).parent / "results"
ENV_ID = "diffto/PandaObstacleReach-v0"


def train_via_point(steps: int, seed: int, episodes: int) -> dict:
    from diffto.learning.mpc_goal_policy import MPCGoalPolicy

    torch.manual_seed(seed)
    module = MPCGoalPolicy(report_episodes=0, video_episodes=0)
    loader = module.train_dataloader()
    opt = module.configure_optimizers()
    step_s, mpc_s, losses = [], [], []
    t0 = time.perf_counter()
    while len(step_s) < steps:
        for batch in loader:
            module.on_train_batch_start(batch, 0)
            out = module.losses(batch)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            step_s.append(time.perf_counter() - module._timer["start"])
            mpc_s.append(module._timer["mpc_forward"] + module._timer["mpc_backward"])
            losses.append({k: float(v.detach()) for k, v in out.items()})
            if len(step_s) == steps:
                break
    train_s = time.perf_counter() - t0
    learned, _ = module.evaluate(episodes)
    direct, _ = module.evaluate(episodes, direct=True)
    return {"training_steps": steps, "training_time_s": train_s,
            "step_time_s_median": float(np.median(step_s)),
            "mpc_share_of_training_time": float(np.sum(mpc_s) / np.sum(step_s)),
            "final_train_loss": losses[-1], "learned": learned, "direct": direct,
            "env_steps": 0}


def train_sac(env_steps: int, eval_every: int, seed: int, episodes: int) -> dict:
    import lightning as L

    from diffto.learning.goal_sac import GoalSAC

    L.seed_everything(seed)
    per_iter = 1000
    module = GoalSAC(env_id=ENV_ID, num_envs=8, vector_mode="sync",
                     env_steps_per_iteration=per_iter, env_steps_per_update=8, batch_size=256,
                     buffer_capacity=1_000_000, warmup_steps=min(10_000, env_steps // 2),
                     eval_episodes=episodes, report_episodes=0, video_episodes=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=env_steps // per_iter,
                        max_epochs=-1, val_check_interval=max(eval_every // per_iter, 1),
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir="/tmp/goalpol_bench_sac")
    t0 = time.perf_counter()
    trainer.fit(module)
    return {"env_steps": env_steps, "training_time_s": time.perf_counter() - t0,
            "curve": [{"env_steps": p["env_steps"], "success": p["success_final"],
                       "success_any": p["success"]} for p in module.history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="via-point training steps")
    parser.add_argument("--sac-env-steps", type=int, default=30_000)
    parser.add_argument("--sac-eval-every", type=int, default=10_000)
    parser.add_argument("--episodes", type=int, default=32, help="held-out episodes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    via = train_via_point(args.steps, args.seed, args.episodes)
    sac = (train_sac(args.sac_env_steps, args.sac_eval_every, args.seed, args.episodes)
           if args.sac_env_steps > 0 else None)
    target = via["learned"]["success"]
    samples = None
    if sac is not None:
        reached = [p["env_steps"] for p in sac["curve"] if p["success"] >= target]
        samples = reached[0] if reached else None
    payload = {"env_id": ENV_ID, "seed": args.seed, "episodes": args.episodes,
               "via_point_mpc": via, "sac": sac,
               "sac_env_steps_to_via_point_success": samples,
               "machine": machine_info(torch=torch.__version__)}
    RESULTS.mkdir(exist_ok=True)
    write_atomic(RESULTS / "panda_goal_policy.json", payload)
    rows = [("direct MPC (target = goal)", via["direct"], 0),
            (f"learned via-point MPC ({args.steps} steps, "
             f"{via['training_time_s'] / 60:.1f} min)", via["learned"], 0)]
    lines = [f"### {ENV_ID}: {args.episodes} held-out episodes, seed {args.seed}", "",
             "| controller | env steps | success (last step) | collision | final distance (m) |",
             "|---|---|---|---|---|"]
    for name, s, n in rows:
        lines.append(f"| {name} | {n} | {s['success']:.2f} | {s['collision']:.2f} | "
                     f"{s['final_distance']:.3f} |")
    if sac is not None:
        for p in sac["curve"]:
            lines.append(f"| SAC + HER | {int(p['env_steps'])} | {p['success']:.2f} | - | - |")
        lines.append("")
        lines.append(f"SAC environment steps to the via-point MPC's success: {samples}")
    lines.append(f"\nMPC layer's share of training time: "
                 f"{100 * via['mpc_share_of_training_time']:.0f} % (median step "
                 f"{via['step_time_s_median']:.2f} s)")
    (RESULTS / "panda_goal_policy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
