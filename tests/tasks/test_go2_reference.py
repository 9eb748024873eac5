"""Go2 leg kinematics, feedforward torques and the ReferenceTrajectory container."""

import json
import re

import mujoco
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.transform import Rotation

from diffto.tasks.go2.feedforward import FeedforwardComputer
from diffto.tasks.go2.legs import (
    PARAMS_PATH,
    go2_legs,
    quat_to_rotation,
    rpy_to_quat,
    rpy_to_rotation,
)
from diffto.tasks.go2.model import (
    HOME_QPOS,
    TOTAL_MASS,
    actuator_joint_order,
    foot_geom_ids,
    foot_site_ids,
    load_model,
    torque_limits,
)
from diffto.tasks.go2.reference import RAW_ARRAYS, WEIGHT_RATIO_BOUNDS, ReferenceTrajectory

LEGS = go2_legs()

# Joint angles in the Go2's working range: knee bent, foot below the thigh axis (IK's branch).
_LOW = np.tile([-0.6, -0.2, -2.4], 4)
_HIGH = np.tile([0.6, 1.6, -0.9], 4)


def joint_angles(shape=(12,)):
    unit = arrays(np.float64, shape, elements=st.floats(0.0, 1.0))
    return unit.map(lambda u: _LOW + (_HIGH - _LOW) * u)


def random_reference(n=10, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    arrays_ = dict(
        body_pos=rng.normal(size=(n + 1, 3)),
        body_vel=rng.normal(size=(n + 1, 3)),
        body_euler=0.3 * rng.normal(size=(n + 1, 3)),
        body_ang_vel=rng.normal(size=(n + 1, 3)),
        joint_pos=_LOW + (_HIGH - _LOW) * rng.uniform(size=(n + 1, 12)),
        joint_vel=rng.normal(size=(n, 12)),
        grf=rng.normal(size=(n, 12)),
        contact=rng.uniform(size=(n, 4)) > 0.5,
        dt=0.02,
    )
    arrays_.update(overrides)
    return ReferenceTrajectory(**arrays_)


# ----------------------------------------------------------------------------- kinematics
def test_fk_matches_model_numbers_and_mujoco():
    home = np.tile([0.0, 0.9, -1.8], 4)
    expected = json.loads(PARAMS_PATH.read_text())["derived"]["foot_centres_in_base_frame_at_home"]
    np.testing.assert_allclose(
        LEGS.foot_positions(home), [expected[k] for k in ("FL", "FR", "RL", "RR")], atol=1e-3
    )
    # Independent check: MuJoCo's own forward kinematics with the base at the origin.
    model = load_model()
    data = mujoco.MjData(model)
    sites = foot_site_ids(model)
    rng = np.random.default_rng(1)
    for _ in range(5):
        q = _LOW + (_HIGH - _LOW) * rng.uniform(size=12)
        data.qpos[:] = np.concatenate([[0, 0, 0, 1, 0, 0, 0], q])
        mujoco.mj_kinematics(model, data)
        np.testing.assert_allclose(LEGS.foot_positions(q), data.site_xpos[sites], atol=1e-9)


@given(joint_angles((3, 12)))
def test_ik_inverts_fk(q):
    feet = LEGS.foot_positions(q)  # (3, 4, 3)
    q_back = LEGS.inverse_kinematics(feet, check_limits=False)
    assert np.abs(q_back - q).max() < 1e-9, np.abs(q_back - q).max()
    assert np.abs(LEGS.foot_positions(q_back) - feet).max() < 1e-12


@given(joint_angles())
def test_jacobian_matches_finite_differences(q):
    jac = LEGS.foot_jacobians(q)  # (4, 3, 3)
    eps = 1e-6
    for j in range(12):
        dq = np.zeros(12)
        dq[j] = eps
        column = (LEGS.foot_positions(q + dq) - LEGS.foot_positions(q - dq)) / (2 * eps)
        leg = j // 3
        err = np.abs(column[leg] - jac[leg, :, j % 3]).max()
        assert err < 1e-8, f"joint {j}: max difference {err}"
        others = np.delete(column, leg, axis=0)
        assert np.abs(others).max() == 0.0  # a joint moves only its own foot


def test_ik_rejects_unreachable_and_out_of_range_targets():
    feet = LEGS.foot_positions(np.tile([0.0, 0.9, -1.8], 4))
    far = feet.copy()
    far[2, 2] = -0.6  # RL foot 0.6 m below the base: longer than the leg
    with pytest.raises(ValueError, match=r"out of reach.*RL"):
        LEGS.inverse_kinematics(far)
    straight = LEGS.foot_positions(np.tile([0.0, 0.3, -0.3], 4))  # knee past its -0.84 limit
    with pytest.raises(ValueError, match="FL_calf"):
        LEGS.inverse_kinematics(straight)
    with pytest.raises(ValueError, match=r"foot_pos must have shape \(\.\.\., 4, 3\)"):
        LEGS.inverse_kinematics(np.zeros(12))


@given(arrays(np.float64, (5, 3), elements=st.floats(-1.2, 1.2)))
def test_rotation_conventions_match_scipy(rpy):
    expected = Rotation.from_euler("ZYX", rpy[:, ::-1]).as_matrix()
    np.testing.assert_allclose(rpy_to_rotation(rpy), expected, atol=1e-12)
    np.testing.assert_allclose(quat_to_rotation(rpy_to_quat(rpy)), expected, atol=1e-12)
    mj = np.zeros(9)
    mujoco.mju_quat2Mat(mj, rpy_to_quat(rpy[0]))
    np.testing.assert_allclose(mj.reshape(3, 3), expected[0], atol=1e-12)


# ----------------------------------------------------------------------------- feedforward
@given(
    joint_angles(),
    arrays(np.float64, 12, elements=st.floats(-100, 100)),
    arrays(np.float64, 3, elements=st.floats(-1.0, 1.0)),
)
def test_feedforward_is_negative_gradient_of_virtual_work(q, grf, rpy):
    quat = rpy_to_quat(rpy)
    tau = FeedforwardComputer().compute(q, grf, quat)
    f_base = grf.reshape(4, 3) @ rpy_to_rotation(rpy)  # rows Rᵀ f

    def work(qq):  # virtual work of the ground forces, W(q) = Σ f_baseᵀ p_foot(q)
        return float(np.sum(f_base * LEGS.foot_positions(qq)))

    eps = 1e-6
    fd = np.array([(work(q + eps * e) - work(q - eps * e)) / (2 * eps) for e in np.eye(12)])
    assert np.abs(tau + fd).max() < 1e-6 * (1 + np.abs(fd).max()), np.abs(tau + fd).max()


def test_feedforward_standing_sign_and_shapes():
    # Standing on four feet: τ = -Jᵀ f must cancel the generalized force Jᵀ f of the ground.
    q = np.tile([0.0, 0.9, -1.8], 4)
    grf = np.tile([0.0, 0.0, 37.3], 4)
    tau = FeedforwardComputer().compute(q, grf, np.array([1.0, 0, 0, 0]))
    jac = LEGS.foot_jacobians(q)
    generalized = np.einsum("fij,fi->fj", jac, grf.reshape(4, 3)).reshape(12)
    np.testing.assert_allclose(tau, -generalized)
    assert np.all(np.abs(tau[2::3]) > 5.0)  # knees carry several Nm (go2.md: 5.7–8.4 Nm)
    with pytest.raises(ValueError, match=r"grf must have shape \(12,\)"):
        FeedforwardComputer().compute(q, np.zeros(4), np.array([1.0, 0, 0, 0]))
    with pytest.raises(ValueError, match="body_quat"):
        FeedforwardComputer().compute(q, grf, np.zeros(4))


def _go2_at(q, quat=(1.0, 0.0, 0.0, 0.0)):
    model = load_model()
    data = mujoco.MjData(model)
    data.qpos[:] = np.concatenate([[0.0, 0.0, 0.0], quat, q])
    mujoco.mj_forward(model, data)
    return model, data


@given(joint_angles())
def test_jacobian_and_feedforward_match_mujoco(q):
    """Foot Jacobians equal MuJoCo's site Jacobians, and ``−τ_ff`` equals the generalized force
    MuJoCo assigns (``mj_applyFT``) to the ground forces applied at the foot centres."""
    rng = np.random.default_rng(0)
    rpy = rng.uniform(-0.4, 0.4, 3)
    model, data = _go2_at(q, rpy_to_quat(rpy))
    grf = rng.normal(size=(4, 3)) * 40  # world frame
    qfrc = np.zeros(model.nv)
    jac = LEGS.foot_jacobians(q)  # base frame
    R = rpy_to_rotation(rpy)
    for leg, sid in enumerate(foot_site_ids(model)):
        jacp = np.zeros((3, model.nv))
        mujoco.mj_jacSite(model, data, jacp, None, sid)
        # MuJoCo's columns are world-frame: R J_base for the leg's joints, zero for the others
        np.testing.assert_allclose(jacp[:, 6 + 3 * leg : 9 + 3 * leg], R @ jac[leg], atol=1e-12)
        assert np.abs(np.delete(jacp[:, 6:], np.s_[3 * leg : 3 * leg + 3], axis=1)).max() == 0
        mujoco.mj_applyFT(model, data, grf[leg], np.zeros(3), data.site_xpos[sid],
                          model.site_bodyid[sid], qfrc)
    tau = FeedforwardComputer().compute(q, grf.reshape(12), rpy_to_quat(rpy))
    np.testing.assert_allclose(-tau, qfrc[6:], atol=1e-9)


def test_feedforward_balances_measured_ground_forces_when_standing():
    """On a PD hold in MuJoCo the motors balance the measured ground forces: ``−Jᵀ Rᵀ f`` matches
    the motor torques up to the legs' own weight (about 2 kg per leg, left out by the static map).
    """
    model = load_model()
    data = mujoco.MjData(model)
    mujoco.mj_resetDataKeyframe(model, data, 0)
    a2j, lim = actuator_joint_order(model), torque_limits(model)
    for _ in range(1500):
        tau = np.clip(60.0 * (HOME_QPOS[7:] - data.qpos[7:]) - data.qvel[6:], -lim, lim)
        data.ctrl[:] = tau[a2j]
        mujoco.mj_step(model, data)
    feet = list(foot_geom_ids(model))
    grf = np.zeros((4, 3))  # force of the floor on each foot, world frame
    for i in range(data.ncon):
        con, f6 = data.contact[i], np.zeros(6)
        mujoco.mj_contactForce(model, data, i, f6)
        f_world = con.frame.reshape(3, 3).T @ f6[:3]  # force on geom2, world frame
        if con.geom2 in feet:
            grf[feet.index(con.geom2)] += f_world
        if con.geom1 in feet:
            grf[feet.index(con.geom1)] -= f_world
    assert grf[:, 2].sum() == pytest.approx(TOTAL_MASS * 9.81, rel=1e-3)
    ff = FeedforwardComputer().compute(data.qpos[7:].copy(), grf.reshape(12), data.qpos[3:7])
    assert (ff[2::3] > 4).all()  # knees flexed backwards need positive torque to stand
    np.testing.assert_allclose(ff[1::3], tau[1::3], atol=0.5)  # thighs
    np.testing.assert_allclose(ff[2::3], tau[2::3], atol=0.5)  # knees (5.9-7.1 Nm)
    np.testing.assert_allclose(ff[0::3], tau[0::3], atol=1.5)  # hips: leg weight matters


# ----------------------------------------------------------------------------- container
def test_constructor_validates_and_computes_feedforward():
    ref = random_reference()
    expected = FeedforwardComputer().precompute_trajectory(ref)
    np.testing.assert_allclose(ref.tau_ff, expected)
    assert ref.num_phases == 10 and ref.dt == 0.02
    with pytest.raises(ValueError, match=r"joint_pos must have shape \(N\+1, 12\)"):
        random_reference(joint_pos=np.zeros((10, 12)))
    grf = np.ones((10, 12))
    grf[3, 5] = np.nan
    with pytest.raises(ValueError, match="grf contains 1 NaN"):
        random_reference(grf=grf)
    with pytest.raises(ValueError, match="contact must hold only 0/1"):
        random_reference(contact=np.full((10, 4), 2))
    with pytest.raises(ValueError, match="dt must be a positive"):
        random_reference(dt=0.0)
    with pytest.raises(ValueError, match="meta must be JSON-serializable"):
        random_reference(meta={"weights": np.zeros(2)})


def test_accessors_clamp_and_assemble_mujoco_state():
    ref = random_reference(n=10)
    np.testing.assert_array_equal(ref.get_body_pos(25), ref.body_pos[10])
    np.testing.assert_array_equal(ref.get_body_pos(-3), ref.body_pos[0])
    np.testing.assert_array_equal(ref.get_joint_pos(10), ref.joint_pos[10])
    np.testing.assert_array_equal(ref.get_joint_vel(10), ref.joint_vel[9])
    np.testing.assert_array_equal(ref.get_grf(99), ref.grf[9])
    np.testing.assert_array_equal(ref.get_feedforward_torque(99), ref.tau_ff[9])
    np.testing.assert_array_equal(ref.get_contact_state(12), ref.contact[9])
    assert ref.get_contact_state(0).dtype == bool
    np.testing.assert_array_equal(ref.get_body_vel(np.int64(3)), ref.body_vel[3])
    with pytest.raises(ValueError, match="phase must be an integer, got 1.5"):
        ref.get_body_pos(1.5)
    qpos, qvel = ref.qpos(4), ref.qvel(4)
    assert qpos.shape == (19,) and qvel.shape == (18,)
    np.testing.assert_array_equal(qpos[:3], ref.body_pos[4])
    np.testing.assert_allclose(quat_to_rotation(qpos[3:7]), rpy_to_rotation(ref.body_euler[4]))
    np.testing.assert_array_equal(qpos[7:], ref.joint_pos[4])
    np.testing.assert_array_equal(
        qvel, np.concatenate([ref.body_vel[4], ref.body_ang_vel[4], ref.joint_vel[4]])
    )
    # mutating a returned value must not change the reference
    ref.get_body_pos(0)[:] = 99.0
    assert ref.body_pos[0, 0] != 99.0


def test_phase_encoding():
    ref = random_reference(n=8)
    np.testing.assert_allclose(ref.get_phase_encoding(0), [1.0, 0.0])
    np.testing.assert_allclose(ref.get_phase_encoding(2), [0.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(ref.get_phase_encoding(4), [-1.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(ref.get_phase_encoding(6), [0.0, -1.0], atol=1e-15)
    np.testing.assert_allclose(ref.get_phase_encoding(30), ref.get_phase_encoding(8))


def test_is_near_contact_transition():
    contact = np.ones((12, 4), bool)
    contact[6:9, 1] = False  # FR lifts off at interval 6, touches down at interval 9
    ref = random_reference(n=12, contact=contact)
    near = [ref.is_near_contact_transition(p, 1, 2) for p in range(12)]
    assert near == [False] * 4 + [True] * 7 + [False]
    assert not any(ref.is_near_contact_transition(p, 0, 3) for p in range(12))
    assert ref.is_near_contact_transition(7, 1, 0) is False  # inside the swing
    assert ref.is_near_contact_transition(40, 1, 3) is False  # clamped past the end
    with pytest.raises(ValueError, match="foot must be an index"):
        ref.is_near_contact_transition(0, 4, 1)
    with pytest.raises(ValueError, match="window must be >= 0"):
        ref.is_near_contact_transition(0, 0, -1)


def test_save_load_round_trip(tmp_path):
    ref = random_reference(n=7, seed=3)
    ref.meta = {"motion": "test", "value": 1.5}
    path = ref.save(tmp_path / "sub" / "ref.npz")
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temporary left over
    back = ReferenceTrajectory.load(path)
    for name, value in ref.arrays().items():
        np.testing.assert_array_equal(getattr(back, name), value, err_msg=name)
    assert back.dt == ref.dt and back.meta == ref.meta
    assert back.contact.dtype == bool
    extra = dict(np.load(path))
    extra["bogus"] = np.zeros(3)
    np.savez(tmp_path / "extra.npz", **extra)
    with pytest.raises(ValueError, match=r"extra.npz: unexpected arrays \['bogus'\]"):
        ReferenceTrajectory.load(tmp_path / "extra.npz")
    del extra["bogus"], extra["grf"]
    np.savez(tmp_path / "missing.npz", **extra)
    with pytest.raises(ValueError, match=r"missing.npz: missing arrays \['grf'\]"):
        ReferenceTrajectory.load(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- from_files
WEIGHT = TOTAL_MASS * 9.81  # N


def weighted_reference(n=9, seed=0, **overrides):
    """A random reference whose feet carry the robot's weight (m g / 4 each, ± 20%)."""
    rng = np.random.default_rng(seed + 1000)
    grf = 10.0 * rng.normal(size=(n, 12))
    grf[:, 2::3] = WEIGHT / 4 * rng.uniform(0.8, 1.2, size=(n, 4))
    return random_reference(n=n, seed=seed, **{"grf": grf, **overrides})


def raw_state(ref, columns=30, knot_joint_vel=None):
    """``state_traj`` of ``ref`` in the 30- or 36-column layout."""
    state = np.zeros((ref.num_phases + 1, columns))
    state[:, 0:3], state[:, 3:6] = ref.body_pos, ref.body_vel
    state[:, 6:9], state[:, 9:12] = ref.body_euler, ref.body_ang_vel
    state[:, 12:24] = ref.joint_pos
    if columns == 36:  # knot joint velocities: the interval ones, last repeated, unless given
        default = np.vstack([ref.joint_vel, ref.joint_vel[-1:]])
        state[:, 24:36] = default if knot_joint_vel is None else knot_joint_vel
    else:
        state[:, 24:30] = 123.0  # carried but unused
    return state


def _write_raw(folder, ref, contact=True, columns=30):
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.npy" for name in RAW_ARRAYS}
    np.save(paths["state_traj"], raw_state(ref, columns))
    np.save(paths["grf_traj"], ref.grf)
    np.save(paths["joint_vel_traj"], ref.joint_vel)
    if contact:
        np.save(paths["contact_sequence"], ref.contact.T.astype(np.int64))
    else:
        del paths["contact_sequence"]
    return paths


def assert_same_reference(back, ref):
    for name, value in ref.arrays().items():
        np.testing.assert_allclose(getattr(back, name), value, err_msg=name, atol=1e-12)
    assert back.dt == ref.dt


def test_from_files_round_trip(tmp_path):
    ref = weighted_reference(n=9, seed=5)
    paths = _write_raw(tmp_path, ref)
    back = ReferenceTrajectory.from_files(**paths, dt=0.02)
    assert_same_reference(back, ref)
    # float32 files and in-memory arrays are read too (as float64)
    np.save(paths["grf_traj"], ref.grf.astype(np.float32))
    arrays_in = {k: np.load(v) for k, v in paths.items()}
    back32 = ReferenceTrajectory.from_files(**arrays_in)
    assert back32.grf.dtype == np.float64
    np.testing.assert_allclose(back32.grf, ref.grf, rtol=1e-6)
    # Without a contact sequence, stance is f_z above the threshold.
    grf = ref.grf.copy()
    grf[:, 2::3] = np.where(ref.contact, 50.0, 0.0)
    ref2 = random_reference(n=9, seed=5, grf=grf)
    paths = _write_raw(tmp_path, ref2, contact=False)
    derived = ReferenceTrajectory.from_files(**paths)
    np.testing.assert_array_equal(derived.contact, ref.contact)


@given(
    n=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.0, 1.0, 1e3]),  # 1e3: knot velocities grossly unlike the intervals'
)
def test_36_column_state_reads_as_30_columns(n, seed, scale):
    ref = weighted_reference(n=n, seed=seed)
    knots = scale * np.random.default_rng(seed).normal(size=(n + 1, 12))
    raw = dict(grf_traj=ref.grf, joint_vel_traj=ref.joint_vel, contact_sequence=ref.contact.T)
    from30 = ReferenceTrajectory.from_files(raw_state(ref, 30), **raw)
    from36 = ReferenceTrajectory.from_files(raw_state(ref, 36, knots), **raw)
    assert_same_reference(from30, ref)
    assert_same_reference(from36, ref)  # joint velocities are joint_vel_traj's, not the knots'
    assert (from30.meta["state_columns"], from36.meta["state_columns"]) == (30, 36)


@pytest.mark.parametrize("columns", [12, 24, 29, 31, 35, 37])
def test_state_with_other_column_counts_is_rejected(tmp_path, columns):
    paths = _write_raw(tmp_path, weighted_reference(n=9))
    np.save(paths["state_traj"], np.zeros((10, columns)))
    expected = (
        rf"state_traj \(state_traj.npy\): expected shape \(N\+1, 30\) or \(N\+1, 36\) with "
        rf"N >= 1, got \(10, {columns}\); .* 24:30 unused or 24:36 joint velocities"
    )
    with pytest.raises(ValueError, match=expected):
        ReferenceTrajectory.from_files(**paths)


@given(n=st.integers(10, 40), seed=st.integers(0, 2**16))
def test_swapped_force_and_velocity_arrays_are_rejected(n, seed):
    ref = weighted_reference(n=n, seed=seed)
    state = raw_state(ref)
    # joint velocities of a fast gait, up to ±20 rad/s. Read as forces, the four calf columns
    # sum to 0 ± 23 per interval; their mean over >= 10 intervals (± 7) stays far from the
    # band's lower edge, 0.3 m·g = 45 N
    jv = np.random.default_rng(seed).uniform(-20.0, 20.0, size=(n, 12))
    ReferenceTrajectory.from_files(state, ref.grf, jv)  # the right way round loads
    with pytest.raises(ValueError, match="grf_traj and joint_vel_traj look swapped"):
        ReferenceTrajectory.from_files(state, jv, ref.grf)


def test_swap_and_weight_messages_name_the_files(tmp_path):
    ref = weighted_reference(n=20)
    paths = _write_raw(tmp_path, ref)
    swapped = {**paths, "grf_traj": paths["joint_vel_traj"], "joint_vel_traj": paths["grf_traj"]}
    with pytest.raises(ValueError) as err:
        ReferenceTrajectory.from_files(**swapped)
    message = str(err.value)
    assert "grf_traj (joint_vel_traj.npy) and joint_vel_traj (grf_traj.npy) look swapped" in message
    assert f"the Go2's weight m·g is {WEIGHT:.1f} N" in message
    # forces in units of m g, or of the feet on the ground (z down): no weight carried
    for grf in (ref.grf / WEIGHT, -ref.grf):
        np.save(paths["grf_traj"], grf)
        with pytest.raises(ValueError, match=r"grf_traj \(grf_traj.npy\) does not carry the "
                                             r"robot's weight: .* outside \[0.3, 3.0\] m·g"):
            ReferenceTrajectory.from_files(**paths)
        # the escape hatch for clips that are mostly in flight
        back = ReferenceTrajectory.from_files(**paths, check_weight=False)
        np.testing.assert_array_equal(back.grf, grf)


def test_weight_band_edges():
    lo, hi = WEIGHT_RATIO_BOUNDS
    ref = weighted_reference(n=10)
    state, jv = raw_state(ref), ref.joint_vel
    unit = np.zeros((10, 12))
    unit[:, 2::3] = WEIGHT / 4  # exactly m g in total
    for ratio, ok in ((lo * 1.01, True), (hi * 0.99, True), (lo * 0.99, False), (hi * 1.01, False)):
        if ok:
            ReferenceTrajectory.from_files(state, ratio * unit, jv)
        else:
            with pytest.raises(ValueError, match="does not carry the robot's weight"):
                ReferenceTrajectory.from_files(state, ratio * unit, jv)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The planner's trot, pronk (40% in flight) and bound, 1.2 s each (whole gait periods)."""
    from diffto.tasks.go2.planner import plan_reference

    cache = tmp_path_factory.mktemp("refs")
    return {m: plan_reference(m, 1.2, cache_dir=cache) for m in ("trot", "pronk", "bound")}


@pytest.mark.parametrize("motion", ["trot", "pronk", "bound"])
@pytest.mark.parametrize("columns", [30, 36])
def test_planned_motions_round_trip_through_raw_files(tmp_path, planned, motion, columns):
    ref = planned[motion]
    paths = _write_raw(tmp_path, ref, columns=columns)
    back = ReferenceTrajectory.from_files(**paths, dt=ref.dt)
    assert_same_reference(back, ref)
    # and as a folder, with the contacts derived from the forces
    paths["contact_sequence"].unlink()
    derived = ReferenceTrajectory.from_path(tmp_path, dt=ref.dt)
    np.testing.assert_array_equal(derived.contact, ref.contact)


@pytest.mark.parametrize(
    "target, bad, message",
    [
        ("grf_traj", np.zeros((10, 12)), r"grf_traj \(grf_traj.npy\) must have shape \(N, 12\)"),
        (
            "joint_vel_traj",
            np.zeros((9, 4, 3)),
            r"joint_vel_traj \(joint_vel_traj.npy\) must "
            r"have shape \(N, 12\)",
        ),
        (
            "contact_sequence",
            np.ones((9, 4)),
            r"contact_sequence \(contact_sequence.npy\) must "
            r"have shape \(4, N\)",
        ),
        (
            "contact_sequence",
            np.full((4, 9), 0.5),
            r"contact_sequence \(contact_sequence.npy\) "
            r"must hold only 0/1",
        ),
        (
            "joint_vel_traj",
            np.pad(np.full((1, 12), np.nan), ((0, 8), (0, 0))),
            r"joint_vel_traj \(joint_vel_traj.npy\) contains 12 NaN",
        ),
        ("grf_traj", np.array([["a"] * 12] * 9), r"grf_traj \(grf_traj.npy\) must be a numeric"),
    ],
)
def test_from_files_rejects_bad_arrays(tmp_path, target, bad, message):
    paths = _write_raw(tmp_path, weighted_reference(n=9))
    np.save(paths[target], bad)
    with pytest.raises(ValueError, match=message):
        ReferenceTrajectory.from_files(**paths)


def test_from_files_rejects_archives_and_bad_dt(tmp_path):
    paths = _write_raw(tmp_path, weighted_reference(n=9))
    np.savez(tmp_path / "state.npz", state_traj=np.zeros((10, 30)))
    with pytest.raises(ValueError, match=r"state_traj \(state.npz\): expected a single .npy"):
        ReferenceTrajectory.from_files(**{**paths, "state_traj": tmp_path / "state.npz"})
    with pytest.raises(ValueError, match="dt must be a positive"):
        ReferenceTrajectory.from_files(**paths, dt=-1.0)


# ----------------------------------------------------------------------------- from_path
def test_from_path_reads_every_file_form(tmp_path):
    ref = weighted_reference(n=9, seed=2)
    folder = tmp_path / "motion"
    paths = _write_raw(folder, ref, columns=36)
    assert_same_reference(ReferenceTrajectory.from_path(folder), ref)
    (folder / "notes.txt").write_text("other files in the folder are ignored")
    assert_same_reference(ReferenceTrajectory.from_path(folder), ref)
    # one .npz with the raw arrays under their names
    np.savez(tmp_path / "raw.npz", **{name: np.load(p) for name, p in paths.items()})
    from_npz = ReferenceTrajectory.from_path(tmp_path / "raw.npz")
    assert_same_reference(from_npz, ref)
    assert from_npz.meta["source"] == str(tmp_path / "raw.npz")
    # the save format, its own dt
    saved = random_reference(n=5, dt=0.01).save(tmp_path / "saved.npz")
    assert ReferenceTrajectory.from_path(saved, dt=0.02).dt == 0.01
    # raw arrays at another dt
    assert ReferenceTrajectory.from_path(folder, dt=0.01).dt == 0.01


def test_from_path_errors_name_the_path(tmp_path):
    ref = weighted_reference(n=9)
    folder = tmp_path / "motion"
    paths = _write_raw(folder, ref, contact=False)
    paths["joint_vel_traj"].unlink()
    where = re.escape(str(folder))
    with pytest.raises(ValueError, match=rf"{where}: missing \['joint_vel_traj.npy'\] \(the "
                                         r"folder's .npy files: \['grf_traj.npy', 'state_traj"):
        ReferenceTrajectory.from_path(folder)
    raw = {name: np.load(folder / f"{name}.npy") for name in RAW_ARRAYS[:2]}
    np.save(paths["joint_vel_traj"], ref.grf)  # the two (N, 12) files the wrong way round
    np.save(paths["grf_traj"], ref.joint_vel)
    with pytest.raises(ValueError, match=rf"{where}: grf_traj \(grf_traj.npy\) and "
                                         r"joint_vel_traj \(joint_vel_traj.npy\) look swapped"):
        ReferenceTrajectory.from_path(folder)
    np.savez(tmp_path / "partial.npz", **raw)
    with pytest.raises(ValueError, match=r"partial.npz: missing raw arrays \['joint_vel_traj'\]"):
        ReferenceTrajectory.from_path(tmp_path / "partial.npz")
    np.savez(tmp_path / "mixed.npz", **raw, joint_vel_traj=ref.joint_vel, dt=0.02)
    with pytest.raises(ValueError, match=r"mixed.npz: unexpected arrays \['dt'\] beside"):
        ReferenceTrajectory.from_path(tmp_path / "mixed.npz")
    with pytest.raises(ValueError, match=r"state_traj.npy: expected a reference .npz .* or a "
                                         "folder holding state_traj.npy"):
        ReferenceTrajectory.from_path(folder / "state_traj.npy")
    with pytest.raises(ValueError, match=r"nowhere: no such file or folder; expected"):
        ReferenceTrajectory.from_path(tmp_path / "nowhere")
