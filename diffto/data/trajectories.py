"""The one trajectory-set format: a ``.npz`` of named arrays plus a ``meta`` JSON string.

A :class:`TrajectorySet` holds ``N`` rows, in one of two layouts:

* **whole trajectories** of equal length: ``states (N, T+1, n)``, ``actions (N, T, m)``
  (``states[:, 0]`` is the initial state, the last one is terminal);
* **transitions**: ``states (N, n)``, ``actions (N, m)``, usually with ``episode_ids (N,)``.

Optional arrays (any that are present must have ``N`` rows): ``goals``, ``costs``,
``cost_to_go``, ``episode_ids``. ``dt`` is a scalar. Any further named arrays travel along in
``extras``. ``meta`` is a JSON-serializable dict (how the data was made: system, expert
weights, seeds ...) stored as one JSON string so that loading never needs pickle.

:func:`save_trajectories` writes atomically (a temporary file in the same folder, then
``os.replace``), so a reader never sees a half-written file and concurrent writers of the same
cache entry are safe. :func:`load_trajectories` reads one file or a folder of them
(concatenated along rows; ``episode_ids`` are offset so they stay unique).

Expert data in this format: :func:`generate_expert_trajectories` solves one batched expert MPC
on a classic system (:func:`make_system`), and :class:`ExpertMPCDataModule` serves those plans
to Lightning, generated once and cached as ``.npz``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "TrajectorySet",
    "save_trajectories",
    "load_trajectories",
    "generate_expert_trajectories",
    "ExpertMPCDataModule",
    "make_system",
]

_OPTIONAL = ("goals", "costs", "cost_to_go", "episode_ids")
_RESERVED = ("states", "actions", "dt", "meta", *_OPTIONAL)


def _as_numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        kind = type(value).__name__
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {kind}")
    if value.dtype == object:
        raise ValueError(f"{name} must have a numeric dtype, got object")
    return value


@dataclass
class TrajectorySet:
    """Named arrays of ``N`` rows; see the module docstring for the two layouts.

    Attributes:
        states: ``(N, T+1, n)`` or ``(N, n)``.
        actions: ``(N, T, m)`` or ``(N, m)``.
        dt: time step in seconds.
        goals: ``(N, ...)`` or ``None``.
        costs: ``(N, ...)`` or ``None`` (per trajectory ``(N,)``, or per step).
        cost_to_go: ``(N, ...)`` or ``None``.
        episode_ids: ``(N,)`` integers or ``None``.
        extras: further named arrays, each with ``N`` rows.
        meta: JSON-serializable dict.

    Construction validates shapes and finiteness and raises ``ValueError`` naming the array.
    """

    states: np.ndarray
    actions: np.ndarray
    dt: float
    goals: np.ndarray | None = None
    costs: np.ndarray | None = None
    cost_to_go: np.ndarray | None = None
    episode_ids: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.states = _as_numpy("states", self.states)
        self.actions = _as_numpy("actions", self.actions)
        s, a = self.states, self.actions
        if s.ndim == 3:
            if a.ndim != 3 or a.shape[0] != s.shape[0] or a.shape[1] != s.shape[1] - 1:
                raise ValueError(
                    f"with states of shape (N, T+1, n) = {s.shape}, actions must have shape "
                    f"(N, T, m) = ({s.shape[0]}, {s.shape[1] - 1}, m), got {a.shape}"
                )
        elif s.ndim == 2:
            if a.ndim != 2 or a.shape[0] != s.shape[0]:
                raise ValueError(
                    f"with states of shape (N, n) = {s.shape}, actions must have shape "
                    f"({s.shape[0]}, m), got {a.shape}"
                )
        else:
            raise ValueError(f"states must have shape (N, T+1, n) or (N, n), got {s.shape}")
        N = s.shape[0]
        if not np.isfinite(s).all() or not np.isfinite(a).all():
            raise ValueError("states and actions must be finite (found NaN/Inf)")
        try:
            self.dt = float(self.dt)
        except (TypeError, ValueError) as err:
            raise ValueError(f"dt must be a positive float, got {self.dt!r}") from err
        if not (np.isfinite(self.dt) and self.dt > 0):
            raise ValueError(f"dt must be a positive float, got {self.dt}")
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                value = _as_numpy(name, value)
                if value.ndim == 0 or value.shape[0] != N:
                    raise ValueError(f"{name} must have N={N} rows, got shape {value.shape}")
                setattr(self, name, value)
        if self.episode_ids is not None and (
            self.episode_ids.ndim != 1 or not np.issubdtype(self.episode_ids.dtype, np.integer)
        ):
            raise ValueError(
                f"episode_ids must be integers of shape ({N},), got {self.episode_ids.dtype} "
                f"{self.episode_ids.shape}"
            )
        extras = {}
        for name, value in self.extras.items():
            if name in _RESERVED:
                raise ValueError(f"extras may not use the reserved name {name!r}")
            value = _as_numpy(f"extras[{name!r}]", value)
            if value.ndim == 0 or value.shape[0] != N:
                raise ValueError(f"extras[{name!r}] must have N={N} rows, got shape {value.shape}")
            extras[name] = value
        self.extras = extras
        try:
            json.dumps(self.meta)
        except TypeError as err:
            raise ValueError(f"meta must be JSON-serializable: {err}") from err

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def is_trajectories(self) -> bool:
        """True for the ``(N, T+1, n)`` layout, False for transitions."""
        return self.states.ndim == 3

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by its stored name (``None`` fields left out)."""
        out = {"states": self.states, "actions": self.actions}
        for name in _OPTIONAL:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update(self.extras)
        return out

    def tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every array as a tensor (floating arrays cast to ``dtype``, integers kept)."""
        return {
            k: torch.as_tensor(v, dtype=dtype if np.issubdtype(v.dtype, np.floating) else None)
            for k, v in self.arrays().items()
        }

    def subset(self, index: np.ndarray | slice) -> TrajectorySet:
        """Rows selected by ``index`` (same meta and dt)."""
        kw = {k: v[index] for k, v in self.arrays().items() if k not in ("states", "actions")}
        extras = {k: kw.pop(k) for k in list(kw) if k not in _OPTIONAL}
        return TrajectorySet(
            self.states[index], self.actions[index], self.dt, extras=extras, meta=self.meta, **kw
        )


def save_trajectories(path: str | os.PathLike, data: TrajectorySet) -> Path:
    """Write ``data`` to ``path`` (``.npz`` appended if missing) atomically; returns the path."""
    if not isinstance(data, TrajectorySet):
        raise ValueError(f"data must be a TrajectorySet, got {type(data).__name__}")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(data.arrays())
    payload["dt"] = np.asarray(data.dt, dtype=np.float64)
    payload["meta"] = np.asarray(json.dumps(data.meta, sort_keys=True))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _load_one(path: Path) -> TrajectorySet:
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable trajectory .npz ({err})") from err
    missing = [k for k in ("states", "actions", "dt", "meta") if k not in stored]
    if missing:
        raise ValueError(f"{path}: missing required arrays {missing} (found {sorted(stored)})")
    try:
        meta = json.loads(str(stored.pop("meta")))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: meta is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: meta must be a JSON object, got {type(meta).__name__}")
    optional = {k: stored.pop(k) for k in _OPTIONAL if k in stored}
    states, actions, dt = stored.pop("states"), stored.pop("actions"), stored.pop("dt")
    return TrajectorySet(states, actions, float(dt), extras=stored, meta=meta, **optional)


def load_trajectories(path: str | os.PathLike) -> TrajectorySet:
    """Read a trajectory ``.npz``, or every ``*.npz`` in a folder (sorted by name, rows
    concatenated; their ``dt`` must agree, ``meta`` is the first file's plus ``"files"``)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise ValueError(f"{path}: folder holds no .npz files")
        parts = [_load_one(f) for f in files]
        return _concatenate(parts, [f.name for f in files])
    if not path.exists():
        raise ValueError(f"path {path} does not exist")
    return _load_one(path)


def _concatenate(parts: list[TrajectorySet], names: list[str]) -> TrajectorySet:
    first = parts[0]
    keys = set(first.arrays())
    for part, name in zip(parts, names, strict=True):
        if part.dt != first.dt:
            raise ValueError(f"{name}: dt {part.dt} differs from {names[0]}'s {first.dt}")
        if set(part.arrays()) != keys:
            raise ValueError(f"{name}: arrays {sorted(part.arrays())} differ from {sorted(keys)}")
    merged: dict[str, np.ndarray] = {}
    for key in keys:
        chunks = [p.arrays()[key] for p in parts]
        if key == "episode_ids":
            # keep ids unique across files: shift each file past the previous maximum
            offset, shifted = 0, []
            for chunk in chunks:
                shifted.append(chunk - chunk.min() + offset if len(chunk) else chunk)
                offset = int(shifted[-1].max()) + 1 if len(chunk) else offset
            chunks = shifted
        try:
            merged[key] = np.concatenate(chunks, axis=0)
        except ValueError as err:
            raise ValueError(f"array {key!r} has incompatible shapes across files: {err}") from err
    optional = {k: merged.pop(k) for k in _OPTIONAL if k in merged}
    states, actions = merged.pop("states"), merged.pop("actions")
    meta = dict(first.meta, files=names)
    return TrajectorySet(states, actions, first.dt, extras=merged, meta=meta, **optional)


# --------------------------------------------------------------------------- expert MPC data
SystemName = Literal["pendulum", "cartpole"]


def make_system(name: SystemName, dt: float, params: dict[str, float] | None = None,
                learnable: Sequence[str] = ()) -> nn.Module:
    """A classic system by name: ``"pendulum"`` (n=2, m=1) or ``"cartpole"`` (n=4, m=1), with
    physical parameters overriding the defaults and ``learnable`` ones as ``nn.Parameter``."""
    from diffto.tasks.classic.cartpole import CartPole
    from diffto.tasks.classic.pendulum import Pendulum

    systems = {"pendulum": Pendulum, "cartpole": CartPole}
    if name not in systems:
        raise ValueError(f"system must be one of {sorted(systems)}, got {name!r}")
    cls = systems[name]
    params = dict(params or {})
    unknown = set(params) - set(cls._physical_names)
    if unknown:
        raise ValueError(
            f"{name} has physical parameters {list(cls._physical_names)}, got {sorted(unknown)}"
        )
    return cls(dt=dt, learnable=tuple(learnable), **params)


def generate_expert_trajectories(
    system: SystemName = "pendulum",
    n_rows: int = 256,
    horizon: int = 20,
    dt: float = 0.05,
    u_bound: float | None = 4.0,
    expert_q: Sequence[float] = (10.0, 1.0),
    expert_r: Sequence[float] = (0.1,),
    expert_dynamics: dict[str, float] | None = None,
    x0_low: Sequence[float] = (-0.6, -1.0),
    x0_high: Sequence[float] = (0.6, 1.0),
    goal: Sequence[float] | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> TrajectorySet:
    """Plans of an expert MPC from random initial states, in one batched solve.

    The expert minimizes ``Σ ½(x−x_g)ᵀdiag(q)(x−x_g) + ½uᵀdiag(r)u`` (terminal weight
    ``diag(q)``) under the system's dynamics and ``|u| <= u_bound``, from ``n_rows`` initial
    states drawn uniformly in ``[x0_low, x0_high]``. Rows whose solve did not converge are
    dropped (their count is in ``meta["n_unconverged"]``); if more than a quarter fail, the
    problem is ill-posed for this expert and ``ValueError`` is raised.

    Returns a :class:`TrajectorySet` of whole trajectories, float64: ``states (N, T+1, n)``,
    ``actions (N, T, m)``, ``goals (N, n)``, ``costs (N,)``, ``episode_ids (N,)``; ``meta``
    records every argument (the expert's weights included).
    """
    from diffto.layers.mpc import MPC
    from diffto.problem import QuadraticCost

    dyn = make_system(system, dt, expert_dynamics).double()
    n, m = dyn.n_state, dyn.n_ctrl
    vectors = {"expert_q": (expert_q, n), "x0_low": (x0_low, n), "x0_high": (x0_high, n),
               "expert_r": (expert_r, m)}
    if goal is not None:
        vectors["goal"] = (goal, n)
    for name, (value, size) in vectors.items():
        if len(value) != size:
            raise ValueError(f"{name} must have {size} entries for {system}, got {list(value)}")
    if min(expert_q) < 0 or min(expert_r) <= 0:
        raise ValueError(f"expert_q must be >= 0 and expert_r > 0, got {expert_q}, {expert_r}")
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    gen = torch.Generator().manual_seed(seed)
    lo = torch.tensor(x0_low, dtype=torch.float64)
    hi = torch.tensor(x0_high, dtype=torch.float64)
    if (lo > hi).any():
        raise ValueError(f"x0_low must be <= x0_high, got {list(x0_low)} and {list(x0_high)}")
    x0 = lo + (hi - lo) * torch.rand(n_rows, n, generator=gen, dtype=torch.float64)
    x_goal = torch.zeros(n, dtype=torch.float64) if goal is None else torch.tensor(
        goal, dtype=torch.float64)
    q = torch.tensor(expert_q, dtype=torch.float64)
    r = torch.tensor(expert_r, dtype=torch.float64)
    cost = QuadraticCost.tracking(torch.diag(q), torch.diag(r), horizon, x_goal=x_goal)
    bound = {} if u_bound is None else {"u_lower": -u_bound, "u_upper": u_bound}
    expert = MPC(dyn, horizon, max_iter=max_iter, **bound)
    with torch.no_grad():
        sol = expert(x0, cost)
    ok = sol.converged
    n_bad = int((~ok).sum())
    if n_bad > n_rows // 4:
        raise ValueError(
            f"the expert MPC did not converge on {n_bad} of {n_rows} rows: shrink "
            f"[x0_low, x0_high] or raise max_iter"
        )
    meta = {
        "kind": "expert_mpc", "system": system, "horizon": horizon, "dt": dt,
        "u_bound": u_bound, "expert_q": list(map(float, expert_q)),
        "expert_r": list(map(float, expert_r)),
        "expert_dynamics": dyn.physical_parameters(), "x0_low": list(map(float, x0_low)),
        "x0_high": list(map(float, x0_high)), "goal": x_goal.tolist(), "max_iter": max_iter,
        "seed": seed, "n_requested": n_rows, "n_unconverged": n_bad, "n_state": n, "n_ctrl": m,
    }
    return TrajectorySet(
        states=sol.x[ok].numpy(),
        actions=sol.u[ok].numpy(),
        dt=dt,
        goals=x_goal.expand(int(ok.sum()), n).numpy(),
        costs=sol.cost[ok].numpy(),
        episode_ids=np.arange(int(ok.sum()), dtype=np.int64),
        meta=meta,
    )


class _RowDataset(Dataset):
    """Rows of a trajectory set as dicts of tensors (``x0``, ``states``, ``actions``, ``goal``)."""

    def __init__(self, data: TrajectorySet, dtype: torch.dtype) -> None:
        t = data.tensors(dtype)
        self.items = {"x0": t["states"][:, 0], "states": t["states"], "actions": t["actions"],
                      "goal": t["goals"]}

    def __len__(self) -> int:
        return self.items["x0"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.items.items()}


class ExpertMPCDataModule(L.LightningDataModule):
    """Expert MPC trajectories on a classic system, generated once and cached as ``.npz``.

    ``prepare_data`` makes ``n_train + n_val`` expert plans in one batched MPC solve (see
    :func:`generate_expert_trajectories`) unless the cache file already exists; ``setup``
    splits them into training rows and held-out validation rows (different initial states).
    The cache file name is a hash of every generation argument, so changing any of them
    regenerates, and a stale file is never read.

    Args:
        system: ``"pendulum"`` or ``"cartpole"``.
        n_train: training rows (initial states).
        n_val: held-out validation rows.
        horizon: ``T`` of the expert's plans.
        dt: integration step of the system.
        u_bound: symmetric control bound of the expert (``None``: unbounded).
        expert_q: the expert's state weights, ``n`` numbers.
        expert_r: the expert's control weights, ``m`` numbers.
        expert_dynamics: the expert system's physical parameters (defaults otherwise).
        x0_low: lower corner of the initial-state box, ``n`` numbers.
        x0_high: upper corner of the initial-state box, ``n`` numbers.
        goal: the expert's goal state (default the origin: upright and at rest).
        max_iter: iteration cap of the expert's MPC.
        seed: seed of the initial states (independent of the training seed).
        batch_size: rows per training batch.
        dtype: dtype of the tensors served (``"float64"`` or ``"float32"``).
        cache_dir: where the ``.npz`` is cached; ``None`` means ``<default_root_dir>/expert_data``
            of the trainer (the current directory without a trainer).
    """

    def __init__(
        self,
        system: SystemName = "pendulum",
        n_train: int = 192,
        n_val: int = 64,
        horizon: int = 20,
        dt: float = 0.05,
        u_bound: float | None = 4.0,
        expert_q: list[float] | None = None,
        expert_r: list[float] | None = None,
        expert_dynamics: dict[str, float] | None = None,
        x0_low: list[float] | None = None,
        x0_high: list[float] | None = None,
        goal: list[float] | None = None,
        max_iter: int = 100,
        seed: int = 0,
        batch_size: int = 64,
        dtype: Literal["float64", "float32"] = "float64",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if n_train < 1 or n_val < 0 or batch_size < 1:
            raise ValueError(
                f"n_train and batch_size must be >= 1 and n_val >= 0, got {n_train}, {n_val}, "
                f"{batch_size}"
            )
        if dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
        n = {"pendulum": 2, "cartpole": 4}.get(system)
        if n is None:
            raise ValueError(f"system must be 'pendulum' or 'cartpole', got {system!r}")
        default_q = [10.0, 1.0] if n == 2 else [1.0, 10.0, 0.1, 0.1]
        default_box = [0.6, 1.0] if n == 2 else [0.5, 0.3, 0.5, 0.5]
        self.generation = {
            "system": system, "n_rows": n_train + n_val, "horizon": horizon, "dt": dt,
            "u_bound": u_bound,
            "expert_q": list(expert_q) if expert_q is not None else default_q,
            "expert_r": list(expert_r) if expert_r is not None else [0.1],
            "expert_dynamics": dict(expert_dynamics or {}),
            "x0_low": list(x0_low) if x0_low is not None else [-b for b in default_box],
            "x0_high": list(x0_high) if x0_high is not None else list(default_box),
            "goal": list(goal) if goal is not None else None,
            "max_iter": max_iter, "seed": seed,
        }
        self.n_train, self.n_val, self.batch_size = n_train, n_val, batch_size
        self.dtype = getattr(torch, dtype)
        self.cache_dir = cache_dir
        self.data: TrajectorySet | None = None
        self.train_set: _RowDataset | None = None
        self.val_set: _RowDataset | None = None

    @property
    def cache_path(self) -> Path:
        """``<cache_dir>/expert_<system>_<hash of the generation arguments>.npz``."""
        if self.cache_dir is not None:
            root = Path(self.cache_dir)
        elif self.trainer is not None:
            root = Path(self.trainer.default_root_dir) / "expert_data"
        else:
            root = Path("expert_data")
        key = json.dumps(self.generation, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return root / f"expert_{self.generation['system']}_{digest}.npz"

    @property
    def meta(self) -> dict[str, Any]:
        """The dataset's meta (expert weights and dynamics included); after ``setup``."""
        if self.data is None:
            raise RuntimeError("ExpertMPCDataModule.meta is available after setup()")
        return self.data.meta

    def prepare_data(self) -> None:
        path = self.cache_path
        if not path.exists():
            save_trajectories(path, generate_expert_trajectories(**self.generation))

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.prepare_data()  # no-op when cached; covers use without a Trainer
            self.data = load_trajectories(self.cache_path)
        N = len(self.data)
        n_val = min(self.n_val, max(N - 1, 0))
        self.train_set = _RowDataset(self.data.subset(slice(0, N - n_val)), self.dtype)
        self.val_set = _RowDataset(self.data.subset(slice(N - n_val, N)), self.dtype)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(len(self.val_set), 1), shuffle=False)
