"""The writer on damaged and edge-case images, side by side with QEMU 7.2.

* Damaged images in the spirit of QEMU's iotest 060: each image is built with qemu-img/qemu-io and
  byte pokes; the same write runs through ``qemu-io`` on one copy and through our writer on another.
  We then compare what the two did: whether the corrupt bit ends up set, the corruption message
  (QEMU prints it in its "Marking image as corrupt" line, we put it in ``BLOCK_IMAGE_CORRUPTED``),
  that later writes and read-write opens are refused, and that we leave every metadata byte alone
  that QEMU leaves alone.
* Refcount table growth: from a completely full table (iotest 044's situation) and where the new
  table competes with new refcount blocks and holes for space (iotest 121's); ``qemu-img check``
  must be clean and ``qemu-img compare`` against a raw model must match.
* The guard stays current: after random writes its map equals one rebuilt from the image.
* Running out of space in the middle of an allocation (ENOSPC) leaks at most, never corrupts.
* Bad requests (negative, past the end, unaligned compressed) are refused and change nothing.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import random
import re
import shutil
import struct
import subprocess

import pytest

import qcow2
from qcow2 import overlap_types as T
from qcow2.errors import CorruptImageError, OverlapError, Qcow2Error, RequestError
from qcow2.events import BLOCK_IMAGE_CORRUPTED
from qcow2.guard import OverlapGuard
from qcow2.metadata import iter_metadata
from qcow2.refcount import RefcountReader

from qemu import QEMU_IO, create, info_json, qemu_img, qemu_io, require_qemu

CORRUPT_LINE = re.compile(r"qcow2: Marking image as corrupt: (.*); further corruption events "
                          r"will be suppressed")
CORRUPT_BYTE = 79            # last byte of incompatible_features (big endian): bit 1 = corrupt
REFUSE_RW = "Image is corrupt; cannot be opened read/write"

# Layout of `qemu-img create -f qcow2 img 64M` (QEMU 7.2, 64 KiB clusters), see FORMAT-NOTES.md:
# header, refcount table, refcount block 0, L1 table; the first write adds an L2 table and data.
REFTABLE, REFBLOCK, L1, L2, DATA = 0x10000, 0x20000, 0x30000, 0x40000, 0x50000
COPIED = 1 << 63


def _u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def _poke(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _peek(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _corrupt_bit(path) -> bool:
    return bool(info_json(path)["format-specific"]["data"].get("corrupt"))


def _run(*argv) -> subprocess.CompletedProcess:
    require_qemu()
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True)


# -- building the damaged images -------------------------------------------------------------------

def _fresh(path) -> None:
    create(path, "64M")
    assert _peek(path, 48, 8) == _u64(REFTABLE) and _peek(path, 40, 8) == _u64(L1)
    assert _peek(path, REFTABLE, 8) == _u64(REFBLOCK)


def _written(path) -> None:
    """Two data clusters at guest 0 and 64k: L2 table at 0x40000, data at 0x50000 and 0x60000."""
    _fresh(path)
    qemu_io(path, "write -P 1 0 128k")
    assert _peek(path, L1, 8) == _u64(COPIED | L2)
    assert _peek(path, L2, 16) == _u64(COPIED | DATA) + _u64(COPIED | (DATA + 0x10000))


def _snapshotted(path) -> tuple[int, int]:
    """One data cluster, then snapshot s1.  Returns (snapshot L1 offset, snapshot table offset)."""
    _fresh(path)
    qemu_io(path, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "s1", path)
    with qcow2.open(path) as img:
        (snap,) = img.snapshots
        return snap.l1_table_offset, img.header.snapshots_offset


def _inactive_l2(path) -> None:
    """After a snapshot and a rewrite, the old L2 table (0x40000) belongs to the snapshot only;
    the active L1 entry is pointed back at it, with COPIED set."""
    _snapshotted(path)
    qemu_io(path, "write -P 2 0 64k")
    with qcow2.open(path) as img:
        assert img.l1_table[0] & ~COPIED != L2
    _poke(path, L1, _u64(COPIED | L2))


def _zero_refcount(path, host_offset: int) -> None:
    """Zero the 16-bit refcount of one cluster (refcount block 0 covers them all here)."""
    _poke(path, REFBLOCK + 2 * (host_offset >> 16), b"\0\0")


def _build_l1_on_l1(p): _fresh(p); _poke(p, L1, _u64(COPIED | L1))
def _build_l2_on_l2(p): _written(p); _poke(p, L2, _u64(COPIED | L2))
def _build_l2_in_refblock(p): _written(p); _poke(p, L2, _u64(COPIED | REFBLOCK))
def _build_l1_on_reftable(p): _written(p); _poke(p, L1, _u64(COPIED | REFTABLE))
def _build_l2_offset_zero(p): _written(p); _poke(p, L2, _u64(COPIED))
def _build_header_refcount_l2(p): _fresh(p); _zero_refcount(p, 0)
def _build_header_refcount_data(p): _written(p); _zero_refcount(p, 0)
def _build_reftable_entry_zero(p): _written(p); _poke(p, REFTABLE, _u64(0))
def _build_refblock_zeroed(p): _fresh(p); _poke(p, REFBLOCK, bytes(8))
def _build_l2_unaligned_copied(p): _written(p); _poke(p, L2 + 8, _u64(COPIED | 0x62A00))
def _build_l2_unaligned_cow(p): _written(p); _poke(p, L2 + 8, _u64(0x62A00))
def _build_l1_unaligned(p): _written(p); _poke(p, L1, _u64(COPIED | 0x42A00))


def _build_l1_on_inactive_l1(p):
    snap_l1, _ = _snapshotted(p)
    _poke(p, L1, _u64(COPIED | snap_l1))


def _build_snapshot_table_refcount(p):
    _, table = _snapshotted(p)
    _zero_refcount(p, table)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    build: object
    offset: int
    length: int
    compressed: bool = False
    overlap_check: str = "cached"


CASES = [
    Case("l1-entry-on-l1-table", _build_l1_on_l1, 0, 512),
    Case("l2-entry-on-l2-table", _build_l2_on_l2, 0, 512),
    Case("l2-entry-in-refblock", _build_l2_in_refblock, 0, 512),
    Case("l1-entry-on-reftable", _build_l1_on_reftable, 0, 512),
    Case("inactive-l2-overlap-all", _inactive_l2, 0, 512, overlap_check="all"),
    Case("inactive-l2-overlap-cached", _inactive_l2, 0, 512),
    Case("l2-entry-copied-offset-zero", _build_l2_offset_zero, 0, 512),
    Case("header-refcount-zero-l2-alloc", _build_header_refcount_l2, 0x10000, 0x10000),
    Case("header-refcount-zero-data-alloc", _build_header_refcount_data, 0x20000, 512),
    Case("header-refcount-zero-compressed", _build_header_refcount_data, 0x20000, 0x10000,
         compressed=True),
    Case("snapshot-table-refcount-zero", _build_snapshot_table_refcount, 0x10000, 512),
    Case("reftable-entry-zero", _build_reftable_entry_zero, 0x20000, 0x10000),
    Case("refblock-zeroed", _build_refblock_zeroed, 0x10000, 0x10000),
    Case("l2-entry-unaligned-in-place", _build_l2_unaligned_copied, 0x10000, 512),
    Case("l2-entry-unaligned-cow", _build_l2_unaligned_cow, 0x10000, 512),
    Case("l1-entry-unaligned", _build_l1_unaligned, 0, 512),
]

# Known differences from QEMU 7.2: (test, case) -> reason (none left).
KNOWN: dict = {}


# QEMU accepts these writes (no corruption detected); the others it refuses.
ACCEPTED = ("inactive-l2-overlap-cached", "l2-entry-copied-offset-zero")


def _params(test: str, cases=None):
    out = []
    for case in cases or CASES:
        reason = KNOWN.get((test, case.id))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


@dataclasses.dataclass
class Outcome:
    original: bytes
    metadata: list[tuple[int, int]]      # (offset, length) of every structure in the original
    qemu_failed: bool
    qemu_msg: str | None
    qemu_corrupt: bool
    qemu_bytes: bytes
    qemu_second: str                     # qemu-io's output for the same write, run again
    qemu_path: str
    ours_errors: list                    # per write: the exception or None
    ours_close_error: Exception | None
    events: list
    ours_corrupt: bool
    ours_bytes: bytes
    ours_reopen: Exception | None
    ours_path: str


def _qemu_write(path, case: Case) -> subprocess.CompletedProcess:
    cmd = f"write {'-c ' if case.compressed else ''}-P 0x2a {case.offset} {case.length}"
    if case.overlap_check == "cached":
        return _run(QEMU_IO or "qemu-io", "-f", "qcow2", "-c", cmd, path)
    opts = f"driver=qcow2,file.filename={path},overlap-check={case.overlap_check}"
    return _run(QEMU_IO or "qemu-io", "--image-opts", "-c", cmd, opts)


def _our_write(img, case: Case) -> None:
    data = b"\x2a" * case.length
    if case.compressed:
        img.write_compressed(data, case.offset)
    else:
        img.pwrite(data, case.offset)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    @functools.lru_cache(maxsize=None)
    def run(case: Case) -> Outcome:
        d = tmp_path_factory.mktemp(case.id)
        base, qpath, opath = str(d / "base.qcow2"), str(d / "qemu.qcow2"), str(d / "ours.qcow2")
        case.build(base)
        original = open(base, "rb").read()
        with qcow2.open(base) as img:
            metadata = [(o, n) for o, n, _ in iter_metadata(img, T.OL_ALL)]
        shutil.copy(base, qpath)
        shutil.copy(base, opath)

        proc = _qemu_write(qpath, case)
        text = proc.stdout + proc.stderr
        m = CORRUPT_LINE.search(text)
        qemu_failed = proc.returncode != 0 or "failed" in text
        qemu_corrupt = _corrupt_bit(qpath)
        qemu_bytes = open(qpath, "rb").read()
        second = _qemu_write(qpath, case)

        events, errors, close_error = [], [], None
        img = qcow2.open(opath, "r+", overlap_check=case.overlap_check, on_event=events.append)
        for _ in range(2):
            try:
                _our_write(img, case)
                errors.append(None)
            except Qcow2Error as e:
                errors.append(e)
        try:
            img.close()
        except Qcow2Error as e:
            close_error = e
        ours_bytes = open(opath, "rb").read()
        ours_corrupt = _corrupt_bit(opath)
        reopen = None
        try:
            qcow2.open(opath, "r+").close()
        except Qcow2Error as e:
            reopen = e
        return Outcome(original, metadata, qemu_failed, m and m.group(1), qemu_corrupt, qemu_bytes,
                       second.stdout + second.stderr, qpath, errors, close_error, events,
                       ours_corrupt, ours_bytes, reopen, opath)
    return run


@pytest.mark.parametrize("case", _params("corrupt-bit"))
def test_corrupt_bit_like_qemu(outcome, case):
    o = outcome(case)
    assert o.ours_corrupt == o.qemu_corrupt
    assert o.qemu_corrupt == (o.qemu_msg is not None)


@pytest.mark.parametrize("case", _params("first-write"))
def test_first_write_fails_like_qemu(outcome, case):
    o = outcome(case)
    first = o.ours_errors[0]
    if o.qemu_failed:
        assert isinstance(first, CorruptImageError), first
    else:
        assert first is None and o.ours_errors[1] is None and o.ours_close_error is None


@pytest.mark.parametrize("case", _params("message"))
def test_corruption_message_like_qemu(outcome, case):
    """One BLOCK_IMAGE_CORRUPTED event whose msg is QEMU's, and the error type to match: an overlap
    refusal is an OverlapError."""
    o = outcome(case)
    corrupted = [e for e in o.events if e.name == BLOCK_IMAGE_CORRUPTED]
    if o.qemu_msg is None:
        assert corrupted == []
        return
    assert len(corrupted) == 1, [e.data for e in o.events]     # later ones are suppressed
    data = corrupted[0].data
    assert data["msg"] == o.qemu_msg
    assert data["fatal"] is True and data["node-name"] == "ours.qcow2" and data["device"] == ""
    raised = next(e for e in o.ours_errors if e is not None)
    assert str(raised) == o.qemu_msg
    assert isinstance(raised, OverlapError) == o.qemu_msg.startswith(
        "Preventing invalid write on metadata")


@pytest.mark.parametrize("case", _params("refused"))
def test_later_writes_and_rw_open_refused(outcome, case):
    o = outcome(case)
    if not o.qemu_corrupt:
        assert o.ours_reopen is None and REFUSE_RW not in o.qemu_second
        return
    assert isinstance(o.ours_errors[1], CorruptImageError)
    assert REFUSE_RW in o.qemu_second
    assert isinstance(o.ours_reopen, CorruptImageError)
    assert str(o.ours_reopen) == REFUSE_RW
    with qcow2.open(o.ours_path) as img:     # read-only still opens, and knows
        assert img.corrupt


def _changed_metadata(original: bytes, after: bytes, regions) -> set[int]:
    """Offsets of metadata bytes that differ, the corrupt bit left out."""
    after = bytearray(after.ljust(len(original), b"\0"))
    original = bytearray(original)
    after[CORRUPT_BYTE] &= ~2
    original[CORRUPT_BYTE] &= ~2
    changed = set()
    for offset, length in regions:
        end = min(offset + length, len(original))
        if original[offset:end] == after[offset:end]:
            continue
        changed |= {i for i in range(offset, end) if original[i] != after[i]}
    return changed


@pytest.mark.parametrize("case", _params("unchanged", [c for c in CASES if c.id not in ACCEPTED]))
def test_metadata_left_alone_where_qemu_leaves_it(outcome, case):
    o = outcome(case)
    assert o.qemu_corrupt
    regions = [(0, 0x10000)] + o.metadata
    ours = _changed_metadata(o.original, o.ours_bytes, regions)
    theirs = _changed_metadata(o.original, o.qemu_bytes, regions)
    assert ours <= theirs, sorted(hex(i) for i in ours - theirs)[:16]


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ACCEPTED], ids=lambda c: c.id)
def test_same_result_when_qemu_accepts(outcome, case):
    """QEMU writes without complaint (the inactive L2 table is not checked in "cached" mode; an L2
    entry of COPIED with offset 0 is unallocated): so do we, with the same guest data and the same
    `qemu-img check` verdict."""
    o = outcome(case)
    assert not o.qemu_failed and not o.qemu_corrupt
    assert o.ours_errors == [None, None] and o.events == []
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", o.qemu_path, o.ours_path, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr

    def verdict(path):
        proc = qemu_img("check", "--output=json", path, check=False)
        data = json.loads(proc.stdout)
        return proc.returncode, data.get("corruptions", 0), data.get("leaks", 0)

    assert verdict(o.ours_path) == verdict(o.qemu_path)


def test_inactive_l2_overlap_depends_on_mode(outcome):
    """The same image and write: refused with overlap_check="all", accepted by default."""
    by_id = {c.id: c for c in CASES}
    strict = outcome(by_id["inactive-l2-overlap-all"])
    default = outcome(by_id["inactive-l2-overlap-cached"])
    assert strict.qemu_corrupt and not default.qemu_corrupt
    assert isinstance(strict.ours_errors[0], OverlapError)
    assert strict.ours_errors[0].types & T.OL_INACTIVE_L2
    assert default.ours_errors[0] is None


def test_l2_table_on_inactive_l1_refused_where_qemu_damages_the_snapshot(tmp_path):
    """A deliberate difference: the active L1 entry points at the snapshot's L1 table, whose first
    entry (COPIED, the shared L2 table) then reads as an in-place data cluster.  QEMU 7.2 loads
    the "L2 table" without an overlap check and writes guest data over the snapshot's L2 table
    (inactive L2 tables are not checked in "cached" mode): the write succeeds and the snapshot is
    damaged.  We check an L2 table's own position before using it, find the inactive L1 table
    there, and refuse."""
    base, q, ours = (str(tmp_path / n) for n in ("base.qcow2", "q.qcow2", "ours.qcow2"))
    _build_l1_on_inactive_l1(base)
    shutil.copy(base, q)
    shutil.copy(base, ours)
    proc = _run(QEMU_IO or "qemu-io", "-f", "qcow2", "-c", "write -P 0x2a 0 512", q)
    assert proc.returncode == 0 and not _corrupt_bit(q)
    assert _peek(q, L2, 512) == b"\x2a" * 512            # QEMU wrote over the L2 table
    assert qemu_img("check", q, check=False).returncode == 2
    events = []
    with qcow2.open(ours, "r+", on_event=events.append) as img:
        with pytest.raises(OverlapError) as exc:
            img.pwrite(b"\x2a" * 512, 0)
    assert str(exc.value) == ("Preventing invalid write on metadata "
                              "(overlaps with inactive L1 table)")
    assert [e.data["msg"] for e in events] == [str(exc.value)]
    assert _peek(ours, L2, 512) == _peek(base, L2, 512) and _corrupt_bit(ours)


def test_read_path_corruption_read_only_changes_nothing(tmp_path):
    """Reading a cluster whose L2 entry is unaligned from a read-only open: QEMU and we both fail
    the read and leave the image alone."""
    base = str(tmp_path / "base.qcow2")
    _build_l2_unaligned_cow(base)
    q_ro = str(tmp_path / "q_ro.qcow2")
    shutil.copy(base, q_ro)
    ro = _run(QEMU_IO or "qemu-io", "-r", "-f", "qcow2", "-c", "read 64k 512", q_ro)
    assert "read failed" in ro.stdout + ro.stderr and not _corrupt_bit(q_ro)
    with qcow2.open(base) as img:
        with pytest.raises(CorruptImageError) as exc:
            img.pread(512, 0x10000)
    assert "0x62a00" in str(exc.value)
    assert open(base, "rb").read() == open(q_ro, "rb").read()


def test_read_path_corruption_marks_writable_image_corrupt(tmp_path):
    """The same read from an image opened read-write: QEMU marks the image corrupt (one fatal
    event with its message) and refuses later writes; so must we."""
    base = str(tmp_path / "base.qcow2")
    _build_l2_unaligned_cow(base)
    q_rw, ours = str(tmp_path / "q_rw.qcow2"), str(tmp_path / "ours.qcow2")
    shutil.copy(base, q_rw)
    shutil.copy(base, ours)
    rw = _run(QEMU_IO or "qemu-io", "-f", "qcow2", "-c", "read 64k 512", q_rw)
    assert "read failed" in rw.stdout + rw.stderr and _corrupt_bit(q_rw)
    msg = CORRUPT_LINE.search(rw.stderr).group(1)
    events = []
    with qcow2.open(ours, "r+", on_event=events.append) as img:
        with pytest.raises(CorruptImageError) as exc:
            img.pread(512, 0x10000)
        assert str(exc.value) == msg
        assert [e.data["msg"] for e in events] == [msg]
        assert img.corrupt
        with pytest.raises(CorruptImageError):
            img.pwrite(b"x", 0)
    assert _corrupt_bit(ours)


# -- refcount table growth (iotests 044 and 121) ---------------------------------------------------

SMALL = 512                   # cluster size
RC_ENTRIES = 64               # refcount_bits=64: 512 * 8 / 64 entries per refcount block
FULL_END = RC_ENTRIES * RC_ENTRIES        # clusters a one-cluster reftable (64 entries) describes


def _image_end_cluster(path) -> int:
    out = qemu_img("check", "--output=json", path, check=False).stdout
    return json.loads(out)["image-end-offset"] // SMALL


def _reftable_state(path) -> tuple[int, int, int]:
    """(refcount_table_clusters, entries in use, entries)"""
    with qcow2.open(path) as img:
        table = RefcountReader(img._file, img.header).reftable
        return img.header.refcount_table_clusters, sum(1 for e in table if e), len(table)


@pytest.fixture(scope="module")
def full_reftable(tmp_path_factory):
    """A qemu-img image with 512-byte clusters and 64-bit refcounts whose one-cluster refcount table
    is completely full: 64 refcount blocks, and the file ends exactly at the last cluster they can
    describe (4096 clusters), so the next allocation needs a 65th block and a bigger table.
    Returns (path, raw copy of its guest content)."""
    d = tmp_path_factory.mktemp("reftable")
    path = str(d / "full.qcow2")
    create(path, "4M", options={"cluster_size": SMALL, "refcount_bits": 64})
    # one sector in every L2 range (64 clusters of guest space) allocates all 128 L2 tables ...
    cmds = [f"write -P {k % 250 + 1} {k * 64 * SMALL} 512" for k in range(128)]
    qemu_io(path, *cmds)
    # ... then fill guest clusters between them until the file reaches cluster 4096 exactly; each
    # new data cluster costs one cluster (plus a refcount block every 64 clusters)
    guest_cluster = 0
    while True:
        remaining = FULL_END - _image_end_cluster(path)
        if remaining <= 0:
            break
        want = max(1, remaining - remaining // 60 - 2) if remaining > 4 else 1
        n = 0
        found = 0
        while found < want:
            if (guest_cluster + n) % 64:
                found += 1
            n += 1
        qemu_io(path, f"write -P 9 {guest_cluster * SMALL} {n * SMALL}")
        guest_cluster += n
    assert _image_end_cluster(path) == FULL_END
    assert _reftable_state(path) == (1, RC_ENTRIES, RC_ENTRIES)
    assert qemu_img("check", path, check=False).returncode == 0
    raw = str(d / "full.raw")
    qemu_img("convert", "-O", "raw", path, raw)
    return path, open(raw, "rb").read()


def _assert_like_model(path, model: bytes, tmp_path) -> None:
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    check = qemu_img("check", str(path), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(path), str(raw), check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def _no_structure_overlaps(img) -> None:
    """Every metadata structure and every data cluster has host clusters of its own (L2 tables
    may be shared between the active L1 and snapshots; none here)."""
    cs = img.cluster_size
    owner: dict[int, int] = {}
    for offset, length, type_bit in iter_metadata(img, T.OL_ALL):
        for c in range(offset // cs, (offset + length - 1) // cs + 1):
            assert c not in owner, (hex(c * cs), owner.get(c), type_bit)
            owner[c] = type_bit
    for ext in img.map():
        if ext.data and ext.offset is not None:
            for c in range(ext.offset // cs, (ext.offset + ext.length - 1) // cs + 1):
                assert c not in owner, (hex(c * cs), owner[c], "data")


@pytest.mark.parametrize("writes", [
    pytest.param([(4 * 1024 * 1024 - SMALL, SMALL)], id="one-cluster"),
    pytest.param([(3 * 1024 * 1024, 300 * SMALL)], id="several-refblocks"),
    pytest.param([(2 * 1024 * 1024, 2 * 1024 * 1024)], id="doubling-the-file"),
    pytest.param([(3 * 1024 * 1024 + k * 4 * SMALL, SMALL) for k in range(80)], id="one-by-one"),
])
def test_reftable_grows_from_completely_full(full_reftable, tmp_path, writes):
    """iotest 044's situation: no free reftable entry; every new cluster needs a new table."""
    base, content = full_reftable
    path = str(tmp_path / "img.qcow2")
    shutil.copy(base, path)
    model = bytearray(content)
    rng = random.Random(len(writes))
    with qcow2.open(path, "r+") as img:
        for offset, length in writes:
            data = rng.randbytes(length)
            img.pwrite(data, offset)
            model[offset:offset + length] = data
        img.flush()
        img._writer.refcounts._check()
        _no_structure_overlaps(img)
        assert img.pread(len(model), 0) == bytes(model)
    clusters, used, entries = _reftable_state(path)
    assert clusters > 1 and used > RC_ENTRIES
    _assert_like_model(path, bytes(model), tmp_path)


@pytest.mark.parametrize("holes,nb_clusters", [(0, 1), (0, 64), (0, 65), (3, 1), (3, 5),
                                               (70, 40), (70, 200)])
def test_reftable_growth_next_to_holes_and_new_refblocks(full_reftable, tmp_path, holes,
                                                         nb_clusters):
    """iotest 121's concern: when the table grows, the new table, the refcount blocks describing
    it and the blocks for the clusters being allocated must not land on each other or on
    existing structures; holes freed near the end are reused first."""
    base, content = full_reftable
    path = str(tmp_path / "img.qcow2")
    shutil.copy(base, path)
    model = bytearray(content)
    with qcow2.open(path, "r+") as img:
        if holes:   # free the data clusters of the last written guest clusters
            hosts = sorted((e.offset, e.start, e.length) for e in img.map()
                           if e.data and e.offset is not None)
            freed = 0
            for host, start, length in reversed(hosts):
                if freed >= holes:
                    break
                for g in range(start + length - SMALL, start - 1, -SMALL):
                    if freed >= holes:
                        break
                    img.discard(g, SMALL)
                    model[g:g + SMALL] = bytes(SMALL)
                    freed += 1
            img.flush()
        data = random.Random(holes * 1000 + nb_clusters).randbytes(nb_clusters * SMALL)
        offset = 3 * 1024 * 1024 + 7 * SMALL
        img.pwrite(data, offset)
        model[offset:offset + len(data)] = data
        img.flush()
        _no_structure_overlaps(img)
    _assert_like_model(path, bytes(model), tmp_path)


# -- the guard stays current ----------------------------------------------------------------------

def _guard_differences(img, mode) -> list:
    cs = img.cluster_size
    fresh = OverlapGuard(cs, overlap_check=mode, source=lambda types: iter_metadata(img, types))
    fresh.rebuild()
    out = []
    for c in range(-(-img._file.size // cs) + 16):
        ours, rebuilt = img.guard.overlaps(c * cs, cs), fresh.overlaps(c * cs, cs)
        if ours != rebuilt:
            out.append((hex(c * cs), T.type_names(ours), T.type_names(rebuilt)))
    return out


@pytest.mark.parametrize("cluster_size,refcount_bits,mode,seed", [
    (4096, 16, "cached", 1), (4096, 16, "all", 2), (512, 64, "cached", 3), (512, 64, "all", 4),
    (4096, 2, "cached", 5),
])
def test_guard_map_equals_rebuilt_map_after_random_writes(tmp_path, cluster_size, refcount_bits,
                                                          mode, seed):
    """After every operation (allocating L2 tables, refcount blocks, growing the refcount and L1
    tables, copying L2 tables shared with a snapshot, shrinking), the guard's map answers every
    cluster exactly as a map rebuilt from the image's metadata does."""
    path = str(tmp_path / "img.qcow2")
    create(path, "8M", options={"cluster_size": cluster_size, "refcount_bits": refcount_bits})
    qemu_io(path, "write -P 1 0 1M", "write -P 2 5M 256k")
    qemu_img("snapshot", "-c", "s1", path)
    rng = random.Random(seed)
    with qcow2.open(path, "r+", overlap_check=mode) as img:
        start = img.header.refcount_table_offset, img.header.l1_table_offset
        for step in range(40):
            op = rng.choice("wwwzdcr")
            size = img.size
            offset = rng.randrange(0, size - 1) // 512 * 512
            length = min(size - offset, rng.choice([512, 4096, 5000, 65536, 300000]))
            if op == "w":
                img.pwrite(rng.randbytes(length), offset)
            elif op == "z":
                img.write_zeroes(offset, length, may_unmap=rng.random() < 0.5)
            elif op == "d":
                img.discard(offset, length)
            elif op == "c":
                offset -= offset % cluster_size
                length = min(size - offset, 2 * cluster_size)
                img.write_compressed(bytes(length // 2) + rng.randbytes(length - length // 2),
                                     offset)
            else:
                img.resize(rng.choice([size + (1 << 20), max(4 << 20, size - (1 << 20))]),
                           shrink=True)
            if rng.random() < 0.2:
                img.flush()
            assert _guard_differences(img, mode) == [], (step, op)
        moved = (img.header.refcount_table_offset, img.header.l1_table_offset) != start
        img.flush()
        assert _guard_differences(img, mode) == []
        img.guard._check()
    assert qemu_img("check", path, check=False).returncode == 0
    if cluster_size == 512:
        assert moved      # the refcount table (or L1 table) did move: growth was exercised


# -- running out of space --------------------------------------------------------------------------

def _enospc_workload(img) -> None:
    rng = random.Random(7)
    img.pwrite(rng.randbytes(300 * SMALL), 3 * 1024 * 1024)      # grows the refcount table
    img.write_zeroes(0, 40000)
    img.discard(100 * SMALL, 50000)
    img.pwrite(b"\1" * 70000, 1000)
    img.write_compressed(b"ab" * 4096, 3 * 1024 * 1024 + 400 * SMALL)
    img.flush()
    img.resize(img.size + (1 << 20))                              # grows the L1 table
    img.pwrite(rng.randbytes(8000), img.size - 8000)


class _NoSpace:
    """Replacements for os.pwritev / os.posix_fallocate that fail with ENOSPC after ``budget``
    calls: every later call (``everything``), or only those that would extend the file (as a full
    file system does)."""

    def __init__(self, budget: int, everything: bool):
        self.budget, self.everything, self.calls, self.tripped = budget, everything, 0, False
        self.pwritev, self.posix_fallocate = os.pwritev, os.posix_fallocate

    def _fail(self, fd: int, end: int) -> bool:
        self.calls += 1
        if self.calls <= self.budget:
            return False
        if self.everything or end > os.fstat(fd).st_size:
            self.tripped = True
            return True
        return False

    def fake_pwritev(self, fd, buffers, offset):
        if self._fail(fd, offset + sum(len(memoryview(b).cast("B")) for b in buffers)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.pwritev(fd, buffers, offset)

    def fake_fallocate(self, fd, offset, length):
        if self._fail(fd, offset + length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.posix_fallocate(fd, offset, length)


def _run_out_of_space(monkeypatch, path, budget: int, everything: bool):
    fake = _NoSpace(budget, everything)
    errors = []
    with monkeypatch.context() as m:
        m.setattr(os, "pwritev", fake.fake_pwritev)
        m.setattr(os, "posix_fallocate", fake.fake_fallocate)
        img = qcow2.open(path, "r+")
        try:
            _enospc_workload(img)
        except Qcow2Error as e:
            errors.append(e)
        try:
            img.close()
        except Qcow2Error as e:
            errors.append(e)
    return fake, errors


def test_enospc_mid_allocation_leaks_at_most(full_reftable, tmp_path, monkeypatch):
    """Fail the n-th host write (and every later one, or every later one that extends the file)
    with ENOSPC, for n across the whole workload: a Qcow2Error naming the cause, and the image on
    disk passes `qemu-img check` with at most leaked clusters (DESIGN rule 5)."""
    base, _ = full_reftable
    path = str(tmp_path / "img.qcow2")
    shutil.copy(base, path)
    total, errors = _run_out_of_space(monkeypatch, path, 10 ** 9, True)
    assert errors == [] and total.calls > 20
    assert qemu_img("check", path, check=False).returncode == 0
    budgets = sorted(set(range(0, 8)) | set(range(8, total.calls, max(1, total.calls // 24))))
    for everything in (True, False):
        for budget in budgets:
            shutil.copy(base, path)
            fake, errors = _run_out_of_space(monkeypatch, path, budget, everything)
            if not fake.tripped:
                continue
            assert errors, (budget, everything)
            assert all(isinstance(e, Qcow2Error) for e in errors)
            assert "No space left on device" in str(errors[0])
            rc, data = _check(path)
            assert rc in (0, 3) and data.get("corruptions", 0) == 0, (budget, everything, data)
            with qcow2.open(path) as img:         # and it still reads
                img.pread(img.size, 0)


def _check(path):
    proc = qemu_img("check", "--output=json", path, check=False)
    return proc.returncode, json.loads(proc.stdout)


def test_enospc_on_a_full_tmpfs(tmp_path):
    """The real thing when we may mount: a 1 MiB tmpfs filled by our writes."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        path = str(mnt / "img.qcow2")
        create(path, "64M", options={"cluster_size": 4096})
        written = 0
        rng = random.Random(3)
        with pytest.raises(Qcow2Error) as exc:
            img = qcow2.open(path, "r+")
            try:
                for k in range(64):
                    img.pwrite(rng.randbytes(65536), k * 262144 + 1000)
                    written += 1
                    img.flush()
            finally:
                img.close()
        assert "No space left on device" in str(exc.value)
        assert written < 64
        rc, data = _check(path)
        assert rc in (0, 3) and data.get("corruptions", 0) == 0, data
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# -- bad requests ----------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("pwrite-negative-offset", lambda img: img.pwrite(b"x", -1)),
    ("pwrite-past-end", lambda img: img.pwrite(b"x" * 512, img.size)),
    ("pwrite-across-end", lambda img: img.pwrite(b"x" * 1024, img.size - 512)),
    ("pwrite-huge-offset", lambda img: img.pwrite(b"x", 1 << 62)),
    ("zeroes-negative-length", lambda img: img.write_zeroes(0, -512)),
    ("zeroes-past-end", lambda img: img.write_zeroes(img.size - 512, 1024)),
    ("discard-past-end", lambda img: img.discard(img.size, 65536)),
    ("discard-negative-offset", lambda img: img.discard(-65536, 65536)),
    ("compressed-unaligned-offset", lambda img: img.write_compressed(b"x" * 65536, 512)),
    ("compressed-partial-cluster", lambda img: img.write_compressed(b"x" * 1000, 0)),
    ("compressed-past-end", lambda img: img.write_compressed(b"x" * 65536, img.size)),
    ("resize-unaligned", lambda img: img.resize(img.size + 100)),
    ("resize-negative", lambda img: img.resize(-512)),
    ("shrink-without-flag", lambda img: img.resize(img.size - 65536)),
]


@pytest.mark.parametrize("request_", [r for _, r in BAD_REQUESTS], ids=[n for n, _ in BAD_REQUESTS])
def test_bad_request_refused_and_changes_nothing(tmp_path, request_):
    path = str(tmp_path / "img.qcow2")
    create(path, "4M")
    qemu_io(path, "write -P 5 0 64k")
    before = open(path, "rb").read()
    events = []
    with qcow2.open(path, "r+", on_event=events.append) as img:
        with pytest.raises(RequestError):
            request_(img)
        assert not img.corrupt
        assert img.pread(65536, 0) == b"\5" * 65536
    assert open(path, "rb").read() == before
    assert events == []
    with qcow2.open(path, "r+") as img:          # and the image stays writable
        img.pwrite(b"\6" * 512, img.size - 512)
    assert qemu_img("check", path, check=False).returncode == 0


def test_zero_length_requests_at_the_end_are_fine(tmp_path):
    path = str(tmp_path / "img.qcow2")
    create(path, "4M")
    before = open(path, "rb").read()
    with qcow2.open(path, "r+") as img:
        assert img.pwrite(b"", img.size) == 0
        img.write_zeroes(img.size, 0)
        img.discard(img.size, 0)
    assert open(path, "rb").read() == before


def test_writes_on_read_only_image_refused(tmp_path):
    path = str(tmp_path / "img.qcow2")
    create(path, "4M")
    before = open(path, "rb").read()
    with qcow2.open(path) as img:
        for op in (lambda: img.pwrite(b"x", 0), lambda: img.write_zeroes(0, 512),
                   lambda: img.discard(0, 65536), lambda: img.resize(8 << 20)):
            with pytest.raises(qcow2.ReadOnlyError):
                op()
    assert open(path, "rb").read() == before
