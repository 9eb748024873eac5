"""A goal-conditioned tanh-Gaussian actor ``π(a | s, g)`` (the SAC policy class).

``u ~ N(μ(s, g), σ(s, g)²)``, ``a = tanh(u)`` rescaled to the action box. The log-density of the
squashed sample follows from the change of variables ``a = tanh(u)``:

.. math::

    \\log π(a) = \\log N(u; μ, σ) − Σ_k \\log(1 − \\tanh(u_k)^2)
        − Σ_k \\log \\tfrac{high_k − low_k}{2},

and ``log(1 − tanh(u)²) = 2 (log 2 − u − softplus(−2u))`` is used instead of the literal form,
which loses all precision (and returns −inf) once ``|u|`` passes about 9. ``log σ`` is squashed
smoothly into ``[log_std_min, log_std_max]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffto.learning.goal_inputs import GoalInputs
from diffto.learning.residual_mlp import ResidualMLP

__all__ = ["TanhGaussianActor"]


class TanhGaussianActor(nn.Module):
    """``(obs (B, o), goal (B, g)) -> action (B, a)`` in ``[low, high]``.

    Args:
        obs_dim, goal_dim, action_dim: sizes.
        low, high: the action box (tensors or floats broadcast to ``action_dim``).
        width, depth, residual: the :class:`ResidualMLP` trunk.
        inputs: the features the trunk reads (:class:`GoalInputs`; default ``[obs; goal]``);
            a learner shares one instance between its networks.
        log_std_min, log_std_max: bounds on ``log σ``.
    """

    def __init__(self, obs_dim: int, goal_dim: int, action_dim: int,
                 low: Tensor | float = -1.0, high: Tensor | float = 1.0, width: int = 256,
                 depth: int = 2, residual: bool = False, log_std_min: float = -5.0,
                 log_std_max: float = 2.0, inputs: GoalInputs | None = None) -> None:
        super().__init__()
        if not log_std_min < log_std_max:
            raise ValueError(f"log_std_min must be < log_std_max, got {log_std_min}, "
                             f"{log_std_max}")
        self.inputs = GoalInputs(obs_dim, goal_dim) if inputs is None else inputs
        if (self.inputs.state_dim, self.inputs.goal_dim) != (obs_dim, goal_dim):
            raise ValueError(f"inputs reads states of {self.inputs.state_dim} and goals of "
                             f"{self.inputs.goal_dim} entries, the actor {obs_dim} and {goal_dim}")
        self.net = ResidualMLP(self.inputs.out_dim, 2 * action_dim, width, depth, residual)
        low_t = torch.as_tensor(low, dtype=torch.float32).expand(action_dim).clone()
        high_t = torch.as_tensor(high, dtype=torch.float32).expand(action_dim).clone()
        if not bool((high_t > low_t).all()):
            raise ValueError(f"high must exceed low in every dimension, got {low_t}, {high_t}")
        self.register_buffer("center", (high_t + low_t) / 2)
        self.register_buffer("half_range", (high_t - low_t) / 2)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def _mean_log_std(self, obs: Tensor, goal: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = self.net(self.inputs(obs, goal)).chunk(2, -1)
        lo, hi = self.log_std_min, self.log_std_max
        return mean, lo + 0.5 * (hi - lo) * (torch.tanh(raw) + 1.0)

    def _log_density(self, mean: Tensor, log_std: Tensor, u: Tensor) -> Tensor:
        """``log π`` ``(B,)`` of the action ``center + half_range ⊙ tanh(u)``."""
        std = log_std.exp()
        log_normal = (-0.5 * ((u - mean) / std) ** 2 - log_std
                      - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_det = (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return log_normal - log_det - torch.log(self.half_range).sum()

    def forward(self, obs: Tensor, goal: Tensor) -> tuple[Tensor, Tensor]:
        """A reparameterized sample and its log-density ``(B,)``."""
        mean, log_std = self._mean_log_std(obs, goal)
        u = mean + log_std.exp() * torch.randn_like(mean)
        return self.center + self.half_range * torch.tanh(u), self._log_density(mean, log_std, u)

    def log_prob(self, obs: Tensor, goal: Tensor, action: Tensor, eps: float = 1e-6) -> Tensor:
        """``log π(action | obs, goal)`` ``(B,)`` of given actions (e.g. a dataset's). Actions
        on the box's faces, where ``atanh`` is infinite, are moved ``eps`` inside it."""
        mean, log_std = self._mean_log_std(obs, goal)
        y = ((action - self.center) / self.half_range).clamp(-1.0 + eps, 1.0 - eps)
        return self._log_density(mean, log_std, torch.atanh(y))

    def mode(self, obs: Tensor, goal: Tensor) -> Tensor:
        """The deterministic action ``tanh(μ)`` (for evaluation)."""
        mean, _ = self._mean_log_std(obs, goal)
        return self.center + self.half_range * torch.tanh(mean)
