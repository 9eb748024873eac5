"""Cost builders for robots: an end-effector pose goal, sphere obstacles, joint limits.

Each builder returns a :class:`~diffto.LeastSquaresCost` or :class:`~diffto.NonlinearCost` for
the general-cost layers (``MPC``, ``TheseusTO``, ``CasadiTO``), and costs add with ``+``::

    chain = panda_chain()
    cost = (ee_pose_cost(chain, goal_pos, position_weight=100.0, velocity_weight=0.1)
            + joint_limit_cost(chain.lower, chain.upper, margin=0.1, weight=10.0)
            + sphere_obstacle_cost(chain, centers, radii=0.1, margin=0.05, weight=50.0))

State layout: the state ``x (n,)`` holds the chain's ``k`` joint angles first, ``x[:k] = q``
(the MuJoCo ``[qpos; qvel]`` state of an arm, or a kinematic ``[q; q̇]``); entries after them
(``x[k:]``, e.g. joint velocities) are what ``velocity_weight`` penalizes. Controls ``u (m,)``
are only regularized.

Goals, centres and weights are closed over, not copied: a goal ``(B, 3)`` produced by a policy
network, or a weight that requires grad, receives the gradients of a plan through the
solvers' implicit backward. Poses come from pytorch-kinematics FK
(:class:`~diffto.layers.kinematics.KinematicChain`, ``analytical_grad=False``) with a backward
through the chain's geometric Jacobian: the layers differentiate these costs twice, row by row,
and that backward lets all reverse passes of one derivative run as one batched pass.
Batch sizes: a goal or weight of batch 1 (or unbatched) serves every row; one of batch ``B``
must meet plans of batch ``B``.

Barriers (obstacles, joint limits) are the cubic hinge ``w · (max(0, s) / margin)³`` of a
penetration ``s`` into a safety band of width ``margin``: exactly zero outside the band, ``w``
at its inner edge (touching the obstacle or the limit), growing beyond, and twice continuously
differentiable everywhere (value, slope and curvature all vanish at ``s = 0``), which the
Newton-type solvers need.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffto.costs import LeastSquaresCost, NonlinearCost
from diffto.layers.kinematics import KinematicChain, quat_to_matrix
from diffto.problem import check_finite

__all__ = ["ee_pose_cost", "sphere_obstacle_cost", "joint_limit_cost"]

PointsFn = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- validation
def _tensor(name: str, value, shapes: str, trailing: tuple[int, ...]) -> Tensor:
    """A finite float tensor whose trailing dims are ``trailing`` with at most one batch dim."""
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a float tensor of shape {shapes}, got "
                             f"{type(value).__name__}") from None
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape {shapes}, got "
                         f"{value.dtype}")
    nt = len(trailing)
    if value.dim() not in (nt, nt + 1) or tuple(value.shape[value.dim() - nt :]) != trailing:
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(value.shape)}")
    check_finite(name, value)
    return value


def _weight(name: str, value) -> Tensor:
    """A weight ``>= 0``: a float, a ``()`` or a ``(B,)`` tensor (kept, so gradients reach it)."""
    if isinstance(value, bool) or not isinstance(value, int | float | Tensor):
        raise ValueError(f"{name} must be a float or a () / (B,) tensor, got "
                         f"{type(value).__name__}")
    w = value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
    if not w.is_floating_point() or w.dim() > 1:
        raise ValueError(f"{name} must be a float or a () / (B,) float tensor, got "
                         f"{w.dtype} of shape {tuple(w.shape)}")
    check_finite(name, w)
    if (w < 0).any():
        raise ValueError(f"{name} must be >= 0, got min {w.min().item():.3g}")
    return w


def _rows(name: str, value: Tensor, B: int, like: Tensor, trailing: int) -> Tensor:
    """``value`` of shape ``(B_v, *rest)`` or ``rest`` as ``(B_v, 1, *rest)`` in ``like``'s
    dtype, ready to broadcast over ``(B, T)`` (``B_v`` is 1 or ``B``)."""
    value = value.to(dtype=like.dtype, device=like.device)
    if value.dim() == trailing:
        value = value.unsqueeze(0)
    if value.shape[0] not in (1, B):
        raise ValueError(f"{name} has batch {value.shape[0]} but the plan has batch {B}")
    return value.unsqueeze(1)


def _sqrt_weight(name: str, w: Tensor, B: int, like: Tensor) -> Tensor:
    """``√w`` as ``(B_w, 1, 1)`` for residuals ``(B, T, r)`` (``B_w`` is 1 or ``B``)."""
    return _weight_rows(name, w, B, like).sqrt().unsqueeze(-1)


def _weight_rows(name: str, w: Tensor, B: int, like: Tensor) -> Tensor:
    """``w`` as ``(B_w, 1)`` for stage costs ``(B, T)`` (``B_w`` is 1 or ``B``)."""
    w = w.to(dtype=like.dtype, device=like.device).reshape(-1)
    if w.shape[0] not in (1, B):
        raise ValueError(f"{name} has batch {w.shape[0]} but the plan has batch {B}")
    return w.reshape(-1, 1)


def _is_zero(weight) -> bool:
    """A weight given as the number 0 (a tensor is kept: it may be learned)."""
    return not isinstance(weight, Tensor) and float(weight) == 0.0


def _check_chain(chain) -> None:
    if not isinstance(chain, KinematicChain):
        raise ValueError(f"chain must be a KinematicChain, got {type(chain).__name__}")
    if chain.analytical_grad:
        raise ValueError("chain must be built with analytical_grad=False: the solvers need exact "
                         "second derivatives of the cost, which pytorch-kinematics' analytical "
                         "FK backward does not give")


def _joints(chain: KinematicChain, x: Tensor, n_state: int | None) -> Tensor:
    k = chain.n_joints
    if n_state is not None and x.shape[-1] != n_state:
        raise ValueError(f"the state must have n_state={n_state} entries, got {x.shape[-1]}")
    if x.shape[-1] < k:
        raise ValueError(f"the state must hold the chain's {k} joint angles first, x[:k] = q; "
                         f"got n={x.shape[-1]}")
    return x[..., :k]


class _EndPose(torch.autograd.Function):
    """End position ``p (N, 3)`` and rotation ``R (N, 3, 3)`` of ``q (N, k)``, with a backward
    through the geometric Jacobian ``J = [J_v; J_ω] (N, 6, k)`` of the chain.

    ``∂p/∂q_i = J_v[:, i]`` and ``∂R/∂q_i = [J_ω[:, i]]_× R``, so for cotangents ``ḡ_p``,
    ``Ḡ_R``:  ``q̄_i = J_v[:, i]·ḡ_p + Σ_b Ḡ_R[:, b]·(J_ω[:, i] × R[:, b])
    = J_v[:, i]·ḡ_p + J_ω[:, i]·s`` with ``s = Σ_b R[:, b] × Ḡ_R[:, b]``.

    Why: the layers differentiate a residual row by row with one reverse pass per residual
    entry; through pytorch-kinematics' FK graph each pass costs a full FK backward and the
    passes cannot be batched. This backward is a few batched products (it runs under ``vmap``,
    so all passes go at once), and it recomputes ``J`` with plain autograd, so it is itself
    differentiable: second derivatives stay exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, chain: KinematicChain) -> tuple[Tensor, Tensor]:
        pose = chain.forward_kinematics(q)
        return pose[:, :3, 3], pose[:, :3, :3]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, chain = inputs
        ctx.chain = chain
        ctx.save_for_backward(q, output[1])

    @staticmethod
    def backward(ctx, g_p: Tensor, g_R: Tensor):
        q, R = ctx.saved_tensors
        J = ctx.chain.jacobian(q)  # (N, 6, k), graph kept when differentiating twice
        s = torch.linalg.cross(R, g_R, dim=-2).sum(-1)  # Σ_b R[:, b] × Ḡ_R[:, b], (N, 3)
        g_q = (J[:, :3] * g_p.unsqueeze(-1)).sum(-2) + (J[:, 3:] * s.unsqueeze(-1)).sum(-2)
        return g_q, None


def _end_pose(chain: KinematicChain, q: Tensor) -> tuple[Tensor, Tensor]:
    """End positions ``(*rows, 3)`` and rotations ``(*rows, 3, 3)`` of ``q (*rows, k)``."""
    rows = q.shape[:-1]
    p, R = _EndPose.apply(q.reshape(-1, q.shape[-1]), chain)
    return p.reshape(*rows, 3), R.reshape(*rows, 3, 3)


# ----------------------------------------------------------------------------- ee pose
def ee_pose_cost(
    chain: KinematicChain,
    goal_pos: Tensor,
    goal_quat: Tensor | None = None,
    *,
    position_weight: float | Tensor = 1.0,
    orientation_weight: float | Tensor = 1.0,
    control_weight: float | Tensor = 1e-3,
    velocity_weight: float | Tensor = 0.0,
    terminal_weight: float | Tensor = 1.0,
    n_state: int | None = None,
) -> LeastSquaresCost:
    r"""End-effector pose goal as a least-squares cost, through the chain's FK.

    Stage ``t`` (``q_t = x_t[:k]``, ``p(q)``, ``R(q)`` the end frame's position and rotation in
    the chain's root frame) has the residual

    .. math::

        r_t = \big[\sqrt{w_p}\,(p(q_t) - g);\ \sqrt{w_o/2}\,\operatorname{vec}(R(q_t) - R_g);\
              \sqrt{w_v}\,x_t[k:];\ \sqrt{w_u}\,u_t\big],

    the orientation block only when ``goal_quat`` is given, and the terminal residual is
    ``√w_T`` times the first three blocks at ``x_T``. The orientation error is the chordal
    distance: ``½‖R − R_g‖²_F / 2 = 1 − cos θ ≈ θ²/2`` for the angle ``θ`` between the frames,
    smooth everywhere and zero only at ``R = R_g`` (a quaternion's vector part or the rotation
    log would be singular or ambiguous at ``θ = π``). So near the goal the stage cost is
    ``½ w_p ‖p − g‖² + ½ w_o θ² + ½ w_v ‖x[k:]‖² + ½ w_u ‖u‖²``.

    Args:
        chain: the kinematic chain, ``k = chain.n_joints`` (built with ``analytical_grad=False``
            so that second derivatives are right).
        goal_pos: target position ``(3,)`` or ``(B, 3)`` in the chain's root frame.
        goal_quat: target orientation ``(4,)`` or ``(B, 4)`` (w, x, y, z; normalized here), or
            ``None`` for a position-only goal.
        position_weight, orientation_weight, control_weight, velocity_weight: ``w_p``, ``w_o``,
            ``w_u``, ``w_v``: floats or ``()`` / ``(B,)`` tensors, ``>= 0`` (``> 0`` where a
            weight needs its own gradient: the residuals carry ``√w``).
            A weight given as the float ``0`` drops its block from the residuals (fewer
            entries to differentiate); a tensor weight always keeps it.
        terminal_weight: ``w_T``, the factor of the terminal residual; ``0`` (a float) drops it.
        n_state: if given, the state dimension every call must have (``n >= k``).

    Returns:
        A ``LeastSquaresCost`` with residuals ``(B, T, 3 [+9] [+ n − k] [+ m])`` and terminal
        residuals ``(B, 3 [+9] [+ n − k])``; differentiable in the goals and the weights.
    """
    _check_chain(chain)
    goal_pos = _tensor("goal_pos", goal_pos, "(3,) or (B, 3)", (3,))
    if goal_quat is not None:
        goal_quat = _tensor("goal_quat", goal_quat, "(4,) or (B, 4)", (4,))
        if (goal_quat.detach().norm(dim=-1) == 0).any():
            raise ValueError("goal_quat must be non-zero (w, x, y, z)")
    w_p, w_o = _weight("position_weight", position_weight), _weight(
        "orientation_weight", orientation_weight)
    w_u, w_v = _weight("control_weight", control_weight), _weight(
        "velocity_weight", velocity_weight)
    w_T = _weight("terminal_weight", terminal_weight)
    if n_state is not None and (not isinstance(n_state, int) or n_state < chain.n_joints):
        raise ValueError(f"n_state must be an int >= the chain's {chain.n_joints} joints, "
                         f"got {n_state!r}")

    def pose_residual(x: Tensor) -> Tensor:
        """``x (B, T, n)`` -> ``(B, T, 3 [+9] + n − k)``, weights applied."""
        B = x.shape[0]
        p, R = _end_pose(chain, _joints(chain, x, n_state))  # (B, T, 3), (B, T, 3, 3)
        parts = [_sqrt_weight("position_weight", w_p, B, x)
                 * (p - _rows("goal_pos", goal_pos, B, x, 1))]
        if goal_quat is not None:
            R_goal = _rows("goal_quat", quat_to_matrix(goal_quat.to(x.dtype)), B, x, 2)
            err = (R - R_goal).flatten(-2)  # (B, T, 9)
            parts.append(_sqrt_weight("orientation_weight", w_o, B, x) * err / math.sqrt(2.0))
        if not _is_zero(velocity_weight):
            parts.append(_sqrt_weight("velocity_weight", w_v, B, x) * x[..., chain.n_joints :])
        return torch.cat(parts, -1)

    def residual(x: Tensor, u: Tensor) -> Tensor:
        if _is_zero(control_weight):
            return pose_residual(x)
        control = _sqrt_weight("control_weight", w_u, u.shape[0], u) * u
        return torch.cat([pose_residual(x), control], -1)

    def terminal_residual(xT: Tensor) -> Tensor:
        r = pose_residual(xT.unsqueeze(1))  # (B, 1, r_f)
        return (_sqrt_weight("terminal_weight", w_T, xT.shape[0], xT) * r)[:, 0]

    return LeastSquaresCost(residual, None if _is_zero(terminal_weight) else terminal_residual)


# ----------------------------------------------------------------------------- barriers
def _cubic_hinge(s: Tensor, margin: float) -> Tensor:
    """``(max(0, s) / margin)³``: zero for ``s <= 0``, C² at ``s = 0``."""
    return (s.clamp_min(0.0) / margin).pow(3)


def _margin(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"margin must be a finite float > 0, got {value!r}")
    return float(value)


def _stage_and_terminal(barrier: Callable[[Tensor], Tensor], terminal: bool) -> NonlinearCost:
    """A NonlinearCost applying ``barrier(x (B, T, n)) -> (B, T)`` at every stage (and x_T)."""

    def stage(x: Tensor, u: Tensor) -> Tensor:
        return barrier(x)

    def final(xT: Tensor) -> Tensor:
        return barrier(xT.unsqueeze(1))[:, 0]

    return NonlinearCost(stage, final if terminal else None)


def sphere_obstacle_cost(
    points: KinematicChain | PointsFn,
    centers: Tensor,
    radii: float | Tensor,
    *,
    margin: float = 0.05,
    weight: float | Tensor = 1.0,
    terminal: bool = True,
) -> NonlinearCost:
    r"""Smooth barrier keeping chosen points out of spheres (and a ``margin`` away from them).

    For each point ``p`` and sphere ``j`` (centre ``c_j``, radius ``ρ_j``) the clearance is
    ``d = ‖p − c_j‖ − ρ_j`` and the stage cost ``w Σ_{p, j} (max(0, margin − d) / margin)³``:
    zero with more than ``margin`` of clearance, ``w`` per point touching a sphere.

    Args:
        points: a :class:`KinematicChain` (its end point, from ``x[:k]``), or a callable
            ``x (N, n) -> (N, P, 3)`` giving the points to keep clear (e.g. several frames of a
            chain), twice differentiable.
        centers: sphere centres ``(K, 3)`` or ``(B, K, 3)``, in the frame of the points.
        radii: a float, ``(K,)`` or ``(B, K)``, ``>= 0``.
        margin: width of the safety band (``> 0``).
        weight: ``w``, a float or ``()`` / ``(B,)`` tensor, ``>= 0``.
        terminal: also apply the barrier to ``x_T``.

    Returns:
        A ``NonlinearCost``; differentiable in the centres, radii and weight.
    """
    if isinstance(points, KinematicChain):
        _check_chain(points)
        chain = points

        def points_fn(x: Tensor) -> Tensor:
            return _end_pose(chain, _joints(chain, x, None))[0].unsqueeze(1)  # (N, 1, 3)
    elif callable(points):
        points_fn = points
    else:
        raise ValueError("points must be a KinematicChain or a callable x (N, n) -> (N, P, 3), "
                         f"got {type(points).__name__}")
    if not isinstance(centers, Tensor) or centers.dim() not in (2, 3) or centers.shape[-1] != 3:
        shape = tuple(centers.shape) if isinstance(centers, Tensor) else type(centers).__name__
        raise ValueError(f"centers must be a tensor of shape (K, 3) or (B, K, 3), got {shape}")
    K = centers.shape[-2]
    centers = _tensor("centers", centers, "(K, 3) or (B, K, 3)", (K, 3))
    if not isinstance(radii, Tensor):
        radii = torch.full((K,), float(radii), dtype=torch.float64)
    radii = _tensor("radii", radii.expand(K) if radii.dim() == 0 else radii, "(K,) or (B, K)",
                    (K,))
    if (radii < 0).any():
        raise ValueError(f"radii must be >= 0, got min {radii.min().item():.3g}")
    margin, w = _margin(margin), _weight("weight", weight)

    def barrier(x: Tensor) -> Tensor:
        B, T, n = x.shape
        p = points_fn(x.reshape(B * T, n))
        if not isinstance(p, Tensor) or p.dim() != 3 or p.shape[0] != B * T or p.shape[-1] != 3:
            shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"points must return shape (N, P, 3) with N={B * T}, got {shape}")
        p = p.reshape(B, T, -1, 1, 3)  # (B, T, P, 1, 3)
        c = _rows("centers", centers, B, x, 2).unsqueeze(2)  # (B|1, 1, 1, K, 3)
        rho = _rows("radii", radii, B, x, 1).unsqueeze(2)  # (B|1, 1, 1, K)
        sq = (p - c).pow(2).sum(-1)
        # ‖p − c‖ with a floor far below any margin: the norm is not differentiable at the
        # centre itself, deep inside the obstacle where the barrier is steep anyway.
        dist = sq.clamp_min(torch.finfo(x.dtype).eps ** 2).sqrt()
        cost = _cubic_hinge(margin - (dist - rho), margin).sum((-1, -2))  # (B, T)
        return _weight_rows("weight", w, B, x) * cost

    return _stage_and_terminal(barrier, terminal)


def joint_limit_cost(
    lower: Sequence[float] | Tensor,
    upper: Sequence[float] | Tensor,
    *,
    margin: float = 0.1,
    weight: float | Tensor = 1.0,
    indices: Sequence[int] | None = None,
    terminal: bool = True,
) -> NonlinearCost:
    r"""Smooth barrier keeping joint angles ``margin`` inside their limits.

    For a joint angle ``q_i = x[indices[i]]`` with limits ``[l_i, h_i]`` the stage cost is
    ``w Σ_i (max(0, l_i + margin − q_i) / margin)³ + (max(0, q_i − h_i + margin) / margin)³``:
    zero in ``[l_i + margin, h_i − margin]``, ``w`` per joint at a limit, growing beyond.

    Args:
        lower, upper: limits ``(d,)`` (e.g. ``chain.lower``, ``chain.upper``); ``±inf`` for an
            open side.
        margin: width of the band inside each limit where the barrier acts (``> 0``, less than
            half of every finite range).
        weight: ``w``, a float or ``()`` / ``(B,)`` tensor, ``>= 0``.
        indices: the state entries holding the ``d`` angles; default ``0 … d−1`` (the layout
            of :func:`ee_pose_cost`).
        terminal: also apply the barrier to ``x_T``.

    Returns:
        A ``NonlinearCost``.
    """
    lo = torch.as_tensor(lower, dtype=torch.float64) if not isinstance(lower, Tensor) else lower
    hi = torch.as_tensor(upper, dtype=torch.float64) if not isinstance(upper, Tensor) else upper
    for name, v in (("lower", lo), ("upper", hi)):
        if not v.is_floating_point() or v.dim() != 1 or v.shape[0] < 1 or v.isnan().any():
            raise ValueError(f"{name} must be a float (d,) tensor without NaN, got "
                             f"{v.dtype} of shape {tuple(v.shape)}")
    if lo.shape != hi.shape:
        raise ValueError(f"lower and upper must have the same shape, got {tuple(lo.shape)} and "
                         f"{tuple(hi.shape)}")
    if not (lo < hi).all():
        raise ValueError("lower must be < upper for every joint")
    margin, w = _margin(margin), _weight("weight", weight)
    finite = (hi - lo).isfinite()
    if (hi - lo)[finite].lt(2 * margin).any():
        raise ValueError(f"margin {margin} must be less than half of every joint range (the "
                         f"smallest is {(hi - lo)[finite].min().item():.4g})")
    d = lo.shape[0]
    if indices is None:
        idx = list(range(d))
    else:
        idx = [int(i) for i in indices]
        if len(idx) != d or any(i < 0 for i in idx) or len(set(idx)) != d:
            raise ValueError(f"indices must be {d} distinct non-negative state indices, got "
                             f"{list(indices)}")

    def barrier(x: Tensor) -> Tensor:
        if x.shape[-1] <= max(idx):
            raise ValueError(f"indices reach state entry {max(idx)} but the state has "
                             f"n={x.shape[-1]}")
        q = x[..., idx]  # (B, T, d)
        below = _cubic_hinge(lo.to(x) + margin - q, margin)
        above = _cubic_hinge(q - hi.to(x) + margin, margin)
        return _weight_rows("weight", w, x.shape[0], x) * (below + above).sum(-1)

    return _stage_and_terminal(barrier, terminal)
