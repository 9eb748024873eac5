"""Where diffto's environments are made: the table of gymnasium ids and the process set-up.

Importing a task package registers nothing. The ids live in one table, :data:`ENVIRONMENTS`
(id -> ``"module:Class"`` entry point), and :func:`register_environments` adds them to
gymnasium's registry when an environment is about to be made; it is idempotent and imports
no task module (gymnasium imports the entry point on ``gym.make``). :func:`make_env` is what
learners and their subprocess workers call::

    from diffto.tasks.registry import make_env

    env = make_env("diffto/PandaReach-v0", {"reward_type": "dense"})
    env = make_env("diffto/Metaworld-v0", {"task": "push-v3"})  # any Metaworld v3 task

The trajectory-optimization expert of an environment (an
:class:`~diffto.tasks.mpc_expert.MPCExpert`) is in a second table, :data:`EXPERTS`;
:func:`make_expert` builds the default one of an id, with constructor overrides::

    expert = make_expert("diffto/PendulumSwingUp-v0", horizon=40)

MuJoCo chooses its OpenGL back-end from ``MUJOCO_GL`` when ``mujoco`` is first imported, and
on a Linux machine without a display only OSMesa renders offscreen. diffto's modules never
change the environment on import; the command line (:mod:`diffto.cli`) and :func:`make_env`
(hence every environment worker process) call :func:`use_osmesa_if_headless` before anything
imports ``mujoco``. A library user who renders on a headless machine sets ``MUJOCO_GL=osmesa``
(or ``egl``) before importing ``mujoco`` or calls that function first.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = [
    "ENVIRONMENTS",
    "EXPERTS",
    "register_environments",
    "make_env",
    "make_expert",
    "build_expert",
    "import_class",
    "use_osmesa_if_headless",
]

ENVIRONMENTS: dict[str, str] = {
    "diffto/Go2Tracking-v0": "diffto.tasks.go2.env:Go2TrackingEnv",
    "diffto/Metaworld-v0": "diffto.tasks.metaworld.goal_env:MetaworldGoalEnv",
    "diffto/PandaObstacleReach-v0": "diffto.tasks.panda.obstacle_env:PandaObstacleReachEnv",
    "diffto/PandaReach-v0": "diffto.tasks.panda.reach_env:PandaReachEnv",
    "diffto/PandaResidualReach-v0": "diffto.tasks.panda.residual_env:PandaResidualReachEnv",
    "diffto/PendulumSwingUp-v0": "diffto.tasks.classic.swingup_env:PendulumSwingUpEnv",
}
"""gymnasium id -> entry point ``"module:Class"`` of every environment diffto ships."""

EXPERTS: dict[str, str] = {
    "diffto/PandaReach-v0": "diffto.tasks.panda.expert:PandaReachExpert",
    "diffto/PendulumSwingUp-v0": "diffto.tasks.classic.swingup_expert:SwingUpExpert",
}
"""gymnasium id -> ``"module:Class"`` of the default trajectory-optimization expert
(:class:`diffto.tasks.mpc_expert.MPCExpert`) of that environment."""


def register_environments() -> list[str]:
    """Register every id of :data:`ENVIRONMENTS` with gymnasium that is not registered yet.

    Idempotent: ids already in ``gymnasium.registry`` (from an earlier call, or registered by
    the user under the same name) are left as they are. Returns the ids registered by this call.
    """
    import gymnasium as gym

    added = []
    for env_id, entry_point in ENVIRONMENTS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=entry_point)
            added.append(env_id)
    return added


def use_osmesa_if_headless() -> bool:
    """Set ``MUJOCO_GL=osmesa`` on a Linux machine without a display, unless the user chose.

    Only effective before ``mujoco`` is first imported (MuJoCo reads the variable then), so
    nothing is changed once it is. Returns whether the variable was set by this call.
    """
    if (
        "MUJOCO_GL" in os.environ
        or os.environ.get("DISPLAY")
        or os.environ.get("WAYLAND_DISPLAY")
        or not sys.platform.startswith("linux")
        or "mujoco" in sys.modules
    ):
        return False
    os.environ["MUJOCO_GL"] = "osmesa"
    return True


def make_env(env_id: str, env_kwargs: dict[str, Any] | None = None):
    """``gymnasium.make(env_id, **env_kwargs)`` with diffto's ids registered first.

    Importable at module level, so subprocess workers can unpickle it; in a fresh worker it
    also picks the headless rendering back-end (:func:`use_osmesa_if_headless`) before the
    environment imports ``mujoco``. The passive env checker is off: vector envs check spaces
    themselves, and its warnings would repeat in every worker.
    """
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env_id must be a non-empty gymnasium id string, got {env_id!r}")
    if env_kwargs is not None and not isinstance(env_kwargs, dict):
        raise ValueError(f"env_kwargs must be a dict or None, got {type(env_kwargs).__name__}")
    use_osmesa_if_headless()
    register_environments()
    import gymnasium as gym

    return gym.make(env_id, disable_env_checker=True, **(env_kwargs or {}))


def make_expert(env_id: str, **overrides: Any):
    """The default MPC expert of ``env_id`` (:data:`EXPERTS`), built with its defaults and
    ``overrides`` as constructor arguments (e.g. ``horizon=10``). A config names an expert
    class directly instead (``{class_path, init_args}``) when it wants another one."""
    if not isinstance(env_id, str) or env_id not in EXPERTS:
        raise ValueError(f"env_id must be one of {sorted(EXPERTS)} (an env with a default "
                         f"expert), got {env_id!r}")
    import importlib

    module, _, name = EXPERTS[env_id].partition(":")
    return getattr(importlib.import_module(module), name)(**overrides)


def import_class(class_path: str, what: str = "class_path") -> type:
    """The class a dotted ``class_path`` names (``"package.module.Class"``); ``ValueError``
    saying which argument (``what``) names nothing importable."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{what} class_path {class_path!r} does not name an importable class "
                         f"({err})") from err


def build_expert(env_id: str, expert: dict[str, Any] | None = None):
    """The expert a config names, ``{"class_path": ..., "init_args": {...}}``, or ``None`` for
    the default expert of ``env_id`` (:func:`make_expert`); it must be an ``MPCExpert``."""
    from diffto.tasks.mpc_expert import MPCExpert

    if expert is None:
        built = make_expert(env_id)
    elif isinstance(expert, dict) and isinstance(expert.get("class_path"), str):
        extra = set(expert) - {"class_path", "init_args"}
        if extra:
            raise ValueError(f"expert takes the keys class_path and init_args, got {sorted(extra)}")
        built = import_class(expert["class_path"], "expert")(
            **dict(expert.get("init_args") or {}))
    else:
        raise ValueError(
            f"expert must be None or a dict {{class_path, init_args}}, got {expert!r}"
        )
    if not isinstance(built, MPCExpert):
        raise ValueError(f"expert must build an MPCExpert, got {type(built).__name__}")
    return built
