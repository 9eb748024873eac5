"""The problems of a TO dataset and the files they become: resumable shards on disk.

* :class:`TOProblems` (a ``LightningDataModule``): dataset episode ``i`` (``0 <= i <
  episodes``) resets its environment with seed ``seed + i``, so an episode is the same
  whoever solves it and whenever. Episodes are grouped in chunks of ``episodes_per_shard``;
  one chunk is one predict batch ``{"episode": (E,), "seed": (E,)}`` and one shard file
  ``episodes_<first>-<last>.npz`` (inclusive, 6 digits) in ``output_dir``
  (:func:`shard_filename`). Chunks whose shard already exists are left out: rerunning a
  killed job finishes it, and a run with more ``episodes`` (same chunking) extends a dataset.
  A subclass plans other chunks by overriding :meth:`TOProblems.shards`: a
  :class:`ShardChunk` may carry a task id (batches then hold ``"task": (E,)`` and the
  per-task index ``"index": (E,)``), an episode-id offset and a file-name prefix
  (``push-v3_episodes_000000-000015.npz``), so the shards of several tasks share one folder
  (:class:`diffto.data.metaworld_demos.MetaworldDemoProblems`).
* :class:`TrajectoryShardWriter` (a ``BasePredictionWriter``, ``write_interval="batch"``):
  after each batch, takes the module's shard and writes it with
  :func:`~diffto.data.trajectories.save_trajectories` (a hidden temporary file, then
  ``os.replace``): a kill leaves finished shards whole and never a file under a shard name
  that is half-written; the temporary file a kill may leave is not a shard name and is ignored.

Under DDP Lightning samples predict data with its ``UnrepeatedDistributedSamplerWrapper``
(lightning 2.6: rank ``r`` of ``W`` takes chunks ``r, r+W, ...``, no padding, no duplicate),
so each rank solves and writes its own shards. Each rank lists the finished shards in
:meth:`TOProblems.setup`; Lightning runs every rank's ``setup`` between two barriers
("pre_setup", "post_setup"), so all ranks see the same files before any rank writes one. When
fewer chunks remain than ranks, empty chunks are added (nothing is solved or written for
them): that sampler requires a batch on every rank.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from diffto.data.to_expert import _int
from diffto.data.trajectories import TrajectorySet, save_trajectories

__all__ = ["ShardChunk", "ShardProducer", "TOProblems", "TrajectoryShardWriter",
           "shard_filename"]

_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]*$")  # no "_": it ends the prefix
_SHARD = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9.\-]*_)?episodes_(\d{6,})-(\d{6,})\.npz$")


def shard_filename(first: int, stop: int, prefix: str = "") -> str:
    """File name of the shard of episodes ``first .. stop-1``: ``episodes_000000-000015.npz``,
    or ``<prefix>_episodes_000000-000015.npz`` (e.g. the task: ``push-v3_episodes_...``).

    Names sort by prefix, then by first episode; ``prefix`` holds letters, digits, ``.`` and
    ``-`` (no ``_``, which separates it)."""
    if prefix and not _PREFIX.match(prefix):
        raise ValueError(f"prefix must hold letters, digits, '.' and '-' only, got {prefix!r}")
    return f"{prefix + '_' if prefix else ''}episodes_{first:06d}-{stop - 1:06d}.npz"


class ShardChunk(NamedTuple):
    """One predict batch and one shard: dataset episodes ``first .. stop-1`` (of one task).

    Episode ``i`` of the chunk gets the id ``episode_offset + i`` and the reset seed
    ``seed + i`` (``seed`` of the datamodule), so its data depend on ``(task, i)`` only.
    """

    first: int
    stop: int
    task: int | None = None  # carried in the batch as "task" (E,) when not None
    prefix: str = ""  # file-name prefix of the shard (see shard_filename)
    episode_offset: int = 0

    @property
    def filename(self) -> str:
        return shard_filename(self.first, self.stop, self.prefix)


class _Chunks(Dataset):
    """Item ``k``: the batch of chunk ``k``, ``{"episode": (E,) int64, "seed": (E,) int64}``
    plus ``"task"`` and ``"index"`` (the dataset index ``i``), both ``(E,) int64``, for a
    chunk of a task."""

    def __init__(self, chunks: list[ShardChunk], seed: int) -> None:
        self.chunks, self.seed = chunks, seed

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        chunk = self.chunks[k]
        index = torch.arange(chunk.first, chunk.stop, dtype=torch.int64)
        batch = {"episode": index + chunk.episode_offset, "seed": index + self.seed}
        if chunk.task is not None:
            batch["task"] = torch.full_like(index, chunk.task)
            batch["index"] = index
        return batch


def _one(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # batch_size=1 over chunks: a batch is its one chunk (a chunk is already a batch of episodes)
    return items[0]


class TOProblems(L.LightningDataModule):
    """The problems of a TO dataset: episodes ``[0, episodes)`` in shards, resumable.

    Args:
        output_dir: folder of the shards (created when needed); ``load_trajectories`` reads it.
        episodes: number of dataset episodes; episode ``i`` resets with seed ``seed + i``.
        episodes_per_shard: episodes solved together (one batched MPC per control step) and
            written as one shard; the last shard may be smaller. Keep it fixed for a folder:
            shards of another chunking in ``output_dir`` are an error.
        seed: base of the reset seeds (evaluation uses
            :data:`~diffto.data.trajectories.EVAL_SEED_BASE` ``+ j``, far above).

    Batches are ``{"episode": (E,) int64, "seed": (E,) int64}``, one per pending shard.
    """

    def __init__(
        self,
        output_dir: str,
        episodes: int = 100,
        episodes_per_shard: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(output_dir, str | Path) or not str(output_dir):
            raise ValueError(f"output_dir must be a folder path, got {output_dir!r}")
        self.output_dir = Path(output_dir)
        self.episodes = _int("episodes", episodes, 1)
        self.episodes_per_shard = _int("episodes_per_shard", episodes_per_shard, 1)
        self.seed = _int("seed", seed, 0)
        self.pending: list[ShardChunk] | None = None

    def chunks(self) -> list[tuple[int, int]]:
        """``(first, stop)`` of every shard, in order."""
        k = self.episodes_per_shard
        return [(a, min(a + k, self.episodes)) for a in range(0, self.episodes, k)]

    def shards(self) -> list[ShardChunk]:
        """Every planned shard, in order: one :class:`ShardChunk` per :meth:`chunks` entry
        (a subclass plans chunks of several tasks here)."""
        return [ShardChunk(a, b) for a, b in self.chunks()]

    def finished(self) -> list[str]:
        """Names of the shard files in ``output_dir`` (temporary files are not shards)."""
        if not self.output_dir.is_dir():
            return []
        return sorted(p.name for p in self.output_dir.iterdir() if _SHARD.match(p.name))

    def setup(self, stage: str | None = None) -> None:
        """List the chunks whose shard is not in ``output_dir`` yet (every rank, before any
        writes: Lightning runs ``setup`` between barriers)."""
        planned = {c.filename: c for c in self.shards()}
        done = self.finished()
        stray = [name for name in done if name not in planned]
        if stray:
            raise ValueError(
                f"output_dir {str(self.output_dir)!r} holds shards of another chunking or size "
                f"({', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''}) than episodes="
                f"{self.episodes}, episodes_per_shard={self.episodes_per_shard}: use the same "
                "settings to resume, or a new output_dir"
            )
        self.pending = [c for name, c in planned.items() if name not in set(done)]
        rank_zero_info(
            f"dataset {self.output_dir}: {len(done)} of {len(planned)} shards exist, "
            f"{len(self.pending)} to generate ({sum(c.stop - c.first for c in self.pending)} "
            "episodes)"
        )

    def predict_dataloader(self) -> DataLoader:
        if self.pending is None:
            self.setup("predict")
        chunks = list(self.pending)
        world = self.trainer.world_size if self.trainer is not None else 1
        # Lightning's unrepeated sampler needs a batch on every rank: pad with empty chunks.
        chunks += [ShardChunk(0, 0)] * max(0, world - len(chunks))
        return DataLoader(_Chunks(chunks, self.seed), batch_size=1, shuffle=False,
                          collate_fn=_one)


class TrajectoryShardWriter(BasePredictionWriter):
    """Writes each batch's shard of a generator module atomically
    (:class:`~diffto.data.to_dataset.TODatasetGenerator`,
    :class:`~diffto.data.metaworld_demos.MetaworldDemoCollector`: the module hands it over
    with ``take_shard() -> (file name, set) | None``).

    Args:
        output_dir: folder of the shards; ``None``: the datamodule's ``output_dir``
            (:class:`TOProblems`), so a config names the folder once.

    Before the first batch it checks that shards already in the folder were made with the
    same generator settings (a resumed run must not mix two datasets in one folder).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.written: list[Path] = []

    def _folder(self, trainer: L.Trainer) -> Path:
        if self.output_dir is not None:
            return self.output_dir
        folder = getattr(trainer.datamodule, "output_dir", None)
        if folder is None:
            raise ValueError(
                "TrajectoryShardWriter needs output_dir, or a datamodule with one (TOProblems)"
            )
        return Path(folder)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not callable(getattr(pl_module, "take_shard", None)) or not callable(
            getattr(pl_module, "settings", None)
        ):
            raise ValueError(
                f"TrajectoryShardWriter writes the shards of a module with take_shard() and "
                f"settings() (TODatasetGenerator), got {type(pl_module).__name__}"
            )
        folder = self._folder(trainer)
        existing = (sorted(p for p in folder.iterdir() if _SHARD.match(p.name))
                    if folder.is_dir() else [])
        if existing:
            with np.load(existing[0], allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"]))
            old = {"generator": meta.get("generator"), "seed_base": meta.get("seed_base")}
            now = {"generator": pl_module.settings(),
                   "seed_base": getattr(trainer.datamodule, "seed", old["seed_base"])}
            if old != now:
                raise ValueError(
                    f"output_dir {str(folder)!r} holds shards made with other settings "
                    f"({existing[0].name}: {old}; now: {now}): use a new output_dir, or the "
                    "same settings to resume"
                )

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch,
                           batch_idx, dataloader_idx) -> None:
        shard = pl_module.take_shard()
        if shard is None:
            return
        name, data = shard
        path = save_trajectories(self._folder(trainer) / name, data,
                                 compressed=data.images is not None)
        self.written.append(path)


class ShardProducer:
    """What a ``LightningModule`` whose ``predict_step`` makes one shard per batch shares:
    the shard waits in ``self._shard`` until :class:`TrajectoryShardWriter` takes it
    (:meth:`take_shard`), and prediction refuses to start without that writer (the data would
    be made and dropped). Mix in before ``LightningModule``."""

    _shard: tuple[str, TrajectorySet] | None = None

    def take_shard(self) -> tuple[str, TrajectorySet] | None:
        """The last batch's ``(file name, shard)``, handed over once (``None`` if none)."""
        shard, self._shard = self._shard, None
        return shard

    def on_predict_start(self) -> None:
        # Lightning warns at every step whose predict_step returns None, "if it was on purpose,
        # ignore this warning": it is on purpose here (the writer holds the data).
        warnings.filterwarnings("ignore", message="predict returned None if it was on purpose")
        if not any(isinstance(cb, TrajectoryShardWriter) for cb in self.trainer.callbacks):
            raise ValueError(f"{type(self).__name__} writes nothing itself: add a "
                             f"TrajectoryShardWriter to trainer.callbacks")
