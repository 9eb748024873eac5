"""Differentiable Panda kinematics: a pytorch-kinematics chain from the MuJoCo model's numbers.

:func:`panda_chain` reads the compiled MuJoCo model of :mod:`diffto.tasks.panda.model` (body
offsets and quaternions as MuJoCo normalizes them, joint axes and ranges, the flange site), so
its forward kinematics is MuJoCo's ``site_xpos`` / ``site_xmat`` of ``attachment_site`` to
rounding in float64. The chain's root is the world frame, which is the base frame: ``link0``
sits at the origin with identity orientation.

Joint angles ``q (B, 7)`` are the model's ``qpos`` in joint order; pose and Jacobian methods
are those of :class:`diffto.layers.kinematics.KinematicChain`, and
:func:`diffto.layers.ee_pose_cost` turns the chain into an end-effector goal cost.
"""

from __future__ import annotations

import mujoco
import torch
from torch import Tensor

from diffto.layers.kinematics import KinematicChain
from diffto.tasks.panda.model import FLANGE_SITE, JOINT_NAMES, model_xml

__all__ = ["panda_chain", "flange_position"]


def panda_chain(
    model: mujoco.MjModel | str | None = None, *, analytical_grad: bool = False
) -> KinematicChain:
    """A :class:`KinematicChain` from the world (= base) frame to the flange ``attachment_site``.

    Args:
        model: a Panda ``MjModel`` or MJCF string (e.g. an env's ``unwrapped.model``); default:
            the arm of :func:`diffto.tasks.panda.model.model_xml` without scene. Payload,
            gravity compensation and mass changes do not alter the kinematics.
        analytical_grad: see :class:`KinematicChain` (``False``: plain autograd, correct to
            any order, needed for second derivatives of FK-based costs).

    Returns:
        A chain with ``n_joints = 7`` (``joint1`` … ``joint7``), limits ``lower``/``upper``
        ``(7,)`` in radians.
    """
    if model is None:
        model = mujoco.MjModel.from_xml_string(model_xml(scene=False))
    chain = KinematicChain(model, FLANGE_SITE, analytical_grad=analytical_grad)
    if chain.joint_names != JOINT_NAMES:
        raise ValueError(
            f"model must be a Panda with joints {list(JOINT_NAMES)} up to {FLANGE_SITE!r}, "
            f"got {list(chain.joint_names)}"
        )
    return chain


def flange_position(chain: KinematicChain, qpos: Tensor) -> Tensor:
    """Flange position ``(B, 3)`` (world frame) from ``qpos (B, 7)`` or a state
    ``x = [qpos; qvel] (B, 14)`` (only the first 7 entries are read), differentiable."""
    if not isinstance(qpos, Tensor) or qpos.dim() not in (1, 2):
        kind = tuple(qpos.shape) if isinstance(qpos, Tensor) else type(qpos).__name__
        raise ValueError(f"qpos must be a tensor of shape (B, 7) or (B, 14), got {kind}")
    q = torch.atleast_2d(qpos)
    if q.shape[-1] not in (7, 14):
        raise ValueError(f"qpos must have 7 (qpos) or 14 ([qpos; qvel]) columns, got {q.shape}")
    return chain.position(q[:, :7])
