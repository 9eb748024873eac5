"""PandaReachEnv: goal-env API, seeding, gravity compensation, episode ends, model mismatch."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffto.tasks.panda import model as panda
from diffto.tasks.panda.reach_env import PandaReachEnv, RenderingUnavailableError


@pytest.fixture
def env():
    e = PandaReachEnv()
    yield e
    e.close()


def _roll(env, actions):
    return [env.step(a) for a in actions]


def test_spaces_and_observation(env):
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["observation"].shape == (14,) and obs["observation"].dtype == np.float64
    assert obs["achieved_goal"].shape == obs["desired_goal"].shape == (3,)
    assert env.action_space.shape == (7,)
    np.testing.assert_array_equal(env.action_space.low, -1.0)
    np.testing.assert_array_equal(obs["observation"][:7], env.data.qpos)
    np.testing.assert_array_equal(obs["observation"][7:], 0.0)  # initial state at rest
    np.testing.assert_array_equal(env.state, obs["observation"])
    np.testing.assert_allclose(
        obs["achieved_goal"], env.data.site(panda.FLANGE_SITE).xpos, atol=0.0
    )
    assert info["distance"] == pytest.approx(
        np.linalg.norm(obs["achieved_goal"] - obs["desired_goal"])
    )
    assert env.control_dt == pytest.approx(0.02)
    assert env.metadata["render_fps"] == 50


def test_goals_are_reachable_and_states_inside_limits(env):
    for seed in range(20):
        obs, info = env.reset(seed=seed)
        q0, qg = obs["observation"][:7], info["goal_qpos"]
        for q in (q0, qg):
            assert (q >= panda.JOINT_LOWER).all() and (q <= panda.JOINT_UPPER).all()
        assert np.abs(q0 - panda.HOME).max() <= env.init_joint_range + 1e-12
        # The goal is the flange of goal_qpos: reachable by construction.
        data = mujoco.MjData(env.model)
        data.qpos[:] = qg
        mujoco.mj_kinematics(env.model, data)
        np.testing.assert_allclose(data.site(panda.FLANGE_SITE).xpos, obs["desired_goal"])
        assert obs["desired_goal"][2] >= env.min_goal_height
        assert info["distance"] >= env.min_goal_distance


@pytest.mark.parametrize("reward_type", ["sparse", "dense"])
def test_compute_reward_is_vectorized_and_agrees_with_step(reward_type):
    env = PandaReachEnv(reward_type=reward_type)
    env.reset(seed=1)
    rng = np.random.default_rng(0)
    achieved, desired, rewards, infos = [], [], [], []
    for _ in range(15):
        obs, r, _, _, info = env.step(rng.uniform(-0.3, 0.3, 7))
        achieved.append(obs["achieved_goal"])
        desired.append(obs["desired_goal"])
        rewards.append(r)
        infos.append(info)
    batch = env.compute_reward(np.array(achieved), np.array(desired), infos)
    assert batch.shape == (15,)
    np.testing.assert_array_equal(batch, rewards)
    # Hindsight relabelling: any goal batch shape (..., 3).
    a, d = rng.normal(size=(4, 5, 3)), rng.normal(size=(4, 5, 3))
    dist = np.linalg.norm(a - d, axis=-1)
    r = env.compute_reward(a, d, None)
    assert r.shape == (4, 5)
    if reward_type == "dense":
        np.testing.assert_allclose(r, -dist)
    else:
        np.testing.assert_array_equal(r, np.where(dist <= 0.02, 0.0, -1.0))
    with pytest.raises(ValueError, match="shape"):
        env.compute_reward(a[..., :2], d[..., :2], None)


@given(offset=st.floats(0.0, 0.05), direction=st.sampled_from(range(3)))
def test_sparse_reward_and_success_threshold(offset, direction):
    env = PandaReachEnv()
    achieved = np.zeros(3)
    desired = np.zeros(3)
    desired[direction] = offset
    r = env.compute_reward(achieved, desired, None)
    assert r == (0.0 if offset <= 0.02 else -1.0)


def test_success_when_the_flange_is_at_the_goal(env):
    obs, _ = env.reset(seed=2)
    env.goal = obs["achieved_goal"] + np.array([0.0, 0.0, 0.01])  # 1 cm: inside 2 cm
    obs, r, terminated, truncated, info = env.step(np.zeros(7))
    assert info["is_success"] and r == 0.0 and not terminated and not truncated
    ends = PandaReachEnv(terminate_on_success=True)
    obs, _ = ends.reset(seed=2)
    ends.goal = obs["achieved_goal"].copy()
    assert ends.step(np.zeros(7))[2]
    assert ends.compute_terminated(np.zeros((3, 3)), np.eye(3) * [0.0, 0.01, 1.0]).tolist() == [
        True,
        True,
        False,
    ]


def test_seeded_reset_is_reproducible():
    a, b = PandaReachEnv(frictionloss=(0.0, 0.5)), PandaReachEnv(frictionloss=(0.0, 0.5))
    actions = np.random.default_rng(3).uniform(-1, 1, (10, 7))
    for seed in (0, 7):
        oa, ia = a.reset(seed=seed)
        ob, ib = b.reset(seed=seed)
        for key in oa:
            np.testing.assert_array_equal(oa[key], ob[key])
        np.testing.assert_array_equal(ia["frictionloss"], ib["frictionloss"])
        for sa, sb in zip(_roll(a, actions), _roll(b, actions), strict=True):
            np.testing.assert_array_equal(sa[0]["observation"], sb[0]["observation"])
            assert sa[1] == sb[1]
    o1, _ = a.reset(seed=0)
    o2, _ = a.reset(seed=1)
    assert not np.array_equal(o1["desired_goal"], o2["desired_goal"])


def test_gravity_compensation_holds_the_arm():
    held = PandaReachEnv()
    obs, _ = held.reset(seed=4)
    q0 = obs["observation"][:7].copy()
    for _ in range(100):
        obs, *_ = held.step(np.zeros(7))
    assert np.abs(obs["observation"][:7] - q0).max() < 1e-6
    falls = PandaReachEnv(gravity_compensation=False)
    obs, _ = falls.reset(seed=4)
    for _ in range(10):
        obs, *_ = falls.step(np.zeros(7))
    assert np.abs(obs["observation"][:7] - q0).max() > 0.05


def test_truncation_at_max_episode_steps(env):
    env.reset(seed=5)
    for k in range(1, 101):
        obs, _, terminated, truncated, info = env.step(np.zeros(7))
        assert info["elapsed_steps"] == k
        assert truncated == (k == 100) and not terminated
    achieved = np.zeros((2, 3))
    flags = env.compute_truncated(achieved, achieved, [{"elapsed_steps": 99}, info])
    assert flags.tolist() == [False, True]
    short = PandaReachEnv(max_episode_steps=3)
    short.reset(seed=0)
    assert [short.step(np.zeros(7))[3] for _ in range(3)] == [False, False, True]


def test_actions_are_clipped_torques():
    env = PandaReachEnv(gravity_compensation=False)
    env.reset(seed=0)
    env.step(np.array([2.0, -0.5, 0, 0, 0, 0, -3.0]))
    np.testing.assert_allclose(env.data.ctrl, [87.0, -43.5, 0, 0, 0, 0, -12.0])
    np.testing.assert_allclose(env.torque_to_action(panda.TORQUE_LIMITS), 1.0)
    with pytest.raises(ValueError, match="action"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="action"):
        env.step(np.full(7, np.nan))


def _final_qpos(env, seed, action):
    env.reset(seed=seed)
    for _ in range(20):
        obs, *_ = env.step(action)
    return obs["observation"][:7]


@pytest.mark.parametrize(
    ("kwargs", "key", "low", "high"),
    [
        ({"payload_mass": (0.5, 2.0)}, "payload_mass", 0.5, 2.0),
        ({"frictionloss": (0.5, 2.0)}, "frictionloss", 0.5, 2.0),
        ({"actuator_gain": (0.5, 0.8)}, "actuator_gain", 0.5, 0.8),
    ],
)
def test_mismatch_options_change_the_dynamics(kwargs, key, low, high):
    action = np.array([0.05, 0.05, -0.05, 0.05, 0.3, -0.3, 0.3])
    nominal = _final_qpos(PandaReachEnv(), 6, action)
    env = PandaReachEnv(**kwargs)
    _, info = env.reset(seed=6)
    drawn = np.atleast_1d(info[key])
    assert ((drawn >= low) & (drawn <= high)).all()
    if key == "payload_mass":
        assert env.model.body_mass[env.model.body(panda.PAYLOAD_BODY).id] == drawn[0]
    elif key == "frictionloss":
        np.testing.assert_array_equal(env.model.dof_frictionloss, drawn)
    else:
        np.testing.assert_array_equal(env.model.actuator_gainprm[:, 0], drawn)
    assert np.abs(_final_qpos(env, 6, action) - nominal).max() > 1e-3
    # The nominal model carries no mismatch and the env's gravity compensation.
    nom = env.nominal_model()
    assert nom.body_mass[nom.body(panda.PAYLOAD_BODY).id] == 0.0
    np.testing.assert_array_equal(nom.dof_frictionloss, 0.0)
    np.testing.assert_array_equal(nom.actuator_gainprm[:, 0], 1.0)
    np.testing.assert_array_equal(nom.body_gravcomp[1:9], [0] + [1] * 7)


def test_nominal_model_steps_like_the_env(env):
    obs, _ = env.reset(seed=8)
    model = env.nominal_model()
    data = mujoco.MjData(model)
    data.qpos[:] = obs["observation"][:7]
    action = np.linspace(-0.5, 0.5, 7)
    obs, *_ = env.step(action)
    data.ctrl[:] = action * panda.TORQUE_LIMITS
    mujoco.mj_step(model, data, nstep=10)
    np.testing.assert_array_equal(np.concatenate([data.qpos, data.qvel]), obs["observation"])


def test_mujoco_dynamics_of_the_nominal_model_predicts_the_env(env):
    import torch

    from diffto.layers.mujoco_dynamics import MujocoDynamics

    obs, _ = env.reset(seed=9)
    dynamics = MujocoDynamics(env.nominal_model(), substeps=env.substeps)
    assert dynamics.dt == pytest.approx(env.control_dt)
    np.testing.assert_array_equal(dynamics.u_upper.numpy(), panda.TORQUE_LIMITS)
    tau = np.linspace(-5.0, 5.0, 7)
    x_next = dynamics(torch.tensor(env.state)[None], torch.tensor(tau)[None])[0].numpy()
    obs, *_ = env.step(env.torque_to_action(tau))
    np.testing.assert_allclose(x_next, obs["observation"], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"reward_type": "shaped"}, "reward_type"),
        ({"render_mode": "human"}, "render_mode"),
        ({"gravity_compensation": "yes"}, "gravity_compensation"),
        ({"distance_threshold": 0.0}, "distance_threshold"),
        ({"max_episode_steps": 0}, "max_episode_steps"),
        ({"max_episode_steps": 10.5}, "max_episode_steps"),
        ({"substeps": -1}, "substeps"),
        ({"goal_joint_range": float("inf")}, "goal_joint_range"),
        ({"init_joint_range": -0.1}, "init_joint_range"),
        ({"min_goal_distance": -1.0}, "min_goal_distance"),
        ({"min_goal_height": None}, "min_goal_height"),
        ({"payload_mass": -1.0}, "payload_mass"),
        ({"payload_mass": (2.0, 1.0)}, "payload_mass"),
        ({"frictionloss": (0.0, 1.0, 2.0)}, "frictionloss"),
        ({"actuator_gain": 0.0}, "actuator_gain"),
        ({"actuator_gain": (0.0, 1.0)}, "actuator_gain"),
        ({"width": 4000}, "width"),
        ({"terminate_on_success": 1}, "terminate_on_success"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PandaReachEnv(**kwargs)


def test_unreachable_goal_constraints_fail_clearly():
    env = PandaReachEnv(min_goal_distance=5.0)
    with pytest.raises(RuntimeError, match="min_goal_distance"):
        env.reset(seed=0)


@pytest.mark.filterwarnings("ignore:.*observation space (minimum|maximum) value")
def test_gymnasium_env_checker():
    from gymnasium.utils.env_checker import check_env

    check_env(
        PandaReachEnv(payload_mass=(0.0, 1.0), frictionloss=(0.0, 0.2)), skip_render_check=True
    )


def test_rendering_gives_a_frame_or_a_clear_error():
    env = PandaReachEnv(render_mode="rgb_array", width=64, height=48)
    env.reset(seed=0)
    try:
        frame = env.render()
    except RenderingUnavailableError as err:
        assert "MUJOCO_GL" in str(err)
    else:
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
        assert frame.std() > 0
    obs, *_ = env.step(np.zeros(7))  # stepping does not depend on rendering
    assert env.observation_space.contains(obs)
    env.close()
    quiet = PandaReachEnv()
    quiet.reset(seed=0)
    with pytest.warns(UserWarning, match="render_mode"):
        assert quiet.render() is None
