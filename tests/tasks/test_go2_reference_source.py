"""load_reference: the one way a Go2 reference enters the env, the rollouts and the CLI."""

import re

import numpy as np
import pytest

from diffto.tasks.go2.env import Go2TrackingEnv
from diffto.tasks.go2.model import HOME_QPOS, TOTAL_MASS
from diffto.tasks.go2.planner import MOTIONS, plan_reference
from diffto.tasks.go2.reference import RAW_ARRAYS, ReferenceTrajectory
from diffto.tasks.go2.reference_source import load_reference
from diffto.tasks.go2.rollout import resolve_reference


@pytest.fixture(scope="module")
def trot(tmp_path_factory):
    """The planner's trot, 0.8 s (two gait periods)."""
    return plan_reference("trot", 0.8, cache_dir=tmp_path_factory.mktemp("refs"))


def write_folder(folder, ref, columns=36):
    """``ref`` as a user's raw files: ``state_traj`` with knot joint velocities (36 columns)."""
    folder.mkdir(parents=True)
    n = ref.num_phases
    state = np.zeros((n + 1, columns))
    state[:, :24] = np.hstack(
        [ref.body_pos, ref.body_vel, ref.body_euler, ref.body_ang_vel, ref.joint_pos]
    )
    state[:, 24:] = np.vstack([ref.joint_vel, ref.joint_vel[-1:]])[:, : columns - 24]
    arrays = dict(state_traj=state, grf_traj=ref.grf, joint_vel_traj=ref.joint_vel,
                  contact_sequence=ref.contact.T.astype(np.int8))
    for name in RAW_ARRAYS:
        np.save(folder / f"{name}.npy", arrays[name])
    return arrays


def assert_same(a, b):
    for name, value in b.arrays().items():
        np.testing.assert_allclose(getattr(a, name), value, atol=1e-12, err_msg=name)
    assert a.dt == b.dt


def test_every_form_loads_the_same_reference(trot, tmp_path):
    assert load_reference(trot) is trot
    arrays = write_folder(tmp_path / "my_motion", trot)
    np.savez(tmp_path / "raw.npz", **arrays)
    saved = trot.save(tmp_path / "saved.npz")
    for source in (tmp_path / "my_motion", str(tmp_path / "my_motion") + "/",
                   str(tmp_path / "raw.npz"), saved):
        assert_same(load_reference(source), trot)
    # the rollouts' resolver is the same function
    assert_same(resolve_reference(tmp_path / "my_motion"), trot)


def test_a_folder_is_the_envs_reference(trot, tmp_path):
    write_folder(tmp_path / "my_motion", trot)
    env = Go2TrackingEnv(reference=str(tmp_path / "my_motion"), randomize=False)
    assert env.num_phases == trot.num_phases
    assert_same(env.reference, trot)
    obs, info = env.reset(seed=0, options={"phase": 0})
    for k in range(5):  # zero residual: PD + feedforward alone follows the trot
        obs, reward, terminated, truncated, info = env.step(np.zeros(12, np.float32))
        assert info["phase"] == k + 1 and not (terminated or truncated)
        assert np.isfinite(obs).all() and reward > 0.5
    env.close()


def test_motion_names_are_planned_and_win_over_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stand").mkdir()  # a folder that happens to share a motion's name
    ref = load_reference("stand", duration=0.4, cache_dir=tmp_path / "cache")
    assert ref.meta["motion"] == "stand" and ref.num_phases == 20
    # a bare name that is not a motion but a folder here is read as the folder
    home = ReferenceTrajectory(
        body_pos=np.tile(HOME_QPOS[:3], (11, 1)), body_vel=np.zeros((11, 3)),
        body_euler=np.zeros((11, 3)), body_ang_vel=np.zeros((11, 3)),
        joint_pos=np.tile(HOME_QPOS[7:], (11, 1)), joint_vel=np.zeros((10, 12)),
        grf=np.tile([0.0, 0.0, TOTAL_MASS * 9.81 / 4], (10, 4)), contact=np.ones((10, 4), bool),
    )
    write_folder(tmp_path / "my_stand", home, columns=30)
    assert_same(load_reference("my_stand"), home)


def test_unknown_sources_name_the_accepted_forms(tmp_path):
    for source in ("not_a_motion", str(tmp_path / "nowhere.npz"), tmp_path / "no_folder"):
        with pytest.raises(ValueError) as err:
            load_reference(source)
        message = str(err.value)
        assert message.startswith(f"reference {str(source)!r} does not exist as a file or folder")
        assert f"a motion name ({', '.join(MOTIONS)})" in message
        assert "a folder holding state_traj.npy, grf_traj.npy, joint_vel_traj.npy" in message
    with pytest.raises(ValueError, match="reference must be a ReferenceTrajectory, .* got float"):
        load_reference(2.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'empty'}: missing")):
        Go2TrackingEnv(reference=str(tmp_path / "empty"))


def test_planner_options_reach_the_env_and_every_rollout_that_rebuilds_its_reference(tmp_path):
    """A faster trot in a config: the env and resolve_reference (what the rollouts, the tracking
    table and the evaluation entry point call) plan the same clip from the same env kwargs
    (duration, cache folder and planner options)."""
    kwargs = dict(reference_duration=0.8, reference_cache_dir=str(tmp_path / "cache"),
                  planner_options={"speed": 0.8})
    env = Go2TrackingEnv(reference="trot", randomize=False, **kwargs)
    fast = env.reference
    env.close()
    assert fast.meta["options"]["speed"] == 0.8 and fast.num_phases == 40
    # about 0.8 m/s on average over the clip, against the default trot's 0.5
    distance = fast.body_pos[-1, 0] - fast.body_pos[0, 0]
    assert distance / 0.8 == pytest.approx(0.8, rel=0.1)
    assert_same(resolve_reference("trot", {**kwargs, "reference": "ignored", "randomize": True}),
                fast)
    slow = resolve_reference("trot", {**kwargs, "planner_options": None})
    assert (slow.body_pos[-1, 0] - slow.body_pos[0, 0]) / 0.8 == pytest.approx(0.5, rel=0.1)
    with pytest.raises(ValueError, match=r"unknown planner options \['sped'\]"):
        resolve_reference("trot", {**kwargs, "planner_options": {"sped": 1.0}})
    with pytest.raises(ValueError, match="planner_options must be a dict .* got float"):
        Go2TrackingEnv(reference="trot", planner_options=1.0)
