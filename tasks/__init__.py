"""Environments, robot models and experts used by diffto's learning methods.

One folder per robot or task family (``classic``, ``go2``, ``panda``); the gymnasium ids of
the environments are listed once in :mod:`diffto.tasks.registry` and registered when an
environment is made, never as a side effect of an import.
"""
