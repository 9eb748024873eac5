"""TO datasets as a Lightning predict job: format, labels, resume, failures, DDP, configs."""

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from diffto.data.shard_writer import TOProblems, TrajectoryShardWriter, shard_filename
from diffto.data.to_dataset import TODatasetGenerator
from diffto.data.to_expert import run_expert_episodes, stage_cost, terminal_cost
from diffto.data.trajectories import load_trajectories
from diffto.tasks.classic import SwingUpExpert

ENV = "diffto/PendulumSwingUp-v0"
# A short-horizon expert: a few milliseconds per solve, converges within the cap from the
# shifted warm start (the swing-up itself needs the shipped 60-step horizon; not tested here).
SMALL_EXPERT = {
    "class_path": "diffto.tasks.classic.SwingUpExpert",
    "init_args": {"horizon": 10, "max_iter": 20, "tol": 1e-4},
}


def _generator(**kwargs) -> TODatasetGenerator:
    kwargs.setdefault("expert", SMALL_EXPERT)
    kwargs.setdefault("episode_length", 5)
    kwargs.setdefault("first_max_iter", 40)
    return TODatasetGenerator(ENV, **kwargs)


def _predict(module, folder, episodes=4, per_shard=2, writer=None):
    writer = writer or TrajectoryShardWriter()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_model_summary=False,
                        enable_progress_bar=False, default_root_dir=str(folder),
                        callbacks=[writer])
    data = TOProblems(str(folder), episodes=episodes, episodes_per_shard=per_shard)
    trainer.predict(module, datamodule=data)
    return writer


def _swingup_stage_cost(state, u, goal, expert: SwingUpExpert):
    """The swing-up stage cost written out from its docstring, independent of the cost code."""
    w = expert.weights
    return (w["angle_weight"] * (1 - np.cos(state[:, 0] - goal[:, 0]))
            + 0.5 * w["rate_weight"] * state[:, 1] ** 2
            + 0.5 * w["control_weight"] * (u[:, 0] / expert.torque_limit) ** 2)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pendulum_to")
    module = _generator()
    writer = _predict(module, folder)
    return folder, module, writer


def test_shards_hold_the_format_and_the_expert_labels(generated):
    folder, module, writer = generated
    assert sorted(p.name for p in folder.glob("*.npz")) == [
        "episodes_000000-000001.npz", "episodes_000002-000003.npz"]
    assert [p.name for p in writer.written] == sorted(p.name for p in folder.glob("*.npz"))
    data = load_trajectories(folder)
    expert = module.expert
    L_, T = 5, expert.horizon
    assert len(data) == 4 * L_ and data.episode_ids().tolist() == [0, 1, 2, 3]
    assert data.observation.shape == (20, 3) and data.action.shape == (20, 1)
    assert data.desired_goal.shape == data.achieved_goal.shape == (20, 1)
    assert data.plan.shape == (20, T, 1)
    assert data.images is None
    for sl in data.episode_slices():
        assert data.timestep[sl].tolist() == list(range(L_))
        assert data.truncated[sl].tolist() == [False] * (L_ - 1) + [True]
        assert not data.terminal[sl].any()
        assert np.all(data.desired_goal[sl] == data.desired_goal[sl][0])
        # transitions chain: next observation of t is the observation of t + 1
        np.testing.assert_array_equal(data.next_observation[sl][:-1], data.observation[sl][1:])
        np.testing.assert_array_equal(data.extras["next_state"][sl][:-1],
                                      data.extras["state"][sl][1:])
        # cost_to_go is the realized suffix sum of the stage costs
        c = data.cost[sl]
        np.testing.assert_allclose(data.cost_to_go[sl], [c[t:].sum() for t in range(L_)],
                                   rtol=1e-12, atol=1e-12)
        # the observation [cos θ, sin θ, θ̇] is the planning state [θ, θ̇] seen by the env
        s = data.extras["state"][sl]
        np.testing.assert_allclose(data.observation[sl],
                                   np.c_[np.cos(s[:, 0]), np.sin(s[:, 0]), s[:, 1]], atol=1e-12)
    # the action applied is the plan's first control, in env units (torque / limit)
    np.testing.assert_allclose(data.action, data.plan[:, 0] / expert.torque_limit, atol=1e-12)
    # cost is the expert's stage cost of (x_t, u_t), here checked against the formula
    u = np.clip(data.action, -1, 1) * expert.torque_limit
    np.testing.assert_allclose(
        data.cost, _swingup_stage_cost(data.extras["state"], u, data.desired_goal, expert),
        rtol=1e-10, atol=1e-12)
    # reward and achieved goal are the env's, at t + 1
    np.testing.assert_allclose(data.achieved_goal[:, 0], np.arctan2(
        data.next_observation[:, 1], data.next_observation[:, 0]), atol=1e-12)
    info = data.episode_info
    assert info["converged"].all()
    assert info["seed"].tolist() == [0, 1, 2, 3] and info["length"].tolist() == [L_] * 4
    assert np.all((info["iterations"] >= 0) & (info["iterations"] <= 20))
    assert np.all(info["first_solve_iterations"] >= 1)
    np.testing.assert_allclose(info["total_cost"], data.cost_to_go[data.timestep == 0])
    meta = data.meta
    assert meta["env_id"] == ENV and math.isclose(meta["dt"], 0.05)
    assert meta["episodes_requested"] == 4 and meta["episodes_failed"] == 0
    assert meta["expert"]["class_path"] == "diffto.tasks.classic.swingup_expert.SwingUpExpert"
    assert meta["expert"]["horizon"] == 10 and meta["cost_weights"] == expert.weights
    assert {"torch", "mujoco", "diffto"} <= set(meta["versions"])


def test_resume_recomputes_only_the_missing_shard(generated, tmp_path):
    folder, _, _ = generated
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = load_trajectories(copy)
    kept = copy / "episodes_000000-000001.npz"
    stamp = kept.stat().st_mtime_ns
    (copy / "episodes_000002-000003.npz").unlink()
    # a half-written temporary file of save_trajectories, left by a kill: not a shard
    (copy / ".episodes_000002-000003.abc123.npz.tmp").write_bytes(b"PK\x03\x04 truncated")
    writer = _predict(_generator(), copy)
    assert [p.name for p in writer.written] == ["episodes_000002-000003.npz"]
    assert kept.stat().st_mtime_ns == stamp
    after = load_trajectories(copy)
    for name, value in before.arrays().items():
        np.testing.assert_array_equal(after.arrays()[name], value, err_msg=name)
    # everything done: a rerun writes nothing
    assert _predict(_generator(), copy).written == []


class _FailingOnNegativeGoals(SwingUpExpert):
    """Reports non-convergence on rows whose goal angle is negative, at every step."""

    def solve(self, state, goal, *args, **kwargs):
        sol = super().solve(state, goal, *args, **kwargs)
        sol.converged = sol.converged & (torch.as_tensor(goal)[:, 0] >= 0)
        return sol


def test_failed_episodes_are_left_out_and_counted(tmp_path):
    module = _generator(episode_length=3)
    module.expert = _FailingOnNegativeGoals(horizon=10, max_iter=20, tol=1e-4)
    _predict(module, tmp_path, episodes=6, per_shard=3)
    data = load_trajectories(tmp_path)
    goals = {}
    from diffto.tasks.registry import make_env

    for i in range(6):
        goals[i] = make_env(ENV).reset(seed=i)[0]["desired_goal"][0]
    failed = [i for i in range(6) if goals[i] < 0]
    assert 0 < len(failed) < 6, goals  # the seeds give both kinds (else the test says nothing)
    assert data.episode_ids().tolist() == [i for i in range(6) if i not in failed]
    assert data.meta["episodes_failed"] == len(failed)
    assert data.meta["episodes_requested"] == 6
    assert (data.desired_goal >= 0).all() and data.episode_info["converged"].all()


def test_a_shard_with_every_episode_failed_is_written_empty(tmp_path):
    module = _generator(episode_length=2, first_max_iter=None,
                        expert={"class_path": "diffto.tasks.classic.SwingUpExpert",
                                "init_args": {"horizon": 10, "max_iter": 1, "tol": 1e-12}})
    writer = _predict(module, tmp_path, episodes=2, per_shard=2)
    assert [p.name for p in writer.written] == ["episodes_000000-000001.npz"]
    data = load_trajectories(tmp_path)
    assert len(data) == 0 and data.meta["episodes_failed"] == 2
    assert data.meta["failed_episodes"] == [0, 1]
    assert _predict(module, tmp_path, episodes=2, per_shard=2).written == []


def test_resume_refuses_other_settings_and_other_chunking(generated, tmp_path):
    folder, _, _ = generated
    with pytest.raises(ValueError, match="other settings"):
        _predict(_generator(episode_length=4), folder)
    with pytest.raises(ValueError, match="another chunking"):
        _predict(_generator(), folder, episodes=4, per_shard=3)


def test_generator_refuses_to_run_without_a_writer(tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="TrajectoryShardWriter"):
        trainer.predict(_generator(), datamodule=TOProblems(str(tmp_path), episodes=2))


def test_every_rank_gets_a_batch_when_fewer_shards_remain_than_ranks(tmp_path):
    problems = TOProblems(str(tmp_path), episodes=4, episodes_per_shard=4, seed=10)
    problems.trainer = types.SimpleNamespace(world_size=3)
    problems.setup("predict")
    batches = list(problems.predict_dataloader())
    assert len(batches) == 3
    assert batches[0]["episode"].tolist() == [0, 1, 2, 3]
    assert batches[0]["seed"].tolist() == [10, 11, 12, 13]
    assert [len(b["episode"]) for b in batches[1:]] == [0, 0]
    assert shard_filename(0, 4) == "episodes_000000-000003.npz"


def test_images_are_the_frames_at_each_step_and_the_terminal_cost_ends_the_episode():
    expert = SwingUpExpert(horizon=10, max_iter=20, tol=1e-4)
    kwargs = dict(episodes=[7], seeds=[7], episode_length=3, first_max_iter=40)
    data, _ = run_expert_episodes(expert, ENV, None, images=True, **kwargs)
    assert data.images.dtype == np.uint8 and data.images.ndim == 4 and len(data.images) == 3
    assert data.images.shape[-1] == 3 and data.images.std() > 0
    assert not np.array_equal(data.images[0], data.images[-1])  # the pendulum moved
    with_end, _ = run_expert_episodes(expert, ENV, None, terminal_cost_at_end=True, **kwargs)
    end = terminal_cost(expert, data.extras["next_state"][-1:], data.desired_goal[-1:])
    np.testing.assert_allclose(with_end.cost[:-1], data.cost[:-1])
    np.testing.assert_allclose(with_end.cost[-1], data.cost[-1] + end[0])
    np.testing.assert_allclose(with_end.cost_to_go[0], data.cost_to_go[0] + end[0])


def test_stage_and_terminal_cost_of_the_panda_expert_match_its_formula():
    """The stage is isolated from the expert's cost object (a sum with a QuadraticCost here)."""
    from diffto.tasks.panda import PandaReachExpert

    expert = PandaReachExpert()
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(3, 14, dtype=torch.float64)
    x[:, :7] = torch.tensor([0.0, 0.0, 0.0, -1.5708, 0.0, 1.5708, -0.7853], dtype=torch.float64)
    x += 0.2 * torch.randn(3, 14, generator=gen, dtype=torch.float64)
    u = 10 * torch.randn(3, 7, generator=gen, dtype=torch.float64)
    g = torch.tensor([[0.5, 0.1, 0.5], [0.4, -0.1, 0.6], [0.6, 0.0, 0.3]], dtype=torch.float64)
    w = expert.weights
    position = ((expert.achieved_goal_of(x) - g) ** 2).sum(-1)
    velocity = (x[:, 7:] ** 2).sum(-1)
    stage = (0.5 * w["position_weight"] ** 2 * position + 0.5 * w["velocity_weight"] ** 2
             * velocity + 0.5 * w["control_weight"] ** 2
             * ((u / expert.torque_limits) ** 2).sum(-1))
    final = 0.5 * (w["final_weight"] / w["position_weight"]) ** 2 * (
        w["position_weight"] ** 2 * position + w["velocity_weight"] ** 2 * velocity)
    np.testing.assert_allclose(stage_cost(expert, x, u, g), stage.numpy(), rtol=1e-10)
    np.testing.assert_allclose(terminal_cost(expert, x, g), final.numpy(), rtol=1e-10)


def _cli(args, cwd, timeout=240):
    env = dict(os.environ, DIFFTO_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "diffto", "predict", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_ddp_over_two_processes_gives_the_single_process_shards(generated, tmp_path):
    """Two CPU ranks (gloo) split the shards; their union is the single-process dataset."""
    folder, _, _ = generated
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "seed_everything: 0\n"
        "trainer: {accelerator: cpu, logger: false, enable_model_summary: false,\n"
        "          inference_mode: false,\n"
        "          callbacks: [{class_path: diffto.data.shard_writer.TrajectoryShardWriter}]}\n"
        f"model:\n  class_path: diffto.data.to_dataset.TODatasetGenerator\n"
        f"  init_args: {{env_id: {ENV}, episode_length: 5, first_max_iter: 40,\n"
        f"    expert: {{class_path: {SMALL_EXPERT['class_path']},\n"
        "              init_args: {horizon: 10, max_iter: 20, tol: 1.0e-4}}}\n"
        "data:\n  class_path: diffto.data.shard_writer.TOProblems\n"
        "  init_args: {output_dir: out, episodes: 4, episodes_per_shard: 2}\n"
    )
    _cli(["--config", str(config), "--trainer.strategy=ddp", "--trainer.devices=2"], tmp_path)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.npz"))
    assert shards == sorted(p.name for p in folder.glob("*.npz"))
    for name in shards:
        ddp, single = load_trajectories(tmp_path / "out" / name), load_trajectories(folder / name)
        assert ddp.meta["generator"] == single.meta["generator"]
        for key, value in single.arrays().items():
            np.testing.assert_array_equal(ddp.arrays()[key], value, err_msg=f"{name}: {key}")


@pytest.mark.parametrize("config, overrides", [
    ("pendulum_to_dataset.yaml", ["--model.episode_length=2", "--model.first_max_iter=5",
                                  "--data.episodes_per_shard=2"]),
    ("panda_to_dataset.yaml", ["--model.episode_length=2", "--model.first_max_iter=3",
                               "--data.episodes_per_shard=2"]),
])
def test_shipped_configs_fast_dev_run(config, overrides, tmp_path, monkeypatch):
    from diffto.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    main(["predict", "--config", config, "--trainer.fast_dev_run=true", *overrides])
    written = list(Path(tmp_path, "runs", "datasets").rglob("episodes_*.npz"))
    assert len(written) == 1
    assert load_trajectories(written[0]).meta["episodes_requested"] == 2
