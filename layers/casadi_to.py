"""Trajectory optimization as a CasADi NLP: the standard problem of :mod:`diffto.problem`
(``x0``, :class:`~diffto.QuadraticCost`, dynamics, state and control bounds) built on
:class:`~diffto.layers.casadi.CasadiNLP`, so its gradients are the NLP's exact KKT
sensitivities. Built by :meth:`CasadiNLP.trajectory`.
"""

from __future__ import annotations

from typing import Any

import casadi as ca
import numpy as np
import torch
from torch import Tensor, nn

from diffto.layers.casadi import CasadiNLP
from diffto.problem import (
    LinearDynamics,
    QuadraticCost,
    Solution,
    check_bounds,
    check_finite,
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


class CasadiTO(nn.Module):
    """Trajectory optimization through IPOPT (or another ``nlpsol`` plugin), differentiable.

    Solves, for each batch row,

    .. math::

        \\min_{x_{1:T}, u_{0:T-1}} \\sum_{t<T} \\tfrac12 \\tau_t^\\top C_t \\tau_t
            + c_t^\\top\\tau_t + \\tfrac12 x_T^\\top C_f x_T + c_f^\\top x_T
        \\quad\\text{s.t.}\\quad x_{t+1} = \\phi(x_t, u_t),\\;
        u_\\text{lo} \\le u_t \\le u_\\text{hi},\\; x_\\text{lo} \\le x_{t+1} \\le x_\\text{hi},

    as a :class:`CasadiNLP` whose parameters are ``x0``, the cost tensors and the dynamics
    parameters, so gradients reach all of them (exact at a regular optimum, see
    :class:`_NLPFunction`). Decision variables are ``w = [x_1..x_T, u_0..u_{T-1}]``.

    Args:
        dynamics: ``None`` (or ``"linear"``): each call passes a
            :class:`~diffto.problem.LinearDynamics`, whose ``F``, ``f`` become parameters.
            Otherwise a Python function ``(x, u) -> x_next`` written with CasADi operations on
            columns ``x (n, 1)``, ``u (m, 1)``; with ``n_theta > 0`` it is called as
            ``(x, u, theta)`` and each call passes ``theta`` as a tensor ``(B, n_theta)``.
        horizon: T.
        n, m: state and control dimensions.
        u_lower, u_upper: control bounds, a scalar, ``(m,)``, ``(T, m)`` or ``(B, T, m)``;
            ``None`` = none. A tensor that requires grad receives gradients.
        x_lower, x_upper: bounds on ``x_1..x_T`` (``x_0`` is given), a scalar, ``(n,)``,
            ``(T, n)`` or ``(B, T, n)``; tensors that require grad receive gradients.
        n_theta: number of dynamics parameters of a CasADi dynamics function.
        solver, options, max_iter, warm_start, active_tol: as in :class:`CasadiNLP`.

    Call as ``layer(x0, cost, dynamics=None, u_init=None) -> Solution`` with ``x0 (B, n)``, a
    :class:`~diffto.problem.QuadraticCost` with horizon T, and ``u_init (B, T, m)`` (each row
    then starts from its own rollout of ``u_init``; without it row 0 starts from the rollout
    of ``u = 0`` and, with ``warm_start``, later rows from the previous row's solution).
    ``Solution.extras``: ``status`` (IPOPT return status per row), ``lam_dynamics
    (B, T, n)`` (multipliers of the dynamics constraints, i.e. costates), ``objective (B,)``.

    Example::

        >>> import casadi as ca, torch
        >>> from diffto import QuadraticCost
        >>> from diffto.layers import CasadiNLP
        >>> def pendulum(x, u, theta):  # CasADi ops; theta = [g/l]
        ...     return ca.vertcat(x[0] + 0.1 * x[1], x[1] + 0.1 * (u[0] - theta[0] * ca.sin(x[0])))
        >>> layer = CasadiNLP.trajectory(pendulum, 10, 2, 1, n_theta=1, u_lower=-2.0, u_upper=2.0)
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
        n: int,
        m: int,
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
        if horizon < 1 or n < 1 or m < 1:
            raise ValueError(f"horizon, n, m must be >= 1, got {horizon}, {n}, {m}")
        if n_theta < 0:
            raise ValueError(f"n_theta must be >= 0, got {n_theta}")
        self.linear = dynamics is None or dynamics == "linear"
        if not self.linear and not callable(dynamics):
            raise ValueError("dynamics must be None, 'linear' or a CasADi function (x, u) -> x")
        if self.linear and n_theta:
            raise ValueError("n_theta applies to a CasADi dynamics function, not linear dynamics")
        T, k = horizon, n + m
        self.T, self.n, self.m, self.n_theta = T, n, m, n_theta
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

        # Parameter vector p, in this order (each flattened row-major, as torch does):
        # x0 (n) | C (T,k,k) | c (T,k) | C_f (n,n) | c_f (n) | [F (T,n,k) | f (T,n)] | [theta]
        sym = ca.SX.sym
        x0, C, c = sym("x0", n), sym("C", T * k * k), sym("c", T * k)
        C_f, c_f = sym("C_f", n * n), sym("c_f", n)
        parts = [x0, C, c, C_f, c_f]
        if self.linear:
            F, f = sym("F", T * n * k), sym("f", T * n)
            parts += [F, f]
        theta = sym("theta", n_theta)
        parts.append(theta)
        p = ca.vertcat(*parts)
        X, U = sym("x", T * n), sym("u", T * m)

        def step(x: Any, u: Any, t: int) -> Any:
            if self.linear:
                # casadi reshapes column-major: reshape(., k, n).T reads a row-major (n, k).
                F_t = ca.reshape(F[t * n * k : (t + 1) * n * k], k, n).T
                return F_t @ ca.vertcat(x, u) + f[t * n : (t + 1) * n]
            out = dynamics(x, u, theta) if n_theta else dynamics(x, u)
            out = ca.vertcat(*out) if isinstance(out, (list, tuple)) else out
            if out.numel() != n:
                raise ValueError(f"dynamics must return {n} entries, got {out.numel()}")
            return ca.reshape(out, n, 1)

        obj, gs, x_t, x_roll, rolled = 0, [], x0, [], x0
        for t in range(T):
            u_t = U[t * m : (t + 1) * m]
            tau = ca.vertcat(x_t, u_t)
            C_t = ca.reshape(C[t * k * k : (t + 1) * k * k], k, k).T
            obj += 0.5 * ca.dot(tau, C_t @ tau) + ca.dot(c[t * k : (t + 1) * k], tau)
            x_next = X[t * n : (t + 1) * n]
            gs.append(x_next - step(x_t, u_t, t))
            x_t = x_next
            rolled = step(rolled, u_t, t)
            x_roll.append(rolled)
        obj += 0.5 * ca.dot(x_t, ca.reshape(C_f, n, n).T @ x_t) + ca.dot(c_f, x_t)
        self._rollout = ca.Function("rollout", [p, U], [ca.vertcat(*x_roll)])
        self.nlp = CasadiNLP(
            ca.vertcat(X, U),
            p,
            obj,
            ca.vertcat(*gs),
            solver=solver,
            options=options,
            max_iter=max_iter,
            warm_start=warm_start,
            active_tol=active_tol,
        )

    def _nlp_parameters(self, x0: Tensor, cost: QuadraticCost, dynamics: Any) -> Tensor:
        """Stack ``x0``, cost and dynamics tensors into the NLP parameters ``(B, n_p)``."""
        B, T, n, m = problem_dims(x0, cost, self.n)
        if T != self.T:
            raise ValueError(f"cost has horizon {T} but the layer was built for {self.T}")
        if m != self.m:
            raise ValueError(f"cost.C has size {n + m}, expected n+m = {self.n + self.m}")
        cost.check_control_pd(n, m)
        x0 = x0.reshape(-1, n)
        C, c, C_f, c_f = cost.batched(n, m)
        zeros = x0.new_zeros
        c = zeros(1, T, n + m) if c is None else c
        C_f = zeros(1, n, n) if C_f is None else C_f
        c_f = zeros(1, n) if c_f is None else c_f
        parts = [x0, C, c, C_f, c_f]
        names = ["x0", "C", "c", "C_final", "c_final"]
        if self.linear:
            if not isinstance(dynamics, LinearDynamics):
                raise ValueError(
                    f"dynamics must be a LinearDynamics for this layer, got {type(dynamics)}"
                )
            if (dynamics.horizon, dynamics.n_state, dynamics.n_ctrl) != (T, n, m):
                raise ValueError(
                    f"dynamics.F must have shape (B, {T}, {n}, {n + m}), "
                    f"got {tuple(dynamics.F.shape)}"
                )
            F, f = dynamics.batched()
            parts += [F, zeros(1, T, n) if f is None else f]
            names += ["dynamics.F", "dynamics.f"]
        elif self.n_theta:
            if not isinstance(dynamics, Tensor) or dynamics.shape[-1] != self.n_theta:
                raise ValueError(
                    f"dynamics must be the parameter tensor theta of shape (B, {self.n_theta})"
                )
            check_finite("dynamics", dynamics)
            parts.append(dynamics.reshape(-1, self.n_theta))
            names.append("dynamics")
        elif dynamics is not None:
            raise ValueError("dynamics must be None: this layer's dynamics is fixed")
        for name, t in zip(names, parts, strict=True):
            if t.shape[0] not in (1, B):
                raise ValueError(f"{name} has batch {t.shape[0]} but x0 has batch {B}")
        flat = [t.reshape(t.shape[0], -1).expand(B, -1) for t in parts]
        dtype = torch.promote_types(x0.dtype, torch.float32)
        return torch.cat([t.to(dtype) for t in flat], dim=-1)

    def forward(
        self,
        x0: Tensor,
        cost: QuadraticCost,
        dynamics: Any = None,
        u_init: Tensor | None = None,
    ) -> Solution:
        """Solve the batch; see the class docstring for shapes."""
        p = self._nlp_parameters(x0, cost, dynamics)
        B, T, n, m = p.shape[0], self.T, self.n, self.m
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
        X0 = self.nlp.mapped(self._rollout, B)(p_np.T, U0.T).full().T  # (B, T*n)
        w_init = torch.as_tensor(np.concatenate([X0, U0], axis=1))
        lbw, ubw = [], []
        for out, (xb, ub, d) in (
            (lbw, (self.x_lower, self.u_lower, -np.inf)),
            (ubw, (self.x_upper, self.u_upper, np.inf)),
        ):
            x_rows, u_rows = _bound_rows(xb, T, n, d, p), _bound_rows(ub, T, m, d, p)
            b = max(x_rows.shape[0], u_rows.shape[0])
            if b not in (1, B):
                raise ValueError(f"state/control bounds have batch {b} but x0 has batch {B}")
            out.append(torch.cat([x_rows.expand(b, -1), u_rows.expand(b, -1)], -1))
        res = self.nlp(
            p, w_init, warm_start=False if u_init is not None else None, lbw=lbw[0], ubw=ubw[0]
        )
        x0b = x0.reshape(-1, n).expand(B, n).to(res.w.dtype)
        x = torch.cat([x0b.unsqueeze(1), res.w[:, : T * n].reshape(B, T, n)], dim=1)
        u = res.w[:, T * n :].reshape(B, T, m)
        extras = {
            "status": res.status,
            "lam_dynamics": res.lam_g.reshape(B, T, n),
            "objective": res.f,
        }
        return Solution(x, u, cost.evaluate(x, u), res.converged, res.iterations, extras)
