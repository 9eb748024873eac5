"""LQR: exactness against a dense KKT solve, gradients, invariances and input checks."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffto import LinearDynamics, QuadraticCost
from diffto.layers.lqr import LQR, solve_lqr, solve_lqr_tensors


def random_problem(seed, B, T, n, m, dtype=torch.float64, batched_cost=True):
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if batched_cost else ()

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    M = rnd(*lead, T, n + m, n + m)
    C = M @ M.transpose(-1, -2) / (n + m) + 0.3 * torch.eye(n + m, dtype=dtype)
    Mf = rnd(*lead, n, n)
    cost = QuadraticCost(C, rnd(*lead, T, n + m), Mf @ Mf.transpose(-1, -2) / n, rnd(*lead, n))
    F = torch.cat([torch.eye(n, dtype=dtype) + 0.3 * rnd(B, T, n, n), rnd(B, T, n, m)], -1)
    dyn = LinearDynamics(F, 0.5 * rnd(B, T, n))
    return rnd(B, n), cost, dyn


def dense_kkt(x0, cost, dyn):
    """Independent reference: the equality-constrained QP in (x_0..x_T, u_0..u_{T-1})."""
    n, m = x0.shape[-1], cost.n_tau - x0.shape[-1]
    C, c, C_f, c_f = (t.detach().numpy() for t in cost.batched(n, m))
    F, f = (t.detach().numpy() for t in dyn.batched())
    B, T = x0.shape[0], cost.horizon
    nz = (T + 1) * n + T * m
    xs, us = [], []
    for b in range(B):
        Cb, cb = C[min(b, len(C) - 1)], c[min(b, len(c) - 1)]
        H, h = np.zeros((nz, nz)), np.zeros(nz)
        A, rhs = np.zeros(((T + 1) * n, nz)), np.zeros((T + 1) * n)

        def idx(t):  # positions of τ_t = [x_t; u_t] in z
            return np.r_[t * n : (t + 1) * n, (T + 1) * n + t * m : (T + 1) * n + (t + 1) * m]

        for t in range(T):
            i = idx(t)
            H[np.ix_(i, i)] += 0.5 * (Cb[t] + Cb[t].T)
            h[i] += cb[t]
            A[np.ix_(range((t + 1) * n, (t + 2) * n), i)] = -F[min(b, len(F) - 1), t]
            A[(t + 1) * n : (t + 2) * n, (t + 1) * n : (t + 2) * n] += np.eye(n)
            rhs[(t + 1) * n : (t + 2) * n] = f[min(b, len(f) - 1), t]
        iT = slice(T * n, (T + 1) * n)
        H[iT, iT] += C_f[min(b, len(C_f) - 1)]
        h[iT] += c_f[min(b, len(c_f) - 1)]
        A[:n, :n] = np.eye(n)
        rhs[:n] = x0[b].numpy()
        K = np.block([[H, A.T], [A, np.zeros((A.shape[0], A.shape[0]))]])
        z = np.linalg.solve(K, np.r_[-h, rhs])[:nz]
        xs.append(z[: (T + 1) * n].reshape(T + 1, n))
        us.append(z[(T + 1) * n :].reshape(T, m))
    return np.stack(xs), np.stack(us)


dims = st.tuples(
    st.integers(0, 10_000),
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(1, 3),
)


@given(dims, st.booleans())
def test_matches_dense_kkt(d, batched_cost):
    seed, B, T, n, m = d
    x0, cost, dyn = random_problem(seed, B, T, n, m, batched_cost=batched_cost)
    sol = LQR()(x0, cost, dyn)
    x_ref, u_ref = dense_kkt(x0, cost, dyn)
    np.testing.assert_allclose(sol.x.numpy(), x_ref, atol=1e-8, rtol=1e-8)
    np.testing.assert_allclose(sol.u.numpy(), u_ref, atol=1e-8, rtol=1e-8)
    assert sol.converged.all()
    # The plan's reported cost is the objective at the plan, and it is optimal: any
    # dynamically feasible perturbation of the controls costs more.
    assert torch.allclose(sol.cost, cost.evaluate(sol.x, sol.u))
    u_pert = sol.u + 1e-2 * torch.randn_like(sol.u)
    x_pert = [x0]
    for t in range(T):
        x_pert.append(dyn(x_pert[-1], u_pert[:, t], t))
    assert (cost.evaluate(torch.stack(x_pert, 1), u_pert) > sol.cost).all()


@given(dims, st.booleans())
def test_gradcheck(d, batched_cost):
    seed, B, T, n, m = d
    T, n = min(T, 4), min(n, 3)
    x0, cost, dyn = random_problem(seed, B, T, n, m, batched_cost=batched_cost)
    leaves = [x0, cost.C, cost.c, cost.C_final, cost.c_final, dyn.F, dyn.f]
    leaves = [t.clone().requires_grad_() for t in leaves]

    def plan(x0, C, c, C_f, c_f, F, f):
        sol = solve_lqr(x0, QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f))
        return sol.x, sol.u, sol.cost

    assert torch.autograd.gradcheck(plan, leaves, atol=1e-6, rtol=1e-5)


def test_lambda0_is_gradient_of_optimal_cost():
    x0, cost, dyn = random_problem(3, 2, 5, 3, 2)
    x0 = x0.requires_grad_()
    sol = LQR()(x0, cost, dyn)
    (g,) = torch.autograd.grad(sol.cost.sum(), x0)
    torch.testing.assert_close(g, sol.extras["costates"][:, 0])


def test_pure_tensor_solver_agrees_with_layer():
    x0, cost, dyn = random_problem(5, 2, 4, 3, 2)
    sol = LQR()(x0, cost, dyn)
    x, u, lam = solve_lqr_tensors(x0, *cost.batched(3, 2), *dyn.batched())
    torch.testing.assert_close(x, sol.x)
    torch.testing.assert_close(u, sol.u)
    torch.testing.assert_close(lam, sol.extras["costates"])


@given(st.integers(0, 1000), st.floats(0.01, 100.0))
def test_cost_scaling_leaves_plan_unchanged(seed, alpha):
    x0, cost, dyn = random_problem(seed, 2, 4, 3, 2)
    scaled = QuadraticCost(
        alpha * cost.C, alpha * cost.c, alpha * cost.C_final, alpha * cost.c_final
    )
    a, b = LQR()(x0, cost, dyn), LQR()(x0, scaled, dyn)
    torch.testing.assert_close(a.u, b.u, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(b.cost, alpha * a.cost, atol=1e-7, rtol=1e-7)


@given(st.integers(0, 1000))
def test_first_gain_approaches_dare_solution(seed):
    g = torch.Generator().manual_seed(seed)
    n, m, T = 3, 2, 600  # the Riccati gain converges like ρ(A + BK)^(2T): ρ near 0.97 is drawn
    A = torch.eye(n, dtype=torch.float64) + 0.2 * torch.randn(
        n, n, generator=g, dtype=torch.float64
    )
    Bm = torch.randn(n, m, generator=g, dtype=torch.float64)
    Q, R = torch.eye(n, dtype=torch.float64), 0.5 * torch.eye(m, dtype=torch.float64)
    dyn = LinearDynamics.time_invariant(A, Bm, T)
    sol = LQR()(torch.zeros(1, n, dtype=torch.float64), QuadraticCost.tracking(Q, R, T), dyn)
    P = scipy.linalg.solve_discrete_are(A.numpy(), Bm.numpy(), Q.numpy(), R.numpy())
    An, Bn = A.numpy(), Bm.numpy()
    K_inf = -np.linalg.solve(R.numpy() + Bn.T @ P @ Bn, Bn.T @ P @ An)
    np.testing.assert_allclose(sol.extras["gains"][0, 0].numpy(), K_inf, atol=1e-6)


def test_float32_matches_float64():
    x0, cost, dyn = random_problem(7, 4, 6, 3, 2)
    s64 = LQR()(x0, cost, dyn)
    to32 = [t.float() for t in (cost.C, cost.c, cost.C_final, cost.c_final)]
    s32 = LQR()(x0.float(), QuadraticCost(*to32), LinearDynamics(dyn.F.float(), dyn.f.float()))
    assert s32.u.dtype == torch.float32
    torch.testing.assert_close(s32.u.double(), s64.u, atol=1e-3, rtol=1e-3)


def test_broadcast_cost_gradient_sums_over_batch():
    x0, cost, dyn = random_problem(11, 3, 4, 2, 1, batched_cost=False)
    C = cost.C.clone().requires_grad_()
    sol = LQR()(x0, QuadraticCost(C, cost.c, cost.C_final, cost.c_final), dyn)
    (g,) = torch.autograd.grad(sol.u.pow(2).sum(), C)
    assert g.shape == C.shape
    per_row = []
    for b in range(3):
        Cb = cost.C.clone().requires_grad_()
        sb = LQR()(
            x0[b : b + 1],
            QuadraticCost(Cb, cost.c, cost.C_final, cost.c_final),
            LinearDynamics(dyn.F[b : b + 1], dyn.f[b : b + 1]),
        )
        per_row.append(torch.autograd.grad(sb.u.pow(2).sum(), Cb)[0])
    torch.testing.assert_close(g, sum(per_row))


def test_indefinite_state_cost_is_flagged_not_hidden():
    n, m, T = 2, 1, 3
    C = torch.zeros(T, n + m, n + m, dtype=torch.float64)
    C[:, -1, -1] = 1e-3
    C[:, 0, 0] = -50.0  # rewards moving away in x; makes Q_uu indefinite through V
    F = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]], dtype=torch.float64).expand(
        1, T, n, n + m
    )
    sol = LQR()(torch.ones(1, n, dtype=torch.float64), QuadraticCost(C), LinearDynamics(F))
    assert not sol.converged.any()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x0, cost, dyn: (x0.clone().fill_(float("nan")), cost, dyn), "x0 contains"),
        (lambda x0, cost, dyn: (x0[:, :-1], cost, dyn), "x0 must have shape"),
        (lambda x0, cost, dyn: (x0, cost, LinearDynamics(dyn.F[:, :-1], dyn.f[:, :-1])), "horizon"),
        (lambda x0, cost, dyn: (x0, QuadraticCost(-cost.C), dyn), "positive definite"),
        (lambda x0, cost, dyn: (x0, cost, "not dynamics"), "LinearDynamics"),
        (lambda x0, cost, dyn: (x0, QuadraticCost(cost.C, cost.c[..., :-1]), dyn), "c must have"),
    ],
)
def test_bad_input_raises_value_error(mutate, match):
    x0, cost, dyn = random_problem(0, 2, 3, 3, 2)
    with pytest.raises(ValueError, match=match):
        LQR()(*mutate(x0, cost, dyn))


def _f32(t):
    return None if t is None else t.float()


@pytest.mark.parametrize(
    "mutate, match",
    [
        # batch mismatches the cost's own check (C, c) did not cover
        (lambda x0, cost, dyn: (x0, QuadraticCost(cost.C, cost.c,
                                                  cost.C_final[:1].expand(3, -1, -1),
                                                  cost.c_final), dyn), "C_final has batch 3"),
        (lambda x0, cost, dyn: (x0, QuadraticCost(cost.C, cost.c, cost.C_final,
                                                  cost.c_final[:1].expand(3, -1)), dyn),
         "c_final has batch 3"),
        (lambda x0, cost, dyn: (x0, cost, LinearDynamics(dyn.F, dyn.f[:1].expand(3, -1, -1))),
         "dynamics.f has batch 3"),
        (lambda x0, cost, dyn: (x0, cost, LinearDynamics(dyn.F[:1].expand(3, -1, -1, -1))),
         "dynamics.F has batch 3"),
        # dtypes that would fail (or silently promote) inside torch
        (lambda x0, cost, dyn: (x0.float(), cost, dyn), "x0 has torch.float32"),
        (lambda x0, cost, dyn: (x0.long(), cost, dyn), "x0 must be a floating-point"),
        (lambda x0, cost, dyn: (x0, cost, LinearDynamics(dyn.F.float(), dyn.f)),
         "dynamics.F has dtype torch.float32"),
        (lambda x0, cost, dyn: (x0, cost, LinearDynamics(dyn.F, dyn.f.float())),
         "dynamics.f has dtype torch.float32"),
        (lambda x0, cost, dyn: (x0.float(), QuadraticCost(*map(_f32, (
            cost.C, cost.c, cost.C_final, cost.c_final))), LinearDynamics(dyn.F.float(), dyn.f)),
         "dynamics.f has dtype torch.float64"),
    ],
)
def test_mismatched_batches_and_dtypes_raise_value_error(mutate, match):
    x0, cost, dyn = random_problem(0, 2, 3, 3, 2)
    with pytest.raises(ValueError, match=match):
        LQR()(*mutate(x0, cost, dyn))


def test_call_contract_dynamics_at_construction_or_per_call():
    x0, cost, dyn = random_problem(9, 2, 4, 3, 2)
    ref = LQR()(x0, cost, dyn)
    fixed = LQR(dyn)
    torch.testing.assert_close(fixed(x0, cost).u, ref.u)
    # The call's dynamics win over the constructor's.
    other = random_problem(10, 2, 4, 3, 2)[2]
    torch.testing.assert_close(LQR(other)(x0, cost, dyn).u, ref.u)
    # u_init is accepted and ignored: the solve is exact.
    torch.testing.assert_close(fixed(x0, cost, u_init=torch.randn_like(ref.u)).u, ref.u)
    with pytest.raises(ValueError, match="dynamics must be given"):
        LQR()(x0, cost)
    with pytest.raises(ValueError, match="LinearDynamics"):
        LQR(dynamics="not dynamics")


def test_extras_are_the_optimal_policy_and_its_value():
    x0, cost, dyn = random_problem(12, 3, 5, 3, 2)
    sol = LQR(dyn)(x0, cost)
    K, k, V = sol.extras["gains"], sol.extras["feedforward"], sol.extras["value"]
    assert K.shape == (3, 5, 2, 3) and k.shape == (3, 5, 2) and V.shape == (3, 6, 3, 3)
    # u_t = K_t x_t + k_t along the plan, and the value Hessian is that of the optimal cost in
    # x0: moving x0 along δ changes λ_0 by V_0 δ.
    u_pol = (K @ sol.x[:, :-1].unsqueeze(-1)).squeeze(-1) + k
    torch.testing.assert_close(u_pol, sol.u)
    delta = torch.randn_like(x0)
    moved = LQR(dyn)(x0 + delta, cost)
    torch.testing.assert_close(moved.extras["costates"][:, 0] - sol.extras["costates"][:, 0],
                               (V[:, 0] @ delta.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(V[:, -1], cost.C_final)


def test_nan_in_cost_is_rejected_at_construction():
    with pytest.raises(ValueError, match="C contains"):
        QuadraticCost(torch.full((2, 3, 3), float("nan")))


def test_device_round_trip_on_cpu():
    x0, cost, dyn = random_problem(1, 2, 3, 2, 1)
    device = torch.device("cpu")
    sol = LQR().to(device)(x0.to(device), cost, dyn)
    assert sol.x.device == device


def test_unbatched_cost_and_dynamics_broadcast_over_x0():
    x0, cost, dyn = random_problem(13, 3, 4, 3, 2, batched_cost=False)
    F, f = (t[0].clone().requires_grad_() for t in (dyn.F, dyn.f))  # (T, n, n+m), (T, n)
    sol = LQR()(x0, cost, LinearDynamics(F, f))
    rows = [LQR()(x0[b : b + 1], cost, LinearDynamics(dyn.F[:1], dyn.f[:1])).u for b in range(3)]
    torch.testing.assert_close(sol.u, torch.cat(rows))
    assert torch.autograd.gradcheck(
        lambda F, f: LQR()(x0, cost, LinearDynamics(F, f)).u, (F, f), atol=1e-6, rtol=1e-5
    )


def test_transforms_compile_runs_and_vmap_is_refused_with_a_reason():
    x0, cost, dyn = random_problem(5, 3, 6, 3, 2)
    lqr = LQR(dyn)
    compiled = torch.compile(lambda x: lqr(x, cost).u, backend="eager")
    torch.testing.assert_close(compiled(x0), lqr(x0, cost).u)
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(lambda x: lqr(x.unsqueeze(0), cost).u)(x0)


def test_tracking_goal_of_the_wrong_size_names_it():
    with pytest.raises(ValueError, match="x_goal"):
        QuadraticCost.tracking(torch.ones(3), torch.ones(2), 5, x_goal=torch.zeros(4))
    with pytest.raises(ValueError, match="u_goal"):
        QuadraticCost.tracking(torch.ones(3), torch.ones(2), 5, u_goal=torch.zeros(2, 3))
