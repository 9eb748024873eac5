"""One problem, every backend: plans and gradients agree across LQR, MPC, QPMPC, TheseusTO and
CasadiTO, called the same way.

Tolerances are per backend, from what each solver promises: LQR is exact (Riccati); MPC,
TheseusTO and CasADi/IPOPT (``tol=1e-10``) solve to near machine precision, so plans agree to
1e-7 and gradients to 1e-6 (relative); QPMPC goes through cvxpylayers/Clarabel (interior point,
default tolerances) with diffcp's dense derivative, measured here at ~1e-5, so it gets 1e-4 on
plans and 1e-3 on gradients.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diffto.costs import LeastSquaresCost, NonlinearCost
from diffto.layers.casadi_to import CasadiTO
from diffto.layers.lqr import LQR
from diffto.layers.mpc import MPC
from diffto.layers.qp import QPMPC
from diffto.layers.theseus import TheseusTO
from diffto.problem import LinearDynamics, QuadraticCost
from diffto.testing import random_lq, small_lq_dims

D = torch.float64
DT = 0.1
PLAN_TOL = {"MPC": 1e-7, "TheseusTO": 1e-7, "CasadiTO": 1e-7, "QPMPC": 1e-4}
GRAD_TOL = {"MPC": 1e-6, "TheseusTO": 1e-6, "CasadiTO": 1e-6, "QPMPC": 1e-3}


def plan_and_grads(solve, x0, C, c, C_f, c_f, seed_u):
    """Solve, then differentiate ``Σ u·seed + Σ cost`` w.r.t. ``x0``, ``C`` and ``c``."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (x0, C, c)]
    sol = solve(inputs[0], QuadraticCost(inputs[1], inputs[2], C_f, c_f))
    loss = (sol.u.nan_to_num() * seed_u).sum() + sol.cost.nan_to_num().sum()
    return sol, torch.autograd.grad(loss, inputs)


def assert_agree(name, sol, grads, ref, ref_grads, rows=None, plan_tol=None, grad_tol=None):
    rows = slice(None) if rows is None else rows
    plan_tol = PLAN_TOL[name] if plan_tol is None else plan_tol
    grad_tol = GRAD_TOL[name] if grad_tol is None else grad_tol
    err = (sol.u[rows] - ref.u[rows]).abs().max().item()
    assert err < plan_tol * (1 + ref.u[rows].abs().max().item()), f"{name} plan: {err:.2e}"
    err = (sol.x[rows] - ref.x[rows]).abs().max().item()
    assert err < plan_tol * (1 + ref.x[rows].abs().max().item()), f"{name} states: {err:.2e}"
    for arg, a, b in zip(("x0", "C", "c"), grads, ref_grads, strict=True):
        if arg == "C":  # only C's symmetric part is defined; backends split it differently
            a, b = 0.5 * (a + a.transpose(-1, -2)), 0.5 * (b + b.transpose(-1, -2))
        err = (a[rows] - b[rows]).abs().max().item()
        scale = 1 + b[rows].abs().max().item()
        assert err < grad_tol * scale, f"{name} d/d{arg}: max diff {err:.2e} (scale {scale:.2g})"


@settings(max_examples=3)
@given(**small_lq_dims())
def test_unconstrained_lq_all_backends_agree(seed, B, T, n, m):
    x0, C, c, C_f, c_f, F, f = random_lq(seed, B, T, n, m)
    dyn = LinearDynamics(F, f)
    seed_u = torch.randn(B, T, m, generator=torch.Generator().manual_seed(seed), dtype=D)
    backends = {
        "MPC": lambda x0, cost: MPC(dyn, T)(x0, cost),
        "QPMPC": lambda x0, cost: QPMPC(T, n, m)(x0, cost, dyn),
        "TheseusTO": lambda x0, cost: TheseusTO(dyn, T)(x0, cost),
        "CasadiTO": lambda x0, cost: CasadiTO(None, T, n, m)(x0, cost, dyn),
    }
    ref, ref_grads = plan_and_grads(
        lambda x0, cost: LQR()(x0, cost, dyn), x0, C, c, C_f, c_f, seed_u
    )
    for name, solve in backends.items():
        sol, grads = plan_and_grads(solve, x0, C, c, C_f, c_f, seed_u)
        assert sol.converged.all(), f"{name}: {sol.converged}"
        assert_agree(name, sol, grads, ref, ref_grads)


@settings(max_examples=3)
@given(seed=st.integers(0, 2**16), bound=st.floats(0.2, 0.8))
def test_box_constrained_mpc_qpmpc_casadi_agree(seed, bound):
    B, T, n, m = 3, 5, 3, 2
    x0, C, c, C_f, c_f, F, f = random_lq(seed, B, T, n, m)
    dyn = LinearDynamics(F, f)
    seed_u = torch.randn(B, T, m, generator=torch.Generator().manual_seed(seed), dtype=D)
    mpc = MPC(dyn, T, u_lower=-bound, u_upper=bound)
    ref, ref_grads = plan_and_grads(mpc, x0, C, c, C_f, c_f, seed_u)
    assert ref.converged.all()
    assert ((ref.u.abs() - bound).abs() < 1e-7).any(), "test needs active bounds"
    qp = QPMPC(T, n, m, u_lower=-bound, u_upper=bound)
    sol, grads = plan_and_grads(lambda x0, cost: qp(x0, cost, dyn), x0, C, c, C_f, c_f, seed_u)
    assert sol.converged.all()
    assert_agree("QPMPC", sol, grads, ref, ref_grads)
    nlp = CasadiTO(None, T, n, m, u_lower=-bound, u_upper=bound)
    sol, grads = plan_and_grads(lambda x0, cost: nlp(x0, cost, dyn), x0, C, c, C_f, c_f, seed_u)
    assert sol.converged.all()
    # IPOPT stops 1e-8-ish inside an active bound, which bounds the plan agreement here
    assert_agree("CasadiTO", sol, grads, ref, ref_grads, plan_tol=1e-6, grad_tol=1e-5)
    for key in ("active_lower", "active_upper"):
        assert torch.equal(sol.extras[key], ref.extras[key]), key
    torch.testing.assert_close(sol.extras["costates"], ref.extras["costates"], atol=1e-6,
                               rtol=1e-6)


@settings(max_examples=3)
@given(seed=st.integers(0, 2**16))
def test_state_bounds_qpmpc_casadi_agree(seed):
    """State bounds can make a row infeasible: both must flag the same rows, and agree on the
    others."""
    B, T, n, m = 3, 5, 3, 2
    x0, C, c, C_f, c_f, F, f = random_lq(seed, B, T, n, m)
    x0 = 0.3 * x0
    dyn = LinearDynamics(F, f)
    seed_u = torch.randn(B, T, m, generator=torch.Generator().manual_seed(seed), dtype=D)
    qp = QPMPC(T, n, m, x_lower=-0.5, x_upper=0.5)
    ref, ref_grads = plan_and_grads(lambda x0, cost: qp(x0, cost, dyn), x0, C, c, C_f, c_f, seed_u)
    nlp = CasadiTO(None, T, n, m, x_lower=-0.5, x_upper=0.5)
    sol, grads = plan_and_grads(lambda x0, cost: nlp(x0, cost, dyn), x0, C, c, C_f, c_f, seed_u)
    assert sol.converged.tolist() == ref.converged.tolist(), (sol.extras, ref.extras)
    ok = ref.converged
    if ok.any():
        assert_agree("QPMPC", sol, grads, ref, ref_grads, rows=ok)


def test_state_bounds_active_case():
    """A fixed seed where the state bounds are active and every row is feasible, so the
    comparison above is known to exercise active state constraints."""
    B, T, n, m = 3, 5, 3, 2
    x0, C, c, C_f, c_f, F, f = random_lq(0, B, T, n, m)
    dyn = LinearDynamics(F, f)
    seed_u = torch.ones(B, T, m, dtype=D)
    qp = QPMPC(T, n, m, x_lower=-0.5, x_upper=0.5)
    ref, ref_grads = plan_and_grads(
        lambda x0, cost: qp(x0, cost, dyn), 0.3 * x0, C, c, C_f, c_f, seed_u
    )
    nlp = CasadiTO(None, T, n, m, x_lower=-0.5, x_upper=0.5)
    sol, grads = plan_and_grads(
        lambda x0, cost: nlp(x0, cost, dyn), 0.3 * x0, C, c, C_f, c_f, seed_u
    )
    assert ref.converged.all() and sol.converged.all()
    assert ((sol.x[:, 1:].abs() - 0.5).abs() < 1e-7).sum() >= 3, "test needs active bounds"
    assert_agree("QPMPC", sol, grads, ref, ref_grads)


class Pendulum(nn.Module):
    def forward(self, x, u):
        th, om = x[..., 0], x[..., 1]
        return torch.stack(
            [th + DT * om, om + DT * (-9.81 * torch.sin(th) + u[..., 0] - 0.1 * om)], -1
        )


def pendulum_ca(x, u):
    import casadi as ca

    return ca.vertcat(x[0] + DT * x[1], x[1] + DT * (-9.81 * ca.sin(x[0]) + u[0] - 0.1 * x[1]))


@pytest.mark.parametrize("bounded", [False, True])
def test_nonlinear_pendulum_backends_agree(bounded):
    """MPC (iLQR), TheseusTO (Gauss-Newton, shooting) and CasADi/IPOPT on a swing-up."""
    T = 8
    x0 = torch.tensor([[0.3, -0.2], [-0.5, 0.4]], dtype=D)
    C = torch.diag(torch.tensor([1.0, 0.1, 0.05], dtype=D)).expand(T, 3, 3)
    c = -C[..., :2, :2] @ torch.tensor([math.pi, 0.0], dtype=D)
    c = torch.cat([c, torch.zeros(T, 1, dtype=D)], -1)
    C_f = 10 * torch.diag(torch.tensor([1.0, 0.1], dtype=D))
    c_f = -C_f @ torch.tensor([math.pi, 0.0], dtype=D)
    seed_u = torch.ones(2, T, 1, dtype=D)
    lo, hi = (-3.0, 3.0) if bounded else (None, None)
    mpc = MPC(Pendulum(), T, u_lower=lo, u_upper=hi, max_iter=100)
    ref, ref_grads = plan_and_grads(mpc, x0, C, c, C_f, c_f, seed_u)
    assert ref.converged.all()
    if bounded:
        assert ((ref.u.abs() - 3).abs() < 1e-7).any(), "test needs active bounds"
    nlp = CasadiTO(pendulum_ca, T, 2, 1, u_lower=lo, u_upper=hi)
    sol, grads = plan_and_grads(nlp, x0, C, c, C_f, c_f, seed_u)
    assert sol.converged.all()
    assert_agree("CasadiTO", sol, grads, ref, ref_grads, plan_tol=1e-6, grad_tol=1e-5)
    if not bounded:  # Theseus has no inequality constraints
        th = TheseusTO(Pendulum(), T, max_iter=100)
        sol, grads = plan_and_grads(th, x0, C, c, C_f, c_f, seed_u)
        assert sol.converged.all()
        # Gauss-Newton stops at a stationarity of ~1e-7 on this nonzero-residual problem
        assert_agree("TheseusTO", sol, grads, ref, ref_grads, plan_tol=1e-5, grad_tol=1e-4)


def test_bound_gradients_mpc_casadi_agree():
    """Gradients w.r.t. control bounds (tensors that require grad): iLQR's KKT backward and
    CasADi's bound sensitivities."""
    B, T, n, m = 2, 5, 3, 2
    x0, C, c, C_f, c_f, F, f = random_lq(11, B, T, n, m)
    dyn = LinearDynamics(F, f)
    cost = QuadraticCost(C, 2 * c, C_f, c_f)
    grads = []
    for backend in ("MPC", "CasadiTO"):
        lo = torch.full((T, m), -0.4, dtype=D, requires_grad=True)
        hi = torch.full((T, m), 0.4, dtype=D, requires_grad=True)
        if backend == "MPC":
            sol = MPC(dyn, T, u_lower=lo, u_upper=hi)(x0, cost)
        else:
            sol = CasadiTO(None, T, n, m, u_lower=lo, u_upper=hi)(x0, cost, dyn)
        assert sol.converged.all()
        grads.append((sol.u, *torch.autograd.grad((sol.u.square()).sum(), [lo, hi])))
    u_mpc, lo_mpc, hi_mpc = grads[0]
    assert ((u_mpc.abs() - 0.4).abs() < 1e-7).sum() >= 2, "test needs active bounds"
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert lo_mpc.abs().sum() + hi_mpc.abs().sum() > 1e-3


def test_solvers_swap_by_class_name():
    """Every layer is built from its dynamics and horizon and called as
    ``layer(x0, cost, dynamics=None, u_init=None)``: dynamics fixed at construction or given
    per call (the call's wins), ``u_init`` accepted everywhere, none anywhere a ValueError
    naming ``dynamics``; plans and costates agree, whichever class is used."""
    B, T, n, m = 2, 4, 3, 2
    x0, C, c, C_f, c_f, F, f = random_lq(5, B, T, n, m)
    cost, dyn = QuadraticCost(C, c, C_f, c_f), LinearDynamics(F, f)
    other = LinearDynamics(F, f + 1.0)
    u_init = torch.full((B, T, m), 0.1, dtype=D)
    layers = {
        LQR: lambda d: LQR(d),
        MPC: lambda d: MPC(d, T),
        QPMPC: lambda d: QPMPC(T, n, m, dynamics=d),
        TheseusTO: lambda d: TheseusTO(d, T),
        CasadiTO: lambda d: CasadiTO(d, T, n, m),
    }
    ref = LQR(dyn)(x0, cost)
    for cls, build in layers.items():
        tol = PLAN_TOL.get(cls.__name__, 1e-9)
        for sol in (build(dyn)(x0, cost), build(other)(x0, cost, dyn, u_init)):
            assert sol.converged.all(), cls.__name__
            for got, want, what in ((sol.u, ref.u, "u"),
                                    (sol.extras["costates"], ref.extras["costates"], "costates")):
                err = (got - want).abs().max().item()
                scale = 1 + want.abs().max().item()
                assert err < tol * scale, f"{cls.__name__} {what}: {err:.2e}"
        with pytest.raises(ValueError, match="dynamics"):
            build(None)(x0, cost)


# A 2-link planar arm (link lengths 1 and 0.8) under double-integrator joint dynamics,
# state [q1, q2, q̇1, q̇2], control the joint accelerations; the goal is an end-effector
# position, reached through the forward kinematics written in torch.
ARM_T = 10


def arm_dynamics() -> LinearDynamics:
    A = torch.eye(4, dtype=D)
    A[:2, 2:] = DT * torch.eye(2, dtype=D)
    B = torch.zeros(4, 2, dtype=D)
    B[2:] = DT * torch.eye(2, dtype=D)
    return LinearDynamics.time_invariant(A, B, ARM_T)


def arm_fk(q):
    """End-effector position ``(..., 2)`` of joint angles ``q (..., 2)``."""
    a, b = q[..., 0], q[..., 0] + q[..., 1]
    return torch.stack([torch.cos(a) + 0.8 * torch.cos(b), torch.sin(a) + 0.8 * torch.sin(b)], -1)


def ee_costs(goal):
    """The same end-effector cost as a NonlinearCost and as a LeastSquaresCost; ``goal (B, 2)``
    is closed over."""
    nonlinear = NonlinearCost(
        lambda x, u: 0.5 * (arm_fk(x[..., :2]) - goal[:, None]).square().sum(-1)
        + 0.05 * x[..., 2:].square().sum(-1) + 0.005 * u.square().sum(-1),
        lambda xT: 5 * (arm_fk(xT[:, :2]) - goal).square().sum(-1)
        + 0.5 * xT[:, 2:].square().sum(-1),
    )
    least_squares = LeastSquaresCost(
        lambda x, u: torch.cat(
            [arm_fk(x[..., :2]) - goal[:, None], 0.1**0.5 * x[..., 2:], 0.1 * u], -1),
        lambda xT: torch.cat([10**0.5 * (arm_fk(xT[:, :2]) - goal), xT[:, 2:]], -1),
    )
    return nonlinear, least_squares


@pytest.mark.parametrize("bounded", [False, True])
def test_end_effector_goal_mpc_casadi_theseus_agree(bounded):
    """The end-effector goal through torch FK: MPC (box-DDP) with the NonlinearCost against
    CasadiTO (IPOPT through the torch callback) and, unbounded, TheseusTO with the
    LeastSquaresCost: plans and gradients w.r.t. the goal and x0 agree (measured against MPC:
    CasadiTO plans within 6e-7 at max |u| 14, gradients within 8e-6 at gradient scale 60-100;
    TheseusTO 2e-6 and 4e-5; set by MPC's and Gauss-Newton's stopping tests)."""
    x0 = torch.tensor([[0.3, 0.5, 0.0, 0.0], [-0.2, 1.0, 0.1, -0.1]], dtype=D)
    goal = torch.tensor([[0.9, 0.9], [-0.5, 1.2]], dtype=D)
    dyn = arm_dynamics()
    lo, hi = (-2.0, 2.0) if bounded else (None, None)
    solvers = {
        "MPC": (MPC(dyn, ARM_T, u_lower=lo, u_upper=hi, max_iter=100), 0),
        "CasadiTO": (CasadiTO(dyn, ARM_T, u_lower=lo, u_upper=hi), 0 if bounded else 1),
    }
    if not bounded:
        solvers["TheseusTO"] = (TheseusTO(dyn, ARM_T, max_iter=100), 1)
    out = {}
    for name, (layer, which) in solvers.items():
        g, x = goal.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        sol = layer(x, ee_costs(g)[which])
        assert sol.converged.all(), name
        out[name] = (sol, torch.autograd.grad(sol.u.square().sum() + sol.x.sum(), [g, x]))
    ref, ref_grads = out.pop("MPC")
    if bounded:
        assert ((ref.u.abs() - 2).abs() < 1e-7).sum() >= 2, "test needs active bounds"
    for name, (sol, grads) in out.items():
        err = (sol.u - ref.u).abs().max().item()
        assert err < 1e-6 * (1 + ref.u.abs().max().item()), f"{name} plan: {err:.2e}"
        for arg, a, b in zip(("goal", "x0"), grads, ref_grads, strict=True):
            err = (a - b).abs().max().item()
            scale = 1 + b.abs().max().item()
            assert err < 1e-5 * scale, f"{name} d/d{arg}: {err:.2e} (scale {scale:.2g})"
