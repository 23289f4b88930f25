"""Properties of the library on generated images (``qcow2.strategies``), valid and damaged.

Run under the ``ci`` Hypothesis profile by default (bounded example counts, below) and longer with
``HYPOTHESIS_PROFILE=deep``.  What they claim:

1. *Hostile input is normal input.*  Opening, reading (a bounded sample of the disk), mapping,
   ``info``, checking, reading snapshots, and repairing (``check -r all``, on a copy) any generated
   image, valid or damaged, terminates (a SIGALRM watchdog per example, generous) within bounded
   memory (tracemalloc peak <= 64 MiB + 4x the file; the address space is capped too, so a runaway
   allocation is a MemoryError, not a dead machine) and each step either works or raises a
   ``Qcow2Error`` subclass, never another exception.  On *valid* images every step works, the
   check is clean, and the disk reads back as the recipe says.

2. *Writes to a damaged image never land on metadata.*  See
   :func:`test_writes_to_damaged_images_stay_off_metadata` for the precise statement.

3. *Our check agrees with qemu-img check 7.2* (exit code, and every counter of the JSON summary)
   on a sample of damaged images; and *after our ``-r all``, qemu-img check finds the image clean
   wherever qemu-img's own ``-r all`` leaves it clean.*  Excluded, each with its reason in
   :func:`_qemu_excluded`: qemu-img runs longer than 20 s (a repair growing the file to hundreds of
   TiB for a refcount block far outside it), qemu-img crashes (none seen), and one deliberate
   difference (we refuse to grow the file by more than 4M clusters for such a block).

Everything these properties found is a plain regression test in tests/test_fuzz_regressions.py
and tests/test_fuzz_regressions_check.py.
"""

from __future__ import annotations

import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, assume, given, note, settings, strategies as st

from qcow2 import constants as C
from qcow2 import strategies as qst
from qcow2._fuzzgen import KIND_TO_OL, metadata_layout
from qcow2.errors import CorruptImageError, Qcow2Error
from qcow2.image import Image
from qcow2.overlap_types import OL_MASK_LIMIT

from fuzz_support import (MEMORY_LIMIT_BYTES, TIME_LIMIT_S, WriteRecorder, address_space_limit,
                          changed_ranges, exercise, memory_limit, our_check, qemu_check, scaled,
                          scratch, time_limit)
import qemu

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
           HealthCheck.function_scoped_fixture]


def _guarded_exercise(image_or_damaged, *, repair: bool = True):
    with scratch() as directory:
        path = image_or_damaged.write_to(directory)
        limit = MEMORY_LIMIT_BYTES + 4 * os.path.getsize(path)
        with time_limit(TIME_LIMIT_S, "open/read/map/check/repair"), address_space_limit(), \
                memory_limit(limit, "open/read/map/check/repair"):
            outcomes = exercise(path, repair=repair)
        for o in outcomes:
            note(f"{o.step}: {'ok' if o.error is None else f'{type(o.error).__name__}: {o.error}'}")
        return outcomes


# -- 1. termination, memory, error types -----------------------------------------------------------

@pytest.mark.parametrize("kind", qst.CORRUPTION_KINDS)
@settings(max_examples=scaled(12), deadline=None, suppress_health_check=_HEALTH)
@given(data=st.data())
def test_damaged_images_fail_cleanly(kind, data):
    """Property 1 on damaged images, one corruption class per parameter (so every class gets its
    share of the examples).  The property itself is that nothing but Qcow2Error escapes
    :func:`fuzz_support.exercise`; termination and memory are guarded around it."""
    damaged = data.draw(qst.corrupted_images(kinds=(kind,)), label="damaged image")
    _guarded_exercise(damaged)


@settings(max_examples=scaled(12), deadline=None, suppress_health_check=_HEALTH)
@given(damaged=qst.corrupted_images(qst.image_chains(max_depth=2), max_corruptions=3))
def test_damaged_chains_fail_cleanly(damaged):
    """Property 1 on backing chains with up to three corruptions of the top image."""
    _guarded_exercise(damaged)


@settings(max_examples=scaled(15), deadline=None, suppress_health_check=_HEALTH)
@given(image=st.one_of(qst.images(data_files=True), qst.image_chains()))
def test_valid_images_work(image):
    """Property 1 on valid images (standalone, with external data files, backing chains):
    every step works, the check and the re-check after repair are clean, and the guest disk reads
    back as the recipe's model (``guest_data``)."""
    outcomes = _guarded_exercise(image)
    errors = [o for o in outcomes if o.error is not None]
    assert not errors, errors
    with scratch() as directory:
        path = image.write_to(directory)
        with Image(path) as img:
            assert img.size == image.size
            assert img.pread(img.size, 0) == image.guest_data
            res = img.check()
            assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0), res.messages


# -- 2. writes to damaged images -------------------------------------------------------------------

_HEADER_FIELDS_WRITTEN = {   # header bytes the writer legitimately rewrites: (offset, length)
    "size": (24, 8), "l1_size": (36, 4), "l1_table_offset": (40, 8),
    "refcount_table_offset": (48, 8), "refcount_table_clusters": (56, 4),
    "incompatible_features": (72, 8), "autoclear_features": (88, 8),
}


_MAX_FILE_GROWTH = 64 << 20


def _read(path: str, limit: int | None = None) -> tuple[bytes, list[tuple[int, int]]]:
    """The file's bytes up to ``limit`` (all of them without one), and the data extents past it:
    a table pointer far past the end of the file makes the writer write there, growing a sparse
    file to terabytes (QEMU 7.2 does the same); those bytes are checked through their extents."""
    size = os.path.getsize(path)
    far = []
    fd = os.open(path, os.O_RDONLY)
    try:
        if limit is not None and size > limit:
            pos = limit
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                far.append((start, end))
                pos = end
            size = limit
        return os.pread(fd, size, 0), far
    finally:
        os.close(fd)


def _regions_hit(layout, w, relinquished_l2: set[int], moved=frozenset()) -> list:
    """Metadata regions of ``layout`` a write overlaps (whole clusters), except, for a metadata
    write, active L2 tables the writer's L1 table no longer points to, and for any write the
    ``(kind, host_offset)`` tables the header moved away from (see the test)."""
    cs = layout.cluster_size
    end = w.host_offset + w.length
    out = []
    for r in layout.metadata():
        a, b = r.host_offset // cs * cs, -(-r.end // cs) * cs
        if not (a < end and w.host_offset < b):
            continue
        if w.ign and r.kind == "active-l2" and r.host_offset in relinquished_l2:
            continue
        if (r.kind, r.host_offset) in moved:
            continue
        out.append(r)
    return out


def _check_cut(step: str, w, file_size: int, layouts, relinquished_l2, moved) -> None:
    """A truncation that shrinks the file (a shrink gives the tail back) may cut only clusters
    that hold no metadata before the step, except what the step let go of: active L2 tables the
    L1 table no longer points to, tables the header moved away from, refcount blocks no longer in
    the refcount table; and none after it."""
    cs = layouts[0].cluster_size
    still_linked = {r.host_offset for r in layouts[1].of_kind("refcount-block")}
    for layout in layouts:
        for r in layout.metadata():
            if not (r.host_offset // cs * cs < file_size and w.host_offset < -(-r.end // cs) * cs):
                continue
            released = layout is layouts[0] and (
                (r.kind == "active-l2" and r.host_offset in relinquished_l2)
                or (r.kind, r.host_offset) in moved
                or (r.kind == "refcount-block" and r.host_offset not in still_linked))
            assert released, f"{step}: {w} cuts {r}"


def _check_step(step: str, before: bytes, after: bytes, writes, layouts, version: int,
                relinquished_l2: set[int] = frozenset(), far=(), moved=frozenset()) -> None:
    """The per-step part of property 2 (see the test's docstring); ``far`` are data extents past
    the bytes read (see :func:`_read`)."""
    covered = []
    for w in writes:
        if w.how == "truncate":
            if w.host_offset < len(before):
                _check_cut(step, w, len(before), layouts, relinquished_l2, moved)
            covered.append((min(len(before), w.host_offset), max(len(before), w.host_offset)))
            continue
        covered.append((w.host_offset, w.host_offset + w.length))
        allowed = {k for k, bit in KIND_TO_OL.items() if w.ign & bit}
        for layout in layouts:
            bad = [r for r in _regions_hit(layout, w, relinquished_l2, moved)
                   if r.kind not in allowed]
            assert not bad, f"{step}: {w} lands on " + "; ".join(str(r) for r in bad)
    for start, end in far:      # file system extents: whole blocks around what was written
        assert any(a < end and start < b for a, b in covered), \
            f"{step}: data at 0x{start:x}-0x{end:x} without a write through Storage (one door)"
    for start, end in changed_ranges(before, after):
        for pos in (start, end - 1):
            assert any(a <= pos < b for a, b in covered), \
                f"{step}: byte 0x{pos:x} changed without a write through Storage (one door)"
        header_end = min(end, layouts[0].cluster_size)
        for pos in range(start, header_end):       # cluster 0: only the fields the writer owns
            assert any(o <= pos < o + n for o, n in _HEADER_FIELDS_WRITTEN.values()
                       if version == 3 or o < 72), \
                f"{step}: header byte 0x{pos:x} changed (not a field the writer owns)"
    if len(before) >= 80 and len(after) >= 80 and version == 3:
        old, new = (struct.unpack_from(">Q", b, 72)[0] for b in (before, after))
        assert not (old ^ new) & ~(C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT), \
            f"{step}: incompatible features 0x{old:x} -> 0x{new:x}"


@pytest.mark.parametrize("kind", qst.CORRUPTION_KINDS)
@settings(max_examples=scaled(8), deadline=None, suppress_health_check=_HEALTH)
@given(data=st.data())
def test_writes_to_damaged_images_stay_off_metadata(kind, data):
    """Property 2.  A damaged image (one corruption; standalone or the top of a backing chain) is
    opened ``"r+"`` with ``overlap_check="all"`` (QEMU's default ``cached`` leaves inactive L2
    tables unprotected, as QEMU does; the promise is made for every type), a sequence of
    operations is applied, each followed by ``flush_metadata`` (so the file is the writer's whole
    state between steps), then the image is closed.  Every write through :class:`~qcow2.storage.Storage` is recorded with the
    metadata types it declares (``ign``).  For every step (the open, each operation, the close):

    a. no recorded write overlaps (whole clusters, as the guard counts them) a metadata structure
       of a type it does not declare, in the image's layout before the step *or after it*, as
       parsed independently from the file's bytes by ``qcow2.strategies.metadata_layout``
       (damaged pointers included: an L1 entry aimed at the refcount table makes that cluster
       both an L2 table and the refcount table, and nothing may write it);
    b. every byte that changed was covered by a recorded write (one door to the disk), a
       truncation cuts only clusters free of metadata (a shrink gives the file's tail back: see
       :func:`_check_cut`), and in the header only the fields the writer owns change (size, L1 and
       refcount table location and size, autoclear bits), the incompatible features only in the
       dirty and corrupt bits;
    c. once a step raised ``CorruptImageError`` (``OverlapError`` included) the image is marked
       corrupt on disk, the write of the corrupt bit is the last write of that step, and no later
       step writes anything.

    One exception to (a), QEMU's rule too: an active L2 table stops being protected as one once
    the writer's (in-memory) L1 table no longer points to it - copied on write because it is
    shared, or dropped by a shrink - so a *metadata* write may then land on it (a damaged L1
    entry aimed at a refcount block makes the block a "shared L2 table"; after the copy, refcount
    updates of that block are writes of what it really is).  Guest data writes get no exception
    there.  Likewise an L1 table or refcount table the header moved away from during the step
    (grown) is free space afterwards, for any write.

    Not claimed: that guest *data* survives damage (a refcount one too low lets a data cluster be
    handed out twice, as in QEMU; ``check`` finds it).  Structures a step creates and uses within
    itself are covered by (a) through the layout after the step.
    """
    source = st.one_of(qst.images(), qst.image_chains(max_depth=2))
    damaged = data.draw(qst.corrupted_images(source, kinds=(kind,)), label="damaged image")
    image = damaged.image
    with scratch() as directory:
        path = damaged.write_to(directory)
        version = 3 if damaged.data[4:8] == b"\0\0\0\3" else 2
        ops = data.draw(qst.operations(image.size, image.cluster_size, max_ops=5,
                                       kinds=qst.OP_KINDS if not image.data_file
                                       else tuple(k for k in qst.OP_KINDS
                                                  if k != "write_compressed")),
                        label="operations")
        with time_limit(TIME_LIMIT_S, "writes"), address_space_limit(), \
                WriteRecorder(path) as rec:
            before, far_before = _read(path)
            read_limit = len(before) + _MAX_FILE_GROWTH      # one window for the whole example
            layout_before = metadata_layout(before)
            img = None
            failed_corrupt = False
            try:
                img = Image(path, "r+", overlap_check="all")
            except Qcow2Error as e:
                note(f"open r+: {type(e).__name__}: {e}")
                failed_corrupt = isinstance(e, CorruptImageError)
            steps = [("open", None)] + [(str(op), op) for op in ops] + [("close", None)]
            corrupt_from = None
            for index, (name, op) in enumerate(steps):
                if img is None and index > 0:
                    break
                if index > 0:
                    try:
                        if op is not None:
                            op.apply(img)
                            img.flush_metadata()
                        else:
                            img.close()
                        note(f"{name}: ok")
                    except Qcow2Error as e:
                        note(f"{name}: {type(e).__name__}: {e}")
                        failed_corrupt = isinstance(e, CorruptImageError)
                after, far = _read(path, read_limit)
                if far:
                    note(f"{name}: the file grew to 0x{os.path.getsize(path):x} bytes (sparse)")
                writes = rec.take()
                in_memory = set()
                if img is not None:
                    in_memory = {e & C.L1E_OFFSET_MASK for e in img.l1_table}
                relinquished = {e.value & C.L1E_OFFSET_MASK for e in layout_before.l1_entries
                                if e.table == "active-l1"} - in_memory
                moved = set()
                h_old = layout_before.header
                if img is not None and h_old is not None:
                    if img.header.l1_table_offset != h_old.l1_table_offset:
                        moved.add(("active-l1", h_old.l1_table_offset))
                    if img.header.refcount_table_offset != h_old.refcount_table_offset:
                        moved.add(("refcount-table", h_old.refcount_table_offset))
                _check_step(name, before, after, writes,
                            (layout_before, metadata_layout(after)), version, relinquished,
                            [e for e in far if e not in far_before], moved)
                far_before = far
                if corrupt_from is not None:
                    assert not writes, f"{name}: wrote after the image was found corrupt: {writes}"
                if failed_corrupt and corrupt_from is None:
                    corrupt_from = name
                    marks = [k for k, w in enumerate(writes) if w.ign == OL_MASK_LIMIT]
                    if marks:
                        assert marks[-1] == len(writes) - 1, \
                            f"{name}: writes after the corrupt bit: {writes[marks[-1] + 1:]}"
                    if img is not None and img.corrupt and version == 3:
                        assert struct.unpack_from(">Q", after, 72)[0] & C.INCOMPAT_CORRUPT, \
                            f"{name}: corruption found but the corrupt bit is not on disk"
                failed_corrupt = False
                before, layout_before = after, metadata_layout(after)
            if img is not None:
                img.close()


# -- 3. agreement with qemu-img ----------------------------------------------------------------------

def _qemu_excluded(run, *, ours=None, grown_by: int = 0, cluster_size: int = 512) -> str | None:
    """Why a qemu-img 7.2 run is no reference for this example, or None when it is one.

    * It crashed (killed by a signal): none seen so far, kept as a guard.
    * It ran longer than ``QEMU_TIMEOUT_S`` (20 s): a refcount table entry far past the end of
      the file makes ``qemu-img check -r all`` grow the file to the "block" (hundreds of TiB,
      sparse) and then walk all of it (35 s for 256 TiB, ending in "Check failed"); we refuse
      that growth at once (found by fuzzing: refcount_table_clusters 1 -> 3 on a 64 KiB-cluster
      image, whose refblock entries then read as reftable entries).
    * A deliberate difference: a repair that would grow the file (for a refcount block outside
      it) by more than the check's count array may grow (8 MiB of counts, 4M clusters) fails
      here with "Check failed: Cannot allocate memory" (QEMU's own words when its allocation
      fails) instead of growing the file to gigabytes as qemu-img does.
    """
    if run.rc is None:
        return f"qemu-img: {run.stderr}"
    if run.rc < 0:
        return f"qemu-img crashed (signal {-run.rc})"
    if (ours is not None and "Check failed: Cannot allocate memory" in ours.stderr
            and grown_by > (4 << 20) * cluster_size):
        return f"qemu-img grew the file by 0x{grown_by:x} bytes; we refuse (growth cap)"
    return None


def _same_check(ours, theirs, what: str) -> None:
    assert ours.rc == theirs.rc, (f"{what}: exit code ours {ours.rc}, qemu-img {theirs.rc}\n"
                                  f"ours: {ours.stderr[-2000:]}\nqemu-img: {theirs.stderr[-2000:]}")
    if theirs.summary is not None or ours.summary is not None:
        assert ours.summary == theirs.summary, (f"{what}: ours {ours.summary}\nqemu-img "
                                                f"{theirs.summary}\nours: {ours.stderr[-2000:]}\n"
                                                f"qemu-img: {theirs.stderr[-2000:]}")


@settings(max_examples=scaled(25, 20), deadline=None, suppress_health_check=_HEALTH)
@given(damaged=qst.corrupted_images())
def test_check_agrees_with_qemu_img(damaged):
    """Property 3a: on a damaged image, ``qcow2-tool check --output=json`` and ``qemu-img check
    --output=json`` exit with the same code and print the same summary (every counter)."""
    qemu.require_qemu()
    with scratch() as directory:
        path = damaged.write_to(directory)
        theirs = qemu_check(path)
        reason = _qemu_excluded(theirs)
        if reason:
            note(f"excluded: {reason}")
        assume(reason is None)
        with time_limit(TIME_LIMIT_S, "check"):
            ours = our_check(path)
        _same_check(ours, theirs, "check")


@settings(max_examples=scaled(20, 20), deadline=None, suppress_health_check=_HEALTH)
@given(damaged=qst.corrupted_images())
def test_repair_cleans_where_qemu_img_does(damaged):
    """Property 3b: repair a copy with ``qemu-img check -r all`` and another with ours; wherever
    ``qemu-img check`` then finds qemu-img's copy clean, it finds ours clean too."""
    qemu.require_qemu()
    with scratch() as directory:
        path = damaged.write_to(directory)
        size = os.path.getsize(path)
        theirs_path = path + ".qemu"
        shutil.copyfile(path, theirs_path)
        repaired_theirs = qemu_check(theirs_path, "-r", "all")
        with time_limit(TIME_LIMIT_S, "repair"):
            repaired_ours = our_check(path, "-r", "all")
        note(f"repair: ours rc {repaired_ours.rc}, qemu-img rc {repaired_theirs.rc}")
        after_theirs = qemu_check(theirs_path)
        reason = (_qemu_excluded(repaired_theirs) or _qemu_excluded(after_theirs)
                  or _qemu_excluded(repaired_theirs, ours=repaired_ours,
                                    grown_by=os.path.getsize(theirs_path) - size,
                                    cluster_size=damaged.image.cluster_size))
        if reason:
            note(f"excluded: {reason}")
        assume(reason is None)
        if after_theirs.rc == 0:
            after_ours = qemu_check(path)
            assert after_ours.rc == 0, (f"qemu-img check after our repair: rc {after_ours.rc} "
                                        f"{after_ours.summary}\n{after_ours.stderr[-3000:]}\n"
                                        f"our repair said: {repaired_ours.stderr[-3000:]}")
