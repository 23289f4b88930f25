#!/usr/bin/env bash
# Set everything up, make a qcow2 image with qemu-img (data, zero and compressed clusters, a
# snapshot), and run qcow2-tool on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
img="$work/demo.qcow2"
qemu-img create -q -f qcow2 "$img" 64M
qemu-io -f qcow2 -c 'write -P 0xab 0 1M' -c 'write -z 4M 1M' -c 'write -c -P 0x11 8M 64k' "$img" >/dev/null
qemu-img snapshot -c first "$img"
qemu-io -f qcow2 -c 'write -P 0xcd 512k 128k' "$img" >/dev/null
set -x
.venv/bin/qcow2-tool info "$img"
.venv/bin/qcow2-tool map --output=json "$img"
.venv/bin/qcow2-tool io -c 'read -P 0xcd 512k 128k' "$img"
.venv/bin/qcow2-tool convert -p -O raw -l first "$img" "$work/first.raw"
# The overlap guard with a tiny memory budget: what it cannot protect is announced as QMP events.
.venv/bin/python - "$img" <<'PY'
import sys
import qcow2
from qcow2.overlap import FIXED_OVERHEAD, IMPLEMENTATION

with qcow2.open(sys.argv[1], overlap_check="all", overlap_mem=FIXED_OVERHEAD + 64,
                node_name="demo0", on_event=lambda event: print(event.to_json())) as img:
    guard = img.guard
    print(f"{IMPLEMENTATION} overlap map: {guard.memory_used} bytes, "
          f"unprotected host ranges: {guard.unprotected()}")
    guard.budget = None
    guard.rebuild()
    print(f"after raising the budget: {guard.memory_used} bytes, unprotected: {guard.unprotected()}")
    try:
        guard.check_write(0, 512)
    except qcow2.OverlapError as e:
        print(f"write at 0x0 refused: {e}")
PY
