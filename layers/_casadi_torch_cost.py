"""A torch cost inside a CasADi NLP: the decision-vector layout and the callbacks IPOPT calls.

:class:`CasadiTO` writes a :class:`~diffto.QuadraticCost` symbolically; any other cost of
:mod:`diffto.costs` enters its NLP through the callbacks here, which evaluate the user's own
torch cost (value, gradient and block-diagonal Hessian in the decision vector ``w``) for one
row of the batch at a time. :class:`Layout` maps between per-stage cost derivatives and ``w``.
"""

from __future__ import annotations

from typing import Any

import casadi as ca
import numpy as np
import torch
from torch import Tensor

__all__: list[str] = []


class Layout:
    """Where the plan sits in the decision vector ``w = [x_1..x_T, u_0..u_{T-1}]``
    (``n_w = T(n+m)``), and the maps between per-stage cost derivatives and ``w``."""

    def __init__(self, T: int, n: int, m: int) -> None:
        self.T, self.n, self.m, self.n_w = T, n, m, T * (n + m)
        # idx[t, j]: position in w of entry j of τ_t = [x_t; u_t] (−1 for x_0, not in w)
        x_idx = torch.arange(T * n).reshape(T, n) - n  # x_t at (t−1)n, t ≥ 1
        x_idx[0] = -1
        u_idx = T * n + torch.arange(T * m).reshape(T, m)
        self.idx = torch.cat([x_idx, u_idx], -1)  # (T, n+m)
        self.x_T = torch.arange((T - 1) * n, T * n)
        # source[i, j]: where entry (i, j) of the Hessian in w sits in one row's stage and
        # terminal Hessians flattened, [H (T, k, k) | H_f (n, n)]; −1 off the blocks. The
        # blocks do not overlap (x_T is in no stage), so every nonzero has one source.
        k = n + m
        source = np.full((self.n_w, self.n_w), -1, dtype=np.int64)
        local = np.arange(k * k).reshape(k, k)
        for t in range(T):
            keep = (self.idx[t] >= 0).numpy()
            pos = self.idx[t].numpy()[keep]
            source[np.ix_(pos, pos)] = t * k * k + local[np.ix_(keep, keep)]
        x_T = self.x_T.numpy()
        source[np.ix_(x_T, x_T)] = T * k * k + np.arange(n * n).reshape(n, n)
        rows, cols = np.nonzero(source.T >= 0)  # column-major, CasADi's nonzero order
        self.sparsity = ca.Sparsity.triplet(self.n_w, self.n_w, cols.tolist(), rows.tolist())
        r, c = self.sparsity.get_triplet()
        self.nz_rows, self.nz_cols = torch.tensor(r), torch.tensor(c)
        self.nz_source = torch.from_numpy(source[r, c])

    def plan(self, x0: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, T+1, n)``, ``u (B, T, m)`` from ``x0 (B, n)`` and ``W (B, n_w)``."""
        B, T, n, m = W.shape[0], self.T, self.n, self.m
        x = torch.cat([x0.unsqueeze(1), W[:, : T * n].reshape(B, T, n)], 1)
        return x, W[:, T * n :].reshape(B, T, m)

    def nonzeros(self, H: Tensor, H_f: Tensor) -> Tensor:
        """The nonzeros ``(B, nnz)`` of the Hessian in ``w``, in :attr:`sparsity`'s order, from
        stage Hessians ``H (B, T, n+m, n+m)`` and terminal ``H_f (B, n, n)`` (entries of
        ``x_0`` dropped: it is not a variable)."""
        flat = torch.cat([H.reshape(H.shape[0], -1), H_f.reshape(H.shape[0], -1)], -1)
        return flat[:, self.nz_source.to(flat.device)]

    def hessian(self, H: Tensor, H_f: Tensor) -> Tensor:
        """The same Hessian dense, ``(B, n_w, n_w)``."""
        out = H.new_zeros(H.shape[0], self.n_w, self.n_w)
        out[:, self.nz_rows, self.nz_cols] = self.nonzeros(H, H_f)
        return out


class TorchObjective:
    """A cost of the protocol of :mod:`diffto.costs` evaluated for CasADi callbacks: value,
    gradient and Hessian in ``w`` for one row of the current call's batch.

    :meth:`bind` attaches the call's cost and ``x0`` for the duration of the solve (the
    callbacks are built once per layer); rows other than the one asked for are held at
    ``W`` (their initial guesses), which changes nothing for a row-separable cost.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.cost = self.x0 = self.W = None
        self._key: tuple | None = None
        self._value_grad: tuple[float, np.ndarray] = (0.0, np.zeros(0))

    def bind(self, cost: Any, x0: Tensor, W: np.ndarray) -> None:
        self.cost, self.x0, self.W = cost, x0.detach().double(), W.copy()
        self._key = None

    def unbind(self) -> None:
        self.cost = self.x0 = self.W = None
        self._key = None

    def _batch(self, w: np.ndarray, row: int) -> Tensor:
        if self.cost is None:
            raise RuntimeError("CasadiTO's cost callback was evaluated outside a solve")
        W = torch.as_tensor(self.W, dtype=torch.float64, device=self.x0.device).clone()
        W[row] = torch.as_tensor(w, dtype=torch.float64, device=self.x0.device)
        return W

    def value_grad(self, w: np.ndarray, row: int) -> tuple[float, np.ndarray]:
        key = (row, w.tobytes())
        if key != self._key:
            with torch.enable_grad():
                W = self._batch(w, row).requires_grad_(True)
                J = self.cost.evaluate(*self.layout.plan(self.x0, W))
                (G,) = torch.autograd.grad(J.sum(), W, allow_unused=True)
            G = torch.zeros_like(W) if G is None else G
            self._key = key
            self._value_grad = (float(J[row].detach()), G[row].detach().cpu().numpy())
        return self._value_grad

    def hessian(self, w: np.ndarray, row: int) -> np.ndarray:
        """The nonzeros of the Hessian of row ``row`` in the layout's sparsity order."""
        x, u = self.layout.plan(self.x0, self._batch(w, row))
        H, _, H_f, _ = self.cost.derivatives(x, u, "exact")
        return self.layout.nonzeros(H[row : row + 1], H_f[row : row + 1])[0].cpu().numpy()


def _dense(r: int, c: int) -> Any:
    return ca.Sparsity.dense(r, c)


def _zero(r: int, c: int) -> Any:
    return ca.Sparsity(r, c)


class _CostHessian(ca.Callback):
    """Second level: the Jacobian of :class:`_CostGradient`. Inputs ``(w, row, J, ∇J, ∂J/∂row)``;
    outputs the six blocks ``∂(∇J, ∂J/∂row)/∂(w, row, J)``, all structurally zero but the first
    (the row index selects a row, it is not differentiated)."""

    def __init__(self, name: str, obj: TorchObjective, opts: dict) -> None:
        ca.Callback.__init__(self)
        self.obj, self.n_w = obj, obj.layout.n_w
        self.construct(name, opts)

    def get_n_in(self) -> int:
        return 5

    def get_n_out(self) -> int:
        return 6

    def get_sparsity_in(self, i: int) -> Any:
        n_w = self.n_w
        return [_dense(n_w, 1), _dense(1, 1), _dense(1, 1), _dense(1, n_w), _zero(1, 1)][i]

    def get_sparsity_out(self, i: int) -> Any:
        n_w = self.n_w
        if i == 0:
            return self.obj.layout.sparsity
        return [None, _zero(n_w, 1), _zero(n_w, 1), _zero(1, n_w), _zero(1, 1), _zero(1, 1)][i]

    def eval(self, arg: list) -> list:
        w, row = np.asarray(arg[0]).ravel(), int(round(float(arg[1])))
        H = ca.DM(self.obj.layout.sparsity, self.obj.hessian(w, row))
        return [H] + [ca.DM(self.get_sparsity_out(i)) for i in range(1, 6)]


class _CostGradient(ca.Callback):
    """First level: the Jacobian of :class:`_CostValue`. Inputs ``(w, row, J)``; outputs
    ``∇_w J (1, n_w)`` and ``∂J/∂row`` (structurally zero)."""

    def __init__(self, name: str, obj: TorchObjective, opts: dict) -> None:
        ca.Callback.__init__(self)
        self.obj, self.n_w = obj, obj.layout.n_w
        self.construct(name, opts)

    def get_n_in(self) -> int:
        return 3

    def get_n_out(self) -> int:
        return 2

    def get_sparsity_in(self, i: int) -> Any:
        return [_dense(self.n_w, 1), _dense(1, 1), _dense(1, 1)][i]

    def get_sparsity_out(self, i: int) -> Any:
        return [_dense(1, self.n_w), _zero(1, 1)][i]

    def eval(self, arg: list) -> list:
        w, row = np.asarray(arg[0]).ravel(), int(round(float(arg[1])))
        return [ca.DM(self.obj.value_grad(w, row)[1]).T, ca.DM(_zero(1, 1))]

    def has_jacobian(self) -> bool:
        return True

    def get_jacobian(self, name: str, inames: list, onames: list, opts: dict) -> Any:
        self.hess = _CostHessian(name, self.obj, opts)  # CasADi keeps no reference
        return self.hess


class CostValue(ca.Callback):
    """The total cost ``J (1, 1)`` of row ``row`` at ``w``, by torch."""

    def __init__(self, name: str, obj: TorchObjective) -> None:
        ca.Callback.__init__(self)
        self.obj, self.n_w = obj, obj.layout.n_w
        self.construct(name, {})

    def get_n_in(self) -> int:
        return 2

    def get_n_out(self) -> int:
        return 1

    def get_sparsity_in(self, i: int) -> Any:
        return [_dense(self.n_w, 1), _dense(1, 1)][i]

    def get_sparsity_out(self, i: int) -> Any:
        return _dense(1, 1)

    def eval(self, arg: list) -> list:
        w, row = np.asarray(arg[0]).ravel(), int(round(float(arg[1])))
        return [self.obj.value_grad(w, row)[0]]

    def has_jacobian(self) -> bool:
        return True

    def get_jacobian(self, name: str, inames: list, onames: list, opts: dict) -> Any:
        self.grad = _CostGradient(name, self.obj, opts)
        return self.grad
