"""Tests of the diffusion action head: shapes, range, EMA bookkeeping, and that it learns
multimodal and conditional action distributions an MSE regressor cannot."""

import pytest
import torch

from diffto.learning.denoisers import MLPDenoiser, UNet1DDenoiser, timestep_embedding
from diffto.learning.diffusion import DiffusionActionHead

DENOISERS = ("mlp", "unet1d")
SMALL = dict(hidden=64, depth=2, unet_channels=(16, 32))


def _head(denoiser="mlp", cond_dim=3, action_dim=2, horizon=4, seed=0, **kwargs):
    """A small head; the seed fixes its initial weights and the training draws that follow."""
    torch.manual_seed(seed)
    return DiffusionActionHead(
        cond_dim=cond_dim,
        action_dim=action_dim,
        horizon=horizon,
        denoiser=denoiser,
        **{**SMALL, **kwargs},
    )


def _train(head, make_batch, steps, lr=2e-3):
    """Adam on head.loss over fresh batches; returns the per-step losses."""
    opt = torch.optim.Adam(head.denoiser.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        cond, actions = make_batch()
        loss = head.loss(cond, actions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        head.update_ema()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("denoiser", DENOISERS)
@pytest.mark.parametrize("horizon", [1, 5, 8])
def test_shapes_and_range(denoiser, horizon):
    head = _head(denoiser, horizon=horizon)
    cond = torch.randn(7, 3)
    loss = head.loss(cond, torch.rand(7, horizon, 2) * 2 - 1)
    assert loss.shape == () and torch.isfinite(loss)
    # An untrained denoiser predicts arbitrary noise; the samples must still be in the box.
    for use_ema in (True, False):
        x = head.sample(cond, use_ema=use_ema)
        assert x.shape == (7, horizon, 2)
        assert x.abs().max() <= 1.0


@pytest.mark.parametrize("denoiser", DENOISERS)
def test_denoisers_output_shape_and_depend_on_inputs(denoiser):
    cls = MLPDenoiser if denoiser == "mlp" else UNet1DDenoiser
    net = cls(cond_dim=3, action_dim=2, horizon=6)
    x, k, c = torch.randn(4, 6, 2), torch.tensor([0, 10, 50, 99]), torch.randn(4, 3)
    y = net(x, k, c)
    assert y.shape == (4, 6, 2)
    # FiLM starts at identity; perturb it so the condition path is live, then check that the
    # output reacts to each input.
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    y = net(x, k, c)
    assert not torch.allclose(y, net(x + 0.1, k, c))
    assert not torch.allclose(y, net(x, k + 7, c))
    assert not torch.allclose(y, net(x, k, c + 1.0))


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 3, 99]), 16)
    assert e.shape == (3, 16)
    assert torch.allclose(e[0, :8], torch.zeros(8)) and torch.allclose(e[0, 8:], torch.ones(8))
    with pytest.raises(ValueError, match="dim"):
        timestep_embedding(torch.tensor([1]), 7)


@pytest.mark.parametrize("denoiser", DENOISERS)
def test_loss_decreases(denoiser):
    head = _head(denoiser)
    target = torch.linspace(-0.8, 0.8, 8).view(1, 4, 2)

    def batch():
        return torch.randn(32, 3), target.expand(32, 4, 2)

    losses = _train(head, batch, steps=100)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)


# (denoiser, objective, optimizer steps, batch). The U-Net is trained on the clean-chunk
# objective: with these few steps it separates the modes sharply, while its ε-prediction
# still leaves about 7 % of the samples between them.
LEARNING_CASES = [
    ("mlp", "epsilon", 400, 256),
    ("mlp", "sample", 400, 256),
    ("unet1d", "sample", 300, 128),
]


def _near_mode(x, modes):
    """(B, T, 1) samples, (B,) or scalar mode -> (B,) whether the whole chunk is within 0.15."""
    return (x - torch.as_tensor(modes).view(-1, 1, 1)).abs().amax(dim=(1, 2)) < 0.15


@pytest.mark.parametrize("denoiser,prediction_type,steps,batch_size", LEARNING_CASES)
def test_learns_both_modes_of_a_bimodal_distribution(denoiser, prediction_type, steps, batch_size):
    """Actions ±0.7 with equal probability, condition uninformative. An MSE regressor predicts
    0 (no sample near a mode); a model collapsed onto one mode fails the 30-70 % split. A few
    samples that start at the boundary between the basins may end between the modes, hence
    95 % and not all."""
    head = _head(
        denoiser,
        cond_dim=1,
        action_dim=1,
        horizon=2,
        prediction_type=prediction_type,
        ema_decay=0.99,
    )

    def batch():
        sign = torch.randint(0, 2, (batch_size, 1, 1)) * 2.0 - 1.0
        return torch.zeros(batch_size, 1), 0.7 * sign.expand(batch_size, 2, 1)

    _train(head, batch, steps=steps)
    x = head.sample(torch.zeros(200, 1), generator=torch.Generator().manual_seed(1))
    upper, lower = _near_mode(x, 0.7), _near_mode(x, -0.7)
    assert (upper | lower).float().mean() >= 0.95, (upper | lower).float().mean()
    assert 0.3 <= upper.float().mean() <= 0.7, upper.float().mean()
    assert 0.3 <= lower.float().mean() <= 0.7, lower.float().mean()


@pytest.mark.parametrize("denoiser,prediction_type,steps,batch_size", LEARNING_CASES[::2])
def test_condition_selects_the_mode(denoiser, prediction_type, steps, batch_size):
    """cond = +1 -> actions +0.7, cond = -1 -> actions -0.7: samples follow their label (an
    unconditional model would put half of them on the wrong mode)."""
    head = _head(
        denoiser,
        cond_dim=1,
        action_dim=1,
        horizon=2,
        prediction_type=prediction_type,
        ema_decay=0.99,
    )

    def batch():
        label = torch.randint(0, 2, (batch_size, 1)) * 2.0 - 1.0
        return label, 0.7 * label[:, :, None].expand(batch_size, 2, 1)

    _train(head, batch, steps=steps // 2)
    label = torch.tensor([1.0, -1.0]).repeat(100)  # (200,)
    x = head.sample(label[:, None], generator=torch.Generator().manual_seed(2))
    assert _near_mode(x, 0.7 * label).float().mean() >= 0.95


@pytest.mark.parametrize("denoiser", DENOISERS)
def test_sampling_is_deterministic_given_a_generator(denoiser):
    head = _head(denoiser)
    cond = torch.randn(5, 3)
    a = head.sample(cond, generator=torch.Generator().manual_seed(3))
    b = head.sample(cond, generator=torch.Generator().manual_seed(3))
    c = head.sample(cond, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ema_warm_up_and_state_dict_round_trip():
    head = _head("mlp", ema_decay=0.9)
    ema_before = [p.clone() for p in head.ema_denoiser.parameters()]
    assert all(not p.requires_grad for p in head.ema_denoiser.parameters())
    for p in head.denoiser.parameters():
        p.data.add_(1.0)
    head.update_ema()
    # First update: d_0 = min(0.9, 1/10) = 0.1, so θ̄ = 0.1 θ̄ + 0.9 θ.
    for e_old, e_new, p in zip(
        ema_before, head.ema_denoiser.parameters(), head.denoiser.parameters(), strict=True
    ):
        assert torch.allclose(e_new, 0.1 * e_old + 0.9 * p, atol=1e-6)
    _train(head, lambda: (torch.randn(8, 3), torch.zeros(8, 4, 2)), steps=5)
    assert int(head.ema_updates) == 6

    state = head.state_dict()
    assert any(k.startswith("ema_denoiser.") for k in state) and "ema_updates" in state
    clone = _head("mlp", ema_decay=0.9)
    clone.load_state_dict(state)
    assert int(clone.ema_updates) == 6
    for a, b in zip(clone.ema_denoiser.parameters(), head.ema_denoiser.parameters(), strict=True):
        assert torch.equal(a, b)
    cond = torch.randn(4, 3)
    assert torch.equal(
        clone.sample(cond, generator=torch.Generator().manual_seed(0)),
        head.sample(cond, generator=torch.Generator().manual_seed(0)),
    )
    # The EMA weights are not the current ones, so sampling with them differs.
    assert not torch.equal(
        head.sample(cond, generator=torch.Generator().manual_seed(0), use_ema=False),
        head.sample(cond, generator=torch.Generator().manual_seed(0)),
    )


def test_ema_moves_with_to():
    head = _head("mlp").to(torch.float64)
    assert all(p.dtype == torch.float64 for p in head.ema_denoiser.parameters())
    x = head.sample(torch.randn(3, 3, dtype=torch.float64))
    assert x.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(cond_dim=-1), "cond_dim"),
        (dict(action_dim=0), "action_dim"),
        (dict(horizon=0), "horizon"),
        (dict(denoiser="transformer"), "denoiser"),
        (dict(hidden=0), "hidden"),
        (dict(depth=0), "depth"),
        (dict(denoiser="unet1d", unet_channels=()), "unet_channels"),
        (dict(train_steps=1), "train_steps"),
        (dict(inference_steps=0), "inference_steps"),
        (dict(train_steps=10, inference_steps=11), "inference_steps"),
        (dict(beta_schedule="cosine"), "beta_schedule"),
        (dict(prediction_type="v_prediction"), "prediction_type"),
        (dict(ema_decay=1.0), "ema_decay"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _head(**kwargs)


def test_bad_shapes_raise():
    head = _head("mlp")
    with pytest.raises(ValueError, match="cond"):
        head.loss(torch.randn(4, 2), torch.zeros(4, 4, 2))
    with pytest.raises(ValueError, match="actions"):
        head.loss(torch.randn(4, 3), torch.zeros(4, 5, 2))
    with pytest.raises(ValueError, match="cond"):
        head.sample(torch.randn(4))
