"""A diffusion policy from demonstrations: action chunks denoised from noise, given the recent
observations and the task.

The policy is a conditional diffusion model of the action chunk ``A_t = (a_t .. a_{t+T_a-1})``
given the condition ``c = [o_{t-T_o+1} .. o_t, onehot(task)]`` (normalized with statistics
fitted on the training windows and saved in checkpoints): training minimizes the DDPM loss of
:class:`~diffto.learning.diffusion.DiffusionActionHead` on the demonstrations' windows
(actions scaled to ``[-1, 1]`` by the action box); acting draws a chunk by DDIM from the
exponential moving average of the denoiser's weights and executes its first ``action_steps``
actions before drawing the next (receding horizon, :class:`~diffto.learning.offline_policy.
ChunkController`). Where demonstrations reach one state and continue two ways, regression
averages the ways; the diffusion model samples one of them, and a chunk keeps the choice for
several steps instead of switching between modes at every step.

Sampling in evaluation is reproducible: the noise comes from a generator reseeded at every
evaluation. Everything else (evaluation in the environment, checkpoints, the report with the
expert, the best and the last checkpoint) is the shared module's. Run with ``lightning fit
--config metaworld_diffusion.yaml``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from diffto.learning.diffusion import DiffusionActionHead
from diffto.learning.normalizer import RunningNormalizer
from diffto.learning.offline_policy import OfflinePolicy

__all__ = ["DiffusionPolicy"]


class DiffusionPolicy(OfflinePolicy):
    """Diffusion policy over action chunks (see the module docstring).

    Args:
        denoiser: ``"mlp"`` or ``"unet1d"`` (a 1-D temporal U-Net over the chunk).
        hidden, depth: width and residual blocks of the MLP denoiser; unet_channels: the
            U-Net's channels per level.
        train_steps: diffusion steps of the DDPM training schedule; inference_steps: DDIM
            steps per sampled chunk.
        beta_schedule, prediction_type, ema_decay, clip_sample: see
            :class:`~diffto.learning.diffusion.DiffusionActionHead`.
        sample_seed: seed of the sampling noise, reset at every evaluation.
        **kwargs: the arguments of :class:`~diffto.learning.offline_policy.OfflinePolicy`;
            typical windows: ``obs_horizon=2``, ``action_horizon=8``, ``action_steps=4``.
    """

    def __init__(
        self,
        env_id: str,
        tasks: list[str] | None = None,
        denoiser: Literal["mlp", "unet1d"] = "mlp",
        hidden: int = 256,
        depth: int = 3,
        unet_channels: list[int] | None = None,
        train_steps: int = 100,
        inference_steps: int = 10,
        beta_schedule: str = "squaredcos_cap_v2",
        prediction_type: Literal["epsilon", "sample"] = "epsilon",
        ema_decay: float = 0.999,
        clip_sample: bool = True,
        sample_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(env_id, tasks, **kwargs)
        self.head = DiffusionActionHead(
            self.input_dim, self.act_dim, self.action_horizon, denoiser=denoiser, hidden=hidden,
            depth=depth, unet_channels=tuple(unet_channels or (64, 128)),
            train_steps=train_steps, inference_steps=inference_steps,
            beta_schedule=beta_schedule, prediction_type=prediction_type, ema_decay=ema_decay,
            clip_sample=clip_sample)
        # The EMA copy is never trained; its layers (Linear, LayerNorm, GroupNorm, Conv1d) act
        # the same in either mode, so it follows the module's mode like every other submodule
        # (Lightning warns about submodules left in eval mode at the start of training).
        self.head.ema_denoiser.train()
        self.input_normalizer = RunningNormalizer(self.input_dim)
        self.sample_seed = sample_seed
        self._generator = torch.Generator().manual_seed(sample_seed)

    def fit_inputs(self, inputs: Tensor) -> None:
        self.input_normalizer.update(inputs)

    def inputs_fitted(self) -> bool:
        return bool(self.input_normalizer.count > 0)

    def condition(self, history: Tensor, task: Tensor) -> Tensor:
        """The normalized condition ``(B, d)`` of raw histories ``(B, T_o, o)`` and tasks."""
        return self.input_normalizer(self.inputs(history, task)).to(self.action_low)

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cond = self.condition(batch["observation"], batch["task"])
        return {"loss": self.head.loss(cond, self.to_unit(batch["action"]))}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.head.update_ema()  # one optimizer step per batch

    def predict_chunk(self, history: Tensor, task: Tensor) -> Tensor:
        history = history.to(self.action_low.device)
        cond = self.condition(history, task.to(history.device))
        return self.from_unit(self.head.sample(cond, generator=self._generator))

    def evaluate(self, policy: OfflinePolicy | None = None, *args: Any, **kwargs: Any):
        pol = self if policy is None else policy
        pol._generator.manual_seed(pol.sample_seed)  # the same noise at every evaluation
        return super().evaluate(policy, *args, **kwargs)

    def forward(self, history: Tensor, task: Tensor) -> Tensor:
        """A sampled action chunk ``(B, T_a, a)`` of raw histories ``(B, T_o, o)``."""
        return self.predict_chunk(history, task)
