"""A cost as the nonlinear solvers see it: values and local quadratic models on batch rows.

The solvers work on subsets of the batch (the rows still iterating, the candidates of a line
search). A :class:`~diffto.QuadraticCost` is dense tensors, indexed by row. A general cost
(:class:`~diffto.NonlinearCost`, :class:`~diffto.LeastSquaresCost`, sums) is a function of the
whole batch: its tensors (a goal ``(B, 3)``) are aligned with the batch, so it is evaluated on
a full batch in which the rows of interest are substituted and the others hold the current
iterate, and the rows of interest are read back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffto.layers._lq_engine import bmv
from diffto.problem import QuadraticCost

__all__: list[str] = []


class CostModel:
    """Values and quadratic models of ``cost`` for a batch of ``B`` plans ``(T, n, m)``."""

    def __init__(self, cost, B: int, n: int, m: int, like: Tensor) -> None:
        self.cost, self.B, self.n, self.m = cost, B, n, m
        self.quadratic = isinstance(cost, QuadraticCost)
        if self.quadratic:
            C, c, C_f, c_f = cost.expanded(B, n, m)
            self.C, self.c, self.C_f, self.c_f = (
                0.5 * (C + C.transpose(-1, -2)), c, 0.5 * (C_f + C_f.transpose(-1, -2)), c_f)
        self.x_full: Tensor | None = None  # the current iterate of every row (general costs)
        self.u_full: Tensor | None = None

    def track(self, x: Tensor, u: Tensor) -> None:
        """The current iterate ``x (B, T+1, n)``, ``u (B, T, m)``: fills the rows a general
        cost is not asked about."""
        self.x_full, self.u_full = x, u

    def _substituted(self, rows: Tensor, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        xf, uf = self.x_full.clone(), self.u_full.clone()
        xf[rows], uf[rows] = x, u
        return xf, uf

    def values(self, rows: Tensor, x: Tensor, u: Tensor, groups: int = 1) -> Tensor:
        """Costs ``(N,)`` of the plans ``x (N, T+1, n)``, ``u (N, T, m)`` of batch rows
        ``rows (N,)``, which consist of ``groups`` consecutive blocks of distinct rows."""
        if self.quadratic:
            tau = torch.cat([x[:, :-1], u], -1)
            xT = x[:, -1]
            stage = (tau * (0.5 * bmv(self.C[rows], tau) + self.c[rows])).sum((-1, -2))
            return stage + (xT * (0.5 * bmv(self.C_f[rows], xT) + self.c_f[rows])).sum(-1)
        out = []
        for r, xs, us in zip(rows.chunk(groups), x.chunk(groups), u.chunk(groups), strict=True):
            xf, uf = self._substituted(r, xs, us)
            out.append(self.cost.evaluate(xf, uf)[r])
        return torch.cat(out)

    def quadratize(self, rows: Tensor, x: Tensor, u: Tensor, hessian: str = "convex",
                   create_graph: bool = False):
        """``H (N, T, k, k)``, ``g (N, T, k)``, ``H_f (N, n, n)``, ``g_f (N, n)`` at the plans of
        ``rows`` (distinct): the cost's quadratic model about them."""
        if self.quadratic:
            C = self.C[rows]
            g = bmv(C, torch.cat([x[:, :-1], u], -1)) + self.c[rows]
            C_f = self.C_f[rows]
            return C, g, C_f, bmv(C_f, x[:, -1]) + self.c_f[rows]
        xf, uf = self._substituted(rows, x, u)
        H, g, H_f, g_f = self.cost.derivatives(xf, uf, hessian, create_graph)
        return H[rows], g[rows], H_f[rows], g_f[rows]

    def control_scale(self, H: Tensor, eps: float) -> Tensor:
        """Mean magnitude ``(N,)`` of the control curvature of ``H (N, T, k, k)``: the unit of
        the Levenberg-Marquardt factor, so that scaling the cost leaves every iterate alone."""
        n = self.n
        return H[..., n:, n:].diagonal(dim1=-2, dim2=-1).abs().mean((-1, -2)).clamp_min(eps)
