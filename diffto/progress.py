"""A TQDM progress bar that keeps its total when a fit resumes mid-epoch.

Lightning (2.5 to at least 2.6.6) sets the training bar's total and its ``Epoch k`` title in
``on_train_epoch_start``, and a fit resumed from a checkpoint saved mid-epoch skips that hook
(by design: the epoch has started already). The resumed bar then shows ``Training: n/?``
until the epoch ends (Lightning-AI/pytorch-lightning#20603; a fix, #21806, is open). A
learner that streams endless iterations (``max_epochs: -1``, ``max_steps`` as the budget, as
``go2_tracking.yaml``'s PPO) lives in one epoch, so every ``--ckpt_path last`` resume is
mid-epoch and the whole resumed run has no total, no percentage and no ETA.

Use it in a config in place of Lightning's bar (same arguments)::

    trainer:
      callbacks:
        - class_path: diffto.progress.ResumableProgressBar
          init_args:
            refresh_rate: 1
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

__all__ = ["ResumableProgressBar"]


class ResumableProgressBar(TQDMProgressBar):
    """:class:`~lightning.pytorch.callbacks.TQDMProgressBar` that sets the training bar's
    total on the first batch of a resumed epoch when the epoch-start hook did not.

    The bar counts batches of the epoch (``n = batch_idx + 1``), and a resumed epoch goes on
    counting from the restored batch index ``i0``. Under ``max_steps`` with an endless epoch
    (``max_epochs = -1``, one optimizer step per batch) the epoch therefore ends at batch
    ``i0 + (max_steps - global_step)``; Lightning's own :attr:`total_train_batches` is only
    the remaining ``max_steps - global_step``, which would leave ``n`` past the total (tqdm
    then drops the total as well). Elsewhere the total is Lightning's. The resumed bar starts
    at ``i0`` (``initial``), so its rate and ETA count only this run's batches.
    """

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        if bar.disable or bar.total is not None:  # on_train_epoch_start has set it
            return
        total = self.total_train_batches
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            remaining = trainer.max_steps - trainer.global_step
            total = min(trainer.num_training_batches, batch_idx + remaining)
        total = convert_inf(total)
        if total is None:  # an endless epoch without max_steps: no total to show
            return
        bar.reset()
        bar.total = total
        bar.initial = bar.n = batch_idx
        bar.set_description(f"Epoch {trainer.current_epoch}")
