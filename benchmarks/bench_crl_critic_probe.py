"""Where a contrastive policy goes wrong on an object task: the critic along its own episodes.

For a checkpoint of :class:`~diffto.learning.crl.ContrastiveRL` on a Metaworld object task
(e.g. a ``bench_crl_metaworld.py`` push run), each held-out episode (the validation seeds
``EVAL_SEED_BASE + j``, deterministic policy, the rollout goal ``[target,
goal_hand_offset]``) is run, and the critic's value of the policy's own action,
``f(s_t, π(s_t, g), g)``, is recorded at every step beside the hand-to-object and
object-to-target distances. A critic that ranks the states
the policy reaches by its progress rises as the object nears the target; one that is flat or
falls there gives the actor no gradient to finish the task.

Usage (about 20 s per episode here)::

    OMP_NUM_THREADS=1 python benchmarks/bench_crl_critic_probe.py \\
        runs/bench_crl/push-v3/crl_hand_goal_demos_bc/seed2/checkpoints/last.ckpt \\
        --episodes 6 --name crl_push_critic_probe

writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _results import machine_info, write_atomic

RESULTS = Path(__file__).parent / "results"


def probe_episode(module, seed: int) -> dict:
    """One deterministic held-out episode: the critic's value of the policy's action per step,
    and the step where it peaks, with the distances there and at the end."""
    from diffto.tasks.registry import make_env

    env = make_env(module.hparams.env_id, module.task_env_kwargs(0, evaluation=True))
    try:
        obs, _ = env.reset(seed=seed)
        target = obs["desired_goal"].copy()
        states, achieved, hand_object, object_target, success = [], [], [], [], False
        done = False
        hand = slice(*module.hparams.hand_slice)
        while not done:  # the distances at the state whose action the critic scores
            states.append(obs["observation"].copy())
            achieved.append(obs["achieved_goal"].copy())
            hand_object.append(float(np.linalg.norm(obs["observation"][hand]
                                                    - obs["achieved_goal"])))
            object_target.append(float(np.linalg.norm(obs["achieved_goal"] - target)))
            inputs = np.concatenate([obs[k] for k in module.observation_keys])
            action = module.act(inputs[None], target[None])[0]
            obs, _, terminated, truncated, info = env.step(action)
            success = success or bool(info.get("success", False))
            done = terminated or truncated
    finally:
        env.close()
    states = np.asarray(states)
    with torch.no_grad():
        s = module._tensor(module.network_state(states, np.asarray(achieved)))
        g = module._tensor(module.goal_of_targets(np.repeat(target[None], len(states), 0)))
        value = module.critic(s, module.actor.mode(s, g), g).cpu().numpy()
    peak = int(np.argmax(value))
    return {"seed": seed, "success": success, "value": value.round(3).tolist(),
            "peak_step": peak, "peak_value": float(value[peak]),
            "peak_hand_object": hand_object[peak], "peak_object_target": object_target[peak],
            "end_value": float(value[-1]), "end_hand_object": hand_object[-1],
            "end_object_target": object_target[-1]}


def table(rows: list[dict]) -> str:
    lines = ["| seed | success | value at start | peak value (step, hand–object, object–target) "
             "| value at the end (hand–object, object–target) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {int(r['success'])} | {r['value'][0]:.1f} | {r['peak_value']:.1f} "
            f"({r['peak_step']}, {100 * r['peak_hand_object']:.0f} cm, "
            f"{100 * r['peak_object_target']:.0f} cm) | {r['end_value']:.1f} "
            f"({100 * r['end_hand_object']:.0f} cm, {100 * r['end_object_target']:.0f} cm) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--name", default="crl_critic_probe")
    args = parser.parse_args()
    if not args.checkpoint.is_file():
        raise SystemExit(f"checkpoint: no file at {args.checkpoint}")
    if args.episodes < 1:
        raise SystemExit(f"--episodes must be >= 1, got {args.episodes}")
    from diffto.learning.crl import ContrastiveRL
    from diffto.learning.goal_evaluation import eval_seeds

    torch.set_num_threads(1)
    # the probe needs neither the training's dataset nor its pre-training
    module = ContrastiveRL.load_from_checkpoint(
        args.checkpoint, map_location="cpu", pretrain_dataset=None, pretrain_updates=0,
        dataset_fraction=None, bc_weight=0.0).eval()
    rows = [probe_episode(module, seed) for seed in eval_seeds(args.episodes)]
    payload = {"benchmark": "bench_crl_critic_probe", "checkpoint": str(args.checkpoint),
               "task": (module.hparams.env_kwargs or {}).get("task"), "machine": machine_info(),
               "episodes": rows}
    write_atomic(RESULTS / f"{args.name}.json", payload)
    (RESULTS / f"{args.name}.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
