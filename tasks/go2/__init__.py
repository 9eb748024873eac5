"""Unitree Go2 quadruped: model, reference planner and the OPT-Mimic tracking environment.

- :func:`load_model`: the Go2 MJCF built from MuJoCo Menagerie's numbers (BSD-3, see
  ``LICENSE.go2``), floor, lights and a tracking camera; 1 ms physics.
- :func:`plan_reference`: a single-rigid-body CasADi/IPOPT planner with a fixed contact
  schedule ("stand", "trot_in_place", "trot", "pronk", "bound"), cached as ``.npz``.
- :class:`ReferenceTrajectory`, :class:`FeedforwardComputer`: phase-indexed reference access
  and ``τ_ff = −Jᵀf`` feedforward torques.
- :class:`Go2TrackingEnv` (gymnasium id ``diffto/Go2Tracking-v0``, registered by
  :func:`diffto.tasks.registry.register_environments`): residual tracking.
- :func:`load_reference`: a reference from a motion name, a ``.npz`` or a folder of a user's
  raw ``.npy`` arrays (the env's ``reference`` argument goes through it).
- :func:`execute_policy_rollout`: a policy played on a reference, returning what an
  open-loop simulation would.
- :mod:`diffto.tasks.go2.evaluate` (``python -m diffto.tasks.go2.evaluate``): RMS tracking
  errors, plots and videos (the reference drawn as a translucent ghost), the tracking table
  of :mod:`diffto.tasks.go2.tracking_table` (PD + feedforward alone, best and last
  checkpoints; nominal and randomized), and the ``Go2TrackingReport`` callback.
"""

from diffto.tasks.go2.env import Go2TrackingEnv, RenderingUnavailableError
from diffto.tasks.go2.feedforward import FeedforwardComputer
from diffto.tasks.go2.model import (
    FOOT_NAMES,
    HOME_QPOS,
    JOINT_NAMES,
    TOTAL_MASS,
    actuator_joint_order,
    foot_geom_ids,
    load_model,
    torque_limits,
)
from diffto.tasks.go2.planner import MOTIONS, PlannerError, plan_reference
from diffto.tasks.go2.reference import ReferenceTrajectory
from diffto.tasks.go2.reference_source import load_reference
from diffto.tasks.go2.rollout import execute_open_loop_rollout, execute_policy_rollout
from diffto.tasks.go2.tracking_config import TrackingConfig

__all__ = [
    # model
    "load_model",
    "JOINT_NAMES",
    "FOOT_NAMES",
    "HOME_QPOS",
    "TOTAL_MASS",
    "actuator_joint_order",
    "foot_geom_ids",
    "torque_limits",
    # references
    "plan_reference",
    "MOTIONS",
    "PlannerError",
    "ReferenceTrajectory",
    "load_reference",
    "FeedforwardComputer",
    # environment and rollouts
    "Go2TrackingEnv",
    "TrackingConfig",
    "RenderingUnavailableError",
    "execute_policy_rollout",
    "execute_open_loop_rollout",
]
