"""CasadiNLP / CasadiTO: KKT gradients against finite differences and LQR, status, errors."""

import casadi as ca
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from diffto.costs import LeastSquaresCost, NonlinearCost
from diffto.layers.casadi import CasadiNLP
from diffto.layers.casadi_to import CasadiTO
from diffto.layers.lqr import LQR
from diffto.problem import LinearDynamics, QuadraticCost
from diffto.testing import central_differences, random_lq, small_lq_dims

D = torch.float64
DT = 0.1


def pendulum_ca(x, u, theta):
    """Damped pendulum, Euler step; theta = [g/l]. x = [angle, rate]."""
    return ca.vertcat(x[0] + DT * x[1], x[1] + DT * (-theta[0] * ca.sin(x[0]) + u[0] - 0.1 * x[1]))


def swing_up_cost(Q, R, goal, T):
    return QuadraticCost.tracking(Q, R, T, x_goal=goal, Q_final=10 * Q)


@pytest.fixture(scope="module")
def toy_nlp():
    """min (w0−p0)² + 2(w1−p1)² + w2² + w0w1 + 0.1w0⁴  s.t. w0+w1+w2 = p0p1, w2 ≥ 0.3, w1 ≤ 0.5."""
    w, p = ca.SX.sym("w", 3), ca.SX.sym("p", 2)
    f = (w[0] - p[0]) ** 2 + 2 * (w[1] - p[1]) ** 2 + w[2] ** 2 + w[0] * w[1] + 0.1 * w[0] ** 4
    g = w[0] + w[1] + w[2] - p[0] * p[1]
    free = CasadiNLP(w, p, f, g)
    boxed = CasadiNLP(w, p, f, g, lbw=[-10, -10, 0.3], ubw=[10, 0.5, 10])
    return free, boxed


@settings(max_examples=3)
@given(p=st.lists(st.floats(-2, 2), min_size=6, max_size=6))
def test_nlp_gradcheck(toy_nlp, p):
    P = torch.tensor(p, dtype=D).reshape(3, 2).requires_grad_(True)
    for layer in toy_nlp:
        res = layer(P)
        assert res.converged.all(), res.status
        # The solution map is differentiable only with strict complementarity: skip draws
        # with a bound barely active (tiny multiplier at the bound), where IPOPT's relaxed
        # bounds make finite differences meaningless (seen at p = (0, 0, 0, 0, 0, -1)).
        w = res.w.detach()
        lo = torch.as_tensor(layer.lbw, dtype=D)
        hi = torch.as_tensor(layer.ubw, dtype=D)
        at_bound = ((w - lo).abs() < 1e-6) | ((w - hi).abs() < 1e-6)
        assume(not (at_bound & (res.lam_w.abs() < 1e-2)).any())

        def fn(P, layer=layer):
            r = layer(P)
            return r.w, r.f

        assert torch.autograd.gradcheck(fn, (P,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_nlp_equality_with_zero_multiplier(toy_nlp):
    """At p = (1, 2) the equality holds at the unconstrained optimum (multiplier 0). CasADi's
    own nlpsol sensitivity drops such a constraint; ours keeps it."""
    P = torch.tensor([[1.0, 2.0]], dtype=D, requires_grad=True)
    res = toy_nlp[0](P)
    assert res.lam_g.abs().max() < 1e-9
    (jac,) = torch.autograd.functional.jacobian(lambda P: toy_nlp[0](P).w, (P,))
    # w0+w1+w2 = p0·p1 for all p, so the rows of ∂w/∂p sum to (p1, p0) = (2, 1).
    torch.testing.assert_close(jac[0, :, 0].sum(0), torch.tensor([2.0, 1.0], dtype=D))


@settings(max_examples=4)
@given(**small_lq_dims())
def test_trajectory_matches_lqr(seed, B, T, n, m):
    x0, C, c, C_f, c_f, F, f = random_lq(seed, B, T, n, m)
    for t in (x0, C, c, c_f, F, f):
        t.requires_grad_(True)
    cost, dyn = QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f)
    ref = LQR()(x0, cost, dyn)
    sol = CasadiTO(None, T, n, m)(x0, cost, dyn)
    assert sol.converged.all()
    torch.testing.assert_close(sol.x, ref.x, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(sol.u, ref.u, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(
        sol.extras["costates"], ref.extras["costates"], atol=1e-7, rtol=1e-7
    )
    seed_u = torch.randn_like(ref.u)
    inputs = (x0, C, c, c_f, F, f)
    g_ref = torch.autograd.grad((ref.u * seed_u).sum() + ref.cost.sum(), inputs)
    g_sol = torch.autograd.grad((sol.u * seed_u).sum() + sol.cost.sum(), inputs)
    for name, a, b in zip(("x0", "C", "c", "c_f", "F", "f"), g_sol, g_ref, strict=True):
        err = (a - b).abs().max().item()
        assert err < 1e-6 * (1 + b.abs().max().item()), f"d/d{name}: max diff {err:.2e}"


def test_pendulum_swing_up_gradcheck():
    """Nonlinear dynamics with a learnable parameter and active control bounds."""
    T = 8
    layer = CasadiTO(pendulum_ca, T, 2, 1, n_theta=1, u_lower=-2.0, u_upper=2.0)
    x0 = torch.tensor([[0.0, 0.0], [0.3, -0.2]], dtype=D, requires_grad=True)
    Q = torch.tensor([1.0, 0.1], dtype=D, requires_grad=True)
    R = torch.tensor([0.05], dtype=D, requires_grad=True)
    goal = torch.tensor([np.pi, 0.0], dtype=D, requires_grad=True)
    theta = torch.tensor([[9.81], [9.0]], dtype=D, requires_grad=True)
    sol = layer(x0, swing_up_cost(Q, R, goal, T), theta)
    assert sol.converged.all(), sol.extras["status"]
    assert (sol.u.abs() > 2 - 1e-6).sum() >= 4, "test needs active bounds"
    # dynamics hold exactly
    x_next = sol.x[:, :-1, 0] + DT * sol.x[:, :-1, 1]
    torch.testing.assert_close(sol.x[:, 1:, 0], x_next, atol=1e-8, rtol=0)

    def fn(x0, Q, R, goal, theta):
        s = layer(x0, swing_up_cost(Q, R, goal, T), theta)
        return s.x, s.u, s.cost

    assert torch.autograd.gradcheck(fn, (x0, Q, R, goal, theta), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_bounded_plan_is_optimal():
    """No feasible perturbation of the returned plan (rolled out, clipped to the box) is
    cheaper: a residual check independent of the solver."""
    x0, C, c, C_f, c_f, F, f = random_lq(3, 2, 6, 3, 2)
    cost, dyn = QuadraticCost(C, 3 * c, C_f, c_f), LinearDynamics(F, f)
    layer = CasadiTO(None, 6, 3, 2, u_lower=-0.3, u_upper=0.3)
    sol = layer(x0, cost, dyn)
    assert sol.converged.all()
    assert ((sol.u.abs() - 0.3).abs() < 1e-7).any(), "test needs active bounds"
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        u = (sol.u + 0.05 * torch.randn(sol.u.shape, generator=g, dtype=D)).clamp(-0.3, 0.3)
        xs = [x0]
        for t in range(6):
            xs.append(dyn(xs[-1], u[:, t], t))
        assert (cost.evaluate(torch.stack(xs, 1), u) >= sol.cost - 1e-9).all()


def test_unconverged_row_is_flagged_with_gradient():
    T = 8
    layer = CasadiTO(pendulum_ca, T, 2, 1, n_theta=1, max_iter=1, warm_start=False)
    x0 = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=D, requires_grad=True)
    goal = torch.tensor([[0.0, 0.0], [np.pi, 0.0]], dtype=D)
    cost = QuadraticCost.tracking(
        torch.ones(2, dtype=D), 0.1 * torch.ones(1, dtype=D), T, x_goal=goal
    )
    sol = layer(x0, cost, torch.full((2, 1), 9.81, dtype=D))
    # row 0 sits at its goal (the initial rollout is optimal); row 1 needs a swing-up
    assert sol.converged.tolist() == [True, False]
    assert "Maximum_Iterations" in sol.extras["status"][1]
    (gx,) = torch.autograd.grad(sol.u.sum(), x0)
    assert torch.isfinite(gx).all() and gx[1].abs().sum() > 0


def test_sqpmethod_plugin_and_float32():
    x0, C, c, C_f, c_f, F, f = random_lq(5, 2, 4, 2, 1)
    cost, dyn = QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f)
    ref = LQR()(x0, cost, dyn)
    sqp = CasadiTO(None, 4, 2, 1, solver="sqpmethod", options={"qpsol": "qrqp"})
    sol = sqp(x0, cost, dyn)
    assert sol.converged.all()
    torch.testing.assert_close(sol.u, ref.u, atol=1e-8, rtol=1e-8)
    x32 = x0.float().requires_grad_(True)
    cost32 = QuadraticCost(C.float(), c.float(), C_f.float(), c_f.float())
    sol32 = CasadiTO(None, 4, 2, 1)(x32, cost32, LinearDynamics(F.float(), f.float()))
    assert sol32.u.dtype == torch.float32 and sol32.x.dtype == torch.float32
    torch.testing.assert_close(sol32.u, ref.u.float(), atol=1e-4, rtol=1e-4)
    (g32,) = torch.autograd.grad(sol32.u.sum(), x32)
    assert g32.dtype == torch.float32 and torch.isfinite(g32).all()


def test_warm_start_from_previous_row():
    """Identical rows: with chaining, SQP starts row 1 at row 0's optimum and stops at once."""
    T = 6
    x0 = torch.tensor([[0.2, 0.0]] * 2, dtype=D)
    cost = swing_up_cost(
        torch.tensor([1.0, 0.1], dtype=D),
        torch.tensor([0.05], dtype=D),
        torch.tensor([1.0, 0.0], dtype=D),
        T,
    )
    theta = torch.full((2, 1), 9.81, dtype=D)
    opts = {"qpsol": "qrqp"}
    chained = CasadiTO(pendulum_ca, T, 2, 1, n_theta=1, solver="sqpmethod", options=opts)
    sol = chained(x0, cost, theta)
    assert sol.converged.all()
    assert sol.iterations[1] < sol.iterations[0]
    cold = CasadiTO(
        pendulum_ca, T, 2, 1, n_theta=1, solver="sqpmethod", options=opts, warm_start=False
    )
    assert (cold(x0, cost, theta).iterations == sol.iterations[0]).all()


def test_bad_input_raises(toy_nlp):
    layer = toy_nlp[0]
    with pytest.raises(ValueError, match="p must have shape"):
        layer(torch.zeros(2, 3, dtype=D))
    with pytest.raises(ValueError, match="p contains"):
        layer(torch.tensor([[float("nan"), 0.0]], dtype=D))
    with pytest.raises(ValueError, match="w_init"):
        layer(torch.zeros(1, 2, dtype=D), w_init=torch.zeros(1, 5, dtype=D))
    w, p = ca.SX.sym("w", 2), ca.SX.sym("p", 1)
    with pytest.raises(ValueError, match="lbw must be <= ubw"):
        CasadiNLP(w, p, ca.sumsqr(w - p), lbw=1.0, ubw=0.0)
    with pytest.raises(ValueError, match="f must be a scalar"):
        CasadiNLP(w, p, w)
    x0, C, c, C_f, c_f, F, f = random_lq(0, 2, 3, 2, 1)
    cost, dyn = QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f)
    to = CasadiTO(None, 3, 2, 1)
    with pytest.raises(ValueError, match="dynamics must be a LinearDynamics"):
        to(x0, cost, None)
    with pytest.raises(ValueError, match="horizon"):
        CasadiTO(None, 4, 2, 1)(x0, cost, dyn)
    with pytest.raises(ValueError, match="u_init"):
        to(x0, cost, dyn, u_init=torch.zeros(2, 2, 1, dtype=D))
    with pytest.raises(ValueError, match="u_lower must be <= u_upper"):
        CasadiTO(None, 3, 2, 1, u_lower=1.0, u_upper=-1.0)
    with pytest.raises(ValueError, match="x_lower"):
        CasadiTO(None, 3, 2, 1, x_lower=torch.zeros(3))
    bad = C.clone()
    bad[..., 2, 2] = -1.0
    with pytest.raises(ValueError, match="positive definite"):
        to(x0, QuadraticCost(bad, c, C_f, c_f), dyn)
    with pytest.raises(ValueError, match="theta"):
        CasadiTO(pendulum_ca, 3, 2, 1, n_theta=1)(x0, cost, None)


def test_bound_gradients(toy_nlp):
    """Bounds passed per call get gradients: active box bounds, and an equality constraint's
    right-hand side passed as both lbg and ubg."""
    layer = toy_nlp[0]
    P = torch.tensor([[1.0, 2.0], [0.5, 1.5]], dtype=D, requires_grad=True)
    lbw = torch.tensor([-10.0, -10.0, 0.3], dtype=D, requires_grad=True)
    ubw = torch.tensor([10.0, 0.5, 10.0], dtype=D, requires_grad=True)
    rhs = torch.tensor([[0.2], [-0.1]], dtype=D, requires_grad=True)

    def fn(P, lbw, ubw, rhs):
        r = layer(P, lbw=lbw, ubw=ubw, lbg=rhs, ubg=rhs)
        return r.w, r.f

    r = layer(P, lbw=lbw, ubw=ubw, lbg=rhs, ubg=rhs)
    assert r.converged.all()
    assert (r.lam_w[:, 1] > 1e-3).all() and (r.lam_w[:, 2] < -1e-3).any(), "needs active bounds"
    assert torch.autograd.gradcheck(fn, (P, lbw, ubw, rhs), eps=1e-6, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="lbw <= ubw"):
        layer(P, lbw=ubw, ubw=lbw)


def test_trajectory_bound_gradients():
    """A control-bound tensor that requires grad gets gradients (finite differences)."""
    T = 6
    x0 = torch.tensor([[0.3, -0.2], [-0.4, 0.1]], dtype=D)
    u_max = torch.full((T, 1), 1.5, dtype=D, requires_grad=True)
    cost = swing_up_cost(
        torch.tensor([1.0, 0.1], dtype=D),
        torch.tensor([0.05], dtype=D),
        torch.tensor([np.pi, 0.0], dtype=D),
        T,
    )
    theta = torch.full((2, 1), 9.81, dtype=D)

    def fn(u_max):
        layer = CasadiTO(pendulum_ca, T, 2, 1, n_theta=1, u_lower=-u_max, u_upper=u_max)
        s = layer(x0, cost, theta)
        return s.u, s.cost

    u, _ = fn(u_max)
    assert ((u.abs() - 1.5).abs() < 1e-7).sum() >= 3, "test needs active bounds"
    assert torch.autograd.gradcheck(fn, (u_max,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_wrong_linear_solve_is_caught(toy_nlp, monkeypatch):
    P = torch.tensor([[0.5, 1.5]], dtype=D, requires_grad=True)
    res = toy_nlp[1](P)
    real = torch.linalg.solve_ex

    def corrupted(A, b):
        x, info = real(A, b)
        return x + 1e-3, info

    monkeypatch.setattr(torch.linalg, "solve_ex", corrupted)
    with pytest.raises(RuntimeError, match="KKT solve failed"):
        torch.autograd.grad(res.w.sum(), P)


def tracking_costs(goal, q, r, T):
    """One tracking cost written four ways: QuadraticCost, NonlinearCost, LeastSquaresCost and
    a sum of a QuadraticCost and a NonlinearCost (diagonal weights ``q (n,)``, ``r (m,)``, goal
    ``(B, n)``, terminal weight ``3q``)."""
    quad = QuadraticCost.tracking(q, r, T, x_goal=goal, Q_final=3 * q)
    nonlinear = NonlinearCost(
        lambda x, u: 0.5 * ((x - goal[:, None]).square() * q).sum(-1)
        + 0.5 * (u.square() * r).sum(-1),
        lambda xT: 1.5 * ((xT - goal).square() * q).sum(-1),
    )
    least_squares = LeastSquaresCost(
        lambda x, u: torch.cat([(x - goal[:, None]) * q.sqrt(), u * r.sqrt()], -1),
        lambda xT: (xT - goal) * (3 * q).sqrt(),
    )
    # a sum: the control term as a QuadraticCost, the state terms as a NonlinearCost
    summed = QuadraticCost.tracking(torch.zeros_like(q), r, T) + NonlinearCost(
        lambda x, u: 0.5 * ((x - goal[:, None]).square() * q).sum(-1),
        lambda xT: 1.5 * ((xT - goal).square() * q).sum(-1),
    )
    return quad, nonlinear, least_squares, summed


@settings(max_examples=3)
@given(**small_lq_dims())
def test_general_costs_equal_quadratic_cost(seed, B, T, n, m):
    """The torch-callback path against the symbolic one on the same problem, with control
    bounds: plans, costates, active sets and gradients w.r.t. the goal and weights (closed over
    by the general costs), x0 and F agree (measured ~1e-13; IPOPT runs the same iterates)."""
    x0, _, _, _, _, F, f = random_lq(seed, B, T, n, m)
    g = torch.Generator().manual_seed(seed)
    goal = 2 * torch.randn(B, n, generator=g, dtype=D)
    q = torch.rand(n, generator=g, dtype=D) + 0.5
    r = torch.rand(m, generator=g, dtype=D) + 0.1
    w = torch.randn(B, T, m, generator=g, dtype=D)
    layer = CasadiTO(None, T, n, m, u_lower=-0.5, u_upper=0.5)
    out = []
    for which in range(4):
        args = [t.clone().requires_grad_(True) for t in (goal, q, r, x0, F)]
        sol = layer(args[3], tracking_costs(*args[:3], T)[which], LinearDynamics(args[4], f))
        assert sol.converged.all(), sol.extras["status"]
        # IPOPT's tol=1e-10 is on a scaled measure; the unscaled one stays near it
        assert (sol.extras["residual"] < 1e-8).all(), sol.extras["residual"]
        grads = torch.autograd.grad((sol.u * w).sum() + sol.x.square().sum(), args)
        act = torch.stack([sol.extras["active_lower"], sol.extras["active_upper"]])
        out.append((act, sol.x, sol.u, sol.extras["costates"], *grads))
    names = ("x", "u", "costates", "goal", "q", "r", "x0", "F")
    for other in out[1:]:
        assert torch.equal(other[0], out[0][0])
        for name, a, b in zip(names, other[1:], out[0][1:], strict=True):
            err = (a - b).abs().max().item()
            assert err < 1e-7 * (1 + b.abs().max().item()), f"{name}: max diff {err:.2e}"


def test_nonlinear_cost_gradients_match_central_differences():
    """Swing-up with a periodic angle cost closing over a goal angle (per row) and a weight,
    active control bounds and a dynamics parameter: gradients w.r.t. the closed-over tensors
    and theta equal central differences of re-solves (measured ~1e-9 relative)."""
    T = 8
    layer = CasadiTO(pendulum_ca, T, 2, 1, n_theta=1, u_lower=-2.0, u_upper=2.0)
    w_u = torch.randn(2, T, 1, generator=torch.Generator().manual_seed(2), dtype=D)

    x0 = torch.tensor([[0.0, 0.0], [0.3, -0.2]], dtype=D)

    def solve(goal, weight, theta):
        cost = NonlinearCost(
            lambda x, u: weight * (1 - torch.cos(x[..., 0] - goal[:, None]))
            + 0.05 * x[..., 1].square() + 0.025 * u[..., 0].square(),
            lambda xT: 10 * weight * (1 - torch.cos(xT[:, 0] - goal)) + 0.5 * xT[:, 1].square(),
        )
        sol = layer(x0, cost, theta)
        assert sol.converged.all(), sol.extras["status"]
        return sol, (sol.u * w_u).sum() + sol.x.square().sum()

    args = [torch.tensor([3.0, 2.5], dtype=D), torch.tensor(1.5, dtype=D),
            torch.tensor([[9.81], [9.0]], dtype=D)]
    leaves = [a.clone().requires_grad_(True) for a in args]
    sol, loss = solve(*leaves)
    assert (sol.extras["active_lower"] | sol.extras["active_upper"]).sum() >= 3, "needs bounds"
    grads = torch.autograd.grad(loss, leaves)
    with torch.no_grad():
        fds = central_differences(lambda *a: solve(*a)[1], args)
    for name, a, b in zip(("goal", "weight", "theta"), grads, fds, strict=True):
        err = ((a - b).abs().max() / (1 + b.abs().max())).item()
        assert err < 1e-6, f"d/d{name}: relative error {err:.2e}"


def test_call_contract():
    """Linear dynamics fixed at construction (n, m read from it) or given per call (the
    call's wins); neither is an error naming dynamics."""
    x0, C, c, C_f, c_f, F, f = random_lq(2, 2, 3, 2, 1)
    cost, dyn = QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f)
    ref = CasadiTO(None, 3, 2, 1)(x0, cost, dyn)
    fixed = CasadiTO(dyn, 3)
    torch.testing.assert_close(fixed(x0, cost).u, ref.u, atol=1e-12, rtol=0)
    wins = CasadiTO(LinearDynamics(F, f + 1.0), 3)(x0, cost, dyn)
    torch.testing.assert_close(wins.u, ref.u, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="dynamics must be a LinearDynamics"):
        CasadiTO(None, 3, 2, 1)(x0, tracking_costs(x0, torch.ones(2, dtype=D),
                                                    torch.ones(1, dtype=D), 3)[1])
    with pytest.raises(ValueError, match="n and m are required"):
        CasadiTO(pendulum_ca, 3)
    goal = torch.zeros(3, 2, dtype=D)  # batch 3 against x0's 2
    wrong = NonlinearCost(lambda x, u: (x - goal[:, None]).square().sum(-1) + u.square().sum(-1))
    with pytest.raises(ValueError, match="cost could not be evaluated"):
        fixed(x0, wrong)


def test_a_non_finite_row_gets_no_gradient_and_spares_the_others(toy_nlp):
    """A row whose solution came back NaN (e.g. the solver failed on it) contributes zero
    gradient; the other rows' gradients are those of a batch without it."""
    from diffto.layers.casadi import nlp_solution, solve_nlp

    layer = toy_nlp[1]
    P = torch.tensor([[0.5, 1.5], [0.2, -0.3], [1.0, 0.4]], dtype=D, requires_grad=True)
    bounds = [torch.as_tensor(b, dtype=D).reshape(1, -1)
              for b in (layer.lbw, layer.ubw, layer.lbg, layer.ubg)]
    solved = list(solve_nlp(layer, P.detach().numpy(), None, False,
                            tuple(b.numpy() for b in bounds)))
    for k in range(4):  # w, f, lam_g, lam_w of row 1 are lost
        solved[k] = solved[k].copy()
        solved[k][1] = np.nan
    res = nlp_solution(layer, P, bounds, tuple(solved))
    keep = [0, 2]
    (grad,) = torch.autograd.grad(res.w[keep].sum() + res.f[keep].sum(), P)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()
    P_ref = P.detach()[keep].requires_grad_()
    ref = layer(P_ref)
    (grad_ref,) = torch.autograd.grad(ref.w.sum() + ref.f.sum(), P_ref)
    torch.testing.assert_close(grad[keep], grad_ref)
