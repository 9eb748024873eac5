"""Learning curves of an RL run as a PNG: success over environment steps and over wall time.

``history`` is the list of validation points a
:class:`~diffto.learning.goal_off_policy.GoalOffPolicy` run records (``env_steps``,
``wall_time_s``, ``success``, ``time_at_goal``, optionally ``task``); several runs (e.g.
seeds or variants) can be drawn on the same axes with :func:`plot_runs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_learning_curves", "plot_runs"]


def plot_runs(runs: dict[str, Sequence[dict[str, float]]], path: str | Path,
              title: str = "", metrics: Sequence[str] = ("success", "time_at_goal"),
              baselines: dict[str, float] | None = None) -> Path:
    """One row per metric, columns over environment steps and wall time; one line per run
    (name -> history), dashed horizontal lines for ``baselines`` (name -> success)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.2 * len(metrics)), squeeze=False)
    for r, metric in enumerate(metrics):
        for c, (x_key, x_label, scale) in enumerate((("env_steps", "environment steps", 1.0),
                                                     ("wall_time_s", "wall time (min)", 60.0))):
            ax = axes[r, c]
            for name, history in runs.items():
                pts = [p for p in history if metric in p and np.isfinite(p[metric])]
                ax.plot([p[x_key] / scale for p in pts], [p[metric] for p in pts],
                        marker=".", label=name)
            for name, value in (baselines or {}).items():
                if metric == "success":
                    ax.axhline(value, ls="--", lw=1, color="gray")
                    ax.annotate(name, (0.01, value), xycoords=("axes fraction", "data"),
                                fontsize=7, color="gray", va="bottom")
            ax.set_xlabel(x_label)
            ax.set_ylabel(metric.replace("_", " "))
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)  # whole or not at all
    return path


def plot_learning_curves(history: Sequence[dict[str, float]], path: str | Path,
                         title: str = "") -> Path:
    """The curves of one run."""
    return plot_runs({"run": history}, path, title)
