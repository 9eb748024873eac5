"""Contrastive RL: the critic and its InfoNCE losses, the tanh-Gaussian actor, the LightningModule
(collection, updates, health metrics, checkpoints, continual learning) and its configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffto.learning.continual_metrics import continual_metrics, forward_transfer, task_auc
from diffto.learning.contrastive_critic import ContrastiveCritic, critic_metrics, infonce_loss
from diffto.learning.crl import ContrastiveRL
from diffto.learning.goal_sac import GoalSAC
from diffto.learning.residual_mlp import ResidualMLP
from diffto.learning.tanh_gaussian_actor import TanhGaussianActor

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")

TINY = dict(env_id="diffto/Metaworld-v0",
            env_kwargs={"task": "reach-v3", "max_episode_steps": 10},
            eval_env_kwargs={"max_episode_steps": 10}, num_envs=2, env_steps_per_iteration=20,
            env_steps_per_update=10, batch_size=16, buffer_capacity=1000, warmup_steps=20,
            observation_slice=(0, 36), width=32, repr_dim=8, eval_episodes=1,
            report_episodes=0, video_episodes=0)


# ----------------------------------------------------------------------------- networks
def test_residual_mlp_shapes_and_skips():
    x = torch.randn(5, 7)
    plain = ResidualMLP(7, 3, width=16, depth=4)
    res = ResidualMLP(7, 3, width=16, depth=4, residual=True, block_layers=2)
    assert plain(x).shape == res(x).shape == (5, 3)
    assert len(res.blocks) == 2 and len(plain.blocks) == 1  # 3 layers after the stem: 2 + 1
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in res.modules()) == 4
    with torch.no_grad():  # a residual block whose layers output zero is the identity
        for block in res.blocks:
            block[-1][0].weight.zero_()
            block[-1][0].bias.zero_()
            block[-1][1].weight.zero_()
            block[-1][1].bias.zero_()
        h = res.stem(x)
        np.testing.assert_allclose(res(x).numpy(), res.head(h).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="depth"):
        ResidualMLP(7, 3, depth=0)


@pytest.mark.parametrize("energy", ["l2", "dot"])
def test_critic_logits_match_the_energy_and_the_diagonal(energy):
    torch.manual_seed(0)
    critic = ContrastiveCritic(5, 2, 3, repr_dim=4, width=16, energy=energy)
    s, a, g = torch.randn(6, 5), torch.randn(6, 2), torch.randn(6, 3)
    logits = critic.logits(s, a, g)
    phi, psi = critic.representations(s, a, g)
    want = -torch.cdist(phi, psi) if energy == "l2" else phi @ psi.T
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(critic(s, a, g), torch.diagonal(logits), atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.floats(0.0, 1.0), st.integers(0, 1000))
def test_infonce_losses_are_the_cross_entropies(B, penalty, seed):
    logits = torch.randn(B, B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    labels = torch.arange(B)
    lse2 = torch.logsumexp(logits, 1).pow(2).mean()
    fwd, bwd = F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
    torch.testing.assert_close(infonce_loss(logits, "forward", penalty), fwd + penalty * lse2)
    torch.testing.assert_close(infonce_loss(logits, "backward", penalty), bwd + penalty * lse2)
    torch.testing.assert_close(infonce_loss(logits, "symmetric", 0.0), (fwd + bwd) / 2)


def test_infonce_gradient_matches_finite_differences():
    logits = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: infonce_loss(x, "symmetric", 0.1), (logits,))
    with pytest.raises(ValueError, match="square"):
        infonce_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="direction"):
        infonce_loss(torch.zeros(2, 2), "sideways")


def test_critic_metrics():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 1.0]])
    m = critic_metrics(logits)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["logits_pos"] == pytest.approx(4 / 3)
    assert m["logits_neg"] == pytest.approx(3 / 6)


def test_critic_learns_to_recognize_futures():
    """Goals are a noisy function of (s, a): after 150 steps the critic picks the right goal
    out of 64 far above chance (1/64); an untrained or broken critic stays near chance."""
    torch.manual_seed(0)
    critic = ContrastiveCritic(4, 2, 2, repr_dim=16, width=64)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    W = torch.randn(6, 2)

    def batch(n=64):
        s, a = torch.randn(n, 4), torch.randn(n, 2)
        return s, a, torch.cat([s, a], 1) @ W + 0.05 * torch.randn(n, 2)

    before = critic_metrics(critic.logits(*batch()))["accuracy"]
    for _ in range(150):
        loss = infonce_loss(critic.logits(*batch()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = critic_metrics(critic.logits(*batch()))["accuracy"]
    assert before < 0.15 and after > 0.5


# ----------------------------------------------------------------------------- actor
def test_actor_log_prob_is_the_change_of_variables():
    torch.manual_seed(0)
    actor = TanhGaussianActor(3, 2, 2, low=torch.tensor([-1.0, 0.0]),
                              high=torch.tensor([1.0, 4.0]), width=16).double()
    obs, goal = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    torch.manual_seed(1)
    action, log_prob = actor(obs, goal)
    torch.manual_seed(1)
    mean, log_std = actor._mean_log_std(obs, goal)
    u = mean + log_std.exp() * torch.randn_like(mean)
    base = torch.distributions.Normal(mean, log_std.exp()).log_prob(u)
    want = (base - torch.log(1 - torch.tanh(u) ** 2) - torch.log(actor.half_range)).sum(-1)
    torch.testing.assert_close(log_prob, want)
    assert ((action >= actor.center - actor.half_range)
            & (action <= actor.center + actor.half_range)).all()
    # no overflow where the literal formula gives -inf
    u = torch.tensor([30.0], dtype=torch.float64)
    stable = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
    assert torch.isfinite(stable).all() and not torch.isfinite(torch.log(1 - torch.tanh(u) ** 2))
    torch.testing.assert_close(actor.mode(obs, goal),
                               actor.center + actor.half_range * torch.tanh(mean))


# ----------------------------------------------------------------------------- the module
def test_module_collects_updates_and_logs_critic_health():
    torch.manual_seed(0)
    model = ContrastiveRL(**TINY)
    model.trainer = None
    opt = model.configure_optimizers()
    model.optimizers = lambda: type("O", (), {"zero_grad": opt.zero_grad, "step": opt.step,
                                              "optimizer": opt})()
    model._start_task(0)
    out = model.collect(40)
    assert model.env_steps == 40 and len(model.buffer) == 40  # 4 finished episodes of 10
    assert 0.0 <= out["success"] <= 1.0
    before = [p.detach().clone() for p in model.critic.parameters()]
    metrics = model.update(last=True)
    assert {"critic/accuracy", "critic/logits_pos", "critic/logits_neg", "critic/logsumexp",
            "loss/critic", "loss/actor", "actor/alpha"} <= set(metrics)
    after = list(model.critic.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(before, after, strict=True))
    assert all(p.requires_grad for p in model.critic.parameters())
    a = model.act(np.zeros((3, 39)), np.zeros((3, 3)))
    assert a.shape == (3, 4) and np.all(np.abs(a) <= 1)
    model.teardown("fit")


def test_collapse_warning_after_patience():
    model = ContrastiveRL(**{**TINY, "collapse_patience": 3})
    model.log = lambda *a, **k: None
    for _ in range(2):
        model.watch_critic({"critic/accuracy": 1 / 16})
    model.watch_critic({"critic/accuracy": 0.5})  # a healthy iteration restarts the count
    for _ in range(2):
        model.watch_critic({"critic/accuracy": 0.0})
    with pytest.warns(RuntimeWarning, match="collapsed"):
        model.watch_critic({"critic/accuracy": 0.0})


def test_goal_features_with_the_hand():
    model = ContrastiveRL(**{**TINY, "goal_features": "achieved_goal_and_hand",
                             "env_kwargs": {"task": "push-v3", "max_episode_steps": 10}})
    assert model.goal_dim == 6
    obs = np.zeros((1, 39))
    obs[0, :3] = [1.0, 2.0, 3.0]
    g = model.goal_of_states(obs, np.array([[0.5, 0.5, 0.5]]))
    np.testing.assert_allclose(g, [[0.5, 0.5, 0.5, 0.5, 1.5, 2.5]])
    np.testing.assert_allclose(model.goal_of_targets(np.ones((1, 3))), [[1, 1, 1, 0, 0, 0]])


def test_goal_hand_offset_is_the_hand_part_of_the_rollout_goal(tmp_path):
    """The rollout goal ``[target, offset]``: a given offset, or the mean hand offset at the
    final states of the dataset's episodes (push's expert ends holding the cube, the hand
    about 3.5 cm above its centre), recorded in the hyperparameters as numbers."""
    from diffto.data.metaworld_demos import collect_demos
    from diffto.data.trajectories import save_trajectories

    push = {**TINY, "goal_features": "achieved_goal_and_hand",
            "env_kwargs": {"task": "push-v3", "max_episode_steps": 10}}
    given_offset = ContrastiveRL(**push, goal_hand_offset=[0.1, -0.2, 0.3])
    np.testing.assert_allclose(given_offset.goal_of_targets(np.ones((2, 3))),
                               [[1, 1, 1, 0.1, -0.2, 0.3]] * 2, rtol=1e-6)
    data, _ = collect_demos("push-v3", range(2), range(2))
    path = tmp_path / "push.npz"
    save_trajectories(path, data)
    model = ContrastiveRL(**push, goal_hand_offset="dataset", pretrain_dataset=str(path))
    arrays = data.arrays()
    last = [sl.stop - 1 for sl in data.episode_slices()]
    want = (arrays["next_observation"][last, :3] - arrays["achieved_goal"][last]).mean(0)
    np.testing.assert_allclose(model.goal_hand_offset, want, rtol=1e-5)
    assert abs(want[2] - 0.035) < 0.01 and np.abs(want[:2]).max() < 0.01, want
    np.testing.assert_allclose(model.goal_of_targets(np.zeros((1, 3)))[0, 3:], want, rtol=1e-5)
    trainer = _fit(model, tmp_path, max_steps=1)
    trainer.save_checkpoint(tmp_path / "push.ckpt")  # records the numbers, not "dataset"
    path.unlink()  # so loading it needs no dataset
    again = ContrastiveRL.load_from_checkpoint(tmp_path / "push.ckpt")
    assert again.hparams.goal_hand_offset == pytest.approx(want.tolist())
    np.testing.assert_allclose(again.goal_hand_offset, model.goal_hand_offset)
    given_offset.on_load_checkpoint({"hyper_parameters": {"goal_hand_offset": [0, 0, 0.5]}})
    np.testing.assert_allclose(given_offset.goal_hand_offset, [0, 0, 0.5])  # a resumed run's
    for bad in (dict(goal_hand_offset=[0.0, 0.0]), dict(goal_hand_offset=[0, 0, float("nan")]),
                dict(goal_hand_offset="demos"), dict(goal_hand_offset="dataset"),
                dict(goal_hand_offset=[0, 0, 0], goal_features="achieved_goal")):
        with pytest.raises(ValueError, match="goal_hand_offset"):
            ContrastiveRL(**{**push, **bad})


def test_bad_arguments_name_themselves():
    for bad, match in ((dict(direction="up"), "direction"), (dict(energy="cos"), "energy"),
                       (dict(env_steps_per_iteration=15), "env_steps_per_iteration"),
                       (dict(goal_features="hand"), "goal_features"),
                       (dict(observation_slice=(0, 99)), "observation_slice"),
                       (dict(task_sequence=[]), "task_sequence"),
                       (dict(env_id="Pendulum-v1", env_kwargs={}), "dict observations")):
        with pytest.raises(ValueError, match=match):
            ContrastiveRL(**{**TINY, **bad})


# ----------------------------------------------------------------------------- continual
def test_continual_metrics_follow_the_definitions():
    R = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.2], [0.4, 0.6, 1.0]]
    m = continual_metrics(R)
    assert m["average_performance"] == pytest.approx(2.0 / 3)
    assert m["forgetting_per_task"] == pytest.approx([0.5, 0.2, 0.0])
    assert forward_transfer([0.5, 1.0], [0.0, 0.5]) == pytest.approx([0.5, 1.0])
    assert math.isnan(forward_transfer([0.5], [1.0])[0])
    hist = [{"env_steps": 0, "success": 0.0, "task": 1}, {"env_steps": 10, "success": 1.0,
                                                          "task": 1}]
    assert task_auc(hist, 1) == pytest.approx(0.5) and math.isnan(task_auc(hist, 0))
    with pytest.raises(ValueError, match="after_task"):
        continual_metrics([[0.1], [0.2]])


@pytest.mark.parametrize("reset", ["critic", "all"])
def test_continual_run_resets_the_critic_and_evaluates_every_task(reset, tmp_path, monkeypatch):
    import lightning as L

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = ContrastiveRL(**{**TINY, "task_sequence": [{"task": "reach-v3"},
                                                       {"task": "button-press-topdown-v3"}],
                             "iterations_per_task": 2, "continual_reset": reset})
    reset_modules = []
    reset_in_place = model.reset_in_place

    def spy_in_place(module, fresh):
        reset_modules.append(module)
        reset_in_place(module, fresh)

    model.reset_in_place = spy_in_place
    seen = {}
    reset_critic = model.reset_critic

    def spy():
        seen["critic"] = [p.detach().clone() for p in model.critic.parameters()]
        reset_critic()

    model.reset_critic = spy
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model)
    assert trainer.global_step == 4 and model.env_steps == 80
    assert "critic" in seen  # reset once, at the switch to task 1
    # the critic (and with "all" the actor) re-initialized in place, once
    assert reset_modules == ([model.critic] if reset == "critic" else [model.critic, model.actor])
    report = json.loads((tmp_path / "continual.json").read_text())
    assert [r["task"] for r in report["after_task"]] == [0, 1]
    assert all(len(r["success"]) == 2 for r in report["after_task"])
    times = [r["training_time_s"] for r in report["after_task"]]
    assert 0 < times[0] < times[1]  # training seconds so far, growing task by task
    assert set(report["metrics"]) >= {"average_performance", "forgetting"}


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("config", ["metaworld_crl.yaml", "metaworld_crl_continual.yaml",
                                    "panda_crl.yaml"])
def test_crl_configs_fast_dev_run(config, tmp_path, monkeypatch):
    from diffto import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    cli.main(["fit", "--config", config, "--trainer.fast_dev_run=true",
              "--model.init_args.num_envs=2", "--model.init_args.env_steps_per_iteration=40",
              "--model.init_args.env_steps_per_update=20", "--model.init_args.warmup_steps=0",
              "--model.init_args.batch_size=16", "--model.init_args.width=32",
              "--model.init_args.env_kwargs.max_episode_steps=10",
              "--model.init_args.eval_env_kwargs.max_episode_steps=10",
              "--model.init_args.eval_episodes=1", "--model.init_args.report_episodes=1",
              "--model.init_args.video_episodes=1"])
    if config == "metaworld_crl_continual.yaml":  # every task evaluated after the first
        report = json.loads(next(tmp_path.glob("**/continual.json")).read_text())
        assert len(report["after_task"][0]["success"]) == 10
        return
    report = json.loads(next(tmp_path.glob("**/report.json")).read_text())
    assert "final policy" in report["results"] and report["env_steps"] == 40
    if config.startswith("metaworld"):
        assert "scripted expert" in report["results"]


# ----------------------------------------------------------------------------- pre-training
def test_pretraining_on_a_dataset_fills_the_buffer_and_trains_only_the_critic(tmp_path):
    from diffto.data.metaworld_demos import collect_demos
    from diffto.data.trajectories import save_trajectories
    from diffto.learning.goal_off_policy import initial_achieved_goals

    data, _ = collect_demos("reach-v3", range(2), range(2))
    path = tmp_path / "demos.npz"
    save_trajectories(path, data)
    model = ContrastiveRL(**{**TINY, "env_kwargs": {"task": "reach-v3", "max_episode_steps": 200},
                             "pretrain_dataset": str(path), "pretrain_updates": 5})
    opt = model.configure_optimizers()
    model.optimizers = lambda: type("O", (), {"zero_grad": opt.zero_grad, "step": opt.step,
                                              "optimizer": opt})()
    model.trainer = None
    model._start_task(0)
    lengths = data.episode_lengths()
    # each from its first state: a reset with the episode's seed reproduces it, and gives the
    # achieved goal there that the format does not record
    initial = initial_achieved_goals(data)
    assert all(g is not None for g in initial)
    assert len(model.buffer) == int(lengths.sum())
    first = data.episode_slices()[0]
    goals = model.buffer.states["goal"][0]  # episode 0's states, from the first
    np.testing.assert_allclose(goals[0, :3], initial[0], rtol=1e-6)
    np.testing.assert_allclose(goals[1:4, :3], data.arrays()["achieved_goal"][first][:3],
                               rtol=1e-6)
    actor = [p.detach().clone() for p in model.actor.parameters()]
    critic = [p.detach().clone() for p in model.critic.parameters()]
    model.pretrain()
    assert all(torch.equal(p, q) for p, q in zip(actor, model.actor.parameters(), strict=True))
    after = list(model.critic.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(critic, after, strict=True))
    model.hparams.pretrain_actor = True  # offline contrastive RL: the actor learns too
    model.pretrain()
    assert any(not torch.equal(p, q) for p, q in zip(actor, model.actor.parameters(), strict=True))
    model.collect(20)  # the environments' episodes go on beside the dataset's
    model.teardown("fit")
    with pytest.raises(ValueError, match="pretrain_dataset"):
        ContrastiveRL(**{**TINY, "pretrain_updates": 3})


def _tiny(cls) -> dict:
    """TINY without the contrastive critic's arguments for another learner."""
    return TINY if cls is ContrastiveRL else {k: v for k, v in TINY.items() if k != "repr_dim"}


def _demo_module(tmp_path, cls=ContrastiveRL, **overrides):
    from diffto.data.metaworld_demos import collect_demos
    from diffto.data.trajectories import save_trajectories

    data, _ = collect_demos("reach-v3", range(2), range(2))
    path = tmp_path / "demos.npz"
    save_trajectories(path, data)
    model = cls(**{**_tiny(cls), "env_kwargs": {"task": "reach-v3", "max_episode_steps": 200},
                   "pretrain_dataset": str(path), **overrides})
    opt = model.configure_optimizers()
    model.optimizers = lambda: type("O", (), {"zero_grad": opt.zero_grad, "step": opt.step,
                                              "optimizer": opt})()
    model.trainer = None
    model._start_task(0)
    return model


@pytest.mark.parametrize("cls", [ContrastiveRL, GoalSAC])
def test_bc_weight_adds_the_squared_error_on_the_dataset_rows(tmp_path, cls):
    """The pull is the same for both learners: SAC + HER is given the demonstrations as CRL."""
    model = _demo_module(tmp_path, cls, bc_weight=2.0)
    assert "bc_weight" in model.dataset_rows_options()  # warned about when no dataset is left
    torch.manual_seed(0)
    batch = model._batch()
    rows = batch["from_dataset"].clone()
    rows[: len(rows) // 2] = False  # as if half the batch came from the environments
    batch["from_dataset"] = rows
    model.actor_goals(batch)  # SAC's hindsight goals: drawn once, kept in the batch
    torch.manual_seed(1)
    with_bc, metrics = model.actor_loss(batch, with_metrics=True)
    model.hparams.bc_weight = 0.0
    torch.manual_seed(1)
    plain, _ = model.actor_loss(batch)
    mode = model.actor.mode(batch["observation"][rows], batch["future_goal"][rows])
    mse = (((mode - batch["action"][rows]) / model.actor.half_range) ** 2).mean()
    torch.testing.assert_close(with_bc - plain, 2.0 * mse)
    assert metrics["actor/bc_rows"] == int(rows.sum()) == len(rows) - len(rows) // 2
    model.hparams.bc_weight = 2.0
    batch["from_dataset"] = torch.zeros_like(rows)  # no dataset rows: no term, no NaN
    torch.manual_seed(1)
    none, metrics = model.actor_loss(batch, with_metrics=True)
    assert torch.isfinite(none) and math.isnan(metrics["actor/bc_mse"])
    assert metrics["actor/bc_rows"] == 0
    model.teardown("fit")
    for bad in (dict(bc_weight=-1.0, pretrain_dataset=str(tmp_path / "demos.npz")),
                dict(bc_weight=1.0), dict(bc_weight=float("nan"))):
        with pytest.raises(ValueError, match="bc_weight"):
            cls(**{**_tiny(cls), **bad})


def test_bc_weight_pulls_the_actor_onto_the_demonstrations(tmp_path):
    """200 updates on the demonstrations alone: with the pull the policy's mode comes within a
    tenth of its initial squared error of the expert's actions, and within half of where
    the critic alone brings it (the critic alone: 0.22 of the initial error, the pull 0.06)."""
    errors = {}
    for weight in (0.0, 10.0):
        torch.manual_seed(0)
        model = _demo_module(tmp_path, bc_weight=weight, pretrain_updates=200,
                             pretrain_actor=True)
        data = model.buffer.sample(512, model.hparams.gamma)
        obs, goal, action = (torch.as_tensor(data[k]) for k in
                             ("observation", "future_goal", "action"))

        def error(m=model, obs=obs, goal=goal, action=action) -> float:
            with torch.no_grad():
                return float((((m.actor.mode(obs, goal) - action) / m.actor.half_range) ** 2)
                             .mean())

        before = error()
        model.pretrain()
        errors[weight] = error() / before
        model.teardown("fit")
    assert errors[10.0] < 0.1 and errors[10.0] < errors[0.0] / 2, errors


# ----------------------------------------------------------------------------- resuming
def _fit(model, tmp_path, max_steps, ckpt_path=None):
    import lightning as L

    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def test_resume_restores_the_buffer_and_the_counters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    kwargs = {**TINY, "checkpoint_buffer": True, "warmup_steps": 60}
    model = ContrastiveRL(**kwargs)
    trainer = _fit(model, tmp_path, 2)
    stored = len(model.buffer)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = ContrastiveRL(**kwargs)
    seen = {}
    start = resumed._start_task

    def spy(k, resumed_flag=False, **kw):
        start(k, resumed_flag, **kw)
        seen["buffer"], seen["warmup_done"] = len(resumed.buffer), resumed._warmup_done()

    resumed._start_task = lambda k, resumed=False: spy(k, resumed)
    trainer = _fit(resumed, tmp_path, 4, ckpt_path=tmp_path / "last.ckpt")
    assert seen["buffer"] == stored > 0  # the checkpoint carried the finished episodes
    assert seen["warmup_done"] == 40  # the warm-up goes on where it stopped (40 of 60)
    assert trainer.global_step == 4 and resumed.env_steps == 80


def test_resume_at_a_task_boundary_makes_the_switch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    kwargs = {**TINY, "task_sequence": [{"task": "reach-v3"},
                                        {"task": "button-press-topdown-v3"}],
              "iterations_per_task": 2, "continual_reset": "critic"}
    model = ContrastiveRL(**kwargs)
    trainer = _fit(model, tmp_path, 2)  # ends with task 0 (and evaluates it)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = ContrastiveRL(**kwargs)
    resets = []
    resumed.reset_critic = lambda: resets.append(resumed._task_index)
    _fit(resumed, tmp_path, 4, ckpt_path=tmp_path / "last.ckpt")
    assert resets == [0]  # reset once, when switching away from task 0 after resuming
    report = json.loads((tmp_path / "continual.json").read_text())
    assert [r["task"] for r in report["after_task"]] == [0, 1]


def test_resume_after_the_last_step_still_evaluates_the_last_task(tmp_path, monkeypatch):
    """A run killed during its final all-task evaluation resumes from a checkpoint at its last
    step: no training is left, and the final evaluation is still made."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    kwargs = {**TINY, "task_sequence": [{"task": "reach-v3"},
                                        {"task": "button-press-topdown-v3"}],
              "iterations_per_task": 2}
    model = ContrastiveRL(**kwargs)
    model.on_fit_end = lambda: None  # killed before the final evaluation
    trainer = _fit(model, tmp_path, 4)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    report = json.loads((tmp_path / "continual.json").read_text())
    assert [r["task"] for r in report["after_task"]] == [0]
    _fit(ContrastiveRL(**kwargs), tmp_path, 4, ckpt_path=tmp_path / "last.ckpt")
    report = json.loads((tmp_path / "continual.json").read_text())
    assert [r["task"] for r in report["after_task"]] == [0, 1]


def test_resume_without_the_buffer_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ContrastiveRL(**TINY)
    trainer = _fit(model, tmp_path, 2)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    with pytest.warns(RuntimeWarning, match="empty replay buffer"):
        _fit(ContrastiveRL(**TINY), tmp_path, 3, ckpt_path=tmp_path / "last.ckpt")


# ----------------------------------------------------------------------------- learning
def test_crl_learns_reach_from_8k_steps(tmp_path, monkeypatch):
    """8,000 environment steps (2,000 of them random) and 1,500 updates of small networks
    (about 30 s): held-out goals are reached at least 7 times in 10. Random actions (the
    policy before learning) reach none of them; a critic or actor that learns nothing stays
    there."""
    import lightning as L

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = ContrastiveRL(env_id="diffto/Metaworld-v0",
                          env_kwargs={"task": "reach-v3", "max_episode_steps": 100},
                          num_envs=4, env_steps_per_iteration=400, env_steps_per_update=4,
                          batch_size=128, buffer_capacity=50_000, warmup_steps=2000,
                          observation_slice=(0, 36), width=128, repr_dim=32, eval_episodes=10,
                          report_episodes=0, video_episodes=0)
    before = model.evaluate(episodes=10)[0].summary()["success_any"]
    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model)
    after = model.evaluate(episodes=10)[0].summary()["success_any"]
    assert model.env_steps == 8000
    assert before <= 0.2 and after >= 0.7
