"""Environments, robot models and experts used by diffto's learning methods."""
