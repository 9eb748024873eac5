"""Differentiable finite-horizon LQR: a batched Riccati recursion with an analytic backward.

The problem, for each batch row,

.. math::

    \\min_{\\tau} \\sum_{t=0}^{T-1} \\tfrac12 \\tau_t^\\top C_t \\tau_t + c_t^\\top \\tau_t
        + \\tfrac12 x_T^\\top C_f x_T + c_f^\\top x_T
    \\quad\\text{s.t.}\\quad x_{t+1} = F_t \\tau_t + f_t,\\quad x_0 = x_\\text{init},

with ``τ_t = [x_t; u_t]``, is solved exactly by dynamic programming. The work splits in two:

* a *factorization* that depends only on ``(C, F, C_f)``: the Riccati matrices ``V_t``, the
  feedback gains ``K_t`` and a Cholesky factor of each ``Q_uu``;
* an *affine solve* that takes the linear data ``(c, c_f, f, x_init)`` through the factors.

The backward pass is one more affine solve with the same factors (the adjoint of an LQR is an
LQR with the same quadratic part), so gradients cost about as much as a second forward pass.

Shapes: ``B`` batch, ``T`` horizon, ``n`` state, ``m`` control; everything batch first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffto.problem import LinearDynamics, QuadraticCost, Solution, problem_dims, sum_to_batch

__all__ = ["LQR", "solve_lqr", "solve_lqr_tensors"]


def _factor(C: Tensor, F: Tensor, C_f: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Riccati recursion on the quadratic part.

    Args:
        C: ``(B, T, n+m, n+m)`` symmetric stage costs.
        F: ``(B, T, n, n+m)`` dynamics.
        C_f: ``(B, n, n)`` terminal cost.
        m: control dimension.

    Returns:
        ``V (B, T+1, n, n)`` cost-to-go Hessians, ``K (B, T, m, n)`` gains,
        ``Q_uu_inv (B, T, m, m)``, ``ok (B,)`` True where every ``Q_uu`` was positive
        definite (elsewhere the other outputs are meaningless).
    """
    B = torch.broadcast_shapes(C.shape[:1], F.shape[:1], C_f.shape[:1])[0]
    T, n = C.shape[1], F.shape[2]
    # Views taken once: the loop below is dispatch-bound for the small matrices of control.
    C, F = C.expand(B, *C.shape[1:]), F.expand(B, *F.shape[1:])
    Cs, Fs, FTs = C.unbind(1), F.unbind(1), F.transpose(-1, -2).unbind(1)
    V_next = C_f.expand(B, n, n)
    Vs, Ks, Ls, infos = [V_next], [], [], []
    for t in range(T - 1, -1, -1):
        # Q_t = C_t + F_tᵀ V_{t+1} F_t, the Hessian of the stage-plus-cost-to-go in τ.
        Q = torch.baddbmm(Cs[t], FTs[t], torch.bmm(V_next, Fs[t]))
        # Q_uu⁻¹ from its Cholesky factor: the info flags rows where Q_uu is not PD, and for
        # the small m of control an explicit inverse makes every later solve one bmm.
        L, info = torch.linalg.cholesky_ex(Q[:, n:, n:])
        Q_uu_inv = torch.cholesky_inverse(L)  # (B, m, m)
        G = Q_uu_inv @ Q[:, n:, :n]  # −K_t, (B, m, n)
        # V_t = Q_xx + Q_xu K_t (= Q_xx − Q_xu Q_uu⁻¹ Q_ux).
        V_next = torch.baddbmm(Q[:, :n, :n], Q[:, :n, n:], G, alpha=-1)
        # Kept symmetric: over long horizons with unstable dynamics the round-off asymmetry
        # otherwise grows until V diverges.
        V_next = (V_next + V_next.transpose(-1, -2)).mul_(0.5)
        Vs.append(V_next)
        Ks.append(G)
        Ls.append(Q_uu_inv)
        infos.append(info)
    ok = (torch.stack(infos, 0) == 0).all(0)
    K = torch.stack(Ks[::-1], 1).neg_()
    return torch.stack(Vs[::-1], 1), K, torch.stack(Ls[::-1], 1), ok


def _affine_solve(
    V: Tensor,
    K: Tensor,
    Q_uu_inv: Tensor,
    F: Tensor,
    c: Tensor,
    c_f: Tensor,
    f: Tensor | None,
    x0: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Propagate the linear data through the factors.

    Backward: ``q_t = c_t + F_tᵀ(V_{t+1} f_t + v_{t+1})``, ``k_t = −Q_uu⁻¹ q_u``,
    ``v_t = q_x + K_tᵀ q_u`` (since ``Q_xu k_t = K_tᵀ q_u``), with ``v_T = c_f``.
    Forward: ``u_t = K_t x_t + k_t``, ``x_{t+1} = F_t [x_t; u_t] + f_t``.
    Costates ``λ_t = V_t x_t + v_t``: the multipliers of ``x_{t+1} = F_t τ_t + f_t``
    (``λ_0`` that of ``x_0 = x_init``), i.e. the gradient of the optimal cost-to-go.

    Shapes: ``c (B, T, n+m)``, ``c_f (B, n)``, ``f (B, T, n)`` or ``None`` for zero,
    ``x0 (B, n)``; returns ``x (B, T+1, n)``, ``u (B, T, m)``, ``λ (B, T+1, n)``.
    """
    B = x0.shape[0]
    T, n = F.shape[1], F.shape[2]
    # Batched products do not broadcast: give every factor and datum the batch of x0 (views),
    # and take per-stage views once: these loops are bound by dispatch, not arithmetic.
    V, K, Q_uu_inv, F = (t.expand(B, *t.shape[1:]) for t in (V, K, Q_uu_inv, F))
    Vs, Ks, KTs = V.unbind(1), K.unbind(1), K.transpose(-1, -2).unbind(1)
    neg_inv = Q_uu_inv.neg().unbind(1)
    FTs, Fxs, Fus = F.transpose(-1, -2).unbind(1), F[..., :n].unbind(1), F[..., n:].unbind(1)
    cs = c.expand(B, *c.shape[1:]).unsqueeze(-1).unbind(1)  # column vectors
    fs = None if f is None else f.expand(B, *f.shape[1:]).unsqueeze(-1).unbind(1)
    v_next = c_f.expand(B, n).unsqueeze(-1)
    vs, ks = [v_next], []
    for t in range(T - 1, -1, -1):
        w = v_next if fs is None else torch.baddbmm(v_next, Vs[t + 1], fs[t])
        q = torch.baddbmm(cs[t], FTs[t], w)
        ks.append(neg_inv[t] @ q[:, n:])  # (B, m, 1)
        v_next = torch.baddbmm(q[:, :n], KTs[t], q[:, n:])
        vs.append(v_next)
    v = torch.stack(vs[::-1], 1).squeeze(-1)  # (B, T+1, n)
    ks = ks[::-1]

    x = x0.unsqueeze(-1)
    xs, us = [x], []
    for t in range(T):
        u = torch.baddbmm(ks[t], Ks[t], x)
        x_next = Fxs[t] @ x if fs is None else torch.baddbmm(fs[t], Fxs[t], x)
        x = torch.baddbmm(x_next, Fus[t], u)
        xs.append(x)
        us.append(u)
    x_all = torch.stack(xs, 1).squeeze(-1)
    lam = (V @ x_all.unsqueeze(-1)).squeeze(-1) + v
    return x_all, torch.stack(us, 1).squeeze(-1), lam


def _lqr_data(x0: Tensor, cost: QuadraticCost, dynamics: LinearDynamics):
    """Check a problem and return its tensors, each with an explicit batch dim, zeros
    in place of omitted terms."""
    if not isinstance(dynamics, LinearDynamics):
        raise ValueError(f"dynamics must be a LinearDynamics, got {type(dynamics).__name__}")
    n = dynamics.n_state
    B, T, n, m = problem_dims(x0, cost, n)
    if dynamics.n_ctrl != m:
        raise ValueError(
            f"dynamics.F has m={dynamics.n_ctrl} controls but cost.C implies m={m} (n={n})"
        )
    if dynamics.horizon != T:
        raise ValueError(f"dynamics.F has horizon {dynamics.horizon} but cost.C has {T}")
    cost.check_control_pd(n, m)
    x0 = x0.unsqueeze(0) if x0.dim() == 1 else x0
    C, c, C_f, c_f = cost.batched(n, m)
    F, f = dynamics.batched()
    if F.shape[0] not in (1, B):
        raise ValueError(f"dynamics.F has batch {F.shape[0]} but x0 has batch {B}")
    zeros = x0.new_zeros
    c = zeros(1, T, n + m) if c is None else c
    C_f = zeros(1, n, n) if C_f is None else C_f
    c_f = zeros(1, n) if c_f is None else c_f
    return x0, C, c, C_f, c_f, F, f  # f stays None when omitted: the solve skips it


def solve_lqr_tensors(
    x0: Tensor,
    C: Tensor,
    c: Tensor | None,
    C_final: Tensor | None,
    c_final: Tensor | None,
    F: Tensor,
    f: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve an LQR from raw tensors with plain autograd (no custom backward, no checks).

    For use inside other solvers' backward passes. Every tensor has an explicit batch dim
    that broadcasts against ``x0 (B, n)``: ``C (B, T, n+m, n+m)`` symmetric, ``c (B, T, n+m)``,
    ``C_final (B, n, n)``, ``c_final (B, n)``, ``F (B, T, n, n+m)``, ``f (B, T, n)``; ``None``
    means zero. Returns ``x (B, T+1, n)``, ``u (B, T, m)``, costates ``λ (B, T+1, n)``.
    """
    B, n = x0.shape
    T, m = F.shape[1], F.shape[-1] - F.shape[-2]
    C_final = x0.new_zeros(1, n, n) if C_final is None else C_final
    c = x0.new_zeros(1, T, n + m) if c is None else c
    c_final = x0.new_zeros(1, n) if c_final is None else c_final
    V, K, Q_uu_inv, _ = _factor(C, F, C_final, m)
    return _affine_solve(V, K, Q_uu_inv, F, c, c_final, f, x0)


class _LQRFunction(torch.autograd.Function):
    @staticmethod
    def forward(x0, C, c, C_f, c_f, F, f):
        m = F.shape[-1] - F.shape[-2]
        V, K, Q_uu_inv, ok = _factor(C, F, C_f, m)
        x, u, lam = _affine_solve(V, K, Q_uu_inv, F, c, c_f, f, x0)
        return x, u, lam, K, V, Q_uu_inv, ok

    @staticmethod
    def setup_context(ctx, inputs, output):
        x0, C, c, C_f, c_f, F, f = inputs
        x, u, lam, K, V, Q_uu_inv, ok = output
        ctx.save_for_backward(x0, C, c, C_f, c_f, F, f, x, u, lam, K, V, Q_uu_inv)
        ctx.mark_non_differentiable(lam, K, V, Q_uu_inv, ok)

    # Backward. Stack the primal-dual unknowns z = (τ_0..τ_{T-1}, x_T, λ_0..λ_T). The KKT
    # conditions of the LQR are linear, r(z) = M z + b = 0, with M symmetric (built from C,
    # C_f and F) and b = (c_t, c_f, x_init, f_t):
    #     C_t τ_t + c_t + F_tᵀ λ_{t+1} − [λ_t; 0] = 0,     C_f x_T + c_f − λ_T = 0,
    #     F_t τ_t + f_t − x_{t+1} = 0,                   x_init − x_0 = 0.
    # Implicit differentiation gives dℓ/dθ = dᵀ ∂r/∂θ with d = −M⁻¹ ∇_z ℓ. Because ∇_z ℓ is
    # nonzero only in its τ and x_T blocks, d is the solution of the *same* LQR with linear
    # terms c ← ∂ℓ/∂τ_t, c_f ← ∂ℓ/∂x_T and f = 0, x_init = 0: one more affine solve through
    # the saved factors. Reading off ∂r/∂θ block by block:
    #     ∂ℓ/∂c_t = d_τt            ∂ℓ/∂C_t = ½(d_τt τ_tᵀ + τ_t d_τtᵀ)
    #     ∂ℓ/∂c_f = d_xT            ∂ℓ/∂C_f = ½(d_xT x_Tᵀ + x_T d_xTᵀ)
    #     ∂ℓ/∂f_t = d_λ(t+1)        ∂ℓ/∂F_t = d_λ(t+1) τ_tᵀ + λ_{t+1} d_τtᵀ
    #     ∂ℓ/∂x_init = d_λ0
    # (C enters only through its symmetric part, hence the symmetrized outer products.)
    @staticmethod
    def backward(ctx, grad_x, grad_u, *_):
        x0, C, c, C_f, c_f, F, f, x, u, lam, K, V, Q_uu_inv = ctx.saved_tensors
        grad_x = torch.zeros_like(x) if grad_x is None else grad_x
        grad_u = torch.zeros_like(u) if grad_u is None else grad_u
        g_tau = torch.cat([grad_x[:, :-1], grad_u], -1)  # (B, T, n+m)
        d_x, d_u, d_lam = _affine_solve(
            V, K, Q_uu_inv, F, g_tau, grad_x[:, -1], None, torch.zeros_like(x0)
        )
        tau = torch.cat([x[:, :-1], u], -1)  # (B, T, n+m)
        d_tau = torch.cat([d_x[:, :-1], d_u], -1)
        need = ctx.needs_input_grad

        def sym(outer: Tensor) -> Tensor:
            return 0.5 * (outer + outer.transpose(-1, -2))

        grads = [d_lam[:, 0] if need[0] else None, None, None, None, None, None, None]
        if need[1]:
            grads[1] = sum_to_batch(sym(d_tau.unsqueeze(-1) * tau.unsqueeze(-2)), C)
        if need[2]:
            grads[2] = sum_to_batch(d_tau, c)
        if need[3]:
            grads[3] = sum_to_batch(sym(d_x[:, -1].unsqueeze(-1) * x[:, -1].unsqueeze(-2)), C_f)
        if need[4]:
            grads[4] = sum_to_batch(d_x[:, -1], c_f)
        if need[5]:
            grads[5] = sum_to_batch(
                d_lam[:, 1:].unsqueeze(-1) * tau.unsqueeze(-2)
                + lam[:, 1:].unsqueeze(-1) * d_tau.unsqueeze(-2),
                F,
            )
        if need[6]:
            grads[6] = sum_to_batch(d_lam[:, 1:], f)
        return tuple(grads)


def solve_lqr(x0: Tensor, cost: QuadraticCost, dynamics: LinearDynamics) -> Solution:
    """Solve a batch of LQR problems; differentiable w.r.t. every tensor input.

    Args:
        x0: ``(B, n)`` initial states.
        cost: stage ``C (B, T, n+m, n+m)``, ``c (B, T, n+m)``, terminal ``C_final (B, n, n)``,
            ``c_final (B, n)``; leading batch dims may be omitted.
        dynamics: ``F (B, T, n, n+m)``, ``f (B, T, n)``.

    Returns:
        :class:`~diffto.Solution` with ``x (B, T+1, n)``, ``u (B, T, m)``, ``cost (B,)``,
        ``converged (B,)`` (False where a ``Q_uu`` was not positive definite, which happens
        when the state cost is indefinite), ``iterations`` all ones, and extras ``K``
        (``(B, T, m, n)`` feedback gains), ``V`` (``(B, T+1, n, n)`` cost-to-go Hessians) and
        ``lam`` (``(B, T+1, n)`` costates). The extras carry no gradient.

    Raises:
        ValueError: NaN/Inf input, mismatched shapes or horizons, or a stage cost whose
            control block ``C[..., n:, n:]`` is not positive definite.
    """
    x0, C, c, C_f, c_f, F, f = _lqr_data(x0, cost, dynamics)
    x, u, lam, K, V, _, ok = _LQRFunction.apply(x0, C, c, C_f, c_f, F, f)
    return Solution(
        x=x,
        u=u,
        cost=cost.evaluate(x, u),
        converged=ok,
        iterations=torch.ones_like(ok, dtype=torch.long),
        extras={"K": K, "V": V, "lam": lam},
    )


class LQR(nn.Module):
    r"""Finite-horizon, time-varying LQR as a layer.

    .. math::

        \min_{\tau} \sum_{t=0}^{T-1} \tfrac12 \tau_t^\top C_t \tau_t + c_t^\top \tau_t
            + \tfrac12 x_T^\top C_f x_T + c_f^\top x_T
        \quad\text{s.t.}\quad x_{t+1} = F_t \tau_t + f_t,\; x_0 = x_\text{init},
        \quad \tau_t = [x_t; u_t].

    ``LQR()(x0, cost, dynamics) -> Solution``. The solve is exact (one Riccati sweep); the
    backward pass is one more sweep through the same factorization, giving gradients w.r.t.
    ``x0``, ``C``, ``c``, ``C_final``, ``c_final``, ``F`` and ``f``. Works in float32 and
    float64, on any device. See :func:`solve_lqr` for shapes.

    Example::

        >>> import torch
        >>> from diffto import LinearDynamics, QuadraticCost
        >>> from diffto.layers import LQR
        >>> A = torch.tensor([[1.0, 0.1], [0.0, 1.0]])  # double integrator, dt = 0.1
        >>> dyn = LinearDynamics.time_invariant(A, torch.tensor([[0.0], [0.1]]), horizon=10)
        >>> cost = QuadraticCost.tracking(torch.ones(2), 0.1 * torch.ones(1), horizon=10)
        >>> LQR()(torch.randn(4, 2), cost, dyn).u.shape
        torch.Size([4, 10, 1])
    """

    def forward(self, x0: Tensor, cost: QuadraticCost, dynamics: LinearDynamics) -> Solution:
        return solve_lqr(x0, cost, dynamics)
