"""Linear-quadratic MPC with state, control and general stage inequalities, through cvxpylayers.

For each batch row the layer solves the convex QP

.. math::

    \\min_{x, u} \\sum_{t=0}^{T-1} \\tfrac12 \\tau_t^\\top C_t \\tau_t + c_t^\\top \\tau_t
        + \\tfrac12 x_T^\\top C_f x_T + c_f^\\top x_T
    \\quad\\text{s.t.}\\quad x_0 = x_\\text{init},\\; x_{t+1} = F_t \\tau_t + f_t,\\;
    \\underline u_t \\le u_t \\le \\overline u_t,\\;
    \\underline x_{t} \\le x_{t} \\le \\overline x_{t}\\ (t \\ge 1),\\;
    G_t \\tau_t \\le h_t,

with ``τ_t = [x_t; u_t]``, and differentiates the plan w.r.t. ``x_init``, ``C, c, C_f, c_f``,
``F, f`` and the bounds / ``G, h`` given as tensors that require grad.

How the problem stays DPP (so cvxpy canonicalizes it once, at construction):

* the quadratic cost enters as ``½‖L_t τ_t‖²`` with a *parameter* factor ``L_t`` (``L_tᵀL_t =
  C_t``, from a PSD eigendecomposition, so a singular ``C_t`` needs no ``εI`` shift);
* ``L_t`` is never differentiated. The gradient w.r.t. ``C_t`` follows exactly from the one
  w.r.t. ``c_t``: the cost enters the KKT conditions only through ``C_t τ_t + c_t``, so a
  perturbation ``dC_t`` acts like ``dc_t = dC_t τ_t`` and
  ``∂ℓ/∂C_t = sym(∂ℓ/∂c_t τ_tᵀ)`` (the same identity as OptNet's ``∇_Q ℓ``).

Gradients come from diffcp's ``dense`` mode on Clarabel (the default ``lsqr`` mode of
cvxpylayers was seen 15% off on box-constrained MPC). Bound entries set to ``±inf`` are left out
of the problem (which entries are finite is fixed at construction).

Failure handling: Clarabel returns an arbitrary point for an infeasible row without raising,
and SCS raises for the whole batch. So every row's plan is checked (dynamics residual and
constraint violation); a row that fails is re-solved alone, and if it still fails its status is
taken from a plain cvxpy solve, its plan is NaN, ``converged`` is False and its gradient is
zero. Other rows keep their plans and gradients.
"""

from __future__ import annotations

import warnings
from typing import Any

import cvxpy as cp
import numpy as np
import torch
from torch import Tensor, nn

from diffto.problem import (
    LinearDynamics,
    QuadraticCost,
    Solution,
    check_bounds,
    check_finite,
    problem_dims,
)

__all__ = ["QPMPC", "build_mpc_problem"]

# Clarabel at tight tolerances with diffcp's dense derivative: plans and gradients agree with
# exact references to ~1e-6 (the cost is a second-order cone here, so not to machine precision).
_DEFAULT_SOLVER_ARGS = {
    "solve_method": "Clarabel",
    "mode": "dense",
    "tol_gap_abs": 1e-12,
    "tol_gap_rel": 1e-12,
    "tol_feas": 1e-12,
    "tol_ktratio": 1e-10,
    # Serial: no faster with diffcp's thread pool here, and that pool is left open (a
    # ResourceWarning) when a solve raises inside it.
    "n_jobs_forward": 1,
    "n_jobs_backward": 1,
}
# Keys that only make sense when derivatives are computed; diffcp passes the rest to the solver.
_DERIVATIVE_KEYS = ("mode", "derivative_kwargs", "n_jobs_backward")


def _stage_tensor(name: str, value: Tensor | float | None, shape: tuple[int, ...]) -> Tensor | None:
    """Broadcast a bound (scalar, per-dimension or per-stage) to ``shape``; ``None`` stays."""
    if value is None:
        return None
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value, dtype=torch.float64)
    if torch.isnan(value).any():
        raise ValueError(f"{name} contains NaN")
    try:
        torch.broadcast_shapes(value.shape, shape)
    except RuntimeError:
        raise ValueError(
            f"{name} must broadcast to {shape} (scalar, ({shape[-1]},) or {shape}), "
            f"got {tuple(value.shape)}"
        ) from None
    if value.dim() > len(shape):
        raise ValueError(f"{name} must broadcast to {shape}, got {tuple(value.shape)}")
    return value


def build_mpc_problem(
    horizon: int,
    n: int,
    m: int,
    bound_masks: dict[str, np.ndarray] | None = None,
    n_ineq: int = 0,
) -> tuple[cp.Problem, list[cp.Parameter], list[cp.Variable]]:
    """The DPP cvxpy problem behind :class:`QPMPC`.

    Args:
        horizon: T.
        n, m: state and control dimensions.
        bound_masks: optional ``{"u_lower", "u_upper": (T, m), "x_lower", "x_upper": (T, n)}``
            boolean arrays of the bound entries that exist (state bounds act on ``x_1..x_T``).
        n_ineq: number ``p`` of general inequalities ``G_t τ_t ≤ h_t`` per stage.

    Returns:
        ``(problem, parameters, variables)``. Parameters, in order: ``x0 (n,)``,
        ``L (T(n+m), n+m)`` stacked cost factors, ``c (T, n+m)``, ``L_f (n, n)``, ``c_f (n,)``,
        ``F (Tn, n+m)`` stacked dynamics, ``f (T, n)``, then one vector per present bound (its
        finite entries in row-major order), then ``G (Tp, n+m)`` and ``h (T, p)`` if ``p > 0``.
        Variables: ``x (T+1, n)``, ``u (T, m)``.
    """
    T, k = horizon, n + m
    masks = bound_masks or {}
    x, u = cp.Variable((T + 1, n)), cp.Variable((T, m))
    x0 = cp.Parameter(n)
    L, c = cp.Parameter((T * k, k)), cp.Parameter((T, k))
    L_f, c_f = cp.Parameter((n, n)), cp.Parameter(n)
    F, f = cp.Parameter((T * n, k)), cp.Parameter((T, n))
    params = [x0, L, c, L_f, c_f, F, f]
    objective = 0.5 * cp.sum_squares(L_f @ x[T]) + c_f @ x[T]
    constraints = [x[0] == x0]
    taus = [cp.hstack([x[t], u[t]]) for t in range(T)]
    for t, tau in enumerate(taus):
        objective = objective + 0.5 * cp.sum_squares(L[t * k:(t + 1) * k] @ tau) + c[t] @ tau
        constraints.append(x[t + 1] == F[t * n:(t + 1) * n] @ tau + f[t])
    for name, var, offset in (("u_lower", u, 0), ("u_upper", u, 0),
                              ("x_lower", x, 1), ("x_upper", x, 1)):
        mask = masks.get(name)
        if mask is None or not mask.any():
            continue
        rows, cols = np.nonzero(mask)
        value = cp.Parameter(len(rows))
        params.append(value)
        entries = var[rows + offset, cols]
        constraints.append(entries >= value if name.endswith("lower") else entries <= value)
    if n_ineq > 0:
        p = n_ineq
        G, h = cp.Parameter((T * p, k)), cp.Parameter((T, p))
        params += [G, h]
        constraints += [G[t * p:(t + 1) * p] @ tau <= h[t] for t, tau in enumerate(taus)]
    return cp.Problem(cp.Minimize(objective), constraints), params, [x, u]


def _psd_factor(name: str, C: Tensor, tol: float) -> Tensor:
    """``L`` with ``LᵀL = C`` for symmetric PSD ``C (..., k, k)``, from ``C = V diag(λ) Vᵀ``:
    ``L = diag(√λ₊) Vᵀ``. Raises if an eigenvalue is below ``-tol·max(1, |λ|_max)``."""
    lam, V = torch.linalg.eigh(C)
    scale = lam.abs().amax(-1, keepdim=True).clamp_min(1.0)
    if (lam < -tol * scale).any():
        raise ValueError(
            f"{name} must be positive semidefinite (a convex QP); smallest eigenvalue found "
            f"{lam.min().item():.3g}"
        )
    return lam.clamp_min(0).sqrt().unsqueeze(-1) * V.transpose(-1, -2)


def _call_layer(layer, params: list[Tensor], solver_args: dict, want: list[bool]):
    """One cvxpylayers call with fresh leaves; returns ``(leaves, x, u)`` (graph kept)."""
    leaves = [p.detach().requires_grad_(w) for p, w in zip(params, want, strict=True)]
    needs_grad = any(want)
    args = dict(solver_args)
    if not needs_grad:
        for key in _DERIVATIVE_KEYS:
            args.pop(key, None)
    with torch.enable_grad(), warnings.catch_warnings():
        # cvxpylayers converts torch tensors with np.array(..., copy=False) (numpy 2 notice).
        warnings.filterwarnings("ignore", message=".*__array__ implementation doesn't accept")
        x, u = layer(*leaves, solver_args=args)
    return leaves, x, u


class _QPMPCFunction(torch.autograd.Function):
    """Solve with per-row fallback; backward through the kept cvxpylayers graphs.

    Inputs (float64, CPU): ``x0 (B, n)``, ``C (B, T, k, k)`` symmetric, ``c (B, T, k)``,
    ``C_f (B, n, n)``, ``c_f (B, n)``, ``F (B, T, n, k)``, ``f (B, T, n)``, then the shared
    (unbatched) bound vectors and ``G, h``. ``want`` says which inputs need gradients (decided
    outside, where grad mode is known); ``info`` receives the per-row status.
    """

    @staticmethod
    def forward(module, info, want, x0, C, c, C_f, c_f, F, f, *shared):
        B, T, k = c.shape
        n = x0.shape[-1]
        L = _psd_factor("cost.C", C, module.psd_tol).reshape(B, T * k, k)
        L_f = _psd_factor("cost.C_final", C_f, module.psd_tol)
        params = [x0, L, c, L_f, c_f, F.reshape(B, T * n, k), f, *shared]
        # c (and c_f) carry the gradient of C (and C_f) too, see the module docstring.
        flags = [want[0], False, want[1] or want[2], False, want[3] or want[4],
                 want[5], want[6], *want[7:]]
        x = x0.new_full((B, T + 1, n), float("nan"))
        u = x0.new_full((B, T, module.m), float("nan"))
        ok = torch.zeros(B, dtype=torch.bool)
        groups, errors = [], []

        def attempt(rows: Tensor) -> None:
            batched = [p[rows] for p in params[:7]] + list(params[7:])
            try:
                leaves, xs, us = _call_layer(module.layer, batched, module.solver_args, flags)
            except Exception as err:  # noqa: BLE001 - diffcp raises several types; rows retried
                errors.append(f"rows {rows.tolist()}: {type(err).__name__}: {err}")
                return
            good = module._feasible(xs.detach(), us.detach(), x0[rows], F[rows], f[rows])
            x[rows[good]], u[rows[good]] = xs.detach()[good], us.detach()[good]
            ok[rows[good]] = True
            groups.append((rows, good, leaves, xs, us))

        attempt(torch.arange(B))
        if not ok.all():
            for row in (~ok).nonzero().flatten():
                attempt(row.reshape(1))
        status = ["optimal"] * B
        for row in (~ok).nonzero().flatten().tolist():
            status[row] = module._reference_status([p[row] for p in params[:7]], list(shared))
        info["status"], info["groups"], info["errors"] = status, groups, errors
        return x, u, ok

    @staticmethod
    def setup_context(ctx, inputs, output):
        module, info, want = inputs[:3]
        x, u, ok = output
        ctx.groups, ctx.want = info.pop("groups"), want
        ctx.shapes = [None if t is None else t.shape for t in inputs[3:]]
        ctx.save_for_backward(x, u, ok)
        ctx.mark_non_differentiable(ok)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x, grad_u, _grad_ok):
        x, u, ok = ctx.saved_tensors
        want = ctx.want
        # Gradient slots in the layer's parameter order: x0, L, c, L_f, c_f, F, f, shared...
        grads: list[Tensor | None] = [None] * len(ctx.shapes)
        for rows, good, leaves, xs, us in ctx.groups:
            inputs = [leaf for leaf in leaves if leaf.requires_grad]
            if not inputs:
                continue
            # Rows that failed the check get no gradient: their plan is NaN and flagged.
            gx = torch.where(good[:, None, None], grad_x[rows], 0.0)
            gu = torch.where(good[:, None, None], grad_u[rows], 0.0)
            out = iter(torch.autograd.grad((xs, us), inputs, (gx, gu), allow_unused=True))
            for i, leaf in enumerate(leaves):
                if not leaf.requires_grad:
                    continue
                g = next(out)
                if g is None:
                    continue
                shape = (len(ok),) + tuple(leaf.shape[1:]) if i < 7 else leaf.shape
                if grads[i] is None:
                    grads[i] = leaf.new_zeros(shape)
                if i < 7:
                    grads[i][rows] += g
                else:
                    grads[i] += g
        B, T, n = x.shape[0], u.shape[1], x.shape[-1]
        tau = torch.cat([x[:, :-1], u], -1).nan_to_num()  # (B, T, k); failed rows have g = 0
        g_c, g_cf = grads[2], grads[4]
        g_C = g_Cf = None
        if want[1] and g_c is not None:
            # ∂ℓ/∂C_t = sym(∂ℓ/∂c_t τ_tᵀ), see the module docstring.
            outer = g_c.unsqueeze(-1) * tau.unsqueeze(-2)  # (B, T, k, k)
            g_C = 0.5 * (outer + outer.transpose(-1, -2))
        if want[3] and g_cf is not None:
            outer = g_cf.unsqueeze(-1) * x[:, -1].nan_to_num().unsqueeze(-2)  # (B, n, n)
            g_Cf = 0.5 * (outer + outer.transpose(-1, -2))
        g_F = None if grads[5] is None else grads[5].reshape(B, T, n, -1)
        out = [grads[0], g_C, g_c if want[2] else None, g_Cf, g_cf if want[4] else None,
               g_F, grads[6], *grads[7:]]
        return (None, None, None, *out)


class QPMPC(nn.Module):
    """Linear-quadratic MPC with control, state and general stage constraints (cvxpylayers).

    The problem is in the module docstring. It is canonicalized once, here; a call only fills in
    parameters. Bounds and ``G, h`` are fixed per module (tensors that require grad, such as an
    ``nn.Parameter``, receive gradients); which bound entries exist is decided by where they are
    finite.

    Args:
        horizon: T.
        n: state dimension.
        m: control dimension.
        u_lower, u_upper: control bounds, a scalar, ``(m,)`` or ``(T, m)``; ``±inf`` entries are
            absent.
        x_lower, x_upper: state bounds on ``x_1..x_T``, a scalar, ``(n,)`` or ``(T, n)``.
        G: general stage inequalities ``G_t τ_t ≤ h_t``, ``(p, n+m)`` or ``(T, p, n+m)``.
        h: ``(p,)`` or ``(T, p)``; given together with ``G``.
        solver_args: passed to diffcp; ``None`` means Clarabel with the ``dense`` derivative
            (accurate gradients). ``mode`` is dropped on calls that need no gradient.
        tol: a row counts as solved when its dynamics residual and constraint violation are
            below ``tol·(1 + max|plan|)``.
        psd_tol: relative tolerance on negative eigenvalues of ``C`` and ``C_final``.

        dynamics: a :class:`~diffto.problem.LinearDynamics` used when a call passes none
            (``n``, ``m`` may then be omitted).

    Call as ``layer(x0, cost, dynamics=None, u_init=None) -> Solution`` with ``x0 (B, n)``, a
    :class:`~diffto.problem.QuadraticCost` and a :class:`~diffto.problem.LinearDynamics`
    (this call's, else the constructor's). ``u_init`` is accepted for the common contract and
    ignored: the QP is convex and solved exactly, its answer does not depend on a start.
    Returns ``x (B, T+1, n)``, ``u (B, T, m)``, ``cost (B,)``, ``converged (B,)``,
    ``iterations (B,)`` (``-1``: diffcp does not report them) and the extras
    ``active_lower``/``active_upper (B, T, m)`` bool (control bounds the plan meets within
    ``tol·(1 + max|plan|)``), ``costates (B, T+1, n)`` when the problem has no state bounds and
    no ``G`` (then ``λ_T = C_f x_T + c_f``, ``λ_t = [C_t τ_t + c_t]_x + A_tᵀ λ_{t+1}`` hold
    exactly; with state constraints their multipliers, which cvxpylayers does not return,
    enter too), ``status``, a list of cvxpy status strings per row (``"optimal"``,
    ``"infeasible"``, ``"inaccurate"``, ...) and ``errors``, the solver exceptions met (the
    batch is then re-solved row by row). Failed rows have NaN plans and cost, and receive zero
    gradient; mask them with ``converged``. The extras carry no gradient.
    """

    def __init__(
        self,
        horizon: int,
        n: int | None = None,
        m: int | None = None,
        u_lower: Tensor | float | None = None,
        u_upper: Tensor | float | None = None,
        x_lower: Tensor | float | None = None,
        x_upper: Tensor | float | None = None,
        G: Tensor | None = None,
        h: Tensor | None = None,
        solver_args: dict[str, Any] | None = None,
        tol: float = 1e-6,
        psd_tol: float = 1e-9,
        dynamics: LinearDynamics | None = None,
    ) -> None:
        super().__init__()
        from cvxpylayers.torch import CvxpyLayer

        if dynamics is not None:
            if not isinstance(dynamics, LinearDynamics):
                raise ValueError(
                    f"dynamics must be a LinearDynamics or None, got {type(dynamics).__name__}"
                )
            n = dynamics.n_state if n is None else n
            m = dynamics.n_ctrl if m is None else m
        self.dynamics = dynamics
        for name, v in (("horizon", horizon), ("n", n), ("m", m)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.horizon, self.n, self.m = horizon, n, m
        self.tol, self.psd_tol = tol, psd_tol
        self.solver_args = dict(_DEFAULT_SOLVER_ARGS if solver_args is None else solver_args)
        T, k = horizon, n + m
        bounds = {
            "u_lower": _stage_tensor("u_lower", u_lower, (T, m)),
            "u_upper": _stage_tensor("u_upper", u_upper, (T, m)),
            "x_lower": _stage_tensor("x_lower", x_lower, (T, n)),
            "x_upper": _stage_tensor("x_upper", x_upper, (T, n)),
        }
        check_bounds(bounds["u_lower"], bounds["u_upper"], m, ("u_lower", "u_upper"))
        check_bounds(bounds["x_lower"], bounds["x_upper"], n, ("x_lower", "x_upper"))
        masks = {}
        self._bound_names = []
        for name, value in bounds.items():
            if value is None:
                continue
            dim = m if name[0] == "u" else n
            wrong = value == (float("inf") if name.endswith("lower") else -float("inf"))
            if wrong.any():
                raise ValueError(f"{name} contains {'+' if 'lower' in name else '-'}inf: "
                                 "that bound admits no value")
            mask = torch.isfinite(value.detach()).expand(T, dim).cpu().numpy()
            if not mask.any():
                continue
            masks[name] = mask
            self._bound_names.append(name)
            self._keep(name, value)
            self.register_buffer(f"_{name}_mask", torch.from_numpy(mask.copy()), persistent=False)
        self.n_ineq = 0
        if (G is None) != (h is None):
            raise ValueError("G and h must be given together")
        if G is not None:
            if not isinstance(G, Tensor) or G.dim() not in (2, 3) or G.shape[-1] != k:
                raise ValueError(f"G must have shape (p, {k}) or ({T}, p, {k}), got "
                                 f"{tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__}")
            if G.dim() == 3 and G.shape[0] != T:
                raise ValueError(
                    f"G must have shape (p, {k}) or ({T}, p, {k}), got {tuple(G.shape)}"
                )
            p = G.shape[-2]
            if not isinstance(h, Tensor) or h.shape not in ((p,), (T, p)):
                raise ValueError(f"h must have shape ({p},) or ({T}, {p}), got "
                                 f"{tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
            check_finite("G", G)
            check_finite("h", h)
            self.n_ineq = p
            self._keep("G", G)
            self._keep("h", h)
        problem, params, variables = build_mpc_problem(T, n, m, masks, self.n_ineq)
        self.problem, self._params = problem, params
        self.layer = CvxpyLayer(problem, parameters=params, variables=variables)

    def _keep(self, name: str, value: Tensor) -> None:
        """Store a bound: ``nn.Parameter`` and tensors that require grad as given, else a buffer."""
        if isinstance(value, nn.Parameter) or value.requires_grad:
            setattr(self, name, value)
        else:
            self.register_buffer(name, value)

    def _shared(self) -> list[Tensor]:
        """The bound vectors and ``G, h`` in the problem's parameter order (float64, CPU)."""
        T, k = self.horizon, self.n + self.m
        out = []
        for name in self._bound_names:
            dim = self.m if name[0] == "u" else self.n
            value = getattr(self, name).to("cpu", torch.float64).expand(T, dim)
            out.append(value[getattr(self, f"_{name}_mask").cpu()])
        if self.n_ineq:
            G = self.G.to("cpu", torch.float64).expand(T, self.n_ineq, k)
            out += [G.reshape(T * self.n_ineq, k),
                    self.h.to("cpu", torch.float64).expand(T, self.n_ineq)]
        return out

    def _feasible(self, x: Tensor, u: Tensor, x0: Tensor, F: Tensor, f: Tensor) -> Tensor:
        """Per-row check of a returned plan: ``(B,)`` True where dynamics hold and no
        constraint is violated by more than ``tol·(1 + max|plan|)``."""
        T = self.horizon
        tau = torch.cat([x[:, :-1], u], -1)
        scale = 1.0 + torch.cat([x.flatten(1), u.flatten(1)], 1).abs().amax(1)
        resid = (x[:, 1:] - torch.einsum("btij,btj->bti", F, tau) - f).abs().flatten(1).amax(1)
        resid = torch.maximum(resid, (x[:, 0] - x0).abs().amax(1))
        viol = torch.zeros_like(resid)
        for name in self._bound_names:
            var = u if name[0] == "u" else x[:, 1:]
            dim = var.shape[-1]
            value = getattr(self, name).detach().to("cpu", torch.float64).expand(T, dim)
            mask = getattr(self, f"_{name}_mask").cpu()
            gap = value - var if name.endswith("lower") else var - value
            viol = torch.maximum(viol, torch.where(mask, gap, -torch.inf).flatten(1).amax(1))
        if self.n_ineq:
            G = self.G.detach().to("cpu", torch.float64).expand(T, self.n_ineq, tau.shape[-1])
            h = self.h.detach().to("cpu", torch.float64)
            gap = torch.einsum("tpk,btk->btp", G, tau) - h
            viol = torch.maximum(viol, gap.flatten(1).amax(1))
        finite = torch.isfinite(x).flatten(1).all(1) & torch.isfinite(u).flatten(1).all(1)
        return finite & (resid <= self.tol * scale) & (viol <= self.tol * scale)

    def _reference_status(self, row: list[Tensor], shared: list[Tensor]) -> str:
        """cvxpy's status string for one row the layer could not solve."""
        x0, L, c, L_f, c_f, F, f = row
        values = [x0, L, c, L_f, c_f, F.reshape(-1, F.shape[-1]), f, *shared]
        for param, value in zip(self._params, values, strict=True):
            param.value = value.detach().cpu().numpy()
        try:
            with warnings.catch_warnings():  # the status string below says it all
                warnings.simplefilter("ignore", UserWarning)
                self.problem.solve(solver=cp.CLARABEL)
        except cp.error.SolverError as err:
            return f"solver_error: {err}"
        status = str(self.problem.status)
        # cvxpy solved what the layer could not: the layer's answer was inaccurate.
        return "inaccurate" if status in ("optimal", "optimal_inaccurate") else status

    def forward(
        self,
        x0: Tensor,
        cost: QuadraticCost,
        dynamics: LinearDynamics | None = None,
        u_init: Tensor | None = None,
    ) -> Solution:
        """Solve a batch of problems; see the class docstring for shapes (``u_init`` is
        ignored: the solve is exact)."""
        if not isinstance(cost, QuadraticCost):
            raise ValueError(
                f"cost must be a QuadraticCost (QPMPC solves convex QPs), got "
                f"{type(cost).__name__}: use MPC or CasadiTO for general costs"
            )
        dynamics = self.dynamics if dynamics is None else dynamics
        B, T, n, m = problem_dims(x0, cost, self.n)
        if x0.dim() == 1:
            x0 = x0.unsqueeze(0)
        if T != self.horizon or m != self.m:
            raise ValueError(
                f"cost must have horizon {self.horizon} and n+m = {self.n + self.m}, got "
                f"C of shape {tuple(cost.C.shape)}"
            )
        if not isinstance(dynamics, LinearDynamics):
            raise ValueError(
                "dynamics must be a LinearDynamics (given per call or at construction), got "
                f"{type(dynamics).__name__}"
            )
        if (dynamics.horizon, dynamics.n_state, dynamics.n_ctrl) != (T, n, m):
            raise ValueError(
                f"dynamics.F must have shape (B, {T}, {n}, {n + m}) or ({T}, {n}, {n + m}), "
                f"got {tuple(dynamics.F.shape)}"
            )
        cost.check_control_pd(n, m, "cost.C")
        C, c, C_f, c_f = cost.batched(n, m)
        F, f = dynamics.batched()
        for name, t in (("C_final", C_f), ("c_final", c_f), ("F", F), ("f", f)):
            if t is not None and t.shape[0] not in (1, B):
                raise ValueError(f"{name} has batch {t.shape[0]} but x0 has batch {B}")
        dtype, device = x0.dtype, x0.device

        def prep(t: Tensor | None, shape: tuple[int, ...]) -> Tensor:
            if t is None:
                return torch.zeros((B, *shape), dtype=torch.float64)
            return t.to("cpu", torch.float64).expand(B, *shape)

        k = n + m
        inputs = [
            x0.to("cpu", torch.float64), prep(C, (T, k, k)), prep(c, (T, k)),
            prep(C_f, (n, n)), prep(c_f, (n,)), prep(F, (T, n, k)), prep(f, (T, n)),
            *self._shared(),
        ]
        grad_on = torch.is_grad_enabled()
        want = [grad_on and t.requires_grad for t in inputs]
        info: dict[str, Any] = {}
        x, u, ok = _QPMPCFunction.apply(self, info, want, *inputs)
        extras = self._extras(x.detach(), u.detach(), inputs)
        extras.update(status=info["status"], errors=info["errors"])
        extras = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in extras.items()}
        x, u = x.to(device, dtype), u.to(device, dtype)
        ok = ok.to(device)
        return Solution(
            x=x,
            u=u,
            cost=cost.evaluate(x, u),
            converged=ok,
            iterations=torch.full((B,), -1, dtype=torch.long, device=device),
            extras=extras,
        )

    def _extras(self, x: Tensor, u: Tensor, inputs: list[Tensor]) -> dict[str, Tensor]:
        """Active control bounds and, without state constraints, the costates (see the class
        docstring), from the plan ``x (B, T+1, n)``, ``u (B, T, m)`` (float64, CPU)."""
        T, n, m = self.horizon, self.n, self.m
        scale = 1.0 + torch.cat([x.flatten(1), u.flatten(1)], 1).abs().amax(1)
        gap_tol = (self.tol * scale).view(-1, 1, 1)
        out = {}
        for name, key in (("u_lower", "active_lower"), ("u_upper", "active_upper")):
            if name not in self._bound_names:
                out[key] = torch.zeros(u.shape, dtype=torch.bool)
                continue
            value = getattr(self, name).detach().to("cpu", torch.float64).expand(T, m)
            mask = getattr(self, f"_{name}_mask").cpu()
            out[key] = mask & ((u - value).abs() <= gap_tol)
        if self.n_ineq or any(b.startswith("x") for b in self._bound_names):
            return out
        C, c, C_f, c_f, F = (t.detach() for t in inputs[1:6])
        tau = torch.cat([x[:, :-1], u], -1)
        grad = (C @ tau.unsqueeze(-1)).squeeze(-1) + c  # (B, T, k)
        lam = [(C_f @ x[:, -1].unsqueeze(-1)).squeeze(-1) + c_f]  # λ_T
        for t in reversed(range(T)):
            A_t = F[:, t, :, :n]  # (B, n, n)
            lam.append(grad[:, t, :n] + (A_t.transpose(-1, -2) @ lam[-1].unsqueeze(-1))[..., 0])
        out["costates"] = torch.stack(lam[::-1], 1)
        return out
