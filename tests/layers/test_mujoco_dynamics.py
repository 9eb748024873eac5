"""MujocoDynamics: steps against the analytic pendulum, finite-difference Jacobians against
the module's own steps and the analytic Jacobians, autograd, substeps, dtype/device paths,
failed rows and bad input; MPC over it against the analytic pendulum's MPC (plans, plan
gradients with the dropped dynamics curvature measured, failed rows)."""

import copy
import math
import pickle

import mujoco
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jacrev

from diffto.layers.mpc import MPC
from diffto.layers.mujoco_dynamics import MujocoDynamics
from diffto.problem import QuadraticCost
from diffto.tasks.classic.pendulum import Pendulum

# A pendulum hanging from a hinge about y: a body of mass M whose centre of mass sits L above
# the pivot at qpos = 0 (upright, as diffto's Pendulum's θ = 0), with rotational inertia J
# about its centre of mass. Gravity's torque about the pivot is M g L sin θ and the inertia is
# M L² + J, so it is exactly the point-mass pendulum m l² θ̈ = m g l sin θ − b θ̇ + τ with
# l = L + J / (M L) and m = M L / l (then m l = M L and m l² = M L² + J). MuJoCo's Euler
# integrator is semi-implicit Euler (v' = v + h a, q' = q + h v'); it treats joint damping
# implicitly unless eulerdamp is disabled, which makes it the textbook scheme.
M, L, J, DAMPING, H = 1.3, 0.7, 0.02, 0.15, 0.02
PENDULUM_XML = f"""
<mujoco model="pendulum">
  <option timestep="{H}" integrator="Euler" gravity="0 0 -9.81">
    <flag eulerdamp="disable"/>
  </option>
  <worldbody>
    <body name="pole">
      <joint name="hinge" type="hinge" axis="0 1 0" damping="{DAMPING}"/>
      <inertial pos="0 0 {L}" mass="{M}" diaginertia="{J} {J} {J}"/>
    </body>
  </worldbody>
  <actuator><motor name="torque" joint="hinge" gear="1"/></actuator>
</mujoco>
"""
EQUIVALENT_LENGTH = L + J / (M * L)
EQUIVALENT_MASS = M * L / EQUIVALENT_LENGTH

# Two links, two motors (one limited), damping and armature, implicitfast: a generic model.
ARM_XML = """
<mujoco model="arm">
  <option timestep="0.01" integrator="implicitfast"/>
  <worldbody>
    <body name="upper">
      <joint name="shoulder" axis="0 1 0" damping="0.3" armature="0.05"/>
      <geom type="capsule" fromto="0 0 0 0.4 0 0" size="0.04" mass="1.2"/>
      <body name="lower" pos="0.4 0 0">
        <joint name="elbow" axis="0 1 0" damping="0.2" armature="0.02"/>
        <geom type="capsule" fromto="0 0 0 0.3 0 0" size="0.03" mass="0.6"/>
      </body>
    </body>
  </worldbody>
  <actuator>
    <motor joint="shoulder" gear="2"/>
    <motor joint="elbow" ctrlrange="-3 3"/>
  </actuator>
</mujoco>
"""


def _pendulum(**kw) -> MujocoDynamics:
    return MujocoDynamics(mujoco.MjModel.from_xml_string(PENDULUM_XML), **kw)


def _analytic(dt: float = H) -> Pendulum:
    # Pendulum stores its parameters in the default dtype: build it in float64 so that they
    # are not rounded to float32 (1e-8 relative) before the comparison.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return Pendulum(dt=dt, mass=EQUIVALENT_MASS, length=EQUIVALENT_LENGTH, damping=DAMPING,
                        integrator="semi_implicit_euler")
    finally:
        torch.set_default_dtype(default)


def _arm(**kw) -> MujocoDynamics:
    return MujocoDynamics(mujoco.MjModel.from_xml_string(ARM_XML), **kw)


def _batch(dyn, N, seed, scale=1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(N, dyn.n_state, generator=gen, dtype=dtype) - 0.5) * 2 * scale
    u = (torch.rand(N, dyn.n_ctrl, generator=gen, dtype=dtype) - 0.5) * 2 * scale
    return x, u


@given(seed=st.integers(0, 10_000), substeps=st.integers(1, 4))
@settings(max_examples=10)
def test_pendulum_step_matches_semi_implicit_euler(seed, substeps):
    """One call = `substeps` semi-implicit Euler steps of the analytic twin, to rounding."""
    dyn = _pendulum(substeps=substeps)
    x, u = _batch(dyn, 16, seed, scale=3.0)
    ref = x
    for _ in range(substeps):
        ref = _analytic()(ref, u)
    err = (dyn(x, u) - ref).abs().max().item()
    assert err < 1e-12, f"max |MuJoCo - analytic| = {err:.3g}"
    assert dyn.dt == pytest.approx(substeps * H)


def test_pendulum_jacobians_match_analytic():
    """Centered differences with eps=1e-6 agree with the exact Jacobians to ~1e-9."""
    dyn = _pendulum(substeps=3)
    x, u = _batch(dyn, 8, 1, scale=3.0)
    A, B = dyn.jacobians(x, u)

    def three_steps(xx, uu):
        for _ in range(3):
            xx = _analytic()(xx.unsqueeze(0), uu.unsqueeze(0)).squeeze(0)
        return xx

    A_ref = torch.func.vmap(jacrev(three_steps, argnums=0))(x, u)
    B_ref = torch.func.vmap(jacrev(three_steps, argnums=1))(x, u)
    err = max((A - A_ref).abs().max().item(), (B - B_ref).abs().max().item())
    assert err < 1e-8, f"max Jacobian error {err:.3g}"


def _central_differences(dyn, x, u, step=1e-5):
    """Jacobians of the module's own forward by central differences (float64)."""
    N, n, m = x.shape[0], dyn.n_state, dyn.n_ctrl
    A, B = x.new_empty(N, n, n), x.new_empty(N, n, m)
    for j in range(n):
        e = torch.zeros_like(x)
        e[:, j] = step
        A[:, :, j] = (dyn(x + e, u) - dyn(x - e, u)) / (2 * step)
    for j in range(m):
        e = torch.zeros_like(u)
        e[:, j] = step
        B[:, :, j] = (dyn(x, u + e) - dyn(x, u - e)) / (2 * step)
    return A, B


@pytest.mark.parametrize("centered", [True, False])
@given(seed=st.integers(0, 10_000), substeps=st.integers(1, 3))
@settings(max_examples=5)
def test_arm_jacobians_match_differences_of_forward(centered, seed, substeps):
    dyn = _arm(substeps=substeps, centered=centered)
    x, u = _batch(dyn, 6, seed, scale=2.0)
    A, B = dyn.jacobians(x, u)
    A_fd, B_fd = _central_differences(dyn, x, u)
    # forward differences of MuJoCo carry an O(eps) truncation error
    tol = 1e-7 if centered else 1e-4
    err = max((A - A_fd).abs().max().item(), (B - B_fd).abs().max().item())
    assert err < tol * max(1.0, A_fd.abs().max().item()), f"max difference {err:.3g}"
    assert A.shape == (6, 4, 4) and B.shape == (6, 4, 2)


def test_substeps_chain_single_step_jacobians():
    """A = A_3 A_2 A_1 and B = A_3 A_2 B_1 + A_3 B_2 + B_3 along the path of one call."""
    one, three = _arm(), _arm(substeps=3)
    x, u = _batch(one, 5, 7, scale=2.0)
    xs = [x]
    for _ in range(3):
        xs.append(one(xs[-1], u))
    assert torch.allclose(three(x, u), xs[-1], rtol=0, atol=1e-13)
    A_ref = torch.eye(4, dtype=x.dtype).expand(5, 4, 4)
    B_ref = x.new_zeros(5, 4, 2)
    for k in range(3):
        A_k, B_k = one.jacobians(xs[k], u)
        A_ref, B_ref = A_k @ A_ref, A_k @ B_ref + B_k
    A, B = three.jacobians(x, u)
    assert torch.allclose(A, A_ref, rtol=0, atol=1e-12)
    assert torch.allclose(B, B_ref, rtol=0, atol=1e-12)


def test_autograd_through_forward_equals_jacobians():
    dyn = _arm(substeps=2)
    x, u = _batch(dyn, 4, 3)
    x.requires_grad_(True)
    u.requires_grad_(True)
    # gradcheck compares the backward's vector-Jacobian products with its own central
    # differences of forward; the tolerance is that of a finite difference of a finite
    # difference (eps 1e-6 on both sides).
    assert torch.autograd.gradcheck(dyn, (x, u), eps=1e-6, atol=1e-6, rtol=1e-5)
    g = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gx, gu = torch.autograd.grad(dyn(x, u), (x, u), g)
    A, B = dyn.jacobians(x, u)
    assert torch.allclose(gx, (g.unsqueeze(1) @ A).squeeze(1), rtol=0, atol=1e-14)
    assert torch.allclose(gu, (g.unsqueeze(1) @ B).squeeze(1), rtol=0, atol=1e-14)


def test_unrolled_rollout_gradient():
    """Autograd through a 10-step rollout of the pendulum equals the analytic rollout's."""
    dyn, ref = _pendulum(), _analytic()
    x0 = torch.tensor([[0.4, -0.3], [2.5, 1.0]], dtype=torch.float64, requires_grad=True)
    u = torch.linspace(-1, 1, 20, dtype=torch.float64).view(2, 10, 1).requires_grad_(True)
    grads = []
    for system in (dyn, ref):
        x = x0
        for t in range(10):
            x = system(x, u[:, t])
        grads.append(torch.autograd.grad((x**2).sum(), (x0, u)))
    for g_mj, g_ref in zip(*grads, strict=True):
        assert torch.allclose(g_mj, g_ref, rtol=1e-7, atol=1e-8)


def test_float32_and_to_paths():
    dyn = _arm().to("cpu").float()
    x, u = _batch(dyn, 3, 0, dtype=torch.float32)
    x.requires_grad_(True)
    out = dyn(x, u)
    assert out.dtype == torch.float32 and out.device == x.device and out.shape == (3, 4)
    out.sum().backward()
    assert x.grad.dtype == torch.float32
    A, B = dyn.jacobians(x, u.double())
    assert A.dtype == B.dtype == torch.float32
    # float64 inside: the float32 result is the rounded float64 one
    ref = _arm()(x.detach().double(), u.double())
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert dyn.u_lower.dtype == torch.float32  # buffers follow .float() and .to()
    assert "u_lower" not in dyn.state_dict()  # they follow from the model
    assert dyn(x[:0], u[:0]).shape == (0, 4)


def test_control_limits_and_flat_dynamics_outside_them():
    dyn = _arm()
    assert dyn.u_lower.tolist() == [-math.inf, -3.0]
    assert dyn.u_upper.tolist() == [math.inf, 3.0]
    x = torch.zeros(2, 4, dtype=torch.float64)
    u = torch.tensor([[0.5, 5.0], [0.5, 3.0 + 1e-3]], dtype=torch.float64)
    out = dyn(x, u)
    assert torch.equal(out[0], out[1])  # both clamped to 3
    _, B = dyn.jacobians(x, u)
    assert B[:, :, 1].abs().max() == 0 and B[:, :, 0].abs().min() > 0


def test_threads_match_calling_thread():
    x, u = _batch(_arm(), 9, 5, scale=2.0)
    serial, threaded = _arm(substeps=2), _arm(substeps=2, nthread=2)
    assert torch.equal(serial(x, u), threaded(x, u))
    for a, b in zip(serial.jacobians(x, u), threaded.jacobians(x, u), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("repeat", [1, 3])
def test_failed_rows_are_nan_and_do_not_touch_the_others(repeat):
    model = mujoco.MjModel.from_xml_string(PENDULUM_XML)
    model.body_mass[1] = 1e-6
    model.body_inertia[1] = 1e-9  # inertia ~1e-6: a torque of 1e5 gives qacc > mjMAXVAL
    dyn = MujocoDynamics(model, substeps=2)
    # rows: fine; qacc beyond mjMAXVAL; |qpos| beyond mjMAXVAL; fine; NaN state (a solver
    # steps a row that failed before); infinite control
    x = torch.tensor([[0.1, 0.0], [0.2, 0.0], [1e11, 0.0], [0.3, 0.1], [math.nan, 0.0],
                      [0.1, 0.0]], dtype=torch.float64)
    u = torch.tensor([[0.0], [1e5], [0.0], [1e-3], [0.0], [-math.inf]], dtype=torch.float64)
    x, u = x.repeat(repeat, 1), u.repeat(repeat, 1)
    failed = torch.tensor([False, True, True, False, True, True]).repeat(repeat)
    out = dyn(x, u)
    assert torch.isnan(out[failed]).all()
    assert torch.isfinite(out[~failed]).all()
    assert torch.equal(out[~failed], dyn(x[~failed], u[~failed]))
    A, B = dyn.jacobians(x, u)
    assert torch.isnan(A[failed]).all() and torch.isnan(B[failed]).all()
    assert torch.isfinite(A[~failed]).all() and torch.isfinite(B[~failed]).all()
    # the caller's model keeps automatic resets on; the module's copy has them off
    assert not model.opt.disableflags & int(mujoco.mjtDisableBit.mjDSBL_AUTORESET)


def test_rows_are_independent():
    """A batch gives the numbers of its rows called one at a time (no state carried over)."""
    dyn = _arm(substeps=3)
    x, u = _batch(dyn, 12, 2, scale=2.0)
    rows = torch.cat([dyn(x[i : i + 1], u[i : i + 1]) for i in range(12)])
    assert torch.equal(dyn(x, u), rows)
    A, B = dyn.jacobians(x, u)
    A_rows, B_rows = zip(*(dyn.jacobians(x[i : i + 1], u[i : i + 1]) for i in range(12)),
                         strict=True)
    assert torch.equal(A, torch.cat(A_rows)) and torch.equal(B, torch.cat(B_rows))


def test_copies_and_pickles():
    dyn = _arm(nthread=2)
    x, u = _batch(dyn, 3, 0)
    out = dyn(x, u)
    dyn.jacobians(x, u)  # thread pools now exist
    for clone in (copy.deepcopy(dyn), pickle.loads(pickle.dumps(dyn))):
        assert torch.equal(clone(x, u), out)


@pytest.mark.parametrize(
    ("x", "u", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 2), r"x must be a tensor of shape \(N, 4\)"),
        (torch.zeros(4), torch.zeros(1, 2), r"x must be a tensor of shape \(N, 4\)"),
        (np.zeros((2, 4)), torch.zeros(2, 2), "x must be a tensor"),
        (torch.zeros(2, 4), torch.zeros(2, 1), r"u must be a tensor of shape \(N, 2\)"),
        (torch.zeros(2, 4), torch.zeros(3, 2), "share the batch size"),
        (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 2), "x must be a floating"),
    ],
)
def test_bad_inputs(x, u, match):
    dyn = _arm()
    with pytest.raises(ValueError, match=match):
        dyn(x, u)
    with pytest.raises(ValueError, match=match):
        dyn.jacobians(x, u)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"substeps": 0}, "substeps"),
        ({"substeps": 1.5}, "substeps"),
        ({"eps": 0.0}, "eps"),
        ({"eps": math.nan}, "eps"),
        ({"nthread": -1}, "nthread"),
    ],
)
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        _arm(**kw)
    with pytest.raises(ValueError, match="model must be a mujoco.MjModel"):
        MujocoDynamics(ARM_XML)


@pytest.mark.parametrize(
    ("joint", "actuator", "match"),
    [
        ("<freejoint/>", '<motor joint="j"/>', "free"),
        ('<joint type="ball"/>', '<motor joint="j"/>', "ball"),
        ("", '<general joint="j" dyntype="filter" dynprm="0.1"/>', "activation"),
        ("", "", "no actuators"),
    ],
)
def test_unsupported_models(joint, actuator, match):
    """A hinge `j` on one body, the joint under test on another."""
    xml = (f'<mujoco><worldbody><body><joint name="j" axis="1 0 0"/><geom size="0.1"/></body>'
           f'<body pos="1 0 0">{joint}<geom size="0.1"/></body></worldbody>'
           f"<actuator>{actuator}</actuator></mujoco>")
    with pytest.raises(ValueError, match=match):
        MujocoDynamics(mujoco.MjModel.from_xml_string(xml))


# ---------------------------------------------------------------------------- MPC over MuJoCo
# The analytic pendulum and its MJCF twin give the same steps to rounding, so the two MPC
# plans differ only by the solver: box-DDP over MujocoDynamics runs Gauss-Newton steps
# (finite-difference Jacobians carry no curvature) and stops at tol, and its Jacobians are
# accurate to ~1e-10 (centered differences): below tol ~ 1e-8 its rows stall rather than
# converge. Measured on the problem below (tol 1e-7 against 1e-10, float64; 4 iterations
# each): plans agree to 2.7e-8 in u and 6.5e-9 in x, costs to 4e-16 relative.
MPC_T = 20
MPC_X0 = ((0.6, 0.0), (-0.4, 0.5))
MPC_GOAL = (0.1, 0.0)


def _mpc_cost(goal):
    f64 = torch.float64
    return QuadraticCost.tracking(torch.tensor([1.0, 0.1], dtype=f64),
                                  torch.tensor([0.05], dtype=f64), MPC_T, x_goal=goal,
                                  Q_final=torch.tensor([10.0, 1.0], dtype=f64))


def _mpc_solve(dynamics, x0, goal, tol=1e-7):
    mpc = MPC(dynamics, MPC_T, u_lower=-3.0, u_upper=3.0, max_iter=60, tol=tol)
    sol = mpc(x0, _mpc_cost(goal))
    assert sol.converged.all(), f"iterations {sol.iterations.tolist()}"
    return sol


def test_mpc_over_mujoco_matches_analytic_pendulum():
    x0 = torch.tensor(MPC_X0, dtype=torch.float64)
    goal = torch.tensor(MPC_GOAL, dtype=torch.float64)
    mj = _mpc_solve(_pendulum(), x0, goal)
    ref = _mpc_solve(_analytic(), x0, goal, tol=1e-10)
    assert mj.extras["active_lower"].any() and mj.extras["active_upper"].any()  # bounds bind
    du = (mj.u - ref.u).abs().max().item()
    dx = (mj.x - ref.x).abs().max().item()
    assert du < 1e-6 and dx < 1e-6, f"plan differences u {du:.3g}, x {dx:.3g}"
    assert torch.allclose(mj.cost, ref.cost, rtol=1e-10, atol=0)


def test_mpc_bounds_must_lie_inside_ctrlrange():
    model = mujoco.MjModel.from_xml_string(PENDULUM_XML.replace(
        'gear="1"/>', 'gear="1" ctrlrange="-2 2"/>'))
    dyn = MujocoDynamics(model)
    assert dyn.u_lower.tolist() == [-2.0] and dyn.u_upper.tolist() == [2.0]
    x0 = torch.tensor(MPC_X0, dtype=torch.float64)
    cost = _mpc_cost(torch.tensor(MPC_GOAL, dtype=torch.float64))
    with pytest.raises(ValueError, match="u_upper must lie inside"):
        MPC(dyn, MPC_T, u_lower=-2.0, u_upper=3.0)(x0, cost)
    MPC(dyn, MPC_T, u_lower=-2.0, u_upper=1.5, max_iter=5)(x0, cost)  # inside: accepted


# The exact implicit gradient of a plan holds Σ_i λ_{t+1,i} ∇²f_i(τ_t) in the Hessian of the
# Lagrangian; over MujocoDynamics the MPC backward drops it. Measured on this problem (the
# gradient of a plan loss w.r.t. x0 (2, 2) and the goal (2,)) against the analytic
# pendulum's exact gradients, which match central differences of re-solves of the MuJoCo MPC
# to 1.5e-6: the largest error is 0.89% of the largest entry (per entry 0.4% to 3.3%, the
# largest on the smallest entry); over 6 random draws of x0 in [-1, 1]², goal and loss
# weights the figure ranged 0.2%-4.7%. The tests (this fixed problem) allow 3% of the largest
# entry, and 1e-4 for the analytic reference itself.
CURVATURE_TOL = 3e-2


def _plan_loss(sol, weights):
    return (weights * sol.u).sum() + (sol.x[:, -1] ** 2).sum()


def test_mpc_gradients_against_analytic_and_resolves():
    weights = torch.randn(2, MPC_T, 1, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
    x0 = torch.tensor(MPC_X0, dtype=torch.float64)
    goal = torch.tensor(MPC_GOAL, dtype=torch.float64)
    grads = {}
    for name, dyn in (("mujoco", _pendulum()), ("analytic", _analytic())):
        x0_, goal_ = x0.clone().requires_grad_(), goal.clone().requires_grad_()
        loss = _plan_loss(_mpc_solve(dyn, x0_, goal_, tol=1e-7 if name == "mujoco" else 1e-10),
                          weights)
        grads[name] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, (x0_, goal_))])
    scale = grads["analytic"].abs().max().item()
    err = (grads["mujoco"] - grads["analytic"]).abs().max().item() / scale
    assert err < CURVATURE_TOL, f"curvature-free gradient off by {err:.3g} (relative)"

    # Directional central differences of re-solves of the MuJoCo MPC itself.
    gen = torch.Generator().manual_seed(1)
    h = 1e-3
    for _ in range(2):
        v = torch.randn(6, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            def at(s, v=v):
                sol = _mpc_solve(_pendulum(), x0 + s * v[:4].view(2, 2), goal + s * v[4:])
                return _plan_loss(sol, weights).item()

            fd = (at(h) - at(-h)) / (2 * h)
        for name, tol in (("mujoco", CURVATURE_TOL), ("analytic", 1e-4)):
            d = (grads[name] @ v).item()
            assert abs(d - fd) < tol * scale * v.abs().sum().item(), (
                f"{name}: directional derivative {d:.8g} vs re-solves {fd:.8g}")


def test_mpc_flags_a_row_whose_dynamics_fail():
    """A row that MuJoCo cannot step (|qpos| > mjMAXVAL) is flagged, gets zero gradient, and
    leaves the other rows' plans and the shared goal's gradient as they are without it."""
    def solve(x0_rows):
        x0 = torch.tensor(x0_rows, dtype=torch.float64, requires_grad=True)
        goal = torch.tensor(MPC_GOAL, dtype=torch.float64, requires_grad=True)
        mpc = MPC(_pendulum(), MPC_T, u_lower=-3.0, u_upper=3.0, max_iter=30, tol=1e-7)
        sol = mpc(x0, _mpc_cost(goal))
        sol.u[sol.converged].sum().backward()
        return sol, x0.grad, goal.grad

    sol, gx, gg = solve([MPC_X0[0], (1e11, 0.0), MPC_X0[1]])
    assert sol.converged.tolist() == [True, False, True]
    assert torch.equal(gx[1], torch.zeros(2, dtype=torch.float64))
    ref, gx_ref, gg_ref = solve(list(MPC_X0))
    assert torch.allclose(sol.u[[0, 2]], ref.u, rtol=0, atol=1e-12)
    assert torch.allclose(gx[[0, 2]], gx_ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(gg, gg_ref, rtol=1e-9, atol=1e-12)
