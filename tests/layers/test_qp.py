"""QPMPC (cvxpylayers): against LQR, MPC, a plain cvxpy QP and central differences of re-solves.

Problems are tiny (cvxpylayers is slow); the QP layer solves a conic reformulation, so plans and
gradients are compared at 1e-4 (measured: ~1e-6 typical, up to 5e-5), not at machine precision.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffto.costs import NonlinearCost
from diffto.layers.lqr import LQR
from diffto.layers.qp import QPMPC
from diffto.problem import LinearDynamics, QuadraticCost

DT = torch.float64
seeds = st.integers(0, 2**31 - 1)


def random_problem(seed: int, B: int = 2, n: int = 2, m: int = 1, T: int = 3, x_scale=1.0):
    """A well-posed random LQ problem: PSD stage costs with PD control block, mild dynamics."""
    g = torch.Generator().manual_seed(seed)
    k = n + m
    W = torch.randn(T, k, k, generator=g, dtype=DT)
    C = W @ W.transpose(-1, -2) / k + 0.3 * torch.eye(k, dtype=DT)
    c = torch.randn(T, k, generator=g, dtype=DT)
    Wf = torch.randn(n, n, generator=g, dtype=DT)
    C_f = Wf @ Wf.T / n + 0.5 * torch.eye(n, dtype=DT)
    A = torch.eye(n, dtype=DT) + 0.2 * torch.randn(n, n, generator=g, dtype=DT)
    Bu = torch.randn(n, m, generator=g, dtype=DT)
    F = torch.cat([A, Bu], -1).expand(T, n, k).clone()
    f = 0.1 * torch.randn(T, n, generator=g, dtype=DT)
    x0 = x_scale * torch.randn(B, n, generator=g, dtype=DT)
    return x0, C, c, C_f, F, f


def cvxpy_plan(x0, C, c, C_f, F, f, u_lo=None, u_hi=None, x_lo=None, x_hi=None, G=None, h=None):
    """Independent reference: one plain cvxpy QP per row (quadratic objective, Clarabel)."""
    x0, C, c, C_f, F, f = (t.detach().numpy() for t in (x0, C, c, C_f, F, f))
    T, n = f.shape
    m = C.shape[-1] - n
    xs, us, status = [], [], []
    for row in x0:
        x, u = cp.Variable((T + 1, n)), cp.Variable((T, m))
        obj = 0.5 * cp.quad_form(x[T], cp.psd_wrap(C_f))
        cons = [x[0] == row]
        for t in range(T):
            tau = cp.hstack([x[t], u[t]])
            obj += 0.5 * cp.quad_form(tau, cp.psd_wrap(C[t])) + c[t] @ tau
            cons.append(x[t + 1] == F[t] @ tau + f[t])
            if u_lo is not None:
                cons.append(u[t] >= u_lo)
            if u_hi is not None:
                cons.append(u[t] <= u_hi)
            if x_lo is not None:
                cons.append(x[t + 1] >= x_lo)
            if x_hi is not None:
                cons.append(x[t + 1] <= x_hi)
            if G is not None:
                cons.append(G @ tau <= h)
        prob = cp.Problem(cp.Minimize(obj), cons)
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        status.append(prob.status)
        xs.append(x.value if x.value is not None else np.full((T + 1, n), np.nan))
        us.append(u.value if u.value is not None else np.full((T, m), np.nan))
    return torch.tensor(np.stack(xs)), torch.tensor(np.stack(us)), status


def close(a, b, tol, what):
    err = (a - b).abs().max().item()
    assert err <= tol * (1 + b.abs().max().item()), f"{what}: max difference {err:.3g}"


@settings(max_examples=3)
@given(seed=seeds)
def test_unconstrained_equals_lqr_plan_and_gradients(seed):
    x0, C, c, C_f, F, f = random_problem(seed)
    for t in (x0, C, c, C_f, F):
        t.requires_grad_(True)
    dyn = LinearDynamics(F, f)
    qp = QPMPC(3, 2, 1)(x0, QuadraticCost(C, c, C_f), dyn)
    ref = LQR()(x0, QuadraticCost(C, c, C_f), dyn)
    assert qp.converged.all() and qp.extras["status"] == ["optimal"] * 2
    # QPMPC solves a conic reformulation with an interior-point method: ~1e-6 typical, up to
    # ~5e-5 on badly scaled draws (seen at seed 1117611), so plans are compared at 1e-4.
    close(qp.x, ref.x, 1e-4, "x")
    close(qp.u, ref.u, 1e-4, "u")
    close(qp.cost, ref.cost, 1e-4, "cost")
    close(qp.extras["costates"], ref.extras["costates"], 1e-4, "costates")
    w = torch.randn_like(ref.u)
    g_qp = torch.autograd.grad((qp.u * w).sum() + qp.x.sum(), (x0, C, c, C_f, F))
    g_ref = torch.autograd.grad((ref.u * w).sum() + ref.x.sum(), (x0, C, c, C_f, F))
    for name, a, b in zip(("x0", "C", "c", "C_final", "F"), g_qp, g_ref, strict=True):
        close(a, b, 1e-4, f"d/d{name}")


@settings(max_examples=2)
@given(seed=seeds)
def test_box_bounds_equal_cvxpy_and_mpc(seed):
    x0, C, c, C_f, F, f = random_problem(seed, x_scale=3.0)
    layer = QPMPC(3, 2, 1, u_lower=-0.3, u_upper=0.3)
    sol = layer(x0, QuadraticCost(C, c, C_f), LinearDynamics(F, f))
    x_ref, u_ref, status = cvxpy_plan(x0, C, c, C_f, F, f, u_lo=-0.3, u_hi=0.3)
    assert sol.converged.all() and status == ["optimal"] * 2
    close(sol.u, u_ref, 1e-4, "u vs cvxpy")
    close(sol.x, x_ref, 1e-4, "x vs cvxpy")
    mpc = pytest.importorskip("diffto.layers.mpc")
    ref = mpc.MPC(LinearDynamics(F, f), 3, u_lower=-0.3, u_upper=0.3)(x0, QuadraticCost(C, c, C_f))
    assert ref.converged.all()
    close(sol.u, ref.u, 1e-4, "u vs MPC")
    for key in ("active_lower", "active_upper"):
        assert torch.equal(sol.extras[key], ref.extras[key]), key
    assert (sol.extras["active_lower"] | sol.extras["active_upper"]).any(), "needs active bounds"
    close(sol.extras["costates"], ref.extras["costates"], 1e-4, "costates vs MPC")


def test_box_gradients_equal_mpc():
    x0, C, c, C_f, F, f = random_problem(2)
    mpc = pytest.importorskip("diffto.layers.mpc")
    grads = []
    for solve in (
        lambda cost, dyn: QPMPC(3, 2, 1, u_lower=-0.3, u_upper=0.3)(x0, cost, dyn),
        lambda cost, dyn: mpc.MPC(dyn, 3, u_lower=-0.3, u_upper=0.3)(x0, cost),
    ):
        Cg, cg, Fg = (t.clone().requires_grad_(True) for t in (C, c, F))
        sol = solve(QuadraticCost(Cg, cg, C_f), LinearDynamics(Fg, f))
        active = (sol.u.abs() > 0.3 - 1e-6).sum().item()
        grads.append(torch.autograd.grad(sol.u.sum() + sol.x.pow(2).sum(), (Cg, cg, Fg)))
    assert 0 < active < sol.u.numel(), "the test needs some bounds active and some not"
    for name, a, b in zip(("C", "c", "F"), *grads, strict=True):
        close(a, b, 1e-4, f"d/d{name} vs MPC")


def test_state_and_general_constraints_hold_and_gradients_match_central_differences():
    torch.manual_seed(0)
    x0, C, c, C_f, F, f = random_problem(11, x_scale=2.0)
    x_hi = torch.tensor([0.6, float("inf")], dtype=DT)
    u_hi = torch.tensor([0.8], dtype=DT, requires_grad=True)
    G = torch.tensor([[1.0, 1.0, 0.5]], dtype=DT)  # x_0 + x_1 + 0.5 u <= h per stage
    h = torch.tensor([1.5], dtype=DT, requires_grad=True)
    layer = QPMPC(3, 2, 1, u_upper=u_hi, x_upper=x_hi, G=G, h=h)
    x0 = x0.clamp(max=0.5)
    c = c - 2.0  # reward large states and controls: the upper constraints bind

    def plan(x0_, c_, F_):
        return layer(x0_, QuadraticCost(C, c_, C_f), LinearDynamics(F_, f))

    params = [t.clone().requires_grad_(True) for t in (x0, c, F)]
    sol = plan(*params)
    assert sol.converged.all()
    tau = torch.cat([sol.x[:, :-1], sol.u], -1)
    assert (sol.x[:, 1:, 0] <= 0.6 + 1e-7).all() and (sol.u <= 0.8 + 1e-7).all()
    assert (tau @ G.T <= h + 1e-7).all()
    x_ref, u_ref, _ = cvxpy_plan(x0, C, c, C_f, F, f, u_hi=0.8, x_hi=x_hi.numpy(), G=G.numpy(),
                                 h=h.detach().numpy())
    close(sol.u, u_ref, 1e-4, "u vs cvxpy")
    active = (sol.x[:, 1:, 0] > 0.6 - 1e-6).sum() + (tau @ G.T > h - 1e-6).sum()
    assert active > 0, "the test needs an active state or general constraint"
    w = torch.randn_like(sol.u)
    grads = torch.autograd.grad((sol.u * w).sum(), [*params, u_hi, h])

    # Central differences of exact cvxpy re-solves along random directions.
    eps = 1e-5
    dirs = [torch.randn_like(p) for p in (x0, c, F, u_hi, h)]

    def objective(x0_, c_, F_, u_hi_, h_):
        _, u, _ = cvxpy_plan(x0_, C, c_, C_f, F_, f, u_hi=u_hi_.numpy(), x_hi=x_hi.numpy(),
                             G=G.numpy(), h=h_.numpy())
        return (u * w).sum().item()

    base = [x0, c, F, u_hi.detach(), h.detach()]
    for i, (name, grad) in enumerate(zip(("x0", "c", "F", "u_upper", "h"), grads, strict=True)):
        plus = [b + eps * dirs[j] if j == i else b for j, b in enumerate(base)]
        minus = [b - eps * dirs[j] if j == i else b for j, b in enumerate(base)]
        fd = (objective(*plus) - objective(*minus)) / (2 * eps)
        an = (grad * dirs[i]).sum().item()
        assert abs(fd - an) <= 1e-4 * (1 + abs(fd)), f"d/d{name}: analytic {an:.6g} vs FD {fd:.6g}"


def test_infeasible_row_is_flagged_and_does_not_poison_the_batch():
    x0, C, c, C_f, F, f = random_problem(5, B=3)
    x0 = x0.clamp(-0.5, 0.5)
    x0[1] = torch.tensor([40.0, -40.0], dtype=DT)  # cannot reach |x| <= 1 with |u| <= 0.5
    x0.requires_grad_(True)
    layer = QPMPC(3, 2, 1, u_lower=-0.5, u_upper=0.5, x_lower=-1.0, x_upper=1.0)
    sol = layer(x0, QuadraticCost(C, c, C_f), LinearDynamics(F, f))
    assert sol.converged.tolist() == [True, False, True]
    assert sol.extras["status"][1] == "infeasible"
    assert torch.isnan(sol.u[1]).all()
    ok = [0, 2]
    assert torch.isfinite(sol.u[ok]).all() and torch.isfinite(sol.x[ok]).all()
    x_ref, u_ref, status = cvxpy_plan(x0[ok], C, c, C_f, F, f, -0.5, 0.5, -1.0, 1.0)
    assert status == ["optimal", "optimal"]
    close(sol.u[ok], u_ref, 1e-4, "feasible rows vs cvxpy")
    (g,) = torch.autograd.grad(sol.u[sol.converged].sum(), x0)
    assert torch.isfinite(g).all() and (g[1] == 0).all() and g[ok].abs().sum() > 0


def test_solver_that_raises_for_the_batch_is_retried_row_by_row():
    # SCS (unlike Clarabel) raises for the whole batch when one row is infeasible.
    x0, C, c, C_f, F, f = random_problem(5, B=3)
    x0 = x0.clamp(-0.5, 0.5)
    x0[1] = torch.tensor([40.0, -40.0], dtype=DT)
    args = {"solve_method": "SCS", "mode": "dense", "eps": 1e-10, "max_iters": 20000,
            "n_jobs_forward": 1}
    layer = QPMPC(3, 2, 1, u_lower=-0.5, u_upper=0.5, x_lower=-1.0, x_upper=1.0,
                  solver_args=args)
    sol = layer(x0, QuadraticCost(C, c, C_f), LinearDynamics(F, f))
    assert sol.converged.tolist() == [True, False, True]
    assert sol.extras["status"][1] == "infeasible"
    assert any("rows [0, 1, 2]" in e for e in sol.extras["errors"])
    _, u_ref, _ = cvxpy_plan(x0[[0, 2]], C, c, C_f, F, f, -0.5, 0.5, -1.0, 1.0)
    close(sol.u[[0, 2]], u_ref, 1e-4, "feasible rows vs cvxpy")


def test_float32_and_broadcast_batch():
    x0, C, c, C_f, F, f = random_problem(2, B=3)
    layer = QPMPC(3, 2, 1, u_lower=-0.4, u_upper=0.4).to("cpu")
    ref = layer(x0, QuadraticCost(C, c, C_f), LinearDynamics(F, f))
    sol = layer(x0.float(), QuadraticCost(C.float(), c.float(), C_f.float()),
                LinearDynamics(F.float(), f.float()))
    assert sol.u.dtype == torch.float32 and sol.x.shape == (3, 4, 2) and sol.cost.shape == (3,)
    close(sol.u.double(), ref.u, 1e-5, "float32 vs float64")
    batched = layer(x0, QuadraticCost(C.expand(3, -1, -1, -1), c), LinearDynamics(F, f))
    close(batched.u, layer(x0, QuadraticCost(C, c), LinearDynamics(F, f)).u, 1e-9, "broadcast")


def test_ill_posed_input_raises():
    x0, C, c, C_f, F, f = random_problem(0)
    cost, dyn = QuadraticCost(C, c, C_f), LinearDynamics(F, f)
    with pytest.raises(ValueError, match="u_lower"):
        QPMPC(3, 2, 1, u_lower=1.0, u_upper=0.0)
    with pytest.raises(ValueError, match="x_lower"):
        QPMPC(3, 2, 1, x_lower=torch.tensor([0.0, 2.0]), x_upper=1.0)
    with pytest.raises(ValueError, match="G and h"):
        QPMPC(3, 2, 1, G=torch.ones(1, 3))
    with pytest.raises(ValueError, match="h must have shape"):
        QPMPC(3, 2, 1, G=torch.ones(2, 3), h=torch.ones(3))
    with pytest.raises(ValueError, match="u_upper"):
        QPMPC(3, 2, 1, u_upper=torch.ones(4, 1))
    layer = QPMPC(3, 2, 1)
    with pytest.raises(ValueError, match="x0"):
        layer(torch.ones(2, 3, dtype=DT), cost, dyn)
    with pytest.raises(ValueError, match="x0"):
        layer(torch.full((2, 2), float("nan"), dtype=DT), cost, dyn)
    with pytest.raises(ValueError, match="horizon"):
        layer(x0, QuadraticCost(C[:2], c[:2]), dyn)
    bad = C.clone()
    bad[:, 0, 0] = -5.0  # indefinite in x, still PD in u
    with pytest.raises(ValueError, match="positive semidefinite"):
        layer(x0, QuadraticCost(bad, c), dyn)
    bad = C.clone()
    bad[:, 2, 2] = 0.0
    bad[:, 2, :2] = bad[:, :2, 2] = 0.0
    with pytest.raises(ValueError, match="positive definite"):
        layer(x0, QuadraticCost(bad, c), dyn)
    with pytest.raises(ValueError, match="dynamics"):
        layer(x0, cost, LinearDynamics(torch.ones(3, 3, 4, dtype=DT)))
    with pytest.raises(ValueError, match="dynamics must be a LinearDynamics"):
        layer(x0, cost)
    with pytest.raises(ValueError, match="cost must be a QuadraticCost"):
        layer(x0, NonlinearCost(lambda x, u: x.pow(2).sum(-1) + u.pow(2).sum(-1)), dyn)


def test_call_contract():
    """Dynamics fixed at construction or given per call (the call's wins); ``u_init`` is
    accepted and ignored; with state bounds there are no costates (their multipliers are
    unknown) but the active control sets are still reported."""
    x0, C, c, C_f, F, f = random_problem(4)
    cost, dyn = QuadraticCost(C, c, C_f), LinearDynamics(F, f)
    per_call = QPMPC(3, 2, 1)(x0, cost, dyn)
    other = LinearDynamics(F, f + 1.0)
    fixed = QPMPC(3, dynamics=other)
    built_in = fixed(x0, cost, dyn, u_init=torch.full((2, 3, 1), 5.0, dtype=DT))
    torch.testing.assert_close(built_in.u, per_call.u, atol=1e-9, rtol=0)
    assert (fixed(x0, cost).u - per_call.u).abs().max() > 1e-3  # the constructor's dynamics
    boxed = QPMPC(3, 2, 1, u_lower=-0.1, u_upper=0.1, x_upper=10.0)(x0, cost, dyn)
    assert "costates" not in boxed.extras
    assert boxed.extras["active_lower"].shape == (2, 3, 1)
    assert (boxed.extras["active_lower"] | boxed.extras["active_upper"]).any()
