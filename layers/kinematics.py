"""Differentiable kinematics: batched forward kinematics and Jacobians of MJCF serial chains.

Built on pytorch-kinematics (``pytorch_kinematics``) serial chains parsed from MJCF. Every
function takes batch-first tensors ``q (B, k)`` (a single ``(k,)`` is promoted to ``B = 1``),
works in float32 and float64 on any device, and is differentiable in ``q`` and in every
other tensor argument.

Conventions:
    * Poses are homogeneous ``(B, 4, 4)`` transforms of the end frame (a body or a site) in
      the chain's root frame.
    * ``jacobian`` is the geometric Jacobian ``(B, 6, k)`` in the root frame, rows
      ``[linear velocity (3); angular velocity (3)]`` of the end frame, i.e.
      ``[ṗ; ω] = J(q) q̇`` with, for a revolute joint ``i`` of world axis ``z_i`` at ``o_i``,
      ``J_i = [z_i × (p − o_i); z_i]``. A force ``f`` (root frame) applied to the end point
      acts on the joints as ``τ = J_vᵀ f`` (virtual work ``fᵀ δp = fᵀ J_v δq``).
    * Quaternions are ``(w, x, y, z)``, as MuJoCo stores them.

Robot chains are built where the robots live: the Franka Panda's by
:func:`diffto.tasks.panda.panda_chain`; cost builders on a chain are in
:mod:`diffto.layers.robot_costs`.
"""

from __future__ import annotations

import copy

import mujoco
import pytorch_kinematics as pk
import torch
from torch import Tensor

from diffto.problem import check_finite

__all__ = ["KinematicChain", "quat_to_matrix"]

_PK_JOINT = {mujoco.mjtJoint.mjJNT_HINGE: "revolute", mujoco.mjtJoint.mjJNT_SLIDE: "prismatic"}


def _offset(quat, pos) -> pk.Transform3d:
    return pk.Transform3d(
        rot=torch.as_tensor(quat, dtype=torch.float64),
        pos=torch.as_tensor(pos, dtype=torch.float64),
        dtype=torch.float64,
    )


def _frame_tree(model: mujoco.MjModel, body_id: int, is_root: bool) -> pk.Frame:
    """pytorch-kinematics frames for the subtree of ``body_id``, in float64.

    Each body frame is ``parent · Offset(body_pos, body_quat) · Joint(q)``, MuJoCo's body
    transform when the joint anchor is the body origin; sites become fixed child frames.
    """
    name = model.body(body_id).name
    joint, link = pk.Joint(dtype=torch.float64), pk.Link(name)
    if not is_root:
        link = pk.Link(name, offset=_offset(model.body_quat[body_id], model.body_pos[body_id]))
        n_jnt, adr = int(model.body_jntnum[body_id]), int(model.body_jntadr[body_id])
        if n_jnt > 1:
            raise ValueError(f"body {name!r} has {n_jnt} joints; one per body is supported")
        if n_jnt == 1:
            jtype = mujoco.mjtJoint(int(model.jnt_type[adr]))
            if jtype not in _PK_JOINT:
                raise ValueError(f"joint of body {name!r} is {jtype.name}: only hinge/slide chains")
            if abs(model.jnt_pos[adr]).max() > 0:
                raise ValueError(f"joint of body {name!r} must be anchored at the body origin")
            limits = tuple(model.jnt_range[adr]) if model.jnt_limited[adr] else None
            joint = pk.Joint(
                model.joint(adr).name,
                joint_type=_PK_JOINT[jtype],
                axis=model.jnt_axis[adr].copy(),
                dtype=torch.float64,
                limits=limits,
            )
    frame = pk.Frame(name, link=link, joint=joint)
    for child in range(body_id + 1, model.nbody):
        if model.body_parentid[child] == body_id:
            frame.children = frame.children + [_frame_tree(model, child, is_root=False)]
    for site in range(model.nsite):
        if model.site_bodyid[site] == body_id:
            site_link = pk.Link(
                model.site(site).name, offset=_offset(model.site_quat[site], model.site_pos[site])
            )
            frame.children = frame.children + [
                pk.Frame(model.site(site).name, link=site_link, joint=pk.Joint(dtype=torch.float64))
            ]
    return frame


def _as_batch(name: str, value: Tensor, k: int) -> Tensor:
    """Validate a ``(B, k)`` / ``(k,)`` float tensor and return it as ``(B, k)``."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        kind = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"{name} must be a floating-point torch.Tensor of shape (B, {k}), got {kind}"
        )
    if value.dim() == 1:
        value = value.unsqueeze(0)
    if value.dim() != 2 or value.shape[-1] != k:
        raise ValueError(f"{name} must have shape (B, {k}) or ({k},), got {tuple(value.shape)}")
    check_finite(name, value)
    return value


class KinematicChain:
    """A serial kinematic chain from an MJCF string, evaluated with pytorch-kinematics.

    Args:
        mjcf: MJCF model text or a compiled ``mujoco.MjModel``.
        end_frame: body or site name of the end frame (e.g. ``"FL_foot"``, ``"ee"``).
        root_body: body the chain is expressed in (placed at the origin with identity
            orientation; its own joints, e.g. a free joint, are ignored). ``None``: the world.
        analytical_grad: use pytorch-kinematics' analytical FK backward (faster on GPU, but
            only first-order: second derivatives through it are wrong). Default ``False``:
            plain autograd, correct to any order.

    The chain is read from the compiled model in float64 (body/site offsets, joint axes and
    limits); float32 and device copies are made from it on first use. Hinge and slide joints
    with their anchor at the body origin (``jnt_pos = 0``) are supported; others raise.
    """

    def __init__(
        self,
        mjcf: str | mujoco.MjModel,
        end_frame: str,
        root_body: str | None = None,
        *,
        analytical_grad: bool = False,
    ) -> None:
        if isinstance(mjcf, str):
            if "<mujoco" not in mjcf:
                raise ValueError("mjcf must be an MJCF model string (containing '<mujoco')")
            model = mujoco.MjModel.from_xml_string(mjcf)
        elif isinstance(mjcf, mujoco.MjModel):
            model = mjcf
        else:
            raise ValueError(
                f"mjcf must be an MJCF string or a mujoco.MjModel, got {type(mjcf).__name__}"
            )
        root_id = (
            0
            if root_body is None
            else mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, root_body)
        )
        if root_id < 0:
            raise ValueError(f"root_body {root_body!r} is no body of the MJCF")
        tree = pk.Chain(_frame_tree(model, root_id, is_root=True), dtype=torch.float64)
        if tree.find_frame(end_frame) is None:
            raise ValueError(
                f"end_frame {end_frame!r} is no body or site below {root_body or 'world'!r}"
            )
        serial = pk.SerialChain(tree, end_frame, dtype=torch.float64)
        self.end_frame = end_frame
        self.root_body = root_body
        self.analytical_grad = bool(analytical_grad)
        self.joint_names: tuple[str, ...] = tuple(serial.get_joint_parameter_names())
        low, high = serial.get_joint_limits()
        self.lower = torch.tensor(low, dtype=torch.float64)
        self.upper = torch.tensor(high, dtype=torch.float64)
        self._chains: dict[tuple[torch.dtype, torch.device], pk.SerialChain] = {
            (serial.dtype, torch.device(serial.device)): serial
        }

    @property
    def n_joints(self) -> int:
        return len(self.joint_names)

    def __repr__(self) -> str:
        return (
            f"KinematicChain(end_frame={self.end_frame!r}, root_body={self.root_body!r}, "
            f"joints={list(self.joint_names)})"
        )

    def _chain(self, like: Tensor) -> pk.SerialChain:
        key = (like.dtype, like.device)
        if key not in self._chains:
            base = next(iter(self._chains.values()))
            self._chains[key] = copy.deepcopy(base).to(dtype=like.dtype, device=like.device)
        return self._chains[key]

    def _transforms(self, q: Tensor) -> tuple[pk.SerialChain, Tensor]:
        chain = self._chain(q)
        return chain, chain.forward_kinematics_tensor(q, analytical_grad=self.analytical_grad)

    def forward_kinematics(self, q: Tensor) -> Tensor:
        """End-frame pose ``(B, 4, 4)`` in the root frame for joint angles ``q (B, k)``."""
        q = _as_batch("q", q, self.n_joints)
        chain, T = self._transforms(q)  # (frames, B, 4, 4)
        return T[chain._serial_eef_frame_idx]

    def position(self, q: Tensor) -> Tensor:
        """End-point position ``(B, 3)`` in the root frame."""
        return self.forward_kinematics(q)[:, :3, 3]

    def jacobian(self, q: Tensor, *, return_pose: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Geometric Jacobian ``(B, 6, k)`` (rows: linear, angular) in the root frame.

        With ``return_pose=True`` also returns the end pose ``(B, 4, 4)`` from the same FK pass.
        """
        q = _as_batch("q", q, self.n_joints)
        chain, T = self._transforms(q)
        J = chain.jacobian_tensor(q, all_transforms=T)  # (B, 6, k)
        if return_pose:
            return J, T[chain._serial_eef_frame_idx]
        return J

    def position_jacobian(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """End-point position ``(B, 3)`` and its Jacobian ``∂p/∂q`` ``(B, 3, k)``."""
        J, pose = self.jacobian(q, return_pose=True)
        return pose[:, :3, 3], J[:, :3]

def quat_to_matrix(quat: Tensor) -> Tensor:
    """Rotation matrices ``(B, 3, 3)`` from quaternions ``(B, 4)`` or ``(4,)``, w x y z order
    (normalized first, so any non-zero quaternion is accepted)."""
    if not isinstance(quat, Tensor) or not quat.is_floating_point() or quat.shape[-1:] != (4,):
        shape = tuple(quat.shape) if isinstance(quat, Tensor) else type(quat).__name__
        raise ValueError(f"quat must be a float tensor of shape (B, 4) or (4,), got {shape}")
    quat = quat.reshape(-1, 4)
    check_finite("quat", quat)
    norm = quat.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise ValueError("quat must be non-zero")
    w, x, y, z = (quat / norm).unbind(-1)
    # R = I + 2w[v]x + 2[v]x² for the unit quaternion (w, v).
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, -1).reshape(-1, 3, 3)
