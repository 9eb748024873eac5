"""Offline policies on Metaworld demonstrations: BC and the diffusion policy in Lightning,
their chunked acting, evaluation, report and checkpoints (diffto.learning.offline_policy)."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from diffto.data.metaworld_demos import collect_demos
from diffto.data.trajectories import merge_trajectories, save_trajectories
from diffto.learning.bc import BehaviorCloning
from diffto.learning.demonstrations import DemonstrationsDataModule
from diffto.learning.diffusion_policy import DiffusionPolicy
from diffto.learning.offline_policy import ChunkController

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")

ENV = "diffto/Metaworld-v0"
EXPERT = {"class_path": "diffto.tasks.metaworld.expert.ScriptedExpert"}


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """8 drawer-close and 3 button-press-topdown demonstrations (seeds 0..), one file."""
    sets = []
    for task, n in (("drawer-close-v3", 8), ("button-press-topdown-v3", 3)):
        data, counts = collect_demos(task, range(n), range(n))
        assert counts["episodes_failed"] == 0
        sets.append(data)
    path = tmp_path_factory.mktemp("demos") / "demos.npz"
    save_trajectories(path, merge_trajectories(sets))
    return path


def _trainer(tmp_path, **kw):
    from lightning.pytorch.callbacks import ModelCheckpoint

    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="best", monitor="val/success",
                           mode="max")
    # Lightning 2.6 refreshes a monitored callback's last.ckpt only when the monitor improves:
    # the final weights come from a callback without a monitor (the latest, every epoch).
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last",
                           enable_version_counter=False)
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, callbacks=[best, last],
                    default_root_dir=tmp_path)
    return L.Trainer(**{**defaults, **kw})


def test_chunk_controller_replans_every_action_steps_and_keeps_a_history():
    calls = []

    def predict(history, task):
        calls.append(history.clone())
        B = history.shape[0]
        return torch.arange(3, dtype=torch.float32)[None, :, None].expand(B, 3, 1) + len(calls)

    ctrl = ChunkController(predict, obs_horizon=2, action_steps=2, task=1)
    acts = [ctrl(np.full((2, 1), t, np.float32))[:, 0].tolist() for t in range(5)]
    assert acts == [[1, 1], [2, 2], [2, 2], [3, 3], [3, 3]]  # chunk k+1 starts at k+1
    assert len(calls) == 3
    assert calls[0][0, :, 0].tolist() == [0, 0]  # the first observation repeated
    assert calls[1][0, :, 0].tolist() == [1, 2]
    ctrl.reset()
    ctrl(np.full((2, 1), 9, np.float32))
    assert calls[-1][0, :, 0].tolist() == [9, 9]


def test_bc_learns_held_out_drawer_close_and_reports_next_to_the_expert(demos, tmp_path):
    L.seed_everything(0)
    model = BehaviorCloning(ENV, tasks=["drawer-close-v3"],
                            env_kwargs={"terminate_on_success": True}, hidden=[128, 128],
                            lr=3e-3, eval_episodes=2, report_episodes=6, expert=EXPERT,
                            expert_cache_dir=str(tmp_path / "cache"))
    dm = DemonstrationsDataModule(str(demos), batch_size=128)
    trainer = _trainer(tmp_path, max_epochs=60, check_val_every_n_epoch=30)
    trainer.fit(model, dm)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["demonstrations"] == 8  # drawer-close only: the other task is left out
    rows = report["results"]
    assert set(rows) == {"expert", "best checkpoint", "last checkpoint"}
    assert rows["expert"]["drawer-close-v3"]["success"] == 1.0
    # held-out variants; a policy that ignores the observation or an untrained one gets 0
    assert rows["last checkpoint"]["drawer-close-v3"]["success"] >= 0.8
    assert (tmp_path / "report.md").read_text().count("|") > 10
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644  # readable by all
    # the checkpoint carries the normalization: a restored policy acts identically
    restored = BehaviorCloning.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    hist, task = torch.randn(4, 1, 39), torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(restored.predict_chunk(hist, task), model.predict_chunk(hist,
                                                                                        task))
    # the evaluate entry point reads the checkpoint, prints the table, writes the figures
    from diffto.learning.evaluate_offline import main

    main([str(tmp_path / "ckpt" / "last.ckpt"), "--episodes", "2", "--json",
          str(tmp_path / "eval.json"), "--expert-cache-dir", str(tmp_path / "cache")])
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert set(figures["results"]) == {"expert", "policy (last.ckpt)"}
    assert figures["results"]["policy (last.ckpt)"]["drawer-close-v3"]["episodes"] == 2
    with pytest.raises(ValueError, match="not learned"):
        from diffto.learning.evaluate_offline import evaluate_checkpoint

        evaluate_checkpoint(tmp_path / "ckpt" / "last.ckpt", 1, tasks=["push-v3"])


def test_multi_task_inputs_carry_the_task_one_hot(demos, tmp_path):
    model = BehaviorCloning(ENV, tasks=["button-press-topdown-v3", "drawer-close-v3"],
                            head="mixture", mixtures=3, obs_horizon=2, action_horizon=4,
                            action_steps=2, hidden=[32], report=False)
    assert model.input_dim == 2 * 39 + 2
    x = model.inputs(torch.zeros(3, 2, 39), torch.tensor([0, 1, 1]))
    assert x[:, -2:].tolist() == [[1, 0], [0, 1], [0, 1]]
    rel = BehaviorCloning(ENV, tasks=["reach-v3"], obs_horizon=2, hidden=[8], report=False,
                          input_differences=[[0, 36, 3]])
    assert rel.input_dim == 2 * 42
    obs = torch.randn(3, 2, 39)
    x = rel.inputs(obs, torch.zeros(3, dtype=torch.long)).reshape(3, 2, 42)
    torch.testing.assert_close(x[..., 39:], obs[..., 36:39] - obs[..., 0:3])
    with pytest.raises(ValueError, match="input_differences"):
        BehaviorCloning(ENV, tasks=["reach-v3"], input_differences=[[0, 38, 3]])
    # input_indices: only the chosen entries of each frame (here a height and the difference)
    picked = BehaviorCloning(ENV, tasks=["reach-v3"], obs_horizon=2, hidden=[8], report=False,
                             input_differences=[[0, 36, 3]], input_indices=[2, 39, 40, 41])
    assert picked.input_dim == 2 * 4 and picked.policy.obs_dim == 8
    x = picked.inputs(obs, torch.zeros(3, dtype=torch.long)).reshape(3, 2, 4)
    torch.testing.assert_close(x[..., 0], obs[..., 2])
    torch.testing.assert_close(x[..., 1:], obs[..., 36:39] - obs[..., 0:3])
    for bad in ([], [2, 2], [42], [-1], [True]):
        with pytest.raises(ValueError, match="input_indices"):
            BehaviorCloning(ENV, tasks=["reach-v3"], input_differences=[[0, 36, 3]],
                            input_indices=bad)
    dm = DemonstrationsDataModule(str(demos), batch_size=64)
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[],
                       enable_checkpointing=False)
    trainer.fit(model, dm)
    assert model.predict_chunk(torch.zeros(2, 2, 39), torch.tensor([0, 1])).shape == (2, 4, 4)
    with pytest.raises(ValueError, match="action_steps"):
        BehaviorCloning(ENV, tasks=["reach-v3"], action_horizon=2, action_steps=3)
    with pytest.raises(ValueError, match="tasks"):
        BehaviorCloning(ENV, tasks=["reach-v3", "reach-v3"])


def test_dataset_of_another_environment_is_refused(demos, tmp_path):
    model = BehaviorCloning("diffto/PendulumSwingUp-v0", hidden=[8], report=False)
    with pytest.raises(ValueError, match="not in tasks|made on"):
        _trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[],
                 enable_checkpointing=False).fit(
            model, DemonstrationsDataModule(str(demos)))


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_diffusion_policy_trains_acts_in_its_box_and_resumes(demos, tmp_path):
    L.seed_everything(0)
    model = DiffusionPolicy(ENV, tasks=["drawer-close-v3"], hidden=64, depth=2,
                            obs_horizon=2, action_horizon=4, action_steps=2, lr=1e-3,
                            eval_episodes=1, report_episodes=1, expert=None, report=True)
    dm = DemonstrationsDataModule(str(demos), batch_size=64)
    trainer = _trainer(tmp_path, max_epochs=2, check_val_every_n_epoch=2)
    trainer.fit(model, dm)
    assert model.head.ema_updates.item() == trainer.global_step > 0
    chunk = model.predict_chunk(torch.randn(5, 2, 39), torch.zeros(5, dtype=torch.long))
    assert chunk.shape == (5, 4, 4) and chunk.abs().max() <= 1.0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["results"]) == {"best checkpoint", "last checkpoint"}
    # resume: one more epoch from last.ckpt continues the EMA count and the step
    model2 = DiffusionPolicy(ENV, tasks=["drawer-close-v3"], hidden=64, depth=2,
                             obs_horizon=2, action_horizon=4, action_steps=2, report=False,
                             eval_episodes=1)
    steps = trainer.global_step
    t2 = _trainer(tmp_path, max_epochs=3, check_val_every_n_epoch=3)
    t2.fit(model2, DemonstrationsDataModule(str(demos), batch_size=64),
           ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert t2.global_step > steps and model2.head.ema_updates.item() == t2.global_step
    # the same noise at every evaluation: two evaluations of one policy agree
    a = model2.evaluate(episodes=1)[0]["drawer-close-v3"]
    b = model2.evaluate(episodes=1)[0]["drawer-close-v3"]
    assert a.length.tolist() == b.length.tolist()
    # the evaluate entry point can replan at every step instead of every action_steps
    import diffto.learning.evaluate_offline as evaluate_offline

    loaded, original = [], evaluate_offline.load_offline_policy

    def load(path):
        loaded.append(original(path))
        return loaded[-1]

    evaluate_checkpoint = evaluate_offline.evaluate_checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate_offline, "load_offline_policy", load)
        for steps in (1, 4):
            out = evaluate_checkpoint(tmp_path / "ckpt" / "last.ckpt", 1, expert=False,
                                      progress=False, action_steps=steps)
            assert out["action_steps"] == loaded[-1].action_steps == steps
            assert loaded[-1].action_horizon == 4  # the chunk is unchanged
        assert out["results"]["policy (last.ckpt)"]["drawer-close-v3"]["episodes"] == 1
    for bad in (0, 5, True):
        with pytest.raises(ValueError, match="action_steps"):
            evaluate_checkpoint(tmp_path / "ckpt" / "last.ckpt", 1, expert=False,
                                progress=False, action_steps=bad)


@pytest.mark.parametrize("config", ["metaworld_bc.yaml", "metaworld_diffusion.yaml"])
def test_metaworld_configs_fast_dev_run(config, demos, tmp_path, monkeypatch):
    """The shipped configs on two tasks of the test demonstrations: train, evaluate next to
    the expert, report and film (one episode per task, where rendering works)."""
    from diffto import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    cli.main(["fit", "--config", config, "--trainer.fast_dev_run=true",
              f"--data.init_args.path={demos}", "--data.init_args.demos_per_task=3",
              "--data.init_args.batch_size=32",
              "--model.init_args.tasks=[drawer-close-v3, button-press-topdown-v3]",
              "--model.init_args.eval_episodes=1", "--model.init_args.report_episodes=1",
              "--model.init_args.eval_max_steps=5"])
    report = json.loads(next(tmp_path.glob("**/report.json")).read_text())
    assert report["demonstrations"] == 6
    assert {"expert", "last checkpoint"} <= set(report["results"])
    assert set(report["results"]["expert"]) == {"drawer-close-v3", "button-press-topdown-v3"}
    assert list(tmp_path.glob("runs/expert_cache/task_expert_*.json"))
    assert list(tmp_path.glob("**/last.mp4"))
