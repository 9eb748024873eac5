"""Differentiable solver layers, one file per backend.

All share one call shape, ``layer(x0, cost, ...) -> Solution`` (see :mod:`diffto.problem`).
"""

from diffto.layers.lqr import LQR, solve_lqr, solve_lqr_tensors

__all__ = [
    # exact linear-quadratic
    "LQR",
    "solve_lqr",
    "solve_lqr_tensors",
]
