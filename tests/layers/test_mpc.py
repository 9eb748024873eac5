"""Tests of the nonlinear MPC layer: optimality against independent references, gradients
against central differences of exact re-solves, per-row convergence, and input checks."""

from __future__ import annotations

import cvxpy as cp
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diffto import LinearDynamics, QuadraticCost
from diffto.layers._box_ddp import _box_qp
from diffto.layers.mpc import MPC

F64 = torch.float64
TIGHT = dict(tol=1e-11, max_iter=60)


class Pendulum(nn.Module):
    """Semi-implicit Euler pendulum, state (θ, ω), torque u; learnable pole length."""

    def __init__(self, length: float = 1.0, dt: float = 0.05, dtype=F64) -> None:
        super().__init__()
        self.length = nn.Parameter(torch.tensor(length, dtype=dtype))
        self.dt = dt

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        th, om = x[..., 0], x[..., 1]
        om_next = om + self.dt * (-9.81 / self.length * torch.sin(th) + u[..., 0] / self.length**2)
        return torch.stack([th + self.dt * om_next, om_next], -1)


def linear_problem(seed: int, B: int, T: int, n: int, m: int, dtype=F64):
    """A random well-posed LQ problem: PD stage costs, mildly unstable dynamics."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    M = r(T, n + m, n + m)
    C = M @ M.transpose(-1, -2) / (n + m) + 0.5 * torch.eye(n + m, dtype=dtype)
    Mf = r(n, n)
    cost = QuadraticCost(C, r(T, n + m), Mf @ Mf.T / n + torch.eye(n, dtype=dtype), r(n))
    F = torch.cat([torch.eye(n, dtype=dtype) + 0.3 * r(T, n, n) / n**0.5, r(T, n, m)], -1)
    dyn = LinearDynamics(F, 0.1 * r(T, n))
    return r(B, n), cost, dyn


def dense_lq_solve(x0, cost: QuadraticCost, dyn: LinearDynamics):
    """Reference: the LQ problem as one dense equality-constrained QP, solved by its KKT system.

    Variables z = (x_1..x_T, u_0..u_{T-1}) per row; returns u (B, T, m)."""
    B, n = x0.shape
    T, m = cost.horizon, cost.n_tau - n
    C, c, C_f, c_f = cost.C, cost.c, cost.C_final, cost.c_final
    F, f = dyn.F, dyn.f
    nz = T * n + T * m

    def xi(t):  # columns of x_t in z (t >= 1)
        return slice((t - 1) * n, t * n)

    def ui(t):
        return slice(T * n + t * m, T * n + (t + 1) * m)

    us = []
    for b in range(B):
        P = torch.zeros(nz, nz, dtype=F64)
        q = torch.zeros(nz, dtype=F64)
        E = torch.zeros(T * n, nz, dtype=F64)
        e = torch.zeros(T * n, dtype=F64)
        for t in range(T):
            Ct = 0.5 * (C[t] + C[t].T)
            Cxx, Cxu, Cuu = Ct[:n, :n], Ct[:n, n:], Ct[n:, n:]
            P[ui(t), ui(t)] += Cuu
            q[ui(t)] += c[t, n:]
            if t == 0:  # x_0 is data: its terms are linear in u_0 or constant
                q[ui(t)] += Cxu.T @ x0[b]
            else:
                P[xi(t), xi(t)] += Cxx
                P[xi(t), ui(t)] += Cxu
                P[ui(t), xi(t)] += Cxu.T
                q[xi(t)] += c[t, :n]
            rows = slice(t * n, (t + 1) * n)  # x_{t+1} - A x_t - B u_t = f_t
            E[rows, xi(t + 1)] = torch.eye(n, dtype=F64)
            E[rows, ui(t)] = -F[t, :, n:]
            if t == 0:
                e[rows] = F[t, :, :n] @ x0[b] + f[t]
            else:
                E[rows, xi(t)] = -F[t, :, :n]
                e[rows] = f[t]
        P[xi(T), xi(T)] += 0.5 * (C_f + C_f.T)
        q[xi(T)] += c_f
        K = torch.cat([torch.cat([P, E.T], 1), torch.cat([E, torch.zeros(T * n, T * n,
                                                                          dtype=F64)], 1)])
        z = torch.linalg.solve(K, torch.cat([-q, e]))
        us.append(z[T * n: nz].view(T, m))
    return torch.stack(us)


def cvxpy_box_solve(x0, cost: QuadraticCost, dyn: LinearDynamics, lo: float, hi: float):
    """Reference: the box-constrained LQ problem as a convex QP, Clarabel at tight tolerance."""
    B, n = x0.shape
    T, m = cost.horizon, cost.n_tau - n
    C = (0.5 * (cost.C + cost.C.transpose(-1, -2))).numpy()
    c, C_f, c_f = cost.c.numpy(), cost.C_final.numpy(), cost.c_final.numpy()
    F, f = dyn.F.numpy(), dyn.f.numpy()
    us = []
    for b in range(B):
        x = cp.Variable((T + 1, n))
        u = cp.Variable((T, m))
        obj, cons = 0, [x[0] == x0[b].numpy(), u >= lo, u <= hi]
        for t in range(T):
            tau = cp.hstack([x[t], u[t]])
            obj += 0.5 * cp.quad_form(tau, cp.psd_wrap(C[t])) + c[t] @ tau
            cons.append(x[t + 1] == F[t] @ tau + f[t])
        obj += 0.5 * cp.quad_form(x[T], cp.psd_wrap(C_f)) + c_f @ x[T]
        prob = cp.Problem(cp.Minimize(obj), cons)
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        assert prob.status == "optimal", prob.status
        us.append(torch.as_tensor(u.value))
    return torch.stack(us)


def directional_fd(fun, args: list, dirs: list, eps: float = 1e-6) -> float:
    """Central difference of ``fun`` along ``dirs`` (one per entry of ``args``, None = fixed)."""
    def shifted(s):
        return [a if d is None else a + s * eps * d for a, d in zip(args, dirs, strict=True)]
    return ((fun(*shifted(1)) - fun(*shifted(-1))) / (2 * eps)).item()


def loss_weights(seed, B, T, n, m):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(B, T + 1, n, generator=g, dtype=F64),
            torch.randn(B, T, m, generator=g, dtype=F64))


def assert_close(analytic: float, fd: float, name: str, rtol: float = 1e-5, atol: float = 1e-6):
    assert abs(analytic - fd) <= atol + rtol * abs(fd), (
        f"{name}: analytic {analytic:.10g} vs finite difference {fd:.10g}, "
        f"difference {abs(analytic - fd):.3g}"
    )


def degenerate(sol, lo, hi, margin: float = 1e-4) -> bool:
    """True if some control sits near a bound without being clamped to it."""
    u = sol.u
    near_lo = ((u - lo).abs() < margin) & ~sol.extras["active_lower"]
    near_hi = ((hi - u).abs() < margin) & ~sol.extras["active_upper"]
    return bool((near_lo | near_hi).any())


def weakly_active(sol, cost, F, margin: float = 1e-5) -> bool:
    """True if a clamped control has a multiplier near zero (affine dynamics ``F (T, n, k)``):
    the reduced gradient ``ℓ_u + B_tᵀλ_{t+1}`` at the clamped entries."""
    n = sol.x.shape[-1]
    tau = torch.cat([sol.x[:, :-1], sol.u], -1)
    C = 0.5 * (cost.C + cost.C.transpose(-1, -2))
    grad_u = (C @ tau.unsqueeze(-1)).squeeze(-1)[..., n:] + cost.c[..., n:]
    lam = sol.extras["costates"][:, 1:]
    grad_u = grad_u + (F[..., n:].transpose(-1, -2) @ lam.unsqueeze(-1)).squeeze(-1)
    active = sol.extras["active_lower"] | sol.extras["active_upper"]
    return bool((grad_u.abs()[active] < margin).any())


# ----------------------------------------------------------------------------- forward


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 6), st.integers(1, 3),
       st.integers(0, 10_000))
def test_unconstrained_linear_matches_dense_kkt_and_lqr(n, m, T, B, seed):
    x0, cost, dyn = linear_problem(seed, B, T, n, m)
    sol = MPC(dyn, T, **TIGHT)(x0, cost)
    assert sol.converged.all()
    assert (sol.iterations == 1).all()  # one Newton step solves an LQ problem
    u_ref = dense_lq_solve(x0, cost, dyn)
    torch.testing.assert_close(sol.u, u_ref, atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(sol.x[:, 0], x0)
    try:
        from diffto.layers.lqr import LQR
    except ImportError:
        return
    ref = LQR()(x0, cost, dyn)
    torch.testing.assert_close(sol.u, ref.u, atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(sol.x, ref.x, atol=1e-9, rtol=1e-8)


@settings(max_examples=8)
@given(st.integers(1, 3), st.integers(1, 2), st.integers(2, 6), st.integers(0, 10_000),
       st.floats(0.05, 0.8))
def test_box_constrained_linear_matches_cvxpy(n, m, T, seed, bound):
    x0, cost, dyn = linear_problem(seed, 2, T, n, m)
    sol = MPC(dyn, T, u_lower=-bound, u_upper=bound, **TIGHT)(x0, cost)
    assert sol.converged.all()
    u_ref = cvxpy_box_solve(x0, cost, dyn, -bound, bound)
    torch.testing.assert_close(sol.u, u_ref, atol=2e-6, rtol=1e-6)
    # The reported active set is where the plan sits on a bound.
    assert torch.equal(sol.extras["active_lower"], sol.extras["active_lower"] & (sol.u == -bound))
    assert torch.equal(sol.extras["active_upper"], sol.extras["active_upper"] & (sol.u == bound))


@settings(max_examples=10)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 10_000))
def test_box_qp_is_optimal(N, m, seed):
    """Projected Newton meets the KKT conditions of the box QP."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(N, m, m, generator=g, dtype=F64)
    H = M @ M.transpose(-1, -2) + 0.1 * torch.eye(m, dtype=F64)
    q = 3 * torch.randn(N, m, generator=g, dtype=F64)
    lo = -torch.rand(N, m, generator=g, dtype=F64)
    hi = torch.rand(N, m, generator=g, dtype=F64)
    lo[:, 0] = -float("inf")  # one unbounded entry
    d, side, ok, L = _box_qp(H, q, lo, hi)
    free = side == 0
    assert ok.all()
    assert ((d >= lo) & (d <= hi)).all()
    grad = (H @ d.unsqueeze(-1)).squeeze(-1) + q
    torch.testing.assert_close(grad[free], torch.zeros_like(grad[free]), atol=1e-9, rtol=0)
    assert (grad[~free & (d == lo)] >= 0).all() and (grad[~free & (d == hi)] <= 0).all()
    assert torch.equal(side == -1, (d == lo) & (grad > 0))
    assert torch.equal(side == 1, (d == hi) & (grad < 0))
    # L factors H on the free set: L Lᵀ reproduces the free block.
    both = free.unsqueeze(-1) & free.unsqueeze(-2)
    torch.testing.assert_close((L @ L.transpose(-1, -2))[both], H[both])


def box_ddp(dyn, T, x0, cost, **kw):
    """The general solver on a linear problem (``backward="unroll"`` bypasses the active-set
    solver; under ``no_grad`` nothing is recorded)."""
    with torch.no_grad():
        return MPC(dyn, T, backward="unroll", **kw)(x0, cost)


@settings(max_examples=6)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(2, 12), st.integers(0, 10_000),
       st.floats(0.05, 0.6))
def test_active_set_solver_meets_kkt_and_matches_box_ddp(n, m, T, seed, bound):
    """The linear path (active-set LQ) against box-DDP, and its KKT conditions directly."""
    x0, cost, dyn = linear_problem(seed, 4, T, n, m)
    with torch.no_grad():
        sol = MPC(dyn, T, u_lower=-bound, u_upper=bound, **TIGHT)(x0, cost)
    ref = box_ddp(dyn, T, x0, cost, u_lower=-bound, u_upper=bound, **TIGHT)
    assert sol.converged.all() and ref.converged.all()
    assert (sol.extras["regularization"] == 0).all() and not sol.extras["stalled"].any()
    torch.testing.assert_close(sol.u, ref.u, atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.x, ref.x, atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.extras["costates"], ref.extras["costates"], atol=1e-8,
                               rtol=0)
    # Reduced gradient g = ℓ_u + B_tᵀλ_{t+1}: zero on free controls, pushing out of the box on
    # clamped ones; the plan is feasible and follows the dynamics.
    tau = torch.cat([sol.x[:, :-1], sol.u], -1)
    C = 0.5 * (cost.C + cost.C.transpose(-1, -2))
    g = (C @ tau.unsqueeze(-1)).squeeze(-1)[..., n:] + cost.c[..., n:]
    g = g + (dyn.F[..., n:].transpose(-1, -2) @ sol.extras["costates"][:, 1:].unsqueeze(-1)
             ).squeeze(-1)
    lo_act, hi_act = sol.extras["active_lower"], sol.extras["active_upper"]
    free = ~(lo_act | hi_act)
    torch.testing.assert_close(g[free], torch.zeros_like(g[free]), atol=1e-9, rtol=0)
    assert (g[lo_act] > 0).all() and (g[hi_act] < 0).all()
    assert (sol.u[lo_act] == -bound).all() and (sol.u[hi_act] == bound).all()
    assert (sol.u.abs() <= bound).all()
    x_next = (dyn.F @ tau.unsqueeze(-1)).squeeze(-1) + dyn.f
    torch.testing.assert_close(sol.x[:, 1:], x_next, atol=1e-12, rtol=0)


def test_nonconvex_rows_fall_back_to_box_ddp():
    """A row whose state cost is concave enough to make Q_uu indefinite is solved by box-DDP;
    the convex rows of the same batch keep the active-set result."""
    T, n, m = 6, 2, 1
    x0, cost, dyn = linear_problem(5, 2, T, n, m)
    C = cost.C.expand(2, -1, -1, -1).clone()
    C[1, :, :n, :n] -= 3.0 * torch.eye(n, dtype=F64)  # row 1: indefinite state cost
    bad = QuadraticCost(C, cost.c, cost.C_final, cost.c_final)
    kw = dict(u_lower=-0.5, u_upper=0.5, **TIGHT)
    with torch.no_grad():
        sol = MPC(dyn, T, **kw)(x0, bad)
        convex_only = MPC(dyn, T, **kw)(x0[:1], cost)
    ref = box_ddp(dyn, T, x0, bad, **kw)
    assert ref.extras["regularization"][1] > 0  # box-DDP had to regularize row 1
    torch.testing.assert_close(sol.u[1], ref.u[1], atol=1e-9, rtol=0)
    assert sol.converged[1] == ref.converged[1]
    assert sol.extras["regularization"][1] == ref.extras["regularization"][1]
    torch.testing.assert_close(sol.u[0], convex_only.u[0], atol=1e-12, rtol=0)
    assert sol.extras["regularization"][0] == 0


def test_unsettled_active_set_rows_continue_with_box_ddp(monkeypatch):
    """Past the active-set sweep budget a row is handed to box-DDP from its last iterate and
    still reaches the optimum; the iterations of both solvers are counted."""
    import diffto.layers.mpc as mpc_module

    x0, cost, dyn = linear_problem(7, 6, 10, 3, 2)
    kw = dict(u_lower=-0.2, u_upper=0.2, **TIGHT)
    with torch.no_grad():
        full = MPC(dyn, 10, **kw)(x0, cost)
        monkeypatch.setattr(mpc_module, "_ACTIVE_SET_ITERS", 1)
        capped = MPC(dyn, 10, **kw)(x0, cost)
    assert full.converged.all() and capped.converged.all()
    assert (full.iterations >= 2).any()  # the cap does bind
    torch.testing.assert_close(capped.u, full.u, atol=1e-9, rtol=0)
    assert (capped.iterations >= 1).all()


def test_active_set_budget_flags_unconverged_rows_with_a_consistent_plan():
    """One active-set sweep is not enough with many bounds active: the rows are flagged, their
    plan is feasible and is the rollout of its controls."""
    x0, cost, dyn = linear_problem(9, 4, 10, 3, 2)
    with torch.no_grad():
        sol = MPC(dyn, 10, u_lower=-0.1, u_upper=0.1, max_iter=1, tol=1e-11)(x0, cost)
    assert not sol.converged.all()
    assert (sol.iterations <= 1).all()
    assert (sol.u.abs() <= 0.1).all()
    tau = torch.cat([sol.x[:, :-1], sol.u], -1)
    x_next = (dyn.F @ tau.unsqueeze(-1)).squeeze(-1) + dyn.f
    torch.testing.assert_close(sol.x[:, 1:], x_next, atol=1e-12, rtol=0)


def test_reused_factorization_gives_the_general_adjoint(monkeypatch):
    """The backward pass reuses the active-set solver's last factorization; forcing the general
    adjoint sweep (a fresh factorization) must give the same gradients."""
    import diffto.layers.mpc as mpc_module

    x0, cost, dyn = linear_problem(13, 3, 8, 3, 2)
    w_x, w_u = loss_weights(13, 3, 8, 3, 2)

    def gradients():
        leaves = [t.clone().requires_grad_() for t in (x0, cost.C, cost.c, dyn.F)]
        hi = torch.full((8, 2), 0.3, dtype=F64, requires_grad=True)
        sol = MPC(LinearDynamics(leaves[3], dyn.f), 8, u_lower=-0.3, u_upper=hi, **TIGHT)(
            leaves[0], QuadraticCost(leaves[1], leaves[2], cost.C_final, cost.c_final))
        assert sol.converged.all() and sol.extras["active_upper"].any()
        return torch.autograd.grad((sol.x * w_x).sum() + (sol.u * w_u).sum(), [*leaves, hi])

    import diffto.layers._implicit as implicit_module

    real_engine = implicit_module.engine
    factorizations = []  # fresh factorizations made by the backward pass

    class CountingEngine:
        def __getattr__(self, name):
            return getattr(real_engine, name)

        def factor(self, *args, **kwargs):
            factorizations.append(1)
            return real_engine.factor(*args, **kwargs)

    monkeypatch.setattr(implicit_module, "engine", CountingEngine())
    reused = gradients()
    assert factorizations == []  # the fast path reused the forward factorization
    solve_linear = mpc_module._solve_linear

    def no_reuse(*args):
        return {**solve_linear(*args), "value": torch.zeros(0, dtype=F64)}

    monkeypatch.setattr(mpc_module, "_solve_linear", no_reuse)
    general = gradients()
    assert factorizations == [1]
    for a, b in zip(reused, general, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_cycling_active_set_rows_are_caught_and_finished_by_projected_newton(monkeypatch):
    """From these warm starts PDAS cycles (its reduced Hessian is not an M-matrix): without the
    guard it never settles; with it the rows are handed to projected Newton, which reaches the
    optimum (the box-DDP plan) well within the sweep budget."""
    import diffto.layers._active_set as active_set

    T, n, m, bound = 8, 2, 1, 0.1
    x0, cost, dyn = linear_problem(1, 64, T, n, m)
    g = torch.Generator().manual_seed(1)
    u_init = (1.5 * bound * (2 * torch.rand(64, T, m, generator=g, dtype=F64) - 1))[[8, 12]]
    x0 = x0[[8, 12]]
    C = 0.5 * (cost.C + cost.C.transpose(-1, -2))
    lo = torch.full((2, T, m), -bound, dtype=F64)
    args = (x0, C.expand(2, -1, -1, -1), cost.c.expand(2, -1, -1),
            cost.C_final.expand(2, -1, -1), cost.c_final.expand(2, -1),
            dyn.F.expand(2, -1, -1, -1), dyn.f.expand(2, -1, -1), lo, -lo, u_init, 40, 1e-11)
    out = active_set.solve_box_lq(*args)
    assert out["converged"].all() and (out["iterations"] < 20).all()
    ref = box_ddp(dyn, T, x0, cost, u_lower=-bound, u_upper=bound, **TIGHT)
    torch.testing.assert_close(out["u"], ref.u, atol=1e-9, rtol=0)
    with torch.no_grad():
        sol = MPC(dyn, T, u_lower=-bound, u_upper=bound, **TIGHT)(x0, cost, u_init=u_init)
    assert sol.converged.all() and (sol.extras["regularization"] == 0).all()
    torch.testing.assert_close(sol.u, ref.u, atol=1e-9, rtol=0)
    monkeypatch.setattr(active_set, "_BLOCK_TRIES", 10**6)  # no guard: PDAS cycles
    assert not active_set.solve_box_lq(*args)["converged"].any()


def test_pendulum_swing_up_is_a_local_optimum():
    """Nonlinear forward: both Hessian modes reach the same stationary plan, and it beats
    nearby feasible plans."""
    T = 20
    pend = Pendulum()
    cost = QuadraticCost.tracking(torch.tensor([1.0, 0.1], dtype=F64),
                                  torch.tensor([0.05], dtype=F64), T,
                                  x_goal=torch.tensor([torch.pi, 0.0], dtype=F64))
    x0 = torch.tensor([[0.0, 0.0], [0.3, -1.0]], dtype=F64)
    with torch.no_grad():
        exact = MPC(pend, T, u_lower=-6.0, u_upper=6.0, **TIGHT)(x0, cost)
        gn = MPC(pend, T, u_lower=-6.0, u_upper=6.0, hessian="gauss_newton", tol=1e-11,
                 max_iter=300)(x0, cost)
    assert exact.converged.all() and gn.converged.all()
    assert (exact.iterations < gn.iterations).all()  # Newton beats Gauss-Newton
    torch.testing.assert_close(exact.u, gn.u, atol=1e-7, rtol=1e-7)
    assert (exact.extras["active_lower"] | exact.extras["active_upper"]).any()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        u = (exact.u + 1e-3 * torch.randn(exact.u.shape, generator=g, dtype=F64)).clamp(-6, 6)
        xs = [x0]
        with torch.no_grad():
            for t in range(T):
                xs.append(pend(xs[-1], u[:, t]))
        assert (cost.evaluate(torch.stack(xs, 1), u) >= exact.cost - 1e-12).all()


def test_gains_are_the_local_feedback_law():
    """``u_0*(x0 + δ) ≈ u_0*(x0) + K_0 δ`` at the solution, clamped entries having zero gain."""
    x0, cost, dyn = linear_problem(4, 3, 6, 3, 2)
    mpc = MPC(dyn, 6, u_lower=-0.4, u_upper=0.4, **TIGHT)
    with torch.no_grad():
        sol = mpc(x0, cost)
        delta = 1e-6 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0),
                                   dtype=F64)
        moved = mpc(x0 + delta, cost)
    K0 = sol.extras["gains"][:, 0]  # (B, m, n)
    predicted = sol.u[:, 0] + (K0 @ delta.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(moved.u[:, 0], predicted, atol=1e-11, rtol=0)
    clamped = sol.extras["active_lower"] | sol.extras["active_upper"]
    assert clamped.any()
    assert (sol.extras["gains"][clamped] == 0).all()


def test_cost_scaling_leaves_the_plan_unchanged():
    T = 12
    pend = Pendulum()
    cost = QuadraticCost.tracking(torch.tensor([1.0, 0.2], dtype=F64),
                                  torch.tensor([0.1], dtype=F64), T,
                                  x_goal=torch.tensor([2.0, 0.0], dtype=F64))
    x0 = torch.tensor([[0.0, 0.0], [0.5, 1.0], [-0.5, 0.0]], dtype=F64)
    mpc = MPC(pend, T, u_lower=-4.0, u_upper=4.0, **TIGHT)
    with torch.no_grad():
        ref = mpc(x0, cost)
        for alpha in (1e-3, 7.0, 1e4):
            scaled = QuadraticCost(alpha * cost.C, alpha * cost.c, alpha * cost.C_final,
                                   alpha * cost.c_final)
            sol = mpc(x0, scaled)
            assert sol.converged.all()
            torch.testing.assert_close(sol.u, ref.u, atol=1e-9, rtol=1e-9)
            torch.testing.assert_close(sol.cost, alpha * ref.cost)


def test_warm_start_is_clamped_and_used():
    x0, cost, dyn = linear_problem(3, 2, 5, 2, 1)
    mpc = MPC(dyn, 5, u_lower=-0.2, u_upper=0.2, **TIGHT)
    with torch.no_grad():
        ref = mpc(x0, cost)
        warm = mpc(x0, cost, u_init=ref.u)
        far = mpc(x0, cost, u_init=torch.full((5, 1), 50.0, dtype=F64))
    assert (warm.iterations == 0).all() and warm.converged.all()
    torch.testing.assert_close(warm.u, ref.u)
    assert far.converged.all()
    torch.testing.assert_close(far.u, ref.u, atol=1e-9, rtol=0)


def test_float32_and_batched_time_varying_dynamics():
    x0, cost, dyn = linear_problem(5, 3, 6, 3, 2)
    F = dyn.F.expand(3, -1, -1, -1).clone()
    F[1, :, :, 3:] *= 0.5  # a different plant per row
    batched = LinearDynamics(F, dyn.f)
    sol64 = MPC(batched, 6, u_lower=-0.5, u_upper=0.5, **TIGHT)(x0, cost)
    for b in range(3):
        one = MPC(LinearDynamics(F[b], dyn.f), 6, u_lower=-0.5, u_upper=0.5, **TIGHT)(
            x0[b:b + 1], cost)
        torch.testing.assert_close(one.u[0], sol64.u[b])
    cost32 = QuadraticCost(cost.C.float(), cost.c.float(), cost.C_final.float(),
                           cost.c_final.float())
    x0_32 = x0.float().requires_grad_()
    sol32 = MPC(LinearDynamics(F.float(), dyn.f.float()), 6, u_lower=-0.5, u_upper=0.5)(
        x0_32, cost32)
    assert sol32.u.dtype == torch.float32 and sol32.converged.all()
    torch.testing.assert_close(sol32.u.double(), sol64.u, atol=1e-4, rtol=1e-4)
    sol32.u.sum().backward()
    assert x0_32.grad is not None and torch.isfinite(x0_32.grad).all()


# ----------------------------------------------------------------------------- gradients


@settings(max_examples=8)
@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 5), st.integers(1, 2),
       st.integers(0, 10_000), st.sampled_from([None, 0.3, 0.8]))
def test_linear_gradients_match_finite_differences(n, m, T, B, seed, bound):
    """Every tensor input, with and without active bounds, against re-solves."""
    x0, cost, dyn = linear_problem(seed, B, T, n, m)
    w_x, w_u = loss_weights(seed, B, T, n, m)
    lo = None if bound is None else torch.full((T, m), -bound, dtype=F64)
    hi = None if bound is None else torch.full((1, m), bound, dtype=F64)

    def loss(x0, C, c, C_f, c_f, F, f, lo, hi, check=False):
        sol = MPC(LinearDynamics(F, f), T, u_lower=lo, u_upper=hi, **TIGHT)(
            x0, QuadraticCost(C, c, C_f, c_f))
        assert sol.converged.all()
        if check and lo is not None:
            if degenerate(sol, lo, hi) or weakly_active(sol, QuadraticCost(C, c), F):
                return None
        return (sol.x * w_x).sum() + (sol.u * w_u).sum()

    args = [x0, cost.C, cost.c, cost.C_final, cost.c_final, dyn.F, dyn.f, lo, hi]
    names = ["x0", "C", "c", "C_final", "c_final", "F", "f", "u_lower", "u_upper"]
    leaves = [None if a is None else a.clone().requires_grad_() for a in args]
    value = loss(*leaves, check=True)
    if value is None:
        return  # a bound is (nearly) weakly active: the solution map is not differentiable
    present = [i for i, a in enumerate(leaves) if a is not None]
    grads = torch.autograd.grad(value, [leaves[i] for i in present])
    g = torch.Generator().manual_seed(seed + 2)
    for i, grad in zip(present, grads, strict=True):
        direction = torch.randn(args[i].shape, generator=g, dtype=F64)
        dirs = [direction if j == i else None for j in range(len(args))]
        fd = directional_fd(loss, args, dirs)
        assert_close((grad * direction).sum().item(), fd, names[i])


def pendulum_cost(T, q_scale=1.0):
    return QuadraticCost.tracking(q_scale * torch.tensor([1.0, 0.1], dtype=F64),
                                  torch.tensor([0.1], dtype=F64), T,
                                  x_goal=torch.tensor([2.5, 0.0], dtype=F64),
                                  Q_final=torch.tensor([10.0, 1.0], dtype=F64))


@settings(max_examples=5)
@given(st.integers(0, 10_000), st.sampled_from([None, 3.0]))
def test_nonlinear_gradients_match_finite_differences(seed, bound):
    """Pendulum: gradients w.r.t. x0, C, c and the learnable length, through the exact
    (curvature-including) adjoint, with and without active bounds."""
    T, B = 10, 2
    g = torch.Generator().manual_seed(seed)
    x0 = 0.5 * torch.randn(B, 2, generator=g, dtype=F64)
    cost = pendulum_cost(T)
    C, c = cost.C.clone(), cost.c.clone()
    w_x, w_u = loss_weights(seed, B, T, 2, 1)
    pend = Pendulum()
    lo, hi = (None, None) if bound is None else (-bound, bound)

    def loss(x0, C, c, length, check=False):
        with torch.no_grad():
            pend.length.copy_(length)
        sol = MPC(pend, T, u_lower=lo, u_upper=hi, **TIGHT)(x0, QuadraticCost(
            C, c, cost.C_final, cost.c_final))
        assert sol.converged.all()
        if check and lo is not None and degenerate(sol, lo, hi):
            return None
        return (sol.x * w_x).sum() + (sol.u * w_u).sum(), sol

    leaves = [x0.clone().requires_grad_(), C.clone().requires_grad_(),
              c.clone().requires_grad_()]
    out = loss(*leaves, torch.tensor(1.0, dtype=F64), check=True)
    if out is None:
        return
    value, _ = out
    grads = torch.autograd.grad(value, [*leaves, pend.length])
    args = [x0, C, c, torch.tensor(1.0, dtype=F64)]
    for i, name in enumerate(["x0", "C", "c", "length"]):
        direction = torch.randn(args[i].shape, generator=g, dtype=F64)
        dirs = [direction if j == i else None for j in range(4)]
        fd = directional_fd(lambda *a: loss(*a)[0], args, dirs)
        assert_close((grads[i] * direction).sum().item(), fd, name)


def test_bounds_are_active_in_the_nonlinear_gradient_test():
    """The bounded pendulum problem above does clamp controls (so the test exercises 𝒜)."""
    x0 = torch.tensor([[0.3, -0.2], [-0.4, 0.1]], dtype=F64)
    with torch.no_grad():
        sol = MPC(Pendulum(), 10, u_lower=-3.0, u_upper=3.0, **TIGHT)(x0, pendulum_cost(10))
    assert sol.converged.all()
    assert (sol.extras["active_lower"] | sol.extras["active_upper"]).sum() >= 2


def test_gradient_flows_to_an_active_bound_only():
    x0, cost, dyn = linear_problem(11, 2, 6, 2, 1)
    hi = torch.full((6, 1), 0.2, dtype=F64, requires_grad=True)
    sol = MPC(dyn, 6, u_lower=-5.0, u_upper=hi, **TIGHT)(x0, cost)
    sol.u.sum().backward()
    active = sol.extras["active_upper"].any(0)  # (T, m): active in some row
    assert active.any() and (~active).any()
    assert (hi.grad[~active] == 0).all() and (hi.grad[active] != 0).all()
    # The total effect of shifting every upper bound, against re-solves.
    eps = 1e-6
    with torch.no_grad():
        up = MPC(dyn, 6, u_lower=-5.0, u_upper=hi + eps, **TIGHT)(x0, cost).u.sum()
        down = MPC(dyn, 6, u_lower=-5.0, u_upper=hi - eps, **TIGHT)(x0, cost).u.sum()
    assert_close(hi.grad.sum().item(), ((up - down) / (2 * eps)).item(), "u_upper")


def test_unroll_agrees_with_implicit_and_reaches_the_warm_start():
    """Autograd through the converged Newton iterations equals the implicit gradient (the
    Newton map is stationary at its fixed point), an independent check of the adjoint."""
    T = 10
    x0 = torch.tensor([[0.3, -0.2], [-0.4, 0.1]], dtype=F64)
    cost = pendulum_cost(T)
    grads = []
    for mode in ("implicit", "unroll"):
        pend = Pendulum()
        x0_l, C_l = x0.clone().requires_grad_(), cost.C.clone().requires_grad_()
        sol = MPC(pend, T, u_lower=-3.0, u_upper=3.0, backward=mode, **TIGHT)(
            x0_l, QuadraticCost(C_l, cost.c, cost.C_final, cost.c_final))
        assert sol.converged.all()
        (sol.u.sum() + (sol.x**2).sum()).backward()
        grads.append((x0_l.grad, C_l.grad, pend.length.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)
    # One unrolled step from a warm start depends on the warm start; the implicit one cannot.
    u_init = torch.full((2, T, 1), 0.5, dtype=F64, requires_grad=True)
    sol = MPC(Pendulum(), T, u_lower=-3.0, u_upper=3.0, backward="unroll", max_iter=1)(
        x0, cost, u_init=u_init)
    sol.u.sum().backward()
    assert u_init.grad is not None and u_init.grad.abs().sum() > 0


def test_equal_bounds_fix_a_control_and_route_its_gradient_once():
    """``u_lower == u_upper`` pins a control; its gradient goes to the bound that binds, once."""
    T, m = 5, 2
    x0, cost, dyn = linear_problem(21, 2, T, 3, m)
    lo = torch.full((T, m), -1.0, dtype=F64)
    hi = torch.full((T, m), 1.0, dtype=F64)
    lo[2], hi[2] = 0.1, 0.1
    lo_l, hi_l = lo.clone().requires_grad_(), hi.clone().requires_grad_()
    sol = MPC(dyn, T, u_lower=lo_l, u_upper=hi_l, **TIGHT)(x0, cost)
    assert (sol.u[:, 2] == 0.1).all()
    assert not (sol.extras["active_lower"] & sol.extras["active_upper"]).any()
    w = loss_weights(21, 2, T, 3, m)[1]
    (sol.u * w).sum().backward()
    pinned = torch.zeros(T, m, dtype=F64)
    pinned[2] = 1.0  # move the pinned value, i.e. both bounds together

    def loss(lo, hi):
        return (MPC(dyn, T, u_lower=lo, u_upper=hi, **TIGHT)(x0, cost).u * w).sum()

    fd = directional_fd(loss, [lo, hi], [pinned, pinned])
    assert_close(((lo_l.grad + hi_l.grad) * pinned).sum().item(), fd, "pinned bound")


def test_omitted_cost_terms_equal_zero_terms():
    x0, cost, dyn = linear_problem(8, 2, 4, 2, 1)
    grads = []
    for zeros in (False, True):
        C = cost.C.clone().requires_grad_()
        extra = (torch.zeros(4, 3, dtype=F64), torch.zeros(2, 2, dtype=F64),
                 torch.zeros(2, dtype=F64)) if zeros else (None, None, None)
        sol = MPC(dyn, 4, u_lower=-0.2, u_upper=0.2, **TIGHT)(x0, QuadraticCost(C, *extra))
        (sol.u.sum() + sol.x.sum()).backward()
        grads.append((sol.u.detach(), C.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_no_graph_when_nothing_requires_grad():
    x0, cost, dyn = linear_problem(2, 2, 4, 2, 1)
    sol = MPC(dyn, 4, u_lower=-0.3, u_upper=0.3)(x0, cost)
    assert sol.u.grad_fn is None and sol.x.grad_fn is None
    x0.requires_grad_()
    sol_g = MPC(dyn, 4, u_lower=-0.3, u_upper=0.3)(x0, cost)
    assert sol_g.u.grad_fn is not None
    torch.testing.assert_close(sol_g.u.detach(), sol.u, rtol=0, atol=0)


# ----------------------------------------------------------------------------- convergence


def test_unconverged_rows_are_flagged_and_still_get_gradients():
    """One iLQR step: the swing-up row is far from done, the row at rest at the goal is done."""
    T = 15
    pend = Pendulum()
    cost = QuadraticCost.tracking(torch.tensor([1.0, 0.1], dtype=F64),
                                  torch.tensor([0.1], dtype=F64), T,
                                  x_goal=torch.tensor([torch.pi, 0.0], dtype=F64))
    # Row 0 starts hanging down (hard), row 1 at the upright goal (already optimal at u = 0
    # up to gravity compensation, which one Newton step on near-linear dynamics finds).
    x0 = torch.tensor([[0.0, 0.0], [torch.pi, 0.0]], dtype=F64, requires_grad=True)
    sol = MPC(pend, T, u_lower=-4.0, u_upper=4.0, max_iter=1, tol=1e-6)(x0, cost)
    assert sol.converged.tolist() == [False, True]
    assert sol.iterations.tolist() == [1, 0]
    (sol.u.sum() + sol.x.sum()).backward()
    assert torch.isfinite(x0.grad).all()
    assert (x0.grad[0].abs() > 0).all()  # not detached, not zeroed
    assert torch.isfinite(pend.length.grad) and pend.length.grad != 0
    full = MPC(pend, T, u_lower=-4.0, u_upper=4.0, max_iter=50, tol=1e-6)(x0.detach(), cost)
    assert full.converged.all() and full.iterations[0] > 1
    assert full.cost[0] < sol.cost[0]


def test_a_failing_row_is_flagged_and_does_not_spoil_the_batch():
    """Dynamics undefined (NaN) for one row's states: that row stalls, the others solve."""

    class SqrtPlant(nn.Module):
        def forward(self, x, u):
            return x + 0.1 * u * torch.sqrt(1 + x[..., :1])

    T = 6
    cost = QuadraticCost.tracking(torch.ones(1, dtype=F64), torch.ones(1, dtype=F64), T,
                                  x_goal=torch.tensor([0.5], dtype=F64))
    x0 = torch.tensor([[0.0], [-3.0], [0.2]], dtype=F64)
    mpc = MPC(SqrtPlant(), T, **TIGHT)
    with torch.no_grad():
        sol = mpc(x0, cost)
        alone = mpc(x0[[0, 2]], cost)
    assert sol.converged.tolist() == [True, False, True]
    assert sol.extras["stalled"].tolist() == [False, True, False]
    torch.testing.assert_close(sol.u[[0, 2]], alone.u)


# ----------------------------------------------------------------------------- input checks


def test_ill_posed_inputs_raise_value_error():
    x0, cost, dyn = linear_problem(0, 2, 4, 3, 2)
    with pytest.raises(ValueError, match="horizon"):
        MPC(dyn, 4)(x0, QuadraticCost(cost.C[:3], cost.c[:3]))
    with pytest.raises(ValueError, match="horizon"):
        MPC(dyn, 5)
    with pytest.raises(ValueError, match="u_lower"):
        MPC(dyn, 4, u_lower=1.0, u_upper=0.0)
    with pytest.raises(ValueError, match="u_lower"):
        MPC(dyn, 4, u_lower=torch.tensor([0.0, 2.0]), u_upper=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="u_upper"):
        MPC(dyn, 4, u_upper=torch.ones(3, dtype=F64))(x0, cost)  # m = 2
    with pytest.raises(ValueError, match="x0"):
        MPC(dyn, 4)(torch.full_like(x0, float("nan")), cost)
    with pytest.raises(ValueError, match="x0"):
        MPC(dyn, 4)(x0.unsqueeze(-1), cost)
    with pytest.raises(ValueError, match="C_final"):
        MPC(dyn, 4)(x0[:, :2], cost)  # n = 2 makes the cost's n + m = 5 split as m = 3
    with pytest.raises(ValueError, match="C"):
        bad = cost.C.clone()
        bad[1, 3:, 3:] = -torch.eye(2, dtype=F64)
        MPC(dyn, 4)(x0, QuadraticCost(bad, cost.c))
    with pytest.raises(ValueError, match="c"):
        MPC(dyn, 4)(x0, QuadraticCost(cost.C, torch.full_like(cost.c, float("inf"))))
    with pytest.raises(ValueError, match="u_init"):
        MPC(dyn, 4)(x0, cost, u_init=torch.zeros(2, 4, 3, dtype=F64))
    with pytest.raises(ValueError, match="dynamics"):
        MPC(dyn, 4)(torch.zeros(2, 2, dtype=F64), QuadraticCost(cost.C[..., 1:, 1:]))
    with pytest.raises(ValueError, match="dynamics"):
        MPC(42, 4)  # neither a callable nor a LinearDynamics
    with pytest.raises(ValueError, match="dtype"):
        MPC(dyn, 4)(x0.float(), cost)
    with pytest.raises(ValueError, match="dynamics.F"):
        MPC(LinearDynamics(dyn.F.float(), dyn.f.float()), 4)(x0, cost)
    with pytest.raises(ValueError, match="length"):
        MPC(Pendulum(dtype=torch.float32), 4)(x0[:, :2], QuadraticCost(cost.C[..., 1:, 1:]))
    with pytest.raises(ValueError, match="max_iter"):
        MPC(dyn, 4, max_iter=0)
    with pytest.raises(ValueError, match="backward"):
        MPC(dyn, 4, backward="adjoint")
    with pytest.raises(ValueError, match="hessian"):
        MPC(dyn, 4, hessian="bfgs")
    with pytest.raises(ValueError, match="tol"):
        MPC(dyn, 4, tol=0.0)

    class Concat(nn.Module):
        def forward(self, x, u):
            return torch.cat([x, u], -1)

    with pytest.raises(ValueError, match="dynamics must map"):
        MPC(Concat(), 4)(x0, cost)
