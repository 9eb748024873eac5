"""Per-task achieved goal and success test of Metaworld v3, as Metaworld itself computes them.

Metaworld decides ``info["success"]`` inside each task's ``evaluate_state`` from the full
simulator state; the goal-conditioned API needs the same decision as a function of an
*achieved goal* (a point the state reaches) and a *desired goal* (the task's ``_target_pos``),
so goals can be relabelled. The table below is read from ``metaworld/envs/sawyer_*_v3.py``
(``evaluate_state`` and ``compute_reward``, Metaworld 3.1.1); every row is checked against
``info["success"]`` along scripted-expert episodes in ``tests/tasks/test_metaworld_env.py``.

| task | achieved goal | test (success when) | threshold |
|---|---|---|---|
| reach-v3 | TCP centre (between the finger tips) | ‖a − d‖ ≤ thr | 0.05 |
| push-v3 | object ``obs[4:7]`` | ‖a − d‖ ≤ thr | 0.05 |
| pick-place-v3 | object ``obs[4:7]`` | ‖a − d‖ ≤ thr | 0.07 |
| door-open-v3 | door handle ``obs[4:7]`` | \\|a_x − d_x\\| ≤ thr (x only) | 0.08 |
| drawer-open-v3 | drawer handle ``obs[4:7]`` | ‖a − d‖ ≤ thr | 0.03 |
| drawer-close-v3 | drawer handle ``obs[4:7]`` | ‖a − d‖ ≤ thr | 0.065 |
| button-press-topdown-v3 | button top ``obs[4:7]`` | \\|a_z − d_z\\| ≤ thr (z only) | 0.024 |
| peg-insert-side-v3 | peg head (site ``pegHead``) | ‖(a − d) ⊙ (1, 2, 2)‖ ≤ thr | 0.07 |
| window-open-v3 | window handle ``obs[4:7]`` | \\|a_x − d_x\\| ≤ thr (x only) | 0.05 |
| window-close-v3 | window handle ``obs[4:7]`` | \\|a_x − d_x\\| ≤ thr (x only) | 0.05 |
| push-wall-v3 | object ``obs[4:7]`` | ‖a − d‖ ≤ thr | 0.07 |
| push-back-v3 | object ``obs[4:7]`` | ‖a − d‖ ≤ thr | 0.07 |
| shelf-place-v3 | object ``obs[4:7]`` | ‖a − d‖ ≤ thr | 0.07 |
| faucet-close-v3 | faucet handle ``obs[4:7]`` | ‖a − d‖ ≤ thr | 0.07 |
| peg-unplug-side-v3 | peg end ``obs[4:7]`` | ‖a − d‖ ≤ thr | 0.07 |
| handle-press-side-v3 | handle ``obs[4:7]`` | \\|a_z − d_z\\| ≤ thr (z only) | 0.02 |
| hammer-v3 (state) | nail ``obs[11:14]`` | joint ``NailSlideJoint`` > thr (m driven) | 0.09 |
| stick-pull-v3 (state) | handle ``obs[11:14]`` | ‖a − d‖ ≤ thr *and* stick inserted | 0.12 |

The *distance* is the left-hand side of the test (for hammer: ``thr − nail joint``, positive
until success). Rows marked *(state)* depend on more than ``(a, d)``: hammer on the nail's
joint, stick-pull on whether the stick's end is inside the handle (``stick_end`` x beyond the
handle's, within 4 cm in y and 6 cm in z); :func:`evaluate_state` reproduces them from the
simulator, :func:`goal_success` refuses them. Tasks outside the table use the object
``obs[4:7]`` as achieved goal, ``‖a − d‖`` as distance and Metaworld's own
``info["success"]`` as the test (:func:`evaluate_state` returns ``None`` for the success).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "GoalTest",
    "SUCCESS_TABLE",
    "is_goal_function",
    "achieved_goal",
    "goal_success",
    "evaluate_state",
]


@dataclass(frozen=True)
class GoalTest:
    """One row of the table: where the achieved goal is read and how success is decided.

    ``achieved``: ``"object"`` (``obs[4:7]``), ``"second_object"`` (``obs[11:14]``),
    ``"tcp_center"`` (mean of the two finger-tip sites) or ``"site:<name>"`` (a MuJoCo site).
    ``metric``: ``"norm"`` (‖(a − d) ⊙ scale‖), ``"x"`` or ``"z"`` (one axis, absolute).
    ``state``: ``None`` when the test is a function of (achieved, desired) only, else the name
    of the state rule that :func:`evaluate_state` applies.
    """

    achieved: str
    metric: Literal["norm", "x", "z"]
    threshold: float
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    state: Literal["hammer", "stick_pull"] | None = None


SUCCESS_TABLE: dict[str, GoalTest] = {
    "reach-v3": GoalTest("tcp_center", "norm", 0.05),
    "push-v3": GoalTest("object", "norm", 0.05),
    "pick-place-v3": GoalTest("object", "norm", 0.07),
    "door-open-v3": GoalTest("object", "x", 0.08),
    "drawer-open-v3": GoalTest("object", "norm", 0.03),
    # TARGET_RADIUS + 0.015 in sawyer_drawer_close_v3.evaluate_state
    "drawer-close-v3": GoalTest("object", "norm", 0.065),
    "button-press-topdown-v3": GoalTest("object", "z", 0.024),
    # compute_reward scales the peg-head error by (1, 2, 2) before the norm
    "peg-insert-side-v3": GoalTest("site:pegHead", "norm", 0.07, scale=(1.0, 2.0, 2.0)),
    "window-open-v3": GoalTest("object", "x", 0.05),
    "window-close-v3": GoalTest("object", "x", 0.05),
    "push-wall-v3": GoalTest("object", "norm", 0.07),
    "push-back-v3": GoalTest("object", "norm", 0.07),
    "shelf-place-v3": GoalTest("object", "norm", 0.07),
    "faucet-close-v3": GoalTest("object", "norm", 0.07),
    "peg-unplug-side-v3": GoalTest("object", "norm", 0.07),
    # evaluate_state compares the z error with the class's TARGET_RADIUS = 0.02
    "handle-press-side-v3": GoalTest("object", "z", 0.02),
    "hammer-v3": GoalTest("second_object", "norm", 0.09, state="hammer"),
    "stick-pull-v3": GoalTest("second_object", "norm", 0.12, state="stick_pull"),
}
"""task name -> :class:`GoalTest` (see the module docstring's table)."""

_DEFAULT = GoalTest("object", "norm", float("nan"))


def is_goal_function(task: str) -> bool:
    """Whether ``task``'s success is a function of (achieved goal, desired goal) only."""
    row = SUCCESS_TABLE.get(task)
    return row is not None and row.state is None


def achieved_goal(env: Any, observation: np.ndarray, task: str) -> np.ndarray:
    """The achieved goal ``(3,)`` of the unwrapped Metaworld ``env`` in its current state.

    ``observation (39,)`` is the observation ``env`` returned for this state (object slices
    are read from it; sites and the TCP centre from the simulator, which ``step`` has brought
    forward with ``mj_forward``).
    """
    where = SUCCESS_TABLE.get(task, _DEFAULT).achieved
    if where == "object":
        return np.array(observation[4:7], dtype=np.float64)
    if where == "second_object":
        return np.array(observation[11:14], dtype=np.float64)
    if where == "tcp_center":
        return np.array(env.tcp_center, dtype=np.float64)
    return np.array(env._get_site_pos(where.removeprefix("site:")), dtype=np.float64)


def _distance(row: GoalTest, achieved: np.ndarray, desired: np.ndarray) -> np.ndarray:
    """The test's error ``(B,)`` for ``achieved, desired (B, 3)``."""
    error = achieved - desired
    if row.metric == "x":
        return np.abs(error[..., 0])
    if row.metric == "z":
        return np.abs(error[..., 2])
    return np.linalg.norm(error * np.asarray(row.scale), axis=-1)


def goal_success(
    task: str, achieved: np.ndarray, desired: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Success and distance of a batch of goals under ``task``'s test.

    ``achieved, desired``: ``(B, 3)`` or ``(3,)``; returns ``success`` (bool) and ``distance``
    (float64), each ``(B,)`` or scalar arrays ``()``. Only for tasks whose test is a function
    of the goals (:func:`is_goal_function`); a ``ValueError`` names the task otherwise.
    """
    row = SUCCESS_TABLE.get(task)
    if row is None or row.state is not None:
        why = "is not in the success table" if row is None else "depends on the simulator state"
        raise ValueError(
            f"task {task!r}: its success test {why}, so it cannot be evaluated from "
            f"(achieved_goal, desired_goal) alone; functions of the goals exist for "
            f"{sorted(t for t in SUCCESS_TABLE if is_goal_function(t))}"
        )
    achieved = np.asarray(achieved, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    if achieved.shape[-1:] != (3,) or desired.shape[-1:] != (3,):
        raise ValueError(
            f"achieved_goal and desired_goal must end in a dimension of 3, got shapes "
            f"{achieved.shape} and {desired.shape}"
        )
    distance = _distance(row, achieved, desired)
    return distance <= row.threshold, distance


def evaluate_state(
    env: Any, observation: np.ndarray, task: str
) -> tuple[np.ndarray, bool | None, float]:
    """Achieved goal ``(3,)``, success and distance of the unwrapped ``env``'s current state.

    The success is ``None`` for tasks outside the table (the caller uses Metaworld's
    ``info["success"]``). The desired goal is ``env._target_pos``.
    """
    achieved = achieved_goal(env, observation, task)
    desired = np.asarray(env._target_pos, dtype=np.float64)
    row = SUCCESS_TABLE.get(task)
    if row is None:
        return achieved, None, float(np.linalg.norm(achieved - desired))
    if row.state == "hammer":
        # sawyer_hammer_v3.compute_reward: success once the nail is driven in past 0.09
        driven = float(env.data.joint("NailSlideJoint").qpos[0])
        return achieved, driven > row.threshold, row.threshold - driven
    distance = float(_distance(row, achieved, desired))
    success = distance <= row.threshold
    if row.state == "stick_pull":
        # sawyer_stick_pull_v3._stick_is_inserted, with the handle at obs[11:14]
        end = env._get_site_pos("stick_end")
        success = bool(
            success
            and end[0] >= achieved[0]
            and abs(end[1] - achieved[1]) <= 0.040
            and abs(end[2] - achieved[2]) <= 0.060
        )
    return achieved, bool(success), distance
