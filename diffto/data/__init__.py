"""The one dataset format (:class:`TrajectorySet` in ``.npz`` files) and the data built on it.

- :mod:`diffto.data.trajectories`: the format, its loader, writer and merge.
- :mod:`diffto.data.merge`: ``python -m diffto.data.merge OUT IN...`` for files.
- :mod:`diffto.data.expert_mpc`: expert MPC plans on classic systems and their datamodule.
"""

from diffto.data.expert_mpc import (
    ExpertMPCDataModule,
    generate_expert_trajectories,
    make_system,
)
from diffto.data.trajectories import (
    EVAL_SEED_BASE,
    TrajectorySet,
    cost_to_go,
    load_trajectories,
    merge_trajectories,
    save_trajectories,
)

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
]
