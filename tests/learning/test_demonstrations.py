"""Demonstration windows and task selection (diffto.learning.demonstrations)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffto.data.trajectories import TrajectorySet
from diffto.learning.demonstrations import (
    DemonstrationWindows,
    select_demonstrations,
    task_index,
    window_indices,
)


def _set(lengths: list[int], tasks: list[int], names: dict[int, str]) -> TrajectorySet:
    rows = {k: [] for k in ("observation", "action", "episode", "timestep", "task")}
    for e, (n, k) in enumerate(zip(lengths, tasks, strict=True)):
        eid = k * 100_000 + e
        for t in range(n):
            rows["observation"].append([eid, t])
            rows["action"].append([t])
            rows["episode"].append(eid)
            rows["timestep"].append(t)
            rows["task"].append(k)
    obs = np.asarray(rows["observation"], float)
    N = len(obs)
    return TrajectorySet(observation=obs, action=np.asarray(rows["action"], float),
                         next_observation=obs + 1, episode=np.asarray(rows["episode"]),
                         timestep=np.asarray(rows["timestep"]), terminal=np.zeros(N, bool),
                         truncated=np.zeros(N, bool), task=np.asarray(rows["task"]),
                         meta={"task_names": {str(k): v for k, v in names.items()}})


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 7), min_size=1, max_size=5), To=st.integers(1, 4),
       Ta=st.integers(1, 5))
def test_windows_stay_inside_their_episode_and_pad_by_repetition(lengths, To, Ta):
    episode = np.repeat(np.arange(len(lengths)), lengths)
    hist, chunk = window_indices(episode, To, Ta)
    assert hist.shape == (len(episode), To) and chunk.shape == (len(episode), Ta)
    assert (episode[hist] == episode[:, None]).all() and (episode[chunk] == episode[:, None]).all()
    rows = np.arange(len(episode))
    assert (hist[:, -1] == rows).all() and (chunk[:, 0] == rows).all()
    # consecutive inside the episode, repeated at its ends
    assert (np.diff(hist, axis=1) <= 1).all() and (np.diff(hist, axis=1) >= 0).all()
    assert (np.diff(chunk, axis=1) <= 1).all() and (np.diff(chunk, axis=1) >= 0).all()
    start = np.r_[True, episode[1:] != episode[:-1]]
    assert (hist[start] == rows[start, None]).all()


def test_selection_keeps_the_first_demonstrations_of_each_task_in_the_policys_order():
    data = _set([3, 4, 5, 2, 3], [1, 1, 1, 4, 4], {1: "push-v3", 4: "reach-v3"})
    subset, tasks = select_demonstrations(data, ["reach-v3", "push-v3"], demos_per_task=2)
    assert tasks == ["reach-v3", "push-v3"]
    assert list(subset.episode_ids()) == [100_000, 100_001, 400_003, 400_004]
    idx = task_index(subset, tasks)
    assert set(idx[subset.task == 4]) == {0} and set(idx[subset.task == 1]) == {1}
    every, names = select_demonstrations(data)
    assert names == ["push-v3", "reach-v3"] and len(every) == len(data)
    with pytest.raises(ValueError, match="only 2 episodes"):
        select_demonstrations(data, ["reach-v3"], demos_per_task=3)
    with pytest.raises(ValueError, match="not in the dataset"):
        select_demonstrations(data, ["door-open-v3"])
    with pytest.raises(ValueError, match="not in tasks"):
        task_index(data, ["push-v3"])


def test_window_batches_gather_histories_and_chunks():
    data = _set([3, 2], [0, 0], {0: "reach-v3"})
    windows = DemonstrationWindows(data, ["reach-v3"], obs_horizon=2, action_horizon=3)
    batch = windows[[0, 2, 3]]
    assert batch["observation"].shape == (3, 2, 2) and batch["action"].shape == (3, 3, 1)
    # row 0: history = first observation twice; chunk = actions 0, 1, 2
    assert batch["observation"][0, :, 1].tolist() == [0, 0]
    assert batch["action"][0, :, 0].tolist() == [0, 1, 2]
    # row 2 (last of episode 0): chunk repeats its last action
    assert batch["action"][1, :, 0].tolist() == [2, 2, 2]
    assert batch["observation"][1, :, 1].tolist() == [1, 2]
    assert batch["task"].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="observation_keys"):
        DemonstrationWindows(data, ["reach-v3"], observation_keys=["achieved_goal"])
