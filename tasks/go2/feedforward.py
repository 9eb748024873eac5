"""Feedforward joint torques that make the Go2's feet exert a reference ground reaction force.

For a leg with foot position ``p(q)`` (base frame) and Jacobian ``J = ∂p/∂q``, a ground force
``f`` acting on the foot enters the joint-space equations as the generalized force ``Jᵀ f``
(principle of virtual work: ``δW = fᵀ δp = fᵀ J δq``). Holding that force quasi-statically
takes the opposite joint torque,

.. math::

    τ_\\text{leg} = -J(q_\\text{leg})^\\top R^\\top f_\\text{world},

where ``R`` rotates base to world, so ``Rᵀ f`` is the force in the base frame. Leg masses and
velocity-dependent terms are left out: the single-rigid-body planner that produces the forces
does not model them either, and the PD loop absorbs the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from diffto.tasks.go2.legs import LegGeometry, go2_legs, quat_to_rotation

if TYPE_CHECKING:
    from diffto.tasks.go2.reference import ReferenceTrajectory

__all__ = ["FeedforwardComputer"]


def _as_array(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    value = np.asarray(value, dtype=float)
    if value.shape[-len(shape) :] != shape or value.ndim < len(shape):
        raise ValueError(f"{name} must have shape {shape} (or (B, *{shape})), got {value.shape}")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{name} contains NaN/Inf entries")
    return value


class FeedforwardComputer:
    """Maps (joint angles, world-frame foot forces, body orientation) to joint torques.

    Args:
        legs: leg geometry; the Go2's by default.

    Torques are in joint (qpos) order FL, FR, RL, RR × (hip, thigh, calf); forces are the
    forces the ground exerts on the feet, world frame, 4 feet × xyz.
    """

    def __init__(self, legs: LegGeometry | None = None) -> None:
        self.legs = legs if legs is not None else go2_legs()

    def compute_batch(
        self, joint_pos: np.ndarray, grf: np.ndarray, body_quat: np.ndarray
    ) -> np.ndarray:
        """Batched form of :meth:`compute`: ``(B, 12), (B, 12), (B, 4) -> (B, 12)``."""
        joint_pos = _as_array("joint_pos", joint_pos, (12,))
        grf = _as_array("grf", grf, (12,))
        body_quat = _as_array("body_quat", body_quat, (4,))
        rot = quat_to_rotation(body_quat)  # (..., 3, 3) base -> world
        f_world = grf.reshape(*grf.shape[:-1], 4, 3)
        f_base = np.einsum("...ji,...fj->...fi", rot, f_world)  # Rᵀ f per foot, (..., 4, 3)
        jac = self.legs.foot_jacobians(joint_pos)  # (..., 4, 3 xyz, 3 joints)
        tau = -np.einsum("...fij,...fi->...fj", jac, f_base)  # -Jᵀ f per leg, (..., 4, 3)
        return tau.reshape(*tau.shape[:-2], 12)

    def compute(self, joint_pos: np.ndarray, grf: np.ndarray, body_quat: np.ndarray) -> np.ndarray:
        """Feedforward torque ``(12,)`` from ``joint_pos (12,)``, ``grf (12,)``, ``body_quat (4,)``.

        ``body_quat`` is (w, x, y, z), base to world, as in MuJoCo's qpos.
        """
        for name, value, n in (
            ("joint_pos", joint_pos, 12),
            ("grf", grf, 12),
            ("body_quat", body_quat, 4),
        ):
            if np.shape(value) != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {np.shape(value)}")
        return self.compute_batch(joint_pos, grf, body_quat)

    def precompute_trajectory(self, ref: ReferenceTrajectory) -> np.ndarray:
        """Torques ``(N, 12)`` for every interval of a reference.

        Interval ``k`` holds ``grf[k]`` from knot ``k`` to ``k+1``; the torque uses the joint
        angles and orientation at knot ``k``, the pose the controller sees at phase ``k``.
        """
        n = ref.num_phases
        quat = np.stack([ref.get_body_quat(k) for k in range(n)])
        return self.compute_batch(ref.joint_pos[:n], ref.grf, quat)
