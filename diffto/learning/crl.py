"""Contrastive RL (CRL): goal-conditioned RL with an InfoNCE critic and no reward.

The critic :class:`~diffto.learning.contrastive_critic.ContrastiveCritic` ``f(s, a, g)`` is
trained to classify, among the goals of a batch, the one reached in the discounted future of
``(s, a)`` (goals drawn at ``Δ ∝ γ^Δ`` steps ahead in the same episode); for the critic
learned this way ``exp f(s, a, g)`` is proportional to the discounted occupancy of ``g`` under
the policy, so it is a Q-function for the reward "be at ``g``" up to a per-goal factor that the
actor's argmax ignores (Eysenbach et al., 2022). The actor is the SAC tanh-Gaussian of
:class:`~diffto.learning.goal_off_policy.GoalOffPolicy` maximizing ``f(s, π(s, g), g) −
α log π`` with a learned temperature; rollouts use the environment's goal, updates use goals
relabelled from the future of the same episode (``actor_goal="future"``, or ``"shuffled"``:
the future goals of other transitions of the batch).

A pull towards demonstrations (``bc_weight = w > 0``, with ``pretrain_dataset``) is
:class:`~diffto.learning.goal_off_policy.GoalOffPolicy`'s, shared with SAC + HER: the
goal-conditioned behaviour cloning of offline contrastive RL (Eysenbach et al., 2022) beside
the critic's objective.

Critic health is logged under ``critic/`` (accuracy, mean positive and negative logits,
logsumexp; :func:`~diffto.learning.contrastive_critic.critic_metrics`) and a
``RuntimeWarning`` is raised once when the accuracy has stayed within twice chance
(``2 / batch_size``) for ``collapse_patience`` consecutive iterations after warm-up: the
critic cannot tell the batch's goals apart (the hindsight goals barely differ, e.g. a cube
that never moves), so the actor gets no signal. ``critic/collapsed`` logs 1 while that holds.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffto.learning.contrastive_critic import (
    ContrastiveCritic,
    Direction,
    Energy,
    critic_metrics,
    infonce_loss,
)
from diffto.learning.goal_off_policy import GoalOffPolicy

__all__ = ["ContrastiveRL"]


class ContrastiveRL(GoalOffPolicy):
    """Contrastive RL over a goal env (see the module docstring; the environment, buffer,
    evaluation and continual-learning arguments are :class:`GoalOffPolicy`'s).

    Args:
        repr_dim: size of the representations φ(s, a) and ψ(g).
        energy: ``"l2"`` (``−‖φ − ψ‖``, default) or ``"dot"``.
        direction: InfoNCE ``"forward"`` (default), ``"backward"`` or ``"symmetric"``.
        logsumexp_penalty: weight of the logsumexp² term.
        actor_goal: ``"future"`` or ``"shuffled"`` (see the module docstring).
        collapse_patience: iterations at chance accuracy before the collapse warning.
        bc_weight: weight of the pull towards the dataset's actions (see the module
            docstring; ``0``: none).
        **kwargs: :class:`GoalOffPolicy` arguments.
    """

    def __init__(self, repr_dim: int = 64, energy: Energy = "l2",
                 direction: Direction = "forward", logsumexp_penalty: float = 0.1,
                 actor_goal: Literal["future", "shuffled"] = "future",
                 collapse_patience: int = 20, bc_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if direction not in ("forward", "backward", "symmetric"):
            raise ValueError(f"direction must be 'forward', 'backward' or 'symmetric', "
                             f"got {direction!r}")
        if actor_goal not in ("future", "shuffled"):
            raise ValueError(f"actor_goal must be 'future' or 'shuffled', got {actor_goal!r}")
        if logsumexp_penalty < 0 or collapse_patience < 1:
            raise ValueError(f"logsumexp_penalty must be >= 0 and collapse_patience >= 1, got "
                             f"{logsumexp_penalty}, {collapse_patience}")
        self.check_bc_weight(bc_weight)
        self.critic = self._make_critic()
        self._chance_iterations = 0
        self._warned_collapse = False

    def _make_critic(self) -> ContrastiveCritic:
        hp = self.hparams
        return ContrastiveCritic(self.state_dim, self.action_dim, self.goal_dim, hp.repr_dim,
                                 hp.width, hp.depth, hp.residual, hp.energy)

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())

    def reset_critic(self) -> None:
        self.reset_in_place(self.critic, self._make_critic())

    def critic_loss(self, batch: dict[str, Tensor], with_metrics: bool = False
                    ) -> tuple[Tensor, dict[str, float]]:
        logits = self.critic.logits(batch["observation"], batch["action"], batch["future_goal"])
        loss = infonce_loss(logits, self.hparams.direction, self.hparams.logsumexp_penalty)
        if not with_metrics:
            return loss, {}
        return loss, {f"critic/{k}": v for k, v in critic_metrics(logits).items()}

    def actor_goals(self, batch: dict[str, Tensor]) -> Tensor:
        goal = batch["future_goal"]
        if self.hparams.actor_goal == "shuffled":
            goal = goal[torch.randperm(goal.shape[0], device=goal.device)]
        return goal

    def actor_value(self, obs: Tensor, action: Tensor, goal: Tensor) -> Tensor:
        return self.critic(obs, action, goal)

    def bc_pull_weight(self) -> float:
        return self.hparams.bc_weight

    def watch_critic(self, metrics: dict[str, float]) -> None:
        accuracy = metrics.get("critic/accuracy", math.nan)
        if math.isnan(accuracy):
            return
        at_chance = accuracy <= 2.0 / self.hparams.batch_size
        self._chance_iterations = self._chance_iterations + 1 if at_chance else 0
        collapsed = self._chance_iterations >= self.hparams.collapse_patience
        self.log("critic/collapsed", float(collapsed), batch_size=1)
        if collapsed and not self._warned_collapse:
            self._warned_collapse = True
            warnings.warn(
                f"the contrastive critic has collapsed: its accuracy has stayed at chance "
                f"(<= 2/{self.hparams.batch_size}) for {self._chance_iterations} iterations, "
                f"so it cannot tell the relabelled goals apart (they barely differ, e.g. an "
                f"object that never moves) and the actor learns nothing from it. Remedies: "
                f"goal_features='achieved_goal_and_hand', more exploration, a larger "
                f"update-to-data ratio", RuntimeWarning, stacklevel=2)
