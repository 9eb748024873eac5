"""Kinematics layer on a generic MJCF chain defined here: FK and Jacobians against MuJoCo and
finite differences, first and second derivatives, the root-body frame, dtypes and errors."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffto.layers import kinematics as K

# Four joints of every supported kind and orientation: a hinge about z, a hinge about y in a
# rotated body, a slide, a hinge about a skewed axis; the tool site is offset and rotated.
_ARM_BODIES = """
    <body name="link1" pos="0 0 0.1">
      <joint name="j1" axis="0 0 1" range="-2.5 2.5"/>
      <geom type="capsule" fromto="0 0 0 0 0 0.3" size="0.04"/>
      <body name="link2" pos="0 0 0.3" quat="0.92388 0.38268 0 0">
        <joint name="j2" axis="0 1 0" range="-1.5 1.5"/>
        <geom type="capsule" fromto="0 0 0 0.25 0 0" size="0.03"/>
        <body name="link3" pos="0.25 0 0">
          <joint name="j3" type="slide" axis="1 0 0" range="-0.1 0.2"/>
          <geom type="box" size="0.03 0.02 0.02"/>
          <body name="link4" pos="0.1 0.02 0" quat="0.5 0.5 0.5 0.5">
            <joint name="j4" axis="1 1 0" range="-2 2"/>
            <geom type="sphere" size="0.03"/>
            <site name="tool" pos="0.05 0.01 0.12" quat="0.9 0 0.3 0.1"/>
          </body>
        </body>
      </body>
    </body>"""
ARM_XML = f"""<mujoco model="arm4"><compiler angle="radian" autolimits="true"/>
  <worldbody>{_ARM_BODIES}</worldbody></mujoco>"""
# The same arm on a floating base placed away from the origin.
FLOATING_XML = f"""<mujoco model="floating_arm"><compiler angle="radian" autolimits="true"/>
  <worldbody><body name="base" pos="0.3 -0.2 0.5" quat="0.8 0.2 0.4 0.1"><freejoint/>
  <geom type="box" size="0.1 0.1 0.05"/>{_ARM_BODIES}</body></worldbody></mujoco>"""


@pytest.fixture(scope="module")
def arm():
    return K.KinematicChain(ARM_XML, "tool")


@pytest.fixture(scope="module")
def arm_mj():
    model = mujoco.MjModel.from_xml_string(ARM_XML)
    return model, mujoco.MjData(model)


def _random_q(chain: K.KinematicChain, rng: np.random.Generator, batch: int) -> torch.Tensor:
    lo, hi = chain.lower.numpy(), chain.upper.numpy()
    return torch.from_numpy(rng.uniform(lo, hi, size=(batch, chain.n_joints)))


def test_chain_reads_joints_and_limits(arm):
    assert arm.joint_names == ("j1", "j2", "j3", "j4") and arm.n_joints == 4
    f64 = torch.float64
    torch.testing.assert_close(arm.lower, torch.tensor([-2.5, -1.5, -0.1, -2.0], dtype=f64))
    torch.testing.assert_close(arm.upper, torch.tensor([2.5, 1.5, 0.2, 2.0], dtype=f64))
    assert "tool" in repr(arm)


@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1))
def test_pose_and_jacobian_match_mujoco(arm, arm_mj, seed):
    model, data = arm_mj
    q = _random_q(arm, np.random.default_rng(seed), 3)
    J, pose = arm.jacobian(q, return_pose=True)
    sid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "tool")
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


def test_root_body_frame_ignores_the_floating_base(arm):
    """Rooted at ``base`` (free joint, placed anywhere), the chain is the fixed arm's chain."""
    floating = K.KinematicChain(FLOATING_XML, "tool", root_body="base")
    assert floating.joint_names == arm.joint_names
    q = _random_q(arm, np.random.default_rng(4), 4)
    torch.testing.assert_close(floating.forward_kinematics(q), arm.forward_kinematics(q),
                               rtol=0, atol=1e-14)
    # from a compiled model too
    compiled = K.KinematicChain(mujoco.MjModel.from_xml_string(FLOATING_XML), "tool", "base")
    torch.testing.assert_close(compiled.position(q), arm.position(q), rtol=0, atol=1e-14)


@settings(max_examples=3)
@given(seed=st.integers(0, 2**31 - 1), analytical=st.booleans())
def test_jacobian_matches_finite_differences(arm, seed, analytical):
    chain = K.KinematicChain(ARM_XML, "tool", analytical_grad=True) if analytical else arm
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


def test_second_derivatives_by_plain_autograd(arm):
    """The default (plain autograd) FK is differentiable twice: what exact cost Hessians need."""
    q = _random_q(arm, np.random.default_rng(8), 2).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x: arm.forward_kinematics(x)[:, :3], (q,))


def test_analytical_and_autograd_backward_agree(arm):
    fast = K.KinematicChain(ARM_XML, "tool", analytical_grad=True)
    q = _random_q(arm, np.random.default_rng(3), 5).requires_grad_(True)
    w = torch.randn(5, 4, 4, dtype=torch.float64)
    (g_slow,) = torch.autograd.grad((arm.forward_kinematics(q) * w).sum(), q)
    (g_fast,) = torch.autograd.grad((fast.forward_kinematics(q) * w).sum(), q)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-12)


def test_jacobian_transpose_maps_forces_to_mujoco_generalized_forces(arm, arm_mj):
    """``τ = J_vᵀ f`` of a force at the tool point equals MuJoCo's ``mj_applyFT``."""
    model, data = arm_mj
    rng = np.random.default_rng(7)
    q = _random_q(arm, rng, 1)
    f = rng.normal(size=3) * 30
    data.qpos[:] = q[0].numpy()
    mujoco.mj_forward(model, data)
    sid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "tool")
    qfrc = np.zeros(model.nv)
    mujoco.mj_applyFT(model, data, f, np.zeros(3), data.site_xpos[sid], model.site_bodyid[sid],
                      qfrc)
    _, Jv = arm.position_jacobian(q)
    np.testing.assert_allclose(Jv[0].numpy().T @ f, qfrc, atol=1e-10)


def test_quat_to_matrix_matches_mujoco():
    rng = np.random.default_rng(2)
    quat = rng.normal(size=(5, 4))
    R = K.quat_to_matrix(torch.from_numpy(quat * 3.0))  # scale does not matter
    for b in range(5):
        ref = np.zeros(9)
        mujoco.mju_quat2Mat(ref, quat[b] / np.linalg.norm(quat[b]))
        np.testing.assert_allclose(R[b].numpy(), ref.reshape(3, 3), atol=1e-12)
    with pytest.raises(ValueError, match="quat"):
        K.quat_to_matrix(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="non-zero"):
        K.quat_to_matrix(torch.zeros(4))


def test_float32_paths(arm):
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
    single = arm.position(q64[0].to("cpu"))
    assert single.shape == (1, 3) and single.device == q64.device


def test_bad_inputs_raise(arm):
    with pytest.raises(ValueError, match=r"q must have shape \(B, 4\)"):
        arm.position(torch.zeros(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="q must be a floating-point"):
        arm.position(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        arm.position(torch.full((1, 4), float("nan")))
    with pytest.raises(ValueError, match="end_frame"):
        K.KinematicChain(ARM_XML, "nope")
    with pytest.raises(ValueError, match="root_body"):
        K.KinematicChain(ARM_XML, "tool", root_body="nope")
    with pytest.raises(ValueError, match="mjcf"):
        K.KinematicChain("not xml", "tool")
    with pytest.raises(ValueError, match="mjcf"):
        K.KinematicChain(3, "tool")
    with pytest.raises(ValueError, match="hinge/slide"):
        K.KinematicChain(FLOATING_XML, "tool")  # rooted at the world, the free joint is in the way
