"""SAC with hindsight experience replay (HER): the reward-based baseline of contrastive RL.

Twin critics learn the goal-conditioned value of the sparse reward (or of a TO stage cost) of
:class:`~diffto.learning.goal_q_learning.GoalQLearning`, with its relabelled goals and clipped
targets. The actor is the SAC tanh-Gaussian of
:class:`~diffto.learning.goal_off_policy.GoalOffPolicy` with its learned temperature α,
maximizing ``min_i Q_i(s, π(s, g), g) − α log π``.

TD target
    The soft Bellman equation of the entropy-regularized return is
    ``Q(s, a, g) = r + γ (1 − terminal) E_{a' ~ π(·|s', g)}[Q(s', a', g) − α log π(a'|s', g)]``.
    With the target critics ``Q̄_i`` and one sample ``a' ~ π(·|s', g)`` the regression target is

        ``y = r + γ (1 − terminal) (min_i Q̄_i(s', a', g) − α log π(a'|s', g))``

    and the critic loss is ``Σ_i mean (Q_i(s, a, g) − y)²``. The entropy bonus can push an
    unclipped target above 0 (or, with a negative entropy, below the floor): the clip of
    :meth:`~diffto.learning.goal_q_learning.GoalQLearning.clip_target` applies.

With ``pretrain_dataset`` and ``bc_weight > 0`` the actor is also pulled towards the
demonstrations' actions (:class:`~diffto.learning.goal_off_policy.GoalOffPolicy`'s pull, the
same as :class:`~diffto.learning.crl.ContrastiveRL`'s): SAC + HER with demonstrations, the
reward-based baseline of contrastive RL given the same data.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from diffto.learning.goal_q_learning import GoalQLearning

__all__ = ["GoalSAC"]


class GoalSAC(GoalQLearning):
    """SAC with HER over a goal env (see the module docstring; the reward, relabelling and
    critic arguments are :class:`GoalQLearning`'s, the environment, buffer, evaluation and
    continual-learning ones :class:`GoalOffPolicy`'s).

    Args:
        bc_weight: weight of the pull towards the dataset's actions (``0``: none; > 0 needs
            ``pretrain_dataset`` and a single task).
        **kwargs: :class:`GoalQLearning` and :class:`GoalOffPolicy` arguments.
    """

    def __init__(self, bc_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.check_bc_weight(bc_weight)

    def bc_pull_weight(self) -> float:
        return self.hparams.bc_weight

    def td_target(self, batch: dict[str, Tensor], goal: Tensor, reward: Tensor) -> Tensor:
        next_action, next_log_prob = self.actor(batch["next_observation"], goal)
        next_q = self.q_values(self.q_target, batch["next_observation"], next_action,
                               goal).min(0).values
        soft_value = next_q - self.log_alpha.exp() * next_log_prob
        return reward + self.hparams.gamma * (1.0 - batch["terminal"].float()) * soft_value
