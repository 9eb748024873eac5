"""Offline-to-online RL from TO data: TD3+BC and IQL (losses, schedules, rewards, the
pre-training, resuming, the configs)."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from diffto import cli
from diffto.learning.iql import GoalIQL
from diffto.learning.tanh_gaussian_actor import TanhGaussianActor
from diffto.learning.td3bc import GoalTD3BC
from diffto.tasks.registry import make_env

PANDA = "diffto/PandaReach-v0"
TINY = dict(env_id=PANDA, env_kwargs={"max_episode_steps": 10},
            num_envs=2, env_steps_per_iteration=20, env_steps_per_update=10, batch_size=16,
            buffer_capacity=1000, warmup_steps=0, width=32, eval_episodes=1,
            report_episodes=0, video_episodes=0, success_radius=0.02)
STAGE_COST = dict(reward_type="stage_cost", goal_weight=10.0, velocity_weight=0.3,
                  velocity_slice=(7, 14), action_weight=0.05)


def _attach_optimizer(model):
    """Give a module outside a Trainer the optimizer access its updates use."""
    opt = model.configure_optimizers()
    model.optimizers = lambda: type("O", (), {"zero_grad": opt.zero_grad, "step": opt.step,
                                              "optimizer": opt})()
    model.trainer = None
    return opt


# ----------------------------------------------------------------------------- rewards
def test_stage_cost_reward_is_the_experts_running_cost(goal_batch):
    torch.manual_seed(0)
    model = GoalTD3BC(**TINY, **STAGE_COST)
    batch = goal_batch(model, 4)
    goal = torch.rand(4, 3)
    reward = model.reward(batch, goal)
    dist2 = ((batch["next_goal"] - goal) ** 2).sum(-1)
    v2 = (batch["next_observation"][:, 7:14] ** 2).sum(-1)
    a2 = (batch["action"] ** 2).sum(-1)
    torch.testing.assert_close(reward, -(0.5 * 100 * dist2 + 0.5 * 0.09 * v2 + 0.5 * 0.0025 * a2))
    # clipped at 0 from above only: the stage cost's return has no floor
    assert model.clip_target(torch.tensor([5.0, -1e6])).tolist() == [0.0, -1e6]
    with pytest.raises(ValueError, match="velocity_slice"):
        GoalTD3BC(**TINY, **{**STAGE_COST, "velocity_slice": (7, 15)})
    with pytest.raises(ValueError, match="reward_type"):
        GoalTD3BC(**TINY, reward_type="dense")


def test_sparse_reward_with_an_action_penalty():
    model = GoalIQL(**TINY, action_weight=1.0)
    batch = {"next_goal": torch.zeros(2, 3), "action": torch.zeros(2, 7)}
    batch["action"][1, 0] = 0.5
    goal = torch.tensor([[0.01, 0.0, 0.0], [0.05, 0.0, 0.0]])
    torch.testing.assert_close(model.reward(batch, goal), torch.tensor([0.0, -1.0 - 0.125]))


def test_graded_reward_pulls_to_the_goal_inside_the_radius():
    """0 at the goal, linear to -1 at the radius, -1 (the sparse reward) beyond; the
    sparse reward cannot tell the goal from the radius's edge."""
    graded = GoalIQL(**{**TINY, "success_radius": 0.02}, reward_type="graded")
    sparse = GoalIQL(**{**TINY, "success_radius": 0.02})
    batch = {"next_goal": torch.zeros(4, 3), "action": torch.zeros(4, 7)}
    goal = torch.tensor([[0.0, 0.0, 0.0], [0.005, 0.0, 0.0], [0.0, 0.015, 0.0],
                         [0.0, 0.0, 0.3]])
    torch.testing.assert_close(graded.reward(batch, goal), torch.tensor([0.0, -0.25, -0.75, -1.0]))
    torch.testing.assert_close(sparse.reward(batch, goal), torch.tensor([0.0, 0.0, 0.0, -1.0]))
    # rewards in [-1, 0]: the same return bounds as the sparse reward
    assert graded.clip_target(torch.tensor([1.0, -1e6])).tolist() == pytest.approx([0.0, -100.0])


# ----------------------------------------------------------------------------- TD3+BC
def test_td3bc_anneals_the_pull_to_the_data_and_delays_the_actor(goal_batch):
    model = GoalTD3BC(**TINY, bc_weight=1.0, bc_weight_final=0.2, bc_anneal_steps=1000)
    for steps, want in ((0, 1.0), (500, 0.6), (1000, 0.2), (5000, 0.2)):
        model.env_steps = steps
        assert model.bc_weight() == pytest.approx(want)
    batch = goal_batch(model)
    model.updates = 1
    assert model.actor_loss(batch) == (None, {})  # policy_delay = 2
    model.updates = 2
    loss, metrics = model.actor_loss(batch, with_metrics=True)
    assert loss is not None and metrics["actor/bc_weight"] == pytest.approx(0.2)


def test_td3bc_q_term_starts_at_alpha_offline_and_ramps_to_alpha_online(goal_batch):
    model = GoalTD3BC(**TINY, alpha=2.0, alpha_offline=0.0, alpha_ramp_steps=1000)
    for steps, want in ((0, 0.0), (1, 0.002), (500, 1.0), (1000, 2.0), (9000, 2.0)):
        model.env_steps = steps
        assert model.alpha() == pytest.approx(want)
    model.env_steps, model.updates = 0, 2
    batch = goal_batch(model)
    loss, metrics = model.actor_loss(batch, with_metrics=True)
    goal = model.relabel(batch)
    pi = model.actor.mode(batch["observation"], goal)
    # pure behaviour cloning during pre-training: the loss is the BC term alone
    torch.testing.assert_close(loss, ((pi - batch["action"]) ** 2).mean())
    assert metrics["actor/q_alpha"] == 0.0
    at_once = GoalTD3BC(**TINY, alpha=2.0, alpha_offline=0.5)
    at_once.env_steps = 0
    assert at_once.alpha() == 0.5
    at_once.env_steps = 1
    assert at_once.alpha() == 2.0
    held = GoalTD3BC(**TINY, alpha=2.0, alpha_offline=0.0, alpha_ramp_steps=1000,
                     alpha_hold_steps=300)
    for steps, want in ((0, 0.0), (299, 0.0), (300, 0.0), (800, 1.0), (1300, 2.0)):
        held.env_steps = steps
        assert held.alpha() == pytest.approx(want)
    with pytest.raises(ValueError, match="alpha_hold_steps holds the Q term at alpha_offline"):
        GoalTD3BC(**TINY, alpha_hold_steps=300)  # nothing to hold without alpha_offline
    default = GoalTD3BC(**TINY, alpha=2.0)
    for steps in (0, 10):
        default.env_steps = steps
        assert default.alpha() == 2.0


def test_td3bc_actor_loss_is_q_normalized_plus_behaviour_cloning(goal_batch):
    torch.manual_seed(0)
    model = GoalTD3BC(**TINY, alpha=2.5, bc_weight=3.0, bc_anneal_steps=10)
    batch = goal_batch(model)
    goal = model.relabel(batch)
    loss, _ = model.actor_loss(batch)
    pi = model.actor.mode(batch["observation"], goal)
    q = model.q[0](torch.cat([pi, batch["observation"], goal], -1)).squeeze(-1)  # Q_1
    want = -2.5 / q.abs().mean() * q.mean() + 3.0 * ((pi - batch["action"]) ** 2).mean()
    torch.testing.assert_close(loss, want)


def test_td3bc_smoothed_target_actions_stay_in_the_box():
    torch.manual_seed(0)
    model = GoalTD3BC(**TINY, target_noise=5.0, target_noise_clip=5.0)
    a = model._noisy(torch.full((100, 7), 0.9), 5.0, 5.0)
    assert (a.abs() <= 1.0).all() and (a == 1.0).any()
    a = model._noisy(torch.zeros(1000, 7), 1.0, 0.5)
    assert a.abs().max() <= 0.5 + 1e-6  # the noise clip, in half-range units


# ----------------------------------------------------------------------------- IQL
def test_actor_log_prob_of_given_actions_matches_the_samples():
    torch.manual_seed(0)
    actor = TanhGaussianActor(3, 2, 2, low=torch.tensor([-1.0, 0.0]),
                              high=torch.tensor([1.0, 4.0]), width=16).double()
    obs, goal = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    action, log_prob = actor(obs, goal)
    torch.testing.assert_close(actor.log_prob(obs, goal, action), log_prob)
    edge = actor.center + actor.half_range  # on the box's face: finite
    assert torch.isfinite(actor.log_prob(obs, goal, edge.expand(6, 2))).all()


def test_iql_value_is_an_expectile_and_the_critics_bootstrap_on_it(goal_batch):
    torch.manual_seed(0)
    model = GoalIQL(**TINY, expectile=0.9)
    batch = goal_batch(model)
    goal = model.relabel(batch)
    with torch.no_grad():
        q = model.q_values(model.q_target, batch["observation"], batch["action"], goal).min(0)[0]
        v = model.state_value(batch["observation"], goal)
        u = q - v
        want = (torch.where(u < 0, 0.1, 0.9) * u ** 2).mean()
        torch.testing.assert_close(model.extra_critic_loss(batch, goal), want)
        reward = model.reward(batch, goal)
        torch.testing.assert_close(
            model.td_target(batch, goal, reward),
            reward + model.hparams.gamma * model.state_value(batch["next_observation"], goal))
    # the expectile regression alone: V of a fixed Q distribution goes to its 0.9-expectile
    values = torch.tensor([0.0, 1.0, 2.0, 10.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.05)
    for _ in range(2000):
        u = values - v
        loss = (torch.where(u < 0, 0.1, 0.9) * u ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the 0.9-expectile e solves 0.9 Σ_{x > e} (x − e) = 0.1 Σ_{x < e} (e − x)
    e = float(v.detach())
    above, below = values[values > e], values[values < e]
    assert 0.9 * float((above - e).sum()) == pytest.approx(0.1 * float((e - below).sum()),
                                                           rel=1e-3)
    assert e > 2.0


def test_iql_actor_weights_are_capped_advantages(goal_batch):
    torch.manual_seed(0)
    model = GoalIQL(**TINY, temperature=1000.0, max_weight=7.0)
    batch = goal_batch(model)
    loss, metrics = model.actor_loss(batch, with_metrics=True)
    assert loss.requires_grad and metrics["actor/weight_mean"] <= 7.0
    model2 = GoalIQL(**TINY, temperature=2.0, temperature_final=6.0,
                     temperature_anneal_steps=100)
    model2.env_steps = 50
    assert model2.temperature() == pytest.approx(4.0)


def test_td3bc_conservative_term_vanishes_for_a_flat_critic_and_lifts_the_datas_actions(
        goal_batch):
    torch.manual_seed(0)
    model = GoalTD3BC(**TINY, conservative_weight=1.0, conservative_actions=4)
    batch = goal_batch(model, 32)
    goal = model.relabel(batch)
    assert float(GoalTD3BC(**TINY).extra_critic_loss(batch, goal)) == 0.0
    # a critic that ignores the action: every sampled action scores as the data's
    model.q_values = lambda nets, obs, action, g: obs[:, 0].expand(len(nets), -1) * 3.0
    assert float(model.extra_critic_loss(batch, goal)) == pytest.approx(0.0, abs=1e-5)
    del model.q_values
    obs, half, center = batch["observation"], model.actor.half_range, model.actor.center
    uniform = center + half * (2.0 * torch.rand(batch["action"].shape) - 1.0)

    def data_over_uniform():
        with torch.no_grad():
            return float((model.q_values(model.q, obs, batch["action"], goal)
                          - model.q_values(model.q, obs, uniform, goal)).mean())

    # the term itself, against a loop over the 2K sampled actions with the same draws
    k, exploration = 4, model.hparams.exploration_noise
    torch.manual_seed(3)
    got = model.extra_critic_loss(batch, goal)
    torch.manual_seed(3)
    drawn = [center + half * (2.0 * torch.rand(k, *batch["action"].shape) - 1.0)]
    with torch.no_grad():
        mode = model.actor.mode(obs, goal)
    noisy = mode + half * torch.randn(k, *mode.shape) * exploration
    drawn.append(torch.maximum(torch.minimum(noisy, center + half), center - half))
    q_each = torch.stack([model.q_values(model.q, obs, a, goal)
                          for a in torch.cat(drawn)], 1)  # (critics, 2K, B)
    q_data = model.q_values(model.q, obs, batch["action"], goal)
    want = (torch.logsumexp(q_each, 1) - np.log(2 * k) - q_data).mean(-1).sum()
    torch.testing.assert_close(got, want)
    before = data_over_uniform()
    opt = torch.optim.Adam(model.q.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        model.extra_critic_loss(batch, goal).backward()
        opt.step()
    assert data_over_uniform() > before + 1.0


@pytest.mark.parametrize(("cls", "name", "value"), [
    (GoalIQL, "expectile", 1.0), (GoalIQL, "temperature", 0.0), (GoalIQL, "max_weight", -1.0),
    (GoalIQL, "temperature_anneal_steps", 0), (GoalTD3BC, "alpha", -1.0),
    (GoalTD3BC, "policy_delay", 0), (GoalTD3BC, "bc_anneal_steps", 1.5),
    (GoalTD3BC, "exploration_noise", -0.1), (GoalTD3BC, "alpha_offline", -1.0),
    (GoalTD3BC, "alpha_ramp_steps", -5), (GoalTD3BC, "alpha_hold_steps", 1.5),
    (GoalIQL, "report_conditions", {"a": 1}),
    (GoalTD3BC, "num_critics", 1), (GoalIQL, "num_critics", True),
    (GoalTD3BC, "actor_pessimism", -1.0), (GoalTD3BC, "conservative_weight", -0.1),
    (GoalTD3BC, "conservative_actions", 0), (GoalTD3BC, "residual_scale", 0.0),
    (GoalTD3BC, "residual_scale", 1.5)])
def test_bad_arguments_name_themselves(cls, name, value):
    with pytest.raises(ValueError, match=name):
        cls(**{**TINY, name: value})


# ----------------------------------------------------------------------------- pre-training
def test_dataset_episodes_start_at_their_first_state_when_a_reset_reproduces_it(
        tmp_path, random_dataset):
    """Every evaluation starts from rest with the goal far: the dataset's first transitions
    must be in the buffer. A reset with the recorded seed gives the first state's achieved goal
    (the format stores the one after each step); without seeds, or with seeds that do not
    reproduce the first state, each episode starts at its second state."""
    import dataclasses

    from diffto.data.trajectories import load_trajectories, save_trajectories
    from diffto.learning.goal_off_policy import initial_achieved_goals
    from diffto.tasks.registry import make_env

    recorded = load_trajectories(random_dataset(PANDA, tmp_path / "panda.npz", episodes=3,
                                                steps=5))
    data = dataclasses.replace(recorded, episode_info={})
    seeded = dataclasses.replace(data, episode_info={"seed": np.arange(3)})
    wrong = dataclasses.replace(data, episode_info={"seed": np.arange(3) + 100})
    initial = initial_achieved_goals(seeded)
    for e, goal in enumerate(initial):
        np.testing.assert_array_equal(goal, make_env(PANDA).reset(seed=e)[0]["achieved_goal"])
    assert initial_achieved_goals(wrong) == [None] * 3
    assert initial_achieved_goals(data) == [None] * 3
    for name, arrays, expected in (("seeded", seeded, 15), ("wrong", wrong, 12),
                                   ("none", data, 12)):
        path = save_trajectories(tmp_path / f"{name}.npz", arrays)
        model = GoalTD3BC(**TINY, **STAGE_COST, achieved_in_state=True,
                          pretrain_dataset=str(path), pretrain_updates=1)
        model._start_task(0)  # makes the buffer and writes the dataset's episodes into it
        assert len(model.buffer) == expected, name
        if name == "seeded":  # its first state: the observation, then the reset's flange
            first = model.buffer.states["observation"][0, 0]
            np.testing.assert_allclose(first[:14], seeded.observation[0], rtol=1e-6)
            np.testing.assert_allclose(first[14:], initial[0], rtol=1e-6)


def test_learners_read_the_achieved_goal_at_each_observation(tmp_path, random_dataset):
    """The format's achieved goal is the one after each action; a policy reading it acts on the
    one at its observation: the previous row's, the reset's at an episode's first step, and
    rows with neither are left out."""
    import dataclasses

    from diffto.data.trajectories import load_trajectories
    from diffto.learning.goal_off_policy import achieved_goal_at_observation

    data = load_trajectories(random_dataset(PANDA, tmp_path / "panda.npz", episodes=2, steps=4))
    view, dropped = achieved_goal_at_observation(data)
    assert dropped == 0 and len(view) == 8 and view.meta["achieved_goal_at"] == "observation"
    for e in range(2):
        rows = np.flatnonzero(data.episode == e)
        env = make_env(PANDA)
        obs, _ = env.reset(seed=e)
        np.testing.assert_array_equal(view.achieved_goal[rows[0]], obs["achieved_goal"])
        for t in range(1, 4):  # where the previous action led
            obs, *_ = env.step(data.action[rows[t - 1]])
            np.testing.assert_allclose(view.achieved_goal[rows[t]], obs["achieved_goal"])
        env.close()
    assert achieved_goal_at_observation(view) == (view, 0)  # already the learner's view
    from diffto.data.trajectories import merge_trajectories, save_trajectories

    with pytest.raises(ValueError, match="achieved_goal_at"):  # one kind of set per merge
        merge_trajectories([data, view], renumber=True)
    model = GoalTD3BC(**TINY, **STAGE_COST, achieved_in_state=True, pretrain_updates=1,
                      pretrain_dataset=str(save_trajectories(tmp_path / "view.npz", view)))
    with pytest.raises(ValueError, match="achieved_goal_at"):  # pre-training reads t+1
        model._start_task(0)
    gap = data.subset(np.arange(8) != 1)  # episode 0 loses its step 1: step 2 has no goal
    unseeded = dataclasses.replace(gap, episode_info={})  # first steps have none either
    view, dropped = achieved_goal_at_observation(unseeded)
    assert dropped == 3 and len(view) == 4
    pairs = sorted(zip(view.episode, view.timestep, strict=True))
    assert pairs == [(0, 3), (1, 1), (1, 2), (1, 3)]


@pytest.mark.parametrize("cls", [GoalTD3BC, GoalIQL])
def test_offline_pretraining_learns_the_data_and_resumes_without_repeating(cls, tmp_path,
                                                                           monkeypatch,
                                                                           random_dataset):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    data = random_dataset(PANDA, tmp_path / "panda.npz", episodes=3, steps=10)
    model = cls(**TINY, **STAGE_COST, pretrain_dataset=str(data), pretrain_updates=40,
                pretrain_actor=True, checkpoint_buffer=True)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model)
    assert model.offline_actor is not None and model.history[0]["env_steps"] == 0.0
    assert model.updates == 40 + 2 and model.env_steps == 20
    assert any(not torch.equal(model.offline_actor[k], v)  # the online updates moved it on
               for k, v in model.actor.state_dict().items())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = cls(**TINY, **STAGE_COST, pretrain_dataset=str(data), pretrain_updates=40,
                  pretrain_actor=True, checkpoint_buffer=True)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.updates == 42 + 2  # no second pre-training
    assert len(resumed.history) == 1 and resumed.env_steps == 40
    for k, v in model.offline_actor.items():
        torch.testing.assert_close(resumed.offline_actor[k], v)


def test_td3bc_residual_corrects_the_cloned_policy_within_its_bound(tmp_path, monkeypatch,
                                                                   random_dataset):
    """``residual_scale``: pre-training clones into the base, then online updates move the
    residual alone, and the policy stays within the bound of the cloned one (across a
    resume too)."""
    from diffto.learning.residual_actor import ResidualActor

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    data = random_dataset(PANDA, tmp_path / "panda.npz", episodes=3, steps=10)
    kwargs = dict(**TINY, **STAGE_COST, pretrain_dataset=str(data), pretrain_updates=20,
                  pretrain_actor=True, checkpoint_buffer=True, alpha_offline=0.0,
                  residual_scale=0.1, actor_lr=1e-2)

    def fit(model, steps, ckpt=None):
        trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(model, ckpt_path=ckpt)
        return trainer

    model = GoalTD3BC(**kwargs)
    assert isinstance(model.actor, ResidualActor) and not bool(model.actor.active)
    trainer = fit(model, 3)
    assert bool(model.actor.active) and bool(model.actor_target.active)
    assert model.actor_target.inputs is model.actor.inputs
    offline = model.offline_actor
    assert not bool(offline["active"])  # the report's offline row is the base alone
    for k, v in model.actor.base.state_dict().items():  # frozen online
        torch.testing.assert_close(v, offline[f"base.{k}"])
    # the residual's mean rows (zero at the start) learned
    assert model.actor.residual.net.head.weight[:model.action_dim].abs().sum() > 0
    obs, goal = torch.randn(64, model.state_dim), torch.rand(64, 3)
    with torch.no_grad():
        gap = (model.actor.mode(obs, goal) - model.actor.base.mode(obs, goal)).abs()
    assert 0 < gap.max() and torch.all(gap <= 0.1 * model.actor.half_range + 1e-6)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = GoalTD3BC(**kwargs)
    fit(resumed, 4, tmp_path / "last.ckpt")
    assert bool(resumed.actor.active) and bool(resumed.actor_target.active)
    assert resumed.updates == model.updates + 2
    for k, v in resumed.actor.base.state_dict().items():
        torch.testing.assert_close(v, offline[f"base.{k}"])
    with pytest.raises(ValueError, match="residual_scale needs pretrain_dataset"):
        GoalTD3BC(**TINY, residual_scale=0.1)
    with pytest.raises(ValueError, match="pretrain_updates > 0"):  # never activated otherwise
        GoalTD3BC(**{**kwargs, "pretrain_updates": 0})


def test_td3bc_without_its_q_term_clones_the_data():
    """With ``alpha = 0`` the actor's loss is behaviour cloning alone: 600 updates recover an
    expert's actions on held-out states (a broken actor update cannot)."""
    torch.manual_seed(0)
    model = GoalTD3BC(**{**TINY, "batch_size": 64, "actor_lr": 3e-3}, alpha=0.0, bc_weight=1.0)
    _attach_optimizer(model)
    W = torch.randn(7, model.state_dim + model.goal_dim) * 0.3

    def expert(obs, goal):
        return torch.tanh(torch.cat([obs, goal], -1) @ W.T)

    obs, goal = torch.randn(512, model.state_dim), torch.rand(512, 3)
    model._batch = lambda: {"observation": obs[idx], "next_observation": obs[idx],
                            "action": expert(obs[idx], goal[idx]), "goal": goal[idx],
                            "next_goal": goal[idx], "future_goal": goal[idx],
                            "desired_goal": goal[idx],
                            "terminal": torch.zeros(64, dtype=torch.bool)}
    for _ in range(600):
        idx = torch.randint(0, 512, (64,))  # the batch's rows
        model.update(last=False, lightning_step=False)
    test_obs, test_goal = torch.randn(256, model.state_dim), torch.rand(256, 3)
    with torch.no_grad():
        want = expert(test_obs, test_goal)
        err = (model.actor.mode(test_obs, test_goal) - want).abs().mean()
    assert err < 0.15 < 0.5 < want.abs().mean()  # far from what the zero action scores


# ----------------------------------------------------------------------------- configs
WHOLE_ACTOR = ["--model.init_args.residual_scale=null", "--model.init_args.alpha_offline=null",
               "--model.init_args.alpha_ramp_steps=0", "--model.init_args.actor_lr=3e-4",
               "--model.init_args.her_ratio=0.8"]  # the config's documented earlier settings


@pytest.mark.parametrize(("config", "extra"), [("panda_td3bc.yaml", []), ("panda_iql.yaml", []),
                                               ("panda_td3bc.yaml", WHOLE_ACTOR)])
def test_offline_to_online_configs_fast_dev_run(config, extra, tmp_path, monkeypatch,
                                                random_dataset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    data = random_dataset(PANDA, tmp_path / "panda.npz", episodes=2, steps=6)
    cli.main(["fit", "--config", config, "--trainer.fast_dev_run=true", *extra,
              f"--model.init_args.pretrain_dataset={data}",
              "--model.init_args.pretrain_updates=3", "--model.init_args.num_envs=2",
              "--model.init_args.env_steps_per_iteration=20",
              "--model.init_args.env_steps_per_update=10",
              "--model.init_args.batch_size=8", "--model.init_args.width=32",
              "--model.init_args.env_kwargs.max_episode_steps=10",
              "--model.init_args.to_expert_baseline=false",
              "--model.init_args.eval_episodes=1", "--model.init_args.report_episodes=1",
              "--model.init_args.video_episodes=0"])
    report = json.loads(next(tmp_path.glob("**/report.json")).read_text())
    assert {"final policy", "offline policy (pre-trained)"} <= set(report["results"])
    assert report["env_steps"] == 20
    assert np.isfinite(report["results"]["final policy"]["final_distance"])


# ----------------------------------------------------------------------------- network inputs
def test_goal_inputs_relative_goal_and_frozen_statistics():
    from diffto.learning.goal_inputs import GoalInputs

    torch.manual_seed(0)
    inputs = GoalInputs(5, 3, relative_goal_dims=3, normalize=True)
    obs, goal = torch.randn(400, 5) * 3 + 1, torch.rand(400, 3)
    obs[:, 0] = 2.0  # a constant feature keeps sigma = 1
    x = inputs.features(obs, goal)
    torch.testing.assert_close(x[:, 8:], goal - obs[:, 2:])
    torch.testing.assert_close(inputs(obs, goal), x)  # not fitted yet: raw features
    assert inputs.needs_fit
    inputs.fit(obs, goal)
    y = inputs(obs, goal)
    torch.testing.assert_close(y[:, 1:].mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[:, 1:].std(0), torch.ones(10), atol=1e-5, rtol=0)
    assert float(inputs.std[0]) == 1.0 and not inputs.needs_fit
    restored = GoalInputs(5, 3, relative_goal_dims=3, normalize=True)
    restored.load_state_dict(inputs.state_dict())  # checkpoints carry the statistics
    torch.testing.assert_close(restored(obs, goal), y)
    assert "mean" not in GoalInputs(5, 3).state_dict()  # unnormalized: no statistics stored
    with pytest.raises(ValueError, match="relative_goal_dims"):
        GoalInputs(2, 3, relative_goal_dims=3)


def test_one_set_of_inputs_for_actor_critics_and_target_actor(random_dataset, tmp_path,
                                                              goal_batch):
    torch.manual_seed(0)
    data = random_dataset(PANDA, tmp_path / "panda.npz", episodes=2, steps=6)
    model = GoalTD3BC(**TINY, achieved_in_state=True, relative_goal=True, normalize_inputs=True,
                      pretrain_dataset=str(data), pretrain_updates=2, pretrain_actor=True)
    assert model.state_dim == 14 + 3 and model.actor.inputs.out_dim == 17 + 3 + 3
    assert model.actor_target.inputs is model.actor.inputs
    _attach_optimizer(model)
    model._start_task(0)
    model.pretrain()  # the first update fits the statistics on the dataset's episodes
    assert bool(model.actor.inputs.fitted)
    batch = goal_batch(model, 8)
    batch["observation"][:, -3:] = batch["desired_goal"]  # at the goal: relative goal 0
    x = model.actor.inputs.features(batch["observation"], batch["desired_goal"])
    assert torch.all(x[:, -3:] == 0)
    obs = {"observation": np.zeros((1, 14)), "achieved_goal": np.ones((1, 3))}
    np.testing.assert_array_equal(model._states(obs)["observation"][0, 14:], np.ones(3))
    model.teardown("fit")
    with pytest.raises(ValueError, match="relative_goal"):
        GoalTD3BC(**TINY, relative_goal=True)


def test_zero_initialized_actor_acts_with_zeros():
    torch.manual_seed(0)
    model = GoalIQL(**TINY, zero_init_actor=True)
    action = model.act(np.random.default_rng(0).normal(size=(4, 14)), np.ones((4, 3)))
    assert action.shape == (4, 7) and np.all(action == 0.0)
    assert not np.all(GoalIQL(**TINY).act(np.ones((2, 14)), np.ones((2, 3))) == 0.0)


def test_residual_config_reports_the_base_alone_and_the_conditions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning"])
    cli.main(["fit", "--config", "panda_residual_mpc.yaml", "--trainer.fast_dev_run=true",
              "--model.init_args.num_envs=2", "--model.init_args.env_steps_per_iteration=20",
              "--model.init_args.env_steps_per_update=10", "--model.init_args.batch_size=8",
              "--model.init_args.width=32", "--model.init_args.env_kwargs.max_episode_steps=5",
              "--model.init_args.eval_env_kwargs.max_episode_steps=5",
              "--model.init_args.eval_episodes=1", "--model.init_args.report_episodes=2",
              "--model.init_args.video_episodes=0"])
    report = json.loads(next(tmp_path.glob("**/report.json")).read_text())
    rows = report["results"]
    assert {"final policy", "zero action", "final policy, nominal", "zero action, nominal",
            "final policy, safety filter", "zero action, safety filter"} <= set(rows)
    assert rows["final policy, safety filter"]["violations"] >= 0.0
    assert report["env_kwargs"]["payload_mass"] == [0.0, 3.0]  # trained from no mismatch up


def test_td3bc_can_clone_the_dataset_rows_alone(goal_batch, tmp_path, random_dataset):
    """bc_data='dataset': the behaviour-cloning term averages over the dataset's rows only, so
    the policy's own online actions do not pull it."""
    torch.manual_seed(0)
    path = random_dataset(PANDA, tmp_path / "panda.npz", episodes=2, steps=4)
    model = GoalTD3BC(**TINY, alpha=0.0, bc_weight=1.0, bc_anneal_steps=10, bc_data="dataset",
                      pretrain_dataset=str(path))
    batch = goal_batch(model)
    rows = torch.arange(64) % 4 == 0
    batch["from_dataset"] = rows
    goal = model.relabel(batch)
    loss, _ = model.actor_loss(batch)
    pi = model.actor.mode(batch["observation"], goal)
    torch.testing.assert_close(loss, ((pi - batch["action"])[rows] ** 2).mean())
    batch["from_dataset"] = torch.zeros(64, dtype=torch.bool)  # no dataset row: no pull
    assert float(model.actor_loss(batch)[0].detach()) == 0.0
    with pytest.raises(ValueError, match="bc_data"):
        GoalTD3BC(**TINY, bc_data="expert", pretrain_dataset=str(path))
    with pytest.raises(ValueError, match="bc_data='dataset' needs pretrain_dataset"):
        GoalTD3BC(**TINY, bc_data="dataset")
    with pytest.raises(ValueError, match="dataset_fraction"):
        GoalTD3BC(**TINY, dataset_fraction=0.5)


def test_dataset_episodes_longer_than_the_buffers_are_stored_in_pieces(tmp_path,
                                                                      random_dataset):
    import dataclasses

    from diffto.data.trajectories import load_trajectories, save_trajectories

    data = load_trajectories(random_dataset(PANDA, tmp_path / "panda.npz", episodes=2,
                                            steps=25))
    terminal = np.zeros(50, bool)
    terminal[24] = True  # the first episode ends in a terminal state
    path = save_trajectories(tmp_path / "terminal.npz",
                             dataclasses.replace(data, terminal=terminal))
    model = GoalTD3BC(**TINY, pretrain_dataset=str(path), pretrain_updates=1)  # 10-step slots
    try:
        model._start_task(0)
        buf = model.buffer
        assert len(buf) == 50
        np.testing.assert_array_equal(buf.length[:6], [10, 10, 5, 10, 10, 5])
        np.testing.assert_array_equal(buf.terminated[:6], [0, 0, 1, 0, 0, 0])  # its last piece
        assert buf.from_dataset[:6].all()
        # consecutive pieces share their boundary state
        np.testing.assert_array_equal(buf.states["observation"][0, 10],
                                      buf.states["observation"][1, 0])
    finally:
        model.teardown("fit")


def test_without_dataset_episodes_the_dataset_options_warn(tmp_path, random_dataset):
    path = random_dataset(PANDA, tmp_path / "panda.npz", episodes=2, steps=4)
    model = GoalTD3BC(**TINY, pretrain_dataset=str(path), dataset_fraction=0.5,
                      bc_data="dataset")
    try:
        model._start_task(0)
        model.buffer.from_dataset[:] = False  # as if newer episodes had taken their slots
        with pytest.warns(RuntimeWarning, match="dataset_fraction and bc_data='dataset' draw "
                                                "on nothing"):
            batch = model._batch()
        assert not batch["from_dataset"].any()
    finally:
        model.teardown("fit")
    for bad in (True, "half", 1.5):
        with pytest.raises(ValueError, match="dataset_fraction must be a number"):
            GoalTD3BC(**TINY, pretrain_dataset=str(path), dataset_fraction=bad)
    with pytest.raises(ValueError, match="a single task"):
        GoalTD3BC(**TINY, pretrain_dataset=str(path), dataset_fraction=0.5,
                  task_sequence=[{}, {}])


def test_td3bc_actor_can_maximize_a_pessimistic_ensemble_estimate(goal_batch):
    torch.manual_seed(0)
    model = GoalTD3BC(**TINY, alpha=2.5, bc_weight=0.0, bc_weight_final=0.0, num_critics=4,
                      actor_pessimism=1.5)
    assert len(model.q) == 4 and len(model.q_target) == 4
    batch = goal_batch(model)
    goal = model.relabel(batch)
    loss, _ = model.actor_loss(batch)
    pi = model.actor.mode(batch["observation"], goal)
    x = torch.cat([pi, batch["observation"], goal], -1)
    qs = torch.stack([net(x).squeeze(-1) for net in model.q])
    q = qs.mean(0) - 1.5 * qs.std(0)
    torch.testing.assert_close(loss, -2.5 / q.abs().mean() * q.mean())
    # every critic of the ensemble regresses on the same target: 4 terms in its loss
    torch.manual_seed(1)  # the same target policy smoothing noise in both
    critic_loss, _ = model.critic_loss(batch)
    torch.manual_seed(1)
    with torch.no_grad():
        target = model.clip_target(model.td_target(batch, goal, model.reward(batch, goal)))
    q_data = model.q_values(model.q, batch["observation"], batch["action"], goal)
    torch.testing.assert_close(critic_loss, ((q_data - target) ** 2).mean(-1).sum())
    model.reset_critic()
    assert len(model.q) == 4
