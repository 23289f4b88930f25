"""Record the host writes of a workload, and rebuild the image file as a crash would leave it.

Used by ``tests/test_crash_safety.py`` (see its docstring for the method).  Nothing here writes an
image through a second path: the recorder wraps :class:`qcow2.storage.Storage`'s writing methods
(``pwrite``, ``allocate``, ``truncate``, ``flush``) for the duration of a workload, lets every call
through unchanged, and keeps a copy of what reached the image file.  Cut images are assembled in
memory from the starting bytes and a chosen set of those writes, and saved as ordinary files for
``qemu-img check`` and our reader.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import qcow2
from qcow2.overlap_types import (OL_ACTIVE_L1, OL_ACTIVE_L2, OL_MAIN_HEADER, OL_REFCOUNT_BLOCK,
                                 OL_REFCOUNT_TABLE)
from qcow2.storage import Storage
from tests.qemu import qemu_img

SECTOR_SIZE = 512

_KIND_NAMES = ((OL_MAIN_HEADER, "header"), (OL_ACTIVE_L1, "L1"), (OL_ACTIVE_L2, "L2"),
               (OL_REFCOUNT_TABLE, "reftable"), (OL_REFCOUNT_BLOCK, "refblock"))


# header fields (byte position, size) a workload may be expected to change
_HEADER_FIELDS = {"size": (24, 8), "l1_size": (36, 4), "l1_table_offset": (40, 8),
                  "refcount_table_offset": (48, 8), "refcount_table_clusters": (56, 4),
                  "incompatible_features": (72, 8)}


@dataclass(frozen=True)
class HostWrite:
    """One call that reached the image file.

    ``kind`` is ``"pwrite"``, ``"allocate"`` (zero-filled space, the file may grow), ``"truncate"``
    (``host_offset`` is the new file length) or ``"flush"`` (fsync: a barrier).  ``ign`` is the mask
    of metadata types the write was allowed to touch; 0 means guest data (or compressed data)."""

    kind: str
    host_offset: int
    data: bytes = b""
    length: int = 0
    ign: int = 0

    @property
    def is_metadata(self) -> bool:
        return self.kind == "pwrite" and self.ign != 0

    @property
    def what(self) -> str:
        if self.kind != "pwrite":
            return self.kind
        if not self.ign:
            return "data"
        if self.ign & OL_MAIN_HEADER:
            return "header"          # header rewrites may overlap any type (Image._update_header)
        names = [name for bit, name in _KIND_NAMES if self.ign & bit]
        return "+".join(names) or f"metadata(ign=0x{self.ign:x})"

    def sector_pieces(self) -> list[tuple[int, bytes]]:
        """The write split at absolute 512-byte boundaries: the units a disk writes atomically."""
        out = []
        pos = self.host_offset
        end = pos + len(self.data)
        while pos < end:
            stop = min(end, (pos // SECTOR_SIZE + 1) * SECTOR_SIZE)
            out.append((pos, self.data[pos - self.host_offset:stop - self.host_offset]))
            pos = stop
        return out

    def describe(self) -> str:
        if self.kind == "pwrite":
            return f"{self.what} write of {len(self.data)} bytes at 0x{self.host_offset:x}"
        if self.kind == "allocate":
            return f"allocate 0x{self.length:x} bytes at 0x{self.host_offset:x}"
        if self.kind == "truncate":
            return f"truncate to 0x{self.host_offset:x}"
        return "flush"


@dataclass
class Mark:
    """The state after one workload operation: how many host writes had been made, whether the
    operation ended with everything durable (a flush or the close), and the guest content then."""

    label: str
    nb_writes: int
    durable: bool
    guest: bytes


@dataclass
class Recording:
    start: bytes
    writes: list[HostWrite]
    marks: list[Mark] = field(default_factory=list)

    def count(self, what: str) -> int:
        return sum(1 for w in self.writes if w.what == what)

    def durable_mark(self, nb_durable_writes: int) -> int:
        """Index of the last mark whose operation ended durable within the first
        ``nb_durable_writes`` writes (0: the starting image, which is durable by definition)."""
        best = 0
        for j, m in enumerate(self.marks):
            if m.durable and m.nb_writes <= nb_durable_writes:
                best = j
        return best

    def allowed_guest_states(self, cut: "Cut") -> list[bytes]:
        """The guest states a cut may show, sector by sector: from the last durable mark up to
        the operation during which the cut's last write was made."""
        first = self.durable_mark(cut.durable())
        last = next((j for j, m in enumerate(self.marks) if m.nb_writes >= cut.upto()),
                    len(self.marks) - 1)
        return [m.guest for m in self.marks[first:max(first, last) + 1]]

    def header_changes(self) -> set[str]:
        """Names of the header fields that some recorded header write changed."""
        changed: set[str] = set()
        for w in self.writes:
            if w.kind == "pwrite" and w.host_offset == 0 and len(w.data) >= 80:
                for name, (pos, size) in _HEADER_FIELDS.items():
                    if w.data[pos:pos + size] != self.start[pos:pos + size]:
                        changed.add(name)
        return changed

    def barriers(self) -> list[int]:
        """Indexes of the flush records."""
        return [i for i, w in enumerate(self.writes) if w.kind == "flush"]


class WriteRecorder:
    """Context manager: while active, every write that reaches the file at ``path`` through
    :class:`Storage` is appended to :attr:`writes` (after it succeeded)."""

    def __init__(self, path: str):
        self.real_path = os.path.realpath(path)
        self.writes: list[HostWrite] = []
        self._saved: dict[str, Callable] = {}

    def _mine(self, storage: Storage) -> bool:
        return os.path.realpath(storage.path) == self.real_path

    def __enter__(self) -> "WriteRecorder":
        recorder = self
        pwrite, allocate = Storage.pwrite, Storage.allocate
        truncate, flush = Storage.truncate, Storage.flush
        self._saved = {"pwrite": pwrite, "allocate": allocate, "truncate": truncate,
                       "flush": flush}

        def rec_pwrite(storage, data, host_offset, ign=0):
            n = pwrite(storage, data, host_offset, ign)
            if recorder._mine(storage):
                recorder.writes.append(HostWrite("pwrite", host_offset,
                                                 bytes(memoryview(data).cast("B")), ign=ign))
            return n

        def rec_allocate(storage, host_offset, length, ign=0):
            allocate(storage, host_offset, length, ign)
            if recorder._mine(storage):
                recorder.writes.append(HostWrite("allocate", host_offset, length=length))

        def rec_truncate(storage, length):
            truncate(storage, length)
            if recorder._mine(storage):
                recorder.writes.append(HostWrite("truncate", length))

        def rec_flush(storage):
            flush(storage)
            if storage.writable and recorder._mine(storage):
                recorder.writes.append(HostWrite("flush", 0))

        Storage.pwrite, Storage.allocate = rec_pwrite, rec_allocate
        Storage.truncate, Storage.flush = rec_truncate, rec_flush
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(Storage, name, fn)


def record_workload(path: str, workload: Callable, **open_options) -> Recording:
    """Open ``path`` "r+", run ``workload(img, mark)``, close, and return what was written.

    The workload calls ``mark(label, durable=False)`` after each operation; ``durable=True``
    right after ``img.flush()``.  The close is the last, durable, mark."""
    with open(path, "rb") as f:
        start = f.read()
    recording = Recording(start, [])
    with WriteRecorder(path) as recorder:
        recording.writes = recorder.writes
        img = qcow2.open(path, "r+", **open_options)
        try:
            recording.marks.append(Mark("open", len(recorder.writes), True,
                                        img.pread(img.size, 0)))

            def mark(label: str, durable: bool = False) -> None:
                recording.marks.append(Mark(label, len(recorder.writes), durable,
                                            img.pread(img.size, 0)))

            workload(img, mark)
            final = img.pread(img.size, 0)
        finally:
            img.close()
        recording.marks.append(Mark("close", len(recorder.writes), True, final))
    return recording


# -- assembling cut images ----------------------------------------------------------------------
def _put(buf: bytearray, host_offset: int, data: bytes) -> None:
    end = host_offset + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[host_offset:end] = data


def apply_write(buf: bytearray, w: HostWrite, sectors: Iterable[int] | None = None) -> None:
    """Apply one recorded write to the file bytes; ``sectors`` selects which of its sector pieces
    reached the disk (None: all of them)."""
    if w.kind == "pwrite":
        if sectors is None:
            _put(buf, w.host_offset, w.data)
        else:
            pieces = w.sector_pieces()
            for index in sectors:
                _put(buf, *pieces[index])
    elif w.kind == "allocate":
        if w.host_offset + w.length > len(buf):
            buf.extend(bytes(w.host_offset + w.length - len(buf)))
    elif w.kind == "truncate":
        if w.host_offset < len(buf):
            del buf[w.host_offset:]
        else:
            buf.extend(bytes(w.host_offset - len(buf)))


def torn_variants(w: HostWrite) -> list[tuple[str, tuple[int, ...]]]:
    """Ways a multi-sector write can be half done: a prefix of its sectors, only its second half,
    every other sector.  Each is (name, indexes of the sector pieces that reached the disk)."""
    if w.kind != "pwrite":
        return []
    n = len(w.sector_pieces())
    if n < 2:
        return []
    candidates = [("first sector", (0,)), ("first half", tuple(range(n // 2))),
                  ("second half only", tuple(range(n // 2, n))),
                  ("every other sector", tuple(range(0, n, 2)))]
    seen: set[tuple[int, ...]] = set()
    out = []
    for name, indexes in candidates:
        if indexes and len(indexes) < n and indexes not in seen:
            seen.add(indexes)
            out.append((name, indexes))
    return out


class PrefixBuilder:
    """File bytes after the first ``k`` writes, computed incrementally for increasing ``k``."""

    def __init__(self, recording: Recording):
        self._rec = recording
        self._k = 0
        self._buf = bytearray(recording.start)

    def after(self, k: int) -> bytearray:
        if k < self._k:
            self._k, self._buf = 0, bytearray(self._rec.start)
        while self._k < k:
            apply_write(self._buf, self._rec.writes[self._k])
            self._k += 1
        return bytearray(self._buf)


@dataclass(frozen=True)
class Cut:
    """One crash state: ``prefix`` writes complete, then ``extra`` = (write index, sectors or
    None) applied on top; ``nb_durable`` writes are known to have been on disk (for the guest
    content expected); ``name`` says how it was made."""

    name: str
    prefix: int
    extra: tuple[tuple[int, tuple[int, ...] | None], ...] = ()
    nb_durable: int | None = None

    def durable(self) -> int:
        return self.prefix if self.nb_durable is None else self.nb_durable

    def upto(self) -> int:
        """One past the last write this state contains."""
        return max([self.prefix] + [index + 1 for index, _ in self.extra])


def build(recording: Recording, builder: PrefixBuilder, cut: Cut) -> bytearray:
    buf = builder.after(cut.prefix)
    for index, sectors in cut.extra:
        apply_write(buf, recording.writes[index], sectors)
    return buf


# -- choosing cuts --------------------------------------------------------------------------------
def prefix_cuts(recording: Recording, *, nb_data_samples: int, nb_torn_data: int,
                seed: int) -> list[Cut]:
    """Every cut next to a metadata write (just before it, just after it, and torn inside it),
    a sample of the cuts after data writes, the start and the end."""
    writes = recording.writes
    rng = random.Random(seed)
    points = {0, len(writes)}
    data_points = []
    torn: list[Cut] = []
    for i, w in enumerate(writes):
        if w.kind == "flush":
            continue
        if w.is_metadata:
            points.update((i, i + 1))
            torn += [Cut(f"torn {w.describe()} (#{i}): {name}", i, ((i, sectors),))
                     for name, sectors in torn_variants(w)]
        else:
            data_points.append(i)
    sampled = data_points if len(data_points) <= nb_data_samples else \
        rng.sample(data_points, nb_data_samples)
    points.update(i + 1 for i in sampled)
    torn_data = [i for i in sampled if torn_variants(writes[i])]
    for i in rng.sample(torn_data, min(nb_torn_data, len(torn_data))):
        name, sectors = rng.choice(torn_variants(writes[i]))
        torn.append(Cut(f"torn {writes[i].describe()} (#{i}): {name}", i, ((i, sectors),)))
    # cuts that differ only by flush records give the same file: keep one of each
    nb_real = [0]
    for w in writes:
        nb_real.append(nb_real[-1] + (w.kind != "flush"))
    effective: dict[int, int] = {}
    for k in sorted(points):
        effective.setdefault(nb_real[k], k)
    cuts = [Cut(f"after {k} writes" + (f" (last: {writes[k - 1].describe()})" if k else ""), k)
            for k in sorted(effective.values())]
    return sorted(cuts + torn, key=lambda c: c.prefix)


def reorder_cuts(recording: Recording, *, nb_data_samples: int, seed: int,
                 max_metadata_per_interval: int = 40, nb_random_subsets: int = 2) -> list[Cut]:
    """Power-loss states: everything before the last completed flush is on disk, and of the
    writes since, any subset.  Per interval between two flushes: each metadata write alone, all
    but each metadata write, all metadata writes without any data write, all but a sampled data
    write, and a few random subsets (each write kept or lost by a coin toss)."""
    writes = recording.writes
    rng = random.Random(seed)
    bounds = [-1] + recording.barriers() + [len(writes)]
    cuts: list[Cut] = []
    for lo, hi in zip(bounds, bounds[1:]):
        start = lo + 1
        interval = list(range(start, hi))
        if len(interval) < 2:
            continue
        meta = [i for i in interval if writes[i].is_metadata]
        data = [i for i in interval if not writes[i].is_metadata]
        if len(meta) > max_metadata_per_interval:
            meta_sample = sorted(rng.sample(meta, max_metadata_per_interval))
        else:
            meta_sample = meta
        subsets: dict[tuple[int, ...], str] = {}
        for i in meta_sample:
            subsets.setdefault((i,), f"only {writes[i].describe()} (#{i})")
            subsets.setdefault(tuple(j for j in interval if j != i),
                               f"all but {writes[i].describe()} (#{i})")
        if meta and data:
            subsets.setdefault(tuple(meta), "metadata writes without their data writes")
        for i in rng.sample(data, min(nb_data_samples, len(data))):
            subsets.setdefault(tuple(j for j in interval if j != i),
                               f"all but {writes[i].describe()} (#{i})")
        if len(interval) >= 3:
            for _ in range(nb_random_subsets):
                subset = tuple(j for j in interval if rng.random() < 0.5)
                subsets.setdefault(subset, f"random subset {list(subset)}")
        for subset, name in subsets.items():
            if len(subset) in (0, len(interval)):
                continue
            cuts.append(Cut(f"interval #{start}..#{hi - 1}: {name}", start,
                            tuple((j, None) for j in subset), nb_durable=start))
    return cuts


# -- judging cut images -----------------------------------------------------------------------
def qemu_check(path: str) -> tuple[int, dict | None, str]:
    proc = qemu_img("check", "--output=json", path, check=False)
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        data = None
    return proc.returncode, data, proc.stderr


def _errors(stderr: str) -> str:
    """qemu-img's per-item lines, without the leaks (which a crash may leave)."""
    lines = [ln for ln in stderr.splitlines() if ln and not ln.startswith("Leaked cluster")]
    return "; ".join(lines[:12])


def no_corruption(path: str) -> tuple[str | None, int]:
    """(None when qemu-img check finds no corruption, else the complaint; the number of leaked
    clusters it reported).  Leaks are allowed: a crash may leak clusters."""
    rc, data, err = qemu_check(path)
    if data is None or rc not in (0, 3) or data.get("corruptions", 0) or data["check-errors"]:
        return f"qemu-img check exit {rc}: {data} {_errors(err)}", 0
    return None, data.get("leaks", 0)


def clean(path: str) -> str | None:
    """None when qemu-img check finds the image clean (exit 0, no leaks), else the complaint."""
    rc, data, err = qemu_check(path)
    if rc != 0 or data is None or data.get("leaks", 0) or data.get("corruptions", 0):
        return f"qemu-img check exit {rc}: {data} {_errors(err)}"
    return None


def content_problem(content: bytes, allowed: Sequence[bytes]) -> str | None:
    """None when every 512-byte guest sector of ``content`` equals that sector in one of the
    ``allowed`` guest states (the state at the last durable point and every later one): a crash
    may lose or keep each unflushed change, but never invent bytes.  A resize changes the virtual
    size, which must be one of the states'; each sector is compared with the states that are
    long enough to have it (so space a grow added must read as that state had it: zeros, not
    the old bytes of the last cluster or of a backing file)."""
    sizes = sorted({len(s) for s in allowed})
    if len(content) not in sizes:
        return f"virtual size {len(content)} is none of {sizes}"
    chunk = 64 * 1024
    for a in range(0, len(content), chunk):
        b = min(len(content), a + chunk)
        piece = content[a:b]
        if any(len(s) >= b and s[a:b] == piece for s in allowed):
            continue
        for x in range(a, b, SECTOR_SIZE):
            y = min(b, x + SECTOR_SIZE)
            if not any(len(s) >= y and s[x:y] == content[x:y] for s in allowed):
                return (f"guest sector at 0x{x:x} reads {content[x:x + 16].hex()}..., which no "
                        f"state since the last flush had")
    return None


def qemu_read(path: str) -> bytes:
    """The guest content as qemu-img reads it (convert to raw)."""
    raw = path + ".raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", path, raw)
    try:
        with open(raw, "rb") as f:
            return f.read()
    finally:
        os.unlink(raw)


def read_guest(path: str) -> bytes:
    with qcow2.open(path, "r") as img:
        return img.pread(img.size, 0)


@contextlib.contextmanager
def cut_file(path: str, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
    try:
        yield path
    finally:
        os.unlink(path)
