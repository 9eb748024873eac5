"""The one dataset format (:class:`TrajectorySet` in ``.npz`` files) and the data built on it.

- :mod:`diffto.data.trajectories`: the format, its loader, writer and merge.
- :mod:`diffto.data.merge`: ``python -m diffto.data.merge OUT IN...`` for files.
- :mod:`diffto.data.legacy`: the first format's files, read into this one.
- :mod:`diffto.data.expert_mpc`: expert MPC plans on classic systems and their datamodule.
- :mod:`diffto.data.to_dataset`, :mod:`diffto.data.shard_writer`, :mod:`diffto.data.to_expert`:
  TO datasets as ``lightning predict`` jobs (closed-loop MPC episodes, atomic shards, resume,
  ranks sharing the work).
- :mod:`diffto.data.metaworld_demos`: Metaworld scripted-expert demonstrations of many tasks
  as a ``lightning predict`` job on the same shards.

The datamodules import Lightning, which the format does not need: they load on first access,
so reading or merging datasets stays light.
"""

from importlib import import_module
from typing import Any

from diffto.data.trajectories import (
    EVAL_SEED_BASE,
    TrajectorySet,
    cost_to_go,
    load_trajectories,
    merge_trajectories,
    save_trajectories,
)

_LAZY = {
    "generate_expert_trajectories": "diffto.data.expert_mpc",
    "make_system": "diffto.data.expert_mpc",
    "ExpertMPCDataModule": "diffto.data.expert_mpc",
    "TODatasetGenerator": "diffto.data.to_dataset",
    "TOProblems": "diffto.data.shard_writer",
    "TrajectoryShardWriter": "diffto.data.shard_writer",
    "run_expert_episodes": "diffto.data.to_expert",
    "ShardChunk": "diffto.data.shard_writer",
    "MetaworldDemoCollector": "diffto.data.metaworld_demos",
    "MetaworldDemoProblems": "diffto.data.metaworld_demos",
    "collect_demos": "diffto.data.metaworld_demos",
}

__all__ = [
    # the format
    "TrajectorySet",
    "save_trajectories",
    "load_trajectories",
    "merge_trajectories",
    "cost_to_go",
    "EVAL_SEED_BASE",
    # expert MPC data on classic systems
    "generate_expert_trajectories",
    "make_system",
    "ExpertMPCDataModule",
    # TO datasets (lightning predict)
    "TODatasetGenerator",
    "TOProblems",
    "TrajectoryShardWriter",
    "ShardChunk",
    "run_expert_episodes",
    # Metaworld demonstrations (lightning predict)
    "MetaworldDemoCollector",
    "MetaworldDemoProblems",
    "collect_demos",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffto.data' has no attribute {name!r}")
