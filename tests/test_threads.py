"""One ``Image`` shared by many threads: data and metadata stay consistent.

Method.  The guest disk is cut into *slots*, each owned by exactly one writer thread, so the final
content is determined by each owner's own sequence of operations.  Small slots (2500 bytes, not
cluster aligned) are dealt out round-robin, so neighbouring slots of different threads share
clusters and L2 tables (concurrent copy-on-write and in-place writes into one cluster); each thread
also owns a private run of large slots crossing L2 tables (allocating multi-slot writes,
compressed writes of whole clusters).  Writers pick random operations - write a new value, zero
(with and without unmap), discard - and, *before* issuing one, append the slot values it will
produce to the slot's history.  Reader threads read random runs of slots and check that every
slot they read holds one of the values in its history (read after the read): a torn read or
garbage is caught.  Other threads at the same time: a flusher, a resizer growing the disk (moving
the L1 table), ``map`` and ``iter_map`` walkers (extents must tile the disk), and a reader of an
internal snapshot (made by qemu-img beforehand over a qcow2 backing file) whose content must never
change.  The interpreter's switch interval is lowered so threads interleave often.

Afterwards: the disk reads as each slot's final value, the library's invariants hold (refcounts,
caches, the guard map equal to one rebuilt from the metadata), ``qemu-img check`` is clean,
``qemu-img compare`` matches the final model and the snapshot still reads as it was made.
"""

from __future__ import annotations

import random
import sys
import threading

import pytest

import qcow2
from qcow2.guard import OverlapGuard
from qcow2.metadata import iter_metadata
from tests.qemu import check_json, create, qemu_img, qemu_io

NB_WRITERS = 4
NB_READERS = 3
SMALL_SLOT_SIZE = 2500
SMALL_SLOTS_PER_WRITER = 24
OPS_PER_WRITER = 90
BACKING_BYTE = 0x5A


def _value(writer: int, slot: int, version: int, nb_bytes: int) -> bytes:
    """A slot value nobody else writes: tag bytes then a position-dependent pattern."""
    head = bytes([0x80 | writer, slot & 0xFF, (slot >> 8) & 0xFF, version & 0xFF])
    period = bytes(((writer * 53 + slot * 7 + version * 13 + i) % 251) + 1 for i in range(251))
    body = (period * (nb_bytes // 251 + 1))[:nb_bytes]
    return (head + body[len(head):])[:nb_bytes]


class Slots:
    """The slot layout, the final model and every value each slot ever held."""

    def __init__(self, cluster_size: int, big_slot_size: int, big_slots_per_writer: int,
                 initial: bytes):
        self.cluster_size = cluster_size
        self.ranges: list[tuple[int, int, int]] = []       # (offset, length, owner)
        pos = 0
        for k in range(NB_WRITERS * SMALL_SLOTS_PER_WRITER):
            self.ranges.append((pos, SMALL_SLOT_SIZE, k % NB_WRITERS))
            pos += SMALL_SLOT_SIZE
        pos = -(-pos // big_slot_size) * big_slot_size
        for w in range(NB_WRITERS):
            for _ in range(big_slots_per_writer):
                self.ranges.append((pos, big_slot_size, w))
                pos += big_slot_size
        self.end = pos
        self.model = bytearray(initial[:pos])
        self.history = [[bytes(self.model[o:o + n])] for o, n, _ in self.ranges]
        self.history_lock = threading.Lock()

    def owned(self, writer: int) -> list[int]:
        return [i for i, (_, _, w) in enumerate(self.ranges) if w == writer]

    def expect(self, slot: int, value: bytes) -> None:
        """Record a value the slot will hold (before the write that produces it is issued)."""
        offset, length, _ = self.ranges[slot]
        with self.history_lock:
            self.history[slot].append(value)
        self.model[offset:offset + length] = value

    def verify(self, data: bytes, first_slot: int, nb_slots: int) -> None:
        base = self.ranges[first_slot][0]
        for slot in range(first_slot, first_slot + nb_slots):
            offset, length, _ = self.ranges[slot]
            got = data[offset - base:offset - base + length]
            with self.history_lock:
                known = list(self.history[slot])
            assert got in known, _describe(got, known, slot, offset)


def _describe(got: bytes, known: list, slot: int, offset: int) -> str:
    """Where the bytes read part from each value the slot held (for the failure message)."""
    parts = []
    for value in known:
        first = next(i for i in range(len(got)) if got[i] != value[i])
        last = max(i for i in range(len(got)) if got[i] != value[i])
        parts.append(f"differs from {value[:4].hex()}.. at +{first:#x}..+{last:#x} "
                     f"(read {got[first:first + 4].hex()}, value {value[first:first + 4].hex()})")
    return f"slot {slot} at {offset:#x} read a value it never held: " + "; ".join(parts)


def _writer(img, slots: Slots, writer: int, seed: int) -> None:
    rng = random.Random(seed)
    cs = slots.cluster_size
    mine = slots.owned(writer)
    big = [i for i in mine if slots.ranges[i][1] > SMALL_SLOT_SIZE]
    small = [i for i in mine if slots.ranges[i][1] == SMALL_SLOT_SIZE]
    for version in range(1, OPS_PER_WRITER + 1):
        op = rng.choice(["write", "write", "write", "big_write", "compressed", "zero", "zero_unmap",
                         "discard"])
        if op in ("big_write", "compressed"):
            k = rng.randrange(len(big))
            run = big[k:k + rng.randint(1, 3)]
        else:
            run = [rng.choice(small + big)]
        offset = slots.ranges[run[0]][0]
        length = sum(slots.ranges[i][1] for i in run)
        if op in ("write", "big_write", "compressed"):
            values = [_value(writer, i, version, slots.ranges[i][1]) for i in run]
            if op == "compressed":        # compressible: repeat the slot's first cluster
                values = [(v[:cs] * (len(v) // cs)) for v in values]
            for i, v in zip(run, values):
                slots.expect(i, v)
            buf = b"".join(values)
            if op == "compressed":
                img.write_compressed(buf, offset)
            else:
                img.pwrite(buf, offset)
        elif op in ("zero", "zero_unmap"):
            slots.expect(run[0], bytes(length))
            img.write_zeroes(offset, length, may_unmap=op == "zero_unmap")
        else:
            # a discard drops the whole clusters inside the slot (version 3: they read as zeros)
            start = -(-offset // cs) * cs
            stop = (offset + length) // cs * cs
            value = bytearray(slots.model[offset:offset + length])
            if start < stop:
                value[start - offset:stop - offset] = bytes(stop - start)
            slots.expect(run[0], bytes(value))
            img.discard(offset, length)


def _reader(img, slots: Slots, stop: threading.Event, seed: int, counts: list) -> None:
    rng = random.Random(seed)
    nb = len(slots.ranges)
    reads = 0
    while not stop.is_set() or reads < 20:
        first = rng.randrange(nb)
        n = min(nb - first, rng.choice([1, 1, 2, 5, 12]))
        offset = slots.ranges[first][0]
        last_offset, last_length, _ = slots.ranges[first + n - 1]
        length = last_offset + last_length - offset       # the gaps between slots too
        slots.verify(img.pread(length, offset), first, n)
        reads += 1
    counts.append(reads)


def _assert_tiles(extents, size: int) -> None:
    pos = 0
    for e in extents:
        assert e.start == pos and e.length > 0, (e, pos)
        pos += e.length
    assert pos == size


def _mapper(img, stop: threading.Event, counts: list) -> None:
    walks = 0
    while not stop.is_set() or walks < 3:
        size = img.size
        _assert_tiles(img.map(0, size), size)
        _assert_tiles(list(img.iter_map(0, size)), size)
        walks += 1
    counts.append(walks)


def _snapshot_reader(img, expected: bytes, stop: threading.Event, seed: int, counts: list) -> None:
    rng = random.Random(seed)
    view = img.snapshot("before")
    reads = 0
    while not stop.is_set() or reads < 20:
        offset = rng.randrange(0, len(expected) - 1)
        length = min(len(expected) - offset, rng.choice([512, 4096, 70000]))
        assert view.pread(length, offset) == expected[offset:offset + length], offset
        reads += 1
    counts.append(reads)


def _flusher(img, stop: threading.Event) -> None:
    while not stop.is_set():
        img.flush()
        stop.wait(0.002)          # pacing only: let the others take the lock in between


def _resizer(img, final_size: int, nb_steps: int) -> None:
    start = img.size
    for k in range(1, nb_steps + 1):
        img.resize(start + (final_size - start) * k // nb_steps)


def _run_threads(targets) -> None:
    errors: list[BaseException] = []

    def guarded(fn, *args):
        try:
            fn(*args)
        except BaseException as e:      # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(fn, *args)) for fn, *args in targets]
    for t in threads:
        t.start()
    return threads, errors


@pytest.mark.parametrize("cluster_size,extended_l2,l2_cache_tables", [
    (512, False, 4),          # many L2 tables, a tiny cache: evictions under concurrency
    (16384, True, 64),        # subclusters: concurrent partial allocation in one cluster
])
def test_concurrent_writers_and_readers(tmp_path, cluster_size, extended_l2, l2_cache_tables):
    cs = cluster_size
    big_slot = 26 * cs if cs == 512 else 3 * cs   # 512: runs of them cross the 32 KiB L2 spans
    big_slots_per_writer = 12 if cs == 512 else 6
    probe = Slots(cs, big_slot, big_slots_per_writer, bytes(0))
    disk_size = -(-probe.end // cs) * cs + 4 * cs
    grown_size = disk_size + (6 << 20 if cs == 512 else 24 << 20)

    base = str(tmp_path / "base.qcow2")
    create(base, disk_size)
    qemu_io(base, f"write -P {BACKING_BYTE} 0 {disk_size // 2}")
    path = str(tmp_path / "img.qcow2")
    create(path, disk_size, options={"cluster_size": cs, "extended_l2": "on" if extended_l2
                                     else "off"}, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(path, f"write -P 0x21 {cs * 3 + 100} {disk_size // 3}",
            f"write -c -P 0x22 {disk_size // 2 // cs * cs} {2 * cs}")
    initial = bytearray(bytes([BACKING_BYTE]) * (disk_size // 2) + bytes(disk_size - disk_size // 2))
    initial[cs * 3 + 100:cs * 3 + 100 + disk_size // 3] = b"\x21" * (disk_size // 3)
    c0 = disk_size // 2 // cs * cs
    initial[c0:c0 + 2 * cs] = b"\x22" * (2 * cs)
    qemu_img("snapshot", "-c", "before", path)
    snapshot_content = bytes(initial)
    slots = Slots(cs, big_slot, big_slots_per_writer, bytes(initial))

    events = []
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with qcow2.open(path, "r+", l2_cache_size=l2_cache_tables * cs,
                        on_event=events.append) as img:
            assert img.pread(disk_size, 0) == snapshot_content
            stop = threading.Event()
            reads: list = []
            walks: list = []
            snap_reads: list = []
            writers, writer_errors = _run_threads(
                [(_writer, img, slots, w, 1000 + w) for w in range(NB_WRITERS)]
                + [(_resizer, img, grown_size, 8)])
            others, other_errors = _run_threads(
                [(_reader, img, slots, stop, 2000 + r, reads) for r in range(NB_READERS)]
                + [(_mapper, img, stop, walks), (_flusher, img, stop),
                   (_snapshot_reader, img, snapshot_content, stop, 3000, snap_reads)])
            for t in writers:
                t.join()
            stop.set()
            for t in others:
                t.join()
            errors = writer_errors + other_errors
            if errors:
                raise errors[0]
            assert len(reads) == NB_READERS and min(reads) >= 20 and walks and snap_reads

            assert img.size == grown_size
            final = bytes(slots.model) + bytes(grown_size - slots.end)
            assert img.pread(grown_size, 0) == final
            assert not img.corrupt and events == []
            img._writer.refcounts._check()
            img._l2_cache._check()
            img.guard._check()
            fresh = OverlapGuard(cs, source=lambda types: iter_metadata(img, types))
            fresh.rebuild()
            assert list(img.guard._map.runs()) == list(fresh._map.runs())
    finally:
        sys.setswitchinterval(old_interval)

    rc, report = check_json(path)
    assert rc == 0 and not report.get("leaks") and not report.get("corruptions"), report
    model_raw = tmp_path / "final.raw"
    model_raw.write_bytes(final)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", path, str(model_raw), check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    snap_raw = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "before", "-O", "raw", path, str(snap_raw))
    assert snap_raw.read_bytes()[:disk_size] == snapshot_content


def test_concurrent_readers_of_a_read_only_image(tmp_path):
    """Reads of a read-only image take no lock: many threads reading compressed, zero, data and
    backing clusters (the shared decompressed-cluster cache and L2 cache) all see the content."""
    cs = 4096
    size = 4 << 20
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(b"\x5b" * size)
    path = str(tmp_path / "ro.qcow2")
    create(path, size, options={"cluster_size": cs}, backing="base.raw", backing_fmt="raw")
    commands, expected = [], bytearray(b"\x5b" * size)
    for k in range(64):
        offset = k * 16 * cs
        kind = k % 4
        if kind == 0:
            commands.append(f"write -c -P {k + 1} {offset} {2 * cs}")
            expected[offset:offset + 2 * cs] = bytes([k + 1]) * (2 * cs)
        elif kind == 1:
            commands.append(f"write -z {offset + 100} {3 * cs}")
            expected[offset + 100:offset + 100 + 3 * cs] = bytes(3 * cs)
        elif kind == 2:
            commands.append(f"write -P {k + 1} {offset + 7} 9000")
            expected[offset + 7:offset + 9007] = bytes([k + 1]) * 9000
    qemu_io(path, *commands)
    expected = bytes(expected)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with qcow2.open(path, "r", l2_cache_size=4 * cs) as img:
            def read_many(seed):
                rng = random.Random(seed)
                for _ in range(300):
                    offset = rng.randrange(0, size - 1)
                    length = min(size - offset, rng.choice([1, 700, cs, 3 * cs + 5, 100000]))
                    assert img.pread(length, offset) == expected[offset:offset + length], offset

            threads, errors = _run_threads([(read_many, seed) for seed in range(6)])
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            img._l2_cache._check()
    finally:
        sys.setswitchinterval(old_interval)
