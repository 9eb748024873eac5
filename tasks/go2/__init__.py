"""Unitree Go2 quadruped: model, reference planner and tracking environment."""
