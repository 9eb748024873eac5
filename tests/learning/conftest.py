"""Helpers shared by the learning tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffto.data.trajectories import TrajectorySet, save_trajectories
from diffto.tasks.registry import make_env


def _random_dataset(env_id: str, path: Path, episodes: int = 2, steps: int = 4) -> Path:
    """Random-action transitions of a goal env in the dataset format (for plumbing tests):
    each row's achieved goal is the one after its action, each episode's reset seed is
    recorded."""
    rows: dict[str, list] = {k: [] for k in ("observation", "desired_goal", "achieved_goal",
                                             "action", "next_observation", "episode",
                                             "timestep", "terminal", "truncated")}
    for e in range(episodes):
        env = make_env(env_id)
        obs, _ = env.reset(seed=e)
        env.action_space.seed(e)
        for t in range(steps):
            a = env.action_space.sample().astype(np.float64)
            nxt, _, term, trunc, _ = env.step(a)
            for k, v in (("observation", obs["observation"]), ("desired_goal",
                         obs["desired_goal"]), ("achieved_goal", nxt["achieved_goal"]),
                         ("action", a), ("next_observation", nxt["observation"]),
                         ("episode", e), ("timestep", t), ("terminal", term),
                         ("truncated", trunc or t == steps - 1)):
                rows[k].append(v)
            obs = nxt
        env.close()
    arrays = {k: np.asarray(v) for k, v in rows.items()}
    arrays["episode"] = arrays["episode"].astype(np.int64)
    arrays["timestep"] = arrays["timestep"].astype(np.int64)
    return save_trajectories(path, TrajectorySet(
        **arrays, episode_info={"seed": np.arange(episodes, dtype=np.int64)},
        meta={"env_id": env_id}))


@pytest.fixture
def random_dataset():
    """:func:`_random_dataset`: ``random_dataset(env_id, path, episodes=2, steps=4) -> path``."""
    return _random_dataset


def _goal_batch(model, n: int = 64) -> dict[str, torch.Tensor]:
    """A random batch in the replay buffer's layout for a goal-conditioned learner ``model``:
    every future goal is the goal reached at the next state, every desired goal far away."""
    g = model.goal_dim
    next_goal = torch.rand(n, g)
    return {"observation": torch.randn(n, model.state_dim),
            "next_observation": torch.randn(n, model.state_dim),
            "action": torch.rand(n, model.action_dim) * 2 - 1,
            "goal": torch.rand(n, g), "next_goal": next_goal,
            "future_goal": next_goal.clone(), "desired_goal": next_goal + 10.0,
            "terminal": torch.zeros(n, dtype=torch.bool)}


@pytest.fixture
def goal_batch():
    """:func:`_goal_batch`: ``goal_batch(model, n=64) -> batch``."""
    return _goal_batch
