"""Differentiable solver layers, one file per backend, one call contract.

Every layer is an ``nn.Module`` called the same way::

    solution = layer(x0, cost, dynamics=None, u_init=None)

* ``x0 (B, n)``: initial states (a single ``(n,)`` is a batch of one).
* ``cost``: a :class:`~diffto.QuadraticCost`; the nonlinear solvers (``MPC``, ``TheseusTO``,
  ``CasadiTO``) also take :class:`~diffto.NonlinearCost`, :class:`~diffto.LeastSquaresCost` and
  sums of costs (``a + b``).
* ``dynamics``: given at construction or per call (the per-call one wins): a
  :class:`~diffto.LinearDynamics`, or for the nonlinear solvers any module ``(x, u) -> x_next``,
  including :class:`MujocoDynamics`. Modules that define ``jacobians(x, u) -> (A, B)`` are
  linearized with them.
* ``u_init (B, T, m)``: a warm start for the iterative solvers (``Solution.shifted()`` of the
  previous receding-horizon call); the exact solvers (``LQR``, ``QPMPC``) accept it and ignore
  it.

A solve returns a :class:`~diffto.Solution`: ``x (B, T+1, n)`` (``x0`` first), ``u (B, T, m)``,
``cost (B,)``, ``converged (B,)`` judged on an unregularized optimality measure,
``iterations (B,)``, and ``extras`` with the same names across backends: ``costates
(B, T+1, n)`` (the multipliers of the dynamics), ``gains (B, T, m, n)`` and ``feedforward
(B, T, m)`` where the solver has a feedback law, ``active_lower`` / ``active_upper (B, T, m)``
where controls are bounded, ``residual (B,)`` where the backend reports its optimality measure,
plus backend-specific fields (``status``, ``regularization``, ...). A row that did not converge
is flagged, never detached; a row whose solve is not finite contributes no gradient. Swapping one
solver for another is a change of class name.

Gradients reach every tensor input (``x0``, cost and dynamics tensors, bounds where active)
and, for ``MPC``, ``TheseusTO`` and ``CasadiTO``, every tensor a cost or dynamics module uses,
parameter or closed over. Backends with heavy imports (cvxpy, CasADi, Theseus,
pytorch-kinematics, MuJoCo) load on first use.
"""

import importlib

from diffto.layers.lqr import LQR, solve_lqr, solve_lqr_tensors
from diffto.layers.mpc import MPC
from diffto.layers.safety import SafetyFilter, cbf_constraints, project_polytope

_LAZY = {
    # convex QP-MPC with state and general inequality constraints (cvxpylayers)
    "QPMPC": "diffto.layers.qp",
    "build_mpc_problem": "diffto.layers.qp",
    # general NLPs (CasADi + IPOPT), and the standard TO problem built from them
    "CasadiNLP": "diffto.layers.casadi",
    "CasadiTO": "diffto.layers.casadi_to",
    "NLPResult": "diffto.layers.casadi",
    "solve_nlp": "diffto.layers.casadi",
    # nonlinear least squares (Theseus)
    "TheseusTO": "diffto.layers.theseus",
    # MuJoCo models as dynamics (finite-difference Jacobians)
    "MujocoDynamics": "diffto.layers.mujoco_dynamics",
    # kinematics (pytorch-kinematics) and the robot costs built on it
    "KinematicChain": "diffto.layers.kinematics",
    "quat_to_matrix": "diffto.layers.kinematics",
    "ee_pose_cost": "diffto.layers.robot_costs",
    "sphere_obstacle_cost": "diffto.layers.robot_costs",
    "joint_limit_cost": "diffto.layers.robot_costs",
}

__all__ = [
    # exact linear-quadratic
    "LQR",
    "solve_lqr",
    "solve_lqr_tensors",
    # nonlinear MPC with control boxes
    "MPC",
    # safety filter: differentiable projection onto {a : G a <= h}
    "SafetyFilter",
    "cbf_constraints",
    "project_polytope",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffto.layers' has no attribute {name!r}")
