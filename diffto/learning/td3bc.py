"""TD3+BC, goal-conditioned, from offline TO data to online fine-tuning, as a LightningModule.

Offline-to-online RL seeded with a TO dataset: the replay buffer starts with the dataset's
episodes (``pretrain_dataset``, the documented trajectory format, e.g. the Panda TO expert's
``lightning predict`` output), ``pretrain_updates`` updates of critic and actor are made on it
before the first environment step (``pretrain_actor=True``: offline TD3+BC), then the policy
collects in vectorized environments and keeps training on the data it gathers beside the
dataset's. Rewards, relabelling (HER by episode id), the twin critics and their targets are
:class:`~diffto.learning.goal_q_learning.GoalQLearning`'s; ``reward_type="stage_cost"`` is minus
the TO expert's stage cost, ``"sparse"`` the task's success.

The deterministic policy is ``π(s, g) = tanh(μ(s, g))`` of the
:class:`~diffto.learning.tanh_gaussian_actor.TanhGaussianActor` (its ``mode``), rescaled to
the action box; its spread head is unused.

Critic (TD3)
    Target policy smoothing: ``a' = clip(π̄(s', g) + clip(ε, −c, c), low, high)`` with
    ``ε ~ N(0, σ_target²)`` (in units of the half action range, as ``c``) and the target actor
    ``π̄`` Polyak-averaged at the critics' rate; ``y = r + γ (1 − terminal) min_i Q̄_i(s', a',
    g)``, clipped as the reward allows.

Actor (TD3+BC), every ``policy_delay``-th update
    ``L(π) = −λ mean Q_1(s, π(s, g), g) + w · mean ‖(π(s, g) − a) / half_range‖²₂ / dim``,
    ``λ = α / mean |Q_1(s, π(s, g), g)|`` (held constant in the gradient), where ``(s, a)`` are
    the batch's transitions (dataset or online; the BC mean over the dataset's rows alone with
    ``bc_data="dataset"``) and ``g`` their relabelled goals. Normalizing by
    the mean ``|Q|`` makes ``α`` (2.5 in the TD3+BC paper) independent of the reward's scale.
    With ``actor_pessimism = k`` the actor maximizes ``mean_i Q_i − k · std_i Q_i`` over the
    critic ensemble (``num_critics``) instead of ``Q_1``: where the critics disagree, off the
    data they were fitted on, the estimate is lowered and its action gradient with it.

The pull towards the data
    The behaviour-cloning weight ``w`` is ``bc_weight`` during pre-training and anneals linearly
    to ``bc_weight_final`` over the first ``bc_anneal_steps`` online environment steps, so
    online fine-tuning can leave the data's actions where the critic finds better ones.
    ``alpha_offline`` is ``α`` during pre-training (``None``: ``alpha``; ``0``: pure behaviour
    cloning, then online RL), and ``α`` rises linearly from it to ``alpha`` over the first
    ``alpha_ramp_steps`` online steps (``0``: at once), while the critic learns the states the
    policy visits; ``alpha_hold_steps`` holds it at ``alpha_offline`` for that many online steps
    before the ramp starts (a critic warm-up: the critics fit the cloned policy's own rollouts
    before their action gradient reaches it). ``bc_data="batch"`` clones every row of the
    batch, the policy's own online actions too; ``"dataset"`` only the dataset's rows (the TO
    expert's actions), so the pull stays towards the expert; with ``dataset_fraction`` they
    keep a fixed share of each batch.

A conservative critic (CQL), with ``conservative_weight = β > 0``
    Each critic's loss gains ``β · mean_s [logsumexp_j Q_i(s, a_j, g) − log 2K − Q_i(s, a, g)]``
    over ``K = conservative_actions`` actions drawn uniformly in the action box and ``K`` from
    the exploration policy ``π(s, g) + ε``, with ``(s, a)`` the batch's transitions. The
    logsumexp is a soft maximum of the critic over actions, so the term lowers ``Q`` where it
    is high away from the batch's actions and raises it at them; it is zero when ``Q`` is flat
    in the action. A critic fitted on a narrow dataset is otherwise free to rise just off the
    data, and its action gradient leads the actor there.

A bounded residual on the cloned policy, with ``residual_scale = β``
    The actor is a :class:`~diffto.learning.residual_actor.ResidualActor`: pre-training trains
    its base (with ``alpha_offline: 0``, behaviour cloning of the dataset), and from the first
    online step the base is frozen and the policy is ``clip(π_b(s, g) + β h ⊙ tanh(μ_r(s,
    g)))``, the residual starting at zero. Everything above then acts on that policy: the Q
    term's gradient reaches the residual alone, and the policy stays within ``β`` half ranges
    of the cloned one, however far the critic's action gradient points. ``panda_td3bc.yaml``
    ships it with ``β = 0.03`` (on the Panda reach, goals reached 0.56 → 0.74 on average over
    three training seeds; the whole actor trained online ends below its cloned policy).

Exploration: ``π(s, g) + N(0, exploration_noise²)`` (half-range units), clipped to the box.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from torch import Tensor

from diffto.learning.goal_q_learning import GoalQLearning
from diffto.learning.residual_actor import ResidualActor
from diffto.learning.tanh_gaussian_actor import TanhGaussianActor

__all__ = ["GoalTD3BC"]


class GoalTD3BC(GoalQLearning):
    """Goal-conditioned TD3+BC (see the module docstring).

    Args:
        alpha: ``α`` of the Q term's normalization (TD3+BC's 2.5).
        bc_weight, bc_weight_final, bc_anneal_steps: the behaviour-cloning weight, its value
            after annealing and the online environment steps over which it anneals.
        policy_delay: critic updates per actor update (TD3's 2).
        target_noise, target_noise_clip: ``σ_target`` and ``c`` of target policy smoothing.
        exploration_noise: standard deviation of the exploration noise.
        alpha_offline, alpha_ramp_steps: ``α`` during pre-training (``None``: ``alpha``) and
            the online environment steps over which it rises to ``alpha`` (``0``: at once).
        alpha_hold_steps: online environment steps at ``alpha_offline`` before the ramp.
        conservative_weight, conservative_actions: ``β`` and ``K`` of the conservative
            critic term (``β = 0``: none, TD3's critics).
        bc_data: ``"batch"`` (every row) or ``"dataset"`` (the dataset's rows only): what the
            behaviour-cloning term clones.
        actor_pessimism: ``k`` of the actor's ensemble estimate (``None``: ``Q_1``, TD3's).
        residual_scale: ``β`` of a bounded residual on the pre-trained actor, in half ranges
            of the action box (``None``: the actor itself is trained online); needs
            ``pretrain_dataset``, ``pretrain_actor`` and ``pretrain_updates > 0``.
        **kwargs: :class:`GoalQLearning` and :class:`GoalOffPolicy` arguments.
    """

    def __init__(self, alpha: float = 2.5, bc_weight: float = 1.0, bc_weight_final: float = 0.1,
                 bc_anneal_steps: int = 50_000, policy_delay: int = 2,
                 target_noise: float = 0.2, target_noise_clip: float = 0.5,
                 exploration_noise: float = 0.1, alpha_offline: float | None = None,
                 alpha_ramp_steps: int = 0, bc_data: Literal["batch", "dataset"] = "batch",
                 actor_pessimism: float | None = None, alpha_hold_steps: int = 0,
                 conservative_weight: float = 0.0, conservative_actions: int = 10,
                 residual_scale: float | None = None, **kwargs: Any) -> None:
        if residual_scale is not None and not 0.0 < residual_scale <= 1.0:
            raise ValueError(f"residual_scale must be in (0, 1] (half ranges of the action "
                             f"box) or None, got {residual_scale}")
        super().__init__(**kwargs)
        self.save_hyperparameters()
        for name, value in (("alpha", alpha), ("bc_weight", bc_weight),
                            ("bc_weight_final", bc_weight_final), ("target_noise", target_noise),
                            ("target_noise_clip", target_noise_clip),
                            ("exploration_noise", exploration_noise),
                            ("conservative_weight", conservative_weight),
                            ("alpha_offline", 0.0 if alpha_offline is None else alpha_offline)):
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("bc_anneal_steps", bc_anneal_steps), ("policy_delay", policy_delay),
                            ("conservative_actions", conservative_actions)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, value in (("alpha_ramp_steps", alpha_ramp_steps),
                            ("alpha_hold_steps", alpha_hold_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if alpha_hold_steps and alpha_offline is None:
            raise ValueError("alpha_hold_steps holds the Q term at alpha_offline: set "
                             "alpha_offline too (without it there is nothing to hold)")
        if actor_pessimism is not None and not actor_pessimism >= 0.0:
            raise ValueError(f"actor_pessimism must be >= 0 or None, got {actor_pessimism}")
        if bc_data not in ("batch", "dataset"):
            raise ValueError(f"bc_data must be 'batch' or 'dataset', got {bc_data!r}")
        if bc_data == "dataset" and (self.hparams.pretrain_dataset is None
                                     or self.hparams.task_sequence is not None):
            raise ValueError("bc_data='dataset' needs pretrain_dataset (the rows to clone) and "
                             "a single task (no task_sequence)")
        if residual_scale is not None and not (self.hparams.pretrain_dataset is not None
                                               and self.hparams.pretrain_actor
                                               and self.hparams.pretrain_updates > 0
                                               and self.hparams.task_sequence is None):
            raise ValueError("residual_scale needs pretrain_dataset, pretrain_actor=True and "
                             "pretrain_updates > 0 (the base it corrects is the pre-trained "
                             "actor) and a single task (no task_sequence)")
        self.actor_target = copy.deepcopy(self.actor)
        if isinstance(self.actor_target, ResidualActor):  # one set of input statistics
            self.actor_target.share_inputs(self.actor.inputs)
        else:
            self.actor_target.inputs = self.actor.inputs
        self.actor_target.requires_grad_(False)

    def _make_actor(self, act_space) -> TanhGaussianActor | ResidualActor:
        base = super()._make_actor(act_space)
        scale = self.hparams.get("residual_scale")
        if scale is None:
            return base
        return ResidualActor(base, super()._make_actor(act_space), scale)

    def pretrain(self) -> None:
        """Pre-training (see :class:`GoalOffPolicy`); with ``residual_scale`` the base is then
        frozen and the residual acts, in the actor and its target alike."""
        super().pretrain()
        if isinstance(self.actor, ResidualActor):
            self.actor.activate()
            self.actor_target.load_state_dict(self.actor.state_dict())

    def bc_weight(self) -> float:
        """The behaviour-cloning weight at the current online environment step."""
        hp = self.hparams
        progress = min(1.0, self.env_steps / hp.bc_anneal_steps)
        return hp.bc_weight + (hp.bc_weight_final - hp.bc_weight) * progress

    def alpha(self) -> float:
        """``α`` of the Q term at the current online environment step (0 during pre-training
        with ``alpha_offline=0``)."""
        hp = self.hparams
        start = hp.alpha if hp.alpha_offline is None else hp.alpha_offline
        hold = hp.alpha_hold_steps
        if self.env_steps == 0 or self.env_steps < hold:
            return start
        if hp.alpha_ramp_steps == 0:
            return hp.alpha
        progress = min(1.0, (self.env_steps - hold) / hp.alpha_ramp_steps)
        return start + (hp.alpha - start) * progress

    def _noisy(self, action: Tensor, std: float, clip: float | None = None) -> Tensor:
        """``action + ε`` with ``ε ~ N(0, std²)`` in half-range units (clipped to ``±clip``),
        clipped to the action box."""
        half, center = self.actor.half_range, self.actor.center
        noise = torch.randn_like(action) * std
        if clip is not None:
            noise = noise.clamp(-clip, clip)
        return torch.maximum(torch.minimum(action + half * noise, center + half), center - half)

    def td_target(self, batch: dict[str, Tensor], goal: Tensor, reward: Tensor) -> Tensor:
        hp = self.hparams
        obs = batch["next_observation"]
        next_action = self._noisy(self.actor_target.mode(obs, goal), hp.target_noise,
                                  hp.target_noise_clip)
        next_q = self.q_values(self.q_target, obs, next_action, goal).min(0).values
        return reward + hp.gamma * (1.0 - batch["terminal"].float()) * next_q

    def extra_critic_loss(self, batch: dict[str, Tensor], goal: Tensor) -> Tensor:
        """The conservative term of the module docstring (zero with ``conservative_weight=0``)."""
        hp = self.hparams
        if hp.conservative_weight == 0.0:
            return super().extra_critic_loss(batch, goal)
        obs, k = batch["observation"], hp.conservative_actions
        with torch.no_grad():
            half, center = self.actor.half_range, self.actor.center
            uniform = center + half * (2.0 * torch.rand(k, *batch["action"].shape,
                                                        dtype=obs.dtype, device=obs.device) - 1.0)
            policy = self._noisy(self.actor.mode(obs, goal).expand(k, -1, -1),
                                 hp.exploration_noise)
            actions = torch.cat([uniform, policy])  # (2K, B, A)
        n, rows = 2 * k, obs.shape[0]
        q_sampled = self.q_values(self.q, obs.repeat(n, 1), actions.reshape(n * rows, -1),
                                  goal.repeat(n, 1)).view(len(self.q), n, rows)
        q_data = self.q_values(self.q, obs, batch["action"], goal)
        gap = torch.logsumexp(q_sampled, 1) - math.log(n) - q_data
        return hp.conservative_weight * gap.mean(-1).sum()

    def actor_loss(self, batch: dict[str, Tensor], with_metrics: bool = False
                   ) -> tuple[Tensor | None, dict[str, float]]:
        if self.updates % self.hparams.policy_delay:
            return None, {}
        goal = self.actor_goals(batch)
        obs = batch["observation"]
        action = self.actor.mode(obs, goal)
        k = self.hparams.actor_pessimism
        if k is None:
            q = self.q_values(self.q[:1], obs, action, goal)[0]
        else:
            qs = self.q_values(self.q, obs, action, goal)
            q = qs.mean(0) - k * qs.std(0)
        lam = self.alpha() / q.abs().mean().detach().clamp_min(1e-6)
        bc = (((action - batch["action"]) / self.actor.half_range) ** 2).mean(-1)
        if self.hparams.bc_data == "dataset":
            rows = batch["from_dataset"].to(bc.dtype)
            n_rows = float(rows.sum())
            bc = (bc * rows).sum() / max(n_rows, 1.0)  # 0 without dataset rows
        else:
            n_rows, bc = float(bc.shape[0]), bc.mean()
        w = self.bc_weight()
        loss = -lam * q.mean() + w * bc
        metrics = {}
        if with_metrics:
            metrics = {"loss/actor": float(loss.detach()),
                       "actor/bc_mse": float(bc.detach()) if n_rows else float("nan"),
                       "actor/bc_rows": n_rows,
                       "actor/bc_weight": w, "actor/lambda": float(lam),
                       "actor/q_alpha": self.alpha()}
        return loss, metrics

    @torch.no_grad()
    def after_update(self) -> None:
        super().after_update()
        tau = self.hparams.tau
        for t, p in zip(self.actor_target.parameters(), self.actor.parameters(), strict=True):
            t.lerp_(p, tau)

    @torch.no_grad()
    def reset_targets(self) -> None:
        super().reset_targets()
        if hasattr(self, "actor_target"):
            for t, p in zip(self.actor_target.parameters(), self.actor.parameters(),
                            strict=True):
                t.copy_(p)

    def dataset_rows_options(self) -> list[str]:
        return super().dataset_rows_options() + (
            ["bc_data='dataset'"] if self.hparams.bc_data == "dataset" else [])

    def explore(self, obs: Tensor, goal: Tensor) -> Tensor:
        return self._noisy(self.actor.mode(obs, goal), self.hparams.exploration_noise)
