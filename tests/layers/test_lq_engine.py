"""The LQ engine: masked and regularized factorizations, sweeps and stage updates against a
dense KKT solve of the same equality-constrained QP."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from diffto.layers import _lq_engine as lq
from diffto.layers._active_set import _Homogeneous
from diffto.problem import LinearDynamics, QuadraticCost

D = torch.float64


def random_lq(seed: int, B: int, T: int, n: int, m: int) -> dict:
    """A random convex LQ problem with every tensor batched: ``C (B, T, k, k)`` positive
    definite, ``c``, ``C_f`` PSD, ``c_f``, ``F`` (near-identity ``A``), ``f``, ``x0``."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=D)

    k = n + m
    M = rnd(B, T, k, k)
    Mf = rnd(B, n, n)
    return dict(
        C=M @ M.transpose(-1, -2) / k + 0.3 * torch.eye(k, dtype=D),
        c=rnd(B, T, k),
        C_f=Mf @ Mf.transpose(-1, -2) / n,
        c_f=rnd(B, n),
        F=torch.cat([torch.eye(n, dtype=D) + 0.3 * rnd(B, T, n, n), rnd(B, T, n, m)], -1),
        f=0.5 * rnd(B, T, n),
        x0=rnd(B, n),
    )


def random_mask(seed: int, B: int, T: int, m: int) -> torch.Tensor:
    """About a third of the controls fixed, anywhere in time."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand(B, T, m, generator=g) < 0.35


def dense_lq(C, c, C_f, c_f, F, f, x0, fixed=None):
    """Independent reference: the KKT system of the QP in ``z = (x_0..x_T, u_0..u_{T-1})`` with
    ``x_0 = x0``, ``x_{t+1} = F_t τ_t + f_t`` and ``u_tj = 0`` where ``fixed``; returns ``x``,
    ``u`` and the costates ``λ`` (minus the multipliers of the initial and dynamics rows)."""
    B, T, k, _ = C.shape
    n = x0.shape[-1]
    m = k - n
    nx, nz = (T + 1) * n, (T + 1) * n + T * m
    xs, us, lams = [], [], []
    for b in range(B):
        H, h = torch.zeros(nz, nz, dtype=D), torch.zeros(nz, dtype=D)
        rows, rhs = [], []

        def idx(t):  # positions of τ_t = [x_t; u_t] in z
            return torch.cat([torch.arange(t * n, (t + 1) * n),
                              torch.arange(nx + t * m, nx + (t + 1) * m)])

        for t in range(T):
            i = idx(t)
            H[i.unsqueeze(-1), i] += C[b, t]
            h[i] += c[b, t]
        H[T * n:nx, T * n:nx] += C_f[b]
        h[T * n:nx] += c_f[b]
        A0 = torch.zeros(n, nz, dtype=D)
        A0[:, :n] = torch.eye(n, dtype=D)
        rows.append(A0)
        rhs.append(x0[b])
        for t in range(T):
            At = torch.zeros(n, nz, dtype=D)
            At[:, idx(t)] = -F[b, t]
            At[:, (t + 1) * n:(t + 2) * n] += torch.eye(n, dtype=D)
            rows.append(At)
            rhs.append(torch.zeros(n, dtype=D) if f is None else f[b, t])
        n_dyn = (T + 1) * n
        if fixed is not None:
            for t, j in fixed[b].nonzero().tolist():
                e = torch.zeros(1, nz, dtype=D)
                e[0, nx + t * m + j] = 1
                rows.append(e)
                rhs.append(torch.zeros(1, dtype=D))
        A, r = torch.cat(rows), torch.cat(rhs)
        KKT = torch.cat([torch.cat([H, A.T], 1),
                         torch.cat([A, torch.zeros(len(A), len(A), dtype=D)], 1)])
        sol = torch.linalg.solve(KKT, torch.cat([-h, r]))
        xs.append(sol[:nx].view(T + 1, n))
        us.append(sol[nx:nz].view(T, m))
        lams.append(-sol[nz:nz + n_dyn].view(T + 1, n))
    return torch.stack(xs), torch.stack(us), torch.stack(lams)


dims = st.tuples(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 5),
                 st.integers(1, 4), st.integers(1, 3))


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@given(dims)
def test_factor_and_sweep_match_dense_kkt(d):
    seed, B, T, n, m = d
    p = random_lq(seed, B, T, n, m)
    fac = lq.factor(p["C"], p["F"], p["C_f"])
    x, u, lam, k = lq.affine_sweep(fac, p["F"], p["c"], p["c_f"], p["f"], p["x0"])
    x_ref, u_ref, lam_ref = dense_lq(**p)
    close(x, x_ref)
    close(u, u_ref)
    close(lam, lam_ref)
    assert fac.ok.all()
    # The policy reproduces the plan, and λ are the plan's costates.
    close(u, lq.bmv(fac.K, x[:, :-1]) + k)
    q, q_f = lq.cost_gradients(p["C"], p["c"], p["C_f"], p["c_f"], x, u)
    close(lam, lq.costates(q, q_f, p["F"]))
    close(lq.reduced_gradient(q, p["F"], lam), torch.zeros_like(u))


@given(dims)
def test_masked_factorization_equals_reduced_problem(d):
    seed, B, T, n, m = d
    p = random_lq(seed, B, T, n, m)
    fixed = random_mask(seed, B, T, m)
    fac = lq.factor(p["C"], p["F"], p["C_f"], fixed=fixed)
    x, u, lam, k = lq.affine_sweep(fac, p["F"], p["c"], p["c_f"], p["f"], p["x0"])
    x_ref, u_ref, lam_ref = dense_lq(**p, fixed=fixed)
    close(x, x_ref)
    close(u, u_ref)
    close(lam, lam_ref)
    assert (u[fixed] == 0).all() and (fac.K[fixed] == 0).all() and (k[fixed] == 0).all()
    # With the same controls fixed at every stage, the masked factorization is that of the
    # problem with those controls removed: the same V, the same gains on the free controls.
    free = torch.ones(m, dtype=torch.bool)
    free[: m // 2] = False
    fixed_t = (~free).expand(B, T, m)
    fac_m = lq.factor(p["C"], p["F"], p["C_f"], fixed=fixed_t)
    keep = torch.cat([torch.ones(n, dtype=torch.bool), free])
    fac_r = lq.factor(p["C"][..., keep, :][..., keep], p["F"][..., keep], p["C_f"])
    close(fac_m.V, fac_r.V)
    close(fac_m.K[:, :, free], fac_r.K)
    assert (fac_m.K[:, :, ~free] == 0).all()


@given(dims)
def test_adjoint_sweep_equals_a_fresh_solve_with_the_new_linear_terms(d):
    seed, B, T, n, m = d
    p = random_lq(seed, B, T, n, m)
    fixed = random_mask(seed, B, T, m)
    fac = lq.factor(p["C"], p["F"], p["C_f"], fixed=fixed)
    g = torch.Generator().manual_seed(seed + 2)
    g_tau = torch.randn(B, T, n + m, generator=g, dtype=D)
    g_T = torch.randn(B, n, generator=g, dtype=D)
    x, u, lam = lq.adjoint_sweep(fac, p["F"], g_tau, g_T)
    x_ref, u_ref, lam_ref = dense_lq(p["C"], g_tau, p["C_f"], g_T, p["F"], None,
                                     torch.zeros(B, n, dtype=D), fixed)
    close(x, x_ref)
    close(u, u_ref)
    close(lam, lam_ref)


@given(dims, st.floats(0.0, 10.0))
def test_mu_regularization_equals_solving_with_shifted_control_block(d, scale):
    seed, B, T, n, m = d
    p = random_lq(seed, B, T, n, m)
    mu = scale * torch.rand(B, generator=torch.Generator().manual_seed(seed), dtype=D)
    fac = lq.factor(p["C"], p["F"], p["C_f"], mu=mu)
    C_mu = p["C"].clone()
    C_mu[..., n:, n:] += mu.view(-1, 1, 1, 1) * torch.eye(m, dtype=D)
    ref = lq.factor(C_mu, p["F"], p["C_f"])
    close(fac.V, ref.V)
    close(fac.K, ref.K)
    x, u, lam, _ = lq.affine_sweep(fac, p["F"], p["c"], p["c_f"], p["f"], p["x0"])
    x_ref, u_ref, lam_ref = dense_lq(C_mu, p["c"], p["C_f"], p["c_f"], p["F"], p["f"], p["x0"])
    close(x, x_ref)
    close(u, u_ref)
    close(lam, lam_ref)


@given(dims)
def test_stage_loop_with_value_update_reproduces_the_split_form(d):
    # The box-DDP sweep runs Q_t, q_t and the value update stage by stage; with the
    # unconstrained optimal gains it must give the factorization's V_t and the sweep's v_t.
    seed, B, T, n, m = d
    p = random_lq(seed, B, T, n, m)
    fac = lq.factor(p["C"], p["F"], p["C_f"])
    x, u, lam, k = lq.affine_sweep(fac, p["F"], p["c"], p["c_f"], p["f"], p["x0"])
    v_ref = lam - lq.bmv(fac.V, x)
    V, v = p["C_f"], p["c_f"]
    for t in range(T - 1, -1, -1):
        Q, q = lq.stage_q(p["C"][:, t], p["c"][:, t], p["F"][:, t], V, v, p["f"][:, t])
        V, v = lq.value_update(Q, q, fac.K[:, t], k[:, t])
        close(V, fac.V[:, t])
        close(v, v_ref[:, t])


@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 3))
def test_value_update_is_the_cost_of_any_affine_policy(seed, n, m):
    g = torch.Generator().manual_seed(seed)
    B, k_dim = 3, n + m
    M = torch.randn(B, k_dim, k_dim, generator=g, dtype=D)
    Q = M + M.transpose(-1, -2)  # any symmetric model, not only convex ones
    q = torch.randn(B, k_dim, generator=g, dtype=D)
    K = torch.randn(B, m, n, generator=g, dtype=D)
    k = torch.randn(B, m, generator=g, dtype=D)
    V, v = lq.value_update(Q, q, K, k)

    def model(x):  # ½ τᵀQτ + qᵀτ along u = K x + k
        tau = torch.cat([x, lq.bmv(K, x) + k], -1)
        return (tau * (0.5 * lq.bmv(Q, tau) + q)).sum(-1)

    for _ in range(3):
        x = torch.randn(B, n, generator=g, dtype=D)
        close(model(x) - model(torch.zeros_like(x)), (x * (0.5 * lq.bmv(V, x) + v)).sum(-1))


def test_nonconvex_row_is_flagged_and_leaves_the_others_alone():
    p = random_lq(4, 3, 4, 2, 2)
    p["C"][1, 2, 2:, 2:] = -torch.eye(2, dtype=D)  # Q_uu indefinite at stage 2 of row 1
    fac = lq.factor(p["C"], p["F"], p["C_f"])
    assert fac.ok.tolist() == [True, False, True]
    x, u, _, _ = lq.affine_sweep(fac, p["F"], p["c"], p["c_f"], p["f"], p["x0"])
    keep = torch.tensor([0, 2])
    x_ref, u_ref, _ = dense_lq(**{key: t[keep] for key, t in p.items()})
    close(x[keep], x_ref)
    close(u[keep], u_ref)


@given(dims)
def test_plan_helpers_agree_with_the_problem_vocabulary(d):
    seed, B, T, n, m = d
    p = random_lq(seed, B, T, n, m)
    u = torch.randn(B, T, m, generator=torch.Generator().manual_seed(seed), dtype=D)
    x = lq.rollout(p["F"], p["f"], p["x0"], u)
    dyn = LinearDynamics(p["F"], p["f"])
    for t in range(T):
        close(x[:, t + 1], dyn(x[:, t], u[:, t], t))
    cost = QuadraticCost(p["C"], p["c"], p["C_f"], p["c_f"])
    close(lq.quadratic_cost(p["C"], p["c"], p["C_f"], p["c_f"], x, u), cost.evaluate(x, u))
    # Costates are the adjoint of the rollout: λ_0 is the gradient of the cost in x0 and the
    # reduced gradient that in u, the controls held / the states eliminated.
    x0, u = p["x0"].clone().requires_grad_(), u.clone().requires_grad_()
    J = lq.quadratic_cost(p["C"], p["c"], p["C_f"], p["c_f"], lq.rollout(p["F"], p["f"], x0, u), u)
    grad_x0, grad_u = torch.autograd.grad(J.sum(), (x0, u))
    q, q_f = lq.cost_gradients(p["C"], p["c"], p["C_f"], p["c_f"], x, u.detach())
    lam = lq.costates(q, q_f, p["F"])
    close(lam[:, 0], grad_x0)
    close(lq.reduced_gradient(q, p["F"], lam), grad_u)


@given(dims)
def test_homogeneous_active_set_solve_equals_the_masked_affine_sweep(d):
    seed, B, T, n, m = d
    p = random_lq(seed, B, T, n, m)
    fixed = random_mask(seed, B, T, m)
    hom = _Homogeneous(p["C"], p["c"], p["C_f"], p["c_f"], p["F"], p["f"])
    x, w, lam, K, ok, V, Q_uu = hom.solve(p["x0"], fixed)
    fac = lq.factor(p["C"], p["F"], p["C_f"], fixed=fixed)
    x_ref, u_ref, lam_ref, _ = lq.affine_sweep(fac, p["F"], p["c"], p["c_f"], p["f"], p["x0"])
    close(x, x_ref)
    close(w, u_ref)
    close(lam, lam_ref)
    close(K, fac.K)
    close(V, fac.V)
    close(Q_uu, fac.Q_uu)
    assert ok.all()


def test_projected_newton_keeps_each_rows_iteration_budget():
    """Rows reach the projected-Newton finish with different iteration counts (the active-set
    phase stops them at different sweeps); each may only use what is left of its own
    ``max_iter``. With a tolerance no step meets, every row iterates until its budget ends:
    the row that arrives with ``max_iter − 1`` takes one step, the one with 0 takes all."""
    from diffto.layers._active_set import _projected_newton

    B, T, n, m, max_iter = 3, 6, 3, 2, 8
    p = random_lq(11, B, T, n, m)
    hom = _Homogeneous(p["C"], p["c"], p["C_f"], p["c_f"], p["F"], p["f"])
    lo = torch.full((B, T, m), -0.2, dtype=D)
    out = {"u": torch.zeros(B, T, m, dtype=D)}
    converged = torch.zeros(B, dtype=torch.bool)
    iterations = torch.tensor([max_iter - 1, 0, 3])
    _projected_newton(hom, p["x0"], lo, -lo, out, torch.arange(B), converged, iterations,
                      max_iter, tol=-1.0)
    assert iterations.tolist() == [max_iter] * B
    assert not converged.any()
