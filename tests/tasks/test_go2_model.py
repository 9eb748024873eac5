"""The embedded Go2 model: physics arrays equal Menagerie's numbers, helpers, standing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mujoco
import numpy as np
import pytest

from diffto.tasks.go2 import model as go2

SHARED_PARAMS = Path(__file__).resolve().parents[3] / "shared" / "data" / "go2_params.json"


@pytest.fixture(scope="module")
def p():
    with open(go2.PARAMS_PATH) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def model():
    return go2.load_model(meshes=False)


def _quat_close(a, b, atol=1e-6):
    a, b = np.asarray(a) / np.linalg.norm(a), np.asarray(b) / np.linalg.norm(b)
    return min(np.abs(a - b).max(), np.abs(a + b).max()) < atol


def test_shipped_params_are_the_shared_numbers(p):
    if not SHARED_PARAMS.exists():
        pytest.skip("shared/data not beside the checkout")
    with open(SHARED_PARAMS) as fh:
        assert json.load(fh) == p


def test_dimensions_and_options(model, p):
    assert (model.nq, model.nv, model.nu) == (19, 18, 12)
    assert model.opt.timestep == 0.001
    assert model.opt.cone == mujoco.mjtCone.mjCONE_ELLIPTIC
    assert model.opt.impratio == p["option"]["impratio"]
    assert model.opt.integrator == mujoco.mjtIntegrator.mjINT_EULER
    assert model.opt.iterations == p["option"]["iterations"]
    assert model.opt.ls_iterations == p["option"]["ls_iterations"]
    np.testing.assert_array_equal(model.opt.gravity, p["option"]["gravity"])
    assert go2.load_model(timestep=0.002).opt.timestep == 0.002


def test_bodies_match_params(model, p):
    for b in p["bodies"]:
        i = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, b["name"])
        assert i >= 0, b["name"]
        assert model.body(model.body_parentid[i]).name == b["parent"]
        np.testing.assert_allclose(model.body_pos[i], b["pos"], atol=1e-12)
        assert _quat_close(model.body_quat[i], b["quat"])
        ine = b["inertial"]
        assert model.body_mass[i] == pytest.approx(ine["mass"], abs=1e-12)
        np.testing.assert_allclose(model.body_ipos[i], ine["pos"], atol=1e-12)
        np.testing.assert_allclose(model.body_inertia[i], ine["diaginertia"], rtol=1e-9)
        assert _quat_close(model.body_iquat[i], ine["quat"])
    assert model.body_mass.sum() == pytest.approx(go2.TOTAL_MASS, abs=1e-9)
    assert go2.TOTAL_MASS == pytest.approx(p["derived"]["total_mass"], abs=1e-9)


def test_joints_match_params(model, p):
    for j in p["joints"]:
        i = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, j["name"])
        assert model.body(model.jnt_bodyid[i]).name == j["body"]
        np.testing.assert_allclose(model.jnt_axis[i], j["axis"], atol=1e-12)
        np.testing.assert_allclose(model.jnt_range[i], j["range"], atol=1e-12)
        assert model.jnt_limited[i]
        dof = model.jnt_dofadr[i]
        assert model.dof_damping[dof] == j["damping"]
        assert model.dof_armature[dof] == j["armature"]
        assert model.dof_frictionloss[dof] == j["frictionloss"]


def test_collision_geoms_match_params(model, p):
    colliding = np.flatnonzero((model.geom_contype | model.geom_conaffinity) > 0)
    floor = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, "floor")
    robot = [g for g in colliding if g != floor]
    assert len(robot) == len(p["collision_geoms"]) == 23
    for gid, g in zip(robot, p["collision_geoms"], strict=True):
        assert model.body(model.geom_bodyid[gid]).name == g["body"]
        assert mujoco.mjtGeom(model.geom_type[gid]).name.lower() == f"mjgeom_{g['type']}"
        size = np.atleast_1d(g["size"])
        np.testing.assert_allclose(model.geom_size[gid, : len(size)], size, atol=1e-12)
        np.testing.assert_allclose(model.geom_pos[gid], g["pos"], atol=1e-12)
        assert _quat_close(model.geom_quat[gid], g["quat"])
        fr = np.atleast_1d(g["friction"])
        np.testing.assert_allclose(model.geom_friction[gid, : len(fr)], fr, atol=1e-12)
        si = np.atleast_1d(g["solimp"])
        np.testing.assert_allclose(model.geom_solimp[gid, : len(si)], si, atol=1e-12)
        np.testing.assert_allclose(model.geom_solref[gid], g["solref"], atol=1e-12)
        assert model.geom_condim[gid] == g["condim"]
        assert model.geom_priority[gid] == g["priority"]
        assert model.geom_margin[gid] == pytest.approx(g["margin"])
    # Visual geoms must not collide and must not change any mass.
    visual = np.flatnonzero(model.geom_group == 2)
    assert len(visual) > 10 and (model.geom_contype[visual] == 0).all()
    assert (model.geom_conaffinity[visual] == 0).all()
    f = p["scene"]["floor"]
    np.testing.assert_allclose(model.geom_friction[floor], f["friction"])
    assert model.geom_condim[floor] == f["condim"]


def test_actuators_keyframe_and_constants(model, p):
    names = [model.actuator(i).name for i in range(model.nu)]
    assert names == p["derived"]["actuator_order"]
    for i, a in enumerate(p["actuators"]):
        np.testing.assert_allclose(model.actuator_ctrlrange[i], a["ctrlrange"])
        assert model.actuator_gear[i, 0] == a["gear"]
    qpos_names = [
        model.joint(j).name for j in np.argsort(model.jnt_qposadr) if model.jnt_type[j] != 0
    ]
    assert tuple(qpos_names) == go2.JOINT_NAMES
    key = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_KEY, "home")
    np.testing.assert_array_equal(model.key_qpos[key], go2.HOME_QPOS)
    np.testing.assert_array_equal(model.key_ctrl[key], p["keyframe_home"]["ctrl"])
    assert go2.HOME_QPOS.shape == (19,)
    with pytest.raises(ValueError):
        go2.HOME_QPOS[0] = 1.0  # read-only constant


def test_actuator_joint_order_uses_trnid(model):
    a2j = go2.actuator_joint_order(model)
    expect = [go2.JOINT_NAMES.index(model.actuator(i).name + "_joint") for i in range(model.nu)]
    np.testing.assert_array_equal(a2j, expect)
    np.testing.assert_array_equal(a2j + 7, [10, 11, 12, 7, 8, 9, 16, 17, 18, 13, 14, 15])
    # Shuffle the actuator lines: the map must follow, since it reads actuator_trnid.
    xml = go2.model_xml()
    motors = re.findall(r"    <motor .*?/>\n", xml)
    rng = np.random.default_rng(0)
    shuffled = [motors[i] for i in rng.permutation(len(motors))]
    block = "".join(motors)
    m2 = mujoco.MjModel.from_xml_string(xml.replace(block, "".join(shuffled)))
    a2j2 = go2.actuator_joint_order(m2)
    for i in range(m2.nu):
        assert go2.JOINT_NAMES[a2j2[i]] == m2.actuator(i).name + "_joint"
    assert not np.array_equal(a2j2, a2j)
    lim = go2.torque_limits(m2)
    np.testing.assert_allclose(lim, go2.torque_limits(model))
    np.testing.assert_allclose(lim, [23.7, 23.7, 45.43] * 4)


def test_feet_geoms_and_sites(model):
    gid, sid = go2.foot_geom_ids(model), go2.foot_site_ids(model)
    assert [model.geom(g).name for g in gid] == list(go2.FOOT_NAMES)
    assert np.allclose(model.geom_size[gid, 0], 0.022)
    data = mujoco.MjData(model)
    mujoco.mj_resetDataKeyframe(model, data, 0)
    data.qpos[7:] += np.random.default_rng(1).uniform(-0.3, 0.3, 12)
    mujoco.mj_kinematics(model, data)
    np.testing.assert_allclose(data.site_xpos[sid], data.geom_xpos[gid], atol=1e-12)


def test_track_camera_frames_the_trunk(model):
    cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "track")
    assert cam >= 0 and model.cam_mode[cam] == mujoco.mjtCamLight.mjCAMLIGHT_TRACKCOM
    data = mujoco.MjData(model)
    mujoco.mj_resetDataKeyframe(model, data, 0)
    for shift in ([0, 0, 0], [3.0, -2.0, 0.0]):  # the camera follows the robot
        data.qpos[:3] = go2.HOME_QPOS[:3] + shift
        mujoco.mj_forward(model, data)
        to_base = data.xpos[1] - data.cam_xpos[cam]
        in_cam = data.cam_xmat[cam].reshape(3, 3).T @ to_base  # camera looks along its -z
        assert in_cam[2] < -0.5
        half_fov = np.radians(model.cam_fovy[cam] / 2)
        assert np.hypot(in_cam[0], in_cam[1]) < np.tan(half_fov) * -in_cam[2] * 0.5
    assert model.nlight >= 1


def test_pd_hold_stands_from_home():
    model = go2.load_model(timestep=0.001)
    data = mujoco.MjData(model)
    mujoco.mj_resetDataKeyframe(model, data, 0)
    a2j, lim = go2.actuator_joint_order(model), go2.torque_limits(model)
    q_ref = go2.HOME_QPOS[7:]
    z_min = np.inf
    for _ in range(2000):  # 2 s at 1 kHz, Kp 60, Kd 1
        tau = np.clip(60.0 * (q_ref - data.qpos[7:]) - 1.0 * data.qvel[6:], -lim, lim)
        data.ctrl[:] = tau[a2j]
        mujoco.mj_step(model, data)
        z_min = min(z_min, data.qpos[2])
    w, x, y, _ = data.qpos[3:7]
    tilt = np.degrees(np.arccos(np.clip(1 - 2 * (x * x + y * y), -1, 1)))
    assert z_min > 0.22
    assert 0.24 < data.qpos[2] < 0.26  # measured 0.2511 for Menagerie's model
    assert tilt < 2.0
    assert np.abs(data.qvel).max() < 0.05  # settled
    assert np.isclose(w * w + x * x + y * y + data.qpos[6] ** 2, 1.0)


def test_bad_arguments(monkeypatch):
    monkeypatch.delenv("MENAGERIE_ROOT", raising=False)
    for bad in (0.0, -1e-3, float("nan"), "1ms"):
        with pytest.raises(ValueError, match="timestep"):
            go2.load_model(timestep=bad)
    with pytest.raises(ValueError, match="MENAGERIE_ROOT"):
        go2.load_model(meshes=True)
    with pytest.raises(ValueError, match="meshes"):
        go2.load_model(meshes="yes")
    arm = mujoco.MjModel.from_xml_string(
        '<mujoco><worldbody><body><joint/><geom size="0.1"/></body></worldbody></mujoco>'
    )
    with pytest.raises(ValueError, match="Go2"):
        go2.foot_geom_ids(arm)
    with pytest.raises(ValueError, match="Go2"):
        go2.actuator_joint_order(arm)


def test_menagerie_root_is_wrapped_with_the_scene(tmp_path, monkeypatch, model):
    # A stand-in for Menagerie's go2.xml: robot only, no floor, camera or foot sites; the
    # wrapper must add the same scene, camera and sites as the embedded model has.
    robot = go2.model_xml(scene=False)
    robot = re.sub(r"\s*<camera [^>]*/>", "", robot)
    robot = re.sub(r"\s*<site name=\"\w\w_foot\"[^>]*/>", "", robot)
    assert "floor" not in robot and "track" not in robot and '<site name="FL_foot' not in robot
    (tmp_path / "unitree_go2").mkdir()
    (tmp_path / "unitree_go2" / "go2.xml").write_text(robot)
    monkeypatch.setenv("MENAGERIE_ROOT", str(tmp_path))
    m = go2.load_model(timestep=0.004)
    assert m.opt.timestep == 0.004
    assert mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "floor") >= 0
    cam, cam0 = (mujoco.mj_name2id(x, mujoco.mjtObj.mjOBJ_CAMERA, "track") for x in (m, model))
    np.testing.assert_allclose(m.cam_pos[cam], model.cam_pos[cam0], atol=1e-12)
    np.testing.assert_allclose(m.cam_quat[cam], model.cam_quat[cam0], atol=1e-9)
    assert m.cam_mode[cam] == mujoco.mjtCamLight.mjCAMLIGHT_TRACKCOM
    for name in ("body_mass", "body_inertia", "jnt_range", "actuator_ctrlrange", "dof_damping"):
        np.testing.assert_array_equal(getattr(m, name), getattr(model, name))
    sites = go2.foot_site_ids(m)
    np.testing.assert_allclose(m.site_pos[sites], model.site_pos[go2.foot_site_ids(model)])
    assert m.nlight == model.nlight
    assert go2.load_model(meshes=False).ngeom == model.ngeom
