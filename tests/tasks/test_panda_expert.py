"""The Panda reaching expert: its planning model is the env's, actions and controls convert
both ways, a closed loop reaches a held-out goal, and the benchmark built on it still runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffto.tasks.mpc_expert import RecedingHorizon
from diffto.tasks.panda import TORQUE_LIMITS, PandaReachEnv, PandaReachExpert
from diffto.tasks.registry import make_expert

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_panda_mpc.py"


def test_planning_model_with_ten_substeps_is_the_env_physics():
    env = PandaReachEnv()
    env.reset(seed=0)
    expert = PandaReachExpert(plan_substeps=10)
    x = torch.as_tensor(expert.state_of(env)).unsqueeze(0)
    action = np.linspace(-0.3, 0.3, 7)
    env.step(action)
    predicted = expert.dynamics(x, expert.to_control(action[None]))[0].numpy()
    assert np.allclose(predicted, env.state, atol=1e-9)
    obs = env.unwrapped._observation()
    state = torch.as_tensor(env.state)
    assert np.allclose(expert.observation_of(state).numpy(), obs["observation"])
    assert np.allclose(expert.achieved_goal_of(state).numpy(), obs["achieved_goal"], atol=1e-9)
    coarse = PandaReachExpert()  # 2 steps of 10 ms: close, not equal
    approx = coarse.dynamics(x, coarse.to_control(action[None]))[0].numpy()
    assert 0 < np.abs(approx - env.state).max() < 0.05


def test_actions_and_controls_convert_both_ways():
    expert = PandaReachExpert()
    u = torch.tensor(np.array(TORQUE_LIMITS) * np.linspace(-1, 1, 7)).unsqueeze(0)
    action = expert.to_action(u)
    assert action.shape == (1, 7) and np.allclose(action, np.linspace(-1, 1, 7))
    torch.testing.assert_close(expert.to_control(action), u)
    limits = torch.tensor(np.array(TORQUE_LIMITS)).unsqueeze(0)
    torch.testing.assert_close(expert.to_control(np.full((1, 7), 2.0)), limits)  # env's clip
    assert torch.equal(expert.u_upper, limits[0])


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="plan_substeps must be an int >= 1"):
        PandaReachExpert(plan_substeps=0)
    with pytest.raises(ValueError, match="position_weight must be a finite float > 0"):
        PandaReachExpert(position_weight=0.0)
    with pytest.raises(ValueError, match="goal must have shape"):
        PandaReachExpert().solve(np.zeros((1, 14)), np.zeros((1, 2)))


def test_closed_loop_reaches_a_held_out_goal():
    env = PandaReachEnv()
    obs, info = env.reset(seed=1_000_000)
    expert = make_expert("diffto/PandaReach-v0")
    assert isinstance(expert, PandaReachExpert)
    controller = RecedingHorizon(expert)
    goal = obs["desired_goal"][None]
    start = info["distance"]
    for _ in range(15):
        actions, sol = controller.act(expert.state_of(env)[None], goal)
        obs, _, _, _, info = env.step(actions[0])
        if info["is_success"]:
            break
    assert info["is_success"], (start, info["distance"])
    assert sol.converged.dtype == torch.bool and sol.iterations.shape == (1,)


def test_benchmark_runs_on_the_expert(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_panda_mpc", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_panda_mpc", bench)
    spec.loader.exec_module(bench)
    out = tmp_path / "panda_mpc.json"
    bench.main(["--goals", "1", "--max-steps", "3", "--hold", "1", "--compare-every", "2",
                "--compare-iterations", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["summary"]["control_steps"] == 3 and result["summary"]["compare"]["states"] == 1
    assert "PandaReachExpert" in result["expert"]
