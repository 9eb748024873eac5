"""Whole-plan imitation: the plan-to-action map, bad data, learning the swing-up expert's plans
well enough that its solves need fewer iterations from them than cold, and the Panda config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from diffto import cli
from diffto.data.trajectories import load_trajectories, save_trajectories
from diffto.learning.dagger import collect_labels
from diffto.learning.gcbc import TransitionsDataModule
from diffto.learning.plan_imitation import PlanImitation
from diffto.learning.warm_start import PlanWarmStart
from diffto.tasks.classic.swingup_expert import SwingUpExpert
from diffto.tasks.registry import build_expert

SWINGUP = "diffto/PendulumSwingUp-v0"
PANDA = "diffto/PandaReach-v0"
HORIZON = 10
# The labeller: converged plans (tight tolerance), so the regression target is the optimum.
EXPERT = {"class_path": "diffto.tasks.classic.SwingUpExpert",
          "init_args": {"horizon": HORIZON, "max_iter": 60, "tol": 1e-8}}


def zero_policy(observation, goal):
    return np.zeros((len(observation), 1))


@pytest.fixture(scope="module")
def swingup_plans(tmp_path_factory) -> Path:
    """The expert's own episodes (beta = 1): 12 x 25 steps, with its plan at every step."""
    data, _ = collect_labels(zero_policy, build_expert(SWINGUP, EXPERT), SWINGUP,
                             list(range(12)), beta=1.0, max_steps=25, progress=False)
    assert data.plan is not None and data.plan.shape[1:] == (HORIZON, 1)
    return save_trajectories(tmp_path_factory.mktemp("plans") / "swingup.npz", data)


def tiny(**kw):
    return PlanImitation(**{"horizon": HORIZON, "env_id": SWINGUP, "expert": EXPERT,
                            "hidden": [64, 64], "activation": "elu", "lr_schedule": "constant",
                            "expert_baseline": False, "report": False, **kw})


def test_plans_map_onto_the_action_box_and_the_first_stage_acts():
    model = tiny()
    limit = float(build_expert(SWINGUP, EXPERT).u_upper.reshape(-1)[0])
    plan = torch.tensor([[limit, -limit, 0.5 * limit] + [0.0] * (HORIZON - 3)])
    a = model.plan_in_action_units(plan)
    torch.testing.assert_close(a[0, :3], torch.tensor([1.0, -1.0, 0.5]))
    assert model.policy.act_dim == HORIZON and model.action_dim == 1
    model.policy.fit_normalization(torch.randn(8, 3), torch.randn(8, 1))
    from diffto.learning.plan_imitation import FirstControl

    first = FirstControl(model.policy, 1).act(np.zeros((4, 3)), np.zeros((4, 1)))
    full = model.proposal(torch.zeros(4, 3), torch.zeros(4, 1))
    assert first.shape == (4, 1) and full.shape == (4, HORIZON, 1)
    np.testing.assert_allclose(first, full[:, 0].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="horizon"):
        tiny(horizon=0)


def test_data_without_plans_or_of_another_horizon_is_refused(tmp_path, swingup_plans):
    data = load_trajectories(swingup_plans)
    no_plan = save_trajectories(tmp_path / "no_plan.npz", dataclasses.replace(data, plan=None))
    short = save_trajectories(tmp_path / "short.npz",
                              dataclasses.replace(data, plan=data.plan[:, :4]))
    for path, match in ((no_plan, "no 'plan' array"), (short, r"T = 10 \(horizon\)")):
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, limit_val_batches=0)
        with pytest.raises(ValueError, match=match):
            trainer.fit(tiny(), TransitionsDataModule(str(path), batch_size=64))


def test_regressed_plans_warm_start_the_expert_in_fewer_iterations(swingup_plans):
    """Trained on the plans, the proposal sits near the optimum: the expert's solves from it
    take fewer iterations than from the cold start and end at the same cost. A network that
    learned nothing, or a plan map off by a scale, would start no nearer than cold."""
    L.seed_everything(0)
    model = tiny()
    dm = TransitionsDataModule(str(swingup_plans), batch_size=100, val_fraction=0.0)
    trainer = L.Trainer(max_epochs=150, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(model, dm)
    data = load_trajectories(swingup_plans)
    target = model.plan_in_action_units(torch.as_tensor(data.plan, dtype=torch.float32))
    zero_mse = float((target**2).mean())
    fitted = float(((model.proposal(torch.as_tensor(data.observation, dtype=torch.float32),
                                    torch.as_tensor(data.desired_goal, dtype=torch.float32))
                     .reshape(len(data), -1) - target) ** 2).mean())
    assert fitted < 0.05 * zero_mse, (fitted, zero_mse)

    expert = SwingUpExpert(horizon=HORIZON, max_iter=60, tol=1e-8)
    obs = torch.as_tensor(data.observation)
    states = torch.stack([torch.atan2(obs[:, 1], obs[:, 0]), obs[:, 2]], -1)
    goals = torch.as_tensor(data.desired_goal)
    proposer = PlanWarmStart(model, expert)
    u_init = proposer(states, goals)
    assert u_init.shape == (len(states), HORIZON, 1) and u_init.dtype == torch.float64
    assert (u_init.abs() <= expert.u_upper.reshape(-1) + 1e-12).all()
    with torch.no_grad():
        cold = expert.solve(states, goals)
        warm = expert.solve(states, goals, u_init=u_init)
    assert cold.converged.all() and warm.converged.all()
    torch.testing.assert_close(warm.cost, cold.cost, rtol=1e-6, atol=1e-9)
    # measured: 2.0 against 2.6 iterations per solve over these 300 states (4.2 against 5.1
    # at the episodes' first states); a proposal near zero would need the cold start's
    assert warm.iterations.double().mean() <= 0.85 * cold.iterations.double().mean(), (
        warm.iterations.double().mean(), cold.iterations.double().mean())
    with pytest.raises(ValueError, match="horizon"):
        PlanWarmStart(model, SwingUpExpert(horizon=HORIZON + 1))


def test_panda_plan_warm_start_config_fast_dev_run(tmp_path, monkeypatch, random_dataset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    path = random_dataset(PANDA, tmp_path / "panda.npz")
    data = load_trajectories(path)
    plans = np.random.default_rng(0).uniform(-10.0, 10.0, (len(data), 15, 7))
    save_trajectories(path, dataclasses.replace(data, plan=plans))
    cli.main(["fit", "--config", "panda_plan_warm_start.yaml", "--trainer.fast_dev_run=true",
              f"--data.init_args.path={path}", "--data.init_args.batch_size=4",
              "--data.init_args.val_fraction=0.5", "--model.init_args.eval_episodes=1",
              "--model.init_args.eval_max_steps=3", "--model.init_args.expert_baseline=false"])
    assert list(tmp_path.glob("**/report.md"))
