"""Tracking errors of a Go2 rollout against its reference: position, orientation, joints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TrackingErrors", "tracking_errors"]


@dataclass
class TrackingErrors:
    """Per-knot errors ``(T,)`` of a rollout against its reference, and their RMS."""

    time: np.ndarray
    position: np.ndarray
    orientation_deg: np.ndarray
    joint: np.ndarray

    def rms(self) -> dict[str, float]:
        """``{"pos_rmse" (m), "orient_rmse_deg", "joint_rmse_per_joint" (rad)}`` over the
        rollout. (PPO's ``val/joint_rmse`` is the RMS of the env's 12-joint error *norm*,
        √12 times the per-joint figure.)"""
        r = lambda e: float(np.sqrt(np.mean(np.square(e))))  # noqa: E731
        return {"pos_rmse": r(self.position), "orient_rmse_deg": r(self.orientation_deg),
                "joint_rmse_per_joint": r(self.joint)}


def tracking_errors(qpos_traj: np.ndarray, reference: Any, start_phase: int = 0) -> TrackingErrors:
    """Errors of ``qpos_traj (T, 19)`` against reference knots ``start_phase .. +T−1``."""
    q = np.asarray(qpos_traj, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 19:
        raise ValueError(f"qpos_traj must have shape (T, 19), got {q.shape}")
    ref = np.array([reference.qpos(start_phase + k) for k in range(len(q))])  # (T, 19)
    pos = np.linalg.norm(q[:, :3] - ref[:, :3], axis=1)
    # vec(q_ref⁻¹ ⊗ q) for unit quaternions (w, v): w_r v − w v_r − v_r × v; ‖·‖ = sin(θ/2).
    w, v = q[:, 3], q[:, 4:7]
    wr, vr = ref[:, 3], ref[:, 4:7]
    vec = wr[:, None] * v - w[:, None] * vr - np.cross(vr, v)
    angle = 2.0 * np.arcsin(np.clip(np.linalg.norm(vec, axis=1), 0.0, 1.0))
    joint = np.sqrt(np.mean((q[:, 7:] - ref[:, 7:]) ** 2, axis=1))
    t = (start_phase + np.arange(len(q))) * float(reference.dt)
    return TrackingErrors(t, pos, np.degrees(angle), joint)
