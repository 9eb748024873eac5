"""Box-constrained LQ control by a primal-dual active-set method on whole trajectories.

With affine dynamics ``x_{t+1} = F_t τ_t + f_t`` and a convex quadratic cost, eliminating the
states makes the MPC problem a strictly convex QP in the controls alone,

.. math::

    \\min_u J(u) \\quad \\text{s.t.} \\quad \\underline u \\le u \\le \\overline u,

whose reduced gradient ``g_t = ∂J/∂u_t = [C_t τ_t + c_t]_u + B_tᵀλ_{t+1}`` comes from the
costates ``λ``. Its KKT conditions are ``g = 0`` on free controls, ``g >= 0`` on controls at
their lower bound and ``g <= 0`` at their upper bound. The primal-dual active-set method
(Hintermüller, Ito & Kunisch 2002, a semismooth Newton method on ``u = P_box(u − g/c)`` with
``c → ∞``) alternates

1. fix the controls of the active set ``𝒜`` at their bounds and minimize over the rest: an
   equality-constrained LQR, solved exactly by one Riccati sweep in homogeneous coordinates
   (:class:`_Homogeneous`; the clamped controls become affine terms of the cost and the
   dynamics, their rows and columns are masked out of the stage Hessians);
2. update ``𝒜``: a free control that left the box joins it, a clamped control whose
   multiplier has the wrong sign (``g`` pointing into the box) leaves it.

When ``𝒜`` repeats, the iterate meets the KKT conditions exactly. Each iteration is one
batched Riccati sweep (four batched products and an ``m × m`` solve per stage) instead of a
box-constrained QP per stage and a line search; with many bounds active it typically stops
after three to ten iterations, and only the rows still iterating are swept. PDAS can cycle
when the reduced Hessian is not an M-matrix (seen here from random warm starts): a row whose
count of infeasibilities stops falling is given up early. Rows given up, out of budget, or
whose stage Hessians are not positive definite (a nonconvex cost) are reported unconverged so
the caller can hand them to the general box-DDP solver. :func:`adjoint_sweep` reuses the last
factorization for the implicit backward pass. Both run on the LQ engine
(:mod:`diffto.layers._lq_engine`): the homogeneous problem is an LQ problem with one more state
and no affine terms, factored by :func:`~diffto.layers._lq_engine.factor` with the clamped
controls masked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffto.layers import _lq_engine as engine
from diffto.layers._lq_engine import bmv as _bmv

__all__: list[str] = []

_BLOCK_TRIES = 3  # sweeps without fewer infeasibilities before a row is given up as cycling


class _Homogeneous:
    """The LQ problem in homogeneous coordinates ``x̂ = [x; 1]``, ``τ̂ = [x; 1; u]``.

    The affine terms ride along as an extra state that stays 1: ``x̂_{t+1} = F̂_t τ̂_t`` with
    ``F̂ = [[A, f, B], [0, 1, 0]]``, stage cost ``½ τ̂ᵀĈ τ̂`` with ``Ĉ = [[C_xx, c_x, C_xu],
    [c_xᵀ, 0, c_uᵀ], [C_ux, c_u, C_uu]]``, terminal ``½ x̂ᵀĈ_f x̂``. A Riccati sweep then needs
    one matrix recursion instead of a matrix and a vector one: per stage two batched products,
    one ``m × m`` solve and one update. Shapes: ``Ĉ (B, T, n+1+m, n+1+m)``,
    ``F̂ (B, T, n+1, n+1+m)``, ``Ĉ_f (B, n+1, n+1)``.
    """

    def __init__(self, C, c, C_f, c_f, F, f) -> None:
        B, T, k, _ = C.shape
        n = C_f.shape[-1]
        s = n + 1
        self.n, self.m, self.C, self.c, self.F, self.f = n, k - n, C, c, F, f
        self.C_f, self.c_f = C_f, c_f
        Ch = C.new_zeros(B, T, s + self.m, s + self.m)
        Ch[..., :n, :n], Ch[..., :n, s:] = C[..., :n, :n], C[..., :n, n:]
        Ch[..., s:, :n], Ch[..., s:, s:] = C[..., n:, :n], C[..., n:, n:]
        Fh = F.new_zeros(B, T, s, s + self.m)
        Fh[..., :n, :n], Fh[..., :n, s:], Fh[..., n, n] = F[..., :n], F[..., n:], 1
        Cf = C_f.new_zeros(B, s, s)
        Cf[:, :n, :n], Cf[:, :n, n], Cf[:, n, :n] = C_f, c_f, c_f
        self.Ch, self.Fh, self.Cf = Ch, Fh, Cf
        self.set_fixed(None)

    def select(self, rows: Tensor) -> _Homogeneous:
        """The sub-problem of the batch rows ``rows`` (a mask or indices)."""
        sub = _Homogeneous.__new__(_Homogeneous)
        sub.n, sub.m = self.n, self.m
        for name in ("C", "c", "F", "f", "C_f", "c_f", "Ch", "Fh", "Cf"):
            setattr(sub, name, getattr(self, name)[rows])
        return sub

    def set_fixed(self, b: Tensor | None) -> None:
        """Fold controls held at ``b (B, T, m)`` (zero where free; ``None``: none held) into the
        affine terms: with ``u = w + b``, ``c ← c + C_{·u} b`` and ``f ← f + B b``."""
        n, s = self.n, self.n + 1
        c_r = self.c if b is None else self.c + _bmv(self.C[..., n:], b)  # (B, T, k)
        self.Ch[..., :n, n] = c_r[..., :n]
        self.Ch[..., n, :n] = c_r[..., :n]
        self.Ch[..., s:, n] = c_r[..., n:]
        self.Ch[..., n, s:] = c_r[..., n:]
        self.Fh[..., :n, n] = self.f if b is None else self.f + _bmv(self.F[..., n:], b)

    def solve(self, x0: Tensor, fixed: Tensor):
        """Riccati sweep and rollout with the controls ``fixed (B, T, m)`` held at zero (the
        values set by :meth:`set_fixed` are added by the caller).

        The engine factors the homogeneous problem with the fixed controls masked: per stage
        ``Q̂ = Ĉ_t + F̂_tᵀ V̂_{t+1} F̂_t``, the fixed controls' rows and columns of ``Q̂_uu``
        become those of the identity and their rows of ``Q̂_ux̂`` zero, so they get zero gain and
        zero feed-forward exactly; ``[K_t | k_t] = −Q̂_uu⁻¹ Q̂_ux̂`` and
        ``V̂_t = Q̂_x̂x̂ + Q̂_x̂u [K_t | k_t]``. The rollout follows ``w_t = [K_t | k_t] x̂_t``,
        ``x̂_{t+1} = F̂_t [x̂_t; w_t]``, and the costates are ``λ_t = V̂_t[:n] x̂_t``.

        Returns ``x (B, T+1, n)``, ``w (B, T, m)``, ``λ (B, T+1, n)``, gains ``K (B, T, m, n)``,
        ``ok (B,)`` (every masked ``Q̂_uu`` positive definite) and the factorization's
        ``V (B, T+1, n, n)`` and masked ``Q_uu (B, T, m, m)`` (see :func:`adjoint_sweep`).
        """
        n = self.n
        fac = engine.factor(self.Ch, self.Fh, self.Cf, fixed)
        xh0 = torch.cat([x0, x0.new_ones(x0.shape[0], 1)], -1)
        xh, w = engine.closed_loop(self.Fh, fac.K, None, xh0)  # x̂ (B, T+1, n+1), last entry 1
        lam = _bmv(fac.V[..., :n, :], xh)
        return xh[..., :n], w, lam, fac.K[..., :n], fac.ok, fac.V[..., :n, :n], fac.Q_uu


def solve_box_lq(x0, C, c, C_f, c_f, F, f, lo, hi, u_init, max_iter: int, tol: float) -> dict:
    """Box-constrained LQ control for a batch by the primal-dual active-set method.

    Args:
        x0: ``(B, n)``. C: ``(B, T, k, k)`` symmetric, ``k = n + m``; c: ``(B, T, k)``;
        C_f: ``(B, n, n)`` symmetric; c_f: ``(B, n)``; F: ``(B, T, n, k)``; f: ``(B, T, n)``;
        lo, hi: ``(B, T, m)`` (entries may be ±inf); u_init: ``(B, T, m)`` warm start.
        max_iter: the largest number of active-set iterations (each one LQR sweep).
        tol: a row has converged when an iteration moves its controls by at most
            ``tol · (1 + max|u|)``, or when its active set repeats (an exact KKT point).

    The first active set holds the controls of the clamped warm start that sit on a bound
    with the reduced gradient pointing out of the box (empty for ``u_init = 0`` inside the
    box). Only rows still iterating are swept. Returns a dict of ``(B, ...)`` tensors:
    ``x, u, costates, gains, feedforward`` (the last change of ``u``), ``at_lower, at_upper``,
    ``value, Q_uu`` (the last factorization, for :func:`adjoint_sweep`), ``converged``,
    ``iterations`` and ``convex`` (False where a sweep met a ``Q_uu`` that is
    not positive definite on the free set: such rows need a method for nonconvex problems and
    their other outputs are meaningless).
    """
    B, T, m = u_init.shape
    n = x0.shape[-1]
    dev = x0.device
    lo_all, hi_all, x0_all = lo, hi, x0
    u = torch.minimum(torch.maximum(u_init, lo), hi)
    at_lo, at_hi = u <= lo, u >= hi
    if bool((at_lo | at_hi).any()):
        x = engine.rollout(F, f, x0, u)
        q, q_f = engine.cost_gradients(C, c, C_f, c_f, x, u)
        g = engine.reduced_gradient(q, F, engine.costates(q, q_f, F))
        at_lo, at_hi = at_lo & (g > 0), at_hi & (g < 0) & ~(at_lo & (g > 0))
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    convex = torch.ones_like(converged)
    iterations = torch.zeros(B, dtype=torch.long, device=dev)
    out = dict(x=x0.new_zeros(B, T + 1, n), u=torch.zeros_like(u),
               costates=x0.new_zeros(B, T + 1, n), gains=x0.new_zeros(B, T, m, n),
               feedforward=torch.zeros_like(u), at_lower=torch.zeros_like(at_lo),
               at_upper=torch.zeros_like(at_hi), value=x0.new_zeros(B, T + 1, n, n),
               Q_uu=x0.new_zeros(B, T, m, m))
    idx = torch.arange(B, device=dev)  # the rows still iterating
    # Guard against cycling: the fewest infeasibilities seen so far and the number of sweeps
    # since that count last fell, per row.
    best = torch.full((B,), T * m + 1, dtype=torch.long, device=dev)
    cycled = torch.zeros(B, dtype=torch.bool, device=dev)
    stuck = torch.zeros(B, dtype=torch.long, device=dev)
    lq = lq_all = _Homogeneous(C, c, C_f, c_f, F, f)
    for it in range(max_iter):
        fixed = at_lo | at_hi
        b = torch.where(at_lo, lo, torch.where(at_hi, hi, 0))
        lq.set_fixed(b)
        x_new, w, lam, K, ok, V, Q_uu = lq.solve(x0, fixed)
        u_new = w + b
        step = (u_new - u).abs().amax((-1, -2))
        small = ok & (step <= tol * (1 + u.abs().amax((-1, -2))))
        moved = ok & ~small
        iterations[idx] += moved
        # New active set from the new iterate: free controls outside the box join it,
        # clamped controls whose multiplier points into the box leave it. An unchanged set
        # means the iterate meets the KKT conditions.
        q = _bmv(lq.C, torch.cat([x_new[:, :-1], u_new], -1)) + lq.c  # ∇_τℓ at the iterate
        g = engine.reduced_gradient(q, lq.F, lam)
        new_lo = (~fixed & (u_new < lo)) | (at_lo & (g > 0))
        new_hi = (~fixed & (u_new > hi)) | (at_hi & (g < 0))
        change = (new_lo != at_lo) | (new_hi != at_hi)  # (B, T, m): the infeasibilities
        n_inf = change.sum((-1, -2))
        same = n_inf == 0
        settled = small | (moved & same)
        # Cycling guard: PDAS can cycle when the reduced Hessian is not an M-matrix. A row whose
        # number of infeasibilities has not fallen for _BLOCK_TRIES sweeps stops here,
        # unconverged, for the caller to finish it with a descent method.
        fell = n_inf < best
        best, stuck = torch.minimum(best, n_inf), torch.where(fell, 0, stuck + 1)
        cycling = ~settled & (stuck > _BLOCK_TRIES)
        converged[idx[settled]] = True
        convex[idx[~ok]] = False
        cycled[idx[cycling]] = True
        leave = settled | ~ok | cycling if it < max_iter - 1 else torch.ones_like(ok)
        put = leave & ok
        if bool(put.any()):
            rows = idx[put]
            for key, value in (("x", x_new), ("u", u_new), ("costates", lam), ("gains", K),
                               ("feedforward", u_new - u), ("at_lower", at_lo),
                               ("at_upper", at_hi), ("value", V), ("Q_uu", Q_uu)):
                out[key][rows] = value[put]
        stay = ~leave
        if not bool(stay.any()):
            break
        u, at_lo, at_hi = u_new, new_lo, new_hi
        if not bool(stay.all()):  # sweep only the rows still iterating
            idx, lq = idx[stay], lq.select(stay)
            x0, lo, hi, u, at_lo, at_hi, best, stuck = (
                t[stay] for t in (x0, lo, hi, u, at_lo, at_hi, best, stuck))
    # A negligible last step may leave round-off outside the box.
    rows = (cycled & convex & ~converged & (iterations < max_iter)).nonzero().squeeze(-1)
    if len(rows):
        _projected_newton(lq_all.select(rows), x0_all[rows], lo_all[rows], hi_all[rows],
                          out, rows, converged, iterations, max_iter, tol)
    out["u"] = torch.minimum(torch.maximum(out["u"], lo_all), hi_all)
    out.update(converged=converged & convex, iterations=iterations, convex=convex)
    return out


def _projected_newton(lq: _Homogeneous, x0, lo, hi, out: dict, rows: Tensor, converged: Tensor,
                      iterations: Tensor, max_iter: int, tol: float) -> None:
    """Finish rows on which PDAS cycled by projected Newton (Bertsekas 1982), a descent method.

    From the clamped last iterate ``u`` (feasible): the controls on a bound with the reduced
    gradient pointing out of the box are held there, the others take the exact Newton step on
    that face (one Riccati sweep, as in PDAS), and the step is cut back along the projected arc
    ``P(u + α d)``, ``α = 1, ½, …``, until the cost falls by an Armijo fraction of
    ``gᵀ(P(u + α d) − u)``. A row stops when the Newton step is below ``tol · (1 + max|u|)``.
    Results of converged rows are written into ``out``, ``converged`` and ``iterations`` at
    ``rows`` (``x0, lo, hi`` and ``lq`` are those rows' data).
    """
    alphas = torch.tensor([2.0**-i for i in range(11)], dtype=x0.dtype, device=x0.device)
    S = len(alphas)
    u = torch.minimum(torch.maximum(out["u"][rows], lo), hi)
    for _ in range(max_iter - int(iterations[rows].min())):
        x = engine.rollout(lq.F, lq.f, x0, u)
        q, q_f = engine.cost_gradients(lq.C, lq.c, lq.C_f, lq.c_f, x, u)
        g = engine.reduced_gradient(q, lq.F, engine.costates(q, q_f, lq.F))
        at_lo, at_hi = (u <= lo) & (g > 0), (u >= hi) & (g < 0)
        fixed = at_lo | at_hi
        b = torch.where(fixed, u, 0)
        lq.set_fixed(b)
        x_n, w, lam_n, K, ok, V, Q_uu = lq.solve(x0, fixed)
        u_n = w + b
        d = u_n - u
        done = ok & (d.abs().amax((-1, -2)) <= tol * (1 + u.abs().amax((-1, -2))))
        if bool(done.any()):
            r = rows[done]
            converged[r] = True
            for key, value in (("x", x_n), ("u", u_n), ("costates", lam_n), ("gains", K),
                               ("feedforward", d), ("at_lower", at_lo), ("at_upper", at_hi),
                               ("value", V), ("Q_uu", Q_uu)):
                out[key][r] = value[done]
        go = ok & ~done
        if not bool(go.any()):
            return
        # Projected arc search, all step sizes at once: (S, R, T, m) candidates.
        cand = torch.minimum(torch.maximum(u + alphas.view(-1, 1, 1, 1) * d, lo), hi)
        flat = cand.flatten(0, 1)  # (S·R, T, m), step-size major
        rep = [t.repeat(S, *([1] * (t.dim() - 1))) for t in (lq.F, lq.f, x0, lq.C, lq.c,
                                                               lq.C_f, lq.c_f)]
        xs = engine.rollout(rep[0], rep[1], rep[2], flat)
        J = engine.quadratic_cost(rep[3], rep[4], rep[5], rep[6], xs, flat).view(S, -1)
        J0 = engine.quadratic_cost(lq.C, lq.c, lq.C_f, lq.c_f, x, u)
        armijo = J - J0 <= 1e-4 * (g * (cand - u)).sum((-1, -2)) + 64 * torch.finfo(
            u.dtype).eps * (1 + J0.abs())
        first = torch.argmax(armijo.to(torch.int8), 0)  # largest accepted step per row
        pick = cand.gather(0, first.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)
        accept = go & armijo.any(0)
        u = torch.where(accept.view(-1, 1, 1), pick, u)
        iterations[rows[accept]] += 1
        if not bool(accept.any()):
            return
        # each row within its own budget: rows enter with different iteration counts
        keep = ~(done | ~accept) & (iterations[rows] < max_iter)
        if not bool(keep.any()):
            return
        if not bool(keep.all()):
            rows, lq = rows[keep], lq.select(keep)
            x0, lo, hi, u = x0[keep], lo[keep], hi[keep], u[keep]
