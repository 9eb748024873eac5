"""Metaworld v3 manipulation tasks as seeded goal-conditioned environments.

- :class:`MetaworldGoalEnv` (gymnasium id ``diffto/Metaworld-v0``): one task, goal observable,
  ``reset(seed=s)`` draws the task variant from ``s``; dict observations and the goal-env API.
- :data:`METAWORLD_TASKS` (global task ids are indices in it), :data:`MT10`.
- :mod:`~diffto.tasks.metaworld.success`: each task's achieved goal and success test.
- :class:`ScriptedExpert`: Metaworld's scripted policy of a task, batched.
- :func:`make_metaworld_vector_env`: several tasks (e.g. MT10) in one gymnasium vector env.

Importing this package registers nothing (see :mod:`diffto.tasks.registry`).
"""

from diffto.tasks.metaworld.expert import ScriptedExpert
from diffto.tasks.metaworld.goal_env import METAWORLD_TASKS, MT10, MetaworldGoalEnv
from diffto.tasks.metaworld.success import (
    SUCCESS_TABLE,
    GoalTest,
    achieved_goal,
    evaluate_state,
    goal_success,
    is_goal_function,
)
from diffto.tasks.metaworld.vector import make_metaworld_vector_env

__all__ = [
    # environment
    "MetaworldGoalEnv",
    "METAWORLD_TASKS",
    "MT10",
    "make_metaworld_vector_env",
    # success table
    "SUCCESS_TABLE",
    "GoalTest",
    "achieved_goal",
    "evaluate_state",
    "goal_success",
    "is_goal_function",
    # expert
    "ScriptedExpert",
]
