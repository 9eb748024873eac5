"""Nonlinear MPC as a differentiable layer: box-constrained forward solve, exact implicit backward.

Two forward solvers share one interface. For a :class:`~diffto.LinearDynamics` with a convex
:class:`~diffto.QuadraticCost` the problem is a box-constrained convex QP, solved exactly by a
primal-dual active-set method whose every iteration is one batched LQR sweep
(:mod:`diffto.layers._active_set`, typically 3–10 sweeps); the backward pass then reuses its last
factorization. Any other dynamics (a module, :class:`~diffto.layers.MujocoDynamics`), any other
cost (:class:`~diffto.NonlinearCost`, :class:`~diffto.LeastSquaresCost`, sums), a nonconvex row,
a row the active-set method did not settle, and ``backward="unroll"`` go to box-DDP
(:mod:`diffto.layers._box_ddp`): iLQR whose backward pass solves each stage's box-constrained QP
in the control, with a line search on the true cost per row. The backward pass differentiates
the KKT conditions at the returned plan (:mod:`diffto.layers._implicit`): one more
equality-constrained LQ solve with the same Riccati machinery, whose Hessian carries the
dynamics curvature, so the gradient is the exact derivative of the solution map; it reaches
every tensor the cost and the dynamics use, registered or closed over.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from diffto.layers._active_set import solve_box_lq
from diffto.layers._box_ddp import solve, stationarity
from diffto.layers._cost_model import CostModel
from diffto.layers._dynamics_model import DynamicsModel
from diffto.layers._implicit import InjectSolution, bad_rows, residual_blocks
from diffto.layers._lq_engine import reduced_gradient
from diffto.problem import (
    LinearDynamics,
    QuadraticCost,
    Solution,
    check_finite,
    check_like,
    check_not_vmapped,
    check_x0,
)

__all__ = ["MPC"]

BackwardMode = Literal["implicit", "unroll"]
HessianMode = Literal["exact", "gauss_newton"]
_ACTIVE_SET_ITERS = 40  # active-set sweeps before a row is handed to box-DDP


def _solve_linear(dyn, cost, x0, lo, hi, u_init, max_iter, tol, exact) -> dict:
    """Active-set LQ solve of a batch with affine dynamics and a quadratic cost; rows it leaves
    unsettled (nonconvex, or not converged within :data:`_ACTIVE_SET_ITERS` sweeps) are re-solved
    by box-DDP from the clamped last iterate, with the remaining iteration budget. Returns the
    dict of :func:`~diffto.layers._box_ddp.solve`, plus the factorization when every row
    settled."""
    B, T, m = u_init.shape
    F = dyn.F.expand(B, *dyn.F.shape[1:])
    f = x0.new_zeros(F.shape[:-1]) if dyn.f is None else dyn.f.expand(*F.shape[:-1])
    out = solve_box_lq(x0, cost.C, cost.c, cost.C_f, cost.c_f, F, f, lo, hi, u_init,
                       min(max_iter, _ACTIVE_SET_ITERS), tol)
    out["regularization"] = x0.new_zeros(B)
    out["stalled"] = torch.zeros_like(out["converged"])
    redo = (~out["converged"]).nonzero().squeeze(-1)
    rows = torch.arange(B, device=x0.device)
    q = cost.quadratize(rows, out["x"], out["u"])[1]
    out["residual"] = stationarity(out["u"], reduced_gradient(q, F, out["costates"]), lo, hi,
                                   cost.control_scale(cost.C, torch.finfo(x0.dtype).eps))
    out["jacobians"] = F
    if len(redo) == 0:
        return out
    out["value"] = out["Q_uu"] = x0.new_zeros(0)  # the factorization no longer fits every row
    budget = max_iter - out["iterations"][redo]
    # Rows that never took an active-set step (nonconvex) restart from their own warm start.
    start = torch.where(out["convex"][redo].view(-1, 1, 1), out["u"][redo], u_init[redo])
    sub_dyn = DynamicsModel(dyn.n, dyn.m, F=F[redo], f=f[redo])
    sub_cost = CostModel(QuadraticCost(cost.C[redo], cost.c[redo], cost.C_f[redo],
                                       cost.c_f[redo]), len(redo), dyn.n, dyn.m, x0)
    sub = solve(sub_dyn, sub_cost, x0[redo], lo[redo], hi[redo], start,
                max(int(budget.min()), 0), tol, exact)
    for key, value in sub.items():
        if key in out and key != "jacobians":
            merged = out[key].clone()
            merged[redo] = value + out[key][redo] if key == "iterations" else value
            out[key] = merged
    return out


class MPC(nn.Module):
    r"""Differentiable nonlinear MPC with control bounds (box-DDP forward, implicit backward).

    Solves, for every batch row,

    .. math::

        \min_{x, u} \sum_{t=0}^{T-1} \ell(x_t, u_t) + \ell_T(x_T)
        \quad \text{s.t.} \quad x_{t+1} = f(x_t, u_t),\; x_0 = x_\text{init},\;
        \underline{u}_t \le u_t \le \overline{u}_t,

    for a :class:`~diffto.QuadraticCost` (``ℓ = ½τᵀC_tτ + c_tᵀτ``, ``τ_t = [x_t; u_t]``), a
    :class:`~diffto.NonlinearCost` (any twice differentiable stage and terminal functions,
    quadratized exactly at each iterate, indefinite stages projected onto the PSD cone), a
    :class:`~diffto.LeastSquaresCost` (Gauss-Newton models) or a sum of them. With a
    :class:`~diffto.LinearDynamics` and a quadratic cost the problem is a convex QP, solved
    exactly by a primal-dual active-set method (each iteration one batched LQR sweep with the
    clamped controls eliminated, typically 3–10 of them). Otherwise the solver is box-DDP: iLQR
    whose backward pass solves each stage's box-constrained QP in :math:`u` (clamped controls get
    zero feedback gain) and whose forward pass line-searches the true cost, per row.

    Gradients are the exact derivative of the solution map, by implicit differentiation of the
    KKT conditions (dynamics curvature included) at the returned plan. They reach ``x0``, the
    bounds (where active), and *every tensor the cost and the dynamics use*: cost tensors, module
    parameters and plain tensors they close over (a goal, a mass), registered or not. The warm
    start gets none (the optimum does not depend on it).

    Dynamics protocol: a :class:`~diffto.LinearDynamics` (time-varying, may be batched), or a
    callable/``nn.Module`` ``(x (N, n), u (N, m)) -> x_next (N, n)`` row by row (time-invariant;
    called on any number of rows, e.g. all ``B·T`` stages at once) that either

    * defines ``jacobians(x (N, n), u (N, m)) -> (A (N, n, n), B (N, n, m))``, used for the
      linearization; the curvature comes from differentiating them with autograd, and is
      dropped where they carry no graph (:class:`~diffto.layers.MujocoDynamics`: its
      finite-difference Jacobians have no second derivative; gradients then neglect the term
      ``Σ λ_i ∇²f_i`` of the adjoint Hessian, and the forward solve is Gauss-Newton in the
      dynamics); or
    * is twice differentiable with torch: linearized by ``torch.func`` when it is
      ``vmap``-able, by reverse passes of autograd otherwise.

    A dynamics that declares ``u_lower`` / ``u_upper`` (the controls it accepts, e.g. MuJoCo's
    ``ctrlrange``) requires the MPC's bounds to lie inside them.

    Args:
        dynamics: the default dynamics (see above); ``None`` if every call passes its own.
        horizon: ``T``.
        u_lower, u_upper: control bounds, a float or a tensor broadcasting to ``(B, T, m)``;
            ``None`` means unbounded (a lower bound of ``-inf`` as well). Tensors are buffers
            (saved in ``state_dict``, moved by ``.to()``); one that requires grad receives
            gradients.
        max_iter: the largest number of iLQR (or active-set) steps per row.
        tol: a row has converged when its Newton step satisfies
            ``max|k| <= tol · (1 + max|u|)`` and, if that step was regularized, its projected
            gradient (``extras["residual"]``, in control units) meets the same bound (the
            active-set solver also stops, exactly, when its active set repeats); ``None``
            means 1e-7 in float64, 1e-4 otherwise.
        backward: ``"implicit"`` (KKT differentiation at the returned plan, the default) or
            ``"unroll"`` (plain autograd through every iteration: the derivative of the
            algorithm as run, so it also reaches ``u_init``; it matches ``"implicit"`` at
            tight tolerances and costs memory proportional to the iterations).
        hessian: ``"exact"`` adds the dynamics curvature ``Σ_i λ_{t+1,i} ∇²f_i`` to the stage
            Hessians in the forward solve (Newton DDP-like steps, quadratic local convergence),
            ``"gauss_newton"`` drops it there (classic iLQR: cheaper steps, linear
            convergence; the backward stays exact). Both are the same for ``LinearDynamics``.

    ``mpc(x0 (B, n), cost, dynamics=None, u_init=None)`` (the call contract of every diffto
    layer) returns a :class:`~diffto.Solution` with ``x (B, T+1, n)``, ``u (B, T, m)``,
    ``cost (B,)``, ``converged (B,)``, ``iterations (B,)`` and extras ``costates (B, T+1, n)``
    (the multipliers λ of the dynamics), ``gains (B, T, m, n)`` and ``feedforward (B, T, m)`` of
    the last sweep (the feedback law ``u = u* + K (x − x*)`` about the plan, and the last step
    of the controls, about zero at convergence), ``active_lower`` / ``active_upper (B, T, m)``
    (controls held at a bound), ``residual (B,)`` (the projected-gradient optimality measure,
    unregularized), ``regularization (B,)`` (the Levenberg-Marquardt factor left on ``Q_uu``) and
    ``stalled (B,)`` (stopped before ``max_iter`` without converging). A row that did not
    converge keeps its last iterate and still gets gradients (those of the KKT system at that
    iterate); a row whose plan is not finite (e.g. the dynamics returned NaN) is flagged and
    contributes zero gradient, to its own inputs and to shared ones. Receding horizon: pass
    ``u_init=previous.shifted()`` (:meth:`~diffto.Solution.shifted`) to warm-start the next call.

    Transforms: under ``torch.compile`` the layer runs eagerly (a graph break: its iterations
    have data-dependent control flow); ``torch.func.vmap`` is refused with a clear error (the
    layer is batched already: stack problems along ``B``).
    """

    def __init__(
        self,
        dynamics: nn.Module | LinearDynamics | None = None,
        horizon: int | None = None,
        u_lower: float | Tensor | None = None,
        u_upper: float | Tensor | None = None,
        max_iter: int = 50,
        tol: float | None = None,
        backward: BackwardMode = "implicit",
        hessian: HessianMode = "exact",
    ) -> None:
        super().__init__()
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
        self.horizon = horizon
        _check_dynamics("dynamics", dynamics, horizon, allow_none=True)
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
        if tol is not None and not (isinstance(tol, int | float) and tol > 0):
            raise ValueError(f"tol must be > 0, got {tol!r}")
        if backward not in ("implicit", "unroll"):
            raise ValueError(f"backward must be 'implicit' or 'unroll', got {backward!r}")
        if hessian not in ("exact", "gauss_newton"):
            raise ValueError(f"hessian must be 'exact' or 'gauss_newton', got {hessian!r}")
        for name, b, bad in (("u_lower", u_lower, float("inf")),
                             ("u_upper", u_upper, float("-inf"))):
            if b is None:
                continue
            if not isinstance(b, int | float | Tensor) or isinstance(b, bool):
                raise ValueError(f"{name} must be a float, a tensor or None, got {type(b)}")
            bt = torch.as_tensor(b)
            if torch.isnan(bt).any():
                raise ValueError(f"{name} contains NaN")
            if (bt == bad).any():
                raise ValueError(f"{name} must not be {bad} (no control would be feasible); "
                                 "use None for an unbounded side")
        if u_lower is not None and u_upper is not None:
            if (torch.as_tensor(u_lower) > torch.as_tensor(u_upper)).any():
                raise ValueError("u_lower must be <= u_upper everywhere")
        self.dynamics = dynamics
        self.max_iter, self.tol, self.backward, self.hessian = max_iter, tol, backward, hessian
        for name, b in (("u_lower", u_lower), ("u_upper", u_upper)):
            if isinstance(b, Tensor):
                self.register_buffer(name, b if b.requires_grad else b.clone())
            else:
                setattr(self, name, None if b is None else float(b))

    def _apply(self, fn, recurse=True):
        # A LinearDynamics is not a module: move and cast its tensors with the layer's.
        if isinstance(self.dynamics, LinearDynamics):
            F, f = self.dynamics.F, self.dynamics.f
            self.dynamics = LinearDynamics(fn(F), None if f is None else fn(f))
        return super()._apply(fn, recurse)

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

    @torch.compiler.disable
    def forward(self, x0: Tensor, cost, dynamics: nn.Module | LinearDynamics | None = None,
                u_init: Tensor | None = None) -> Solution:
        """Solve the batch; ``x0 (B, n)`` (or ``(n,)``), ``u_init (B, T, m)`` or ``(T, m)``."""
        if isinstance(x0, Tensor):
            check_not_vmapped("MPC", x0)
        dynamics = self.dynamics if dynamics is None else dynamics
        if dynamics is None:
            raise ValueError("dynamics must be given, at construction or per call; got None")
        _check_dynamics("dynamics", dynamics, self.horizon)
        x0 = check_x0(x0)
        B, n = x0.shape
        T = self.horizon
        m = _control_dim(cost, dynamics, n)
        if isinstance(cost, QuadraticCost):
            _check_quadratic(cost, x0, n, m, T)
        elif not (hasattr(cost, "derivatives") and hasattr(cost, "gradients")):
            raise ValueError(
                "cost must be a QuadraticCost, NonlinearCost, LeastSquaresCost or a sum of "
                f"them, got {type(cost).__name__}"
            )
        lo = self._bound("u_lower", self.u_lower, B, m, x0)
        hi = self._bound("u_upper", self.u_upper, B, m, x0)
        _check_control_limits(dynamics, lo, hi, m)
        F = f = None
        if isinstance(dynamics, LinearDynamics):
            if (dynamics.n_state, dynamics.n_ctrl) != (n, m):
                raise ValueError(
                    f"dynamics.F has shape {tuple(dynamics.F.shape)} (n={dynamics.n_state}, "
                    f"m={dynamics.n_ctrl}) but x0 and cost give n={n}, m={m}"
                )
            F, f = dynamics.batched()
            if F.shape[0] not in (1, B) or (f is not None and f.shape[0] not in (1, B)):
                raise ValueError(f"dynamics.F/f must have batch 1 or {B}, got {tuple(F.shape)}")
            check_like(x0, {"dynamics.F": F, "dynamics.f": f})
            dyn = DynamicsModel(n, m, F=F.expand(B, *F.shape[1:]),
                                f=None if f is None else f.expand(B, *f.shape[1:]))
        else:
            if isinstance(dynamics, nn.Module):
                for k, p in dynamics.named_parameters():
                    if p.is_floating_point() and (p.dtype != x0.dtype or p.device != x0.device):
                        raise ValueError(
                            f"dynamics parameter {k!r} has dtype {p.dtype} on {p.device} but x0 "
                            f"has {x0.dtype} on {x0.device}: move the module with .to()"
                        )
            dyn = DynamicsModel(n, m, fn=dynamics)
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
        inf = torch.full((B, T, m), float("inf"), dtype=x0.dtype, device=x0.device)
        lo_b = -inf if lo is None else lo.expand(B, T, m)
        hi_b = inf if hi is None else hi.expand(B, T, m)
        exact = self.hessian == "exact"
        if self.backward == "unroll" and torch.is_grad_enabled():
            model = CostModel(cost, B, n, m, x0)
            out = solve(dyn, model, x0, lo_b, hi_b, u_init, self.max_iter, tol, exact,
                        create_graph=True)
            return _solution(cost, out, out["x"], out["u"])
        with torch.no_grad():
            model = CostModel(cost, B, n, m, x0.detach())
            args = (x0.detach(), lo_b.detach(), hi_b.detach(), u_init, self.max_iter, tol, exact)
            if F is not None and model.quadratic:
                out = _solve_linear(dyn, model, *args)
            else:
                out = solve(dyn, model, *args)
        x, u = out["x"], out["u"]
        if torch.is_grad_enabled():
            x, u = _differentiable(cost, dyn, model, x0, out, lo, hi)
        return _solution(cost, out, x, u)


def _differentiable(cost, dyn, model, x0, out, lo, hi):
    """``(x*, u*)`` carrying the implicit gradient (:mod:`diffto.layers._implicit`), or the
    plain plan when nothing it depends on requires grad."""
    x, u, lam = out["x"], out["u"], out["costates"]
    act_lo, act_hi = out["at_lower"], out["at_upper"]
    with torch.no_grad():
        J = out["jacobians"].expand(x.shape[0], *out["jacobians"].shape[1:])
        bad = bad_rows(x, u, lam, J)
    y = residual_blocks(cost, dyn, x0, x, u, lam, lo, hi, act_lo, act_hi, bad)
    if not any(t.requires_grad for t in y):
        return x, u
    with torch.no_grad():
        B, T, m = u.shape
        xs, us, ls = (torch.where(bad.view(-1, 1, 1), 0, t) for t in (x, u, lam))
        if model.quadratic:
            H, H_f = model.C, model.C_f
        else:
            H, _, H_f, _ = cost.derivatives(xs, us, "exact")
        curv = dyn.curvature(xs[:, :-1], us, ls[:, 1:])
        H = H if curv is None else H + curv
        J = torch.where(bad.view(-1, 1, 1, 1), 0, J)
        k = H.shape[-1]
        eye = torch.eye(k, dtype=H.dtype, device=H.device)
        H = torch.where(bad.view(-1, 1, 1, 1), eye, H.expand(B, T, k, k))
        H_f = torch.where(bad.view(-1, 1, 1), 0, H_f.expand(B, *H_f.shape[1:]))
        factored = "value" in out and out["value"].numel() > 0 and not bad.any()
        empty = x.new_zeros(0)
        K, value, Q_uu = ((out["gains"], out["value"], out["Q_uu"]) if factored
                          else (empty, empty, empty))
    return InjectSolution.apply(x, u, H, H_f, J, act_lo, act_hi, bad, K, value, Q_uu, *y)


def _solution(cost, out: dict, x: Tensor, u: Tensor) -> Solution:
    # A row whose plan is not finite reports a NaN cost, but the cost is evaluated at zeros
    # there: its backward then never multiplies a zero gradient by a NaN derivative, which
    # would poison the gradient of a parameter the rows share.
    with torch.no_grad():
        bad = bad_rows(x, u)
    keep = (~bad).view(-1, 1, 1)
    value = cost.evaluate(torch.where(keep, x, 0), torch.where(keep, u, 0))
    value = torch.where(bad, torch.nan, value)
    return Solution(
        x=x, u=u, cost=value, converged=out["converged"],
        iterations=out["iterations"],
        extras=dict(costates=out["costates"], gains=out["gains"],
                    feedforward=out["feedforward"], active_lower=out["at_lower"],
                    active_upper=out["at_upper"], residual=out["residual"],
                    regularization=out["regularization"], stalled=out["stalled"]),
    )


def _check_dynamics(name: str, dynamics, horizon: int, allow_none: bool = False) -> None:
    if dynamics is None and allow_none:
        return
    if isinstance(dynamics, LinearDynamics):
        if dynamics.horizon != horizon:
            raise ValueError(f"{name} has horizon {dynamics.horizon} (F "
                             f"{tuple(dynamics.F.shape)}) but horizon={horizon}")
        return
    if not callable(dynamics):
        raise ValueError(
            f"{name} must be an nn.Module or callable (x, u) -> x_next, or a LinearDynamics, "
            f"got {type(dynamics).__name__}"
        )


def _control_dim(cost, dynamics, n: int) -> int:
    """``m`` from the cost (quadratic), the dynamics (linear, or a module that declares it)."""
    if isinstance(cost, QuadraticCost):
        return cost.n_tau - n
    if isinstance(dynamics, LinearDynamics):
        return dynamics.n_ctrl
    for attr in ("n_ctrl", "nu", "m"):
        m = getattr(dynamics, attr, None)
        if isinstance(m, int) and m >= 1:
            return m
    for attr in ("u_lower", "u_upper"):
        b = getattr(dynamics, attr, None)
        if isinstance(b, Tensor) and b.dim() == 1:
            return b.shape[0]
    raise ValueError(
        "cannot tell the control dimension m: with a NonlinearCost/LeastSquaresCost the "
        "dynamics must declare it (an int attribute n_ctrl) or be a LinearDynamics"
    )


def _check_quadratic(cost: QuadraticCost, x0: Tensor, n: int, m: int, T: int) -> None:
    if m < 1:
        raise ValueError(f"cost.C has size {cost.n_tau} in its last dims but x0 has n={n}: "
                         "expected n+m with m >= 1")
    if cost.horizon != T:
        raise ValueError(f"cost.C has horizon {cost.horizon} but the MPC horizon is {T}")
    check_like(x0, {f"cost.{name}": getattr(cost, name)
                    for name in ("C", "c", "C_final", "c_final")})
    cost.expanded(x0.shape[0], n, m)  # shape and batch checks of every cost tensor
    cost.check_control_pd(n, m)


def _check_control_limits(dynamics, lo: Tensor | None, hi: Tensor | None, m: int) -> None:
    """A dynamics that only accepts controls in ``[u_lower, u_upper]`` (MuJoCo's ctrlrange:
    outside it the control is clamped and its Jacobian is zero) needs the MPC's bounds inside."""
    for attr, bound, inside in (("u_lower", lo, torch.ge), ("u_upper", hi, torch.le)):
        limit = getattr(dynamics, attr, None)
        if not isinstance(limit, Tensor) or not torch.isfinite(limit).any():
            continue
        if limit.shape[-1] != m:
            raise ValueError(f"dynamics.{attr} has {limit.shape[-1]} entries but m={m}")
        lim = limit.to(dtype=torch.float64, device="cpu")
        if bound is None:
            raise ValueError(
                f"the dynamics accepts controls only within dynamics.{attr} = {lim.tolist()}: "
                f"give the MPC {attr} inside it"
            )
        b = bound.detach().to(dtype=torch.float64, device="cpu")
        finite = torch.isfinite(lim)
        if not inside(b, lim).logical_or(~finite).all():
            raise ValueError(
                f"MPC {attr} must lie inside dynamics.{attr} = {lim.tolist()} (the controls "
                "the dynamics accepts)"
            )
