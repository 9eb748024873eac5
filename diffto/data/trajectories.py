"""The one dataset format of diffto: transitions in a ``.npz``, per-episode info, a JSON meta.

Every learner in diffto (imitation, DAgger, critics, offline RL, replay buffers) reads and
writes a :class:`TrajectorySet`: ``N`` transitions (rows) of ``E`` episodes as named numpy
arrays, plus per-episode arrays and a JSON-serializable ``meta``.

==================  ==============  =======  ==================================================
array               shape           dtype    meaning
==================  ==============  =======  ==================================================
observation         (N, o)          float    observation at step t (planning state for TO data)
action              (N, m)          float    action applied at step t (env units)
next_observation    (N, o)          float    observation at step t+1
episode             (N,)            int64    global episode id (e.g. the problem index)
timestep            (N,)            int64    step index t within the episode
terminal            (N,)            bool     step t+1 is a terminal state (gymnasium's
                                             ``terminated``: no value beyond it)
truncated           (N,)            bool     the episode was cut off after step t (time
                                             limit, end of a plan); the state has a value
desired_goal        (N, g)          float    optional: the goal the episode pursues
achieved_goal       (N, g)          float    optional: the goal achieved at t+1 (the one a
                                             goal env's reward compares; not always a slice
                                             of the observation)
reward              (N,)            float    optional: reward received for the transition
cost                (N,)            float    optional: stage cost of (x_t, u_t); the terminal
                                             cost of a plan is added to its last stage
cost_to_go          (N,)            float    optional: realized sum of ``cost`` from t to the
                                             episode's end (:func:`cost_to_go`)
task                (N,)            int64    optional: task id in a multi-task set
images              (N, H, W, C)    uint8    optional: camera image at step t
plan                (N, T, m)       float    optional: the expert's open-loop controls at step
                                             t (expert control units; ``plan[:, 0]`` is the
                                             control it applied)
==================  ==============  =======  ==================================================

Further per-transition arrays travel in ``extras`` (``N`` rows each).

**Per episode.** ``episode_info`` holds arrays of ``E`` rows aligned with
:meth:`TrajectorySet.episode_ids` (the sorted unique episode ids). Standard keys:
``converged`` (bool: every solve of the expert in the episode converged), ``iterations``
(float: mean solver iterations per step), ``length`` (int64: steps of the episode as
generated) and ``seed`` (int64: the env reset seed of the episode, ``seed + i`` for dataset
episode ``i``; evaluation episodes use ``EVAL_SEED_BASE + j``, so held-out goals never appear
in training data). Other keys are allowed.

**Meta.** ``meta`` (one JSON object) records how the data were made. Standard keys: ``task``
or ``env_id``, ``dt``, ``dynamics``, ``cost_weights``, ``normalization``
(``{array: {"mean": [...], "std": [...]}}``, :meth:`TrajectorySet.normalization_stats`),
``versions``, and the counts ``episodes_requested`` and ``episodes_failed`` (only converged
solutions are expert data; failed episodes are left out and counted). A multi-task set
records ``task_names`` (``{str(task id): name}`` of the tasks its ``task`` array holds)
instead of one ``task``. ``achieved_goal_at: "observation"`` marks a set whose
``achieved_goal`` is the one at ``observation`` (time ``t``) rather than at ``t+1``: what a
policy reading the achieved goal sees when it acts (DAgger's labels record it so, and
:func:`diffto.learning.goal_off_policy.achieved_goal_at_observation` turns a standard set
into it).

**Row order.** Construction sorts rows by ``(episode, timestep)`` when they are not already
in that order (writers produce sorted rows, so for them it is a check) and rejects duplicate
``(episode, timestep)`` pairs. Hence the rows of an episode are contiguous and in time order,
and :meth:`TrajectorySet.episode_slices` are plain slices. Timesteps need not start at 0 or
be consecutive (a subset of rows is still a valid set).

**Files and shards.**

* :func:`save_trajectories` writes one ``.npz`` (``compressed=True`` for images): the arrays
  by name, ``episode_info.<key>`` per episode key, ``meta`` as one JSON string and
  ``format`` (``"diffto.trajectories/2"``); loading never needs pickle. The file is written
  under a temporary name in the destination folder and renamed with ``os.replace``: a reader
  never sees a half-written file, a crash leaves the previous file (or none), and concurrent
  writers of one file are safe.
* :func:`load_trajectories` reads one file, or a folder of shards (``*.npz`` in name order,
  concatenated). Episode ids are global, so they must be unique across shards: a repeated id
  is an error naming both files. The result's ``meta`` is the first file's plus ``files``
  (the shard names), with the counts of :data:`SUMMED_META_KEYS` (``episodes_requested``,
  ``episodes_failed``, ``solves``, ``labels``, ``wall_time_s``) summed, the lists of
  :data:`LISTED_META_KEYS` (``failed_episodes``) concatenated and ``normalization``
  recomputed on the whole set; other keys are the first file's. (A folder of legacy files
  only is renumbered instead, as the first loader did: legacy ids were per file.)
* :func:`merge_trajectories` does the same in memory (``renumber=True`` numbers the episodes
  ``0 .. E-1`` instead of requiring disjoint ids), and ``python -m diffto.data.merge OUT
  IN...`` for files and folders. Sets merge when their task / env id and ``dt`` agree (where
  both record them) and they hold the same arrays with the same trailing shapes and dtypes.
  Multi-task sets (a ``task`` array and ``meta["task_names"]``, ``{task id: name}``) may
  hold different tasks as long as no id has two names (nor a name two ids); the merged
  ``task_names`` is the union.
* A file that is not in this format raises ``ValueError`` naming the file and the array.

**Legacy files** (the first format: ``states``, ``actions``, ``dt``, ``meta``, optional
``goals``, ``costs``, ``cost_to_go``, ``episode_ids``) load into this one; the mapping is in
:mod:`diffto.data.legacy`.

**Minari** (Farama's offline-dataset standard) is not built in. minari 0.5.4 itself fits our
pins (numpy >= 2, gymnasium >= 0.28), but with a storage backend (``minari[hdf5]``) it adds 12
packages (h5py, typer, rich, pydantic ...) to every install, and its episodes store ``T+1``
observations whose goal-env ``achieved_goal`` is the one at ``t``, while a row here keeps the
one reached at ``t+1``: an export would lack each episode's initial achieved goal. An import
is a loop over ``dataset.iterate_episodes()`` (``observation = obs["observation"][:-1]``,
``next_observation = obs["observation"][1:]``, ``achieved_goal = obs["achieved_goal"][1:]``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffto.data.legacy import legacy_fields

__all__ = [
    "EVAL_SEED_BASE",
    "FORMAT",
    "LISTED_META_KEYS",
    "SUMMED_META_KEYS",
    "TrajectorySet",
    "check_compatible",
    "cost_to_go",
    "load_trajectories",
    "merge_trajectories",
    "merged_task_names",
    "save_trajectories",
]

EVAL_SEED_BASE = 1_000_000
"""Evaluation episode ``j`` resets its env with seed ``EVAL_SEED_BASE + j``; dataset episode
``i`` uses ``seed + i`` with small ``seed``, so held-out goals are never training goals."""

FORMAT = "diffto.trajectories/2"
"""Value of the ``format`` entry of every file :func:`save_trajectories` writes."""

SUMMED_META_KEYS = ("episodes_requested", "episodes_failed", "solves", "labels",
                    "wall_time_s")
"""Meta keys that count something: summed (not taken from the first) when sets are merged."""

LISTED_META_KEYS = ("failed_episodes",)
"""Meta keys holding lists (e.g. the ids of failed episodes): concatenated when merged."""

REQUIRED = ("observation", "action", "next_observation", "episode", "timestep", "terminal",
            "truncated")
OPTIONAL = ("desired_goal", "achieved_goal", "reward", "cost", "cost_to_go", "task", "images",
            "plan")
ROW_ARRAYS = REQUIRED + OPTIONAL

# Expected number of dimensions (None: at least 2) and dtype kind of each array:
# "f" float, "i" integer (stored int64), "b" bool, "u8" uint8.
_SPEC: dict[str, tuple[int | None, str]] = {
    "observation": (None, "f"), "action": (None, "f"), "next_observation": (None, "f"),
    "episode": (1, "i"), "timestep": (1, "i"), "terminal": (1, "b"), "truncated": (1, "b"),
    "desired_goal": (2, "f"), "achieved_goal": (2, "f"), "reward": (1, "f"), "cost": (1, "f"),
    "cost_to_go": (1, "f"), "task": (1, "i"), "images": (4, "u8"), "plan": (3, "f"),
}
_INFO_KINDS = {"converged": "b", "iterations": "f", "length": "i", "seed": "i"}
_INFO_PREFIX = "episode_info."


def _as_array(name: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got "
                         f"{type(value).__name__}")
    if value.dtype == object or value.dtype.kind in "USVMm":
        raise ValueError(f"{name} must have a numeric or bool dtype, got {value.dtype}")
    return value


def _check_kind(name: str, value: np.ndarray, kind: str) -> np.ndarray:
    """``value`` in the dtype family ``kind``; integers are widened to int64 (lossless)."""
    dt = value.dtype
    if kind == "f":
        if dt.kind != "f":
            raise ValueError(f"{name} must have a floating dtype, got {dt}")
        if not np.isfinite(value).all():
            bad = np.argwhere(~np.isfinite(value))[0].tolist()
            raise ValueError(f"{name} must be finite, found {value[tuple(bad)]} at index {bad}")
    elif kind == "i":
        if dt.kind not in "iu" or (dt.kind == "u" and dt.itemsize >= 8):
            raise ValueError(f"{name} must have an integer dtype (stored int64), got {dt}")
        value = value.astype(np.int64, copy=False)
    elif kind == "b":
        if dt != np.bool_:
            raise ValueError(f"{name} must have dtype bool, got {dt}")
    elif dt != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {dt}")
    return value


def cost_to_go(cost: np.ndarray, episode: np.ndarray) -> np.ndarray:
    """Realized cost-to-go ``V_t = Σ_{s ≥ t} cost_s`` within each episode.

    Args:
        cost: ``(N,)`` stage costs, rows of an episode contiguous and in time order.
        episode: ``(N,)`` episode ids.

    Returns:
        ``(N,)`` suffix sums per episode, in ``cost``'s dtype (summed in float64).

    One pass: with the global suffix sum ``S_i = Σ_{j ≥ i} cost_j``, an episode occupying rows
    ``[a, b)`` has ``V_i = S_i − S_b`` (``S_N = 0``). The subtraction costs an absolute error
    of about ``1e-16 · S_0`` (the whole set's cost), far below any cost a learner resolves.
    """
    cost, episode = np.asarray(cost), np.asarray(episode)
    if cost.ndim != 1 or episode.shape != cost.shape:
        raise ValueError(f"cost and episode must both have shape (N,), got {cost.shape} and "
                         f"{episode.shape}")
    N = cost.shape[0]
    if N == 0:
        return cost.copy()
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])  # first row of each run
    if len(starts) != len(np.unique(episode)):
        raise ValueError("episode: the rows of each episode must be contiguous")
    suffix = np.r_[np.cumsum(cost[::-1], dtype=np.float64)[::-1], 0.0]  # (N+1,) S_i, S_N = 0
    ends = np.r_[starts[1:], N]  # one past the last row of each run
    run_end = np.repeat(ends, np.diff(np.r_[starts, N]))  # (N,) b of each row's episode
    return (suffix[:N] - suffix[run_end]).astype(cost.dtype, copy=False)


@dataclass(eq=False, repr=False)
class TrajectorySet:
    """``N`` transitions of ``E`` episodes; see the module docstring for every array.

    Construction validates (``ValueError`` naming the array): ``N`` rows everywhere, dtypes
    (int64 ``episode``/``timestep``/``task``, bool ``terminal``/``truncated``, uint8
    ``images``, floating others), finite floats, ``observation`` and ``next_observation`` of
    one shape, ``desired_goal`` and ``achieved_goal`` of one shape, ``episode_info`` arrays of
    ``E`` rows (standard keys in their dtypes), ``meta`` JSON-serializable. Rows are sorted by
    ``(episode, timestep)`` if they are not already; duplicate pairs are rejected.
    """

    observation: np.ndarray
    action: np.ndarray
    next_observation: np.ndarray
    episode: np.ndarray
    timestep: np.ndarray
    terminal: np.ndarray
    truncated: np.ndarray
    desired_goal: np.ndarray | None = None
    achieved_goal: np.ndarray | None = None
    reward: np.ndarray | None = None
    cost: np.ndarray | None = None
    cost_to_go: np.ndarray | None = None
    task: np.ndarray | None = None
    images: np.ndarray | None = None
    plan: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    episode_info: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        N = None
        for name in ROW_ARRAYS:
            value = getattr(self, name)
            if value is None:
                if name in REQUIRED:
                    raise ValueError(f"{name} is required, got None")
                continue
            value = _as_array(name, value)
            ndim, kind = _SPEC[name]
            if value.ndim == 0 or (ndim is None and value.ndim < 2) or (
                    ndim is not None and value.ndim != ndim):
                want = "at least 2" if ndim is None else str(ndim)
                raise ValueError(f"{name} must have {want} dimensions (rows first), got shape "
                                 f"{value.shape}")
            N = value.shape[0] if N is None else N
            if value.shape[0] != N:
                raise ValueError(f"{name} must have N={N} rows (as observation), got shape "
                                 f"{value.shape}")
            setattr(self, name, _check_kind(name, value, kind))
        for a, b in (("observation", "next_observation"), ("desired_goal", "achieved_goal")):
            va, vb = getattr(self, a), getattr(self, b)
            if va is not None and vb is not None and va.shape != vb.shape:
                raise ValueError(f"{b} must have the shape of {a} {va.shape}, got {vb.shape}")
        if (self.timestep < 0).any():
            raise ValueError("timestep must be >= 0")
        extras = {}
        for name, value in dict(self.extras).items():
            if name in ROW_ARRAYS or name.startswith(_INFO_PREFIX) or name in ("meta", "format"):
                raise ValueError(f"extras may not use the reserved name {name!r}")
            value = _as_array(f"extras[{name!r}]", value)
            if value.ndim == 0 or value.shape[0] != N:
                raise ValueError(f"extras[{name!r}] must have N={N} rows, got shape "
                                 f"{value.shape}")
            if value.dtype.kind == "f":
                _check_kind(f"extras[{name!r}]", value, "f")
            extras[name] = value
        self.extras = extras
        self._sort_rows()
        E = len(self.episode_ids())
        info = {}
        for key, value in dict(self.episode_info).items():
            value = _as_array(f"episode_info[{key!r}]", value)
            if value.ndim == 0 or value.shape[0] != E:
                raise ValueError(f"episode_info[{key!r}] must have E={E} rows (one per episode "
                                 f"id, sorted), got shape {value.shape}")
            if key in _INFO_KINDS:
                value = _check_kind(f"episode_info[{key!r}]", value, _INFO_KINDS[key])
            info[key] = value
        self.episode_info = info
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a dict, got {type(self.meta).__name__}")
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as err:
            raise ValueError(f"meta must be JSON-serializable: {err}") from err

    def _sort_rows(self) -> None:
        e, t = self.episode, self.timestep
        if len(e) < 2:
            return
        ordered = (e[1:] > e[:-1]) | ((e[1:] == e[:-1]) & (t[1:] > t[:-1]))
        if ordered.all():
            return
        order = np.lexsort((t, e))  # by episode, then timestep
        e, t = e[order], t[order]
        dup = np.flatnonzero((e[1:] == e[:-1]) & (t[1:] == t[:-1]))
        if len(dup):
            raise ValueError(f"episode and timestep: duplicate pair (episode {e[dup[0]]}, "
                             f"timestep {t[dup[0]]})")
        for name in ROW_ARRAYS:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[order])
        self.extras = {k: v[order] for k, v in self.extras.items()}

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return self.observation.shape[0]

    def __repr__(self) -> str:
        arrays = ", ".join(f"{k} {v.shape[1:]} {v.dtype}" for k, v in self.arrays().items())
        return (f"TrajectorySet(N={len(self)}, E={len(self.episode_ids())}, arrays: {arrays}; "
                f"episode_info: {sorted(self.episode_info)}; meta: {sorted(self.meta)})")

    @property
    def dt(self) -> float | None:
        """``meta["dt"]`` (seconds per step) or ``None``."""
        dt = self.meta.get("dt")
        return None if dt is None else float(dt)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every per-transition array by name (absent optional ones left out, extras last)."""
        out = {k: getattr(self, k) for k in ROW_ARRAYS if getattr(self, k) is not None}
        out.update(self.extras)
        return out

    def tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every per-transition array as a tensor: floating ones cast to ``dtype``, integer,
        bool and uint8 ones kept."""
        return {k: torch.as_tensor(v, dtype=dtype if v.dtype.kind == "f" else None)
                for k, v in self.arrays().items()}

    def episode_ids(self) -> np.ndarray:
        """``(E,)`` sorted unique episode ids (``episode_info`` rows follow this order)."""
        e = self.episode
        if len(e) == 0:
            return e.copy()
        return e[np.r_[True, e[1:] != e[:-1]]]  # rows are sorted by episode

    def episode_slices(self) -> list[slice]:
        """Row slice of each episode, aligned with :meth:`episode_ids`."""
        e = self.episode
        if len(e) == 0:
            return []
        starts = np.flatnonzero(np.r_[True, e[1:] != e[:-1]])
        ends = np.r_[starts[1:], len(e)]
        return [slice(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]

    def episode_lengths(self) -> np.ndarray:
        """``(E,)`` rows per episode, aligned with :meth:`episode_ids`."""
        e = self.episode
        if len(e) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.diff(np.r_[np.flatnonzero(np.r_[True, e[1:] != e[:-1]]), len(e)])

    def _replace(self, rows: np.ndarray | slice, keep: np.ndarray | None = None
                 ) -> TrajectorySet:
        """The rows ``rows`` as a new set; ``keep``: mask of the ``episode_info`` rows kept."""
        kw = {k: getattr(self, k)[rows] for k in ROW_ARRAYS if getattr(self, k) is not None}
        kw["extras"] = {k: v[rows] for k, v in self.extras.items()}
        if keep is None:
            keep = np.isin(self.episode_ids(), np.unique(kw["episode"]))
        kw["episode_info"] = {k: v[keep] for k, v in self.episode_info.items()}
        return TrajectorySet(**kw, meta=dict(self.meta))

    def subset(self, rows: np.ndarray | slice | Sequence[int]) -> TrajectorySet:
        """The rows selected by ``rows`` (distinct indices, a bool mask of ``N`` or a slice),
        back in ``(episode, timestep)`` order; episode info is kept for the episodes that
        still have rows, meta is copied."""
        if not isinstance(rows, slice):
            rows = np.asarray(rows)
            if rows.dtype == np.bool_ and rows.shape != (len(self),):
                raise ValueError(f"rows as a mask must have shape ({len(self)},), got "
                                 f"{rows.shape}")
        return self._replace(rows)

    def select_episodes(self, ids: Iterable[int]) -> TrajectorySet:
        """The episodes with the given ids (each must exist)."""
        ids = np.asarray(list(ids), dtype=np.int64)
        known = self.episode_ids()
        missing = ids[~np.isin(ids, known)]
        if len(missing):
            raise ValueError(f"ids: episodes {missing[:5].tolist()} are not in the set")
        return self._replace(np.isin(self.episode, ids), keep=np.isin(known, ids))

    def stack_episodes(self, key: str) -> np.ndarray:
        """Per-transition array ``key`` as ``(E, L, ...)`` for episodes of equal length ``L``."""
        arrays = self.arrays()
        if key not in arrays:
            raise ValueError(f"key must be one of {sorted(arrays)}, got {key!r}")
        lengths = self.episode_lengths()
        if len(lengths) and (lengths != lengths[0]).any():
            raise ValueError(f"stack_episodes({key!r}) needs episodes of equal length, got "
                             f"lengths from {lengths.min()} to {lengths.max()}")
        L = int(lengths[0]) if len(lengths) else 0
        value = arrays[key]
        return value.reshape(len(lengths), L, *value.shape[1:])  # rows are episode-major

    def normalization_stats(self, keys: Sequence[str] = ("observation", "action")
                            ) -> dict[str, dict[str, list]]:
        """Per-element mean and standard deviation over rows of each floating array in
        ``keys``: ``{key: {"mean": [...], "std": [...]}}`` (trailing shape, as JSON lists;
        the raw std, which may be 0: clamp before dividing)."""
        arrays, out = self.arrays(), {}
        for key in keys:
            if key not in arrays or arrays[key].dtype.kind != "f":
                raise ValueError(f"keys: {key!r} is not a floating array of this set")
            v = arrays[key].astype(np.float64)
            if len(v) == 0:
                raise ValueError("normalization_stats needs at least one row")
            out[key] = {"mean": v.mean(0).tolist(), "std": v.std(0).tolist()}
        return out

    def with_cost_to_go(self) -> TrajectorySet:
        """A copy whose ``cost_to_go`` is the realized suffix sum of ``cost`` per episode."""
        if self.cost is None:
            raise ValueError("with_cost_to_go needs the cost array, which this set lacks")
        out = self._replace(slice(None))
        out.cost_to_go = cost_to_go(self.cost, self.episode)
        return out


# ---------------------------------------------------------------------------- merge
def _space(data: TrajectorySet) -> dict[str, tuple]:
    """What must agree for two sets to be merged: each array's trailing shape and dtype."""
    space = {k: (v.shape[1:], str(v.dtype)) for k, v in data.arrays().items()}
    space.update({_INFO_PREFIX + k: (v.shape[1:], str(v.dtype))
                  for k, v in data.episode_info.items()})
    return space


def _task_names(data: TrajectorySet, name: str) -> dict[str, str]:
    """``meta["task_names"]`` (``{task id: task name}``, ids as strings) or ``{}``."""
    value = data.meta.get("task_names") or {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{name}: meta 'task_names' must map task ids (strings) to names, got "
                         f"{value!r}")
    return value


def merged_task_names(sets: Sequence[TrajectorySet], names: Sequence[str]) -> dict[str, str]:
    """The union of the sets' ``meta["task_names"]`` (``{id: name}`` of a multi-task set),
    sorted by id; ``ValueError`` naming both sets where one id has two names or one name
    two ids."""
    union: dict[str, tuple[str, str]] = {}  # id -> (task name, set that named it)
    ids: dict[str, tuple[str, str]] = {}  # task name -> (id, set that named it)
    for data, name in zip(sets, names, strict=True):
        for k, task in _task_names(data, name).items():
            if k in union and union[k][0] != task:
                raise ValueError(f"{name}: meta 'task_names' maps task id {k} to {task!r} but "
                                 f"{union[k][1]}'s maps it to {union[k][0]!r}")
            if task in ids and ids[task][0] != k:
                raise ValueError(f"{name}: meta 'task_names' gives {task!r} the task id {k} but "
                                 f"{ids[task][1]}'s gives it {ids[task][0]}")
            union.setdefault(k, (task, name))
            ids.setdefault(task, (k, name))
    return {k: union[k][0] for k in sorted(union, key=lambda k: (len(k), k))}


def check_compatible(sets: Sequence[TrajectorySet], names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the source if ``sets`` differ in ``meta`` task / env id or
    ``dt`` (where both sets record it), in when their achieved goals are taken
    (``achieved_goal_at``), in the arrays they hold (per transition and per
    episode) or in those arrays' trailing shapes and dtypes. Multi-task sets (a ``task``
    array, ``meta["task_names"]``) may hold different tasks; they must not give one task id
    two names (:func:`merged_task_names`)."""
    first, ref = sets[0], _space(sets[0])
    merged_task_names(sets, names)
    for data, name in zip(sets[1:], names[1:], strict=True):
        for key in ("task", "env_id", "dt"):
            a, b = first.meta.get(key), data.meta.get(key)
            if a is None or b is None or a == b:
                continue
            if not (key == "dt" and np.isclose(float(a), float(b), rtol=1e-12, atol=0.0)):
                raise ValueError(f"{name}: meta {key!r} is {b!r} but {names[0]}'s is {a!r}")
        a, b = (d.meta.get("achieved_goal_at", "next") for d in (first, data))
        if a != b and first.achieved_goal is not None:
            raise ValueError(f"{name}: its achieved goals are the ones at {b!r} but "
                             f"{names[0]}'s at {a!r} (meta 'achieved_goal_at'): convert one "
                             f"first (goal_off_policy.achieved_goal_at_observation)")
        space = _space(data)
        if set(space) != set(ref):
            raise ValueError(f"{name}: arrays {sorted(space)} differ from {names[0]}'s "
                             f"{sorted(ref)}")
        for key, (shape, dtype) in space.items():
            if (shape, dtype) != ref[key]:
                raise ValueError(f"{name}: array {key!r} has trailing shape {shape} and dtype "
                                 f"{dtype}, {names[0]}'s has {ref[key][0]} and {ref[key][1]}")


def merge_trajectories(sets: Sequence[TrajectorySet], renumber: bool = False,
                       names: Sequence[str] | None = None) -> TrajectorySet:
    """One set holding every row of ``sets`` (checked with :func:`check_compatible`).

    Args:
        sets: the sets to merge (at least one).
        renumber: give episodes new consecutive ids ``0 .. E-1`` (in the order of ``sets``,
            then of ids) instead of requiring the ids of different sets to be disjoint.
        names: names of the sets for error messages (default ``set 0``, ``set 1``, ...).

    Returns:
        The merged set; ``meta`` is the first set's, with :data:`SUMMED_META_KEYS` summed,
        :data:`LISTED_META_KEYS` concatenated, ``task_names`` united (multi-task sets) and
        ``normalization`` recomputed for the same arrays.
    """
    sets = list(sets)
    if not sets:
        raise ValueError("sets must hold at least one TrajectorySet")
    names = [f"set {i}" for i in range(len(sets))] if names is None else list(names)
    if len(names) != len(sets):
        raise ValueError(f"names must have {len(sets)} entries, got {len(names)}")
    for data, name in zip(sets, names, strict=True):
        if not isinstance(data, TrajectorySet):
            raise ValueError(f"{name} must be a TrajectorySet, got {type(data).__name__}")
    check_compatible(sets, names)
    episodes = [d.episode for d in sets]
    if renumber:
        offset, episodes = 0, []
        for d in sets:  # ids are sorted and unique within a set: map them to offset + rank
            ids = d.episode_ids()
            episodes.append(offset + np.searchsorted(ids, d.episode))
            offset += len(ids)
    else:
        owner: dict[int, int] = {}
        for k, d in enumerate(sets):
            for i in d.episode_ids().tolist():
                if i in owner:
                    raise ValueError(f"episode id {i} is in both {names[owner[i]]} and "
                                     f"{names[k]}: ids must be unique across shards (merge "
                                     f"with renumber=True to renumber)")
                owner[i] = k
    kw = {k: np.concatenate([getattr(d, k) for d in sets]) for k in sets[0].arrays()
          if k in ROW_ARRAYS}
    kw["episode"] = np.concatenate(episodes)
    kw["extras"] = {k: np.concatenate([d.extras[k] for d in sets]) for k in sets[0].extras}
    # episode_info rows follow the sorted ids of the merged set
    ids = np.concatenate([e[np.r_[True, e[1:] != e[:-1]]] if len(e) else e for e in episodes])
    order = np.argsort(ids, kind="stable")
    kw["episode_info"] = {k: np.concatenate([d.episode_info[k] for d in sets])[order]
                          for k in sets[0].episode_info}
    meta = dict(sets[0].meta)
    for key in SUMMED_META_KEYS:
        if any(key in d.meta for d in sets):
            meta[key] = sum(d.meta.get(key, 0) for d in sets)
    for key in LISTED_META_KEYS:
        if any(key in d.meta for d in sets):
            meta[key] = [x for d in sets for x in d.meta.get(key, [])]
    if any("task_names" in d.meta for d in sets):
        meta["task_names"] = merged_task_names(sets, names)
    merged = TrajectorySet(**kw, meta=meta)
    if isinstance(meta.get("normalization"), dict) and len(merged):
        merged.meta["normalization"] = merged.normalization_stats(list(meta["normalization"]))
    return merged


# ---------------------------------------------------------------------------- files
def save_trajectories(path: str | os.PathLike, data: TrajectorySet,
                      compressed: bool = False) -> Path:
    """Write ``data`` to ``path`` (``.npz`` appended if missing) atomically; returns the path.

    ``compressed`` uses ``np.savez_compressed`` (worth it for ``images``)."""
    if not isinstance(data, TrajectorySet):
        raise ValueError(f"data must be a TrajectorySet, got {type(data).__name__}")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(data.arrays())
    payload.update({_INFO_PREFIX + k: v for k, v in data.episode_info.items()})
    payload["meta"] = np.asarray(json.dumps(data.meta, sort_keys=True))
    payload["format"] = np.asarray(FORMAT)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            (np.savez_compressed if compressed else np.savez)(fh, **payload)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a dataset is for every reader
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz trajectory set ({err})") from err


def _load_one(path: Path) -> tuple[TrajectorySet, bool]:
    """The set stored in ``path`` and whether the file is in the legacy layout."""
    stored = _read_npz(path)
    if "observation" not in stored and "states" in stored:
        try:
            return _from_legacy(stored, path), True
        except ValueError as err:
            raise ValueError(f"{path}: {err} (legacy layout)") from err
    missing = [k for k in (*REQUIRED, "meta") if k not in stored]
    if missing:
        raise ValueError(f"{path}: not a trajectory set: array {missing[0]!r} is missing "
                         f"(missing {missing}, found {sorted(stored)})")
    fmt = str(stored.pop("format", FORMAT))
    if fmt != FORMAT:
        raise ValueError(f"{path}: array 'format' is {fmt!r}, this reader knows {FORMAT!r}")
    meta = _parse_meta(stored.pop("meta"), path)
    info = {k[len(_INFO_PREFIX):]: stored.pop(k) for k in list(stored)
            if k.startswith(_INFO_PREFIX)}
    kw = {k: stored.pop(k) for k in ROW_ARRAYS if k in stored}
    try:
        return TrajectorySet(**kw, extras=stored, episode_info=info, meta=meta), False
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _parse_meta(raw: np.ndarray, path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(str(raw))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: array 'meta' is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: array 'meta' must be a JSON object, got "
                         f"{type(meta).__name__}")
    return meta


def load_trajectories(path: str | os.PathLike, progress: bool = False) -> TrajectorySet:
    """Read a trajectory ``.npz``, or every ``*.npz`` shard of a folder (name order, merged
    with :func:`merge_trajectories`: episode ids must be unique across shards; ``meta`` is
    the first file's plus ``files``, counts summed). ``progress`` shows a bar over shards.

    A folder of legacy files only gets consecutive episode ids, file after file: their ids
    were per file, and the first loader renumbered them the same way."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.glob("*.npz") if not f.name.startswith("."))
        if not files:
            raise ValueError(f"{path}: folder holds no .npz files")
        if progress:
            from tqdm.auto import tqdm

            files_iter: Iterable[Path] = tqdm(files, desc=f"loading {path.name}", unit="file")
        else:
            files_iter = files
        parts, legacy = zip(*(_load_one(f) for f in files_iter), strict=True)
        merged = merge_trajectories(parts, renumber=all(legacy), names=[str(f) for f in files])
        merged.meta["files"] = [f.name for f in files]
        return merged
    if not path.exists():
        raise ValueError(f"path {path} does not exist")
    return _load_one(path)[0]


def _from_legacy(stored: dict[str, np.ndarray], path: Path) -> TrajectorySet:
    """The first format's arrays (see :mod:`diffto.data.legacy`) as a :class:`TrajectorySet`."""
    meta = _parse_meta(stored.pop("meta"), path) if "meta" in stored else {}
    return TrajectorySet(**legacy_fields(stored, meta))
