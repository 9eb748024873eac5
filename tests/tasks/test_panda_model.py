"""The Panda model built from Menagerie's numbers: physics arrays, statics at home, options,
and the pytorch-kinematics chain against MuJoCo's own kinematics."""

from __future__ import annotations

import json
from pathlib import Path

import mujoco
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffto.tasks.panda import kinematics as pk_panda
from diffto.tasks.panda import model as panda

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
HOME_FLANGE = np.array([0.5545, 0.0, 0.6245])  # m, Menagerie's model at the home keyframe
HOME_GRAVITY = np.array([0.0, -25.2, 0.0, 18.5, 0.74, 1.65, 0.0])  # Nm, measured there


@pytest.fixture(scope="module")
def model():
    return panda.load_model()


def _at(model, qpos, qvel=None, ctrl=None):
    data = mujoco.MjData(model)
    data.qpos[:] = qpos
    if qvel is not None:
        data.qvel[:] = qvel
    if ctrl is not None:
        data.ctrl[:] = ctrl
    mujoco.mj_forward(model, data)
    return data


def test_shipped_files_are_the_shared_ones():
    if not SHARED.exists():
        pytest.skip("shared/data not beside the checkout")
    with open(SHARED / "panda_params.json") as fh:
        assert json.load(fh) == panda.params()
    notice = Path(panda.__file__).with_name("NOTICE").read_text()
    assert notice == (SHARED / "panda_NOTICE.txt").read_text()


def test_dimensions_options_and_radians(model):
    assert (model.nq, model.nv, model.nu) == (7, 7, 7)
    assert model.opt.timestep == 0.002
    assert model.opt.integrator == mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    assert model.opt.impratio == 10
    # Radians: the ranges are the JSON numbers, not those numbers read as degrees.
    ranges = np.array([b["joint"]["range"] for b in panda.params()["bodies"] if b["joint"]])
    np.testing.assert_array_equal(model.jnt_range, ranges)
    np.testing.assert_array_equal(model.jnt_range[:, 0], panda.JOINT_LOWER)
    assert model.jnt_limited.all()
    np.testing.assert_array_equal(model.dof_armature, 0.1)
    np.testing.assert_array_equal(model.dof_damping, 1.0)
    np.testing.assert_array_equal(model.dof_frictionloss, 0.0)
    np.testing.assert_array_equal(model.jnt_axis, np.tile([0.0, 0.0, 1.0], (7, 1)))
    assert panda.load_model(0.001).opt.timestep == 0.001


def test_inertials_match_params(model):
    for b in panda.params()["bodies"]:
        i = model.body(b["name"]).id
        assert model.body(model.body_parentid[i]).name == b["parent"]
        ine = b["inertial"]
        assert model.body_mass[i] == pytest.approx(ine["mass"], abs=1e-12)
        np.testing.assert_allclose(model.body_ipos[i], ine["pos"], atol=1e-12)
        # MuJoCo diagonalizes fullinertia (iterative 3x3 eigensolver, accurate to ~1e-6
        # relative): R diag(I) Rᵀ must give the matrix back.
        xx, yy, zz, xy, xz, yz = ine["fullinertia"]
        full = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        R = np.empty(9)
        mujoco.mju_quat2Mat(R, model.body_iquat[i])
        R = R.reshape(3, 3)
        np.testing.assert_allclose(R @ np.diag(model.body_inertia[i]) @ R.T, full, atol=1e-6)
    links = [model.body(f"link{k}").id for k in range(1, 8)]
    assert model.body_mass[links].sum() == pytest.approx(16.062, abs=1e-3)
    assert panda.ARM_MASS == pytest.approx(16.062, abs=1e-3)


def test_home_flange_and_gravity_torques(model):
    np.testing.assert_array_equal(model.key("home").qpos, panda.HOME)
    data = _at(model, panda.HOME)
    np.testing.assert_allclose(data.site(panda.FLANGE_SITE).xpos, HOME_FLANGE, atol=1e-3)
    # At rest qfrc_bias is the gravity torque (no Coriolis term).
    np.testing.assert_allclose(data.qfrc_bias, HOME_GRAVITY, atol=0.1)
    assert (np.abs(data.qfrc_bias) < 0.5 * panda.TORQUE_LIMITS).all()


def test_torque_motors_at_published_limits(model):
    limits = np.array([87.0] * 4 + [12.0] * 3)
    np.testing.assert_array_equal(panda.TORQUE_LIMITS, limits)
    np.testing.assert_array_equal(model.actuator_ctrlrange, np.stack([-limits, limits], 1))
    np.testing.assert_array_equal(model.actuator_forcerange, np.stack([-limits, limits], 1))
    np.testing.assert_array_equal(model.actuator_gear[:, 0], 1.0)
    assert (model.actuator_biastype == mujoco.mjtBias.mjBIAS_NONE).all()
    assert (model.actuator_trnid[:, 0] == np.arange(7)).all()
    # ctrl is the joint torque: actuator force equals ctrl inside the limits, clamps outside.
    ctrl = np.array([10.0, -20.0, 5.0, -1.0, 2.0, -3.0, 4.0])
    np.testing.assert_allclose(_at(model, panda.HOME, ctrl=ctrl).qfrc_actuator, ctrl)
    np.testing.assert_allclose(_at(model, panda.HOME, ctrl=2 * limits).qfrc_actuator, limits)


def test_no_contacts(model):
    assert (model.geom_contype == 0).all() and (model.geom_conaffinity == 0).all()
    data = _at(model, panda.HOME + 0.3)
    assert data.ncon == 0


def test_gravity_compensation_and_payload():
    comp = panda.load_model(gravity_compensation=True)
    data = _at(comp, panda.HOME)
    np.testing.assert_allclose(data.qfrc_passive, data.qfrc_bias, atol=1e-12)
    np.testing.assert_allclose(data.qacc, 0.0, atol=1e-10)
    # The payload is the load gravity compensation does not know: it makes the arm sag.
    heavy = panda.load_model(gravity_compensation=True, payload_mass=1.5)
    sag = _at(heavy, panda.HOME).qacc
    assert np.abs(sag).max() > 0.1
    # set_payload on a compiled model gives the same dynamics as building with the payload.
    panda.set_payload(comp, 1.5)
    np.testing.assert_allclose(_at(comp, panda.HOME).qacc, sag, atol=1e-10)
    assert comp.body_subtreemass[comp.body("link7").id] == pytest.approx(0.735522 + 1.5)
    panda.set_payload(comp, 0.0)
    np.testing.assert_allclose(_at(comp, panda.HOME).qacc, 0.0, atol=1e-10)
    # A payload adds its weight to the static torques: joint 2 at home carries m g x.
    plain = _at(panda.load_model(payload_mass=1.0), panda.HOME)
    extra = plain.qfrc_bias[1] - HOME_GRAVITY[1]
    assert extra == pytest.approx(-9.81 * HOME_FLANGE[0], abs=0.2)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"timestep": 0.0}, "timestep"),
        ({"timestep": float("nan")}, "timestep"),
        ({"timestep": True}, "timestep"),
        ({"payload_mass": -1.0}, "payload_mass"),
        ({"payload_mass": "1"}, "payload_mass"),
        ({"gravity_compensation": 1}, "gravity_compensation"),
    ],
)
def test_bad_model_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        panda.model_xml(**kwargs)


def test_set_payload_checks():
    with pytest.raises(ValueError, match="mass"):
        panda.set_payload(panda.load_model(), -0.1)
    other = mujoco.MjModel.from_xml_string("<mujoco><worldbody/></mujoco>")
    with pytest.raises(ValueError, match="payload"):
        panda.set_payload(other, 0.1)


def test_scene_is_optional():
    bare = panda.load_model(scene=False)
    assert mujoco.mj_name2id(bare, mujoco.mjtObj.mjOBJ_CAMERA, "overview") < 0
    full = panda.load_model()
    assert full.camera("overview").id >= 0
    np.testing.assert_array_equal(bare.body_mass, full.body_mass)


def test_constants_are_read_only():
    with pytest.raises(ValueError):
        panda.HOME[0] = 1.0
    with pytest.raises(ValueError):
        panda.TORQUE_LIMITS[0] = 1.0


# ----------------------------------------------------------------------------- kinematics
@pytest.fixture(scope="module")
def chain_and_model():
    # A model with payload and gravity compensation: neither changes the kinematics.
    m = panda.load_model(gravity_compensation=True, payload_mass=0.8)
    return pk_panda.panda_chain(m), pk_panda.panda_chain(), m


unit7 = st.lists(st.floats(0.0, 1.0), min_size=7, max_size=7)


@given(u=st.lists(unit7, min_size=1, max_size=4))
def test_chain_fk_matches_mujoco_site(chain_and_model, u):
    chain, default_chain, m = chain_and_model
    q = panda.JOINT_LOWER + np.asarray(u) * (panda.JOINT_UPPER - panda.JOINT_LOWER)  # (B, 7)
    T = chain.forward_kinematics(torch.tensor(q, dtype=torch.float64)).numpy()
    T_default = default_chain.forward_kinematics(torch.tensor(q, dtype=torch.float64)).numpy()
    data = mujoco.MjData(m)
    jacp, jacr = np.empty((3, 7)), np.empty((3, 7))
    J = chain.jacobian(torch.tensor(q, dtype=torch.float64)).numpy()
    sid = m.site(panda.FLANGE_SITE).id
    for b, qb in enumerate(q):
        data.qpos[:] = qb
        mujoco.mj_kinematics(m, data)
        mujoco.mj_comPos(m, data)
        mujoco.mj_jacSite(m, data, jacp, jacr, sid)
        err_p = np.abs(T[b, :3, 3] - data.site_xpos[sid]).max()
        err_R = np.abs(T[b, :3, :3] - data.site_xmat[sid].reshape(3, 3)).max()
        assert err_p < 1e-10 and err_R < 1e-10, (err_p, err_R)
        np.testing.assert_allclose(T_default[b], T[b], atol=1e-12)
        np.testing.assert_allclose(J[b], np.vstack([jacp, jacr]), atol=1e-10)


def test_chain_home_limits_and_flange_position():
    chain = pk_panda.panda_chain()
    assert chain.joint_names == panda.JOINT_NAMES
    np.testing.assert_array_equal(chain.lower.numpy(), panda.JOINT_LOWER)
    np.testing.assert_array_equal(chain.upper.numpy(), panda.JOINT_UPPER)
    x = torch.cat([torch.tensor(panda.HOME), torch.zeros(7)]).repeat(2, 1)  # (2, 14)
    p = pk_panda.flange_position(chain, x)
    np.testing.assert_allclose(p.numpy(), np.tile(HOME_FLANGE, (2, 1)), atol=1e-3)
    with pytest.raises(ValueError, match="qpos"):
        pk_panda.flange_position(chain, torch.zeros(2, 5, dtype=torch.float64))


def test_chain_rejects_other_models():
    arm = mujoco.MjModel.from_xml_string(
        '<mujoco><worldbody><body name="b"><joint name="j" axis="0 0 1"/>'
        '<inertial pos="0 0 0" mass="1" diaginertia="1 1 1"/>'
        '<site name="attachment_site"/></body></worldbody></mujoco>'
    )
    with pytest.raises(ValueError, match="Panda"):
        pk_panda.panda_chain(arm)
