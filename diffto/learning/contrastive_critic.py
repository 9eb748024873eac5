"""The contrastive critic ``f(s, a, g)`` and its InfoNCE losses.

Contrastive RL (Eysenbach et al., 2022) learns no reward and no value by bootstrapping: the
critic is a classifier of whether goal ``g`` is reached in the discounted future of ``(s, a)``.
With a state-action encoder ``φ(s, a)`` and a goal encoder ``ψ(g)`` (goals in the achieved-goal
space, e.g. an object's position), the critic is an energy

- ``energy="l2"`` (default): ``f(s, a, g) = −‖φ(s, a) − ψ(g)‖₂``;
- ``energy="dot"``: ``f(s, a, g) = φ(s, a) · ψ(g)``.

Training uses a batch of ``B`` transitions ``(s_i, a_i)``, each with a goal ``g_i`` drawn from
its own episode's future (:class:`~diffto.learning.episode_buffer.EpisodeReplayBuffer`): the
``B × B`` matrix ``L_ij = f(s_i, a_i, g_j)`` has the positives on its diagonal and every other
goal of the batch as a negative. The InfoNCE losses are cross-entropies on it:

- ``"forward"``: ``−(1/B) Σ_i log softmax_j(L_ij)|_{j=i}`` (which goal is (s_i, a_i)'s future);
- ``"backward"``: ``−(1/B) Σ_j log softmax_i(L_ij)|_{i=j}`` (which (s, a) led to goal g_j);
- ``"symmetric"``: the mean of the two;

plus ``c · (1/B) Σ_i (logsumexp_j L_ij)²`` (``logsumexp_penalty`` c, 0.1 by default), which pins
the free per-row offset of the logits so that they do not drift.

Health metrics (:func:`critic_metrics`): the categorical ``accuracy`` (how often the positive
has the row's largest logit; chance is ``1/B``), the mean ``logits_pos`` and ``logits_neg`` and
the mean row ``logsumexp``. A critic whose accuracy sits at chance has *collapsed*: every goal
looks alike to it (typically because the goals in the buffer barely differ, as when a cube
never moves), and the actor learns nothing from it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffto.learning.residual_mlp import ResidualMLP

__all__ = ["ContrastiveCritic", "infonce_loss", "critic_metrics"]

Energy = Literal["l2", "dot"]
Direction = Literal["forward", "backward", "symmetric"]


class ContrastiveCritic(nn.Module):
    """``f(s, a, g)`` from encoders ``φ(s, a)`` and ``ψ(g)`` (see the module docstring).

    Args:
        obs_dim, action_dim, goal_dim: input sizes.
        repr_dim: size of the representations φ and ψ.
        width, depth, residual: the encoders' :class:`ResidualMLP` shape.
        energy: ``"l2"`` or ``"dot"``.
    """

    def __init__(self, obs_dim: int, action_dim: int, goal_dim: int, repr_dim: int = 64,
                 width: int = 256, depth: int = 2, residual: bool = False,
                 energy: Energy = "l2") -> None:
        super().__init__()
        if energy not in ("l2", "dot"):
            raise ValueError(f"energy must be 'l2' or 'dot', got {energy!r}")
        self.energy = energy
        self.sa_encoder = ResidualMLP(obs_dim + action_dim, repr_dim, width, depth, residual)
        self.goal_encoder = ResidualMLP(goal_dim, repr_dim, width, depth, residual)

    def representations(self, obs: Tensor, action: Tensor, goal: Tensor) -> tuple[Tensor, Tensor]:
        """``φ(s, a)`` and ``ψ(g)``, each ``(B, repr_dim)``."""
        return self.sa_encoder(torch.cat([obs, action], -1)), self.goal_encoder(goal)

    def pairwise(self, phi: Tensor, psi: Tensor) -> Tensor:
        """``f`` for every pair: ``(B, B)`` with ``[i, j] = f(φ_i, ψ_j)``."""
        if self.energy == "dot":
            return phi @ psi.T
        sq = (phi * phi).sum(-1, keepdim=True) + (psi * psi).sum(-1) - 2.0 * phi @ psi.T
        return -torch.sqrt(sq.clamp_min(1e-12))

    def logits(self, obs: Tensor, action: Tensor, goal: Tensor) -> Tensor:
        """The ``(B, B)`` logit matrix of a batch (positives on the diagonal)."""
        return self.pairwise(*self.representations(obs, action, goal))

    def forward(self, obs: Tensor, action: Tensor, goal: Tensor) -> Tensor:
        """``f(s_i, a_i, g_i)`` row by row, ``(B,)``."""
        phi, psi = self.representations(obs, action, goal)
        if self.energy == "dot":
            return (phi * psi).sum(-1)
        return -torch.sqrt(((phi - psi) ** 2).sum(-1).clamp_min(1e-12))


def infonce_loss(logits: Tensor, direction: Direction = "forward",
                 logsumexp_penalty: float = 0.1) -> Tensor:
    """InfoNCE over a ``(B, B)`` logit matrix with positives on the diagonal, plus the
    logsumexp² penalty on its rows (see the module docstring)."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be a square (B, B) matrix, got shape {tuple(logits.shape)}")
    labels = torch.arange(logits.shape[0], device=logits.device)
    if direction == "forward":
        loss = F.cross_entropy(logits, labels)
    elif direction == "backward":
        loss = F.cross_entropy(logits.T, labels)
    elif direction == "symmetric":
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    else:
        raise ValueError(f"direction must be 'forward', 'backward' or 'symmetric', "
                         f"got {direction!r}")
    if logsumexp_penalty:
        loss = loss + logsumexp_penalty * torch.logsumexp(logits, 1).pow(2).mean()
    return loss


@torch.no_grad()
def critic_metrics(logits: Tensor) -> dict[str, float]:
    """``accuracy``, ``logits_pos``, ``logits_neg`` and ``logsumexp`` of a logit matrix."""
    B = logits.shape[0]
    diag = torch.diagonal(logits)
    eye = torch.eye(B, dtype=torch.bool, device=logits.device)
    labels = torch.arange(B, device=logits.device)
    return {
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
        "logits_pos": float(diag.mean()),
        "logits_neg": float(logits[~eye].mean()) if B > 1 else float("nan"),
        "logsumexp": float(torch.logsumexp(logits, 1).mean()),
    }
