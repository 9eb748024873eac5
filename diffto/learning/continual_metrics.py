"""Continual-learning metrics with the Continual World definitions (Wołczyk et al., 2021).

Tasks ``0 … N−1`` are trained in sequence, each for the same budget. With ``R[k][j]`` the
success on task ``j`` evaluated at the end of training task ``k``:

- **average performance** ``P = (1/N) Σ_j R[N−1][j]`` (after the last task);
- **forgetting** of task ``i``: ``F_i = R[i][i] − R[N−1][i]`` (its success when its own
  training ended minus at the end), averaged over the tasks;
- **forward transfer** of task ``i``: ``FT_i = (AUC_i − AUC_i^ref) / (1 − AUC_i^ref)``, where
  ``AUC_i`` is the area under task ``i``'s success curve during its own training (normalized
  to ``[0, 1]``: the mean success over that stretch, trapezoidal in environment steps) and
  ``AUC_i^ref`` the same for a reference learner trained on task ``i`` alone from scratch
  (here: the same run with ``continual_reset="all"``); ``FT_i`` is ``nan`` where the
  reference already has ``AUC = 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["continual_metrics", "task_auc", "forward_transfer"]


def continual_metrics(after_task: Sequence[Sequence[float]]) -> dict[str, object]:
    """``average_performance``, ``forgetting`` (mean) and ``forgetting_per_task`` from the
    rows ``after_task[k] = [success on task j after task k for every j]`` (``k`` = the
    tasks finished so far; all rows of one length ``N``)."""
    R = np.asarray(after_task, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] < 1 or R.shape[0] > R.shape[1]:
        raise ValueError(f"after_task must be K rows of N >= K successes (K tasks finished), "
                         f"got shape {R.shape}")
    K = R.shape[0]
    forgetting = [float(R[i, i] - R[-1, i]) for i in range(K)]
    return {"average_performance": float(R[-1].mean()),
            "average_performance_seen": float(R[-1, :K].mean()),
            "forgetting": float(np.mean(forgetting)), "forgetting_per_task": forgetting}


def task_auc(history: Sequence[dict[str, float]], task: int, key: str = "success") -> float:
    """Normalized area under ``key`` over environment steps while ``task`` trained (the mean
    of a single point; ``nan`` without points)."""
    pts = [(p["env_steps"], p[key]) for p in history
           if int(p.get("task", 0)) == task and np.isfinite(p.get(key, np.nan))]
    if not pts:
        return float("nan")
    x, y = np.asarray(pts).T
    if len(x) == 1 or x[-1] == x[0]:
        return float(np.mean(y))
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def forward_transfer(auc: Sequence[float], reference_auc: Sequence[float]) -> list[float]:
    """``FT_i`` per task from the two runs' ``AUC_i`` (see the module docstring)."""
    if len(auc) != len(reference_auc):
        raise ValueError(f"auc and reference_auc must have one entry per task, got "
                         f"{len(auc)} and {len(reference_auc)}")
    return [float((a - b) / (1 - b)) if b < 1 else float("nan")
            for a, b in zip(auc, reference_auc, strict=True)]
