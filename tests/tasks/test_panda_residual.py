"""PandaBaseController (operational-space control on the nominal model) and
PandaResidualReachEnv (residual actions on top of it)."""

from __future__ import annotations

import pickle

import mujoco
import numpy as np
import pytest

from diffto.tasks.panda import model as panda
from diffto.tasks.panda.base_controller import PandaBaseController
from diffto.tasks.panda.reach_env import PandaReachEnv, RenderingUnavailableError
from diffto.tasks.panda.residual_env import PandaResidualReachEnv
from diffto.tasks.registry import make_env


def _run_base(env, controller, seed, steps):
    obs, _ = env.reset(seed=seed)
    observations, actions, infos = [obs], [], []
    for _ in range(steps):
        a = controller(obs["observation"], obs["desired_goal"])
        obs, _, _, _, info = env.step(a)
        observations.append(obs)
        actions.append(a)
        infos.append(info)
    return observations, actions, infos


# ----------------------------------------------------------------------------- the controller
def test_control_law_achieves_the_flange_acceleration_and_keeps_posture_out_of_it():
    """On the nominal model, without clipping, the commanded torque gives exactly
    ``J q̈ + J̇ q̇ = k_p (g − p) − k_d ṗ`` (the posture term lives in the null space)."""
    c = PandaBaseController(regularization=0.0, posture_gain=100.0)
    m = panda.load_model(gravity_compensation=True, scene=False)
    d = mujoco.MjData(m)
    rng = np.random.default_rng(0)
    site = m.site(panda.FLANGE_SITE).id
    for _ in range(5):
        q = np.asarray(panda.HOME) + rng.uniform(-0.3, 0.3, 7)
        qd = rng.uniform(-0.3, 0.3, 7)
        d.qpos[:], d.qvel[:] = q, qd
        mujoco.mj_forward(m, d)
        goal = d.site_xpos[site] + rng.uniform(-0.02, 0.02, 3)
        tau = c.torque(np.concatenate([q, qd]), goal)
        assert (np.abs(tau) < panda.TORQUE_LIMITS).all()  # the law, not the clip
        d.ctrl[:] = tau
        mujoco.mj_forward(m, d)
        J, Jdot = np.zeros((3, 7)), np.zeros((3, 7))
        mujoco.mj_jacSite(m, d, J, None, site)
        mujoco.mj_jacDot(m, d, Jdot, None, d.site_xpos[site], m.site_bodyid[site])
        wanted = c.position_gain * (goal - d.site_xpos[site]) - c.kd * (J @ qd)
        np.testing.assert_allclose(J @ d.qacc + Jdot @ qd, wanted, rtol=0, atol=1e-7)
    # The posture pulls the joints but not the flange: at rest on the goal, away from the
    # posture, the flange does not accelerate while the joints do.
    d.qpos[:], d.qvel[:] = np.asarray(panda.HOME) + 0.2, 0.0
    mujoco.mj_forward(m, d)
    d.ctrl[:] = c.torque(np.concatenate([d.qpos, d.qvel]), d.site_xpos[site].copy())
    mujoco.mj_forward(m, d)
    mujoco.mj_jacSite(m, d, J, None, site)
    np.testing.assert_allclose(J @ d.qacc, 0.0, atol=1e-7)
    assert np.abs(d.qacc).max() > 1.0


@pytest.mark.parametrize("gravity_compensation", [True, False])
def test_base_controller_reaches_and_holds_nominal_goals(gravity_compensation):
    env = PandaReachEnv(gravity_compensation=gravity_compensation, max_episode_steps=50)
    c = PandaBaseController(gravity_compensation=gravity_compensation)
    for seed in range(3):
        _, actions, infos = _run_base(env, c, seed, 50)
        assert infos[-1]["is_success"] and infos[-1]["distance"] < 1e-3
        assert all(((np.abs(a) <= 1.0).all()) for a in actions)
    env.close()


def test_base_controller_is_blind_to_an_unmodelled_payload():
    # 3 kg at the flange sags it by centimetres at the default gains (about 12 mm per kg).
    env = PandaReachEnv(payload_mass=3.0, max_episode_steps=50)
    _, _, infos = _run_base(env, PandaBaseController(), 0, 50)
    assert infos[-1]["distance"] > env.distance_threshold
    assert infos[-1]["distance"] < 0.1


def test_batches_rows_and_pickles():
    c = PandaBaseController()
    env = PandaReachEnv()
    obs = [env.reset(seed=s)[0] for s in range(4)]
    states = np.stack([o["observation"] for o in obs])
    states[:, 7:] = np.random.default_rng(1).uniform(-0.5, 0.5, (4, 7))
    goals = np.stack([o["desired_goal"] for o in obs])
    batch = c(states, goals)
    assert batch.shape == (4, 7) and batch.dtype == np.float64
    for i in range(4):
        row = c(states[i], goals[i])
        assert row.shape == (7,)
        np.testing.assert_array_equal(row, batch[i])
    clone = pickle.loads(pickle.dumps(c))
    assert clone is not c and clone.data is not c.data
    np.testing.assert_array_equal(clone(states, goals), batch)
    other = PandaBaseController(position_gain=100.0, posture=np.asarray(panda.HOME) + 0.1)
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(other))(states, goals), other(states, goals)
    )


@pytest.mark.parametrize(
    ("observation", "goal", "name"),
    [
        (np.zeros(13), np.zeros(3), "observation"),
        (np.zeros((2, 2, 14)), np.zeros((2, 2, 3)), "observation"),
        (np.zeros(14), np.zeros(2), "desired_goal"),
        (np.zeros((2, 14)), np.zeros((3, 3)), "desired_goal"),
        (np.zeros((2, 14)), np.zeros(3), "desired_goal"),
        (np.full(14, np.nan), np.zeros(3), "finite"),
    ],
)
def test_call_checks_shapes(observation, goal, name):
    with pytest.raises(ValueError, match=name):
        PandaBaseController()(observation, goal)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"position_gain": 0.0}, "position_gain"),
        ({"position_gain": float("inf")}, "position_gain"),
        ({"damping_ratio": -1.0}, "damping_ratio"),
        ({"posture_gain": float("nan")}, "posture_gain"),
        ({"posture_gain": True}, "posture_gain"),
        ({"posture": [0.0] * 6}, "posture"),
        ({"posture": "home"}, "posture"),
        ({"posture": [0.0] * 7}, "joint limits"),  # joint 4 cannot be at zero
        ({"regularization": -1e-3}, "regularization"),
        ({"gravity_compensation": 1}, "gravity_compensation"),
    ],
)
def test_controller_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PandaBaseController(**kwargs)


# ----------------------------------------------------------------------------- the residual env
@pytest.mark.parametrize("mismatch", [{}, {"payload_mass": (0.5, 2.0), "frictionloss": 0.5}])
def test_zero_residual_is_the_base_controller(mismatch):
    plain = PandaReachEnv(max_episode_steps=30, **mismatch)
    residual = PandaResidualReachEnv(max_episode_steps=30, **mismatch)
    observations, actions, _ = _run_base(plain, PandaBaseController(), 7, 30)
    obs, _ = residual.reset(seed=7)
    for k in range(30):
        for key in obs:
            np.testing.assert_array_equal(obs[key], observations[k][key])
        obs, _, _, _, info = residual.step(np.zeros(7, np.float32))
        np.testing.assert_array_equal(info["base_action"], actions[k])
        np.testing.assert_array_equal(info["action"], actions[k])
        np.testing.assert_array_equal(info["residual_action"], 0.0)
    for key in obs:
        np.testing.assert_array_equal(obs[key], observations[-1][key])


def test_residual_is_scaled_and_clipped():
    env = PandaResidualReachEnv(residual_scale=0.5)
    env.reset(seed=2)
    for residual in (np.full(7, 5.0), np.linspace(-3.0, 3.0, 7)):
        base = env.base_action()
        _, _, _, _, info = env.step(residual)
        r = np.clip(residual, -1.0, 1.0)
        np.testing.assert_array_equal(info["base_action"], base)
        np.testing.assert_array_equal(info["residual_action"], r)
        np.testing.assert_array_equal(info["action"], np.clip(base + 0.5 * r, -1.0, 1.0))
        # ... and that is the torque the physics got.
        np.testing.assert_allclose(env.data.ctrl, info["action"] * panda.TORQUE_LIMITS)
    # A residual that would push the sum outside [-1, 1] is cut there.
    big = PandaResidualReachEnv(residual_scale=3.0)
    big.reset(seed=2)
    _, _, _, _, info = big.step(np.ones(7))
    np.testing.assert_array_equal(info["action"], 1.0)


def test_gated_residual_fades_out_at_the_goal():
    """With residual_gate the residual's weight is min(1, (d / d0)^2) of the flange's distance
    before the step. A constant residual that the base's pull beats at d0 moves an ungated
    nominal arm off its goal, and a gated one not at all; one stronger than the pull at d0
    holds the arm off the goal either way (outside d0, where the gate is open)."""
    ends = {}
    for gate, push in ((0.01, 0.1), (None, 0.1), (0.01, 0.3), (None, 0.3)):
        env = PandaResidualReachEnv(residual_gate=gate, max_episode_steps=150,
                                    terminate_on_success=False)
        obs, _ = env.reset(seed=4)
        r = np.full(7, push)
        for _ in range(150):
            distance = np.linalg.norm(obs["desired_goal"] - obs["achieved_goal"])
            base = env.base_action()
            obs, _, _, _, info = env.step(r)
            weight = 1.0 if gate is None else min(1.0, (distance / gate) ** 2)
            assert info["residual_gate"] == pytest.approx(weight)
            np.testing.assert_allclose(info["action"], np.clip(base + 0.2 * weight * r, -1, 1))
        ends[gate, push] = np.linalg.norm(obs["desired_goal"] - obs["achieved_goal"])
    assert ends[0.01, 0.1] < 1e-4 < 5e-3 < ends[None, 0.1], ends
    assert ends[0.01, 0.3] > 0.01 and ends[None, 0.3] > 0.01, ends
    with pytest.raises(ValueError, match="residual_gate"):
        PandaResidualReachEnv(residual_gate=0.0)


@pytest.mark.parametrize("action", [np.zeros(6), np.zeros((1, 7)), np.full(7, np.inf)])
def test_step_checks_the_residual(action):
    env = PandaResidualReachEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(action)


def test_goal_env_api_and_registry():
    env = make_env("diffto/PandaResidualReach-v0", {"reward_type": "dense", "residual_scale": 0.1})
    inner = env.unwrapped
    assert isinstance(inner, PandaResidualReachEnv) and inner.residual_scale == 0.1
    assert inner.max_episode_steps == 100 and inner.reward_type == "dense"
    assert env.action_space.shape == (7,) and env.action_space.dtype == np.float32
    np.testing.assert_array_equal(env.action_space.low, -1.0)
    obs, _ = env.reset(seed=4)
    plain_obs, _ = PandaReachEnv(reward_type="dense").reset(seed=4)
    for key in plain_obs:  # the same episode as the reach env's for a seed
        np.testing.assert_array_equal(obs[key], plain_obs[key])
    assert env.observation_space.contains(obs)
    achieved, desired, rewards, infos = [], [], [], []
    for _ in range(5):
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        achieved.append(obs["achieved_goal"])
        desired.append(obs["desired_goal"])
        rewards.append(r)
        infos.append(info)
        assert not term and not trunc
    np.testing.assert_array_equal(
        inner.compute_reward(np.array(achieved), np.array(desired), infos), rewards
    )
    assert not inner.compute_truncated(achieved[-1], desired[-1], infos[-1])
    np.testing.assert_array_equal(inner.state, obs["observation"])
    assert inner.nominal_model().nq == 7
    env.close()


def test_error_integral_is_the_memory_a_payload_leaves():
    """The observed error integral: the physics state and then e_int, zero at reset, summed
    only within 5 cm of the goal (units of 1 cm for 1 s), clipped; near zero where the base
    holds the goal, large under an unknown payload that the base lets sag."""
    ends = {}
    for payload in (0.0, 2.5):
        env = PandaResidualReachEnv(observe_error_integral=True, payload_mass=payload,
                                    max_episode_steps=50)
        assert env.observation_space["observation"].shape == (17,)
        obs, _ = env.reset(seed=1_000_001)
        assert env.observation_space.contains(obs)
        np.testing.assert_array_equal(obs["observation"][:14], env.state)
        np.testing.assert_array_equal(obs["observation"][14:], 0.0)
        expected = np.zeros(3)
        for _ in range(50):
            obs, _, _, _, _ = env.step(np.zeros(7))
            error = obs["desired_goal"] - obs["achieved_goal"]
            if np.linalg.norm(error) < 0.05:
                expected = np.clip(expected + env.control_dt * error / 0.01, -10.0, 10.0)
            np.testing.assert_allclose(obs["observation"][14:], expected, atol=1e-12)
        np.testing.assert_array_equal(env.error_integral, expected)
        ends[payload] = np.linalg.norm(expected)
        obs, _ = env.reset(seed=3)
        np.testing.assert_array_equal(obs["observation"][14:], 0.0)
    assert ends[0.0] < 1.0 < 2.0 < ends[2.5], ends
    plain = PandaResidualReachEnv()
    assert plain.observation_space["observation"].shape == (14,)
    with pytest.raises(ValueError, match="observe_error_integral"):
        PandaResidualReachEnv(observe_error_integral=1)


def test_episode_ends_as_the_reach_env():
    env = PandaResidualReachEnv(max_episode_steps=3, terminate_on_success=False)
    env.reset(seed=0)
    ends = [env.step(np.zeros(7))[3] for _ in range(3)]
    assert ends == [False, False, True]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"residual_scale": 0.0}, "residual_scale"),
        ({"residual_scale": -0.2}, "residual_scale"),
        ({"residual_scale": float("inf")}, "residual_scale"),
        ({"residual_scale": True}, "residual_scale"),
        ({"base": [("position_gain", 100.0)]}, "base"),
        ({"base": {"stiffness": 100.0}}, "stiffness"),
        ({"base": {"gravity_compensation": False}}, "gravity_compensation"),
        ({"base": {"position_gain": -1.0}}, "position_gain"),
        ({"payload_mass": -1.0}, "payload_mass"),  # the reach env's own checks
    ],
)
def test_env_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PandaResidualReachEnv(**kwargs)


def test_base_kwargs_reach_the_controller():
    env = PandaResidualReachEnv(gravity_compensation=False, base={"position_gain": 100.0})
    assert env.base_controller.position_gain == 100.0
    assert env.base_controller.gravity_compensation is False


@pytest.mark.filterwarnings("ignore:.*observation space (minimum|maximum) value")
def test_gymnasium_env_checker():
    from gymnasium.utils.env_checker import check_env

    check_env(PandaResidualReachEnv(payload_mass=(0.0, 1.0)), skip_render_check=True)


def test_render_is_the_reach_envs():
    env = make_env("diffto/PandaResidualReach-v0",
                   {"render_mode": "rgb_array", "width": 64, "height": 48})
    assert env.metadata["render_fps"] == 50
    env.reset(seed=0)
    env.step(np.zeros(7))
    try:
        frame = env.render()
    except RenderingUnavailableError as err:
        assert "MUJOCO_GL" in str(err)
    else:
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8 and frame.std() > 0
    env.close()
