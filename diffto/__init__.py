"""diffto: differentiable trajectory optimization and MPC layers for PyTorch.

The shared vocabulary lives here; solvers in :mod:`diffto.layers`, robots and environments in
:mod:`diffto.tasks`, learning methods in :mod:`diffto.learning`.
"""

from diffto.problem import LinearDynamics, QuadraticCost, Solution

__all__ = ["QuadraticCost", "LinearDynamics", "Solution"]
__version__ = "0.1.0"
