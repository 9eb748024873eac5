"""Shipped configs write last.ckpt with the final weights, so `--ckpt_path last` resumes them.

Lightning (2.6) refreshes a monitored ModelCheckpoint's last.ckpt only when the monitored
metric improves: once it plateaus, last.ckpt holds stale weights. The configs therefore save
last.ckpt from a monitor-less callback beside the monitored `best` one, after it. That callback
keeps one checkpoint of its own (save_top_k 1): Lightning writes last.ckpt only beside a
checkpoint it saves, so with save_top_k 0 it appears at the end of training alone and a killed
run has nothing to resume.
"""

import re
import warnings
from pathlib import Path

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


def test_last_ckpt_is_written_at_every_save_after_best():
    for name, args in _WITH_CHECKPOINTS.items():
        i = next(i for i, a in enumerate(args) if a.get("save_last"))
        assert args[i].get("save_top_k", 1) != 0, (
            f"{name}: the callback writing last.ckpt has save_top_k 0, so Lightning writes "
            "last.ckpt only when training ends")
        late = [a["monitor"] for a in args[i + 1:] if a.get("monitor")]
        assert not late, (f"{name}: {late} listed after the callback writing last.ckpt, "
                          "which then records them one save late")


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


class _Improving(_Plateau):
    """Every validation logs a better value of each monitored metric than the one before."""

    def __init__(self, modes: dict[str, str]):
        super().__init__(list(modes))
        self.modes = modes

    def validation_step(self, batch, batch_idx):
        for key, mode in self.modes.items():
            self.log(key, float(self.global_step if mode == "max" else -self.global_step))


@pytest.mark.parametrize("name", [name for name in sorted(_WITH_CHECKPOINTS)
                                  if any(a.get("monitor") for a in _WITH_CHECKPOINTS[name])])
def test_resume_from_last_keeps_one_best_checkpoint(name, tmp_path):
    """A fit with one validation, then `ckpt_path="last"` and an improved metric: the monitored
    callback replaces its own file (best.ckpt) instead of writing best-v1.ckpt beside it.

    A checkpoint holds each callback's state as it is when written. When a callback writes
    last.ckpt at a validation before the monitored one has updated (it comes first in the
    list), last.ckpt records the monitored callback one validation late (after the first: no
    best at all) and the resumed run versions a new best.ckpt as best-v1.ckpt."""
    args = _WITH_CHECKPOINTS[name]
    modes = {a["monitor"]: a.get("mode", "min") for a in args if a.get("monitor")}

    def fit(max_epochs, ckpt_path=None):
        callbacks = [ModelCheckpoint(**{**a, "dirpath": tmp_path}) for a in args]
        trainer = L.Trainer(max_epochs=max_epochs, check_val_every_n_epoch=2,
                            callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, default_root_dir=tmp_path)
        with warnings.catch_warnings():  # resuming writes into the same checkpoint folder
            warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
            trainer.fit(_Improving(modes), ckpt_path=ckpt_path)
        return callbacks

    fit(2)  # one validation, at step 4
    callbacks = fit(4, ckpt_path="last")  # a better metric at step 8
    files = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert not [f for f in files if re.search(r"-v\d+\.ckpt$", f)], f"{name}: {files}"
    for cb in callbacks:
        if cb.monitor:
            assert Path(cb.best_model_path).name == f"{cb.filename}.ckpt", f"{name}: {files}"
            assert abs(cb.best_model_score.item()) == 8, f"{name}: best {cb.best_model_score}"


class _Killed(Exception):
    """Stands for a run killed mid-training: Lightning's on_train_end never runs."""


class _KilledAfterValidation(_Improving):
    """_Improving, killed at the first training step after the first validation (step 4)."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 4:
            raise _Killed
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("name", sorted(_WITH_CHECKPOINTS))
def test_killed_run_resumes_from_the_last_validation(name, tmp_path):
    """A run killed after one validation (step 4) leaves last.ckpt of step 4, and in it each
    monitored callback knows the best.ckpt it wrote at that validation."""
    args = _WITH_CHECKPOINTS[name]
    modes = {a["monitor"]: a.get("mode", "min") for a in args if a.get("monitor")}
    callbacks = [ModelCheckpoint(**{**a, "dirpath": tmp_path}) for a in args]
    trainer = L.Trainer(max_epochs=4, check_val_every_n_epoch=2, callbacks=callbacks,
                        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    with pytest.raises(_Killed):
        trainer.fit(_KilledAfterValidation(modes))
    files = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert "last.ckpt" in files, f"{name}: a killed run left {files}, no last.ckpt"
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 4, f"{name}: last.ckpt at step {state['global_step']}"
    for cb in callbacks:
        if cb.monitor:
            saved = state["callbacks"][cb.state_key]["best_model_path"]
            assert Path(saved).name == f"{cb.filename}.ckpt", (
                f"{name}: last.ckpt records {cb.monitor!r}'s best as {saved!r}")
