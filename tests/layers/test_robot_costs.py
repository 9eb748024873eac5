"""Robot cost builders on a small MJCF arm defined here: residuals against MuJoCo's own FK,
gradients against finite differences (float64), the barriers' shape, errors, and an MPC that
reaches an end-effector goal with a kinematic double integrator."""

from __future__ import annotations

import math

import mujoco
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffto import LeastSquaresCost, NonlinearCost
from diffto.layers import MPC
from diffto.layers.kinematics import KinematicChain, quat_to_matrix
from diffto.layers.robot_costs import ee_pose_cost, joint_limit_cost, sphere_obstacle_cost

# A spatial 3R arm: base yaw, shoulder and elbow pitch, a tool site offset and rotated.
ARM_XML = """<mujoco model="arm3"><compiler angle="radian" autolimits="true"/>
  <worldbody><body name="l1" pos="0 0 0.1">
    <joint name="yaw" axis="0 0 1" range="-2.8 2.8"/>
    <geom type="capsule" fromto="0 0 0 0 0 0.2" size="0.03"/>
    <body name="l2" pos="0 0 0.2"><joint name="shoulder" axis="0 1 0" range="-1.8 1.8"/>
      <geom type="capsule" fromto="0 0 0 0.3 0 0" size="0.03"/>
      <body name="l3" pos="0.3 0 0"><joint name="elbow" axis="0 1 0" range="-2.5 2.5"/>
        <geom type="capsule" fromto="0 0 0 0.25 0 0" size="0.03"/>
        <site name="tool" pos="0.25 0 0.02" quat="0.96 0 0.2 0.2"/>
      </body></body></body></worldbody></mujoco>"""
K = 3
F64 = torch.float64


@pytest.fixture(scope="module")
def chain():
    return KinematicChain(ARM_XML, "tool")


@pytest.fixture(scope="module")
def mj():
    model = mujoco.MjModel.from_xml_string(ARM_XML)
    return model, mujoco.MjData(model)


def _q(rng, *shape):
    lo, hi = np.array([-2.8, -1.8, -2.5]), np.array([2.8, 1.8, 2.5])
    return torch.from_numpy(rng.uniform(0.8 * lo, 0.8 * hi, size=(*shape, K)))


def _unit_quat(rng, *shape):
    q = rng.normal(size=(*shape, 4))
    return torch.from_numpy(q / np.linalg.norm(q, axis=-1, keepdims=True))


def _mj_pose(mj, q):
    model, data = mj
    data.qpos[:] = q
    mujoco.mj_kinematics(model, data)
    return data.site_xpos[0].copy(), data.site_xmat[0].reshape(3, 3).copy()


# ----------------------------------------------------------------------------- ee_pose_cost
@settings(max_examples=3)
@given(seed=st.integers(0, 2**31 - 1))
def test_ee_residuals_match_mujoco_pose_and_the_stated_cost(chain, mj, seed):
    rng = np.random.default_rng(seed)
    B, T, m = 2, 3, 2
    x = torch.cat([_q(rng, B, T + 1), torch.from_numpy(rng.normal(size=(B, T + 1, 2)))], -1)
    u = torch.from_numpy(rng.normal(size=(B, T, m)))
    goal, quat = torch.from_numpy(rng.normal(size=(B, 3))), _unit_quat(rng, B)
    w = dict(position_weight=torch.tensor([2.0, 0.5], dtype=F64), orientation_weight=0.3,
             velocity_weight=0.2, control_weight=0.1, terminal_weight=4.0)
    cost = ee_pose_cost(chain, goal, quat * 2.0, n_state=5, **w)  # the scale does not matter
    assert isinstance(cost, LeastSquaresCost)
    r, r_f = cost.residuals(x, u)
    assert r.shape == (B, T, 3 + 9 + 2 + m) and r_f.shape == (B, 3 + 9 + 2)
    total = torch.zeros(B, dtype=F64)
    for b in range(B):
        R_goal = np.zeros(9)
        mujoco.mju_quat2Mat(R_goal, quat[b].numpy())
        R_goal = R_goal.reshape(3, 3)
        for t in range(T + 1):
            p, R = _mj_pose(mj, x[b, t, :K].numpy())
            row = r[b, t] if t < T else r_f[b] / 2.0  # √w_T = 2
            wp = w["position_weight"][b].item()
            np.testing.assert_allclose(row[:3].numpy(), math.sqrt(wp) * (p - goal[b].numpy()),
                                       atol=1e-12)
            np.testing.assert_allclose(row[3:12].numpy(),
                                       math.sqrt(0.3 / 2) * (R - R_goal).reshape(9), atol=1e-12)
            np.testing.assert_allclose(row[12:14].numpy(), math.sqrt(0.2) * x[b, t, K:].numpy())
            if t < T:
                np.testing.assert_allclose(row[14:].numpy(), math.sqrt(0.1) * u[b, t].numpy())
            # the orientation term is w_o (1 − cos θ), θ the angle between the frames
            cos = (np.trace(R_goal.T @ R) - 1) / 2
            orient = 0.3 * (1 - cos)
            np.testing.assert_allclose(0.5 * (row[3:12] ** 2).sum().item(), orient, atol=1e-12)
            scale = 1.0 if t < T else 4.0
            total[b] += scale * (0.5 * wp * np.sum((p - goal[b].numpy()) ** 2) + orient
                                 + 0.5 * 0.2 * np.sum(x[b, t, K:].numpy() ** 2))
        total[b] += 0.5 * 0.1 * u[b].pow(2).sum()
    torch.testing.assert_close(cost.evaluate(x, u), total, rtol=1e-12, atol=1e-12)


def test_ee_cost_gradients_match_finite_differences(chain):
    rng = np.random.default_rng(0)
    B, T = 2, 2
    x = torch.cat([_q(rng, B, T + 1), torch.zeros(B, T + 1, K, dtype=F64)], -1)
    x[..., K:] = torch.from_numpy(rng.normal(size=(B, T + 1, K)))
    u = torch.from_numpy(rng.normal(size=(B, T, 1)))
    goal = torch.from_numpy(rng.normal(size=(B, 3)) * 0.3)
    quat = _unit_quat(rng, 1)[0]
    wp = torch.tensor([1.5, 0.7], dtype=F64)
    wo = torch.tensor(0.4, dtype=F64)

    def f(x, u, goal, quat, wp, wo):
        cost = ee_pose_cost(chain, goal, quat, position_weight=wp, orientation_weight=wo,
                            velocity_weight=0.1, control_weight=0.2, terminal_weight=3.0)
        return cost.evaluate(x, u)

    inputs = tuple(t.clone().requires_grad_(True) for t in (x, u, goal, quat, wp, wo))
    assert torch.autograd.gradcheck(f, inputs)
    # second order too (the FK backward goes through the geometric Jacobian, itself by autograd)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)
    # what the solvers use: exact derivatives of the stages, and the Gauss-Newton model
    cost = ee_pose_cost(chain, goal, quat, velocity_weight=0.1)
    H, g, H_f, g_f = cost.derivatives(x, u, "exact")
    # against plain autograd through pytorch-kinematics' own FK graph
    R_goal = quat_to_matrix(quat)[0]

    def stage(tau):  # one stage's cost, tau = [x_t; u_t] (7,)
        pose = chain.forward_kinematics(tau[None, :K])[0]
        return (0.5 * (pose[:3, 3] - goal[b]).pow(2).sum()
                + 0.25 * (pose[:3, :3] - R_goal).pow(2).sum()
                + 0.05 * tau[K : 2 * K].pow(2).sum() + 0.5e-3 * tau[2 * K :].pow(2).sum())

    for b in range(B):
        tau = torch.cat([x[b, 1], u[b, 1]])
        torch.testing.assert_close(H[b, 1], torch.autograd.functional.hessian(stage, tau))
        torch.testing.assert_close(g[b, 1], torch.func.grad(stage)(tau))
    Hgn, g2, _, _ = cost.derivatives(x, u, "convex")
    torch.testing.assert_close(g, g2)
    assert H.shape == (B, T, 2 * K + 1, 2 * K + 1) and H_f.shape == (B, 2 * K, 2 * K)
    assert torch.linalg.eigvalsh(Hgn).min() > -1e-12  # JᵀJ is PSD


def test_ee_goals_and_weights_broadcast(chain):
    rng = np.random.default_rng(1)
    B, T = 3, 2
    x, u = _q(rng, B, T + 1), torch.from_numpy(rng.normal(size=(B, T, 2)))
    goal = torch.tensor([0.3, 0.1, 0.4], dtype=F64)
    ref = ee_pose_cost(chain, goal).evaluate(x, u)
    for g in (goal[None], goal.expand(B, 3)):
        torch.testing.assert_close(ee_pose_cost(chain, g).evaluate(x, u), ref)
    per_row = ee_pose_cost(chain, goal, position_weight=torch.full((B,), 1.0, dtype=F64))
    torch.testing.assert_close(per_row.evaluate(x, u), ref)
    # float32 plans: the goal and the chain follow the plan's dtype
    quat = torch.tensor([1.0, 0.2, 0.0, 0.1], dtype=F64)
    c64 = ee_pose_cost(chain, goal, quat)
    v32 = c64.evaluate(x.float(), u.float())
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32, c64.evaluate(x, u).float(), rtol=1e-5, atol=1e-6)
    assert c64.derivatives(x.float(), u.float(), "convex")[0].dtype == torch.float32
    # terminal_weight=0 drops the terminal residual; position-only goals have 3 + m entries
    no_terminal = ee_pose_cost(chain, goal, terminal_weight=0.0)
    r, r_f = no_terminal.residuals(x, u)
    assert r.shape == (B, T, 3 + 2) and r_f is None
    # weights given as the number 0 drop their blocks; tensor zeros keep them
    xv = torch.cat([x, torch.ones(B, T + 1, 2, dtype=F64)], -1)
    lean = ee_pose_cost(chain, goal, control_weight=0, velocity_weight=0.0)
    assert lean.residuals(xv, u)[0].shape == (B, T, 3)
    torch.testing.assert_close(lean.evaluate(xv, u), ee_pose_cost(
        chain, goal, control_weight=torch.tensor(0.0), velocity_weight=0.0).evaluate(xv, u))
    assert ee_pose_cost(chain, goal, velocity_weight=torch.tensor(0.0)).residuals(xv, u)[0].shape \
        == (B, T, 3 + 2 + 2)
    with pytest.raises(ValueError, match="goal_pos has batch 2 but the plan has batch 3"):
        ee_pose_cost(chain, torch.zeros(2, 3, dtype=F64)).evaluate(x, u)
    with pytest.raises(ValueError, match="position_weight has batch 2"):
        ee_pose_cost(chain, goal, position_weight=torch.ones(2)).evaluate(x, u)


def test_ee_cost_errors(chain):
    goal = torch.zeros(3)
    for kwargs, match in [
        (dict(chain="arm"), "chain must be a KinematicChain"),
        (dict(chain=KinematicChain(ARM_XML, "tool", analytical_grad=True)), "analytical_grad"),
        (dict(goal_pos=torch.zeros(2)), r"goal_pos must have shape \(3,\) or \(B, 3\)"),
        (dict(goal_pos=torch.zeros(3, dtype=torch.long)), "goal_pos must be a floating-point"),
        (dict(goal_pos=torch.full((3,), float("nan"))), "goal_pos"),
        (dict(goal_quat=torch.zeros(3)), "goal_quat must have shape"),
        (dict(goal_quat=torch.zeros(4)), "goal_quat must be non-zero"),
        (dict(position_weight=-1.0), "position_weight must be >= 0"),
        (dict(control_weight=torch.ones(2, 2)), "control_weight must be a float or a"),
        (dict(orientation_weight="big"), "orientation_weight must be a float"),
        (dict(n_state=2), "n_state must be an int >= the chain's 3 joints"),
    ]:
        args = dict(chain=chain, goal_pos=goal)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            ee_pose_cost(**args)
    cost = ee_pose_cost(chain, goal, n_state=6)
    with pytest.raises(ValueError, match="n_state=6"):
        cost.evaluate(torch.zeros(1, 3, 4), torch.zeros(1, 2, 1))
    with pytest.raises(ValueError, match="joint angles first"):
        ee_pose_cost(chain, goal).evaluate(torch.zeros(1, 3, 2), torch.zeros(1, 2, 1))


# ----------------------------------------------------------------------------- barriers
def test_sphere_barrier_is_zero_outside_the_band_and_grows_inside(chain):
    q = torch.tensor([[0.3, -0.4, 0.8]], dtype=F64)
    p = chain.position(q)[0]  # the tool point
    direction = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    radius, margin, w = 0.1, 0.05, 2.0

    def value(clearance):  # sphere placed so the point has this clearance
        centers = (p + (radius + clearance) * direction)[None]
        cost = sphere_obstacle_cost(chain, centers, radius, margin=margin, weight=w)
        x = q[:, None].expand(1, 3, K).clone()
        return cost.evaluate(x, torch.zeros(1, 2, 1)).item() / 3  # 2 stages + terminal

    assert value(0.2) == 0.0 and value(margin + 1e-9) == 0.0
    assert value(0.0) == pytest.approx(w, rel=1e-12)  # touching the sphere: w
    assert value(margin / 2) == pytest.approx(w / 8, rel=1e-9)  # cubic in the depth
    depths = [value(c) for c in (0.04, 0.02, 0.0, -0.02)]
    assert all(a < b for a, b in zip(depths, depths[1:], strict=False))
    # twice differentiable in the state, the centres and the radii, inside the band too
    centers = (p + (radius + 0.02) * direction)[None].clone().requires_grad_(True)
    radii = torch.tensor([radius], dtype=F64, requires_grad=True)
    x = q[:, None].expand(1, 2, K).clone().requires_grad_(True)

    def f(x, centers, radii):
        cost = sphere_obstacle_cost(chain, centers, radii, margin=margin, weight=w)
        return cost.evaluate(x, torch.zeros(1, 1, 1, dtype=F64))

    assert torch.autograd.gradcheck(f, (x, centers, radii))
    assert torch.autograd.gradgradcheck(f, (x, centers, radii))


def test_sphere_barrier_with_points_function_and_batched_centres(chain):
    rng = np.random.default_rng(5)
    B, T = 2, 2
    x = _q(rng, B, T + 1)

    def two_points(xs):  # the tool point and a point 0.1 m above it
        p = chain.position(xs[:, :K])
        return torch.stack([p, p + torch.tensor([0.0, 0.0, 0.1], dtype=p.dtype)], 1)

    centers = torch.from_numpy(rng.normal(size=(B, 4, 3)) * 0.3)
    radii = torch.from_numpy(rng.uniform(0.05, 0.2, size=(B, 4)))
    cost = sphere_obstacle_cost(two_points, centers, radii, margin=0.3, weight=1.5,
                                terminal=False)
    assert isinstance(cost, NonlinearCost) and cost.terminal is None
    pts = torch.stack([two_points(x[:, t]) for t in range(T)], 1)  # (B, T, 2, 3)
    d = (pts[:, :, :, None] - centers[:, None, None]).norm(dim=-1) - radii[:, None, None]
    expected = 1.5 * ((0.3 - d).clamp_min(0) / 0.3).pow(3).sum((-1, -2, -3))
    torch.testing.assert_close(cost.evaluate(x, torch.zeros(B, T, 1, dtype=F64)), expected)


def test_joint_limit_barrier(chain):
    lo, hi = chain.lower, chain.upper
    cost = joint_limit_cost(lo, hi, margin=0.2, weight=3.0)
    u = torch.zeros(1, 1, 1, dtype=F64)

    def at(q):
        return cost.evaluate(torch.stack([q, q])[None], u).item() / 2

    mid = (lo + hi) / 2
    assert at(mid) == 0.0 and at(hi - 0.2 - 1e-9) == 0.0 and at(lo + 0.2 + 1e-9) == 0.0
    one = mid.clone()
    one[1] = hi[1]
    assert at(one) == pytest.approx(3.0, rel=1e-12)  # one joint at its limit: w
    one[1] = lo[1] - 0.1
    assert at(one) == pytest.approx(3.0 * 1.5**3, rel=1e-12)  # beyond it: keeps growing
    # indices into a larger state, an open side, gradients of second order
    partial = joint_limit_cost([-1.0, -math.inf], [1.0, 0.5], margin=0.1, indices=[3, 0])
    x = torch.zeros(1, 2, 5, dtype=F64)
    x[..., 3], x[..., 0] = 0.95, -100.0
    assert partial.evaluate(x, u).item() == pytest.approx(2 * 0.5**3, rel=1e-12)
    x.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x: partial.evaluate(x, u), (x,))


def test_barrier_errors(chain):
    c = torch.zeros(1, 3)
    for call, match in [
        (lambda: sphere_obstacle_cost("arm", c, 0.1), "points must be a KinematicChain"),
        (lambda: sphere_obstacle_cost(chain, torch.zeros(3), 0.1), r"centers must be .*\(K, 3\)"),
        (lambda: sphere_obstacle_cost(chain, c, -0.1), "radii must be >= 0"),
        (lambda: sphere_obstacle_cost(chain, c, torch.ones(2)), "radii must have shape"),
        (lambda: sphere_obstacle_cost(chain, c, 0.1, margin=0.0), "margin must be"),
        (lambda: sphere_obstacle_cost(chain, c, 0.1, weight=-1.0), "weight must be >= 0"),
        (lambda: joint_limit_cost([0.0, 1.0], [1.0], margin=0.1), "same shape"),
        (lambda: joint_limit_cost([1.0], [0.0], margin=0.1), "lower must be < upper"),
        (lambda: joint_limit_cost([0.0], [0.1], margin=0.1), "less than half"),
        (lambda: joint_limit_cost([0.0], [1.0], indices=[0, 1]), "indices must be 1 distinct"),
        (lambda: joint_limit_cost([[0.0]], [[1.0]]), r"lower must be a float \(d,\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    bad_points = sphere_obstacle_cost(lambda x: x, c, 0.1)
    with pytest.raises(ValueError, match=r"points must return shape \(N, P, 3\)"):
        bad_points.evaluate(torch.zeros(1, 2, 3), torch.zeros(1, 1, 1))
    limits = joint_limit_cost([0.0], [1.0], indices=[4])
    with pytest.raises(ValueError, match="indices reach state entry 4"):
        limits.evaluate(torch.zeros(1, 2, 3), torch.zeros(1, 1, 1))


def test_costs_add(chain):
    rng = np.random.default_rng(9)
    x, u = _q(rng, 2, 3), torch.from_numpy(rng.normal(size=(2, 2, 1)))
    parts = [ee_pose_cost(chain, torch.zeros(3, dtype=F64)),
             sphere_obstacle_cost(chain, torch.zeros(1, 3, dtype=F64), 0.3, margin=0.2),
             joint_limit_cost(chain.lower, chain.upper, margin=0.5)]
    total = parts[0] + parts[1] + parts[2]
    torch.testing.assert_close(total.evaluate(x, u), sum(p.evaluate(x, u) for p in parts))


# ----------------------------------------------------------------------------- in MPC
class JointDoubleIntegrator(torch.nn.Module):
    """Kinematic arm: ``x = [q; q̇]``, ``u = q̈``, exact zero-order-hold discretization."""

    def __init__(self, k: int, dt: float) -> None:
        super().__init__()
        self.k, self.dt, self.n_ctrl = k, dt, k
        eye = torch.eye(k, dtype=F64)
        zero = torch.zeros(k, k, dtype=F64)
        self.register_buffer("A", torch.cat([torch.cat([eye, dt * eye], 1),
                                             torch.cat([zero, eye], 1)], 0))
        self.register_buffer("B", torch.cat([0.5 * dt**2 * eye, dt * eye], 0))

    def forward(self, x, u):
        return x @ self.A.T + u @ self.B.T

    def jacobians(self, x, u):
        N = x.shape[0]
        return self.A.expand(N, -1, -1), self.B.expand(N, -1, -1)


def test_mpc_with_an_ee_goal_reaches_it(chain):
    T, dt = 25, 0.08
    dyn = JointDoubleIntegrator(K, dt)
    q_goal = torch.tensor([[0.6, -0.5, 1.0], [-0.8, 0.4, -0.9]], dtype=F64)
    pose = chain.forward_kinematics(q_goal)
    goal = pose[:, :3, 3]
    quat = np.zeros((2, 4))
    for b in range(2):  # a reachable orientation: the one at q_goal
        mujoco.mju_mat2Quat(quat[b], pose[b, :3, :3].reshape(9).numpy())
    x0 = torch.cat([torch.tensor([[0.0, 0.2, 0.3]], dtype=F64).expand(2, K),
                    torch.zeros(2, K, dtype=F64)], -1)
    cost = (ee_pose_cost(chain, goal, torch.from_numpy(quat), position_weight=50.0,
                         orientation_weight=5.0, velocity_weight=0.05, control_weight=1e-3,
                         terminal_weight=20.0)
            + joint_limit_cost(chain.lower, chain.upper, margin=0.1, weight=1.0))
    mpc = MPC(dyn, horizon=T, u_lower=-10.0, u_upper=10.0, max_iter=100)
    sol = mpc(x0, cost)
    assert sol.converged.all(), sol.extras.get("residual")
    final = chain.forward_kinematics(sol.x[:, -1, :K])
    err = (final[:, :3, 3] - goal).norm(dim=-1)
    assert err.max() < 5e-3, err
    cos = ((final[:, :3, :3] * pose[:, :3, :3]).sum((-1, -2)) - 1) / 2  # cos of the angle
    assert cos.min() > math.cos(0.02), cos
    assert sol.x[:, -1, K:].abs().max() < 0.1  # it arrives nearly at rest


def test_mpc_plan_gradient_reaches_the_goal_and_weights(chain):
    """d(plan)/d(goal, weight) through the MPC's implicit backward equals central differences
    of re-solves: the closed-over goal and weight get exact gradients."""
    T, dt = 8, 0.12
    dyn = JointDoubleIntegrator(K, dt)
    x0 = torch.tensor([[0.1, 0.2, 0.3, 0.0, 0.0, 0.0]], dtype=F64)
    goal0 = chain.position(torch.tensor([[0.5, -0.3, 0.9]], dtype=F64))[0]
    mpc = MPC(dyn, horizon=T, max_iter=200, tol=1e-11)
    probe = torch.from_numpy(np.random.default_rng(3).normal(size=(T, K)))

    def loss(goal, w):
        cost = ee_pose_cost(chain, goal, position_weight=w, velocity_weight=0.1,
                            control_weight=1e-2, terminal_weight=5.0)
        sol = mpc(x0, cost)
        assert sol.converged.all()
        return (sol.u[0] * probe).sum()

    goal = goal0.clone().requires_grad_(True)
    w = torch.tensor(20.0, dtype=F64, requires_grad=True)
    g_goal, g_w = torch.autograd.grad(loss(goal, w), (goal, w))
    eps = 1e-5
    with torch.no_grad():
        fd_goal = torch.stack([(loss(goal0 + eps * e, w) - loss(goal0 - eps * e, w)) / (2 * eps)
                               for e in torch.eye(3, dtype=F64)])
        fd_w = (loss(goal0, w + eps) - loss(goal0, w - eps)) / (2 * eps)
    torch.testing.assert_close(g_goal, fd_goal, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_w, fd_w, rtol=1e-5, atol=1e-7)


def test_mpc_casadi_and_theseus_agree_on_an_ee_goal(chain):
    """The same ee_pose_cost in the three general-cost layers gives the same plan."""
    from diffto import LinearDynamics
    from diffto.layers import CasadiTO

    T = 6
    dyn = JointDoubleIntegrator(K, 0.15)
    x0 = torch.tensor([[0.1, 0.2, 0.3, 0.0, 0.0, 0.0]], dtype=F64)
    goal = chain.position(torch.tensor([[0.5, -0.3, 0.9]], dtype=F64))[0]
    cost = ee_pose_cost(chain, goal, position_weight=20.0, velocity_weight=0.1,
                        control_weight=1e-2, terminal_weight=5.0)
    u_init = torch.zeros(1, T, K, dtype=F64)
    ref = MPC(dyn, horizon=T, tol=1e-10, max_iter=200)(x0, cost)
    linear = LinearDynamics(torch.cat([dyn.A, dyn.B], 1).expand(T, 2 * K, 3 * K))
    casadi = CasadiTO(linear, horizon=T)(x0, cost, u_init=u_init)
    assert ref.converged.all() and casadi.converged.all()
    torch.testing.assert_close(casadi.u, ref.u, rtol=0, atol=1e-7)
    pytest.importorskip("theseus")
    from diffto.layers import TheseusTO

    theseus = TheseusTO(dyn, horizon=T, max_iter=100)(x0, cost, u_init=u_init)
    assert theseus.converged.all()
    torch.testing.assert_close(theseus.u, ref.u, rtol=0, atol=1e-4)
    torch.testing.assert_close(theseus.cost, ref.cost, rtol=1e-9, atol=0)
