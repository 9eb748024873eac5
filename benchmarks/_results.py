"""What every benchmark script shares: the machine it ran on and an atomic JSON writer.

Scripts run as ``python benchmarks/<script>.py``, so this folder is on ``sys.path`` and they
import it as ``from _results import machine_info, write_atomic``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path


def machine_info(**versions: str) -> dict:
    """CPU model, cores, load, platform and Python, plus the package ``versions`` given."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def write_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` whole or not at all (a temporary file beside it,
    then an atomic rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
