"""Where a Go2 reference comes from: the one entry point of the env, the rollouts and the CLI.

:func:`load_reference` turns whatever a caller or a config gives as ``reference`` into a
:class:`~diffto.tasks.go2.reference.ReferenceTrajectory`:

==========================  =================================================================
source                      read as
==========================  =================================================================
a ``ReferenceTrajectory``   itself
a motion name               planned by :func:`~diffto.tasks.go2.planner.plan_reference`
                            (``"trot"``, ...; see ``MOTIONS``) over ``duration`` seconds, cached
a ``.npz`` path             :meth:`ReferenceTrajectory.save`'s format, or the raw arrays
                            ``state_traj``, ``grf_traj``, ``joint_vel_traj`` and optionally
                            ``contact_sequence`` under those names
a folder                    ``state_traj.npy``, ``grf_traj.npy``, ``joint_vel_traj.npy`` and
                            optionally ``contact_sequence.npy``
==========================  =================================================================

The raw layouts (a ``state_traj`` of 30 or 36 columns) and their checks are documented in
:mod:`diffto.tasks.go2.reference`. In a config::

    model:
      init_args:
        env_kwargs:
          reference: path/to/my_motion/     # or trot, or my_motion.npz

A motion name wins over a file or folder of the same name in the working directory, so a
name means what it always meant. This lives beside ``reference.py`` rather than in it because
planning needs the planner, which itself builds ``ReferenceTrajectory`` objects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffto.tasks.go2.reference import ReferenceTrajectory
from diffto.tasks.go2.tracking_config import TrackingConfig

__all__ = ["load_reference", "load_tracked_reference"]


def _looks_like_name(source: str | os.PathLike) -> bool:
    """A bare word (no folder, no suffix): what a motion name looks like."""
    path = Path(source)
    return isinstance(source, str) and path.name == source and not path.suffix


def load_reference(
    source: Any,
    *,
    duration: float | None = None,
    dt: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    planner_options: Mapping[str, Any] | None = None,
) -> ReferenceTrajectory:
    """A reference from an instance, a motion name, a ``.npz`` path or a folder (module doc).

    Args:
        source: see the module docstring's table.
        duration: seconds of a planned motion (default :class:`TrackingConfig`'s
            ``reference_duration``); files keep their own length.
        dt: interval length of a planned motion or of raw arrays (default
            :class:`TrackingConfig`'s ``control_dt``); a saved ``.npz`` carries its own.
        cache_dir: cache folder of planned motions (``None``: the planner's default).
        planner_options: :class:`~diffto.tasks.go2.planner.PlannerOptions` fields of a planned
            motion over its defaults (e.g. ``{"speed": 1.0}``); data keeps its own.

    Raises:
        ValueError: ``source`` is of another type, or a string that is neither a motion name
            nor an existing path (the message names it and lists the accepted forms), or the
            file's contents are rejected (see :meth:`ReferenceTrajectory.from_path`).
    """
    if isinstance(source, ReferenceTrajectory):
        return source
    if not isinstance(source, str | os.PathLike):
        raise ValueError(
            "reference must be a ReferenceTrajectory, a motion name, a reference .npz path or a "
            f"folder of raw .npy files, got {type(source).__name__}"
        )
    defaults = TrackingConfig()
    duration = defaults.reference_duration if duration is None else duration
    dt = defaults.control_dt if dt is None else dt
    if _looks_like_name(source):
        # CasADi is imported only for names; the planner checks the options and the duration.
        from diffto.tasks.go2.planner import MOTIONS, plan_reference

        if source in MOTIONS:
            return plan_reference(source, duration, dt=dt, cache_dir=cache_dir,
                                  **(planner_options or {}))
    path = Path(source).expanduser()
    if path.exists():
        return ReferenceTrajectory.from_path(path, dt=dt)
    from diffto.tasks.go2.planner import MOTIONS

    raise ValueError(
        f"reference {str(source)!r} does not exist as a file or folder and is not a motion name; "
        f"accepted: a motion name ({', '.join(MOTIONS)}), a reference .npz "
        "(ReferenceTrajectory.save, or the raw arrays state_traj, grf_traj, joint_vel_traj and "
        "optionally contact_sequence under those names), a folder holding state_traj.npy, "
        "grf_traj.npy, joint_vel_traj.npy and optionally contact_sequence.npy, or a "
        "ReferenceTrajectory"
    )


def load_tracked_reference(source: Any, config: TrackingConfig) -> ReferenceTrajectory:
    """The reference a ``Go2TrackingEnv`` with ``config`` tracks: :func:`load_reference` with
    the config's ``reference_duration``, ``control_dt``, ``reference_cache_dir`` and
    ``planner_options``. Everything that rebuilds an env's reference outside it (rollouts,
    tables, the evaluation entry point) goes through here, so it gets the same clip."""
    return load_reference(source, duration=config.reference_duration, dt=config.control_dt,
                          cache_dir=config.reference_cache_dir,
                          planner_options=config.planner_options)
