"""PPO under DDP through the command: two CPU processes, one update, equal weights everywhere.

Lightning's ``ddp`` strategy re-executes the command line once per extra rank, so the run is
launched as ``python -m diffto fit`` in a subprocess (under pytest the command line would be
pytest's). A probe callback, written next to the config and imported through ``PYTHONPATH``,
saves each rank's state after training; the test compares the ranks with each other and with
the one checkpoint that rank 0 wrote.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with the gloo backend is unavailable",
    ),
]

PROBE = '''
import torch
from lightning.pytorch.callbacks import Callback


class RankProbe(Callback):
    """Saves this rank's parameters, buffers and current env observations after training."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"state_dict": {k: v.detach().cpu().clone()
                                   for k, v in pl_module.state_dict().items()},
                    "obs": torch.as_tensor(pl_module._obs),
                    "val_return": trainer.callback_metrics["val/ep_return"].item(),
                    "world_size": trainer.world_size, "global_step": trainer.global_step},
                   f"{self.out_dir}/rank{trainer.global_rank}.pt")
'''

CONFIG = """
seed_everything: 7
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_steps: 2
  max_epochs: -1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  val_check_interval: 2          # validate (and checkpoint) after the last iteration
  check_val_every_n_epoch: null
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {root}/checkpoints
        save_last: true
    - class_path: ddp_probe.RankProbe
      init_args:
        out_dir: {root}/ranks
model:
  class_path: diffto.learning.ppo.PPO
  init_args:
    env_id: Pendulum-v1
    num_envs: 2
    vector_mode: sync
    samples_per_iteration: 64
    minibatch_size: 32
    # the actor stops early (target_kl) and before the critic: backward passes where one
    # network is inactive, the case DDP's reducer does not forgive
    actor_steps: 3
    critic_steps: 4
    target_kl: 1.0e-12
    actor_hidden: [16, 16]
    critic_hidden: [16, 16]
    learn_std: true
    lr_schedule: linear
    eval_episodes: 3             # not a multiple of 2: Lightning's sampler pads one rank
    eval_max_steps: 10
"""


def test_two_ranks_train_the_same_weights_from_different_envs(tmp_path):
    (tmp_path / "ranks").mkdir()
    (tmp_path / "ddp_probe.py").write_text(textwrap.dedent(PROBE))
    config = tmp_path / "ppo_ddp.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path),
                                                       os.environ.get("PYTHONPATH")]))}
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "diffto", "fit", "--config", str(config)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-4000:]

    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [2, 2]
    # the ranks' environments were seeded apart ...
    assert not torch.equal(ranks[0]["obs"], ranks[1]["obs"])
    # ... yet every parameter and buffer is the same on both after the updates
    sd0, sd1 = ranks[0]["state_dict"], ranks[1]["state_dict"]
    assert sd0.keys() == sd1.keys()
    differ = [k for k in sd0 if not torch.equal(sd0[k], sd1[k])]
    assert not differ, f"ranks diverged in {differ}"
    # the normalizer merged both ranks' samples: 2 ranks x 64 samples x 2 iterations
    assert sd0["normalizer.count"].item() == 2 * 64 * 2
    # the learned std moved from its start: the actor was updated (identically on both)
    assert not torch.allclose(sd0["log_std"], torch.full_like(sd0["log_std"], math.log(0.08)))

    # validation ran on both ranks (3 episodes split 2 + 1, padded) and was averaged
    assert ranks[0]["val_return"] == ranks[1]["val_return"]

    # one checkpoint of the final step, with the ranks' weights
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts, ckpts
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2
    for k, v in state["state_dict"].items():
        assert torch.equal(v, sd0[k]), k
    print(f"2-rank DDP fit: {elapsed:.1f} s")


def test_go2_tracking_config_runs_over_two_ranks(tmp_path):
    """The shipped Go2 job under ``--trainer.strategy=ddp --trainer.devices=2``: it ends, with
    one checkpoint folder and rank 0's report and table. (The report asks for the log folder,
    a broadcast under DDP; asked on rank 0 alone it used to hang the run.)"""
    import yaml

    from diffto import cli

    config = yaml.safe_load(cli.shipped_configs()["go2_tracking.yaml"].read_text())
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("Go2TrackingReport"):
            cb["init_args"].update(video=False, every_n_validations=1, table_seeds=1)
    (tmp_path / "go2_ddp.yaml").write_text(yaml.safe_dump(config))
    tiny = {"num_envs": 2, "vector_mode": "sync", "samples_per_iteration": 64,
            "minibatch_size": 32, "actor_steps": 2, "critic_steps": 2,
            "critic_hidden": "[32, 32]"}
    args = [sys.executable, "-m", "diffto", "fit", "--config", "go2_ddp.yaml",
            "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=2",
            "--trainer.val_check_interval=1",
            *(f"--model.init_args.{k}={v}" for k, v in tiny.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    runs = tmp_path / "runs" / "go2_tracking"
    assert sorted(p.name for p in (runs / "checkpoints").iterdir()) == [
        "best.ckpt", "iter_step=2.ckpt", "last.ckpt"]
    assert len(list(runs.glob("logs/version_*"))) == 1
    table = next(runs.glob("logs/version_0/tracking/table.md")).read_text()
    assert "| final (iteration 2) |" in table
    assert out.stdout.count("Go2 tracking table") == 1  # rank 0 alone wrote it
