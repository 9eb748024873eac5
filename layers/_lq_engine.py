"""The LQ engine: the one Riccati machinery behind every LQ-based solver of diffto.

The problem, for each batch row,

.. math::

    \\min_{x, u} \\sum_{t=0}^{T-1} \\tfrac12 \\tau_t^\\top C_t \\tau_t + c_t^\\top \\tau_t
        + \\tfrac12 x_T^\\top C_f x_T + c_f^\\top x_T
    \\quad\\text{s.t.}\\quad x_{t+1} = F_t \\tau_t + f_t,\\quad x_0 = x_\\text{init},
    \\quad u_{t,j} = 0 \\text{ for the fixed controls } (t, j),

with ``τ_t = [x_t; u_t]``, is solved by dynamic programming in two parts:

* :func:`factor`, the matrix recursion on ``(C, F, C_f)`` alone: cost-to-go Hessians ``V_t``,
  gains ``K_t`` and the (masked, regularized) ``Q_uu`` of every stage;
* :func:`affine_sweep`, the vector recursion (:func:`vector_sweep`) and the rollout
  (:func:`closed_loop`) that take the linear data ``(c, c_f, f, x_init)`` through a
  factorization. :func:`adjoint_sweep` is the same with ``f = 0`` and ``x_init = 0``: the
  adjoint of an LQ problem is an LQ problem with the same quadratic part, so an implicit
  backward pass costs one vector recursion and a rollout.

Solvers that must do something between the matrix and the vector part of a stage (box-DDP
solves a box QP in ``u`` there) run their own stage loop with :func:`stage_q` and
:func:`value_update`. The plan helpers (:func:`bmv`, :func:`rollout`, :func:`quadratic_cost`,
:func:`cost_gradients`, :func:`costates`, :func:`reduced_gradient`) live here once; the last
two take cost gradients and dynamics Jacobians, so they serve nonlinear problems as well.

Shapes: ``B`` batch, ``T`` horizon, ``n`` state, ``m`` control, ``k = n + m``; batch first.
The recursions are bound by dispatch, not arithmetic, for the small matrices of control:
per-stage views are taken once, and what is cheap to form for all stages at once (stacked
inverses, the positive-definiteness test) is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Factorization",
    "adjoint_sweep",
    "affine_sweep",
    "bmv",
    "closed_loop",
    "cost_gradients",
    "costates",
    "factor",
    "quadratic_cost",
    "reduced_gradient",
    "rollout",
    "stage_q",
    "value_update",
    "vector_sweep",
]


def bmv(M: Tensor, v: Tensor) -> Tensor:
    """Batched matrix-vector product ``M (..., i, j) @ v (..., j) -> (..., i)``."""
    return (M @ v.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------------------ plan helpers
def quadratic_cost(C: Tensor, c: Tensor, C_f: Tensor, c_f: Tensor, x: Tensor, u: Tensor) -> Tensor:
    """``Σ_t ½ τ_tᵀC_tτ_t + c_tᵀτ_t + ½ x_TᵀC_f x_T + c_fᵀx_T`` ``(B,)`` of the plan
    ``x (B, T+1, n)``, ``u (B, T, m)``; ``C (B, T, k, k)``, ``c (B, T, k)``, ``C_f (B, n, n)``,
    ``c_f (B, n)`` (batch 1 broadcasts)."""
    tau = torch.cat([x[:, :-1], u], -1)
    xT = x[:, -1]
    return ((tau * (0.5 * bmv(C, tau) + c)).sum((-1, -2))
            + (xT * (0.5 * bmv(C_f, xT) + c_f)).sum(-1))


def rollout(F: Tensor, f: Tensor | None, x0: Tensor, u: Tensor) -> Tensor:
    """States ``x (B, T+1, n)`` of the controls ``u (B, T, m)`` from ``x0 (B, n)`` under
    ``x_{t+1} = F_t [x_t; u_t] + f_t``; ``F (B, T, n, k)``, ``f (B, T, n)`` or ``None``."""
    B = x0.shape[0]
    F = F.expand(B, *F.shape[1:])
    # The control part of every stage at once, then one product per stage.
    drive = bmv(F[..., x0.shape[-1]:], u)  # (B, T, n)
    drive = drive if f is None else drive + f
    F_x, drive = F[..., :x0.shape[-1]].unbind(1), drive.unsqueeze(-1).unbind(1)
    xs = [x0.unsqueeze(-1)]
    for t in range(u.shape[1]):
        xs.append(torch.baddbmm(drive[t], F_x[t], xs[-1]))
    return torch.stack(xs, 1).squeeze(-1)


def cost_gradients(C: Tensor, c: Tensor, C_f: Tensor, c_f: Tensor, x: Tensor,
                   u: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of a quadratic cost at the plan ``x (B, T+1, n)``, ``u (B, T, m)``:
    ``q_t = ∇_τℓ_t = C_tτ_t + c_t`` ``(B, T, k)`` and ``q_f = ∇ℓ_T = C_f x_T + c_f`` ``(B, n)``."""
    return bmv(C, torch.cat([x[:, :-1], u], -1)) + c, bmv(C_f, x[:, -1]) + c_f


def costates(q: Tensor, q_f: Tensor, J: Tensor) -> Tensor:
    """Costates ``λ (B, T+1, n)`` of a plan from its cost gradients ``q = ∇_τℓ (B, T, k)``,
    ``q_f = ∇ℓ_T (B, n)`` and dynamics Jacobians ``J (B, T, n, k)`` (``F`` for affine
    dynamics): ``λ_T = q_f``, ``λ_t = q_x + A_tᵀλ_{t+1}`` with ``A_t = J_t[:, :n]``. At a
    stationary point they are the multipliers of ``x_{t+1} = f(τ_t)`` (``λ_0`` that of
    ``x_0 = x_init``); for any plan that satisfies the dynamics, ``λ_0`` is the gradient of the
    cost in ``x_0`` with the controls held."""
    n = q_f.shape[-1]
    A_T = J[..., :n].transpose(-1, -2).unbind(1)  # (B, n, n) per stage
    q_x = q[..., :n].unbind(1)
    lam = [q_f]
    for t in range(q.shape[1] - 1, -1, -1):
        lam.append(q_x[t] + bmv(A_T[t], lam[-1]))
    return torch.stack(lam[::-1], 1)


def reduced_gradient(q: Tensor, J: Tensor, lam: Tensor) -> Tensor:
    """``g_t = ∂J/∂u_t = q_u + B_tᵀλ_{t+1}`` ``(B, T, m)`` with ``B_t = J_t[:, n:]``: the
    gradient of the cost in the controls with the states eliminated (``q = ∇_τℓ (B, T, k)``
    and the costates ``λ (B, T+1, n)`` of the same plan)."""
    n = lam.shape[-1]
    return q[..., n:] + bmv(J[..., n:].transpose(-1, -2), lam[:, 1:])


# ------------------------------------------------------------------------------ factorization
class Factorization(NamedTuple):
    """The matrix part of an LQ solve.

    ``V (B, T+1, s, s)`` cost-to-go Hessians (``V_T = C_f``), ``K (B, T, m, s)`` gains (zero
    rows on fixed controls), ``Q_uu (B, T, m, m)`` per stage (regularized, and masked: the
    identity on fixed controls' rows and columns), ``ok (B,)`` True where every ``Q_uu`` is
    positive definite (elsewhere the rest is meaningless, though finite where ``Q_uu`` is
    nonsingular), ``fixed (B, T, m)`` bool or ``None``: the controls held at zero.
    """

    V: Tensor
    K: Tensor
    Q_uu: Tensor
    ok: Tensor
    fixed: Tensor | None


# Per stage, with V_T = C_f:
#     Q_t = C_t + F_tᵀ V_{t+1} F_t                    (the Hessian of stage + cost-to-go in τ_t)
#     Q_uu ← Q_uu + μ I                               (Levenberg-Marquardt, optional)
#     fixed (t, j): row and column j of Q_uu ← e_j,  row j of Q_ux ← 0
#     K_t = −Q_uu⁻¹ Q_ux                              (zero rows on fixed controls)
#     V_t = Q_xx + Q_xu K_t = Q_xx − Q_xu Q_uu⁻¹ Q_ux
# Masking solves the problem with the fixed controls removed: the masked Q_uu is block
# diagonal (after a permutation) with the free block and an identity, so the free gains are
# those of the reduced problem and the fixed ones vanish. The state dimension ``s`` is that of
# F; the homogeneous form of the active-set solver (``s = n + 1``) factors through here too.
def factor(C: Tensor, F: Tensor, C_f: Tensor, fixed: Tensor | None = None,
           mu: Tensor | None = None) -> Factorization:
    """Riccati recursion on the quadratic part of an LQ problem.

    Args:
        C: ``(B, T, s+m, s+m)`` symmetric stage Hessians.
        F: ``(B, T, s, s+m)`` dynamics.
        C_f: ``(B, s, s)`` symmetric terminal Hessian.
        fixed: ``(B, T, m)`` bool, controls held at zero; ``None`` for none.
        mu: ``(B,)`` added to every ``Q_uu``'s diagonal; ``None`` for none.

    Leading batch dims of 1 broadcast. Returns a :class:`Factorization`.
    """
    lead = [C.shape[:1], F.shape[:1], C_f.shape[:1]]
    lead += [t.shape[:1] for t in (fixed, mu) if t is not None]
    B = torch.broadcast_shapes(*lead)[0]
    T, s = C.shape[1], F.shape[2]
    m = C.shape[-1] - s
    C, F, C_f = C.expand(B, *C.shape[1:]), F.expand(B, *F.shape[1:]), C_f.expand(B, s, s)
    if mu is not None:
        # μ on the control block of every C_t is μ on every Q_uu, in one op for all stages.
        eye_u = torch.zeros(s + m, dtype=C.dtype, device=C.device)
        eye_u[s:] = 1
        C = C + torch.diag_embed(mu.view(-1, 1, 1) * eye_u)
    Cs, Fs, FTs = C.unbind(1), F.unbind(1), F.transpose(-1, -2).unbind(1)
    masked = fixed is not None and bool(fixed.any())
    if masked:
        fixed = fixed.expand(B, T, m)
        free = ~fixed
        both = (free.unsqueeze(-1) & free.unsqueeze(-2)).unbind(1)  # (B, m, m) per stage
        eye_fixed = torch.diag_embed(fixed.to(C.dtype)).unbind(1)
        free_rows = free.to(C.dtype).unsqueeze(-1).unbind(1)  # (B, m, 1) per stage
    V = C_f
    Vs, Ks, Q_uus = [V], [], []
    for t in range(T - 1, -1, -1):
        Q = torch.baddbmm(Cs[t], FTs[t], torch.bmm(V, Fs[t]))
        Q_uu, Q_ux = Q[:, s:, s:], Q[:, s:, :s]
        if masked:
            Q_uu, Q_ux = torch.where(both[t], Q_uu, eye_fixed[t]), Q_ux * free_rows[t]
        # An LU solve for the gains: as fast as a Cholesky solve here, and still the exact
        # Newton step of a row whose Q_uu is indefinite but nonsingular (the adjoint of an
        # unconverged iterate); positive definiteness is tested once after the loop.
        G = torch.linalg.solve_ex(Q_uu, Q_ux)[0]  # −K_t
        V = torch.baddbmm(Q[:, :s, :s], Q[:, :s, s:], G, alpha=-1)
        # Kept symmetric: over long horizons with unstable dynamics the round-off asymmetry
        # otherwise grows until V diverges.
        V = (V + V.transpose(-1, -2)).mul_(0.5)
        Vs.append(V)
        Ks.append(G)
        Q_uus.append(Q_uu)
    Q_uu = torch.stack(Q_uus[::-1], 1)
    ok = (torch.linalg.cholesky_ex(Q_uu)[1] == 0).all(1)
    K = torch.stack(Ks[::-1], 1).neg_()
    return Factorization(torch.stack(Vs[::-1], 1), K, Q_uu, ok, fixed if masked else None)


# ------------------------------------------------------------------------------ sweeps
def closed_loop(F: Tensor, K: Tensor, k: Tensor | None, x0: Tensor,
                f: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rollout of the policy ``u_t = K_t x_t + k_t`` under ``x_{t+1} = F_t [x_t; u_t] + f_t``
    from ``x0 (B, s)``: returns ``x (B, T+1, s)`` and ``u (B, T, m)``.

    ``F (B, T, s, s+m)``, ``K (B, T, m, s)``, ``k (B, T, m)`` or ``None``, ``f (B, T, s)`` or
    ``None`` (zero terms are skipped). Three small products per stage: forming the closed-loop
    matrices ``A_t + B_t K_t`` of every stage at once instead costs a ``B·T``-batched product
    of tiny matrices that measured 2–4x slower on CPU, at small and large batches alike."""
    B, T, m, s = K.shape
    F = F.expand(B, *F.shape[1:])
    F_x, F_u, Ks = F[..., :s].unbind(1), F[..., s:].unbind(1), K.unbind(1)
    ks = None if k is None else k.expand(B, T, m).unsqueeze(-1).unbind(1)
    fs = None if f is None else f.expand(B, T, s).unsqueeze(-1).unbind(1)
    x = x0.unsqueeze(-1)
    xs, us = [x], []
    for t in range(T):
        u = torch.bmm(Ks[t], x) if ks is None else torch.baddbmm(ks[t], Ks[t], x)
        x_next = torch.bmm(F_x[t], x) if fs is None else torch.baddbmm(fs[t], F_x[t], x)
        x = torch.baddbmm(x_next, F_u[t], u)
        xs.append(x)
        us.append(u)
    return torch.stack(xs, 1).squeeze(-1), torch.stack(us, 1).squeeze(-1)


# Vector recursion through a factorization, with v_T = c_f:
#     q_t = c_t + F_tᵀ (V_{t+1} f_t + v_{t+1})        (the gradient of stage + cost-to-go at τ = 0)
#     k_t = −Q_uu⁻¹ [q_u]_free                        (zero on fixed controls)
#     v_t = q_x + K_tᵀ q_u    (:func:`value_update`'s K_tᵀQ_uu k_t + Q_xu k_t cancel for the
#                              optimal gains, as Q_xu = −K_tᵀQ_uu on the free controls and
#                              K_t, k_t vanish on the fixed ones)
# then forward u_t = K_t x_t + k_t, x_{t+1} = F_t τ_t + f_t, and the costates
# λ_t = V_t x_t + v_t, the gradient of the optimal cost-to-go (the multiplier of
# x_{t+1} = F_t τ_t + f_t, λ_0 that of x_0 = x_init).
def vector_sweep(fac: Factorization, F: Tensor, c: Tensor, c_f: Tensor,
                 f: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The vector recursion alone: feed-forward ``k (B, T, m)`` and cost-to-go gradients
    ``v (B, T+1, n)`` of the linear data ``c (B, T, k)``, ``c_f (B, n)``, ``f (B, T, n)`` or
    ``None`` (zero, skipped) through ``fac``, made with ``F (B, T, n, k)``. Batch dims of 1
    broadcast. (A DDP backward pass about a plan, ``f = 0``, needs just this and ``fac.K``.)"""
    lead = [fac.V.shape[:1], F.shape[:1], c.shape[:1], c_f.shape[:1]]
    B = torch.broadcast_shapes(*lead, *([] if f is None else [f.shape[:1]]))[0]
    V, K, Q_uu = (t.expand(B, *t.shape[1:]) for t in fac[:3])
    T, m, n = K.shape[1], K.shape[2], K.shape[3]
    F = F.expand(B, *F.shape[1:])
    # One batched inverse for every stage; the loop then needs one product per solve.
    inv = torch.linalg.inv_ex(Q_uu)[0].unbind(1)  # identity on fixed controls
    Vs, KTs, FTs = V.unbind(1), K.transpose(-1, -2).unbind(1), F.transpose(-1, -2).unbind(1)
    cs = c.expand(B, T, n + m).unsqueeze(-1).unbind(1)  # column vectors
    fs = None if f is None else f.expand(B, T, n).unsqueeze(-1).unbind(1)
    free = None if fac.fixed is None else (~fac.fixed).to(c.dtype).unsqueeze(-1).unbind(1)
    v = c_f.expand(B, n).unsqueeze(-1)
    vs, ks = [v], []
    for t in range(T - 1, -1, -1):
        w = v if fs is None else torch.baddbmm(v, Vs[t + 1], fs[t])
        q = torch.baddbmm(cs[t], FTs[t], w)
        q_u = q[:, n:] if free is None else q[:, n:] * free[t]
        ks.append(torch.bmm(inv[t], q_u))  # −k_t
        v = torch.baddbmm(q[:, :n], KTs[t], q_u)
        vs.append(v)
    k = torch.stack(ks[::-1], 1).squeeze(-1).neg_()  # (B, T, m)
    return k, torch.stack(vs[::-1], 1).squeeze(-1)


def affine_sweep(fac: Factorization, F: Tensor, c: Tensor, c_f: Tensor, f: Tensor | None,
                 x0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Propagate the linear data through a factorization of ``(C, F, C_f)``.

    Args:
        fac: from :func:`factor` (its fixed controls are held at zero).
        F: ``(B, T, n, k)``, the dynamics ``fac`` was made with.
        c: ``(B, T, k)``; c_f: ``(B, n)``; f: ``(B, T, n)`` or ``None`` for zero (skipped).
        x0: ``(B, n)``.

    Returns ``x (B, T+1, n)``, ``u (B, T, m)``, costates ``λ (B, T+1, n)`` and the
    feed-forward ``k (B, T, m)``. Batch dims of 1 broadcast to ``x0``'s.
    """
    B = x0.shape[0]
    V, K = fac.V.expand(B, *fac.V.shape[1:]), fac.K.expand(B, *fac.K.shape[1:])
    k, v = vector_sweep(fac, F, c.expand(B, *c.shape[1:]), c_f, f)
    x, u = closed_loop(F, K, k, x0, f)
    lam = bmv(V, x) + v
    return x, u, lam, k


def adjoint_sweep(fac: Factorization, F: Tensor, g: Tensor, g_T: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The LQ problem of ``fac`` with new linear terms ``g (B, T, k)``, ``g_T (B, n)``,
    ``f = 0`` and ``x_0 = 0`` (the adjoint solve of an implicit backward pass: only the vector
    recursion and a rollout run). Returns ``x (B, T+1, n)``, ``u (B, T, m)``,
    ``λ (B, T+1, n)``."""
    x, u, lam, _ = affine_sweep(fac, F, g, g_T, None, g_T.new_zeros(g_T.shape))
    return x, u, lam


# ------------------------------------------------------------------------------ one stage
def stage_q(C_t: Tensor, c_t: Tensor, F_t: Tensor, V: Tensor, v: Tensor,
            f_t: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The quadratic model of stage ``t`` plus the cost-to-go of stage ``t + 1``:
    ``Q_t = C_t + F_tᵀ V F_t`` ``(B, k, k)`` and ``q_t = c_t + F_tᵀ(V f_t + v)`` ``(B, k)``,
    from ``C_t (B, k, k)``, ``c_t (B, k)``, ``F_t (B, n, k)``, ``V (B, n, n)``, ``v (B, n)``,
    ``f_t (B, n)`` or ``None`` (zero, as for deviations about a feasible plan)."""
    F_T = F_t.transpose(-1, -2)
    Q = torch.baddbmm(C_t, F_T, torch.bmm(V, F_t))
    w = v if f_t is None else v + bmv(V, f_t)
    return Q, c_t + bmv(F_T, w)


def value_update(Q: Tensor, q: Tensor, K: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Cost-to-go of a stage under any affine policy ``u = K x + k``.

    Substituting ``u = K x + k`` into ``½ τᵀQτ + qᵀτ`` gives, up to a constant,
    ``½ xᵀV x + vᵀx`` with
    ``V = Q_xx + KᵀQ_uu K + KᵀQ_ux + Q_xu K`` and ``v = q_x + KᵀQ_uu k + Kᵀq_u + Q_xu k``.
    For the unconstrained optimum this is :func:`factor`'s ``V_t`` and :func:`affine_sweep`'s
    ``v_t``; for the gains of a box QP (clamped rows: zero gain) it is the value the
    box-DDP backward pass propagates. ``Q (B, k, k)``, ``q (B, k)``, ``K (B, m, n)``,
    ``k (B, m)``; returns ``V (B, n, n)`` (symmetrized) and ``v (B, n)``.
    """
    n = K.shape[-1]
    Q_xx, Q_ux, Q_uu = Q[:, :n, :n], Q[:, n:, :n], Q[:, n:, n:]
    K_T = K.transpose(-1, -2)
    QK = torch.bmm(Q_uu, K) + Q_ux  # (B, m, n)
    V = Q_xx + torch.bmm(K_T, QK) + torch.bmm(Q_ux.transpose(-1, -2), K)
    V = 0.5 * (V + V.transpose(-1, -2))
    v = q[:, :n] + bmv(QK.transpose(-1, -2), k) + bmv(K_T, q[:, n:])
    return V, v
