"""diffto: differentiable trajectory optimization and MPC layers for PyTorch.

The shared vocabulary lives here; solvers in :mod:`diffto.layers`, robots and environments in
:mod:`diffto.tasks`, learning methods in :mod:`diffto.learning`.
"""

import os as _os

# MuJoCo picks its OpenGL backend when first imported; on a machine without a display only
# OSMesa renders (rollout videos). Decide before anything imports mujoco; a user's choice wins.
if "MUJOCO_GL" not in _os.environ and not _os.environ.get("DISPLAY"):
    _os.environ["MUJOCO_GL"] = "osmesa"

from diffto.problem import LinearDynamics, QuadraticCost, Solution

__all__ = ["QuadraticCost", "LinearDynamics", "Solution"]
__version__ = "0.1.0"
