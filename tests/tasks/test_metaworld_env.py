"""MetaworldGoalEnv: registry, spaces, seeding, success table vs Metaworld, goal API, vector env."""

from __future__ import annotations

import numpy as np
import pytest

from diffto.tasks.metaworld import (
    METAWORLD_TASKS,
    MT10,
    SUCCESS_TABLE,
    MetaworldGoalEnv,
    ScriptedExpert,
    goal_success,
    is_goal_function,
    make_metaworld_vector_env,
)
from diffto.tasks.registry import make_env
from diffto.tasks.rendering import RenderingUnavailableError

# Metaworld's scripted policies warn about their own gains at construction.
pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")

_EXTRA = ("hammer-v3", "push-wall-v3", "faucet-close-v3", "push-back-v3", "stick-pull-v3",
          "handle-press-side-v3", "shelf-place-v3", "peg-unplug-side-v3")


def _expert_episode(env, expert, seed, after_success=15, limit=220):
    """Steps of one scripted-expert episode, cut ``after_success`` steps after the first
    success: a list of (obs, reward, terminated, truncated, info)."""
    obs, _ = env.reset(seed=seed)
    steps, first = [], None
    for k in range(limit):
        step = env.step(expert.act(obs["observation"]))
        steps.append(step)
        obs, info = step[0], step[4]
        if first is None and info["success"]:
            first = k
        if first is not None and k >= first + after_success:
            break
    return steps


def test_registry_and_spaces():
    env = make_env("diffto/Metaworld-v0", {"task": "push-v3"})
    assert env.unwrapped.task_name == "push-v3"
    assert env.unwrapped.task_id == METAWORLD_TASKS.index("push-v3")
    assert env.unwrapped.dt == pytest.approx(0.0125)
    assert env.action_space.shape == (4,) and env.action_space.dtype == np.float32
    np.testing.assert_array_equal(env.action_space.low, -1.0)
    goal_box = env.observation_space["desired_goal"]
    assert np.all(np.isfinite(goal_box.low)) and np.all(goal_box.high > goal_box.low)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["observation"].shape == (39,) and obs["observation"].dtype == np.float64
    np.testing.assert_array_equal(obs["observation"][36:39], obs["desired_goal"])
    np.testing.assert_array_equal(obs["achieved_goal"], obs["observation"][4:7])
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
    assert info["is_success"] == float(info["success"]) and info["metaworld_reward"] == reward
    assert len(METAWORLD_TASKS) == 50 and set(MT10) <= set(METAWORLD_TASKS)
    assert set(_EXTRA) <= set(SUCCESS_TABLE)


def test_seeding_is_reproducible_and_ignores_global_state():
    env = MetaworldGoalEnv("push-v3")
    np.random.seed(1)
    first, _ = env.reset(seed=7)
    np.random.seed(2)
    again, _ = env.reset(seed=7)
    np.testing.assert_array_equal(first["observation"], again["observation"])
    other, _ = env.reset(seed=8)
    assert not np.allclose(other["desired_goal"], first["desired_goal"])
    # seed=None continues the stream: the same sequence after the same seed
    env.reset(seed=3)
    after_3 = [env.reset()[0]["desired_goal"] for _ in range(2)]
    env.reset(seed=3)
    np.testing.assert_array_equal(after_3, [env.reset()[0]["desired_goal"] for _ in range(2)])
    assert not np.allclose(after_3[0], after_3[1])
    # a second env with the same seed draws the same variant
    np.testing.assert_array_equal(MetaworldGoalEnv("push-v3").reset(seed=7)[0]["observation"],
                                  first["observation"])


def test_environments_of_one_task_share_no_state():
    """Scenes are compiled once per task and copied: two environments stay independent."""
    a = make_env("diffto/Metaworld-v0", {"task": "push-v3"})
    b = make_env("diffto/Metaworld-v0", {"task": "push-v3"})
    try:
        assert a.unwrapped.sawyer.model is not b.unwrapped.sawyer.model
        goal_a = a.reset(seed=1)[0]["desired_goal"].copy()
        site_a = a.unwrapped.sawyer.model.site("goal").pos.copy()
        goal_b = b.reset(seed=2)[0]["desired_goal"]
        assert not np.allclose(goal_a, goal_b)
        np.testing.assert_array_equal(a.unwrapped.sawyer.model.site("goal").pos, site_a)
        for _ in range(3):
            b.step(np.ones(4, np.float32))
        np.testing.assert_array_equal(a.step(np.zeros(4, np.float32))[0]["desired_goal"],
                                      goal_a)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("task", MT10)
def test_success_table_agrees_with_metaworld_along_expert_episodes(task):
    env = MetaworldGoalEnv(task, reward_type="sparse")
    expert = ScriptedExpert(task)
    n, successes = 0, 0
    for seed in range(2):
        for obs, reward, _, _, info in _expert_episode(env, expert, seed):
            n += 1
            successes += int(info["success"])
            assert info["is_success"] == float(info["success"]), (task, seed, info["distance"])
            assert reward == info["is_success"] - 1.0
            if is_goal_function(task):
                success, distance = goal_success(task, obs["achieved_goal"], obs["desired_goal"])
                assert bool(success) == bool(info["success"])
                assert float(distance) == pytest.approx(info["distance"])
                relabelled = env.compute_reward(obs["achieved_goal"], obs["desired_goal"], info)
                assert float(relabelled) == reward
    assert successes > 0, f"the expert never succeeded on {task}: the check saw no success"


@pytest.mark.parametrize("task", ["hammer-v3", "stick-pull-v3", "handle-press-side-v3"])
def test_success_table_extra_tasks(task):
    env = MetaworldGoalEnv(task)
    expert = ScriptedExpert(task)
    steps = _expert_episode(env, expert, seed=1, after_success=10, limit=200)
    assert any(s[4]["success"] for s in steps)
    assert all(s[4]["is_success"] == float(s[4]["success"]) for s in steps)


def test_compute_reward_batched_and_dense_refuses_relabelled_goals():
    env = MetaworldGoalEnv("push-v3", reward_type="sparse")
    obs, _ = env.reset(seed=0)
    obs, reward, *_, info = env.step(np.zeros(4, dtype=np.float32))
    achieved = np.stack([obs["achieved_goal"]] * 3)
    desired = achieved + np.array([[0.0, 0.0, 0.0], [0.04, 0.0, 0.0], [0.0, 0.06, 0.0]])
    np.testing.assert_array_equal(env.compute_reward(achieved, desired, info), [0.0, 0.0, -1.0])
    np.testing.assert_array_equal(env.compute_truncated(achieved, desired, info), False)

    dense = MetaworldGoalEnv("push-v3", reward_type="dense")
    obs, _ = dense.reset(seed=0)
    obs, reward, *_, info = dense.step(np.zeros(4, dtype=np.float32))
    assert dense.compute_reward(obs["achieved_goal"], obs["desired_goal"], info) == reward
    with pytest.raises(ValueError, match="reward_type='sparse'"):
        dense.compute_reward(obs["achieved_goal"], obs["desired_goal"] + 0.1, info)

    hammer = MetaworldGoalEnv("hammer-v3", reward_type="sparse")
    obs, _ = hammer.reset(seed=0)
    obs, reward, *_, info = hammer.step(np.zeros(4, dtype=np.float32))
    assert hammer.compute_reward(obs["achieved_goal"], obs["desired_goal"], info) == reward
    with pytest.raises(ValueError, match="hammer-v3"):
        hammer.compute_reward(obs["achieved_goal"], obs["desired_goal"] + 0.1, info)
    with pytest.raises(ValueError, match="hammer-v3"):
        goal_success("hammer-v3", obs["achieved_goal"], obs["desired_goal"])


def test_terminate_on_success_and_truncation():
    env = MetaworldGoalEnv("reach-v3", terminate_on_success=True)
    expert = ScriptedExpert("reach-v3")
    obs, _ = env.reset(seed=0)
    for _ in range(200):
        obs, _, terminated, truncated, info = env.step(expert.act(obs["observation"]))
        assert terminated == bool(info["success"]) and not truncated
        if terminated:
            break
    assert terminated, "the reach expert did not succeed in 200 steps"
    assert env.compute_terminated(obs["achieved_goal"], obs["desired_goal"], info)
    with pytest.raises(ValueError, match="reset"):
        env.step(np.zeros(4, dtype=np.float32))

    short = MetaworldGoalEnv("reach-v3", max_episode_steps=7)
    short.reset(seed=0)
    ends = [short.step(np.zeros(4, dtype=np.float32))[3] for _ in range(7)]
    assert ends == [False] * 6 + [True]
    info = {"elapsed_steps": 7}
    assert short.compute_truncated(np.zeros(3), np.zeros(3), info)


def test_mt10_vector_env_runs_each_task_at_its_index():
    venv = make_metaworld_vector_env("MT10")
    try:
        assert venv.num_envs == 10 and venv.task_names == MT10
        assert tuple(venv.get_attr("task_name")) == MT10
        assert venv.task_ids == tuple(METAWORLD_TASKS.index(t) for t in MT10)
        obs, _ = venv.reset(seed=0)
        assert obs["observation"].shape == (10, 39) and obs["desired_goal"].shape == (10, 3)
        for _ in range(3):
            obs, reward, terminated, truncated, info = venv.step(venv.action_space.sample())
            assert venv.observation_space.contains(obs) and reward.shape == (10,)
        # reach's achieved goal is the TCP centre, the others read the observation
        np.testing.assert_array_equal(obs["achieved_goal"][1], obs["observation"][1, 4:7])
        assert not np.allclose(obs["achieved_goal"][0], obs["observation"][0, 4:7])
    finally:
        venv.close()
    two = make_metaworld_vector_env(["reach-v3", "push-v3"], envs_per_task=2)
    assert two.task_names == ("reach-v3", "reach-v3", "push-v3", "push-v3")
    two.close()


def test_render_shape_and_no_gl_without_render_mode():
    MetaworldGoalEnv("reach-v3", render_mode=None).reset(seed=0)
    env = MetaworldGoalEnv("reach-v3", render_mode="rgb_array", width=96, height=84)
    env.reset(seed=0)
    try:
        image = env.render()
    except RenderingUnavailableError as err:  # no offscreen GL on this machine
        pytest.skip(f"offscreen OpenGL is unavailable on this machine: {err}")
    assert image.shape == (84, 96, 3) and image.dtype == np.uint8 and image.std() > 0
    env.close()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"task": "push-v9"}, "task"),
        ({"width": 64}, "width"),
        ({"height": 32}, "height"),
        ({"reward_type": "dens"}, "reward_type"),
        ({"max_episode_steps": 501}, "max_episode_steps"),
        ({"max_episode_steps": 0}, "max_episode_steps"),
        ({"camera": "nope"}, "camera"),
        ({"render_mode": "human"}, "render_mode"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MetaworldGoalEnv(**kwargs)


def test_vector_and_expert_bad_arguments():
    with pytest.raises(ValueError, match="tasks"):
        make_metaworld_vector_env("MT11")
    with pytest.raises(ValueError, match="envs_per_task"):
        make_metaworld_vector_env(["reach-v3"], envs_per_task=0)
    with pytest.raises(ValueError, match="task"):
        ScriptedExpert("push-v9")
    actions = ScriptedExpert("push-v3").act(np.zeros((2, 39)))
    assert actions.shape == (2, 4) and actions.dtype == np.float32
    assert np.all(np.abs(actions) <= 1.0)
