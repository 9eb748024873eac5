"""DAgger (Ross, Gordon and Bagnell, 2011) with a TO expert that labels the learner's states.

Behaviour cloning trains on the states the *expert* visits; in closed loop the learner's
small errors take it to states the expert never showed it, and errors compound. DAgger
collects the states the *learner* visits and asks the expert what it would do there:

.. code-block:: text

    D ← initial expert transitions;  π_0 ← BC on D                       (round 0)
    for round r = 1 .. R:
        roll out π_r^β = (expert with prob. β_r, else π_{r−1}) in E episodes
        label every visited state s with the expert's action a*(s)         (one MPC solve)
        D ← D ∪ {(s, g, a*(s))};  π_r ← BC on D                           (retrain, warm)

Here the expert is an MPC (:class:`~diffto.tasks.mpc_expert.MPCExpert`) in receding horizon,
warm-started with its own previous plan shifted along the learner's trajectory
(:class:`~diffto.tasks.mpc_expert.RecedingHorizon`), so one label costs one warm MPC solve;
the ``E`` episodes of a round run in lockstep and their states are solved as one batch.
``β_r = β · β_decay^{r−1}`` (β = 0, the default: the learner alone acts).

Which states get labels matters with an MPC labeller. Warm-started along the trajectory of an
early learner (β = 0) that swings the pendulum the wrong way or not at all, the expert's
labels depend on its plan history where the swing can go either way, and few of its solves
converge; on the pendulum swing-up such labels made the policy worse than BC on the same
number of expert transitions. β = 1 in round 1, decaying (Ross et al.'s schedule), keeps the
first round's states the expert's own, where every label converged; the later, partly
learner-driven rounds still hurt there (lightning_configs/pendulum_dagger.yaml has the
figures). On the Panda reach, where more of the labels along the learner's states converge
(62–69% in round 2 at 1,300 labels, 84–88% at 3,600), the same schedule takes DAgger above
BC at equal labels on average (73% against 45% of held-out goals at 1,300 labels, 3 seeds,
one of which trails; 40% with β = 0); both shipped configs use it. ``label_expert`` lets the
labeller carry the settings that made the initial data (a tolerance that a control step's
solve reaches), distinct from the expert evaluated beside the learner.

Label budget. Every solve is one label, converged or not; only converged solves enter the
data (the dataset rule: expert data are converged solutions), the others are counted. The
total, ``train/labels`` = the initial transitions used + every solve of every round, is what
the comparison with plain BC holds equal (:class:`~diffto.learning.gcbc.TransitionsDataModule`
with ``max_transitions`` set to it).

Lightning. One round spans ``epochs_per_round`` epochs over the aggregated data; the training
dataloader is rebuilt at every epoch (``trainer.reload_dataloaders_every_n_epochs: 1``) and
collects the round's labels when the epoch opens a new round. Each round's labels are saved
in the dataset format (``data_dir/round_<r>.npz``, atomic), so a killed run resumed with
``--ckpt_path last`` reloads them instead of paying the expert again, and the aggregated data
can train any other learner.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from tqdm import tqdm

from diffto.data.trajectories import (
    TrajectorySet,
    load_trajectories,
    merge_trajectories,
    save_trajectories,
)
from diffto.learning.gcbc import GoalConditionedBC, batch_loader, split_transitions
from diffto.learning.goal_evaluation import _split, build_expert
from diffto.learning.warm_start import PolicyWarmStart
from diffto.tasks.registry import make_env

__all__ = ["DAgger", "collect_labels"]


@torch.no_grad()
def collect_labels(
    act,
    expert,
    env_id: str,
    seeds: list[int],
    env_kwargs: dict[str, Any] | None = None,
    beta: float = 0.0,
    max_steps: int | None = None,
    max_iter: int | None = None,
    first_max_iter: int | None = None,
    first_episode_id: int = 0,
    reference: TrajectorySet | None = None,
    proposer=None,
    rng: np.random.Generator | None = None,
    keep_unconverged: bool = False,
    progress: bool = True,
    observation_keys: Sequence[str] = ("observation",),
) -> tuple[TrajectorySet | None, dict[str, int]]:
    """Roll out ``act`` (β-mixed with the expert) in one episode per seed; label every
    visited state with the expert's action.

    Args:
        act: the learner ``(observation (B, o), goal (B, g)) -> actions (B, a)``.
        expert: an :class:`~diffto.tasks.mpc_expert.MPCExpert`.
        env_id, env_kwargs: the environment; seeds: one episode each, in lockstep.
        beta: probability that a row executes the expert's action instead of the learner's.
        max_steps: cap on the episode length (``None``: the environment's).
        max_iter: MPC iterations per label (``None``: the expert's).
        first_max_iter: iterations of each episode's first solve, from the expert's cold
            start (``None``: ``max_iter``); later solves start from the shifted plan.
        first_episode_id: episode id of the first seed (ids must be unique across rounds).
        reference: expert data with plans (``plan (N, T, m)``, ``T`` the expert's horizon):
            when given, every solve is warm-started from the plan of the reference row
            nearest to the visited state in (observation, goal), each coordinate scaled by
            the reference's std, instead of the row's own previous plan shifted. The label
            then follows the expert's choice at a similar state (e.g. which way to swing)
            rather than the history of plans along the learner's trajectory.
        proposer: ``(states (B, n), goals (B, g)) -> u_init (B, T, m)`` every solve starts
            from instead (e.g. :class:`~diffto.learning.warm_start.PolicyWarmStart` of the
            learner: the label refines the learner's own plan, so along a swing the learner
            chose, the expert labels that swing rather than the opposite one).
        keep_unconverged: keep the labels of solves that stopped at the iteration cap
            before the tolerance (what the expert executes in closed loop all the same);
            by default only converged solves are expert data.
        observation_keys: the dict entries the learner's observation concatenates (the
            data store ``observation`` and ``achieved_goal`` apart, as the format has them).

    Returns:
        The converged labels as a :class:`TrajectorySet` (``None`` if there are none), and
        counts ``{"labels": solves made, "kept": converged ones, "episodes": len(seeds)}``.
        ``action`` is the expert's action at ``observation``; ``next_observation`` is where
        the *executed* action led.
    """
    from diffto.tasks.mpc_expert import RecedingHorizon

    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if first_max_iter is not None and first_max_iter < 1:
        raise ValueError(f"first_max_iter must be >= 1 or None, got {first_max_iter}")
    rng = np.random.default_rng(0) if rng is None else rng
    if reference is not None and proposer is not None:
        raise ValueError("give reference or proposer, not both: each sets the warm start")
    nearest = _NearestPlan(reference, expert.horizon) if reference is not None else None
    proposer = nearest if nearest is not None else proposer
    controller = RecedingHorizon(expert, warm_start="shifted" if proposer is None else "policy",
                                 proposer=proposer, max_iter=max_iter)
    envs = [make_env(env_id, env_kwargs) for _ in seeds]
    B = len(seeds)
    rows: dict[str, list[np.ndarray]] = {k: [] for k in (
        "observation", "desired_goal", "achieved_goal", "action", "next_observation",
        "reward", "episode", "timestep", "terminal", "truncated", "converged", "plan")}
    labels = 0
    try:
        obs = [env.reset(seed=int(s))[0] for env, s in zip(envs, seeds, strict=True)]
        active = np.ones(B, bool)
        t = 0
        bar = tqdm(desc=f"DAgger labels ({B} episodes)", unit="step", leave=False,
                   disable=not progress)
        while active.any() and (max_steps is None or t < max_steps):
            parts = [_split(o) for o in obs]
            ob = np.stack([p[0] for p in parts])
            goal = None if parts[0][1] is None else np.stack([p[1] for p in parts])
            states = np.stack([expert.state_of(env.unwrapped) for env in envs])
            # The first solve starts cold and needs many iterations (20-50 on the swing-up);
            # later ones start from the shifted plan and converge in a few.
            controller.max_iter = first_max_iter if t == 0 and first_max_iter else max_iter
            if nearest is not None:
                nearest.query(ob, goal)  # the plans the next solve starts from
            a_expert, sol = controller.act(states, goal)  # one batched solve: B labels
            policy_ob = np.stack([_split(o, observation_keys)[0] for o in obs])
            a_learner = np.asarray(act(policy_ob, goal))
            use_expert = rng.random(B) < beta
            executed = np.where(use_expert[:, None], a_expert, a_learner)
            converged = np.asarray(sol.converged, bool).reshape(B)
            plans = sol.u.detach().cpu().numpy()
            for i in np.flatnonzero(active):
                o, r, term, trunc, _ = envs[i].step(executed[i])
                labels += 1
                rows["observation"].append(ob[i])
                rows["desired_goal"].append(goal[i] if goal is not None else np.zeros(0))
                rows["achieved_goal"].append(np.asarray(obs[i]["achieved_goal"]) if isinstance(
                    obs[i], dict) else np.zeros(0))
                rows["action"].append(np.asarray(a_expert[i], np.float64))
                rows["next_observation"].append(_split(o)[0])
                rows["reward"].append(np.float64(r))
                rows["episode"].append(np.int64(first_episode_id + i))
                rows["timestep"].append(np.int64(t))
                rows["terminal"].append(bool(term))
                rows["truncated"].append(bool(trunc) and not term)
                rows["converged"].append(converged[i])
                rows["plan"].append(plans[i])
                obs[i] = o
                if term or trunc:
                    active[i] = False
            t += 1
            bar.update(1)
        bar.close()
    finally:
        for env in envs:
            env.close()
    converged = np.asarray(rows.pop("converged"), bool)
    keep = np.ones_like(converged) if keep_unconverged else converged
    counts = {"labels": labels, "kept": int(keep.sum()), "converged": int(converged.sum()),
              "episodes": B}
    if not keep.any():
        return None, counts
    arrays = {k: np.asarray(v)[keep] for k, v in rows.items()}
    if goal is None:
        arrays.pop("desired_goal"), arrays.pop("achieved_goal")
    ids = np.unique(arrays["episode"])
    first = np.searchsorted(np.arange(first_episode_id, first_episode_id + B), ids)
    data = TrajectorySet(
        **arrays,
        episode_info={"seed": np.asarray(seeds, np.int64)[first],
                      "length": np.bincount(np.searchsorted(ids, arrays["episode"]))
                      .astype(np.int64)},
        meta={"env_id": env_id, "env_kwargs": dict(env_kwargs or {}), "source": "dagger",
              "beta": beta, "labels": labels, "labels_kept": int(keep.sum()),
              # each row's achieved goal is the one at its observation, where the learner
              # reads it (the rows a failed solve leaves out break the t -> t+1 chain)
              **({"achieved_goal_at": "observation"} if goal is not None else {})},
    )
    return data, counts


class _NearestPlan:
    """Warm starts from expert plans: :meth:`query` finds, for each visited ``(observation,
    goal)``, the nearest reference row (coordinates scaled by the reference's std); calling
    the object returns those rows' plans ``(B, T, m)`` (the ``RecedingHorizon`` proposer)."""

    def __init__(self, reference: TrajectorySet, horizon: int) -> None:
        from scipy.spatial import cKDTree

        if reference.plan is None:
            raise ValueError("reference must carry plan (N, T, m) arrays, got none")
        if reference.plan.shape[1] != horizon:
            raise ValueError(f"reference plans must have the expert's horizon {horizon}, got "
                             f"{reference.plan.shape[1]}")
        keys = self._keys(reference.observation, reference.desired_goal)
        self.scale = keys.std(0) + 1e-6
        self.tree = cKDTree(keys / self.scale)
        self.plan = np.asarray(reference.plan, np.float64)
        self.rows = np.zeros(0, np.int64)

    @staticmethod
    def _keys(observation: np.ndarray, goal: np.ndarray | None) -> np.ndarray:
        return observation if goal is None else np.concatenate([observation, goal], 1)

    def query(self, observation: np.ndarray, goal: np.ndarray | None) -> None:
        self.rows = self.tree.query(self._keys(observation, goal) / self.scale)[1]

    def __call__(self, states: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.plan[self.rows]).to(states)


class DAgger(GoalConditionedBC):
    """DAgger over a TO expert: BC on initial data, then rounds of learner rollouts labelled
    by the expert, aggregated and retrained (see the module docstring).

    Args (besides :class:`~diffto.learning.gcbc.GoalConditionedBC`'s):
        initial_data: dataset path (file or folder of shards) of expert transitions for round 0.
        initial_transitions: use only the first ones (``None``: all); they count as labels.
        rounds: labelling rounds after round 0.
        epochs_per_round: training epochs over the aggregated data per round (the trainer's
            ``max_epochs`` should be ``(rounds + 1) · epochs_per_round``; later epochs only
            train).
        episodes_per_round: learner episodes labelled per round, run in lockstep.
        beta, beta_decay: expert mixing probability ``β_r = β · β_decay^{r−1}``.
        label_max_steps: cap on the length of those episodes (``None``: the environment's).
        label_max_iter: MPC iterations per label (``None``: the expert's).
        label_first_max_iter: iterations of each labelled episode's first (cold) solve
            (``None``: ``label_max_iter``).
        label_expert: the labelling expert (``{class_path, init_args}``; ``None``: ``expert``,
            the one evaluated beside the learner). Label with the settings that made the
            initial data (e.g. a looser ``tol`` that a control step's solve reaches), so that
            round labels and initial labels are the same kind of converged solution.
        label_warm_start: what each label's solve starts from: ``"shifted"`` the expert's own
            previous plan along the visited trajectory, ``"nearest"`` the plan of the nearest
            expert row already labelled (initial data and earlier rounds; see
            :func:`collect_labels`'s ``reference``): no expert information beyond the labels
            counted; ``"policy"`` the current learner rolled out through the expert's planning
            model (:class:`~diffto.learning.warm_start.PolicyWarmStart`), so each label refines
            the learner's own plan.
        keep_unconverged: also aggregate labels whose solve stopped at the iteration cap
            (see :func:`collect_labels`); they count as labels either way.
        collect_seed: seed of round 1's first episode (later ones follow); must stay below
            ``EVAL_SEED_BASE`` and clear of the initial data's seeds.
        data_dir: where each round's labels are saved (``round_<r>.npz``).
        batch_size: transitions per training step.
    """

    def __init__(
        self,
        env_id: str,
        initial_data: str,
        initial_transitions: int | None = None,
        rounds: int = 4,
        epochs_per_round: int = 20,
        episodes_per_round: int = 16,
        beta: float = 0.0,
        beta_decay: float = 0.5,
        label_max_steps: int | None = None,
        label_max_iter: int | None = None,
        label_first_max_iter: int | None = None,
        label_expert: dict[str, Any] | None = None,
        label_warm_start: Literal["shifted", "nearest", "policy"] = "shifted",
        keep_unconverged: bool = False,
        collect_seed: int = 500_000,
        data_dir: str = "runs/dagger/data",
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        for name, value in (("rounds", rounds), ("epochs_per_round", epochs_per_round),
                            ("episodes_per_round", episodes_per_round),
                            ("batch_size", batch_size)):
            if value < (0 if name == "rounds" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'rounds' else 1}, got {value}")
        if label_warm_start not in ("shifted", "nearest", "policy"):
            raise ValueError(f"label_warm_start must be 'shifted', 'nearest' or 'policy', got "
                             f"{label_warm_start!r}")
        if not 0.0 <= beta <= 1.0 or not 0.0 <= beta_decay <= 1.0:
            raise ValueError(f"beta and beta_decay must be in [0, 1], got {beta}, {beta_decay}")
        super().__init__(env_id, **kwargs)
        self.save_hyperparameters()
        self._initial: TrajectorySet | None = None
        self._initial_labels = 0
        self._rounds: dict[int, TrajectorySet | None] = {}
        self._round_counts: dict[int, dict[str, int]] = {}
        self._expert: list = []  # the expert, built on first use; in a list so that it is
        # not a submodule (its buffers would enter the checkpoints)

    # ------------------------------------------------------------------ data
    def training_data(self) -> TrajectorySet | None:
        if self._initial is None:
            data = load_trajectories(self.hparams.initial_data)
            initial, _ = split_transitions(data, 0.0, self.hparams.initial_transitions)
            self._initial_labels = len(initial)  # spent, whether or not the view keeps them
            # the rounds' labels record the achieved goal at each observation: the initial
            # data must too, so the aggregate is one kind of set whatever the policy reads
            from diffto.learning.goal_off_policy import achieved_goal_at_observation

            self._initial, dropped = achieved_goal_at_observation(initial)
            if dropped:
                rank_zero_info(f"initial_data: {dropped} of {len(initial)} transitions left "
                               f"out (no achieved goal at their observation)")
        return self._initial

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError("DAgger collects a round when the training dataloader is rebuilt: "
                             "set trainer.reload_dataloaders_every_n_epochs to 1, got "
                             f"{self.trainer.reload_dataloaders_every_n_epochs}")
        super().setup(stage)

    @property
    def labels(self) -> int:
        """Expert labels spent so far: initial transitions + every solve of every round."""
        initial = 0 if self._initial is None else self._initial_labels
        return initial + sum(c["labels"] for c in self._round_counts.values())

    def _round_path(self, r: int) -> Path:
        return Path(self.hparams.data_dir) / f"round_{r}.npz"

    def _load_or_collect(self, r: int) -> None:
        """Round ``r``'s labels: from ``data_dir`` when a (killed) run saved them, else
        collected now with the current policy."""
        hp = self.hparams
        path, counts_path = self._round_path(r), self._round_path(r).with_suffix(".json")
        if counts_path.exists():
            counts = json.loads(counts_path.read_text())
            self._round_counts[r] = counts
            self._rounds[r] = load_trajectories(path) if path.exists() else None
            return
        if not self._expert:
            spec = hp.expert if hp.label_expert is None else hp.label_expert
            self._expert.append(build_expert(hp.env_id, spec))
        first_id = 1_000_000_000 + r * hp.episodes_per_round  # clear of the initial data's ids
        seeds = [hp.collect_seed + (r - 1) * hp.episodes_per_round + j
                 for j in range(hp.episodes_per_round)]
        beta = hp.beta * hp.beta_decay ** (r - 1)
        self.policy.eval()
        proposer = (PolicyWarmStart(self.policy, self._expert[0])
                    if hp.label_warm_start == "policy" else None)
        data, counts = collect_labels(
            self.policy.act, self._expert[0], hp.env_id, seeds, self.env_kwargs, beta=beta,
            max_steps=hp.label_max_steps, max_iter=hp.label_max_iter,
            first_max_iter=hp.label_first_max_iter, first_episode_id=first_id,
            reference=self.aggregated() if hp.label_warm_start == "nearest" else None,
            proposer=proposer,
            rng=np.random.default_rng(hp.collect_seed + r),
            keep_unconverged=hp.keep_unconverged, observation_keys=self.observation_keys)
        self.policy.train()
        counts["beta"] = beta
        if data is not None:
            save_trajectories(path, data)
        counts_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = counts_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(counts))
        tmp.replace(counts_path)  # the counts file marks the round complete
        self._round_counts[r], self._rounds[r] = counts, data
        rank_zero_info(f"DAgger round {r}: {counts['labels']} labels ({counts['converged']} "
                       f"converged, {counts['kept']} kept), {self.labels} in all")

    def aggregated(self) -> TrajectorySet:
        """The initial transitions and every collected round, as one set."""
        sets = [self.training_data()] + [d for _, d in sorted(self._rounds.items())
                                         if d is not None]
        if len(sets) == 1:
            return sets[0]
        return merge_trajectories(_common_arrays(sets), renumber=True)

    def train_dataloader(self) -> DataLoader:
        r = min(self.current_epoch // self.hparams.epochs_per_round, self.hparams.rounds)
        for k in range(1, r + 1):
            if k not in self._round_counts:
                self._load_or_collect(k)
        return batch_loader(self.aggregated(), self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([{}], batch_size=None, num_workers=0)  # environment evaluation only

    def on_train_epoch_start(self) -> None:
        self.log("train/labels", float(self.labels), batch_size=1)
        self.log("train/round", float(len(self._round_counts)), batch_size=1)
        self.log("train/transitions", float(sum(
            len(d) for d in [self.training_data(), *self._rounds.values()] if d is not None)),
            batch_size=1)

    def report_extras(self) -> dict[str, Any]:
        return {"labels": self.labels, "rounds": dict(sorted(self._round_counts.items()))}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._round_counts.clear()
        self._rounds.clear()


def _common_arrays(sets: list[TrajectorySet]) -> list[TrajectorySet]:
    """``sets`` reduced to the row arrays and episode-info keys they all have (a TO
    generator's data carry more, e.g. plans and costs, than DAgger's labels), so they merge."""
    names = set.intersection(*(set(s.arrays()) for s in sets))
    info = set.intersection(*(set(s.episode_info) for s in sets))
    return [TrajectorySet(**{k: v for k, v in s.arrays().items() if k in names and k not in
                             s.extras},
                          extras={k: v for k, v in s.extras.items() if k in names},
                          episode_info={k: v for k, v in s.episode_info.items() if k in info},
                          meta=dict(s.meta)) for s in sets]
