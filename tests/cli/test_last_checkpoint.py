"""Shipped configs write last.ckpt with the final weights, so `--ckpt_path last` resumes them.

Lightning (2.6) refreshes a monitored ModelCheckpoint's last.ckpt only when the monitored
metric improves: once it plateaus, last.ckpt holds stale weights. The configs therefore save
last.ckpt from a monitor-less callback beside the monitored `best` one.
"""

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from diffto import cli

_MODEL_CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


def _checkpoint_args(path) -> list[dict]:
    """init_args of each ModelCheckpoint among a config's trainer callbacks."""
    config = yaml.safe_load(path.read_text()) or {}
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return [dict(cb.get("init_args") or {}) for cb in callbacks
            if isinstance(cb, dict) and cb.get("class_path") in (_MODEL_CHECKPOINT,
                                                                 "ModelCheckpoint")]


_WITH_CHECKPOINTS = {name: args for name, path in sorted(cli.shipped_configs().items())
                     if (args := _checkpoint_args(path))}


def test_last_ckpt_comes_from_a_monitor_less_callback():
    assert _WITH_CHECKPOINTS, "no shipped config saves checkpoints"
    for name, args in _WITH_CHECKPOINTS.items():
        last = [a for a in args if a.get("save_last")]
        assert len(last) == 1, f"{name}: {len(last)} callbacks write last.ckpt, want 1"
        assert last[0].get("monitor") is None, (
            f"{name}: last.ckpt is written by the callback monitoring {last[0]['monitor']!r}, "
            "which Lightning refreshes only when that metric improves")


class _Plateau(L.LightningModule):
    """Trains a linear layer; every monitored metric it logs stays constant."""

    def __init__(self, monitors: list[str]):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.monitors = monitors

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        for key in self.monitors:
            self.log(key, 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def _loader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)),
                                           batch_size=2)

    train_dataloader = val_dataloader = _loader


@pytest.mark.parametrize("name", sorted(_WITH_CHECKPOINTS))
def test_last_ckpt_holds_the_final_step_when_the_monitor_plateaus(name, tmp_path):
    """The config's checkpoint callbacks, with a constant monitored metric: last.ckpt is
    still the final step's (a monitored save_last would stop at the first validation)."""
    args = _WITH_CHECKPOINTS[name]
    callbacks = [ModelCheckpoint(**{**a, "dirpath": tmp_path}) for a in args]
    monitors = [a["monitor"] for a in args if a.get("monitor")]
    trainer = L.Trainer(max_epochs=4, check_val_every_n_epoch=2, callbacks=callbacks,
                        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(_Plateau(monitors))
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == trainer.global_step == 8, (
        f"{name}: last.ckpt at step {state['global_step']}, training ended at "
        f"{trainer.global_step}")
