"""TO datasets generated like any Lightning job: ``lightning predict --config <task>_to_dataset``.

A trajectory-optimization expert (an :class:`~diffto.tasks.mpc_expert.MPCExpert` closed in a
:class:`~diffto.tasks.mpc_expert.RecedingHorizon` loop) runs episodes in its environment and
the transitions, with the expert's open-loop plan at every step, become a
:class:`~diffto.data.trajectories.TrajectorySet` written as shards::

    lightning predict --config pendulum_to_dataset.yaml          # or panda_to_dataset.yaml
    lightning predict --config pendulum_to_dataset.yaml --trainer.accelerator=cpu \\
        --trainer.strategy=ddp --trainer.devices=2          # each rank solves its own shards
    python -c "from diffto.data.trajectories import load_trajectories as load; \\
        print(load('runs/datasets/pendulum_swingup'))"

Three Lightning pieces:

* :class:`~diffto.data.shard_writer.TOProblems` (``data``): the problems. Dataset episode
  ``i`` (``0 <= i < episodes``) resets its environment with seed ``seed + i``; episodes are
  grouped in chunks of ``episodes_per_shard``, one chunk is one predict batch and one shard
  file ``episodes_<first>-<last>.npz`` in ``output_dir``. Chunks whose shard already exists
  are left out (resume after a kill).
* :class:`TODatasetGenerator` (``model``, this file): ``predict_step`` runs one chunk's
  episodes in lockstep (:func:`~diffto.data.to_expert.run_expert_episodes`: one environment
  per episode, one batched MPC solve per control step) and keeps the chunk's
  :class:`TrajectorySet` for the writer (:meth:`TODatasetGenerator.take_shard`).
  It returns nothing: Lightning keeps returned predictions in memory until the end.
* :class:`~diffto.data.shard_writer.TrajectoryShardWriter` (a ``BasePredictionWriter``
  callback, ``write_interval="batch"``): takes the shard after each batch and writes it with
  :func:`~diffto.data.trajectories.save_trajectories` (temporary file + ``os.replace``), so a
  kill leaves finished shards whole and no half-written file under a shard name.

Only converged episodes are expert data: an episode in which any control step's solve did
not converge is left out of its shard, and counted in the shard's ``meta["episodes_failed"]``
(and listed in ``meta["failed_episodes"]``); a shard in which every episode failed is still
written, with zero rows, so a resumed run does not redo it. ``load_trajectories(output_dir)``
merges the shards and sums the counts.

Under DDP (``--trainer.strategy=ddp``) each rank solves its own chunks, no chunk twice (see
:mod:`diffto.data.shard_writer`). Since an episode's data depend only on its index and the
chunking, the union of the shards is the same for any number of ranks.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch

from diffto.data.shard_writer import ShardProducer, shard_filename
from diffto.data.to_expert import _int, run_expert_episodes
from diffto.data.trajectories import TrajectorySet
from diffto.tasks.registry import build_expert

__all__ = ["TODatasetGenerator"]


def _versions() -> dict[str, str]:
    out = {}
    for name in ("diffto", "torch", "numpy", "mujoco", "gymnasium", "lightning"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: repr(v)))


class TODatasetGenerator(ShardProducer, L.LightningModule):
    """A TO expert as a ``LightningModule``: ``predict_step`` generates one shard.

    Args:
        env_id: the goal environment (gymnasium id, e.g. ``diffto/PendulumSwingUp-v0``).
        env_kwargs: keyword arguments of the environment.
        expert: ``{"class_path": ..., "init_args": {...}}`` of an
            :class:`~diffto.tasks.mpc_expert.MPCExpert`; ``None``: the env's default expert
            (:func:`~diffto.tasks.registry.make_expert`).
        episode_length: control steps per episode (then ``truncated``, unless the env ended it).
        warm_start: each MPC solve starts from the previous plan shifted one step
            (``"shifted"``, the receding-horizon default) or cold (``"cold"``).
        store_plan: store the expert's open-loop controls of every step (``plan (N, T, m)``,
            what a warm-start learner imitates).
        images: store the rendered frame of every step (``images (N, H, W, C)``; shards are
            then written compressed).
        terminal_cost_at_end: add the expert's terminal cost of the final state to the last
            stage of truncated episodes (see :func:`~diffto.data.to_expert.run_expert_episodes`).
        max_iter: iteration cap of each control step's solve; ``None``: the expert's.
        first_max_iter: iteration cap of an episode's first solve (from the cold start);
            ``None``: ``max_iter``.

    A batch from :class:`~diffto.data.shard_writer.TOProblems` is solved in
    :meth:`predict_step`; the resulting :class:`TrajectorySet` waits in the module until
    :class:`~diffto.data.shard_writer.TrajectoryShardWriter` takes it (:meth:`take_shard`);
    ``predict_step`` returns nothing.
    """

    def __init__(
        self,
        env_id: str,
        env_kwargs: dict[str, Any] | None = None,
        expert: dict[str, Any] | None = None,
        episode_length: int = 100,
        warm_start: Literal["shifted", "cold"] = "shifted",
        store_plan: bool = True,
        images: bool = False,
        terminal_cost_at_end: bool = False,
        max_iter: int | None = None,
        first_max_iter: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not isinstance(env_id, str) or not env_id:
            raise ValueError(f"env_id must be a gymnasium id string, got {env_id!r}")
        if env_kwargs is not None and not isinstance(env_kwargs, dict):
            raise ValueError(f"env_kwargs must be a dict or None, got {env_kwargs!r}")
        _int("episode_length", episode_length, 1)
        if warm_start not in ("shifted", "cold"):
            raise ValueError(f"warm_start must be 'shifted' or 'cold', got {warm_start!r}")
        self.env_id, self.env_kwargs = env_id, dict(env_kwargs or {})
        self.episode_length, self.warm_start = episode_length, warm_start
        self.store_plan, self.images = bool(store_plan), bool(images)
        self.terminal_cost_at_end = bool(terminal_cost_at_end)
        self.max_iter = None if max_iter is None else _int("max_iter", max_iter, 1)
        self.first_max_iter = (None if first_max_iter is None
                               else _int("first_max_iter", first_max_iter, 1))
        self.expert = build_expert(env_id, expert)
        self._shard: tuple[str, TrajectorySet] | None = None

    def settings(self) -> dict[str, Any]:
        """What determines the data (compared when a run resumes into an existing folder)."""
        # LightningCLI adds "_class_path" and "_instantiator" to hparams: not settings.
        return _jsonable({k: self.hparams[k] for k in sorted(self.hparams)
                          if not k.startswith("_")})

    def describe(self) -> dict[str, Any]:
        """The meta every shard carries: env, dt, expert (class, arguments, horizon, weights)."""
        expert = self.expert
        spec = self.hparams["expert"] or {"class_path": None, "init_args": {}}
        return _jsonable({
            "env_id": self.env_id,
            "task": self.env_id,
            "env_kwargs": self.env_kwargs,
            "dt": float(expert.dt),
            "dynamics": type(expert.dynamics).__name__,
            "expert": {
                "class_path": f"{type(expert).__module__}.{type(expert).__qualname__}",
                "init_args": spec.get("init_args") or {},
                "default_of_env": self.hparams["expert"] is None,
                "horizon": expert.horizon,
                "max_iter": expert.max_iter if self.max_iter is None else self.max_iter,
                "first_max_iter": self.first_max_iter,
                "tol": expert.tol,
                "repr": repr(expert),
            },
            "cost_weights": getattr(expert, "weights", None),
            "warm_start": self.warm_start,
            "episode_length": self.episode_length,
            "cost": "expert stage cost l(x_t, u_t; g) of the applied control"
                    + (", plus l_T(x_L) at a truncated episode's last step"
                       if self.terminal_cost_at_end else ""),
            "generator": self.settings(),
            "versions": _versions(),
        })

    def forward(self, episodes: Sequence[int], seeds: Sequence[int]):
        """Run the episodes; returns ``(TrajectorySet | None, counts)`` (see
        :func:`~diffto.data.to_expert.run_expert_episodes`)."""
        # Lightning predicts under inference mode; the MPC differentiates its cost with
        # autograd inside the solve, so tensors must be ordinary ones here.
        with torch.inference_mode(False):
            return run_expert_episodes(
                self.expert, self.env_id, self.env_kwargs, episodes, seeds, self.episode_length,
                warm_start=self.warm_start, store_plan=self.store_plan, images=self.images,
                terminal_cost_at_end=self.terminal_cost_at_end, max_iter=self.max_iter,
                first_max_iter=self.first_max_iter,
            )

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int = 0) -> None:
        """Solve the chunk's episodes and keep the shard for the writer; returns nothing, since
        Lightning keeps whatever ``predict_step`` returns in memory until the end."""
        if self._shard is not None:
            raise ValueError(
                f"the shard {self._shard[0]} was not written: add a TrajectoryShardWriter to "
                "trainer.callbacks"
            )
        episodes = [int(e) for e in batch["episode"].reshape(-1)]
        seeds = [int(s) for s in batch["seed"].reshape(-1)]
        if not episodes:  # padding chunk of a rank with nothing left to do
            return None
        start = time.perf_counter()
        data, counts = self(episodes, seeds)
        meta = self.describe()
        meta.update(counts)
        meta["seed_base"] = seeds[0] - episodes[0]
        meta["episode_range"] = [episodes[0], episodes[-1] + 1]
        meta["wall_time_s"] = round(time.perf_counter() - start, 3)
        if len(data):
            meta["normalization"] = data.normalization_stats(
                ["observation", "action", "desired_goal"])
        data.meta = _jsonable(meta)
        self._shard = (shard_filename(episodes[0], episodes[-1] + 1), data)
        return None

