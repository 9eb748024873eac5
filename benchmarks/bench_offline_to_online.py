"""Offline TD3+BC and IQL on the Panda TO dataset, diffto's against d3rlpy's, same data and budget.

Both sides train on the same transitions of ``runs/datasets/panda_reach`` (``lightning predict
--config panda_to_dataset.yaml``), with the same reward (minus the TO expert's stage cost at
the next state, ``reward_type: stage_cost`` of ``panda_td3bc.yaml``), the same network input
(the joint state, the flange position, the goal and the goal relative to the flange) and the
same number of gradient updates; no hindsight relabelling (d3rlpy has none). Each policy is then
evaluated on the same held-out goals (seeds ``1_000_000 + 10 + j``, 50-step episodes) beside
the TO expert. d3rlpy 2.8.1 runs in its own venv (``benchmarks/d3rlpy_peer/setup_venv.sh``;
it pins gymnasium 1.0.0) and hands back a TorchScript policy.

Run (after ``bash benchmarks/d3rlpy_peer/setup_venv.sh``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_offline_to_online.py \\
        --updates 5000 --episodes 50 [--seeds 0 1] [--algos td3bc iql]

Results: ``benchmarks/results/offline_to_online.{json,md}``; per-run files under
``runs/bench_offline_to_online/``. A finished run is not repeated when the script is rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from _results import machine_info, write_atomic

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "benchmarks" / "d3rlpy_peer"
DATASET = "runs/datasets/panda_reach"
ENV = "diffto/PandaReach-v0"
EVAL_OFFSET = 10  # after the 10 validation goals of the configs
LEARNER = dict(env_id=ENV, env_kwargs={"max_episode_steps": 50}, num_envs=2,
               env_steps_per_iteration=20, env_steps_per_update=10, warmup_steps=0,
               report_episodes=0, video_episodes=0, success_radius=0.02, gamma=0.98,
               her_ratio=0.0, achieved_in_state=True, relative_goal=True,
               normalize_inputs=True, pretrain_dataset=DATASET, pretrain_actor=True,
               reward_type="stage_cost", goal_weight=10.0, velocity_weight=0.3,
               velocity_slice=(7, 14), action_weight=0.05)


def _learner(algo: str, updates: int):
    from diffto.learning.iql import GoalIQL
    from diffto.learning.td3bc import GoalTD3BC

    cls = {"td3bc": GoalTD3BC, "iql": GoalIQL}[algo]
    model = cls(**LEARNER, pretrain_updates=updates)
    opt = model.configure_optimizers()
    model.optimizers = lambda: type("O", (), {"zero_grad": opt.zero_grad, "step": opt.step,
                                              "optimizer": opt})()
    model.trainer = None
    return model


def peer_dataset(path: Path, updates: int) -> dict:
    """The buffer's dataset episodes as d3rlpy rows: network features, actions, rewards."""
    model = _learner("td3bc", updates)
    model._start_task(0)
    buf = model.buffer
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("observations", "actions", "rewards",
                                                         "terminals", "timeouts")}
    for slot in range(buf.num_slots):
        L = int(buf.length[slot])
        if L < 1:
            continue
        obs = torch.as_tensor(buf.states["observation"][slot, : L + 1])
        achieved = torch.as_tensor(buf.states["goal"][slot, : L + 1])
        goal = torch.as_tensor(buf.episode["desired_goal"][slot]).expand(L + 1, -1)
        action = torch.as_tensor(buf.actions[slot, :L])
        batch = {"next_goal": achieved[1:], "next_observation": obs[1:], "action": action}
        reward = model.reward(batch, goal[:L]).numpy()
        feats = model.actor.inputs.features(obs[:L], goal[:L]).numpy()
        # d3rlpy reads row i + 1 as row i's next state: give it the episode's L transitions
        # plus the final state as a timed-out row it does not train on
        final = model.actor.inputs.features(obs[L:], goal[L:]).numpy()
        rows["observations"] += [feats, final]
        rows["actions"] += [action.numpy(), np.zeros((1, action.shape[1]))]
        rows["rewards"] += [reward, np.zeros(1)]
        rows["terminals"] += [np.zeros(L + 1)]
        rows["timeouts"] += [np.r_[np.zeros(L), 1.0]]
    model.teardown("fit")
    data = {k: np.concatenate(v).astype(np.float32) for k, v in rows.items()}
    np.savez(path, **data)
    return {"rows": int(len(data["rewards"])), "episodes": int(data["timeouts"].sum())}


def evaluate(act, episodes: int) -> dict:
    from diffto.learning.goal_evaluation import eval_seeds, evaluate_policy

    result, _ = evaluate_policy(act, ENV, eval_seeds(episodes, EVAL_OFFSET),
                                {"max_episode_steps": 50},
                                observation_keys=("observation", "achieved_goal"))
    return result.summary()


def run_ours(algo: str, seed: int, updates: int, episodes: int, out: Path) -> dict:
    path = out / f"diffto_{algo}_s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = _learner(algo, updates)
    model._start_task(0)
    t0 = time.perf_counter()
    model.pretrain()
    train_s = time.perf_counter() - t0
    model.eval()
    res = {"library": "diffto", "algo": algo, "seed": seed, "updates": updates,
           "train_s": train_s, "eval": evaluate(model.act, episodes)}
    model.teardown("fit")
    write_atomic(path, res)
    return res


def run_peer(algo: str, seed: int, updates: int, episodes: int, data: Path, out: Path) -> dict:
    path = out / f"d3rlpy_{algo}_s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    run_dir = out / f"d3rlpy_{algo}_s{seed}"
    python = PEER / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run bash {PEER / 'setup_venv.sh'} first")
    # the Panda's returns are negative costs: d3rlpy's IQL return-based scaler applies as in
    # its locomotion example; the discount matches diffto's learners
    hparams = {"gamma": LEARNER["gamma"]}
    subprocess.run([str(python), str(PEER / "train_d3rlpy.py"), "--dataset", str(data),
                    "--algo", algo, "--steps", str(updates), "--seed", str(seed),
                    "--out", str(run_dir), "--hparams", json.dumps(hparams)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    peer = json.loads((run_dir / "result.json").read_text())
    policy = torch.jit.load(str(run_dir / "policy.pt"))
    model = _learner(algo, updates)  # only for its feature map (no training)

    @torch.no_grad()
    def act(observation: np.ndarray, goal: np.ndarray) -> np.ndarray:
        o = np.atleast_2d(observation)
        obs = torch.as_tensor(model.network_state(o[:, :model.obs_dim], o[:, model.obs_dim:]),
                              dtype=torch.float32)
        feats = model.actor.inputs.features(obs, torch.as_tensor(np.atleast_2d(goal),
                                                                 dtype=torch.float32))
        return policy(feats).numpy()

    res = {"library": "d3rlpy", "algo": algo, "seed": seed, "updates": updates,
           "train_s": peer.get("fit_wall_s", peer.get("wall_time_s")),
           "d3rlpy": peer.get("versions", {}), "eval": evaluate(act, episodes)}
    write_atomic(path, res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=5000)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--algos", nargs="+", default=["td3bc", "iql"], choices=["td3bc", "iql"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = ROOT / "runs" / "bench_offline_to_online"
    out.mkdir(parents=True, exist_ok=True)
    if not (ROOT / DATASET).exists():
        raise SystemExit(f"{DATASET} is missing: lightning predict --config panda_to_dataset.yaml")
    data = out / "panda_reach_d3rlpy.npz"
    counts = peer_dataset(data, args.updates)
    from diffto.learning.goal_evaluation import eval_seeds, evaluate_expert

    expert = evaluate_expert(ENV, eval_seeds(args.episodes, EVAL_OFFSET),
                             {"max_episode_steps": 50}, cache_dir="runs/expert_cache").summary()
    runs = []
    for algo in args.algos:
        for seed in args.seeds:
            runs.append(run_ours(algo, seed, args.updates, args.episodes, out))
            runs.append(run_peer(algo, seed, args.updates, args.episodes, data, out))
    payload = {"command": "python benchmarks/bench_offline_to_online.py " + " ".join(sys.argv[1:]),
               "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": machine_info(torch=torch.__version__), "dataset": counts,
               "learner": {k: v for k, v in LEARNER.items() if k != "env_kwargs"},
               "expert": expert, "runs": runs}
    write_atomic(ROOT / "benchmarks" / "results" / "offline_to_online.json", payload)
    lines = ["# Offline TD3+BC and IQL on the Panda TO dataset: diffto and d3rlpy", "",
             f"`{payload['command']}` on {payload['date']}; {counts['episodes']} TO episodes "
             f"({counts['rows']} rows), {args.updates} updates each, {args.episodes} held-out "
             f"goals (50-step episodes). Machine: {payload['machine']['cpu']}, "
             f"{payload['machine']['cores']} cores.", "",
             "| policy | seed | success (any step) | success (last step) | final distance m | "
             "training s |", "|---|---|---|---|---|---|",
             f"| TO expert (MPC) | | {expert['success_any']:.2f} | {expert['success']:.2f} | "
             f"{expert['final_distance']:.3f} | |"]
    for r in runs:
        e = r["eval"]
        lines.append(f"| {r['library']} {r['algo']} | {r['seed']} | {e['success_any']:.2f} | "
                     f"{e['success']:.2f} | {e['final_distance']:.3f} | {r['train_s']:.0f} |")
    (ROOT / "benchmarks" / "results" / "offline_to_online.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
