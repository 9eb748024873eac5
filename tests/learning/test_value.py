"""The cost-to-go critic: it learns the realized cost-to-go, its checkpoint carries the
normalization, and as a learned terminal value it plugs into an expert's MPC solve."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from diffto.data.trajectories import TrajectorySet, cost_to_go, save_trajectories
from diffto.learning.value import (
    CostToGoCritic,
    CostToGoDataModule,
    LearnedTerminalValue,
    learned_terminal_value,
)
from diffto.tasks.classic.swingup_expert import SwingUpExpert
from diffto.tasks.mpc_expert import RecedingHorizon, terminal_value_cost


def linear_episodes(episodes: int, length: int, obs_dim: int, goal_dim: int,
                    seed: int = 0) -> TrajectorySet:
    """Episodes of ``x ← x + 0.2 (ḡ − x)`` (``ḡ`` the goal padded with zeros), stage cost
    ``‖x − ḡ‖² + 0.1‖x‖²``: a cost-to-go that depends on the state and the goal."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("observation", "next_observation", "desired_goal", "cost")}
    for _ in range(episodes):
        goal = rng.uniform(-1, 1, goal_dim)
        target = np.r_[goal, np.zeros(obs_dim - goal_dim)]
        x = rng.uniform(-2, 2, obs_dim)
        for _ in range(length):
            nxt = x + 0.2 * (target - x)
            rows["observation"].append(x)
            rows["next_observation"].append(nxt)
            rows["desired_goal"].append(goal)
            rows["cost"].append(((x - target) ** 2).sum() + 0.1 * (x**2).sum())
            x = nxt
    N = episodes * length
    episode = np.repeat(np.arange(episodes), length).astype(np.int64)
    cost = np.asarray(rows["cost"])
    return TrajectorySet(
        observation=np.asarray(rows["observation"]),
        action=np.zeros((N, 1)),
        next_observation=np.asarray(rows["next_observation"]),
        episode=episode,
        timestep=np.tile(np.arange(length), episodes).astype(np.int64),
        terminal=np.zeros(N, bool),
        truncated=np.tile(np.arange(length) == length - 1, episodes),
        desired_goal=np.asarray(rows["desired_goal"]),
        achieved_goal=np.asarray(rows["desired_goal"]),
        cost=cost,
        cost_to_go=cost_to_go(cost, episode),
    )


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)


def test_critic_learns_cost_to_go_far_below_the_constant_predictor(tmp_path):
    save_trajectories(tmp_path / "data.npz", linear_episodes(40, 20, 3, 1))
    dm = CostToGoDataModule(str(tmp_path / "data.npz"), batch_size=64, val_fraction=0.2)
    L.seed_everything(0, verbose=False)
    critic = CostToGoCritic(hidden=[64, 64], lr=3e-3)
    quiet_trainer(tmp_path, max_epochs=25, check_val_every_n_epoch=25).fit(critic, dm)
    assert critic.hparams.observation_dim == 3 and critic.hparams.goal_dim == 1
    val = dm.val_set
    with torch.no_grad():
        v = critic(torch.as_tensor(val.observation), torch.as_tensor(val.desired_goal)).numpy()
    mse = np.mean((v - val.cost_to_go) ** 2)
    # The constant predictor (the training mean) on the same held-out episodes.
    baseline = np.mean((dm.train_set.cost_to_go.mean() - val.cost_to_go) ** 2)
    assert mse < 0.05 * baseline, f"critic MSE {mse:.4g} vs constant {baseline:.4g}"


def test_checkpoint_carries_sizes_and_normalization(tmp_path):
    data = linear_episodes(4, 10, 3, 1)
    critic = CostToGoCritic(hidden=[16])
    critic.fit_normalization(data.observation, data.desired_goal, data.cost_to_go)
    assert critic.obs_mean.abs().sum() > 0 and critic.target_std > 1
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.strategy.connect(critic)
    trainer.save_checkpoint(tmp_path / "critic.ckpt")
    loaded = CostToGoCritic.load_from_checkpoint(tmp_path / "critic.ckpt")
    obs, goal = torch.randn(5, 3), torch.randn(5, 1)
    with torch.no_grad():
        assert torch.allclose(loaded(obs, goal), critic(obs, goal))
    assert bool(loaded.normalized)


def test_critic_argument_errors():
    with pytest.raises(ValueError, match="activation"):
        CostToGoCritic(activation="relu6")
    with pytest.raises(ValueError, match="input_noise"):
        CostToGoCritic(input_noise=-0.1)
    with pytest.raises(ValueError, match="observation_dim"):
        CostToGoCritic(observation_dim=0, goal_dim=1)
    critic = CostToGoCritic(observation_dim=3, goal_dim=1, hidden=[8])
    with pytest.raises(ValueError, match="observation"):
        critic(torch.zeros(2, 4), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="goal"):
        critic(torch.zeros(2, 3), None)
    with pytest.raises(ValueError, match="no network"):
        learned_terminal_value(CostToGoCritic(), None)


def pendulum_observation(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.cos(x[:, 0]), torch.sin(x[:, 0]), x[:, 1]], -1)


@pytest.fixture(scope="module")
def critic() -> CostToGoCritic:
    """A critic of the pendulum's observation and goal fitted briefly to ``1 − cos θ``-like
    targets: smooth, nonconstant, with nonzero curvature."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    theta, rate, goal = rng.uniform(-np.pi, np.pi, 256), rng.normal(0, 2, 256), \
        rng.uniform(-0.3, 0.3, 256)
    obs = np.stack([np.cos(theta), np.sin(theta), rate], -1)
    target = 30 * (1 - np.cos(theta - goal)) + rate**2
    c = CostToGoCritic(hidden=[32, 32])
    c.fit_normalization(obs, goal[:, None], target)
    opt = torch.optim.Adam(c.parameters(), lr=1e-2)
    o, g = torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(goal[:, None],
                                                                      dtype=torch.float32)
    y = (torch.as_tensor(target, dtype=torch.float32) - c.target_mean) / c.target_std
    for _ in range(200):
        opt.zero_grad()
        torch.mean((c.normalized_value(o, g) - y) ** 2).backward()
        opt.step()
    return c.eval()


def test_learned_terminal_value_plugs_into_the_expert_solve(critic):
    expert = SwingUpExpert(horizon=6, max_iter=30, tol=1e-7)
    states = torch.tensor([[2.5, 0.0], [-0.5, 1.0], [0.2, -0.3]], dtype=torch.float64,
                          requires_grad=True)
    goals = torch.tensor([[0.1], [-0.2], [0.0]], dtype=torch.float64)
    value = learned_terminal_value(critic, goals, observation_of=pendulum_observation)
    sol = expert.solve(states, goals, terminal_value=value)
    assert torch.isfinite(sol.u).all() and sol.converged.all()
    # The reported cost is the task's cost of the plan plus V at its last state.
    with torch.no_grad():
        base = expert.cost(goals, 6).evaluate(sol.x, sol.u)
        assert torch.allclose(sol.cost, base + value(sol.x[:, -1]), rtol=1e-6)
    # V enters the plan: without it the solution differs.
    plain = expert.solve(states.detach(), goals)
    assert (plain.u - sol.u).abs().max() > 1e-3
    # Gradients through the implicit backward and V's quadratic model are finite.
    (grad,) = torch.autograd.grad(sol.cost.sum() + sol.u.sum(), states)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    H, g, H_f, g_f = terminal_value_cost(value).derivatives(sol.x.detach(), sol.u.detach())
    assert torch.isfinite(H_f).all() and torch.isfinite(g_f).all()
    assert torch.allclose(H_f, H_f.transpose(-1, -2)) and H_f.abs().sum() > 0
    assert H.abs().sum() == 0  # the zero stage


def test_receding_horizon_takes_the_critic_as_terminal_value(critic):
    expert = SwingUpExpert(horizon=5, max_iter=20, tol=1e-7)
    terminal = LearnedTerminalValue(critic, pendulum_observation)
    states = np.array([[2.5, 0.0], [-0.5, 1.0]])
    goals = np.array([[0.1], [-0.2]])
    _, with_v = RecedingHorizon(expert, terminal_value=terminal).act(states, goals)
    _, without = RecedingHorizon(expert).act(states, goals)
    x_T = with_v.x[:, -1]
    expected = terminal(x_T, torch.as_tensor(goals))
    with torch.no_grad():
        base = expert.cost(torch.as_tensor(goals), 5).evaluate(with_v.x, with_v.u)
    assert torch.allclose(with_v.cost, base + expected, rtol=1e-6)
    assert not torch.allclose(with_v.u, without.u)


@pytest.mark.parametrize("config, obs_dim, goal_dim", [("pendulum_value.yaml", 3, 1),
                                                      ("panda_value.yaml", 14, 3)])
def test_value_config_fast_dev_run(tmp_path, monkeypatch, config, obs_dim, goal_dim):
    from diffto.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    save_trajectories(tmp_path / "data.npz", linear_episodes(6, 8, obs_dim, goal_dim))
    main(["fit", "--config", config, "--trainer.fast_dev_run=true", "--data.path=data.npz",
          "--trainer.enable_progress_bar=false"])
