"""Crash safety, proven by cutting images after every write (DESIGN.md rule 5).

Theory of operation
-------------------
Each workload starts from an image on disk (made by ``qcow2.create`` or by qemu-img), opens it
``"r+"``, performs a few operations of one kind (allocating writes with copy-on-write from a
backing file, L2 table and refcount block allocation and refcount table growth, discard and
write_zeroes, compressed writes, resize with an L1 move and a shrink, writes over an internal
snapshot, extended L2 subclusters, lazy refcounts) and closes it.  While it runs, every call that
reaches the image file through :class:`qcow2.storage.Storage` (``pwrite``, ``allocate``,
``truncate``, and ``flush``, the fsync barrier) is recorded by wrapping those methods - the library
writes through its one door as usual, the recorder only keeps a copy (``tests/crash_replay.py``).
After every operation the guest content is read back and kept, with a note whether the operation
ended durable (``flush``, close).

A crash is then simulated by rebuilding the file from the starting bytes and a part of the
recorded writes, in two models:

*Ordered writes* (a process killed, a disk that keeps write order): the first ``k`` writes, for
every ``k`` next to a metadata write (header, L1, L2, refcount table, refcount block: just before,
just after) plus a sample of the cuts after data writes; and *torn* writes, where write ``k+1``
reached the disk only partly - its first sector, its first half, only its second half, or every
other sector (512-byte sectors are the unit a disk writes atomically).

*Power loss* (an OS and disk free to reorder writes between two fsyncs): everything before the
last completed ``Storage.flush()`` is on disk, and of the writes since, any subset.  For each such
interval: each metadata write alone, all but each metadata write, all metadata writes without the
data writes, all but a sampled data write, and a couple of random subsets.  This model is why the
writer separates each step of its crash order by an fsync (``Writer._barrier``): without them,
most of these states are corrupt.

Every cut image must pass ``qemu-img check`` with no corruption (leaks are allowed: a crash may
leak clusters), must read in full with our reader, and every 512-byte guest sector must read as it
did at the last durable point or at some later operation boundary no later than the cut (a crash
may lose unflushed changes, never invent bytes or lose flushed ones).  With lazy refcounts the cut
image is opened ``"r+"`` (which repairs a dirty image) and must then be clean (exit 0, no leaks)
with the same content rule; besides the workload made with lazy refcounts, five workloads run
again with lazy refcounts switched on (``+lazy``).  Writes over an internal snapshot must also
leave the snapshot's content unchanged in every cut.  Every 8th cut is also read by
``qemu-img convert`` and must read the same there.

Each workload also asserts that it produced the metadata writes it is about (e.g. a refcount table
rewrite and a header switch for table growth), so a change in the writer cannot make a workload
silently stop testing what it names.  Sizes are tiny (512-byte to 16 KiB clusters) so that many
structures cost few bytes and a few hundred qemu-img runs.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import pytest

import qcow2
from tests import crash_replay as cr
from tests.qemu import create as qemu_create
from tests.qemu import qemu_img, qemu_io, require_qemu

KiB = 1024
MiB = 1024 * KiB


def _noise(n: int, seed: int) -> bytes:
    """Incompressible bytes, different per seed (never all zeros)."""
    return random.Random(seed).randbytes(n)


def _compressible(n: int, seed: int) -> bytes:
    unit = bytes([seed % 251 + 1]) * 200 + random.Random(seed).randbytes(24)
    return (unit * (n // len(unit) + 1))[:n]


def _raw_backing(tmp_path, size: int, seed: int) -> str:
    path = tmp_path / "base.raw"
    path.write_bytes(_noise(size, seed))
    return str(path)


@dataclass
class Workload:
    """A scenario: ``setup(tmp_path) -> image path``; ``run(img, mark)``; the minimum number of
    writes of each kind it must produce (``expect``, keyed by :attr:`HostWrite.what`).
    ``make_extra(image path)``, called before the workload, may return a further per-cut check
    ``extra(cut path) -> problem or None``."""

    setup: Callable
    run: Callable
    expect: dict[str, int]
    open_options: dict = field(default_factory=dict)
    lazy: bool = False
    make_extra: Callable | None = None
    header_changes: frozenset = frozenset()   # header fields the workload must rewrite
    amend_lazy: bool = False    # turn lazy refcounts on (qemu-img amend) after the setup


# -- workloads ----------------------------------------------------------------------------------
def _setup_cow(tmp_path) -> str:
    backing = _raw_backing(tmp_path, 2 * MiB, 1)
    path = str(tmp_path / "img.qcow2")
    qcow2.create(path, 2 * MiB, cluster_size=2048, backing_file=backing,
                 backing_fmt="raw").close()
    return path


def _run_cow(img, mark) -> None:
    cluster_size = 2048
    img.pwrite(_noise(100, 2), 5000)
    mark("partial cluster: copy-on-write of head and tail from the backing file")
    img.pwrite(_noise(3000, 3), 10 * cluster_size + 1000)
    mark("two clusters, copy-on-write at both ends")
    img.pwrite(_noise(64 * KiB, 4), 128 * KiB)
    mark("aligned run of whole clusters")
    img.flush()
    mark("flush", durable=True)
    img.pwrite(_noise(10, 5), 5050)
    mark("in place (COPIED cluster)")
    img.pwrite(_noise(6000, 6), 512 * KiB - 1000)
    mark("across an L2 table boundary: a new L2 table")
    img.pwrite(_noise(700, 7), 3 * MiB // 2 + 7)
    mark("partial cluster in a third L2 table")
    img.pwrite(_noise(cluster_size, 8), 3 * cluster_size)
    mark("whole cluster over the backing file")


def _setup_growth(tmp_path) -> str:
    require_qemu()
    path = str(tmp_path / "img.qcow2")
    # 64 refcounts per block and 64 blocks per table cluster: the table is full at 2 MiB of host;
    # qemu-io fills it to ~1.95 MiB so that the workload needs few writes to outgrow it
    qemu_create(path, "4M", options={"cluster_size": 512, "refcount_bits": 64})
    qemu_io(path, "write -P 0x33 0 1900k")
    return path


def _run_growth(img, mark) -> None:
    img.pwrite(_noise(64 * KiB, 10), 2 * MiB + 100)
    mark("64 KiB: new L2 tables, refcount blocks")
    img.flush()
    mark("flush", durable=True)
    img.pwrite(_noise(160 * KiB, 11), 5 * MiB // 2)
    mark("160 KiB more: the refcount table grows and moves")
    img.pwrite(_noise(300, 12), 700)
    mark("in place")
    img.discard(0, 64 * KiB)
    mark("discard 64 KiB (the old refcount table is freed too)")
    img.pwrite(_noise(40 * KiB, 13), 7 * MiB // 2 + 5)
    mark("write into freed space")


def _setup_discard(compat: str) -> Callable:
    def setup(tmp_path) -> str:
        backing = _raw_backing(tmp_path, 512 * KiB, 20)
        path = str(tmp_path / "img.qcow2")
        qcow2.create(path, 512 * KiB, cluster_size=1024, compat=compat, backing_file=backing,
                     backing_fmt="raw").close()
        return path
    return setup


def _run_discard(img, mark) -> None:
    img.pwrite(_noise(64 * KiB, 21), 0)
    img.pwrite(_noise(32 * KiB, 22), 200 * KiB)
    mark("two runs of data")
    img.flush()
    mark("flush", durable=True)
    img.discard(8 * KiB, 16 * KiB)
    mark("discard allocated clusters")
    img.write_zeroes(40 * KiB, 4 * KiB)
    mark("write_zeroes keeping the allocation")
    img.write_zeroes(200 * KiB, 8 * KiB, may_unmap=True)
    mark("write_zeroes freeing the clusters")
    img.write_zeroes(50 * KiB + 3, 100)
    mark("write_zeroes inside a cluster (written zeros)")
    img.write_zeroes(300 * KiB, 8 * KiB)
    mark("write_zeroes over the backing file, in a new L2 table")
    img.flush()
    mark("flush: the freed clusters become free", durable=True)
    img.pwrite(_noise(20 * KiB, 23), 400 * KiB)
    mark("write reusing freed clusters")
    img.discard(100 * KiB, 150 * KiB)
    mark("discard across L2 tables")


def _setup_compressed(tmp_path) -> str:
    path = str(tmp_path / "img.qcow2")
    qcow2.create(path, 512 * KiB, cluster_size=4096).close()
    return path


def _run_compressed(img, mark) -> None:
    cs = 4096    # the cluster size
    img.write_compressed(_compressible(4 * cs, 30), 0)
    mark("four compressed clusters, sharing host clusters")
    img.flush()
    mark("flush", durable=True)
    img.write_compressed(_compressible(cs, 31) + _noise(cs, 32), 64 * KiB)
    mark("a compressed and an incompressible cluster")
    img.pwrite(_noise(100, 33), cs + 10)
    mark("partial write over a compressed cluster (copy-on-write)")
    img.write_compressed(_compressible(cs, 34), 0)
    mark("compressed over compressed")
    img.discard(2 * cs, cs)
    mark("discard a compressed cluster")
    img.flush()
    mark("flush", durable=True)
    img.write_compressed(_compressible(3 * cs, 35), 128 * KiB)
    mark("compressed clusters in freed space")
    img.write_zeroes(3 * cs, cs)
    mark("write_zeroes over a compressed cluster")


def _setup_resize(tmp_path) -> str:
    backing = _raw_backing(tmp_path, 512 * KiB, 40)
    path = str(tmp_path / "img.qcow2")
    qcow2.create(path, 256 * KiB, cluster_size=512, backing_file=backing,
                 backing_fmt="raw").close()
    return path


def _run_resize(img, mark) -> None:
    img.pwrite(_noise(64 * KiB, 41), 0)
    img.pwrite(_noise(2 * KiB, 42), 200 * KiB)
    mark("data")
    img.resize(4 * MiB)
    mark("grow to 4 MiB: the L1 table moves; the backing file is hidden")
    img.pwrite(_noise(1000, 43), 3 * MiB + 100)
    mark("write in the grown area")
    img.pwrite(_noise(400 * KiB, 45), 1 * MiB)
    mark("400 KiB more: the file grows past refcount blocks that count only themselves")
    img.flush()
    mark("flush", durable=True)
    img.resize(128 * KiB, shrink=True)
    mark("shrink to 128 KiB: clusters and L2 tables past the end freed, idle refcount blocks "
         "unlinked, the file's tail cut")
    img.resize(1 * MiB)
    mark("grow to 1 MiB again: zeros over the backing file")
    img.pwrite(_noise(3000, 44), 900 * KiB)
    mark("write near the new end")


def _setup_snapshot(tmp_path) -> str:
    require_qemu()
    path = str(tmp_path / "img.qcow2")
    qemu_create(path, "512K", options={"cluster_size": 1024})
    qemu_io(path, "write -P 0x11 0 256k", "write -P 0x22 300k 20k")
    qemu_img("snapshot", "-c", "snap1", path)
    return path


def _run_snapshot(img, mark) -> None:
    img.pwrite(_noise(100, 50), 1000)
    mark("partial write into a shared cluster of a shared L2 table")
    img.pwrite(_noise(4 * KiB, 51), 64 * KiB)
    mark("whole shared clusters, same (now copied) L2 table")
    img.pwrite(_noise(1 * KiB, 52), 130 * KiB)
    mark("second shared L2 table")
    img.discard(200 * KiB, 8 * KiB)
    mark("discard shared clusters")
    img.write_zeroes(20 * KiB, 4 * KiB)
    mark("write_zeroes over shared clusters")
    img.flush()
    mark("flush", durable=True)
    img.pwrite(_noise(2 * KiB, 53), 310 * KiB)
    mark("third shared L2 table")


def _snapshot_unchanged(path: str) -> Callable:
    with qcow2.open(path) as img:
        before = img.snapshot("snap1").pread(img.snapshot("snap1").size, 0)

    def extra(cut_path: str) -> str | None:
        with qcow2.open(cut_path) as img:
            view = img.snapshot("snap1")
            if view.pread(view.size, 0) != before:
                return "the internal snapshot's content changed"
        return None
    return extra


def _setup_extended(tmp_path) -> str:
    backing = _raw_backing(tmp_path, 1 * MiB, 60)
    path = str(tmp_path / "img.qcow2")
    qcow2.create(path, 1 * MiB, cluster_size=16 * KiB, extended_l2=True, backing_file=backing,
                 backing_fmt="raw").close()
    return path


def _run_extended(img, mark) -> None:
    img.pwrite(_noise(100, 61), 1000)
    mark("one subcluster, copy-on-write inside it")
    img.pwrite(_noise(2000, 62), 16 * KiB + 300)
    mark("several subclusters of a new cluster")
    img.write_zeroes(32 * KiB + 512, 1024)
    mark("zero subclusters")
    img.flush()
    mark("flush", durable=True)
    img.pwrite(_noise(50, 63), 1010)
    mark("in place")
    img.pwrite(_noise(700, 64), 3000)
    mark("unallocated subclusters of an allocated cluster")
    img.discard(48 * KiB, 16 * KiB)
    mark("discard a whole cluster")
    img.write_zeroes(16 * KiB, 16 * KiB, may_unmap=True)
    mark("write_zeroes freeing a cluster")


def _setup_lazy(tmp_path) -> str:
    backing = _raw_backing(tmp_path, 512 * KiB, 70)
    path = str(tmp_path / "img.qcow2")
    qcow2.create(path, 512 * KiB, cluster_size=1024, lazy_refcounts=True, backing_file=backing,
                 backing_fmt="raw").close()
    return path


def _run_lazy(img, mark) -> None:
    img.pwrite(_noise(3000, 71), 1500)
    mark("copy-on-write (sets the dirty bit first)")
    img.pwrite(_noise(20 * KiB, 72), 130 * KiB)
    mark("second L2 table")
    img.flush()
    mark("flush", durable=True)
    img.discard(0, 4 * KiB)
    mark("discard")
    img.pwrite(_noise(1000, 73), 260 * KiB)
    img.write_zeroes(140 * KiB, 2 * KiB)
    mark("write and write_zeroes")
    img.flush()
    mark("flush", durable=True)
    img.pwrite(_noise(500, 74), 400 * KiB)
    mark("write after the flush")


WORKLOADS = {
    "cow-from-backing": Workload(_setup_cow, _run_cow, {"data": 8, "L2": 3, "L1": 1,
                                                        "refblock": 1}),
    "l2-refblock-reftable-growth": Workload(
        _setup_growth, _run_growth,
        {"data": 10, "L2": 10, "refblock": 8, "reftable": 3, "header": 1},
        open_options={"l2_cache_size": 4 * 512},      # 4 cached L2 tables: evictions too
        header_changes=frozenset({"refcount_table_offset", "refcount_table_clusters"})),
    "discard-zeroes-v3": Workload(_setup_discard("1.1"), _run_discard,
                                  {"data": 3, "L2": 3, "refblock": 2}),
    "discard-zeroes-v2": Workload(_setup_discard("0.10"), _run_discard,
                                  {"data": 3, "L2": 3, "refblock": 2}),
    "compressed": Workload(_setup_compressed, _run_compressed, {"data": 6, "L2": 2,
                                                                "refblock": 2}),
    "resize": Workload(_setup_resize, _run_resize, {"data": 4, "L2": 10, "L1": 2, "header": 4,
                                                    "refblock": 2, "reftable": 2, "truncate": 1},
                       header_changes=frozenset({"size", "l1_size", "l1_table_offset"})),
    "snapshot-shared-l2": Workload(_setup_snapshot, _run_snapshot,
                                   {"data": 4, "L2": 3, "L1": 1, "refblock": 2},
                                   make_extra=_snapshot_unchanged),
    "extended-l2": Workload(_setup_extended, _run_extended, {"data": 4, "L2": 2,
                                                             "refblock": 2}),
    "lazy-refcounts": Workload(_setup_lazy, _run_lazy, {"data": 4, "L2": 2, "header": 2},
                               lazy=True, header_changes=frozenset({"incompatible_features"})),
}


# the same workloads with lazy refcounts switched on after the setup: every cut must repair
for _name in ("cow-from-backing", "l2-refblock-reftable-growth", "compressed", "resize",
              "snapshot-shared-l2"):
    _w = WORKLOADS[_name]
    WORKLOADS[_name + "+lazy"] = dataclasses.replace(
        _w, lazy=True, amend_lazy=True,
        header_changes=_w.header_changes | {"incompatible_features"})


# -- the harness ---------------------------------------------------------------------------------
def _record(tmp_path, workload: Workload) -> tuple[cr.Recording, Callable | None]:
    require_qemu()
    path = workload.setup(tmp_path)
    if workload.amend_lazy:
        qemu_img("amend", "-o", "lazy_refcounts=on", path)
    extra = workload.make_extra(path) if workload.make_extra else None
    recording = cr.record_workload(path, workload.run, **workload.open_options)
    kinds = {w.what for w in recording.writes}
    counts = {what: recording.count(what) for what in kinds}
    short = {what: (counts.get(what, 0), n) for what, n in workload.expect.items()
             if counts.get(what, 0) < n}
    assert not short, f"workload no longer makes the writes it is about: {short}; all: {counts}"
    missing = workload.header_changes - recording.header_changes()
    assert not missing, f"workload no longer rewrites the header fields {sorted(missing)}"
    # the finished image (the last cut) must be clean: close flushed everything
    assert cr.clean(path) is None, cr.clean(path)
    return recording, extra


def _judge(recording: cr.Recording, cuts: list[cr.Cut], tmp_path, *, lazy: bool,
           extra: Callable | None, stats: Counter | None = None) -> list[str]:
    """Build, check and read every cut; returns the failures.  ``stats`` counts the cuts that
    were dirty (lazy refcounts) and those that leaked clusters, so a caller can tell that the
    cuts were not all trivially clean."""
    builder = cr.PrefixBuilder(recording)
    cut_path = str(tmp_path / "cut.qcow2")
    stats = Counter() if stats is None else stats
    failures = []
    for n, cut in enumerate(cuts):
        buf = cr.build(recording, builder, cut)
        stats["dirty"] += bool(buf[79] & 1)     # incompatible_features bit 0
        with cr.cut_file(cut_path, buf):
            problem = _problem(cut_path, recording, cut, lazy=lazy, extra=extra, stats=stats,
                               qemu_read=n % _QEMU_READ_EVERY == 0)
        if problem:
            failures.append(f"{cut.name}: {problem}")
    return failures


_QEMU_READ_EVERY = 8     # every 8th cut is also read by qemu-img convert, compared with ours


def _problem(path: str, recording: cr.Recording, cut: cr.Cut, *, lazy: bool,
             extra: Callable | None, stats: Counter, qemu_read: bool) -> str | None:
    if lazy:
        try:
            qcow2.open(path, "r+").close()       # repairs a dirty image
        except qcow2.Qcow2Error as e:
            return f"opening r+ (repair) failed: {e}"
        problem = cr.clean(path)
        if problem:
            return "after the repair at open: " + problem
    else:
        problem, nb_leaks = cr.no_corruption(path)
        stats["leaky"] += nb_leaks > 0
        if problem:
            return problem
    try:
        content = cr.read_guest(path)
    except qcow2.Qcow2Error as e:
        return f"reading the cut image failed: {e}"
    problem = cr.content_problem(content, recording.allowed_guest_states(cut))
    if problem is None and qemu_read:
        stats["qemu-read"] += 1
        if cr.qemu_read(path) != content:
            problem = "qemu-img convert reads other guest bytes than our reader"
    if problem is None and extra is not None:
        problem = extra(path)
    return problem


def _report(failures: list[str], nb_cuts: int) -> str:
    shown = "\n".join(failures[:8])
    return f"{len(failures)} of {nb_cuts} cut images are damaged, e.g.:\n{shown}"


def _assert_meaningful(workload: Workload, stats: Counter, nb_cuts: int) -> None:
    """The cuts must include damaged-looking states: dirty images to repair (lazy refcounts) or
    leaked clusters (the normal trace of an interrupted allocation)."""
    if workload.lazy:
        assert stats["dirty"] > 0, f"none of {nb_cuts} cuts was a dirty image"
    else:
        assert stats["leaky"] > 0, f"none of {nb_cuts} cuts leaked a cluster"


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_every_prefix_and_torn_write(name, tmp_path):
    """Ordered-write crashes: after each write k, and inside write k+1 (torn)."""
    workload = WORKLOADS[name]
    recording, extra = _record(tmp_path, workload)
    cuts = cr.prefix_cuts(recording, nb_data_samples=40, nb_torn_data=6, seed=len(name))
    metadata = [i for i, w in enumerate(recording.writes) if w.is_metadata]
    cut_after = {c.prefix for c in cuts if not c.extra}
    # every metadata write is cut around: the file just after it exists among the cuts (a flush
    # record in between makes no difference to the file)
    assert all(i + 1 in cut_after or recording.writes[i + 1].kind == "flush" for i in metadata)
    stats: Counter = Counter()
    failures = _judge(recording, cuts, tmp_path, lazy=workload.lazy, extra=extra, stats=stats)
    assert not failures, _report(failures, len(cuts))
    _assert_meaningful(workload, stats, len(cuts))


# the "+lazy" variants repeat the power-loss states of their base workload; only the repair
# differs, and the prefix cuts cover it
@pytest.mark.parametrize("name", [n for n, w in WORKLOADS.items() if not w.amend_lazy])
def test_reordered_writes_between_barriers(name, tmp_path):
    """Power-loss crashes: any subset of the writes since the last fsync reached the disk."""
    workload = WORKLOADS[name]
    recording, extra = _record(tmp_path, workload)
    cuts = cr.reorder_cuts(recording, nb_data_samples=3, seed=len(name))
    assert cuts
    stats: Counter = Counter()
    failures = _judge(recording, cuts, tmp_path, lazy=workload.lazy, extra=extra, stats=stats)
    assert not failures, _report(failures, len(cuts))
    _assert_meaningful(workload, stats, len(cuts))


# -- regressions ---------------------------------------------------------------------------------
def _two_new_blocks(tmp_path) -> cr.Recording:
    """An allocation that needs two new refcount blocks, the first of which lies in the range of
    the second: a fresh image (512-byte clusters, 64 refcounts per block) uses clusters 0-4;
    57 clusters of data and an L2 table fill block 0's range to its last cluster, so the next
    64-cluster data run starts a range without a block and ends in the range after it."""
    path = str(tmp_path / "blocks.qcow2")
    qcow2.create(path, 4 * MiB, cluster_size=512, refcount_bits=64).close()

    def run(img, mark):
        img.pwrite(_noise(57 * 512, 80), 0)
        mark("57 clusters: block 0's range is full up to its last cluster")
        img.pwrite(_noise(32 * KiB, 81), 32 * KiB)
        mark("a whole L2 table's worth of clusters: blocks 1 and 2 are new, both in range 2")
    return cr.record_workload(path, run)


def test_new_refcount_block_is_linked_after_the_block_counting_it(tmp_path):
    """Regression: two blocks made by one allocation were linked in reftable order, so a crash
    between the two links left block 1 referenced while its own refcount was in block 2, not
    yet linked (``ERROR cluster 128 refcount=0 reference=1``)."""
    require_qemu()
    recording = _two_new_blocks(tmp_path)
    links = [i for i, w in enumerate(recording.writes)
             if w.what == "reftable" and len(w.data) == 8]
    assert len(links) >= 2, [w.describe() for w in recording.writes]
    # the link of the block counted by the other one comes last, after a barrier
    assert [recording.writes[i].host_offset for i in links[:2]] == [0x200 + 8 * 2, 0x200 + 8 * 1]
    assert any(w.kind == "flush" for w in recording.writes[links[0]:links[1]])
    cuts = [cr.Cut(f"after {k} writes", k) for k in range(len(recording.writes) + 1)]
    failures = _judge(recording, cuts, tmp_path, lazy=False, extra=None)
    assert not failures, _report(failures, len(cuts))


def test_link_levels_put_the_counting_block_first(tmp_path):
    """Unit view of the same rule: a block is linked in a later level than the new block that
    holds its refcount; blocks counting themselves (or counted by an existing block) first."""
    path = str(tmp_path / "levels.qcow2")
    qcow2.create(path, 4 * MiB, cluster_size=512, refcount_bits=64).close()
    with qcow2.open(path, "r+") as img:
        refs = img._writer.refcounts
        cluster = 512
        # 64 refcounts per block: block 30 at cluster 1984 lies in range 31, block 31 at 1985
        assert refs._link_levels({30: 1984 * cluster, 31: 1985 * cluster}) == [[31], [30]]
        # a block counted by an existing block (range 0) and a self-counting one: one level
        assert refs._link_levels({5: 10 * cluster, 7: 7 * 64 * cluster}) == [[5, 7]]
        # a chain of three
        assert refs._link_levels({40: 41 * 64 * cluster, 41: 42 * 64 * cluster,
                                  42: (42 * 64 + 1) * cluster}) == [[42], [41], [40]]
