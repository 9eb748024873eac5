"""Box-DDP: iLQR with control bounds, for any dynamics; the general forward solver of MPC.

iLQR whose backward pass solves, at every stage, the box-constrained QP in the control by
projected Newton (Bertsekas 1982) and gives clamped controls zero feedback gain (Tassa, Mansard
& Todorov, ICRA 2014); a line search on the true cost accepts the step per batch row. With
``exact=True`` the stage Hessians carry the dynamics curvature ``Σ_i λ_{t+1,i} ∇²f_i`` (Newton
steps, quadratic local convergence).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffto.layers._lq_engine import bmv, costates, reduced_gradient, stage_q, value_update

__all__: list[str] = []

_ALPHAS = [2.0**-i for i in range(11)]  # line-search step sizes, tried largest first
_MU_MIN, _MU_MAX = 1e-6, 1e10  # Levenberg-Marquardt factor on Q_uu, relative to the cost scale


def _masked_matrix(H: Tensor, free: Tensor, eye: Tensor | None = None) -> Tensor:
    """``H (..., m, m)`` restricted to the free set, identity on clamped rows and columns.

    Solving with it gives zero on clamped entries when the right-hand side is zero there."""
    both = free.unsqueeze(-1) & free.unsqueeze(-2)  # (..., m, m)
    if eye is None:
        eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    return torch.where(both, H, eye * (~free).unsqueeze(-1))


def _box_qp(H: Tensor, g: Tensor, lo: Tensor, hi: Tensor, max_iter: int = 30):
    """Solve ``min_d ½ dᵀH d + gᵀd`` s.t. ``lo <= d <= hi`` for a batch, by projected Newton.

    Args:
        H: ``(N, m, m)`` symmetric, positive definite on the free set.
        g: ``(N, m)``; lo, hi: ``(N, m)`` with ``lo <= 0 <= hi`` (entries may be ±inf).

    Returns ``(d (N, m), side (N, m) int8, ok (N,) bool, L (N, m, m))``: ``side`` is -1 / +1
    for entries held at the lower / upper bound by the gradient and 0 for free ones (even when
    ``lo == hi`` it names the bound that binds), ``ok`` is False where the free block of ``H``
    was not positive definite, ``L`` is the Cholesky factor of ``H`` restricted to the free set
    (identity on clamped rows; identity where not ``ok``). Starts at ``d = 0`` (the current
    plan), so a converged iLQR sweep costs one factorization per stage.
    """
    if H.shape[-1] == 1:
        return _box_qp_scalar(H, g, lo, hi)
    # Every row's unconstrained minimizer inside its box: that is the answer, no iterations.
    L, info = torch.linalg.cholesky_ex(H)
    if bool((info == 0).all()):
        d = -torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
        if bool(((d > lo) & (d < hi)).all()):
            return d, torch.zeros_like(d, dtype=torch.int8), info == 0, L
    d = torch.zeros_like(g)
    ok = torch.ones(d.shape[0], dtype=torch.bool, device=d.device)
    running = ok.clone()
    tiny = torch.finfo(d.dtype).eps ** 0.6
    betas = torch.tensor(_ALPHAS, dtype=d.dtype, device=d.device).view(-1, 1, 1)
    prev_free = exact = None
    eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device)
    L_last, free_last = eye.expand_as(H), torch.ones_like(d, dtype=torch.bool)

    for _ in range(max_iter):
        grad = g + bmv(H, d)
        free = ~(((d <= lo) & (grad > 0)) | ((d >= hi) & (grad < 0)))
        if exact is not None:
            # After an unclipped full Newton step d minimizes q on its face; if the clamped set
            # is unchanged (its gradient signs still point out of the box) d meets the KKT
            # conditions and is the solution.
            running = running & ~(exact & (free == prev_free).all(-1))
            if not running.any():
                break
        L, info = torch.linalg.cholesky_ex(_masked_matrix(H, free, eye))
        ok = ok & ((info == 0) | ~running)
        keep = (running & (info == 0)).view(-1, 1, 1)
        L_last = torch.where(keep, L, L_last)
        free_last = torch.where(keep.view(-1, 1), free, free_last)
        # Newton step on the free set; zero on the clamped set (masked matrix, masked rhs).
        s = -torch.cholesky_solve((grad * free).unsqueeze(-1), L).squeeze(-1)
        s = torch.where((info == 0).unsqueeze(-1), s, torch.zeros_like(s))
        # A step this small is the exact Newton step on a settled free set: take it and stop.
        small = running & (s.abs().amax(-1) <= tiny * (1 + d.abs().amax(-1)))
        d = torch.where(small.unsqueeze(-1), torch.minimum(torch.maximum(d + s, lo), hi), d)
        running = running & ~small & (info == 0)
        if not running.any():
            break
        # Projected Armijo search along the Newton direction, all step sizes at once.
        cand = torch.minimum(torch.maximum(d + betas * s, lo), hi)  # (S, N, m)
        # q(d + Δ) − q(d) = gradᵀΔ + ½ ΔᵀHΔ <= 0.1 gradᵀΔ  (Armijo on the projected arc)
        step = cand - d
        armijo = 0.9 * (step * grad).sum(-1) + 0.5 * (step * bmv(H, step)).sum(-1) <= 0
        newton_ok = armijo.any(0)
        if bool((running & ~newton_ok).any()):
            # The projected Newton arc need not descend (the free set was taken at d, not
            # within a margin of the bounds): those rows take the projected arc of the
            # diagonally scaled gradient instead, a descent direction for box constraints.
            s_g = -grad / H.diagonal(dim1=-2, dim2=-1)
            cand_g = torch.minimum(torch.maximum(d + betas * s_g, lo), hi)
            step_g = cand_g - d
            armijo_g = ((0.9 * (step_g * grad).sum(-1)
                         + 0.5 * (step_g * bmv(H, step_g)).sum(-1) < 0)
                        & (step_g.abs().amax(-1) > 0))
            use_g = (~newton_ok).view(1, -1, 1)
            cand = torch.where(use_g, cand_g, cand)
            armijo = torch.where(use_g.squeeze(-1), armijo_g, armijo)
        first = torch.argmax(armijo.to(torch.int8), 0)  # largest accepted step per row
        accepted = armijo.any(0) & running
        exact = accepted & newton_ok & (first == 0) & (cand[0] == d + s).all(-1)
        pick = cand.gather(0, first.view(1, -1, 1).expand(1, *d.shape)).squeeze(0)
        d = torch.where(accepted.unsqueeze(-1), pick, d)
        running = running & accepted
        prev_free = free
    grad = g + bmv(H, d)
    at_lo, at_hi = (d <= lo) & (grad > 0), (d >= hi) & (grad < 0)
    free = ~(at_lo | at_hi)
    if not torch.equal(free, free_last):
        L, info = torch.linalg.cholesky_ex(_masked_matrix(H, free, eye))
        ok = ok & (info == 0)
        L_last = torch.where((info == 0).view(-1, 1, 1), L, eye)
    return d, at_hi.to(torch.int8) - at_lo.to(torch.int8), ok, L_last


def _box_qp_scalar(H: Tensor, g: Tensor, lo: Tensor, hi: Tensor):
    """:func:`_box_qp` for one control, in closed form: ``d = clamp(−g/h, lo, hi)``; the bound
    that clips it binds (``side``), ``L = √h`` on free rows and 1 on clamped ones."""
    h = H[..., 0]  # (N, 1)
    ok = h[:, 0] > 0
    d_free = -g / torch.where(h > 0, h, 1)
    below, above = d_free < lo, d_free > hi
    d = torch.where(below, lo, torch.where(above, hi, d_free))
    side = above.to(torch.int8) - below.to(torch.int8)
    L = torch.where((side == 0) & ok.unsqueeze(-1), h.clamp_min(0).sqrt(), 1).unsqueeze(-1)
    return d, side, ok, L


def _riccati(Q, q, Q_f, q_f, J, m, mu=None, lo=None, hi=None):
    """Backward Riccati sweep of an LQ problem in deviations ``δτ`` with ``δx_0 = 0``.

    Stage cost ``½ δτᵀQ_t δτ + q_tᵀδτ``, terminal ``½ δxᵀQ_f δx + q_fᵀδx``, dynamics
    ``δx_{t+1} = J_t δτ_t``. Shapes: ``Q (N, T, k, k)``, ``q (N, T, k)``, ``Q_f (N, n, n)``,
    ``q_f (N, n)``, ``J (N, T, n, k)``. Two modes: ``lo, hi (N, T, m)`` box the control
    deviation (box-DDP: each stage QP solved by :func:`_box_qp`); without them, unconstrained,
    by Cholesky. ``mu (N,)`` is added to ``Q_uu``.

    Returns ``K (N, T, m, n)``, ``k (N, T, m)``, ``side (N, T, m)`` (int8: -1 / +1 held at
    the lower / upper bound by the box QP, 0 otherwise), the expected cost change
    terms ``dV1 = Σ kᵀQ_u`` and ``dV2 = Σ ½ kᵀQ_uu k`` (N,), and ``ok (N,)`` (``Q_uu`` positive
    definite on the free set at every stage).
    """
    N, T, k_dim = q.shape
    n = k_dim - m
    V_xx, v_x = Q_f, q_f
    K_all = q.new_zeros(N, T, m, n)
    k_all = q.new_zeros(N, T, m)
    side_all = torch.zeros(N, T, m, dtype=torch.int8, device=q.device)
    dV1, dV2 = q.new_zeros(N), q.new_zeros(N)
    ok = torch.ones(N, dtype=torch.bool, device=q.device)
    eye_m = torch.eye(m, dtype=q.dtype, device=q.device)
    # μ on the control block of the stage Hessian: (k, k), identity on the u rows and columns.
    eye_u = torch.diag(torch.cat([q.new_zeros(n), q.new_ones(m)]))
    for t in reversed(range(T)):
        Qt, qt = stage_q(Q[:, t], q[:, t], J[:, t], V_xx, v_x)  # (N, k, k), (N, k)
        if mu is not None:
            Qt = Qt + mu.view(-1, 1, 1) * eye_u
        Q_ux, Q_uu, q_u = Qt[:, n:, :n], Qt[:, n:, n:], qt[:, n:]
        if lo is not None:
            kt, side, ok_t, L = _box_qp(Q_uu, q_u, lo[:, t], hi[:, t])
            ok = ok & ok_t
            side_all[:, t] = side
            # Zero gain rows where clamped.
            Kt = -torch.cholesky_solve(Q_ux * (side == 0).unsqueeze(-1), L)
        else:
            # Unbounded forward sweep: Cholesky doubles as the positive-definiteness test.
            L, info = torch.linalg.cholesky_ex(Q_uu)
            ok = ok & (info == 0)
            L = torch.where((info == 0).view(-1, 1, 1), L, eye_m.expand_as(L))
            sol = -torch.cholesky_solve(torch.cat([q_u.unsqueeze(-1), Q_ux], -1), L)
            kt, Kt = sol[..., 0], sol[..., 1:]
        # Value function of stage t: V(δx) = min_δu Q(δx, δu) along u = k + K δx.
        V_xx, v_x = value_update(Qt, qt, Kt, kt)
        dV1 = dV1 + (kt * q_u).sum(-1)
        dV2 = dV2 + 0.5 * (kt * bmv(Q_uu, kt)).sum(-1)
        K_all[:, t], k_all[:, t] = Kt, kt
    return K_all, k_all, side_all, dV1, dV2, ok


def stationarity(u: Tensor, grad_u: Tensor, lo: Tensor, hi: Tensor, scale: Tensor) -> Tensor:
    """The unregularized optimality measure ``(N,)``: ``max |u − P(u − ∇_u J / s)|``, the
    projected gradient step in control units (``s (N,)`` the control curvature scale, ``P`` the
    projection onto the box). Zero exactly at a KKT point of the box-constrained problem in
    the controls, whatever regularization the iterations used."""
    step = u - grad_u / scale.view(-1, 1, 1)
    return (u - torch.minimum(torch.maximum(step, lo), hi)).abs().amax((-1, -2))


def _rollout(dyn, x0, x_ref, u_ref, K, k, alpha, lo, hi, rows):
    """Closed-loop rollout ``u_t = clamp(ū_t + α k_t + K_t (x_t - x̄_t))`` from ``x0 (N, n)``."""
    xs, us = [x0], []
    for t in range(u_ref.shape[1]):
        u = u_ref[:, t] + alpha.unsqueeze(-1) * k[:, t] + bmv(K[:, t], xs[-1] - x_ref[:, t])
        u = torch.minimum(torch.maximum(u, lo[:, t]), hi[:, t])
        us.append(u)
        xs.append(dyn.step(xs[-1], u, t, rows))
    return torch.stack(xs, 1), torch.stack(us, 1)


def _finite_rows(*tensors: Tensor) -> Tensor:
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok = ok & torch.isfinite(t).flatten(1).all(1)
    return ok


def solve(dyn, cost, x0, lo, hi, u_init, max_iter: int, tol: float, exact: bool = False,
          create_graph: bool = False) -> dict:
    """Box-DDP on a batch: ``dyn`` a :class:`~diffto.layers._dynamics_model.DynamicsModel`,
    ``cost`` a :class:`~diffto.layers._cost_model.CostModel`, ``x0 (B, n)``,
    ``lo, hi, u_init (B, T, m)``; no input checks.

    ``exact`` adds the dynamics curvature ``Σ λ_{t+1,i} ∇²f_i`` to each stage Hessian (Newton
    instead of Gauss-Newton iLQR: quadratic instead of linear local convergence on nonlinear
    dynamics); a general cost enters with its PSD-projected (or Gauss-Newton) Hessian. Each row
    iterates until its feed-forward step is below ``tol·(1 + max|u|)``, ``max_iter`` steps
    were tried, or the regularization ran out (stalled). Only rows still running are
    linearized and swept. A row is reported converged only if its last step was an
    unregularized Newton step or its projected gradient (:func:`stationarity`) is below the
    same threshold. ``create_graph`` keeps the graph of the cost derivatives (unrolled
    differentiation). Returns a dict of ``(B, ...)`` tensors.
    """
    B, T, m = u_init.shape
    n = x0.shape[-1]
    max_iter = max(max_iter, 0)  # 0: one sweep, no step (a row handed over with no budget)
    dev, dt = x0.device, x0.dtype
    rows = torch.arange(B, device=dev)
    eps = torch.finfo(dt).eps
    u = torch.minimum(torch.maximum(u_init, lo), hi)
    zeros_K = x0.new_zeros(B, T, m, n)
    x, u = _rollout(dyn, x0, x0.new_zeros(B, T + 1, n), u, zeros_K, torch.zeros_like(u),
                    x0.new_zeros(B), lo, hi, rows)
    cost.track(x, u)
    J = cost.values(rows, x, u)
    scale = None  # control curvature scale per row, from the first quadratization
    mu = x0.new_zeros(B)
    mu_last = x0.new_zeros(B)  # the regularization of each row's last sweep
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    running = torch.ones_like(converged)
    stalled = torch.zeros_like(converged)
    iterations = torch.zeros(B, dtype=torch.long, device=dev)
    K_out, k_out = zeros_K.clone(), torch.zeros_like(u)
    side_out = torch.zeros_like(u, dtype=torch.int8)
    alphas = torch.tensor(_ALPHAS, dtype=dt, device=dev)
    bounded = bool(torch.isfinite(lo).any() or torch.isfinite(hi).any())
    for it in range(max_iter + 1):
        idx = running.nonzero().squeeze(-1)
        xa, ua = x[idx], u[idx]
        Ja = dyn.jacobian(xa[:, :-1], ua, idx)
        Qa, q, Q_f, q_f = cost.quadratize(idx, xa, ua, create_graph=create_graph)
        if scale is None:
            scale = cost.control_scale(Qa, eps)
        if exact:
            lam_a = costates(q, q_f, Ja)
            curv = dyn.curvature(xa[:, :-1], ua, lam_a[:, 1:])
            Qa = Qa if curv is None else Qa + curv
        lo_d, hi_d = (lo[idx] - ua, hi[idx] - ua) if bounded else (None, None)
        mu_a = mu[idx]
        # A non-finite model (the dynamics left their domain) cannot be cured by regularizing.
        finite = _finite_rows(Qa, q, Ja, q_f, Q_f, xa, ua)
        K, k, side, dV1, dV2, ok = _riccati(Qa, q, Q_f, q_f, Ja, m, mu_a * scale[idx], lo_d, hi_d)
        ok = ok & finite
        for attempt in range(1, 64):
            # Rows without a positive-definite sweep are swept again, alone, with more
            # regularization (by 10, 100, 1000, ...: few sweeps to reach the needed size);
            # the others keep their sweep.
            retry = ~ok & finite & (mu_a < _MU_MAX)
            if not retry.any():
                break
            mu_a = torch.where(retry, (10.0**attempt * mu_a).clamp_min(_MU_MIN), mu_a)
            r = retry.nonzero().squeeze(-1)
            sub = _riccati(Qa[r], q[r], Q_f[r], q_f[r], Ja[r], m, mu_a[r] * scale[idx[r]],
                           None if lo_d is None else lo_d[r], None if hi_d is None else hi_d[r])
            for full, part in zip((K, k, side, dV1, dV2, ok), sub, strict=True):
                full[r] = part
        K_out[idx], k_out[idx], side_out[idx] = K, k, side
        mu_last[idx] = mu_a
        threshold = tol * (1 + ua.abs().amax((-1, -2)))
        done = ok & (k.abs().amax((-1, -2)) <= threshold)
        if bool((done & (mu_a > 0)).any()):
            # A small step under regularization proves nothing (a large μ shrinks any step):
            # such a row stops only if its projected gradient is small too; otherwise it
            # keeps stepping while μ decays towards an unregularized Newton step.
            lam_r = costates(q, q_f, Ja)
            res = stationarity(ua, reduced_gradient(q, Ja, lam_r), lo[idx], hi[idx], scale[idx])
            done = done & ((mu_a == 0) | (res <= threshold))
        converged[idx[done]] = True
        running[idx[done | ~ok]] = False
        stalled[idx[~ok]] = True
        mu[idx] = mu_a
        go = ~(done | ~ok)
        if it == max_iter or not go.any():
            break
        # Line search on the true cost, per row: α = 1 first, then all smaller α stacked.
        sel, K, k, dV1, dV2 = idx[go], K[go], k[go], dV1[go], dV2[go]
        slack = 64 * eps * (1 + J[sel].abs())
        x_new, u_new = _rollout(dyn, x0[sel], x[sel], u[sel], K, k, alphas[:1].expand(len(sel)),
                                lo[sel], hi[sel], sel)
        J_new = cost.values(sel, x_new, u_new)
        accept = J_new - J[sel] <= 1e-4 * (dV1 + dV2) + slack
        if not accept.all():
            rej = (~accept).nonzero().squeeze(-1)
            R, S = len(rej), len(_ALPHAS) - 1
            r_rows = sel[rej].repeat(S)  # (S*R,), α-major
            a = alphas[1:].repeat_interleave(R)
            xs, us = _rollout(dyn, x0[r_rows], x[r_rows], u[r_rows], K[rej].repeat(S, 1, 1, 1),
                              k[rej].repeat(S, 1, 1), a, lo[r_rows], hi[r_rows], r_rows)
            Js = cost.values(r_rows, xs, us, groups=S).view(S, R)
            expected = a.view(S, R) * dV1[rej] + a.view(S, R) ** 2 * dV2[rej]
            ok_s = Js - J[sel[rej]] <= 1e-4 * expected + slack[rej]
            first = torch.argmax(ok_s.to(torch.int8), 0)  # largest accepted α
            pick = first * R + torch.arange(R, device=dev)
            x_new[rej], u_new[rej], J_new[rej] = xs[pick], us[pick], Js.view(-1)[pick]
            accept[rej] = ok_s.any(0)
        acc_rows = sel[accept]
        x[acc_rows], u[acc_rows], J[acc_rows] = x_new[accept], u_new[accept], J_new[accept]
        cost.track(x, u)
        iterations[sel] += 1
        mu_sel = mu[sel]
        mu_sel = torch.where(accept, mu_sel / 10, (10 * mu_sel).clamp_min(_MU_MIN))
        mu[sel] = torch.where(mu_sel < _MU_MIN, torch.zeros_like(mu_sel), mu_sel)
        running[sel[mu_sel > _MU_MAX]] = False
        stalled[sel[mu_sel > _MU_MAX]] = True
    # Optimality of the returned plans, judged without regularization.
    with torch.no_grad():
        jac = dyn.jacobian(x[:, :-1].detach(), u.detach(), rows)
        _, q, _, q_f = cost.quadratize(rows, x.detach(), u.detach())
        lam = costates(q, q_f, jac)
        residual = stationarity(u.detach(), reduced_gradient(q, jac, lam), lo, hi, scale)
        residual = torch.where(_finite_rows(x, u, lam), residual, torch.inf)
    settled = (mu_last == 0) | (residual <= tol * (1 + u.detach().abs().amax((-1, -2))))
    converged = converged & settled & torch.isfinite(residual)
    at_lower, at_upper = side_out == -1, side_out == 1
    return dict(x=x, u=u, cost=J, costates=lam, gains=K_out, feedforward=k_out,
                at_lower=at_lower, at_upper=at_upper, converged=converged,
                iterations=iterations, regularization=mu, stalled=stalled, residual=residual,
                jacobians=jac)
