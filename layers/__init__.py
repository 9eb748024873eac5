"""Differentiable solver layers: one file per backend."""
