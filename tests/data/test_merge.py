"""``python -m diffto.data.merge``: merged files, compatibility checks, atomic output."""

import subprocess
import sys

import numpy as np
import pytest

from diffto.data.merge import main, merge_files
from diffto.data.trajectories import load_trajectories, save_trajectories


def test_merge_cli_combines_files_and_shard_folders(make_set, tmp_path):
    a = make_set([2, 3], first_id=0, seed=1, episodes_requested=2, episodes_failed=0)
    b = make_set([4], first_id=1, seed=2, episodes_requested=3, episodes_failed=2)
    c = make_set([1], first_id=7, seed=3, episodes_requested=1, episodes_failed=0)
    save_trajectories(tmp_path / "a.npz", a)
    (tmp_path / "shards").mkdir()
    save_trajectories(tmp_path / "shards" / "part0.npz", b)
    save_trajectories(tmp_path / "shards" / "part1.npz", c)
    out = tmp_path / "all.npz"
    run = subprocess.run([sys.executable, "-m", "diffto.data.merge", str(out),
                          str(tmp_path / "a.npz"), str(tmp_path / "shards")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "10 transitions, 4 episodes from 2 inputs" in run.stdout
    merged = load_trajectories(out)
    assert merged.episode_ids().tolist() == [0, 1, 2, 7] and len(merged) == 10
    np.testing.assert_array_equal(merged.select_episodes([1]).observation, b.observation)
    assert merged.meta["episodes_requested"] == 6 and merged.meta["episodes_failed"] == 2
    assert merged.meta["files"] == [str(tmp_path / "a.npz"), str(tmp_path / "shards")]


def test_merge_refuses_mismatched_inputs(make_set, tmp_path, capsys):
    save_trajectories(tmp_path / "a.npz", make_set([2], first_id=0))
    save_trajectories(tmp_path / "task.npz", make_set([2], first_id=4, task="push"))
    save_trajectories(tmp_path / "wide.npz", make_set([2], first_id=4, o=7))
    save_trajectories(tmp_path / "bare.npz", make_set([2], first_id=4, optional=False))
    save_trajectories(tmp_path / "dup.npz", make_set([2], first_id=0, seed=5))
    out = str(tmp_path / "out.npz")
    cases = {"task.npz": r"task\.npz: meta 'task' is 'push' but .*a\.npz's is 'toy'",
             "wide.npz": r"wide\.npz: array 'observation' has trailing shape \(7,\)",
             "bare.npz": r"bare\.npz: arrays .* differ",
             "dup.npz": r"episode id 0 is in both .*a\.npz and .*dup\.npz"}
    for name, match in cases.items():
        with pytest.raises(ValueError, match=match):
            merge_files(out, [tmp_path / "a.npz", tmp_path / name], progress=False)
    assert not (tmp_path / "out.npz").exists()
    # the command line reports the same message and status 1
    assert main([out, str(tmp_path / "a.npz"), str(tmp_path / "task.npz")]) == 1
    assert "meta 'task' is 'push'" in capsys.readouterr().err
    # renumbering resolves repeated ids; an existing output needs --overwrite
    assert main([out, str(tmp_path / "a.npz"), str(tmp_path / "dup.npz"), "--renumber"]) == 0
    assert load_trajectories(out).episode_ids().tolist() == [0, 1]
    assert main([out, str(tmp_path / "a.npz")]) == 1
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert main([out, str(tmp_path / "a.npz"), "--overwrite", "--compressed"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _task_set(make_set, task_id, name, first_id, **meta):
    """A one-task piece of a multi-task collection: ``task`` array and ``meta["task_names"]``."""
    data = make_set([2, 3], first_id=first_id, seed=task_id, env_id="diffto/Metaworld-v0",
                    task_names={str(task_id): name}, **meta)
    data.task[:] = task_id
    data.meta.pop("task")  # multi-task sets name their tasks in task_names only
    return data


def test_merge_combines_collections_of_different_tasks(make_set, tmp_path):
    push = _task_set(make_set, 1, "push-v3", 100_000, episodes_requested=2, episodes_failed=0)
    reach = _task_set(make_set, 0, "reach-v3", 0, episodes_requested=3, episodes_failed=1)
    more_push = _task_set(make_set, 1, "push-v3", 100_010)
    save_trajectories(tmp_path / "push.npz", push)
    (tmp_path / "reach").mkdir()
    save_trajectories(tmp_path / "reach" / "reach-v3_episodes_000000-000001.npz", reach)
    save_trajectories(tmp_path / "more_push.npz", more_push)
    out = tmp_path / "all.npz"
    assert main([str(out), str(tmp_path / "push.npz"), str(tmp_path / "reach"),
                 str(tmp_path / "more_push.npz")]) == 0
    merged = load_trajectories(out)
    assert merged.meta["task_names"] == {"0": "reach-v3", "1": "push-v3"}
    assert merged.meta["episodes_requested"] == 5 and merged.meta["episodes_failed"] == 1
    assert merged.episode_ids().tolist() == [0, 2, 100_000, 100_002, 100_010, 100_012]
    np.testing.assert_array_equal(merged.select_episodes([0, 2]).task, 0)
    np.testing.assert_array_equal(merged.select_episodes([100_000, 100_012]).task, 1)
    np.testing.assert_array_equal(merged.select_episodes([0, 2]).observation,
                                  reach.observation)


def test_merge_refuses_a_task_id_with_two_names(make_set, tmp_path, capsys):
    save_trajectories(tmp_path / "push.npz", _task_set(make_set, 1, "push-v3", 100_000))
    save_trajectories(tmp_path / "other.npz", _task_set(make_set, 1, "pick-place-v3", 0))
    save_trajectories(tmp_path / "moved.npz", _task_set(make_set, 2, "push-v3", 200_000))
    other_env = _task_set(make_set, 0, "reach-v3", 0)
    other_env.meta["env_id"] = "diffto/Other-v0"
    save_trajectories(tmp_path / "env.npz", other_env)
    out = str(tmp_path / "out.npz")
    cases = {"other.npz": r"other\.npz: meta 'task_names' maps task id 1 to 'pick-place-v3' "
                          r"but .*push\.npz's maps it to 'push-v3'",
             "moved.npz": r"moved\.npz: meta 'task_names' gives 'push-v3' the task id 2 but "
                          r".*push\.npz's gives it 1",
             "env.npz": r"env\.npz: meta 'env_id' is 'diffto/Other-v0' but .*push\.npz's is "
                        r"'diffto/Metaworld-v0'"}
    for name, match in cases.items():
        with pytest.raises(ValueError, match=match):
            merge_files(out, [tmp_path / "push.npz", tmp_path / name], progress=False)
    assert main([out, str(tmp_path / "push.npz"), str(tmp_path / "other.npz")]) == 1
    assert "task id 1 to 'pick-place-v3'" in capsys.readouterr().err
    assert not (tmp_path / "out.npz").exists()
