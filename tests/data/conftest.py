"""Random trajectory sets for the format's tests."""

import numpy as np
import pytest

from diffto.data.trajectories import TrajectorySet


def random_set(lengths, o=3, m=2, g=2, seed=0, first_id=0, optional=True,
               **meta) -> TrajectorySet:
    """Episodes of the given lengths with every optional array (ids first_id, first_id+2...)."""
    rng = np.random.default_rng(seed)
    N, E = int(sum(lengths)), len(lengths)
    ids = first_id + 2 * np.arange(E, dtype=np.int64)
    kw = dict(
        observation=rng.normal(size=(N, o)), action=rng.normal(size=(N, m)).astype(np.float32),
        next_observation=rng.normal(size=(N, o)), episode=np.repeat(ids, lengths),
        timestep=np.concatenate([np.arange(k) for k in lengths]).astype(np.int64),
        terminal=rng.random(N) < 0.2, truncated=rng.random(N) < 0.2,
    )
    if optional:
        kw.update(
            desired_goal=rng.normal(size=(N, g)), achieved_goal=rng.normal(size=(N, g)),
            reward=rng.normal(size=N), cost=rng.random(N), cost_to_go=rng.random(N),
            task=rng.integers(0, 3, size=N), images=rng.integers(0, 256, (N, 4, 5, 3), np.uint8),
            plan=rng.normal(size=(N, 4, m)), extras={"contact": rng.random((N, 4)) < 0.5},
        )
    info = {"converged": rng.random(E) < 0.8, "iterations": rng.random(E) * 10,
            "length": np.asarray(lengths, dtype=np.int64), "seed": ids.copy(),
            "solve_time": rng.random((E, 2))}
    return TrajectorySet(**kw, episode_info=info, meta={"task": "toy", "dt": 0.05, **meta})


def assert_same(a: TrajectorySet, b: TrajectorySet) -> None:
    assert set(a.arrays()) == set(b.arrays()) and set(a.episode_info) == set(b.episode_info)
    for k, v in a.arrays().items():
        assert b.arrays()[k].dtype == v.dtype, k
        np.testing.assert_array_equal(b.arrays()[k], v, err_msg=k)
    for k, v in a.episode_info.items():
        assert b.episode_info[k].dtype == v.dtype, k
        np.testing.assert_array_equal(b.episode_info[k], v, err_msg=k)


@pytest.fixture(scope="session")
def make_set():
    """:func:`random_set`: episodes of given lengths with every optional array."""
    return random_set


@pytest.fixture(scope="session", name="assert_same")
def assert_same_fixture():
    """:func:`assert_same`: two sets hold the same arrays, dtypes and values."""
    return assert_same
