#!/usr/bin/env bash
# Set everything up, make a qcow2 image with qemu-img (data, zero and compressed clusters, a
# snapshot, 512-byte clusters so that it has thousands of metadata clusters), and run the main job
# on it: qcow2-tool check with a capped overlap map, first clean, then on a damaged copy with a
# repair.  Then the other commands (info, map, io, convert, resize) and the library's guard.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
img="$work/demo.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=512 "$img" 64M
qemu-io -f qcow2 -c 'write -P 0xab 0 8M' -c 'write -z 16M 1M' -c 'write -c -P 0x11 24M 64k' "$img" >/dev/null
qemu-img snapshot -c first "$img"
qemu-io -f qcow2 -c 'write -P 0xcd 512k 128k' "$img" >/dev/null
tool=.venv/bin/qcow2-tool
set -x
# the main job: check with the overlap map capped at 4 MiB (enough here: no event), then at 1 KiB
# (the ranges it cannot cover are announced as QMP events, here into a file, and named in the
# summary; the JSON output keeps exactly qemu-img's keys)
$tool check "$img" --overlap-mem 4M
$tool check "$img" --overlap-mem 1k --events "$work/events.jsonl"
head -3 "$work/events.jsonl"
$tool check --output=json "$img" --overlap-mem 1k
# a damaged copy: one refcount raised (a leak) and one L2 entry pointed at the refcount table
cp "$img" "$work/damaged.qcow2"
.venv/bin/python - "$work/damaged.qcow2" <<'PY'
import struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    head = f.read(72)
    l1_offset, = struct.unpack(">Q", head[40:48])
    reftable_offset, = struct.unpack(">Q", head[48:56])
    f.seek(reftable_offset); refblock, = struct.unpack(">Q", f.read(8))
    f.seek(refblock + 2 * 2); count, = struct.unpack(">H", f.read(2))
    f.seek(refblock + 2 * 2); f.write(struct.pack(">H", count + 1))  # cluster 2: a leak
    f.seek(l1_offset); l2, = struct.unpack(">Q", f.read(8))
    f.seek((l2 & ((1 << 56) - 512)) + 8 * 3)
    f.write(struct.pack(">Q", (1 << 63) | reftable_offset))         # data on the refcount table
PY
$tool check "$work/damaged.qcow2" --overlap-mem 4M || echo "exit status $? (2: corruptions)"
$tool check -r all "$work/damaged.qcow2" --overlap-mem 4M || echo "exit status $?"
qemu-img check "$work/damaged.qcow2"     # QEMU's verdict on our repair
# the other commands, with qemu-img's and qemu-io's words
$tool info "$img"
$tool map --output=json --max-length 1M "$img"
$tool io -c 'read -P 0xcd 512k 128k' -c 'write -P 0x42 1M 64k' -c 'discard 2M 1M' "$img"
$tool resize "$img" +64M
$tool convert -p -O raw -l first "$img" "$work/first.raw"
$tool convert -O qcow2 -c "$img" "$work/compressed.qcow2"
qemu-img compare "$img" "$work/compressed.qcow2"
# The library's guard with a tiny memory budget: what it cannot protect is announced as QMP events.
.venv/bin/python - "$img" <<'PY'
import sys
import qcow2
from qcow2.overlap import FIXED_OVERHEAD, IMPLEMENTATION

with qcow2.open(sys.argv[1], overlap_check="all", overlap_mem=FIXED_OVERHEAD + 64,
                node_name="demo0", on_event=lambda event: print(event.to_json())) as img:
    guard = img.guard
    print(f"{IMPLEMENTATION} overlap map: {guard.memory_used} bytes, "
          f"unprotected host ranges: {len(guard.unprotected())}")
    guard.budget = None
    guard.rebuild()
    print(f"after raising the budget: {guard.memory_used} bytes, unprotected: {guard.unprotected()}")
    try:
        guard.check_write(0, 512)
    except qcow2.OverlapError as e:
        print(f"write at 0x0 refused: {e}")
PY
