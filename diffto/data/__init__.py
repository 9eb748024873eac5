"""Trajectory datasets and datamodules."""
