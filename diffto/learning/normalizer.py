"""Running mean and variance of observations, kept as module buffers so checkpoints carry them.

A policy trained on normalized observations is only usable with the statistics it was trained
with: they are buffers (not parameters) of an ``nn.Module``, so ``state_dict`` and Lightning
checkpoints save and restore them, and no optimizer ever touches them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RunningNormalizer"]


class RunningNormalizer(nn.Module):
    """``y = clip((x - μ) / sqrt(σ² + eps), -clip, clip)`` with running ``μ``, ``σ²``.

    Statistics are merged batch by batch with the parallel-variance rule of Chan et al.: for
    the running ``(μ_a, M_a, n_a)`` (``M`` = sum of squared deviations) and a batch
    ``(μ_b, M_b, n_b)``, ``δ = μ_b − μ_a``, ``n = n_a + n_b``,

        μ = μ_a + δ n_b / n,     M = M_a + M_b + δ² n_a n_b / n,     σ² = M / n.

    This is exact for any batch split (unlike an exponential moving average) and numerically
    stable because it never forms ``Σx²``.

    Args:
        shape: shape of one observation, e.g. ``(30,)`` or ``30``.
        eps: added to the variance before the square root (a constant feature stays finite).
        clip: bound on normalized values; ``None`` disables clipping.

    ``update`` is a no-op while :attr:`frozen` is set, so evaluation cannot shift the
    statistics a policy was trained with.
    """

    mean: Tensor
    var: Tensor
    count: Tensor

    def __init__(
        self, shape: int | tuple[int, ...], eps: float = 1e-8, clip: float | None = 10.0
    ) -> None:
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(s <= 0 for s in shape):
            raise ValueError(f"shape must be positive sizes, got {shape}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        self.shape = shape
        self.eps = eps
        self.clip = clip
        self.frozen = False
        # float64 statistics: millions of samples are merged, float32 would drift.
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[-len(self.shape) :]) != self.shape:
            raise ValueError(
                f"x must have shape (..., {', '.join(map(str, self.shape))}), got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Merge a batch ``x (..., *shape)`` into the running statistics (unless frozen)."""
        self._check(x)
        if self.frozen:
            return
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN/Inf: refusing to corrupt the running statistics")
        x = x.reshape(-1, *self.shape).to(self.mean)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        m2 = self.var * n_a + m2_b + delta**2 * n_a * n_b / n
        self.mean.add_(delta * n_b / n)
        self.var.copy_(m2 / n)
        self.count.copy_(n)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x (..., *shape)``; the result has ``x``'s dtype and device."""
        self._check(x)
        y = (x - self.mean.to(x.dtype)) / torch.sqrt(self.var.to(x.dtype) + self.eps)
        if self.clip is not None:
            y = y.clamp(-self.clip, self.clip)
        return y

    def extra_repr(self) -> str:
        return f"shape={self.shape}, count={int(self.count.item())}, clip={self.clip}"
