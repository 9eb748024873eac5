"""The `lightning` / `diffto` command: config-name resolution and the shared-script warning."""

import os
import subprocess
import sys
import types

import pytest

from diffto import cli


def test_bare_names_resolve_to_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = cli.shipped_configs()
    assert shipped, "no configs shipped in diffto.lightning_configs"
    name = sorted(shipped)[0]
    assert cli.resolve_config(name) == str(shipped[name])
    assert cli.resolve_config(name.removesuffix(".yaml")) == str(shipped[name])


def test_local_file_wins_over_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = sorted(cli.shipped_configs())[0]
    (tmp_path / name).write_text("trainer: {}\n")
    assert cli.resolve_config(name) == name


def test_unknown_yaml_name_lists_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no shipped config of that name"):
        cli.resolve_config("no_such_experiment.yaml")


def test_config_flags_are_rewritten_in_every_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = sorted(cli.shipped_configs())[0]
    path = str(cli.shipped_configs()[name])
    argv = ["fit", "--config", name, "-c", name, f"--config={name}", "--trainer.max_steps=1"]
    assert cli._rewrite_config_args(argv) == [
        "fit",
        "--config",
        path,
        "-c",
        path,
        f"--config={path}",
        "--trainer.max_steps=1",
    ]


def test_warns_when_another_distribution_owns_lightning(monkeypatch):
    fake = [
        types.SimpleNamespace(dist=types.SimpleNamespace(name="diffto")),
        types.SimpleNamespace(dist=types.SimpleNamespace(name="lightning-sdk")),
    ]
    monkeypatch.setattr(cli.importlib.metadata, "entry_points", lambda **_: fake)
    with pytest.warns(UserWarning, match="lightning-sdk"):
        cli._warn_if_lightning_script_is_shared()


def test_python_m_diffto_help_exits_zero():
    out = subprocess.run(
        [sys.executable, "-m", "diffto", "fit", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OSMesa is the Linux back-end")
def test_command_chooses_osmesa_headless_before_anything_imports_mujoco():
    """``import diffto`` sets nothing; the command sets MUJOCO_GL where there is no display."""
    script = (
        "import os, sys\n"
        "import lightning.pytorch.cli as lc\n"
        "class Probe:\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        print('GL', os.environ.get('MUJOCO_GL'), 'mujoco' in sys.modules)\n"
        "lc.LightningCLI = Probe\n"
        "from diffto import cli\n"
        "print('after import', os.environ.get('MUJOCO_GL'))\n"
        "cli.main(['fit'])\n"
    )
    headless = {k: v for k, v in os.environ.items()
                if k not in ("MUJOCO_GL", "DISPLAY", "WAYLAND_DISPLAY")}
    out = subprocess.run([sys.executable, "-c", script], env=headless, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "after import None" in out.stdout and "GL osmesa False" in out.stdout, out.stdout
