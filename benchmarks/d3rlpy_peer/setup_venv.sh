#!/usr/bin/env bash
# Creates the separate virtual environment that runs d3rlpy, the peer library that the
# offline-to-online learners are compared with: benchmarks/d3rlpy_peer/.venv.
#
# d3rlpy 2.8.1 pins gymnasium==1.0.0 (and wants the old `gym`), which diffto cannot take, so
# d3rlpy lives only here and never in pyproject.toml or setup.sh. This venv does not install
# diffto; train_d3rlpy.py runs in it and reads a dataset file written by the project.
#
# d3rlpy 2.8.1 asks for torch>=2.5.0. The CPU build torch==2.13.0 goes in first (a plain
# `torch` requirement would pull a multi-GB CUDA build), then d3rlpy, which keeps it.
# Re-running is cheap: it exits once both are importable at the pinned versions.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
TORCH_VERSION=2.13.0
D3RLPY_VERSION=2.8.1

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_VERSION" "$D3RLPY_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
want_torch, want_d3 = sys.argv[1], sys.argv[2]
assert version("torch").split("+")[0] == want_torch
assert version("d3rlpy") == want_d3
import d3rlpy  # noqa: F401  (the import must work, not just the metadata)
PYEOF
then
    echo "d3rlpy_peer: $VENV already has torch==$TORCH_VERSION and d3rlpy==$D3RLPY_VERSION; nothing to do"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "d3rlpy_peer: creating $PWD/$VENV with $("$PY" --version 2>&1)"
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
echo "d3rlpy_peer: upgrading pip"
$PIP install --upgrade pip
echo "d3rlpy_peer: installing torch==$TORCH_VERSION (CPU build) first"
$PIP install "torch==$TORCH_VERSION"
echo "d3rlpy_peer: installing d3rlpy==$D3RLPY_VERSION (keeps the torch above)"
$PIP install "d3rlpy==$D3RLPY_VERSION" "torch==$TORCH_VERSION"
"$VENV/bin/python" -c "import d3rlpy, torch, gymnasium; print('d3rlpy_peer: ready: d3rlpy', d3rlpy.__version__, '| torch', torch.__version__, '| gymnasium', gymnasium.__version__)"
