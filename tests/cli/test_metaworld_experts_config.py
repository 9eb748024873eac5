"""The shipped ``metaworld_experts.yaml`` runs end to end (``fast_dev_run``: one shard)."""

from pathlib import Path

import pytest

from diffto.data.metaworld_demos import TASK_EPISODE_STRIDE, task_id
from diffto.data.trajectories import load_trajectories


@pytest.mark.filterwarnings("ignore:Constant.*may be too high:UserWarning")
def test_metaworld_experts_config_fast_dev_run(tmp_path, monkeypatch):
    from diffto.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    main(["predict", "--config", "metaworld_experts.yaml", "--trainer.fast_dev_run=true",
          "--data.episodes_per_shard=2", "--model.steps_after_success=1"])
    folder = Path(tmp_path, "runs", "datasets", "metaworld_mt10")
    written = sorted(p.name for p in folder.glob("*.npz"))
    assert written == ["reach-v3_episodes_000000-000001.npz"]  # the first task's first shard
    data = load_trajectories(folder)
    reach = task_id("reach-v3")
    assert data.meta["episodes_requested"] == 2 and data.meta["task_names"] == {
        str(reach): "reach-v3"}
    assert data.episode_ids().tolist() == [reach * TASK_EPISODE_STRIDE,
                                           reach * TASK_EPISODE_STRIDE + 1]
    assert data.meta["generator"] == {"camera": None, "image_size": 84, "images": False,
                                      "max_steps": 500, "steps_after_success": 1}
