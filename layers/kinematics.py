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

The 7-DoF arm shipped here (:data:`ARM7_XML`) is *Panda-like, not a vendor model*: link
offsets follow the published Franka Panda DH parameters and joint limits, masses are rough.
"""

from __future__ import annotations

import copy
import math

import mujoco
import pytorch_kinematics as pk
import torch
from torch import Tensor

from diffto.problem import QuadraticCost, check_finite

__all__ = [
    "ARM7_XML",
    "ARM7_EE_SITE",
    "ARM7_HOME",
    "ARM7_TOOL",
    "KinematicChain",
    "arm7_chain",
    "ee_residual",
    "ee_goal_cost",
    "theseus_ee_cost",
    "quat_to_matrix",
]

ARM7_EE_SITE = "ee"
ARM7_HOME = (0.0, -0.785398, 0.0, -2.356194, 0.0, 1.570796, 0.785398)

# Panda modified-DH rows (a_{i-1}, d_i, α_{i-1}), joint range, torque limit, rough link mass.
# Link i sits at RotX(α) TransX(a) TransZ(d) from link i-1: body pos (a, −d sin α, d cos α),
# quat RotX(α) = (cos α/2, sin α/2, 0, 0); every joint turns about its body's z axis.
_ARM7_DH = (
    (0.0, 0.333, 0.0, -2.8973, 2.8973, 87.0, 3.0),
    (0.0, 0.0, -math.pi / 2, -1.7628, 1.7628, 87.0, 3.0),
    (0.0, 0.316, math.pi / 2, -2.8973, 2.8973, 87.0, 2.5),
    (0.0825, 0.0, math.pi / 2, -3.0718, -0.0698, 87.0, 2.5),
    (-0.0825, 0.384, -math.pi / 2, -2.8973, 2.8973, 12.0, 3.0),
    (0.0, 0.0, math.pi / 2, -0.0175, 3.7525, 12.0, 1.5),
    (0.088, 0.0, math.pi / 2, -2.8973, 2.8973, 12.0, 1.2),
)
ARM7_TOOL = 0.21  # tool point on link 7's z axis: flange (0.107) plus a gripper's fingertips


_ARM7_TEMPLATE = """\
<mujoco model="arm7">
  <!-- Panda-like 7-DoF arm, not a vendor model (Franka Panda DH offsets and limits). -->
  <compiler angle="radian" autolimits="true"/>
  <default>
    <joint axis="0 0 1" damping="1" armature="0.1"/>
    <geom type="capsule" size="0.045" contype="0" conaffinity="0" rgba="0.85 0.85 0.88 1"/>
  </default>
  <worldbody>
    <light pos="0 0 3" dir="0 0 -1" directional="true"/>
{bodies}
  </worldbody>
  <actuator>
{motors}
  </actuator>
</mujoco>
"""


def _vec(values) -> str:
    return " ".join(f"{round(v, 12) + 0.0:.12g}" for v in values)


def _arm7_xml() -> str:
    """MJCF of the Panda-like arm from :data:`_ARM7_DH`: capsule links, torque motors."""
    offsets = [(a, -d * math.sin(al), d * math.cos(al)) for a, d, al, *_ in _ARM7_DH]
    offsets.append((0.0, 0.0, ARM7_TOOL))  # link 7 -> tool point
    bodies = ['<body name="link0"><geom fromto="0 0 0 0 0 0.333" size="0.06"/>']
    motors = []
    for i, (_, _, al, lo, hi, tau, mass) in enumerate(_ARM7_DH, 1):
        nxt = offsets[i]  # capsule from this joint to the next one
        geom = f'fromto="0 0 0 {_vec(nxt)}"' if max(map(abs, nxt)) > 1e-9 else 'type="sphere"'
        inertia = _vec([0.006 * mass, 0.006 * mass, 0.002 * mass])
        bodies.append(
            f'<body name="link{i}" pos="{_vec(offsets[i - 1])}" '
            f'quat="{_vec([math.cos(al / 2), math.sin(al / 2), 0, 0])}">'
            f'<inertial pos="0 0 0" mass="{mass}" diaginertia="{inertia}"/>'
            f'<joint name="joint{i}" range="{lo} {hi}"/><geom {geom}/>'
        )
        motors.append(f'    <motor name="a{i}" joint="joint{i}" ctrlrange="{-tau} {tau}"/>')
    bodies.append(f'<site name="ee" pos="0 0 {ARM7_TOOL}" size="0.01"/>' + "</body>" * 8)
    return _ARM7_TEMPLATE.format(bodies="\n".join(bodies), motors="\n".join(motors))


ARM7_XML: str = _arm7_xml()

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

    def ee_residual(self, q: Tensor, goal: Tensor) -> Tensor:
        """Position error ``p(q) − goal`` ``(B, 3)``; ``goal (B, 3)`` or ``(3,)``."""
        p = self.position(q)
        return p - _goal(goal, p)


def _goal(goal: Tensor, like: Tensor) -> Tensor:
    if not isinstance(goal, Tensor) or goal.dim() not in (1, 2) or goal.shape[-1] != 3:
        shape = tuple(goal.shape) if isinstance(goal, Tensor) else type(goal).__name__
        raise ValueError(f"goal must have shape (B, 3) or (3,), got {shape}")
    if goal.dim() == 2 and goal.shape[0] not in (1, like.shape[0]) and like.shape[0] != 1:
        raise ValueError(f"goal has batch {goal.shape[0]} but q has batch {like.shape[0]}")
    check_finite("goal", goal)
    return goal.to(dtype=like.dtype)


def ee_residual(chain: KinematicChain, q: Tensor, goal: Tensor) -> Tensor:
    """End-effector position residual ``p(q) − goal`` ``(B, 3)`` (a Theseus-style error)."""
    return chain.ee_residual(q, goal)


def arm7_chain(analytical_grad: bool = False) -> KinematicChain:
    """The Panda-like 7-DoF arm of :data:`ARM7_XML`, base frame at the origin, end at ``"ee"``."""
    return KinematicChain(ARM7_XML, ARM7_EE_SITE, analytical_grad=analytical_grad)


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


def _weight(name: str, w: float | Tensor, like: Tensor) -> Tensor:
    """A non-negative weight (float, ``()`` or ``(B,)``) as a ``(1,)`` or ``(B,)`` tensor."""
    w = torch.as_tensor(w, dtype=like.dtype, device=like.device)
    if w.dim() > 1 or (w.dim() == 1 and w.shape[0] not in (1, like.shape[0])):
        raise ValueError(
            f"{name} must be a float, a () tensor or a (B,) tensor, got {tuple(w.shape)}"
        )
    check_finite(name, w)
    if (w < 0).any():
        raise ValueError(f"{name} must be >= 0, got min {w.min().item():.3g}")
    return w.reshape(-1) if w.dim() == 1 else w.reshape(1)


def ee_goal_cost(
    chain: KinematicChain,
    q_lin: Tensor,
    goal: Tensor,
    weight: float | Tensor,
    horizon: int,
    *,
    n_state: int | None = None,
    n_ctrl: int | None = None,
    ctrl_weight: float | Tensor = 1e-2,
    terminal_weight: float | Tensor | None = None,
) -> QuadraticCost:
    """Quadratic model of an end-effector goal cost, linearized at ``q_lin``.

    The true cost of stage ``t`` is ``½ w ‖p(q_t) − g‖² + ½ ρ ‖u_t‖²`` and the terminal cost
    ``½ w_f ‖p(q_T) − g‖²``. With ``p(q) ≈ p̄ + J (q − q̄)`` (``p̄ = p(q̄)``, ``J = ∂p/∂q`` at
    ``q̄ = q_lin``) the residual is ``r(q) ≈ J q + r̄`` with ``r̄ = p̄ − J q̄ − g``, so

        ½ w ‖r‖² ≈ ½ qᵀ (w JᵀJ) q + (w Jᵀ r̄)ᵀ q + const,

    the Gauss-Newton model: exact value and gradient at ``q̄``, Hessian ``w JᵀJ``.

    State layout assumption: the state ``x (n_state,)`` holds the chain's ``k`` joint angles
    first, ``x[:k] = q``; any further entries (e.g. joint velocities) get zero cost. The
    control ``u (n_ctrl,)`` gets ``½ ρ ‖u‖²``. Stage ``t`` uses ``τ_t = [x_t; u_t]`` as in
    :class:`diffto.QuadraticCost`.

    Args:
        chain: the kinematic chain (``k = chain.n_joints``).
        q_lin: linearization point ``(k,)``, ``(B, k)``, or per knot ``(B, T+1, k)`` (stage
            ``t`` uses ``q_lin[:, t]``, the terminal cost ``q_lin[:, T]``).
        goal: target position ``(3,)`` or ``(B, 3)`` in the chain's root frame.
        weight: ``w``, a float, ``()`` or ``(B,)`` tensor, ``>= 0``.
        horizon: ``T >= 1``.
        n_state: state dimension ``n >= k`` (default ``k``).
        n_ctrl: control dimension ``m >= 1`` (default ``k``, e.g. joint velocities).
        ctrl_weight: ``ρ > 0`` (keeps the control block positive definite).
        terminal_weight: ``w_f``; ``None`` means ``w``.

    Returns:
        ``QuadraticCost`` with ``C (B, T, n+m, n+m)``, ``c (B, T, n+m)``, ``C_final (B, n, n)``,
        ``c_final (B, n)``; differentiable in ``q_lin``, ``goal`` and the weights.
    """
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
    T, k = horizon, chain.n_joints
    n = k if n_state is None else int(n_state)
    m = k if n_ctrl is None else int(n_ctrl)
    if n < k:
        raise ValueError(f"n_state must be >= the chain's {k} joints, got {n}")
    if m < 1:
        raise ValueError(f"n_ctrl must be >= 1, got {m}")
    if not isinstance(q_lin, Tensor) or not q_lin.is_floating_point():
        raise ValueError(
            f"q_lin must be a floating-point tensor of shape (k,), (B, k) or (B, T+1, k) with k={k}"
        )
    if q_lin.dim() == 3:
        if q_lin.shape[1:] != (T + 1, k):
            raise ValueError(
                f"q_lin must have shape (B, {T + 1}, {k}) when per knot, got {tuple(q_lin.shape)}"
            )
        q_knots = q_lin
    else:
        q_knots = _as_batch("q_lin", q_lin, k).unsqueeze(1).expand(-1, T + 1, k)
    check_finite("q_lin", q_knots)
    B = q_knots.shape[0]

    p, J = chain.position_jacobian(q_knots.reshape(B * (T + 1), k))  # (B(T+1), 3), (.., 3, k)
    p, J = p.reshape(B, T + 1, 3), J.reshape(B, T + 1, 3, k)
    g = _goal(goal, q_knots[:, 0])  # (B|1, 3)
    if g.dim() == 2 and g.shape[0] not in (1, B):
        if B != 1:
            raise ValueError(f"goal has batch {g.shape[0]} but q_lin has batch {B}")
        p, J, q_knots = (t.expand(g.shape[0], *t.shape[1:]) for t in (p, J, q_knots))
        B = g.shape[0]
    r_bar = p - torch.einsum("btij,btj->bti", J, q_knots) - g.reshape(-1, 1, 3)  # (B, T+1, 3)

    w = _weight("weight", weight, q_knots)  # (B|1,)
    w_f = w if terminal_weight is None else _weight("terminal_weight", terminal_weight, q_knots)
    rho = _weight("ctrl_weight", ctrl_weight, q_knots)
    if (rho <= 0).any():
        raise ValueError("ctrl_weight must be > 0 so the control block is positive definite")

    H = torch.einsum("btij,btik->btjk", J, J)  # JᵀJ (B, T+1, k, k)
    h = torch.einsum("btij,bti->btj", J, r_bar)  # Jᵀ r̄ (B, T+1, k)
    dtype, device = q_knots.dtype, q_knots.device
    C = torch.zeros(B, T, n + m, n + m, dtype=dtype, device=device)
    c = torch.zeros(B, T, n + m, dtype=dtype, device=device)
    C[:, :, :k, :k] = w.reshape(-1, 1, 1, 1) * H[:, :T]
    C[:, :, n:, n:] = rho.reshape(-1, 1, 1, 1) * torch.eye(m, dtype=dtype, device=device)
    c[:, :, :k] = w.reshape(-1, 1, 1) * h[:, :T]
    C_final = torch.zeros(B, n, n, dtype=dtype, device=device)
    c_final = torch.zeros(B, n, dtype=dtype, device=device)
    C_final[:, :k, :k] = w_f.reshape(-1, 1, 1) * H[:, T]
    c_final[:, :k] = w_f.reshape(-1, 1) * h[:, T]
    return QuadraticCost(C, c, C_final, c_final)


def theseus_ee_cost(chain: KinematicChain, q_var, goal_var, weight=None, name: str = "ee_goal"):
    """A Theseus ``AutoDiffCostFunction`` with error :func:`ee_residual` ``(B, 3)``.

    Args:
        chain: kinematic chain with ``k`` joints.
        q_var: ``theseus.Vector`` of dimension ``k`` (optimization variable).
        goal_var: ``theseus.Variable`` holding ``(B, 3)`` goals (auxiliary variable).
        weight: a Theseus ``CostWeight``; ``None`` means unit weight.
        name: cost-function name.
    """
    import theseus as th  # lazy: optional backend

    if q_var.dof() != chain.n_joints:
        raise ValueError(f"q_var must have dimension {chain.n_joints}, got {q_var.dof()}")

    def error(optim_vars, aux_vars):
        return chain.ee_residual(optim_vars[0].tensor, aux_vars[0].tensor)

    return th.AutoDiffCostFunction(
        [q_var],
        error,
        3,
        aux_vars=[goal_var],
        cost_weight=weight or th.ScaleCostWeight(torch.tensor(1.0, dtype=q_var.dtype)),
        name=name,
        autograd_mode="dense",
    )
