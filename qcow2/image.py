"""The public :class:`Image` object and the read path.

Theory of operation
-------------------
Opening an image reads cluster 0 once (the header codec validates it against QEMU's limits), the
active L1 table (one read, decoded in bulk), the snapshot table, the bitmap directory and the backing
chain.  L2 tables are loaded on demand through a :class:`~qcow2.cache.TableCache`.

A read splits the guest range into segments (:meth:`~qcow2.cluster.Mapping.segments`); each
contiguous host run is read with one ``preadv`` straight into the caller's buffer, zero segments
are filled in place, compressed clusters are expanded (the last one is cached, as sequential readers
touch it repeatedly), and unallocated segments are delegated to the backing device (zeros past its
end).  Internal snapshots are read through :class:`SnapshotView`, the same reader over the
snapshot's L1 table.

``map`` composes the per-layer block status down the backing chain and merges adjacent extents, the
way ``qemu-img map`` presents them.

Opened ``"r+"``, an image also has a :class:`~qcow2.writer.Writer` and an overlap guard built at
open and attached to the host file, so every host write is checked.  One re-entrant lock serialises
writes, reads and flushes of a writable image (reads of a read-only image need none).  A detected
inconsistency goes through :meth:`Image.signal_corruption`: corrupt bit, ``BLOCK_IMAGE_CORRUPTED``
(once), and every later write refused.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from . import constants as C
from .cache import TableCache
from .cluster import COMPRESSED, DATA, UNALLOCATED, ZERO, Mapping
from .compress import decompress_cluster
from .events import EventEmitter, Subscriber, image_corrupted_event
from .errors import (BackingError, CorruptImageError, FormatError, OverlapError, Qcow2Error,
                     ReadOnlyError, RequestError, UnsupportedError)
from .bitmap import BitmapDirectoryEntry, decode_bitmap_directory
from .header import decode_header, encode_header_fields
from .overlap_types import OL_MAIN_HEADER, OL_MASK_LIMIT, parse_overlap_check
from .snapshot import SnapshotEntry
from .snapshot_table import read_snapshot_table, table_location_valid
from .storage import Storage
from .tables import decode_compressed, decode_u64_table

DEFAULT_L2_CACHE_SIZE = 32 * 1024 * 1024
#: QEMU's cache modes we implement: ``writeback`` (a flush is an fsync: the crash order holds) and
#: ``unsafe`` (flushes, and so the fsync barriers of the crash order, are skipped: for scratch
#: images such as a ``convert`` target, which QEMU also writes with ``unsafe`` by default)
CACHE_MODES = ("writeback", "unsafe")
_ZEROS = bytes(1 << 20)


class Status(NamedTuple):
    """Block status of one layer for ``length`` bytes (qemu's BDRV_BLOCK_* flags, in words)."""

    length: int
    present: bool
    zero: bool
    data: bool
    offset: int | None


@dataclass(frozen=True)
class Extent:
    """One entry of :meth:`Image.map`, with ``qemu-img map --output=json``'s fields."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None

    def to_json(self) -> dict:
        """The dict qemu-img map prints for this extent (``offset`` only when known)."""
        d = {"start": self.start, "length": self.length, "depth": self.depth,
             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


def _fill_zeros(view: memoryview) -> None:
    for pos in range(0, len(view), len(_ZEROS)):
        n = min(len(_ZEROS), len(view) - pos)
        view[pos:pos + n] = _ZEROS[:n]


def _check_request(offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0:
        raise RequestError(f"Invalid request: offset {offset}, length {length}")
    if offset + length > size:
        raise RequestError(f"Request past end of image: offset 0x{offset:x} length 0x{length:x} "
                           f"(image size 0x{size:x})")


class _Device:
    """What every layer of a backing chain offers: size, reads and block status."""

    filename: str
    format: str
    size: int
    backing: "_Device | None" = None

    def readinto(self, buf, offset: int) -> None:
        """Read ``len(buf)`` guest bytes at ``offset`` into ``buf``.

        Ranges a layer does not allocate are read from the layer below, iteratively (a chain may
        be thousands of images deep); past the end of a backing device they read as zeros.
        """
        view = memoryview(buf).cast("B")
        _check_request(offset, len(view), self.size)
        work = [(self, view, offset)]
        while work:
            dev, dst, pos = work.pop()
            dev._read_layer(dst, pos, work)

    def _read_layer(self, dst: memoryview, guest_offset: int, work: list) -> None:
        """Fill ``dst`` from this layer; append ``(device, view, offset)`` for what is below."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _defer_to_backing(self, dst: memoryview, guest_offset: int, work: list) -> None:
        below = self.backing
        covered = 0
        if below is not None and guest_offset < below.size:
            covered = min(len(dst), below.size - guest_offset)
            work.append((below, dst[:covered], guest_offset))
        _fill_zeros(dst[covered:])

    def block_status(self, offset: int, length: int) -> Iterator[Status]:  # pragma: no cover
        """This layer's status of the range, in order (without looking at the backing file)."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pread(self, length: int, offset: int) -> bytes:
        """Return ``length`` guest bytes at ``offset``.  Raises ``RequestError`` past the end."""
        _check_request(offset, length, self.size)
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def map(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Allocation map of ``[offset, offset+length)`` through the whole backing chain, as a list
        (see :meth:`iter_map`)."""
        return list(self.iter_map(offset, length))

    def iter_map(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Allocation map of ``[offset, offset+length)`` through the whole backing chain.

        Adjacent extents with equal flags and contiguous host offsets are merged, as qemu-img map
        merges them.  A generator: memory stays bounded however many extents the disk has.
        O(clusters in the range) per layer consulted.
        """
        if length is None:
            length = max(0, self.size - offset)
        _check_request(offset, length, self.size)
        last = None
        for ext in _chain_status(self, offset, length):
            if last is not None:
                if (last.depth == ext.depth and last.present == ext.present
                        and last.zero == ext.zero and last.data == ext.data
                        and (last.offset is None) == (ext.offset is None)
                        and (last.offset is None or last.offset + last.length == ext.offset)):
                    last = Extent(last.start, last.length + ext.length, last.depth,
                                  last.present, last.zero, last.data, last.offset)
                    continue
                yield last
            last = ext
        if last is not None:
            yield last


def _chain_status(top: _Device, offset: int, length: int) -> Iterator[Extent]:
    """Block status down the backing chain, in guest order, without recursion (chains may be
    thousands deep): a stack of per-layer walks, each of which either yields a final extent or
    asks for a range of the layer below to be walked first."""
    stack = [_layer_walk(top, offset, length, 0)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, Extent):
            yield item
        else:
            stack.append(_layer_walk(*item))


def _layer_walk(dev: _Device, pos: int, length: int, depth: int):
    """One layer's part of :func:`_chain_status`.  A range the layer does not allocate is asked
    of its backing device, one level deeper; the part past the backing device's end reads as
    zeros at the layer's own depth, as qemu-img reports it."""
    for st in dev.block_status(pos, length):
        if st.present:
            yield Extent(pos, st.length, depth, True, st.zero, st.data, st.offset)
        else:
            below = dev.backing
            covered = min(st.length, below.size - pos) if below and pos < below.size else 0
            if covered:
                yield (below, pos, covered, depth + 1)
            if covered < st.length:
                yield Extent(pos + covered, st.length - covered, depth, False, True, False,
                             None if st.offset is None else st.offset + covered)
        pos += st.length


class RawImage(_Device):
    """A raw file used as a backing file (read-only)."""

    format = "raw"

    def __init__(self, path: str):
        self.filename = path
        self._file = Storage(path, what="backing file")
        # QEMU sees whole sectors: a file's last partial sector reads as padded with zeros
        self.size = -(-self._file.size // C.SECTOR_SIZE) * C.SECTOR_SIZE

    def _read_layer(self, dst: memoryview, guest_offset: int, work: list) -> None:
        self._file.readinto(dst, guest_offset)

    def block_status(self, offset: int, length: int) -> Iterator[Status]:
        """Data vs holes from ``SEEK_DATA``/``SEEK_HOLE``; holes read as zeros."""
        for n, is_data in self._file.data_runs(offset, length):
            yield Status(n, True, not is_data, is_data, offset)
            offset += n

    @property
    def actual_size(self) -> int:
        """Bytes the file occupies on the host (qemu-img info's actual-size)."""
        return self._file.allocated_size()

    def close(self) -> None:
        self._file.close()

    _close_layer = close


class _Qcow2Reader(_Device):
    """The read path over one L1 table; shared by :class:`Image` and :class:`SnapshotView`."""

    format = "qcow2"
    _image: "Image"
    _mapping: Mapping

    def _read_layer(self, dst: memoryview, guest_offset: int, work: list) -> None:
        """One ``preadv`` per contiguous host run; zeros in place; compressed clusters expanded."""
        img = self._image
        base = guest_offset
        for kind, seg_offset, n, host in self._mapping.segments(guest_offset, len(dst)):
            part = dst[seg_offset - base:seg_offset - base + n]
            if kind == DATA:
                img._data.readinto(part, host)
            elif kind == ZERO:
                _fill_zeros(part)
            elif kind == UNALLOCATED:
                self._defer_to_backing(part, seg_offset, work)
            else:
                cluster = img._compressed_cluster(host)
                start = seg_offset & (img.cluster_size - 1)
                part[:] = cluster[start:start + n]

    def block_status(self, offset: int, length: int) -> Iterator[Status]:
        prealloc = None
        for kind, _, n, host in self._mapping.iter_segments(offset, length):
            if kind == DATA:
                if prealloc is None:
                    prealloc = self._image.metadata_preallocated
                if not prealloc:
                    yield Status(n, True, False, True, host)
                    continue
                # QEMU asks the host file about preallocated images: holes read as zeros
                for run, is_data in self._image._data.data_runs(host, n):
                    yield Status(run, True, not is_data, True, host)
                    host += run
            elif kind == ZERO:
                yield Status(n, True, True, False, host if host >= 0 else None)
            elif kind == COMPRESSED:
                yield Status(n, True, False, True, None)
            else:
                yield Status(n, False, False, False, host if host >= 0 else None)

    def as_file(self) -> "ImageFile":
        """A read-only, seekable ``io.RawIOBase`` view of the guest disk."""
        return ImageFile(self)

    def _shared_lock(self):
        """The image's lock when it is writable (readers share its L2 cache with the writer, and
        a cache miss may write a dirty table back); nothing to take on a read-only image."""
        img = self._image
        return img._lock if img._writer is not None else contextlib.nullcontext()

    def iter_map(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """See :meth:`_Device.iter_map`; on a writable image each step runs under the image's
        lock (extents are consistent; writes may land between two of them)."""
        inner = super().iter_map(offset, length)
        while True:
            with self._shared_lock():
                ext = next(inner, None)
            if ext is None:
                return
            yield ext


class Image(_Qcow2Reader):
    """An open qcow2 image.  Use :func:`qcow2.open`; a context manager; safe across threads."""

    def __init__(self, path: str, mode: str = "r", *, open_backing: bool = True,
                 l2_cache_size: int = DEFAULT_L2_CACHE_SIZE, overlap_check="cached",
                 overlap_mem: int | None = None, node_name: str | None = None,
                 device: str | None = None, on_event: Subscriber | None = None,
                 cache: str = "writeback", _layer_only: bool = False, _repair: bool = False):
        if mode not in ("r", "r+"):
            raise RequestError(f"mode must be 'r' or 'r+', not {mode!r}")
        if cache not in CACHE_MODES:
            raise RequestError(f"Invalid cache option: {cache!r} (supported: "
                               f"{', '.join(CACHE_MODES)})")
        self._sync = cache != "unsafe"
        parse_overlap_check(overlap_check)  # a bad option fails the open, not the first write
        self.filename = path
        self.mode = mode
        self._image = self
        self._closed = False
        self._lock = threading.RLock()
        self._writer = None
        self._corrupt = False
        self._l2_cache_size = l2_cache_size
        self._file = Storage(path, writable=mode == "r+", sync=self._sync)
        self._data = self._file
        self.backing = None
        self.device = device
        self.node_name = node_name or _default_node_name(path)
        self.events = EventEmitter(on_event)
        self._guard_options = {"overlap_check": overlap_check, "budget": overlap_mem}
        self._guard = None
        self._preallocated: bool | None = None
        self._check_open = _repair   # qemu-img check's open: the checker reads the snapshot table
        try:
            self._open(open_backing or _layer_only, l2_cache_size)
            if open_backing and not _layer_only:
                self._open_chain()
            if mode == "r+":
                self._open_for_write(_repair)
        except BaseException:
            self.close()
            raise

    def _open(self, with_io: bool, l2_cache_size: int) -> None:
        head = self._file.pread(min(self._file.size, 1 << C.MAX_CLUSTER_BITS), 0)
        self.header = h = decode_header(head, check=self._check_open, no_io=not with_io)
        self.cluster_size = h.cluster_size
        self.size = h.size & ~(C.SECTOR_SIZE - 1)  # QEMU counts whole sectors
        self._last_compressed: tuple[int, bytes] | None = None
        # QEMU opens a relative data file name as given, i.e. relative to the working directory
        self.data_filename = h.data_file
        # only the incompatible bit makes the extension's name a data file; without it QEMU
        # reads the data from the image itself (found by fuzzing: we opened a file named '')
        if h.has_data_file and h.data_file is not None and with_io and self._data is self._file:
            self._data = Storage(h.data_file, writable=self.mode == "r+", what="data file",
                                 sync=self._sync)
        cs = h.cluster_size
        self._l2_cache = TableCache(lambda offset: decode_u64_table(self._file.pread(cs, offset)),
                                    l2_cache_size // cs)
        self.l1_table = self._read_l1(h.l1_table_offset, h.l1_size)
        self._mapping = self._make_mapping(self.l1_table)
        self.snapshots_size = 0     # bytes the snapshot table spans on disk (QEMU's count)
        self.snapshots: tuple[SnapshotEntry, ...] = self._load_snapshots()
        self._bitmaps = self._read_bitmap_directory()  # QEMU refuses a broken one at open

    def _read_l1(self, offset: int, nb_entries: int):
        """An L1 table; entries past end of file read as 0 and are not even allocated (an entry
        cut by the end of the file reads zero-padded, as QEMU reads it)."""
        raw = self._file.pread_in_file(nb_entries * 8, offset)
        return decode_u64_table(raw + bytes(-len(raw) % 8))

    def _open_chain(self) -> None:
        """Open the backing chain layer by layer (no recursion: chains may be very deep)."""
        seen = {os.path.realpath(self.filename)}
        layer: _Device = self
        while isinstance(layer, Image) and layer.header.backing_file_name is not None:
            name = layer.header.backing_file_name
            path = _relative_to(layer.filename, name)
            real = os.path.realpath(path)
            if real in seen:
                raise BackingError(f"Could not open backing file: Backing file '{name}' of "
                                   f"'{layer.filename}' creates a loop in the backing chain")
            seen.add(real)
            layer.backing = _open_backing(path, layer.header.backing_format)
            layer = layer.backing

    def _make_mapping(self, l1) -> Mapping:
        h = self.header
        return Mapping(l1=l1, cluster_bits=h.cluster_bits,
                       extended_l2=h.extended_l2, has_data_file=h.has_data_file,
                       l2_cache=self._l2_cache, zero_flag=h.version >= 3)

    def _load_snapshots(self) -> tuple[SnapshotEntry, ...]:
        """The snapshot table at open.  In qemu-img check's open a table QEMU would refuse is left
        empty here: the checker reads it itself, reports it and repairs it."""
        if not self._check_open:
            return self._read_snapshot_table()
        h = self.header
        if h.nb_snapshots > C.QCOW_MAX_SNAPSHOTS or not table_location_valid(
                h.snapshots_offset, h.nb_snapshots, h.cluster_size):
            return ()
        try:
            return self._read_snapshot_table()
        except FormatError:
            return ()

    def _read_snapshot_table(self) -> tuple[SnapshotEntry, ...]:
        """Read and decode the snapshot table (bounded by the 64 MiB limit, see
        :mod:`qcow2.snapshot_table`); sets :attr:`snapshots_size`."""
        h = self.header
        if not h.nb_snapshots:
            return ()
        table = read_snapshot_table(self._file, h.snapshots_offset, h.nb_snapshots)
        self.snapshots_size = table.table_size
        return tuple(table.entries)

    # -- compressed clusters -----------------------------------------------------------------------
    def _compressed_cluster(self, descriptor: int) -> bytes:
        last = self._last_compressed
        if last is not None and last[0] == descriptor:
            return last[1]
        h = self.header
        host_offset, csize = decode_compressed(descriptor, h.cluster_bits)
        raw = self._file.pread(csize, host_offset)
        data = decompress_cluster(raw, h.cluster_size, h.compression_type, host_offset)
        self._last_compressed = (descriptor, data)
        return data

    # -- public API ----------------------------------------------------------------------------
    @property
    def guard(self):
        """The :class:`~qcow2.guard.OverlapGuard` of this image.  Built at open for ``"r+"``; for a
        read-only image on first use (it never writes, so it pays for the map only when asked)."""
        with self._lock:
            if self._guard is None:
                from .guard import OverlapGuard
                from .metadata import iter_metadata
                guard = OverlapGuard(
                    self.cluster_size, reference=self.device or self.node_name, events=self.events,
                    source=lambda types: iter_metadata(self, types),
                    on_corruption=self.signal_corruption, **self._guard_options)
                guard.rebuild()
                self._guard = guard
            return self._guard

    # -- writing ------------------------------------------------------------------------------------
    def _open_for_write(self, repair: bool) -> None:
        """Second half of an ``"r+"`` open: refuse what cannot be written safely, build the guard,
        the writer, and bring the header's feature bits up to date."""
        from .writer import Writer
        h = self.header
        if h.corrupt and not repair:
            raise CorruptImageError("Image is corrupt; cannot be opened read/write")
        if self._bitmaps and not repair:
            raise UnsupportedError("Writing images with persistent dirty bitmaps is not supported "
                                   f"({len(self._bitmaps)} bitmaps in '{self.filename}')")
        if h.has_data_file and self._data is self._file:
            raise RequestError("Writing an image with an external data file needs the data file "
                               "opened (open_backing=False opens none)")
        self._file.guard = self.guard
        self._writer = Writer(self)
        if h.autoclear_features & ~C.AUTOCLEAR_KNOWN:   # set by a program we do not know
            self._update_header(autoclear_features=h.autoclear_features & C.AUTOCLEAR_KNOWN)
        if h.dirty and not repair:
            self._repair_dirty()

    def _repair_dirty(self) -> None:
        """A dirty image (lazy refcounts, not closed cleanly) gets its refcounts rebuilt at a
        read-write open, as QEMU does."""
        from .check import check_image
        result = check_image(self, repair="all")
        if result.corruptions or result.check_errors:
            self.signal_corruption("Could not repair dirty image: "
                                   f"{result.corruptions} corruptions remain")

    def _update_header(self, *, _may_overlap: int = 0, **fields) -> None:
        """Rewrite header fields in place (one write of the fixed part; extensions untouched).
        ``_may_overlap``: more types the write may overlap (a repair that moves a snapshot table
        a damaged header placed at offset 0 rewrites the header over it)."""
        new = self.header.replace(**fields)
        self._file.pwrite(encode_header_fields(new), 0, ign=OL_MAIN_HEADER | _may_overlap)
        self.header = new

    def _mark_consistent(self) -> None:
        """After a clean repair: clear the dirty and corrupt bits (QEMU's mark clean/consistent)."""
        h = self.header
        bits = h.incompatible_features & ~(C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT)
        if bits != h.incompatible_features:
            self._file.flush()
            self._update_header(incompatible_features=bits)
        self._corrupt = False

    def check(self, repair: str | None = None, **options):
        """Check the image as ``qemu-img check`` does (``repair``: None, ``"leaks"``, ``"all"``;
        repairing needs ``"r+"``).  Returns a :class:`~qcow2.check.CheckResult`; see
        :func:`qcow2.check.check_image` for the options."""
        from .check import check_image
        return check_image(self, repair, **options)

    def _set_size(self, size: int) -> None:
        self.size = size

    def _set_l1(self, table) -> None:
        self.l1_table = table
        self._mapping.l1 = table

    @property
    def corrupt(self) -> bool:
        """Whether corruption was detected (now or by an earlier writer: the corrupt bit)."""
        return self._corrupt or self.header.corrupt

    def signal_corruption(self, msg: str, offset: int | None = None,
                          size: int | None = None) -> None:
        """Mark the image corrupt: the corrupt bit (read-write images), one
        ``BLOCK_IMAGE_CORRUPTED`` event (later ones are suppressed, as QEMU does; ``fatal`` is
        false for a read-only image), and every later write is refused.  Does not raise; callers
        raise their own error."""
        with self._lock:
            if self._corrupt:
                return
            self._corrupt = True
            if self._writer is not None and not self._closed:
                new = self.header.replace(
                    incompatible_features=self.header.incompatible_features | C.INCOMPAT_CORRUPT)
                try:   # the corrupt bit must get through even if the header overlaps something
                    self._file.pwrite(encode_header_fields(new), 0, ign=OL_MASK_LIMIT)
                    self.header = new
                except Qcow2Error:
                    pass
        self.events.emit(image_corrupted_event(self.device or "", self.node_name, msg,
                                               offset=offset, size=size,
                                               fatal=self._writer is not None))

    def _fail_corrupt(self, msg: str) -> None:
        """Signal corruption and raise :class:`CorruptImageError` (the writer's handler)."""
        self.signal_corruption(msg)
        raise CorruptImageError(msg)

    def _begin_write(self, offset: int, length: int) -> None:
        if self._closed:
            raise Qcow2Error(f"I/O on closed image '{self.filename}'")
        if self._writer is None:
            raise ReadOnlyError(f"'{self.filename}' is opened read-only")
        if self._corrupt:
            raise CorruptImageError(f"Image '{self.filename}' is corrupt; writes are refused")
        _check_request(offset, length, self.size)
        h = self.header
        if h.lazy_refcounts and not h.dirty:
            self._update_header(incompatible_features=h.incompatible_features | C.INCOMPAT_DIRTY)
            self._file.flush()

    @contextlib.contextmanager
    def _signalling(self):
        """Corruption found while serving a request marks the image (QEMU does the same on the
        read path of a writable image; a read-only image gets a non-fatal event)."""
        try:
            yield
        except CorruptImageError as e:
            if not self._corrupt and not isinstance(e, OverlapError):
                self.signal_corruption(str(e))
            raise

    def pwrite(self, data, offset: int) -> int:
        """Write ``data`` (any bytes-like) at guest ``offset``; returns the number of bytes.

        Allocates clusters, copies on write from the backing file, and never writes metadata
        directly (metadata is written back in crash-safe order by :meth:`flush`).  Raises
        ``RequestError`` for a range outside the disk, ``ReadOnlyError`` on a read-only image,
        ``CorruptImageError``/``OverlapError`` when the image is (found) corrupt."""
        view = memoryview(data).cast("B")
        with self._lock, self._signalling():
            self._begin_write(offset, len(view))
            if len(view):
                self._writer.pwrite(view, offset)
        return len(view)

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False,
                     no_fallback: bool = False) -> None:
        """Make the range read as zeros.  Whole clusters (subclusters with extended L2) get the zero
        flag (version 3; ``may_unmap`` also frees their host clusters) or, on version 2, are
        deallocated where no backing file shows through; partial ones are written with zeros.

        ``no_fallback`` (qemu-io's ``write -z -n``) refuses, with ``UnsupportedError`` and before
        changing anything, a request that would need zeros written as data: a partial
        (sub)cluster whose other bytes do not read as zeros, a version 2 cluster over a backing
        file, an external raw data file."""
        with self._lock, self._signalling():
            self._begin_write(offset, length)
            if length:
                self._writer.write_zeroes(offset, length, may_unmap, no_fallback)

    def discard(self, offset: int, length: int) -> None:
        """Free the whole clusters in the range (partial clusters at the edges are left alone);
        afterwards they read as zeros.  On a version 2 image with a backing file nothing is done
        (without a zero flag the backing file would show through; QEMU does the same)."""
        with self._lock, self._signalling():
            self._begin_write(offset, length)
            if length:
                self._writer.discard(offset, length)

    def write_compressed(self, data, offset: int, *, overwrite: bool = True) -> int:
        """Write whole clusters compressed (the image's compression type; zstd needs the
        ``zstandard`` package).  ``offset`` must be cluster aligned and the length a multiple of
        the cluster size, or end at the end of the disk.  Compression runs in threads.

        ``overwrite=False`` is QEMU's rule for compressed writes: every cluster of the range must
        have no host cluster yet (unallocated, or zero without a preallocated cluster), else
        ``RequestError`` and nothing is written."""
        view = memoryview(data).cast("B")
        cs = self.cluster_size
        if offset % cs or (len(view) % cs and offset + len(view) != self.size):
            raise RequestError(f"Compressed writes need whole clusters: offset 0x{offset:x}, "
                               f"length 0x{len(view):x}, cluster size 0x{cs:x}")
        with self._lock, self._signalling():
            self._begin_write(offset, len(view))
            if self.header.has_data_file:      # before the allocation test, as QEMU refuses it
                raise UnsupportedError("Compressed writes are not supported with an external "
                                       "data file")
            if not overwrite:
                for seg in self._mapping.iter_segments(offset, len(view)):
                    if seg.kind == COMPRESSED or seg.host >= 0:
                        raise RequestError("Compressed writes need unallocated clusters: guest "
                                           f"offset 0x{seg.guest_offset:x} is allocated")
            if len(view):
                self._writer.write_compressed(view, offset)
        return len(view)

    def resize(self, size: int, *, shrink: bool = False, preallocation: str = "off") -> None:
        """Change the virtual size.  Growing may move the L1 table; the new space reads as zeros
        (a backing file does not show through), and ``preallocation`` (``"metadata"``,
        ``"falloc"``, ``"full"``) maps it as ``create`` would.  Shrinking needs ``shrink=True``
        and frees every cluster past the new end (snapshots keep theirs)."""
        if size < 0 or size % C.SECTOR_SIZE:
            raise RequestError(f"The new size must be a non-negative multiple of 512, not {size}")
        if size > C.INT64_MAX - (1 << 30):
            raise RequestError("Image size must be less than 8 EiB!")
        if preallocation not in ("off", "metadata", "falloc", "full"):
            raise RequestError(f"Invalid preallocation mode '{preallocation}'")
        if preallocation != "off" and size < self.size:
            raise RequestError("Preallocation can only be used for growing images")
        with self._lock, self._signalling():
            self._begin_write(0, 0)
            if self.snapshots and self.header.version < 3:
                # a v2 snapshot table records no disk size: a snapshot would take the new one
                raise UnsupportedError("Can't resize a v2 image which has snapshots")
            self._writer.resize(size, shrink, preallocation=preallocation)

    def flush(self) -> None:
        """Write every cached metadata change back in crash-safe order, then fsync the files."""
        with self._lock:
            if self._writer is None or self._closed:
                return
            if not self._corrupt:
                self._writer.flush_metadata()
            self._file.flush()
            if self._data is not self._file:
                self._data.flush()

    def flush_metadata(self) -> None:
        """Write cached metadata back in crash-safe order (no fsync)."""
        with self._lock:
            if self._writer is not None and not self._corrupt:
                self._writer.flush_metadata()

    def reload_metadata(self) -> None:
        """Forget every cache and re-read the header, tables and snapshots from disk (after the
        metadata was rewritten behind the caches, e.g. by a repair).  Unflushed changes are lost."""
        with self._lock:
            self._open(True, self._l2_cache_size)
            if self._writer is not None:
                from .writer import Writer
                self._writer = Writer(self)
            if self._guard is not None:
                self._guard.rebuild()

    def readinto(self, buf, offset: int) -> None:
        """Read ``len(buf)`` guest bytes at ``offset`` into ``buf`` (see :meth:`pread`)."""
        if self._writer is None:
            with self._signalling():
                super().readinto(buf, offset)
            return
        with self._lock, self._signalling():
            super().readinto(buf, offset)

    def map(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        with self._lock:
            return super().map(offset, length)

    @property
    def metadata_preallocated(self) -> bool:
        """Whether the image looks metadata-preallocated, decided as QEMU decides it: more clusters
        carry a refcount than the host file has allocated (by a margin).  Then ``map`` asks the
        host file where its holes are, and reports data clusters there as reading zeros."""
        if self._preallocated is None:
            from .refcount import RefcountReader
            cs = self.cluster_size
            real_clusters = self._file.allocated_size() // cs
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            end_cluster = -(-self._file.size // cs)
            counted = RefcountReader(self._file, self.header).count_referenced(end_cluster,
                                                                              threshold)
            self._preallocated = counted >= threshold
        return self._preallocated

    def bitmap_directory(self) -> tuple[BitmapDirectoryEntry, ...]:
        """The persistent dirty bitmaps' directory entries, validated at open as QEMU validates
        them; empty when the image has none (or an untrusted bitmaps extension)."""
        return self._bitmaps

    def _read_bitmap_directory(self) -> tuple[BitmapDirectoryEntry, ...]:
        ext = self.header.bitmaps
        if ext is None or not ext.nb_bitmaps:
            return ()
        size = min(ext.bitmap_directory_size, C.QCOW_MAX_BITMAP_DIRECTORY_SIZE)
        buf = self._file.pread_in_file(size, ext.bitmap_directory_offset)
        return decode_bitmap_directory(buf, ext.nb_bitmaps, cluster_size=self.cluster_size,
                                       image_size=self.size)

    @property
    def backing_filename(self) -> str | None:
        """The backing file name as stored in the header (not resolved)."""
        return self.header.backing_file_name

    @property
    def full_backing_filename(self) -> str | None:
        """The backing file name resolved against the image's directory, as qemu-img shows it."""
        name = self.header.backing_file_name
        return None if name is None else _relative_to(self.filename, name)

    @property
    def actual_size(self) -> int:
        """Bytes the image file occupies on the host (qemu-img info's actual-size)."""
        return self._file.allocated_size()

    def snapshot(self, name_or_id: str, size: int | None = None) -> "SnapshotView":
        """A read-only view of an internal snapshot, found by id first, then by name.

        The view has the snapshot's own disk size unless ``size`` is given (``qemu-img convert
        -l`` reads a snapshot at the image's current size: beyond the snapshot's tables the
        backing file shows through, or zeros).
        """
        entry = self.find_snapshot(name_or_id)
        return SnapshotView(self, entry, size)

    def find_snapshot(self, name_or_id: str) -> SnapshotEntry:
        for attr in ("id", "display_name"):
            for entry in self.snapshots:
                if getattr(entry, attr) == name_or_id:
                    return entry
        raise Qcow2Error(f"Can't find snapshot '{name_or_id}'")

    def info(self, backing_chain: bool = False):
        """``qemu-img info --output=json``'s dict (a list of dicts with ``backing_chain``)."""
        from .info import image_info
        return image_info(self, backing_chain=backing_chain)

    def close(self) -> None:
        """Close the image and its backing chain (iteratively).  Idempotent."""
        layer: _Device | None = self
        while layer is not None:
            below = layer.backing
            layer.backing = None
            layer._close_layer()
            layer = below

    def _close_layer(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            if self._closed:
                return
            try:
                if self._writer is not None and not self._corrupt:
                    self._writer.flush_metadata()
                    if self.header.dirty:
                        self._file.flush()
                        self._update_header(
                            incompatible_features=self.header.incompatible_features
                            & ~C.INCOMPAT_DIRTY)
                    self._file.flush()
                    if self._data is not self._file:
                        self._data.flush()
            finally:
                self._closed = True
                if self._data is not self._file:
                    self._data.close()
                self._file.close()

    def __repr__(self) -> str:
        return f"<qcow2.Image {self.filename!r} size={self.size} mode={self.mode!r}>"


class SnapshotView(_Qcow2Reader):
    """Read-only view of an internal snapshot: its L1 table over the image's files."""

    def __init__(self, image: Image, entry: SnapshotEntry, size: int | None = None):
        h = image.header
        if entry.l1_size > C.QCOW_MAX_L1_SIZE // 8:
            raise FormatError(f"Snapshot L1 table too large: l1_size {entry.l1_size}")
        if entry.l1_table_offset & (h.cluster_size - 1) or \
                entry.l1_table_offset + entry.l1_size * 8 > C.INT64_MAX:
            raise FormatError(f"Snapshot L1 table offset invalid: 0x{entry.l1_table_offset:x}")
        self.entry = entry
        self._image = image
        self.filename = image.filename
        self.backing = image.backing
        if size is None:
            size = entry.disk_size if entry.disk_size is not None else image.size
        self.size = size & ~(C.SECTOR_SIZE - 1)
        l1 = image._read_l1(entry.l1_table_offset, entry.l1_size)
        self._mapping = image._make_mapping(l1)

    def readinto(self, buf, offset: int) -> None:
        """Read the snapshot's guest bytes (under the image's lock when it is writable)."""
        with self._shared_lock():
            super().readinto(buf, offset)

    def close(self) -> None:
        """Views own nothing; closing the image closes them."""


class ImageFile(io.RawIOBase):
    """``io.RawIOBase`` over a reader (:class:`Image` or :class:`SnapshotView`): read/seek/tell."""

    def __init__(self, reader: _Device):
        self._reader = reader
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._reader.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._reader.size - self._pos))
        if n == 0:
            return 0
        self._reader.readinto(view[:n], self._pos)
        self._pos += n
        return n


def _default_node_name(path: str) -> str:
    """A deterministic node name for an image opened without one: its file name."""
    return os.path.basename(path) or "qcow2"


def _relative_to(image_path: str, name: str) -> str:
    """Resolve a name stored in an image (backing or data file) as QEMU does: relative to it."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image_path), name)


def probe_format(path: str) -> str:
    """``"qcow2"`` if the file starts with the qcow2 magic, else ``"raw"`` (QEMU's probe, for the
    two formats we read)."""
    probe = Storage(path, what="backing file")
    try:
        return "qcow2" if probe.pread(4, 0) == C.QCOW_MAGIC_BYTES else "raw"
    finally:
        probe.close()


def open_layer(path: str, fmt: str | None = None, *, with_io: bool = True) -> _Device:
    """Open one image of a chain without its backing file: qcow2 or raw, probed when ``fmt`` is
    None.  ``with_io=False`` is qemu-img info's open (no data file needed)."""
    if fmt is None:
        fmt = probe_format(path)
    if fmt == "qcow2":
        return Image(path, "r", overlap_check="none", open_backing=False, _layer_only=with_io)
    if fmt == "raw":
        return RawImage(path)
    raise BackingError(f"Unsupported backing file format '{fmt}'")


def _open_backing(path: str, fmt: str | None) -> _Device:
    try:
        return open_layer(path, fmt)
    except Qcow2Error as e:
        raise BackingError(f"Could not open backing file: {e}") from None


def open(path: str, mode: str = "r", **options) -> Image:  # noqa: A001 - mirrors qcow2.open
    """Open a qcow2 image.  ``mode`` is ``"r"`` (read-only) or ``"r+"``.

    Options: ``open_backing`` (default True; False is qemu-img info's no-backing open),
    ``l2_cache_size`` (bytes); ``cache`` (``"writeback"``, the default, or ``"unsafe"``: no fsync,
    so a crash may corrupt); ``overlap_check`` (``"none"``, ``"constant"``, ``"cached"`` (default),
    ``"all"``, or a mapping ``{"template": ..., "<type option>": bool}``), ``overlap_mem`` (the
    overlap map's memory budget in bytes, None for unlimited), ``device`` and ``node_name`` (the
    names events carry; the node name defaults to the file name), ``on_event`` (a callable receiving
    each :class:`~qcow2.events.Event`).  Raises a :class:`~qcow2.errors.Qcow2Error` subclass for every
    unusable file, naming the field and value.
    """
    return Image(path, mode, **options)
