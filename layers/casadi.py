"""CasADi nonlinear programs as differentiable PyTorch layers.

A parametric nonlinear program

.. math::

    w^\\star(p) = \\arg\\min_w f(w, p) \\quad \\text{s.t.} \\quad
        g_\\text{lo} \\le g(w, p) \\le g_\\text{hi}, \\; w_\\text{lo} \\le w \\le w_\\text{hi},

is written once with CasADi symbols and solved for a batch of parameter rows ``p (B, n_p)`` by
any ``nlpsol`` plugin (IPOPT by default), one row after the other, each row warm-started from
the previous row's solution. The backward pass differentiates the KKT conditions at the
returned optimum (see :class:`_NLPFunction`), so the derivatives of ``w*`` and ``f*`` w.r.t.
``p`` and the bounds are exact at a regular local minimum (LICQ, second-order sufficiency,
strict complementarity); they are as accurate as the solver's tolerance.

CasADi's own ``nlpsol`` derivatives decide which constraints are active from the sign of
each multiplier; an equality constraint whose multiplier happens to be zero (for instance a
dynamics constraint of a problem already at its goal) is then dropped and the sensitivity is
wrong. The sensitivity here treats every equality (``lo == hi``) as active and uses a
documented threshold (``active_tol``) for inequalities; it evaluates the Hessian and
constraint Jacobians with CasADi (mapped over the batch) and solves one KKT system per row with
one batched torch solve. A non-converged row is flagged in ``converged`` and still gets the
sensitivity of the point the solver returned (never a silent zero).

:class:`CasadiNLP` is the general layer; :meth:`CasadiNLP.trajectory` builds the standard
trajectory optimization problem of :mod:`diffto.problem` as a :class:`CasadiTO`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import casadi as ca
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

__all__ = ["CasadiNLP", "CasadiTO", "NLPResult", "solve_nlp"]

_SYM = (ca.SX, ca.MX)


@dataclass
class NLPResult:
    """Solutions of a batch of parametric NLPs.

    Attributes:
        w: ``(B, n_w)`` primal solutions; differentiable w.r.t. the parameters.
        f: ``(B,)`` objective values at ``w``; differentiable w.r.t. the parameters.
        converged: ``(B,)`` bool, the solver's own success flag for each row.
        iterations: ``(B,)`` solver iterations on each row (``-1`` if the plugin does not say).
        lam_g: ``(B, n_g)`` constraint multipliers (CasADi's sign convention: positive on an
            active upper bound, negative on an active lower bound). Not differentiable.
        lam_w: ``(B, n_w)`` bound multipliers, same convention. Not differentiable.
        status: one solver return status string per row.
    """

    w: Tensor
    f: Tensor
    converged: Tensor
    iterations: Tensor
    lam_g: Tensor
    lam_w: Tensor
    status: list[str] = field(default_factory=list)


def _bound(name: str, value: Any, size: int, default: float) -> np.ndarray:
    """A constant bound as a float64 vector of length ``size`` (scalars broadcast)."""
    if value is None:
        return np.full(size, default)
    if isinstance(value, Tensor):
        value = value.detach().cpu().double().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(size, float(arr))
    arr = arr.reshape(-1)
    if arr.size != size:
        raise ValueError(f"{name} must be a scalar or have {size} entries, got {arr.size}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _default_options(solver: str, max_iter: int | None) -> dict[str, Any]:
    if solver == "ipopt":
        opts: dict[str, Any] = {
            "print_time": False,
            "ipopt.print_level": 0,
            "ipopt.sb": "yes",
            "ipopt.tol": 1e-10,
        }
        if max_iter is not None:
            opts["ipopt.max_iter"] = max_iter
        return opts
    opts = {"print_time": False}
    if solver == "sqpmethod":
        opts.update({"print_header": False, "print_iteration": False, "print_status": False})
        opts["qpsol_options"] = {"print_iter": False, "print_header": False, "error_on_fail": False}
        if max_iter is not None:
            opts["max_iter"] = max_iter
    return opts


class CasadiNLP(nn.Module):
    """A parametric CasADi NLP as a layer: ``p (B, n_p) -> NLPResult``.

    Args:
        w: CasADi ``SX``/``MX`` column of decision variables, ``n_w`` entries.
        p: CasADi column of parameters, ``n_p`` entries (the torch input of the layer).
        f: scalar objective expression in ``w`` and ``p``.
        g: constraint expressions (``n_g`` entries) or ``None``.
        lbg, ubg: bounds on ``g``: scalars or ``n_g`` values; ``None`` means ``0`` (equality).
        lbw, ubw: bounds on ``w``: scalars or ``n_w`` values; ``None`` means unbounded.
        solver: any ``casadi.nlpsol`` plugin (``"ipopt"``, ``"sqpmethod"``, ...).
        options: plugin options, merged over diffto's defaults (IPOPT silent, ``tol=1e-10``).
        max_iter: iteration cap passed to IPOPT / sqpmethod.
        warm_start: start row ``b > 0`` from row ``b-1``'s solution and multipliers (rows of
            one batch are usually neighbouring problems); row 0 starts from ``w_init[0]`` (or
            zeros). When ``False``, every row starts from its own ``w_init`` row (or zeros).
            A call can override it (``layer(p, w_init, warm_start=False)``).
        active_tol: an inequality (or a bound on ``w``) counts as active in the backward pass
            when its multiplier exceeds this in magnitude; equalities are always active.

    Call as ``layer(p, w_init=None, warm_start=None, lbw=None, ubw=None, lbg=None, ubg=None)``
    with ``p (B, n_p)`` or ``(n_p,)``, ``w_init (B, n_w)`` or ``(n_w,)``; bound tensors
    (``(B, n_w)``/``(n_w,)``, ``(B, n_g)``/``(n_g,)``) replace the constructor's bounds for this
    call and receive gradients (an active bound's multiplier-part of the adjoint; a bound
    held with equality passes its gradient to the side its multiplier's sign selects, half to
    each when the multiplier is zero, so one tensor passed as both bounds gets the total).
    Any float dtype and device (CasADi computes in float64 on the CPU).
    """

    def __init__(
        self,
        w: Any,
        p: Any,
        f: Any,
        g: Any = None,
        lbg: Any = None,
        ubg: Any = None,
        lbw: Any = None,
        ubw: Any = None,
        solver: str = "ipopt",
        options: dict[str, Any] | None = None,
        max_iter: int | None = 500,
        warm_start: bool = True,
        active_tol: float = 1e-7,
    ) -> None:
        super().__init__()
        for name, sym in (("w", w), ("p", p)):
            if not isinstance(sym, _SYM) or not sym.is_column() or not sym.is_valid_input():
                raise ValueError(f"{name} must be a CasADi SX/MX column of symbols")
        if not isinstance(f, _SYM) or f.numel() != 1:
            raise ValueError("f must be a scalar CasADi expression")
        if g is None:
            g = type(w)(0, 1)
        if not isinstance(g, _SYM):
            raise ValueError("g must be a CasADi expression or None")
        g = ca.vec(g)
        if active_tol <= 0:
            raise ValueError(f"active_tol must be > 0, got {active_tol}")
        self.n_w, self.n_p, self.n_g = w.numel(), p.numel(), g.numel()
        self.lbg = _bound("lbg", lbg, self.n_g, 0.0)
        self.ubg = _bound("ubg", ubg, self.n_g, 0.0)
        self.lbw = _bound("lbw", lbw, self.n_w, -np.inf)
        self.ubw = _bound("ubw", ubw, self.n_w, np.inf)
        if (self.lbg > self.ubg).any():
            raise ValueError("lbg must be <= ubg everywhere")
        if (self.lbw > self.ubw).any():
            raise ValueError("lbw must be <= ubw everywhere")
        self.solver_name = solver
        self.warm_start = warm_start
        self.active_tol = active_tol
        opts = _default_options(solver, max_iter)
        opts["error_on_fail"] = False
        opts.update(options or {})
        self.solver = ca.nlpsol("nlp", solver, {"x": w, "p": p, "f": f, "g": g}, opts)

        # Sensitivity pieces, built once. With L = f + λ_gᵀ g the Lagrangian (bound terms are
        # linear in w, so they do not enter second derivatives):
        #   kkt(w, p, λ_g)          -> ∇²_ww L, ∂g/∂w
        #   vjp(w, p, λ_g, a, b, s) -> ∇_p [ s·L − aᵀ∇_w L − bᵀ g ]
        lam = type(w).sym("lam_g", self.n_g)
        a = type(w).sym("a", self.n_w)
        b = type(w).sym("b", self.n_g)
        s = type(w).sym("s")
        lagr = f + ca.dot(lam, g)
        grad_w = ca.gradient(lagr, w)
        hess = ca.jacobian(grad_w, w)
        self._kkt = ca.Function(
            "kkt", [w, p, lam], [ca.densify(hess), ca.densify(ca.jacobian(g, w))]
        )
        phi = s * lagr - ca.dot(a, grad_w) - ca.dot(b, g)
        self._vjp = ca.Function("vjp", [w, p, lam, a, b, s], [ca.densify(ca.gradient(phi, p))])
        self._maps: dict[tuple[str, int], Any] = {}

    def mapped(self, fn: Any, B: int) -> Any:
        """``fn.map(B)``, cached: building a CasADi map costs milliseconds per call."""
        key = (fn.name(), B)
        if key not in self._maps:
            self._maps[key] = fn.map(B)
        return self._maps[key]

    def forward(
        self,
        p: Tensor,
        w_init: Tensor | None = None,
        warm_start: bool | None = None,
        lbw: Tensor | None = None,
        ubw: Tensor | None = None,
        lbg: Tensor | None = None,
        ubg: Tensor | None = None,
    ) -> NLPResult:
        """Solve every row of ``p (B, n_p)``; see the class docstring."""
        if not isinstance(p, Tensor):
            raise ValueError(f"p must be a torch.Tensor of shape (B, {self.n_p}), got {type(p)}")
        if p.dim() == 1:
            p = p.unsqueeze(0)
        if p.dim() != 2 or p.shape[1] != self.n_p:
            raise ValueError(f"p must have shape (B, {self.n_p}), got {tuple(p.shape)}")
        check_finite("p", p)
        B = p.shape[0]
        if w_init is not None:
            w_init = self._rows("w_init", w_init, self.n_w, B)
            check_finite("w_init", w_init)
            w_init = np.broadcast_to(w_init.detach().cpu().double().numpy(), (B, self.n_w))
        bounds = []
        for name, value, const, size in (("lbw", lbw, self.lbw, self.n_w),
                                         ("ubw", ubw, self.ubw, self.n_w),
                                         ("lbg", lbg, self.lbg, self.n_g),
                                         ("ubg", ubg, self.ubg, self.n_g)):
            if value is None:
                value = torch.as_tensor(const, dtype=p.dtype, device=p.device).unsqueeze(0)
            value = self._rows(name, value, size, B)
            if torch.isnan(value).any():
                raise ValueError(f"{name} contains NaN")
            bounds.append(value)
        for (lo, hi), names in (((bounds[0], bounds[1]), "lbw <= ubw"),
                                ((bounds[2], bounds[3]), "lbg <= ubg")):
            if (lo > hi).any():
                raise ValueError(f"bounds must satisfy {names} everywhere")
        chain = self.warm_start if warm_start is None else warm_start
        w, f, lam_g, lam_w, ok, iters, status = _NLPFunction.apply(
            p, *bounds, self, w_init, chain
        )
        return NLPResult(w, f, ok, iters, lam_g, lam_w, status)

    @staticmethod
    def _rows(name: str, value: Any, size: int, B: int) -> Tensor:
        """``value`` as ``(1, size)`` or ``(B, size)``; ValueError otherwise."""
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        value = value.reshape(1, -1) if value.dim() == 1 else value
        if value.dim() != 2 or value.shape[1] != size or value.shape[0] not in (1, B):
            raise ValueError(f"{name} must have shape (B, {size}) or ({size},), "
                             f"got {tuple(value.shape)}")
        return value

    @staticmethod
    def trajectory(dynamics: Any, horizon: int, n: int, m: int, **kwargs: Any) -> CasadiTO:
        """Build the standard trajectory optimization layer ``(x0, cost, dynamics=None) ->
        Solution``; the arguments are those of :class:`CasadiTO`."""
        return CasadiTO(dynamics, horizon, n, m, **kwargs)


def solve_nlp(
    nlp: CasadiNLP,
    p: np.ndarray,
    w_init: np.ndarray | None = None,
    chain: bool = True,
    bounds: tuple[np.ndarray, ...] | None = None,
) -> tuple[np.ndarray, ...]:
    """Solve each row of ``p (B, n_p)`` (float64) with ``nlp``'s solver. Row 0 starts from
    ``w_init[0]`` (zeros if ``None``); row ``b > 0`` from row ``b-1``'s solution when
    ``chain``, else from ``w_init[b]``. ``bounds``: ``(lbw, ubw, lbg, ubg)``, each ``(B, ·)``
    or ``(1, ·)``; ``None`` means the constructor's.

    Returns ``w (B, n_w)``, ``f (B,)``, ``lam_g (B, n_g)``, ``lam_w (B, n_w)``,
    ``success (B,)`` bool, ``iterations (B,)`` and a list of status strings.
    """
    B = p.shape[0]
    w = np.zeros((B, nlp.n_w))
    f = np.zeros(B)
    lam_g = np.zeros((B, nlp.n_g))
    lam_w = np.zeros((B, nlp.n_w))
    ok = np.zeros(B, dtype=bool)
    iters = np.full(B, -1, dtype=np.int64)
    status: list[str] = []
    guess, guess_lg, guess_lw = np.zeros(nlp.n_w), np.zeros(nlp.n_g), np.zeros(nlp.n_w)
    if bounds is None:
        bounds = (nlp.lbw[None], nlp.ubw[None], nlp.lbg[None], nlp.ubg[None])
    lbw, ubw, lbg, ubg = (np.broadcast_to(b, (B, b.shape[1])) for b in bounds)
    for i in range(B):
        if i > 0 and chain and np.isfinite(w[i - 1]).all():
            guess, guess_lg, guess_lw = w[i - 1], lam_g[i - 1], lam_w[i - 1]
        else:
            guess = np.zeros(nlp.n_w) if w_init is None else w_init[i]
            guess_lg, guess_lw = np.zeros(nlp.n_g), np.zeros(nlp.n_w)
        sol = nlp.solver(
            x0=guess, p=p[i], lbx=lbw[i], ubx=ubw[i], lbg=lbg[i], ubg=ubg[i],
            lam_x0=guess_lw, lam_g0=guess_lg,
        )
        stats = nlp.solver.stats()
        w[i] = sol["x"].full().ravel()
        f[i] = float(sol["f"])
        lam_g[i] = sol["lam_g"].full().ravel()
        lam_w[i] = sol["lam_x"].full().ravel()
        ok[i] = bool(stats.get("success", False)) and np.isfinite(w[i]).all()
        iters[i] = int(stats.get("iter_count", -1))
        status.append(str(stats.get("return_status", "unknown")))
    return w, f, lam_g, lam_w, ok, iters, status


def _active(lam: np.ndarray, lo: np.ndarray, hi: np.ndarray, tol: float) -> np.ndarray:
    """Rows whose constraint enters the KKT sensitivity: equalities always, inequalities
    (finite side) when their multiplier exceeds ``tol`` in magnitude."""
    equality = np.broadcast_to(lo == hi, lam.shape)
    upper = (lam > tol) & np.isfinite(hi)
    lower = (lam < -tol) & np.isfinite(lo)
    return equality | upper | lower


def _side_split(grad: Tensor, lam: Tensor, equality: Tensor) -> tuple[Tensor, Tensor]:
    """Send a bound row's gradient ``(B, k)`` to its lower or upper bound by the multiplier's
    sign (CasADi: negative = lower); equality rows with a zero multiplier split it evenly."""
    upper = (lam > 0).to(grad.dtype)
    lower = (lam < 0).to(grad.dtype)
    tie = (equality & (lam == 0)).to(grad.dtype)
    return grad * (lower + 0.5 * tie), grad * (upper + 0.5 * tie)


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """Reduce a ``(B, k)`` gradient to the shape of a ``(1, k)`` input (broadcast rows)."""
    return grad.sum(0, keepdim=True) if like.shape[0] == 1 else grad


class _NLPFunction(torch.autograd.Function):
    """``(p, lbw, ubw, lbg, ubg) -> (w*, f*)`` with KKT-based reverse mode; multipliers and
    status ride along."""

    @staticmethod
    def forward(p, lbw, ubw, lbg, ubg, nlp: CasadiNLP, w_init: np.ndarray | None, chain: bool):
        to_np = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
        bounds = tuple(to_np(b) for b in (lbw, ubw, lbg, ubg))
        w, f, lam_g, lam_w, ok, iters, status = solve_nlp(nlp, to_np(p), w_init, chain, bounds)
        as_t = lambda a: torch.as_tensor(a, dtype=p.dtype, device=p.device)  # noqa: E731
        ok_t = torch.as_tensor(ok, device=p.device)
        it_t = torch.as_tensor(iters, device=p.device)
        return as_t(w), as_t(f), as_t(lam_g), as_t(lam_w), ok_t, it_t, status

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, lbw, ubw, lbg, ubg, nlp, _, _ = inputs
        w, _, lam_g, lam_w, ok, it, _ = output
        ctx.nlp = nlp
        ctx.save_for_backward(p, w, lam_g, lam_w, lbw, ubw, lbg, ubg)
        ctx.mark_non_differentiable(lam_g, lam_w, ok, it)

    # Reverse mode by the implicit function theorem on the KKT system at the optimum.
    # Let h(w, p, β) = 0 collect the active constraints: the equalities and active inequalities
    # of g, g_i − β_i = 0, and w_i − β_i = 0 for active bounds β on w, with multipliers ν.
    # Stationarity and activity,
    #     ∇_w L(w, p, λ) = 0,  h(w, p, β) = 0,      L = f + λ_gᵀ g + λ_wᵀ w,
    # differentiated in θ = (p, β) give
    #     K [dw; dν] = −[∇²_wθ L; ∂h/∂θ] dθ,     K = [[H, Aᵀ], [A, 0]],
    # with H = ∇²_ww L and A = ∂h/∂w. For an output seed v on w*, a scalar seed s on f* and
    # K [a; b] = [v; 0] (K is symmetric),
    #     vᵀ dw/dθ = −aᵀ ∇²_wθ L − bᵀ ∂h/∂θ,
    # and by the envelope theorem df*/dθ = ∂/∂θ [f + νᵀ h] = ∇_p L for p and −ν_i for β_i.
    # Hence, with b_g the entries of b on g's rows,
    #     ∂ℓ/∂p   = ∇_p [ s L − aᵀ ∇_w L − b_gᵀ g ]    (one CasADi reverse sweep, `_vjp`),
    #     ∂ℓ/∂β_i = b_i − s ν_i                         (∂h_i/∂β_i = −1),
    # sent to the lower or upper bound by the sign of ν_i. Inactive rows are kept in K as
    # identity rows so every batch row has the same size (their b and ν are zero), and active
    # bounds on w are eliminated (see below), so K is (n_w + n_g)² per row.
    @staticmethod
    def backward(ctx, gw, gf, *_):
        p, w, lam_g, lam_w, lbw, ubw, lbg, ubg = ctx.saved_tensors
        nlp: CasadiNLP = ctx.nlp
        if gw is None:
            gw = torch.zeros_like(w)
        if gf is None:
            gf = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        B, n_w, n_g = w.shape[0], nlp.n_w, nlp.n_g
        to_np = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
        w_np, p_np, lg_np, lw_np = to_np(w), to_np(p), to_np(lam_g), to_np(lam_w)
        lo_g, hi_g, lo_w, hi_w = (to_np(b) for b in (lbg, ubg, lbw, ubw))
        act_g = _active(lg_np, lo_g, hi_g, nlp.active_tol)  # (B, n_g)
        act_w = _active(lw_np, lo_w, hi_w, nlp.active_tol)  # (B, n_w)
        lg_np = np.where(act_g, lg_np, 0.0)
        lw_np = np.where(act_w, lw_np, 0.0)
        kkt = nlp.mapped(nlp._kkt, B)
        H, J = kkt(w_np.T, p_np.T, lg_np.T)
        # Assembled and solved with torch (MKL, one thread): NumPy's OpenBLAS spawns threads that
        # were measured 40x slower on a shared 2-core machine.
        H = torch.from_numpy(H.full().reshape(n_w, B, n_w).transpose(1, 0, 2))  # (B, n_w, n_w)
        J = torch.from_numpy(J.full().reshape(n_g, B, n_w).transpose(1, 0, 2))  # (B, n_g, n_w)
        act_g_t, act_w_t = torch.from_numpy(act_g), torch.from_numpy(act_w)
        # Active bounds fix their variable (a_i = 0), so their rows and columns of H are
        # replaced by identity and their b_w recovered afterwards from the stationarity row,
        #     b_w,i = v_i − (H a)_i − (Aᵀ b_g)_i,
        # which halves the system to n_w + n_g (inactive g rows are identity rows, b_g = 0).
        free = (~act_w_t).double()  # (B, n_w)
        v = gw.detach().cpu().double()  # (B, n_w)
        Ja = J * act_g_t[:, :, None]  # (B, n_g, n_w), inactive rows zeroed
        size = n_w + n_g
        K = torch.zeros(B, size, size, dtype=torch.float64)
        K[:, :n_w, :n_w] = H * free[:, :, None] * free[:, None, :] + torch.diag_embed(1 - free)
        K[:, n_w:, :n_w] = Ja * free[:, None, :]
        K[:, :n_w, n_w:] = K[:, n_w:, :n_w].transpose(1, 2)
        idx = torch.arange(n_w, size)
        K[:, idx, idx] = (~act_g_t).double()
        rhs = torch.cat([v * free, v.new_zeros(B, n_g)], 1)
        sol, info = torch.linalg.solve_ex(K, rhs)
        # A backward-stable solve leaves a tiny residual even when K is ill-conditioned; a large
        # one means the LAPACK call itself went wrong (seen with MKL at > 1 thread on 2 cores).
        resid = (K @ sol.unsqueeze(-1)).squeeze(-1) - rhs
        scale = 1 + K.abs().amax((-1, -2)) * sol.abs().amax(-1)
        bad = resid.abs().amax(-1) > 1e4 * torch.finfo(K.dtype).eps * scale
        info = torch.where(bad, torch.ones_like(info), info)
        if (info != 0).any():
            rows = torch.nonzero(info).flatten().tolist()
            raise RuntimeError(
                f"CasadiNLP backward: the KKT solve failed for rows {rows}: the matrix is singular "
                "(active constraints not linearly independent, or a singular reduced Hessian), "
                "so the sensitivity is not defined, or the linear solve returned a wrong result "
                "(check torch.get_num_threads())"
            )
        a, b_g = sol[:, :n_w], sol[:, n_w:]
        Ha = (H @ a.unsqueeze(-1)).squeeze(-1)
        b_w = (v - Ha - (Ja.transpose(1, 2) @ b_g.unsqueeze(-1)).squeeze(-1)) * (1 - free)
        gf_np = to_np(gf)
        grads: list[Tensor | None] = [None] * 5
        if ctx.needs_input_grad[0]:
            vjp = nlp.mapped(nlp._vjp, B)
            grad_p = vjp(w_np.T, p_np.T, lg_np.T, a.numpy().T, b_g.numpy().T, gf_np[None, :])
            grads[0] = torch.as_tensor(grad_p.full().T, dtype=p.dtype, device=p.device)
        if any(ctx.needs_input_grad[1:5]):
            s = torch.from_numpy(gf_np)[:, None]
            g_w = b_w - s * torch.from_numpy(lw_np)  # (B, n_w)
            g_g = b_g - s * torch.from_numpy(lg_np)  # (B, n_g)
            eq_w = torch.from_numpy(np.broadcast_to(lo_w == hi_w, (B, n_w)).copy()) & act_w_t
            eq_g = torch.from_numpy(np.broadcast_to(lo_g == hi_g, (B, n_g)).copy()) & act_g_t
            lo_gw, hi_gw = _side_split(g_w, torch.from_numpy(lw_np), eq_w)
            lo_gg, hi_gg = _side_split(g_g, torch.from_numpy(lg_np), eq_g)
            for i, (g, like) in enumerate(((lo_gw, lbw), (hi_gw, ubw), (lo_gg, lbg), (hi_gg, ubg))):
                if ctx.needs_input_grad[1 + i]:
                    g = g.to(dtype=like.dtype, device=like.device)
                    grads[1 + i] = _sum_to(g, like)
        return (*grads, None, None, None)


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
        lo_u, hi_u = (_time_bound(nm, v, T, m, d) for nm, v, d in
                      (("u_lower", u_lower, -np.inf), ("u_upper", u_upper, np.inf)))
        lo_x, hi_x = (_time_bound(nm, v, T, n, d) for nm, v, d in
                      (("x_lower", x_lower, -np.inf), ("x_upper", x_upper, np.inf)))
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
            ca.vertcat(X, U), p, obj, ca.vertcat(*gs),
            solver=solver, options=options, max_iter=max_iter, warm_start=warm_start,
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
        for out, (xb, ub, d) in ((lbw, (self.x_lower, self.u_lower, -np.inf)),
                                 (ubw, (self.x_upper, self.u_upper, np.inf))):
            x_rows, u_rows = _bound_rows(xb, T, n, d, p), _bound_rows(ub, T, m, d, p)
            b = max(x_rows.shape[0], u_rows.shape[0])
            if b not in (1, B):
                raise ValueError(f"state/control bounds have batch {b} but x0 has batch {B}")
            out.append(torch.cat([x_rows.expand(b, -1), u_rows.expand(b, -1)], -1))
        res = self.nlp(p, w_init, warm_start=False if u_init is not None else None,
                       lbw=lbw[0], ubw=ubw[0])
        x0b = x0.reshape(-1, n).expand(B, n).to(res.w.dtype)
        x = torch.cat([x0b.unsqueeze(1), res.w[:, : T * n].reshape(B, T, n)], dim=1)
        u = res.w[:, T * n :].reshape(B, T, m)
        extras = {
            "status": res.status,
            "lam_dynamics": res.lam_g.reshape(B, T, n),
            "objective": res.f,
        }
        return Solution(x, u, cost.evaluate(x, u), res.converged, res.iterations, extras)
