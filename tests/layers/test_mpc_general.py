"""MPC beyond quadratic costs and torch-only dynamics: general costs, dynamics that bring their
own Jacobians, gradients to closed-over tensors, failed rows, and the layer's contract."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from diffto import LeastSquaresCost, LinearDynamics, NonlinearCost, QuadraticCost
from diffto.layers.mpc import MPC
from diffto.tasks.classic import Pendulum
from diffto.testing import central_differences

F64 = torch.float64
TIGHT = dict(tol=1e-11, max_iter=80)
T = 8


def states(B: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, generator=g, dtype=F64) * torch.tensor([0.6, 0.5], dtype=F64)


def tracking_nonlinear(q: torch.Tensor, r: torch.Tensor, goal: torch.Tensor) -> NonlinearCost:
    """``QuadraticCost.tracking(q, r, T, x_goal=goal)`` written as a NonlinearCost."""

    def stage(x, u):
        return 0.5 * ((x - goal.unsqueeze(-2)) ** 2 * q).sum(-1) + 0.5 * (u**2 * r).sum(-1)

    return NonlinearCost(stage, lambda xT: 0.5 * ((xT - goal) ** 2 * q).sum(-1))


@given(seed=st.integers(0, 2**16), bounded=st.booleans())
def test_quadratic_written_as_nonlinear_or_least_squares_cost_matches(seed, bounded):
    """The same quadratic as QuadraticCost, NonlinearCost and LeastSquaresCost: equal plans and
    equal gradients w.r.t. the goal, the weights and x0 (float64, 1e-9)."""
    B = 3
    x0 = states(B, seed).requires_grad_()
    goal = (0.3 * states(B, seed + 1)).requires_grad_()
    q = torch.tensor([10.0, 1.0], dtype=F64, requires_grad=True)
    r = torch.tensor([0.1], dtype=F64, requires_grad=True)
    bounds = dict(u_lower=-1.0, u_upper=1.0) if bounded else {}
    mpc = MPC(Pendulum().double(), T, **bounds, **TIGHT)
    w = torch.linspace(-1, 1, T, dtype=F64).view(1, T, 1)

    def run(cost):
        sol = mpc(x0, cost)
        assert sol.converged.all()
        loss = (sol.u * w).sum() + sol.x[:, -1].pow(2).sum()
        return sol, torch.autograd.grad(loss, (x0, goal, q, r))

    ref, g_ref = run(QuadraticCost.tracking(q, r, T, x_goal=goal))
    least_squares = LeastSquaresCost(
        lambda x, u: torch.cat([(x - goal.unsqueeze(-2)) * q.sqrt(), u * r.sqrt()], -1),
        lambda xT: (xT - goal) * q.sqrt())
    for cost in (tracking_nonlinear(q, r, goal), least_squares):
        sol, grads = run(cost)
        torch.testing.assert_close(sol.u, ref.u, atol=1e-9, rtol=0)
        for a, b in zip(grads, g_ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_nonlinear_cost_gradients_match_central_differences_of_resolves():
    """A non-quadratic cost (log-cosh tracking, a learned weight inside an nn.Module) with active
    bounds: gradients w.r.t. the goal and the module's parameter equal re-solves' differences."""
    x0 = torch.tensor([[0.9, 0.0], [-0.6, 0.4], [0.3, -0.5]], dtype=F64)

    class LogCosh(nn.Module):
        def __init__(self, goal):
            super().__init__()
            self.log_w = nn.Parameter(torch.tensor(1.5, dtype=F64))
            self.goal = goal

        def forward(self, x, u):
            e = x - self.goal.unsqueeze(-2)
            return self.log_w.exp() * torch.log(torch.cosh(e)).sum(-1) + 0.05 * u.pow(2).sum(-1)

    mpc = MPC(Pendulum().double(), T, u_lower=-0.8, u_upper=0.8, **TIGHT)
    goal = torch.tensor([[0.1, 0.0], [0.0, 0.2], [-0.2, 0.0]], dtype=F64)

    def loss(goal_value, log_w=None):
        stage = LogCosh(goal_value)
        if log_w is not None:
            stage.log_w.data.fill_(float(log_w))
        sol = mpc(x0, NonlinearCost(stage, lambda xT: (xT - goal_value).pow(2).sum(-1)))
        assert sol.converged.all()
        return (sol.u[..., 0] * torch.arange(1, T + 1, dtype=F64)).sum() + sol.x.sum(), stage

    g = goal.clone().requires_grad_()
    value, stage = loss(g)
    assert (mpc(x0, NonlinearCost(stage)).extras["active_upper"]
            | mpc(x0, NonlinearCost(stage)).extras["active_lower"]).any()
    d_goal, d_w = torch.autograd.grad(value, (g, stage.log_w))
    with torch.no_grad():
        fd_goal = central_differences(lambda t: loss(t)[0], [goal])[0]
        fd_w = central_differences(lambda t: loss(goal, t)[0], [torch.tensor(1.5, dtype=F64)])[0]
    torch.testing.assert_close(d_goal, fd_goal, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d_w, fd_w, atol=1e-6, rtol=1e-6)


class ClosedOverPendulum:
    """A plain callable (no nn.Module) whose mass is a tensor it closes over."""

    n_ctrl = 1

    def __init__(self, mass: torch.Tensor) -> None:
        self.mass = mass

    def __call__(self, x, u):
        th, om = x[:, :1], x[:, 1:]
        om_next = om + 0.05 * (9.81 * torch.sin(th) + u / self.mass)
        return torch.cat([th + 0.05 * om_next, om_next], -1)


def test_gradients_reach_tensors_a_dynamics_closes_over():
    x0 = states(3, 4)
    cost = QuadraticCost.tracking(torch.tensor([5.0, 1.0], dtype=F64),
                                  torch.tensor([0.1], dtype=F64), T)
    mpc = MPC(horizon=T, u_lower=-2.0, u_upper=2.0, **TIGHT)  # dynamics given per call

    def loss(mass):
        return mpc(x0, cost, ClosedOverPendulum(mass)).u.sum()

    mass = torch.tensor(1.3, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(mass), mass)
    with torch.no_grad():
        fd = central_differences(loss, [mass.detach()])[0]
    assert grad.abs() > 1e-3
    torch.testing.assert_close(grad, fd, atol=1e-6, rtol=1e-6)


class CountingPendulum(nn.Module):
    """Pendulum whose forward vmap cannot run (a data-dependent Python branch) and whose
    ``jacobians`` are counted, to check that the layer uses them."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Pendulum().double()
        self.n_ctrl = 1
        self.calls = 0

    def forward(self, x, u):
        if bool((x.abs() > 1e6).any()):  # data-dependent control flow: not vmap-able
            raise ValueError("state out of range")
        return self.inner(x, u)

    def jacobians(self, x, u):
        self.calls += 1
        return self.inner.jacobians(x, u)


def test_dynamics_jacobians_are_used_and_non_vmappable_modules_work():
    x0 = states(4, 5)
    goal = torch.zeros(2, dtype=F64)
    cost = tracking_nonlinear(torch.tensor([10.0, 1.0], dtype=F64),
                              torch.tensor([0.1], dtype=F64), goal)
    ref = MPC(Pendulum().double(), T, u_lower=-1.0, u_upper=1.0, **TIGHT)(x0, cost)
    counting = CountingPendulum()
    sol = MPC(counting, T, u_lower=-1.0, u_upper=1.0, **TIGHT)(x0, cost)
    assert counting.calls > 0 and sol.converged.all()
    torch.testing.assert_close(sol.u, ref.u, atol=1e-9, rtol=0)

    class NoJacobians(CountingPendulum):
        jacobians = None  # falls back to reverse passes of autograd

    fallback = MPC(NoJacobians(), T, u_lower=-1.0, u_upper=1.0, **TIGHT)(x0, cost)
    torch.testing.assert_close(fallback.u, ref.u, atol=1e-9, rtol=0)


def test_a_row_with_nan_dynamics_is_flagged_and_leaks_no_gradient():
    """Row 1 leaves the dynamics' domain (NaN): it is flagged, gets zero gradient, and the
    shared parameter's and the goal's gradients are those of the other rows alone."""

    class Domain(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.tensor(1.0, dtype=F64))

        def forward(self, x, u):
            out = torch.cat([x[:, :1] + 0.05 * x[:, 1:], x[:, 1:] + 0.05 * self.gain * u], -1)
            return torch.where(x[:, :1] > 0.9, torch.nan, out)

    x0 = torch.tensor([[0.2, 0.0], [1.5, 0.0], [-0.4, 0.3]], dtype=F64)
    goal = torch.zeros(3, 2, dtype=F64, requires_grad=True)
    q = torch.ones(2, dtype=F64, requires_grad=True)  # a cost weight every row shares
    dyn = Domain()
    sol = MPC(dyn, T, u_lower=-2.0, u_upper=2.0)(x0, QuadraticCost.tracking(
        q, torch.full((1,), 0.1, dtype=F64), T, x_goal=goal))
    assert sol.converged.tolist() == [True, False, True]
    assert torch.isnan(sol.cost[1]) and torch.isfinite(sol.cost[[0, 2]]).all()
    g_goal, g_gain = torch.autograd.grad(sol.u[sol.converged].sum(), (goal, dyn.gain),
                                         retain_graph=True)
    # The reported cost of the good rows differentiates cleanly too.
    g_cost = torch.autograd.grad(sol.cost[sol.converged].sum(), (q, dyn.gain))
    assert all(torch.isfinite(g).all() for g in g_cost)
    assert torch.isfinite(g_goal).all() and torch.isfinite(g_gain)
    assert (g_goal[1] == 0).all() and g_goal[[0, 2]].abs().sum() > 0

    keep = [0, 2]
    goal2 = torch.zeros(2, 2, dtype=F64, requires_grad=True)
    alone = MPC(dyn, T, u_lower=-2.0, u_upper=2.0)(x0[keep], QuadraticCost.tracking(
        torch.ones(2, dtype=F64), torch.full((1,), 0.1, dtype=F64), T, x_goal=goal2))
    g2_goal, g2_gain = torch.autograd.grad(alone.u.sum(), (goal2, dyn.gain))
    torch.testing.assert_close(g_goal[keep], g2_goal)
    torch.testing.assert_close(g_gain, g2_gain)


def test_a_stalled_line_search_is_not_reported_converged():
    """Wrong Jacobians make every line search fail; the regularization then shrinks the step
    below tol, but the unregularized residual shows the plan is not stationary."""

    class WrongJacobians(nn.Module):
        n_ctrl = 1

        def __init__(self):
            super().__init__()
            self.inner = Pendulum().double()

        def forward(self, x, u):
            return self.inner(x, u)

        def jacobians(self, x, u):
            A, B = self.inner.jacobians(x, u)
            return A, -B  # the control acts the other way

    x0 = torch.tensor([[0.8, 0.0], [-0.5, 0.2]], dtype=F64)
    cost = QuadraticCost.tracking(torch.tensor([10.0, 1.0], dtype=F64),
                                  torch.tensor([0.1], dtype=F64), T)
    sol = MPC(WrongJacobians(), T, u_lower=-1.0, u_upper=1.0, max_iter=100)(x0, cost)
    assert not sol.converged.any()
    assert (sol.extras["residual"] > 1e-3).all()
    good = MPC(Pendulum().double(), T, u_lower=-1.0, u_upper=1.0)(x0, cost)
    assert good.converged.all() and (good.extras["residual"] < 1e-6).all()


def test_bounds_are_buffers_and_follow_dtype_and_device_moves():
    F = torch.cat([torch.eye(2), torch.tensor([[0.0], [0.1]])], -1).expand(T, 2, 3)
    mpc = MPC(LinearDynamics(F.float()), T, u_lower=torch.full((1,), -0.5),
              u_upper=torch.full((1,), 0.5))
    assert {"u_lower", "u_upper"} <= set(mpc.state_dict())
    mpc = mpc.double().to("cpu")
    assert mpc.dynamics.F.dtype == F64 and mpc.u_lower.dtype == F64
    cost = QuadraticCost.tracking(torch.ones(2, dtype=F64), torch.ones(1, dtype=F64), T)
    sol = mpc(torch.tensor([[1.0, 0.0]], dtype=F64), cost)
    assert sol.converged.all() and (sol.u.abs() <= 0.5 + 1e-12).all()


def test_contract_errors_and_transforms():
    x0 = states(2, 1)
    cost = QuadraticCost.tracking(torch.ones(2, dtype=F64), torch.ones(1, dtype=F64), T)
    with pytest.raises(ValueError, match="u_lower"):
        MPC(Pendulum().double(), T, u_lower=float("inf"))
    with pytest.raises(ValueError, match="u_upper"):
        MPC(Pendulum().double(), T, u_upper=float("-inf"))
    with pytest.raises(ValueError, match="dynamics"):
        MPC(horizon=T)(x0, cost)
    with pytest.raises(ValueError, match="cost"):
        MPC(Pendulum().double(), T)(x0, "not a cost")
    with pytest.raises(ValueError, match="control dimension"):
        MPC(lambda x, u: x, T)(x0, NonlinearCost(lambda x, u: x.sum(-1)))

    class Limited(nn.Module):
        n_ctrl = 1
        u_lower = torch.tensor([-1.0], dtype=F64)
        u_upper = torch.tensor([1.0], dtype=F64)

        def forward(self, x, u):
            return x + 0.1 * torch.cat([x[:, 1:], u], -1)

    with pytest.raises(ValueError, match="u_upper"):
        MPC(Limited(), T, u_lower=-1.0, u_upper=2.0)(x0, cost)
    with pytest.raises(ValueError, match="u_lower"):
        MPC(Limited(), T)(x0, cost)
    assert MPC(Limited(), T, u_lower=-1.0, u_upper=1.0)(x0, cost).converged.all()

    mpc = MPC(Pendulum().double(), T)
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(lambda x: mpc(x.unsqueeze(0), cost).u)(x0)
    compiled = torch.compile(lambda x: mpc(x, cost).u * 2, backend="eager")
    torch.testing.assert_close(compiled(x0), mpc(x0, cost).u * 2)


def test_shifted_warm_start_and_cost_sums():
    x0 = states(2, 2)
    q, r = torch.tensor([10.0, 1.0], dtype=F64), torch.tensor([0.1], dtype=F64)
    quadratic = QuadraticCost.tracking(q, r, T)
    extra = NonlinearCost(lambda x, u: 0.3 * torch.cos(x[..., 0]) ** 2)
    mpc = MPC(Pendulum().double(), T, u_lower=-1.0, u_upper=1.0, **TIGHT)
    both = mpc(x0, quadratic + extra)
    assert both.converged.all()
    torch.testing.assert_close(both.cost, quadratic.evaluate(both.x, both.u)
                               + extra.evaluate(both.x, both.u))
    cold = mpc(both.x[:, 1], quadratic + extra)
    warm = mpc(both.x[:, 1], quadratic + extra, u_init=both.shifted())
    assert warm.converged.all()
    assert warm.iterations.sum() <= cold.iterations.sum()
    torch.testing.assert_close(warm.u, cold.u, atol=1e-8, rtol=0)
    assert both.shifted().shape == both.u.shape
    torch.testing.assert_close(both.shifted()[:, :-1], both.u[:, 1:])


def test_rows_out_of_iteration_budget_are_flagged_with_a_finite_residual():
    """A linear problem with many active bounds and a budget of one iteration: the rows the
    active-set solver does not settle come back flagged, with a finite residual."""
    g = torch.Generator().manual_seed(3)
    n, m = 4, 2
    A = torch.eye(n, dtype=F64) + 0.3 * torch.randn(n, n, generator=g, dtype=F64)
    Bm = torch.randn(n, m, generator=g, dtype=F64)
    dyn = LinearDynamics.time_invariant(A, Bm, T)
    cost = QuadraticCost.tracking(torch.ones(n, dtype=F64), 0.01 * torch.ones(m, dtype=F64), T)
    x0 = 3 * torch.randn(6, n, generator=g, dtype=F64)
    sol = MPC(dyn, T, u_lower=-0.2, u_upper=0.2, max_iter=1)(x0, cost)
    assert torch.isfinite(sol.extras["residual"]).all()
    assert not sol.converged.all()
    full = MPC(dyn, T, u_lower=-0.2, u_upper=0.2, max_iter=80)(x0, cost)
    assert full.converged.all() and (full.extras["residual"] < 1e-6).all()
