"""The Franka Emika Panda: MuJoCo model, differentiable kinematics and a reach environment.

- :func:`load_model`, :func:`model_xml`: the arm built from MuJoCo Menagerie's numbers
  (Apache-2.0, see ``NOTICE``) with torque motors at Franka's published limits, primitive
  geometry, optional gravity compensation and flange payload; 0.002 s implicitfast physics.
- :func:`panda_chain`: a pytorch-kinematics chain to the flange ``attachment_site`` whose
  forward kinematics is MuJoCo's.
- :class:`PandaReachEnv` (gymnasium id ``diffto/PandaReach-v0``): goal-conditioned torque-level
  reaching at 50 Hz with optional model mismatch.
- :class:`PandaReachExpert`: its MPC expert (box-DDP over ``MujocoDynamics``, flange cost).
- :class:`PandaBaseController`: operational-space control on the nominal model (0.1 ms), and
  :class:`PandaResidualReachEnv` (``diffto/PandaResidualReach-v0``): the reach task whose
  action is a residual on top of it.
- :class:`PandaSafetyFilter`, :class:`PandaConstraintSet`: the safety filter behind the reach
  env's ``safety_filter`` option (joint position and velocity limits, a flange workspace box).
"""

from diffto.tasks.panda.base_controller import PandaBaseController
from diffto.tasks.panda.expert import PandaReachExpert
from diffto.tasks.panda.kinematics import flange_position, panda_chain
from diffto.tasks.panda.model import (
    ACTUATOR_NAMES,
    ARM_MASS,
    FLANGE_SITE,
    HOME,
    JOINT_LOWER,
    JOINT_NAMES,
    JOINT_UPPER,
    PAYLOAD_BODY,
    TIMESTEP,
    TORQUE_LIMITS,
    VELOCITY_LIMITS,
    load_model,
    model_xml,
    set_payload,
)
from diffto.tasks.panda.obstacle_env import PandaObstacleReachEnv, keep_out_penetration
from diffto.tasks.panda.reach_env import PandaReachEnv, RenderingUnavailableError, goal_distance
from diffto.tasks.panda.residual_env import PandaResidualReachEnv
from diffto.tasks.panda.safety_filter import FilterResult, PandaConstraintSet, PandaSafetyFilter

__all__ = [
    # model
    "load_model",
    "model_xml",
    "set_payload",
    "HOME",
    "TORQUE_LIMITS",
    "VELOCITY_LIMITS",
    "JOINT_LOWER",
    "JOINT_UPPER",
    "JOINT_NAMES",
    "ACTUATOR_NAMES",
    "FLANGE_SITE",
    "PAYLOAD_BODY",
    "ARM_MASS",
    "TIMESTEP",
    # kinematics
    "panda_chain",
    "flange_position",
    # environment
    "PandaReachEnv",
    "RenderingUnavailableError",
    "goal_distance",
    "PandaResidualReachEnv",
    "PandaObstacleReachEnv",
    "keep_out_penetration",
    "PandaBaseController",
    "PandaConstraintSet",
    "PandaSafetyFilter",
    "FilterResult",
    # expert
    "PandaReachExpert",
]
