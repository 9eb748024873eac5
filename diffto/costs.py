"""General trajectory costs: any differentiable stage and terminal function, or least squares.

A cost of a plan ``x (B, T+1, n)``, ``u (B, T, m)`` is

.. math::

    J = \\sum_{t=0}^{T-1} \\ell(x_t, u_t) + \\ell_T(x_T).

:class:`NonlinearCost` takes ``ℓ`` and ``ℓ_T`` as any ``nn.Module`` or callable;
:class:`LeastSquaresCost` takes residuals ``r`` with ``ℓ = ½‖r‖²``. Solvers ask a cost for its
value (:meth:`evaluate`), its gradients in ``τ_t = [x_t; u_t]`` and ``x_T`` (:meth:`gradients`)
and a local quadratic model (:meth:`derivatives`). Costs add with ``+``; a
:class:`~diffto.QuadraticCost` speaks the same protocol, so it mixes with these.

The functions are called on the whole batch of stages at once, ``stage(x (B, T, n),
u (B, T, m)) -> (B, T)``, and must be *stage-separable*: entry ``(b, t)`` depends on
``x[b, t]`` and ``u[b, t]`` only (tensors they close over, such as a goal ``(B, 3)``,
broadcast over ``T``). That is what makes the per-stage derivatives a few reverse passes
(:func:`diffto.autodiff.rowwise_jacobian`) with no ``vmap`` requirement, so pytorch-kinematics'
FK works inside a cost. Gradients of a solver's plan reach every tensor the functions use,
module parameters or closed-over tensors alike (the solvers differentiate the cost's gradient
with ordinary autograd).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from diffto.autodiff import rowwise_jacobian

__all__ = ["NonlinearCost", "LeastSquaresCost", "SumCost", "HessianKind"]

HessianKind = Literal["exact", "convex"]
Derivatives = tuple[Tensor, Tensor, Tensor, Tensor]


def _check_plan(x: Tensor, u: Tensor) -> None:
    if x.dim() != 3 or u.dim() != 3 or x.shape[0] != u.shape[0] or x.shape[1] != u.shape[1] + 1:
        raise ValueError(
            f"a plan is x (B, T+1, n) and u (B, T, m), got x {tuple(x.shape)} and u "
            f"{tuple(u.shape)}"
        )


def _check_output(name: str, value: Tensor, shape: tuple[int, ...]) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must return a torch.Tensor, got {type(value).__name__}")
    if value.shape != shape:
        try:
            value = value.expand(shape)
        except RuntimeError:
            raise ValueError(
                f"{name} must return shape {shape}, got {tuple(value.shape)}"
            ) from None
    return value


def _psd(H: Tensor) -> Tensor:
    """Nearest positive semidefinite matrix (eigenvalues clamped at zero) of symmetric ``H``."""
    evals, evecs = torch.linalg.eigh(H)
    return (evecs * evals.clamp_min(0).unsqueeze(-2)) @ evecs.transpose(-1, -2)


class _Cost:
    """What all costs share: addition and the derivative protocol built on :meth:`_parts`."""

    def __add__(self, other: object) -> SumCost:
        if not hasattr(other, "derivatives") or not hasattr(other, "evaluate"):
            return NotImplemented
        return SumCost(self, other)

    def __radd__(self, other: object) -> SumCost:
        if not hasattr(other, "derivatives") or not hasattr(other, "evaluate"):
            return NotImplemented
        return SumCost(other, self)


class NonlinearCost(_Cost):
    """Any differentiable stage cost ``ℓ(x_t, u_t)`` and terminal cost ``ℓ_T(x_T)``.

    Args:
        stage: ``(x (B, T, n), u (B, T, m)) -> (B, T)``, stage-separable (see the module
            docstring); an ``nn.Module`` or any callable, twice differentiable.
        terminal: ``(x_T (B, n)) -> (B,)``; ``None`` means no terminal cost.

    Solvers quadratize it exactly at each iterate (:meth:`derivatives`); with
    ``hessian="convex"`` indefinite stage Hessians are projected onto the PSD cone, what a
    forward solver needs for descent; the implicit backward uses the exact Hessian.

    Example::

        >>> import torch
        >>> from diffto import NonlinearCost
        >>> goal = torch.tensor([1.0, 0.0])
        >>> cost = NonlinearCost(
        ...     lambda x, u: (x - goal).pow(2).sum(-1) + 0.1 * u.pow(2).sum(-1),
        ...     terminal=lambda xT: 10 * (xT - goal).pow(2).sum(-1))
        >>> cost.evaluate(torch.zeros(4, 11, 2), torch.zeros(4, 10, 1)).shape
        torch.Size([4])
    """

    def __init__(
        self,
        stage: Callable[[Tensor, Tensor], Tensor],
        terminal: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not callable(stage):
            raise ValueError(f"stage must be callable (x, u) -> (B, T), got {type(stage).__name__}")
        if terminal is not None and not callable(terminal):
            raise ValueError(
                f"terminal must be callable x_T -> (B,) or None, got {type(terminal).__name__}"
            )
        self.stage, self.terminal = stage, terminal

    horizon = None  # set by the solver (a nonlinear cost works for any T)

    def _stage(self, x: Tensor, u: Tensor) -> Tensor:
        return _check_output("stage", self.stage(x, u), x.shape[:2])

    def _terminal(self, xT: Tensor) -> Tensor | None:
        if self.terminal is None:
            return None
        return _check_output("terminal", self.terminal(xT), xT.shape[:1])

    def evaluate(self, x: Tensor, u: Tensor) -> Tensor:
        """Total cost ``(B,)`` of ``x (B, T+1, n)``, ``u (B, T, m)``."""
        _check_plan(x, u)
        total = self._stage(x[:, :-1], u).sum(-1)
        term = self._terminal(x[:, -1])
        return total if term is None else total + term

    def gradients(self, x: Tensor, u: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """``∇_τ ℓ (B, T, n+m)`` and ``∇ℓ_T (B, n)`` at the plan; with ``create_graph`` they
        stay differentiable w.r.t. every tensor the cost uses."""
        g, g_f, _, _ = self._derivatives(x, u, create_graph, hessian=False)
        return g, g_f

    def derivatives(self, x: Tensor, u: Tensor, hessian: HessianKind = "exact",
                    create_graph: bool = False) -> Derivatives:
        """Local quadratic model at the plan: ``H (B, T, k, k)``, ``g (B, T, k)``,
        ``H_f (B, n, n)``, ``g_f (B, n)`` with ``k = n + m`` (Hessians symmetric;
        ``"convex"`` projects them onto the PSD cone)."""
        g, g_f, H, H_f = self._derivatives(x, u, create_graph, hessian=True)
        if hessian == "convex":
            H, H_f = _psd(H), _psd(H_f)
        return H, g, H_f, g_f

    def _derivatives(self, x: Tensor, u: Tensor, create_graph: bool, hessian: bool):
        _check_plan(x, u)
        n = x.shape[-1]
        with torch.enable_grad():
            tau = torch.cat([x[:, :-1], u], -1).detach().requires_grad_()
            val = self._stage(tau[..., :n], tau[..., n:])
            (g,) = torch.autograd.grad(val.sum(), tau, create_graph=True, allow_unused=True)
            g = torch.zeros_like(tau) if g is None else g
            H = rowwise_jacobian(g, tau, create_graph) if hessian else None
            xT = x[:, -1].detach().requires_grad_()
            term = self._terminal(xT)
            if term is None:
                g_f = xT.new_zeros(xT.shape)
                H_f = xT.new_zeros(*xT.shape, n) if hessian else None
            else:
                (g_f,) = torch.autograd.grad(term.sum(), xT, create_graph=True, allow_unused=True)
                g_f = torch.zeros_like(xT) if g_f is None else g_f
                H_f = rowwise_jacobian(g_f, xT, create_graph) if hessian else None
        if not create_graph:
            g, g_f = g.detach(), g_f.detach()
        if hessian:
            H = 0.5 * (H + H.transpose(-1, -2))
            H_f = 0.5 * (H_f + H_f.transpose(-1, -2))
        return g, g_f, H, H_f


class LeastSquaresCost(NonlinearCost):
    """``J = Σ_t ½‖r(x_t, u_t)‖² + ½‖r_f(x_T)‖²``: a cost solved by Gauss-Newton.

    Args:
        residual: ``(x (B, T, n), u (B, T, m)) -> (B, T, r)``, stage-separable.
        terminal_residual: ``(x_T (B, n)) -> (B, r_f)``; ``None`` means no terminal cost.

    ``derivatives(..., hessian="convex")`` is the Gauss-Newton model ``H = JᵀJ``, ``g = Jᵀr``
    (always PSD, no second derivatives of ``r``); ``"exact"`` adds ``Σ_i r_i ∇²r_i``, which the
    implicit backward of a solver uses so that its gradients are exact even where the residuals
    do not vanish at the optimum. Weights go inside the residuals (``√w · r``).
    """

    def __init__(
        self,
        residual: Callable[[Tensor, Tensor], Tensor],
        terminal_residual: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not callable(residual):
            raise ValueError(
                f"residual must be callable (x, u) -> (B, T, r), got {type(residual).__name__}"
            )
        if terminal_residual is not None and not callable(terminal_residual):
            raise ValueError(
                "terminal_residual must be callable x_T -> (B, r_f) or None, got "
                f"{type(terminal_residual).__name__}"
            )
        self.residual, self.terminal_residual = residual, terminal_residual
        terminal = None if terminal_residual is None else self._terminal_value
        super().__init__(self._stage_value, terminal)

    def residuals(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor | None]:
        """``r (B, T, r)`` at the stages ``x (B, T, n)``, ``u (B, T, m)`` and ``r_f (B, r_f)``
        at ``x[:, -1]`` when ``x`` is a whole plan ``(B, T+1, n)`` (else ``None``)."""
        r = self._residual(x[:, : u.shape[1]], u)
        r_f = None
        if self.terminal_residual is not None and x.shape[1] == u.shape[1] + 1:
            r_f = self._terminal_residual(x[:, -1])
        return r, r_f

    def _residual(self, x: Tensor, u: Tensor) -> Tensor:
        r = self.residual(x, u)
        if not isinstance(r, Tensor) or r.dim() != 3 or r.shape[:2] != x.shape[:2]:
            shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise ValueError(f"residual must return shape (B, T, r) = {tuple(x.shape[:2])} + "
                             f"(r,), got {shape}")
        return r

    def _terminal_residual(self, xT: Tensor) -> Tensor:
        r = self.terminal_residual(xT)
        if not isinstance(r, Tensor) or r.dim() != 2 or r.shape[0] != xT.shape[0]:
            shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise ValueError(f"terminal_residual must return shape ({xT.shape[0]}, r_f), got "
                             f"{shape}")
        return r

    def _stage_value(self, x: Tensor, u: Tensor) -> Tensor:
        return 0.5 * self._residual(x, u).pow(2).sum(-1)

    def _terminal_value(self, xT: Tensor) -> Tensor:
        return 0.5 * self._terminal_residual(xT).pow(2).sum(-1)

    def derivatives(self, x: Tensor, u: Tensor, hessian: HessianKind = "exact",
                    create_graph: bool = False) -> Derivatives:
        if hessian == "exact":
            return super().derivatives(x, u, "exact", create_graph)
        _check_plan(x, u)
        n = x.shape[-1]
        with torch.enable_grad():
            tau = torch.cat([x[:, :-1], u], -1).detach().requires_grad_()
            r = self._residual(tau[..., :n], tau[..., n:])
            J = rowwise_jacobian(r, tau, create_graph)  # (B, T, r, k)
            H = J.transpose(-1, -2) @ J
            g = (J.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
            if self.terminal_residual is None:
                H_f = x.new_zeros(x.shape[0], n, n)
                g_f = x.new_zeros(x.shape[0], n)
            else:
                xT = x[:, -1].detach().requires_grad_()
                r_f = self._terminal_residual(xT)
                J_f = rowwise_jacobian(r_f, xT, create_graph)  # (B, r_f, n)
                H_f = J_f.transpose(-1, -2) @ J_f
                g_f = (J_f.transpose(-1, -2) @ r_f.unsqueeze(-1)).squeeze(-1)
        if not create_graph:
            H, g, H_f, g_f = H.detach(), g.detach(), H_f.detach(), g_f.detach()
        return H, g, H_f, g_f


class SumCost(_Cost):
    """The sum of costs (``cost_a + cost_b``): values, gradients and quadratic models add."""

    def __init__(self, *terms) -> None:
        flat = []
        for term in terms:
            if not hasattr(term, "derivatives") or not hasattr(term, "evaluate"):
                raise ValueError(f"cannot add a {type(term).__name__} to a cost")
            flat.extend(term.terms if isinstance(term, SumCost) else [term])
        horizons = {t.horizon for t in flat if getattr(t, "horizon", None) is not None}
        if len(horizons) > 1:
            raise ValueError(f"added costs have different horizons {sorted(horizons)}")
        self.terms = tuple(flat)
        self.horizon = horizons.pop() if horizons else None

    def evaluate(self, x: Tensor, u: Tensor) -> Tensor:
        return sum(t.evaluate(x, u) for t in self.terms)

    def gradients(self, x: Tensor, u: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        parts = [t.gradients(x, u, create_graph) for t in self.terms]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def derivatives(self, x: Tensor, u: Tensor, hessian: HessianKind = "exact",
                    create_graph: bool = False) -> Derivatives:
        parts = [t.derivatives(x, u, hessian, create_graph) for t in self.terms]
        return tuple(sum(p[i] for p in parts) for i in range(4))
