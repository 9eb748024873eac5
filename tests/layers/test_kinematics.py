"""Kinematics layer: FK and Jacobians against MuJoCo and finite differences, Jᵀf against
virtual work and MuJoCo's mj_applyFT, the end-effector goal cost, and the Theseus residual."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffto.layers import kinematics as K
from diffto.problem import QuadraticCost
from diffto.tasks.go2 import model as go2

LEGS = ("FL", "FR", "RL", "RR")


@pytest.fixture(scope="module")
def legs():
    return K.Go2LegKinematics()


@pytest.fixture(scope="module")
def arm():
    return K.arm7_chain()


@pytest.fixture(scope="module")
def go2_mj():
    model = go2.load_model()
    return model, mujoco.MjData(model)


@pytest.fixture(scope="module")
def arm_mj():
    model = mujoco.MjModel.from_xml_string(K.ARM7_XML)
    return model, mujoco.MjData(model)


def _random_q(chain: K.KinematicChain, rng: np.random.Generator, batch: int) -> torch.Tensor:
    lo, hi = chain.lower.numpy(), chain.upper.numpy()
    return torch.from_numpy(rng.uniform(lo, hi, size=(batch, chain.n_joints)))


def _go2_random_q(rng: np.random.Generator, batch: int, model) -> np.ndarray:
    jnt = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, n) for n in go2.JOINT_NAMES]
    lo, hi = model.jnt_range[jnt].T
    return rng.uniform(lo, hi, size=(batch, 12))


@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1))
def test_go2_fk_and_jacobian_match_mujoco(legs, go2_mj, seed):
    model, data = go2_mj
    rng = np.random.default_rng(seed)
    q = _go2_random_q(rng, 4, model)
    feet, J = legs.foot_jacobians(torch.from_numpy(q))
    sites = go2.foot_site_ids(model)
    for b in range(q.shape[0]):
        data.qpos[:] = 0.0
        data.qpos[3] = 1.0  # base at the origin, identity orientation
        data.qpos[7:] = q[b]
        mujoco.mj_kinematics(model, data)
        mujoco.mj_comPos(model, data)
        np.testing.assert_allclose(feet[b].numpy(), data.site_xpos[sites], atol=1e-12)
        for leg, sid in enumerate(sites):
            jacp = np.zeros((3, model.nv))
            mujoco.mj_jacSite(model, data, jacp, None, sid)
            cols = slice(6 + 3 * leg, 9 + 3 * leg)
            np.testing.assert_allclose(J[b, leg].numpy(), jacp[:, cols], atol=1e-12)
            other = np.delete(jacp[:, 6:], np.s_[3 * leg : 3 * leg + 3], axis=1)
            assert np.abs(other).max() == 0.0  # a foot moves with its own leg only


@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1))
def test_arm_pose_and_jacobian_match_mujoco(arm, arm_mj, seed):
    model, data = arm_mj
    q = _random_q(arm, np.random.default_rng(seed), 3)
    J, pose = arm.jacobian(q, return_pose=True)
    sid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, K.ARM7_EE_SITE)
    for b in range(q.shape[0]):
        data.qpos[:] = q[b].numpy()
        mujoco.mj_kinematics(model, data)
        mujoco.mj_comPos(model, data)
        np.testing.assert_allclose(pose[b, :3, 3].numpy(), data.site_xpos[sid], atol=1e-12)
        np.testing.assert_allclose(
            pose[b, :3, :3].numpy(), data.site_xmat[sid].reshape(3, 3), atol=1e-12
        )
        jacp, jacr = np.zeros((3, model.nv)), np.zeros((3, model.nv))
        mujoco.mj_jacSite(model, data, jacp, jacr, sid)
        np.testing.assert_allclose(J[b].numpy(), np.vstack([jacp, jacr]), atol=1e-12)


def test_home_feet_match_derived_figures(legs, go2_mj):
    q = torch.tensor(go2.HOME_QPOS[7:])
    feet = legs.foot_positions(q)
    derived = go2.params()["derived"]["foot_centres_in_base_frame_at_home"]
    np.testing.assert_allclose(feet[0].numpy(), [derived[leg] for leg in LEGS], atol=1e-4)
    # Built from a compiled scene model (floor, camera, ...) the legs are the same.
    from_model = K.Go2LegKinematics(go2_mj[0]).foot_positions(q + 0.1)
    torch.testing.assert_close(from_model, legs.foot_positions(q + 0.1), rtol=0, atol=1e-15)


@settings(max_examples=3)
@given(seed=st.integers(0, 2**31 - 1), analytical=st.booleans())
def test_jacobian_matches_finite_differences(arm, seed, analytical):
    chain = K.arm7_chain(analytical_grad=analytical) if analytical else arm
    q = _random_q(chain, np.random.default_rng(seed), 2)
    _, Jv = chain.position_jacobian(q)
    eps = 1e-6
    for i in range(chain.n_joints):
        dq = torch.zeros_like(q)
        dq[:, i] = eps
        fd = (chain.position(q + dq) - chain.position(q - dq)) / (2 * eps)
        err = (fd - Jv[:, :, i]).abs().max().item()
        assert err < 1e-8, f"joint {i}: max |J - FD| = {err:.3g}"
    # Autograd through FK (both backward modes) agrees with finite differences too.
    qg = q[:1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(chain.position, (qg,))
    assert torch.autograd.gradcheck(lambda x: chain.jacobian(x), (qg,))


def test_analytical_and_autograd_backward_agree(arm):
    fast = K.arm7_chain(analytical_grad=True)
    q = _random_q(arm, np.random.default_rng(3), 5).requires_grad_(True)
    w = torch.randn(5, 4, 4, dtype=torch.float64)
    (g_slow,) = torch.autograd.grad((arm.forward_kinematics(q) * w).sum(), q)
    (g_fast,) = torch.autograd.grad((fast.forward_kinematics(q) * w).sum(), q)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-12)


@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1))
def test_foot_torques_equal_virtual_work(legs, go2_mj, seed):
    model, _ = go2_mj
    rng = np.random.default_rng(seed)
    q = torch.from_numpy(_go2_random_q(rng, 3, model))
    f = torch.from_numpy(rng.normal(size=(3, 4, 3)) * 50)
    tau = legs.foot_torques(q, f)  # (B, 12)
    # τ_i = ∂/∂q_i (Σ_legs fᵀ p_leg(q)): the virtual work of a fixed force.
    eps = 1e-6
    for i in range(12):
        dq = torch.zeros_like(q)
        dq[:, i] = eps
        work_p = (legs.foot_positions(q + dq) * f).sum((-1, -2))
        work_m = (legs.foot_positions(q - dq) * f).sum((-1, -2))
        fd = (work_p - work_m) / (2 * eps)
        err = (fd - tau[:, i]).abs().max().item()
        assert err < 1e-6, f"joint {i}: max |Jᵀf - d(work)/dq| = {err:.3g}"
    torch.testing.assert_close(legs.feedforward_torques(q, f.reshape(3, 12)), -tau)
    leg = K.go2_leg_chain("RL")
    torch.testing.assert_close(K.foot_torques(leg, q[:, 6:9], f[:, 2]), tau[:, 6:9])


def test_foot_torques_match_mujoco_applied_force(legs, go2_mj):
    model, data = go2_mj
    rng = np.random.default_rng(7)
    q = _go2_random_q(rng, 1, model)[0]
    f = rng.normal(size=(4, 3)) * 30
    data.qpos[:] = 0.0
    data.qpos[3] = 1.0
    data.qpos[7:] = q
    mujoco.mj_forward(model, data)
    qfrc = np.zeros(model.nv)
    for leg, sid in enumerate(go2.foot_site_ids(model)):
        mujoco.mj_applyFT(
            model, data, f[leg], np.zeros(3), data.site_xpos[sid], model.site_bodyid[sid], qfrc
        )
    tau = legs.foot_torques(torch.from_numpy(q), torch.from_numpy(f).reshape(12))
    np.testing.assert_allclose(tau[0].numpy(), qfrc[6:], atol=1e-10)


def test_feedforward_torques_match_mujoco_standing():
    """Standing on a PD hold in MuJoCo, the motors balance the measured ground reaction
    forces: −Jᵀ f_grf (f_grf rotated into the trunk frame) must match the motor torques up to
    the legs' own weight (about 2 kg per leg, neglected by the static map)."""
    model = go2.load_model()
    data = mujoco.MjData(model)
    mujoco.mj_resetDataKeyframe(model, data, 0)
    a2j, lim = go2.actuator_joint_order(model), go2.torque_limits(model)
    for _ in range(1500):
        tau = np.clip(60.0 * (go2.HOME_QPOS[7:] - data.qpos[7:]) - data.qvel[6:], -lim, lim)
        data.ctrl[:] = tau[a2j]
        mujoco.mj_step(model, data)
    feet = list(go2.foot_geom_ids(model))
    grf = np.zeros((4, 3))  # force of the floor on each foot, world frame
    for i in range(data.ncon):
        con, f6 = data.contact[i], np.zeros(6)
        mujoco.mj_contactForce(model, data, i, f6)
        f_world = con.frame.reshape(3, 3).T @ f6[:3]  # force on geom2, world frame
        if con.geom2 in feet:
            grf[feet.index(con.geom2)] += f_world
        if con.geom1 in feet:
            grf[feet.index(con.geom1)] -= f_world
    assert grf[:, 2].sum() == pytest.approx(go2.TOTAL_MASS * 9.81, rel=1e-3)
    R = np.zeros(9)
    mujoco.mju_quat2Mat(R, data.qpos[3:7])
    grf_body = grf @ R.reshape(3, 3)  # Rᵀ f for each foot
    ff = (
        K.Go2LegKinematics()
        .feedforward_torques(torch.from_numpy(data.qpos[7:].copy()), torch.from_numpy(grf_body))[0]
        .numpy()
    )
    ff_world = (
        K.Go2LegKinematics()
        .feedforward_torques(
            torch.from_numpy(data.qpos[7:].copy()),
            torch.from_numpy(grf.reshape(12)),
            body_quat=torch.from_numpy(data.qpos[3:7].copy()),
        )[0]
        .numpy()
    )
    np.testing.assert_allclose(ff_world, ff, atol=1e-12)
    assert (ff[2::3] > 4).all()  # knees flexed backwards need positive torque to stand
    np.testing.assert_allclose(ff[1::3], tau[1::3], atol=0.5)  # thighs
    np.testing.assert_allclose(ff[2::3], tau[2::3], atol=0.5)  # knees (5.9-7.1 Nm)
    np.testing.assert_allclose(ff[0::3], tau[0::3], atol=1.5)  # hips: leg weight matters


def test_quat_to_matrix_matches_mujoco():
    rng = np.random.default_rng(2)
    quat = rng.normal(size=(5, 4))
    R = K.quat_to_matrix(torch.from_numpy(quat * 3.0))  # scale does not matter
    for b in range(5):
        ref = np.zeros(9)
        mujoco.mju_quat2Mat(ref, quat[b] / np.linalg.norm(quat[b]))
        np.testing.assert_allclose(R[b].numpy(), ref.reshape(3, 3), atol=1e-12)
    with pytest.raises(ValueError, match="body_quat"):
        K.quat_to_matrix(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="non-zero"):
        K.quat_to_matrix(torch.zeros(4))


def test_float32_and_device_paths(legs, arm):
    q64 = _random_q(arm, np.random.default_rng(0), 4)
    q32 = q64.float()
    p32, J32 = arm.position_jacobian(q32)
    p64, J64 = arm.position_jacobian(q64)
    assert p32.dtype == J32.dtype == torch.float32 and p64.dtype == torch.float64
    torch.testing.assert_close(p32, p64.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(J32, J64.float(), atol=1e-5, rtol=1e-5)
    q32.requires_grad_(True)
    arm.position(q32).sum().backward()
    assert q32.grad is not None and q32.grad.dtype == torch.float32
    qh = torch.tensor(go2.HOME_QPOS[7:], dtype=torch.float32).to("cpu")
    feet = legs.foot_positions(qh)
    assert feet.shape == (1, 4, 3) and feet.dtype == torch.float32 and feet.device == qh.device
    assert legs.jacobian(qh.repeat(2, 1)).shape == (2, 12, 12)
    cost = K.ee_goal_cost(arm, q32.detach(), torch.zeros(3), 1.0, 2)
    assert cost.C.dtype == cost.c_final.dtype == torch.float32
    cost64 = K.ee_goal_cost(arm, q64, torch.zeros(3, dtype=torch.float64), 1.0, 2)
    torch.testing.assert_close(cost.c, cost64.c.float(), atol=1e-5, rtol=1e-4)


def test_block_jacobian_maps_joint_velocities_to_foot_velocities(legs):
    q = torch.tensor(go2.HOME_QPOS[7:]).repeat(2, 1) + 0.1
    qd = torch.randn(2, 12, dtype=torch.float64)
    J = legs.jacobian(q)
    eps = 1e-6
    fd = (legs.foot_positions(q + eps * qd) - legs.foot_positions(q - eps * qd)) / (2 * eps)
    torch.testing.assert_close(
        torch.einsum("bij,bj->bi", J, qd), fd.reshape(2, 12), atol=1e-8, rtol=1e-7
    )


def test_bad_inputs_raise(legs, arm):
    with pytest.raises(ValueError, match=r"q must have shape \(B, 7\)"):
        arm.position(torch.zeros(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="q must be a floating-point"):
        arm.position(torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        arm.position(torch.full((1, 7), float("nan")))
    with pytest.raises(ValueError, match=r"q must have shape \(B, 12\)"):
        legs.foot_positions(torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="f must have shape"):
        legs.foot_torques(torch.zeros(2, 12), torch.zeros(2, 9))
    with pytest.raises(ValueError, match="f must have shape"):
        legs.foot_torques(torch.zeros(2, 12), torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="goal must have shape"):
        arm.ee_residual(torch.zeros(1, 7), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="leg"):
        K.go2_leg_chain("XX")
    with pytest.raises(ValueError, match="end_frame"):
        K.KinematicChain(K.ARM7_XML, "nope")
    with pytest.raises(ValueError, match="root_body"):
        K.KinematicChain(K.ARM7_XML, "ee", root_body="nope")
    with pytest.raises(ValueError, match="mjcf"):
        K.KinematicChain("not xml", "ee")
    free = go2.model_xml(scene=False)
    with pytest.raises(ValueError, match="hinge/slide"):
        K.KinematicChain(free, "FL_foot")  # rooted at the world, the free joint is in the way
    q = torch.zeros(7, dtype=torch.float64)
    for kwargs, match in [
        (dict(horizon=0), "horizon"),
        (dict(horizon=3, ctrl_weight=0.0), "ctrl_weight"),
        (dict(horizon=3, weight=-1.0), "weight"),
        (dict(horizon=3, n_state=5), "n_state"),
        (dict(horizon=3, q_lin=torch.zeros(2, 3, 7)), r"q_lin must have shape \(B, 4, 7\)"),
    ]:
        args = dict(chain=arm, q_lin=q, goal=torch.zeros(3), weight=1.0)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            K.ee_goal_cost(**args)


def _true_cost(chain, x, goal, w, w_f, rho, u, k):
    r = chain.position(x.reshape(-1, x.shape[-1])[:, :k]).reshape(*x.shape[:2], 3) - goal
    stage = 0.5 * w * (r[:, :-1] ** 2).sum((-1, -2)) + 0.5 * rho * (u**2).sum((-1, -2))
    return stage + 0.5 * w_f * (r[:, -1] ** 2).sum(-1)


@settings(max_examples=3)
@given(seed=st.integers(0, 2**31 - 1))
def test_ee_goal_cost_matches_true_gradient_and_gauss_newton_hessian(arm, seed):
    rng = np.random.default_rng(seed)
    B, T, k, n, m = 2, 3, 7, 10, 4  # state = [q (7); 3 extra entries], control (4)
    q_lin = _random_q(arm, rng, B * (T + 1)).reshape(B, T + 1, k)
    goal = torch.from_numpy(rng.normal(size=(B, 3)) * 0.3)
    w = torch.tensor([2.0, 0.5], dtype=torch.float64)
    cost = K.ee_goal_cost(
        arm, q_lin, goal, w, T, n_state=n, n_ctrl=m, ctrl_weight=0.1, terminal_weight=3.0
    )
    assert isinstance(cost, QuadraticCost)
    assert cost.C.shape == (B, T, n + m, n + m) and cost.c_final.shape == (B, n)
    cost.check_control_pd(n, m)
    x = torch.cat([q_lin, torch.from_numpy(rng.normal(size=(B, T + 1, n - k)))], -1)
    u = torch.from_numpy(rng.normal(size=(B, T, m)))
    x.requires_grad_(True)
    u.requires_grad_(True)
    gx, gu = torch.autograd.grad(cost.evaluate(x, u).sum(), (x, u))
    tx, tu = torch.autograd.grad(_true_cost(arm, x, goal[:, None], w, 3.0, 0.1, u, k).sum(), (x, u))
    torch.testing.assert_close(gx, tx, rtol=1e-9, atol=1e-11)  # exact gradient at q_lin
    torch.testing.assert_close(gu, tu, rtol=1e-9, atol=1e-11)
    assert gx[..., k:].abs().max() == 0.0  # extra state entries carry no cost
    _, Jv = arm.position_jacobian(q_lin[:, 1])
    GN = w[:, None, None] * Jv.transpose(-1, -2) @ Jv
    torch.testing.assert_close(cost.C[:, 1, :k, :k], GN)


def test_ee_goal_cost_gauss_newton_solves_ik(arm):
    rng = np.random.default_rng(11)
    q_goal = _random_q(arm, rng, 3)
    goal = arm.position(q_goal)
    q = torch.tensor(K.ARM7_HOME, dtype=torch.float64).repeat(3, 1)
    lam = 1e-3
    for _ in range(30):
        cost = K.ee_goal_cost(arm, q, goal, 1.0, horizon=1)
        # Terminal model ½qᵀC_f q + c_fᵀq: damped Gauss-Newton step to its minimizer.
        H = cost.C_final + lam * torch.eye(7, dtype=torch.float64)
        step = -torch.linalg.solve(H, (cost.C_final @ q[..., None])[..., 0] + cost.c_final)
        q = q + step
    err = arm.ee_residual(q, goal).norm(dim=-1)
    assert err.max() < 1e-8, err


def test_ee_goal_cost_gradcheck_in_goal_weight_and_linearization(arm):
    q_lin = _random_q(arm, np.random.default_rng(5), 2).requires_grad_(True)
    goal = torch.tensor([0.4, 0.1, 0.5], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.5, 0.7], dtype=torch.float64, requires_grad=True)

    def f(q_lin, goal, w):
        cost = K.ee_goal_cost(arm, q_lin, goal, w, 2, n_ctrl=2)
        return cost.C, cost.c, cost.C_final, cost.c_final

    assert torch.autograd.gradcheck(f, (q_lin, goal, w), fast_mode=True)


def test_ee_residual_in_theseus_ik_with_implicit_gradient():
    th = pytest.importorskip("theseus")
    leg = K.go2_leg_chain("FL")
    q_star = torch.tensor([[0.1, 0.8, -1.6], [-0.2, 1.0, -1.9]], dtype=torch.float64)
    goal_t = leg.position(q_star).detach().clone().requires_grad_(True)
    q_var = th.Vector(3, name="q", dtype=torch.float64)
    goal_var = th.Variable(goal_t.detach().clone(), name="goal")
    objective = th.Objective(dtype=torch.float64)
    objective.add(K.theseus_ee_cost(leg, q_var, goal_var))
    optimizer = th.GaussNewton(objective, max_iterations=50, step_size=1.0)
    layer = th.TheseusLayer(optimizer)
    q0 = torch.tensor(go2.HOME_QPOS[7:10], dtype=torch.float64).repeat(2, 1)
    sol, info = layer.forward(
        {"q": q0, "goal": goal_t},
        optimizer_kwargs={"backward_mode": "implicit", "track_best_solution": True},
    )
    q = sol["q"]
    torch.testing.assert_close(leg.position(q), goal_t.detach(), atol=1e-8, rtol=0)
    # At a solution of p(q) = g for a 3-joint leg, dq/dg = J(q)^-1.
    grads = torch.stack(
        [torch.autograd.grad(q[:, i].sum(), goal_t, retain_graph=True)[0] for i in range(3)], 1
    )  # (B, 3 joints, 3 goal coords)
    _, Jv = leg.position_jacobian(q.detach())
    torch.testing.assert_close(grads, torch.linalg.inv(Jv), atol=1e-6, rtol=1e-5)
