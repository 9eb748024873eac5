"""The Go2 tracking table: same episodes for every controller, figures that separate them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffto.tasks.go2 import model as go2_model
from diffto.tasks.go2.reference import ReferenceTrajectory
from diffto.tasks.go2.tracking_table import (
    TrackingRow,
    format_table,
    save_table,
    tracking_table,
    zero_residual,
)

N = 25  # a 0.5 s standing clip


@pytest.fixture(scope="module")
def stand() -> ReferenceTrajectory:
    home = go2_model.HOME_QPOS
    zeros = np.zeros((N + 1, 3))
    return ReferenceTrajectory(
        body_pos=np.tile(home[:3], (N + 1, 1)), body_vel=zeros, body_euler=zeros,
        body_ang_vel=zeros, joint_pos=np.tile(home[7:], (N + 1, 1)),
        joint_vel=np.zeros((N, 12)),
        grf=np.tile([0.0, 0.0, go2_model.TOTAL_MASS * 9.81 / 4], (N, 4)),
        contact=np.ones((N, 4), bool), dt=0.02,
    )


def crouch(obs: np.ndarray) -> np.ndarray:
    """A residual that bends every joint by the full action limit: the base sinks and tilts."""
    return np.ones(12, dtype=np.float32)


def test_table_separates_a_good_controller_from_a_bad_one(stand, tmp_path):
    rows = tracking_table({"zero": zero_residual, "crouch": crouch}, stand, seeds=3)
    zero, bad = rows
    assert [r.name for r in rows] == ["zero", "crouch"]
    assert zero.nominal_steps == N and zero.randomized_episodes == 3
    assert zero.randomized_survived == 3  # standing survives every randomized draw
    assert bad.randomized_survived < 3  # the crouch breaks the termination rules
    assert bad.nominal_position_m > zero.nominal_position_m + 0.01
    assert bad.nominal_joint_rad > 0.1 > zero.nominal_joint_rad
    assert zero.within(zero, 0.0) and not bad.within(zero, 0.1)

    text = format_table(rows)
    assert text.count("\n") == 3 and "| zero |" in text and "3 / 3" in text
    md = save_table(rows, tmp_path / "out")
    assert md.read_text() == text + "\n"
    loaded = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [TrackingRow(**r) for r in loaded] == rows
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_every_controller_meets_the_same_randomized_episodes(stand):
    """The draws depend only on the reset seed: a controller listed twice gets equal rows."""
    a, b = tracking_table({"a": zero_residual, "b": zero_residual}, stand, seeds=2)
    assert {**vars(a), "name": ""} == {**vars(b), "name": ""}


@pytest.mark.parametrize("seeds", [0, -1, 1.5, True])
def test_bad_seeds_are_named(stand, seeds):
    with pytest.raises(ValueError, match="seeds must be an int >= 1"):
        tracking_table({"zero": zero_residual}, stand, seeds=seeds)


def test_no_controllers_is_an_error(stand):
    with pytest.raises(ValueError, match="controllers must name at least one"):
        tracking_table({}, stand)


def test_a_failure_on_the_last_step_is_not_a_completed_clip(stand):
    """A policy that jumps to the full residual on the clip's last step breaks the action-rate
    rule there: every step is played, yet no randomized clip counts as completed."""

    def jump_at_the_end(obs: np.ndarray) -> np.ndarray:
        phase = round(np.arctan2(obs[29], obs[28]) / (2 * np.pi) * N) % N
        return np.full(12, 1.0 if phase == N - 1 else 0.0, dtype=np.float32)

    (row,) = tracking_table({"jump": jump_at_the_end}, stand, seeds=2)
    assert row.nominal_steps == N  # termination off: the nominal clip is played to its end
    assert row.randomized_survived == 0
