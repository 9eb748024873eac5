"""TO datasets generated like any Lightning job: ``lightning predict --config <task>_to_dataset``.

A trajectory-optimization expert (an :class:`~diffto.tasks.mpc_expert.MPCExpert` closed in a
:class:`~diffto.tasks.mpc_expert.RecedingHorizon` loop) runs episodes in its environment and
the transitions, with the expert's open-loop plan at every step, become a
:class:`~diffto.data.trajectories.TrajectorySet` written as shards::

    lightning predict --config pendulum_to_dataset.yaml
    lightning predict --config pendulum_to_dataset.yaml --trainer.accelerator=cpu \\
        --trainer.strategy=ddp --trainer.devices=2          # each rank solves its own shards
    python -c "from diffto.data.trajectories import load_trajectories as load; \\
        print(load('runs/datasets/pendulum_swingup'))"

Three Lightning pieces, each one concept:

* :class:`TOProblems` (``data``): the problems. Dataset episode ``i`` (``0 <= i < episodes``)
  resets its environment with seed ``seed + i``, so an episode is the same whoever solves it
  and whenever. Episodes are grouped in chunks of ``episodes_per_shard``; one chunk is one
  predict batch and one shard file ``episodes_<first>-<last>.npz`` (inclusive, 6 digits) in
  ``output_dir``. Chunks whose shard already exists are left out (resume after a kill).
* :class:`TODatasetGenerator` (``model``): ``predict_step`` runs one chunk's episodes in
  lockstep (one environment per episode, one batched MPC solve per control step) and keeps
  the chunk's :class:`TrajectorySet` for the writer (:meth:`TODatasetGenerator.take_shard`).
  It returns only a few counts: Lightning keeps returned predictions in memory, and a
  ``None`` return makes it warn on every run.
* :class:`TrajectoryShardWriter` (a ``BasePredictionWriter`` callback, ``write_interval``
  "batch"): takes the shard after each batch and writes it with
  :func:`~diffto.data.trajectories.save_trajectories` (temporary file + ``os.replace``), so a
  kill leaves finished shards whole and no half-written file under a shard name.

Only converged episodes are expert data (:func:`run_expert_episodes`): an episode in which
any control step's solve did not converge is left out of its shard, and counted in the
shard's ``meta["episodes_failed"]`` (and listed in ``meta["failed_episodes"]``); a shard in
which every episode failed is still written, with zero rows, so a resumed run does not redo
it. ``load_trajectories(output_dir)`` merges the shards and sums the counts.

Under DDP (``--trainer.strategy=ddp``) Lightning samples predict data with its
``UnrepeatedDistributedSamplerWrapper`` (lightning 2.6: ranks take chunks ``r, r+W, ...``, no
padding, no duplicate), so each rank solves its own chunks and writes their shards. Each
rank lists the finished shards in :meth:`TOProblems.setup`; Lightning runs every rank's
``setup`` between two barriers ("pre_setup", "post_setup"), so all ranks see the same files
before any rank writes one. When fewer chunks remain than ranks, empty chunks are added
(nothing is solved or written for them): that sampler requires at least one batch per rank.
Since an episode's data depend only on its index and the chunking, the union of the shards
is the same for any number of ranks.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from diffto.data.trajectories import TrajectorySet, cost_to_go, save_trajectories
from diffto.tasks.mpc_expert import MPCExpert, RecedingHorizon
from diffto.tasks.registry import make_env, make_expert

__all__ = [
    "TOProblems",
    "TODatasetGenerator",
    "TrajectoryShardWriter",
    "run_expert_episodes",
    "stage_cost",
    "build_expert",
    "shard_filename",
]

_SHARD = re.compile(r"^episodes_(\d{6,})-(\d{6,})\.npz$")


def shard_filename(first: int, stop: int) -> str:
    """File name of the shard of episodes ``first .. stop-1``: ``episodes_000000-000015.npz``."""
    return f"episodes_{first:06d}-{stop - 1:06d}.npz"


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


# ------------------------------------------------------------------------------ expert
def build_expert(env_id: str, expert: dict[str, Any] | None = None) -> MPCExpert:
    """The expert of a config: ``{"class_path": ..., "init_args": {...}}``, or ``None`` for the
    default expert of ``env_id`` (:func:`diffto.tasks.registry.make_expert`)."""
    if expert is None:
        built = make_expert(env_id)
    elif isinstance(expert, dict) and isinstance(expert.get("class_path"), str):
        extra = set(expert) - {"class_path", "init_args"}
        if extra:
            raise ValueError(f"expert takes the keys class_path and init_args, got {sorted(extra)}")
        built = instantiate_class((), {"class_path": expert["class_path"],
                                       "init_args": dict(expert.get("init_args") or {})})
    else:
        raise ValueError(
            f"expert must be None or a dict {{class_path, init_args}}, got {expert!r}"
        )
    if not isinstance(built, MPCExpert):
        raise ValueError(f"expert must build an MPCExpert, got {type(built).__name__}")
    return built


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


# ----------------------------------------------------------------------------- rollouts
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
        expert: the MPC expert; one batched solve over the running episodes per step.
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
        # The controller takes its warm starts from `propose`: the first step's long solve
        # from the cold start, then each row's previous plan shifted one step ("shifted") or
        # the cold start again ("cold"). A row whose plan is not finite (a failed solve) is
        # dropped from the data anyway; it restarts cold so it cannot spoil the batch.
        previous: dict[str, torch.Tensor] = {}
        first_iterations = np.zeros(E)

        def propose(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            cold = expert.initial_controls(x, g, expert.horizon)
            if "plan" not in previous:
                if first_max_iter is None:
                    return cold
                first = expert.solve(x, g, u_init=cold, max_iter=first_max_iter)
                first_iterations[:] = first.iterations.cpu().numpy()
                return first.u.detach()
            if warm_start == "cold":
                return cold
            plan = previous["plan"]  # (E, T, m)
            shifted = torch.cat([plan[:, 1:], plan[:, -1:]], 1)
            finite = torch.isfinite(shifted).flatten(1).all(1).view(-1, 1, 1)
            return torch.where(finite, shifted, cold)

        controller = RecedingHorizon(expert, warm_start="policy", proposer=propose,
                                     max_iter=max_iter)
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
            previous["plan"] = sol.u.detach()
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


# ------------------------------------------------------------------------------ Lightning
class _Chunks(Dataset):
    """Item ``k``: the batch of chunk ``k``, ``{"episode": (E,) int64, "seed": (E,) int64}``."""

    def __init__(self, chunks: list[tuple[int, int]], seed: int) -> None:
        self.chunks, self.seed = chunks, seed

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        first, stop = self.chunks[k]
        episode = torch.arange(first, stop, dtype=torch.int64)
        return {"episode": episode, "seed": episode + self.seed}


def _one(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # batch_size=1 over chunks: a batch is its one chunk (a chunk is already a batch of episodes)
    return items[0]


class TOProblems(L.LightningDataModule):
    """The problems of a TO dataset: episodes ``[0, episodes)`` in shards, resumable.

    Args:
        output_dir: folder of the shards (created when needed); ``load_trajectories`` reads it.
        episodes: number of dataset episodes; episode ``i`` resets with seed ``seed + i``.
        episodes_per_shard: episodes solved together (one batched MPC per control step) and
            written as one shard; the last shard may be smaller. Keep it fixed for a folder:
            shards of another chunking in ``output_dir`` are an error.
        seed: base of the reset seeds (evaluation uses
            :data:`~diffto.data.trajectories.EVAL_SEED_BASE` ``+ j``, far above).

    Batches are ``{"episode": (E,) int64, "seed": (E,) int64}``, one per pending shard.
    """

    def __init__(
        self,
        output_dir: str,
        episodes: int = 100,
        episodes_per_shard: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(output_dir, str | Path) or not str(output_dir):
            raise ValueError(f"output_dir must be a folder path, got {output_dir!r}")
        self.output_dir = Path(output_dir)
        self.episodes = _int("episodes", episodes, 1)
        self.episodes_per_shard = _int("episodes_per_shard", episodes_per_shard, 1)
        self.seed = _int("seed", seed, 0)
        self.pending: list[tuple[int, int]] | None = None

    def chunks(self) -> list[tuple[int, int]]:
        """``(first, stop)`` of every shard, in order."""
        k = self.episodes_per_shard
        return [(a, min(a + k, self.episodes)) for a in range(0, self.episodes, k)]

    def finished(self) -> list[str]:
        """Names of the shard files in ``output_dir`` (temporary files are not shards)."""
        if not self.output_dir.is_dir():
            return []
        return sorted(p.name for p in self.output_dir.iterdir() if _SHARD.match(p.name))

    def setup(self, stage: str | None = None) -> None:
        """List the chunks whose shard is not in ``output_dir`` yet (every rank, before any
        writes: Lightning runs ``setup`` between barriers)."""
        planned = {shard_filename(a, b): (a, b) for a, b in self.chunks()}
        done = self.finished()
        stray = [name for name in done if name not in planned]
        if stray:
            raise ValueError(
                f"output_dir {str(self.output_dir)!r} holds shards of another chunking or size "
                f"({', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''}) than episodes="
                f"{self.episodes}, episodes_per_shard={self.episodes_per_shard}: use the same "
                "settings to resume, or a new output_dir"
            )
        self.pending = [c for name, c in planned.items() if name not in set(done)]
        rank_zero_info(
            f"TO dataset {self.output_dir}: {len(done)} of {len(planned)} shards exist, "
            f"{len(self.pending)} to generate ({sum(b - a for a, b in self.pending)} episodes)"
        )

    def predict_dataloader(self) -> DataLoader:
        if self.pending is None:
            self.setup("predict")
        chunks = list(self.pending)
        world = self.trainer.world_size if self.trainer is not None else 1
        # Lightning's unrepeated sampler needs a batch on every rank: pad with empty chunks.
        chunks += [(0, 0)] * max(0, world - len(chunks))
        return DataLoader(_Chunks(chunks, self.seed), batch_size=1, shuffle=False,
                          collate_fn=_one)


def _versions() -> dict[str, str]:
    out = {}
    for name in ("diffto", "torch", "numpy", "mujoco", "gymnasium", "lightning"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: repr(v)))


class TODatasetGenerator(L.LightningModule):
    """A TO expert as a ``LightningModule``: ``predict_step`` generates one shard.

    Args:
        env_id: the goal environment (gymnasium id, e.g. ``diffto/PendulumSwingUp-v0``).
        env_kwargs: keyword arguments of the environment.
        expert: ``{"class_path": ..., "init_args": {...}}`` of an
            :class:`~diffto.tasks.mpc_expert.MPCExpert`; ``None``: the env's default expert
            (:func:`~diffto.tasks.registry.make_expert`).
        episode_length: control steps per episode (then ``truncated``, unless the env ended it).
        warm_start: each MPC solve starts from the previous plan shifted one step
            (``"shifted"``, the receding-horizon default) or cold (``"cold"``).
        store_plan: store the expert's open-loop controls of every step (``plan (N, T, m)``,
            what a warm-start learner imitates).
        images: store the rendered frame of every step (``images (N, H, W, C)``; shards are
            then written compressed).
        terminal_cost_at_end: add the expert's terminal cost of the final state to the last
            stage of truncated episodes (see :func:`run_expert_episodes`).
        max_iter: iteration cap of each control step's solve; ``None``: the expert's.
        first_max_iter: iteration cap of an episode's first solve (from the cold start);
            ``None``: ``max_iter``.

    A batch from :class:`TOProblems` is solved in :meth:`predict_step`; the resulting
    :class:`TrajectorySet` waits in the module until :class:`TrajectoryShardWriter` takes it
    (:meth:`take_shard`); ``predict_step`` returns only the shard's counts.
    """

    def __init__(
        self,
        env_id: str,
        env_kwargs: dict[str, Any] | None = None,
        expert: dict[str, Any] | None = None,
        episode_length: int = 100,
        warm_start: Literal["shifted", "cold"] = "shifted",
        store_plan: bool = True,
        images: bool = False,
        terminal_cost_at_end: bool = False,
        max_iter: int | None = None,
        first_max_iter: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not isinstance(env_id, str) or not env_id:
            raise ValueError(f"env_id must be a gymnasium id string, got {env_id!r}")
        if env_kwargs is not None and not isinstance(env_kwargs, dict):
            raise ValueError(f"env_kwargs must be a dict or None, got {env_kwargs!r}")
        _int("episode_length", episode_length, 1)
        if warm_start not in ("shifted", "cold"):
            raise ValueError(f"warm_start must be 'shifted' or 'cold', got {warm_start!r}")
        self.env_id, self.env_kwargs = env_id, dict(env_kwargs or {})
        self.episode_length, self.warm_start = episode_length, warm_start
        self.store_plan, self.images = bool(store_plan), bool(images)
        self.terminal_cost_at_end = bool(terminal_cost_at_end)
        self.max_iter = None if max_iter is None else _int("max_iter", max_iter, 1)
        self.first_max_iter = (None if first_max_iter is None
                               else _int("first_max_iter", first_max_iter, 1))
        self.expert = build_expert(env_id, expert)
        self._shard: tuple[str, TrajectorySet] | None = None

    def settings(self) -> dict[str, Any]:
        """What determines the data (compared when a run resumes into an existing folder)."""
        # LightningCLI adds "_class_path" and "_instantiator" to hparams: not settings.
        return _jsonable({k: self.hparams[k] for k in sorted(self.hparams)
                          if not k.startswith("_")})

    def describe(self) -> dict[str, Any]:
        """The meta every shard carries: env, dt, expert (class, arguments, horizon, weights)."""
        expert = self.expert
        spec = self.hparams["expert"] or {"class_path": None, "init_args": {}}
        return _jsonable({
            "env_id": self.env_id,
            "task": self.env_id,
            "env_kwargs": self.env_kwargs,
            "dt": float(expert.dt),
            "dynamics": type(expert.dynamics).__name__,
            "expert": {
                "class_path": f"{type(expert).__module__}.{type(expert).__qualname__}",
                "init_args": spec.get("init_args") or {},
                "default_of_env": self.hparams["expert"] is None,
                "horizon": expert.horizon,
                "max_iter": expert.max_iter if self.max_iter is None else self.max_iter,
                "first_max_iter": self.first_max_iter,
                "tol": expert.tol,
                "repr": repr(expert),
            },
            "cost_weights": getattr(expert, "weights", None),
            "warm_start": self.warm_start,
            "episode_length": self.episode_length,
            "cost": "expert stage cost l(x_t, u_t; g) of the applied control"
                    + (", plus l_T(x_L) at a truncated episode's last step"
                       if self.terminal_cost_at_end else ""),
            "generator": self.settings(),
            "versions": _versions(),
        })

    def forward(self, episodes: Sequence[int], seeds: Sequence[int]):
        """Run the episodes; returns ``(TrajectorySet | None, counts)`` (see
        :func:`run_expert_episodes`)."""
        # Lightning predicts under inference mode; the MPC differentiates its cost with
        # autograd inside the solve, so tensors must be ordinary ones here.
        with torch.inference_mode(False):
            return run_expert_episodes(
                self.expert, self.env_id, self.env_kwargs, episodes, seeds, self.episode_length,
                warm_start=self.warm_start, store_plan=self.store_plan, images=self.images,
                terminal_cost_at_end=self.terminal_cost_at_end, max_iter=self.max_iter,
                first_max_iter=self.first_max_iter,
            )

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int = 0) -> dict[str, int]:
        """Solve the chunk's episodes; keep the shard for the writer; return its counts."""
        if self._shard is not None:
            raise ValueError(
                f"the shard {self._shard[0]} was not written: add a TrajectoryShardWriter to "
                "trainer.callbacks"
            )
        episodes = [int(e) for e in batch["episode"].reshape(-1)]
        seeds = [int(s) for s in batch["seed"].reshape(-1)]
        if not episodes:  # padding chunk of a rank with nothing left to do
            return {"episodes": 0, "episodes_failed": 0, "transitions": 0}
        start = time.perf_counter()
        data, counts = self(episodes, seeds)
        meta = self.describe()
        meta.update(counts)
        meta["seed_base"] = seeds[0] - episodes[0]
        meta["episode_range"] = [episodes[0], episodes[-1] + 1]
        meta["wall_time_s"] = round(time.perf_counter() - start, 3)
        if len(data):
            meta["normalization"] = data.normalization_stats(
                ["observation", "action", "desired_goal"])
        data.meta = _jsonable(meta)
        self._shard = (shard_filename(episodes[0], episodes[-1] + 1), data)
        return {"episodes": len(data.episode_ids()), "episodes_failed": counts["episodes_failed"],
                "transitions": len(data)}

    def take_shard(self) -> tuple[str, TrajectorySet] | None:
        """The last batch's ``(file name, shard)``, handed over once (``None`` if none)."""
        shard, self._shard = self._shard, None
        return shard

    def on_predict_start(self) -> None:
        if not any(isinstance(cb, TrajectoryShardWriter) for cb in self.trainer.callbacks):
            raise ValueError(
                "TODatasetGenerator writes nothing itself: add a TrajectoryShardWriter to "
                "trainer.callbacks"
            )


class TrajectoryShardWriter(BasePredictionWriter):
    """Writes each batch's shard of a :class:`TODatasetGenerator` atomically.

    Args:
        output_dir: folder of the shards; ``None``: the datamodule's ``output_dir``
            (:class:`TOProblems`), so a config names the folder once.

    Before the first batch it checks that shards already in the folder were made with the
    same generator settings (a resumed run must not mix two datasets in one folder).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.written: list[Path] = []

    def _folder(self, trainer: L.Trainer) -> Path:
        if self.output_dir is not None:
            return self.output_dir
        folder = getattr(trainer.datamodule, "output_dir", None)
        if folder is None:
            raise ValueError(
                "TrajectoryShardWriter needs output_dir, or a datamodule with one (TOProblems)"
            )
        return Path(folder)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not isinstance(pl_module, TODatasetGenerator):
            raise ValueError(
                f"TrajectoryShardWriter writes a TODatasetGenerator's shards, got "
                f"{type(pl_module).__name__}"
            )
        folder = self._folder(trainer)
        existing = sorted(folder.glob("episodes_*.npz")) if folder.is_dir() else []
        if existing:
            with np.load(existing[0], allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"]))
            old = {"generator": meta.get("generator"), "seed_base": meta.get("seed_base")}
            now = {"generator": pl_module.settings(),
                   "seed_base": getattr(trainer.datamodule, "seed", old["seed_base"])}
            if old != now:
                raise ValueError(
                    f"output_dir {str(folder)!r} holds shards made with other settings "
                    f"({existing[0].name}: {old}; now: {now}): use a new output_dir, or the "
                    "same settings to resume"
                )

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch,
                           batch_idx, dataloader_idx) -> None:
        shard = pl_module.take_shard()
        if shard is None:
            return
        name, data = shard
        path = save_trajectories(self._folder(trainer) / name, data,
                                 compressed=data.images is not None)
        self.written.append(path)
