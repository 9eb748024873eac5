"""Row-wise derivatives by ordinary autograd, for functions that ``torch.func`` cannot vmap.

A stage cost, a residual or a dynamics step is *row-separable*: output row ``i`` depends on
input row ``i`` only (a batch of stages ``(B, T)`` or of transitions ``N``). Then the Jacobian
of every row is recovered from as many reverse passes as the output has entries per row,
each pulling back a one-hot cotangent repeated over all rows:

    J[..., j, :] = ∂/∂inp  Σ_rows out[..., j].

The passes run at once under ``vmap`` (``is_grads_batched``) and one at a time where a
function's backward does not support ``vmap`` (pytorch-kinematics' FK, MuJoCo callbacks).
Nothing here assumes more than twice differentiable ordinary autograd.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["rowwise_jacobian"]


def rowwise_jacobian(out: Tensor, inp: Tensor, create_graph: bool = False) -> Tensor:
    """Per-row Jacobian of a row-separable map.

    Args:
        out: ``(*rows, p)`` computed from ``inp`` inside the current autograd graph.
        inp: ``(*rows, k)`` tensor that requires grad.
        create_graph: keep the graph of the result (for derivatives of the Jacobian).

    Returns:
        ``(*rows, p, k)``; zeros where ``out`` does not depend on ``inp``.
    """
    p = out.shape[-1]
    if not out.requires_grad:
        return inp.new_zeros(*out.shape, inp.shape[-1])
    eye = torch.eye(p, dtype=out.dtype, device=out.device)
    cotangents = eye.view(p, *([1] * (out.dim() - 1)), p).expand(p, *out.shape)
    try:
        with warnings.catch_warnings():
            # vmap's notice that an op falls back to a slow loop: still correct, and still
            # faster than one reverse pass per entry.
            warnings.simplefilter("ignore", UserWarning)
            (jac,) = torch.autograd.grad(
                out, inp, cotangents, retain_graph=True, create_graph=create_graph,
                is_grads_batched=True, allow_unused=True,
            )
    except (RuntimeError, NotImplementedError):
        # A backward without vmap support: one reverse pass per output entry.
        rows = [
            torch.autograd.grad(out, inp, cotangents[j], retain_graph=True,
                                create_graph=create_graph, allow_unused=True)[0]
            for j in range(p)
        ]
        if any(r is None for r in rows):
            rows = [torch.zeros_like(inp) if r is None else r for r in rows]
        jac = torch.stack(rows, 0)
    if jac is None:
        return inp.new_zeros(*out.shape, inp.shape[-1])
    return jac.movedim(0, -2)
