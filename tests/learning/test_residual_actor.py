"""The bounded residual over a frozen base actor: the base until activated, then never more
than its bound away from it, with gradients for the residual alone."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffto.learning.residual_actor import ResidualActor
from diffto.learning.tanh_gaussian_actor import TanhGaussianActor

LOW, HIGH = torch.tensor([-2.0, -1.0, 0.0]), torch.tensor([2.0, 3.0, 0.5])


def _actor(seed: int) -> TanhGaussianActor:
    torch.manual_seed(seed)
    return TanhGaussianActor(4, 2, 3, LOW, HIGH, width=16)


def _perturbed(actor: ResidualActor, seed: int, size: float) -> None:
    """Give the residual a far-from-zero mean head (as after long training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = actor.residual.net.head
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * size)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g) * size)


def test_inactive_is_the_base_and_activation_starts_at_the_base():
    base = _actor(0)
    actor = ResidualActor(base, _actor(1), scale=0.2)
    obs, goal = torch.randn(32, 4), torch.rand(32, 2)
    torch.testing.assert_close(actor.mode(obs, goal), base.mode(obs, goal))
    _perturbed(actor, 0, 3.0)
    torch.testing.assert_close(actor.mode(obs, goal), base.mode(obs, goal))  # still off
    assert actor.residual.inputs is base.inputs and actor.inputs is base.inputs
    fresh = ResidualActor(_actor(0), _actor(1), scale=0.2)
    fresh.activate()
    torch.testing.assert_close(fresh.mode(obs, goal), base.mode(obs, goal))  # residual at 0
    state = fresh.state_dict()
    assert bool(state["active"])
    reloaded = ResidualActor(_actor(0), _actor(1), scale=0.2)
    reloaded.load_state_dict(state)  # a checkpoint resumes in its phase
    assert bool(reloaded.active)


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(0.01, 1.0), seed=st.integers(0, 10_000), size=st.floats(0.1, 30.0))
def test_active_policy_stays_within_its_bound_of_the_base_and_in_the_box(scale, seed, size):
    base = _actor(seed)
    actor = ResidualActor(base, _actor(seed + 1), scale=scale)
    actor.activate()
    _perturbed(actor, seed, size)
    obs, goal = torch.randn(64, 4) * 3, torch.rand(64, 2)
    with torch.no_grad():
        for action in (actor.mode(obs, goal), actor(obs, goal)[0]):
            gap = (action - base.mode(obs, goal)).abs()
            assert torch.all(gap <= scale * base.half_range + 1e-5)
            assert torch.all(action >= LOW - 1e-6) and torch.all(action <= HIGH + 1e-6)


def test_gradients_reach_the_residual_alone_once_active():
    actor = ResidualActor(_actor(0), _actor(1), scale=0.3)
    obs, goal = torch.randn(16, 4), torch.rand(16, 2)
    actor.mode(obs, goal).sum().backward()
    assert all(p.grad is not None for p in actor.base.parameters())  # inactive: the base
    assert all(p.grad is None for p in actor.residual.parameters())
    actor.zero_grad(set_to_none=True)
    actor.activate()
    (actor.mode(obs, goal) ** 2).sum().backward()
    assert all(p.grad is None for p in actor.base.parameters())
    assert actor.residual.net.head.weight.grad.abs().sum() > 0


def test_sample_log_density_is_the_residuals_scaled():
    """Unclipped, ``a − π_b = β (a_r − center)`` for the residual actor's own sample ``a_r``
    drawn with the same noise, so ``log p(a) = log p_r(a_r) − A log β``."""
    base, residual = _actor(0), _actor(1)
    actor = ResidualActor(base, residual, scale=0.25)
    actor.activate()
    _perturbed(actor, 3, 0.05)  # small: no clip binds
    obs, goal = torch.randn(8, 4) * 0.1, torch.rand(8, 2)
    torch.manual_seed(5)
    action, log_prob = actor(obs, goal)
    torch.manual_seed(5)
    own, own_log_prob = residual(obs, goal)
    with torch.no_grad():
        expected = base.mode(obs, goal) + 0.25 * (own - residual.center)
    assert torch.all((expected > LOW) & (expected < HIGH))
    torch.testing.assert_close(action, expected)
    torch.testing.assert_close(log_prob, own_log_prob - 3 * math.log(0.25))


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        ResidualActor(_actor(0), _actor(1), scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        ResidualActor(_actor(0), _actor(1), scale=1.5)
    other = TanhGaussianActor(4, 2, 3, LOW * 2, HIGH, width=16)
    with pytest.raises(ValueError, match="same action box"):
        ResidualActor(_actor(0), other, scale=0.5)
