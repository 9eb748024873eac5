"""Multi-layer perceptrons with LayerNorm and swish, optionally in residual blocks.

The networks of contrastive RL (and of the goal-conditioned off-policy learners around it).
LayerNorm after every hidden linear layer is what lets these critics gain from width and depth
instead of becoming unstable; with ``residual=True`` the hidden layers after the first are
grouped into blocks of ``block_layers`` layers and each block adds its input to its output
(``h ← h + block(h)``), the form in which such critics train at tens of layers. Every hidden
layer is ``Linear → LayerNorm → swish`` (``SiLU``); the output layer is linear.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ResidualMLP"]


def _hidden_layer(in_dim: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, width), nn.LayerNorm(width), nn.SiLU())


class ResidualMLP(nn.Module):
    """``(B, in_dim) -> (B, out_dim)`` through ``depth`` hidden layers of ``width`` units.

    Args:
        in_dim, out_dim: input and output sizes.
        width: units of every hidden layer.
        depth: number of hidden layers (``Linear → LayerNorm → swish``), at least 1.
        residual: group the hidden layers after the first into residual blocks.
        block_layers: hidden layers per residual block (the last block may be shorter).
    """

    def __init__(self, in_dim: int, out_dim: int, width: int = 256, depth: int = 2,
                 residual: bool = False, block_layers: int = 2) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("width", width),
                            ("depth", depth), ("block_layers", block_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.residual = bool(residual)
        self.stem = _hidden_layer(in_dim, width)
        layers = [_hidden_layer(width, width) for _ in range(depth - 1)]
        size = block_layers if self.residual else max(len(layers), 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(*layers[i:i + size]) for i in range(0, len(layers), size)
        )
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h) if self.residual else block(h)
        return self.head(h)
