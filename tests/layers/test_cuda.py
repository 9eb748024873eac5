"""The layers on an accelerator: the same plans and gradients as on the CPU, outputs on the input's
device, float32 solves that converge there.

Every test solves one problem twice, once with CPU tensors and once with the same tensors on the
device, and compares plans, costs, solver status and the gradients of one loss w.r.t. every
input (float64, to 1e-8). The device is ``cuda`` unless ``DIFFTO_TEST_DEVICE`` names another
(``mps``, ``cuda:1``); the module is skipped where that device is absent, as on the CI machines.
Run it on a GPU machine with ``pytest tests/layers/test_cuda.py``.

Covered: ``LQR``, ``MPC`` (linear and nonlinear dynamics, box bounds given as floats or as
tensors, exact and Gauss-Newton Hessians, general costs, an MLP dynamics model in float32),
``SafetyFilter`` with ``cbf_constraints``, ``KinematicChain`` and ``ee_pose_cost``, and
``MujocoDynamics`` (MuJoCo steps on the CPU; states and gradients come back on the device) under
``MPC`` with the Panda's end-effector cost. ``QPMPC``, ``CasadiTO`` and ``TheseusTO`` solve on
the CPU by construction (cvxpy, IPOPT, Theseus's sparse solvers) and are not covered here.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor, nn

from diffto import LinearDynamics, NonlinearCost, QuadraticCost
from diffto.layers.lqr import LQR
from diffto.layers.mpc import MPC
from diffto.layers.safety import SafetyFilter, cbf_constraints
from diffto.tasks.classic.pendulum import Pendulum
from diffto.testing import random_lq

DEVICE = torch.device(os.environ.get("DIFFTO_TEST_DEVICE", "cuda"))


def _device_present(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return device.type == "cpu"


pytestmark = pytest.mark.skipif(not _device_present(DEVICE), reason=f"no {DEVICE} device")
F64 = torch.float64
TIGHT = dict(tol=1e-11, max_iter=80)


def on_both(run, *inputs: Tensor):
    """``run(*leaves)`` on CPU leaves and on device copies of them. ``run`` returns
    ``(outputs, loss)``; returns ``[(outputs, grads), (outputs, grads)]`` for CPU and device,
    with every gradient w.r.t. the inputs (``None`` kept where an input has no path)."""
    out = []
    for device in (torch.device("cpu"), DEVICE):
        leaves = [t.detach().to(device).requires_grad_() for t in inputs]
        outputs, loss = run(*leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        out.append((outputs, grads))
    return out


def assert_same(cpu, dev, atol: float = 1e-8, rtol: float = 1e-7) -> None:
    """Equal outputs (same device as the inputs) and equal gradients."""
    (out_c, g_c), (out_d, g_d) = cpu, dev
    for name, a in out_c.items():
        b = out_d[name]
        assert b.device.type == DEVICE.type, f"{name} came back on {b.device}, not {DEVICE}"
        if a.dtype == torch.bool or not a.is_floating_point():
            assert torch.equal(a, b.cpu()), f"{name}: {a} on the CPU, {b.cpu()} on {DEVICE}"
        else:
            torch.testing.assert_close(b.cpu(), a, atol=atol, rtol=rtol,
                                       msg=lambda m, name=name: f"{name}: {m}")
    for i, (a, b) in enumerate(zip(g_c, g_d, strict=True)):
        assert (a is None) == (b is None), f"gradient {i}: None on one device only"
        if a is not None:
            assert b.device.type == DEVICE.type
            torch.testing.assert_close(b.cpu(), a, atol=atol, rtol=rtol,
                                       msg=lambda m, i=i: f"gradient {i}: {m}")


def plan_loss(sol, seed: int = 0) -> Tensor:
    """A loss that reads every entry of the plan with a different fixed weight."""
    g = torch.Generator().manual_seed(seed)
    wx = torch.randn(sol.x.shape, generator=g, dtype=F64).to(sol.x)
    wu = torch.randn(sol.u.shape, generator=g, dtype=F64).to(sol.u)
    return (wx * sol.x).sum() + (wu * sol.u).sum()


def solution_outputs(sol) -> dict[str, Tensor]:
    return {"x": sol.x, "u": sol.u, "cost": sol.cost, "converged": sol.converged}


# ------------------------------------------------------------------------------ linear-quadratic
@pytest.mark.parametrize("seed", [0, 1])
def test_lqr_plans_gradients_and_extras_match_the_cpu(seed):
    B, T, n, m = 5, 7, 4, 2
    x0, C, c, C_f, c_f, F, f = random_lq(seed, B, T, n, m)

    def run(x0, C, c, C_f, c_f, F, f):
        sol = LQR()(x0, QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f))
        outputs = solution_outputs(sol) | {
            name: sol.extras[name] for name in ("gains", "feedforward", "costates")}
        return outputs, plan_loss(sol, seed)

    assert_same(*on_both(run, x0, C, c, C_f, c_f, F, f))


@pytest.mark.parametrize("bounds_as", ["floats", "tensors"])
def test_box_mpc_on_linear_dynamics_matches_the_cpu(bounds_as):
    """Active bounds (about half the controls at a bound); bounds as floats, or as tensors that
    ``layer.to(device)`` moves with the module."""
    B, T, n, m = 6, 8, 3, 2
    x0, C, c, C_f, c_f, F, f = random_lq(3, B, T, n, m)
    x0 = 3.0 * x0

    def run(x0, C, c, C_f, c_f, F, f):
        if bounds_as == "floats":
            layer = MPC(horizon=T, u_lower=-0.5, u_upper=0.5, **TIGHT)
        else:
            limit = torch.tensor([0.5, 0.3], dtype=F64)
            layer = MPC(horizon=T, u_lower=-limit, u_upper=limit, **TIGHT).to(x0.device)
        sol = layer(x0, QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f))
        active = sol.extras["active_lower"] | sol.extras["active_upper"]
        return solution_outputs(sol) | {"active": active}, plan_loss(sol)

    cpu, dev = on_both(run, x0, C, c, C_f, c_f, F, f)
    assert cpu[0]["converged"].all()
    assert 0.2 < cpu[0]["active"].double().mean() < 0.9, "the bounds should bind"
    assert_same(cpu, dev)


# ------------------------------------------------------------------------------ nonlinear MPC
@pytest.mark.parametrize("hessian", ["exact", "gauss_newton"])
def test_pendulum_mpc_with_a_general_cost_matches_the_cpu(hessian):
    """Nonlinear dynamics moved with ``.to(device)`` (its parameters get gradients), a
    ``NonlinearCost`` closing over device tensors, bounded torques."""
    B, T = 4, 12
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(B, 2, generator=g, dtype=F64) * torch.tensor([0.8, 0.5], dtype=F64)
    goal = 0.2 * torch.randn(B, 2, generator=g, dtype=F64)
    q = torch.tensor([6.0, 0.5], dtype=F64)
    grads_of_pendulum = {}

    def run(x0, goal, q):
        pendulum = Pendulum(damping=0.1, learnable=("mass", "damping")).double().to(x0.device)

        def stage(x, u):
            e = x - goal.unsqueeze(-2)
            return (q * torch.log(torch.cosh(e))).sum(-1) + 0.05 * u.pow(2).sum(-1)

        cost = NonlinearCost(stage, lambda xT: 3.0 * (q * (xT - goal).pow(2)).sum(-1))
        sol = MPC(pendulum, T, u_lower=-1.5, u_upper=1.5, hessian=hessian, **TIGHT)(x0, cost)
        loss = plan_loss(sol)
        grads_of_pendulum[x0.device.type] = torch.autograd.grad(
            loss, list(pendulum.parameters()), retain_graph=True)
        return solution_outputs(sol), loss

    cpu, dev = on_both(run, x0, goal, q)
    assert cpu[0]["converged"].all()
    assert_same(cpu, dev)
    for a, b in zip(grads_of_pendulum["cpu"], grads_of_pendulum[DEVICE.type], strict=True):
        assert b.device.type == DEVICE.type
        torch.testing.assert_close(b.cpu(), a, atol=1e-8, rtol=1e-7)


class _ResidualMLP(nn.Module):
    """``x + dt · mlp([x; u])`` with fixed weights: a learned dynamics model."""

    def __init__(self, n: int, m: int, hidden: int = 32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Linear(n + m, hidden), nn.Tanh(), nn.Linear(hidden, n))
        with torch.no_grad():
            for layer in (self.net[0], self.net[2]):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen)
                                   / layer.weight.shape[1] ** 0.5)
                layer.bias.zero_()

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        return x + 0.1 * self.net(torch.cat([x, u], -1))


def test_float32_mlp_dynamics_mpc_converges_and_agrees_with_the_cpu():
    """The GPU use case: a batch of MPC problems over an MLP model in float32, gradients into
    the model's weights and the goal; CPU and device agree to float32 accuracy."""
    B, T, n, m = 64, 15, 6, 2
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(B, n, generator=g)
    goal = 0.5 * torch.randn(B, n, generator=g)
    results = {}
    for device in (torch.device("cpu"), DEVICE):
        model = _ResidualMLP(n, m).to(device)
        x0_d = x0.to(device).requires_grad_()
        goal_d = goal.to(device).requires_grad_()
        Q, R = torch.eye(n, device=device), 0.1 * torch.eye(m, device=device)
        cost = QuadraticCost.tracking(Q, R, T, x_goal=goal_d, Q_final=10.0 * Q)
        sol = MPC(model, T, u_lower=-1.0, u_upper=1.0, tol=1e-5, max_iter=50)(x0_d, cost)
        loss = (sol.x[:, -1] - goal_d).pow(2).sum() + 0.1 * sol.u.pow(2).sum()
        grads = torch.autograd.grad(loss, [x0_d, goal_d, *model.parameters()])
        results[device.type] = (sol, grads)
    (sol_c, g_c), (sol_d, g_d) = results["cpu"], results[DEVICE.type]
    assert sol_d.u.device.type == DEVICE.type and sol_d.u.dtype == torch.float32
    assert sol_c.converged.float().mean() >= 0.95 and sol_d.converged.float().mean() >= 0.95
    both = sol_c.converged & sol_d.converged.cpu()
    torch.testing.assert_close(sol_d.u.cpu()[both], sol_c.u[both], atol=2e-3, rtol=0)
    for a, b in zip(g_c, g_d, strict=True):
        scale = a.abs().max().clamp_min(1.0)
        assert (b.cpu() - a).abs().max() <= 2e-2 * scale


# ------------------------------------------------------------------------------ safety filter
def test_safety_filter_with_cbf_constraints_matches_the_cpu():
    """A keep-out half-space and torque bounds as CBF rows of a double integrator; gradients
    w.r.t. the proposed actions, the state and the barrier's offset."""
    N = 8
    g = torch.Generator().manual_seed(4)
    dt = 0.1
    A = torch.tensor([[1.0, dt], [0.0, 1.0]], dtype=F64)
    Bm = torch.tensor([[0.5 * dt**2], [dt]], dtype=F64)
    x = torch.randn(N, 2, generator=g, dtype=F64) * 0.3
    a = 2.0 * torch.randn(N, 1, generator=g, dtype=F64)
    q = torch.tensor([1.0], dtype=F64)

    def run(x, a, q):
        P = torch.tensor([[1.0, 0.0]], dtype=F64, device=x.device)
        G, h = cbf_constraints(A.to(x.device), Bm.to(x.device), x, P, q, alpha=0.3,
                               u_lower=-1.0, u_upper=1.0)
        safe, info = SafetyFilter()(a, G, h, return_info=True)
        loss = (safe * torch.linspace(1.0, 2.0, N, dtype=F64, device=x.device)[:, None]).sum()
        return {"safe": safe, "converged": info["converged"]}, loss

    cpu, dev = on_both(run, x, a, q)
    assert cpu[0]["converged"].all()
    assert not torch.equal(cpu[0]["safe"], a), "some actions should be filtered"
    assert_same(cpu, dev)


# ------------------------------------------------------------------------------ robot layers
def test_panda_kinematics_and_ee_pose_cost_match_the_cpu():
    from diffto.layers.robot_costs import ee_pose_cost
    from diffto.tasks.panda.kinematics import panda_chain

    chain = panda_chain()
    g = torch.Generator().manual_seed(6)
    B, T = 3, 4
    x = torch.cat([0.3 * torch.randn(B, T + 1, 7, generator=g, dtype=F64),
                   torch.randn(B, T + 1, 7, generator=g, dtype=F64)], -1)
    u = torch.randn(B, T, 7, generator=g, dtype=F64)
    goal = torch.tensor([[0.5, 0.1, 0.4]], dtype=F64).expand(B, 3).clone()

    def run(x, u, goal):
        pose = chain.forward_kinematics(x[:, 0, :7])
        cost = ee_pose_cost(chain, goal, position_weight=100.0, velocity_weight=0.1)
        value = cost.evaluate(x, u)
        return {"pose": pose, "cost": value}, value.sum() + pose.sum()

    assert_same(*on_both(run, x, u, goal))


def test_mpc_over_mujoco_dynamics_with_the_panda_cost_matches_the_cpu():
    """MuJoCo steps on the CPU; ``MujocoDynamics`` takes device states and returns device states,
    Jacobians and gradients, so an MPC over it runs with device inputs end to end."""
    from diffto.layers.mujoco_dynamics import MujocoDynamics
    from diffto.layers.robot_costs import ee_pose_cost
    from diffto.tasks.panda.kinematics import panda_chain
    from diffto.tasks.panda.model import load_model

    model = load_model(0.01, gravity_compensation=True)
    dynamics = MujocoDynamics(model, substeps=2)
    chain = panda_chain(model)
    T = 4
    x0 = torch.zeros(2, 14, dtype=F64)
    x0[:, :7] = torch.tensor([0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.8], dtype=F64)
    x0[1, :7] += 0.1
    goal = torch.tensor([[0.45, 0.05, 0.45], [0.40, -0.10, 0.50]], dtype=F64)

    def run(x0, goal):
        cost = ee_pose_cost(chain, goal, position_weight=100.0, velocity_weight=0.09,
                            control_weight=1e-4, terminal_weight=9.0)
        sol = MPC(dynamics, T, u_lower=-12.0, u_upper=12.0, tol=1e-6, max_iter=40,
                  hessian="gauss_newton")(x0, cost)
        return solution_outputs(sol), plan_loss(sol)

    cpu, dev = on_both(run, x0, goal)
    assert cpu[0]["converged"].all()
    # Finite-difference Jacobians cap the reachable tolerance near 1e-6 (relative step): the two
    # solves may stop an iteration apart, so they agree to that tolerance, not to rounding.
    assert_same(cpu, dev, atol=1e-5, rtol=1e-5)
