"""Classic control systems as differentiable dynamics modules ``(x, u) -> x_next``, and the
pendulum swing-up task built on them.

- :class:`Pendulum`, :class:`CartPole`: the dynamics; :func:`integrate`,
  :func:`integrate_jacobians`, :func:`rollout`: the shared integrator and its derivative.
- :class:`PendulumSwingUpEnv` (gymnasium id ``diffto/PendulumSwingUp-v0``): goal-conditioned
  swing-up to a target angle; :func:`wrap_angle`, :func:`angle_distance`.
- :class:`SwingUpExpert`: its MPC expert.
"""

from diffto.tasks.classic.cartpole import CartPole
from diffto.tasks.classic.pendulum import Pendulum, integrate, integrate_jacobians, rollout
from diffto.tasks.classic.swingup_env import PendulumSwingUpEnv, angle_distance, wrap_angle
from diffto.tasks.classic.swingup_expert import SwingUpExpert

__all__ = [
    # dynamics
    "Pendulum",
    "CartPole",
    "integrate",
    "integrate_jacobians",
    "rollout",
    # swing-up task
    "PendulumSwingUpEnv",
    "wrap_angle",
    "angle_distance",
    "SwingUpExpert",
]
