"""The first trajectory-set format, read into the current one (:mod:`diffto.data.trajectories`).

Files of the first format (``states``, ``actions``, ``dt``, ``meta``, optional ``goals``,
``costs``, ``cost_to_go``, ``episode_ids``) load into the current one as follows:

* whole trajectories ``states (N, T+1, n)``, ``actions (N, T, m)``: each row becomes an
  episode of ``T`` transitions, ``observation = states[:, :-1]``,
  ``next_observation = states[:, 1:]``, ``action = actions``; ``episode = episode_ids`` (or
  the row index), ``terminal`` False and ``truncated`` True at the last step; ``goals (N, g)``
  becomes ``desired_goal`` (repeated over steps), per-step ``costs (N, T)`` become ``cost``,
  per-trajectory ``costs (N,)`` become ``episode_info["total_cost"]``, ``cost_to_go (N, T+1)``
  or ``(N, T)`` its first ``T`` steps; other arrays of shape ``(N, T, ...)`` or
  ``(N, T+1, ...)`` become per-step ``extras`` (first ``T`` steps), any others per-episode
  ``episode_info``;
* transitions ``states (N, n)``, ``actions (N, m)``: ``next_observation`` is the next row of
  the same episode (``episode_ids``, or one episode when absent), so the last row of each
  episode, which has no successor, is dropped; ``goals``, ``costs``, ``cost_to_go`` become
  ``desired_goal``, ``cost``, ``cost_to_go``; other arrays become ``extras``;
* ``dt`` goes to ``meta["dt"]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["legacy_fields"]


def legacy_fields(stored: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a ``TrajectorySet`` for the first format's arrays ``stored``
    (``meta`` already parsed; ``stored`` is consumed). Raises ``ValueError`` naming the array."""
    missing = [k for k in ("states", "actions") if k not in stored]
    if missing:
        raise ValueError(f"array {missing[0]!r} is missing (found {sorted(stored)})")
    if "dt" in stored:
        meta.setdefault("dt", float(stored.pop("dt")))
    states, actions = stored.pop("states"), stored.pop("actions")
    ids = stored.pop("episode_ids", None)
    goals, costs, ctg = (stored.pop(k, None) for k in ("goals", "costs", "cost_to_go"))
    N = states.shape[0] if states.ndim else 0
    for name, value in (("actions", actions), ("episode_ids", ids), ("goals", goals),
                        ("costs", costs), ("cost_to_go", ctg), *stored.items()):
        if value is not None and (value.ndim == 0 or value.shape[0] != N):
            raise ValueError(f"array {name!r} must have {N} rows like 'states', got shape "
                             f"{value.shape}")
    if states.ndim == 3:  # whole trajectories (N, T+1, n): row i is an episode of T steps
        T = states.shape[1] - 1
        if actions.ndim != 3 or actions.shape[1] != T:
            raise ValueError(f"array 'actions' must have shape (N, T, m) = ({N}, {T}, m) "
                             f"with 'states' {states.shape}, got {actions.shape}")
        ids = np.arange(N, dtype=np.int64) if ids is None else ids.astype(np.int64)
        if len(np.unique(ids)) != N:
            raise ValueError("array 'episode_ids' must be unique per trajectory")
        order = np.argsort(ids, kind="stable")  # episode_info rows follow sorted ids

        def steps(v: np.ndarray) -> np.ndarray:  # (N, T[+1], ...) -> (N*T, ...)
            return v[:, :T].reshape(N * T, *v.shape[2:])

        def per_step(v: np.ndarray) -> bool:
            return v.ndim >= 2 and v.shape[1] in (T, T + 1)

        last = np.zeros((N, T), dtype=bool)
        last[:, -1] = True
        kw: dict[str, Any] = {
            "observation": steps(states), "action": steps(actions),
            "next_observation": states[:, 1:].reshape(N * T, *states.shape[2:]),
            "episode": np.repeat(ids, T), "timestep": np.tile(np.arange(T), N),
            "terminal": np.zeros(N * T, dtype=bool), "truncated": last.reshape(-1),
        }
        info: dict[str, np.ndarray] = {"length": np.full(N, T, dtype=np.int64)}
        if goals is not None:
            kw["desired_goal"] = steps(goals) if per_step(goals) and goals.ndim == 3 else (
                np.repeat(goals.reshape(N, -1), T, axis=0))
        if costs is not None:
            if per_step(costs):
                kw["cost"] = steps(costs)
            else:
                info["total_cost"] = costs[order]
        if ctg is not None:
            if per_step(ctg):
                kw["cost_to_go"] = steps(ctg)
            else:
                info["cost_to_go"] = ctg[order]
        kw["extras"] = {k: steps(v) for k, v in stored.items() if per_step(v)}
        info.update({k: v[order] for k, v in stored.items() if not per_step(v)})
        return {**kw, "episode_info": info, "meta": meta}
    if states.ndim != 2 or actions.ndim != 2:
        raise ValueError(f"arrays 'states' and 'actions' must have shape (N, T+1, n) and "
                         f"(N, T, m), or (N, n) and (N, m); got {states.shape} and "
                         f"{actions.shape}")
    # transitions: the successor of row i is row i+1 of the same episode; rows without one
    # (each episode's last) are dropped
    ids = np.zeros(N, dtype=np.int64) if ids is None else ids.astype(np.int64)
    if N and np.count_nonzero(np.r_[True, ids[1:] != ids[:-1]]) != len(np.unique(ids)):
        raise ValueError("array 'episode_ids': the rows of each episode must be contiguous")
    has_next = np.r_[ids[1:] == ids[:-1], False] if N else np.zeros(0, dtype=bool)
    rows = np.flatnonzero(has_next)
    is_last = ~np.r_[has_next[1:], False][rows] if N else np.zeros(0, dtype=bool)
    starts = np.r_[True, ids[1:] != ids[:-1]] if N else np.zeros(0, dtype=bool)
    run = np.cumsum(starts) - 1
    first_row = np.flatnonzero(starts)
    kw = {"observation": states[rows], "action": actions[rows],
          "next_observation": states[rows + 1], "episode": ids[rows],
          "timestep": (np.arange(N) - first_row[run])[rows],
          "terminal": np.zeros(len(rows), dtype=bool), "truncated": is_last}
    for new, old in (("desired_goal", goals), ("cost", costs), ("cost_to_go", ctg)):
        if old is not None:
            kw[new] = old[rows]
    kw["extras"] = {k: v[rows] for k, v in stored.items()}
    return {**kw, "meta": meta}
