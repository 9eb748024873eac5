"""ResumableProgressBar: a fit resumed inside an endless epoch keeps the bar's total."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffto.progress import ResumableProgressBar


class _Stream(torch.utils.data.IterableDataset):
    """Endless batches, as a learner that collects its own data yields them."""

    def __iter__(self):
        while True:
            yield torch.ones(2)


class _Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Stream(), batch_size=None)


def _fit(tmp_path, max_steps, ckpt_path=None):
    bar = ResumableProgressBar()
    trainer = L.Trainer(
        max_steps=max_steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[bar, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_last=True)],
    )
    with warnings.catch_warnings():  # the resumed run writes into the same checkpoint folder
        warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
        trainer.fit(_Linear(), ckpt_path=ckpt_path)
    return bar.train_progress_bar


@pytest.mark.parametrize("first, total", [(3, 7), (6, 9)])
def test_resumed_bar_counts_to_max_steps(tmp_path, first, total):
    bar = _fit(tmp_path, first)
    assert (bar.n, bar.total) == (first, first)  # a fresh fit: Lightning's own total
    bar = _fit(tmp_path, total, ckpt_path="last")
    # The resumed epoch counts on from batch `first`; without the fix the total stays None
    # ("Training: 7/?"), and Lightning's remaining-steps total would be `total - first`.
    assert (bar.initial, bar.n, bar.total) == (first, total, total)
    assert bar.desc.startswith("Epoch 0")
