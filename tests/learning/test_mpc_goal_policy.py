"""A policy steering a differentiable Panda MPC past an obstacle: the obstacle env, the
linearized target MPC (gradients by finite differences), the loss, the LightningModule and its
config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffto.learning.mpc_goal_policy import MPCGoalPolicy, TargetPolicy, obstacle_reach_loss
from diffto.tasks.panda import HOME, PandaObstacleReachEnv, keep_out_penetration
from diffto.tasks.panda.target_mpc import PandaTargetMPC
from diffto.tasks.registry import make_env

TINY = dict(train_configurations=8, batch_size=4, rollout_steps=20, via_steps=10,
            target_every=10, horizon=10, hidden=[16], eval_episodes=1, report_episodes=0,
            video_episodes=0)


# ----------------------------------------------------------------------------- the env
def test_obstacle_sits_between_start_and_goal_and_is_observed():
    env = make_env("diffto/PandaObstacleReach-v0")
    for seed in range(20):
        obs, info = env.reset(seed=seed)
        start, goal = obs["achieved_goal"], obs["desired_goal"]
        center, radius = info["obstacle_center"], info["obstacle_radius"]
        assert obs["observation"].shape == (18,)
        np.testing.assert_array_equal(obs["observation"][14:17], center)
        assert obs["observation"][17] == radius
        # Start and goal clear the keep-out region; the centre is near the segment's middle.
        depth = keep_out_penetration(np.stack([start, goal]), center, radius, 0.02)
        assert (depth <= -0.03).all()
        axis = (goal - start) / np.linalg.norm(goal - start)
        s = float((center - start) @ axis) / np.linalg.norm(goal - start)
        off = np.linalg.norm(center - start - s * np.linalg.norm(goal - start) * axis)
        assert 0.4 - 1e-9 <= s <= 0.6 + 1e-9 and off <= 0.02 + 1e-9
        assert not info["collision"]
    env.close()


def test_entering_the_keep_out_sphere_ends_the_episode_as_a_failure():
    env = PandaObstacleReachEnv()
    obs, _ = env.reset(seed=0)
    # Move the obstacle onto the flange: the next step collides, terminates and fails,
    # even where the goal is also put there.
    env.obstacle_center = obs["achieved_goal"].copy()
    env.goal = obs["achieved_goal"].copy()
    obs, reward, terminated, truncated, info = env.step(np.zeros(7))
    assert info["collision"] and terminated and not truncated
    assert info["distance"] < 0.02 and not info["is_success"]
    assert env.compute_terminated(obs["achieved_goal"], obs["desired_goal"], info)
    assert not env.compute_terminated(obs["achieved_goal"], obs["desired_goal"],
                                      {**info, "collision": False})
    # Away from it nothing collides.
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(np.zeros(7))
    assert not info["collision"] and not terminated
    with pytest.raises(ValueError, match="obstacle_fraction"):
        PandaObstacleReachEnv(obstacle_fraction=(0.5, 1.5))
    with pytest.raises(ValueError, match="obstacle_radius"):
        PandaObstacleReachEnv(obstacle_radius=0.0)
    with pytest.raises(ValueError, match=r"position and center must have shape \(\.\.\., 3\)"):
        keep_out_penetration(np.zeros(2), np.zeros(3), 0.1, 0.0)


# ----------------------------------------------------------------------------- the MPC
def _state(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.tensor(np.array(HOME)) + 0.1 * torch.randn(batch, 7, generator=g,
                                                        dtype=torch.float64)
    v = 0.2 * torch.randn(batch, 7, generator=g, dtype=torch.float64)
    return torch.cat([q, v], -1)


def test_linearized_model_predicts_one_mujoco_control_step():
    import mujoco

    mpc = PandaTargetMPC(horizon=5)
    x = _state(3)
    lin = mpc.linearize(x)
    u = torch.linspace(-0.3, 0.3, 7, dtype=torch.float64).expand(3, 7)
    pred = (lin.F @ torch.cat([x, u], -1).unsqueeze(-1)).squeeze(-1) + lin.f
    data = mujoco.MjData(mpc.model)
    for i in range(3):
        data.qpos[:], data.qvel[:] = x[i, :7].numpy(), x[i, 7:].numpy()
        data.ctrl[:] = u[i].numpy() * mpc.model.actuator_ctrlrange[:, 1]
        mujoco.mj_step(mpc.model, data, nstep=10)
        true = np.concatenate([data.qpos, data.qvel])
        # One 20 ms step as one implicit-damping step with M and the Coriolis terms frozen
        # (MuJoCo takes ten 2 ms steps): the velocity change to within 10 % (6 % seen).
        dv = true[7:] - x[i, 7:].numpy()
        assert np.linalg.norm(pred[i, 7:].numpy() - true[7:]) < 0.1 * np.linalg.norm(dv)
        # Positions by the trapezoidal rule: well inside the h |Δv| / 2 of a plain Euler step.
        err = np.abs(pred[i, :7].numpy() - true[:7]).max()
        assert err < 0.2 * 0.5 * 0.02 * np.abs(dv).max(), err


def test_gradient_reaches_the_target_through_the_mpc_by_finite_differences():
    mpc = PandaTargetMPC(horizon=4, max_iter=100)
    mpc.layer.tol = 1e-10
    x0 = _state(2, seed=1)
    lin = mpc.linearize(x0)
    target = (mpc.flange(x0) + torch.tensor([0.05, -0.03, 0.04], dtype=torch.float64)
              ).requires_grad_()
    w = torch.tensor([0.3, -0.7, 0.5], dtype=torch.float64)

    def objective(r: torch.Tensor) -> torch.Tensor:  # a nonlinear function of the plan
        sol = mpc(x0, r, lin)
        assert sol.converged.all()
        return (mpc.flange(sol.x[:, -1]) @ w).sum() + (sol.u ** 2).sum()

    objective(target).backward()
    grad = target.grad.clone()
    assert grad.abs().max() > 1e-3  # the target moves the plan
    eps = 1e-6
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for b in range(2):
            for k in range(3):
                e = torch.zeros_like(target)
                e[b, k] = eps
                fd[b, k] = (objective(target + e) - objective(target - e)) / (2 * eps)
    assert torch.allclose(grad, fd, rtol=1e-4, atol=1e-6), (grad - fd).abs().max()


def test_mpc_and_policy_refuse_bad_inputs_naming_the_argument():
    mpc = PandaTargetMPC(horizon=3)
    x0 = _state(2)
    with pytest.raises(ValueError, match=r"x0 must be a tensor of shape \(B, 14\)"):
        mpc(x0[:, :7], torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"target must be a tensor of shape \(B, 3\)"):
        mpc(x0, torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="target must have x0's dtype"):
        mpc(x0, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="horizon"):
        PandaTargetMPC(horizon=0)
    with pytest.raises(ValueError, match="position_weight"):
        PandaTargetMPC(position_weight=-1.0)
    with pytest.raises(ValueError, match="gravity_compensation"):
        PandaTargetMPC(gravity_compensation=False)
    policy = TargetPolicy((8,))
    with pytest.raises(ValueError, match=r"observation must have shape \(B, 18\)"):
        policy(torch.zeros(2, 14), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="goal and flange"):
        policy(torch.zeros(2, 18), torch.zeros(3, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="max_offset"):
        TargetPolicy(max_offset=0.0)
    with pytest.raises(ValueError, match=r"path must have shape \(B, K, 3\)"):
        obstacle_reach_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                            torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match=r"radius must have shape \(2,\)"):
        obstacle_reach_loss(torch.zeros(2, 4, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                            torch.zeros(3), 0.0)


def test_loss_terms():
    path = torch.tensor([[[0.0, 0, 0], [0.05, 0, 0], [0.2, 0, 0]]])
    out = obstacle_reach_loss(path, torch.tensor([[0.2, 0, 0]]), torch.tensor([[0.05, 0, 0]]),
                              torch.tensor([0.04]), 0.01, obstacle_weight=10.0)
    # Depths 0, 0.05, 0 (the first point sits exactly on the grown sphere).
    assert out["loss_obstacle"].item() == pytest.approx(10 * 0.05 ** 2)
    # Distances 0.2, 0.15, 0 with weights k / mean(k) = 0.5, 1, 1.5.
    assert out["loss_goal"].item() == pytest.approx((0.5 * 0.2 + 0.15) / 3)
    assert out["collision"].item() == 1.0 and out["final_distance"].item() == 0.0


# ----------------------------------------------------------------------------- the learner
def test_module_refuses_bad_settings():
    with pytest.raises(ValueError, match="target_every must be <= horizon"):
        MPCGoalPolicy(**{**TINY, "target_every": 20})
    with pytest.raises(ValueError, match="rollout_steps must be a multiple of target_every"):
        MPCGoalPolicy(**{**TINY, "rollout_steps": 25})
    with pytest.raises(ValueError, match="via_steps"):
        MPCGoalPolicy(**{**TINY, "via_steps": 5})
    with pytest.raises(ValueError, match="env_id 'diffto/PandaReach-v0' must observe"):
        MPCGoalPolicy(**{**TINY, "env_id": "diffto/PandaReach-v0"})
    with pytest.raises(ValueError, match="refine_steps must be an int >= 0"):
        MPCGoalPolicy(**{**TINY, "refine_steps": -1})
    with pytest.raises(ValueError, match="refine_lr must be > 0"):
        MPCGoalPolicy(**{**TINY, "refine_lr": 0.0})


def test_rollout_follows_the_schedule_outside_training():
    """The model rollout runs without a training step around it (no timer set up), gives one
    flange position per control step, and with the initial policy (via-point = goal) it is the
    MPC aimed at the goal: it ends closer to the goal than it starts."""
    module = MPCGoalPolicy(**TINY)
    observation, goal = module.episode_starts([0, 1]).tensors
    with torch.no_grad():
        path = module.rollout(observation, goal)
        start = module.mpc.flange(observation[:, :7].double())
    assert path.shape == (2, TINY["rollout_steps"], 3)
    before = torch.linalg.vector_norm(start - goal, dim=-1)
    after = torch.linalg.vector_norm(path[:, -1].double() - goal, dim=-1)
    assert (after < 0.7 * before).all(), (before, after)


def test_training_moves_the_via_point_so_the_plan_clears_the_obstacle():
    """Starting from the MPC aimed at the goal (every training plan collides), a few dozen
    gradient steps through the MPC must bring the plan's collisions down by half; a gradient
    that does not reach the policy leaves them where they are."""
    torch.manual_seed(0)
    module = MPCGoalPolicy(**{**TINY, "train_configurations": 16, "batch_size": 16,
                              "rollout_steps": 40, "via_steps": 20, "hidden": [32],
                              "lr": 3e-3, "margin": 0.02, "dtype": "float64"})
    batch = module.train_dataloader().dataset.tensors
    opt = torch.optim.Adam(module.policy.parameters(), lr=module.hparams.lr)
    module.on_train_batch_start(batch, 0)
    first = module.losses(batch)
    for _ in range(30):
        module.on_train_batch_start(batch, 0)
        out = module.losses(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    module.on_train_batch_start(batch, 0)
    with torch.no_grad():
        last = module.losses(batch)
    assert first["collision"].item() >= 0.75
    assert last["loss_obstacle"].item() < 0.2 * first["loss_obstacle"].item()
    assert last["collision"].item() <= 0.5 * first["collision"].item()


def test_refinement_cuts_each_episode_s_obstacle_loss_within_the_box():
    """From the untrained policy (via-point = goal: every plan collides), refining the
    via-points through their own model rollouts must cut every episode's obstacle loss by most
    of it and keep every via-point within ``goal ± max_offset``; with zero steps it is the
    policy's, and the policy gets no gradient."""
    module = MPCGoalPolicy(**{**TINY, "rollout_steps": 40, "via_steps": 20, "margin": 0.02,
                              "max_offset": 0.2, "refine_lr": 0.02, "dtype": "float64"})
    observation, goal = module.episode_starts([0, 1, 2]).tensors
    with torch.no_grad():
        policy_via = module.via_point(observation.double(), goal.double())
        before = module.losses((observation, goal))
    assert torch.equal(module.refine(observation, goal, 0), policy_via)
    via = module.refine(observation, goal, 25)
    assert before["collision"].item() == 1.0
    assert torch.allclose(before["row_loss"].mean(), before["loss"])
    depth_before = obstacle_depth(module, observation, goal, policy_via)
    depth_after = obstacle_depth(module, observation, goal, via)
    assert (depth_after < 0.2 * depth_before).all(), (depth_before, depth_after)
    assert ((via - goal.double()).abs() <= 0.2 + 1e-12).all()
    assert not via.requires_grad and not any(p.grad is not None
                                             for p in module.policy.parameters())


def obstacle_depth(module, observation, goal, via):
    """Per episode: the summed squared depth of the model rollout in the grown sphere."""
    with torch.no_grad():
        path = module.rollout(observation, goal, via).double()
    obs = observation.double()
    grown = obs[:, 17] + module.flange_radius + module.hparams.margin
    distance = torch.linalg.vector_norm(path - obs[:, None, 14:17], dim=-1)
    depth = torch.relu(grown[:, None] - distance)
    return (depth ** 2).sum(1)


def test_refinement_keeps_the_best_iterate_and_refuses_what_it_cannot_do(monkeypatch):
    """Started from already refined via-points, Adam steps far too large end worse on some
    episode (the first, here); every episode must still end no worse in the model than it
    started."""
    module = MPCGoalPolicy(**{**TINY, "refine_lr": 0.02, "dtype": "float64"})
    observation, goal = module.episode_starts([0, 1, 2]).tensors
    good = module.refine(observation, goal, 20)
    monkeypatch.setattr(module, "via_point", lambda obs, g: good.clone())
    module.hparams.refine_lr = 0.5
    with torch.no_grad():
        start = module.losses((observation, goal))["row_loss"]
        end = module.losses((observation, goal), module.refine(observation, goal, 3))["row_loss"]
    assert (end <= start + 1e-12).all(), (start, end)
    assert (end < start).any()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        module.refine(observation, goal, 1)
    with pytest.raises(ValueError, match="refine_steps must be 0 when via_steps is 0"):
        MPCGoalPolicy(**{**TINY, "via_steps": 0, "refine_steps": 5})


def test_config_fast_dev_run_writes_a_report(tmp_path, monkeypatch):
    from diffto import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    cli.main(["fit", "--config", "panda_goal_policy.yaml", "--trainer.fast_dev_run=true",
              "--model.init_args.train_configurations=4", "--model.init_args.batch_size=2",
              "--model.init_args.rollout_steps=20", "--model.init_args.via_steps=10",
              "--model.init_args.horizon=10", "--model.init_args.eval_episodes=1",
              "--model.init_args.report_episodes=1", "--model.init_args.video_episodes=0",
              "--model.init_args.refine_steps=1",
              "--model.init_args.env_kwargs.max_episode_steps=10"])
    report = json.loads(next(tmp_path.glob("**/report.json")).read_text())
    assert set(report["results"]) == {"direct MPC (target = goal)", "learned target, final",
                                      "learned target, final, refined (Adam steps: 1)"}
    assert report["env_steps"] == 0 and report["training_steps"] == 1
    assert "collision" in report["results"]["learned target, final"]
