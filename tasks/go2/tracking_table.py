"""The Go2 tracking table: each controller on the nominal clip and under domain randomization.

One row per controller (PD + feedforward alone, i.e. a zero residual; the best checkpoint;
the final one; any other policy), two settings, all from phase 0 of the clip:

- **nominal**: no randomization, termination off (the whole clip is played): RMS position
  (m), orientation (degrees) and per-joint (rad) errors, as :func:`tracking_errors` defines.
- **randomized**: ``seeds`` episodes with the training env's domain randomization drawn from
  ``reset(seed=1_000_000 + k)``, ``k = 0 .. seeds−1``, and the env's termination rules on:
  how many play the full clip without failing (the env's ``info["clip_completed"]``), and
  the RMS position error over every step that was played.

Every controller meets the same randomized draws (the draw depends only on the seed), so the
rows compare on the same evaluation episodes. The reset seeds are ``1_000_000 + k``: a
training run seeds its environments' first resets with small integers (its
``seed_everything`` plus the env index), and later ones come from the envs' own generators.

Both position figures are RMS over the knots a rollout visits, the nominal one including
knot 0 (where the error is zero, as in :func:`evaluate_tracking`'s report), the randomized
one from knot 1; errors are taken against the reference's own knots, without the env's
``body_height_offset`` (0 by default).

``python -m diffto.tasks.go2.evaluate --checkpoint runs/go2_tracking/checkpoints/last.ckpt``
prints the table (with the run's ``best.ckpt`` beside ``last.ckpt``), and the
``Go2TrackingReport`` callback writes it at the end of fit as ``tracking/table.md`` and
``table.json``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffto.tasks.go2.rollout import execute_policy_rollout, play_policy, resolve_reference
from diffto.tasks.go2.tracking_errors import tracking_errors

__all__ = ["TrackingRow", "tracking_table", "format_table", "save_table", "zero_residual",
           "EVAL_SEED_OFFSET"]

#: The randomized episodes reset with seeds ``EVAL_SEED_OFFSET + k``, ``k = 0 .. seeds−1``.
EVAL_SEED_OFFSET = 1_000_000


def zero_residual(obs: np.ndarray) -> np.ndarray:
    """The controller without learning: PD + feedforward tracking with a zero residual."""
    return np.zeros(12, dtype=np.float32)


@dataclass
class TrackingRow:
    """One controller's figures (see the module docstring)."""

    name: str
    nominal_position_m: float
    nominal_orientation_deg: float
    nominal_joint_rad: float
    nominal_steps: int
    randomized_survived: int
    randomized_episodes: int
    randomized_position_m: float

    def within(self, other: TrackingRow, tolerance: float) -> bool:
        """Whether every figure of this row is at most ``1 + tolerance`` times ``other``'s
        (survival: at least ``1 − tolerance`` times)."""
        errors = ("nominal_position_m", "nominal_orientation_deg", "nominal_joint_rad",
                  "randomized_position_m")
        ok = all(getattr(self, k) <= (1 + tolerance) * getattr(other, k) for k in errors)
        return ok and self.randomized_survived >= (1 - tolerance) * other.randomized_survived


def _check_seeds(seeds: int) -> int:
    if isinstance(seeds, bool) or not isinstance(seeds, int | np.integer) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    return int(seeds)


def tracking_table(
    controllers: Mapping[str, Any],
    reference: Any,
    *,
    seeds: int = 20,
    env_kwargs: dict[str, Any] | None = None,
) -> list[TrackingRow]:
    """Evaluate each controller on the nominal clip and on ``seeds`` randomized episodes.

    Args:
        controllers: name -> a policy module with ``act`` (e.g. a loaded PPO) or a callable
            ``obs -> action (12,)``; :func:`zero_residual` for PD + feedforward alone.
        reference: a ``ReferenceTrajectory``, a motion name, a ``.npz`` or a folder, loaded
            as an env with ``env_kwargs`` would (see
            :func:`~diffto.tasks.go2.rollout.resolve_reference`).
        seeds: randomized episodes per controller (reset seeds ``EVAL_SEED_OFFSET + k``).
        env_kwargs: ``TrackingConfig`` overrides for every rollout (a policy module's own
            training settings apply first; these override them).
    """
    if not controllers:
        raise ValueError("controllers must name at least one controller")
    seeds = _check_seeds(seeds)
    reference = resolve_reference(reference, env_kwargs)
    rows = []
    for name, policy in controllers.items():
        nominal_qpos, _, _, _ = execute_policy_rollout(policy, reference, env_kwargs=env_kwargs)
        nominal = tracking_errors(nominal_qpos, reference).rms()
        survived, squares, steps = 0, 0.0, 0
        for k in range(seeds):
            rollout = play_policy(policy, reference, randomize=True, seed=EVAL_SEED_OFFSET + k,
                                  terminate=True, env_kwargs=env_kwargs)
            played = len(rollout.qpos) - 1
            survived += rollout.clip_completed
            position = tracking_errors(rollout.qpos[1:], reference, start_phase=1).position
            squares += float(np.sum(position**2))
            steps += played
        rows.append(TrackingRow(
            name=name,
            nominal_position_m=nominal["pos_rmse"],
            nominal_orientation_deg=nominal["orient_rmse_deg"],
            nominal_joint_rad=nominal["joint_rmse_per_joint"],
            nominal_steps=len(nominal_qpos) - 1,
            randomized_survived=survived,
            randomized_episodes=seeds,
            randomized_position_m=math.sqrt(squares / max(steps, 1)),
        ))
    return rows


def format_table(rows: list[TrackingRow]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| controller | nominal position RMS | orientation RMS | joint RMS "
        "| randomized: full clips | randomized position RMS |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {100 * r.nominal_position_m:.2f} cm | "
            f"{r.nominal_orientation_deg:.2f}° | {r.nominal_joint_rad:.4f} rad | "
            f"{r.randomized_survived} / {r.randomized_episodes} | "
            f"{100 * r.randomized_position_m:.2f} cm |"
        )
    return "\n".join(lines)


def save_table(rows: list[TrackingRow], out_dir: str | os.PathLike, name: str = "table") -> Path:
    """Write ``<name>.md`` and ``<name>.json`` into ``out_dir``, each whole or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = {f"{name}.md": format_table(rows) + "\n",
             f"{name}.json": json.dumps([asdict(r) for r in rows], indent=2) + "\n"}
    for filename, text in texts.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", dir=out)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out / filename)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out / f"{name}.md"
