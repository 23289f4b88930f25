#!/usr/bin/env bash
# Set up everything qcow2 needs on a fresh Debian machine (Python >= 3.10):
# qemu-utils (the test oracle), a C compiler and Python headers (the Cython extension),
# a virtualenv in .venv with the package installed editable plus its test dependencies.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
apt_pkgs=()
command -v qemu-img >/dev/null 2>&1 || apt_pkgs+=(qemu-utils)
command -v "$PY" >/dev/null 2>&1 || { PY=python3; apt_pkgs+=(python3); }
command -v gcc >/dev/null 2>&1 || apt_pkgs+=(gcc)
if command -v "$PY" >/dev/null 2>&1; then
  "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_pkgs+=(python3-venv)
  "$PY" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || apt_pkgs+=(python3-dev)
fi
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  echo "setup: installing ${apt_pkgs[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/python -c 'import qcow2.overlap as o; print("setup: qcow2", o.IMPLEMENTATION, "range map")' 2>/dev/null \
  || echo "setup: qcow2 installed" >&2
