"""Differentiable solver layers, one file per backend.

All share one call shape, ``layer(x0, cost, ...) -> Solution`` (see :mod:`diffto.problem`).
Backends with heavy imports (cvxpy, CasADi, Theseus, pytorch-kinematics) load on first use.
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
    # kinematics (pytorch-kinematics)
    "KinematicChain": "diffto.layers.kinematics",
    "Go2LegKinematics": "diffto.layers.kinematics",
    "go2_leg_chain": "diffto.layers.kinematics",
    "arm7_chain": "diffto.layers.kinematics",
    "foot_torques": "diffto.layers.kinematics",
    "ee_residual": "diffto.layers.kinematics",
    "ee_goal_cost": "diffto.layers.kinematics",
    "theseus_ee_cost": "diffto.layers.kinematics",
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
