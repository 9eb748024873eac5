"""A bounded residual over a frozen base actor, for RL that must not take a cloned policy apart.

``π(s, g) = clip(π_b(s, g) + β h ⊙ tanh(μ_r(s, g)))``, with ``π_b`` the base actor's
deterministic action, ``μ_r`` the residual actor's mean, ``h`` the half range of the action box,
``β`` the bound (``scale``) in half-range units, and the clip to the box.

The two phases:

- **inactive** (the buffer ``active`` false): the actor is its base, ``mode`` and sampling
  alike, so offline pre-training (e.g. behaviour cloning of a TO dataset) trains the base.
- **active** (:meth:`activate`): the base is frozen (evaluated without gradient, so its
  parameters get none and the optimizer leaves them) and the residual, whose mean layer starts
  at zero, learns a correction no larger than ``β h``. The policy starts as the base and can
  never leave a band of ``β h`` around it, however the critic's action gradient points.

Sampling, when active: ``u ~ N(μ_r, σ_r²)`` and ``a = clip(π_b + β h ⊙ tanh(u))``. Before the
clip, ``a`` is ``π_b`` (fixed given ``s, g``) plus ``β`` times the residual actor's own centred
action ``h ⊙ tanh(u)``, so its log-density is the residual actor's minus ``A log β`` (the
Jacobian of the scaling in ``A`` action dimensions); where the clip binds it is not a density.

The state (``active`` included) travels in ``state_dict``, so a checkpoint resumes in its phase.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffto.learning.goal_inputs import GoalInputs
from diffto.learning.tanh_gaussian_actor import TanhGaussianActor

__all__ = ["ResidualActor"]


class ResidualActor(nn.Module):
    """``base`` plus at most ``scale`` half ranges of ``residual`` (see the module docstring).

    Args:
        base: the actor the policy starts as (and is, until :meth:`activate`).
        residual: the correction's actor; its mean layer is set to zero here, and it is given
            the base's input features (one set of statistics).
        scale: ``β``, the bound on the residual in half-range units, in ``(0, 1]``.
    """

    def __init__(self, base: TanhGaussianActor, residual: TanhGaussianActor,
                 scale: float) -> None:
        super().__init__()
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1] (half ranges of the action box), "
                             f"got {scale}")
        if not (torch.equal(base.center, residual.center)
                and torch.equal(base.half_range, residual.half_range)):
            raise ValueError("base and residual must act in the same action box")
        self.base, self.residual, self.scale = base, residual, float(scale)
        self.share_inputs(base.inputs)
        action_dim = base.center.shape[0]
        with torch.no_grad():  # tanh(μ_r) = 0 everywhere: the policy starts as the base
            residual.net.head.weight[:action_dim].zero_()
            residual.net.head.bias[:action_dim].zero_()
        self.register_buffer("active", torch.tensor(False))

    @property
    def inputs(self) -> GoalInputs:
        return self.base.inputs

    def share_inputs(self, inputs: GoalInputs) -> None:
        """Make base and residual read ``inputs`` (e.g. the online actor's, for a target)."""
        self.base.inputs = inputs
        self.residual.inputs = inputs

    @property
    def center(self) -> Tensor:
        return self.base.center

    @property
    def half_range(self) -> Tensor:
        return self.base.half_range

    @torch.no_grad()
    def activate(self) -> None:
        """Freeze the base and let the residual act (from here on, and in checkpoints)."""
        self.active.fill_(True)

    def _clip(self, action: Tensor) -> Tensor:
        return action.clamp(self.center - self.half_range, self.center + self.half_range)

    def mode(self, obs: Tensor, goal: Tensor) -> Tensor:
        """The deterministic action: the base's, plus the bounded residual when active."""
        if not bool(self.active):
            return self.base.mode(obs, goal)
        with torch.no_grad():
            base = self.base.mode(obs, goal)
        mean, _ = self.residual._mean_log_std(obs, goal)
        return self._clip(base + self.scale * self.half_range * torch.tanh(mean))

    def forward(self, obs: Tensor, goal: Tensor) -> tuple[Tensor, Tensor]:
        """A reparameterized sample and its log-density ``(B,)`` (before the clip, when
        active)."""
        if not bool(self.active):
            return self.base(obs, goal)
        with torch.no_grad():
            base = self.base.mode(obs, goal)
        mean, log_std = self.residual._mean_log_std(obs, goal)
        u = mean + log_std.exp() * torch.randn_like(mean)
        action = self._clip(base + self.scale * self.half_range * torch.tanh(u))
        log_prob = (self.residual._log_density(mean, log_std, u)
                    - mean.shape[-1] * math.log(self.scale))
        return action, log_prob
