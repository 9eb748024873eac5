"""TheseusTO: exact implicit gradients (LQR, finite differences), backward modes, status."""

import math

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from diffto.costs import LeastSquaresCost, NonlinearCost
from diffto.layers.lqr import LQR
from diffto.layers.theseus import TheseusTO
from diffto.problem import LinearDynamics, QuadraticCost
from diffto.testing import central_differences, random_lq, small_lq_dims

D = torch.float64
DT = 0.1


class Pendulum(nn.Module):
    """Damped pendulum, Euler step, learnable ``g/l``; x = [angle, rate]."""

    def __init__(self, g: float = 9.81) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.tensor(g, dtype=D))

    def forward(self, x, u):
        th, om = x[..., 0], x[..., 1]
        return torch.stack(
            [th + DT * om, om + DT * (-self.g * torch.sin(th) + u[..., 0] - 0.1 * om)], -1
        )


def swing_up(T: int):
    x0 = torch.tensor([[0.0, 0.0], [0.3, -0.2]], dtype=D)
    Q = torch.tensor([1.0, 0.1], dtype=D)
    R = torch.tensor([0.05], dtype=D)
    goal = torch.tensor([math.pi, 0.0], dtype=D)
    return x0, Q, R, goal


def make_cost(Q, R, goal, T):
    return QuadraticCost.tracking(Q, R, T, x_goal=goal, Q_final=10 * Q)


@settings(max_examples=3)
@given(**small_lq_dims())
def test_implicit_matches_lqr(seed, B, T, n, m):
    """Plan and gradients w.r.t. every input (C and F included) equal LQR's."""
    x0, C, c, C_f, c_f, F, f = random_lq(seed, B, T, n, m)
    inputs = (x0, C, c, C_f, c_f, F, f)
    for t in inputs:
        t.requires_grad_(True)
    cost, dyn = QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f)
    ref = LQR()(x0, cost, dyn)
    sol = TheseusTO(dyn, T)(x0, cost)
    assert sol.converged.all(), sol.extras["status"]
    torch.testing.assert_close(sol.x, ref.x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(sol.u, ref.u, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(
        sol.extras["costates"], ref.extras["costates"], atol=1e-8, rtol=1e-8
    )
    seed_u = torch.randn_like(ref.u)
    g_ref = torch.autograd.grad((ref.u * seed_u).sum() + ref.cost.sum(), inputs)
    g_sol = torch.autograd.grad((sol.u * seed_u).sum() + sol.cost.sum(), inputs)
    for name, a, b in zip(("x0", "C", "c", "C_f", "c_f", "F", "f"), g_sol, g_ref, strict=True):
        err = (a - b).abs().max().item()
        assert err < 1e-7 * (1 + b.abs().max().item()), f"d/d{name}: max diff {err:.2e}"


@pytest.mark.parametrize("backward", ["unroll", "truncated", "theseus_implicit"])
def test_theseus_modes_exact_on_lq(backward):
    """Linear dynamics: residuals are linear in U, so Theseus's own modes are exact too."""
    x0, C, c, C_f, c_f, F, f = random_lq(7, 2, 4, 2, 1)
    inputs = (x0, C, c, F)
    for t in inputs:
        t.requires_grad_(True)
    cost, dyn = QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f)
    ref = LQR()(x0, cost, dyn)
    sol = TheseusTO(dyn, 4, backward=backward, backward_num_iterations=2)(x0, cost)
    g_ref = torch.autograd.grad(ref.u.square().sum(), inputs)
    g_sol = torch.autograd.grad(sol.u.square().sum(), inputs)
    for a, b in zip(g_sol, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)


def test_dlm_is_an_approximation_in_the_right_direction():
    x0, C, c, C_f, c_f, F, f = random_lq(8, 3, 4, 2, 1)
    c.requires_grad_(True)
    cost, dyn = QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f)
    ref = LQR()(x0, cost, dyn)
    sol = TheseusTO(dyn, 4, backward="dlm", dlm_epsilon=1e-3)(x0, cost)
    (g_ref,) = torch.autograd.grad(ref.u.square().sum(), c)
    (g_dlm,) = torch.autograd.grad(sol.u.square().sum(), c)
    cos = torch.nn.functional.cosine_similarity(g_ref.flatten(), g_dlm.flatten(), dim=0)
    assert cos > 0.95, f"cosine {cos.item():.3f}"


@pytest.mark.parametrize("backward,tol", [("implicit", 1e-4), ("unroll", 1e-6)])
def test_pendulum_gradients_match_finite_differences(backward, tol):
    T = 8
    dyn = Pendulum()
    layer = TheseusTO(dyn, T, backward=backward, max_iter=100)
    x0, Q, R, goal = swing_up(T)
    args = [t.clone().requires_grad_(True) for t in (x0, Q, R, goal)]
    sol = layer(args[0], make_cost(*args[1:], T))
    assert sol.converged.all(), sol.extras["status"]
    w = torch.randn(sol.u.shape, generator=torch.Generator().manual_seed(1), dtype=D)
    grads = torch.autograd.grad((sol.u * w).sum() + sol.cost.sum(), [*args, dyn.g])

    def value(x0, Q, R, goal, g):
        with torch.no_grad():
            dyn.g.copy_(g)
            s = layer(x0, make_cost(Q, R, goal, T))
            dyn.g.fill_(9.81)
            return (s.u * w).sum() + s.cost.sum()

    fds = central_differences(value, [t.detach() for t in (*args, dyn.g)])
    for name, a, b in zip(("x0", "Q", "R", "goal", "g"), grads, fds, strict=True):
        err = ((a - b).abs().max() / (1 + b.abs().max())).item()
        assert err < tol, f"d/d{name}: relative error {err:.2e}"


def test_levenberg_marquardt_reaches_the_same_plan():
    T = 8
    x0, Q, R, goal = swing_up(T)
    cost = make_cost(Q, R, goal, T)
    gn = TheseusTO(Pendulum(), T, max_iter=100)(x0, cost)
    lm = TheseusTO(Pendulum(), T, optimizer="levenberg_marquardt", damping=1e-4, max_iter=100)(
        x0, cost
    )
    assert gn.converged.all() and lm.converged.all()
    torch.testing.assert_close(lm.u, gn.u, atol=1e-5, rtol=1e-5)


def test_iteration_cap_is_flagged_per_row():
    T = 8
    x0 = torch.zeros(2, 2, dtype=D, requires_grad=True)
    goal = torch.tensor([[0.0, 0.0], [math.pi, 0.0]], dtype=D)
    cost = QuadraticCost.tracking(
        torch.ones(2, dtype=D), 0.1 * torch.ones(1, dtype=D), T, x_goal=goal
    )
    sol = TheseusTO(Pendulum(), T, max_iter=1)(x0, cost)
    # row 0 starts at its optimum (hanging at rest, zero control); row 1 needs a swing-up
    assert sol.converged.tolist() == [True, False]
    assert sol.extras["status"][1] == "MAX_ITERATIONS" and sol.iterations[1] == 1
    assert sol.extras["residual"][1] > 1e-4 > sol.extras["residual"][0]
    (gx,) = torch.autograd.grad(sol.u.sum(), x0)
    assert torch.isfinite(gx).all() and gx[1].abs().sum() > 0


def test_float32_and_regularized_psd_cost():
    x0, C, c, C_f, c_f, F, f = random_lq(2, 2, 3, 2, 1)
    dyn = LinearDynamics(F, f)
    # position-only state weight: PSD, not PD
    Q = torch.tensor([1.0, 0.0], dtype=D)
    cost = QuadraticCost.tracking(Q, torch.ones(1, dtype=D), 3, x_goal=torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match="cost.C must be positive definite"):
        TheseusTO(dyn, 3)(x0, cost)
    sol = TheseusTO(dyn, 3, cost_regularization=1e-9)(x0, cost)
    C_b, c_b, Cf_b, cf_b = cost.batched(2, 1)
    ref = LQR()(
        x0,
        QuadraticCost(
            C_b.expand(2, -1, -1, -1),
            c_b.expand(2, -1, -1),
            Cf_b.expand(2, -1, -1),
            cf_b.expand(2, -1),
        ),
        dyn,
    )
    torch.testing.assert_close(sol.u, ref.u, atol=1e-6, rtol=1e-6)
    dyn32 = LinearDynamics(F.float(), f.float())
    x32 = x0.float().requires_grad_(True)
    cost32 = QuadraticCost(C.float(), c.float(), C_f.float(), c_f.float())
    sol32 = TheseusTO(dyn32, 3)(x32, cost32)
    ref64 = LQR()(x0, QuadraticCost(C, c, C_f, c_f), dyn)
    assert sol32.u.dtype == torch.float32
    torch.testing.assert_close(sol32.u, ref64.u.float(), atol=1e-4, rtol=1e-4)
    (g,) = torch.autograd.grad(sol32.u.sum(), x32)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


def test_bad_input_raises():
    x0, C, c, C_f, c_f, F, f = random_lq(0, 2, 3, 2, 1)
    cost, dyn = QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f)
    with pytest.raises(ValueError, match="backward must be one of"):
        TheseusTO(dyn, 3, backward="adjoint")
    with pytest.raises(ValueError, match="optimizer"):
        TheseusTO(dyn, 3, optimizer="adam")
    with pytest.raises(ValueError, match="dynamics"):
        TheseusTO("pendulum", 3)
    with pytest.raises(ValueError, match="horizon"):
        TheseusTO(dyn, 4)
    layer = TheseusTO(dyn, 3)
    with pytest.raises(ValueError, match="C_final is required"):
        layer(x0, QuadraticCost(C, c, None, c_f))
    with pytest.raises(ValueError, match="u_init"):
        layer(x0, cost, u_init=torch.zeros(2, 3, 2, dtype=D))
    with pytest.raises(ValueError, match="x0"):
        layer(x0[:, :1], cost)
    with pytest.raises(ValueError, match="cost_regularization"):
        TheseusTO(dyn, 3, cost_regularization=-1.0)
    with pytest.raises(ValueError, match="autograd_mode"):
        TheseusTO(dyn, 3, autograd_mode="finite_differences")


def test_analytic_jacobians_match_theseus_autodiff():
    """The rollout-sensitivity Jacobians and Theseus's AutoDiffCostFunction give the same
    iterates, so the same plan and the same unrolled gradients."""
    T = 6
    x0, Q, R, goal = swing_up(T)
    out = []
    for mode in ("analytic", "vmap"):
        dyn = Pendulum()
        x = x0.clone().requires_grad_(True)
        layer = TheseusTO(dyn, T, backward="unroll", max_iter=4, autograd_mode=mode)
        sol = layer(x, make_cost(Q, R, goal, T))
        out.append((sol.u, *torch.autograd.grad(sol.u.sum(), [x, dyn.g])))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_wrong_linear_solve_is_caught(monkeypatch):
    """A LAPACK call that returns a wrong solution (as MKL does at 2 threads on some machines)
    raises instead of returning a wrong gradient."""
    x0, C, c, C_f, c_f, F, f = random_lq(4, 2, 3, 2, 1)
    x0.requires_grad_(True)
    sol = TheseusTO(LinearDynamics(F, f), 3)(x0, QuadraticCost(C, c, C_f, c_f))
    real = torch.linalg.solve_ex

    def corrupted(A, b):
        x, info = real(A, b)
        return x + 1e-3, info

    monkeypatch.setattr(torch.linalg, "solve_ex", corrupted)
    with pytest.raises(RuntimeError, match="Hessian solve failed"):
        torch.autograd.grad(sol.u.sum(), x0)


def tracking_pair(goal, q, r, T):
    """One tracking cost as a QuadraticCost and as a LeastSquaresCost (diagonal weights
    ``q (n,)``, ``r (m,)``, goal ``(B, n)``, terminal weight ``3q``)."""
    quad = QuadraticCost.tracking(q, r, T, x_goal=goal, Q_final=3 * q)
    ls = LeastSquaresCost(
        lambda x, u: torch.cat([(x - goal[:, None]) * q.sqrt(), u * r.sqrt()], -1),
        lambda xT: (xT - goal) * (3 * q).sqrt(),
    )
    return quad, ls


@settings(max_examples=3)
@given(**small_lq_dims())
def test_least_squares_cost_equals_quadratic_cost(seed, B, T, n, m):
    """A quadratic written as residuals: same plan, costates and gradients (goal, weights, x0,
    F) as the QuadraticCost, in the implicit and unroll modes (measured: ~1e-13)."""
    x0, _, _, _, _, F, f = random_lq(seed, B, T, n, m)
    g = torch.Generator().manual_seed(seed)
    goal = torch.randn(B, n, generator=g, dtype=D)
    q = torch.rand(n, generator=g, dtype=D) + 0.5
    r = torch.rand(m, generator=g, dtype=D) + 0.1
    w = torch.randn(B, T, m, generator=g, dtype=D)
    for backward in ("implicit", "unroll"):
        out = []
        for which in (0, 1):
            args = [t.clone().requires_grad_(True) for t in (goal, q, r, x0, F)]
            cost = tracking_pair(*args[:3], T)[which]
            sol = TheseusTO(None, T, backward=backward)(args[3], cost, LinearDynamics(args[4], f))
            assert sol.converged.all(), sol.extras["status"]
            grads = torch.autograd.grad((sol.u * w).sum() + sol.x.square().sum(), args)
            out.append((sol.x, sol.u, sol.extras["costates"], *grads))
        for name, a, b in zip(("x", "u", "costates", "goal", "q", "r", "x0", "F"), *out,
                              strict=True):
            err = (a - b).abs().max().item()
            assert err < 1e-9 * (1 + b.abs().max().item()), f"{backward} {name}: {err:.2e}"


class DampedPendulum(nn.Module):
    """A pendulum whose damping is a plain tensor it closes over (not a parameter)."""

    def __init__(self, damping: torch.Tensor) -> None:
        super().__init__()
        self.damping = damping

    def forward(self, x, u):
        th, om = x[..., 0], x[..., 1]
        acc = -9.81 * torch.sin(th) + u[..., 0] - self.damping * om
        return torch.stack([th + DT * om, om + DT * acc], -1)


def test_closed_over_tensors_get_central_difference_gradients():
    """A nonquadratic least-squares cost closing over a goal angle and a weight, and dynamics
    closing over a damping tensor: implicit gradients w.r.t. all three (none is an argument of
    the layer) equal central differences of re-solves."""
    T = 6
    x0 = torch.tensor([[0.3, -0.2], [-0.4, 0.1]], dtype=D)
    w_u = torch.randn(2, T, 1, generator=torch.Generator().manual_seed(3), dtype=D)

    def solve(goal, weight, damping):
        cost = LeastSquaresCost(
            lambda x, u: torch.cat(
                [weight * (1 - torch.cos(x[..., :1] - goal[:, None, None])),
                 0.3 * x[..., 1:], 0.5 * u], -1),
            lambda xT: 3 * torch.stack([torch.sin(xT[:, 0] - goal), xT[:, 1]], -1),
        )
        layer = TheseusTO(DampedPendulum(damping), T, max_iter=100)
        sol = layer(x0, cost, u_init=torch.zeros(2, T, 1, dtype=D))
        assert sol.converged.all(), sol.extras["status"]
        return (sol.u * w_u).sum() + sol.x.square().sum()

    args = [torch.tensor([1.0, 2.0], dtype=D), torch.tensor(2.0, dtype=D),
            torch.tensor(0.1, dtype=D)]
    leaves = [a.clone().requires_grad_(True) for a in args]
    grads = torch.autograd.grad(solve(*leaves), leaves)
    with torch.no_grad():
        fds = central_differences(solve, args, eps=1e-5)
    for name, a, b in zip(("goal", "weight", "damping"), grads, fds, strict=True):
        err = ((a - b).abs().max() / (1 + b.abs().max())).item()
        # Gauss-Newton stops at a stationarity of ~1e-7 on this nonzero-residual problem;
        # measured 1.3e-6 (goal), 7e-7 (weight), 2.3e-6 (damping)
        assert err < 1e-5, f"d/d{name}: relative error {err:.2e}"


def test_call_contract():
    """Dynamics at construction or per call (the call's wins), neither is an error; a
    NonlinearCost is refused with the way out in the message."""
    x0, C, c, C_f, c_f, F, f = random_lq(1, 2, 3, 2, 1)
    cost, dyn = QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f)
    ref = TheseusTO(dyn, 3)(x0, cost)
    per_call = TheseusTO(LinearDynamics(F, f + 1.0), 3)(x0, cost, dyn)
    torch.testing.assert_close(per_call.u, ref.u, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="dynamics must be given"):
        TheseusTO(None, 3)(x0, cost)
    with pytest.raises(ValueError, match="LeastSquaresCost"):
        TheseusTO(dyn, 3)(x0, NonlinearCost(lambda x, u: x.square().sum(-1) + u.square().sum(-1)))
    with pytest.raises(ValueError, match="u_init"):
        TheseusTO(Pendulum(), 3)(x0, tracking_pair(x0, torch.ones(2, dtype=D),
                                                    torch.ones(1, dtype=D), 3)[1])


class Unstable(nn.Module):
    """``x' = a x + 0.1 u`` that returns NaN once ``|x| > 100`` (a model leaving its domain)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.9, dtype=D))

    def forward(self, x, u):
        return self.a * x + 0.1 * u + torch.where(x.abs() > 100, float("nan"), 0.0)


def test_failed_row_contributes_zero_gradient():
    """A row whose dynamics return NaN is flagged; with the loss masked by ``converged`` the
    gradients of shared tensors (a closed-over goal, a module parameter) equal those of the
    healthy row solved alone, and the failed row's own x0 gets zero."""
    out = []
    for x0 in (torch.tensor([[1.0], [1000.0]], dtype=D), torch.tensor([[1.0]], dtype=D)):
        goal = torch.tensor([0.5], dtype=D, requires_grad=True)
        cost = LeastSquaresCost(
            lambda x, u, goal=goal: torch.cat([x - goal, 0.3 * u], -1),
            lambda xT, goal=goal: xT - goal,
        )
        dyn, x0 = Unstable(), x0.requires_grad_(True)
        sol = TheseusTO(dyn, 4)(x0, cost, u_init=torch.zeros(x0.shape[0], 4, 1, dtype=D))
        keep = sol.converged
        loss = (torch.where(keep.view(-1, 1, 1), sol.u, 0).square().sum()
                + torch.where(keep, sol.cost, 0).sum())
        out.append((keep, sol.cost, *torch.autograd.grad(loss, [goal, dyn.a, x0])))
    (keep, value, g_goal, g_a, g_x0), (_, _, ref_goal, ref_a, ref_x0) = out
    assert keep.tolist() == [True, False] and torch.isnan(value[1])
    torch.testing.assert_close(g_goal, ref_goal, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_a, ref_a, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_x0, torch.cat([ref_x0, torch.zeros(1, 1, dtype=D)]),
                               atol=1e-12, rtol=0)
