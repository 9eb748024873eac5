"""The pendulum swing-up environment and its MPC expert: goal-env API, seeding, wrapped
distances, errors, the planning model equal to the env's, and swing-ups that succeed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffto.tasks.classic import PendulumSwingUpEnv, SwingUpExpert, angle_distance, wrap_angle
from diffto.tasks.mpc_expert import RecedingHorizon
from diffto.tasks.registry import make_env, make_expert


def test_spaces_observation_and_goal_layout():
    env = PendulumSwingUpEnv()
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    theta, rate = env.state
    assert np.allclose(obs["observation"], [math.cos(theta), math.sin(theta), rate])
    assert obs["achieved_goal"] == pytest.approx([theta])
    assert abs(abs(theta) - math.pi) <= env.init_angle_noise + 1e-12  # hanging ± noise
    assert abs(obs["desired_goal"][0]) <= env.goal_range
    assert set(info) >= {"is_success", "distance", "elapsed_steps", "mass_scale"}
    assert env.action_space.shape == (1,) and env.torque_limit == pytest.approx(9.81 / 2)


def test_seeding_is_reproducible():
    a, b = PendulumSwingUpEnv(), PendulumSwingUpEnv()
    oa, _ = a.reset(seed=7)
    ob, _ = b.reset(seed=7)
    assert all(np.array_equal(oa[k], ob[k]) for k in oa)
    for action in ([0.3], [-1.0], [2.0]):
        sa, sb = a.step(action), b.step(action)
        assert np.array_equal(sa[0]["observation"], sb[0]["observation"]) and sa[1:4] == sb[1:4]
    oc, _ = b.reset(seed=8)
    assert not np.array_equal(oa["desired_goal"], oc["desired_goal"])


@pytest.mark.parametrize("reward_type", ["sparse", "dense"])
def test_compute_reward_agrees_with_step_and_batches(reward_type):
    env = PendulumSwingUpEnv(reward_type=reward_type, max_episode_steps=5)
    obs, _ = env.reset(seed=1)
    achieved, desired, rewards, infos = [], [], [], []
    for t in range(5):
        obs, r, term, trunc, info = env.step([1.0 if t % 2 else -1.0])
        assert r == env.compute_reward(obs["achieved_goal"], obs["desired_goal"], info)
        assert not term and trunc == (t == 4)
        achieved.append(obs["achieved_goal"])
        desired.append(obs["desired_goal"])
        rewards.append(r)
        infos.append(info)
    batch = env.compute_reward(np.stack(achieved), np.stack(desired), infos)
    assert batch.shape == (5,) and np.array_equal(batch, rewards)
    assert env.compute_truncated(np.stack(achieved), np.stack(desired), infos).tolist() == [
        False, False, False, False, True]


def test_wrapped_distances_and_success_threshold():
    assert angle_distance([[3.1]], [[-3.1]]) == pytest.approx(2 * math.pi - 6.2)
    assert angle_distance([0.0], [2 * math.pi]) == pytest.approx(0.0, abs=1e-12)
    assert wrap_angle(math.pi) == pytest.approx(-math.pi)
    env = PendulumSwingUpEnv()
    r = env.compute_reward(np.array([[3.1], [0.0]]), np.array([[-3.1], [0.2]]))
    assert r.tolist() == [0.0, -1.0]  # 0.083 rad across the wrap succeeds, 0.2 rad does not
    terminating = PendulumSwingUpEnv(terminate_on_success=True)
    assert terminating.compute_terminated(np.array([[3.1]]), np.array([[-3.1]])).tolist() == [True]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reward_type": "shaped"}, "reward_type"),
        ({"goal_range": 0.6}, "goal_range must be held within torque_limit"),
        ({"torque_limit": -1.0}, "torque_limit"),
        ({"mass_scale": (1.2, 0.8)}, "mass_scale must have low <= high"),
        ({"max_episode_steps": 0}, "max_episode_steps"),
        ({"render_mode": "human"}, "render_mode"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PendulumSwingUpEnv(**kwargs)


def test_bad_actions_are_named():
    env = PendulumSwingUpEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action must have shape"):
        env.step([0.0, 0.0])
    with pytest.raises(ValueError, match="action must be finite"):
        env.step([float("nan")])


def test_planning_model_is_the_env_dynamics_and_mass_scale_breaks_it():
    expert = SwingUpExpert()
    for scale, same in ((1.0, True), (1.3, False)):
        env = PendulumSwingUpEnv(mass_scale=scale)
        env.reset(seed=3)
        x = torch.as_tensor(expert.state_of(env)).view(1, 2)
        action = np.array([0.7])
        env.step(action)
        predicted = expert.dynamics(x, expert.to_control(action[None]))[0].numpy()
        predicted[0] = wrap_angle(predicted[0])
        assert np.allclose(predicted, env.state, atol=1e-12) == same
    obs = env._observation()
    x = torch.as_tensor(env.state) + torch.tensor([2 * math.pi, 0.0])  # one turn further
    assert np.allclose(expert.observation_of(x).numpy(), obs["observation"])
    assert np.allclose(expert.achieved_goal_of(x).numpy(), obs["achieved_goal"])


def test_render_draws_the_bob_where_the_pendulum_is():
    env = PendulumSwingUpEnv(render_mode="rgb_array", width=64, height=64)
    env.reset(seed=0)  # hanging: the bob is below the centre
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    blue = np.argwhere((frame == (40, 90, 200)).all(-1))
    assert len(blue) > 0 and blue[:, 0].mean() > 40
    with pytest.warns(UserWarning, match="render_mode=None"):
        assert PendulumSwingUpEnv().render() is None


def test_registered_and_made_with_its_default_expert():
    env = make_env("diffto/PendulumSwingUp-v0", {"reward_type": "dense"})
    assert isinstance(env.unwrapped, PendulumSwingUpEnv)
    expert = make_expert("diffto/PendulumSwingUp-v0", horizon=20)
    assert isinstance(expert, SwingUpExpert) and expert.horizon == 20
    env.close()


def _fast(**kwargs) -> dict:
    # 0.1 s steps: half the stages of the default 0.05 s for the same 2.5 s of look-ahead.
    return {"dt": 0.1, **kwargs}


def test_exactly_hanging_stalls_from_zeros_and_swings_from_the_cold_start():
    x = torch.tensor([[math.pi, 0.0]], dtype=torch.float64)
    g = torch.tensor([[0.0]], dtype=torch.float64)
    with torch.no_grad():
        stalled = SwingUpExpert(**_fast(horizon=25, cold_start=0.0)).solve(x, g, max_iter=20)
        moved = SwingUpExpert(**_fast(horizon=25, max_iter=40)).solve(x, g)
    assert stalled.u.abs().max() == 0.0
    assert moved.cost[0] < 0.5 * stalled.cost[0]
    assert angle_distance(moved.x[0, -1, :1].numpy(), [0.0]) < 0.1  # the plan ends upright
    assert moved.u.abs().max() == pytest.approx(moved.u.new_tensor(9.81 / 2).item())  # saturates


def test_solve_converges_near_the_goal_and_checks_shapes():
    expert = SwingUpExpert(**_fast(horizon=20, max_iter=40))
    x = torch.tensor([[0.4, -0.5], [-0.2, 1.0]], dtype=torch.float64)
    g = torch.tensor([[0.1], [-0.25]], dtype=torch.float64)
    with torch.no_grad():
        sol = expert.solve(x, g)
    assert sol.converged.all() and (sol.iterations < 40).all()
    assert np.all(angle_distance(sol.x[:, -1, :1].numpy(), g.numpy()) < 0.05)
    with pytest.raises(ValueError, match="goal must have shape"):
        expert.solve(x, g[:, 0])
    with pytest.raises(ValueError, match="state and goal must share the batch size"):
        expert.solve(x, g[:1])
    with pytest.raises(ValueError, match="u_init must be a tensor of shape"):
        expert.solve(x, g, u_init=torch.zeros(2, 5, 1))


def test_receding_horizon_swings_up_to_held_goals():
    B = 3
    envs = [PendulumSwingUpEnv(**_fast(max_episode_steps=50)) for _ in range(B)]
    expert = SwingUpExpert(**_fast(horizon=25))
    controller = RecedingHorizon(expert)
    obs = [env.reset(seed=1_000_000 + j)[0] for j, env in enumerate(envs)]
    for _ in range(50):
        states = np.stack([expert.state_of(env) for env in envs])
        goals = np.stack([o["desired_goal"] for o in obs])
        actions, sol = controller.act(states, goals)
        assert actions.shape == (B, 1) and sol.u.shape == (B, 25, 1)
        steps = [env.step(a) for env, a in zip(envs, actions, strict=True)]
        obs = [s[0] for s in steps]
    assert all(s[4]["is_success"] for s in steps)
    assert all(abs(s[0]["observation"][2]) < 0.5 for s in steps)  # held, not swinging through
