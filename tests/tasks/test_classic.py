"""Classic systems: shapes, energy conservation, integrators, parameter gradients, analytic
Jacobians against autograd, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffto.tasks.classic.cartpole import CartPole
from diffto.tasks.classic.pendulum import Pendulum, integrate, integrate_jacobians, rollout

SYSTEMS = {
    "pendulum": lambda **kw: Pendulum(**kw),
    "cartpole": lambda **kw: CartPole(**kw),
}
LEARNABLE = {"pendulum": ("mass", "length", "damping"), "cartpole": ("cart_mass", "pole_mass",
                                                                   "pole_length", "friction")}


def _states(name: str, B: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    n = 2 if name == "pendulum" else 4
    return (torch.rand(B, n, generator=gen, dtype=dtype) - 0.5) * 2.0


@pytest.mark.parametrize("name", list(SYSTEMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_shapes_and_dtype(name, dtype):
    sys_ = SYSTEMS[name]()
    x = _states(name, 5, torch.Generator().manual_seed(0), dtype)
    u = torch.zeros(5, 1, dtype=dtype)
    x_next = sys_(x, u)
    assert x_next.shape == x.shape and x_next.dtype == dtype
    xs = sys_.rollout(x, torch.zeros(5, 7, 1, dtype=dtype))
    assert xs.shape == (5, 8, x.shape[1])
    assert torch.equal(xs[:, 0], x)
    assert torch.allclose(xs[:, 1], x_next)


@pytest.mark.parametrize("name", list(SYSTEMS))
@given(seed=st.integers(0, 2**16))
@settings(max_examples=2)
def test_energy_conserved_without_input(name, seed):
    """RK4 with a small step keeps T + V constant over 1.5 s of free motion."""
    sys_ = SYSTEMS[name](dt=0.005)
    x = _states(name, 4, torch.Generator().manual_seed(seed))
    e0 = sys_.energy(x)
    xs = rollout(sys_, x, torch.zeros(4, 300, 1, dtype=torch.float64))
    drift = (sys_.energy(xs) - e0[:, None]).abs().max()
    assert drift < 1e-7, f"max energy drift {drift:.3g}"
    # the motion is not trivial: the state did change
    assert (xs[:, -1] - x).abs().max() > 1e-2


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_damping_and_input_change_energy(name):
    """Friction removes energy; pushing along the velocity adds it (checks the signs)."""
    kw = {"damping": 0.5} if name == "pendulum" else {"friction": 0.5}
    damped = SYSTEMS[name](dt=0.01, **kw)
    x = _states(name, 3, torch.Generator().manual_seed(1))
    x[:, -1] = 1.0  # nonzero velocity
    if name == "cartpole":
        x[:, 2] = 1.0
    xs = rollout(damped, x, torch.zeros(3, 50, 1, dtype=torch.float64))
    assert (damped.energy(xs[:, -1]) < damped.energy(x) - 1e-3).all()
    free = SYSTEMS[name](dt=0.01)
    vel = x[:, -1:] if name == "pendulum" else x[:, 2:3]
    x1 = free(x, 2.0 * torch.sign(vel))
    assert (free.energy(x1) > free.energy(x)).all()


def test_pendulum_small_angle_period():
    """Small oscillations about the hanging position have period 2π √(l/g)."""
    pend = Pendulum(dt=0.002, length=0.7)
    x = torch.tensor([[math.pi - 0.01, 0.0]], dtype=torch.float64)
    xs = rollout(pend, x, torch.zeros(1, 1100, 1, dtype=torch.float64))
    phase = xs[0, :, 0] - math.pi
    crossings = torch.nonzero((phase[:-1] < 0) & (phase[1:] >= 0)).flatten()
    period = (crossings[1] - crossings[0]).item() * pend.dt
    assert abs(period - 2 * math.pi * math.sqrt(0.7 / 9.81)) < 5e-3


def test_semi_implicit_euler_is_first_order_and_bounded():
    """Semi-implicit Euler tracks RK4 to O(dt) and keeps energy bounded (symplectic)."""
    x = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    u = torch.zeros(1, 800, 1, dtype=torch.float64)
    ref = rollout(Pendulum(dt=0.0025), x, u)[:, ::4]
    errs = []
    for dt, steps in ((0.01, 200), (0.005, 400)):
        sie = Pendulum(dt=dt, integrator="semi_implicit_euler")
        xs = rollout(sie, x, u[:, :steps])[:, :: int(round(0.01 / dt))]
        errs.append((xs - ref).abs().max().item())
        energy = sie.energy(xs)
        assert ((energy - energy[:, :1]).abs() / energy[:, :1].abs()).max() < 0.05
    assert 1.5 < errs[0] / errs[1] < 2.5, f"errors {errs} do not halve with dt"


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_gradients_reach_learnable_parameters(name):
    """Finite differences of a rollout loss w.r.t. each learnable physical parameter."""
    sys_ = SYSTEMS[name](dt=0.05, learnable=LEARNABLE[name]).double()
    x = _states(name, 3, torch.Generator().manual_seed(2))
    u = torch.randn(3, 10, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (rollout(sys_, x, u) ** 2).sum()

    params = dict(sys_.named_parameters())
    assert set(params) == set(LEARNABLE[name])
    grads = torch.autograd.grad(loss(), list(params.values()))
    for (pname, p), g in zip(params.items(), grads, strict=True):
        h = 1e-6
        with torch.no_grad():
            p += h
            up = loss()
            p -= 2 * h
            down = loss()
            p += h
        fd = (up - down) / (2 * h)
        assert abs(g - fd) <= 1e-5 * (1 + abs(fd)), f"{pname}: autograd {g}, fd {fd}"
        assert abs(g) > 1e-6, f"{pname}: zero gradient"
    # non-learnable parameters are buffers, not trained
    assert "gravity" in dict(sys_.named_buffers())


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_gradcheck_state_and_control(name):
    sys_ = SYSTEMS[name]().double()
    x = _states(name, 2, torch.Generator().manual_seed(4)).requires_grad_()
    u = torch.randn(2, 1, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(sys_, (x, u))


def test_to_device_and_dtype_moves_buffers():
    pend = Pendulum(learnable=("mass",)).to("cpu", torch.float64)
    assert pend.mass.dtype == torch.float64 and pend.gravity.dtype == torch.float64
    x = torch.zeros(1, 2, dtype=torch.float32)
    assert pend(x, torch.zeros(1, 1)).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mass": 0.0}, "mass"),
        ({"length": -1.0}, "length"),
        ({"damping": -0.1}, "damping"),
        ({"dt": 0.0}, "dt"),
        ({"integrator": "euler"}, "integrator"),
        ({"learnable": ("mass", "spring")}, "learnable"),
    ],
)
def test_pendulum_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Pendulum(**kwargs)


def test_cartpole_bad_construction():
    with pytest.raises(ValueError, match="pole_length"):
        CartPole(pole_length=0.0)
    with pytest.raises(ValueError, match="friction"):
        CartPole(friction=-1.0)


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_bad_step_input_raises(name):
    sys_ = SYSTEMS[name]()
    n = sys_.n_state
    with pytest.raises(ValueError, match=rf"x must have shape \(B, {n}\)"):
        sys_(torch.zeros(3, n + 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"u must have shape \(B, 1\)"):
        sys_(torch.zeros(3, n), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="batch"):
        sys_(torch.zeros(3, n), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="integrator"):
        integrate(sys_.derivative, torch.zeros(3, n), torch.zeros(3, 1), 0.1, "leapfrog")


# ------------------------------------------------------------------------------ Jacobians
def _jac_setup(name, integrator, learnable, seed, N=5, dtype=torch.float64):
    """A system with randomized (learnable) parameters and random rows ``x (N, n)``,
    ``u (N, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"integrator": integrator, "dt": 0.02 + 0.08 * torch.rand(1, generator=gen).item()}
    if name == "pendulum":
        kw["damping"] = 0.3
    else:
        kw["friction"] = 0.4
    sys_ = SYSTEMS[name](learnable=LEARNABLE[name] if learnable else (), **kw).to(dtype)
    with torch.no_grad():
        for p in sys_.parameters():  # away from the defaults, still physical
            p.mul_(0.5 + torch.rand((), generator=gen, dtype=dtype))
    x = 3.0 * _states(name, N, gen, dtype)
    u = 4.0 * torch.randn(N, 1, generator=gen, dtype=dtype)
    return sys_, x, u


def _autograd_jacobians(sys_, x, u, create_graph=False):
    """Reference ``A (N, n, n)``, ``B (N, n, m)`` by autograd of the step, row by row."""
    A, B = torch.autograd.functional.jacobian(
        lambda xx, uu: sys_(xx, uu).sum(0), (x, u), create_graph=create_graph, vectorize=True
    )  # (n, N, n), (n, N, m): rows are independent, so summing over them loses nothing
    return A.transpose(0, 1), B.transpose(0, 1)


INTEGRATORS = ["rk4", "semi_implicit_euler"]


@pytest.mark.parametrize("name", list(SYSTEMS))
@pytest.mark.parametrize("integrator", INTEGRATORS)
@given(seed=st.integers(0, 2**16), N=st.integers(1, 6))
@settings(max_examples=5, deadline=None)
def test_jacobians_match_autograd(name, integrator, seed, N):
    sys_, x, u = _jac_setup(name, integrator, True, seed, N)
    A, B = sys_.jacobians(x, u)
    n = x.shape[1]
    assert A.shape == (N, n, n) and B.shape == (N, n, 1)
    A_ref, B_ref = _autograd_jacobians(sys_, x, u)
    err = max((A - A_ref).abs().max().item(), (B - B_ref).abs().max().item())
    assert err < 1e-10, f"max |analytic − autograd| = {err:.3g}"
    # against torch.func as well (the path the layers take without `jacobians`)
    A_f, B_f = torch.func.vmap(
        torch.func.jacrev(lambda xx, uu: sys_(xx[None], uu[None])[0], argnums=(0, 1))
    )(x, u)
    assert torch.allclose(A, A_f, rtol=0, atol=1e-10)
    assert torch.allclose(B, B_f, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(SYSTEMS))
@pytest.mark.parametrize("integrator", INTEGRATORS)
def test_jacobians_second_derivatives_match_autograd(name, integrator):
    """Autograd through ``jacobians`` gives the dynamics curvature: ``∂(λᵀ[A B])/∂(x, u)``
    equals the Hessian of ``λᵀ x_next`` from autograd of the step, and the derivatives of
    ``A``, ``B`` w.r.t. the learnable parameters equal autograd's."""
    sys_, x, u = _jac_setup(name, integrator, True, seed=7, N=4)
    x.requires_grad_()
    u.requires_grad_()
    gen = torch.Generator().manual_seed(8)
    W_A = torch.randn(x.shape[0], x.shape[1], x.shape[1], generator=gen, dtype=x.dtype)
    W_B = torch.randn(x.shape[0], x.shape[1], 1, generator=gen, dtype=x.dtype)
    params = list(sys_.parameters())
    inputs = [x, u, *params]

    A, B = sys_.jacobians(x, u)
    # (semi-implicit Euler's Jacobians do not depend on u: a zero, not a missing, gradient)
    got = torch.autograd.grad((W_A * A).sum() + (W_B * B).sum(), inputs, allow_unused=True,
                              materialize_grads=True)
    A_ref, B_ref = _autograd_jacobians(sys_, x, u, create_graph=True)
    want = torch.autograd.grad((W_A * A_ref).sum() + (W_B * B_ref).sum(), inputs,
                               allow_unused=True, materialize_grads=True)
    for label, g, w in zip(["x", "u", *LEARNABLE[name]], got, want, strict=True):
        err = (g - w).abs().max().item()
        assert err < 1e-10, f"d/d{label}: max |analytic − autograd| = {err:.3g}"
    assert got[0].abs().max() > 1e-3, "no curvature in x: the check would be empty"


@pytest.mark.parametrize("name", list(SYSTEMS))
@pytest.mark.parametrize("integrator", INTEGRATORS)
def test_jacobians_float32_and_batched_shapes(name, integrator):
    sys64, x, u = _jac_setup(name, integrator, False, seed=3, N=6)
    A64, B64 = sys64.jacobians(x, u)
    sys32 = sys64.float()
    A32, B32 = sys32.jacobians(x.float(), u.float())
    assert A32.dtype == B32.dtype == torch.float32
    assert torch.allclose(A32.double(), A64, rtol=1e-5, atol=1e-5)
    assert torch.allclose(B32.double(), B64, rtol=1e-5, atol=1e-5)
    # float32 inputs against float64 parameters: cast inside, like the step itself
    A_mixed, _ = sys64.jacobians(x.float(), u.float())
    assert A_mixed.dtype == torch.float32
    # rows are independent: one row alone gives that row of the batch
    A1, B1 = sys64.jacobians(x[2:3], u[2:3])
    assert torch.allclose(A1[0], A64[2], rtol=0, atol=1e-14)
    assert torch.allclose(B1[0], B64[2], rtol=0, atol=1e-14)
    A0, B0 = sys64.jacobians(x[:0], u[:0])
    assert A0.shape == (0, x.shape[1], x.shape[1]) and B0.shape == (0, x.shape[1], 1)


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_jacobians_bad_input_raises(name):
    sys_ = SYSTEMS[name]()
    n = sys_.n_state
    with pytest.raises(ValueError, match=rf"x must have shape \(B, {n}\)"):
        sys_.jacobians(torch.zeros(3, n + 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"u must have shape \(B, 1\)"):
        sys_.jacobians(torch.zeros(3, n), torch.zeros(3, 1, 1))
    with pytest.raises(ValueError, match="integrator"):
        integrate_jacobians(sys_.derivative_jacobians, torch.zeros(3, n), torch.zeros(3, 1),
                            0.1, "leapfrog")
