"""Goal-conditioned behaviour cloning (GCBC) of a TO expert, evaluated in its environment.

The expert's closed-loop transitions ``(o_i, g_i, a^*_i)`` (a dataset in the
:mod:`diffto.data.trajectories` format, e.g. written by ``lightning predict --config
pendulum_to_dataset.yaml``) train the policy ``π_θ(o, g)`` of
:class:`~diffto.learning.goal_policy.GoalPolicy` by

.. math::

    \\min_θ \\; \\frac{1}{N} \\sum_i \\big\\lVert (π_θ(o_i, g_i) − a^*_i) / h \\big\\rVert^2
    \\quad\\text{or the Gaussian negative log-likelihood},

with ``h`` the half-width of the action box. The data are split into training and validation
*by episode* (neighbouring transitions of one episode are nearly equal; a split by row would
validate on the training set).

Validation (every ``check_val_every_n_epoch`` epochs) measures what matters, the policy in
closed loop on held-out episodes (seeds ``EVAL_SEED_BASE + j``, never in the training data):
``val/success``, ``val/final_distance``, ``val/steps_to_success``, ``val/return``, and beside
them the expert's figures on the same episodes (``val/expert_success`` ...; computed once,
cached on disk). The offline action error on the held-out episodes is ``val/loss_bc`` and
``val/action_mse``. At the end of fit the module writes ``report.json`` and ``report.md`` to
the run's log folder: the expert, the best checkpoint (by ``val/success``) and the last
weights on the same episodes, with the inference time per action next to one expert solve.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from diffto.data.trajectories import TrajectorySet, load_trajectories
from diffto.learning.goal_evaluation import (
    Evaluation,
    _write_json,
    eval_seeds,
    evaluate_expert,
    evaluate_policy,
    expert_spec,
    make_env_fps,
    save_video,
)
from diffto.learning.goal_policy import GoalPolicy, Head, Squash
from diffto.tasks.registry import make_env

__all__ = [
    "GoalConditionedBC",
    "TransitionsDataModule",
    "TransitionBatches",
    "split_transitions",
    "format_report",
]

_VAL_KEYS = ("success", "final_distance", "steps_to_success", "return")


# ----------------------------------------------------------------------------- data
class TransitionBatches(Dataset):
    """Whole minibatches of a :class:`TrajectorySet`: item ``idx`` (a list of row indices)
    is a dict of ``observation (b, o)``, ``action (b, a)`` and, when present,
    ``desired_goal (b, g)``, ``achieved_goal (b, g)`` and the expert's ``plan (b, T·m)``
    (flattened), as float32 tensors. Indexing
    tensors by a list is one gather, far cheaper than collating ``b`` single rows."""

    def __init__(self, data: TrajectorySet) -> None:
        self.tensors = {"observation": torch.as_tensor(data.observation, dtype=torch.float32),
                        "action": torch.as_tensor(data.action, dtype=torch.float32)}
        for key in ("desired_goal", "achieved_goal"):
            if getattr(data, key) is not None:
                self.tensors[key] = torch.as_tensor(getattr(data, key), dtype=torch.float32)
        if data.plan is not None:
            self.tensors["plan"] = torch.as_tensor(data.plan, dtype=torch.float32).reshape(
                len(data.plan), -1)

    def __len__(self) -> int:
        return int(self.tensors["observation"].shape[0])

    def __getitem__(self, idx: list[int]) -> dict[str, Tensor]:
        rows = torch.as_tensor(idx, dtype=torch.long)
        return {k: v[rows] for k, v in self.tensors.items()}


def batch_loader(data: TrajectorySet, batch_size: int, shuffle: bool) -> DataLoader:
    """A ``DataLoader`` of minibatch dicts over ``data`` (see :class:`TransitionBatches`)."""
    ds = TransitionBatches(data)
    sampler = RandomSampler(ds) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, batch_size=None, num_workers=0,
                      sampler=BatchSampler(sampler, batch_size, drop_last=False))


def split_transitions(
    data: TrajectorySet,
    val_fraction: float = 0.1,
    max_transitions: int | None = None,
    split_seed: int = 0,
) -> tuple[TrajectorySet, TrajectorySet | None]:
    """Limit ``data`` to its first ``max_transitions`` rows (episodes in id order, the last
    one cut), then hold out ``round(val_fraction · E)`` whole episodes (at least one when
    ``val_fraction > 0``) drawn with ``split_seed``. Returns ``(train, val or None)``.

    ``max_transitions`` bounds *all* rows used, validation included: each row is one expert
    label, so two learners given the same bound used the same number of labels.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_transitions is not None:
        if max_transitions < 1:
            raise ValueError(f"max_transitions must be >= 1 or None, got {max_transitions}")
        if max_transitions > len(data):
            raise ValueError(f"max_transitions={max_transitions} exceeds the dataset's "
                             f"{len(data)} transitions")
        data = data.subset(np.arange(max_transitions))  # rows are sorted by (episode, t)
    ids = data.episode_ids()
    n_val = 0 if val_fraction == 0 else max(1, int(round(val_fraction * len(ids))))
    if n_val >= len(ids):
        raise ValueError(f"val_fraction={val_fraction} leaves no training episode of "
                         f"{len(ids)}")
    if n_val == 0:
        return data, None
    val_ids = np.random.default_rng(split_seed).choice(ids, n_val, replace=False)
    train_ids = np.setdiff1d(ids, val_ids)
    return data.select_episodes(train_ids), data.select_episodes(np.sort(val_ids))


class TransitionsDataModule(L.LightningDataModule):
    """Expert transitions from a dataset file or folder of shards, split by episode.

    Args:
        path: ``.npz`` file or folder of shards in the :mod:`diffto.data.trajectories` format.
        batch_size: transitions per training step.
        val_fraction: fraction of episodes held out for the offline validation loss.
        max_transitions: use only the first ones (see :func:`split_transitions`); the
            equal-label comparison of DAgger against BC sets it.
        split_seed: seed of the train/validation split.

    With ``val_fraction = 0`` the validation loader yields one empty batch, so the
    environment evaluation still runs at every validation.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        max_transitions: int | None = None,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.batch_size = path, batch_size
        self.val_fraction, self.max_transitions = val_fraction, max_transitions
        self.split_seed = split_seed
        self.train_set: TrajectorySet | None = None
        self.val_set: TrajectorySet | None = None
        self._labels = 0

    @property
    def labels(self) -> int:
        """Expert labels used (training plus validation rows, counted as loaded: a learner's
        view may leave some out, they were spent all the same)."""
        return self._labels

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            data = load_trajectories(self.path)
            self.train_set, self.val_set = split_transitions(
                data, self.val_fraction, self.max_transitions, self.split_seed)
            self._labels = sum(len(s) for s in (self.train_set, self.val_set) if s is not None)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return batch_loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return DataLoader([{}], batch_size=None, num_workers=0)
        return batch_loader(self.val_set, 4096, shuffle=False)


# ----------------------------------------------------------------------------- report
def format_report(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """A markdown table: one row per controller (expert, best, last ...) of its summary."""
    cols = [("success", "success", "{:.1%}"), ("final_distance", "final distance", "{:.4g}"),
            ("steps_to_success", "steps to success", "{:.1f}"), ("return", "return", "{:.2f}"),
            ("time_per_action_s", "time per action", "{:.3g} s")]
    lines = [f"### {title}", ""] if title else []
    lines.append("| controller | " + " | ".join(c[1] for c in cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for name, s in rows.items():
        cells = []
        for key, _, fmt in cols:
            v = s.get(key)
            cells.append("—" if v is None or (isinstance(v, float) and math.isnan(v))
                         else fmt.format(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the module
class GoalConditionedBC(L.LightningModule):
    """Behaviour cloning of ``(observation, desired_goal) -> action`` from TO transitions.

    Args:
        env_id: gymnasium id of the task the data come from (``diffto.tasks.registry``);
            the policy's sizes and action box are read from it.
        env_kwargs: keyword arguments of that environment (evaluation uses the same).
        observation_keys: the goal-env dict entries the policy observes, concatenated
            (default ``["observation"]``); ``["observation", "achieved_goal"]`` adds the
            achieved goal (the Panda's flange position, a nonlinear function of the joint
            angles the network would otherwise have to learn from few goals).
        relative_goal: add the goal relative to the achieved goal, ``desired_goal −
            achieved_goal``, to the policy's input (``observation_keys`` must name
            ``achieved_goal``). A reach depends mostly on where the target lies relative to
            the hand; on the Panda reach it lifts held-out success from 65-75% to 85-95%
            (see panda_gcbc.yaml).
        hidden: hidden widths of the policy MLP; ``activation`` its nonlinearity.
        head: ``"deterministic"`` (MSE) or ``"gaussian"`` (NLL; the mean acts).
        squash: ``"tanh"`` or ``"clip"`` into the action box.
        lr, weight_decay: AdamW settings; ``lr_schedule`` ``"cosine"`` (to zero over the
            run's optimizer steps) or ``"constant"``.
        eval_episodes: held-out episodes per validation (seeds ``EVAL_SEED_BASE + j``).
        eval_max_steps: cap on their length (``None``: the environment's own).
        expert: the TO expert as ``{class_path, init_args}``; ``None``: the environment's
            default expert (``make_expert(env_id)``).
        expert_baseline: evaluate the expert on the same episodes (once, cached) and log its
            figures beside the policy's (``val/expert_...``) and in the final report.
        expert_cache_dir: where expert evaluations are cached as JSON (``None``: no cache).
        expert_max_iter: MPC iterations per control step in the expert's evaluation
            (``None``: the expert's own).
        report: write the end-of-fit report (expert, best and last checkpoint).
        video_episodes: episodes filmed (side by side) for the report's video, where the
            environment renders (0: none).
    """

    def __init__(
        self,
        env_id: str,
        env_kwargs: dict[str, Any] | None = None,
        observation_keys: list[str] | None = None,
        relative_goal: bool = False,
        hidden: list[int] | None = None,
        activation: Literal["relu", "tanh", "elu"] = "relu",
        head: Head = "deterministic",
        squash: Squash = "tanh",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        eval_episodes: int = 50,
        eval_max_steps: int | None = None,
        expert: dict[str, Any] | None = None,
        expert_baseline: bool = True,
        expert_cache_dir: str | None = "runs/expert_cache",
        expert_max_iter: int | None = None,
        report: bool = True,
        video_episodes: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        if eval_episodes < 1:
            raise ValueError(f"eval_episodes must be >= 1, got {eval_episodes}")
        if video_episodes < 0:
            raise ValueError(f"video_episodes must be >= 0, got {video_episodes}")
        expert_spec(env_id, expert)  # validates its form
        self.env_kwargs = dict(env_kwargs or {})
        self.observation_keys = tuple(observation_keys or ("observation",))
        obs_dim, goal_dim, low, high = _env_spaces(env_id, self.env_kwargs,
                                                   self.observation_keys)
        relative_at = None
        if relative_goal:
            if "achieved_goal" not in self.observation_keys:
                raise ValueError(f"relative_goal needs 'achieved_goal' in observation_keys, got "
                                 f"{list(self.observation_keys)}")
            # where achieved_goal starts in the concatenated observation: the size of the
            # entries before it
            before = self.observation_keys[:self.observation_keys.index("achieved_goal")]
            relative_at = _env_spaces(env_id, self.env_kwargs, before)[0]
        self.policy = GoalPolicy(obs_dim, goal_dim, low, high,
                                 hidden=tuple(hidden or (256, 256)), activation=activation,
                                 head=head, squash=squash, relative_goal_at=relative_at)
        self.action_dim = self.policy.act_dim  # the environment's (a subclass may widen the net)
        self._expert_eval: Evaluation | None = None

    # ------------------------------------------------------------------ data hooks
    def _datamodule(self):
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def training_data(self) -> TrajectorySet | None:
        """The transitions the policy is trained on now (its normalization is fitted on the
        first ones it sees)."""
        dm = self._datamodule()
        return getattr(dm, "train_set", None)

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        if dm is not None:
            for name in ("train_set", "val_set"):
                if getattr(dm, name, None) is not None:
                    setattr(dm, name, self.learner_view(getattr(dm, name), name))
        data = self.training_data()
        if data is None:
            return
        env_id = data.meta.get("env_id") or data.meta.get("task")
        if isinstance(env_id, str) and "/" in env_id and env_id != self.hparams.env_id:
            raise ValueError(f"the dataset was made on {env_id!r} but the model's env_id is "
                             f"{self.hparams.env_id!r}")
        for key in self.observation_keys:
            if getattr(data, key, None) is None:
                raise ValueError(f"observation_keys names {key!r}, which the dataset lacks")
        obs = torch.as_tensor(np.concatenate([getattr(data, k) for k in self.observation_keys],
                                             -1))
        if obs.shape[1] != self.policy.obs_dim or data.action.shape[1] != self.action_dim:
            raise ValueError(
                f"the dataset's observation {tuple(obs.shape[1:])} / action "
                f"{data.action.shape[1:]} do not match {self.hparams.env_id}'s "
                f"({self.policy.obs_dim},) / ({self.action_dim},)")
        if self.policy.goal_dim > 0 and data.desired_goal is None:
            raise ValueError("the dataset has no desired_goal, but the environment has goals")
        if not self.policy.normalization_fitted:  # a restored checkpoint keeps its own
            goal = None if data.desired_goal is None else torch.as_tensor(data.desired_goal)
            self.policy.fit_normalization(obs, goal)

    # ------------------------------------------------------------------ policy
    def learner_view(self, data: TrajectorySet, name: str = "data") -> TrajectorySet:
        """``data`` as the policy reads it: where ``observation_keys`` name the achieved goal,
        each row's is the one at its observation, not the one after its action (the
        format's; :func:`~diffto.learning.goal_off_policy.achieved_goal_at_observation`)."""
        if "achieved_goal" not in self.observation_keys:
            return data
        from diffto.learning.goal_off_policy import achieved_goal_at_observation

        converted, dropped = achieved_goal_at_observation(data)
        if dropped:
            rank_zero_info(f"{name}: {dropped} of {len(data)} transitions left out (no "
                           f"achieved goal at their observation)")
        return converted

    def policy_observation(self, batch: dict[str, Tensor]) -> Tensor:
        """The policy's observation ``(B, o)``: the batch's ``observation_keys`` concatenated."""
        return torch.cat([batch[k] for k in self.observation_keys], -1)

    def forward(self, observation: Tensor, goal: Tensor | None = None) -> Tensor:
        """Actions ``(B, a)`` for raw ``observation (B, o)`` and ``goal (B, g)``."""
        return self.policy(observation, goal)

    def act(self, observation: np.ndarray, goal: np.ndarray | None = None) -> np.ndarray:
        """Numpy actions ``(B, a)`` (what the environment evaluation calls)."""
        return self.policy.act(observation, goal)

    # ------------------------------------------------------------------ optimization
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        terms = self.policy.loss(self.policy_observation(batch), batch.get("desired_goal"),
                                 batch["action"])
        B = batch["observation"].shape[0]
        self.log("train/loss_bc", terms["loss_bc"], prog_bar=True, batch_size=B)
        self.log("train/action_mse", terms["action_mse"], batch_size=B)
        return terms["loss_bc"]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return adamw_with_schedule(self.policy.parameters(), hp.lr, hp.weight_decay,
                                   hp.lr_schedule, self.trainer)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if not batch:  # no held-out transitions: only the environment evaluation runs
            return
        with torch.no_grad():
            terms = self.policy.loss(self.policy_observation(batch), batch.get("desired_goal"),
                                     batch["action"])
        B = batch["observation"].shape[0]
        self.log("val/loss_bc", terms["loss_bc"], batch_size=B)
        self.log("val/action_mse", terms["action_mse"], batch_size=B)

    def evaluate(self, policy: GoalPolicy | None = None, episodes: int | None = None,
                 video_episodes: int = 0, progress: bool = False
                 ) -> tuple[Evaluation, list[np.ndarray]]:
        """``policy`` (default: this module's) in closed loop on the held-out seeds."""
        pol = self.policy if policy is None else policy
        was_training = pol.training
        pol.eval()
        try:
            return evaluate_policy(pol.act, self.hparams.env_id,
                                   eval_seeds(episodes or self.hparams.eval_episodes),
                                   self.env_kwargs, self.hparams.eval_max_steps,
                                   video_episodes=video_episodes, progress=progress,
                                   observation_keys=self.observation_keys)
        finally:
            pol.train(was_training)

    def expert_evaluation(self, progress: bool = True) -> Evaluation | None:
        """The expert on the held-out seeds (computed once per process, cached on disk)."""
        hp = self.hparams
        if not hp.expert_baseline:
            return None
        if self._expert_eval is None:
            self._expert_eval = evaluate_expert(
                hp.env_id, eval_seeds(hp.eval_episodes), self.env_kwargs, hp.expert,
                max_iter=hp.expert_max_iter, max_steps=hp.eval_max_steps,
                cache_dir=hp.expert_cache_dir, progress=progress)
        return self._expert_eval

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        result, _ = self.evaluate()
        s = result.summary()
        logs = {f"val/{k}": s[k] for k in _VAL_KEYS}
        expert = self.expert_evaluation()
        if expert is not None:
            e = expert.summary()
            logs.update({f"val/expert_{k}": e[k] for k in _VAL_KEYS})
        for k, v in logs.items():
            self.log(k, float(v), prog_bar=k in ("val/success", "val/final_distance"),
                     batch_size=1)

    # ------------------------------------------------------------------ report
    def report_extras(self) -> dict[str, Any]:
        """What a subclass adds to the report (DAgger: its label count)."""
        dm = self._datamodule()
        labels = getattr(dm, "labels", None)
        return {} if labels is None else {"labels": int(labels)}

    def _best_policy(self) -> tuple[GoalPolicy | None, str | None]:
        for cb in self.trainer.checkpoint_callbacks:
            if (isinstance(cb, ModelCheckpoint) and cb.monitor == "val/success"
                    and cb.best_model_path and os.path.exists(cb.best_model_path)):
                ckpt = torch.load(cb.best_model_path, map_location="cpu", weights_only=False)
                policy = copy.deepcopy(self.policy)
                state = {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()
                         if k.startswith("policy.")}
                policy.load_state_dict(state)
                return policy, cb.best_model_path
        return None, None

    def on_fit_end(self) -> None:
        if not self.hparams.report or self.trainer.sanity_checking or not (
                self.trainer.is_global_zero):
            return
        out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        rows: dict[str, dict[str, float]] = {}
        expert = self.expert_evaluation()
        if expert is not None:
            rows["TO expert (MPC)"] = expert.summary()
        best, best_path = self._best_policy()
        if best is not None:
            rows["best checkpoint"] = self.evaluate(best)[0].summary()
        last, frames = self.evaluate(video_episodes=self.hparams.video_episodes)
        rows["last checkpoint"] = last.summary()
        video = None
        if frames:
            fps = int(make_env_fps(self.hparams.env_id, self.env_kwargs))
            video = str(save_video(frames, out_dir / "last.mp4", fps=fps))
        payload = {"env_id": self.hparams.env_id, "env_kwargs": self.env_kwargs,
                   "episodes": self.hparams.eval_episodes, "seeds": last.seeds,
                   "best_checkpoint": best_path, "epochs": self.current_epoch,
                   "video": video, **self.report_extras(), "results": rows}
        _write_json(out_dir / "report.json", payload)
        title = (f"{type(self).__name__} on {self.hparams.env_id}: "
                 f"{self.hparams.eval_episodes} held-out episodes")
        table = format_report(rows, title)
        (out_dir / "report.md").write_text(table)
        rank_zero_info(table + f"(report: {out_dir / 'report.json'})")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["diffto_goal_learner"] = type(self).__name__


# ----------------------------------------------------------------------------- helpers
def adamw_with_schedule(params, lr: float, weight_decay: float,
                        lr_schedule: Literal["cosine", "constant"], trainer) -> Any:
    """AdamW and, for ``"cosine"``, a cosine decay of the learning rate to zero over the run's
    optimizer steps (``trainer.estimated_stepping_batches``), stepped every batch: what
    ``configure_optimizers`` of the behaviour-cloning modules returns."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if lr_schedule == "constant":
        return opt
    total = max(int(trainer.estimated_stepping_batches), 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _env_spaces(env_id: str, env_kwargs: dict[str, Any],
                observation_keys: tuple[str, ...] = ("observation",)
                ) -> tuple[int, int, np.ndarray, np.ndarray]:
    """``(obs_dim, goal_dim, action_low, action_high)`` of an environment (goal dict or flat
    observation, flat Box actions); ``obs_dim`` sums the ``observation_keys`` entries."""
    env = make_env(env_id, env_kwargs)
    try:
        space, act = env.observation_space, env.action_space
        if isinstance(space, gym.spaces.Dict):
            unknown = [k for k in observation_keys if k not in space.spaces]
            if unknown:
                raise ValueError(f"observation_keys {unknown} are not entries of {env_id}'s "
                                 f"observations {list(space.spaces)}")
            obs_dim = sum(int(np.prod(space[k].shape)) for k in observation_keys)
            goal_dim = int(np.prod(space["desired_goal"].shape))
        elif isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
            if observation_keys != ("observation",):
                raise ValueError(f"{env_id} has flat observations: observation_keys must be "
                                 f"left at ['observation'], got {list(observation_keys)}")
            obs_dim, goal_dim = int(space.shape[0]), 0
        else:
            raise ValueError(f"{env_id}: observations must be a goal dict or a flat Box, got "
                             f"{space}")
        if not isinstance(act, gym.spaces.Box) or len(act.shape) != 1:
            raise ValueError(f"{env_id}: actions must be a flat Box, got {act}")
        return obs_dim, goal_dim, np.asarray(act.low), np.asarray(act.high)
    finally:
        env.close()


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """A ``report.json`` written at the end of fit."""
    return json.loads(Path(path).read_text())
