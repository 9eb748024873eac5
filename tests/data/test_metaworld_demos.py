"""Metaworld demonstrations as a Lightning predict job: format, cut, resume, failures, DDP."""

import os
import shutil
import subprocess
import sys
import types
import zipfile

import lightning as L
import numpy as np
import pytest

from diffto.data.metaworld_demos import (
    TASK_EPISODE_STRIDE,
    MetaworldDemoCollector,
    MetaworldDemoProblems,
    collect_demos,
    task_id,
)
from diffto.data.shard_writer import TrajectoryShardWriter
from diffto.data.trajectories import load_trajectories
from diffto.tasks.metaworld import METAWORLD_TASKS, ScriptedExpert
from diffto.tasks.registry import make_env

# Metaworld's scripted policies warn about their own gains at every action.
pytestmark = pytest.mark.filterwarnings("ignore:Constant.*may be too high:UserWarning")

TASKS = ["reach-v3", "push-v3"]
AFTER = 2  # steps kept after the first success (small: the tests look at the cut, not the data)


def _predict(folder, tasks=TASKS, episodes=3, per_shard=2, writer=None, **module_kwargs):
    module_kwargs.setdefault("steps_after_success", AFTER)
    writer = writer or TrajectoryShardWriter()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_model_summary=False,
                        enable_progress_bar=False, default_root_dir=str(folder),
                        callbacks=[writer])
    data = MetaworldDemoProblems(str(folder), tasks=tasks, episodes_per_task=episodes,
                                 episodes_per_shard=per_shard)
    trainer.predict(MetaworldDemoCollector(**module_kwargs), datamodule=data)
    return writer


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metaworld_demos")
    return folder, _predict(folder)


def _replay(task, seed, actions):
    """Observations and success flags of the env driven by ``actions`` from reset ``seed``."""
    env = make_env("diffto/Metaworld-v0", {"task": task})
    obs, _ = env.reset(seed=seed)
    observations, success = [obs["observation"]], []
    for action in actions:
        obs, _, _, _, info = env.step(action)
        observations.append(obs["observation"])
        success.append(info["is_success"] > 0.5)
    env.close()
    return np.stack(observations), np.array(success)


def test_shards_hold_cut_successful_demonstrations_of_every_task(collected):
    folder, writer = collected
    names = sorted(p.name for p in folder.glob("*.npz"))
    assert names == ["push-v3_episodes_000000-000001.npz", "push-v3_episodes_000002-000002.npz",
                     "reach-v3_episodes_000000-000001.npz",
                     "reach-v3_episodes_000002-000002.npz"]
    assert sorted(p.name for p in writer.written) == names
    data = load_trajectories(folder)
    reach, push = task_id("reach-v3"), task_id("push-v3")
    assert METAWORLD_TASKS[reach] == "reach-v3"
    ids = [reach * TASK_EPISODE_STRIDE + i for i in range(3)]
    ids += [push * TASK_EPISODE_STRIDE + i for i in range(3)]
    assert data.episode_ids().tolist() == sorted(ids)  # the scripted experts solve these
    assert data.meta["task_names"] == {str(reach): "reach-v3", str(push): "push-v3"}
    assert data.meta["env_id"] == "diffto/Metaworld-v0" and data.meta["dt"] == 0.0125
    assert data.meta["episodes_requested"] == 6 and data.meta["episodes_failed"] == 0
    assert data.meta["generator"]["steps_after_success"] == AFTER
    assert {"metaworld", "mujoco"} <= set(data.meta["versions"])
    assert data.observation.shape[1:] == (39,) and data.action.shape[1:] == (4,)
    assert data.action.dtype == np.float32 and np.abs(data.action).max() <= 1
    assert data.desired_goal.shape[1:] == data.achieved_goal.shape[1:] == (3,)
    assert data.images is None and data.cost is None and not data.terminal.any()
    info = data.episode_info
    assert info["seed"].tolist() == [0, 1, 2, 0, 1, 2]
    np.testing.assert_array_equal(info["length"], info["success_step"] + 1 + AFTER)
    for sl, episode, seed, first in zip(data.episode_slices(), data.episode_ids(),
                                        info["seed"], info["success_step"], strict=True):
        task = METAWORLD_TASKS[episode // TASK_EPISODE_STRIDE]
        assert (data.task[sl] == episode // TASK_EPISODE_STRIDE).all()
        assert data.timestep[sl].tolist() == list(range(sl.stop - sl.start))
        assert data.truncated[sl].tolist() == [False] * (sl.stop - sl.start - 1) + [True]
        np.testing.assert_array_equal(data.next_observation[sl][:-1], data.observation[sl][1:])
        np.testing.assert_array_equal(data.desired_goal[sl], data.observation[sl][:, 36:39])
        # the stored actions drive a fresh env from the stored seed through the stored
        # observations, and its first success is at success_step
        observations, success = _replay(task, int(seed), data.action[sl])
        np.testing.assert_array_equal(observations[:-1], data.observation[sl])
        np.testing.assert_array_equal(observations[1:], data.next_observation[sl])
        assert np.flatnonzero(success)[0] == first


def test_resume_recomputes_only_the_missing_shard_and_refuses_other_settings(collected,
                                                                            tmp_path):
    folder, _ = collected
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = load_trajectories(copy)
    kept = copy / "reach-v3_episodes_000000-000001.npz"
    stamp = kept.stat().st_mtime_ns
    (copy / "push-v3_episodes_000002-000002.npz").unlink()
    # a half-written temporary file of save_trajectories, left by a kill: not a shard
    (copy / ".push-v3_episodes_000002-000002.abc123.npz.tmp").write_bytes(b"PK\x03\x04 cut")
    writer = _predict(copy)
    assert [p.name for p in writer.written] == ["push-v3_episodes_000002-000002.npz"]
    assert kept.stat().st_mtime_ns == stamp
    after = load_trajectories(copy)
    for name, value in before.arrays().items():
        np.testing.assert_array_equal(after.arrays()[name], value, err_msg=name)
    assert _predict(copy).written == []
    with pytest.raises(ValueError, match="other settings"):
        _predict(copy, steps_after_success=AFTER + 1)
    with pytest.raises(ValueError, match="another chunking"):
        _predict(copy, per_shard=3)


def test_an_expert_that_leaves_the_goal_is_cut_before_the_step_that_leaves():
    """door-open's scripted policy pushes the door past the goal 20-40 steps after success."""
    data, _ = collect_demos("door-open-v3", [0], [0], steps_after_success=100)
    first, n = int(data.episode_info["success_step"][0]), len(data)
    assert first + 1 < n < first + 101 and data.truncated[-1]
    # every kept transition after the first success stays at the goal; the expert's next one
    # leaves it
    expert = ScriptedExpert("door-open-v3")
    leave = expert.act(data.next_observation[-1:])
    _, success = _replay("door-open-v3", 0, np.r_[data.action, leave])
    assert success[first:n].all() and not success[n]


def test_episodes_without_success_are_left_out_and_counted():
    full, _ = collect_demos("reach-v3", range(4), range(4), steps_after_success=3)
    first = full.episode_info["success_step"]
    assert len(set(first.tolist())) > 1, first  # the cap below must split them
    cap = int(np.sort(first)[1]) + 2  # episodes succeeding at t <= cap - 1 are kept
    data, counts = collect_demos("reach-v3", range(4), range(4), steps_after_success=3,
                                 max_steps=cap)
    kept = [i for i in range(4) if first[i] <= cap - 1]
    ids = full.episode_ids()
    assert data.episode_ids().tolist() == ids[kept].tolist()
    assert counts["episodes_failed"] == 4 - len(kept)
    assert counts["failed_episodes"] == [int(ids[i]) for i in range(4) if i not in kept]
    for i, sl in zip(kept, data.episode_slices(), strict=True):
        n = min(int(first[i]) + 4, cap)  # cut 3 after success, or at the step limit
        assert sl.stop - sl.start == n and data.truncated[sl.stop - 1]
        np.testing.assert_array_equal(data.action[sl], full.select_episodes([ids[i]]).action[:n])


def test_action_noise_perturbs_what_is_applied_and_keeps_the_expert_label():
    """Noisy collection (DART): ``action`` is the expert's action at each visited state,
    ``executed_action`` the noisy one that produced the next state; reproducible per seed."""
    data, _ = collect_demos("push-v3", [0, 1], [0, 1], steps_after_success=2, action_noise=0.3)
    clean, _ = collect_demos("push-v3", [0], [0], steps_after_success=2)
    applied = data.extras["executed_action"]
    assert applied.shape == data.action.shape and np.abs(applied).max() <= 1.0
    expert = ScriptedExpert("push-v3")
    np.testing.assert_allclose(data.action, np.clip(expert.act(data.observation), -1, 1),
                               atol=1e-6)
    noise = applied - data.action
    assert 0.15 < noise[np.abs(data.action).max(1) < 0.5].std() < 0.35
    first = data.select_episodes([data.episode_ids()[0]])
    observed, _ = _replay("push-v3", 0, first.extras["executed_action"])
    np.testing.assert_allclose(observed[1:], first.next_observation, atol=1e-9)
    np.testing.assert_array_equal(first.observation[0], clean.observation[0])  # same reset
    assert not np.allclose(first.observation[1:3], clean.observation[1:3])     # then apart
    again, _ = collect_demos("push-v3", [1], [1], steps_after_success=2, action_noise=0.3)
    np.testing.assert_array_equal(again.extras["executed_action"],
                                  data.select_episodes([data.episode_ids()[1]]).extras[
                                      "executed_action"])
    assert "executed_action" not in clean.extras
    for bad in (-0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="action_noise"):
            collect_demos("push-v3", [0], [0], action_noise=bad)
    with pytest.raises(ValueError, match="action_noise"):
        MetaworldDemoCollector(action_noise=-1.0)
    # the settings a folder is resumed against name the noise only when there is some
    assert "action_noise" not in MetaworldDemoCollector().settings()
    assert MetaworldDemoCollector(action_noise=0.1).settings()["action_noise"] == 0.1


def test_a_shard_without_successes_is_written_empty(tmp_path):
    writer = _predict(tmp_path, tasks=["reach-v3"], episodes=2, per_shard=2, max_steps=5)
    assert [p.name for p in writer.written] == ["reach-v3_episodes_000000-000001.npz"]
    data = load_trajectories(tmp_path)
    assert len(data) == 0 and data.meta["episodes_failed"] == 2
    assert data.meta["failed_episodes"] == [task_id("reach-v3") * TASK_EPISODE_STRIDE + i
                                            for i in range(2)]


def test_images_are_the_frames_of_each_step_and_the_shard_is_compressed(tmp_path):
    writer = _predict(tmp_path, tasks=["reach-v3"], episodes=1, per_shard=1, images=True,
                      image_size=84)
    data = load_trajectories(tmp_path)
    assert data.images.dtype == np.uint8 and data.images.shape == (len(data), 84, 84, 3)
    assert data.images.std() > 0 and not np.array_equal(data.images[0], data.images[-1])
    with zipfile.ZipFile(writer.written[0]) as archive:
        info = archive.getinfo("images.npy")
        assert info.compress_type == zipfile.ZIP_DEFLATED
        assert info.compress_size < info.file_size / 2


def test_problems_plan_per_task_shards_and_check_their_arguments(tmp_path):
    problems = MetaworldDemoProblems(str(tmp_path), tasks=["push-v3", "reach-v3"],
                                     episodes_per_task=3, episodes_per_shard=2, seed=5)
    problems.trainer = types.SimpleNamespace(world_size=1)
    problems.setup("predict")
    batches = list(problems.predict_dataloader())
    push = task_id("push-v3")
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2], [0, 1], [2]]
    assert batches[0]["task"].tolist() == [push, push]
    assert batches[0]["episode"].tolist() == [push * TASK_EPISODE_STRIDE,
                                              push * TASK_EPISODE_STRIDE + 1]
    assert batches[1]["seed"].tolist() == [7] and batches[3]["seed"].tolist() == [7]
    assert MetaworldDemoProblems(str(tmp_path)).tasks[:2] == ["reach-v3", "push-v3"]
    with pytest.raises(ValueError, match="'push-v2' is not a Metaworld v3 task"):
        MetaworldDemoProblems(str(tmp_path), tasks=["push-v2"])
    with pytest.raises(ValueError, match="tasks must not repeat"):
        MetaworldDemoProblems(str(tmp_path), tasks=["push-v3", "push-v3"])
    with pytest.raises(ValueError, match="episodes_per_task must be <= 100000"):
        MetaworldDemoProblems(str(tmp_path), episodes_per_task=TASK_EPISODE_STRIDE + 1)
    with pytest.raises(ValueError, match="image_size must be an int >= 84"):
        MetaworldDemoCollector(image_size=64)
    with pytest.raises(ValueError, match="max_steps must be an int <= 500"):
        MetaworldDemoCollector(max_steps=501)


def test_collector_refuses_to_run_without_a_writer(tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="TrajectoryShardWriter"):
        trainer.predict(MetaworldDemoCollector(), datamodule=MetaworldDemoProblems(
            str(tmp_path), tasks=["reach-v3"], episodes_per_task=1))


def test_ddp_over_two_processes_gives_the_single_process_shards(collected, tmp_path):
    """Two CPU ranks (gloo) split the shards of two tasks; their union is the single-process
    collection, byte for byte in every array."""
    folder, _ = collected
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "seed_everything: 0\n"
        "trainer: {accelerator: cpu, logger: false, enable_model_summary: false,\n"
        "          callbacks: [{class_path: diffto.data.shard_writer.TrajectoryShardWriter}]}\n"
        "model:\n  class_path: diffto.data.metaworld_demos.MetaworldDemoCollector\n"
        f"  init_args: {{steps_after_success: {AFTER}}}\n"
        "data:\n  class_path: diffto.data.metaworld_demos.MetaworldDemoProblems\n"
        f"  init_args: {{output_dir: out, tasks: [{', '.join(TASKS)}], episodes_per_task: 3,\n"
        "              episodes_per_shard: 2}\n"
    )
    env = dict(os.environ, DIFFTO_NUM_THREADS="1",
               PYTHONWARNINGS="ignore::UserWarning")  # the policies' gain warnings
    out = subprocess.run([sys.executable, "-m", "diffto", "predict", "--config", str(config),
                          "--trainer.strategy=ddp", "--trainer.devices=2"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.npz"))
    assert shards == sorted(p.name for p in folder.glob("*.npz"))
    for name in shards:
        ddp, single = load_trajectories(tmp_path / "out" / name), load_trajectories(folder / name)
        for key, value in single.arrays().items():
            np.testing.assert_array_equal(ddp.arrays()[key], value, err_msg=f"{name}: {key}")
