"""Implicit Q-learning (IQL), goal-conditioned, from offline TO data to online fine-tuning.

The same offline-to-online pattern as :class:`~diffto.learning.td3bc.GoalTD3BC`: the replay
buffer starts with a TO dataset's episodes, ``pretrain_updates`` updates (with
``pretrain_actor=True``) learn offline, then the policy collects in vectorized environments and
learning goes on with the data it gathers. Rewards, HER relabelling and the twin critics are
:class:`~diffto.learning.goal_q_learning.GoalQLearning`'s.

IQL never evaluates the critic at actions outside the data:

* State value by expectile regression on the target critics (``τ`` = ``expectile``):
  ``L_V = mean |τ − 1(u < 0)| u²`` with ``u = min_i Q̄_i(s, a, g) − V(s, g)``; for ``τ → 1``
  ``V`` approaches the best in-data action's value.
* Critics on the state value of the next state: ``y = r + γ (1 − terminal) V(s', g)``
  (clipped as the reward allows), ``L_Q = Σ_i mean (Q_i(s, a, g) − y)²``.
* Actor by advantage-weighted regression onto the batch's actions:
  ``L_π = −mean min(exp(β (min_i Q̄_i(s, a, g) − V(s, g))), w_max) log π(a | s, g)``, with the
  tanh-Gaussian's exact log-density of the given action.

The pull towards the data is ``1 / β``: small ``β`` clones the data, large ``β`` follows the
advantage. ``β`` anneals linearly from ``temperature`` to ``temperature_final`` over the first
``temperature_anneal_steps`` online environment steps. Exploration samples the stochastic
policy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffto.learning.goal_q_learning import GoalQLearning
from diffto.learning.residual_mlp import ResidualMLP

__all__ = ["GoalIQL"]


class GoalIQL(GoalQLearning):
    """Goal-conditioned IQL (see the module docstring).

    Args:
        expectile: ``τ`` of the value regression, in ``(0, 1)`` (0.7 in the IQL paper).
        temperature, temperature_final, temperature_anneal_steps: ``β`` of the advantage
            weights (3 in the paper), its value after annealing (``None``: no annealing) and
            the online environment steps over which it anneals.
        max_weight: the advantage weights' cap ``w_max``.
        **kwargs: :class:`GoalQLearning` and :class:`GoalOffPolicy` arguments.
    """

    def __init__(self, expectile: float = 0.7, temperature: float = 3.0,
                 temperature_final: float | None = None, temperature_anneal_steps: int = 50_000,
                 max_weight: float = 100.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if not 0.0 < expectile < 1.0:
            raise ValueError(f"expectile must be in (0, 1), got {expectile}")
        for name, value in (("temperature", temperature), ("max_weight", max_weight),
                            ("temperature_final", temperature
                             if temperature_final is None else temperature_final)):
            if not value > 0.0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if isinstance(temperature_anneal_steps, bool) or not isinstance(
                temperature_anneal_steps, int) or temperature_anneal_steps < 1:
            raise ValueError(f"temperature_anneal_steps must be an int >= 1, got "
                             f"{temperature_anneal_steps!r}")
        self.value = self._make_value()

    def _make_value(self) -> ResidualMLP:
        hp = self.hparams
        return ResidualMLP(self.actor.inputs.out_dim, 1, hp.width, hp.depth, hp.residual)

    def state_value(self, obs: Tensor, goal: Tensor) -> Tensor:
        """``V(s, g)`` ``(B,)``."""
        return self.value(self.actor.inputs(obs, goal)).squeeze(-1)

    def critic_parameters(self) -> list[nn.Parameter]:
        return [*self.q.parameters(), *self.value.parameters()]

    def reset_critic(self) -> None:
        super().reset_critic()
        self.reset_in_place(self.value, self._make_value())

    def temperature(self) -> float:
        """``β`` at the current online environment step."""
        hp = self.hparams
        final = hp.temperature if hp.temperature_final is None else hp.temperature_final
        progress = min(1.0, self.env_steps / hp.temperature_anneal_steps)
        return hp.temperature + (final - hp.temperature) * progress

    def td_target(self, batch: dict[str, Tensor], goal: Tensor, reward: Tensor) -> Tensor:
        next_v = self.state_value(batch["next_observation"], goal)
        return reward + self.hparams.gamma * (1.0 - batch["terminal"].float()) * next_v

    def _advantage(self, batch: dict[str, Tensor], goal: Tensor) -> tuple[Tensor, Tensor]:
        """``(min_i Q̄_i(s, a, g) (no gradient), V(s, g))`` of the batch's actions."""
        with torch.no_grad():
            q = self.q_values(self.q_target, batch["observation"], batch["action"],
                              goal).min(0).values
        return q, self.state_value(batch["observation"], goal)

    def extra_critic_loss(self, batch: dict[str, Tensor], goal: Tensor) -> Tensor:
        q, v = self._advantage(batch, goal)
        u = q - v
        weight = torch.abs(self.hparams.expectile - (u < 0).float())
        return (weight * u ** 2).mean()

    def actor_loss(self, batch: dict[str, Tensor], with_metrics: bool = False
                   ) -> tuple[Tensor | None, dict[str, float]]:
        goal = self.actor_goals(batch)
        with torch.no_grad():
            q, v = self._advantage(batch, goal)
            beta = self.temperature()
            weight = torch.exp(beta * (q - v)).clamp(max=self.hparams.max_weight)
        log_prob = self.actor.log_prob(batch["observation"], goal, batch["action"])
        loss = -(weight * log_prob).mean()
        metrics = {}
        if with_metrics:
            metrics = {"loss/actor": float(loss.detach()),
                       "actor/advantage_mean": float((q - v).mean()),
                       "actor/weight_mean": float(weight.mean()),
                       "actor/log_prob": float(log_prob.detach().mean()),
                       "actor/temperature": beta}
        return loss, metrics
