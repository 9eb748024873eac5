"""The episode replay buffer: whole episodes, future goals of the same episode, ring reuse,
checkpoints (diffto.learning.episode_buffer)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffto.learning.episode_buffer import EpisodeReplayBuffer


def _fill(buf: EpisodeReplayBuffer, lengths: list[list[int]], terminate: bool = False) -> None:
    """Each env plays the given episode lengths; every stored value encodes (episode, t)."""
    E = buf.num_envs
    queues = [list(ls) for ls in lengths]
    ep_of_env = np.zeros(E, int)
    counter = 0

    def state(ep, t):
        return {"observation": np.array([[ep, t]], float), "goal": np.array([[ep * 1000 + t]])}

    def begin(envs):
        nonlocal counter
        for e in envs:
            ep_of_env[e] = counter
            counter += 1
            buf.begin(state(ep_of_env[e], 0), {"desired_goal": np.array([[ep_of_env[e]]])},
                      np.array([e]))

    begin(range(E))
    t = np.zeros(E, int)
    remaining = [q.pop(0) for q in queues]
    while any(r > 0 for r in remaining):
        active = np.array([r > 0 for r in remaining])
        t += 1
        nxt = {"observation": np.stack([[ep_of_env[e], t[e]] for e in range(E)]).astype(float),
               "goal": np.array([[ep_of_env[e] * 1000 + t[e]] for e in range(E)], float)}
        done = np.array([remaining[e] == t[e] for e in range(E)]) & active
        if not active.all():  # an env that has finished its list idles on a fresh episode
            raise AssertionError("give every env the same total number of steps")
        buf.step(np.repeat(t[:, None], 2, 1).astype(float), nxt,
                 done & terminate, done & (not terminate))
        for e in np.flatnonzero(done):
            remaining[e] = queues[e].pop(0) if queues[e] else 0
            t[e] = 0
            if remaining[e]:
                begin([e])


def _buffer(capacity=1000, T=10, E=2, seed=0):
    return EpisodeReplayBuffer(capacity, T, E, {"observation": 2, "goal": 1}, 2,
                               {"desired_goal": 1}, seed=seed)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=2, max_size=6), st.floats(0.5, 0.999),
       st.sampled_from(["geometric", "uniform"]), st.integers(0, 2**16))
def test_future_goals_come_from_the_same_episode(lengths, gamma, offset, seed):
    a, b = lengths, lengths[::-1]  # equal totals per env, episodes ending at other times
    buf = _buffer(seed=seed)
    _fill(buf, [a, b])
    assert len(buf) == sum(a) + sum(b)
    s = buf.sample(512, gamma, offset)
    ep, t = s["observation"][:, 0], s["observation"][:, 1]
    assert (t == s["timestep"]).all()
    # next and future states belong to the same episode, strictly later, within its length
    assert (s["next_observation"][:, 0] == ep).all()
    assert (s["next_observation"][:, 1] == t + 1).all()
    assert (s["future_observation"][:, 0] == ep).all()
    assert (s["future_goal"][:, 0] == ep * 1000 + t + s["offset"]).all()
    assert (s["offset"] >= 1).all()
    assert (s["desired_goal"][:, 0] == ep).all()
    assert (s["action"][:, 0] == t + 1).all()  # the action written with state t+1


def test_geometric_offsets_follow_the_truncated_geometric_law():
    buf = _buffer(capacity=20_000, T=200, E=1)
    _fill(buf, [[200] * 20])
    gamma = 0.9
    s = buf.sample(100_000, gamma, "geometric")
    # rows far from the episode end: P(Δ = k) = (1 − γ) γ^(k−1) up to truncation
    far = s["timestep"] < 100
    counts = np.bincount(s["offset"][far], minlength=6)[1:6] / far.sum()
    expected = (1 - gamma) * gamma ** np.arange(5)
    np.testing.assert_allclose(counts, expected, atol=0.006)
    # the last row of an episode can only look one step ahead
    assert (s["offset"][s["timestep"] == 199] == 1).all()


def test_slots_are_reused_oldest_first_and_open_episodes_are_not_sampled():
    buf = _buffer(capacity=30, T=10, E=1)  # 3 slots
    _fill(buf, [[10, 10, 10, 10, 5]])
    ids = set(buf.sample(2000)["episode_id"].tolist())
    assert ids == {2, 3, 4}  # episodes 0 and 1 were overwritten; 4 is the 5-step one
    assert buf.episodes_stored == 3 and len(buf) == 25


def test_terminal_flag_only_on_the_last_transition_of_terminated_episodes():
    buf = _buffer()
    _fill(buf, [[3, 4], [4, 3]], terminate=True)
    s = buf.sample(1000)
    lengths = {0: 3, 1: 4, 2: 4, 3: 3}
    L = np.array([lengths[int(e)] for e in s["observation"][:, 0]])
    assert (s["terminal"] == (s["timestep"] + 1 == L)).all()


def test_state_dict_round_trip_keeps_sampling_and_ids(tmp_path):
    import torch

    buf = _buffer(seed=3)
    _fill(buf, [[4, 6], [5, 5]])
    torch.save(buf.state_dict(), tmp_path / "buffer.pt")  # as a checkpoint stores it
    state = torch.load(tmp_path / "buffer.pt", weights_only=True)
    other = _buffer(seed=99)
    other.load_state_dict(state)
    assert len(other) == len(buf) and other.episodes_stored == buf.episodes_stored
    a, b = buf.sample(64), other.sample(64)
    for k in ("observation", "future_goal", "offset", "episode_id"):
        np.testing.assert_array_equal(a[k], b[k])
    # new episodes get fresh ids
    other.begin({"observation": np.zeros((2, 2)), "goal": np.zeros((2, 1))},
                {"desired_goal": np.zeros((2, 1))})
    assert set(other.episode_id[other.episode_id >= 0]) == {0, 1, 2, 3, 4, 5}


def test_bad_arguments_and_misuse_give_clear_errors():
    with pytest.raises(ValueError, match=r"capacity \(buffer_capacity\) must hold at least"):
        _buffer(capacity=20, T=10, E=2)
    with pytest.raises(ValueError, match="num_envs"):
        EpisodeReplayBuffer(100, 10, 0, {"observation": 2}, 2)
    buf = _buffer()
    with pytest.raises(RuntimeError, match="no finished episode"):
        buf.sample(4)
    with pytest.raises(RuntimeError, match="call begin"):
        buf.step(np.zeros((2, 2)), {"observation": np.zeros((2, 2)), "goal": np.zeros((2, 1))},
                 np.zeros(2, bool), np.zeros(2, bool))
    with pytest.raises(ValueError, match=r"states\['goal'\] must have shape"):
        buf.begin({"observation": np.zeros((2, 2)), "goal": np.zeros((2, 3))},
                  {"desired_goal": np.zeros((2, 1))})
    _fill(buf, [[2], [2]])
    with pytest.raises(ValueError, match="offset must be"):
        buf.sample(4, offset="final")
    assert buf.nbytes == 4 * (3 + 2) * 11 * buf.num_slots + 4 * 1 * buf.num_slots


def test_new_episodes_skip_slots_other_envs_still_write():
    """Env 1's episodes end every step while env 0's stays open: the ring must not hand env
    0's slot to env 1."""
    buf = EpisodeReplayBuffer(30, 10, 2, {"observation": 2, "goal": 1}, 2, seed=0)  # 3 slots
    zeros = {"observation": np.zeros((2, 2)), "goal": np.zeros((2, 1))}
    buf.begin(zeros)
    for _ in range(6):
        buf.step(np.zeros((2, 2)), zeros, np.array([False, True]), np.zeros(2, bool))
        buf.begin({k: v[1:] for k, v in zeros.items()}, envs=np.array([1]))
        assert buf._open[0] != buf._open[1]
    assert buf._open[0] == 0 and buf._t[0] == 6


def _add_dataset_episodes(buf: EpisodeReplayBuffer, lengths: list[int]) -> None:
    """Dataset episodes whose states encode (-1 - episode, t)."""
    for i, L in enumerate(lengths):
        t = np.arange(L + 1, dtype=float)
        buf.add_episode({"observation": np.stack([np.full(L + 1, -1.0 - i), t], 1),
                         "goal": t[:, None]}, np.zeros((L, 2)), {"desired_goal": np.ones(1)})


@settings(max_examples=20, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_dataset_fraction_fixes_the_datasets_share_of_a_batch(fraction, seed):
    buf = _buffer(seed=seed)
    _add_dataset_episodes(buf, [3, 7])
    only_dataset = buf.sample(32, dataset_fraction=fraction)  # no online episode yet
    assert only_dataset["from_dataset"].all()
    _fill(buf, [[4, 6, 10], [5, 5, 10]])
    s = buf.sample(200, dataset_fraction=fraction)
    from_dataset = s["observation"][:, 0] < 0
    np.testing.assert_array_equal(s["from_dataset"], from_dataset)
    assert from_dataset.sum() == round(200 * fraction)
    # the future goal stays in the transition's own episode on both sides
    assert (s["future_observation"][:, 0] == s["observation"][:, 0]).all()
    uniform = buf.sample(4000)  # without it: the dataset's share of the transitions, 10 / 50
    assert abs(uniform["from_dataset"].mean() - 0.2) < 0.03


def test_dataset_flags_survive_checkpoints_and_slot_reuse(tmp_path):
    import torch

    buf = _buffer(capacity=60, T=10, seed=0)  # 6 slots
    _add_dataset_episodes(buf, [3, 4])
    _fill(buf, [[2], [2]])
    torch.save(buf.state_dict(), tmp_path / "buffer.pt")
    other = _buffer(capacity=60, T=10, seed=0)
    other.load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=True))
    np.testing.assert_array_equal(other.from_dataset[:4], [True, True, False, False])
    _fill(other, [[1, 1], [1, 1]])  # four more online episodes: the dataset's slots go first
    assert not other.from_dataset.any()
    old_state = buf.state_dict()
    del old_state["from_dataset"]  # a checkpoint from before the flag: every episode online
    older = _buffer(capacity=60, T=10, seed=0)
    older.load_state_dict(old_state)
    assert older.episodes_stored == 4 and not older.from_dataset.any()
    with pytest.raises(ValueError, match="dataset_fraction"):
        other.sample(4, dataset_fraction=1.5)
