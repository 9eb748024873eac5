"""The Panda safety filter and violation counting of PandaReachEnv (``safety_filter`` option)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffto.layers.safety import cbf_constraints
from diffto.tasks.panda import model as panda
from diffto.tasks.panda.reach_env import PandaReachEnv
from diffto.tasks.panda.safety_filter import PandaConstraintSet, PandaSafetyFilter

FAST = True  # the default options: the NumPy projection


def _inside(env: PandaReachEnv) -> dict[str, bool]:
    """Which classes the env's current state keeps (the negation of ``violated``)."""
    cs = env.safety_constraints
    q, qd, p = env.data.qpos, env.data.qvel, env.data.site(panda.FLANGE_SITE).xpos
    return {
        "joint_position": bool(((q >= cs.joint_lower) & (q <= cs.joint_upper)).all()),
        "joint_velocity": bool((np.abs(qd) <= cs.velocity_limits).all()),
        "workspace": bool(((p >= cs.workspace_low) & (p <= cs.workspace_high)).all()),
    }


def _episode(env, actions, seed):
    env.reset(seed=seed)
    infos = []
    for a in actions:
        *_, info = env.step(a)
        infos.append(info)
        if info["violations"] == 0:
            assert all(_inside(env).values())
    return infos


def test_filter_keeps_every_constraint_under_random_actions():
    actions = np.random.default_rng(0).uniform(-1.0, 1.0, (100, 7))
    off, on = PandaReachEnv(), PandaReachEnv(safety_filter=FAST)
    for seed in (1_000_000, 1_000_001):
        unfiltered = _episode(off, actions, seed)
        filtered = _episode(on, actions, seed)
        assert sum(i["violations"] for i in unfiltered) > 20  # the actions are dangerous
        assert sum(i["violations"] for i in filtered) == 0
        assert all(_inside(on).values())
        assert sum(i["filtered"] for i in filtered) > 50
        assert not any(i["filter_infeasible"] for i in filtered)


@pytest.mark.parametrize(
    ("action", "joint", "side"),
    [
        (np.eye(7)[6], 6, "upper"),  # the flange joint: turns the flange, does not move it
        (-np.eye(7)[5], 5, "lower"),  # joint 6 at full torque into its lower limit (-0.02 rad)
        (np.eye(7)[4], 4, "upper"),
    ],
)
def test_full_torque_into_a_limit_is_stopped(action, joint, side):
    actions = np.tile(action, (100, 1))
    unfiltered = _episode(PandaReachEnv(), actions, 3)
    assert sum(i["violations"] for i in unfiltered) > 0
    env = PandaReachEnv(safety_filter=FAST)
    env.reset(seed=3)
    cs = env.safety_constraints
    closest = np.inf
    for a in actions:
        *_, info = env.step(a)
        assert info["violations"] == 0, _inside(env)
        q = env.data.qpos[joint]
        gap = cs.joint_upper[joint] - q if side == "upper" else q - cs.joint_lower[joint]
        closest = min(closest, gap)
    assert 0.0 <= closest < 0.05  # it went close, then was held off
    assert info["filtered"] and info["action_correction"] > 0.0


def test_action_correction_is_the_change_of_the_clipped_action():
    env = PandaReachEnv(safety_filter=FAST)
    env.reset(seed=4)
    filt = env.safety_filter
    proposal = np.array([3.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0])  # outside the box: clipped first
    for _ in range(20):
        state = env.state
        result = filt(state, proposal)
        *_, info = env.step(proposal)
        np.testing.assert_allclose(env.data.ctrl, result.action * panda.TORQUE_LIMITS)
        assert np.abs(result.action).max() <= 1.0
        clipped = np.clip(proposal, -1.0, 1.0)
        assert info["action_correction"] == pytest.approx(np.linalg.norm(result.action - clipped))
        assert info["filtered"] == (info["action_correction"] > 0.0)
        assert result.seconds > 0.0


def test_layer_and_nnls_projections_agree():
    env = PandaReachEnv()
    model = env.nominal_model()
    layer = PandaSafetyFilter(model, env.substeps, projection="layer")
    exact = PandaSafetyFilter(model, env.substeps)
    assert exact.projection == "nnls"
    rng = np.random.default_rng(5)
    env.reset(seed=5)
    compared = 0
    for _ in range(12):
        proposal = rng.uniform(-1.0, 1.0, 7)
        a, b = layer(env.state, proposal), exact(env.state, proposal)
        np.testing.assert_allclose(a.action, b.action, atol=1e-6)
        assert a.filtered == b.filtered and a.feasible and b.feasible
        compared += a.projections > 0
        env.step(b.action)
    assert compared >= 6
    # The projections themselves, on one set of rows.
    state = env.state
    proposal = np.ones(7)
    y_now, y_next = exact.outputs(state), exact.outputs(state, proposal)
    G, h = exact.cbf_rows(y_now, proposal, y_next, exact.jacobian(state, proposal, y_next))
    with torch.no_grad():
        ref = layer.layer(
            torch.tensor(proposal)[None], torch.tensor(G)[None], torch.tensor(h)[None]
        )
    np.testing.assert_allclose(exact._project_nnls(proposal, G, h), ref[0].numpy(), atol=1e-8)


def test_cbf_rows_are_those_of_cbf_constraints():
    env = PandaReachEnv()
    filt = PandaSafetyFilter(env.nominal_model(), env.substeps, alpha=0.3)
    env.reset(seed=6)
    for _ in range(5):
        env.step(np.full(7, 0.8))
    state, proposal = env.state, np.full(7, 0.8)
    y_now, y_next = filt.outputs(state), filt.outputs(state, proposal)
    B = filt.jacobian(state, proposal, y_next)
    G, h = filt.cbf_rows(y_now, proposal, y_next, B)
    t = torch.float64
    G_ref, h_ref = cbf_constraints(
        torch.eye(20, dtype=t),
        torch.tensor(B),
        torch.tensor(y_now)[None],
        torch.tensor(filt.P),
        torch.tensor(filt.c),
        alpha=0.3,
        u_lower=-1.0,
        u_upper=1.0,
        f=torch.tensor(y_next - B @ proposal - y_now),
    )
    G_ref, h_ref = G_ref[0].numpy(), h_ref[0].numpy()
    k = filt.P.shape[0]
    keep = np.abs(G_ref[:k]).sum(1) > h_ref[:k]
    assert 0 < keep.sum() < k  # some rows bind, most cannot
    np.testing.assert_allclose(G, np.concatenate([G_ref[:k][keep], G_ref[k:]]), atol=1e-12)
    np.testing.assert_allclose(h, np.concatenate([h_ref[:k][keep], h_ref[k:]]), atol=1e-12)


def test_prediction_is_the_nominal_step():
    env = PandaReachEnv()
    filt = PandaSafetyFilter(env.nominal_model(), env.substeps)
    env.reset(seed=7)
    action = np.linspace(-0.9, 0.9, 7)
    y = filt.outputs(env.state, action)
    obs, *_ = env.step(action)
    np.testing.assert_array_equal(y[:14], obs["observation"])
    np.testing.assert_allclose(y[14:17], obs["achieved_goal"], atol=1e-12)
    # The slope: a small action change moves the prediction as B says.
    state = env.state
    y0 = filt.outputs(state, action)
    B = filt.jacobian(state, action, y0)
    delta = np.full(7, 1e-3)
    np.testing.assert_allclose(filt.outputs(state, action + delta), y0 + B @ delta, atol=1e-6)


def test_off_mode_is_unchanged():
    actions = np.random.default_rng(8).uniform(-1.5, 1.5, (30, 7))
    default, off = PandaReachEnv(), PandaReachEnv(safety_filter=False)
    assert default.safety_filter is None and off.safety_filter is None
    for env in (default, off):
        env.reset(seed=8)
    for a in actions:
        o1, r1, *_, i1 = default.step(a)
        o2, r2, *_, i2 = off.step(a)
        np.testing.assert_array_equal(default.data.ctrl, np.clip(a, -1, 1) * panda.TORQUE_LIMITS)
        np.testing.assert_array_equal(o1["observation"], o2["observation"])
        assert r1 == r2 and i1 == i2
        assert i1["filtered"] is False and i1["action_correction"] == 0.0
        assert type(i1["violations"]) is int and 0 <= i1["violations"] <= 3
    # With the filter on, a safe action (rest, zero torque) passes unchanged.
    on, ref = PandaReachEnv(safety_filter=FAST), PandaReachEnv()
    for env in (on, ref):
        env.reset(seed=9)
    for _ in range(10):
        o1, *_, i1 = on.step(np.zeros(7))
        o2, *_, i2 = ref.step(np.zeros(7))
        np.testing.assert_array_equal(o1["observation"], o2["observation"])
        assert i1["filtered"] is False and i1["action_correction"] == 0.0


def test_constraint_set_is_the_same_on_and_off():
    opts = {"joint_margin": 0.1, "workspace_high": [0.8, 0.5, 1.0]}
    for kwargs in ({}, {"safety_constraints": opts}):
        off, on = PandaReachEnv(**kwargs), PandaReachEnv(safety_filter=True, **kwargs)
        for name in ("joint_margin", "velocity_limits", "workspace_low", "workspace_high"):
            np.testing.assert_array_equal(
                getattr(off.safety_constraints, name), getattr(on.safety_constraints, name)
            )
        assert on.safety_filter.constraints is on.safety_constraints
    cs = PandaConstraintSet()
    np.testing.assert_array_equal(cs.velocity_limits, panda.VELOCITY_LIMITS)
    np.testing.assert_allclose(cs.joint_upper, panda.JOINT_UPPER - 0.05)


def test_violations_are_counted_by_class():
    cs = PandaConstraintSet()
    q, qd, p = panda.HOME.copy(), np.zeros(7), np.array([0.55, 0.0, 0.62])
    assert cs.violations(q, qd, p) == 0
    q_bad = q.copy()
    q_bad[3] = panda.JOINT_UPPER[3] - 0.01  # inside the range, inside the 0.05 margin
    qd_bad = qd.copy()
    qd_bad[6] = -2.7
    p_bad = p + [0.0, 0.0, 0.6]
    assert cs.violated(q_bad, qd, p) == {
        "joint_position": True, "joint_velocity": False, "workspace": False
    }
    assert cs.violations(q, qd_bad, p) == 1 and cs.violations(q, qd, p_bad) == 1
    assert cs.violations(q_bad, qd_bad, p_bad) == 3
    # The env counts the state after each step, filter or not.
    env = PandaReachEnv()
    _, info = env.reset(seed=10)
    assert info["violations"] == 0
    env.data.qvel[0] = 3.0
    *_, info = env.step(np.zeros(7))
    assert info["violations"] == 1 and type(info["violations"]) is int


@pytest.mark.parametrize("projection", ["nnls", "layer"])
def test_a_state_beyond_rescue_gives_the_least_violating_action(projection):
    env = PandaReachEnv(safety_filter={"projection": projection})
    env.reset(seed=11)
    env.data.qvel[6] = 60.0  # no torque brings the wrist back inside within one step
    proposal = np.ones(7)
    result = env.safety_filter(env.state, proposal)
    assert not result.feasible
    assert np.isfinite(result.action).all() and np.abs(result.action).max() <= 1.0
    assert result.action[6] == pytest.approx(-1.0)  # it brakes the wrist as hard as it can
    *_, info = env.step(proposal)
    assert info["filter_infeasible"] and info["violations"] >= 1


def test_filter_predicts_with_the_nominal_model():
    env = PandaReachEnv(safety_filter=True, payload_mass=1.5, actuator_gain=0.8)
    env.reset(seed=12)
    nominal = env.safety_filter.model
    assert nominal.body_mass[nominal.body(panda.PAYLOAD_BODY).id] == 0.0
    np.testing.assert_array_equal(nominal.actuator_gainprm[:, 0], 1.0)
    assert env.model.body_mass[env.model.body(panda.PAYLOAD_BODY).id] == 1.5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"safety_filter": "yes"}, "safety_filter"),
        ({"safety_filter": 1}, "safety_filter"),
        ({"safety_filter": {"gain": 2.0}}, "safety_filter"),
        ({"safety_filter": {"alpha": 0.0}}, "alpha"),
        ({"safety_filter": {"alpha": 1.5}}, "alpha"),
        ({"safety_filter": {"joint_lookahead": -0.1}}, "joint_lookahead"),
        ({"safety_filter": {"velocity_buffer": 3.0}}, "velocity_buffer"),
        ({"safety_filter": {"iterations": 0}}, "iterations"),
        ({"safety_filter": {"projection": "qp"}}, "projection"),
        ({"safety_filter": {"fd_step": 0.0}}, "fd_step"),
        ({"safety_constraints": [0.1]}, "safety_constraints"),
        ({"safety_constraints": {"margin": 0.1}}, "safety_constraints"),
        ({"safety_constraints": {"joint_margin": -0.1}}, "joint_margin"),
        ({"safety_constraints": {"joint_margin": 2.0}}, "joint_margin"),
        ({"safety_constraints": {"velocity_limits": 0.0}}, "velocity_limits"),
        ({"safety_constraints": {"velocity_limits": [1.0, 2.0]}}, "velocity_limits"),
        ({"safety_constraints": {"workspace_low": [1.0, 0.0, 0.0]}}, "workspace_low"),
        ({"safety_constraints": {"workspace_high": [1.0, "a", 1.0]}}, "workspace_high"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PandaReachEnv(**kwargs)


@pytest.mark.filterwarnings("ignore:.*observation space (minimum|maximum) value")
def test_gymnasium_env_checker_with_the_filter():
    from gymnasium.utils.env_checker import check_env

    check_env(PandaReachEnv(safety_filter=FAST), skip_render_check=True)
