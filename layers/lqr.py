"""Differentiable finite-horizon LQR: a batched Riccati recursion with an analytic backward.

The problem, for each batch row,

.. math::

    \\min_{\\tau} \\sum_{t=0}^{T-1} \\tfrac12 \\tau_t^\\top C_t \\tau_t + c_t^\\top \\tau_t
        + \\tfrac12 x_T^\\top C_f x_T + c_f^\\top x_T
    \\quad\\text{s.t.}\\quad x_{t+1} = F_t \\tau_t + f_t,\\quad x_0 = x_\\text{init},

with ``τ_t = [x_t; u_t]``, is solved exactly by dynamic programming. The work splits in two:

* a *factorization* that depends only on ``(C, F, C_f)``: the Riccati matrices ``V_t``, the
  feedback gains ``K_t`` and each stage's ``Q_uu``;
* an *affine sweep* that takes the linear data ``(c, c_f, f, x_init)`` through the factors.

Both come from the LQ engine (:mod:`diffto.layers._lq_engine`), shared with the active-set and
box-DDP solvers of :class:`~diffto.layers.MPC`. The backward pass is one more sweep through the
same factors (the adjoint of an LQR is an LQR with the same quadratic part), so gradients cost
about as much as a second forward pass.

Shapes: ``B`` batch, ``T`` horizon, ``n`` state, ``m`` control; everything batch first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffto.layers import _lq_engine as lq
from diffto.problem import (
    LinearDynamics,
    QuadraticCost,
    Solution,
    check_like,
    check_not_vmapped,
    problem_dims,
    sum_to_batch,
)

__all__ = ["LQR", "solve_lqr", "solve_lqr_tensors"]


def _lqr_data(x0: Tensor, cost: QuadraticCost, dynamics: LinearDynamics):
    """Check a problem and return its tensors, each expanded to the batch of ``x0`` (views), zeros
    in place of omitted cost terms; ``f`` stays ``None`` when omitted (the sweep skips it)."""
    if not isinstance(dynamics, LinearDynamics):
        raise ValueError(f"dynamics must be a LinearDynamics, got {type(dynamics).__name__}")
    if isinstance(x0, Tensor) and not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating-point tensor, got dtype {x0.dtype}")
    n = dynamics.n_state
    B, T, n, m = problem_dims(x0, cost, n)
    if dynamics.n_ctrl != m:
        raise ValueError(
            f"dynamics.F has m={dynamics.n_ctrl} controls but cost.C implies m={m} (n={n})"
        )
    if dynamics.horizon != T:
        raise ValueError(f"dynamics.F has horizon {dynamics.horizon} but cost.C has {T}")
    check_like(x0, {"cost.C": cost.C, "cost.c": cost.c, "cost.C_final": cost.C_final,
                     "cost.c_final": cost.c_final, "dynamics.F": dynamics.F,
                     "dynamics.f": dynamics.f})
    cost.check_control_pd(n, m)
    x0 = x0.unsqueeze(0) if x0.dim() == 1 else x0
    C, c, C_f, c_f = cost.expanded(B, n, m)
    F, f = dynamics.batched()
    for name, t in (("dynamics.F", F), ("dynamics.f", f)):
        if t is not None and t.shape[0] not in (1, B):
            raise ValueError(f"{name} has batch {t.shape[0]} but x0 has batch {B}")
    return x0, C, c, C_f, c_f, F, f


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
    fac = lq.factor(C, F, C_final)
    return lq.affine_sweep(fac, F, c, c_final, f, x0)[:3]


class _LQRFunction(torch.autograd.Function):
    @staticmethod
    def forward(x0, C, c, C_f, c_f, F, f):
        fac = lq.factor(C, F, C_f)
        x, u, lam, k = lq.affine_sweep(fac, F, c, c_f, f, x0)
        return x, u, lam, fac.K, k, fac.V, fac.Q_uu, fac.ok

    @staticmethod
    def setup_context(ctx, inputs, output):
        x0, C, c, C_f, c_f, F, f = inputs
        x, u, lam, K, k, V, Q_uu, ok = output
        ctx.save_for_backward(x0, C, c, C_f, c_f, F, f, x, u, lam, K, V, Q_uu, ok)
        ctx.mark_non_differentiable(lam, K, k, V, Q_uu, ok)

    # Backward. Stack the primal-dual unknowns z = (τ_0..τ_{T-1}, x_T, λ_0..λ_T). The KKT
    # conditions of the LQR are linear, r(z) = M z + b = 0, with M symmetric (built from C,
    # C_f and F) and b = (c_t, c_f, x_init, f_t):
    #     C_t τ_t + c_t + F_tᵀ λ_{t+1} − [λ_t; 0] = 0,     C_f x_T + c_f − λ_T = 0,
    #     F_t τ_t + f_t − x_{t+1} = 0,                   x_init − x_0 = 0.
    # Implicit differentiation gives dℓ/dθ = dᵀ ∂r/∂θ with d = −M⁻¹ ∇_z ℓ. Because ∇_z ℓ is
    # nonzero only in its τ and x_T blocks, d is the solution of the *same* LQR with linear
    # terms c ← ∂ℓ/∂τ_t, c_f ← ∂ℓ/∂x_T and f = 0, x_init = 0: the engine's adjoint sweep
    # through the saved factorization. Reading off ∂r/∂θ block by block:
    #     ∂ℓ/∂c_t = d_τt            ∂ℓ/∂C_t = ½(d_τt τ_tᵀ + τ_t d_τtᵀ)
    #     ∂ℓ/∂c_f = d_xT            ∂ℓ/∂C_f = ½(d_xT x_Tᵀ + x_T d_xTᵀ)
    #     ∂ℓ/∂f_t = d_λ(t+1)        ∂ℓ/∂F_t = d_λ(t+1) τ_tᵀ + λ_{t+1} d_τtᵀ
    #     ∂ℓ/∂x_init = d_λ0
    # (C enters only through its symmetric part, hence the symmetrized outer products.)
    @staticmethod
    def backward(ctx, grad_x, grad_u, *_):
        x0, C, c, C_f, c_f, F, f, x, u, lam, K, V, Q_uu, ok = ctx.saved_tensors
        grad_x = torch.zeros_like(x) if grad_x is None else grad_x
        grad_u = torch.zeros_like(u) if grad_u is None else grad_u
        g_tau = torch.cat([grad_x[:, :-1], grad_u], -1)  # (B, T, n+m)
        fac = lq.Factorization(V, K, Q_uu, ok, None)
        d_x, d_u, d_lam = lq.adjoint_sweep(fac, F, g_tau, grad_x[:, -1])
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
        x0: ``(B, n)`` initial states (or ``(n,)``), floating point.
        cost: stage ``C (B, T, n+m, n+m)``, ``c (B, T, n+m)``, terminal ``C_final (B, n, n)``,
            ``c_final (B, n)``; leading batch dims may be omitted.
        dynamics: ``F (B, T, n, n+m)``, ``f (B, T, n)``; leading batch dims may be omitted.

    Returns:
        :class:`~diffto.Solution` with ``x (B, T+1, n)``, ``u (B, T, m)``, ``cost (B,)``,
        ``converged (B,)`` (False where a ``Q_uu`` was not positive definite, which happens
        when the state cost is indefinite), ``iterations`` all ones, and extras ``costates``
        ``(B, T+1, n)`` (the multipliers λ of the dynamics, ``λ_0 = ∂cost*/∂x0``), ``gains``
        ``(B, T, m, n)`` and ``feedforward`` ``(B, T, m)`` (the optimal policy
        ``u_t = K_t x_t + k_t``) and ``value`` ``(B, T+1, n, n)`` (the cost-to-go Hessians
        ``V_t``). The extras carry no gradient.

    Raises:
        ValueError: NaN/Inf input, mismatched shapes, batches or horizons, an integer ``x0``,
            a tensor whose dtype or device differs from ``x0``'s, or a stage cost whose
            control block ``C[..., n:, n:]`` is not positive definite.
    """
    x0, C, c, C_f, c_f, F, f = _lqr_data(x0, cost, dynamics)
    x, u, lam, K, k, V, _, ok = _LQRFunction.apply(x0, C, c, C_f, c_f, F, f)
    return Solution(
        x=x,
        u=u,
        cost=cost.evaluate(x, u),
        converged=ok,
        iterations=torch.ones_like(ok, dtype=torch.long),
        extras={"costates": lam, "gains": K, "feedforward": k, "value": V},
    )


class LQR(nn.Module):
    r"""Finite-horizon, time-varying LQR as a layer.

    .. math::

        \min_{\tau} \sum_{t=0}^{T-1} \tfrac12 \tau_t^\top C_t \tau_t + c_t^\top \tau_t
            + \tfrac12 x_T^\top C_f x_T + c_f^\top x_T
        \quad\text{s.t.}\quad x_{t+1} = F_t \tau_t + f_t,\; x_0 = x_\text{init},
        \quad \tau_t = [x_t; u_t].

    ``LQR(dynamics=None)(x0, cost, dynamics=None, u_init=None) -> Solution``, the call of
    every solver layer: the dynamics are fixed at construction or passed per call (the call's
    win). The solve is exact (one Riccati sweep), so ``u_init`` is accepted and ignored. The
    backward pass is one more sweep through the same factorization, giving gradients w.r.t.
    ``x0``, ``C``, ``c``, ``C_final``, ``c_final``, ``F`` and ``f``. Works in float32 and
    float64, on any device. See :func:`solve_lqr` for shapes and extras.

    Args:
        dynamics: the :class:`~diffto.LinearDynamics` used when a call passes none.

    Example::

        >>> import torch
        >>> from diffto import LinearDynamics, QuadraticCost
        >>> from diffto.layers import LQR
        >>> A = torch.tensor([[1.0, 0.1], [0.0, 1.0]])  # double integrator, dt = 0.1
        >>> dyn = LinearDynamics.time_invariant(A, torch.tensor([[0.0], [0.1]]), horizon=10)
        >>> cost = QuadraticCost.tracking(torch.ones(2), 0.1 * torch.ones(1), horizon=10)
        >>> LQR(dyn)(torch.randn(4, 2), cost).u.shape
        torch.Size([4, 10, 1])
    """

    def __init__(self, dynamics: LinearDynamics | None = None) -> None:
        super().__init__()
        if dynamics is not None and not isinstance(dynamics, LinearDynamics):
            raise ValueError(f"dynamics must be a LinearDynamics, got {type(dynamics).__name__}")
        self.dynamics = dynamics

    def forward(
        self,
        x0: Tensor,
        cost: QuadraticCost,
        dynamics: LinearDynamics | None = None,
        u_init: Tensor | None = None,
    ) -> Solution:
        """Solve the batch; ``u_init`` is ignored (the solve is exact, nothing to warm-start)."""
        if isinstance(x0, Tensor):
            check_not_vmapped("LQR", x0)
        dynamics = self.dynamics if dynamics is None else dynamics
        if dynamics is None:
            raise ValueError(
                "dynamics must be given, at construction (LQR(dynamics)) or per call "
                "(layer(x0, cost, dynamics))"
            )
        return solve_lqr(x0, cost, dynamics)
