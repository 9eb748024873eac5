"""The README's example runs, and its gradients reach the learned weights."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_layer_example_runs_and_trains():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    model = namespace["LearnedCostMPC"]()
    x0 = torch.tensor([[0.05, 0.0], [-0.03, 0.02]])  # small: controls off the bounds
    u = model(x0, torch.zeros(2, 2))
    assert u.shape == (2, 1)
    u.pow(2).sum().backward()
    assert model.log_q.grad is not None and torch.isfinite(model.log_q.grad).all()
    assert model.log_q.grad.abs().sum() > 0


def test_readme_panda_example_plans_torques_and_trains_the_goal_network():
    from diffto.tasks.panda import HOME, TORQUE_LIMITS

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(blocks[1], str(README), "exec"), namespace)
    model = namespace["GoalToTorques"](horizon=3)
    x = torch.cat([torch.tensor(HOME).expand(2, 7), torch.zeros(2, 7, dtype=torch.float64)], -1)
    u = model(x)
    assert u.shape == (2, 7) and torch.isfinite(u).all()
    assert (u.abs() <= torch.tensor(TORQUE_LIMITS) + 1e-9).all()
    u.pow(2).sum().backward()
    grad = model.goal_net[-1].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
