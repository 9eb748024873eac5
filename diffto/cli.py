"""The ``lightning`` / ``diffto`` / ``python -m diffto`` command: a LightningCLI.

``lightning fit --config go2_tracking.yaml`` trains from a shipped config: when ``--config``
names a file that does not exist locally, a bare name (``go2_tracking`` or
``go2_tracking.yaml``) is looked up among the configs shipped in
:mod:`diffto.lightning_configs`. A local file of the same name always wins.

On a Linux machine without a display the command sets ``MUJOCO_GL=osmesa`` (unless it is
set already) before anything imports ``mujoco``, so rollout videos render headless.

Subcommands are Lightning's own: ``fit``, ``validate``, ``test``, ``predict``. Any
``LightningModule`` is accepted through ``model.class_path``; diffto's modules resolve by
their short names because :mod:`diffto.learning` is imported first.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import sys
import warnings
from pathlib import Path

from diffto.tasks.registry import use_osmesa_if_headless

__all__ = ["main", "resolve_config", "shipped_configs"]

_CONFIG_FLAGS = ("--config", "-c")


def shipped_configs() -> dict[str, Path]:
    """Names of the configs shipped with diffto, mapped to their paths."""
    root = importlib.resources.files("diffto.lightning_configs")
    return {p.name: Path(str(p)) for p in root.iterdir() if p.name.endswith((".yaml", ".yml"))}


def resolve_config(value: str) -> str:
    """Map ``--config`` values to a path: a local file as given, else a shipped config.

    Values that are neither (inline YAML, a typo) pass through unchanged, so Lightning's own
    parser reports them; a typo of a shipped name gets the list of shipped names as a hint.
    """
    if Path(value).exists() or "\n" in value or ":" in value:
        return value
    shipped = shipped_configs()
    for candidate in (value, f"{value}.yaml", Path(value).name):
        if candidate in shipped:
            return str(shipped[candidate])
    if value.endswith((".yaml", ".yml")):
        raise SystemExit(
            f"error: --config {value!r}: no such file here, and no shipped config of that name "
            f"(shipped: {', '.join(sorted(shipped)) or 'none'})"
        )
    return value


def _rewrite_config_args(argv: list[str]) -> list[str]:
    out: list[str] = []
    expect_value = False
    for arg in argv:
        if expect_value:
            out.append(resolve_config(arg))
            expect_value = False
        elif arg in _CONFIG_FLAGS:
            out.append(arg)
            expect_value = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def _warn_if_lightning_script_is_shared() -> None:
    """Several distributions may install a ``lightning`` script (lightning-sdk does); pip
    overwrites silently and uninstalling either removes it, so say so when it happens."""
    owners = {
        ep.dist.name if ep.dist is not None else "?"
        for ep in importlib.metadata.entry_points(group="console_scripts", name="lightning")
    }
    others = sorted(owners - {"diffto"})
    if others:
        warnings.warn(
            "the `lightning` command is also installed by "
            f"{', '.join(others)}; if it stops running diffto, use `diffto` or `python -m diffto`",
            stacklevel=2,
        )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console scripts; returns ``None`` so the process exits 0."""
    # MuJoCo reads MUJOCO_GL when it is first imported (by an environment or a config's
    # module): choose OSMesa on a headless machine before that, unless the user chose.
    use_osmesa_if_headless()
    _warn_if_lightning_script_is_shared()
    from_command_line = argv is None
    argv = _rewrite_config_args(list(sys.argv[1:] if from_command_line else argv))

    import torch
    from lightning.pytorch.cli import LightningCLI

    # Parallelism in diffto's jobs comes from environment subprocesses and batching; on small
    # CPUs extra intra-op threads slow the many small batched factorizations down (and MKL has
    # been seen to return wrong batched solves with 2 threads). DIFFTO_NUM_THREADS overrides.
    torch.set_num_threads(int(os.environ.get("DIFFTO_NUM_THREADS", "1")))

    import diffto.learning  # noqa: F401  (registers diffto's modules for short class names)

    if from_command_line:
        # LightningCLI warns when given args beside a non-empty sys.argv: hand it the
        # rewritten command line the usual way instead.
        sys.argv[1:] = argv
        LightningCLI(save_config_kwargs={"overwrite": True})
    else:
        LightningCLI(args=argv, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
