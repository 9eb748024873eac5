"""DAgger: learner states labelled by the expert, aggregated, counted exactly, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffto import cli
from diffto.data.trajectories import load_trajectories, save_trajectories
from diffto.learning import dagger as dagger_module
from diffto.learning.dagger import DAgger, collect_labels
from diffto.learning.goal_evaluation import build_expert

SWINGUP = "diffto/PendulumSwingUp-v0"
EXPERT = {"class_path": "diffto.tasks.classic.SwingUpExpert",
          "init_args": {"horizon": 5, "max_iter": 10}}  # short: converges in a few iterations
STEPS, EPISODES = 6, 3  # per labelling round: 3 episodes of 6 steps = 18 labels


@pytest.fixture(scope="module")
def initial(tmp_path_factory) -> Path:
    """2 expert episodes x 6 steps (every label kept): 12 initial labels."""
    data, _ = collect_labels(lambda o, g: np.zeros((len(o), 1)), build_expert(SWINGUP, EXPERT),
                             SWINGUP, [0, 1], beta=1.0, max_steps=STEPS, keep_unconverged=True,
                             progress=False)
    return save_trajectories(tmp_path_factory.mktemp("initial") / "initial.npz", data)


def make_dagger(initial: Path, data_dir: Path, **kw) -> DAgger:
    args = dict(initial_data=str(initial), rounds=2, epochs_per_round=1,
                episodes_per_round=EPISODES, label_max_steps=STEPS, expert=EXPERT,
                data_dir=str(data_dir), batch_size=8, hidden=[16], eval_episodes=2,
                eval_max_steps=2, expert_baseline=False, report=False)
    args.update(kw)
    return DAgger(SWINGUP, **args)


def trainer(max_epochs: int, root: Path, **kw) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, reload_dataloaders_every_n_epochs=1,
                     limit_val_batches=0, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(root), **kw)


def test_collect_labels_counts_every_solve_and_keeps_the_converged():
    expert = build_expert(SWINGUP, EXPERT)
    learner = lambda o, g: np.full((len(o), 1), 0.3)  # noqa: E731
    data, counts = collect_labels(learner, expert, SWINGUP, [7, 8], beta=0.0, max_steps=4,
                                  first_episode_id=100, progress=False)
    assert counts["labels"] == 8 and counts["kept"] == counts["converged"] == len(data) == 8
    assert set(data.episode_ids()) <= {100, 101}
    # beta = 0: the learner acted, so each next state is the learner's action's outcome,
    # while the label is the expert's action (different from the constant 0.3)
    assert not np.allclose(data.action, 0.3)
    # one iteration per solve stops short of the tolerance: every solve counts as a label,
    # none is kept as expert data unless asked
    capped = build_expert(SWINGUP, {**EXPERT, "init_args": {"horizon": 5, "max_iter": 1}})
    none, counts = collect_labels(learner, capped, SWINGUP, [7, 8], max_steps=4, progress=False)
    assert none is None and counts == {"labels": 8, "kept": 0, "converged": 0, "episodes": 2}
    kept, counts = collect_labels(learner, capped, SWINGUP, [7, 8], max_steps=4,
                                  keep_unconverged=True, progress=False)
    assert len(kept) == counts["kept"] == 8
    with pytest.raises(ValueError, match="beta"):
        collect_labels(learner, expert, SWINGUP, [0], beta=1.5)


def test_first_max_iter_lets_the_cold_first_solve_converge():
    # one iteration per step: the cold first solve stops short of the tolerance (none kept,
    # above); with more iterations for that first solve alone, each episode's first state is
    # labelled with a converged solution
    capped = build_expert(SWINGUP, {**EXPERT, "init_args": {"horizon": 5, "max_iter": 1}})
    learner = lambda o, g: np.full((len(o), 1), 0.3)  # noqa: E731
    data, counts = collect_labels(learner, capped, SWINGUP, [7, 8], max_steps=4,
                                  first_max_iter=20, first_episode_id=100, progress=False)
    assert counts["labels"] == 8 and counts["converged"] == len(data) >= 2
    first = data.timestep == 0
    assert sorted(data.episode[first].tolist()) == [100, 101]
    with pytest.raises(ValueError, match="first_max_iter"):
        collect_labels(learner, capped, SWINGUP, [0], first_max_iter=0)


def test_dagger_labels_with_label_expert_not_the_evaluated_one(tmp_path, initial):
    # the evaluated expert stops after 1 iteration (never converged): labelled by it, no round
    # label would be kept; the label expert (10 iterations) converges
    capped = {**EXPERT, "init_args": {"horizon": 5, "max_iter": 1}}
    model = make_dagger(initial, tmp_path / "labels", expert=capped, label_expert=EXPERT,
                        rounds=1, label_warm_start="nearest")
    trainer(2, tmp_path).fit(model)
    counts = json.loads((tmp_path / "labels/round_1.json").read_text())
    assert counts["labels"] == EPISODES * STEPS and counts["kept"] > EPISODES * STEPS // 2
    assert model._expert[0].max_iter == 10


def test_nearest_warm_start_reuses_the_plan_of_the_same_state(initial):
    # relabelling the reference's own episodes: each state's nearest reference row is itself,
    # so each solve starts from that state's converged plan and returns its action, at every
    # step, even with one iteration per solve (which from the cold start converges nowhere)
    ref = load_trajectories(initial)
    capped = build_expert(SWINGUP, {**EXPERT, "init_args": {"horizon": 5, "max_iter": 1}})
    data, counts = collect_labels(lambda o, g: np.zeros((len(o), 1)), capped, SWINGUP, [0, 1],
                                  beta=1.0, max_steps=STEPS, reference=ref, progress=False)
    assert counts["converged"] == counts["labels"] == len(ref)
    np.testing.assert_allclose(data.action, ref.action, atol=1e-3)
    assert data.plan.shape == (len(ref), 5, 1)
    long = build_expert(SWINGUP, {**EXPERT, "init_args": {"horizon": 7, "max_iter": 1}})
    with pytest.raises(ValueError, match="horizon"):
        collect_labels(lambda o, g: np.zeros((len(o), 1)), long, SWINGUP, [0], reference=ref)


def test_policy_warm_start_labels_start_from_the_learners_rollout(tmp_path, initial, monkeypatch):
    # every label's solve starts from the learner's rollout through the planning model
    from diffto.learning import warm_start

    calls = []
    original = warm_start.PolicyWarmStart.forward

    def spy(self, states, goals):
        u = original(self, states, goals)
        calls.append(u.shape)
        return u

    monkeypatch.setattr(warm_start.PolicyWarmStart, "forward", spy)
    model = make_dagger(initial, tmp_path / "labels", label_warm_start="policy")
    trainer(2, tmp_path).fit(model)  # round 0 (BC), then round 1 labelled
    assert len(calls) == STEPS and all(c[0] == EPISODES for c in calls)
    assert model.labels == 12 + EPISODES * STEPS
    ref = load_trajectories(initial)
    with pytest.raises(ValueError, match="reference or proposer"):
        collect_labels(lambda o, g: np.zeros((len(o), 1)), build_expert(SWINGUP, EXPERT),
                       SWINGUP, [0], reference=ref, proposer=lambda x, g: None)
    with pytest.raises(ValueError, match="label_warm_start must be"):
        make_dagger(initial, tmp_path / "x", label_warm_start="previous")


def test_dagger_aggregates_rounds_and_counts_labels_exactly(tmp_path, initial):
    model = make_dagger(initial, tmp_path / "labels")
    trainer(3, tmp_path).fit(model)  # epoch 0: round 0 (BC); epochs 1, 2: rounds 1, 2
    counts = [json.loads((tmp_path / f"labels/round_{r}.json").read_text()) for r in (1, 2)]
    assert [c["labels"] for c in counts] == [EPISODES * STEPS] * 2
    assert model.labels == 12 + 2 * EPISODES * STEPS
    aggregated = model.aggregated()
    assert len(aggregated) == 12 + sum(c["kept"] for c in counts)
    for r in (1, 2):
        path = tmp_path / f"labels/round_{r}.npz"
        if counts[r - 1]["kept"]:
            seeds = load_trajectories(path).episode_info["seed"]
            assert set(seeds.tolist()) <= {500_000 + (r - 1) * EPISODES + j
                                           for j in range(EPISODES)}


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_dagger_resumes_without_labelling_a_round_twice(tmp_path, initial, monkeypatch):
    ckpt = tmp_path / "ckpt"
    model = make_dagger(initial, tmp_path / "labels")
    trainer(2, tmp_path, callbacks=[ModelCheckpoint(dirpath=ckpt, save_last=True)]).fit(model)
    assert (tmp_path / "labels/round_1.json").exists()
    assert not (tmp_path / "labels/round_2.json").exists()

    calls = []
    real = dagger_module.collect_labels

    def counting(*args, **kwargs):
        calls.append(kwargs.get("first_episode_id"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dagger_module, "collect_labels", counting)
    resumed = make_dagger(initial, tmp_path / "labels")
    trainer(3, tmp_path, callbacks=[ModelCheckpoint(dirpath=ckpt, save_last=True)]).fit(
        resumed, ckpt_path=str(ckpt / "last.ckpt"))
    assert len(calls) == 1  # round 2 only; round 1 came from disk
    assert resumed.labels == 12 + 2 * EPISODES * STEPS
    state = torch.load(ckpt / "last.ckpt", weights_only=False)
    assert state["diffto_goal_learner"] == "DAgger"


def test_dagger_needs_the_dataloader_rebuilt_every_epoch(tmp_path, initial):
    model = make_dagger(initial, tmp_path / "labels")
    t = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        t.fit(model)


def test_panda_dagger_config_fast_dev_run(tmp_path, monkeypatch, random_dataset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    data = random_dataset("diffto/PandaReach-v0", tmp_path / "panda.npz")
    cli.main(["fit", "--config", "panda_dagger.yaml", "--trainer.fast_dev_run=true",
              f"--model.init_args.initial_data={data}", "--model.init_args.initial_transitions=8",
              "--model.init_args.eval_episodes=2", "--model.init_args.eval_max_steps=3",
              "--model.init_args.expert_baseline=false", "--model.init_args.video_episodes=0"])
    report = json.loads(next(tmp_path.glob("**/report.json")).read_text())
    assert report["labels"] == 8


def test_pendulum_dagger_config_fast_dev_run(tmp_path, monkeypatch, initial):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    cli.main(["fit", "--config", "pendulum_dagger.yaml", "--trainer.fast_dev_run=true",
              f"--model.init_args.initial_data={initial}", "--model.init_args.hidden=[16]",
              "--model.init_args.initial_transitions=8",
              "--model.init_args.eval_episodes=2", "--model.init_args.eval_max_steps=3",
              "--model.init_args.expert_baseline=false", "--model.init_args.video_episodes=0"])
    report = json.loads(next(tmp_path.glob("**/report.json")).read_text())
    assert report["labels"] == 8  # the initial transitions (fast_dev_run: round 0 only)
