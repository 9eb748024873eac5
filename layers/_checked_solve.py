"""A batched linear solve that refuses to return a wrong answer."""

from __future__ import annotations

import torch
from torch import Tensor


def checked_solve(A: Tensor, b: Tensor, failure: str) -> Tensor:
    """Solve ``A x = b`` for ``A (B, k, k)``, ``b (B, k)``; raise rather than return garbage.

    A backward-stable solve leaves a residual of order ``eps·‖A‖·‖x‖`` even when ``A`` is
    ill-conditioned; a residual far above that means ``A`` was singular or the LAPACK call
    itself went wrong (seen with MKL at more than one thread on 2-core machines).

    Raises:
        RuntimeError: ``"{failure} for rows [...]"`` followed by the possible causes.
    """
    x, info = torch.linalg.solve_ex(A, b)
    resid = (A @ x.unsqueeze(-1)).squeeze(-1) - b
    scale = 1 + A.abs().amax((-1, -2)) * x.abs().amax(-1)
    bad = (info != 0) | (resid.abs().amax(-1) > 1e4 * torch.finfo(A.dtype).eps * scale)
    if bad.any():
        rows = torch.nonzero(bad).flatten().tolist()
        raise RuntimeError(
            f"{failure} for rows {rows}: the matrix is singular there (the solution does not "
            "depend smoothly on the inputs), or the linear solve returned a wrong result "
            "(check torch.get_num_threads())"
        )
    return x
