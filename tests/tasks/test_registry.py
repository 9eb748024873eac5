"""The environment registry: ids from one table, registered on demand and idempotently, and
the headless choice of MuJoCo's GL back-end."""

from __future__ import annotations

import importlib.util
import sys

import gymnasium as gym
import pytest

from diffto.tasks import registry


def test_table_names_existing_classes_without_importing_them():
    assert registry.ENVIRONMENTS["diffto/Go2Tracking-v0"] == "diffto.tasks.go2.env:Go2TrackingEnv"
    assert (
        registry.ENVIRONMENTS["diffto/PandaReach-v0"]
        == "diffto.tasks.panda.reach_env:PandaReachEnv"
    )
    assert (
        registry.ENVIRONMENTS["diffto/PendulumSwingUp-v0"]
        == "diffto.tasks.classic.swingup_env:PendulumSwingUpEnv"
    )
    for env_id, entry in [*registry.ENVIRONMENTS.items(), *registry.EXPERTS.items()]:
        module, _, cls = entry.partition(":")
        assert env_id.startswith("diffto/") and cls, entry
        assert importlib.util.find_spec(module) is not None, entry


def test_register_is_idempotent_and_keeps_user_registrations(monkeypatch):
    monkeypatch.setattr(gym.envs.registration, "registry", dict(gym.registry))
    monkeypatch.setattr(gym, "registry", gym.envs.registration.registry)
    for env_id in registry.ENVIRONMENTS:
        gym.registry.pop(env_id, None)
    gym.register("diffto/Go2Tracking-v0", entry_point="builtins:object")  # a user's own
    added = registry.register_environments()
    assert "diffto/Go2Tracking-v0" not in added and "diffto/PandaReach-v0" in added
    assert gym.registry["diffto/Go2Tracking-v0"].entry_point == "builtins:object"
    assert registry.register_environments() == []
    assert set(registry.ENVIRONMENTS) <= set(gym.registry)


def test_make_env_registers_on_demand_and_checks_its_arguments():
    env = registry.make_env("Pendulum-v1", {"g": 9.0})
    assert env.unwrapped.g == 9.0
    env.close()
    env = registry.make_env("diffto/PandaReach-v0", {"reward_type": "dense"})
    assert type(env.unwrapped).__name__ == "PandaReachEnv"
    env.close()
    with pytest.raises(ValueError, match="env_id must be a non-empty"):
        registry.make_env("")
    with pytest.raises(ValueError, match="env_kwargs must be a dict"):
        registry.make_env("Pendulum-v1", [1, 2])
    with pytest.raises(gym.error.Error):
        registry.make_env("diffto/NoSuchTask-v0")


def test_make_expert_builds_the_default_expert_with_overrides():
    expert = registry.make_expert("diffto/PendulumSwingUp-v0", horizon=12, max_iter=2)
    assert type(expert).__name__ == "SwingUpExpert"
    assert (expert.horizon, expert.max_iter) == (12, 2)
    assert set(registry.EXPERTS) <= set(registry.ENVIRONMENTS)
    with pytest.raises(ValueError, match="env_id must be one of"):
        registry.make_expert("diffto/Go2Tracking-v0")
    with pytest.raises(TypeError, match="no_such_option"):
        registry.make_expert("diffto/PendulumSwingUp-v0", no_such_option=1)


@pytest.mark.parametrize(
    ("env", "platform", "mujoco_loaded", "expected"),
    [
        ({}, "linux", False, "osmesa"),
        ({"MUJOCO_GL": "egl"}, "linux", False, "egl"),  # the user's choice wins
        ({"DISPLAY": ":0"}, "linux", False, None),  # a display: MuJoCo's default works
        ({"WAYLAND_DISPLAY": "wayland-0"}, "linux", False, None),
        ({}, "darwin", False, None),  # no OSMesa there
        ({}, "linux", True, None),  # too late: mujoco has read the variable already
    ],
)
def test_osmesa_only_where_headless_and_unchosen(monkeypatch, env, platform, mujoco_loaded,
                                                  expected):
    for key in ("MUJOCO_GL", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "platform", platform)
    modules = dict(sys.modules)
    if mujoco_loaded:
        modules["mujoco"] = object()
    else:
        modules.pop("mujoco", None)
    monkeypatch.setattr(sys, "modules", modules)
    changed = registry.use_osmesa_if_headless()
    assert changed == (expected == "osmesa" and "MUJOCO_GL" not in env)
    assert registry.os.environ.get("MUJOCO_GL") == expected
