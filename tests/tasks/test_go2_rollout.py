"""Go2 rollouts, the open-loop baseline, the tracking report, and go2_tracking.yaml end to end."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import mujoco
import numpy as np
import pytest
import torch
import yaml

from diffto import cli
from diffto.tasks.go2.evaluate import evaluate_tracking, tracking_errors
from diffto.tasks.go2.evaluate import main as evaluate_main
from diffto.tasks.go2.model import HOME_QPOS, TOTAL_MASS, load_model
from diffto.tasks.go2.reference import ReferenceTrajectory
from diffto.tasks.go2.rollout import (
    execute_open_loop_rollout,
    execute_policy_rollout,
    inverse_dynamics_forces,
    resolve_reference,
)

G = 9.81
# A tiny PPO for end-to-end runs: 2 envs x 32 steps per iteration, 2 updates per network.
TINY = {
    "num_envs": 2, "samples_per_iteration": 64, "minibatch_size": 32, "actor_steps": 2,
    "critic_steps": 2, "critic_hidden": [32, 32],
}


def rendering_works() -> bool:
    try:
        renderer = mujoco.Renderer(load_model(), 32, 32)
    except Exception:
        return False
    renderer.close()
    return True


def standing_reference(num_phases: int = 50) -> ReferenceTrajectory:
    """Hold the ``home`` pose for ``num_phases`` knots, each foot carrying a quarter of m·g."""
    n = num_phases
    body_pos = np.tile(HOME_QPOS[:3], (n + 1, 1))
    zeros3 = np.zeros((n + 1, 3))
    grf = np.tile(np.array([0.0, 0.0, TOTAL_MASS * G / 4] * 4), (n, 1))
    return ReferenceTrajectory(
        body_pos=body_pos, body_vel=zeros3, body_euler=zeros3, body_ang_vel=zeros3,
        joint_pos=np.tile(HOME_QPOS[7:], (n + 1, 1)), joint_vel=np.zeros((n, 12)),
        grf=grf, contact=np.ones((n, 4), dtype=bool), dt=0.02, meta={"motion": "stand"},
    )


def zero_policy(obs: np.ndarray) -> np.ndarray:
    assert obs.shape == (39,)
    return np.zeros(12, dtype=np.float32)


# ------------------------------------------------------------------------------ rollouts
def test_policy_rollout_shapes_and_standing_grf_carry_the_weight():
    ref = standing_reference(50)
    qpos, qvel, grf, images = execute_policy_rollout(zero_policy, ref)
    assert qpos.shape == (51, 19) and qvel.shape == (51, 18) and grf.shape == (51, 12)
    assert images == []
    np.testing.assert_allclose(qpos[0], ref.qpos(0))
    # settled (last half second): the feet carry the robot's weight, no net horizontal force
    total = grf[25:].reshape(-1, 4, 3).sum(axis=1).mean(axis=0)
    assert abs(total[2] - TOTAL_MASS * G) < 0.03 * TOTAL_MASS * G, total
    assert np.abs(total[:2]).max() < 0.03 * TOTAL_MASS * G, total
    # each foot pushes up, none pulls
    assert (grf[25:, 2::3] > 0).all()
    # standing under PD + feedforward stays near the reference
    assert tracking_errors(qpos, ref).rms()["pos_rmse"] < 0.03


def test_policy_rollout_steps_and_argument_errors():
    ref = standing_reference(20)
    qpos, qvel, grf, _ = execute_policy_rollout(zero_policy, ref, steps=5, start_phase=3)
    assert qpos.shape == (6, 19) and qvel.shape == (6, 18) and grf.shape == (6, 12)
    np.testing.assert_allclose(qpos[0], ref.qpos(3))
    with pytest.raises(ValueError, match=r"steps must lie in \[1, 17\]"):
        execute_policy_rollout(zero_policy, ref, steps=18, start_phase=3)
    with pytest.raises(ValueError, match="policy must return an action of shape"):
        execute_policy_rollout(lambda obs: np.zeros(3), ref, steps=2)
    with pytest.raises(ValueError, match="policy must be a module with an act"):
        execute_policy_rollout(42, ref, steps=2)
    with pytest.raises(ValueError, match="is a path: load the checkpoint"):
        execute_policy_rollout("runs/last.ckpt", ref, steps=2)


def test_inverse_dynamics_replaces_the_ground_by_the_reference_grf():
    ref = standing_reference(5)
    tau = inverse_dynamics_forces(ref)
    assert tau.shape == (5, 18)
    # Σ f_z = m·g holds the base up: no vertical force left for the (unactuated) base
    assert np.abs(tau[:, 2]).max() < 0.01 * TOTAL_MASS * G
    # without the GRF term the base would need the full weight
    zero = standing_reference(5)
    zero.grf[:] = 0.0
    assert np.abs(inverse_dynamics_forces(zero)[:, 2] - TOTAL_MASS * G).max() < 1.0
    # joint torques: knees hold the weight (same sign on all four, several Nm)
    knees = tau[0, 6:].reshape(4, 3)[:, 2]
    assert (np.sign(knees) == np.sign(knees[0])).all() and np.abs(knees).min() > 3.0


@pytest.mark.parametrize("mode", ["inverse_dynamics", "feedforward"])
def test_open_loop_rollout_shapes_and_modes(mode):
    ref = standing_reference(10)
    qpos, qvel, grf, images = execute_open_loop_rollout(ref, mode=mode)
    assert qpos.shape == (11, 19) and qvel.shape == (11, 18) and grf.shape == (11, 12)
    assert images == []
    np.testing.assert_allclose(qpos[0], ref.qpos(0))
    assert np.isfinite(qpos).all()
    with pytest.raises(ValueError, match="mode must be"):
        execute_open_loop_rollout(ref, mode="pd")


def test_rollout_frames_show_the_reference_ghost():
    """Both rollouts draw the reference as a ghost by default; opacity 0 turns it off."""
    if not rendering_works():
        pytest.skip("no offscreen GL here")
    ref = standing_reference(4)
    size = {"render_width": 64, "render_height": 48}

    def zero(obs: np.ndarray) -> np.ndarray:
        return np.zeros(12, dtype=np.float32)

    policy = {
        alpha: execute_policy_rollout(zero, ref, steps=1, render=True,
                                      env_kwargs={**size, "render_ghost_alpha": alpha})[3]
        for alpha in (0.0, 0.3)
    }
    open_loop = {
        alpha: execute_open_loop_rollout(ref, steps=1, render=True, width=64, height=48,
                                         ghost_alpha=alpha)[3]
        for alpha in (0.0, 0.3)
    }
    for frames in (policy, open_loop):
        assert len(frames[0.0]) == len(frames[0.3]) == 2
        for plain, with_ghost in zip(frames[0.0], frames[0.3], strict=True):
            # the ghost covers the robot standing on its reference: the frame turns bluer
            change = (with_ghost.astype(int) - plain.astype(int)).sum(axis=(0, 1))  # (3,) rgb
            assert change[2] > 0 and change[2] > change[0], f"rgb change {change}"
    with pytest.raises(ValueError, match="ghost_alpha"):
        execute_open_loop_rollout(ref, steps=1, ghost_alpha=-0.1)


def test_evaluate_tracking_writes_plot_and_video(tmp_path):
    ref = standing_reference(8)
    if rendering_works():
        report = evaluate_tracking(zero_policy, ref, tmp_path, name="stand", video=True)
        assert report.video == tmp_path / "stand.mp4" and report.video.stat().st_size > 1000
    else:
        with pytest.warns(RuntimeWarning, match="rendering unavailable"):
            report = evaluate_tracking(zero_policy, ref, tmp_path, name="stand", video=True)
        assert report.video is None
    assert report.plot == tmp_path / "stand.png"
    assert report.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.steps_survived == 8
    # the report's numbers are those of the rollouts it names
    policy_qpos = execute_policy_rollout(zero_policy, ref)[0]
    assert report.policy == tracking_errors(policy_qpos, ref).rms()
    open_qpos = execute_open_loop_rollout(ref, mode="inverse_dynamics")[0]
    assert report.open_loop == tracking_errors(open_qpos, ref).rms()
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


# ------------------------------------------------------------------------------ the config
def _flags(overrides: dict) -> list[str]:
    return [f"--model.init_args.{k}={v}" for k, v in overrides.items()]


@pytest.mark.parametrize(
    "config", ["go2_tracking.yaml", "go2_pronk.yaml", "go2_bound.yaml", "go2_trot_fast.yaml"]
)
def test_go2_tracking_fast_dev_run(tmp_path, monkeypatch, config):
    """Each shipped Go2 config, subprocess envs and all, with a tiny rollout; the report
    callback writes its plot (and video where MuJoCo can render) and the tracking table."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])  # as from a shell: only cli.main's args
    args = ["fit", "--config", config, "--trainer.fast_dev_run=true", *_flags(TINY)]
    if rendering_works():
        cli.main(args)
        assert list(tmp_path.glob("**/tracking/final.mp4"))
    else:
        with pytest.warns(RuntimeWarning, match="rendering unavailable"):
            cli.main(args)
    assert list(tmp_path.glob("**/tracking/final.png"))
    assert list(tmp_path.glob("**/tracking/step_1.png"))  # the validation report
    table = (next(tmp_path.glob("**/tracking/table.md"))).read_text()
    assert "| PD + feedforward alone |" in table and "| final (iteration 1) |" in table


def test_go2_tracking_resumes_from_last_checkpoint(tmp_path, monkeypatch, capsys):
    """`fit --ckpt_path last` continues a killed run: same step count, normalizer and all."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    config = yaml.safe_load(Path(cli.shipped_configs()["go2_tracking.yaml"]).read_text())
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("Go2TrackingReport"):
            cb["init_args"].update(video=False, steps=5, every_n_validations=1, table_seeds=1)
    (tmp_path / "go2_tiny.yaml").write_text(yaml.safe_dump(config))
    base = ["fit", "--config", "go2_tiny.yaml", "--trainer.val_check_interval=2",
            "--model.init_args.vector_mode=sync",
            *_flags(TINY)]
    cli.main([*base, "--trainer.max_steps=2"])
    last = tmp_path / "runs/go2_tracking/checkpoints/last.ckpt"
    first = torch.load(last, weights_only=False)
    assert first["global_step"] == 2
    assert first["state_dict"]["normalizer.count"].item() == 2 * 64
    assert (tmp_path / "runs/go2_tracking/checkpoints/best.ckpt").is_file()

    with warnings.catch_warnings():  # resuming writes into the same checkpoint folder
        warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
        cli.main([*base, "--trainer.max_steps=4", "--ckpt_path=last"])
    # best.ckpt replaced in place, not a best-v1.ckpt beside a stale one (the order of the
    # config's checkpoint callbacks), and the resumed progress bar still has its total
    checkpoints = tmp_path / "runs/go2_tracking/checkpoints"
    assert sorted(p.name for p in checkpoints.glob("best*.ckpt")) == ["best.ckpt"]
    assert re.search(r"Epoch 0: .*\| 4/4 ", capsys.readouterr().out)
    second = torch.load(last, weights_only=False)
    assert second["global_step"] == 4
    assert second["state_dict"]["normalizer.count"].item() == 4 * 64
    metrics = sorted(tmp_path.glob("runs/go2_tracking/logs/version_*/metrics.csv"))
    assert len(metrics) == 2 and "rollout/ep_return" in metrics[-1].read_text()
    # the report callback wrote its plots into each run's log folder
    assert (metrics[0].parent / "tracking" / "step_2.png").is_file()
    assert (metrics[-1].parent / "tracking" / "final.png").is_file()

    # the loaded checkpoint is a policy for rollouts, with the env settings it was trained with
    from diffto.learning.ppo import PPO

    ref = standing_reference(6)
    module = PPO.load_from_checkpoint(last)
    from_module = execute_policy_rollout(module, ref, steps=3)
    from_act = execute_policy_rollout(module.act, ref, steps=3, env_kwargs=module.eval_env_kwargs)
    np.testing.assert_allclose(from_module[0], from_act[0])
    assert module.normalizer.count.item() == 4 * 64
    # reference=None: the clip the policy was trained on (the 2 s trot of the config)
    qpos = execute_policy_rollout(module, None, steps=2)[0]
    trained = resolve_reference("trot", module.eval_env_kwargs)
    np.testing.assert_allclose(qpos[0], trained.qpos(0))

    # the evaluation entry point reads the same checkpoint
    evaluate_main(["--checkpoint", str(last), "--steps", "3", "--no-video", "--seeds", "1",
                   "--out", str(tmp_path / "eval")])
    assert (tmp_path / "eval" / "last.png").is_file()
    out = capsys.readouterr().out
    assert "policy (closed loop)" in out
    # the table: PD alone, then the run's best.ckpt and last.ckpt, on the same episodes
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == [
        "PD + feedforward alone", "best.ckpt", "last.ckpt"]
    assert (tmp_path / "eval" / "last_table.md").is_file()
    # and the end-of-fit table of the resumed run
    assert "| final (iteration 4) |" in (metrics[-1].parent / "tracking" / "table.md").read_text()
