"""The closed-loop evaluation harness: its figures are the environment's, on held-out seeds."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from diffto.learning import goal_evaluation as ge
from diffto.learning.goal_evaluation import (
    EVAL_SEED_BASE,
    eval_seeds,
    evaluate_expert,
    evaluate_policy,
    rollout_episodes,
    save_video,
)

LINE = "diffto_test/GoalLine-v0"
SWINGUP = "diffto/PendulumSwingUp-v0"
TINY_EXPERT = {"class_path": "diffto.tasks.classic.SwingUpExpert",
               "init_args": {"horizon": 5, "max_iter": 1}}


class GoalLine(gym.Env):
    """A point on a line that moves by its clipped action towards a goal drawn per seed;
    ``is_success`` within 0.05. Goals at distance up to 1.5 and 8 steps of at most 0.1: some
    seeds can be reached, others not."""

    def __init__(self, max_episode_steps: int = 8) -> None:
        box = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)
        self.observation_space = gym.spaces.Dict(
            {"observation": box, "achieved_goal": box, "desired_goal": box})
        self.action_space = gym.spaces.Box(-0.1, 0.1, (1,), np.float32)
        self.max_episode_steps = max_episode_steps

    def _obs(self):
        return {"observation": self.x.copy(), "achieved_goal": self.x.copy(),
                "desired_goal": self.goal.copy()}

    def _info(self):
        d = float(abs(self.x[0] - self.goal[0]))
        return {"is_success": d <= 0.05, "distance": d, "cost": d**2}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = np.zeros(1)
        self.goal = self.np_random.uniform(-1.5, 1.5, size=1)
        self.t = 0
        return self._obs(), self._info()

    def step(self, action):
        self.x = self.x + np.clip(action, -0.1, 0.1)
        self.t += 1
        info = self._info()
        return self._obs(), -info["distance"], False, self.t >= self.max_episode_steps, info


if LINE not in gym.registry:
    gym.register(LINE, entry_point=GoalLine)


def towards_goal(observation, goal):
    return np.clip(goal - observation, -0.1, 0.1)


def test_success_and_distance_are_the_environments_own():
    seeds = eval_seeds(12)
    assert seeds[0] == EVAL_SEED_BASE
    result, frames = evaluate_policy(towards_goal, LINE, seeds)
    assert frames == []
    # the same episodes stepped one by one, reading info directly
    for j, seed in enumerate(seeds):
        env = GoalLine()
        obs, _ = env.reset(seed=seed)
        ret, cost, first = 0.0, 0.0, None
        for t in range(env.max_episode_steps):
            obs, r, _, _, info = env.step(towards_goal(obs["observation"], obs["desired_goal"]))
            ret, cost = ret + r, cost + info["cost"]
            if info["is_success"] and first is None:
                first = t + 1
        assert result.success[j] == info["is_success"]
        assert result.final_distance[j] == pytest.approx(info["distance"])
        assert result.ep_return[j] == pytest.approx(ret)
        assert result.cost[j] == pytest.approx(cost)
        assert (np.isnan(result.steps_to_success[j]) if first is None
                else result.steps_to_success[j] == first)
    s = result.summary()
    assert 0.0 < s["success"] < 1.0  # both outcomes occur, so agreement means something
    assert s["success"] == pytest.approx(result.success.mean())
    assert s["time_per_action_s"] > 0


def test_max_steps_caps_episodes_and_rows_that_ended_are_left_alone():
    calls = []

    def controller(observation, goal, envs):
        calls.append(len(observation))
        return towards_goal(observation, goal)

    result, _ = rollout_episodes(controller, LINE, [1, 2, 3], {"max_episode_steps": 4},
                                 max_steps=3)
    assert calls == [3, 3, 3] and result.length.tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="episodes"):
        eval_seeds(0)


def test_expert_evaluation_is_cached_on_disk(tmp_path, monkeypatch):
    kwargs = {"max_episode_steps": 4}
    first = evaluate_expert(SWINGUP, eval_seeds(2), kwargs, TINY_EXPERT, cache_dir=tmp_path,
                            timing_steps=2, progress=False)
    assert len(list(tmp_path.glob("expert_*.json"))) == 1
    assert first.summary()["time_per_action_s"] > 0
    assert 0 < first.summary()["iterations_per_step"] <= 1  # max_iter 1

    def no_expert(*args, **kwargs):
        raise AssertionError("the cached evaluation should have been used")

    monkeypatch.setattr(ge, "build_expert", no_expert)
    again = evaluate_expert(SWINGUP, eval_seeds(2), kwargs, TINY_EXPERT, cache_dir=tmp_path,
                            progress=False)
    np.testing.assert_allclose(again.final_distance, first.final_distance)
    assert again.success.tolist() == first.success.tolist()
    # other seeds are another key: the expert runs again
    with pytest.raises(AssertionError, match="cached"):
        evaluate_expert(SWINGUP, eval_seeds(3), kwargs, TINY_EXPERT, cache_dir=tmp_path)


def test_video_where_the_env_renders_and_a_warning_where_it_cannot(tmp_path):
    zero = lambda o, g: np.zeros((len(o), 1))  # noqa: E731
    _, frames = evaluate_policy(zero, SWINGUP, eval_seeds(3), {"max_episode_steps": 3,
                                "width": 32, "height": 32}, video_episodes=2)
    assert len(frames) == 4 and frames[0].shape == (32, 64, 3)  # 3 steps + the last state
    path = save_video(frames, tmp_path / "v.mp4", fps=10)
    assert path.stat().st_size > 0
    with pytest.warns(RuntimeWarning, match="rendering unavailable"):
        _, frames = evaluate_policy(towards_goal, LINE, eval_seeds(2), video_episodes=1)
    assert frames == []


def test_expert_spec_is_checked():
    with pytest.raises(ValueError, match="class_path"):
        ge.expert_spec(SWINGUP, {"init_args": {}})
    assert ge.expert_spec(SWINGUP) == {"default_for": SWINGUP}
