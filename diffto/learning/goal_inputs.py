"""What goal-conditioned networks read: ``[s; g]``, the relative goal, input normalization.

:class:`GoalInputs` turns a state batch ``s (B, n)`` and a goal batch ``g (B, k)`` into the
features an actor or critic network reads:

* ``[s; g]``;
* with ``relative_goal_dims = d > 0`` also ``g_{:d} − s_{−d:}``: the goal relative to the
  achieved goal that the state's last ``d`` entries hold. A reach is translation invariant in
  that offset, which a network would otherwise have to form by subtracting two inputs of
  different scales;
* with ``normalize`` each feature standardized, ``(x − μ) / σ`` clipped to ``±clip``, with
  ``μ, σ`` fitted once on the first data (:meth:`fit`: a dataset before pre-training, or the
  first replay buffer contents) and then frozen. Statistics are buffers, so checkpoints carry
  them (only with ``normalize``); a feature that does not vary keeps ``σ = 1``.

One instance is shared by a learner's actor and critics (and a TD3 target actor), so every
network reads the same features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GoalInputs"]


class GoalInputs(nn.Module):
    """``(s (B, n), g (B, k)) -> features (B, out_dim)`` (see the module docstring).

    Args:
        state_dim, goal_dim: ``n`` and ``k``.
        relative_goal_dims: ``d`` (0: no relative goal), at most ``min(n, k)``.
        normalize: standardize the features with statistics from :meth:`fit`.
        clip: bound on standardized features.
    """

    mean: Tensor
    std: Tensor
    fitted: Tensor

    def __init__(self, state_dim: int, goal_dim: int, relative_goal_dims: int = 0,
                 normalize: bool = False, clip: float = 10.0) -> None:
        super().__init__()
        if not 0 <= relative_goal_dims <= min(state_dim, goal_dim):
            raise ValueError(f"relative_goal_dims must be in [0, min(state_dim, goal_dim)] = "
                             f"[0, {min(state_dim, goal_dim)}], got {relative_goal_dims}")
        self.state_dim, self.goal_dim = state_dim, goal_dim
        self.relative_goal_dims = relative_goal_dims
        self.normalize, self.clip = normalize, clip
        self.out_dim = state_dim + goal_dim + relative_goal_dims
        # in checkpoints only where they are used (networks without normalization keep the
        # state_dict layout they had before)
        self.register_buffer("mean", torch.zeros(self.out_dim), persistent=normalize)
        self.register_buffer("std", torch.ones(self.out_dim), persistent=normalize)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool), persistent=normalize)

    def features(self, obs: Tensor, goal: Tensor) -> Tensor:
        """The raw features ``[s; g; (g_{:d} − s_{−d:})]``."""
        d = self.relative_goal_dims
        if d == 0:
            return torch.cat([obs, goal], -1)
        return torch.cat([obs, goal, goal[..., :d] - obs[..., -d:]], -1)

    def forward(self, obs: Tensor, goal: Tensor) -> Tensor:
        x = self.features(obs, goal)
        if not self.normalize or not bool(self.fitted):  # raw until fitted
            return x
        return ((x - self.mean) / self.std).clamp(-self.clip, self.clip)

    @property
    def needs_fit(self) -> bool:
        return self.normalize and not bool(self.fitted)

    @torch.no_grad()
    def fit(self, obs: Tensor, goal: Tensor) -> None:
        """Fix ``μ, σ`` to the features' mean and standard deviation over a batch of states and
        goals (rows of ``obs`` and ``goal`` paired)."""
        x = self.features(obs, goal)
        if x.shape[0] < 2:
            raise ValueError(f"fitting the input statistics needs at least 2 rows, got "
                             f"{x.shape[0]}")
        std = x.std(0)
        self.mean.copy_(x.mean(0))
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        self.fitted.fill_(True)
