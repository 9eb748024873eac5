"""Expert MPC plans as a trajectory set, and the datamodule that caches and serves them."""

import numpy as np
import pytest
import torch

from diffto.data.expert_mpc import (
    ExpertMPCDataModule,
    generate_expert_trajectories,
    plan_rows,
)
from diffto.data.trajectories import cost_to_go
from diffto.problem import QuadraticCost
from diffto.tasks.classic.pendulum import Pendulum


def test_expert_plans_become_episodes():
    T, q, r = 6, (10.0, 1.0), (0.1,)
    data = generate_expert_trajectories(n_rows=5, horizon=T, expert_q=q, expert_r=r, seed=3)
    E = len(data.episode_ids())
    assert E == 5 and len(data) == 5 * T
    assert data.meta["episodes_requested"] == 5 and data.meta["episodes_failed"] == 0
    assert data.meta["cost_weights"] == {"q": list(q), "r": list(r)} and data.dt == 0.05
    assert data.episode_info["converged"].all() and (data.episode_info["length"] == T).all()
    assert (data.episode_info["iterations"] >= 1).all()
    last = data.truncated.reshape(E, T)
    assert last[:, -1].all() and not last[:, :-1].any()
    assert not data.terminal.any()
    rows = plan_rows(data)
    x, u = torch.as_tensor(rows["states"]), torch.as_tensor(rows["actions"])
    assert x.shape == (E, T + 1, 2) and u.shape == (E, T, 1)
    # the plans are dynamically consistent: rolling out u from x0 reproduces x
    torch.testing.assert_close(Pendulum(dt=0.05).double().rollout(x[:, 0], u), x)
    # the stage costs sum to the plan's objective (goal at the origin: no dropped constant),
    # and cost_to_go at t = 0 is that sum
    Q, R = torch.tensor(q, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
    cost = QuadraticCost.tracking(Q.diag(), R.diag(), T)
    total = cost.evaluate(x, u).numpy()
    np.testing.assert_allclose(data.stack_episodes("cost").sum(1), total, rtol=1e-10)
    np.testing.assert_allclose(data.stack_episodes("cost_to_go")[:, 0], total, rtol=1e-10)
    np.testing.assert_array_equal(data.cost_to_go, cost_to_go(data.cost, data.episode))


def test_expert_arguments_are_checked():
    with pytest.raises(ValueError, match="expert_q must have 2 entries"):
        generate_expert_trajectories(n_rows=2, expert_q=[1.0])
    with pytest.raises(ValueError, match="x0_low must be <= x0_high"):
        generate_expert_trajectories(n_rows=2, x0_low=[1.0, 0.0], x0_high=[0.0, 0.0])
    with pytest.raises(ValueError, match="system must be"):
        ExpertMPCDataModule(system="acrobot")
    with pytest.raises(ValueError, match="n_train and batch_size must be >= 1"):
        ExpertMPCDataModule(n_train=0)


def test_datamodule_caches_and_serves_whole_plans(tmp_path):
    dm = ExpertMPCDataModule(n_train=4, n_val=2, horizon=5, cache_dir=str(tmp_path))
    dm.setup()
    assert dm.cache_path.exists() and len(dm.train_set) == 4 and len(dm.val_set) == 2
    assert dm.meta["cost_weights"]["q"] == [10.0, 1.0] and dm.meta["episodes_failed"] == 0
    item = dm.train_set[0]
    assert item["x0"].shape == (2,) and item["states"].shape == (6, 2)
    assert item["actions"].shape == (5, 1) and item["goal"].shape == (2,)
    torch.testing.assert_close(item["x0"], item["states"][0])
    # training and validation plans start from different states
    x0_train, x0_val = dm.train_set.items["x0"], dm.val_set.items["x0"]
    assert torch.cdist(x0_train, x0_val).min() > 0
    stamp = dm.cache_path.stat().st_mtime_ns
    dm2 = ExpertMPCDataModule(n_train=4, n_val=2, horizon=5, cache_dir=str(tmp_path))
    dm2.setup()
    assert dm2.cache_path.stat().st_mtime_ns == stamp  # read, not regenerated
    other = ExpertMPCDataModule(n_train=4, n_val=2, horizon=5, expert_r=[0.2],
                                cache_dir=str(tmp_path))
    assert other.cache_path != dm.cache_path
    batch = next(iter(dm.train_dataloader()))
    assert batch["states"].shape == (4, 6, 2) and batch["states"].dtype == torch.float64
