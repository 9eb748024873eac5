"""Denoiser networks for :class:`~diffto.learning.diffusion.DiffusionActionHead`.

A denoiser maps a noisy action chunk ``x_k`` (B, T, m), its diffusion step ``k`` (B,) and a
conditioning vector ``c`` (B, C) to a tensor of the chunk's shape (B, T, m): the predicted
noise ``ε`` or the predicted clean chunk ``x_0``, depending on the head's objective.

Both networks embed ``k`` with sinusoidal features (the transformer position code: the step
becomes a smooth vector whose low frequencies separate far-apart noise levels and whose high
frequencies separate neighbours) and merge it with ``c`` into one embedding ``e`` (B, E).
``e`` enters every block by FiLM, ``h ← h ⊙ (1 + γ(e)) + β(e)``: the noise level changes what
each block must do (at large ``k`` it denoises coarsely, near ``k = 0`` it polishes), so every
block is told, not only the input layer.

- :class:`MLPDenoiser`: the chunk flattened to ``T·m`` numbers, residual blocks
  ``h ← h + Mish(FiLM(LayerNorm(W h)))``. No notion of time inside the chunk; cheap for short
  chunks.
- :class:`UNet1DDenoiser`: a 1-D temporal U-Net over the horizon axis (``m`` channels, length
  ``T``): Conv1d residual blocks with GroupNorm, one level per entry of ``channels``, halving
  the length between levels and doubling it back with skip connections. Neighbouring actions
  of a chunk are smooth in time, which the convolutions exploit.

Sizes with the head's defaults (``T = 16``, ``m = 4``, ``C = 42``): the MLP (``hidden = 256``,
``depth = 3``) has about 0.34 M parameters, the U-Net (``channels = (64, 128)``) about 0.23 M.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(k: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of the diffusion step.

    ``[sin(k ω_0), …, sin(k ω_{d/2-1}), cos(k ω_0), …]`` with ``ω_i = max_period^{-i/(d/2)}``.

    Args:
        k: (B,) diffusion steps (integer or float).
        dim: the feature size ``d`` (even).

    Returns:
        (B, dim) features.
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even integer >= 2, got {dim}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=k.device, dtype=torch.float32) / half
    )
    angles = k.float()[:, None] * freqs[None, :]  # (B, d/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class _ConditionEmbedding(nn.Module):
    """``e = MLP([timestep_embedding(k), c])``: (B,), (B, C) -> (B, E)."""

    def __init__(self, cond_dim: int, time_dim: int, emb_dim: int):
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(
            nn.Linear(time_dim + cond_dim, emb_dim), nn.Mish(), nn.Linear(emb_dim, emb_dim)
        )

    def forward(self, k: Tensor, cond: Tensor) -> Tensor:
        return self.net(torch.cat([timestep_embedding(k, self.time_dim), cond], dim=-1))


class _FiLM(nn.Module):
    """``h ⊙ (1 + γ(e)) + β(e)``, with ``γ, β`` initialised to zero (the block starts as the
    unconditioned one). ``h`` is (B, F) or (B, F, T); ``e`` is (B, E)."""

    def __init__(self, emb_dim: int, features: int):
        super().__init__()
        self.proj = nn.Linear(emb_dim, 2 * features)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        gamma, beta = self.proj(e).chunk(2, dim=-1)  # (B, F) each
        if h.dim() == 3:  # (B, F, T): the same modulation at every time step
            gamma, beta = gamma[..., None], beta[..., None]
        return h * (1 + gamma) + beta


class _MLPBlock(nn.Module):
    """``h + Mish(FiLM(LayerNorm(W h), e))``: (B, H), (B, E) -> (B, H)."""

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.film = _FiLM(emb_dim, hidden)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        return h + nn.functional.mish(self.film(self.norm(self.linear(h)), e))


class MLPDenoiser(nn.Module):
    """Residual MLP over the flattened chunk, FiLM-conditioned on ``[k, c]``.

    Args:
        cond_dim: size ``C`` of the conditioning vector (0: unconditional).
        action_dim: ``m``.
        horizon: ``T``.
        hidden: width of the residual blocks.
        depth: number of residual blocks.
        time_dim: size of the sinusoidal step features.
        emb_dim: size ``E`` of the merged step/condition embedding.
    """

    def __init__(
        self,
        cond_dim: int,
        action_dim: int,
        horizon: int,
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 32,
        emb_dim: int = 64,
    ):
        super().__init__()
        _check_sizes(cond_dim=cond_dim, action_dim=action_dim, horizon=horizon)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.horizon, self.action_dim = horizon, action_dim
        self.embed = _ConditionEmbedding(cond_dim, time_dim, emb_dim)
        self.inp = nn.Linear(horizon * action_dim, hidden)
        self.blocks = nn.ModuleList(_MLPBlock(hidden, emb_dim) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, horizon * action_dim))

    def forward(self, x: Tensor, k: Tensor, cond: Tensor) -> Tensor:
        """(B, T, m) noisy chunk, (B,) steps, (B, C) condition -> (B, T, m)."""
        e = self.embed(k, cond)
        h = self.inp(x.flatten(1))  # (B, H)
        for block in self.blocks:
            h = block(h, e)
        return self.out(h).view(x.shape)


def _groups(channels: int, max_groups: int = 8) -> int:
    """The largest group count <= max_groups dividing ``channels`` (GroupNorm needs one)."""
    return math.gcd(channels, max_groups)


class _ConvBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish, length preserved: (B, C_in, T) -> (B, C_out, T)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2)
        self.norm = nn.GroupNorm(_groups(c_out), c_out)

    def forward(self, h: Tensor) -> Tensor:
        return nn.functional.mish(self.norm(self.conv(h)))


class _ResBlock1D(nn.Module):
    """Two conv blocks with FiLM between them, plus a (1x1-projected) skip:
    (B, C_in, T), (B, E) -> (B, C_out, T)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, kernel_size: int):
        super().__init__()
        self.block1 = _ConvBlock(c_in, c_out, kernel_size)
        self.film = _FiLM(emb_dim, c_out)
        self.block2 = _ConvBlock(c_out, c_out, kernel_size)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        return self.skip(h) + self.block2(self.film(self.block1(h), e))


class UNet1DDenoiser(nn.Module):
    """1-D temporal U-Net over the chunk's horizon axis, FiLM-conditioned on ``[k, c]``.

    Level ``i`` holds ``channels[i]`` feature maps; between levels the length is halved by a
    stride-2 convolution on the way down and doubled by nearest-neighbour upsampling on the way
    up, where the level's skip features are concatenated. With ``L = len(channels)`` levels the
    length must divide by ``2^{L-1}``; a chunk whose ``T`` does not is zero-padded at its end
    to the next multiple and the output cropped back to ``T`` (the padded steps only widen the
    convolutions' border).

    Args:
        cond_dim: size ``C`` of the conditioning vector (0: unconditional).
        action_dim: ``m`` (the input channels).
        horizon: ``T``.
        channels: feature maps per level, one level per entry.
        kernel_size: odd temporal kernel of the convolutions.
        time_dim: size of the sinusoidal step features.
        emb_dim: size ``E`` of the merged step/condition embedding.
    """

    def __init__(
        self,
        cond_dim: int,
        action_dim: int,
        horizon: int,
        channels: tuple[int, ...] = (64, 128),
        kernel_size: int = 3,
        time_dim: int = 32,
        emb_dim: int = 64,
    ):
        super().__init__()
        _check_sizes(cond_dim=cond_dim, action_dim=action_dim, horizon=horizon)
        channels = tuple(channels)
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(
                f"unet_channels must be a non-empty tuple of ints >= 1, got {channels}"
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size}")
        self.horizon, self.action_dim = horizon, action_dim
        stride = 2 ** (len(channels) - 1)
        self.padded_horizon = -(-horizon // stride) * stride  # ceil to a multiple of 2^{L-1}
        self.embed = _ConditionEmbedding(cond_dim, time_dim, emb_dim)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c_prev = action_dim
        for i, c in enumerate(channels):
            self.down.append(_ResBlock1D(c_prev, c, emb_dim, kernel_size))
            if i < len(channels) - 1:
                self.downsample.append(nn.Conv1d(c, c, 3, stride=2, padding=1))
            c_prev = c
        # Up path: from level i+1 back to level i, input = upsampled level i+1 ++ skip of level i.
        self.up = nn.ModuleList(
            _ResBlock1D(channels[i + 1] + channels[i], channels[i], emb_dim, kernel_size)
            for i in reversed(range(len(channels) - 1))
        )
        self.out = nn.Sequential(
            _ConvBlock(channels[0], channels[0], kernel_size), nn.Conv1d(channels[0], action_dim, 1)
        )

    def forward(self, x: Tensor, k: Tensor, cond: Tensor) -> Tensor:
        """(B, T, m) noisy chunk, (B,) steps, (B, C) condition -> (B, T, m)."""
        e = self.embed(k, cond)
        h = x.transpose(1, 2)  # (B, m, T): channels = action dimensions, length = time
        h = nn.functional.pad(h, (0, self.padded_horizon - self.horizon))
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, e)
            if i < len(self.downsample):
                skips.append(h)
                h = self.downsample[i](h)
        for block in self.up:
            h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), e)
        return self.out(h)[..., : self.horizon].transpose(1, 2)


def _check_sizes(cond_dim: int, action_dim: int, horizon: int) -> None:
    if cond_dim < 0:
        raise ValueError(f"cond_dim must be >= 0, got {cond_dim}")
    if action_dim < 1:
        raise ValueError(f"action_dim must be >= 1, got {action_dim}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
