"""PPO: pure losses and returns, the observation normalizer, learning, checkpoints and resume."""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from diffto.learning.normalizer import RunningNormalizer
from diffto.learning.ppo import (
    PPO,
    approx_kl,
    discounted_returns,
    lr_factor,
    pg_loss,
    v_loss,
)

POINT_MASS_ID = "difftotest/PointMass-v0"


class PointMass(gym.Env):
    """1-D point mass that must move to a random goal: ``x ← x + 0.1 a``, reward ``−|x − g|``.

    Observation ``[x, g]``, action ``a ∈ [−1, 1]``, 25 steps then truncation. Staying put
    scores about −13.5 on average; a good policy reaches the goal in under 10 steps.
    """

    def __init__(self, horizon: int = 25) -> None:
        self.observation_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.horizon = horizon

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-1.0, 1.0))
        self.goal = float(self.np_random.uniform(-0.5, 0.5))
        self.t = 0
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        return np.array([self.x, self.goal], np.float32)

    def step(self, action):
        self.x = float(np.clip(self.x + 0.1 * float(np.asarray(action).reshape(-1)[0]), -2, 2))
        self.t += 1
        err = abs(self.x - self.goal)
        return self._obs(), -err, False, self.t >= self.horizon, {"pos_error": err}


if POINT_MASS_ID not in gym.registry:
    gym.register(POINT_MASS_ID, entry_point=PointMass)


def small_ppo(**overrides) -> PPO:
    kwargs = dict(
        env_id=POINT_MASS_ID, num_envs=8, vector_mode="sync", samples_per_iteration=1024,
        minibatch_size=256, actor_steps=10, critic_steps=10, actor_hidden=[32, 32],
        critic_hidden=[64, 64], init_std=0.3, actor_lr=3e-3, critic_lr=3e-3, gamma=0.95,
        eval_episodes=8, info_keys=["pos_error"],
    )
    kwargs.update(overrides)
    return PPO(**kwargs)


def quiet_trainer(max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, accelerator="cpu",
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def mean_eval_return(module: PPO, episodes: int = 16) -> float:
    env = PointMass()
    return float(np.mean([module.run_episode(env, seed=1000 + i)["ep_return"]
                          for i in range(episodes)]))


# ------------------------------------------------------------------------------ losses
@settings(max_examples=10)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 0.4))
def test_pg_loss_gradient_vanishes_exactly_where_the_ratio_is_clipped(seed, eps):
    g = torch.Generator().manual_seed(seed)
    B = 64
    old = torch.randn(B, generator=g, dtype=torch.float64)
    logprob = (old + 0.5 * torch.randn(B, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    out = pg_loss(logprob, old, adv, eps)
    out["loss_actor"].backward()
    ratio = (logprob - old).exp().detach()
    # clipped (no gradient) where the ratio left the trust region in the improving direction
    clipped = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
    expected = torch.where(clipped, torch.zeros_like(ratio), -adv * ratio / B)
    torch.testing.assert_close(logprob.grad, expected)
    outside = ((ratio - 1).abs() > eps).double().mean()
    torch.testing.assert_close(out["clip_fraction"], outside)


def test_pg_loss_inside_trust_region_is_the_plain_surrogate():
    old = torch.zeros(5, dtype=torch.float64)
    logprob = torch.log(torch.tensor([0.9, 0.95, 1.0, 1.05, 1.1], dtype=torch.float64))
    adv = torch.tensor([1.0, -2.0, 3.0, -1.0, 0.5], dtype=torch.float64)
    out = pg_loss(logprob, old, adv, 0.2)
    torch.testing.assert_close(out["loss_actor"], -(adv * logprob.exp()).mean())
    assert out["clip_fraction"] == 0


def test_pg_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logprob, old_logprob and advantages"):
        pg_loss(torch.zeros(3), torch.zeros(4), torch.zeros(3), 0.2)
    with pytest.raises(ValueError, match="clip_coef"):
        pg_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0)


def test_approx_kl_estimates_the_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400_000, generator=g, dtype=torch.float64)  # samples of π_old = N(0, 1)
    mu = 0.3
    old = torch.distributions.Normal(0.0, 1.0).log_prob(a)
    new = torch.distributions.Normal(mu, 1.0).log_prob(a)
    kl = approx_kl(new - old)
    assert abs(kl.item() - mu**2 / 2) < 3e-3  # KL(N(0,1) ‖ N(μ,1)) = μ²/2
    assert approx_kl(torch.zeros(10)) == 0


def test_v_loss_value_and_explained_variance():
    ret = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    perfect = v_loss(ret.clone(), ret)
    assert perfect["loss_critic"] == 0 and perfect["explained_variance"] == 1
    const = v_loss(torch.full_like(ret, ret.mean().item()), ret)
    torch.testing.assert_close(const["loss_critic"], 0.5 * ((ret - ret.mean()) ** 2).mean())
    torch.testing.assert_close(const["explained_variance"], torch.tensor(0.0, dtype=ret.dtype))
    with pytest.raises(ValueError, match="values and returns"):
        v_loss(torch.zeros(3), torch.zeros(3, 1))


# ------------------------------------------------------------------------------ returns
def test_truncation_bootstraps_and_termination_does_not():
    gamma = 0.9
    r = torch.ones(3, 1, dtype=torch.float64)
    v = torch.zeros(3, 1, dtype=torch.float64)
    final_v = torch.tensor([[0.0], [10.0], [0.0]], dtype=torch.float64)
    nxt = torch.tensor([5.0], dtype=torch.float64)
    end_at_1 = torch.tensor([[False], [True], [False]])
    never = torch.zeros(3, 1, dtype=torch.bool)
    _, ret_trunc = discounted_returns(r, v, never, end_at_1, final_v, nxt, gamma)
    _, ret_term = discounted_returns(r, v, end_at_1, never, final_v, nxt, gamma)
    # after the boundary (t = 2) both continue into the bootstrap of the next state
    assert ret_trunc[2, 0] == ret_term[2, 0] == 1 + gamma * 5.0
    # at the boundary: truncation adds γ V(s_final), termination adds nothing
    assert ret_trunc[1, 0] == 1 + gamma * 10.0
    assert ret_term[1, 0] == 1.0
    # nothing flows back across the boundary from the next episode
    assert ret_trunc[0, 0] == 1 + gamma * ret_trunc[1, 0]
    assert ret_term[0, 0] == 1 + gamma * 1.0


def _brute_force_returns(r, term, trunc, final_v, nxt, gamma):
    """Σ_k γ^k r̃_{t+k} up to the episode's end, plus the right bootstrap: O(T²) per env."""
    T, E = r.shape
    out = np.zeros((T, E))
    for e in range(E):
        for t in range(T):
            total, disc = 0.0, 1.0
            for k in range(t, T):
                total += disc * r[k, e]
                if term[k, e]:
                    break
                if trunc[k, e]:
                    total += disc * gamma * final_v[k, e]
                    break
                disc *= gamma
            else:
                total += disc * nxt[e]
            out[t, e] = total
    return out


@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(1, 3), st.floats(0.5, 1.0))
def test_discounted_returns_match_brute_force_and_gae_lambda_one(seed, T, E, gamma):
    rng = np.random.default_rng(seed)
    r, v = rng.normal(size=(T, E)), rng.normal(size=(T, E))
    term, trunc = rng.random((T, E)) < 0.2, rng.random((T, E)) < 0.2
    final_v, nxt = rng.normal(size=(T, E)), rng.normal(size=E)
    t64 = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    args = (t64(r), t64(v), torch.as_tensor(term), torch.as_tensor(trunc), t64(final_v),
            t64(nxt), gamma)
    adv, ret = discounted_returns(*args)
    # a step both terminated and truncated is terminal
    expected = _brute_force_returns(r, term, trunc & ~term, final_v, nxt, gamma)
    np.testing.assert_allclose(ret.numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(adv.numpy(), expected - v, rtol=1e-10, atol=1e-10)
    adv1, ret1 = discounted_returns(*args, gae_lambda=1.0)
    torch.testing.assert_close(adv1, adv)
    torch.testing.assert_close(ret1, ret)
    # GAE(0) is the one-step TD error
    adv0, _ = discounted_returns(*args, gae_lambda=0.0)
    done = term | trunc
    v_next = np.vstack([v[1:], nxt[None]])
    boot = np.where(trunc & ~term, final_v, 0.0)
    td = r + gamma * boot + gamma * (~done) * v_next - v
    np.testing.assert_allclose(adv0.numpy(), td, rtol=1e-10, atol=1e-10)


def test_discounted_returns_rejects_bad_shapes():
    z = torch.zeros(4, 2)
    b = torch.zeros(4, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"next_value must have shape \(2,\)"):
        discounted_returns(z, z, b, b, z, torch.zeros(3), 0.99)
    with pytest.raises(ValueError, match=r"values must have shape \(4, 2\)"):
        discounted_returns(z, torch.zeros(4, 3), b, b, z, torch.zeros(2), 0.99)
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(z, z, b, b, z, torch.zeros(2), 1.5)


# ------------------------------------------------------------------------------ normalizer
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_normalizer_running_stats_equal_full_batch_stats(seed, sizes):
    rng = np.random.default_rng(seed)
    batches = [rng.normal(3.0, 2.0, size=(n, 3)) for n in sizes]
    norm = RunningNormalizer(3, clip=None)
    for b in batches:
        norm.update(torch.as_tensor(b, dtype=torch.float32))
    full = np.concatenate(batches).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(norm.mean.numpy(), full.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(norm.var.numpy(), full.var(0), rtol=1e-9, atol=1e-9)
    assert norm.count.item() == len(full)
    x = torch.as_tensor(full[:5])
    expected = (full[:5] - full.mean(0)) / np.sqrt(full.var(0) + norm.eps)
    np.testing.assert_allclose(norm(x).numpy(), expected, rtol=1e-8)


def test_normalizer_frozen_state_dict_and_errors():
    norm = RunningNormalizer((2,), clip=1.0)
    norm.update(torch.tensor([[0.0, 10.0], [2.0, 30.0]]))
    assert {"mean", "var", "count"} <= set(norm.state_dict())
    before = norm.state_dict()["mean"].clone()
    norm.frozen = True
    norm.update(torch.tensor([[100.0, 100.0]]))
    torch.testing.assert_close(norm.mean, before)
    assert norm(torch.tensor([[1e6, -1e6]])).abs().max() == 1.0  # clipped
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 2\)"):
        norm(torch.zeros(3, 3))
    norm.frozen = False
    with pytest.raises(ValueError, match="NaN"):
        norm.update(torch.tensor([[float("nan"), 0.0]]))


# ------------------------------------------------------------------------------ module
def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="num_envs"):
        small_ppo(num_envs=0)
    with pytest.raises(ValueError, match="vector_mode"):
        small_ppo(vector_mode="threads")
    with pytest.raises(ValueError, match="init_std"):
        small_ppo(init_std=0.0)
    with pytest.raises(ValueError, match="flat Box action"):
        PPO(env_id="CartPole-v1", vector_mode="sync")


def test_ppo_learns_to_reach_the_goal():
    """30 iterations of 1,024 samples. The untrained policy (≈ zero action) scores ≈ −13;
    a sign error in the advantage, the ratio or the returns cannot get above −4."""
    L.seed_everything(0)
    module = small_ppo()
    before = mean_eval_return(module)
    quiet_trainer(30).fit(module)
    after = mean_eval_return(module)
    assert before < -8.0, before
    assert after > -4.0, (before, after)


def test_global_step_counts_iterations_and_manual_updates(tmp_path):
    L.seed_everything(1)
    module = small_ppo(samples_per_iteration=64, minibatch_size=32, actor_steps=3,
                       critic_steps=5)
    trainer = quiet_trainer(2)
    trainer.fit(module)
    assert trainer.global_step == 2
    opt = module.optimizers().optimizer
    steps = {g["name"]: int(opt.state[g["params"][0]]["step"]) for g in opt.param_groups}
    # actor updated actor_steps times per iteration, critic critic_steps times
    assert steps == {"actor": 2 * 3, "critic": 2 * 5}
    # the normalizer saw every collected observation (64 per iteration)
    assert module.normalizer.count.item() == 2 * 64


def test_checkpoint_carries_the_normalizer_and_resumes(tmp_path):
    L.seed_everything(2)
    # Checkpoints are written after validation (every 2 iterations here), as in the configs:
    # with manual optimization Lightning's every_n_train_steps path warns on every save.
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = small_ppo(samples_per_iteration=64, minibatch_size=32, actor_steps=2,
                       critic_steps=2, eval_episodes=1)
    val = dict(limit_val_batches=None, val_check_interval=2, check_val_every_n_epoch=None)
    quiet_trainer(2, enable_checkpointing=True, callbacks=[ckpt], **val).fit(module)
    last = tmp_path / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 2
    for key in ("normalizer.mean", "normalizer.var", "normalizer.count"):
        torch.testing.assert_close(state["state_dict"][key], module.state_dict()[key])
    assert state["state_dict"]["normalizer.count"].item() == 2 * 64

    loaded = PPO.load_from_checkpoint(last)
    obs = torch.randn(5, 2)
    torch.testing.assert_close(loaded(obs), module(obs))

    resumed = small_ppo(samples_per_iteration=64, minibatch_size=32, actor_steps=2,
                        critic_steps=2, eval_episodes=1)
    trainer = quiet_trainer(4, enable_checkpointing=True,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], **val)
    with warnings.catch_warnings():  # resuming into the same folder is the point here
        warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
        trainer.fit(resumed, ckpt_path=str(last))
    assert trainer.global_step == 4
    # statistics continued from the checkpoint, they did not restart
    assert resumed.normalizer.count.item() == 4 * 64
    assert torch.load(last, weights_only=False)["global_step"] == 4


def test_validation_logs_deterministic_episode_metrics():
    L.seed_everything(3)
    # 256 samples = 32 steps per env: every env finishes one 25-step episode
    module = small_ppo(samples_per_iteration=256, minibatch_size=64, eval_episodes=2)
    trainer = quiet_trainer(1, limit_val_batches=None, val_check_interval=1,
                            check_val_every_n_epoch=None)
    trainer.fit(module)
    metrics = trainer.callback_metrics
    assert {"val/ep_return", "val/ep_length", "val/pos_error", "val/pos_rmse"} <= set(metrics)
    assert metrics["val/ep_length"] == 25
    # deterministic: the same episodes give the same return again
    env = PointMass()
    again = np.mean([module.run_episode(env, seed=i)["ep_return"] for i in range(2)])
    assert math.isclose(float(metrics["val/ep_return"]), again, rel_tol=1e-5)
    logged = trainer.logged_metrics
    assert {"train/loss_actor", "train/loss_critic", "train/approx_kl", "charts/sps",
            "rollout/ep_return", "rollout/pos_error"} <= set(logged)


def test_target_kl_stops_actor_updates_but_not_the_critic_or_the_step_count():
    L.seed_everything(4)
    module = small_ppo(samples_per_iteration=64, minibatch_size=16, actor_steps=6,
                       critic_steps=6, target_kl=1e-12, actor_lr=1e-2)
    trainer = quiet_trainer(2)
    trainer.fit(module)
    assert trainer.global_step == 2
    opt = module.optimizers().optimizer
    steps = {g["name"]: int(opt.state[g["params"][0]]["step"]) for g in opt.param_groups}
    # the first update (KL 0) and the one that crossed the threshold, per iteration
    assert steps == {"actor": 2 * 2, "critic": 2 * 6}


def test_float64_training_keeps_float64_everywhere():
    L.seed_everything(5)
    module = small_ppo(samples_per_iteration=64, minibatch_size=32, actor_steps=2,
                       critic_steps=2)
    quiet_trainer(1, precision="64-true").fit(module)
    assert module.actor[0].weight.dtype == torch.float64
    assert module.action_low.dtype == torch.float64
    action = module.act(np.zeros(2, dtype=np.float32))
    assert action.dtype == np.float64 and action.shape == (1,)


# ------------------------------------------------------------------------------ pieces
def _opt_steps(module: PPO) -> dict[str, int]:
    """Adam's step count per parameter group (0 where it never stepped)."""
    opt = module.optimizers().optimizer
    return {g["name"]: int(opt.state[g["params"][0]]["step"]) if g["params"][0] in opt.state
            else 0 for g in opt.param_groups}


def test_compute_advantages_of_a_collected_rollout_match_brute_force_returns():
    """The rollout's plumbing into the returns: truncations (25-step episodes in 32 steps per
    env) bootstrap with ``V(s_final)``, the rollout's end with ``V(s_T)``."""
    L.seed_everything(6)
    module = small_ppo(samples_per_iteration=256, gamma=0.9)
    module.setup("fit")
    try:
        module.on_train_start()
        roll = module.collect_rollout()
    finally:
        module.teardown("fit")
    adv, ret = module.compute_advantages(roll)
    T, E = module.steps_per_env, module.hparams.num_envs
    assert adv.shape == ret.shape == (T, E)
    assert roll["truncated"].any()
    np64 = lambda x: x.double().numpy()  # noqa: E731
    expected = _brute_force_returns(np64(roll["rewards"]), roll["terminated"].numpy(),
                                    roll["truncated"].numpy(), np64(roll["final_values"]),
                                    np64(roll["next_value"]), 0.9)
    np.testing.assert_allclose(ret.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adv, ret - roll["values"])


def _synthetic_rollout(module: PPO, T: int = 8, E: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(T, E, module.obs_dim, generator=g)
    actions = torch.randn(T, E, module.act_dim, generator=g)
    with torch.no_grad():
        logprob = module.distribution(obs).log_prob(actions).sum(-1)
    return {"obs": obs, "actions": actions, "logprob": logprob,
            "advantages": torch.randn(T, E, generator=g), "returns": torch.randn(T, E, generator=g)}


def test_update_on_a_synthetic_rollout_steps_only_the_active_networks():
    L.seed_everything(7)
    module = small_ppo(samples_per_iteration=64, minibatch_size=16, actor_steps=2,
                       critic_steps=3)
    quiet_trainer(1).fit(module)  # attaches the trainer and optimizer (and fills Adam's state)
    assert _opt_steps(module) == {"actor": 2, "critic": 3}
    rollout = _synthetic_rollout(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}

    stats = module.update(rollout)
    assert set(stats) == {"loss_actor", "approx_kl", "clip_fraction", "loss_critic",
                          "explained_variance"}
    assert _opt_steps(module) == {"actor": 4, "critic": 6}
    for name in ("actor.0.weight", "critic.0.weight"):
        assert not torch.equal(module.state_dict()[name], before[name]), name

    # An inactive actor enters the backward (for DDP) with weight 0; its zero gradient is
    # dropped, so Adam's momentum from earlier steps does not move it.
    module.hparams.actor_steps = 0
    actor = {k: v.clone() for k, v in module.actor.state_dict().items()}
    stats = module.update(rollout)
    assert set(stats) == {"loss_critic", "explained_variance"}
    assert _opt_steps(module) == {"actor": 4, "critic": 9}
    for k, v in module.actor.state_dict().items():
        torch.testing.assert_close(v, actor[k], rtol=0, atol=0)


# ------------------------------------------------------------------------------ defaults
def test_generic_defaults_log_no_task_keys():
    """Nothing of the Go2 by default: no info keys, only the return in the progress bar."""
    L.seed_everything(8)
    module = PPO(env_id="Pendulum-v1", num_envs=2, vector_mode="sync",
                 samples_per_iteration=400, minibatch_size=200, actor_steps=1, critic_steps=1,
                 actor_hidden=[8], critic_hidden=[8])
    assert module.info_keys == [] and module.progress_bar_keys == ["rollout/ep_return"]
    trainer = quiet_trainer(1)
    trainer.fit(module)  # 200 steps per env: each finishes one Pendulum episode
    logged = set(trainer.logged_metrics)
    assert "rollout/ep_return" in logged
    assert not any(k.endswith("_error") for k in logged), logged
    assert set(trainer.progress_bar_metrics) == {"rollout/ep_return"}


def test_progress_bar_keys_come_from_the_arguments():
    L.seed_everything(9)
    module = small_ppo(samples_per_iteration=256, minibatch_size=64,
                       progress_bar_keys=["rollout/pos_error", "train/loss_critic"])
    trainer = quiet_trainer(1)
    trainer.fit(module)
    assert set(trainer.progress_bar_metrics) == {"rollout/pos_error", "train/loss_critic"}


def test_progress_bar_keys_that_are_never_logged_are_refused_by_name():
    # a rollout/ key needs its info key: refused before any environment steps
    with pytest.raises(ValueError, match="'rollout/joint_eror'.*info_keys"):
        small_ppo(progress_bar_keys=["rollout/joint_eror"])
    with pytest.raises(ValueError, match="'val/ep_return'"):
        small_ppo(progress_bar_keys=["val/ep_return"])
    # a misspelt train/ name is known after the first iteration
    L.seed_everything(9)
    module = small_ppo(samples_per_iteration=256, minibatch_size=64,
                       progress_bar_keys=["train/loss_critc"])
    with pytest.raises(ValueError, match=r"\['train/loss_critc'\] are not logged.*loss_critic"):
        quiet_trainer(1).fit(module)


# ------------------------------------------------------------------------------ lr schedule
def test_lr_factor_linear_from_full_rate_to_the_last_iteration():
    assert lr_factor("constant", 7, 10) == 1.0
    assert lr_factor("linear", 0, 10) == 1.0
    assert lr_factor("linear", 5, 10) == 0.5
    assert lr_factor("linear", 9, 10) == pytest.approx(0.1)  # the last iteration still learns
    assert lr_factor("linear", 12, 10) == 0.0
    with pytest.raises(ValueError, match="trainer.max_steps"):
        lr_factor("linear", 0, -1)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor("cosine", 0, 10)
    with pytest.raises(ValueError, match="lr_schedule"):
        small_ppo(lr_schedule="cosine")


class _RecordLR(Callback):
    """The learning rates each iteration ran with, by group name."""

    def __init__(self) -> None:
        self.lrs: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = pl_module.optimizers().optimizer
        self.lrs.append({g["name"]: g["lr"] for g in opt.param_groups})


def test_linear_lr_schedule_anneals_both_groups_and_resumes_from_global_step(tmp_path):
    L.seed_everything(10)
    args = dict(samples_per_iteration=64, minibatch_size=32, actor_steps=1, critic_steps=1,
                eval_episodes=1, lr_schedule="linear", actor_lr=1e-3, critic_lr=4e-3)
    val = dict(limit_val_batches=None, val_check_interval=2, check_val_every_n_epoch=None)

    record = _RecordLR()
    module = small_ppo(**args)
    trainer = quiet_trainer(4, callbacks=[record])
    trainer.fit(module)
    factors = [1.0, 0.75, 0.5, 0.25]
    assert record.lrs == [{"actor": 1e-3 * f, "critic": 4e-3 * f} for f in factors]
    assert trainer.logged_metrics["charts/lr_actor"].item() == pytest.approx(0.25e-3)

    # 2 iterations, a checkpoint, then a new process's trainer resumes to 4: the factor comes
    # from the restored global_step, not from a count kept by the module
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(2, enable_checkpointing=True, callbacks=[ckpt], **val).fit(small_ppo(**args))
    record = _RecordLR()
    trainer = quiet_trainer(4, enable_checkpointing=True, callbacks=[
        record, ModelCheckpoint(dirpath=tmp_path, save_last=True)], **val)
    with warnings.catch_warnings():  # resuming into the same folder is the point here
        warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
        trainer.fit(small_ppo(**args), ckpt_path=str(tmp_path / "last.ckpt"))
    assert record.lrs == [{"actor": 1e-3 * f, "critic": 4e-3 * f} for f in (0.5, 0.25)]


def test_linear_lr_schedule_needs_max_steps():
    module = small_ppo(samples_per_iteration=64, minibatch_size=32, lr_schedule="linear")
    with pytest.raises(ValueError, match="trainer.max_steps"):
        quiet_trainer(-1, max_epochs=1).fit(module)


def test_a_checkpoint_of_another_observation_width_is_refused_by_name(tmp_path):
    """A Go2 policy trained on the 30-D observation, loaded with today's 39-D defaults."""
    from diffto.tasks.go2 import model as go2_model
    from diffto.tasks.go2.reference import ReferenceTrajectory

    n, home = 5, go2_model.HOME_QPOS
    zeros = np.zeros((n + 1, 3))
    reference = ReferenceTrajectory(
        body_pos=np.tile(home[:3], (n + 1, 1)), body_vel=zeros, body_euler=zeros,
        body_ang_vel=zeros, joint_pos=np.tile(home[7:], (n + 1, 1)), joint_vel=np.zeros((n, 12)),
        grf=np.tile([0.0, 0.0, go2_model.TOTAL_MASS * 9.81 / 4], (n, 4)),
        contact=np.ones((n, 4), bool)).save(tmp_path / "stand.npz")
    old = PPO("diffto/Go2Tracking-v0", env_kwargs={
        "reference": str(reference), "observe_base_velocity": False,
        "observe_position_error": False})
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": dict(old.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    with pytest.raises(ValueError, match=r"39-D observations.*observe_position_error: false"):
        PPO.load_from_checkpoint(path, env_kwargs={"reference": str(reference)})
    assert PPO.load_from_checkpoint(path).obs_dim == 30  # with its own settings it loads
