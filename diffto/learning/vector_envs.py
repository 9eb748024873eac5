"""Vectorized gymnasium environments for the RL modules that own their environments.

:func:`make_vector_env` builds ``num_envs`` copies of a registered id with same-step autoreset
(a finished env's last observation and info move to ``info["final_obs"]`` /
``info["final_info"]`` and the returned ones start the next episode); :func:`info_values`
reads one per-env ``info`` entry under that convention; :class:`IterationStream` is the
training "dataset" of a module whose data are its environments.
"""

from __future__ import annotations

import multiprocessing
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv
from torch.utils.data import IterableDataset

from diffto.tasks.registry import make_env

__all__ = ["make_vector_env", "info_values", "IterationStream"]


def make_vector_env(env_id: str, env_kwargs: dict[str, Any] | None, num_envs: int,
                    mode: Literal["async", "sync"] = "sync") -> VectorEnv:
    """``num_envs`` environments ``make_env(env_id, env_kwargs)``, in process (``"sync"``) or
    one subprocess each (``"async"``, forked where possible so workers inherit caches warmed
    in this process), with same-step autoreset."""
    if mode not in ("async", "sync"):
        raise ValueError(f"vector mode must be 'async' or 'sync', got {mode!r}")
    if not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    fns = [partial(make_env, env_id, dict(env_kwargs or {}))] * num_envs
    kwargs = {"autoreset_mode": AutoresetMode.SAME_STEP}
    if mode == "async":
        # spawn where fork does not exist; make_env registers the ids and picks the GL
        # back-end in the workers
        fork = "fork" in multiprocessing.get_all_start_methods()
        return AsyncVectorEnv(fns, context="fork" if fork else None, **kwargs)
    return SyncVectorEnv(fns, **kwargs)


def info_values(info: dict[str, Any], key: str, done: np.ndarray) -> np.ndarray:
    """Per-env values ``(E,)`` of ``info[key]`` at the step just taken (NaN where absent).
    With same-step autoreset a finished env's step info sits in ``info["final_info"]`` and
    its place in ``info`` holds the next episode's reset info."""
    out = np.full(done.shape, np.nan)
    if key in info:
        mask = info.get("_" + key, np.ones(done.shape, bool))
        out[mask] = np.asarray(info[key], dtype=np.float64)[mask]
    final = info.get("final_info")
    if isinstance(final, dict) and key in final:
        mask = final.get("_" + key, np.ones(done.shape, bool)) & done
        out[mask] = np.asarray(final[key], dtype=np.float64)[mask]
    return out


class IterationStream(IterableDataset):
    """One dummy item per training iteration, forever: the training data of a module that
    owns its environments and buffer (load it with ``num_workers=0``: a worker process would
    never see the module's buffer)."""

    def __iter__(self):
        while True:
            yield torch.zeros(())
