"""Random well-posed problems for property tests of solver layers (diffto's and yours)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_lq", "small_lq_dims", "central_differences"]


def random_lq(
    seed: int, B: int, T: int, n: int, m: int, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A random LQ problem with positive definite stage and terminal costs and mildly stable,
    time-varying dynamics shared by the batch.

    Returns ``x0 (B, n)``, ``C (B, T, n+m, n+m)``, ``c (B, T, n+m)``, ``C_final (n, n)``,
    ``c_final (B, n)``, ``F (T, n, n+m)``, ``f (T, n)``.
    """
    g = torch.Generator().manual_seed(seed)
    k = n + m
    A = torch.randn(B, T, k, k, generator=g, dtype=dtype)
    C = A @ A.transpose(-1, -2) / k + 0.5 * torch.eye(k, dtype=dtype)
    c = torch.randn(B, T, k, generator=g, dtype=dtype)
    Af = torch.randn(n, n, generator=g, dtype=dtype)
    C_f = Af @ Af.T / n + torch.eye(n, dtype=dtype)
    c_f = torch.randn(B, n, generator=g, dtype=dtype)
    F = torch.randn(T, n, k, generator=g, dtype=dtype) * 0.4
    F[:, :, :n] += torch.eye(n, dtype=dtype)
    f = torch.randn(T, n, generator=g, dtype=dtype) * 0.1
    x0 = torch.randn(B, n, generator=g, dtype=dtype)
    return x0, C, c, C_f, c_f, F, f


def small_lq_dims() -> dict:
    """Hypothesis strategies for the keyword arguments ``seed, B, T, n, m`` of
    :func:`random_lq`, sized for slow backends (use as ``@given(**small_lq_dims())``)."""
    from hypothesis import strategies as st  # a test-time dependency only

    return {
        "seed": st.integers(0, 2**16),
        "B": st.integers(1, 3),
        "T": st.integers(1, 5),
        "n": st.integers(1, 3),
        "m": st.integers(1, 2),
    }


def central_differences(fn, args: list[Tensor], eps: float = 1e-6) -> list[Tensor]:
    """Central differences ``(fn(a + ε e_j) − fn(a − ε e_j)) / 2ε`` of a scalar function of several
    tensors, one entry at a time: the reference for a layer's gradients (call it under
    ``torch.no_grad()``; each entry costs two solves). Returns one tensor per argument, shaped
    like it."""
    out = []
    for i, a in enumerate(args):
        fd = torch.zeros_like(a)
        for j in range(a.numel()):
            plus = [b.clone() for b in args]
            minus = [b.clone() for b in args]
            plus[i].view(-1)[j] += eps
            minus[i].view(-1)[j] -= eps
            fd.view(-1)[j] = (fn(*plus) - fn(*minus)) / (2 * eps)
        out.append(fd)
    return out
