"""Imitation of an expert MPC: SolverPolicy, MPCImitation, the config (the expert data
and the dataset format are tested in tests/data/)."""

import lightning as L
import pytest
import torch

from diffto.data.expert_mpc import ExpertMPCDataModule
from diffto.layers.lqr import LQR
from diffto.layers.mpc import MPC
from diffto.learning.imitation import MPCImitation, imitation_loss, weight_error
from diffto.policies import SolverPolicy
from diffto.problem import LinearDynamics
from diffto.tasks.classic.pendulum import Pendulum

# ----------------------------------------------------------------------------- SolverPolicy


def _double_integrator(T: int) -> LinearDynamics:
    A = torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)
    Bm = torch.tensor([[0.005], [0.1]], dtype=torch.float64)
    return LinearDynamics.time_invariant(A, Bm, T)


@pytest.mark.parametrize("conditioning", ["none", "state", "state_goal"])
def test_solver_policy_shapes_and_gradient_flow(conditioning):
    T, B = 6, 5
    policy = SolverPolicy(
        LQR(), 2, 1, T, obs_dim=None if conditioning == "none" else 2,
        goal_dim=2 if conditioning == "state_goal" else 0, hidden=(8,), learn_goal=True,
        init_q=[2.0, 1.0], init_r=[0.5], dynamics=_double_integrator(T),
    ).double()
    x0 = torch.randn(B, 2, dtype=torch.float64)
    goal = torch.randn(B, 2, dtype=torch.float64) if conditioning == "state_goal" else None
    out = policy(x0, goal=goal)
    assert out.action.shape == (B, 1)
    assert out.solution.x.shape == (B, T + 1, 2) and out.solution.u.shape == (B, T, 1)
    assert out.q.shape == (B, 2) and out.r.shape == (B, 1) and out.x_goal.shape == (B, 2)
    # weights are positive and normalized to geometric mean one; the start is init_q/init_r
    w = torch.cat([out.q, out.r], -1)
    assert (w > 0).all()
    torch.testing.assert_close(w.log().mean(-1), torch.zeros(B, dtype=torch.float64))
    # the head starts at (or, with a network, near) init_q / init_r
    torch.testing.assert_close(w[0] / w[0, -1], torch.tensor([4.0, 2.0, 1.0], dtype=w.dtype),
                               rtol=0.05, atol=0.0)
    # every trainable parameter receives a nonzero gradient through the solver
    (out.solution.u ** 2).sum().backward()
    for name, p in policy.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_solver_policy_gradient_matches_finite_differences():
    """d(loss)/d(log-weights) through the LQR layer agrees with central differences."""
    T = 5
    policy = SolverPolicy(LQR(), 2, 1, T, init_q=[3.0, 0.5], init_r=[0.2],
                          dynamics=_double_integrator(T)).double()
    x0 = torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (policy(x0).solution.u ** 2).sum() + policy(x0).solution.x[:, -1].sum()

    (grad,) = torch.autograd.grad(loss(), [policy.params])
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(grad.numel()):
            policy.params[i] += 1e-6
            up = loss()
            policy.params[i] -= 2e-6
            down = loss()
            policy.params[i] += 1e-6
            fd[i] = (up - down) / 2e-6
    assert (grad - fd).abs().max() < 1e-6 * (1 + fd.abs().max()), f"{grad} vs {fd}"
    assert grad.abs().max() > 1e-3


def test_solver_policy_warm_start_and_bad_input():
    T = 4
    pend = Pendulum(dt=0.05).double()
    policy = SolverPolicy(MPC(pend, T, u_lower=-3.0, u_upper=3.0), 2, 1, T, obs_dim=2,
                          warm_start=True, hidden=(4,)).double()
    x0 = torch.tensor([[0.2, 0.0]], dtype=torch.float64)
    out = policy(x0)
    assert out.u_init.shape == (1, T, 1) and bool(out.solution.converged.all())
    with pytest.raises(ValueError, match=r"x0 must have shape \(B, 2\)"):
        policy(torch.zeros(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"obs must have shape"):
        policy(x0, obs=torch.zeros(1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="init_q must be 2 positive"):
        SolverPolicy(MPC(pend, T), 2, 1, T, init_q=[1.0, -1.0])
    with pytest.raises(ValueError, match="goal_dim > 0 needs a network"):
        SolverPolicy(MPC(pend, T), 2, 1, T, goal_dim=2)


def test_loss_helpers():
    u, x = torch.zeros(2, 3, 1), torch.zeros(2, 4, 2)
    assert imitation_loss(u + 1, u).item() == 1.0
    assert imitation_loss(u + 1, u, x + 2, x).item() == 5.0
    with pytest.raises(ValueError, match="must match"):
        imitation_loss(u, torch.zeros(2, 3, 2))
    w_star = torch.tensor([10.0, 1.0, 0.1])
    assert weight_error(3 * w_star, w_star).item() < 1e-6  # scale does not matter
    assert weight_error(torch.ones(3), w_star).item() > 0.5


# ----------------------------------------------------------------------------- MPCImitation


def _fit(tmp_path, model_kw: dict, steps: int, **data_kw) -> MPCImitation:
    L.seed_everything(0, verbose=False)
    dm = ExpertMPCDataModule(n_train=16, n_val=8, batch_size=16, horizon=10,
                             cache_dir=str(tmp_path / "cache"), **data_kw)
    model = MPCImitation(horizon=10, **model_kw)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, dm)
    return model


def test_imitation_recovers_expert_weights(tmp_path):
    """Weight error must fall by more than half in a few steps; a learner whose gradient does
    not reach the weights (or points the wrong way) stays at or above its start."""
    init = [3.0, 1.0, 0.3]
    model = _fit(tmp_path, {"lr": 0.25, "lr_schedule": "constant", "init_q": init[:2],
                               "init_r": init[2:]}, steps=6)
    w_star = model.expert_weights()
    start = weight_error(torch.tensor(init, dtype=w_star.dtype), w_star).item()
    end = weight_error(model.learned_weights(), w_star).item()
    assert end < 0.5 * start, f"weight error {start:.3f} -> {end:.3f}"


def test_imitation_learns_dynamics_parameter(tmp_path):
    """With the expert's weights known, the pendulum's mass is learned through the layer."""
    model_kw = {"lr": 0.05, "lr_schedule": "constant", "init_q": [10.0, 1.0], "init_r": [0.1],
                "learn_dynamics": ["mass"], "init_dynamics": {"mass": 0.7}}
    model = _fit(tmp_path, model_kw, steps=5)
    assert abs(model.dynamics.mass.item() - 1.0) < 0.5 * 0.3, model.dynamics.mass.item()


def test_imitation_checks_the_expert_data(tmp_path):
    """The learner refuses expert data made for another horizon or other fixed dynamics."""
    dm = ExpertMPCDataModule(n_train=4, n_val=2, horizon=5, cache_dir=str(tmp_path))
    dm.setup()
    with pytest.raises(ValueError, match="horizon=5 but the model has horizon=20"):
        MPCImitation(horizon=20).check_expert(dm.meta)
    with pytest.raises(ValueError, match="mass"):
        MPCImitation(horizon=5, init_dynamics={"mass": 2.0}).check_expert(dm.meta)
    MPCImitation(horizon=5, learn_dynamics=["mass"], init_dynamics={"mass": 2.0}).check_expert(
        dm.meta)
    with pytest.raises(ValueError, match="conditioning"):
        MPCImitation(conditioning="image")


def test_pendulum_imitation_config_fast_dev_run(tmp_path, monkeypatch):
    from diffto.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    main(["fit", "--config", "pendulum_imitation.yaml", "--trainer.fast_dev_run=true",
          "--data.n_train=8", "--data.n_val=4", "--data.batch_size=8"])
    assert list((tmp_path / "runs" / "pendulum_imitation" / "expert_data").glob("*.npz"))


def test_cartpole_imitation_runs_and_improves(tmp_path):
    """The second system: expert cart-pole plans, and one L-BFGS step lowers the loss."""
    L.seed_everything(0, verbose=False)
    dm = ExpertMPCDataModule(system="cartpole", n_train=8, n_val=0, horizon=5, batch_size=8,
                             cache_dir=str(tmp_path))
    dm.setup()
    assert dm.train_set.items["states"].shape == (8, 6, 4)
    assert dm.train_set.items["actions"].shape == (8, 5, 1)
    model = MPCImitation(system="cartpole", horizon=5, optimizer="lbfgs", lr=1.0,
                         init_q=[1.0, 1.0, 1.0, 1.0])
    batch = dm.train_set.items
    with torch.no_grad():
        loss0 = imitation_loss(model(batch).solution.u, batch["actions"]).item()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(model, dm)
    with torch.no_grad():
        loss1 = imitation_loss(model(batch).solution.u, batch["actions"]).item()
    assert loss1 < 0.5 * loss0, f"imitation loss {loss0:.3g} -> {loss1:.3g}"
