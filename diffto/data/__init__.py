"""Trajectory sets (one ``.npz`` format) and the datamodules built on them."""

from diffto.data.trajectories import (
    ExpertMPCDataModule,
    TrajectorySet,
    generate_expert_trajectories,
    load_trajectories,
    save_trajectories,
)

__all__ = [
    "TrajectorySet",
    "save_trajectories",
    "load_trajectories",
    "generate_expert_trajectories",
    "ExpertMPCDataModule",
]
