"""TO expert episodes as data: closed-loop receding-horizon MPC in lockstep, converged only.

:func:`run_expert_episodes` is the generator's core, free of Lightning: it runs a batch of
episodes of a goal environment, one environment per episode and one batched solve of the
expert (:class:`~diffto.tasks.mpc_expert.MPCExpert` in a
:class:`~diffto.tasks.mpc_expert.RecedingHorizon`) per control step, and returns the
transitions as a :class:`~diffto.data.trajectories.TrajectorySet` with the expert's open-loop
plan at every step. Only episodes whose every solve converged are kept; the others are
counted. :class:`diffto.data.to_dataset.TODatasetGenerator` runs it in ``predict_step``.

Per transition ``t`` of an episode: ``observation`` (the env's, at ``t``), ``action`` (the env
action that applies the plan's first control), ``next_observation``, ``desired_goal``,
``achieved_goal`` (the env's, at ``t + 1``), ``reward`` (the env's), ``cost`` (the expert's
stage cost ``ℓ(x_t, u_t; g)`` of the planning state and the control the env applied,
evaluated on the expert's own cost object: :func:`stage_cost`), ``cost_to_go`` (its realized
suffix sum), ``terminal``/``truncated`` (the env's; ``truncated`` also after the last of
``episode_length`` steps), ``plan (T, m)`` and the planning states ``state``/``next_state``
(``extras``: what a warm-start learner rolls out from).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from diffto.data.trajectories import TrajectorySet, cost_to_go
from diffto.tasks.mpc_expert import MPCExpert, RecedingHorizon
from diffto.tasks.registry import make_env

__all__ = ["stage_cost", "terminal_cost", "run_expert_episodes"]


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def stage_cost(expert: MPCExpert, state, control, goal) -> np.ndarray:
    """The expert's stage cost ``ℓ(x, u; g)`` of states ``(B, n)``, controls ``(B, m)`` and
    goals ``(B, g)``: ``(B,)`` float64, evaluated on the expert's own cost object.

    The cost protocol evaluates whole plans (stages plus terminal), so the stage is isolated
    as ``J([x, y], [u]) − J([y], [])`` with ``y = x``: a one-step plan's cost minus the
    terminal cost of its last state (a zero-step plan has only the terminal term).
    """
    x = torch.as_tensor(np.asarray(state), dtype=torch.float64)
    u = torch.as_tensor(np.asarray(control), dtype=torch.float64)
    g = torch.as_tensor(np.asarray(goal), dtype=torch.float64)
    with torch.no_grad():
        cost = expert.cost(g, 1)
        plan = torch.stack([x, x], 1)  # (B, 2, n)
        both = cost.evaluate(plan, u.unsqueeze(1))  # (B,) ℓ(x, u) + ℓ_T(x)
        terminal = cost.evaluate(plan[:, 1:], u.new_zeros(len(u), 0, u.shape[-1]))  # ℓ_T(x)
    return (both - terminal).double().cpu().numpy()


def terminal_cost(expert: MPCExpert, state, goal) -> np.ndarray:
    """The expert's terminal cost ``ℓ_T(x; g)`` of states ``(B, n)``: ``(B,)`` float64."""
    x = torch.as_tensor(np.asarray(state), dtype=torch.float64)
    g = torch.as_tensor(np.asarray(goal), dtype=torch.float64)
    with torch.no_grad():
        cost = expert.cost(g, 1)
        value = cost.evaluate(x.unsqueeze(1), x.new_zeros(len(x), 0, expert.n_ctrl))
    return value.double().cpu().numpy()


def _goal_obs(obs: Any, env_id: str) -> dict[str, np.ndarray]:
    if not isinstance(obs, dict) or not {"observation", "desired_goal", "achieved_goal"} <= set(
        obs
    ):
        raise ValueError(
            f"env_id {env_id!r}: TO datasets need a goal environment (dict observations with "
            f"observation, desired_goal, achieved_goal), got {type(obs).__name__}"
        )
    return {k: np.asarray(obs[k], dtype=np.float64).reshape(-1) for k in
            ("observation", "desired_goal", "achieved_goal")}


def run_expert_episodes(
    expert: MPCExpert,
    env_id: str,
    env_kwargs: dict[str, Any] | None,
    episodes: Sequence[int],
    seeds: Sequence[int],
    episode_length: int,
    warm_start: Literal["shifted", "cold"] = "shifted",
    store_plan: bool = True,
    images: bool = False,
    terminal_cost_at_end: bool = False,
    max_iter: int | None = None,
    first_max_iter: int | None = None,
) -> tuple[TrajectorySet | None, dict[str, Any]]:
    """Closed-loop receding-horizon episodes of ``expert``, in lockstep, as transitions.

    Args:
        expert: the MPC expert; one batched solve over the episodes per control step (rows
            whose episode ended keep their last state: the batch never changes).
        env_id, env_kwargs: the goal environment (:func:`~diffto.tasks.registry.make_env`).
        episodes: ``(E,)`` global episode ids (the rows' ``episode``).
        seeds: ``(E,)`` reset seeds, one per episode.
        episode_length: control steps per episode; the episode is ``truncated`` after its last
            step unless the environment ended it first (``terminal``, or its own truncation).
        warm_start: each solve starts from the row's previous plan shifted one step
            (``"shifted"``) or from the expert's cold start (``"cold"``).
        store_plan: keep the expert's open-loop controls ``plan (N, T, m)`` of every step.
        images: keep ``images (N, H, W, C)``, the rendered frame at step ``t`` (the
            environment is made with ``render_mode="rgb_array"`` unless ``env_kwargs`` says).
        terminal_cost_at_end: add the expert's terminal cost ``ℓ_T(x_L)`` of the final state
            to the last stage of a truncated episode, so ``cost_to_go`` is the plan's total
            (by default ``cost`` is the stage cost alone, the realized running cost).
        max_iter: iteration cap of each control step's solve; ``None``: the expert's.
        first_max_iter: iteration cap of the first step's solve, from the expert's cold start;
            ``None``: ``max_iter``. A receding-horizon loop converges in one or two
            iterations per step once its plan has, but the first solve starts from scratch.

    Returns:
        ``(data, counts)``: ``data`` holds the converged episodes only (zero rows when none
        converged; ``None`` when ``episodes`` is empty), with ``extras`` ``state`` and
        ``next_state`` (the expert's planning states ``(N, n)``) and per-episode
        ``converged``, ``iterations`` (mean per step), ``length``, ``seed``, ``success``
        (``info["is_success"]`` at the last step, when the env reports it), ``total_cost``
        and ``return``. ``counts``: ``episodes_requested``, ``episodes_failed``,
        ``failed_episodes`` (ids), ``solves``.
    """
    episodes, seeds = [int(e) for e in episodes], [int(s) for s in seeds]
    if len(episodes) != len(seeds):
        raise ValueError(f"episodes and seeds must have one entry each, got {len(episodes)} "
                         f"and {len(seeds)}")
    _int("episode_length", episode_length, 1)
    E = len(episodes)
    counts: dict[str, Any] = {"episodes_requested": E, "episodes_failed": 0,
                              "failed_episodes": [], "solves": 0}
    if E == 0:
        return None, counts
    kwargs = dict(env_kwargs or {})
    if images:
        kwargs.setdefault("render_mode", "rgb_array")
    envs = [make_env(env_id, kwargs) for _ in range(E)]
    try:
        obs = [_goal_obs(env.reset(seed=s)[0], env_id) for env, s in zip(envs, seeds, strict=True)]
        # Each row's first solve starts cold and may take up to first_max_iter iterations;
        # later ones start from the row's previous plan shifted one step ("shifted") or cold
        # again ("cold"). A row whose plan is not finite (a failed solve) is dropped from the
        # data anyway; it restarts cold so it cannot spoil the batch.
        controller = RecedingHorizon(expert, warm_start=warm_start, max_iter=max_iter,
                                     first_max_iter=first_max_iter)
        first_iterations = np.zeros(E)
        running = np.ones(E, bool)  # still stepping (not ended, not failed)
        failed = np.zeros(E, bool)
        steps: list[list[dict[str, Any]]] = [[] for _ in range(E)]
        success = np.full(E, np.nan)
        template: dict[str, Any] = {}  # one row's fields, for the shapes of an empty set
        for t in range(episode_length):
            if not running.any():
                break
            # Rows that ended keep their frozen state in the batch: the batch composition stays
            # fixed, so an episode's solves do not depend on when its neighbours ended.
            states = np.stack([expert.state_of(env.unwrapped) for env in envs])  # (E, n)
            goals = np.stack([o["desired_goal"] for o in obs])  # (E, g)
            actions, sol = controller.act(states, goals)  # (E, a), plans (E, T, m)
            if t == 0:
                first_iterations[:] = sol.iterations.cpu().numpy()
            counts["solves"] += int(running.sum())
            controls = expert.to_control(actions)  # (E, m): what the env applies
            ell = stage_cost(expert, states, controls, goals)  # (E,)
            converged = sol.converged.cpu().numpy().astype(bool)
            iterations = sol.iterations.cpu().numpy().astype(np.float64)
            plans = sol.u.detach().double().cpu().numpy()
            if not template:
                template = _row(obs[0], actions[0], obs[0], 0.0, 0.0, 0, False, False,
                                states[0], 0.0, plans[0] if store_plan else None,
                                envs[0].render() if images else None)
            for i in np.flatnonzero(running):
                if not converged[i] or not np.isfinite(actions[i]).all():
                    failed[i], running[i] = True, False
                    continue
                frame = envs[i].render() if images else None
                nxt, reward, term, trunc, info = envs[i].step(actions[i])
                nxt = _goal_obs(nxt, env_id)
                last = t == episode_length - 1
                steps[i].append(_row(
                    obs[i], actions[i], nxt, float(reward), float(ell[i]), t, bool(term),
                    bool(trunc or (last and not term)), states[i], iterations[i],
                    plans[i] if store_plan else None, frame,
                ))
                if "is_success" in info:
                    success[i] = float(info["is_success"])
                obs[i] = nxt
                if term or trunc or last:
                    running[i] = False
        final_states = np.stack([expert.state_of(env.unwrapped) for env in envs])
    finally:
        for env in envs:
            env.close()
    keep = [i for i in range(E) if not failed[i] and steps[i]]
    counts["failed_episodes"] = [episodes[i] for i in range(E) if failed[i]]
    counts["episodes_failed"] = len(counts["failed_episodes"])
    if terminal_cost_at_end:
        goals = np.stack([steps[i][-1]["desired_goal"] for i in keep])
        ends = terminal_cost(expert, final_states[keep], goals)
        for i, end in zip(keep, ends, strict=True):
            if steps[i][-1]["truncated"]:
                steps[i][-1]["cost"] += float(end)
    info = {"first_solve_iterations": first_iterations[keep]} if first_max_iter else {}
    return _to_set(steps, keep, episodes, seeds, success, final_states, template, info), counts


def _row(obs, action, next_obs, reward, cost, t, terminal, truncated, state, iterations, plan,
         frame) -> dict[str, Any]:
    """One transition's fields (``achieved_goal`` is the one reached at ``t + 1``)."""
    row = {
        "observation": obs["observation"], "action": np.asarray(action, dtype=np.float64),
        "next_observation": next_obs["observation"], "desired_goal": obs["desired_goal"],
        "achieved_goal": next_obs["achieved_goal"], "reward": reward, "cost": cost,
        "timestep": t, "terminal": terminal, "truncated": truncated,
        "state": np.asarray(state, dtype=np.float64), "iterations": iterations,
    }
    if plan is not None:
        row["plan"] = plan
    if frame is not None:
        row["images"] = np.asarray(frame, dtype=np.uint8)
    return row


def _to_set(steps, keep, episodes, seeds, success, final_states, template,
            extra_info) -> TrajectorySet:
    """The kept episodes' rows as a set; with none kept, a set of zero rows (same arrays)."""
    rows = [s for i in keep for s in steps[i]]
    col = {k: np.stack([np.asarray(r[k]) for r in rows or [template]])[: len(rows)]
           for k in template}
    episode = np.concatenate([np.zeros(0, np.int64)]
                             + [np.full(len(steps[i]), episodes[i], np.int64) for i in keep])
    state = col.pop("state").astype(np.float64)
    # next planning state: the next row's state within the episode, the final state at its end
    next_state = np.concatenate(
        [state[:0]] + [np.concatenate([state[:0]] + [s["state"][None] for s in steps[i][1:]]
                                      + [final_states[i][None]]) for i in keep]
    )
    cost = col["cost"].astype(np.float64)
    lengths = np.array([len(steps[i]) for i in keep], np.int64)
    owner = np.repeat(np.arange(len(keep)), lengths)  # (N,) position of each row's episode
    per_episode_cost = np.bincount(owner, weights=cost, minlength=len(keep)).astype(np.float64)
    per_episode_return = np.bincount(owner, weights=col["reward"].astype(np.float64),
                                     minlength=len(keep)).astype(np.float64)
    info = {
        "converged": np.ones(len(keep), bool),
        "iterations": np.array([np.mean([s["iterations"] for s in steps[i]]) for i in keep],
                               np.float64),
        "length": lengths,
        "seed": np.array([seeds[i] for i in keep], np.int64),
        "total_cost": per_episode_cost,
        "return": per_episode_return,
    }
    info.update(extra_info)
    if keep and not np.isnan(success[keep]).any():
        info["success"] = success[keep].astype(bool)
    return TrajectorySet(
        observation=col["observation"].astype(np.float64),
        action=col["action"].astype(np.float64),
        next_observation=col["next_observation"].astype(np.float64),
        episode=episode,
        timestep=col["timestep"].astype(np.int64),
        terminal=col["terminal"].astype(bool),
        truncated=col["truncated"].astype(bool),
        desired_goal=col["desired_goal"].astype(np.float64),
        achieved_goal=col["achieved_goal"].astype(np.float64),
        reward=col["reward"].astype(np.float64),
        cost=cost,
        cost_to_go=cost_to_go(cost, episode),
        plan=col["plan"].astype(np.float64) if "plan" in col else None,
        images=col["images"] if "images" in col else None,
        extras={"state": state, "next_state": next_state.astype(np.float64)},
        episode_info=info,
    )
