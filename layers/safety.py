"""A differentiable safety filter: the Euclidean projection of actions onto a polytope.

For each batch row the filter solves

.. math::

    a_\\text{safe} = \\arg\\min_y \\tfrac12 \\|y - a\\|^2 \\quad\\text{s.t.}\\quad G y \\le h,

the "MPC as a shield under an RL policy" pattern: a policy proposes ``a``, the filter returns
the closest action that satisfies ``G a ≤ h`` (e.g. a discrete-time control barrier function
condition from :func:`cbf_constraints`), and the policy trains through it.

The solver is written for many calls on small problems (``m`` and ``k`` up to a few dozen):

1. a batched primal-dual interior point method (Mehrotra predictor-corrector) in torch, no
   autograd, identifies the active set; its Newton system is only ``m × m``
   (``I + Gᵀ diag(λ/s) G``), positive definite whatever ``k``;
2. an exact *polish* on that active set gives the output, and its custom backward is the
   implicit derivative of the active-set KKT system (derivation above
   :class:`_ActiveSetProjection`).

A row whose constraint set is empty is reported (``status`` 1, ``converged`` False) and gets the
least-violating action (gradient: identity), never NaN. The work is done in float64
and cast back, so float32 callers get float64 accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffto.problem import check_finite

__all__ = ["SafetyFilter", "project_polytope", "cbf_constraints"]

SOLVED, INFEASIBLE, MAX_ITERATIONS = 0, 1, 2


def _mv(M: Tensor, v: Tensor) -> Tensor:
    """Batched matrix-vector product ``(N, i, j) × (N, j) -> (N, i)`` (faster than einsum)."""
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def _mtv(M: Tensor, v: Tensor) -> Tensor:
    """Batched ``Mᵀ v``: ``(N, i, j) × (N, i) -> (N, j)``."""
    return (v.unsqueeze(-2) @ M).squeeze(-2)


def _newton_direction(
    G: Tensor, chol: Tensor, s: Tensor, lam: Tensor, r_d: Tensor, r_p: Tensor, r_c: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dy, ds, dλ)`` from the reduced Newton system (see :func:`_interior_point`)."""
    rhs = -r_d - _mtv(G, (lam * r_p - r_c) / s)  # (N, m)
    dy = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    ds = -r_p - _mv(G, dy)
    return dy, ds, -(r_c + lam * ds) / s


def _step_to_boundary(s: Tensor, lam: Tensor, ds: Tensor, dlam: Tensor) -> Tensor:
    """Largest ``α ≤ 1`` keeping ``s + α ds ≥ 0`` and ``λ + α dλ ≥ 0``; ``(N,)``."""
    ratio = torch.cat([-s / ds.clamp_max(-1e-300), -lam / dlam.clamp_max(-1e-300)], -1)
    ratio = torch.where(torch.cat([ds, dlam], -1) < 0, ratio, torch.inf)
    return ratio.amin(-1).clamp_max(1.0)


def _interior_point(
    a: Tensor, G: Tensor, h: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Mehrotra predictor-corrector on ``min ½‖y − a‖² s.t. G y + s = h, s ≥ 0``.

    Args:
        a: ``(N, m)``; G: ``(N, k, m)`` with unit-norm (or zero) rows; h: ``(N, k)``.

    Returns:
        ``y (N, m)``, slacks ``s (N, k)``, multipliers ``λ (N, k)``, ``done (N,)`` bool,
        ``iterations (N,)``.

    Newton step on the KKT residuals ``r_d = y − a + Gᵀλ``, ``r_p = G y + s − h``,
    ``r_c = s∘λ − σμ``: eliminating ``ds = −r_p − G dy`` and ``dλ = −(r_c + λ∘ds)/s`` leaves
    ``(I + Gᵀ W G) dy = −r_d − Gᵀ((λ∘r_p − r_c)/s)`` with ``W = diag(λ/s)``.
    """
    N, k, m = G.shape
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
    y = a.clone()
    s = (h - _mv(G, a)).clamp_min(1.0)
    lam = torch.ones_like(s)
    done = torch.zeros(N, dtype=torch.bool, device=a.device)
    iters = torch.zeros(N, dtype=torch.long, device=a.device)
    scale_d = 1.0 + a.abs().amax(-1)
    scale_p = 1.0 + h.abs().amax(-1)
    for _ in range(max_iter):
        r_d = y - a + _mtv(G, lam)
        r_p = _mv(G, y) + s - h
        mu = (s * lam).mean(-1)
        done = done | (
            (r_d.abs().amax(-1) <= tol * scale_d)
            & (r_p.abs().amax(-1) <= tol * scale_p)
            & (mu <= tol * scale_d)
        )
        if done.all():
            break
        iters = iters + (~done).long()
        W = (lam / s).clamp_max(1e14)
        H = eye + G.transpose(-1, -2) @ (W.unsqueeze(-1) * G)
        chol, _ = torch.linalg.cholesky_ex(H)

        # Predictor (affine scaling, σ = 0), then Mehrotra's corrector with σ = (μ_aff/μ)³.
        dy, ds, dlam = _newton_direction(G, chol, s, lam, r_d, r_p, s * lam)
        alpha = _step_to_boundary(s, lam, ds, dlam)
        mu_aff = ((s + alpha[:, None] * ds) * (lam + alpha[:, None] * dlam)).mean(-1)
        sigma = (mu_aff / mu.clamp_min(1e-300)).clamp(0.0, 1.0) ** 3
        r_c = s * lam + ds * dlam - (sigma * mu)[:, None]
        dy, ds, dlam = _newton_direction(G, chol, s, lam, r_d, r_p, r_c)
        alpha = 0.99 * _step_to_boundary(s, lam, ds, dlam)
        alpha = torch.where(done, 0.0, alpha)[:, None]
        y, s, lam = y + alpha * dy, s + alpha * ds, lam + alpha * dlam
    return y, s, lam, done, iters


def _least_violation(
    a: Tensor, G: Tensor, h: Tensor, rho: float = 1e8, iters: int = 30
) -> Tensor:
    """``argmin_y ½‖y − a‖² + ½ρ‖(G y − h)₊‖²`` by damped semismooth Newton; ``(N, m)``.

    When ``{G y ≤ h}`` is nonempty this is within ``O(‖λ‖/ρ)`` of the projection; when it is
    empty the violation stays bounded away from zero, which is how emptiness is detected. The
    Newton matrix on the violated set ``V`` is ``I + ρ G_Vᵀ G_V``.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    steps = 0.5 ** torch.arange(12, dtype=a.dtype, device=a.device)  # (S,)

    def objective(y: Tensor) -> Tensor:  # y (..., N, m) -> (..., N)
        viol = (torch.einsum("nkm,...nm->...nk", G, y) - h).clamp_min(0)
        return 0.5 * ((y - a) ** 2).sum(-1) + 0.5 * rho * (viol**2).sum(-1)

    y = a.clone()
    for _ in range(iters):
        viol = (_mv(G, y) - h).clamp_min(0)  # (N, k)
        grad = y - a + rho * _mtv(G, viol)
        Gv = G * (viol > 0).to(a.dtype).unsqueeze(-1)
        H = eye + rho * Gv.transpose(-1, -2) @ Gv
        step = torch.linalg.solve(H, grad)  # (N, m)
        # Backtracking over a fixed ladder of step lengths, picked per row.
        trial = y - steps[:, None, None] * step  # (S, N, m)
        best = objective(trial).argmin(0)  # (N,)
        y = trial[best, torch.arange(y.shape[0], device=a.device)]
    return y


# Implicit derivative of the projection at a fixed active set A (strict complementarity makes A
# locally constant, so this is the derivative of the solution map off measure-zero boundaries).
# The active-set KKT system, written over all k rows with a 0/1 mask D = diag(w):
#     y = a − Gᵀν,     M ν = D(G a − h),     M = D G Gᵀ D + (I − D) (+ εI),
# so ν_i = 0 off A and G_A y = h_A on it. Given ȳ = ∂ℓ/∂y, let ζ = −M⁻¹ D G ȳ (zero off A).
# Differentiating r = D(G a − h) and y = a − Gᵀν (with Dν = ν, Dζ = ζ):
#     ā = ȳ + Gᵀζ                     (ȳ projected onto the null space of G_A),
#     h̄ = −ζ,
#     Ḡ = ζ aᵀ − ν ȳᵀ − (ζνᵀ + νζᵀ) G = ζ yᵀ − ν āᵀ      (using y = a − Gᵀν).
class _ActiveSetProjection(torch.autograd.Function):
    """``y = a − Gᵀν`` with ``ν`` from the active-set system above.

    Inputs: ``a (N, m)``, ``G (N, k, m)``, ``h (N, k)``, ``active (N, k)`` bool, ``eps``.
    Outputs: ``y (N, m)``, ``ν (N, k)`` (ν is returned for reporting; no gradient through it).
    """

    @staticmethod
    def forward(a, G, h, active, eps):
        w = active.to(a.dtype)
        Gw = G * w.unsqueeze(-1)
        M = Gw @ Gw.transpose(-1, -2) + torch.diag_embed(1.0 - w + eps)
        chol, _ = torch.linalg.cholesky_ex(M)
        r = w * (_mv(G, a) - h)
        nu = torch.cholesky_solve(r.unsqueeze(-1), chol).squeeze(-1)
        y = a - _mtv(Gw, nu)
        return y, nu, chol

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, G, _, active, _ = inputs
        y, nu, chol = output
        ctx.save_for_backward(G, active, y, nu, chol)
        ctx.mark_non_differentiable(nu, chol)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_nu, _grad_chol):
        G, active, y, nu, chol = ctx.saved_tensors
        w = active.to(y.dtype)
        rhs = -w * _mv(G, grad_y)  # (N, k)
        zeta = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)  # (N, k)
        grad_a = grad_y + _mtv(G, zeta)  # (N, m)
        grad_h = -zeta
        grad_G = zeta.unsqueeze(-1) * y.unsqueeze(-2) - nu.unsqueeze(-1) * grad_a.unsqueeze(-2)
        return grad_a, grad_G, grad_h, None, None


def _check_shape(name: str, value: Any, shapes: list[tuple[int | None, ...]]) -> Tensor:
    """Raise unless ``value`` is a finite tensor matching one of ``shapes`` (None: any size)."""
    want = " or ".join(str(tuple("*" if d is None else d for d in s)) for s in shapes)
    if not isinstance(value, Tensor):
        kind = type(value).__name__
        raise ValueError(f"{name} must be a torch.Tensor of shape {want}, got {kind}")
    for shape in shapes:
        if value.dim() == len(shape) and all(
            d is None or d == v for d, v in zip(shape, value.shape, strict=True)
        ):
            check_finite(name, value)
            return value
    raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")


def project_polytope(
    a: Tensor, G: Tensor, h: Tensor, tol: float = 1e-9, max_iter: int = 50
) -> tuple[Tensor, dict[str, Tensor]]:
    """Project each row of ``a`` onto ``{y : G y ≤ h}``.

    Args:
        a: ``(N, m)`` proposed actions.
        G: ``(N, k, m)`` or ``(k, m)``.
        h: ``(N, k)`` or ``(k,)``.
        tol: relative tolerance on the KKT residuals.
        max_iter: interior-point iteration cap.

    Returns:
        ``y (N, m)`` and an info dict of ``(N, ...)`` tensors: ``converged`` (bool),
        ``status`` (0 solved, 1 infeasible, 2 max iterations), ``iterations``, ``multipliers``
        ``λ (N, k)`` of ``G y ≤ h``, ``active (N, k)`` and ``violation`` ``max_i (G y − h)_i``.
        Rows with an empty set return the action minimizing ``½‖y − a‖² + ½ρ‖(Gy − h)₊‖²``
        (``ρ = 1e8``: least squared violation) with the gradient of the identity.
    """
    a = _check_shape("a", a, [(None, None)])
    N, m = a.shape
    G = _check_shape("G", G, [(N, None, m), (None, m)])
    k = G.shape[-2]
    h = _check_shape("h", h, [(N, k), (k,)])
    G, h = G.expand(N, k, m), h.expand(N, k)
    dtype = a.dtype
    if k == 0:  # no constraints: every action is safe
        return a, {
            "converged": torch.ones(N, dtype=torch.bool, device=a.device),
            "status": torch.full((N,), SOLVED, dtype=torch.long, device=a.device),
            "iterations": torch.zeros(N, dtype=torch.long, device=a.device),
            "multipliers": a.new_zeros(N, 0),
            "active": torch.zeros(N, 0, dtype=torch.bool, device=a.device),
            "violation": a.new_full((N,), -torch.inf),
        }
    a64, G64, h64 = a.double(), G.double(), h.double()
    # Unit-norm rows: the interior point and the polish see well-scaled constraints; a zero row
    # stays zero and means 0 ≤ h_i (vacuous, or infeasible when h_i < 0).
    norms = G64.norm(dim=-1)  # (N, k)
    nonzero = norms > 0
    inv = torch.where(nonzero, 1.0 / norms.clamp_min(1e-300), 1.0)
    Gn, hn = G64 * inv.unsqueeze(-1), h64 * inv
    with torch.no_grad():
        # Safe proposals (the common case under a shield) are their own projection.
        rows = ((_mv(Gn, a64) - hn) > 0).any(-1)
        y_ip, lam = a64.detach().clone(), a64.new_zeros(N, k)
        s = (hn - _mv(Gn, a64)).detach()
        done = torch.ones(N, dtype=torch.bool, device=a.device)
        iters = torch.zeros(N, dtype=torch.long, device=a.device)
        if rows.any():
            y_ip[rows], s[rows], lam[rows], done[rows], iters[rows] = _interior_point(
                a64.detach()[rows], Gn.detach()[rows], hn.detach()[rows], tol, max_iter
            )
    active = (lam > s) & nonzero
    y_pol, nu, _ = _ActiveSetProjection.apply(a64, Gn, hn, active, 1e-12)
    with torch.no_grad():
        scale = 1.0 + a64.abs().amax(-1) + hn.abs().amax(-1)
        gap = (_mv(Gn, y_pol) - hn).amax(-1)
        # The polish is the exact optimum when it is primal and dual feasible.
        exact = (gap <= 1e3 * tol * scale) & (nu >= -1e3 * tol * scale.unsqueeze(-1)).all(-1)
        converged = exact | done
        # Rows the interior point did not solve: a penalized projection tells an empty set
        # (violation stays large) from slow convergence, and gives those rows a finite answer.
        y_pen = a64.detach().clone()
        infeasible = torch.zeros_like(converged)
        if not converged.all():
            rows = ~converged
            y_pen[rows] = _least_violation(a64.detach()[rows], Gn.detach()[rows], hn[rows])
            gap_pen = (_mv(Gn, y_pen) - hn).amax(-1)
            infeasible = rows & (gap_pen > 1e-6 * scale)
    # Off the exact case the value is the interior point's, the gradient still the polish's.
    y = torch.where(exact.unsqueeze(-1), y_pol, y_pol + (y_ip - y_pol).detach())
    # An empty set: the least-violating action, with the gradient of the identity.
    y = torch.where(infeasible.unsqueeze(-1), a64 + (y_pen - a64).detach(), y)
    status = torch.full_like(iters, MAX_ITERATIONS)
    status[converged] = SOLVED
    status[infeasible] = INFEASIBLE
    with torch.no_grad():
        multipliers = torch.where(exact.unsqueeze(-1), nu, lam) * inv
        multipliers = torch.where(converged.unsqueeze(-1), multipliers, 0.0)
        violation = (_mv(G64, y) - h64).amax(-1)
    info = {
        "converged": converged,
        "status": status,
        "iterations": iters,
        "multipliers": multipliers.to(dtype),
        "active": active,
        "violation": violation.to(dtype),
    }
    return y.to(dtype), info


class SafetyFilter(nn.Module):
    """Differentiable projection of actions onto ``{a : G a ≤ h}`` (see the module docstring).

    Args:
        G: ``(k, m)`` or ``(B, k, m)`` constraints fixed at construction; ``None`` to pass them
            at call time (state-dependent constraints, e.g. from :func:`cbf_constraints`).
        h: ``(k,)`` or ``(B, k)``.
        tol: relative KKT tolerance of the interior point.
        max_iter: interior-point iteration cap.

    Call ``(a, G=None, h=None, return_info=False)``:

    * ``a``: ``(B, m)`` actions or ``(B, T, m)`` plans;
    * ``G, h``: override the stored constraints; for plans also ``(B, T, k, m)`` / ``(B, T, k)``;
    * returns ``a_safe`` of ``a``'s shape and dtype, or ``(a_safe, info)`` with the fields of
      :func:`project_polytope` shaped ``(B,)`` or ``(B, T)``. Rows whose set is empty get the
      least-violating action and are flagged (``info["converged"]`` False, ``status`` 1).
    """

    def __init__(
        self, G: Tensor | None = None, h: Tensor | None = None, tol: float = 1e-9,
        max_iter: int = 50,
    ) -> None:
        super().__init__()
        if (G is None) != (h is None):
            raise ValueError("G and h must be given together")
        if G is not None:
            G = _check_shape("G", G, [(None, None), (None, None, None)])
            h = _check_shape("h", h, [G.shape[:-1]])
            for name, value in (("G", G), ("h", h)):
                if isinstance(value, nn.Parameter) or value.requires_grad:
                    setattr(self, name, value)
                else:
                    self.register_buffer(name, value)
        else:
            self.G = self.h = None
        if tol <= 0 or max_iter < 1:
            raise ValueError(f"tol must be > 0 and max_iter >= 1, got {tol}, {max_iter}")
        self.tol, self.max_iter = tol, max_iter

    def forward(
        self, a: Tensor, G: Tensor | None = None, h: Tensor | None = None,
        return_info: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        if (G is None) != (h is None):
            raise ValueError("G and h must be given together")
        if G is None:
            if self.G is None:
                raise ValueError("no constraints: pass G and h at construction or call time")
            G, h = self.G, self.h
        a = _check_shape("a", a, [(None, None), (None, None, None)])
        B, m = a.shape[0], a.shape[-1]
        lead = a.shape[:-1]  # (B,) or (B, T)
        if not isinstance(G, Tensor) or G.dim() < 2:
            raise ValueError(f"G must have shape (k, {m}), (B, k, {m}) or (B, T, k, {m}), got "
                             f"{tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__}")
        k = G.shape[-2]
        shapes_G = [(k, m), (B, k, m)] + ([(B, a.shape[1], k, m)] if a.dim() == 3 else [])
        G = _check_shape("G", G, shapes_G)
        h = _check_shape("h", h, [tuple(G.shape[:-1])])
        if G.dim() == 3 and a.dim() == 3:  # (B, k, m) shared by the T actions of a row
            G, h = G.unsqueeze(1), h.unsqueeze(1)
        G = G.expand(*lead, k, m).reshape(-1, k, m)
        h = h.expand(*lead, k).reshape(-1, k)
        y, info = project_polytope(a.reshape(-1, m), G, h, self.tol, self.max_iter)
        y = y.reshape(a.shape)
        if not return_info:
            return y
        return y, {name: v.reshape(*lead, *v.shape[1:]) for name, v in info.items()}


def cbf_constraints(
    A: Tensor,
    B: Tensor,
    x: Tensor,
    P: Tensor,
    q: Tensor,
    alpha: float = 0.5,
    u_lower: Tensor | float | None = None,
    u_upper: Tensor | float | None = None,
    f: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Discrete-time CBF and box constraints on ``u`` for ``x⁺ = A x + B u + f``.

    The safe set is ``{x : P x ≤ q}`` (each row a half-space; a keep-out ``pᵀx > q`` is the
    complement of one). With barrier ``b(x) = q − P x ≥ 0`` the discrete-time CBF condition
    ``b(x⁺) ≥ (1 − α) b(x)`` is linear in ``u``:
    ``P B u ≤ α q − P (A x + f) + (1 − α) P x``. Box limits add ``u ≤ u_upper``, ``−u ≤ −u_lower``.

    Shapes (``N`` is the batch here, as ``B`` is the input matrix): ``A (n, n)`` or
    ``(N, n, n)``, ``B (n, m)`` or ``(N, n, m)``, ``x (N, n)``, ``P (k, n)`` or ``(N, k, n)``,
    ``q (k,)`` or ``(N, k)``, ``f (n,)`` or ``(N, n)``; bounds a scalar, ``(m,)`` or ``(N, m)``.

    Returns:
        ``G (N, k', m)``, ``h (N, k')`` for :class:`SafetyFilter`, ``k' = k + #bounds·m``.
    """
    x = _check_shape("x", x, [(None, None)])
    N, n = x.shape
    A = _check_shape("A", A, [(n, n), (N, n, n)])
    B = _check_shape("B", B, [(n, None), (N, n, None)])
    m = B.shape[-1]
    P = _check_shape("P", P, [(None, n), (N, None, n)])
    k = P.shape[-2]
    q = _check_shape("q", q, [(k,), (N, k)])
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    x_next = torch.einsum("...ij,nj->ni", A, x)  # (N, n), without the input
    if f is not None:
        x_next = x_next + _check_shape("f", f, [(n,), (N, n)])
    G = torch.einsum("...ki,...ij->...kj", P, B).expand(N, k, m)
    Px = torch.einsum("...ki,ni->nk", P, x)
    h = alpha * q - torch.einsum("...ki,ni->nk", P, x_next) + (1.0 - alpha) * Px
    Gs, hs = [G], [h.expand(N, k)]
    eye = torch.eye(m, dtype=x.dtype, device=x.device).expand(N, m, m)
    for name, bound, sign in (("u_upper", u_upper, 1.0), ("u_lower", u_lower, -1.0)):
        if bound is None:
            continue
        bound = torch.as_tensor(bound, dtype=x.dtype, device=x.device)
        if bound.dim() > 0:
            bound = _check_shape(name, bound, [(m,), (N, m)])
        check_finite(name, bound)
        Gs.append(sign * eye)
        hs.append(sign * bound.expand(N, m))
    if u_lower is not None and u_upper is not None:
        lo = torch.as_tensor(u_lower, dtype=x.dtype)
        hi = torch.as_tensor(u_upper, dtype=x.dtype)
        if (lo > hi).any():
            raise ValueError("u_lower must be <= u_upper everywhere")
    return torch.cat(Gs, -2), torch.cat(hs, -1)
