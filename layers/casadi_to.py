"""Trajectory optimization as a CasADi NLP: the standard problem of :mod:`diffto.problem`
(``x0``, a cost, dynamics, state and control bounds) built on
:class:`~diffto.layers.casadi.CasadiNLP`, so its gradients are the NLP's exact KKT
sensitivities.

**Costs.** A :class:`~diffto.QuadraticCost` is written symbolically (its tensors are NLP
parameters). Any other cost speaking the cost protocol of :mod:`diffto.costs`
(:class:`~diffto.NonlinearCost`, :class:`~diffto.LeastSquaresCost`, sums) enters the NLP as a
**torch-evaluated callback**, not a symbolic twin: a twin would make the user write every cost
twice (once in torch for the other layers, once in CasADi) and could not express a cost that
calls torch code such as pytorch-kinematics' FK; a callback runs the user's own module. IPOPT
gets exact first and second derivatives from it (``cost.derivatives(..., "exact")``, block
diagonal over the stages, which is the sparsity declared), and the backward pass gets the
cost's parameter derivatives by residual injection (see :mod:`diffto.layers.casadi`): after the
solve the cost gradient ``∇_w J(w*, θ)`` is recomputed with a graph to every tensor the cost
uses, so gradients reach its module parameters and everything it closes over (goals, weights).

The price of the callback: IPOPT solves the rows one after the other and a callback evaluates
the cost on the whole batch (the other rows held at their current iterates, the cost being
row-separable), so each evaluation costs one batched torch call. That is the right trade at the
small batches this backend serves; use :class:`~diffto.layers.MPC` for large ones.
"""

from __future__ import annotations

from typing import Any

import casadi as ca
import numpy as np
import torch
from torch import Tensor, nn

from diffto.layers._casadi_torch_cost import CostValue, Layout, TorchObjective
from diffto.layers._implicit import bad_rows
from diffto.layers.casadi import CasadiNLP, nlp_solution, solve_nlp
from diffto.problem import (
    LinearDynamics,
    QuadraticCost,
    Solution,
    check_bounds,
    check_finite,
    check_x0,
    problem_dims,
)

__all__ = ["CasadiTO"]


def _time_bound(name: str, value: Any, T: int, k: int, default: float) -> np.ndarray:
    """A bound as float64 ``(b, T, k)``, from a scalar, ``(k,)``, ``(T, k)`` or ``(B, T, k)``."""
    if value is None:
        return np.full((1, T, k), default)
    if isinstance(value, Tensor):
        value = value.detach().cpu().double().numpy()
    arr = np.asarray(value, dtype=np.float64)
    bad_k = arr.ndim >= 1 and arr.shape[-1] != k
    if arr.ndim > 3 or bad_k or (arr.ndim >= 2 and arr.shape[-2] != T):
        raise ValueError(
            f"{name} must be a scalar, ({k},), ({T}, {k}) or (B, {T}, {k}), got {arr.shape}"
        )
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return np.broadcast_to(arr, (*arr.shape[:-2], T, k) if arr.ndim == 3 else (1, T, k)).copy()


def _bound_rows(value: Any, T: int, k: int, default: float, like: Tensor) -> Tensor:
    """A bound as a tensor ``(b, T·k)`` (``b`` = 1 or B), differentiable if ``value`` is."""
    if value is None:
        return like.new_full((1, T * k), default)
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.dim() < 3:
        value = value.expand(T, k).unsqueeze(0)
    return value.reshape(value.shape[0], T * k)


class _Built:
    """One NLP of the layer: ``quadratic`` (symbolic cost) or ``general`` (torch callback)."""

    def __init__(self, nlp: CasadiNLP, rollout: Any, duals: Any, objective: Any = None) -> None:
        self.nlp, self.rollout, self.duals, self.objective = nlp, rollout, duals, objective
        self.callback: Any = None


class CasadiTO(nn.Module):
    """Trajectory optimization through IPOPT (or another ``nlpsol`` plugin), differentiable.

    Solves, for each batch row,

    .. math::

        \\min_{x_{1:T}, u_{0:T-1}} \\sum_{t<T} \\ell_t(x_t, u_t) + \\ell_T(x_T)
        \\quad\\text{s.t.}\\quad x_{t+1} = \\phi(x_t, u_t),\\;
        u_\\text{lo} \\le u_t \\le u_\\text{hi},\\; x_\\text{lo} \\le x_{t+1} \\le x_\\text{hi},

    as a :class:`CasadiNLP` (decision variables ``w = [x_1..x_T, u_0..u_{T-1}]``), with a
    :class:`~diffto.QuadraticCost` (symbolic) or any cost of :mod:`diffto.costs` (a torch
    callback, see the module docstring). Gradients reach ``x0``, the cost (its tensors, or
    every tensor a general cost uses), the dynamics parameters and bound tensors that require
    grad; exact at a regular optimum (see :class:`~diffto.layers.casadi.CasadiNLP`).

    Args:
        dynamics: ``None`` (or ``"linear"``): each call passes a
            :class:`~diffto.problem.LinearDynamics`, whose ``F``, ``f`` become parameters; a
            :class:`~diffto.problem.LinearDynamics`: the same, used when a call passes none.
            Otherwise a Python function ``(x, u) -> x_next`` written with CasADi operations on
            columns ``x (n, 1)``, ``u (m, 1)`` (valid for ``SX`` and ``MX``); with
            ``n_theta > 0`` it is called as ``(x, u, theta)`` and each call passes ``theta``
            as its ``dynamics`` argument, a tensor ``(B, n_theta)``.
        horizon: T.
        n, m: state and control dimensions (``None``: taken from a ``LinearDynamics``).
        u_lower, u_upper: control bounds, a scalar, ``(m,)``, ``(T, m)`` or ``(B, T, m)``;
            ``None`` = none. A tensor that requires grad receives gradients.
        x_lower, x_upper: bounds on ``x_1..x_T`` (``x_0`` is given), a scalar, ``(n,)``,
            ``(T, n)`` or ``(B, T, n)``; tensors that require grad receive gradients.
        n_theta: number of dynamics parameters of a CasADi dynamics function.
        solver, options, max_iter, warm_start, active_tol: as in :class:`CasadiNLP`.

    Call as ``layer(x0, cost, dynamics=None, u_init=None) -> Solution`` with ``x0 (B, n)``, a
    cost of horizon T, the dynamics (or theta) for this call, and ``u_init (B, T, m)`` (each
    row then starts from its own rollout of ``u_init``; without it row 0 starts from the
    rollout of ``u = 0`` and, with ``warm_start``, later rows from the previous row's
    solution). ``Solution.extras``: ``costates (B, T+1, n)`` (the multipliers λ of
    ``x_0 = x0`` and of the dynamics, in MPC's sign convention: ``λ_T = ∇ℓ_T``),
    ``active_lower``/``active_upper (B, T, m)`` bool (control bounds whose multiplier exceeds
    ``active_tol``), ``active_state_lower``/``active_state_upper (B, T, n)`` (the same for the
    state bounds on ``x_1..x_T``), ``residual (B,)`` (``‖∇_w ℒ‖_∞``, the stationarity of the
    Lagrangian with the bound multipliers, unregularized) and ``status`` (the solver's return
    status per row). None of the extras carries gradients.

    Example::

        >>> import casadi as ca, torch
        >>> from diffto import QuadraticCost
        >>> from diffto.layers import CasadiTO
        >>> def pendulum(x, u, theta):  # CasADi ops; theta = [g/l]
        ...     return ca.vertcat(x[0] + 0.1 * x[1], x[1] + 0.1 * (u[0] - theta[0] * ca.sin(x[0])))
        >>> layer = CasadiTO(pendulum, 10, 2, 1, n_theta=1, u_lower=-2.0, u_upper=2.0)
        >>> cost = QuadraticCost.tracking(torch.ones(2), 0.1 * torch.ones(1), 10,
        ...                               x_goal=torch.tensor([3.14, 0.0]))
        >>> sol = layer(torch.zeros(4, 2), cost, torch.full((4, 1), 9.81))
        >>> sol.u.shape, bool(sol.converged.all())
        (torch.Size([4, 10, 1]), True)
    """

    def __init__(
        self,
        dynamics: Any,
        horizon: int,
        n: int | None = None,
        m: int | None = None,
        u_lower: Any = None,
        u_upper: Any = None,
        x_lower: Any = None,
        x_upper: Any = None,
        n_theta: int = 0,
        solver: str = "ipopt",
        options: dict[str, Any] | None = None,
        max_iter: int | None = 500,
        warm_start: bool = True,
        active_tol: float = 1e-7,
    ) -> None:
        super().__init__()
        self.default_dynamics = dynamics if isinstance(dynamics, LinearDynamics) else None
        if self.default_dynamics is not None:
            n = dynamics.n_state if n is None else n
            m = dynamics.n_ctrl if m is None else m
            if (n, m) != (dynamics.n_state, dynamics.n_ctrl) or dynamics.horizon != horizon:
                raise ValueError(
                    f"dynamics.F has shape {tuple(dynamics.F.shape)}, expected "
                    f"(B, {horizon}, {n}, {n + m})"
                )
        if n is None or m is None:
            raise ValueError("n and m are required unless dynamics is a LinearDynamics")
        if horizon < 1 or n < 1 or m < 1:
            raise ValueError(f"horizon, n, m must be >= 1, got {horizon}, {n}, {m}")
        if n_theta < 0:
            raise ValueError(f"n_theta must be >= 0, got {n_theta}")
        self.linear = dynamics is None or isinstance(dynamics, LinearDynamics) or (
            isinstance(dynamics, str) and dynamics == "linear"
        )
        if not self.linear and not callable(dynamics):
            raise ValueError(
                "dynamics must be None, 'linear', a LinearDynamics or a CasADi function "
                f"(x, u) -> x_next, got {type(dynamics).__name__}"
            )
        if self.linear and n_theta:
            raise ValueError("n_theta applies to a CasADi dynamics function, not linear dynamics")
        T = horizon
        self.T, self.n, self.m, self.n_theta = T, n, m, n_theta
        self._fn = None if self.linear else dynamics
        lo_u, hi_u = (
            _time_bound(nm, v, T, m, d)
            for nm, v, d in (("u_lower", u_lower, -np.inf), ("u_upper", u_upper, np.inf))
        )
        lo_x, hi_x = (
            _time_bound(nm, v, T, n, d)
            for nm, v, d in (("x_lower", x_lower, -np.inf), ("x_upper", x_upper, np.inf))
        )
        check_bounds(torch.as_tensor(lo_u), torch.as_tensor(hi_u), m)
        check_bounds(torch.as_tensor(lo_x), torch.as_tensor(hi_x), n, ("x_lower", "x_upper"))
        # Kept as given: a tensor that requires grad (an nn.Parameter is registered) gets
        # gradients through the NLP's bound sensitivities.
        self.u_lower, self.u_upper, self.x_lower, self.x_upper = u_lower, u_upper, x_lower, x_upper
        self._nlp_options = dict(
            solver=solver, options=options, max_iter=max_iter, warm_start=warm_start,
            active_tol=active_tol,
        )
        self.layout = Layout(T, n, m)
        self._built: dict[str, _Built] = {}
        self._build("quadratic")  # checks a dynamics function's output size once, here

    def _step(self, x: Any, u: Any, t: int, F: Any, f: Any, theta: Any) -> Any:
        """One dynamics step on CasADi columns."""
        n, k = self.n, self.n + self.m
        if self.linear:
            # casadi reshapes column-major: reshape(., k, n).T reads a row-major (n, k).
            F_t = ca.reshape(F[t * n * k : (t + 1) * n * k], k, n).T
            return F_t @ ca.vertcat(x, u) + f[t * n : (t + 1) * n]
        out = self._fn(x, u, theta) if self.n_theta else self._fn(x, u)
        out = ca.vertcat(*out) if isinstance(out, (list, tuple)) else out
        if out.numel() != n:
            raise ValueError(f"dynamics must return {n} entries, got {out.numel()}")
        return ca.reshape(out, n, 1)

    def _build(self, kind: str) -> _Built:
        """Build (once) the NLP for a ``"quadratic"`` or a ``"general"`` (torch) cost.

        Parameter vector ``p``, each part flattened row-major as torch does: ``x0 (n)``, for a
        quadratic cost ``C (T,k,k) | c (T,k) | C_f (n,n) | c_f (n)``, for linear dynamics
        ``F (T,n,k) | f (T,n)``, then ``theta``, and for a general cost the row index."""
        if kind in self._built:
            return self._built[kind]
        T, n, m, k = self.T, self.n, self.m, self.n + self.m
        Sym = ca.SX if kind == "quadratic" else ca.MX  # a callback needs MX
        x0 = Sym.sym("x0", n)
        parts = [x0]
        if kind == "quadratic":
            C, c = Sym.sym("C", T * k * k), Sym.sym("c", T * k)
            C_f, c_f = Sym.sym("C_f", n * n), Sym.sym("c_f", n)
            parts += [C, c, C_f, c_f]
        F = f = None
        if self.linear:
            F, f = Sym.sym("F", T * n * k), Sym.sym("f", T * n)
            parts += [F, f]
        theta = Sym.sym("theta", self.n_theta)
        parts.append(theta)
        row = Sym.sym("row", 1 if kind == "general" else 0)
        parts.append(row)
        p = ca.vertcat(*parts)
        X, U = Sym.sym("x", T * n), Sym.sym("u", T * m)
        w = ca.vertcat(X, U)
        obj, gs, x_t, x_roll, rolled = Sym(0), [], x0, [], x0
        for t in range(T):
            u_t = U[t * m : (t + 1) * m]
            if kind == "quadratic":
                tau = ca.vertcat(x_t, u_t)
                C_t = ca.reshape(C[t * k * k : (t + 1) * k * k], k, k).T
                obj += 0.5 * ca.dot(tau, C_t @ tau) + ca.dot(c[t * k : (t + 1) * k], tau)
            x_next = X[t * n : (t + 1) * n]
            gs.append(x_next - self._step(x_t, u_t, t, F, f, theta))
            x_t = x_next
            rolled = self._step(rolled, u_t, t, F, f, theta)
            x_roll.append(rolled)
        external = objective = None
        if kind == "quadratic":
            obj += 0.5 * ca.dot(x_t, ca.reshape(C_f, n, n).T @ x_t) + ca.dot(c_f, x_t)
        else:
            objective = TorchObjective(self.layout)
            callback = CostValue("torch_cost", objective)
            external = callback(w, row)
        g = ca.vertcat(*gs)
        lam = Sym.sym("lam_g", T * n)
        nlp = CasadiNLP(w, p, obj, g, external=external, **self._nlp_options)
        built = _Built(
            nlp,
            ca.Function("rollout", [p, U], [ca.vertcat(*x_roll)]),
            # The symbolic parts of λ_0 = ∇_{x0} (f + λ_gᵀ g) and of ∇_w (f + λ_gᵀ g)
            ca.Function("duals", [w, p, lam], [ca.gradient(obj + ca.dot(lam, g), x0),
                                               ca.gradient(obj + ca.dot(lam, g), w)]),
            objective,
        )
        if kind == "general":
            built.callback = callback  # CasADi keeps no Python reference
        self._built[kind] = built
        return built

    def _dynamics_parameters(self, dynamics: Any, B: int, T: int, n: int, m: int,
                             like: Tensor) -> tuple[list[Tensor], list[str]]:
        """The dynamics part of the NLP parameters (``F, f`` or ``theta``), each ``(b, ·)``."""
        if self.linear:
            dynamics = self.default_dynamics if dynamics is None else dynamics
            if not isinstance(dynamics, LinearDynamics):
                raise ValueError(
                    "dynamics must be a LinearDynamics for this layer (given per call or at "
                    f"construction), got {type(dynamics).__name__}"
                )
            if (dynamics.horizon, dynamics.n_state, dynamics.n_ctrl) != (T, n, m):
                raise ValueError(
                    f"dynamics.F must have shape (B, {T}, {n}, {n + m}), "
                    f"got {tuple(dynamics.F.shape)}"
                )
            F, f = dynamics.batched()
            return [F, like.new_zeros(1, T, n) if f is None else f], ["dynamics.F", "dynamics.f"]
        if self.n_theta:
            if not isinstance(dynamics, Tensor) or dynamics.shape[-1] != self.n_theta:
                raise ValueError(
                    f"dynamics must be the parameter tensor theta of shape (B, {self.n_theta})"
                )
            check_finite("dynamics", dynamics)
            return [dynamics.reshape(-1, self.n_theta)], ["dynamics"]
        if dynamics is not None:
            raise ValueError("dynamics must be None: this layer's dynamics is fixed")
        return [], []

    def _nlp_parameters(self, x0: Tensor, cost: Any, dynamics: Any) -> tuple[Tensor, str]:
        """Check the call; stack the NLP parameters ``(B, n_p)``; say which NLP serves it."""
        T, n, m = self.T, self.n, self.m
        if isinstance(cost, QuadraticCost):
            B, T_c, n, m_c = problem_dims(x0, cost, self.n)
            if T_c != T:
                raise ValueError(f"cost has horizon {T_c} but the layer was built for {T}")
            if m_c != m:
                raise ValueError(f"cost.C has size {n + m_c}, expected n+m = {n + m}")
            cost.check_control_pd(n, m)
            kind = "quadratic"
        elif hasattr(cost, "evaluate") and hasattr(cost, "derivatives"):
            B = check_x0(x0, n).shape[0]
            horizon = getattr(cost, "horizon", None)
            if horizon is not None and horizon != T:
                raise ValueError(f"cost has horizon {horizon} but the layer was built for {T}")
            kind = "general"
        else:
            raise ValueError(
                "cost must be a QuadraticCost, NonlinearCost, LeastSquaresCost or a sum of "
                f"them, got {type(cost).__name__}"
            )
        x0 = x0.reshape(-1, n)
        parts, names = [x0], ["x0"]
        if kind == "quadratic":
            parts += list(cost.expanded(B, n, m))
            names += ["C", "c", "C_final", "c_final"]
        dyn, dyn_names = self._dynamics_parameters(dynamics, B, T, n, m, x0)
        parts += dyn
        names += dyn_names
        for name, t in zip(names, parts, strict=True):
            if t.shape[0] not in (1, B):
                raise ValueError(f"{name} has batch {t.shape[0]} but x0 has batch {B}")
        dtype = torch.promote_types(x0.dtype, torch.float32)
        flat = [t.reshape(t.shape[0], -1).expand(B, -1).to(dtype) for t in parts]
        if kind == "general":
            flat.append(torch.arange(B, dtype=dtype, device=x0.device).unsqueeze(-1))
        return torch.cat(flat, dim=-1), kind

    def forward(
        self,
        x0: Tensor,
        cost: Any,
        dynamics: Any = None,
        u_init: Tensor | None = None,
    ) -> Solution:
        """Solve the batch; see the class docstring for shapes."""
        p, kind = self._nlp_parameters(x0, cost, dynamics)
        built = self._build(kind)
        B, T, n, m = p.shape[0], self.T, self.n, self.m
        x0 = x0.reshape(-1, n).expand(B, n)
        if u_init is None:
            U0 = np.zeros((B, T * m))
        else:
            if not isinstance(u_init, Tensor) or tuple(u_init.shape[-2:]) != (T, m):
                shape = tuple(u_init.shape) if isinstance(u_init, Tensor) else type(u_init)
                raise ValueError(f"u_init must have shape (B, {T}, {m}), got {shape}")
            check_finite("u_init", u_init)
            U0 = u_init.detach().cpu().double().reshape(-1, T * m).numpy()
            U0 = np.broadcast_to(U0, (B, T * m))
        p_np = p.detach().cpu().double().numpy()
        X0 = built.nlp.mapped(built.rollout, B)(p_np.T, U0.T).full().T  # (B, T*n)
        w_init = np.concatenate([X0, U0], axis=1)
        bounds = self._bounds(p, B)
        chain = False if u_init is not None else built.nlp.warm_start
        bounds_np = tuple(b.detach().cpu().double().numpy() for b in bounds)
        if kind == "general":
            self._check_cost(cost, x0, w_init)
            built.objective.bind(cost, x0, w_init)
            try:
                solved = solve_nlp(built.nlp, p_np, w_init, chain, bounds_np)
            finally:
                built.objective.unbind()
            external = self._external(cost, x0, solved[0])
            cost_grad = external[1].detach()
        else:
            solved = solve_nlp(built.nlp, p_np, w_init, chain, bounds_np)
            external = cost_grad = None
        res = nlp_solution(built.nlp, p, bounds, solved, external)
        x = torch.cat([x0.to(res.w.dtype).unsqueeze(1), res.w[:, : T * n].reshape(B, T, n)], 1)
        u = res.w[:, T * n :].reshape(B, T, m)
        extras = self._extras(built, res, bounds_np, p_np, cost, x, u, cost_grad)
        bad = bad_rows(x, u)
        keep = (~bad).view(-1, 1, 1)
        value = cost.evaluate(torch.where(keep, x, 0), torch.where(keep, u, 0))
        value = torch.where(bad, torch.nan, value)
        return Solution(x, u, value, res.converged, res.iterations, extras)

    def _bounds(self, like: Tensor, B: int) -> list[Tensor]:
        """``(lbw, ubw, lbg, ubg)`` rows for the NLP (``lbg = ubg = 0``: the dynamics)."""
        T, n, m = self.T, self.n, self.m
        out = []
        for xb, ub, d in ((self.x_lower, self.u_lower, -np.inf), (self.x_upper, self.u_upper,
                                                                  np.inf)):
            x_rows, u_rows = _bound_rows(xb, T, n, d, like), _bound_rows(ub, T, m, d, like)
            b = max(x_rows.shape[0], u_rows.shape[0])
            if b not in (1, B):
                raise ValueError(f"state/control bounds have batch {b} but x0 has batch {B}")
            out.append(torch.cat([x_rows.expand(b, -1), u_rows.expand(b, -1)], -1))
        zeros = like.new_zeros(1, T * n)
        return [out[0], out[1], zeros, zeros]

    def _check_cost(self, cost: Any, x0: Tensor, w_init: np.ndarray) -> None:
        """Evaluate a torch cost once at the initial guess, so that a cost that does not fit
        the batch fails here, in torch, rather than inside IPOPT's callback."""
        B, T, n, m = x0.shape[0], self.T, self.n, self.m
        W = torch.as_tensor(w_init, dtype=torch.float64, device=x0.device)
        try:
            with torch.no_grad():
                J = cost.evaluate(*self.layout.plan(x0.detach().double(), W))
        except (RuntimeError, IndexError) as err:
            raise ValueError(
                f"cost could not be evaluated on plans x ({B}, {T + 1}, {n}), u ({B}, {T}, {m}): "
                f"{err}"
            ) from err
        if not isinstance(J, Tensor) or J.shape != (B,):
            shape = tuple(J.shape) if isinstance(J, Tensor) else type(J).__name__
            raise ValueError(f"cost.evaluate must return shape ({B},), got {shape}")
        check_finite("cost at the initial guess", J)

    def _external(self, cost: Any, x0: Tensor, w: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """A torch cost's part of the KKT sensitivity at ``w* (B, n_w)``: its Hessian in ``w``
        (no graph), and its gradient and value with a graph to ``x0`` and every tensor the
        cost uses (see :mod:`diffto.layers.casadi`)."""
        dtype = torch.promote_types(x0.dtype, torch.float32)
        # Rows whose solution is not finite are evaluated at zeros: they get no gradient, and
        # a NaN there must not reach a parameter the rows share.
        w = np.where(np.isfinite(w).all(1, keepdims=True), w, 0.0)
        W = torch.as_tensor(w, dtype=dtype, device=x0.device)
        if torch.is_grad_enabled():
            H, _, H_f, _ = cost.derivatives(*self.layout.plan(x0.detach().to(dtype), W), "exact")
            H_w = self.layout.hessian(H.detach(), H_f.detach())
        else:  # no backward pass will ask for it
            H_w = W.new_zeros(W.shape[0], self.layout.n_w, self.layout.n_w)
        with torch.enable_grad():
            W = W.requires_grad_(True)
            J = cost.evaluate(*self.layout.plan(x0.to(dtype), W))
            (r_w,) = torch.autograd.grad(
                J.sum(), W, create_graph=torch.is_grad_enabled(), allow_unused=True
            )
        r_w = torch.zeros_like(W) if r_w is None else r_w
        if not torch.is_grad_enabled():
            r_w, J = r_w.detach(), J.detach()
        return H_w, r_w, J

    def _extras(self, built: _Built, res: Any, bounds_np: tuple, p_np: np.ndarray, cost: Any,
                x: Tensor, u: Tensor, cost_grad: Tensor | None) -> dict[str, Any]:
        """Costates, active sets and the stationarity residual from the multipliers (no
        gradients); ``cost_grad (B, n_w)`` is a torch cost's gradient in ``w`` at the plan."""
        B, T, n, m = x.shape[0], self.T, self.n, self.m
        lam_g = res.lam_g.detach()
        lam0, grad_w = built.nlp.mapped(built.duals, B)(
            res.w.detach().cpu().double().numpy().T, p_np.T, lam_g.cpu().double().numpy().T
        )
        lam0 = torch.as_tensor(lam0.full().T, dtype=x.dtype, device=x.device)
        grad_w = torch.as_tensor(grad_w.full().T, dtype=x.dtype, device=x.device)
        if cost_grad is not None:  # the torch cost's shares: ∂ℓ_0/∂x_0 and ∇_w J
            g, _ = cost.gradients(x.detach(), u.detach())
            lam0 = lam0 + g[:, 0, :n].to(x.dtype)
            grad_w = grad_w + cost_grad.to(x.dtype)
        # Stationarity of the Lagrangian, bound multipliers included: ∇f + J_gᵀλ_g + λ_w = 0
        residual = (grad_w + res.lam_w.detach()).abs().amax(-1)
        # CasADi's Lagrangian is f + λ_gᵀ(x_{t+1} − φ): MPC's λ_{t+1} is −λ_g
        costates = torch.cat([lam0.unsqueeze(1), -lam_g.reshape(B, T, n)], 1)
        lam_w = res.lam_w.detach()
        lo, hi = (torch.as_tensor(np.broadcast_to(b, (B, b.shape[-1])).copy(), device=x.device)
                  for b in bounds_np[:2])
        tol = built.nlp.active_tol
        at_lo = (lam_w < -tol) & torch.isfinite(lo)
        at_hi = (lam_w > tol) & torch.isfinite(hi)
        return {
            "costates": costates,
            "active_lower": at_lo[:, T * n :].reshape(B, T, m),
            "active_upper": at_hi[:, T * n :].reshape(B, T, m),
            "active_state_lower": at_lo[:, : T * n].reshape(B, T, n),
            "active_state_upper": at_hi[:, : T * n].reshape(B, T, n),
            "residual": residual,
            "status": res.status,
        }
