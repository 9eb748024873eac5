"""Expert MPC plans on a classic system, as a :class:`~diffto.data.trajectories.TrajectorySet`.

:func:`generate_expert_trajectories` solves one batched expert MPC from random initial
states; each converged plan of horizon ``T`` becomes an episode of ``T`` transitions (episode
id = the problem's index, so ids stay global when failures are left out). Its stage cost
``ℓ_t = ½(x_t−x_g)ᵀQ(x_t−x_g) + ½u_tᵀRu_t``, with the terminal ``½(x_T−x_g)ᵀQ(x_T−x_g)``
added to the last stage, is stored as ``cost`` and its suffix sums as ``cost_to_go``.
:class:`ExpertMPCDataModule` caches such a set as ``.npz`` and serves whole plans (the rows
the cost-imitation learner :class:`diffto.learning.imitation.MPCImitation` reads): ``x0 (n,)``,
``states (T+1, n)``, ``actions (T, m)``, ``goal (n,)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from diffto.data.trajectories import (
    FORMAT,
    TrajectorySet,
    cost_to_go,
    load_trajectories,
    save_trajectories,
)

__all__ = ["ExpertMPCDataModule", "generate_expert_trajectories", "make_system"]

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

    The expert minimizes ``Σ_t ½(x_t−x_g)ᵀdiag(q)(x_t−x_g) + ½u_tᵀdiag(r)u_t`` plus the
    terminal ``½(x_T−x_g)ᵀdiag(q)(x_T−x_g)`` under the system's dynamics and
    ``|u| <= u_bound``, from ``n_rows`` initial states drawn uniformly in
    ``[x0_low, x0_high]``. Rows whose solve did not converge are left out and counted in
    ``meta["episodes_failed"]``; if more than a quarter fail, the problem is ill-posed for
    this expert and ``ValueError`` is raised.

    Returns:
        A float64 :class:`TrajectorySet` of ``E`` episodes of ``T = horizon`` transitions:
        ``observation``/``next_observation (E*T, n)``, ``action (E*T, m)``,
        ``desired_goal (E*T, n)``, ``cost`` and ``cost_to_go (E*T,)``, ``truncated`` at each
        plan's last step; ``episode_info`` ``converged``, ``iterations``, ``length``;
        ``meta`` records every argument (``cost_weights`` ``{"q", "r"}`` and ``dynamics``,
        the expert's physical parameters, included).
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
    x, u = sol.x[ok].numpy(), sol.u[ok].numpy()  # (E, T+1, n), (E, T, m)
    E, T = x.shape[0], horizon
    dx = x - x_goal.numpy()
    stage = 0.5 * (dx[:, :-1] ** 2 @ q.numpy()) + 0.5 * (u ** 2 @ r.numpy())  # (E, T)
    stage[:, -1] += 0.5 * (dx[:, -1] ** 2 @ q.numpy())  # terminal cost on the last stage
    episode = np.repeat(np.flatnonzero(ok.numpy()).astype(np.int64), T)
    last = np.zeros((E, T), dtype=bool)
    last[:, -1] = True
    meta = {
        "kind": "expert_mpc", "task": system, "system": system, "horizon": horizon, "dt": dt,
        "u_bound": u_bound,
        "cost_weights": {"q": list(map(float, expert_q)), "r": list(map(float, expert_r))},
        "dynamics": dyn.physical_parameters(), "x0_low": list(map(float, x0_low)),
        "x0_high": list(map(float, x0_high)), "goal": x_goal.tolist(), "max_iter": max_iter,
        "seed": seed, "episodes_requested": n_rows, "episodes_failed": n_bad, "n_state": n,
        "n_ctrl": m, "versions": {"torch": torch.__version__, "numpy": np.__version__},
    }
    cost_t = stage.reshape(E * T)
    return TrajectorySet(
        observation=x[:, :-1].reshape(E * T, n),
        action=u.reshape(E * T, m),
        next_observation=x[:, 1:].reshape(E * T, n),
        episode=episode,
        timestep=np.tile(np.arange(T, dtype=np.int64), E),
        terminal=np.zeros(E * T, dtype=bool),
        truncated=last.reshape(E * T),
        desired_goal=np.broadcast_to(x_goal.numpy(), (E * T, n)).copy(),
        cost=cost_t,
        cost_to_go=cost_to_go(cost_t, episode),
        episode_info={
            "converged": np.ones(E, dtype=bool),
            "iterations": sol.iterations[ok].double().numpy(),
            "length": np.full(E, T, dtype=np.int64),
        },
        meta=meta,
    )


def plan_rows(data: TrajectorySet) -> dict[str, np.ndarray]:
    """Whole plans of a set of equal-length episodes: ``x0 (E, n)``, ``states (E, T+1, n)``,
    ``actions (E, T, m)``, ``goal (E, g)`` (the episode's first ``desired_goal``)."""
    if data.desired_goal is None:
        raise ValueError("data must have desired_goal to serve plans")
    if len(data) == 0:  # no episodes: zero rows of the right trailing shapes
        x, u, g = data.observation, data.action, data.desired_goal
        return {"x0": x, "states": x[:, None], "actions": u[:, None], "goal": g}
    obs = data.stack_episodes("observation")  # (E, T, n)
    nxt = data.stack_episodes("next_observation")
    states = np.concatenate([obs, nxt[:, -1:]], axis=1)  # (E, T+1, n)
    return {"x0": obs[:, 0], "states": states, "actions": data.stack_episodes("action"),
            "goal": data.stack_episodes("desired_goal")[:, 0]}


class _PlanDataset(Dataset):
    """Whole plans of a trajectory set as dicts of tensors (``x0``, ``states``, ``actions``,
    ``goal``), one item per episode."""

    def __init__(self, data: TrajectorySet, dtype: torch.dtype) -> None:
        self.items = {k: torch.as_tensor(v, dtype=dtype) for k, v in plan_rows(data).items()}

    def __len__(self) -> int:
        return self.items["x0"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.items.items()}


class ExpertMPCDataModule(L.LightningDataModule):
    """Expert MPC plans on a classic system, generated once and cached as ``.npz``.

    ``prepare_data`` makes ``n_train + n_val`` expert plans in one batched MPC solve (see
    :func:`generate_expert_trajectories`) unless the cache file already exists; ``setup``
    splits the episodes into training plans and held-out validation plans (different initial
    states). The cache file name is a hash of every generation argument and of the dataset
    format, so changing any of them regenerates, and a stale file is never read.

    Args:
        system: ``"pendulum"`` or ``"cartpole"``.
        n_train: training plans (initial states).
        n_val: held-out validation plans.
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
        batch_size: plans per training batch.
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
        self.train_set: _PlanDataset | None = None
        self.val_set: _PlanDataset | None = None

    @property
    def cache_path(self) -> Path:
        """``<cache_dir>/expert_<system>_<hash of the generation arguments>.npz``."""
        if self.cache_dir is not None:
            root = Path(self.cache_dir)
        elif self.trainer is not None:
            root = Path(self.trainer.default_root_dir) / "expert_data"
        else:
            root = Path("expert_data")
        key = json.dumps({**self.generation, "format": FORMAT}, sort_keys=True)
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
        ids = self.data.episode_ids()
        E = len(ids)
        n_val = min(self.n_val, max(E - 1, 0))
        self.train_set = _PlanDataset(self.data.select_episodes(ids[:E - n_val]), self.dtype)
        self.val_set = _PlanDataset(self.data.select_episodes(ids[E - n_val:]), self.dtype)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(len(self.val_set), 1), shuffle=False)
