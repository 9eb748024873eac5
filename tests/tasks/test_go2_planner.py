"""The Go2 single-rigid-body reference planner: physics of its output, MuJoCo agreement, cache."""

import logging

import mujoco
import numpy as np
import pytest

from diffto.tasks.go2 import planner
from diffto.tasks.go2.feedforward import FeedforwardComputer
from diffto.tasks.go2.legs import go2_legs, rpy_to_rotation
from diffto.tasks.go2.model import foot_site_ids, load_model
from diffto.tasks.go2.planner import PlannerError, plan_reference
from diffto.tasks.go2.reference import ReferenceTrajectory

LEGS = go2_legs()
SRB = planner._srb_params()
MASS, GRAVITY = SRB["mass"], planner.GRAVITY


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("references")


@pytest.fixture(scope="module")
def trot(cache):
    return plan_reference("trot", 1.2, cache_dir=cache)


@pytest.fixture(scope="module")
def pronk(cache):
    return plan_reference("pronk", 0.8, cache_dir=cache)


def world_feet(ref):
    """Foot centres ``(N+1, 4, 3)`` in the world from the reference's joint angles (FK)."""
    rot = rpy_to_rotation(ref.body_euler)
    return (
        np.einsum("kij,kfj->kfi", rot, LEGS.foot_positions(ref.joint_pos)) + ref.body_pos[:, None]
    )


def com_state(ref):
    """CoM position and velocity ``(N+1, 3)`` from the base-origin states."""
    rot = rpy_to_rotation(ref.body_euler)
    pos = ref.body_pos + rot @ SRB["com"]
    vel = ref.body_vel + np.einsum("kij,kj->ki", rot, np.cross(ref.body_ang_vel, SRB["com"]))
    return pos, vel


@pytest.mark.parametrize("motion", ["trot", "pronk"])
def test_forces_respect_contact_schedule_and_friction(motion, request):
    ref = request.getfixturevalue(motion)
    f = ref.grf.reshape(-1, 4, 3)
    mu = ref.meta["options"]["mu"]
    assert np.all(f[..., 2] >= -1e-6)
    cone = np.linalg.norm(f[..., :2], axis=-1) - mu * f[..., 2]
    assert cone.max() <= 1e-6, cone.max()
    assert np.abs(f[~ref.contact]).max() == 0.0  # swing feet carry exactly no force
    assert ref.meta["ipopt_status"] == "Solve_Succeeded"


def test_friction_pyramid_binds_on_slippery_ground(tmp_path):
    ref = plan_reference("trot", 0.8, cache_dir=tmp_path, mu=0.05)
    f = ref.grf.reshape(-1, 4, 3)[ref.contact]
    per_axis = np.abs(f[:, :2]).max(axis=1) / f[:, 2]
    # inscribed pyramid |f_x|, |f_y| <= μ/√2 f_z: active, never exceeded
    assert 0.9 * 0.05 / np.sqrt(2) < per_axis.max() <= 0.05 / np.sqrt(2) + 1e-6


def test_trot_gait_and_body_motion(trot):
    f_z = trot.grf.reshape(-1, 4, 3)[..., 2]
    ratio = f_z.sum(axis=1).mean() / (MASS * GRAVITY)
    assert abs(ratio - 1.0) < 0.03, ratio
    # diagonal pairs alternate: FL with RR, FR with RL, never all four in the air
    np.testing.assert_array_equal(trot.contact[:, 0], trot.contact[:, 3])
    np.testing.assert_array_equal(trot.contact[:, 1], trot.contact[:, 2])
    assert np.all(trot.contact[:, 0] != trot.contact[:, 1])
    speed = (trot.body_pos[-1, 0] - trot.body_pos[0, 0]) / trot.duration
    assert abs(speed - 0.5) < 0.03, speed
    assert np.abs(trot.body_pos[:, 2] - 0.27).max() < 0.01
    assert np.abs(trot.body_euler).max() < 0.05


def test_turning_sideways_trot_follows_command(tmp_path):
    ref = plan_reference("trot", 0.8, cache_dir=tmp_path, yaw_rate=0.5, lateral_speed=0.1)
    assert abs(ref.body_euler[-1, 2] - 0.4) < 0.03, ref.body_euler[-1, 2]
    assert abs(ref.body_ang_vel[:, 2].mean() - 0.5) < 0.05
    # the commanded body-frame velocity (0.5, 0.1), seen in the turning body frame
    yaw = ref.body_euler[:, 2]
    v_body_x = np.cos(yaw) * ref.body_vel[:, 0] + np.sin(yaw) * ref.body_vel[:, 1]
    v_body_y = -np.sin(yaw) * ref.body_vel[:, 0] + np.cos(yaw) * ref.body_vel[:, 1]
    assert abs(v_body_x.mean() - 0.5) < 0.05 and abs(v_body_y.mean() - 0.1) < 0.03


def test_unreachable_speed_is_reported(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="diffto.tasks.go2.planner"):
        ref = plan_reference("trot", 0.8, cache_dir=tmp_path, speed=1.6)
    speed = (ref.body_pos[-1, 0] - ref.body_pos[0, 0]) / ref.duration
    assert speed < 1.45  # 0.2 s stance steps cannot cover 1.6 m/s inside the leg workspace
    assert any("instead of the commanded 1.60 m/s" in r.getMessage() for r in caplog.records)


def test_bound_alternates_front_and_rear_pairs(tmp_path):
    ref = plan_reference("bound", 0.6, cache_dir=tmp_path)
    np.testing.assert_array_equal(ref.contact[:, 0], ref.contact[:, 1])  # FL with FR
    np.testing.assert_array_equal(ref.contact[:, 2], ref.contact[:, 3])  # RL with RR
    assert np.all(ref.contact[:, 0] != ref.contact[:, 2])
    assert abs(ref.grf[:, 2::3].sum(axis=1).mean() / (MASS * GRAVITY) - 1.0) < 0.05


def test_pronk_flies_and_conserves_momentum(pronk):
    flight = ~pronk.contact.any(axis=1)
    assert flight.sum() >= 4 and np.all(pronk.contact[~flight].all(axis=1))
    pos, vel = com_state(pronk)
    # Vertical impulse balance: Σ f_z dt - m g T = m (v_z(T) - v_z(0)).
    impulse = pronk.grf[:, 2::3].sum() * pronk.dt - MASS * GRAVITY * pronk.duration
    assert abs(impulse - MASS * (vel[-1, 2] - vel[0, 2])) < 1e-6
    assert pos[:, 2].max() - pos[:, 2].min() > 0.02  # the body really goes up and down


@pytest.mark.parametrize("motion", ["trot", "pronk"])
def test_semi_implicit_euler_dynamics_hold(motion, request):
    ref = request.getfixturevalue(motion)
    pos, vel = com_state(ref)
    force = ref.grf.reshape(-1, 4, 3).sum(axis=1)
    acc = force / MASS - np.array([0, 0, GRAVITY])
    np.testing.assert_allclose(vel[1:], vel[:-1] + ref.dt * acc, atol=1e-6)
    np.testing.assert_allclose(pos[1:], pos[:-1] + ref.dt * vel[1:], atol=1e-6)
    # Rotation: ω⁺ = ω + dt I⁻¹ (Rᵀ Σ (p_i - c) × f_i - ω × I ω), rpy⁺ = rpy + dt E⁻¹ ω⁺,
    # with the feet from FK of the joint targets (so frames and IK are checked as well).
    rot = rpy_to_rotation(ref.body_euler[:-1])
    arms = world_feet(ref)[:-1] - pos[:-1, None]
    torque_world = np.cross(arms, ref.grf.reshape(-1, 4, 3)).sum(axis=1)
    w, inertia = ref.body_ang_vel, SRB["inertia"]
    torque = np.einsum("kji,kj->ki", rot, torque_world) - np.cross(w[:-1], w[:-1] @ inertia)
    np.testing.assert_allclose(
        w[1:], w[:-1] + ref.dt * np.linalg.solve(inertia, torque.T).T, atol=1e-5
    )
    roll, pitch = ref.body_euler[:-1, 0], ref.body_euler[:-1, 1]
    w1 = w[1:]
    rates = np.stack(
        [
            w1[:, 0] + np.tan(pitch) * (np.sin(roll) * w1[:, 1] + np.cos(roll) * w1[:, 2]),
            np.cos(roll) * w1[:, 1] - np.sin(roll) * w1[:, 2],
            (np.sin(roll) * w1[:, 1] + np.cos(roll) * w1[:, 2]) / np.cos(pitch),
        ],
        1,
    )
    np.testing.assert_allclose(ref.body_euler[1:], ref.body_euler[:-1] + ref.dt * rates, atol=1e-8)


@pytest.mark.parametrize("motion", ["trot", "pronk"])
def test_feet_planted_in_stance_and_above_ground_in_swing(motion, request):
    ref = request.getfixturevalue(motion)
    feet = world_feet(ref)  # from the IK joint angles: checks IK and frames too
    ground = LEGS.foot_radius - ref.meta["options"]["foot_sink"]
    assert feet[..., 2].min() > ground - 1e-6
    for leg in range(4):
        stance = np.flatnonzero(ref.contact[:, leg])
        np.testing.assert_allclose(feet[stance, leg], feet[stance + 1, leg], atol=1e-6)
        np.testing.assert_allclose(feet[stance, leg, 2], ground, atol=1e-6)
    swing_peak = feet[..., 2].max() - ground
    assert swing_peak > 0.5 * ref.meta["options"]["swing_height"]


def test_joint_targets_velocities_and_feedforward(trot):
    assert np.all(trot.joint_pos >= LEGS.joint_lower) and np.all(trot.joint_pos <= LEGS.joint_upper)
    np.testing.assert_allclose(trot.joint_vel, np.diff(trot.joint_pos, axis=0) / trot.dt)
    np.testing.assert_allclose(trot.tau_ff, FeedforwardComputer().precompute_trajectory(trot))
    assert np.abs(trot.tau_ff[:, 2::3]).max() < 45.43  # knee torque limit


def test_reference_height_matches_soft_feet_in_mujoco(trot):
    """At the planned qpos the stance foot spheres sink `foot_sink` into MuJoCo's floor."""
    model = load_model()
    data = mujoco.MjData(model)
    sites = foot_site_ids(model)
    for phase in (0, 7, 20):
        data.qpos[:] = trot.qpos(phase)
        mujoco.mj_kinematics(model, data)
        stance = trot.contact[phase]
        sink = LEGS.foot_radius - data.site_xpos[sites][stance, 2]
        np.testing.assert_allclose(sink, trot.meta["options"]["foot_sink"], atol=1e-6)


def test_cache_hit_does_not_resolve(tmp_path, monkeypatch, caplog):
    calls = []
    solve = planner._solve

    def counting_solve(*args, **kwargs):
        calls.append(args)
        return solve(*args, **kwargs)

    monkeypatch.setattr(planner, "_solve", counting_solve)
    with caplog.at_level(logging.INFO, logger="diffto.tasks.go2.planner"):
        first = plan_reference("trot_in_place", 0.4, cache_dir=tmp_path)
    assert any("IPOPT Solve_Succeeded in" in r.getMessage() for r in caplog.records)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and len(calls) == 1
    mtime = files[0].stat().st_mtime_ns
    second = plan_reference("trot_in_place", 0.4, cache_dir=tmp_path)
    assert len(calls) == 1 and files[0].stat().st_mtime_ns == mtime
    for name, value in first.arrays().items():
        np.testing.assert_array_equal(getattr(second, name), value)
    # every input is part of the key: another option, duration or dt solves again
    plan_reference("trot_in_place", 0.4, cache_dir=tmp_path, swing_height=0.05)
    plan_reference("trot_in_place", 0.44, cache_dir=tmp_path)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.npz"))) == 3
    # a corrupt cache file is re-planned, not trusted
    files[0].write_bytes(b"not an npz")
    plan_reference("trot_in_place", 0.4, cache_dir=tmp_path)
    assert len(calls) == 4
    assert isinstance(ReferenceTrajectory.load(files[0]), ReferenceTrajectory)


def test_default_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTO_CACHE", str(tmp_path / "refs"))
    assert planner.default_cache_dir() == tmp_path / "refs"
    monkeypatch.delenv("DIFFTO_CACHE")
    assert planner.default_cache_dir().parts[-3:] == (".cache", "diffto", "references")


def test_ipopt_failure_raises_with_motion_and_status(tmp_path):
    with pytest.raises(PlannerError, match=r"'pronk'.*Maximum_Iterations_Exceeded"):
        plan_reference("pronk", 0.4, cache_dir=tmp_path, max_iter=2)
    assert not list(tmp_path.glob("*.npz"))  # nothing unconverged is cached


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="motion must be one of"):
        plan_reference("moonwalk", 1.0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown planner options \['sped'\]"):
        plan_reference("trot", 1.0, cache_dir=tmp_path, sped=1.0)
    with pytest.raises(ValueError, match="duration must be a multiple of dt"):
        plan_reference("trot", 1.01, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="duty_factor must be in"):
        plan_reference("trot", 1.0, cache_dir=tmp_path, duty_factor=1.5)
    with pytest.raises(ValueError, match="gait_period must be > 0"):
        plan_reference("trot", 1.0, cache_dir=tmp_path, gait_period=0.0)
