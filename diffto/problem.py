"""The vocabulary every solver layer speaks: costs, dynamics, solutions, and input checks.

A trajectory optimization problem over horizon ``T`` with state dimension ``n`` and control
dimension ``m`` is

.. math::

    \\min_{x, u} \\sum_{t=0}^{T-1} \\tfrac12 \\tau_t^\\top C_t \\tau_t + c_t^\\top \\tau_t
        + \\tfrac12 x_T^\\top C_f x_T + c_f^\\top x_T
    \\quad \\text{s.t.} \\quad x_{t+1} = F_t \\tau_t + f_t,\\; x_0 = x_\\text{init},

with ``τ_t = [x_t; u_t]``. Shapes are batch first: ``x0 (B, n)``, a plan ``x (B, T+1, n)``
(``x0`` first, terminal state last) and ``u (B, T, m)``. Leading batch dimensions of cost and
dynamics tensors may be omitted; they broadcast over the batch.

Every check here raises ``ValueError`` naming the argument and what was expected, so a
layer never runs on an ill-posed problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffto.costs import Derivatives, HessianKind, _Cost

__all__ = [
    "QuadraticCost",
    "LinearDynamics",
    "Solution",
    "check_finite",
    "check_like",
    "check_not_vmapped",
    "check_x0",
    "check_bounds",
    "problem_dims",
    "sum_to_batch",
]


def check_finite(name: str, value: Tensor | None) -> None:
    """Raise ``ValueError`` if ``value`` holds NaN or Inf."""
    if value is None:
        return
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).sum().item()
        raise ValueError(f"{name} contains {bad} NaN/Inf entries (shape {tuple(value.shape)})")


def check_like(x0: Tensor, named: dict[str, Tensor | None]) -> None:
    """Raise unless ``x0`` is floating point and every tensor in ``named`` shares its dtype and
    device (batched products would otherwise fail inside torch, or silently promote)."""
    if not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating-point tensor, got dtype {x0.dtype}")
    for name, t in named.items():
        if t is not None and (t.dtype != x0.dtype or t.device != x0.device):
            raise ValueError(
                f"{name} has dtype {t.dtype} on {t.device} but x0 has {x0.dtype} on {x0.device}: "
                "give every tensor of the problem the same dtype and device"
            )


def check_not_vmapped(layer: str, x0: Tensor) -> None:
    """Refuse ``torch.func.vmap`` with a message that says why: the solver layers are batched
    already, and their input checks and iterations depend on the data."""
    functorch = getattr(torch._C, "_functorch", None)
    is_batched = getattr(functorch, "is_batchedtensor", None)
    if is_batched is not None and is_batched(x0):
        raise RuntimeError(
            f"{layer} does not run under torch.func.vmap (its checks and iterations depend on "
            "the data); it is batched already: stack the problems along the first dimension "
            "of x0"
        )


def _batched(name: str, value: Tensor, trailing: tuple[int, ...], ndim_core: int) -> Tensor:
    """Check trailing dims of ``value`` and give it exactly one leading batch dimension."""
    if value.dim() == ndim_core:
        value = value.unsqueeze(0)
    if value.dim() != ndim_core + 1:
        raise ValueError(
            f"{name} must have shape (B, {', '.join(map(str, trailing))}) or "
            f"({', '.join(map(str, trailing))}), got {tuple(value.shape)}"
        )
    if tuple(value.shape[1:]) != trailing:
        raise ValueError(f"{name} must have trailing shape {trailing}, got {tuple(value.shape)}")
    return value


class QuadraticCost(_Cost):
    """Stage cost ``0.5 τᵀC_tτ + c_tᵀτ`` (``τ = [x; u]``) plus terminal ``0.5 xᵀC_f x + c_fᵀx``.

    Args:
        C: ``(B, T, n+m, n+m)`` or ``(T, n+m, n+m)``. Only its symmetric part matters.
        c: ``(B, T, n+m)`` or ``(T, n+m)``; ``None`` means zero.
        C_final: ``(B, n, n)`` or ``(n, n)``; ``None`` means no quadratic terminal term.
        c_final: ``(B, n)`` or ``(n,)``; ``None`` means no linear terminal term.

    The tensors are kept as given (so gradients reach them); :meth:`batched` returns views
    with an explicit batch dimension after checking shapes.
    """

    def __init__(
        self,
        C: Tensor,
        c: Tensor | None = None,
        C_final: Tensor | None = None,
        c_final: Tensor | None = None,
    ) -> None:
        if not isinstance(C, Tensor) or C.dim() not in (3, 4):
            shape = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
            raise ValueError(f"C must have shape (B, T, n+m, n+m) or (T, n+m, n+m), got {shape}")
        if C.shape[-1] != C.shape[-2]:
            raise ValueError(f"C must be square in its last two dims, got {tuple(C.shape)}")
        self.C, self.c, self.C_final, self.c_final = C, c, C_final, c_final
        for name in ("C", "c", "C_final", "c_final"):
            check_finite(name, getattr(self, name))

    @property
    def horizon(self) -> int:
        return self.C.shape[-3]

    @property
    def n_tau(self) -> int:
        return self.C.shape[-1]

    def batched(self, n: int, m: int) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Return ``(C, c, C_final, c_final)`` each with one leading batch dim, checked
        against state dimension ``n`` and control dimension ``m``; ``C`` symmetrized."""
        T, k = self.horizon, n + m
        C = _batched("C", self.C, (T, k, k), 3)
        C = 0.5 * (C + C.transpose(-1, -2))
        c = None if self.c is None else _batched("c", self.c, (T, k), 2)
        C_f = None if self.C_final is None else _batched("C_final", self.C_final, (n, n), 2)
        if C_f is not None:
            C_f = 0.5 * (C_f + C_f.transpose(-1, -2))
        c_f = None if self.c_final is None else _batched("c_final", self.c_final, (n,), 1)
        return C, c, C_f, c_f

    def expanded(self, B: int, n: int, m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The one dense form every solver uses: ``C (B, T, n+m, n+m)`` symmetrized,
        ``c (B, T, n+m)``, ``C_final (B, n, n)`` symmetrized, ``c_final (B, n)``; omitted terms
        are zeros, leading dims expanded (views where possible), shapes checked."""
        C, c, C_f, c_f = self.batched(n, m)
        T, k = self.horizon, n + m
        for name, t in (("C", C), ("c", c), ("C_final", C_f), ("c_final", c_f)):
            if t is not None and t.shape[0] not in (1, B):
                raise ValueError(f"cost.{name} has batch {t.shape[0]} but x0 has batch {B}")
        c = C.new_zeros(1, T, k) if c is None else c
        C_f = C.new_zeros(1, n, n) if C_f is None else C_f
        c_f = C.new_zeros(1, n) if c_f is None else c_f
        return (C.expand(B, T, k, k), c.expand(B, T, k), C_f.expand(B, n, n),
                c_f.expand(B, n))

    def check_control_pd(self, n: int, m: int, name: str = "cost.C") -> None:
        """Raise unless every stage's control block ``C_uu`` is positive definite."""
        C = _batched(name, self.C, (self.horizon, n + m, n + m), 3).detach()
        C_uu = 0.5 * (C[..., n:, n:] + C[..., n:, n:].transpose(-1, -2))
        if (torch.linalg.cholesky_ex(C_uu).info == 0).all():
            return
        lam_min = torch.linalg.eigvalsh(C_uu.double())[..., 0]
        raise ValueError(
            f"{name}: the control block C[..., n:, n:] must be positive definite at every "
            f"stage; smallest eigenvalue found {lam_min.min().item():.3g}"
        )

    def gradients(self, x: Tensor, u: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """``∇_τ ℓ = C τ + c`` ``(B, T, n+m)`` and ``∇ℓ_T = C_f x_T + c_f`` ``(B, n)``."""
        H, g, H_f, g_f = self.derivatives(x, u, create_graph=create_graph)
        return g, g_f

    def derivatives(self, x: Tensor, u: Tensor, hessian: HessianKind = "exact",
                    create_graph: bool = False) -> Derivatives:
        """The cost's own quadratic model at the plan ``x (B, T+1, n)``, ``u (B, T, m)``:
        ``C (B, T, k, k)``, ``Cτ + c (B, T, k)``, ``C_f (B, n, n)``, ``C_f x_T + c_f (B, n)``
        (``hessian`` is accepted for the protocol: a quadratic's model is exact and convex
        wherever the cost is)."""
        n, m = x.shape[-1], u.shape[-1]
        C, c, C_f, c_f = self.batched(n, m)
        B = x.shape[0]
        tau = torch.cat([x[:, :-1], u], dim=-1)
        g = (C @ tau.unsqueeze(-1)).squeeze(-1)
        g = g if c is None else g + c
        xT = x[:, -1]
        C_f = x.new_zeros(1, n, n) if C_f is None else C_f
        g_f = (C_f @ xT.unsqueeze(-1)).squeeze(-1)
        g_f = g_f if c_f is None else g_f + c_f
        out = (C.expand(B, *C.shape[1:]), g.expand(B, *g.shape[1:]), C_f.expand(B, n, n),
               g_f.expand(B, n))
        return out if create_graph else tuple(t.detach() for t in out)

    def evaluate(self, x: Tensor, u: Tensor) -> Tensor:
        """Total cost of plans ``x (B, T+1, n)``, ``u (B, T, m)``; returns ``(B,)``."""
        n, m = x.shape[-1], u.shape[-1]
        C, c, C_f, c_f = self.batched(n, m)
        tau = torch.cat([x[:, :-1], u], dim=-1)  # (B, T, n+m)
        total = 0.5 * torch.einsum("bti,btij,btj->b", tau, C.expand(tau.shape[0], -1, -1, -1), tau)
        if c is not None:
            total = total + (c * tau).sum((-1, -2))
        xT = x[:, -1]
        if C_f is not None:
            total = total + 0.5 * torch.einsum(
                "bi,bij,bj->b", xT, C_f.expand(xT.shape[0], -1, -1), xT
            )
        if c_f is not None:
            total = total + (c_f * xT).sum(-1)
        return total

    @classmethod
    def tracking(
        cls,
        Q: Tensor,
        R: Tensor,
        horizon: int,
        x_goal: Tensor | None = None,
        u_goal: Tensor | None = None,
        Q_final: Tensor | None = None,
    ) -> QuadraticCost:
        """Goal tracking ``Σ ½(x−x_g)ᵀQ(x−x_g) + ½(u−u_g)ᵀR(u−u_g)`` + ``½(x_T−x_g)ᵀQ_f(x_T−x_g)``.

        Args:
            Q: ``(n, n)``, ``(B, n, n)`` or a diagonal ``(n,)`` / ``(B, n)``. A square 2-D
                tensor is read as a matrix, so pass batched diagonals with ``B == n`` as
                ``torch.diag_embed(q)``.
            R: ``(m, m)``, ``(B, m, m)`` or a diagonal ``(m,)`` / ``(B, m)`` (same rule).
            horizon: T.
            x_goal: ``(n,)`` or ``(B, n)``; ``None`` means the origin.
            u_goal: ``(m,)`` or ``(B, m)``; ``None`` means zero.
            Q_final: like ``Q``; ``None`` means ``Q``.

        Constant terms are dropped: they change the cost value, not the plan or its gradients.
        """
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")

        def as_matrix(name: str, M: Tensor, vec_ndim_max: int) -> Tensor:
            if M.dim() == 1 or (M.dim() == 2 and vec_ndim_max == 2 and M.shape[-1] != M.shape[-2]):
                return torch.diag_embed(M)
            if M.dim() == 2 and M.shape[0] == M.shape[1]:
                return M
            if M.dim() == 3 and M.shape[-1] == M.shape[-2]:
                return M
            raise ValueError(
                f"{name} must be (k,), (B, k), (k, k) or (B, k, k), got {tuple(M.shape)}"
            )

        Qm = as_matrix("Q", Q, 2)
        Rm = as_matrix("R", R, 2)
        Qf = Qm if Q_final is None else as_matrix("Q_final", Q_final, 2)
        n, m = Qm.shape[-1], Rm.shape[-1]
        batch = torch.broadcast_shapes(Qm.shape[:-2], Rm.shape[:-2], Qf.shape[:-2])
        Qm, Rm, Qf = (M.expand(*batch, *M.shape[-2:]) for M in (Qm, Rm, Qf))
        zeros = Qm.new_zeros(*batch, n, m)
        C = torch.cat(
            [torch.cat([Qm, zeros], -1), torch.cat([zeros.transpose(-1, -2), Rm], -1)], -2
        )
        for name, goal, k in (("x_goal", x_goal, n), ("u_goal", u_goal, m)):
            if goal is not None and (not isinstance(goal, Tensor) or goal.dim() not in (1, 2)
                                     or goal.shape[-1] != k):
                shape = tuple(goal.shape) if isinstance(goal, Tensor) else type(goal).__name__
                raise ValueError(f"{name} must have shape ({k},) or (B, {k}), got {shape}")
        xg = Qm.new_zeros(n) if x_goal is None else x_goal
        ug = Qm.new_zeros(m) if u_goal is None else u_goal
        cx = -torch.einsum("...ij,...j->...i", Qm, xg)
        cu = -torch.einsum("...ij,...j->...i", Rm, ug)
        lead = torch.broadcast_shapes(cx.shape[:-1], cu.shape[:-1])
        c = torch.cat([cx.expand(*lead, n), cu.expand(*lead, m)], -1)
        C_final = Qf
        c_final = -torch.einsum("...ij,...j->...i", Qf, xg)
        C = C.unsqueeze(-3).expand(*C.shape[:-2], horizon, n + m, n + m)
        c = c.unsqueeze(-2).expand(*c.shape[:-1], horizon, n + m)
        return cls(C, c, C_final, c_final)


class LinearDynamics:
    """Time-varying affine dynamics ``x_{t+1} = F_t [x_t; u_t] + f_t``.

    Args:
        F: ``(B, T, n, n+m)`` or ``(T, n, n+m)``.
        f: ``(B, T, n)`` or ``(T, n)``; ``None`` means zero.

    Callable as ``dynamics(x, u, t)`` for one step of a batch.
    """

    def __init__(self, F: Tensor, f: Tensor | None = None) -> None:
        if not isinstance(F, Tensor) or F.dim() not in (3, 4):
            shape = tuple(F.shape) if isinstance(F, Tensor) else type(F).__name__
            raise ValueError(f"F must have shape (B, T, n, n+m) or (T, n, n+m), got {shape}")
        if F.shape[-1] <= F.shape[-2]:
            raise ValueError(f"F must have shape (..., n, n+m) with m >= 1, got {tuple(F.shape)}")
        self.F, self.f = F, f
        check_finite("F", F)
        check_finite("f", f)

    @property
    def horizon(self) -> int:
        return self.F.shape[-3]

    @property
    def n_state(self) -> int:
        return self.F.shape[-2]

    @property
    def n_ctrl(self) -> int:
        return self.F.shape[-1] - self.F.shape[-2]

    def batched(self) -> tuple[Tensor, Tensor | None]:
        """``(F, f)`` with one leading batch dim each, shapes checked."""
        T, n, m = self.horizon, self.n_state, self.n_ctrl
        F = _batched("F", self.F, (T, n, n + m), 3)
        f = None if self.f is None else _batched("f", self.f, (T, n), 2)
        return F, f

    def __call__(self, x: Tensor, u: Tensor, t: int) -> Tensor:
        F, f = self.batched()
        tau = torch.cat([x, u], -1)
        x_next = torch.einsum("bij,bj->bi", F[:, t].expand(x.shape[0], -1, -1), tau)
        return x_next if f is None else x_next + f[:, t]

    @classmethod
    def time_invariant(cls, A: Tensor, B: Tensor, horizon: int, f: Tensor | None = None):
        """Build from ``A (.., n, n)``, ``B (.., n, m)`` repeated over ``horizon`` steps."""
        F = torch.cat([A, B], -1).unsqueeze(-3)
        F = F.expand(*F.shape[:-3], horizon, *F.shape[-2:])
        if f is not None:
            f = f.unsqueeze(-2).expand(*f.shape[:-1], horizon, f.shape[-1])
        return cls(F, f)


@dataclass
class Solution:
    """What every solve returns.

    Attributes:
        x: ``(B, T+1, n)`` states, ``x[:, 0]`` is ``x0``.
        u: ``(B, T, m)`` controls.
        cost: ``(B,)`` objective value of the plan.
        converged: ``(B,)`` bool; ``False`` rows are returned as the solver left them,
            never silently detached.
        iterations: ``(B,)`` iterations the solver used on each row.
        extras: backend-specific fields (gains, multipliers, status strings, ...).
    """

    x: Tensor
    u: Tensor
    cost: Tensor
    converged: Tensor
    iterations: Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def shifted(self, steps: int = 1) -> Tensor:
        """The controls moved ``steps`` stages forward, the last one repeated: ``(B, T, m)``,
        the warm start of the next receding-horizon call after ``steps`` applied controls."""
        if not isinstance(steps, int) or not 0 <= steps:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        u = self.u.detach()
        if steps == 0:
            return u
        steps = min(steps, u.shape[1])
        tail = u[:, -1:].expand(-1, steps, -1)
        return torch.cat([u[:, steps:], tail], 1)


def check_x0(x0: Tensor, n: int | None = None) -> Tensor:
    """Validate ``x0 (B, n)`` (a single ``(n,)`` state is promoted to ``B = 1``)."""
    if not isinstance(x0, Tensor):
        raise ValueError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    if x0.dim() == 1:
        x0 = x0.unsqueeze(0)
    if x0.dim() != 2 or (n is not None and x0.shape[-1] != n):
        want = f"(B, {n})" if n is not None else "(B, n)"
        raise ValueError(f"x0 must have shape {want}, got {tuple(x0.shape)}")
    check_finite("x0", x0)
    return x0


def check_bounds(
    lower: Tensor | float | None, upper: Tensor | float | None, m: int, names=("u_lower", "u_upper")
) -> None:
    """Raise if a bound is NaN, has a shape that does not broadcast to ``(B, T, m)``, or
    a lower bound exceeds its upper bound."""
    for name, b in zip(names, (lower, upper), strict=True):
        if isinstance(b, Tensor):
            if torch.isnan(b).any():
                raise ValueError(f"{name} contains NaN")
            if b.dim() > 0 and b.shape[-1] not in (1, m):
                raise ValueError(f"{name} must broadcast to (B, T, {m}), got {tuple(b.shape)}")
    if lower is not None and upper is not None:
        lo = torch.as_tensor(lower)
        hi = torch.as_tensor(upper)
        if (lo > hi).any():
            raise ValueError(f"{names[0]} must be <= {names[1]} everywhere")


def problem_dims(
    x0: Tensor, cost: QuadraticCost, n: int | None = None
) -> tuple[int, int, int, int]:
    """Return ``(B, T, n, m)`` for a problem, checking that ``x0`` and ``cost`` agree."""
    if not isinstance(cost, QuadraticCost):
        raise ValueError(f"cost must be a QuadraticCost, got {type(cost).__name__}")
    x0 = check_x0(x0, n)
    n = x0.shape[-1]
    m = cost.n_tau - n
    if m < 1:
        raise ValueError(
            f"cost.C has size {cost.n_tau} in its last dims but x0 has n={n}: "
            "expected n+m with m >= 1"
        )
    B = x0.shape[0]
    for name in ("C", "c"):
        t = getattr(cost, name)
        if t is not None and t.dim() == 4 and t.shape[0] not in (1, B):
            raise ValueError(f"cost.{name} has batch {t.shape[0]} but x0 has batch {B}")
    return B, cost.horizon, n, m


def sum_to_batch(grad: Tensor, like: Tensor) -> Tensor:
    """Reduce a gradient computed per batch row ``(B, ...)`` to the shape of an input that was
    broadcast over the batch from a leading dimension of 1 (what a custom backward returns)."""
    return grad.sum(0, keepdim=True) if like.shape[0] == 1 and grad.shape[0] != 1 else grad
