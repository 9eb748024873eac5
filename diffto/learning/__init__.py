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

Offline policies from demonstrations (e.g. Metaworld's scripted experts,
``lightning predict --config metaworld_experts.yaml``), single- or multi-task:
- :class:`BehaviorCloning` (MSE, Gaussian or Gaussian-mixture head, action chunks) and
  :class:`DiffusionPolicy` (DDPM/DDIM over action chunks, :class:`DiffusionActionHead`), both
  :class:`OfflinePolicy` modules fed by :class:`DemonstrationsDataModule` and evaluated on
  held-out task variants next to the expert (:func:`evaluate_on_tasks`).

RL:
- :class:`PPO`: PPO over vectorized gymnasium environments; with ``go2_tracking.yaml`` it is
  OPT-Mimic residual tracking of TO references.
- :class:`ContrastiveRL`: goal-conditioned RL with an InfoNCE critic
  (:class:`ContrastiveCritic`) and no reward, and :class:`GoalSAC` (SAC with HER), both
  :class:`GoalOffPolicy` modules that own their environments and an
  :class:`EpisodeReplayBuffer`; continual learning over a task sequence
  (:func:`continual_metrics`) and critic pre-training on TO datasets.
"""

from diffto.learning.bc import BehaviorCloning
from diffto.learning.continual_metrics import continual_metrics, forward_transfer
from diffto.learning.contrastive_critic import ContrastiveCritic, infonce_loss
from diffto.learning.crl import ContrastiveRL
from diffto.learning.dagger import DAgger, collect_labels
from diffto.learning.demonstrations import DemonstrationsDataModule
from diffto.learning.diffusion import DiffusionActionHead
from diffto.learning.diffusion_policy import DiffusionPolicy
from diffto.learning.episode_buffer import EpisodeReplayBuffer
from diffto.learning.gcbc import GoalConditionedBC, TransitionsDataModule
from diffto.learning.goal_evaluation import evaluate_expert, evaluate_policy
from diffto.learning.goal_off_policy import GoalOffPolicy
from diffto.learning.goal_policy import GoalPolicy
from diffto.learning.goal_sac import GoalSAC
from diffto.learning.imitation import MPCImitation, imitation_loss, weight_error
from diffto.learning.normalizer import RunningNormalizer
from diffto.learning.offline_policy import OfflinePolicy
from diffto.learning.ppo import PPO
from diffto.learning.ppo_losses import approx_kl, discounted_returns, pg_loss, v_loss
from diffto.learning.task_evaluation import evaluate_on_tasks
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
    # offline policies from demonstrations
    "OfflinePolicy",
    "BehaviorCloning",
    "DiffusionPolicy",
    "DiffusionActionHead",
    "DemonstrationsDataModule",
    "evaluate_on_tasks",
    # RL
    "PPO",
    "pg_loss",
    "v_loss",
    "approx_kl",
    "discounted_returns",
    "RunningNormalizer",
    "GoalOffPolicy",
    "ContrastiveRL",
    "ContrastiveCritic",
    "infonce_loss",
    "GoalSAC",
    "EpisodeReplayBuffer",
    "continual_metrics",
    "forward_transfer",
]
