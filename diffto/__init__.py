"""diffto: differentiable trajectory optimization and MPC layers for PyTorch.

The shared vocabulary lives here; solvers in :mod:`diffto.layers`, robots and environments in
:mod:`diffto.tasks`, learning methods in :mod:`diffto.learning`. Importing diffto changes no
environment variable: to render MuJoCo headless (no display), set ``MUJOCO_GL=osmesa`` before
``mujoco`` is first imported (the ``lightning``/``diffto`` command does it for you).
"""

from diffto.costs import LeastSquaresCost, NonlinearCost, SumCost
from diffto.problem import LinearDynamics, QuadraticCost, Solution

__all__ = [
    # costs
    "QuadraticCost",
    "NonlinearCost",
    "LeastSquaresCost",
    "SumCost",
    # dynamics and solutions
    "LinearDynamics",
    "Solution",
]
__version__ = "0.1.0"
