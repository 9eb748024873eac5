"""The dataset format: validation, row order, helpers, files, shards and legacy files."""

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffto.data.trajectories import (
    FORMAT,
    TrajectorySet,
    cost_to_go,
    load_trajectories,
    merge_trajectories,
    save_trajectories,
)


@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4), optional=st.booleans(),
       compressed=st.booleans())
@settings(max_examples=10)
def test_round_trip_is_exact(tmp_path_factory, make_set, assert_same, lengths, optional,
                             compressed):
    data = make_set(lengths, optional=optional, nested={"a": None, "b": [1.5]})
    folder = tmp_path_factory.mktemp("npz")
    path = save_trajectories(folder / "set", data, compressed=compressed)
    assert path.suffix == ".npz"
    back = load_trajectories(path)
    assert back.meta == data.meta
    assert_same(data, back)
    with np.load(path, allow_pickle=False) as npz:  # no pickle needed
        assert json.loads(str(npz["meta"])) == data.meta and str(npz["format"]) == FORMAT
    assert os.listdir(folder) == [path.name]  # no temporary file left behind


def test_rows_are_sorted_by_episode_and_timestep(make_set, assert_same):
    data = make_set([3, 2, 4], optional=True)
    perm = np.random.default_rng(1).permutation(len(data))
    shuffled = TrajectorySet(**{k: v[perm] for k, v in data.arrays().items() if k != "contact"},
                             extras={"contact": data.extras["contact"][perm]},
                             episode_info=data.episode_info, meta=data.meta)
    assert_same(data, shuffled)
    assert data.episode_ids().tolist() == [0, 2, 4]
    assert data.episode_slices() == [slice(0, 3), slice(3, 5), slice(5, 9)]
    assert data.episode_lengths().tolist() == [3, 2, 4]
    dup = dict(data.arrays())
    dup["timestep"] = np.zeros(len(data), dtype=np.int64)
    with pytest.raises(ValueError, match=r"duplicate pair \(episode 0, timestep 0\)"):
        TrajectorySet(**{k: v for k, v in dup.items() if k != "contact"})


BASE = dict(observation=np.zeros((4, 2)), action=np.zeros((4, 1)),
            next_observation=np.zeros((4, 2)), episode=np.array([0, 0, 1, 1]),
            timestep=np.array([0, 1, 0, 1]), terminal=np.zeros(4, bool),
            truncated=np.zeros(4, bool))


@pytest.mark.parametrize("change, match", [
    ({"observation": np.zeros(4)}, "observation must have at least 2 dimensions"),
    ({"action": np.zeros((3, 1))}, r"action must have N=4 rows"),
    ({"next_observation": np.zeros((4, 3))}, "next_observation must have the shape"),
    ({"observation": np.zeros((4, 2), np.int64)}, "observation must have a floating dtype"),
    ({"action": np.full((4, 1), np.nan)}, "action must be finite"),
    ({"episode": np.zeros(4)}, "episode must have an integer dtype"),
    ({"timestep": np.array([0, -1, 0, 1])}, "timestep must be >= 0"),
    ({"terminal": np.zeros(4, np.int64)}, "terminal must have dtype bool"),
    ({"truncated": None}, "truncated is required"),
    ({"images": np.zeros((4, 2, 2, 3), np.float32)}, "images must have dtype uint8"),
    ({"images": np.zeros((4, 2, 2), np.uint8)}, "images must have 4 dimensions"),
    ({"plan": np.zeros((4, 3))}, "plan must have 3 dimensions"),
    ({"reward": np.full(4, np.inf)}, "reward must be finite"),
    ({"cost_to_go": np.zeros((4, 1))}, "cost_to_go must have 1 dimensions"),
    ({"desired_goal": np.zeros((4, 2)), "achieved_goal": np.zeros((4, 3))},
     "achieved_goal must have the shape of desired_goal"),
    ({"task": np.zeros(4, np.float32)}, "task must have an integer dtype"),
    ({"extras": {"reward": np.zeros(4)}}, "reserved name 'reward'"),
    ({"extras": {"foo": np.zeros(3)}}, r"extras\['foo'\] must have N=4 rows"),
    ({"episode_info": {"converged": np.ones(3, bool)}},
     r"episode_info\['converged'\] must have E=2 rows"),
    ({"episode_info": {"converged": np.ones(2)}}, r"episode_info\['converged'\] must have dtype"),
    ({"episode_info": {"seed": np.ones(2)}}, r"episode_info\['seed'\] must have an integer"),
    ({"meta": {"bad": object()}}, "meta must be JSON-serializable"),
    ({"action": [[0.0]] * 4}, "action must be a numpy array or torch tensor"),
])
def test_validation_names_the_array(change, match):
    with pytest.raises(ValueError, match=match):
        TrajectorySet(**{**BASE, **change})


def test_torch_input_and_integer_widening():
    data = TrajectorySet(**{**BASE, "observation": torch.zeros(4, 2, dtype=torch.float64),
                            "episode": np.array([0, 0, 1, 1], dtype=np.int32)})
    assert data.episode.dtype == np.int64 and isinstance(data.observation, np.ndarray)
    t = data.tensors(torch.float32)
    assert t["observation"].dtype == torch.float32 and t["episode"].dtype == torch.int64
    assert t["terminal"].dtype == torch.bool


@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5), seed=st.integers(0, 99))
@settings(max_examples=15)
def test_cost_to_go_matches_a_loop(lengths, seed):
    rng = np.random.default_rng(seed)
    cost = rng.random(sum(lengths)) * 10
    episode = np.repeat(rng.permutation(50)[:len(lengths)], lengths)
    expected = np.empty_like(cost)
    for i in range(len(cost)):
        j, total = i, 0.0
        while j < len(cost) and episode[j] == episode[i]:
            total, j = total + cost[j], j + 1
        expected[i] = total
    np.testing.assert_allclose(cost_to_go(cost, episode), expected, rtol=1e-12, atol=1e-12)


def test_cost_to_go_rejects_split_episodes_and_with_cost_to_go_fills_it(make_set):
    with pytest.raises(ValueError, match="contiguous"):
        cost_to_go(np.ones(3), np.array([0, 1, 0]))
    data = make_set([2, 3])
    filled = data.with_cost_to_go()
    np.testing.assert_allclose(filled.cost_to_go[[0, 2]], [data.cost[:2].sum(),
                                                           data.cost[2:].sum()])
    with pytest.raises(ValueError, match="needs the cost array"):
        make_set([2], optional=False).with_cost_to_go()


def test_selection_and_stacking(make_set):
    data = make_set([3, 3, 3])  # ids 0, 2, 4
    picked = data.select_episodes([4, 0])
    assert picked.episode_ids().tolist() == [0, 4] and len(picked) == 6
    np.testing.assert_array_equal(picked.episode_info["seed"], [0, 4])
    with pytest.raises(ValueError, match=r"episodes \[7\] are not in the set"):
        data.select_episodes([7])
    sub = data.subset(np.flatnonzero(data.episode == 2))
    assert sub.episode_ids().tolist() == [2] and sub.episode_info["length"].tolist() == [3]
    assert len(data.subset(slice(0, 4))) == 4 and data.subset(slice(0, 4)).meta == data.meta
    with pytest.raises(ValueError, match="mask must have shape"):
        data.subset(np.ones(3, bool))
    obs = data.stack_episodes("observation")
    assert obs.shape == (3, 3, 3)
    np.testing.assert_array_equal(obs[1], data.observation[3:6])
    assert data.stack_episodes("images").shape == (3, 3, 4, 5, 3)
    with pytest.raises(ValueError, match="equal length, got lengths from 2 to 3"):
        make_set([3, 2]).stack_episodes("action")
    with pytest.raises(ValueError, match="key must be one of"):
        data.stack_episodes("states")


def test_normalization_stats(make_set):
    data = make_set([50, 50])
    stats = data.normalization_stats(["observation", "action"])
    np.testing.assert_allclose(stats["observation"]["mean"], data.observation.mean(0))
    np.testing.assert_allclose(stats["action"]["std"], data.action.std(0), rtol=1e-6)
    json.dumps(stats)
    with pytest.raises(ValueError, match="'terminal' is not a floating array"):
        data.normalization_stats(["terminal"])


def test_shards_concatenate_with_global_ids(make_set, tmp_path):
    a = make_set([2, 3], first_id=0, seed=1, episodes_requested=3, episodes_failed=1,
                 failed_episodes=[4], normalization={"observation": {}})
    b = make_set([4], first_id=1, seed=2, episodes_requested=2, episodes_failed=1,
                 failed_episodes=[3])
    save_trajectories(tmp_path / "shard_000.npz", a)
    save_trajectories(tmp_path / "shard_001.npz", b)
    whole = load_trajectories(tmp_path, progress=True)
    assert whole.episode_ids().tolist() == [0, 1, 2] and len(whole) == 9
    # episode 1 (from the second shard) sits between the first shard's episodes 0 and 2
    np.testing.assert_array_equal(whole.observation[2:6], b.observation)
    np.testing.assert_array_equal(whole.episode_info["length"], [2, 4, 3])
    assert whole.meta["files"] == ["shard_000.npz", "shard_001.npz"]
    assert whole.meta["episodes_requested"] == 5 and whole.meta["episodes_failed"] == 2
    assert whole.meta["failed_episodes"] == [4, 3]
    assert whole.meta["normalization"] == whole.normalization_stats(["observation"])
    # a repeated id names both files
    save_trajectories(tmp_path / "shard_002.npz", make_set([1], first_id=2, seed=3))
    with pytest.raises(ValueError, match=r"episode id 2 is in both .*shard_000\.npz and "
                                         r".*shard_002\.npz"):
        load_trajectories(tmp_path)


@given(lengths=st.lists(st.integers(1, 4), min_size=2, max_size=6), data=st.data())
@settings(max_examples=10)
def test_any_split_into_shards_loads_back_whole(tmp_path_factory, make_set, assert_same,
                                                lengths, data):
    """Episodes dealt to shards in any way (ids interleaved across files) load back as the
    original set."""
    whole = make_set(lengths)
    owner = data.draw(st.lists(st.integers(0, 2), min_size=len(lengths),
                               max_size=len(lengths)))
    folder = tmp_path_factory.mktemp("shards")
    ids = whole.episode_ids()
    for k in sorted(set(owner)):
        mine = [i for i, o in zip(ids, owner, strict=True) if o == k]
        save_trajectories(folder / f"shard_{k}.npz", whole.select_episodes(mine))
    assert_same(whole, load_trajectories(folder))


def test_merge_checks_and_renumbers(make_set):
    a, b = make_set([2, 2]), make_set([3], seed=1)
    with pytest.raises(ValueError, match="episode id 0 is in both set 0 and set 1"):
        merge_trajectories([a, b])
    merged = merge_trajectories([a, b], renumber=True)
    assert merged.episode_ids().tolist() == [0, 1, 2] and len(merged) == 7
    np.testing.assert_array_equal(merged.observation[4:], b.observation)
    b_other = make_set([3], seed=1, first_id=10, task="other")
    with pytest.raises(ValueError, match="set 1: meta 'task' is 'other' but set 0's is 'toy'"):
        merge_trajectories([a, b_other])
    with pytest.raises(ValueError, match="set 1: array 'observation' has trailing shape"):
        merge_trajectories([a, make_set([3], o=5, first_id=10)])
    with pytest.raises(ValueError, match="set 1: arrays .* differ"):
        merge_trajectories([a, make_set([3], optional=False, first_id=10)])
    with pytest.raises(ValueError, match="set 1: meta 'dt' is 0.1 but set 0's is 0.05"):
        merge_trajectories([a, make_set([3], first_id=10, dt=0.1)])
    # a set that does not record dt or task (e.g. labels collected online) merges
    loose = make_set([3], first_id=10, dt=None, task=None)
    assert merge_trajectories([a, loose]).meta["dt"] == 0.05


def test_files_not_in_the_format_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_trajectories(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", observation=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"other\.npz: not a trajectory set: array 'action' is "
                                         r"missing"):
        load_trajectories(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz: not a readable \.npz"):
        load_trajectories(tmp_path / "junk.npz")
    bad = {k: v for k, v in BASE.items()}
    bad["terminal"] = np.zeros(4, np.int8)
    np.savez(tmp_path / "bad.npz", meta=np.asarray("{}"), **bad)
    with pytest.raises(ValueError, match=r"bad\.npz: terminal must have dtype bool"):
        load_trajectories(tmp_path / "bad.npz")
    np.savez(tmp_path / "meta.npz", meta=np.asarray("[1]"), **BASE)
    with pytest.raises(ValueError, match=r"meta\.npz: array 'meta' must be a JSON object"):
        load_trajectories(tmp_path / "meta.npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .npz files"):
        load_trajectories(empty)
    with pytest.raises(ValueError, match="data must be a TrajectorySet"):
        save_trajectories(tmp_path / "x.npz", BASE)


def test_failed_write_leaves_no_temporary_file(make_set, tmp_path, monkeypatch):
    data = make_set([2])
    path = save_trajectories(tmp_path / "set.npz", data)
    before = path.read_bytes()

    def broken(fh, **arrays):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        save_trajectories(path, make_set([3], seed=1))
    assert os.listdir(tmp_path) == ["set.npz"] and path.read_bytes() == before


def test_legacy_whole_trajectories_load(tmp_path):
    rng = np.random.default_rng(0)
    N, T, n, m = 3, 4, 2, 1
    states, actions = rng.normal(size=(N, T + 1, n)), rng.normal(size=(N, T, m))
    np.savez(tmp_path / "old.npz", states=states, actions=actions, dt=np.asarray(0.05),
             meta=np.asarray(json.dumps({"system": "pendulum"})), goals=np.ones((N, n)),
             costs=rng.random(N), cost_to_go=rng.random((N, T + 1)),
             episode_ids=np.array([7, 3, 5]), contact=rng.random((N, T)))
    data = load_trajectories(tmp_path / "old.npz")
    assert len(data) == N * T and data.episode_ids().tolist() == [3, 5, 7]
    assert data.meta == {"system": "pendulum", "dt": 0.05} and data.dt == 0.05
    np.testing.assert_array_equal(data.stack_episodes("observation")[2], states[0, :-1])
    np.testing.assert_array_equal(data.stack_episodes("next_observation")[0], states[1, 1:])
    np.testing.assert_array_equal(data.stack_episodes("action")[1], actions[2])
    np.testing.assert_array_equal(data.timestep[:T], np.arange(T))
    assert not data.terminal.any() and data.truncated.tolist() == [False, False, False, True] * N
    assert data.desired_goal.shape == (N * T, n) and data.extras["contact"].shape == (N * T,)
    with np.load(tmp_path / "old.npz") as npz:
        costs = npz["costs"]
    np.testing.assert_array_equal(data.episode_info["total_cost"], costs[[1, 2, 0]])


def test_a_folder_of_legacy_shards_is_renumbered(tmp_path):
    """The first loader offset each file's ids past the previous file's: legacy shards all
    starting at id 0 still load as one set."""
    rng = np.random.default_rng(0)
    for k, N in enumerate((2, 3)):
        np.savez(tmp_path / f"part{k}.npz", states=rng.normal(size=(N, 3, 2)),
                 actions=rng.normal(size=(N, 2, 1)), dt=np.asarray(0.1), meta=np.asarray("{}"),
                 episode_ids=np.arange(N))
    data = load_trajectories(tmp_path)
    assert data.episode_ids().tolist() == [0, 1, 2, 3, 4] and len(data) == 10
    with np.load(tmp_path / "part1.npz") as npz:
        np.testing.assert_array_equal(data.select_episodes([2]).observation, npz["states"][0, :2])


def test_legacy_transitions_load(tmp_path):
    states = np.arange(10, dtype=float).reshape(5, 2)
    np.savez(tmp_path / "old.npz", states=states, actions=np.ones((5, 1)), dt=np.asarray(0.1),
             meta=np.asarray("{}"), episode_ids=np.array([0, 0, 0, 4, 4]),
             costs=np.arange(5.0))
    data = load_trajectories(tmp_path / "old.npz")
    # each episode's last row has no successor: 2 + 1 transitions remain
    assert data.episode.tolist() == [0, 0, 4] and data.timestep.tolist() == [0, 1, 0]
    np.testing.assert_array_equal(data.next_observation, states[[1, 2, 4]])
    assert data.truncated.tolist() == [False, True, True] and data.cost.tolist() == [0, 1, 3]
    np.savez(tmp_path / "split.npz", states=states, actions=np.ones((5, 1)),
             episode_ids=np.array([0, 1, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"split\.npz: array 'episode_ids': the rows of each"):
        load_trajectories(tmp_path / "split.npz")
    np.savez(tmp_path / "bad.npz", states=np.zeros((2, 3, 2)), actions=np.zeros((2, 3, 1)))
    with pytest.raises(ValueError, match=r"bad\.npz: array 'actions' must have shape"):
        load_trajectories(tmp_path / "bad.npz")

