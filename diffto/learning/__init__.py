"""LightningModules: the learning methods built on diffto's layers.

- :class:`MPCImitation`: learn an expert MPC's cost weights (and dynamics parameters) by
  backpropagating an imitation loss through the MPC layer.
- :class:`PPO`: PPO over vectorized gymnasium environments; with ``go2_tracking.yaml`` it is
  OPT-Mimic residual tracking of TO references.
"""

from diffto.learning.imitation import MPCImitation, imitation_loss, weight_error
from diffto.learning.normalizer import RunningNormalizer
from diffto.learning.ppo import PPO
from diffto.learning.ppo_losses import approx_kl, discounted_returns, pg_loss, v_loss

__all__ = [
    "MPCImitation",
    "imitation_loss",
    "weight_error",
    "PPO",
    "pg_loss",
    "v_loss",
    "approx_kl",
    "discounted_returns",
    "RunningNormalizer",
]
