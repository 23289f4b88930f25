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
import os
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
               "incompatible_features": (72, ">Q"), "nb_snapshots": (60, ">I")}
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


# -- snapshot tables (iotests 080 and 261 in spirit): entries are rewritten field by field ------
_ENTRY = struct.Struct(">QIHHIIQII")    # l1 offset, l1 size, id/name lengths, dates, clock, vm32, extra
_EXTRA_V3 = struct.Struct(">QQQ")       # vm_state_size_large, disk_size, icount


def _snapshots(path) -> list[dict]:
    """The snapshot table as dicts (raw bytes for extra, id and name), read as stored."""
    with open(path, "rb") as f:
        data = f.read()
    nb, pos = struct.unpack_from(">IQ", data, 60)
    out = []
    for _ in range(nb):
        pos = (pos + 7) & ~7
        l1, l1_size, id_len, name_len, sec, nsec, clock, vm32, extra_len = \
            _ENTRY.unpack_from(data, pos)
        pos += _ENTRY.size
        extra = data[pos:pos + extra_len]
        ident = data[pos + extra_len:pos + extra_len + id_len]
        name = data[pos + extra_len + id_len:pos + extra_len + id_len + name_len]
        pos += extra_len + id_len + name_len
        out.append(dict(l1=l1, l1_size=l1_size, sec=sec, nsec=nsec, clock=clock, vm32=vm32,
                        extra=extra, id=ident, name=name))
    return out


def _table_bytes(entries: list[dict]) -> bytes:
    """Entries 8-aligned, as QEMU lays them out; ``extra_len``/``id_len``/``name_len`` keys
    override the stored lengths (to declare more than is there)."""
    out = bytearray()
    for e in entries:
        out += bytes(-len(out) % 8)
        out += _ENTRY.pack(e["l1"], e["l1_size"], e.get("id_len", len(e["id"])),
                           e.get("name_len", len(e["name"])), e["sec"], e["nsec"], e["clock"],
                           e["vm32"], e.get("extra_len", len(e["extra"])))
        out += e["extra"] + e["id"] + e["name"]
    return bytes(out)


def _write_snapshots(path, entries: list[dict], nb: int | None = None) -> int:
    """Write the table in place (at snapshots_offset) and set nb_snapshots; returns its end."""
    offset = _header(path, "snapshots_offset")
    raw = _table_bytes(entries)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(raw)
    _poke(path, 60, ">I", len(entries) if nb is None else nb)     # nb_snapshots
    return offset + len(raw)


def _count_clusters(path, first: int, end: int) -> None:
    """Give the clusters of ``[first cluster, end byte)`` refcount 1 (a table we made longer)."""
    for cluster in range(first, -(-end // CS)):
        _set_refcount(path, cluster, 1)


def _bare_entry(name_len: int = 0) -> dict:
    """A complete entry without an L1 table (version 3 extra data with the disk size)."""
    return dict(l1=0, l1_size=0, sec=0, nsec=0, clock=0, vm32=0,
                extra=_EXTRA_V3.pack(0, 1 << 20, 0), id=b"", name=b"", name_len=name_len,
                id_len=name_len)


def _one_snapshot(p, options=""):
    _base(p, options=options)
    qemu_img("snapshot", "-c", "s1", str(p))


def s_snapshot_l1_fields_bad(p):
    """One snapshot's L1 table unaligned, another's too large (> 32 MiB): the ids and names in
    the messages are C strings (cut at a NUL)."""
    _base(p)
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_img("snapshot", "-c", "s2", str(p))
    table = _snapshots(p)
    table[0]["l1"] += 0x200
    table[1].update(l1_size=0x400001, id=b"2\0x", name=b"s2\0y")
    _write_snapshots(p, table)


def s_snapshot_l1_past_eof(p):
    _one_snapshot(p)
    table = _snapshots(p)
    table[0]["l1"] = 64 << 20
    _write_snapshots(p, table)


def s_snapshot_l1_offset_negative(p):
    """An L1 offset that is negative as a signed 64-bit number: QEMU fails the check with ENOMEM
    (it would size its count array by it); we fail the same way without allocating."""
    _one_snapshot(p)
    table = _snapshots(p)
    table[0]["l1"] = 0xFFFFFFFFFFF00000
    _write_snapshots(p, table)


def s_snapshot_extra_data(p):
    """Unknown extra data (kept by a rewrite), too much extra data (cut to 1024 bytes by -r all),
    an entry without the disk size (incomplete, v3), an id with a NUL and a duplicate id (QEMU
    does not mind): -r all writes a new table with all of it fixed."""
    _base(p)
    for name in ("s1", "s2", "s3", "s4"):
        qemu_img("snapshot", "-c", name, str(p))
    table = _snapshots(p)
    table[0].update(extra=_EXTRA_V3.pack(0x100000005, 1 << 20, 5) + b"\xab" * 8, vm32=7)
    table[1].update(extra=table[1]["extra"][:8], id=b"1\0x")
    table[2]["id"] = b"1"
    table[3]["extra_len"] = 1025     # last: QEMU reads the id and name after all 1025 bytes
    _write_snapshots(p, table)


def s_v2_snapshot_extra_data(p):
    """Version 2: no extra data is fine; too much is cut by -r all (the rewrite adds the disk
    size)."""
    _base(p, options="compat=0.10")
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_img("snapshot", "-c", "s2", str(p))
    table = _snapshots(p)
    table[0]["extra"] = b""
    table[1]["extra_len"] = 1025
    _write_snapshots(p, table)


def s_snapshots_too_many(p):
    """65537 entries: -r all drops the last one and only rewrites nb_snapshots."""
    _one_snapshot(p)
    end = _write_snapshots(p, _snapshots(p) + [_bare_entry()] * 65536)
    _count_clusters(p, _header(p, "snapshots_offset") // CS + 1, end)


def s_snapshot_table_too_big(p):
    """Entries with 64 KiB ids and names (all zeros: holes of a sparse file) pass 64 MiB: -r all
    drops the overhanging ones and rewrites nb_snapshots; the clusters they held leak."""
    _one_snapshot(p)
    offset = _header(p, "snapshots_offset")
    pos = _write_snapshots(p, _snapshots(p), nb=521) - offset
    head = _table_bytes([_bare_entry(name_len=65535)])
    with open(p, "r+b") as f:
        for _ in range(520):            # each header where the declared lengths put it
            pos = (pos + 7) & ~7
            f.seek(offset + pos)
            f.write(head)
            pos += len(head) + 2 * 65535
        f.truncate(offset + pos)
    _count_clusters(p, offset // CS + 1, offset + pos)


def s_snapshot_table_offset_unaligned(p):
    """Too many entries at an unaligned offset: -r all drops the excess, then fails."""
    _one_snapshot(p)
    _poke(p, 60, ">I", 65537)
    _poke(p, 64, ">Q", _header(p, "snapshots_offset") + 8)


def s_snapshot_table_past_eof(p):
    """The table reads as zeros (an incomplete entry without L1): -r all writes a new table and
    fails to free the old one (refcount already 0), as QEMU does."""
    _one_snapshot(p)
    _poke(p, 64, ">Q", 64 << 20)


def s_snapshot_table_cut_by_eof(p):
    """The file ends inside the first entry's name and the second entry lies past the end (zeros,
    incomplete); a data cluster's refcount is 0 too, so -r all rebuilds the refcounts first, then
    writes the new table."""
    _one_snapshot(p)
    _poke(p, 60, ">I", 2)
    _set_refcount(p, 5, 0)
    with open(p, "r+b") as f:
        f.truncate(_header(p, "snapshots_offset") + 40 + 24 + 2)


def s_snapshot_inactive_l2_refcounts(p):
    """A copy-on-write leaves an L2 table only the snapshot uses: its refcount too high, a shared
    data cluster's too low, and the snapshot's L1 entry has a reserved bit set."""
    _one_snapshot(p)
    qemu_io(str(p), "write -P 9 0 4k")
    l1 = _snapshots(p)[0]["l1"]
    l2 = _u64(p, l1) & 0x00FFFFFFFFFFFE00
    _set_refcount(p, l2 // CS, 2)
    _set_refcount(p, 6, 1)
    _poke(p, l1, ">Q", l2 | 1)


def s_snapshot_count_without_table(p):
    """nb_snapshots 1 with snapshots_offset 0 (found by a new-user review): the "table" is the
    header.  Repairing, qemu-img drops the entry and writes the header over what claims to be the
    snapshot table (ours refused that write as an overlap and failed the check)."""
    _base(p, writes=("write -P 1 0 128k",))
    _poke(p, 60, ">I", 1)


SCENARIOS = {name[2:]: fn for name, fn in globals().items() if name.startswith("s_")}


def _copy(src, dst) -> None:
    """Copy keeping holes (the 64 MiB snapshot table scenario is a sparse file)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
                end = os.lseek(fin.fileno(), pos, os.SEEK_HOLE)
            except OSError:                 # no more data
                break
            fin.seek(pos)
            fout.seek(pos)
            fout.write(fin.read(end - pos))
            pos = end
        fout.truncate(size)


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


# qemu-img takes ~8 s for each -r all of 65536 snapshots: that repair is compared once, below
_SLOW_REPAIRS = {("snapshots_too_many", "all")}


@pytest.mark.parametrize("name, repair", [(name, repair) for repair in (None, "leaks", "all")
                                          for name in sorted(SCENARIOS)
                                          if (name, repair) not in _SLOW_REPAIRS])
def test_check_agrees_with_qemu_img(tmp_path, name, repair):
    require_qemu()
    original = tmp_path / "orig.qcow2"
    SCENARIOS[name](original)
    for output in ("human", "json"):
        mine = tmp_path / f"ours-{output}.qcow2"
        theirs = tmp_path / f"theirs-{output}.qcow2"
        _copy(original, mine)
        _copy(original, theirs)
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


def test_too_many_snapshots_repair(tmp_path):
    """``check -r all`` of 65537 snapshots, against qemu-img 7.2's output recorded once (a live
    comparison costs ~40 s): one "Discarding" line, nb_snapshots rewritten in place; then
    ``qemu-img check`` finds our repaired image clean, with the table where it was."""
    require_qemu()
    path = tmp_path / "many.qcow2"
    s_snapshots_too_many(path)
    code, out, err = _ours(["check", "-r", "all", str(path)])
    assert (code, _stderr_items(err, True)) == (0, ["Discarding 1 overhanging snapshots"])
    assert out == ("The following inconsistencies were found and repaired:\n\n"
                   "    0 leaked clusters\n    1 corruptions\n\n"
                   "Double checking the fixed image now...\n"
                   "No errors were found on the image.\n"
                   "2/16 = 12.50% allocated, 0.00% fragmented, 0.00% compressed clusters\n"
                   "Image end offset: 4784128\n")
    assert (_header(path, "snapshots_offset"), _header(path, "nb_snapshots")) == (0x80000, 65536)
    after = _theirs(["check", "--output=json", str(path)])
    assert after[0] == 0 and json.loads(after[1])["image-end-offset"] == 4784128
