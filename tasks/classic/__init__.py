"""Classic control systems as differentiable dynamics modules ``(x, u) -> x_next``."""

from diffto.tasks.classic.cartpole import CartPole
from diffto.tasks.classic.pendulum import Pendulum, integrate, integrate_jacobians, rollout

__all__ = ["Pendulum", "CartPole", "integrate", "integrate_jacobians", "rollout"]
