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

:class:`CasadiNLP` is the general layer. The standard trajectory optimization problem is
:class:`~diffto.layers.casadi_to.CasadiTO`, built on this module (the dependency is one-way).

**Objective terms from outside CasADi.** An objective may contain a ``casadi.Callback`` (a
torch function, say). IPOPT differentiates it through the callback's own Jacobians, but the
backward pass cannot see the tensors that term closes over, so a caller with such a term
passes three things with the solution (see :func:`nlp_solution`): the term's Hessian
``(B, n_w, n_w)`` at ``w*``, and its gradient ``r_w (B, n_w)`` and value ``r_f (B,)`` at
``w*`` *as differentiable functions of its own parameters*. The KKT adjoint ``a`` (below)
then reaches those parameters through ordinary autograd as ``−aᵀ ∂r_w/∂θ + s ∂r_f/∂θ``: the
residual-injection form of the implicit function theorem. The symbolic sensitivity functions
are built from ``f`` without that term (``external=`` in :class:`CasadiNLP`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import casadi as ca
import numpy as np
import torch
from torch import Tensor, nn

from diffto.layers._checked_solve import checked_solve
from diffto.problem import (
    check_finite,
    sum_to_batch,
)

__all__ = ["CasadiNLP", "NLPResult", "solve_nlp", "nlp_solution"]

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
        external: an objective term the solver adds to ``f`` but the backward pass does not
            differentiate symbolically (a ``casadi.Callback`` of a torch function, with
            Jacobians; an ``MX`` expression). Its derivatives are the caller's to pass in, see
            the module docstring; :meth:`forward` refuses a layer that has one.

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
        external: Any = None,
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
        if external is not None and (not isinstance(external, ca.MX) or external.numel() != 1):
            raise ValueError("external must be a scalar casadi.MX expression or None")
        self.has_external = external is not None
        f_solve = f if external is None else f + external
        self.solver = ca.nlpsol("nlp", solver, {"x": w, "p": p, "f": f_solve, "g": g}, opts)

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
        for name, value, const, size in (
            ("lbw", lbw, self.lbw, self.n_w),
            ("ubw", ubw, self.ubw, self.n_w),
            ("lbg", lbg, self.lbg, self.n_g),
            ("ubg", ubg, self.ubg, self.n_g),
        ):
            if value is None:
                value = torch.as_tensor(const, dtype=p.dtype, device=p.device).unsqueeze(0)
            value = self._rows(name, value, size, B)
            if torch.isnan(value).any():
                raise ValueError(f"{name} contains NaN")
            bounds.append(value)
        for (lo, hi), names in (
            ((bounds[0], bounds[1]), "lbw <= ubw"),
            ((bounds[2], bounds[3]), "lbg <= ubg"),
        ):
            if (lo > hi).any():
                raise ValueError(f"bounds must satisfy {names} everywhere")
        if self.has_external:
            raise ValueError(
                "this CasadiNLP has an external objective term: its owner solves it (see "
                "nlp_solution), a plain call cannot differentiate it"
            )
        chain = self.warm_start if warm_start is None else warm_start
        to_np = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
        solved = solve_nlp(self, to_np(p), w_init, chain, tuple(to_np(b) for b in bounds))
        return nlp_solution(self, p, bounds, solved)

    @staticmethod
    def _rows(name: str, value: Any, size: int, B: int) -> Tensor:
        """``value`` as ``(1, size)`` or ``(B, size)``; ValueError otherwise."""
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        value = value.reshape(1, -1) if value.dim() == 1 else value
        if value.dim() != 2 or value.shape[1] != size or value.shape[0] not in (1, B):
            raise ValueError(
                f"{name} must have shape (B, {size}) or ({size},), got {tuple(value.shape)}"
            )
        return value



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
            x0=guess,
            p=p[i],
            lbx=lbw[i],
            ubx=ubw[i],
            lbg=lbg[i],
            ubg=ubg[i],
            lam_x0=guess_lw,
            lam_g0=guess_lg,
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


def nlp_solution(
    nlp: CasadiNLP,
    p: Tensor,
    bounds: list[Tensor] | tuple[Tensor, ...],
    solved: tuple[np.ndarray, ...],
    external: tuple[Tensor, Tensor, Tensor] | None = None,
) -> NLPResult:
    """Wrap the output of :func:`solve_nlp` as a differentiable :class:`NLPResult`.

    Args:
        nlp: the layer that solved.
        p: ``(B, n_p)`` parameters the solve used (gradients reach them).
        bounds: ``(lbw, ubw, lbg, ubg)`` tensors, ``(B, ·)`` or ``(1, ·)`` (gradients too).
        solved: ``solve_nlp``'s tuple.
        external: for a layer with an external objective term: its Hessian ``(B, n_w, n_w)``
            at ``w*`` (no gradient), its gradient ``r_w (B, n_w)`` and value ``r_f (B,)`` at
            ``w*``, computed with a graph to the term's own parameters (see the module
            docstring).
    """
    if nlp.has_external != (external is not None):
        raise ValueError("external derivatives must be given exactly when nlp has an external term")
    H_ext, r_w, r_f = (None, None, None) if external is None else external
    w, f, lam_g, lam_w, ok, iters, status = solved
    as_t = lambda a: torch.as_tensor(a, dtype=p.dtype, device=p.device)  # noqa: E731
    sol = (as_t(w), as_t(f), as_t(lam_g), as_t(lam_w))
    w_t, f_t, lam_g_t, lam_w_t = _NLPFunction.apply(p, *bounds, r_w, r_f, H_ext, nlp, sol)
    ok_t = torch.as_tensor(ok, device=p.device)
    it_t = torch.as_tensor(iters, device=p.device)
    return NLPResult(w_t, f_t, ok_t, it_t, lam_g_t, lam_w_t, status)


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


class _NLPFunction(torch.autograd.Function):
    """``(p, lbw, ubw, lbg, ubg, r_w, r_f, H_ext) -> (w*, f*, λ_g, λ_w)`` for an NLP solved
    beforehand (``solution``), with KKT-based reverse mode; ``r_w``, ``r_f``, ``H_ext`` are the
    external objective term's (``None`` without one, see :func:`nlp_solution`)."""

    @staticmethod
    def forward(p, lbw, ubw, lbg, ubg, r_w, r_f, H_ext, nlp: CasadiNLP, solution):
        return tuple(t.clone() for t in solution)

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, lbw, ubw, lbg, ubg, r_w, r_f, H_ext, nlp, _ = inputs
        w, _, lam_g, lam_w = output
        ctx.nlp = nlp
        ctx.has_external = r_w is not None
        H_ext = H_ext if H_ext is not None else w.new_zeros(0)
        ctx.save_for_backward(p, w, lam_g, lam_w, lbw, ubw, lbg, ubg, H_ext)
        ctx.mark_non_differentiable(lam_g, lam_w)

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
    # An external objective term φ(w; θ') enters ∇_w L as r_w = ∇_w φ and f* as r_f = φ, so
    # its parameters θ' get −aᵀ ∂r_w/∂θ' + s ∂r_f/∂θ': the gradients −a for r_w and s for r_f
    # (autograd finishes the chain), and its Hessian adds to H.
    # Hence, with b_g the entries of b on g's rows,
    #     ∂ℓ/∂p   = ∇_p [ s L − aᵀ ∇_w L − b_gᵀ g ]    (one CasADi reverse sweep, `_vjp`),
    #     ∂ℓ/∂β_i = b_i − s ν_i                         (∂h_i/∂β_i = −1),
    # sent to the lower or upper bound by the sign of ν_i. Inactive rows are kept in K as
    # identity rows so every batch row has the same size (their b and ν are zero), and active
    # bounds on w are eliminated (see below), so K is (n_w + n_g)² per row.
    @staticmethod
    def backward(ctx, gw, gf, *_):
        p, w, lam_g, lam_w, lbw, ubw, lbg, ubg, H_ext = ctx.saved_tensors
        nlp: CasadiNLP = ctx.nlp
        if gw is None:
            gw = torch.zeros_like(w)
        if gf is None:
            gf = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        B, n_w, n_g = w.shape[0], nlp.n_w, nlp.n_g
        to_np = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
        w_np, p_np, lg_np, lw_np = to_np(w), to_np(p), to_np(lam_g), to_np(lam_w)
        # A row whose solution is not finite gets no gradient, and must not poison the others:
        # its KKT block is evaluated at zeros, replaced by the identity, and its seeds zeroed.
        bad = ~(np.isfinite(w_np).all(1) & np.isfinite(lg_np).all(1) & np.isfinite(lw_np).all(1))
        if bad.any():
            w_np, lg_np, lw_np = (np.where(bad[:, None], 0.0, a) for a in (w_np, lg_np, lw_np))
            keep = torch.from_numpy(~bad).to(gw.device)
            gw = torch.where(keep[:, None], gw, 0)
            gf = torch.where(keep, gf, 0)
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
        if ctx.has_external:
            H = H + H_ext.detach().cpu().double()
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
        if bad.any():
            rows = torch.from_numpy(bad)
            K[rows] = torch.eye(size, dtype=torch.float64)
            H[rows] = 0.0
        sol = checked_solve(
            K, rhs, "CasadiNLP backward: the KKT solve failed (active constraints dependent?)"
        )
        a, b_g = sol[:, :n_w], sol[:, n_w:]
        Ha = (H @ a.unsqueeze(-1)).squeeze(-1)
        b_w = (v - Ha - (Ja.transpose(1, 2) @ b_g.unsqueeze(-1)).squeeze(-1)) * (1 - free)
        gf_np = to_np(gf)
        grads: list[Tensor | None] = [None] * 8
        if ctx.has_external:
            grads[5] = (-a).to(dtype=w.dtype, device=w.device)
            grads[6] = gf.detach()
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
                    grads[1 + i] = sum_to_batch(g, like)
        return (*grads, None, None)
