"""LightningModules: the learning methods built on diffto's layers.

Through the solver:
- :class:`MPCImitation`: learn an expert MPC's cost weights (and dynamics parameters) by
  backpropagating an imitation loss through the MPC layer.

TO as a teacher (datasets from ``lightning predict``, :mod:`diffto.data`):
- :class:`GoalConditionedBC` (with :class:`GoalPolicy` and :class:`TransitionsDataModule`):
  goal-conditioned behavior cloning of a TO expert, evaluated in the environment on held-out
  goals next to the expert (:func:`evaluate_policy`, :func:`evaluate_expert`).
- :class:`DAgger`: the expert labels the states the learner visits (:func:`collect_labels`).
- :class:`CostToGoCritic`: ``V(s, g)`` regressed on the TO cost-to-go, used as an MPC's
  terminal cost (:class:`LearnedTerminalValue`, :func:`learned_terminal_value`).
- :class:`PolicyWarmStart`: a policy rolled out through the planning model as the MPC's
  warm start (:func:`rollout_policy`).

RL:
- :class:`PPO`: PPO over vectorized gymnasium environments; with ``go2_tracking.yaml`` it is
  OPT-Mimic residual tracking of TO references.
"""

from diffto.learning.dagger import DAgger, collect_labels
from diffto.learning.gcbc import GoalConditionedBC, TransitionsDataModule
from diffto.learning.goal_evaluation import evaluate_expert, evaluate_policy
from diffto.learning.goal_policy import GoalPolicy
from diffto.learning.imitation import MPCImitation, imitation_loss, weight_error
from diffto.learning.normalizer import RunningNormalizer
from diffto.learning.ppo import PPO
from diffto.learning.ppo_losses import approx_kl, discounted_returns, pg_loss, v_loss
from diffto.learning.value import (
    CostToGoCritic,
    CostToGoDataModule,
    LearnedTerminalValue,
    learned_terminal_value,
)
from diffto.learning.warm_start import PolicyWarmStart, rollout_policy

__all__ = [
    # through the solver
    "MPCImitation",
    "imitation_loss",
    "weight_error",
    # TO as a teacher
    "GoalPolicy",
    "GoalConditionedBC",
    "TransitionsDataModule",
    "DAgger",
    "collect_labels",
    "evaluate_policy",
    "evaluate_expert",
    "CostToGoCritic",
    "CostToGoDataModule",
    "LearnedTerminalValue",
    "learned_terminal_value",
    "PolicyWarmStart",
    "rollout_policy",
    # RL
    "PPO",
    "pg_loss",
    "v_loss",
    "approx_kl",
    "discounted_returns",
    "RunningNormalizer",
]
