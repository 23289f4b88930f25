"""``qcow2-tool check`` against ``qemu-img check`` 7.2 on damaged images.

Each scenario builds an image with qemu-img/qemu-io and pokes bytes into it, in the spirit of QEMU's
iotests 029, 036, 039, 060, 080, 102, 108, 112, 138, 217 and 261 (recreated here, not copied).
For every scenario and for ``check``, ``check -r leaks`` and ``check -r all`` (human and JSON):
our exit code, stdout and per-item stderr lines equal qemu-img's (our extra ``OVERLAP`` lines
aside), and after the repair ``qemu-img check`` says the same about our copy as about qemu-img's.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import subprocess

import pytest

from qcow2 import cli
from tests.qemu import QEMU_IMG, qemu_img, qemu_io, require_qemu

CS = 65536


def _u64(path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def _poke(path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _header(path, field: str) -> int:
    offsets = {"l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"),
               "snapshots_offset": (64, ">Q"), "l1_size": (36, ">I"),
               "incompatible_features": (72, ">Q")}
    off, fmt = offsets[field]
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _l2(path) -> int:
    return _u64(path, _header(path, "l1_table_offset")) & 0x00FFFFFFFFFFFE00


def _refblock(path) -> int:
    return _u64(path, _header(path, "refcount_table_offset"))


def _set_refcount(path, cluster: int, value: int, width: int = 2) -> None:
    _poke(path, _refblock(path) + width * cluster, ">H" if width == 2 else ">Q", value)


def _base(path, size="1M", options="", writes=("write -P 1 0 128k",)):
    argv = ["create", "-q", "-f", "qcow2"]
    if options:
        argv += ["-o", options]
    qemu_img(*argv, str(path), size)
    if writes:
        qemu_io(str(path), *writes)


# -- scenarios: each takes a path and builds the damaged image there --------------------------
def s_clean(p):
    _base(p, writes=("write -P 1 0 128k", "write -c -P 2 256k 64k", "write -z 512k 64k"))


def s_fresh(p):
    _base(p, writes=())


def s_leak(p):
    _base(p)
    _set_refcount(p, 5, 2)


def s_leak_unreferenced(p):
    _base(p)
    _set_refcount(p, 9, 1)


def s_too_low_refcount(p):
    _base(p, writes=("write 0 64k",))
    qemu_img("snapshot", "-c", "s1", str(p))
    _set_refcount(p, 5, 1)            # the data cluster is shared: reference 2


def s_zero_refcount_data(p):
    _base(p)
    _set_refcount(p, 6, 0)


def s_zero_refcount_l2(p):
    _base(p)
    _set_refcount(p, 4, 0)


def s_zero_refcount_header(p):
    _base(p)
    _set_refcount(p, 0, 0)


def s_zero_refcount_snapshot_table(p):
    _base(p)
    qemu_img("snapshot", "-c", "s1", str(p))
    _set_refcount(p, _header(p, "snapshots_offset") // CS, 0)


def s_zero_reftable_entry(p):
    _base(p)
    _poke(p, _header(p, "refcount_table_offset"), ">Q", 0)


def s_zero_refblock(p):
    _base(p)
    with open(p, "r+b") as f:
        f.seek(_refblock(p))
        f.write(bytes(CS))


def s_l1_points_at_l1(p):
    _base(p)
    l1 = _header(p, "l1_table_offset")
    _poke(p, l1, ">Q", l1 | (1 << 63))


def s_l2_entry_in_refblock(p):
    _base(p)
    _poke(p, _l2(p), ">Q", _refblock(p) | (1 << 63))


def s_unaligned_l2(p):
    _base(p)
    l1 = _header(p, "l1_table_offset")
    _poke(p, l1, ">Q", (_l2(p) + 0x200) | (1 << 63))


def s_unaligned_data(p):
    _base(p)
    _poke(p, _l2(p), ">Q", (_u64(p, _l2(p)) + 0x200))


def s_unaligned_preallocated_zero(p):
    _base(p, writes=("write 0 64k", "write -z 0 64k"))
    _poke(p, _l2(p), ">Q", _u64(p, _l2(p)) + 0x200)


def s_l2_reserved_bits(p):
    _base(p)
    _poke(p, _l2(p), ">Q", _u64(p, _l2(p)) | 0x2)


def s_missing_copied_data(p):
    _base(p)
    _poke(p, _l2(p), ">Q", _u64(p, _l2(p)) & ~(1 << 63))


def s_missing_copied_l1(p):
    _base(p)
    l1 = _header(p, "l1_table_offset")
    _poke(p, l1, ">Q", _u64(p, l1) & ~(1 << 63))


def s_copied_on_shared(p):
    _base(p)
    qemu_img("snapshot", "-c", "s1", str(p))
    _poke(p, _l2(p), ">Q", _u64(p, _l2(p)) | (1 << 63))


def s_data_at_32_pib(p):
    _base(p)
    _poke(p, _l2(p) + 8, ">Q", (1 << 63) | (32 << 50))


def s_l2_past_eof(p):
    _base(p)
    _poke(p, _header(p, "l1_table_offset"), ">Q", (1 << 63) | (64 << 20))


def s_unaligned_reftable_entry(p):
    _base(p)
    _poke(p, _header(p, "refcount_table_offset"), ">Q", _refblock(p) + 0x200)


def s_reftable_reserved_bits(p):
    _base(p)
    _poke(p, _header(p, "refcount_table_offset"), ">Q", _refblock(p) | 0x1)


def s_refblock_outside_image(p):
    _base(p)
    _poke(p, _header(p, "refcount_table_offset") + 8, ">Q", 32 << 20)


def s_two_references(p):
    _base(p)
    _poke(p, _l2(p) + 16, ">Q", _u64(p, _l2(p)))


def s_overflow_refcount_bits_1(p):
    _base(p, options="refcount_bits=1")
    l2 = _l2(p)
    _poke(p, l2 + 16, ">Q", _u64(p, l2) & ~(1 << 63))
    _poke(p, l2, ">Q", _u64(p, l2) & ~(1 << 63))


def s_snapshots_clean(p):
    _base(p, size="4M", writes=("write -P 1 0 1M",))
    qemu_img("snapshot", "-c", "a", str(p))
    qemu_io(str(p), "write -P 2 512k 1M", "write -c -P 3 2M 128k")
    qemu_img("snapshot", "-c", "b", str(p))
    qemu_io(str(p), "discard 0 256k")


def s_snapshot_l1_leak(p):
    s_snapshots_clean(p)
    _set_refcount(p, _header(p, "snapshots_offset") // CS + 2, 1)


def s_compressed_with_copied(p):
    _base(p, writes=("write -c -P 7 0 64k",))
    _poke(p, _l2(p), ">Q", _u64(p, _l2(p)) | (1 << 63))


def s_dirty_lazy_refcounts(p):
    _base(p, options="lazy_refcounts=on", writes=())
    subprocess.run(["qemu-io", "-c", "write -P 5 0 192k", "-c", "abort", str(p)],
                   capture_output=True)


def s_corrupt_bit_only(p):
    _base(p)
    _poke(p, 72, ">Q", _header(p, "incompatible_features") | 2)


def s_extended_l2_bad_bitmap(p):
    _base(p, options="extended_l2=on", writes=("write -P 1 0 64k",))
    _poke(p, _l2(p) + 8, ">Q", 0x0000000100000001)


def s_extended_l2_unallocated_with_alloc_bits(p):
    _base(p, options="extended_l2=on", writes=("write -P 1 0 64k",))
    _poke(p, _l2(p) + 24, ">Q", 0x3)


def s_small_clusters_wide_refcounts(p):
    _base(p, size="8M", options="cluster_size=512,refcount_bits=64",
          writes=("write -P 1 0 1M", "write -P 2 4M 512k"))
    table = _header(p, "refcount_table_offset")
    block = _u64(p, table + 8)        # the second refcount block
    _poke(p, block + 8 * 3, ">Q", _u64(p, block + 8 * 3) + 1)


def s_v2_leak(p):
    _base(p, options="compat=0.10")
    _set_refcount(p, 5, 3)


def s_bitmaps_clean(p):
    _base(p)
    qemu_img("bitmap", "--add", str(p), "b0")


def s_rebuild_not_onto_live_data(p):
    """iotest 108's shape: the refcount structures are gone, and the free holes that a careless
    rebuild would use are taken by data that only the L2 tables know about."""
    _base(p, size="8M", writes=("write -P 1 0 1M", "write -P 2 4M 1M"))
    _poke(p, _header(p, "refcount_table_offset"), ">Q", 0)


SCENARIOS = {name[2:]: fn for name, fn in globals().items() if name.startswith("s_")}


def _ours(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _theirs(argv):
    proc = subprocess.run([QEMU_IMG, *argv], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def _stderr_items(text: str, ours: bool) -> list[str]:
    lines = text.splitlines()
    if ours:
        lines = [ln.replace("qcow2-tool:", "qemu-img:") for ln in lines
                 if not ln.startswith(("OVERLAP ", "{\"event\""))]
    return lines


def test_enough_scenarios():
    assert len(SCENARIOS) >= 30


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("repair", [None, "leaks", "all"])
def test_check_agrees_with_qemu_img(tmp_path, name, repair):
    require_qemu()
    original = tmp_path / "orig.qcow2"
    SCENARIOS[name](original)
    for output in ("human", "json"):
        mine = tmp_path / f"ours-{output}.qcow2"
        theirs = tmp_path / f"theirs-{output}.qcow2"
        shutil.copy(original, mine)
        shutil.copy(original, theirs)
        flags = (["-r", repair] if repair else []) + [f"--output={output}"]
        code_t, out_t, err_t = _theirs(["check", *flags, str(theirs)])
        code_o, out_o, err_o = _ours(["check", *flags, str(mine)])
        assert code_o == code_t, (out_o, err_o, out_t, err_t)
        if output == "json" and out_t:
            expected = json.loads(out_t)
            expected["filename"] = str(mine)
            assert json.loads(out_o) == expected
        else:
            assert out_o == out_t.replace(str(theirs), str(mine))
        assert _stderr_items(err_o, True) == \
            _stderr_items(err_t.replace(str(theirs), str(mine)), False)
        if repair:
            after_t = _theirs(["check", "--output=json", str(theirs)])
            after_o = _theirs(["check", "--output=json", str(mine)])
            assert after_o[0] == after_t[0], (after_o, after_t)
            if after_t[1] and after_o[1]:
                a = json.loads(after_t[1])
                b = json.loads(after_o[1])
                for d in (a, b):
                    d.pop("filename")
                    if name == "bitmaps_clean":
                        # QEMU rewrites persistent bitmaps into new clusters when it closes a
                        # read-write image; we leave them where they are
                        d.pop("image-end-offset")
                assert b == a
