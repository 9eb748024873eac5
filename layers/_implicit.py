"""Implicit differentiation of a trajectory optimum by residual injection.

At a solution ``z* = (τ*, λ*, ν*)`` of

    min Σ_t ℓ(τ_t; θ) + ℓ_T(x_T; θ)   s.t.   x_{t+1} = f(τ_t; θ),  x_0 = x0,  u_𝒜 = b_𝒜

(``𝒜`` the bounds active at the solution, ``b`` their values), the KKT residual
``r(z, θ) = 0`` reads, with the Lagrangian
``ℒ = Σ ℓ + ℓ_T + Σ λ_{t+1}ᵀ(f(τ_t) − x_{t+1}) + λ_0ᵀ(x0 − x_0) + Σ_𝒜 ν (u − b)``,

    r_τ  = ∇_τ ℓ(τ_t; θ) + J_tᵀλ_{t+1} − [λ_t; 0] + [0; ν_t]   (stationarity in τ_t)
    r_T  = ∇ℓ_T(x_T; θ) − λ_T                                   (stationarity in x_T)
    r_f  = f(τ_t; θ) − x_{t+1},   r_0 = x0 − x_0,   r_𝒜 = u_𝒜 − b_𝒜.

With strict complementarity the active set is locally constant and the implicit function
theorem gives, for a loss with gradient ``g = (g_τ, g_T)`` at ``(x*, u*)``,

    dL/dθ = ẑᵀ ∂r/∂θ,   K ẑ = −g,   K = ∂r/∂z (the symmetric KKT matrix).

``K ẑ = −g`` is the KKT system of an equality-constrained LQ problem (the *adjoint* problem):
stage Hessians ``H_t = ∇²ℓ + Σ_i λ*_{t+1,i} ∇²f_i`` (the Hessian of ℒ: with the dynamics
curvature this is the exact derivative, not Gauss-Newton), dynamics ``x̂_{t+1} = J_t τ̂_t``,
``x̂_0 = 0``, ``û_𝒜 = 0`` and linear terms ``g``: one Riccati sweep.

Rather than differentiating ``r`` w.r.t. a fixed list of inputs, the layer *builds* the
θ-dependent parts of ``r`` with ordinary autograd from the user's own cost and dynamics at the
(detached) solution,

    y = (∇_τ ℓ + J_tᵀλ*_{t+1},  ∇ℓ_T,  f(τ*_t),  x0,  b_𝒜),

and passes ``y`` through :class:`InjectSolution`, whose forward returns ``(x*, u*)`` and whose
backward returns the cotangent ``ẑ`` matched to ``y``'s blocks, ``(τ̂, x̂_T, λ̂_{1:}, λ̂_0,
−ν̂_𝒜)``. Autograd then delivers ``ẑᵀ ∂y/∂θ = ẑᵀ ∂r/∂θ`` to *every* tensor ``y`` was
computed from: cost tensors, module parameters, tensors a cost or a dynamics closes over,
``x0`` and the bounds. Rows whose solution is not finite get a zero cotangent and are left out
of ``y`` (their dynamics are not evaluated), so nothing of a failed row reaches another row or
a shared parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffto.layers import _lq_engine as engine
from diffto.layers._lq_engine import bmv

__all__: list[str] = []


class InjectSolution(torch.autograd.Function):
    """``(x*, u*)`` out; the adjoint of the KKT system back into the residual blocks ``y``.

    Inputs: ``x (B, T+1, n)``, ``u (B, T, m)`` (detached), the adjoint problem ``H (B, T, k, k)``,
    ``H_f (B, n, n)``, ``J (B, T, n, k)``, ``active_lower``, ``active_upper (B, T, m)``, ``bad
    (B,)`` rows to leave out, a reusable factorization ``(gains, value, Q_uu)`` or empty
    tensors, then the residual blocks ``y_tau (B, T, k)``, ``y_T (B, n)``, ``y_f (B, T, n)``,
    ``y_0 (B, n)``, ``y_lo``, ``y_hi (B, T, m)``.
    """

    @staticmethod
    def forward(x, u, H, H_f, J, act_lo, act_hi, bad, K, value, Q_uu, *y):
        return x.clone(), u.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, u, H, H_f, J, act_lo, act_hi, bad, K, value, Q_uu = inputs[:11]
        ctx.save_for_backward(H, H_f, J, act_lo, act_hi, bad, K, value, Q_uu)
        ctx.shapes = (x.shape, u.shape)

    @staticmethod
    def backward(ctx, g_x, g_u):
        H, H_f, J, act_lo, act_hi, bad, K, value, Q_uu = ctx.saved_tensors
        (B, T1, n), (_, T, m) = ctx.shapes
        g_x = H.new_zeros(B, T1, n) if g_x is None else g_x
        g_u = H.new_zeros(B, T, m) if g_u is None else g_u
        keep = (~bad).view(-1, 1, 1)
        g = torch.where(keep, torch.cat([g_x[:, :-1], g_u], -1), 0)  # (B, T, k)
        g_T = torch.where(keep[:, 0], g_x[:, -1], 0)
        fixed = act_lo | act_hi
        if value.numel():
            # Linear dynamics, every row settled by the active-set solver: the adjoint problem
            # has that solve's Hessians, dynamics and active set, so only the vector
            # recursion runs through the saved factorization.
            ok = torch.ones(B, dtype=torch.bool, device=H.device)
            fac = engine.Factorization(value, K, Q_uu, ok, fixed)
        else:
            fac = engine.factor(H, J, H_f, fixed)
        xh, uh, lam_h = engine.adjoint_sweep(fac, J, g, g_T)
        tau_h = torch.cat([xh[:, :-1], uh], -1)
        # −ν̂ on the active set: the reduced gradient of the adjoint problem there.
        r_u = engine.reduced_gradient(bmv(H, tau_h) + g, J, lam_h)
        zero = torch.zeros_like(r_u)
        cot = (tau_h, xh[:, -1], lam_h[:, 1:], lam_h[:, 0], torch.where(act_lo, r_u, zero),
               torch.where(act_hi, r_u, zero))
        cot = tuple(torch.where(keep.view(-1, *([1] * (c.dim() - 1))), c, 0) for c in cot)
        return (None,) * 11 + cot


def bad_rows(*tensors: Tensor) -> Tensor:
    """``(B,)`` True where any of the ``(B, ...)`` tensors holds a non-finite entry."""
    bad = torch.zeros(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        bad = bad | ~torch.isfinite(t).flatten(1).all(1)
    return bad


def residual_blocks(cost, dyn, x0, x, u, lam, lo, hi, act_lo, act_hi, bad):
    """The θ-dependent KKT residual blocks ``y`` of :class:`InjectSolution`, built in the current
    autograd mode from the user's cost and dynamics at the detached solution ``x, u, λ``.

    ``cost`` is the user's cost object (``gradients(x, u, create_graph)``), ``dyn`` a
    :class:`~diffto.layers._dynamics_model.DynamicsModel`, ``lo, hi`` the bounds as given
    (broadcasting to ``(B, T, m)``; ``None`` for none). Rows in ``bad`` are evaluated at zeros
    (costs) or not at all (dynamics), and their blocks are zero.
    """
    B, T, m = u.shape
    n = x.shape[-1]
    keep = ~bad
    x, u, lam = (torch.where(keep.view(-1, 1, 1), t.detach(), 0) for t in (x, u, lam))
    g_tau, g_T = cost.gradients(x, u, create_graph=True)
    good = keep.nonzero().squeeze(-1)
    if dyn.affine or len(good) == B:
        f_val, vjp = dyn.lagrangian_terms(x[:, :-1], u, lam[:, 1:])
    else:
        f_g, vjp_g = dyn.lagrangian_terms(x[good, :-1], u[good], lam[good, 1:])
        f_val = f_g.new_zeros(B, T, n).index_put((good,), f_g)
        vjp = vjp_g.new_zeros(B, T, n + m).index_put((good,), vjp_g)
    y_tau = g_tau.expand(B, T, n + m) + vjp
    y_T = g_T.expand(B, n)

    def active(bound, mask):
        if bound is None:
            return x.new_zeros(B, T, m)
        return torch.where(mask, bound.expand(B, T, m), 0)

    return (y_tau, y_T, f_val, x0, active(lo, act_lo), active(hi, act_hi))
