"""Goal-conditioned off-policy RL over vectorized environments, as a LightningModule.

The shared machinery of :class:`~diffto.learning.crl.ContrastiveRL` and
:class:`~diffto.learning.goal_sac.GoalSAC` (SAC with HER): a module that owns its
environments (any goal env with dict observations ``observation``, ``desired_goal``,
``achieved_goal``, e.g. ``diffto/Metaworld-v0`` or ``diffto/PandaReach-v0``), an
:class:`~diffto.learning.episode_buffer.EpisodeReplayBuffer` and a
:class:`~diffto.learning.tanh_gaussian_actor.TanhGaussianActor` with a learned entropy
temperature; subclasses supply the critic (:meth:`critic_loss`, :meth:`actor_value`).

One training step is one *iteration*: collect ``env_steps_per_iteration`` environment steps
with the current policy (uniform random actions during the first ``warmup_steps``), then make
``env_steps_per_iteration / env_steps_per_update`` gradient updates, so the update-to-data
ratio is ``1 / env_steps_per_update`` (about 9 ms per update here: the learner, not the
environments, bounds the speed of training, and this ratio is the knob). ``global_step``
counts iterations (only the iteration's last update goes through Lightning's optimizer
wrapper), so ``trainer.max_steps × env_steps_per_iteration`` is the budget in environment
steps. Throughput is logged as ``time/collect_steps_per_s`` (environment stepping and policy
inference, updates excluded) and ``time/env_steps_per_s`` (everything).

Goals
    The critic's goals live in a goal space built from the env's dict
    (``goal_features``): ``"achieved_goal"`` (the env's achieved goal; the rollout goal is the
    desired goal) or ``"achieved_goal_and_hand"`` (``[achieved, hand − achieved]`` with the
    hand at ``observation[hand_slice]``; the rollout goal is ``[desired, goal_hand_offset]``:
    the object at the target and the hand at that offset from it, by default 0). The second gives
    a goal that changes whenever the hand moves, so hindsight goals differ even while an object
    stays put. The hand's part of the rollout goal must be a place the hand can be: Metaworld's
    hand position is a point about 3.5 cm above the centre of an object its fingers hold, so
    the default offset 0 asks the critic about goals no episode ever reaches (a push policy
    that succeeds on 0.24 of held-out episodes asked for ``[target, 0]`` succeeds on 0.86
    asked for the hand 3.5 cm above the cube; ``"dataset"`` reads the offset off the
    demonstrations' final states). The state the networks see is
    ``observation[observation_slice]`` (for Metaworld ``[0, 36]``: without the goal that the
    observation's last entries repeat, so relabelled goals are the only goals the networks
    see).

Evaluation
    Every validation runs ``eval_episodes`` deterministic episodes (``tanh(μ)``) on the held-out
    seeds ``EVAL_SEED_BASE + j`` and logs ``val/success`` (at any step, Metaworld's
    convention), ``val/success_final`` (at the last step), ``val/time_at_goal`` (fraction of
    steps at the goal), ``val/final_distance``, with ``val/env_steps`` and ``val/wall_time_s``.
    At the end of fit the module writes ``curves.png`` (success over environment steps and
    over wall time) and ``report.json`` / ``report.md`` (final and best checkpoints, and the
    task's scripted expert where ``expert`` is given, the TO expert with ``to_expert_baseline``,
    and the actor as pre-training left it where ``pretrain_actor`` is on, on the same
    ``report_episodes`` episodes, seeded after the validation ones so that the best checkpoint
    is not scored on the episodes that chose it) and a video of the final policy into the
    run's log folder.

Continual learning (``task_sequence``)
    A list of env-kwargs overrides (e.g. ``[{task: reach-v3}, {task: push-v3}, ...]``); task
    ``k`` runs for ``iterations_per_task`` iterations. At each switch the environments are
    rebuilt, the buffer is emptied and the random warm-up repeats; ``continual_reset`` says
    which networks start afresh (``"none"``: keep everything; ``"critic"``; ``"all"``: a
    from-scratch learner per task, the reference of forward transfer). At the end of every task
    the policy is evaluated on *all* tasks (``continual.json``: the matrix of success after
    task ``k`` on task ``j``, and :func:`~diffto.learning.continual_metrics.continual_metrics`).

Pre-training on a dataset (``pretrain_dataset``, ``pretrain_updates``)
    A trajectory set in diffto's format (e.g. TO expert episodes from ``lightning predict``:
    ``observation``, ``action``, ``next_observation``, ``achieved_goal`` (at ``t + 1``),
    ``desired_goal``, ``episode``) is written into the buffer as whole episodes before the
    first environment step, and ``pretrain_updates`` critic updates are made on it (future
    goals from the dataset's own trajectories); with ``pretrain_actor`` the actor and the
    temperature are updated as well (offline contrastive RL), else they train only online.
    An episode starts at its first state when a reset of its env with the recorded seed
    reproduces that state (:func:`initial_achieved_goals` then gives its achieved goal, which
    the format does not store), else at its second, the first whose achieved goal the format
    records. The first state matters: on the Panda reach it is the arm at rest with the goal
    far away, the one state every evaluation episode starts from.
    An episode longer than the buffer's ``max_episode_steps`` is stored as consecutive pieces
    (each its own episode: future goals stay within a piece). The dataset episodes stay in the
    buffer until newer episodes take their slots (the oldest go first; a warning says when
    none is left), and ``dataset_fraction`` keeps their share of every batch fixed once online
    data arrives. A run resumed without a stored buffer loads the dataset again. With
    ``pretrain_actor`` the pre-trained policy is validated before the first environment step
    (the learning curve's point at 0 steps), kept (in checkpoints too) and scored in the
    report as ``offline policy (pre-trained)``: the online phase's gain is read against it.
    Pre-training shows a progress bar and counts in ``time/wall_s``.

A pull towards demonstrations (``bc_weight = w > 0`` of ContrastiveRL and GoalSAC)
    The actor's loss gains ``w · mean ‖(π(s, g) − a) / half_range‖²₂ / dim`` over the batch's
    rows from ``pretrain_dataset``, with ``π(s, g) = center + half_range ⊙ tanh(μ(s, g))`` (the
    policy's mode), ``(s, a)`` the dataset's transition and ``g`` its future goal from the
    same episode: goal-conditioned behaviour cloning of the demonstrations beside the
    critic's objective (offline contrastive RL, Eysenbach et al., 2022, writes it as a
    log-likelihood; DDPG + HER with demonstrations, Nair et al., 2018, as this squared error;
    the squared error on the mode is used here because scripted experts saturate their
    actions at the box's bounds, where a tanh-Gaussian's log-likelihood is unbounded). It
    holds the actor to the demonstrations on the states they visit; elsewhere the critic alone
    steers it. ``dataset_fraction`` keeps those rows a fixed share of every batch; without it
    the term fades as online data fills the buffer.

Resuming (``--ckpt_path last``)
    Networks, optimizer, temperature, environment-step counter, wall time and learning curve
    are restored, and the run goes on in the task it was in (a checkpoint saved at a task's
    end makes the switch, with its evaluation and resets, on resuming). With
    ``checkpoint_buffer=True`` the buffer's finished episodes travel in the checkpoint (about
    174 MB per million Metaworld transitions) and training continues with them where the
    warm-up stood; otherwise the buffer restarts empty, the random warm-up repeats, and a
    warning says so.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from diffto.learning.episode_buffer import EpisodeReplayBuffer, check_dataset_fraction
from diffto.learning.goal_evaluation import (
    Evaluation,
    _write_json,
    eval_seeds,
    evaluate_policy,
    make_env_fps,
    save_video,
)
from diffto.learning.goal_inputs import GoalInputs
from diffto.learning.tanh_gaussian_actor import TanhGaussianActor
from diffto.learning.vector_envs import IterationStream, info_values, make_vector_env
from diffto.tasks.registry import make_env

__all__ = ["GoalOffPolicy", "initial_achieved_goals", "achieved_goal_at_observation",
           "dataset_hand_offset", "load_goal_dataset"]

GoalFeatures = Literal["achieved_goal", "achieved_goal_and_hand"]
ContinualReset = Literal["none", "critic", "all"]


class GoalOffPolicy(L.LightningModule):
    """Base of the goal-conditioned off-policy learners (see the module docstring).

    Args:
        env_id, env_kwargs: the training environments (``eval_env_kwargs`` overrides for the
            evaluation episodes, e.g. a longer ``max_episode_steps``).
        num_envs: environments stepped in lockstep. vector_mode: ``"sync"`` (in process;
            faster here when the learner shares the cores) or ``"async"``.
        env_steps_per_iteration: environment steps per training step (a multiple of
            ``num_envs``).
        env_steps_per_update: environment steps per gradient update (1 / update-to-data ratio).
        batch_size: transitions per update. buffer_capacity: transitions kept.
        warmup_steps: environment steps with uniform random actions before the policy acts
            (and before the first update).
        gamma: discount (the future-goal distribution's, and the TD target's).
        observation_slice: ``[start, stop]`` of ``observation`` the networks see (``None``:
            all of it).
        goal_features, hand_slice: the goal space (see the module docstring).
        goal_hand_offset: the hand's part of the rollout goal with
            ``goal_features="achieved_goal_and_hand"``: ``None`` (zeros: the hand at the
            object), a list of goal-size offsets ``hand − achieved``, or ``"dataset"``: the
            mean offset over the final states of ``pretrain_dataset``'s episodes (where the
            demonstrations end; on Metaworld push ``[0.003, −0.004, 0.035]``).
        achieved_in_state: the networks' state is ``observation[observation_slice]`` followed
            by the env's achieved goal (e.g. the Panda's flange position, which its joint-space
            observation does not hold: a goal-reaching policy then sees where it stands in the
            goal's own coordinates).
        relative_goal: the actor (and the Q-learners' critics) also see the goal relative to
            the achieved goal, ``g − achieved(s)`` (needs ``achieved_in_state`` and
            ``goal_features="achieved_goal"``; :class:`~diffto.learning.goal_inputs.GoalInputs`).
        normalize_inputs: standardize the networks' input features with statistics fitted once
            on the first data (the pre-training dataset, else the buffer at the first update).
        width, depth, residual: the networks' :class:`ResidualMLP` shape.
        actor_lr, critic_lr, alpha_lr: Adam learning rates.
        init_alpha: initial entropy temperature. target_entropy: ``None`` = −action dim.
        eval_episodes, eval_env_kwargs: validation episodes and their env overrides.
        report_episodes, video_episodes: the end-of-fit report (``0`` episodes: no report).
        expert: ``{class_path, init_args}`` of a per-task scripted controller (built with
            ``task=``) evaluated beside the learner in the report.
        to_expert_baseline: evaluate the environment's TO expert (``make_expert(env_id)``, in
            receding horizon; cached in ``runs/expert_cache``) beside the learner in the report.
        zero_action_baseline: evaluate the zero action beside the learner in the report (for a
            residual over a base controller: the base controller alone).
        report_conditions: named env-kwargs overrides (e.g. ``{nominal: {payload_mass: 0}}``)
            under which the report evaluates the final policy (and the zero action) as well.
        zero_init_actor: start the actor's mean at zero (a residual policy that begins as
            the base controller: deterministic actions are exactly 0 before training).
        checkpoint_buffer: store the buffer's episodes in checkpoints.
        pretrain_dataset, pretrain_updates, pretrain_actor: pre-training on a dataset (see
            the module docstring).
        dataset_fraction: share of every batch drawn from the dataset's episodes once the
            environments' arrive (``None``: uniform over the buffer, so the dataset's share
            shrinks as online data grows; 0.5: RLPD's symmetric sampling).
        task_sequence, iterations_per_task, continual_reset: continual learning.
    """

    def __init__(
        self,
        env_id: str = "diffto/Metaworld-v0",
        env_kwargs: dict[str, Any] | None = None,
        num_envs: int = 8,
        vector_mode: Literal["sync", "async"] = "sync",
        env_steps_per_iteration: int = 1000,
        env_steps_per_update: int = 8,
        batch_size: int = 256,
        buffer_capacity: int = 1_000_000,
        warmup_steps: int = 10_000,
        gamma: float = 0.99,
        observation_slice: tuple[int, int] | None = None,
        goal_features: GoalFeatures = "achieved_goal",
        hand_slice: tuple[int, int] = (0, 3),
        goal_hand_offset: list[float] | Literal["dataset"] | None = None,
        achieved_in_state: bool = False,
        relative_goal: bool = False,
        normalize_inputs: bool = False,
        width: int = 256,
        depth: int = 2,
        residual: bool = False,
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        alpha_lr: float = 3e-4,
        init_alpha: float = 0.1,
        target_entropy: float | None = None,
        eval_episodes: int = 10,
        eval_env_kwargs: dict[str, Any] | None = None,
        report_episodes: int = 50,
        video_episodes: int = 2,
        expert: dict[str, Any] | None = None,
        to_expert_baseline: bool = False,
        zero_action_baseline: bool = False,
        report_conditions: dict[str, dict[str, Any]] | None = None,
        zero_init_actor: bool = False,
        checkpoint_buffer: bool = False,
        pretrain_dataset: str | None = None,
        pretrain_updates: int = 0,
        pretrain_actor: bool = False,
        dataset_fraction: float | None = None,
        task_sequence: list[dict[str, Any]] | None = None,
        iterations_per_task: int = 100,
        continual_reset: ContinualReset = "none",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        for name, value in (("num_envs", num_envs), ("batch_size", batch_size),
                            ("env_steps_per_update", env_steps_per_update),
                            ("eval_episodes", eval_episodes),
                            ("iterations_per_task", iterations_per_task)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if env_steps_per_iteration < num_envs or env_steps_per_iteration % num_envs:
            raise ValueError(f"env_steps_per_iteration must be a positive multiple of num_envs "
                             f"= {num_envs}, got {env_steps_per_iteration}")
        if env_steps_per_iteration % env_steps_per_update:
            raise ValueError(f"env_steps_per_iteration ({env_steps_per_iteration}) must be a "
                             f"multiple of env_steps_per_update ({env_steps_per_update})")
        if warmup_steps < 0 or report_episodes < 0 or video_episodes < 0 or pretrain_updates < 0:
            raise ValueError(f"warmup_steps, report_episodes, video_episodes and "
                             f"pretrain_updates must be >= 0, got {warmup_steps}, "
                             f"{report_episodes}, {video_episodes}, {pretrain_updates}")
        if pretrain_updates > 0 and pretrain_dataset is None:
            raise ValueError("pretrain_updates > 0 needs pretrain_dataset (a trajectory file "
                             "or folder)")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {gamma}")
        check_dataset_fraction(dataset_fraction)
        if dataset_fraction is not None:
            if pretrain_dataset is None or task_sequence is not None:
                raise ValueError("dataset_fraction needs pretrain_dataset and a single task "
                                 "(no task_sequence: the dataset fills the first task's buffer)")
        if goal_features not in ("achieved_goal", "achieved_goal_and_hand"):
            raise ValueError(f"goal_features must be 'achieved_goal' or "
                             f"'achieved_goal_and_hand', got {goal_features!r}")
        if continual_reset not in ("none", "critic", "all"):
            raise ValueError(f"continual_reset must be 'none', 'critic' or 'all', "
                             f"got {continual_reset!r}")
        if init_alpha <= 0:
            raise ValueError(f"init_alpha must be > 0, got {init_alpha}")
        if task_sequence is not None and (not isinstance(task_sequence, list) or not all(
                isinstance(t, dict) for t in task_sequence) or not task_sequence):
            raise ValueError(f"task_sequence must be a non-empty list of env_kwargs overrides "
                             f"(dicts), got {task_sequence!r}")
        if report_conditions is not None and not (isinstance(report_conditions, dict) and all(
                isinstance(k, str) and isinstance(v, dict) for k, v in report_conditions.items())):
            raise ValueError(f"report_conditions must map names to env-kwargs overrides (dicts), "
                             f"got {report_conditions!r}")
        self.env_kwargs = dict(env_kwargs or {})
        self.eval_overrides = dict(eval_env_kwargs or {})

        probe = make_env(env_id, self.task_env_kwargs(0))
        try:
            space = probe.observation_space
            keys = ("observation", "desired_goal", "achieved_goal")
            if not hasattr(space, "spaces") or any(k not in space.spaces for k in keys):
                raise ValueError(f"env_id {env_id!r} must have dict observations with entries "
                                 f"{list(keys)}, got {space}")
            obs_dim = int(space["observation"].shape[0])
            goal_dim = int(space["achieved_goal"].shape[0])
            act_space = probe.action_space
            self.max_episode_steps = int(probe.spec.max_episode_steps
                                         if probe.spec and probe.spec.max_episode_steps
                                         else probe.unwrapped.max_episode_steps)
        finally:
            probe.close()
        lo, hi = observation_slice if observation_slice is not None else (0, obs_dim)
        if not 0 <= lo < hi <= obs_dim:
            raise ValueError(f"observation_slice must be [start, stop] within the observation's "
                             f"{obs_dim} entries, got {observation_slice}")
        h0, h1 = hand_slice
        if goal_features == "achieved_goal_and_hand" and (h1 - h0 != goal_dim or h0 < 0
                                                           or h1 > obs_dim):
            raise ValueError(f"hand_slice must select {goal_dim} observation entries (the "
                             f"achieved goal's size), got {hand_slice}")
        if relative_goal and (not achieved_in_state or goal_features != "achieved_goal"):
            raise ValueError(f"relative_goal needs achieved_in_state=True and goal_features="
                             f"'achieved_goal', got {achieved_in_state} and {goal_features!r}")
        self.relative_goal_dims = goal_dim if relative_goal else 0
        self.goal_hand_offset = self._resolve_goal_hand_offset(env_goal_dim=goal_dim)
        self.obs_slice = slice(lo, hi)
        self.obs_dim = obs_dim
        self.state_dim = hi - lo + (goal_dim if achieved_in_state else 0)
        self.observation_keys = (("observation", "achieved_goal") if achieved_in_state
                                 else ("observation",))
        self.env_goal_dim = goal_dim
        self.goal_dim = goal_dim * (2 if goal_features == "achieved_goal_and_hand" else 1)
        self.action_dim = int(act_space.shape[0])
        self.actor = self._make_actor(act_space)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(init_alpha)))
        self.target_entropy = (-float(self.action_dim) if target_entropy is None
                               else float(target_entropy))

        self.envs = None
        self.buffer: EpisodeReplayBuffer | None = None
        self.env_steps = 0  # environment steps collected over all resumes
        self.updates = 0  # gradient updates (pre-training included) over all resumes
        self.offline_actor: dict[str, Tensor] | None = None  # the actor after pre-training
        self.wall_time = 0.0  # training seconds over all resumes
        self.history: list[dict[str, float]] = []  # the learning curve (validations)
        self.continual: dict[str, Any] = {"after_task": []}
        self._restored_buffer: dict[str, Any] | None = None
        self._saved_task: int | None = None  # task and its steps when a checkpoint was saved
        self._saved_task_steps = 0
        self._task_index = -1

    def _resolve_goal_hand_offset(self, env_goal_dim: int) -> np.ndarray:
        """The hand's part of the rollout goal ``(env_goal_dim,)`` (``goal_hand_offset``)."""
        hp = self.hparams
        offset = hp.goal_hand_offset
        if offset is None:
            return np.zeros(env_goal_dim, dtype=np.float32)
        if hp.goal_features != "achieved_goal_and_hand":
            raise ValueError(f"goal_hand_offset needs goal_features='achieved_goal_and_hand' "
                             f"(the goal has no hand part otherwise), got {offset!r}")
        if isinstance(offset, str) and offset == "dataset":
            if hp.pretrain_dataset is None:
                raise ValueError("goal_hand_offset='dataset' needs pretrain_dataset (whose "
                                 "episodes' final states give the offset)")
            value = dataset_hand_offset(hp.pretrain_dataset, hp.hand_slice)
            rank_zero_info(f"goal_hand_offset from the final states of {hp.pretrain_dataset}'s "
                           f"episodes: {np.round(value, 4).tolist()}")
            return value
        value = None if isinstance(offset, str) else np.asarray(offset, dtype=np.float64)
        if value is None or value.shape != (env_goal_dim,) or not np.isfinite(value).all():
            raise ValueError(f"goal_hand_offset must be None, 'dataset' or {env_goal_dim} "
                             f"finite floats (hand − achieved goal), got {offset!r}")
        return value.astype(np.float32)

    def _make_actor(self, act_space) -> TanhGaussianActor:
        hp = self.hparams
        inputs = GoalInputs(self.state_dim, self.goal_dim, self.relative_goal_dims,
                            hp.normalize_inputs)
        if getattr(self, "actor", None) is not None:  # a reset keeps the fitted statistics
            inputs.load_state_dict(self.actor.inputs.state_dict())
        actor = TanhGaussianActor(self.state_dim, self.goal_dim, self.action_dim,
                                  torch.as_tensor(act_space.low), torch.as_tensor(act_space.high),
                                  hp.width, hp.depth, hp.residual, inputs=inputs)
        if hp.zero_init_actor:  # the mean's output layer at zero: tanh(μ) = 0 everywhere
            with torch.no_grad():
                actor.net.head.weight[: self.action_dim].zero_()
                actor.net.head.bias[: self.action_dim].zero_()
        return actor

    def _optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers().optimizer

    def reset_in_place(self, module: nn.Module, fresh: nn.Module) -> None:
        """Give ``module`` the parameters of the newly initialized ``fresh`` (same layout) and
        drop their optimizer state: in place, so the optimizer keeps its references (a new
        optimizer in the middle of a training step would escape Lightning's step count)."""
        with torch.no_grad():
            for p, q in zip(module.parameters(), fresh.parameters(), strict=True):
                p.copy_(q)
        if self._trainer is not None:
            state = self._optimizer().state
            for p in module.parameters():
                state.pop(p, None)

    # ------------------------------------------------------------------ subclass interface
    def critic_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def reset_critic(self) -> None:
        """Re-initialize the critic (continual learning with ``continual_reset``)."""
        raise NotImplementedError

    def critic_loss(self, batch: dict[str, Tensor], with_metrics: bool = False
                    ) -> tuple[Tensor, dict[str, float]]:
        """The critic's loss and (with ``with_metrics``: at an iteration's last update, where
        they are logged) its health metrics."""
        raise NotImplementedError

    def actor_value(self, obs: Tensor, action: Tensor, goal: Tensor) -> Tensor:
        """What the actor maximizes, ``(B,)`` (the critic's parameters are frozen here)."""
        raise NotImplementedError

    def actor_goals(self, batch: dict[str, Tensor]) -> Tensor:
        """The goals of the actor's update (relabelled)."""
        raise NotImplementedError

    def after_update(self) -> None:
        """Called after each gradient update (e.g. target networks)."""

    # ------------------------------------------------------------------ goals
    def goal_of_states(self, observation: np.ndarray, achieved: np.ndarray) -> np.ndarray:
        """Goal-space features of states ``(n, goal_dim)``."""
        if self.hparams.goal_features == "achieved_goal":
            return achieved
        hand = observation[:, slice(*self.hparams.hand_slice)]
        return np.concatenate([achieved, hand - achieved], -1)

    def goal_of_targets(self, desired: np.ndarray) -> np.ndarray:
        """Goal-space features of the env's desired goals ``(n, goal_dim)``."""
        if self.hparams.goal_features == "achieved_goal":
            return desired
        hand = np.broadcast_to(self.goal_hand_offset.astype(desired.dtype), desired.shape)
        return np.concatenate([desired, hand], -1)

    def network_state(self, observation: np.ndarray, achieved: np.ndarray) -> np.ndarray:
        """The state the networks see ``(n, state_dim)``: ``observation[observation_slice]``,
        followed by the achieved goal with ``achieved_in_state``."""
        o = np.atleast_2d(observation)[:, self.obs_slice]
        if self.hparams.achieved_in_state:
            return np.concatenate([o, np.atleast_2d(achieved)], -1)
        return o

    def _states(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        o, achieved = np.asarray(obs["observation"]), np.asarray(obs["achieved_goal"])
        return {"observation": self.network_state(o, achieved),
                "goal": self.goal_of_states(o, achieved)}

    # ------------------------------------------------------------------ acting
    def _tensor(self, x: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def act(self, observation: np.ndarray, desired_goal: np.ndarray,
            deterministic: bool = True) -> np.ndarray:
        """Actions ``(B, a)`` for env observations ``(B, o)`` and desired goals ``(B, g)``
        (with ``achieved_in_state`` the observation is followed by the achieved goal: the
        entries :attr:`observation_keys` name)."""
        o = np.atleast_2d(observation)
        obs = self._tensor(self.network_state(o[:, :self.obs_dim], o[:, self.obs_dim:]))
        goal = self._tensor(self.goal_of_targets(np.atleast_2d(desired_goal)))
        if deterministic:
            return self.actor.mode(obs, goal).cpu().numpy()
        return self.actor(obs, goal)[0].cpu().numpy()

    # ------------------------------------------------------------------ tasks
    @property
    def num_tasks(self) -> int:
        seq = self.hparams.task_sequence
        return 1 if seq is None else len(seq)

    def task_env_kwargs(self, k: int, evaluation: bool = False) -> dict[str, Any]:
        seq = self.hparams.task_sequence
        kwargs = {**self.env_kwargs, **(seq[k] if seq else {})}
        return {**kwargs, **self.eval_overrides} if evaluation else kwargs

    def task_of_iteration(self, iteration: int) -> int:
        return min(iteration // self.hparams.iterations_per_task, self.num_tasks - 1)

    # ------------------------------------------------------------------ Lightning plumbing
    def train_dataloader(self) -> DataLoader:
        return DataLoader(IterationStream(), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([0], batch_size=None, num_workers=0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        # foreach: one kernel per step for all tensors (about 20% of an update here)
        return torch.optim.Adam([
            {"params": list(self.actor.parameters()), "lr": hp.actor_lr, "name": "actor"},
            {"params": self.critic_parameters(), "lr": hp.critic_lr, "name": "critic"},
            {"params": [self.log_alpha], "lr": hp.alpha_lr, "name": "alpha"},
        ], foreach=True)

    def teardown(self, stage: str) -> None:
        if self.envs is not None:
            self.envs.close()
            self.envs = None

    def on_train_start(self) -> None:
        # a checkpoint saved at a task boundary belongs to the task that just ended: resume
        # there, and the first training step makes the switch (its evaluation and resets)
        saved = self._saved_task
        k = self.task_of_iteration(self.global_step) if saved is None else saved
        self._start_task(k, resumed=True)
        if self.hparams.pretrain_updates > 0 and self.env_steps == 0:
            self.pretrain()

    # ------------------------------------------------------------------ pre-training
    def load_dataset_episodes(self, path: str) -> int:
        """Write the episodes of a trajectory set into the buffer; returns transitions."""
        data, arrays = load_goal_dataset(path, ("observation", "action", "next_observation",
                                                "achieved_goal", "desired_goal"))
        if arrays["observation"].shape[1] < self.obs_slice.stop:
            raise ValueError(f"pretrain_dataset {path}: observations have "
                             f"{arrays['observation'].shape[1]} entries, fewer than "
                             f"observation_slice needs")
        before = len(self.buffer)
        initial = initial_achieved_goals(data)
        for sl, first in zip(data.episode_slices(), initial, strict=True):
            if first is None:
                if sl.stop - sl.start < 2:
                    continue
                # the episode starts at its second state, the first with a recorded achieved
                # goal
                obs = arrays["next_observation"][sl]
                achieved = arrays["achieved_goal"][sl]
                actions = arrays["action"][sl][1:]
            else:  # from its first state: what a policy meets at an episode's start
                obs = np.concatenate([arrays["observation"][sl][:1],
                                      arrays["next_observation"][sl]])
                achieved = np.concatenate([first[None], arrays["achieved_goal"][sl]])
                actions = arrays["action"][sl]
            states = {"observation": self.network_state(obs, achieved),
                      "goal": self.goal_of_states(obs, achieved)}
            desired = self.goal_of_targets(arrays["desired_goal"][sl][:1])[0]
            terminal = bool(arrays["terminal"][sl][-1]) if "terminal" in arrays else False
            # an episode longer than the buffer's is stored as consecutive pieces (each piece's
            # future goals stay within it); only the last piece can end in a terminal state
            steps, n = len(actions), self.max_episode_steps
            for start in range(0, steps, n):
                stop = min(start + n, steps)
                self.buffer.add_episode({k: v[start:stop + 1] for k, v in states.items()},
                                        actions[start:stop], {"desired_goal": desired},
                                        terminal and stop == steps)
        return len(self.buffer) - before

    def pretrain(self) -> None:
        """``pretrain_updates`` updates on the buffer's dataset episodes: the critic's, and with
        ``pretrain_actor`` the actor's and the temperature's too (offline, before the first
        environment step)."""
        from tqdm.auto import tqdm

        hp = self.hparams
        metrics: dict[str, float] = {}
        t0 = time.perf_counter()
        # the trainer's --trainer.enable_progress_bar=false silences this bar too
        show = self._trainer is None or (self.trainer.is_global_zero
                                         and self.trainer.progress_bar_callback is not None)
        for i in tqdm(range(hp.pretrain_updates), desc="offline pre-training", unit="update",
                      disable=not show, leave=False):
            metrics = self.update(last=i == hp.pretrain_updates - 1, actor=hp.pretrain_actor,
                                  lightning_step=False)
        self.wall_time += time.perf_counter() - t0
        if hp.pretrain_actor:
            self.offline_actor = {k: v.detach().clone() for k, v in self.actor.state_dict().items()}
            s = self.evaluate()[0].summary()  # the learning curve starts at the offline policy
            self.history.append({"env_steps": 0.0, "wall_time_s": self.wall_time, "task": 0.0,
                                 "success": s["success_any"], "success_final": s["success"],
                                 "time_at_goal": s["time_at_goal"],
                                 "final_distance": s["final_distance"]})
        rank_zero_info(f"pre-trained the {'actor and ' if hp.pretrain_actor else ''}critic on "
                       f"{len(self.buffer)} dataset transitions with {hp.pretrain_updates} "
                       f"updates: {metrics}")

    def _start_task(self, k: int, resumed: bool = False) -> None:
        """Build task ``k``'s environments and buffer (and reset networks on a switch)."""
        hp = self.hparams
        if self.envs is not None:
            self.envs.close()
        self.envs = make_vector_env(hp.env_id, self.task_env_kwargs(k), hp.num_envs,
                                    hp.vector_mode)
        self.buffer = EpisodeReplayBuffer(
            hp.buffer_capacity, self.max_episode_steps, hp.num_envs,
            {"observation": self.state_dim, "goal": self.goal_dim}, self.action_dim,
            {"desired_goal": self.goal_dim},
            seed=int(torch.initial_seed() + 104_729 * self.global_step) % 2**32)
        task_steps = 0  # environment steps of this task already collected
        if self._restored_buffer is not None:
            self.buffer.load_state_dict(self._restored_buffer)
            self._restored_buffer = None
            task_steps = self._saved_task_steps  # the warm-up goes on where it stopped
            rank_zero_info(f"replay buffer restored: {len(self.buffer)} transitions")
        elif resumed and self.env_steps > 0 and k == self.task_of_iteration(self.global_step):
            # (resumed at a task's end, the next task starts with an empty buffer anyway)
            warnings.warn(
                f"resuming at {self.env_steps} environment steps with an empty replay buffer "
                f"(checkpoint_buffer is off): the random warm-up of {hp.warmup_steps} steps "
                f"repeats and learning continues from fresh data", RuntimeWarning, stacklevel=2)
        if not resumed and k > 0 and hp.continual_reset != "none":
            self.reset_critic()
            if hp.continual_reset == "all":
                self.reset_in_place(self.actor, self._make_actor(self.envs.single_action_space))
                with torch.no_grad():
                    self.log_alpha.fill_(math.log(hp.init_alpha))
                self._optimizer().state.pop(self.log_alpha, None)
        if hp.pretrain_dataset is not None and k == 0 and not len(self.buffer):
            # (also on resuming without a stored buffer: the dataset is part of it)
            n = self.load_dataset_episodes(hp.pretrain_dataset)
            rank_zero_info(f"{n} transitions of {hp.pretrain_dataset} in the replay buffer")
        self._task_index = k
        self._task_start_steps = self.env_steps - task_steps
        seed = int(torch.initial_seed() + 7919 * self.global_step) % 2**31
        obs, _ = self.envs.reset(seed=seed)
        self._obs = obs
        self.buffer.begin(self._states(obs), self._episode(obs))
        E = hp.num_envs
        self._ep_success = np.zeros(E, bool)
        self._ep_at_goal = np.zeros(E)
        self._ep_len = np.zeros(E)

    def _episode(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"desired_goal": self.goal_of_targets(np.asarray(obs["desired_goal"]))}

    # ------------------------------------------------------------------ collection
    @torch.no_grad()
    def collect(self, env_steps: int) -> dict[str, float]:
        """Step the environments ``env_steps`` times in total; returns the finished
        episodes' mean ``success`` (any step) and ``time_at_goal`` (NaN if none ended)."""
        assert self.envs is not None and self.buffer is not None
        E, warm = self.hparams.num_envs, self.hparams.warmup_steps - self._warmup_done()
        successes, at_goal = [], []
        for _ in range(env_steps // E):
            if warm > 0:
                action = self.envs.action_space.sample()
                warm -= E
            else:
                obs_t = self._tensor(self._states(self._obs)["observation"])
                goal_t = self._tensor(self.buffer_goal())
                action = self.explore(obs_t, goal_t).cpu().numpy()
            obs, _, terminated, truncated, info = self.envs.step(action)
            done = terminated | truncated
            final = obs
            if done.any():
                final = {k: np.array(v, copy=True) for k, v in obs.items()}
                for i in np.flatnonzero(done):
                    for k in final:
                        final[k][i] = info["final_obs"][i][k]
            self.buffer.step(action, self._states(final), terminated, truncated)
            success = info_values(info, "is_success", done) > 0
            self._ep_success |= success
            self._ep_at_goal += success
            self._ep_len += 1
            if done.any():
                idx = np.flatnonzero(done)
                successes += self._ep_success[idx].tolist()
                at_goal += (self._ep_at_goal[idx] / self._ep_len[idx]).tolist()
                self._ep_success[idx], self._ep_at_goal[idx], self._ep_len[idx] = False, 0, 0
                self.buffer.begin({k: v[idx] for k, v in self._states(obs).items()},
                                  {k: v[idx] for k, v in self._episode(obs).items()}, idx)
            self._obs = obs
            self.env_steps += E
        return {"success": float(np.mean(successes)) if successes else float("nan"),
                "time_at_goal": float(np.mean(at_goal)) if at_goal else float("nan")}

    def explore(self, obs: Tensor, goal: Tensor) -> Tensor:
        """The behaviour policy's actions while collecting (a sample of the actor)."""
        return self.actor(obs, goal)[0]

    def buffer_goal(self) -> np.ndarray:
        """The rollout goals of the open episodes (the env's desired goal)."""
        return self.goal_of_targets(np.asarray(self._obs["desired_goal"]))

    def _warmup_done(self) -> int:
        """Environment steps of the current task collected so far."""
        return self.env_steps - self._task_start_steps

    # ------------------------------------------------------------------ updates
    def _batch(self) -> dict[str, Tensor]:
        hp = self.hparams
        if self.uses_dataset_rows() and not self._warned_no_dataset \
                and not self.buffer.from_dataset.any():
            self._warned_no_dataset = True
            warnings.warn(
                f"the replay buffer holds no episode of pretrain_dataset (newer episodes took "
                f"their slots: raise buffer_capacity above {hp.buffer_capacity}), so "
                f"{' and '.join(self.dataset_rows_options())} draw on nothing",
                RuntimeWarning, stacklevel=2)
        raw = self.buffer.sample(hp.batch_size, hp.gamma, self.future_offset,
                                 hp.dataset_fraction)
        return {k: torch.as_tensor(v, device=self.device) for k, v in raw.items()}

    future_offset: Literal["geometric", "uniform"] = "geometric"
    _warned_no_dataset = False

    def dataset_rows_options(self) -> list[str]:
        """The options set that read the batch's dataset rows (a subclass adds its own)."""
        return ((["dataset_fraction"] if self.hparams.dataset_fraction is not None else [])
                + (["bc_weight"] if self.bc_pull_weight() > 0 else []))

    def uses_dataset_rows(self) -> bool:
        return bool(self.dataset_rows_options())

    def fit_inputs(self, rows: int = 100_000) -> None:
        """Fit the input statistics (``normalize_inputs``) on up to ``rows`` buffer samples: their
        states with the goals the networks will read (desired and future goals)."""
        raw = self.buffer.sample(min(rows, max(len(self.buffer), 2)), self.hparams.gamma,
                                 self.future_offset)
        obs = torch.as_tensor(raw["observation"], device=self.device)
        goal = torch.as_tensor(np.concatenate([raw["desired_goal"], raw["future_goal"]]),
                               device=self.device)
        self.actor.inputs.fit(torch.cat([obs, obs]), goal)
        rank_zero_info(f"input statistics fitted on {len(obs)} buffer samples")

    def update(self, last: bool, actor: bool = True, lightning_step: bool | None = None
               ) -> dict[str, float]:
        """One gradient update of the critic and (with ``actor``) of actor and temperature
        from one batch. ``last``: the iteration's last update (metrics are computed; by default
        it steps through Lightning, so ``global_step`` advances once per iteration)."""
        opt = self.optimizers()
        if self.actor.inputs.needs_fit:
            self.fit_inputs()
        batch = self._batch()
        opt.zero_grad()
        critic_loss, metrics = self.critic_loss(batch, with_metrics=last)
        critic_loss.backward()
        if actor:
            critic_params = self.critic_parameters()
            for p in critic_params:
                p.requires_grad_(False)
            try:
                actor_loss, actor_metrics = self.actor_loss(batch, with_metrics=last)
                if actor_loss is not None:
                    actor_loss.backward()
            finally:
                for p in critic_params:
                    p.requires_grad_(True)
        if last if lightning_step is None else lightning_step:
            opt.step()  # through Lightning: global_step advances
        else:
            opt.optimizer.step()
        self.updates += 1
        self.after_update()
        if last:
            metrics["loss/critic"] = float(critic_loss.detach())
            if actor:
                metrics.update(actor_metrics)
        return metrics

    def actor_loss(self, batch: dict[str, Tensor], with_metrics: bool = False
                   ) -> tuple[Tensor | None, dict[str, float]]:
        """The actor's (and temperature's) loss on a batch, the critic frozen; ``None``: no
        actor update at this step. SAC's by default: ``E[α log π(a|s, g) − value(s, a, g)]``
        with ``a ~ π`` reparameterized, plus the temperature loss
        ``−log α (log π + target_entropy)``."""
        goal = self.actor_goals(batch)
        action, log_prob = self.actor(batch["observation"], goal)
        alpha = self.log_alpha.exp()
        loss = (alpha.detach() * log_prob
                - self.actor_value(batch["observation"], action, goal)).mean()
        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        metrics = {}
        if with_metrics:
            metrics = {"loss/actor": float(loss.detach()), "actor/alpha": float(alpha.detach()),
                       "actor/entropy": float(-log_prob.detach().mean())}
        loss = loss + alpha_loss
        if self.bc_pull_weight() > 0:
            loss, metrics = self.add_bc_pull(loss, metrics, batch, with_metrics)
        return loss, metrics

    def bc_pull_weight(self) -> float:
        """Weight of the actor's pull towards the dataset's actions (module docstring): 0 here,
        ``bc_weight`` in ContrastiveRL and GoalSAC (GoalTD3BC's own, annealed ``bc_weight`` is
        a different term, in its own actor loss)."""
        return 0.0

    def check_bc_weight(self, bc_weight: float) -> None:
        """Raise unless ``bc_weight`` is >= 0, and > 0 only with demonstrations to clone."""
        hp = self.hparams
        if not bc_weight >= 0 or (bc_weight > 0 and (hp.pretrain_dataset is None
                                                     or hp.task_sequence is not None)):
            raise ValueError(f"bc_weight must be >= 0, and > 0 only with pretrain_dataset (the "
                             f"demonstrations it clones) and a single task (no task_sequence), "
                             f"got {bc_weight} with pretrain_dataset={hp.pretrain_dataset!r}")

    def add_bc_pull(self, loss: Tensor, metrics: dict[str, float], batch: dict[str, Tensor],
                    with_metrics: bool) -> tuple[Tensor, dict[str, float]]:
        """``loss`` plus the pull towards the dataset rows' actions (module docstring)."""
        rows = batch["from_dataset"]
        n_rows = int(rows.sum())
        bc = torch.zeros((), device=loss.device)  # no dataset rows in this batch: no pull
        if n_rows:
            mode = self.actor.mode(batch["observation"][rows], batch["future_goal"][rows])
            bc = (((mode - batch["action"][rows]) / self.actor.half_range) ** 2).mean()
        if with_metrics:
            metrics = {**metrics, "actor/bc_rows": n_rows,
                       "actor/bc_mse": float(bc.detach()) if n_rows else math.nan}
        return loss + self.bc_pull_weight() * bc, metrics

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        hp = self.hparams
        k = self.task_of_iteration(self.global_step)
        if k != self._task_index:
            self._task_end(self._task_index)
            self._start_task(k)
        t0 = time.perf_counter()
        episodes = self.collect(hp.env_steps_per_iteration)
        t_collect = time.perf_counter() - t0
        n_updates = 0
        metrics: dict[str, float] = {}  # of the iteration's last update
        if self._warmup_done() >= hp.warmup_steps and len(self.buffer) >= hp.batch_size:
            n_updates = hp.env_steps_per_iteration // hp.env_steps_per_update
            for i in range(n_updates):
                metrics = self.update(last=i == n_updates - 1)
        else:  # keep Lightning's step counter in the iteration budget
            self.optimizers().zero_grad()
            self.optimizers().step()
        elapsed = time.perf_counter() - t0
        self.wall_time += elapsed
        logs = dict(metrics)
        logs.update({"env_steps": float(self.env_steps), "time/wall_s": self.wall_time,
                     "time/collect_steps_per_s": hp.env_steps_per_iteration / t_collect,
                     "time/env_steps_per_s": hp.env_steps_per_iteration / elapsed,
                     "time/update_ms": 1e3 * (elapsed - t_collect) / max(n_updates, 1),
                     "task": float(k)})
        if np.isfinite(episodes["time_at_goal"]):
            logs["train/time_at_goal"] = episodes["time_at_goal"]
        self.log_dict(logs, on_step=True, batch_size=1)
        if np.isfinite(episodes["success"]):  # episodes ended in this iteration
            self.log("train/success", episodes["success"], prog_bar=True, batch_size=1)
        self.log("env_steps_k", self.env_steps / 1e3, prog_bar=True, batch_size=1)
        if n_updates:
            self.watch_critic(metrics)

    def watch_critic(self, metrics: dict[str, float]) -> None:
        """Hook for critic health checks, with the metrics of each iteration's last update."""

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, k: int | None = None, episodes: int | None = None,
                 video_episodes: int = 0, offset: int = 0,
                 env_overrides: dict[str, Any] | None = None, act=None
                 ) -> tuple[Evaluation, list[np.ndarray]]:
        """Deterministic episodes on the held-out seeds ``EVAL_SEED_BASE + offset + j`` of task
        ``k`` (default: the current one), with ``env_overrides`` on its env kwargs, of the
        policy (or of ``act(observation, goal)``)."""
        k = max(self._task_index, 0) if k is None else k
        n = self.hparams.eval_episodes if episodes is None else episodes
        was_training = self.training
        self.eval()
        try:
            return evaluate_policy(
                self.act if act is None else act, self.hparams.env_id, eval_seeds(n, offset),
                {**self.task_env_kwargs(k, True), **(env_overrides or {})},
                video_episodes=video_episodes, observation_keys=self.observation_keys)
        finally:
            self.train(was_training)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        result, _ = self.evaluate()
        s = result.summary()
        point = {"env_steps": float(self.env_steps), "wall_time_s": self.wall_time,
                 "task": float(max(self._task_index, 0)), "success": s["success_any"],
                 "success_final": s["success"], "time_at_goal": s["time_at_goal"],
                 "final_distance": s["final_distance"]}
        if not self.trainer.sanity_checking:
            self.history.append(point)
        self.log("val/success", point["success"], prog_bar=True, batch_size=1)
        self.log_dict({f"val/{k}": v for k, v in point.items() if k != "success"},
                      batch_size=1)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if isinstance(self.hparams.goal_hand_offset, str):  # "dataset": record the numbers,
            checkpoint.setdefault("hyper_parameters", {})[  # so that loading needs no dataset
                "goal_hand_offset"] = self.goal_hand_offset.tolist()
        checkpoint["goal_off_policy"] = {
            "env_steps": self.env_steps, "wall_time": self.wall_time, "updates": self.updates,
            "offline_actor": self.offline_actor,
            "history": self.history, "continual": self.continual,
            "task": self._task_index, "task_steps": self._warmup_done(),
            "buffer": (self.buffer.state_dict() if self.hparams.checkpoint_buffer
                       and self.buffer is not None else None),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get("hyper_parameters", {}).get("goal_hand_offset")
        if self.hparams.goal_features == "achieved_goal_and_hand" and isinstance(
                recorded, list):  # a resumed run keeps the goal its buffer's episodes had
            self.goal_hand_offset = np.asarray(recorded, dtype=np.float32)
        state = checkpoint.get("goal_off_policy", {})
        self.env_steps = int(state.get("env_steps", 0))
        self.updates = int(state.get("updates", 0))
        self.offline_actor = state.get("offline_actor")
        self.wall_time = float(state.get("wall_time", 0.0))
        self.history = list(state.get("history", []))
        self.continual = dict(state.get("continual", {"after_task": []}))
        self._restored_buffer = state.get("buffer")
        task = state.get("task")
        self._saved_task = None if task is None or task < 0 else int(task)
        self._saved_task_steps = int(state.get("task_steps", 0))

    # ------------------------------------------------------------------ the report
    def _out_dir(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def _task_end(self, k: int) -> None:
        """At the end of task ``k`` of a sequence: evaluate on every task."""
        if self.hparams.task_sequence is None or k < 0:
            return
        from diffto.learning.continual_metrics import continual_metrics, task_auc

        if any(r["task"] == k for r in self.continual["after_task"]):
            return  # already evaluated (a resumed run)
        row = [self.evaluate(j)[0].summary()["success_any"] for j in range(self.num_tasks)]
        self.continual["after_task"].append(
            {"task": k, "env_steps": self.env_steps, "training_time_s": self.wall_time,
             "success": row, "auc": task_auc(self.history, k)})
        self.continual["metrics"] = continual_metrics(
            [r["success"] for r in self.continual["after_task"]])
        if self.trainer.is_global_zero:
            _write_json(self._out_dir() / "continual.json",
                        {"task_sequence": self.hparams.task_sequence,
                         "continual_reset": self.hparams.continual_reset, **self.continual})

    def on_fit_end(self) -> None:
        # the last task of a sequence (or where fit stopped); a run resumed from a checkpoint
        # saved at its last step trains no further, so its task is the checkpoint's
        task = self._task_index if self._task_index >= 0 else self._saved_task
        self._task_end(-1 if task is None else task)
        if not self.trainer.is_global_zero:
            return
        out = self._out_dir()
        out.mkdir(parents=True, exist_ok=True)
        if self.history:
            from diffto.learning.learning_curves import plot_learning_curves

            plot_learning_curves(self.history, out / "curves.png",
                                 title=f"{type(self).__name__} on {self._task_title()}")
            _write_json(out / "curves.json", {"history": self.history})
        if self.hparams.report_episodes > 0:
            self.write_report(out)

    def _task_title(self, k: int | None = None) -> str:
        kwargs = self.task_env_kwargs(max(self._task_index, 0) if k is None else k)
        return f"{self.hparams.env_id} {kwargs.get('task', '')}".strip()

    def write_report(self, out: Path) -> dict[str, Any]:
        """Final and best checkpoints (and the expert) on ``report_episodes`` held-out
        episodes of the current task, after the validation episodes (seeds ``EVAL_SEED_BASE +
        eval_episodes + j``: the best checkpoint was not chosen on them); ``report.json``,
        ``report.md`` and ``final.mp4``."""
        hp = self.hparams
        n, offset = hp.report_episodes, hp.eval_episodes
        rows: dict[str, dict[str, float]] = {}
        if hp.expert is not None:
            from diffto.learning.task_evaluation import evaluate_task_experts

            task = self.task_env_kwargs(max(self._task_index, 0)).get("task")
            res = evaluate_task_experts(hp.env_id, [task], eval_seeds(n, offset), hp.expert,
                                        {k: v for k, v in self.task_env_kwargs(
                                            max(self._task_index, 0), True).items()
                                         if k != "task"},
                                        cache_dir=Path("runs") / "expert_cache")
            rows["scripted expert"] = res[task].summary()
        best_path = None
        for cb in self.trainer.checkpoint_callbacks:
            path = getattr(cb, "best_model_path", "")
            if getattr(cb, "monitor", None) == "val/success" and path and Path(path).exists():
                best_path = path
        if hp.to_expert_baseline:
            from diffto.learning.goal_evaluation import evaluate_expert

            rows["TO expert"] = evaluate_expert(
                hp.env_id, eval_seeds(n, offset), self.task_env_kwargs(max(self._task_index, 0),
                                                                        True),
                cache_dir=Path("runs") / "expert_cache").summary()
        if self.offline_actor is not None:
            online = {k: v.clone() for k, v in self.actor.state_dict().items()}
            self.actor.load_state_dict(self.offline_actor)
            rows["offline policy (pre-trained)"] = self.evaluate(episodes=n,
                                                                 offset=offset)[0].summary()
            self.actor.load_state_dict(online)
        if best_path is not None:
            state = {k: v.clone() for k, v in self.state_dict().items()}
            ckpt = torch.load(best_path, map_location=self.device, weights_only=False)
            self.load_state_dict(ckpt["state_dict"])
            rows["best checkpoint"] = self.evaluate(episodes=n, offset=offset)[0].summary()
            self.load_state_dict(state)
        final, frames = self.evaluate(episodes=n, video_episodes=hp.video_episodes,
                                      offset=offset)
        rows["final policy"] = final.summary()
        zero_action = lambda o, g: np.zeros((len(o), self.action_dim))  # noqa: E731
        if hp.zero_action_baseline:
            rows["zero action"] = self.evaluate(episodes=n, offset=offset,
                                                act=zero_action)[0].summary()
        for name, overrides in (hp.report_conditions or {}).items():
            rows[f"final policy, {name}"] = self.evaluate(
                episodes=n, offset=offset, env_overrides=overrides)[0].summary()
            if hp.zero_action_baseline:
                rows[f"zero action, {name}"] = self.evaluate(
                    episodes=n, offset=offset, env_overrides=overrides,
                    act=zero_action)[0].summary()
        video = None
        if frames:
            fps = make_env_fps(hp.env_id, self.task_env_kwargs(max(self._task_index, 0), True))
            video = str(save_video(frames, out / "final.mp4", fps=int(fps)))
        lines = [f"### {type(self).__name__} on {self._task_title()}: {n} held-out episodes, "
                 f"{self.env_steps} environment steps, {self.wall_time / 60:.1f} min", "",
                 "| controller | success (any step) | success (last step) | time at goal | "
                 "final distance |", "|---|---|---|---|---|"]
        for name, s in rows.items():
            lines.append(f"| {name} | {s['success_any']:.2f} | {s['success']:.2f} | "
                         f"{s.get('time_at_goal', float('nan')):.2f} | "
                         f"{s['final_distance']:.3f} |")
        if any("violations" in s for s in rows.values()):  # the env counts constraint violations
            lines[2] = lines[2] + " constraint violations per episode |"
            lines[3] = lines[3] + "---|"
            for i, s in enumerate(rows.values()):
                lines[4 + i] += f" {s.get('violations', float('nan')):.1f} |"
        table = "\n".join(lines) + "\n"
        payload = {"env_id": hp.env_id, "env_kwargs": self.task_env_kwargs(
            max(self._task_index, 0)), "episodes": n, "env_steps": self.env_steps,
            "seeds": eval_seeds(n, offset), "training_time_s": self.wall_time,
            "best_checkpoint": best_path, "video": video,
            "results": rows}
        if hp.goal_features == "achieved_goal_and_hand":
            payload["goal_hand_offset"] = self.goal_hand_offset.tolist()
        _write_json(out / "report.json", payload)
        (out / "report.md").write_text(table)
        rank_zero_info(table + f"(report: {out / 'report.json'})")
        return payload


def load_goal_dataset(path: str, keys: tuple[str, ...]) -> tuple[Any, dict[str, np.ndarray]]:
    """A trajectory set and its arrays, checked to hold ``keys`` and the format's achieved goals
    (the ones after each action, paired with ``next_observation``)."""
    from diffto.data.trajectories import load_trajectories

    data = load_trajectories(path)
    arrays = data.arrays()
    for key in keys:
        if key not in arrays:
            raise ValueError(f"pretrain_dataset {path}: the set has no {key!r} array (it has "
                             f"{sorted(arrays)})")
    if data.meta.get("achieved_goal_at") == "observation":
        raise ValueError(f"pretrain_dataset {path}: its achieved goals are the ones at each "
                         f"observation (meta 'achieved_goal_at', e.g. DAgger labels); "
                         f"pre-training reads the format's, after each action")
    return data, arrays


def dataset_hand_offset(path: str, hand_slice: tuple[int, int]) -> np.ndarray:
    """The mean ``hand − achieved goal`` ``(g,)`` over the final states of a trajectory set's
    episodes (``next_observation[hand_slice]`` and ``achieved_goal`` at each episode's last
    row): where the hand is when demonstrations of a task end."""
    data, arrays = load_goal_dataset(path, ("next_observation", "achieved_goal"))
    last = [sl.stop - 1 for sl in data.episode_slices()]
    hand = arrays["next_observation"][last][:, slice(*hand_slice)]
    if not last or hand.shape[1] != arrays["achieved_goal"].shape[1]:
        raise ValueError(f"pretrain_dataset {path}: needs episodes whose observations' "
                         f"hand_slice {tuple(hand_slice)} has the achieved goal's "
                         f"{arrays['achieved_goal'].shape[1]} entries; got {len(last)} "
                         f"episodes and {hand.shape[1]} entries")
    offset = (hand - arrays["achieved_goal"][last]).mean(0)
    if not np.isfinite(offset).all():
        raise ValueError(f"pretrain_dataset {path}: the hand offset at its episodes' final "
                         f"states is not finite: {offset}")
    return offset.astype(np.float32)


def initial_achieved_goals(data, atol: float = 1e-6) -> list[np.ndarray | None]:
    """The achieved goal at each episode's first state ``(g,)``, which the dataset format does
    not record (its ``achieved_goal`` is the one after each step): the episode's env is reset
    with its recorded seed (``episode_info["seed"]``, the env of ``meta["env_id"]`` and
    ``meta["env_kwargs"]``), and where the reset reproduces the episode's first observation
    (within ``atol``) its ``achieved_goal`` is the answer. ``None`` for an episode without a
    seed or whose reset differs (an env that ignores ``reset(seed=)``, or other env
    arguments): its first transition is then left out."""
    E = len(data.episode_ids())
    seeds = data.episode_info.get("seed")
    env_id = data.meta.get("env_id")
    if seeds is None or not isinstance(env_id, str) or data.achieved_goal is None:
        return [None] * E
    env = make_env(env_id, dict(data.meta.get("env_kwargs") or {}))
    out: list[np.ndarray | None] = []
    try:
        for sl, seed in zip(data.episode_slices(), seeds, strict=True):
            obs, _ = env.reset(seed=int(seed))
            same = np.allclose(np.asarray(obs["observation"]), data.observation[sl.start],
                               atol=atol, rtol=0.0)
            out.append(np.asarray(obs["achieved_goal"], dtype=np.float64) if same else None)
    finally:
        env.close()
    return out


def achieved_goal_at_observation(data):
    """``data`` with each row's ``achieved_goal`` the one at its ``observation`` (time ``t``),
    and the number of rows left out for want of one; ``meta["achieved_goal_at"] =
    "observation"`` marks the result (a set already so marked is returned as it is).

    A row of the format records the goal achieved *after* its action (``t+1``). A policy that
    reads the achieved goal beside the observation must learn from the one it will see when it
    acts, the goal achieved at ``t``: otherwise it trains on where the action led (which
    reveals the action) and acts on where the arm is. That goal is the previous row's
    ``achieved_goal`` where the episode's row at ``t − 1`` exists, the reset's
    (:func:`initial_achieved_goals`) at an episode's first step; rows with neither (a first
    step whose reset does not reproduce it, a row after a gap) are left out.
    """
    if data.meta.get("achieved_goal_at") == "observation" or data.achieved_goal is None:
        return data, 0
    achieved = np.array(data.achieved_goal, copy=True)
    episode, timestep = data.episode, data.timestep
    known = np.zeros(len(data), bool)
    follows = (episode[1:] == episode[:-1]) & (timestep[1:] == timestep[:-1] + 1)
    achieved[1:][follows] = data.achieved_goal[:-1][follows]
    known[1:] = follows
    for sl, first in zip(data.episode_slices(), initial_achieved_goals(data), strict=True):
        if first is not None and timestep[sl.start] == 0:
            achieved[sl.start], known[sl.start] = first, True
    out = dataclasses.replace(data, achieved_goal=achieved,
                              meta={**data.meta, "achieved_goal_at": "observation"})
    return out.subset(known) if not known.all() else out, int((~known).sum())
