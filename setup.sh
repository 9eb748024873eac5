#!/usr/bin/env bash
# Sets up everything diffto needs on a fresh Debian 12 machine with Python 3.11:
# system packages (SuiteSparse for scikit-sparse, OSMesa for headless rendering, ffmpeg
# comes with imageio-ffmpeg), a virtual environment in .venv, the CPU build of torch first
# (a plain `torch` requirement would pull a multi-GB CUDA build), then the packages that must
# build against that torch, then diffto itself in editable mode with its extras.
# Re-running is cheap: a stamp keyed on this script and pyproject.toml skips finished work.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.diffto-setup-$(cat setup.sh pyproject.toml | sha256sum | cut -c1-16)

if [ -f "$STAMP" ]; then
    exit 0
fi

need_apt=()
for pkg in libsuitesparse-dev libosmesa6 build-essential; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ! "$PY" -c "import venv, ensurepip" >/dev/null 2>&1; then
    need_apt+=("python3-venv")
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing system packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip setuptools wheel
$PIP install torch==2.13.0
# scikit-sparse 0.5 does not build against Debian 12's SuiteSparse 5.12; 0.4.16 does.
$PIP install "cython<3.1" numpy scipy
$PIP install --no-build-isolation scikit-sparse==0.4.16
$PIP install --no-build-isolation theseus-ai==0.2.3
# mpc.pytorch, the peer in benchmarks/: it pins numpy<2 but runs with numpy 2.
$PIP install --no-deps mpc==0.0.6
$PIP install -e ".[theseus,dev]"
rm -f "$VENV"/.diffto-setup-*
touch "$STAMP"
echo "setup: done ($VENV)"
