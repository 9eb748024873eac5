"""Proximal policy optimization (PPO) as a LightningModule that owns its environments.

This is the learner of OPT-Mimic (residual tracking of a trajectory-optimization reference),
with the public OPT-Mimic settings as defaults: a Gaussian policy with a fixed exploration std
≈ 0.08, policy MLP [128, 128], value MLP [512, 512], Adam with lr 1e-4 (actor) and 1e-3
(critic), discounted returns with γ = 0.995 and no GAE, clip 0.2, 20,000 samples per
iteration in minibatches of 5,000, 40 gradient steps for each network per iteration, constant
learning rates. Nothing task-specific is a default: the env id, the ``info`` entries to log
and the progress-bar keys come from the config.

One Lightning *training step is one PPO iteration*, and it reads top to bottom as in CleanRL::

    rollout = self.collect_rollout()                     # (T, E, ...) with the frozen policy
    self.update_normalizer(rollout["raw_obs"])           # every rank's observations
    rollout["advantages"], rollout["returns"] = self.compute_advantages(rollout)
    stats = self.update(rollout)                         # actor_steps / critic_steps minibatches

Everything RL-specific stays inside the module, the pattern that works under Lightning (see
the packaging notes):

- the module owns ``gymnasium.vector`` envs (subprocesses by default) and the rollout buffer;
  the training dataloader is a dummy infinite iterable with ``num_workers=0``;
- manual optimization with **one** optimizer (two parameter groups, actor and critic
  learning rates). Lightning advances ``global_step`` once per ``LightningOptimizer.step``;
  the inner minibatch updates call the wrapped torch optimizer directly and only the last
  goes through Lightning, so ``global_step`` counts iterations and ``trainer.max_steps`` is
  the training budget in iterations;
- ``lr_schedule="linear"`` anneals both learning rates as CleanRL's ``anneal_lr``: iteration
  ``k`` of ``K = trainer.max_steps`` uses ``(1 − k/K)`` times the base rates (the full rate
  first, ``1/K`` of it last). The factor is computed from ``global_step`` at each iteration,
  not from a counter of the module, so a resumed run continues the same schedule;
- the observation normalizer (:class:`~diffto.learning.normalizer.RunningNormalizer`) is a
  submodule with buffers, so checkpoints carry it; it is updated once per iteration from the
  raw observations just collected (the rollout itself uses frozen statistics, so stored
  log-probabilities are exactly those of the policy that acted) and never in validation;
- validation runs ``eval_episodes`` deterministic episodes (policy mean, eval env kwargs,
  e.g. no domain randomization) and logs ``val/...``.

Resuming (``--ckpt_path last``) restores networks, normalizer and optimizer state; the
environments restart from fresh episodes.

Several processes (DDP): ``--trainer.strategy=ddp --trainer.devices=N`` (CPU processes, GPUs,
or nodes with ``--trainer.num_nodes``) runs one copy of the module per rank with Lightning's
DDP strategy; nothing here is home-made distributed code.

- Each rank owns its environments and collects ``samples_per_iteration`` samples per
  iteration (the iteration has ``N`` times as many); its envs, exploration noise and
  minibatch order are seeded with ``seed + 1000003·rank``.
- Gradients: Lightning runs ``training_step`` inside the DDP wrapper's forward and prepares
  DDP's reducer in every ``manual_backward``, so each minibatch backward averages gradients
  over ranks. DDP (with Lightning's default ``find_unused_parameters=False``) needs a
  gradient for every parameter in every backward, while an iteration may update only one
  network (``actor_steps != critic_steps``, or the actor stopped by ``target_kl``): both
  losses enter every backward, the inactive one with weight 0, and the inactive network's
  (zero) gradient is dropped before the step, so Adam skips it exactly as in one process.
- ``target_kl`` compares the approximate KL averaged over ranks, so all ranks stop together.
- The normalizer merges the raw observations of all ranks (``all_gather``, in rank order), so
  every rank holds the same statistics; rank 0's would otherwise be broadcast by DDP.
- Validation: Lightning's distributed sampler splits the eval episodes over ranks (padding by
  repetition when ``eval_episodes`` is not a multiple of ``N``); ``val/`` scalars are averaged
  over ranks. ``train/`` and ``rollout/`` scalars are rank 0's; ``charts/samples`` counts all
  ranks' samples. Lightning writes checkpoints from rank 0 only.

Parameters and normalizer statistics stay equal on all ranks (tested with two CPU processes).
Whether more ranks train faster is unmeasured: the development machine has 2 cores, already
shared by each rank's environments, so no speed-up could show there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any, Literal

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Normal
from torch.utils.data import DataLoader

from diffto.learning.normalizer import RunningNormalizer
from diffto.learning.ppo_losses import approx_kl, discounted_returns, pg_loss, v_loss
from diffto.learning.vector_envs import IterationStream, info_values, make_vector_env
from diffto.policies import MLP
from diffto.tasks.registry import make_env

__all__ = ["PPO", "lr_factor", "pg_loss", "v_loss", "approx_kl", "discounted_returns", "make_env"]

Activation = Literal["tanh", "elu", "relu"]
LRSchedule = Literal["constant", "linear"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "elu": nn.ELU, "relu": nn.ReLU}


# Rank r seeds its envs, exploration noise and minibatch order with seed + r·stride: a prime
# far above any num_envs, so no two ranks' envs (seeded seed, seed + 1, ...) share a seed.
_RANK_SEED_STRIDE = 1_000_003


# ----------------------------------------------------------------------------- environments
def _box_dim(space: gym.Space, name: str) -> int:
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ValueError(f"PPO needs a flat Box {name} space, got {space}")
    return int(space.shape[0])


# ----------------------------------------------------------------------------- schedule
def lr_factor(schedule: LRSchedule, iteration: int, iterations: int) -> float:
    """Multiplier of the base learning rates at ``iteration`` (0-based: ``global_step``) of a
    budget of ``iterations`` (``trainer.max_steps``).

    ``"constant"``: 1. ``"linear"``: ``1 − iteration / iterations`` (CleanRL's ``anneal_lr``):
    the first iteration runs at the full rate, the last at ``1/iterations`` of it; the rate
    would reach 0 only after the budget (it is clamped at 0 there).
    """
    if schedule == "constant":
        return 1.0
    if schedule != "linear":
        raise ValueError(f"lr_schedule must be 'constant' or 'linear', got {schedule!r}")
    if iterations < 1:
        raise ValueError(
            "lr_schedule='linear' anneals over trainer.max_steps iterations: set "
            f"trainer.max_steps >= 1, got {iterations}"
        )
    return max(0.0, 1.0 - iteration / iterations)


# ----------------------------------------------------------------------------- the module
class PPO(L.LightningModule):
    """PPO over a gymnasium env id, one training step per iteration (OPT-Mimic defaults).

    Args:
        env_id: gymnasium id, e.g. ``"diffto/Go2Tracking-v0"`` or ``"Pendulum-v1"``.
        env_kwargs: keyword arguments for the training envs.
        eval_env_kwargs: overrides of ``env_kwargs`` for the evaluation env (e.g.
            ``{"randomize": false}``).
        num_envs: parallel training envs (per rank under DDP).
        vector_mode: ``"async"`` (one subprocess per env) or ``"sync"`` (in process).
        samples_per_iteration: env steps collected per iteration (rounded up to a multiple
            of ``num_envs``; per rank under DDP).
        minibatch_size: samples per gradient step (per rank under DDP).
        actor_steps, critic_steps: gradient steps per iteration for each network; minibatches
            are drawn without replacement from a reshuffled rollout until it is used up.
        actor_hidden, critic_hidden: hidden layer sizes; ``activation`` their nonlinearity.
        init_std: exploration std of the Gaussian policy (in action units).
        learn_std: learn a state-independent log-std (else it stays at ``init_std``).
        actor_lr, critic_lr: Adam learning rates (at the start, with ``lr_schedule``).
        lr_schedule: ``"constant"``, or ``"linear"``: both rates annealed by
            ``1 − global_step / trainer.max_steps`` (see :func:`lr_factor`; needs
            ``trainer.max_steps``; a resumed run continues the schedule).
        gamma: discount. gae_lambda: ``None`` = discounted returns, else GAE(λ).
        clip_coef: PPO ratio clip ε. target_kl: stop the actor updates of an iteration once
            the approximate KL (averaged over ranks) exceeds it (``None``: never).
        max_grad_norm: per-network gradient norm clip (``None``: off).
        normalize_advantages: standardize advantages in each minibatch.
        normalize_observations: running mean/std normalization of observations.
        info_keys: per-step ``info`` entries averaged per episode and logged as
            ``rollout/<key>`` and ``val/<key>`` (e.g. tracking errors); keys an env does not
            report are skipped. ``None``: none.
        progress_bar_keys: logged training scalars shown in the progress bar (``None``:
            ``["rollout/ep_return"]``); ``val/ep_return`` is always shown. ``rollout/<key>``
            needs ``<key>`` in ``info_keys`` (or ep_return / ep_length; checked at
            construction); ``train/`` and ``charts/`` names are checked at the first iteration.
        eval_episodes: deterministic episodes per validation. eval_max_steps: cap on their
            length (``None``: until the env ends them). eval_reset_options: ``options`` for
            the eval env's ``reset`` (e.g. ``{"phase": 0}`` to start a clip at its start).
    """

    def __init__(
        self,
        env_id: str,
        env_kwargs: dict[str, Any] | None = None,
        eval_env_kwargs: dict[str, Any] | None = None,
        num_envs: int = 4,
        vector_mode: Literal["async", "sync"] = "async",
        samples_per_iteration: int = 20_000,
        minibatch_size: int = 5_000,
        actor_steps: int = 40,
        critic_steps: int = 40,
        actor_hidden: list[int] | None = None,
        critic_hidden: list[int] | None = None,
        activation: Activation = "tanh",
        init_std: float = 0.08,
        learn_std: bool = False,
        actor_lr: float = 1e-4,
        critic_lr: float = 1e-3,
        lr_schedule: LRSchedule = "constant",
        gamma: float = 0.995,
        gae_lambda: float | None = None,
        clip_coef: float = 0.2,
        target_kl: float | None = None,
        max_grad_norm: float | None = 1.0,
        normalize_advantages: bool = True,
        normalize_observations: bool = True,
        info_keys: list[str] | None = None,
        progress_bar_keys: list[str] | None = None,
        eval_episodes: int = 1,
        eval_max_steps: int | None = None,
        eval_reset_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        checks = {
            "num_envs": num_envs,
            "samples_per_iteration": samples_per_iteration,
            "minibatch_size": minibatch_size,
            "eval_episodes": eval_episodes,
        }
        for name, value in checks.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if actor_steps < 0 or critic_steps < 0:
            raise ValueError(
                f"actor_steps and critic_steps must be >= 0, got {actor_steps}, {critic_steps}"
            )
        if init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {init_std}")
        if vector_mode not in ("async", "sync"):
            raise ValueError(f"vector_mode must be 'async' or 'sync', got {vector_mode!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
        if lr_schedule not in ("constant", "linear"):
            raise ValueError(f"lr_schedule must be 'constant' or 'linear', got {lr_schedule!r}")
        self.env_kwargs = dict(env_kwargs or {})
        self.eval_env_kwargs = {**self.env_kwargs, **(eval_env_kwargs or {})}
        self.info_keys = list(info_keys or [])
        self.progress_bar_keys = (
            ["rollout/ep_return"] if progress_bar_keys is None else list(progress_bar_keys)
        )
        episode_keys = {f"rollout/{k}" for k in ("ep_return", "ep_length", *self.info_keys)}
        for key in self.progress_bar_keys:
            prefix = key.partition("/")[0]
            if prefix not in ("rollout", "train", "charts") or (
                prefix == "rollout" and key not in episode_keys
            ):
                raise ValueError(
                    f"progress_bar_keys entry {key!r} is not a logged training scalar: expected "
                    f"one of {sorted(episode_keys)} (rollout/<key> needs <key> in info_keys) or "
                    "a train/... or charts/... name"
                )
        self._progress_bar_keys_checked = False
        self.steps_per_env = math.ceil(samples_per_iteration / num_envs)

        # Probe the spaces once in this process. For the Go2 env this also plans (and caches)
        # the reference, so subprocess workers later only load the cache.
        probe = make_env(env_id, self.eval_env_kwargs)
        try:
            obs_dim = _box_dim(probe.observation_space, "observation")
            act_dim = _box_dim(probe.action_space, "action")
            low = torch.as_tensor(probe.action_space.low, dtype=torch.float32)
            high = torch.as_tensor(probe.action_space.high, dtype=torch.float32)
        finally:
            probe.close()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)

        hidden_a = [128, 128] if actor_hidden is None else list(actor_hidden)
        hidden_c = [512, 512] if critic_hidden is None else list(critic_hidden)
        # A small last-layer gain starts the policy near the zero action (zero residual).
        self.actor = MLP(
            obs_dim, act_dim, hidden_a, _ACTIVATIONS[activation], orthogonal_out_gain=0.01
        )
        self.critic = MLP(obs_dim, 1, hidden_c, _ACTIVATIONS[activation], orthogonal_out_gain=1.0)
        self.log_std = nn.Parameter(
            torch.full((act_dim,), math.log(init_std)), requires_grad=learn_std
        )
        self.normalizer = RunningNormalizer(obs_dim) if normalize_observations else None

        self.envs: gym.vector.VectorEnv | None = None
        self.eval_env: gym.Env | None = None
        self._obs: np.ndarray | None = None
        self._generator: torch.Generator | None = None

    # -- policy ------------------------------------------------------------------------------
    def normalize(self, obs: Tensor) -> Tensor:
        """Raw observations ``(B, obs_dim)`` -> network inputs ``(B, obs_dim)``."""
        return obs if self.normalizer is None else self.normalizer(obs)

    def distribution(self, nobs: Tensor) -> Normal:
        """Gaussian policy over actions ``(B, act_dim)`` given normalized ``nobs``."""
        mean = self.actor(nobs)
        std = self.log_std.exp().to(mean.dtype).expand_as(mean)
        return Normal(mean, std, validate_args=False)

    def value(self, nobs: Tensor) -> Tensor:
        """``V(s)`` ``(B,)`` for normalized observations ``(B, obs_dim)``."""
        return self.critic(nobs).squeeze(-1)

    def forward(self, obs: Tensor) -> Tensor:
        """Deterministic action (policy mean clipped to the action box) ``(B, act_dim)``
        for raw observations ``(B, obs_dim)``."""
        mean = self.actor(self.normalize(obs))
        return torch.maximum(torch.minimum(mean, self.action_high), self.action_low)

    @torch.no_grad()
    def act(self, obs: np.ndarray | Tensor) -> np.ndarray:
        """Deterministic action for one raw observation ``(obs_dim,)`` or a batch, as numpy."""
        x = torch.as_tensor(np.asarray(obs), dtype=self.action_low.dtype, device=self.device)
        single = x.dim() == 1
        a = self(x.unsqueeze(0) if single else x)
        return (a[0] if single else a).cpu().numpy()

    # -- environments ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # The eval env first, in this process: any expensive first construction (the Go2
        # reference plan) happens once here, before subprocess workers start.
        if self.eval_env is None:
            self.eval_env = make_env(self.hparams.env_id, self.eval_env_kwargs)
        if stage == "fit" and self.envs is None:
            # async workers are forked: they inherit the caches warmed in this process
            self.envs = make_vector_env(self.hparams.env_id, self.env_kwargs,
                                        self.hparams.num_envs, self.hparams.vector_mode)

    def teardown(self, stage: str) -> None:
        if self.envs is not None:
            self.envs.close()
            self.envs = None
        if self.eval_env is not None:
            self.eval_env.close()
            self.eval_env = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(IterationStream(), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        # one item per eval episode (its seed); under DDP Lightning splits them over ranks
        episodes = list(range(self.hparams.eval_episodes))
        return DataLoader(episodes, batch_size=None, num_workers=0)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose tensors have other shapes than this module's, naming them:
        the usual cause is an env with another observation width than the one trained on."""
        own = self.state_dict()
        wrong = [
            f"{k} {tuple(v.shape)} (this module: {tuple(own[k].shape)})"
            for k, v in checkpoint.get("state_dict", {}).items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        if wrong:
            raise ValueError(
                f"checkpoint tensors do not fit this PPO, whose env gives {self.obs_dim}-D "
                f"observations and takes {self.act_dim}-D actions: {'; '.join(wrong[:3])}. Load "
                "it with the env settings it was trained with, e.g. "
                "PPO.load_from_checkpoint(path, env_kwargs={...}); a Go2 policy trained on "
                "OPT-Mimic's 30-D observation needs observe_base_velocity: false and "
                "observe_position_error: false"
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fail before any rollout if the schedule has no budget to anneal over
        lr_factor(self.hparams.lr_schedule, self.global_step, self.trainer.max_steps)
        actor_params = list(self.actor.parameters())
        if self.hparams.learn_std:
            actor_params.append(self.log_std)
        return torch.optim.Adam(
            [
                {"params": actor_params, "lr": self.hparams.actor_lr, "name": "actor"},
                {
                    "params": list(self.critic.parameters()),
                    "lr": self.hparams.critic_lr,
                    "name": "critic",
                },
            ]
        )

    def on_train_start(self) -> None:
        assert self.envs is not None
        # apart per rank, and per start: a resumed run does not replay the first run's noise
        seed = (
            torch.initial_seed() + 7919 * self.global_step + _RANK_SEED_STRIDE * self.global_rank
        ) % 2**31
        self._obs, _ = self.envs.reset(seed=int(seed))
        self._generator = torch.Generator(device=self.device).manual_seed(int(seed))
        E = self.hparams.num_envs
        self._ep_return = np.zeros(E)
        self._ep_length = np.zeros(E, dtype=np.int64)
        self._ep_info = {k: np.zeros(E) for k in self.info_keys}
        self._ep_info_n = {k: np.zeros(E) for k in self.info_keys}

    # -- one iteration -----------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        lrs = self.schedule_learning_rates()
        t0 = time.perf_counter()
        rollout = self.collect_rollout()
        t_rollout = time.perf_counter() - t0
        self.update_normalizer(rollout["raw_obs"])
        rollout["advantages"], rollout["returns"] = self.compute_advantages(rollout)
        t1 = time.perf_counter()
        stats = self.update(rollout)
        t_update = time.perf_counter() - t1
        self._log_iteration(rollout, stats, lrs, t_rollout, t_update)

    def schedule_learning_rates(self) -> dict[str, float]:
        """Set both parameter groups' learning rates for the iteration about to run (number
        ``global_step``, which checkpoints carry) and return them by group name."""
        hp = self.hparams
        factor = lr_factor(hp.lr_schedule, self.global_step, self.trainer.max_steps)
        base = {"actor": hp.actor_lr, "critic": hp.critic_lr}
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = base[group["name"]] * factor
        return {name: lr * factor for name, lr in base.items()}

    # -- rollout -----------------------------------------------------------------------------
    @torch.no_grad()
    def collect_rollout(self) -> dict[str, Any]:
        """Run ``steps_per_env`` steps in every env with the current (frozen) policy.

        Returns a dict of ``(T, E, ...)`` tensors (``obs`` normalized as the policy saw them,
        ``actions``, ``logprob``, ``rewards``, ``values``, ``terminated``, ``truncated``,
        ``final_values``), ``next_value (E,)``, the raw observations ``(T·E, obs_dim)`` and
        the finished episodes' statistics.

        Only sampling happens per step; log-probabilities and values are computed for the
        whole rollout in one batched pass afterwards (the policy does not change during a
        rollout), which keeps the main process's per-step cost far below an env step's.
        """
        assert self.envs is not None and self._obs is not None
        T, E = self.steps_per_env, self.hparams.num_envs
        dev, dt = self.device, self.action_low.dtype
        raw = np.empty((T + 1, E, self.obs_dim), dtype=np.float32)
        actions = torch.empty(T, E, self.act_dim, device=dev, dtype=dt)
        rewards = np.empty((T, E))
        terminated = np.empty((T, E), dtype=bool)
        truncated = np.empty((T, E), dtype=bool)
        final_obs: list[np.ndarray] = []
        final_at: list[tuple[int, int]] = []
        finished: dict[str, list[float]] = {"ep_return": [], "ep_length": []}
        finished.update({k: [] for k in self.info_keys})
        low, high = self.action_low.cpu().numpy(), self.action_high.cpu().numpy()
        std = self.log_std.exp().to(dt)
        raw[0] = self._obs
        for t in range(T):
            mean = self.actor(self.normalize(torch.as_tensor(raw[t], device=dev, dtype=dt)))
            noise = torch.randn(mean.shape, generator=self._generator, device=dev, dtype=dt)
            action = mean + std * noise
            actions[t] = action
            obs, reward, term, trunc, info = self.envs.step(
                np.clip(action.cpu().numpy(), low, high)
            )
            raw[t + 1], rewards[t], terminated[t], truncated[t] = obs, reward, term, trunc
            done = np.logical_or(term, trunc)
            for i in np.flatnonzero(trunc):
                final_obs.append(np.asarray(info["final_obs"][i], dtype=np.float32))
                final_at.append((t, int(i)))
            self._track_episodes(reward, done, info, finished)
        self._obs = raw[T].copy()

        nobs_all = self.normalize(torch.as_tensor(raw, device=dev, dtype=dt))  # (T+1, E, d)
        nobs = nobs_all[:T]
        values_all = self.value(nobs_all)  # (T+1, E)
        final_values = torch.zeros(T, E, device=dev, dtype=dt)
        if final_obs:
            v = self.value(
                self.normalize(torch.as_tensor(np.stack(final_obs), device=dev, dtype=dt))
            )
            rows, cols = zip(*final_at, strict=True)
            final_values[list(rows), list(cols)] = v
        return {
            "obs": nobs,
            "actions": actions,
            "logprob": self.distribution(nobs).log_prob(actions).sum(-1),
            "values": values_all[:T],
            "next_value": values_all[T],
            "rewards": torch.as_tensor(rewards, device=dev, dtype=dt),
            "terminated": torch.as_tensor(terminated, device=dev),
            "truncated": torch.as_tensor(truncated, device=dev),
            "final_values": final_values,
            "raw_obs": raw[:T].reshape(T * E, self.obs_dim),
            "finished": finished,
        }

    def _track_episodes(
        self,
        reward: np.ndarray,
        done: np.ndarray,
        info: dict[str, Any],
        finished: dict[str, list[float]],
    ) -> None:
        """Accumulate per-env episode return, length and ``info_keys`` means; move finished
        episodes' values into ``finished``."""
        self._ep_return += reward
        self._ep_length += 1
        for k in self.info_keys:
            v = info_values(info, k, done)
            ok = ~np.isnan(v)
            self._ep_info[k][ok] += v[ok]
            self._ep_info_n[k][ok] += 1
        for i in np.flatnonzero(done):
            finished["ep_return"].append(float(self._ep_return[i]))
            finished["ep_length"].append(float(self._ep_length[i]))
            for k in self.info_keys:
                if self._ep_info_n[k][i] > 0:
                    finished[k].append(self._ep_info[k][i] / self._ep_info_n[k][i])
                self._ep_info[k][i] = self._ep_info_n[k][i] = 0.0
            self._ep_return[i], self._ep_length[i] = 0.0, 0

    @torch.no_grad()
    def update_normalizer(self, raw_obs: np.ndarray) -> None:
        """Merge the raw observations ``(N, obs_dim)`` of every rank into the running
        statistics. Each rank merges the same gathered batch ``(W·N, obs_dim)`` (rank order),
        so all ranks hold the statistics of all samples; with one process it is ``raw_obs``."""
        if self.normalizer is None:
            return
        x = self.all_gather(torch.as_tensor(raw_obs, device=self.device))  # (W, N, d) or (N, d)
        self.normalizer.update(x.reshape(-1, self.obs_dim))

    # -- advantages --------------------------------------------------------------------------
    def compute_advantages(self, rollout: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``(advantages, returns)``, both ``(T, E)``, of a rollout from :meth:`collect_rollout`:
        discounted returns (``gae_lambda=None``, OPT-Mimic) or GAE(λ), bootstrapped with
        ``V`` after the last step and at time-limit truncations (:func:`discounted_returns`)."""
        return discounted_returns(
            rollout["rewards"],
            rollout["values"],
            rollout["terminated"],
            rollout["truncated"],
            rollout["final_values"],
            rollout["next_value"],
            self.hparams.gamma,
            self.hparams.gae_lambda,
        )

    # -- update ------------------------------------------------------------------------------
    def _minibatches(self, n: int) -> Iterator[Tensor]:
        """Index minibatches without replacement, reshuffled whenever the rollout is used up."""
        size = min(self.hparams.minibatch_size, n)
        while True:
            perm = torch.randperm(n, generator=self._generator, device=self.device)
            for start in range(0, n - size + 1, size):
                yield perm[start : start + size]

    def loss_terms(self, data: dict[str, Tensor], idx: Tensor) -> dict[str, dict[str, Tensor]]:
        """Both networks' loss terms on the minibatch ``idx (B,)`` of the flat ``data``
        (``obs (N, obs_dim)``, ``actions (N, act_dim)``, ``logprob``, ``advantages``,
        ``returns`` ``(N,)``): ``{"actor": pg_loss(...), "critic": v_loss(...)}``."""
        hp = self.hparams
        obs = data["obs"][idx]
        adv = data["advantages"][idx]
        if hp.normalize_advantages and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        logprob = self.distribution(obs).log_prob(data["actions"][idx]).sum(-1)
        return {
            "actor": pg_loss(logprob, data["logprob"][idx], adv, hp.clip_coef),
            "critic": v_loss(self.value(obs), data["returns"][idx]),
        }

    def update(self, rollout: dict[str, Any]) -> dict[str, Tensor]:
        """The minibatch gradient steps of one iteration.

        ``rollout`` holds ``obs (..., obs_dim)`` (normalized as the policy saw them),
        ``actions (..., act_dim)`` and ``logprob``, ``advantages``, ``returns`` ``(...)``, with
        any common leading shape (``(T, E)`` from :meth:`collect_rollout` and
        :meth:`compute_advantages`), flattened here to ``N`` samples. Step ``i`` draws a
        minibatch and updates the actor while ``i < actor_steps`` (until ``target_kl`` stops
        it) and the critic while ``i < critic_steps``.

        Returns each loss term and diagnostic averaged over the steps that computed it.
        """
        hp = self.hparams
        data = {
            "obs": rollout["obs"].reshape(-1, self.obs_dim),
            "actions": rollout["actions"].reshape(-1, self.act_dim),
            **{k: rollout[k].reshape(-1) for k in ("logprob", "advantages", "returns")},
        }
        opt = self.optimizers()
        torch_opt = opt.optimizer
        groups = {g["name"]: g["params"] for g in torch_opt.param_groups}
        nets = {"actor": self.actor, "critic": self.critic}
        n_updates = max(hp.actor_steps, hp.critic_steps, 1)
        batches = self._minibatches(data["obs"].shape[0])
        stats: dict[str, list[Tensor]] = {}
        actor_active = True
        for i in range(n_updates):
            idx = next(batches)
            on = {"actor": actor_active and i < hp.actor_steps, "critic": i < hp.critic_steps}
            torch_opt.zero_grad(set_to_none=True)
            # nothing runs once target_kl stopped the actor and the critic is done
            if any(on.values()):
                terms = self.loss_terms(data, idx)
                # Both networks enter every backward, an inactive one with weight 0: under DDP
                # the reducer waits for a gradient of every parameter. The inactive network's
                # zero gradient is then dropped, so Adam skips it as it skips any parameter
                # without a gradient (in one process as under DDP).
                loss = sum(float(on[name]) * terms[name][f"loss_{name}"] for name in nets)
                self.manual_backward(loss)
                for name, net in nets.items():
                    if not on[name]:
                        for p in groups[name]:
                            p.grad = None
                    elif hp.max_grad_norm is not None:
                        nn.utils.clip_grad_norm_(net.parameters(), hp.max_grad_norm)
                    if on[name]:
                        for k, v in terms[name].items():
                            stats.setdefault(k, []).append(v.detach())
            # Only the last update goes through Lightning's wrapper, so global_step counts
            # iterations (Adam skips parameters without gradients).
            if i == n_updates - 1:
                opt.step()
            elif any(on.values()):
                torch_opt.step()
            if hp.target_kl is not None and on["actor"]:
                # the KL averaged over ranks (a copy: reduce works in place), so all stop together
                kl = self.trainer.strategy.reduce(
                    terms["actor"]["approx_kl"].detach().clone(), reduce_op="mean"
                )
                actor_active = bool(kl <= hp.target_kl)
        return {k: torch.stack(v).mean() for k, v in stats.items()}

    def _log_iteration(
        self,
        rollout: dict[str, Any],
        stats: dict[str, Tensor],
        lrs: dict[str, float],
        t_rollout: float,
        t_update: float,
    ) -> None:
        """Log one iteration's scalars (this rank's; only rank 0's loggers write them)."""
        n = rollout["returns"].numel()
        logs = {f"train/{k}": v for k, v in stats.items()}
        logs["train/std"] = self.log_std.detach().exp().mean()
        logs["train/value_mean"] = rollout["values"].mean()
        logs["train/return_mean"] = rollout["returns"].mean()
        for name, lr in lrs.items():
            logs[f"charts/lr_{name}"] = torch.tensor(lr)
        logs["charts/sps"] = torch.tensor(n / max(t_rollout, 1e-9))
        logs["charts/time_rollout"] = torch.tensor(t_rollout)
        logs["charts/time_update"] = torch.tensor(t_update)
        logs["charts/sps_total"] = torch.tensor(n / max(t_rollout + t_update, 1e-9))
        logs["charts/samples"] = torch.tensor(float(self.global_step * n * self.trainer.world_size))
        for k, v in rollout["finished"].items():
            if v:
                logs[f"rollout/{k}"] = torch.tensor(float(np.mean(v)))
        if not self._progress_bar_keys_checked:
            # train/ and charts/ names are known once the first iteration has logged them
            # (rollout/ keys were checked in __init__: they appear only when episodes end).
            unknown = [k for k in self.progress_bar_keys
                       if not k.startswith("rollout/") and k not in logs]
            if unknown:
                known = sorted(k for k in logs if not k.startswith("rollout/"))
                raise ValueError(f"progress_bar_keys {unknown} are not logged; the train/ and "
                                 f"charts/ scalars are {known}")
            self._progress_bar_keys_checked = True
        for k, v in logs.items():
            self.log(k, v.float(), on_step=True, on_epoch=False, batch_size=1,
                     prog_bar=k in self.progress_bar_keys)

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def run_episode(self, env: gym.Env, seed: int, max_steps: int | None = None) -> dict[str, Any]:
        """One deterministic episode (policy mean). Returns ``ep_return``, ``ep_length`` and
        ``(L,)`` arrays of each reported ``info_keys`` entry."""
        obs, _ = env.reset(seed=seed, options=self.hparams.eval_reset_options)
        total, length = 0.0, 0
        series: dict[str, list[float]] = {k: [] for k in self.info_keys}
        while max_steps is None or length < max_steps:
            obs, reward, term, trunc, info = env.step(self.act(obs))
            total += float(reward)
            length += 1
            for k in self.info_keys:
                if k in info:
                    series[k].append(float(info[k]))
            if term or trunc:
                break
        out: dict[str, Any] = {"ep_return": total, "ep_length": length}
        out.update({k: np.asarray(v) for k, v in series.items() if v})
        return out

    def validation_step(self, batch: int, batch_idx: int) -> None:
        assert self.eval_env is not None
        ep = self.run_episode(self.eval_env, seed=int(batch), max_steps=self.hparams.eval_max_steps)
        logs = {"val/ep_return": ep["ep_return"], "val/ep_length": float(ep["ep_length"])}
        for k in self.info_keys:
            if k in ep:
                logs[f"val/{k}"] = float(ep[k].mean())
                stem = k[: -len("_error")] if k.endswith("_error") else k
                logs[f"val/{stem}_rmse"] = float(np.sqrt(np.mean(ep[k] ** 2)))
        # averaged over ranks under DDP (each rank's episodes): every rank logs the same keys
        self.log("val/ep_return", logs.pop("val/ep_return"), on_epoch=True, batch_size=1,
                 prog_bar=True, sync_dist=True)
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
