"""What benchmark scripts share: the machine, an atomic JSON writer, runs of ``lightning fit``.

Scripts run as ``python benchmarks/<script>.py``, so this folder is on ``sys.path`` and they
import it as ``from _results import machine_info, write_atomic``.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml


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


def run_config(config: dict, root: Path, max_epochs: int, val_every: int, seed: int) -> dict:
    """``config`` with ``seed``, ``max_epochs`` and validation every ``val_every`` epochs, its
    trainer writing under ``root`` (CSV logs, checkpoints) without a progress bar."""
    cfg = copy.deepcopy(config)
    cfg["seed_everything"] = seed
    tr = cfg["trainer"]
    tr.update(max_epochs=max_epochs, check_val_every_n_epoch=val_every,
              enable_progress_bar=False)
    tr["logger"] = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                     "init_args": {"save_dir": str(root), "name": "logs"}}]
    for cb in tr.get("callbacks", []):
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(root / "checkpoints")
    return cfg


def fit_once(cfg: dict, root: Path, log: Path, report: str = "report.json",
             resume: bool = False, finished: Callable[[dict], bool] | None = None) -> dict:
    """``python -m diffto fit`` of ``cfg`` unless ``root`` already holds its end-of-fit
    report (the JSON file named ``report`` in the run's log folder; so a benchmark reruns
    after a kill without repeating finished runs); returns the report with the run's
    ``wall_time_s`` (of the last process). With ``resume``, an unfinished run goes on from
    ``root/checkpoints/last.ckpt`` where it exists (its log is appended to); otherwise it
    starts again. ``finished`` tells a finished run's report from one written on the way
    (default: any report is final)."""
    reports = sorted(root.glob(f"logs/version_*/{report}"), key=_version_number)
    if reports:
        payload = json.loads(reports[-1].read_text())
        if finished is None or finished(payload):
            return payload
    root.mkdir(parents=True, exist_ok=True)
    last = root / "checkpoints" / "last.ckpt"
    resuming = resume and last.exists()
    if not resuming:
        (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    command = [sys.executable, "-m", "diffto", "fit", "--config", str(root / "config.yaml")]
    if resuming:
        command += ["--ckpt_path", str(last)]
    t0 = time.perf_counter()
    with open(log, "a" if resuming else "w") as fh:
        subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "DIFFTO_NUM_THREADS": "1"})
    path = sorted(root.glob(f"logs/version_*/{report}"), key=_version_number)[-1]
    payload = json.loads(path.read_text())
    if finished is not None and not finished(payload):
        raise RuntimeError(f"{root}: the fit ended without a finished {report} ({path}); see "
                           f"{log}")
    payload["wall_time_s"] = time.perf_counter() - t0
    path.write_text(json.dumps(payload, indent=1))
    return payload


def _version_number(path: Path) -> int:
    """k of a ``logs/version_<k>/...`` path (so version_10 sorts after version_9)."""
    return int(path.parent.name.removeprefix("version_"))


def write_results(folder: Path, name: str, payload: dict, markdown: str) -> None:
    """``<folder>/<name>.json`` (atomic) and ``<name>.md`` beside it; prints the table."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{name}.json", payload)
    (folder / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"results: {folder / name}.json")


def command_line() -> str:
    """The command that runs this script with this process's arguments, quoted for a shell."""
    script = Path(sys.argv[0])
    return shlex.join(["python", f"benchmarks/{script.name}", *sys.argv[1:]])
