"""Nonlinear MPC as a differentiable layer: box-constrained forward solve, exact implicit backward.

Two forward solvers share one interface. For a :class:`~diffto.LinearDynamics` with a convex
cost the problem is a box-constrained convex QP, solved exactly by a primal-dual active-set
method whose every iteration is one batched LQR sweep (:mod:`diffto.layers._active_set`,
typically 3–10 sweeps); the backward pass then reuses its last factorization. Any other
dynamics (an ``nn.Module``), a nonconvex row, a row the active-set method did not settle (out
of budget or cycling), and ``backward="unroll"`` go to box-DDP
(:mod:`diffto.layers._box_ddp`): iLQR whose backward pass solves each stage's box-constrained QP
in the control, with a line search on the true cost per row. The backward pass differentiates
the KKT conditions of the nonlinear program at the returned plan, which is one more
(equality-constrained) LQ solve with the same Riccati machinery; its Hessian carries the dynamics
curvature, so the gradient is the exact derivative of the solution map, not a Gauss-Newton
approximation. By default box-DDP uses that same Hessian (Newton steps, quadratic local
convergence); ``hessian="gauss_newton"`` gives classic iLQR, and ``backward="unroll"``
differentiates through the iterations instead.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from diffto.layers._active_set import (
    _Homogeneous,
    _reduced_gradient,
    adjoint_sweep,
    solve_box_lq,
)
from diffto.layers._box_ddp import _bmv, _Dynamics, _solve
from diffto.problem import (
    LinearDynamics,
    QuadraticCost,
    Solution,
    check_bounds,
    check_finite,
    problem_dims,
)

__all__ = ["MPC"]

BackwardMode = Literal["implicit", "unroll"]
HessianMode = Literal["exact", "gauss_newton"]
_ACTIVE_SET_ITERS = 40  # active-set sweeps before a row is handed to box-DDP


class _Spec:
    """The static part of one MPC call, handed to the autograd Function."""

    def __init__(self, module, names, B, T, n, m, max_iter, tol, exact, active_set=False):
        self.module, self.names = module, names
        self.B, self.T, self.n, self.m = B, T, n, m
        self.max_iter, self.tol, self.exact = max_iter, tol, exact
        self.active_set = active_set  # linear dynamics: try the active-set LQ solver first

    def expand(self, C, c, C_f, c_f, lo, hi, F, f):
        """Batch-expanded, symmetrized views of the problem tensors (``None`` -> zeros/±inf)."""
        B, T, n, m = self.B, self.T, self.n, self.m
        k = n + m
        like = C
        C = (0.5 * (C + C.transpose(-1, -2))).expand(B, T, k, k)
        c = like.new_zeros(B, T, k) if c is None else c.expand(B, T, k)
        C_f = like.new_zeros(B, n, n) if C_f is None else (
            0.5 * (C_f + C_f.transpose(-1, -2))).expand(B, n, n)
        c_f = like.new_zeros(B, n) if c_f is None else c_f.expand(B, n)
        inf = torch.full((B, T, m), float("inf"), dtype=like.dtype, device=like.device)
        lo = -inf if lo is None else lo.expand(B, T, m)
        hi = inf if hi is None else hi.expand(B, T, m)
        if F is not None:
            F = F.expand(B, T, n, k)
            f = None if f is None else f.expand(B, T, n)
        return C, c, C_f, c_f, lo, hi, F, f

    def dynamics(self, F, f, params) -> _Dynamics:
        if F is not None:
            return _Dynamics(self.n, self.m, F=F, f=f)
        pdict = dict(zip(self.names, params, strict=True))
        return _Dynamics(
            self.n, self.m, fn=lambda x, u: functional_call(self.module, pdict, (x, u))
        )


def _solve_linear(spec, dyn, x0, C, c, C_f, c_f, lo, hi, F, f, u_init) -> dict:
    """Active-set LQ solve of a batch with affine dynamics; rows it leaves unsettled (nonconvex,
    or not converged within :data:`_ACTIVE_SET_ITERS` sweeps) are re-solved by box-DDP from the
    clamped last iterate, with the remaining iteration budget. Batch-expanded tensors in,
    the dict of :func:`~diffto.layers._box_ddp._solve` out."""
    f = x0.new_zeros(F.shape[:-1]) if f is None else f
    out = solve_box_lq(x0, C, c, C_f, c_f, F, f, lo, hi, u_init,
                       min(spec.max_iter, _ACTIVE_SET_ITERS), spec.tol)
    out["regularization"] = x0.new_zeros(spec.B)
    out["stalled"] = torch.zeros_like(out["converged"])
    redo = (~out["converged"]).nonzero().squeeze(-1)
    out["factored"] = len(redo) == 0  # the adjoint solve may reuse the last factorization
    if len(redo) == 0:
        return out
    budget = spec.max_iter - out["iterations"][redo]
    # Rows that never took an active-set step (nonconvex) restart from their own warm start.
    start = torch.where(out["convex"][redo].view(-1, 1, 1), out["u"][redo], u_init[redo])
    sub = _solve(_Dynamics(spec.n, spec.m, F=F[redo], f=f[redo]), x0[redo], C[redo], c[redo],
                 C_f[redo], c_f[redo], lo[redo], hi[redo], start, int(budget.min()), spec.tol,
                 spec.exact)
    for key, value in sub.items():
        if key in out:
            merged = out[key].clone()
            merged[redo] = value + out[key][redo] if key == "iterations" else value
            out[key] = merged
    return out


class _MPCFunction(torch.autograd.Function):
    """Inputs ``(spec, x0, C, c, C_f, c_f, u_lower, u_upper, F, f, u_init, *params)``;
    outputs ``(x, u, costates, gains, feedforward, at_lower, at_upper, converged,
    iterations, regularization, stalled, value, Q_uu)`` of which only ``x`` and ``u`` are
    differentiable; ``value (B, T+1, n, n)`` and ``Q_uu (B, T, m, m)`` are the last Riccati
    factorization when the active-set solver settled every row (for the backward pass to
    reuse), empty otherwise."""

    @staticmethod
    def forward(spec, x0, C, c, C_f, c_f, lo, hi, F, f, u_init, *params):
        C, c, C_f, c_f, lo, hi, F, f = spec.expand(C, c, C_f, c_f, lo, hi, F, f)
        dyn = spec.dynamics(F, f, params)
        if spec.active_set:
            out = _solve_linear(spec, dyn, x0, C, c, C_f, c_f, lo, hi, F, f, u_init)
        else:
            out = _solve(dyn, x0, C, c, C_f, c_f, lo, hi, u_init, spec.max_iter, spec.tol,
                         spec.exact)
        if not out.get("factored", False):  # nothing to reuse in the backward pass
            out["value"] = out["Q_uu"] = x0.new_zeros(0)
        return (out["x"], out["u"], out["costates"], out["gains"], out["feedforward"],
                out["at_lower"], out["at_upper"], out["converged"], out["iterations"],
                out["regularization"], out["stalled"], out["value"], out["Q_uu"])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.spec = inputs[0]
        x, u, lam, *rest = output
        K, _, at_lower, at_upper, _, _, _, _, value, Q_uu = rest
        ctx.save_for_backward(*inputs[1:], x, u, lam, at_lower, at_upper, K, value, Q_uu)
        ctx.mark_non_differentiable(lam, *rest)

    # Implicit differentiation of the NLP at the returned plan.
    #
    # Lagrangian (λ_0 is the multiplier of x_0 = x0, λ_{t+1} that of the dynamics, ν_t those of
    # the bounds active at the solution, set 𝒜; ℓ_t the stage cost, ℓ_T the terminal one):
    #   ℒ = Σ_t ℓ_t(τ_t) + ℓ_T(x_T) + Σ_t λ_{t+1}ᵀ(f(τ_t; θ) − x_{t+1}) + λ_0ᵀ(x0 − x_0)
    #       + Σ_{(t,j)∈𝒜} ν_tj (u_tj − b_tj).
    # KKT residual r(z, θ) = 0 with z = (τ, λ, ν):
    #   ∂ℒ/∂x_t = ℓ_x + A_tᵀλ_{t+1} − λ_t,   ∂ℒ/∂u_t = ℓ_u + B_tᵀλ_{t+1} + ν_t,
    #   ∂ℒ/∂x_T = ∇ℓ_T − λ_T,   f(τ_t) − x_{t+1},   x0 − x_0,   u_𝒜 − b_𝒜.
    # With strict complementarity 𝒜 is locally constant, so z*(θ) is smooth and
    # dz*/dθ = −K⁻¹ ∂r/∂θ with K = ∂r/∂z, the (symmetric) KKT matrix. For a loss with gradient
    # g = (g_x, g_u) at (x*, u*) the vector-Jacobian product is
    #   dL/dθ = ẑᵀ ∂r/∂θ,   K ẑ = −g.
    # K ẑ = −g is the KKT system of the equality-constrained LQ problem
    #   min Σ_t ½ τ̂_tᵀ H_t τ̂_t + g_tᵀτ̂_t + ½ x̂_TᵀC_f x̂_T + g_Tᵀx̂_T
    #   s.t. x̂_{t+1} = J_t τ̂_t,  x̂_0 = 0,  û_𝒜 = 0,
    # with H_t = C_t + Σ_i λ*_{t+1,i} ∇²_ττ f_i(τ*_t) (the Hessian of ℒ: the dynamics curvature is
    # what makes this the exact derivative, not Gauss-Newton) and J_t = ∂f/∂τ at τ*_t. Its
    # solution (x̂, û) and costates λ̂ come from the same Riccati sweep as the forward pass, with
    # the active set fixed. Reading off ẑᵀ ∂r/∂θ term by term:
    #   x0:      λ̂_0
    #   b_tj:    −ν̂_tj = [H_t τ̂_t + g_t]_u,j + [B_tᵀλ̂_{t+1}]_j  on 𝒜 (0 elsewhere)
    #   C, c, C_f, c_f, F, f, module parameters p: ∇_θ S with τ*, λ*, τ̂, λ̂ held fixed,
    #     S = Σ_t τ̂_tᵀ(C_t τ*_t + c_t) + x̂_Tᵀ(C_f x*_T + c_f)
    #         + Σ_t λ*_{t+1}ᵀ ∂_τ f(τ*_t; θ) τ̂_t + Σ_t λ̂_{t+1}ᵀ f(τ*_t; θ),
    # i.e. the directional derivative of ∇_τℒ along τ̂ plus the dual residual along λ̂;
    # autograd evaluates ∇_θ S (a double backward through f for the mixed second derivative).
    @staticmethod
    def backward(ctx, g_x, g_u, *_):
        spec = ctx.spec
        x0, C, c, C_f, c_f, lo_in, hi_in, F, f, u_init, *rest = ctx.saved_tensors
        n_p = len(spec.names)
        params, (x, u, lam, at_lower, at_upper, K, value, Q_uu) = rest[:n_p], rest[n_p:]
        needs = ctx.needs_input_grad[1:]  # aligned with (x0, C, c, C_f, c_f, lo, hi, F, f, ...)
        n, m = spec.n, spec.m
        Cb, _, C_fb, _, _, _, Fb, fb = spec.expand(C, c, C_f, c_f, lo_in, hi_in, F, f)
        dyn = spec.dynamics(Fb, fb, [p.detach() for p in params])
        rows = torch.arange(spec.B, device=x.device)
        Jac = dyn.jacobian(x[:, :-1], u, rows)  # (B, T, n, k)
        curv = dyn.curvature(x[:, :-1], u, lam[:, 1:])
        H = Cb if curv is None else Cb + curv
        g = torch.cat([g_x[:, :-1], g_u], -1)  # (B, T, k)
        fixed = at_lower | at_upper
        if value.numel():
            # Linear dynamics, every row settled by the active-set solver: the adjoint LQ
            # problem has that solve's Hessians, dynamics and active set, so its Riccati
            # factorization is reused and only the vector recursion runs.
            xh, uh, lam_h = adjoint_sweep(Jac, K, value, Q_uu, fixed, g, g_x[:, -1])
        else:
            # The adjoint LQ problem: one Riccati sweep with the active controls held at zero.
            adjoint = _Homogeneous(H, g, C_fb, g_x[:, -1], Jac, x.new_zeros(spec.B, spec.T, n))
            xh, uh, lam_h, *_ = adjoint.solve(x.new_zeros(spec.B, n), fixed)  # λ̂ (B, T+1, n)
        tau_h = torch.cat([xh[:, :-1], uh], -1)  # (B, T, k)
        r_u = _reduced_gradient(H, g, Jac, xh, uh, lam_h)  # (B, T, m): −ν̂ on the active set

        grads: list[Tensor | None] = [None] * (10 + n_p)
        grads[0] = lam_h[:, 0] if needs[0] else None
        if needs[5]:
            grads[5] = torch.where(at_lower, r_u, 0).sum_to_size(lo_in.shape)
        if needs[6]:
            grads[6] = torch.where(at_upper, r_u, 0).sum_to_size(hi_in.shape)
        slots = {1: C, 2: c, 3: C_f, 4: c_f, 7: F, 8: f}
        slots.update({10 + i: p for i, p in enumerate(params)})
        want = [i for i, t in slots.items() if t is not None and needs[i]]
        if not want:
            return (None, *grads)
        with torch.enable_grad():
            leaf = {i: t.detach().requires_grad_(i in want) for i, t in slots.items()
                    if t is not None}
            tau_s = torch.cat([x[:, :-1], u], -1)
            Cs = 0.5 * (leaf[1] + leaf[1].transpose(-1, -2))
            grad_l = _bmv(Cs, tau_s) + (leaf[2] if 2 in leaf else 0)
            S = (tau_h * grad_l).sum()
            if 3 in leaf or 4 in leaf:
                grad_T = 0
                if 3 in leaf:
                    grad_T = _bmv(0.5 * (leaf[3] + leaf[3].transpose(-1, -2)), x[:, -1])
                S = S + (xh[:, -1] * (grad_T + (leaf[4] if 4 in leaf else 0))).sum()
            if F is not None:
                f_val = _bmv(leaf[7], tau_s) + (leaf[8] if 8 in leaf else 0)
                S = S + (lam_h[:, 1:] * f_val).sum() + (lam[:, 1:] * _bmv(leaf[7], tau_h)).sum()
            else:
                pdict = {name: leaf[10 + i] for i, name in enumerate(spec.names)}
                X = x[:, :-1].reshape(-1, n).detach().requires_grad_()
                U = u.reshape(-1, m).detach().requires_grad_()
                out = functional_call(spec.module, pdict, (X, U))
                gX, gU = torch.autograd.grad((lam[:, 1:].reshape(-1, n) * out).sum(), (X, U),
                                             create_graph=True, allow_unused=True)
                S = S + (lam_h[:, 1:].reshape(-1, n) * out).sum()
                if gX is not None:
                    S = S + (gX * xh[:, :-1].reshape(-1, n)).sum()
                if gU is not None:
                    S = S + (gU * uh.reshape(-1, m)).sum()
            got = torch.autograd.grad(S, [leaf[i] for i in want], allow_unused=True)
        for i, gr in zip(want, got, strict=True):
            grads[i] = torch.zeros_like(slots[i]) if gr is None else gr
        return (None, *grads)


class MPC(nn.Module):
    r"""Differentiable nonlinear MPC with control bounds (box-DDP forward, implicit backward).

    Solves, for every batch row,

    .. math::

        \min_{x, u} \sum_{t=0}^{T-1} \tfrac12 \tau_t^\top C_t \tau_t + c_t^\top \tau_t
            + \tfrac12 x_T^\top C_f x_T + c_f^\top x_T
        \quad \text{s.t.} \quad x_{t+1} = f(x_t, u_t),\; x_0 = x_\text{init},\;
        \underline{u}_t \le u_t \le \overline{u}_t,

    with :math:`\tau_t = [x_t; u_t]`. With a :class:`~diffto.LinearDynamics` (and
    ``backward="implicit"``) this is a convex QP when the cost is convex, solved exactly by a
    primal-dual active-set method: each iteration is one batched LQR sweep with the clamped
    controls eliminated, typically 3–10 of them (rows it cannot settle, e.g. nonconvex ones, fall
    back to the general solver). Otherwise the solver is box-DDP: iLQR whose backward pass solves
    each stage's box-constrained QP in :math:`u` (clamped controls get zero feedback gain) and
    whose forward pass line-searches the true cost, per row. Gradients are the exact derivative
    of the solution map, by implicit differentiation of the KKT conditions (dynamics curvature
    included), w.r.t. ``x0``, the cost tensors, the dynamics (module parameters or ``F``/``f``)
    and the bounds (a bound receives gradient where it is active). The warm start gets none: the
    optimum does not depend on it.

    Args:
        dynamics: an ``nn.Module`` mapping ``(x (N, n), u (N, m)) -> x_next (N, n)`` row by row
            (time-invariant; it is called on any number of rows, e.g. all ``B·T`` stages at once,
            and linearized with ``torch.func``, so it must be ``vmap``-able and twice
            differentiable), or a :class:`~diffto.LinearDynamics` (time-varying, may be batched).
        horizon: ``T``.
        u_lower, u_upper: control bounds, a float or a tensor broadcasting to ``(B, T, m)``;
            ``None`` means unbounded. A tensor that requires grad receives gradients.
        max_iter: the largest number of iLQR (or active-set) steps per row.
        tol: a row has converged when its Newton step satisfies
            ``max|k| <= tol · (1 + max|u|)`` (the active-set solver also stops, exactly, when
            its active set repeats); ``None`` means 1e-7 in float64, 1e-4 otherwise.
        backward: ``"implicit"`` (KKT differentiation at the returned plan, the default) or
            ``"unroll"`` (plain autograd through every iteration: the derivative of the
            algorithm as run, so it also reaches ``u_init``; it matches ``"implicit"`` at
            tight tolerances and costs memory proportional to the iterations).
        hessian: ``"exact"`` adds the dynamics curvature ``Σ_i λ_{t+1,i} ∇²f_i`` to the stage
            Hessians (Newton DDP-like steps, quadratic local convergence; indefinite stages are
            regularized), ``"gauss_newton"`` drops it (classic iLQR: cheaper steps, linear
            convergence). Both are the same for ``LinearDynamics``.

    Calling ``mpc(x0 (B, n), cost, u_init=None)`` returns a :class:`~diffto.Solution` with
    ``x (B, T+1, n)``, ``u (B, T, m)``, ``cost (B,)``, ``converged (B,)``, ``iterations (B,)``
    and extras ``costates (B, T+1, n)`` (the multipliers λ of the dynamics), ``gains
    (B, T, m, n)`` and ``feedforward (B, T, m)`` of the last sweep (the feedback law
    ``u = u* + K (x − x*)`` about the plan, and the last step of the controls, about zero at
    convergence), ``active_lower`` / ``active_upper (B, T, m)`` (controls held at a bound),
    ``regularization (B,)`` (the Levenberg-Marquardt factor left on ``Q_uu``; zero for rows the
    active-set solver settled) and ``stalled (B,)`` (stopped before ``max_iter`` without
    converging: no descent step or no positive-definite ``Q_uu`` found). A row that did not
    converge keeps its last iterate and still gets gradients (those of the KKT system at that
    iterate); check ``converged``.
    """

    def __init__(
        self,
        dynamics: nn.Module | LinearDynamics,
        horizon: int,
        u_lower: float | Tensor | None = None,
        u_upper: float | Tensor | None = None,
        max_iter: int = 50,
        tol: float | None = None,
        backward: BackwardMode = "implicit",
        hessian: HessianMode = "exact",
    ) -> None:
        super().__init__()
        if not isinstance(dynamics, nn.Module | LinearDynamics):
            raise ValueError(
                f"dynamics must be an nn.Module (x, u) -> x_next or a LinearDynamics, got "
                f"{type(dynamics).__name__}"
            )
        if not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
        if isinstance(dynamics, LinearDynamics) and dynamics.horizon != horizon:
            raise ValueError(
                f"dynamics has horizon {dynamics.horizon} (F {tuple(dynamics.F.shape)}) but "
                f"horizon={horizon}"
            )
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
        if tol is not None and not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol!r}")
        if backward not in ("implicit", "unroll"):
            raise ValueError(f"backward must be 'implicit' or 'unroll', got {backward!r}")
        for name, b in (("u_lower", u_lower), ("u_upper", u_upper)):
            if b is not None and not isinstance(b, int | float | Tensor):
                raise ValueError(f"{name} must be a float, a tensor or None, got {type(b)}")
            if b is not None and torch.isnan(torch.as_tensor(b)).any():
                raise ValueError(f"{name} contains NaN")
        if u_lower is not None and u_upper is not None:
            if (torch.as_tensor(u_lower) > torch.as_tensor(u_upper)).any():
                raise ValueError("u_lower must be <= u_upper everywhere")
        self.dynamics = dynamics
        self.horizon, self.max_iter, self.tol, self.backward = horizon, max_iter, tol, backward
        if hessian not in ("exact", "gauss_newton"):
            raise ValueError(f"hessian must be 'exact' or 'gauss_newton', got {hessian!r}")
        self.u_lower, self.u_upper, self.hessian = u_lower, u_upper, hessian

    def _bound(self, name: str, b, B: int, m: int, like: Tensor) -> Tensor | None:
        if b is None:
            return None
        b = torch.as_tensor(b, dtype=like.dtype, device=like.device) if not isinstance(
            b, Tensor) else b.to(like)
        try:
            shape = torch.broadcast_shapes(b.shape, (B, self.horizon, m))
        except RuntimeError:
            shape = None
        if shape != (B, self.horizon, m):
            raise ValueError(
                f"{name} must broadcast to (B, T, m) = {(B, self.horizon, m)}, got "
                f"{tuple(b.shape)}"
            )
        return b

    def forward(self, x0: Tensor, cost: QuadraticCost, u_init: Tensor | None = None) -> Solution:
        """Solve the batch; ``x0 (B, n)`` (or ``(n,)``), ``u_init (B, T, m)`` or ``(T, m)``."""
        B, T, n, m = problem_dims(x0, cost)
        if T != self.horizon:
            raise ValueError(f"cost.C has horizon {T} but the MPC horizon is {self.horizon}")
        x0 = x0.unsqueeze(0) if x0.dim() == 1 else x0
        C, c, C_f, c_f = cost.C, cost.c, cost.C_final, cost.c_final
        for name, t in (("cost.C", C), ("cost.c", c), ("cost.C_final", C_f),
                        ("cost.c_final", c_f)):
            if t is not None and (t.dtype != x0.dtype or t.device != x0.device):
                raise ValueError(
                    f"{name} has dtype {t.dtype} on {t.device} but x0 has {x0.dtype} on "
                    f"{x0.device}"
                )
        cost.batched(n, m)  # shape checks of every cost tensor
        cost.check_control_pd(n, m)
        lo = self._bound("u_lower", self.u_lower, B, m, x0)
        hi = self._bound("u_upper", self.u_upper, B, m, x0)
        check_bounds(lo, hi, m)
        F = f = None
        names: list[str] = []
        params: list[Tensor] = []
        if isinstance(self.dynamics, LinearDynamics):
            dyn = self.dynamics
            if (dyn.n_state, dyn.n_ctrl) != (n, m):
                raise ValueError(
                    f"dynamics.F has shape {tuple(dyn.F.shape)} (n={dyn.n_state}, "
                    f"m={dyn.n_ctrl}) but x0 and cost give n={n}, m={m}"
                )
            F, f = dyn.batched()
            if F.shape[0] not in (1, B) or (f is not None and f.shape[0] not in (1, B)):
                raise ValueError(f"dynamics.F/f must have batch 1 or {B}, got {tuple(F.shape)}")
            F, f = dyn.F, dyn.f
            for name, t in (("dynamics.F", F), ("dynamics.f", f)):
                if t is not None and (t.dtype != x0.dtype or t.device != x0.device):
                    raise ValueError(f"{name} has dtype {t.dtype} on {t.device} but x0 has "
                                     f"{x0.dtype} on {x0.device}")
        else:
            named = list(self.dynamics.named_parameters())
            names, params = [k for k, _ in named], [p for _, p in named]
            for k, p in named:
                if p.is_floating_point() and (p.dtype != x0.dtype or p.device != x0.device):
                    raise ValueError(
                        f"dynamics parameter {k!r} has dtype {p.dtype} on {p.device} but x0 has "
                        f"{x0.dtype} on {x0.device}: move the module with .to()"
                    )
        if u_init is None:
            u_init = x0.new_zeros(B, T, m)
        else:
            check_finite("u_init", u_init)
            if u_init.shape not in ((B, T, m), (T, m), (1, T, m)):
                raise ValueError(f"u_init must have shape (B, T, m) = {(B, T, m)}, got "
                                 f"{tuple(u_init.shape)}")
            u_init = u_init.to(x0).expand(B, T, m)
            if self.backward == "implicit":
                u_init = u_init.detach()
        tol = self.tol if self.tol is not None else (1e-7 if x0.dtype == torch.float64 else 1e-4)
        spec = _Spec(self.dynamics if F is None else None, names, B, T, n, m, self.max_iter, tol,
                     self.hessian == "exact", F is not None and self.backward == "implicit")
        inputs = (x0, C, c, C_f, c_f, lo, hi, F, f, u_init, *params)
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(t, Tensor) and t.requires_grad for t in inputs
        )
        if needs_grad and self.backward == "unroll":
            out = _MPCFunction.forward(spec, *inputs)  # autograd records every iteration
        elif needs_grad:
            out = _MPCFunction.apply(spec, *inputs)
        else:
            with torch.no_grad():
                out = _MPCFunction.forward(spec, *inputs)
        x, u, lam, K, k, at_lower, at_upper, converged, iterations, mu, stalled, _, _ = out
        return Solution(
            x=x, u=u, cost=cost.evaluate(x, u), converged=converged, iterations=iterations,
            extras=dict(costates=lam, gains=K, feedforward=k, active_lower=at_lower,
                        active_upper=at_upper, regularization=mu, stalled=stalled),
        )
