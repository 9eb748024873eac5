"""Policy warm starts: the rollout proposer's shape, bounds and model consistency, and the
receding-horizon path that uses it (an exact proposal needs at most two iterations)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from diffto.learning.warm_start import PolicyWarmStart, rollout_policy
from diffto.tasks.classic.swingup_expert import SwingUpExpert
from diffto.tasks.mpc_expert import RecedingHorizon


def pendulum_observation(x: Tensor) -> Tensor:
    """``[cos θ, sin θ, θ̇]`` of planning states ``(B, 2)``: the swing-up env's observation."""
    return torch.stack([torch.cos(x[:, 0]), torch.sin(x[:, 0]), x[:, 1]], -1)


class LinearPolicy(nn.Module):
    """``a = W [o; g]``: a stand-in for a trained policy (float32, like the real ones)."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[0.0, -gain, -0.5 * gain, gain]]))
            self.linear.bias.zero_()

    def forward(self, observation: Tensor, goal: Tensor) -> Tensor:
        return self.linear(torch.cat([observation, goal], -1))


class PlanReplay(nn.Module):
    """A policy that knows one solved plan per row: at the planning state nearest to the
    observed one along the row's plan it returns that stage's action. Rolled out through the
    same model from the same start it reproduces the plan exactly."""

    def __init__(self, expert: SwingUpExpert, x: Tensor, u: Tensor) -> None:
        super().__init__()
        self.expert = expert
        self.register_buffer("x", x[:, :-1].clone())  # (B, T, n)
        self.register_buffer("a", torch.as_tensor(expert.to_action(u.reshape(-1, 1))).view(
            u.shape))

    def forward(self, observation: Tensor, goal: Tensor) -> Tensor:
        obs_plan = pendulum_observation(self.x.reshape(-1, 2)).view(*self.x.shape[:2], 3)
        t = (obs_plan - observation[:, None]).norm(dim=-1).argmin(1)  # (B,)
        return self.a[torch.arange(len(t)), t]


@pytest.fixture(scope="module")
def expert() -> SwingUpExpert:
    return SwingUpExpert(horizon=12, max_iter=50, tol=1e-8)


def test_proposal_shape_bounds_and_model_consistency(expert):
    states = torch.tensor([[math.pi - 0.05, 0.1], [2.0, -1.0], [0.3, 2.0]], dtype=torch.float64)
    goals = torch.tensor([[0.2], [-0.1], [0.0]], dtype=torch.float64)
    proposer = PolicyWarmStart(LinearPolicy(gain=20.0), expert,
                               observation_of=pendulum_observation)
    u, x = proposer.rollout(states, goals)
    assert u.shape == (3, expert.horizon, 1) and u.dtype == torch.float64
    assert x.shape == (3, expert.horizon + 1, 2)
    limit = expert.torque_limit
    assert (u.abs() <= limit + 1e-12).all()
    assert (u.abs() == limit).any(), "the strong policy must saturate: the bounds are not tested"
    # The proposal is the policy's closed-loop rollout through the expert's model.
    assert torch.allclose(expert.rollout(states, u), x, atol=1e-12)
    assert torch.equal(proposer(states, goals), u)
    # Each control is the policy's action at the predicted state (then clipped).
    with torch.no_grad():
        a = LinearPolicy(gain=20.0)(pendulum_observation(x[:, 3]).float(), goals.float())
    assert torch.allclose(u[:, 3], expert.to_control(a.double()).clamp(-limit, limit),
                          atol=1e-5)


def test_rollout_policy_validates_its_arguments(expert):
    policy = LinearPolicy(gain=1.0)
    with pytest.raises(ValueError, match="horizon"):
        rollout_policy(policy, expert.dynamics, torch.zeros(2, 2), torch.zeros(2, 1), 0)
    with pytest.raises(ValueError, match="goal"):
        rollout_policy(policy, expert.dynamics, torch.zeros(2, 2), torch.zeros(3, 1), 4)
    with pytest.raises(ValueError, match="expert"):
        PolicyWarmStart(policy, object())


def test_exact_proposal_converges_at_once_in_receding_horizon(expert):
    """A proposer that returns the optimum: the receding-horizon solve that starts from it
    stops within two iterations; the cold start of the same states needs more."""
    candidates = torch.tensor([[-1.2, 2.0], [2.0, -1.0], [3.0, 0.0], [1.5, 0.0], [-2.5, 1.0]],
                              dtype=torch.float64)
    goals = torch.tensor([[-0.2], [0.0], [0.1], [0.1], [0.0]], dtype=torch.float64)
    cold = expert.solve(candidates, goals)
    # Rows the cold start needs at least 3 iterations for: there a proposer ignored by the
    # controller (which then starts cold) fails the check below.
    hard = cold.converged & (cold.iterations >= 3)
    assert hard.sum() >= 2, f"too easy a problem, cold iterations {cold.iterations.tolist()}"
    states, goals = candidates[hard], goals[hard]
    cold = expert.solve(states, goals)
    proposer = PolicyWarmStart(PlanReplay(expert, cold.x, cold.u), expert,
                               observation_of=pendulum_observation)
    assert torch.allclose(proposer(states, goals), cold.u, atol=1e-6)
    controller = RecedingHorizon(expert, warm_start="policy", proposer=proposer)
    actions, sol = controller.act(states.numpy(), goals.numpy())
    assert sol.converged.all()
    assert (sol.iterations <= 2).all(), sol.iterations
    np.testing.assert_allclose(actions, expert.to_action(cold.u[:, 0]), atol=1e-6)


def test_proposer_from_a_gcbc_checkpoint(tmp_path, expert):
    """The config path: a goal-conditioned BC checkpoint's policy, rolled out; its
    observation (here the env's observation and achieved goal) is rebuilt from the planned
    states with the expert's maps."""
    import lightning as L

    from diffto.learning.gcbc import GoalConditionedBC

    module = GoalConditionedBC(env_id="diffto/PendulumSwingUp-v0", hidden=[8],
                               observation_keys=["observation", "achieved_goal"],
                               expert_baseline=False, report=False)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "bc.ckpt")
    proposer = PolicyWarmStart(str(tmp_path / "bc.ckpt"), expert, horizon=7)
    states = torch.tensor([[3.0, 0.0], [0.1, 0.5]], dtype=torch.float64)
    goals = torch.tensor([[0.0], [0.2]], dtype=torch.float64)
    u = proposer(states, goals)
    assert u.shape == (2, 7, 1) and (u.abs() <= expert.torque_limit).all()
    with torch.no_grad():
        obs = torch.cat([pendulum_observation(states), states[:, :1]], -1)  # θ in [-π, π)
        first = module.policy(obs.float(), goals.float())
    assert torch.allclose(u[:, 0], expert.to_control(first.double()), atol=1e-5)
