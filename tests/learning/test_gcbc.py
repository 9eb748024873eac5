"""Goal-conditioned BC: the policy network, the learner, its configs and its resume."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffto import cli
from diffto.data.trajectories import load_trajectories, save_trajectories
from diffto.learning.dagger import collect_labels
from diffto.learning.gcbc import GoalConditionedBC, TransitionsDataModule, split_transitions
from diffto.learning.goal_evaluation import build_expert
from diffto.learning.goal_policy import GoalPolicy

SWINGUP = "diffto/PendulumSwingUp-v0"
PANDA = "diffto/PandaReach-v0"
# A short-horizon swing-up expert: cheap enough for tests (one solve ~20 ms).
EXPERT = {"class_path": "diffto.tasks.classic.SwingUpExpert",
          "init_args": {"horizon": 10, "max_iter": 2}}


def zero_policy(observation, goal):
    return np.zeros((len(observation), 1))


@pytest.fixture(scope="module")
def swingup_data(tmp_path_factory) -> Path:
    """Expert episodes (the expert acts: beta = 1), 8 x 20 steps, every label kept."""
    data, counts = collect_labels(zero_policy, build_expert(SWINGUP, EXPERT), SWINGUP,
                                  list(range(8)), beta=1.0, max_steps=20,
                                  keep_unconverged=True, progress=False)
    assert counts["labels"] == len(data) == 160
    return save_trajectories(tmp_path_factory.mktemp("data") / "swingup.npz", data)


# ------------------------------------------------------------------------------ the network
def test_policy_respects_the_box_and_its_heads():
    low, high = np.array([-1.0, 0.0]), np.array([1.0, 4.0])
    obs, goal = torch.randn(64, 3) * 100, torch.randn(64, 1)
    for head in ("deterministic", "gaussian", "mixture"):
        for squash in ("tanh", "clip"):
            pol = GoalPolicy(3, 1, low, high, hidden=(16,), head=head, squash=squash)
            pol.fit_normalization(obs, goal)
            a = pol(obs, goal)
            assert a.shape == (64, 2)
            assert (a >= torch.tensor(low, dtype=a.dtype)).all()
            assert (a <= torch.tensor(high, dtype=a.dtype)).all()
            terms = pol.loss(obs, goal, torch.zeros(64, 2))
            terms["loss_bc"].backward()
            assert all(p.grad is not None for p in pol.net.parameters())
    with pytest.raises(ValueError, match="finite action box"):
        GoalPolicy(3, 1, [-np.inf], [np.inf])
    with pytest.raises(ValueError, match="head"):
        GoalPolicy(3, 1, [-1.0], [1.0], head="categorical")
    with pytest.raises(ValueError, match="mixtures"):
        GoalPolicy(3, 1, [-1.0], [1.0], head="mixture", mixtures=0)
    with pytest.raises(ValueError, match="goal"):
        GoalPolicy(3, 1, [-1.0], [1.0])(obs, None)


class _Constant(torch.nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.value


@settings(max_examples=25, deadline=None)
@given(z=st.floats(-5, 5), target=st.sampled_from([-1.0, -0.4, 0.0, 0.7, 1.0]))
def test_clipped_head_loss_is_the_distance_to_what_clips_onto_the_target(z, target):
    """The clip head's loss: the clipped error inside the box, a gradient back towards the box
    where the output overshoots an interior target, and zero past a bound the expert sits on."""
    pol = GoalPolicy(1, 1, [-1.0], [1.0], hidden=(4,), squash="clip")
    pol.fit_normalization(torch.zeros(2, 1), torch.zeros(2, 1))
    out = torch.tensor([[z]], requires_grad=True, dtype=torch.float32)
    pol.net = _Constant(out)  # the raw output z, whatever the input
    graph = pol.loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([[target]]))["loss_bc"]
    graph.backward()
    loss = graph.detach()
    clipped = min(max(z, -1.0), 1.0)
    if abs(target) == 1.0 and clipped == target:  # saturated expert, output past its bound
        assert float(loss) == 0.0 and float(out.grad) == 0.0
    else:
        assert float(loss) == pytest.approx((z - target) ** 2, rel=1e-5, abs=1e-6)
        assert float(loss) >= (clipped - target) ** 2 - 1e-6
        if abs(z - target) > 1e-3:  # the gradient points back to the target, even outside the box
            assert float(out.grad) * (z - target) > 0


def test_mixture_head_keeps_the_modes_an_mse_fit_averages():
    # The expert goes to +0.7 or -0.7 from the same observation: the MSE fit learns the
    # invalid middle (0), the mixture head acts on one of the two modes.
    torch.manual_seed(0)
    obs = torch.randn(512, 2)
    action = torch.where(torch.rand(512, 1) < 0.5, 0.7, -0.7)
    fits = {}
    for head in ("deterministic", "mixture"):
        pol = GoalPolicy(2, 0, [-1.0], [1.0], hidden=(32,), head=head, mixtures=3)
        pol.fit_normalization(obs)
        opt = torch.optim.Adam(pol.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            pol.loss(obs, None, action)["loss_bc"].backward()
            opt.step()
        fits[head] = pol(obs, None).detach()
    assert fits["deterministic"].abs().mean() < 0.2
    assert ((fits["mixture"].abs() - 0.7).abs() < 0.1).float().mean() > 0.95


def test_normalization_travels_in_the_state_dict():
    pol = GoalPolicy(3, 1, [-1.0], [1.0], hidden=(8,))
    assert not pol.normalization_fitted
    pol.fit_normalization(torch.randn(100, 3) * 5 + 2, torch.randn(100, 1))
    fresh = GoalPolicy(3, 1, [-1.0], [1.0], hidden=(8,))
    fresh.load_state_dict(pol.state_dict())
    assert fresh.normalization_fitted
    x, g = torch.randn(5, 3), torch.randn(5, 1)
    torch.testing.assert_close(fresh(x, g), pol(x, g))


def test_relative_goal_is_the_goal_minus_the_achieved_goal_slice():
    torch.manual_seed(0)
    obs, goal = torch.randn(64, 5) * 3 + 1, torch.randn(64, 2)
    pol = GoalPolicy(5, 2, [-1.0], [1.0], hidden=(8,), relative_goal_at=3)
    pol.fit_normalization(obs, goal)
    feats = pol.features(obs, goal)
    assert feats.shape == (64, 5 + 2 + 2)
    rel = goal - obs[:, 3:5]
    expected = (rel - rel.mean(0)) / rel.std(0, unbiased=False)
    torch.testing.assert_close(feats[:, -2:], expected, atol=1e-4, rtol=1e-4)
    # the offset's statistics travel with the weights
    fresh = GoalPolicy(5, 2, [-1.0], [1.0], hidden=(8,), relative_goal_at=3)
    fresh.load_state_dict(pol.state_dict())
    torch.testing.assert_close(fresh(obs, goal), pol(obs, goal))
    for bad in (4, -1):
        with pytest.raises(ValueError, match="relative_goal_at"):
            GoalPolicy(5, 2, [-1.0], [1.0], relative_goal_at=bad)


def test_relative_goal_finds_the_achieved_goal_in_the_observation():
    model = GoalConditionedBC(PANDA, observation_keys=["observation", "achieved_goal"],
                              relative_goal=True, expert_baseline=False)
    assert model.policy.relative_goal_at == 14
    model = GoalConditionedBC(PANDA, observation_keys=["achieved_goal", "observation"],
                              relative_goal=True, expert_baseline=False)
    assert model.policy.relative_goal_at == 0
    with pytest.raises(ValueError, match="relative_goal"):
        GoalConditionedBC(PANDA, relative_goal=True, expert_baseline=False)


def test_policies_reading_the_achieved_goal_learn_the_one_at_their_observation(
        tmp_path, random_dataset):
    """Wired through the data module (GCBC's setup) and DAgger's initial data: the achieved
    goal of each row becomes the one at its observation, once, only for a policy that reads
    it; labels spent count every loaded row even where the view leaves some out."""
    import dataclasses

    from diffto.learning.dagger import DAgger

    path = random_dataset(PANDA, tmp_path / "panda.npz", episodes=2, steps=4)
    data = load_trajectories(path)
    reads = GoalConditionedBC(PANDA, observation_keys=["observation", "achieved_goal"],
                              expert_baseline=False, report=False)
    blind = GoalConditionedBC(PANDA, expert_baseline=False, report=False)
    assert blind.learner_view(data) is data
    dm = TransitionsDataModule(str(path), batch_size=4, val_fraction=0.0)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(reads, datamodule=dm)
    view = dm.train_set
    assert view.meta["achieved_goal_at"] == "observation" and len(view) == 8
    np.testing.assert_array_equal(view.achieved_goal[1:4], data.achieved_goal[0:3])
    reads.setup("validate")  # a second setup leaves the view as it is
    assert dm.train_set is view and dm.labels == 8
    unseeded = save_trajectories(tmp_path / "unseeded.npz",
                                 dataclasses.replace(data, episode_info={}))
    dagger = DAgger(PANDA, initial_data=str(unseeded), observation_keys=["observation"],
                    expert_baseline=False, report=False, data_dir=str(tmp_path / "labels"))
    assert len(dagger.training_data()) == 6  # the two first steps have no achieved goal
    assert dagger.labels == 8  # but were spent


def test_split_is_by_episode_and_max_transitions_bounds_every_row(swingup_data):
    data = load_trajectories(swingup_data)
    train, val = split_transitions(data, 0.25, max_transitions=150, split_seed=1)
    assert len(train) + len(val) == 150  # the last episode is cut at 10 of 20 rows
    assert not set(train.episode_ids()) & set(val.episode_ids())
    assert len(val.episode_ids()) == 2
    train, val = split_transitions(data, 0.0)
    assert val is None and len(train) == len(data)
    with pytest.raises(ValueError, match="max_transitions"):
        split_transitions(data, 0.1, max_transitions=10_000)


def test_observation_keys_pick_the_policy_inputs():
    model = GoalConditionedBC(PANDA, observation_keys=["observation", "achieved_goal"],
                              expert_baseline=False)
    assert model.policy.obs_dim == 14 + 3 and model.policy.goal_dim == 3
    batch = {"observation": torch.zeros(2, 14), "achieved_goal": torch.ones(2, 3)}
    assert model.policy_observation(batch)[:, 14:].eq(1).all()
    with pytest.raises(ValueError, match="observation_keys"):
        GoalConditionedBC(PANDA, observation_keys=["observation", "joint_torques"])


# ------------------------------------------------------------------------------ learning
def test_bc_imitates_the_expert_far_better_than_any_constant(swingup_data):
    """Held-out episodes' expert actions: the learner's error must be a small fraction of
    the best constant's (the training mean), which a learner that ignores its inputs, or
    does not learn, cannot beat."""
    L.seed_everything(0, verbose=False)
    dm = TransitionsDataModule(str(swingup_data), batch_size=32, val_fraction=0.25)
    model = GoalConditionedBC(SWINGUP, hidden=[64, 64], lr=3e-3, expert_baseline=False,
                              report=False)
    trainer = L.Trainer(max_epochs=60, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, dm)
    val, train = dm.val_set, dm.train_set
    pred = model.act(val.observation, val.desired_goal)
    mse = float(np.mean((pred - np.clip(val.action, -1, 1)) ** 2))
    const = float(np.mean((np.clip(train.action, -1, 1).mean(0) - val.action) ** 2))
    assert mse < 0.2 * const, f"BC action MSE {mse:.4f} vs best constant {const:.4f}"


# ------------------------------------------------------------------------------ configs
def _tiny_bc_flags(data: Path) -> list[str]:
    return [f"--data.init_args.path={data}", "--data.init_args.batch_size=16",
            "--model.init_args.eval_episodes=2", "--model.init_args.eval_max_steps=3"]


def test_pendulum_bc_config_fast_dev_run(tmp_path, monkeypatch, swingup_data):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    cli.main(["fit", "--config", "pendulum_bc.yaml", "--trainer.fast_dev_run=true",
              *_tiny_bc_flags(swingup_data), "--model.init_args.video_episodes=1",
              f"--model.init_args.expert={EXPERT}".replace("'", '"')])
    report = next(tmp_path.glob("**/report.json"))
    assert {"TO expert (MPC)", "last checkpoint"} <= set(
        json.loads(report.read_text())["results"])
    assert list(tmp_path.glob("runs/expert_cache/expert_*.json"))
    assert list(tmp_path.glob("**/last.mp4"))


def test_panda_gcbc_config_fast_dev_run(tmp_path, monkeypatch, random_dataset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    data = random_dataset(PANDA, tmp_path / "panda.npz")
    cli.main(["fit", "--config", "panda_gcbc.yaml", "--trainer.fast_dev_run=true",
              *_tiny_bc_flags(data), "--data.init_args.val_fraction=0.5",
              "--model.init_args.expert_baseline=false", "--model.init_args.video_episodes=0"])
    assert list(tmp_path.glob("**/report.md"))


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_fit_resumes_from_the_last_checkpoint_and_evaluate_goal_reads_it(
        tmp_path, monkeypatch, capsys, swingup_data):
    """`--ckpt_path last` continues: epochs and steps go on, the normalizer is the saved one,
    and the final report names the best checkpoint next to the last; the evaluate_goal
    command prints its table and films it."""
    from diffto.learning.evaluate_goal import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    base = ["fit", "--config", "pendulum_bc.yaml", *_tiny_bc_flags(swingup_data),
            "--trainer.check_val_every_n_epoch=1", "--model.init_args.expert_baseline=false",
            "--model.init_args.video_episodes=0", "--trainer.logger=false"]
    cli.main([*base, "--trainer.max_epochs=1"])
    last = tmp_path / "runs/pendulum_bc/checkpoints/last.ckpt"
    first = torch.load(last, weights_only=False)
    assert first["epoch"] == 0
    cli.main([*base, "--trainer.max_epochs=2", "--ckpt_path=last"])
    second = torch.load(last, weights_only=False)
    assert second["epoch"] > first["epoch"] and second["global_step"] == 2 * first["global_step"]
    for key in ("policy.obs_normalizer.mean", "policy.obs_normalizer.count"):
        torch.testing.assert_close(second["state_dict"][key], first["state_dict"][key])
    report = next(tmp_path.glob("**/report.json"))
    payload = json.loads(report.read_text())
    assert payload["best_checkpoint"].endswith("best.ckpt")
    assert {"best checkpoint", "last checkpoint"} <= set(payload["results"])

    main([str(last), "--episodes", "2", "--no-expert", "--video", str(tmp_path / "e.mp4"),
          "--video-episodes", "1", "--json", str(tmp_path / "e.json")])
    out = capsys.readouterr().out
    assert "| policy (last.ckpt) |" in out and (tmp_path / "e.mp4").exists()
    figures = json.loads((tmp_path / "e.json").read_text())
    assert figures["seeds"] == [1_000_000, 1_000_001]
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not written by"):
        main([str(tmp_path / "other.ckpt")])
