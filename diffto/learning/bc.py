"""Behaviour cloning from demonstrations, single- or multi-task, with action chunks.

The policy is :class:`~diffto.learning.goal_policy.GoalPolicy` (an MLP with its input
normalization and action box, saved in checkpoints) over the inputs of
:class:`~diffto.learning.offline_policy.OfflinePolicy`: the last ``obs_horizon`` observations
and the task's one-hot. It predicts ``action_horizon`` actions at once (the chunk's
dimensions side by side, each in the action box) and is trained on the demonstrations'
windows by

- ``head="deterministic"``: the mean squared error in half-widths of the box;
- ``head="gaussian"``: the Gaussian negative log-likelihood (the mean acts);
- ``head="mixture"``: a ``mixtures``-component Gaussian mixture's negative log-likelihood
  (the most probable component's mean acts), for demonstrations that go two ways from one
  state.

Everything else (evaluation in the environment, checkpoints, the report with the expert, the
best and the last checkpoint) is the shared module's. Run with ``lightning fit --config
metaworld_bc.yaml``.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from diffto.learning.goal_policy import ACTIVATIONS, GoalPolicy, Head
from diffto.learning.offline_policy import OfflinePolicy

__all__ = ["BehaviorCloning"]


class BehaviorCloning(OfflinePolicy):
    """Behaviour cloning of demonstrations (see the module docstring).

    Args:
        hidden: hidden widths of the MLP; activation: its nonlinearity.
        head: ``"deterministic"``, ``"gaussian"`` or ``"mixture"``; mixtures: components of
            the mixture head.
        **kwargs: the arguments of :class:`~diffto.learning.offline_policy.OfflinePolicy`
            (env_id, tasks, windows, optimizer, evaluation, expert, report).
    """

    def __init__(
        self,
        env_id: str,
        tasks: list[str] | None = None,
        hidden: list[int] | None = None,
        activation: Literal["relu", "tanh", "elu"] = "relu",
        head: Head = "deterministic",
        mixtures: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(env_id, tasks, **kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        T = self.action_horizon
        self.policy = GoalPolicy(self.input_dim, 0, self.action_low.repeat(T),
                                 self.action_high.repeat(T),
                                 hidden=tuple(hidden or (256, 256, 256)), activation=activation,
                                 head=head, squash="tanh", mixtures=mixtures)

    def fit_inputs(self, inputs: Tensor) -> None:
        self.policy.fit_normalization(inputs)

    def inputs_fitted(self) -> bool:
        return self.policy.normalization_fitted

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = self.inputs(batch["observation"], batch["task"])
        terms = self.policy.loss(x, None, batch["action"].flatten(1))
        return {"loss": terms["loss_bc"], "action_mse": terms["action_mse"]}

    def predict_chunk(self, history: Tensor, task: Tensor) -> Tensor:
        history = history.to(self.action_low.device)
        out = self.policy(self.inputs(history, task.to(history.device)), None)
        return out.reshape(len(history), self.action_horizon, self.act_dim)

    def forward(self, history: Tensor, task: Tensor) -> Tensor:
        """The action chunk ``(B, T_a, a)`` of raw histories ``(B, T_o, o)`` and tasks."""
        return self.predict_chunk(history, task)
