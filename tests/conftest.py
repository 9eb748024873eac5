"""Shared test settings: hypothesis profiles sized for 2-core CI machines."""

import os

if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "osmesa"  # before any test module imports mujoco

from hypothesis import HealthCheck, settings

# Solves are slow next to hypothesis's defaults: no per-example deadline, few examples.
# Under CI the draws are derandomized, so a landing is reproducible; the thorough profile
# (HYPOTHESIS_PROFILE=thorough) explores with fresh draws and 200 examples per property.
settings.register_profile(
    "default",
    derandomize=os.environ.get("CI", "").lower() == "true",
    deadline=None,
    max_examples=15,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.register_profile(
    "thorough", parent=settings.get_profile("default"), derandomize=False, max_examples=200
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# One intra-op thread: the shared CI machine has 2 cores, and with MKL on this kind of machine
# batched LAPACK calls with 2 threads have been seen to return wrong results.
import torch  # noqa: E402

torch.set_num_threads(1)
