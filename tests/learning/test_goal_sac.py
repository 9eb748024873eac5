"""SAC with HER: target critics, relabelled rewards, the clipped TD target, the config."""

from __future__ import annotations

import pytest
import torch

from diffto import cli
from diffto.learning.goal_sac import GoalSAC

TINY = {"env_kwargs": {"task": "reach-v3", "max_episode_steps": 10}, "num_envs": 2,
        "env_steps_per_iteration": 20, "env_steps_per_update": 10, "warmup_steps": 20,
        "batch_size": 16, "width": 32, "eval_episodes": 1, "report_episodes": 0,
        "buffer_capacity": 1000, "observation_slice": (0, 36)}


@pytest.fixture(scope="module")
def model() -> GoalSAC:
    torch.manual_seed(0)
    return GoalSAC(**TINY)


def test_targets_start_equal_and_follow_by_polyak(model):
    keys = model.state_dict().keys()
    assert any(k.startswith("q_target.") for k in keys)  # checkpoints carry them
    target_ids = {id(p) for p in model.q_target.parameters()}
    assert not target_ids & {id(p) for p in model.critic_parameters()}
    assert all(not p.requires_grad for p in model.q_target.parameters())
    model.reset_critic()
    for t, p in zip(model.q_target.parameters(), model.q.parameters(), strict=True):
        torch.testing.assert_close(t, p)
    before = [t.clone() for t in model.q_target.parameters()]
    with torch.no_grad():
        for p in model.q.parameters():
            p.add_(1.0)
    model.after_update()
    tau = model.hparams.tau
    for t, old, p in zip(model.q_target.parameters(), before, model.q.parameters(), strict=True):
        torch.testing.assert_close(t, old + tau * (p - old))
    model.reset_critic()


def test_relabelled_rows_reach_their_goal(model, goal_batch):
    batch = goal_batch(model)
    goal = model.relabel(batch)
    assert model.actor_goals(batch) is goal  # the critic's goals, for the actor too
    relabelled = (goal == batch["future_goal"]).all(-1)
    assert relabelled.any() and (~relabelled).any()  # her_ratio = 0.8 of 64 rows
    reward = model.reward(batch, goal)
    assert (reward[relabelled] == 0).all() and (reward[~relabelled] == -1).all()
    _, metrics = model.critic_loss(batch, with_metrics=True)
    assert metrics["critic/reached"] == pytest.approx(relabelled.float().mean().item())
    assert metrics["critic/reward_mean"] == pytest.approx(metrics["critic/reached"] - 1)


def test_reward_radius_and_hand_part(model):
    d = model.env_goal_dim
    goal = torch.zeros(3, 2 * d)
    achieved = torch.zeros(3, 2 * d)
    achieved[0, 0] = 0.04  # inside the 0.05 radius
    achieved[1, 0] = 0.06  # outside
    achieved[2, d:] = 5.0  # the hand part is ignored
    batch = {"next_goal": achieved, "action": torch.zeros(3, model.action_dim)}
    assert model.reward(batch, goal).tolist() == [0.0, -1.0, 0.0]


@pytest.mark.parametrize(("log_alpha", "bias"), [(10.0, 0.0), (-10.0, -1e4), (-10.0, 1e4)])
def test_td_target_is_clipped_to_the_return_range(model, log_alpha, bias, goal_batch):
    batch = goal_batch(model)
    gamma = model.hparams.gamma
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.log_alpha.fill_(log_alpha)
        for net in model.q_target:
            net.head.bias.fill_(bias)
    try:
        goal = model.relabel(batch)
        target = model.clip_target(model.td_target(batch, goal, model.reward(batch, goal)))
        assert target.shape == (64,)
        assert (target >= -1 / (1 - gamma)).all() and (target <= 0).all()
        if bias < 0:
            assert torch.allclose(target, torch.full_like(target, -1 / (1 - gamma)))
    finally:
        model.load_state_dict(saved)


@pytest.mark.parametrize(("name", "value"), [("her_ratio", 1.5), ("her_ratio", -0.1),
                                             ("success_radius", 0.0), ("tau", 0.0),
                                             ("tau", 1.5)])
def test_bad_arguments_raise(name, value):
    with pytest.raises(ValueError, match=name):
        GoalSAC(**{**TINY, name: value})


def test_config_fits_and_its_checkpoint_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    flags = {k: v for k, v in TINY.items() if k not in ("env_kwargs", "observation_slice")}
    cli.main(["fit", "--config", "metaworld_sac_her.yaml", "--trainer.max_steps=2",
              "--trainer.val_check_interval=1", "--model.init_args.video_episodes=0",
              "--model.init_args.env_kwargs.max_episode_steps=10",
              "--model.init_args.eval_env_kwargs.max_episode_steps=10",
              *[f"--model.init_args.{k}={v}" for k, v in flags.items()]])
    metrics = next(tmp_path.glob("runs/metaworld_sac_her/logs/*/metrics.csv")).read_text()
    assert "critic/q_mean" in metrics and "val/success" in metrics
    ckpt = torch.load(tmp_path / "runs/metaworld_sac_her/checkpoints/last.ckpt",
                      weights_only=False)
    state = ckpt["state_dict"]
    assert ckpt["goal_off_policy"]["env_steps"] == 40
    moved = [not torch.equal(state[f"q_target.{k}"], state[f"q.{k}"])
             for k, _ in GoalSAC(**TINY).q.named_parameters()]
    assert any(moved)  # the targets lag the critics after updates
    fresh = GoalSAC(**TINY)
    fresh.load_state_dict(state)  # strict: every key, targets included
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, state[k])
