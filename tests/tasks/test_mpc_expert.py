"""The generic expert and the receding-horizon controller (on the cheap swing-up expert): a
learned terminal value is the terminal cost it stands for, per-row resets, shifted warm starts
that save iterations, policy proposals, argument errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffto import QuadraticCost
from diffto.tasks.classic import PendulumSwingUpEnv, SwingUpExpert
from diffto.tasks.mpc_expert import MPCExpert, RecedingHorizon, terminal_value_cost


def _expert(**kwargs) -> SwingUpExpert:
    return SwingUpExpert(**{"dt": 0.1, "horizon": 15, "max_iter": 30, **kwargs})


def test_terminal_value_equals_the_quadratic_terminal_cost_it_stands_for():
    expert = _expert()
    x0 = torch.tensor([[0.6, -0.3], [-0.4, 0.8], [2.5, 0.0]], dtype=torch.float64)
    goal = torch.tensor([[0.1], [-0.2], [0.0]], dtype=torch.float64)
    P = torch.tensor([[30.0, 2.0], [2.0, 5.0]], dtype=torch.float64)
    target = torch.cat([goal, torch.zeros_like(goal)], -1)  # (B, 2): at the goal, at rest

    def value(xT: torch.Tensor) -> torch.Tensor:  # ½ (x − x*)ᵀ P (x − x*)
        d = xT - target
        return 0.5 * ((d @ P) * d).sum(-1)

    # The same term as a QuadraticCost: ½ xᵀ P x − x*ᵀ P x (+ a constant that moves no plan).
    T, k = expert.horizon, expert.n_state + expert.n_ctrl
    quadratic = QuadraticCost(torch.zeros(T, k, k, dtype=torch.float64),
                              torch.zeros(3, T, k, dtype=torch.float64),
                              P, -(target @ P))
    with torch.no_grad():
        learned = expert.solve(x0, goal, terminal_value=value)
        layer = expert.layer()
        known = layer(x0, expert.cost(goal, T) + quadratic, expert.dynamics,
                      u_init=expert.initial_controls(x0, goal, T))
        plain = expert.solve(x0, goal)
    assert learned.converged.all() and known.converged.all()
    torch.testing.assert_close(learned.u, known.u, atol=1e-6, rtol=0)
    constant = 0.5 * ((target @ P) * target).sum(-1)
    torch.testing.assert_close(learned.cost, known.cost + constant, atol=1e-8, rtol=1e-8)
    assert (learned.u - plain.u).abs().max() > 1e-3  # the term does change the plan


def test_terminal_value_cost_checks_its_argument():
    with pytest.raises(ValueError, match="terminal_value must be callable"):
        terminal_value_cost(3.0)


def test_base_methods_must_be_overridden():
    base = MPCExpert(torch.nn.Identity(), 5, [-1.0], [1.0], 3, 1e-4)
    with pytest.raises(NotImplementedError, match="cost"):
        base.cost(torch.zeros(1, 1), 5)
    with pytest.raises(ValueError, match="horizon must be an int >= 1"):
        MPCExpert(torch.nn.Identity(), 0, [-1.0], [1.0], 3, 1e-4)
    with pytest.raises(ValueError, match="hessian"):
        _expert(hessian="newton")
    with pytest.raises(ValueError, match="u_lower must be a float64 tensor"):
        MPCExpert(torch.nn.Identity(), 5, torch.tensor([-1.0]), [1.0], 3, 1e-4)


def _record_inits(expert, monkeypatch) -> list[torch.Tensor]:
    seen, solve = [], expert.solve

    def spy(state, goal, u_init=None, **kwargs):
        seen.append(u_init.clone())
        return solve(state, goal, u_init=u_init, **kwargs)

    monkeypatch.setattr(expert, "solve", spy)
    return seen


def test_per_row_reset_and_shifted_warm_start(monkeypatch):
    expert = _expert(max_iter=5)
    seen = _record_inits(expert, monkeypatch)
    controller = RecedingHorizon(expert, warm_start="shifted")
    states = np.array([[3.0, 0.2], [-2.9, -0.1]])
    goals = np.array([[0.1], [-0.1]])
    _, first = controller.act(states, goals)
    cold = expert.initial_controls(torch.as_tensor(states), torch.as_tensor(goals), 15)
    torch.testing.assert_close(seen[0], cold)
    controller.reset(mask=[True, False])
    next_states = first.x[:, 1].numpy()
    controller.act(next_states, goals)
    torch.testing.assert_close(seen[1][0], expert.initial_controls(
        torch.as_tensor(next_states[:1]), torch.as_tensor(goals[:1]), 15)[0])
    torch.testing.assert_close(seen[1][1], torch.cat([first.u[1, 1:], first.u[1, -1:]]))
    with pytest.raises(ValueError, match="mask must have shape"):
        controller.reset(mask=[True])
    controller.reset()
    controller.act(next_states, goals)
    torch.testing.assert_close(seen[2], expert.initial_controls(
        torch.as_tensor(next_states), torch.as_tensor(goals), 15))


def test_shifted_warm_start_takes_fewer_iterations_than_cold():
    B, steps = 2, 6
    iterations = {}
    for mode in ("shifted", "cold"):
        envs = [PendulumSwingUpEnv(dt=0.1) for _ in range(B)]
        expert = _expert()
        controller = RecedingHorizon(expert, warm_start=mode)
        obs = [env.reset(seed=j)[0] for j, env in enumerate(envs)]
        goals = np.stack([o["desired_goal"] for o in obs])
        total = 0.0
        for _ in range(steps):
            states = np.stack([expert.state_of(env) for env in envs])
            actions, sol = controller.act(states, goals)
            total += float(sol.iterations.double().mean())
            for env, a in zip(envs, actions, strict=True):
                env.step(a)
        iterations[mode] = total / steps
    assert iterations["shifted"] < 0.6 * iterations["cold"], iterations


def test_policy_proposals_reach_the_solver_and_errors_name_arguments(monkeypatch):
    expert = _expert(max_iter=2)
    seen = _record_inits(expert, monkeypatch)
    proposal = torch.full((1, 15, 1), 0.5, dtype=torch.float64)
    controller = RecedingHorizon(expert, warm_start="policy", proposer=lambda x, g: proposal)
    actions, _ = controller.act(np.array([[math.pi, 0.0]]), np.array([[0.0]]))
    torch.testing.assert_close(seen[0], proposal)
    assert actions.shape == (1, 1) and abs(actions[0, 0]) <= 1.0
    with pytest.raises(ValueError, match="needs a proposer"):
        RecedingHorizon(expert, warm_start="policy")
    with pytest.raises(ValueError, match="warm_start must be"):
        RecedingHorizon(expert, warm_start="previous")
    with pytest.raises(ValueError, match="states and goals must share the batch size"):
        controller.act(np.zeros((2, 2)), np.zeros((1, 1)))


def test_shifted_with_a_proposer_seeds_only_rows_without_a_plan_and_first_cap(monkeypatch):
    expert = _expert(max_iter=2)
    seen, caps, solve = [], [], expert.solve

    def spy(state, goal, u_init=None, max_iter=None, **kwargs):
        seen.append(u_init.clone())
        caps.append(max_iter)
        return solve(state, goal, u_init=u_init, max_iter=max_iter, **kwargs)

    monkeypatch.setattr(expert, "solve", spy)
    proposal = torch.full((2, 15, 1), 0.25, dtype=torch.float64)
    controller = RecedingHorizon(expert, warm_start="shifted", max_iter=2, first_max_iter=7,
                                 proposer=lambda x, g: proposal[: x.shape[0]])
    states, goals = np.array([[3.0, 0.2], [-2.9, -0.1]]), np.array([[0.1], [-0.1]])
    _, first = controller.act(states, goals)
    torch.testing.assert_close(seen[0], proposal)
    _, second = controller.act(first.x[:, 1].numpy(), goals)
    torch.testing.assert_close(seen[1], torch.cat([first.u[:, 1:], first.u[:, -1:]], 1))
    controller.reset(mask=[False, True])
    controller.act(second.x[:, 1].numpy(), goals)
    torch.testing.assert_close(seen[2][0], torch.cat([second.u[0, 1:], second.u[0, -1:]]))
    torch.testing.assert_close(seen[2][1], proposal[1])
    assert caps == [7, 2, 7]
    with pytest.raises(ValueError, match="first_max_iter"):
        RecedingHorizon(expert, first_max_iter=0)


def test_receding_horizon_terminal_value_sees_each_steps_goals(monkeypatch):
    expert = _expert(max_iter=2, horizon=5)
    calls = []

    def critic(xT: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        calls.append(goal.clone())
        return (xT[:, :1] - goal).pow(2).sum(-1)

    controller = RecedingHorizon(expert, terminal_value=critic, horizon=5)
    goals = np.array([[0.2], [-0.1]])
    controller.act(np.array([[0.3, 0.0], [0.1, 0.0]]), goals)
    assert calls and all(torch.equal(g, torch.as_tensor(goals)) for g in calls)
