"""Building blocks of :mod:`qcow2.strategies` that need no Hypothesis.

Theory of operation
-------------------
:mod:`qcow2.strategies` draws *recipes* (create options, a list of operations, internal snapshots,
a targeted corruption); this module turns recipes into bytes and knows where an image's metadata
is.  It is importable without Hypothesis, so the atheris harness and the seed-corpus script under
``tools/`` use it too.

* :class:`Op` is one guest operation (``pwrite``, ``write_zeroes``, ``discard``,
  ``write_compressed``, ``resize``, ``flush``) with what it does to a model of the guest disk
  (:meth:`Op.apply_model`), so a generated image carries the guest bytes it must read back.
* :func:`build_image` creates an image with our own writer (:func:`qcow2.create`) in a temporary
  directory (``/dev/shm`` when there is one), applies the steps, and returns a
  :class:`GeneratedImage`: the file's bytes plus a description of how they were made.
  :func:`take_internal_snapshot` makes an internal snapshot the way QEMU's ``qemu-img snapshot -c``
  lays it out (refcounts of everything the active L1 table reaches incremented, ``COPIED`` cleared,
  an L1 copy and a new snapshot table in fresh clusters, one header write), because the library has
  no snapshot writer of its own yet.
* :func:`metadata_layout` parses an image's bytes with the sans-IO codecs only (header, L1/L2
  tables, refcount table and blocks, snapshot table and snapshot L1/L2 tables, bitmap directory)
  into a :class:`Layout`: every structure as a typed :class:`Region`, every table entry with the
  host offset where it is stored, and where each cluster's refcount lives.  It is robust on damaged
  bytes (every table is cut at the end of the file, every loop bounded by the file size) so the
  tests can use it as an independent oracle of "where the metadata is" on corrupted images too.
* :class:`Corruption` is a set of byte patches (and optionally a truncation) with a description;
  :meth:`Corruption.apply` returns the damaged bytes.

Nothing here is fast or meant for large images: generated images are small (tiny virtual sizes,
512-byte to 64 KiB clusters).
"""

from __future__ import annotations

import array
import contextlib
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

from . import constants as C
from .errors import Qcow2Error
from .header import Header, decode_header
from .snapshot import SnapshotEntry, decode_snapshot_table, encode_snapshot_table, snapshot_table_size
from .tables import decode_compressed, decode_u64_table, encode_u64_table

__all__ = ["Op", "SnapshotStep", "GeneratedImage", "BackingLayer", "build_image", "build_chain",
           "take_internal_snapshot", "Region", "TableEntry", "Layout", "metadata_layout",
           "Corruption", "pattern_bytes", "scratch_directory", "METADATA_KINDS", "KIND_TO_OL"]

_COPIED = C.QCOW_OFLAG_COPIED
_COMPRESSED = C.QCOW_OFLAG_COMPRESSED
_ZERO = C.QCOW_OFLAG_ZERO
_MASK = C.L2E_OFFSET_MASK
_HEAD_READ = 1 << C.MAX_CLUSTER_BITS


# -- guest data ------------------------------------------------------------------------------------

def pattern_bytes(seed: int, guest_offset: int, length: int) -> bytes:
    """Compressible, position-dependent guest data: each 512-byte sector starts with an 8-byte
    marker (seed and sector number) followed by the seed byte, so a cluster that lands in the
    wrong place, or a stale one, never reads back as the right bytes."""
    if length <= 0:
        return b""
    seed &= 0xFF
    first = guest_offset // C.SECTOR_SIZE
    last = (guest_offset + length - 1) // C.SECTOR_SIZE
    fill = bytes((seed,)) * (C.SECTOR_SIZE - 8)
    out = bytearray()
    for sector in range(first, last + 1):
        out += struct.pack(">BBxxI", 0xA5, seed, sector & 0xFFFFFFFF) + fill
    start = guest_offset - first * C.SECTOR_SIZE
    return bytes(out[start:start + length])


@dataclass(frozen=True)
class Op:
    """One guest operation, valid for the disk size it was drawn for.

    ``kind`` is ``"pwrite"``, ``"write_zeroes"``, ``"discard"``, ``"write_compressed"``,
    ``"resize"`` or ``"flush"``; ``offset``/``length`` are guest bytes (for ``resize``, ``length``
    is the new size); ``seed`` picks the data of writes (:func:`pattern_bytes`); ``may_unmap`` is
    ``write_zeroes``'s flag.
    """

    kind: str
    offset: int = 0
    length: int = 0
    seed: int = 0
    may_unmap: bool = False

    def data(self) -> bytes:
        """The bytes a write operation writes."""
        return pattern_bytes(self.seed, self.offset, self.length)

    def apply(self, img) -> None:
        """Run the operation on an open :class:`~qcow2.image.Image` (``"r+"``)."""
        if self.kind == "pwrite":
            img.pwrite(self.data(), self.offset)
        elif self.kind == "write_zeroes":
            img.write_zeroes(self.offset, self.length, may_unmap=self.may_unmap)
        elif self.kind == "discard":
            img.discard(self.offset, self.length)
        elif self.kind == "write_compressed":
            img.write_compressed(self.data(), self.offset)
        elif self.kind == "resize":
            img.resize(self.length, shrink=self.length < img.size)
        elif self.kind == "flush":
            img.flush()
        else:  # pragma: no cover - strategies draw only the kinds above
            raise ValueError(f"unknown operation {self.kind!r}")

    def apply_model(self, model: bytearray, *, cluster_size: int, version: int,
                    backing: bytes | None = None, data_file_raw: bool = False) -> None:
        """Apply the operation to ``model``, the guest bytes (grown or cut by ``resize``).

        Discard drops whole clusters (rounded inwards; the end is rounded out at the end of the
        disk), which then read as zeros; on version 2 with a backing file it is ignored (the
        backing file would show through; QEMU 7.2 ignores it too), and with ``data_file_raw``
        the whole clusters are written with zeros, as the library does.
        """
        size = len(model)
        if self.kind in ("pwrite", "write_compressed"):
            model[self.offset:self.offset + self.length] = self.data()
        elif self.kind == "write_zeroes":
            model[self.offset:self.offset + self.length] = bytes(self.length)
        elif self.kind == "discard":
            if version < 3 and backing is not None and not data_file_raw:
                return
            end = self.offset + self.length
            a = -(-self.offset // cluster_size) * cluster_size
            b = end // cluster_size * cluster_size
            if end == size:
                b = size
            if a < b:
                model[a:b] = bytes(b - a)
        elif self.kind == "resize":
            if self.length < size:
                del model[self.length:]
            else:
                model.extend(bytes(self.length - size))

    def __str__(self) -> str:
        if self.kind == "flush":
            return "flush"
        if self.kind == "resize":
            return f"resize 0x{self.length:x}"
        extra = f" seed={self.seed}" if self.kind in ("pwrite", "write_compressed") else ""
        extra += " unmap" if self.may_unmap else ""
        return f"{self.kind} 0x{self.offset:x}+0x{self.length:x}{extra}"


@dataclass(frozen=True)
class SnapshotStep:
    """Take an internal snapshot named ``name`` (see :func:`take_internal_snapshot`)."""

    name: str
    date_sec: int = 0

    def __str__(self) -> str:
        return f"snapshot {self.name!r}"


# -- generated images ------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackingLayer:
    """One file below the top image of a chain: its file name (relative, as stored in the image
    above it), ``"qcow2"`` or ``"raw"``, its bytes and the guest bytes it reads as."""

    name: str
    format: str
    data: bytes
    guest_data: bytes
    description: str = ""

    def __repr__(self) -> str:
        return (f"BackingLayer({self.name!r}, {self.format}, {len(self.data)} bytes"
                + (f", {self.description}" if self.description else "") + ")")

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


@dataclass(frozen=True)
class GeneratedImage:
    """A small valid qcow2 image made by our own writer, and how it was made.

    ``data`` is the image file's bytes; ``options`` the :func:`qcow2.create` keyword arguments
    (as sorted ``(name, value)`` pairs; :attr:`create_options` gives a dict); ``steps`` the
    operations (:class:`Op`) and snapshots (:class:`SnapshotStep`) applied after creation, in
    order; ``guest_data`` the guest bytes the image must read as (through its backing chain).
    ``backing`` holds the layers below it, base first (empty for a standalone image): a backing
    chain.  ``data_file`` is ``(name, bytes)`` of an external data file: its name is stored
    relative, and QEMU (and this library) resolve a relative data file name against the *current
    working directory*, so open such an image from the directory :meth:`write_to` wrote it to.
    """

    data: bytes
    options: tuple[tuple[str, object], ...]
    steps: tuple = ()
    guest_data: bytes = b""
    name: str = "image.qcow2"
    backing: tuple[BackingLayer, ...] = ()
    data_file: tuple[str, bytes] | None = None

    @property
    def create_options(self) -> dict:
        """The :func:`qcow2.create` keyword arguments (size excluded)."""
        return {k: v for k, v in self.options if k != "size"}

    @property
    def size(self) -> int:
        """The virtual disk size after the steps, in bytes."""
        return len(self.guest_data)

    @property
    def cluster_size(self) -> int:
        return dict(self.options).get("cluster_size", 65536)

    def write_to(self, directory, data: bytes | None = None) -> str:
        """Write the image (``data`` instead of :attr:`data` if given: e.g. a corrupted copy),
        its backing files and its data file into ``directory``; returns the image's path."""
        directory = os.fspath(directory)
        for layer in self.backing:
            _write_file(os.path.join(directory, layer.name), layer.data)
        if self.data_file is not None:
            _write_file(os.path.join(directory, self.data_file[0]), self.data_file[1])
        path = os.path.join(directory, self.name)
        _write_file(path, self.data if data is None else data)
        return path

    def describe(self) -> str:
        """One line: options, steps, chain depth."""
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options)
        steps = "; ".join(str(s) for s in self.steps) or "no steps"
        chain = f", over {len(self.backing)} backing file(s)" if self.backing else ""
        return f"qcow2.create({opts}) then {steps}{chain}"

    def __repr__(self) -> str:
        return f"GeneratedImage({len(self.data)} bytes: {self.describe()})"

    def _repr_pretty_(self, printer, cycle) -> None:   # Hypothesis' failure reports
        printer.text(repr(self))


def _write_file(path: str, data: bytes) -> None:
    """Create or replace a file with ``data``, through the one door to the disk."""
    from .storage import Storage
    file = Storage(path, create=True, what="generated file")
    try:
        file.truncate(0)
        if data:
            file.pwrite(data, 0)
    finally:
        file.close()


def scratch_directory() -> str:
    """A fresh temporary directory, in ``/dev/shm`` when it exists (the writer fsyncs; tmpfs makes
    that free).  The caller removes it."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="qcow2-gen-", dir=base)


@contextlib.contextmanager
def _scratch() -> Iterator[str]:
    directory = scratch_directory()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _chdir(directory: str) -> Iterator[None]:
    """``contextlib.chdir`` (Python 3.11) for 3.10: needed only for relative data file names."""
    old = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(old)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def build_image(size: int, options: dict, steps=(), *, backing: tuple[BackingLayer, ...] = (),
                name: str = "image.qcow2") -> GeneratedImage:
    """Create an image with :func:`qcow2.create` (``options`` are its keyword arguments; a
    ``backing_file`` must name the top layer of ``backing``; a ``data_file`` is a relative name),
    apply ``steps`` (:class:`Op` / :class:`SnapshotStep`), close it, and return its bytes with
    the model of its guest data.  A snapshot that cannot be taken (refcount overflow, zero-sized
    disk, external data file) is left out of the returned steps; a resize of a v2 image with
    snapshots (refused, as by QEMU) ends the recipe there."""
    from .create import create
    from .image import Image
    with _scratch() as directory:
        for layer in backing:
            _write_file(os.path.join(directory, layer.name), layer.data)
        path = os.path.join(directory, name)
        below = backing[-1].guest_data if backing else None
        # a relative data file name resolves against the working directory (GeneratedImage)
        with _chdir(directory) if options.get("data_file") is not None else contextlib.nullcontext():
            img = create(path, size, **options)
            done = []
            try:
                model = bytearray(img.size)
                if below is not None:
                    model[:] = (below[:img.size] + bytes(max(0, img.size - len(below))))
                version = img.header.version
                raw = img.header.data_file_raw
                for step in steps:
                    if isinstance(step, SnapshotStep):
                        img.close()
                        img = Image(path, "r+")
                        if not take_internal_snapshot(img, step.name, date_sec=step.date_sec):
                            continue
                        img.close()
                        img = Image(path, "r+")
                    else:
                        if step.kind == "resize" and version < 3 and img.snapshots:
                            break        # refused by QEMU; the later steps assumed the new size
                        step.apply(img)
                        step.apply_model(model, cluster_size=img.cluster_size, version=version,
                                         backing=below, data_file_raw=raw)
                    done.append(step)
            finally:
                img.close()
            data_file = None
            if options.get("data_file") is not None:
                data_file = (options["data_file"], _read(options["data_file"]))
            return GeneratedImage(_read(path), tuple(sorted(dict(options, size=size).items())),
                                  tuple(done), bytes(model), name, tuple(backing), data_file)


def build_chain(layers, *, raw_base: bytes | None = None) -> GeneratedImage:
    """A backing chain: ``layers`` are ``(size, options, steps, name_format)`` base first, each
    qcow2 image created over the one before it (``name_format``: store the backing format, else
    the reader probes it); ``raw_base`` is the content of a raw file below all of them.  Returns
    the top image; its ``backing`` holds the layers below, base first."""
    below: list[BackingLayer] = []
    if raw_base is not None:
        size = -(-len(raw_base) // C.SECTOR_SIZE) * C.SECTOR_SIZE
        below.append(BackingLayer("layer0.raw", "raw", raw_base,
                                  raw_base + bytes(size - len(raw_base)), "raw base"))
    top = None
    for depth, (size, options, steps, name_format) in enumerate(layers):
        opts = dict(options)
        if below:
            opts["backing_file"] = below[-1].name
            if name_format:
                opts["backing_fmt"] = below[-1].format
        last = depth == len(layers) - 1
        name = "image.qcow2" if last else f"layer{len(below)}.qcow2"
        top = build_image(size, opts, steps, backing=tuple(below), name=name)
        if not last:
            below.append(BackingLayer(name, "qcow2", top.data, top.guest_data, top.describe()))
    assert top is not None
    return top


# -- internal snapshots ------------------------------------------------------------------------------

def take_internal_snapshot(img, name: str, *, date_sec: int = 0) -> bool:
    """Make an internal snapshot of an image opened ``"r+"``, laid out as QEMU 7.2 lays it out.

    Every L2 table and data cluster the active L1 table reaches gets one more reference (all of
    them checked to fit in the refcount width first), ``COPIED`` is cleared in the active L1 and
    L2 entries, a copy of the L1 table and the new snapshot table go to fresh clusters, and one
    header write switches ``nb_snapshots``/``snapshots_offset``; the old table is freed last.
    Returns False (and changes nothing) when the snapshot cannot be taken: an external data file
    (QEMU refuses snapshots there), an empty L1 table, or a refcount that would overflow.
    The image should be reopened afterwards (its guard and caches do not know the snapshot).
    """
    h = img.header
    if h.has_data_file or not len(img.l1_table) or img.corrupt:
        return False
    writer = img._writer
    writer.flush_metadata()
    rc = writer.refcounts
    cs, bits = h.cluster_size, h.cluster_bits
    width = 2 if h.extended_l2 else 1
    increments: dict[int, int] = {}
    l2_tables = []
    for l1_index, entry in enumerate(img.l1_table):
        l2_offset = entry & C.L1E_OFFSET_MASK
        if not l2_offset:
            continue
        increments[l2_offset >> bits] = increments.get(l2_offset >> bits, 0) + 1
        table = img._l2_cache.load(l2_offset)
        l2_tables.append((l1_index, l2_offset, table))
        for i in range(0, len(table), width):
            e = table[i]
            if e & _COMPRESSED:
                host, csize = decode_compressed(e, bits)
                for k in range(host >> bits, ((host + csize - 1) >> bits) + 1):
                    increments[k] = increments.get(k, 0) + 1
            elif e & _MASK:
                k = (e & _MASK) >> bits
                increments[k] = increments.get(k, 0) + 1
    limit = (1 << h.refcount_bits) - 1
    if any(rc.refcount(k) + n > limit for k, n in increments.items()):
        return False
    for k, n in increments.items():
        rc.add(k, n)
    for l1_index, l2_offset, table in l2_tables:
        changed = False
        for i in range(0, len(table), width):
            if table[i] & _COPIED:
                table[i] &= ~_COPIED
                changed = True
        if changed:
            img._l2_cache.mark_dirty(l2_offset, table)
        img.l1_table[l1_index] &= ~_COPIED
        writer.l1_dirty.add(l1_index)
    l1_copy = encode_u64_table(img.l1_table)
    l1_offset = rc.alloc(-(-len(l1_copy) // cs), "snapshot L1 table")
    ids = [int(s.id) for s in img.snapshots if s.id.isdigit()]
    entry = SnapshotEntry(l1_table_offset=l1_offset, l1_size=len(img.l1_table),
                          id_str=str(max(ids, default=0) + 1), name=name, date_sec=date_sec,
                          date_nsec=0, vm_clock_nsec=0, vm_state_size=0, disk_size=img.size,
                          icount=(1 << 64) - 1, extra=b"")
    table_bytes = encode_snapshot_table(list(img.snapshots) + [entry])
    table_offset = rc.alloc(-(-len(table_bytes) // cs), "snapshot table")
    img._file.pwrite(l1_copy, l1_offset)
    img._file.pwrite(table_bytes, table_offset)
    writer.flush_metadata()          # refcounts, then L2 tables, then L1 entries
    img._file.flush()
    old_offset, old_size = h.snapshots_offset, snapshot_table_size(img.snapshots)
    img._update_header(nb_snapshots=len(img.snapshots) + 1, snapshots_offset=table_offset)
    if img.snapshots and old_size:
        rc.decref_range(old_offset, old_size)
        rc.apply_decrefs()
        rc.flush()
    return True


# -- where the metadata is -------------------------------------------------------------------------

#: Region kinds that are metadata, named as the overlap-check options; ``"data"`` and
#: ``"compressed"`` regions are guest data.
METADATA_KINDS = ("main-header", "active-l1", "active-l2", "refcount-table", "refcount-block",
                  "snapshot-table", "inactive-l1", "inactive-l2", "bitmap-directory",
                  "bitmap-table")
#: Overlap map type bit of each metadata kind (:mod:`qcow2.overlap_types`).
KIND_TO_OL = {kind: 1 << bit for bit, kind in enumerate(METADATA_KINDS)}


@dataclass(frozen=True)
class Region:
    """A host byte range holding one structure: ``kind`` (a :data:`METADATA_KINDS` name,
    ``"data"`` or ``"compressed"``) and a ``label`` saying which one (e.g. ``"L2 of L1[3]"``)."""

    host_offset: int
    length: int
    kind: str
    label: str = ""

    @property
    def end(self) -> int:
        return self.host_offset + self.length

    def __str__(self) -> str:
        return f"{self.kind} 0x{self.host_offset:x}+0x{self.length:x} ({self.label})"


@dataclass(frozen=True)
class TableEntry:
    """One table entry: where it is stored (``host_offset``, 8 bytes big-endian), its value, the
    ``table`` kind (``"active-l1"``, ``"inactive-l1"``, ``"active-l2"``, ``"inactive-l2"``,
    ``"refcount-table"``), its index in that table, and for extended L2 the bitmap word (stored
    at ``host_offset + 8``)."""

    host_offset: int
    value: int
    table: str
    index: int
    bitmap: int | None = None


@dataclass(frozen=True)
class Layout:
    """Where an image's structures are, parsed from its bytes with the sans-IO codecs.

    ``header`` is None when cluster 0 does not decode (then ``problems`` says why and only the
    header region is listed).  ``regions`` lists every structure and every data range the tables
    reach (in the file or past its end); ``l1_entries``/``l2_entries``/``reftable_entries`` the
    non-zero entries; ``snapshots`` the decoded snapshot table as ``(host_offset of the entry,
    entry)`` pairs; ``problems`` what could not be parsed (a damaged image).
    """

    file_size: int
    header: Header | None
    regions: tuple[Region, ...] = ()
    l1_entries: tuple[TableEntry, ...] = ()
    l2_entries: tuple[TableEntry, ...] = ()
    reftable_entries: tuple[TableEntry, ...] = ()
    snapshots: tuple[tuple[int, SnapshotEntry], ...] = ()
    problems: tuple[str, ...] = ()
    _refblocks: tuple[int, ...] = field(default=(), repr=False)

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size if self.header is not None else C.SECTOR_SIZE

    def metadata(self) -> tuple[Region, ...]:
        """The regions that are metadata (not guest data)."""
        return tuple(r for r in self.regions if r.kind in KIND_TO_OL)

    def of_kind(self, *kinds: str) -> tuple[Region, ...]:
        return tuple(r for r in self.regions if r.kind in kinds)

    def refcount_location(self, cluster_index: int) -> tuple[int, int, int] | None:
        """``(host byte offset, bit shift inside it, refcount_bits)`` of a cluster's refcount entry
        (entries of 8 bits and more: the shift is 0 and the entry is ``refcount_bits // 8``
        big-endian bytes), or None when no refcount block covers the cluster."""
        h = self.header
        if h is None:
            return None
        per_block = h.refcount_block_entries
        r, i = divmod(cluster_index, per_block)
        if r >= len(self._refblocks) or not self._refblocks[r]:
            return None
        bits = h.refcount_bits
        bit = i * bits
        return self._refblocks[r] + bit // 8, (bit % 8) if bits < 8 else 0, bits

    def refcount(self, data: bytes, cluster_index: int) -> int | None:
        """The refcount stored in ``data`` (this image's bytes) for a cluster, or None."""
        loc = self.refcount_location(cluster_index)
        if loc is None:
            return None
        offset, shift, bits = loc
        if bits < 8:
            byte = data[offset] if offset < len(data) else 0
            return (byte >> shift) & ((1 << bits) - 1)
        raw = data[offset:offset + bits // 8]
        return int.from_bytes(raw.ljust(bits // 8, b"\0"), "big")

    def referenced_clusters(self) -> list[int]:
        """Host cluster indexes some structure or data range covers (inside the file), sorted."""
        cs, size = self.cluster_size, self.file_size
        out = set()
        for r in self.regions:
            if r.host_offset >= size or r.length <= 0:
                continue
            end = min(r.end, size)
            out.update(range(r.host_offset // cs, (end - 1) // cs + 1))
        return sorted(out)

    def kinds_overlapping(self, host_offset: int, length: int, *, whole_clusters: bool = True
                          ) -> set[str]:
        """Kinds of the regions overlapping ``[host_offset, +length)`` (regions widened to whole
        clusters when ``whole_clusters``, as the overlap map counts them)."""
        if length <= 0:
            return set()
        cs = self.cluster_size
        end = host_offset + length
        kinds = set()
        for r in self.regions:
            if r.length <= 0:
                continue
            a, b = r.host_offset, r.end
            if whole_clusters:
                a, b = a // cs * cs, -(-b // cs) * cs
            if a < end and host_offset < b:
                kinds.add(r.kind)
        return kinds


def _u64_table(data: bytes, offset: int, nb_entries: int) -> array.array:
    """Entries of a u64 table inside the file (the part past the end reads as missing)."""
    if offset >= len(data) or nb_entries <= 0:
        return array.array("Q")
    n = min(nb_entries, (len(data) - offset) // 8)
    return decode_u64_table(data[offset:offset + 8 * n])


def metadata_layout(data: bytes) -> Layout:
    """Parse ``data`` (a whole qcow2 file) into a :class:`Layout`, with the codecs only.

    Valid images parse completely; damaged ones as far as they can (what could not be parsed is
    listed in ``problems``).  Bounded: tables are read only where they lie inside the file, each
    table once, so the work is O(file size).  Never raises for any input.
    """
    try:
        header = decode_header(data[:_HEAD_READ], check=True, no_io=True)
    except Qcow2Error as e:
        return Layout(len(data), None, (Region(0, C.SECTOR_SIZE, "main-header", "cluster 0"),),
                      problems=(f"header: {e}",))
    try:
        return _parse(data, header)
    except Exception as e:   # noqa: BLE001 - an oracle for damaged images must not crash
        return Layout(len(data), header, (Region(0, header.cluster_size, "main-header",
                                                 "cluster 0"),),
                      problems=(f"unparsed: {type(e).__name__}: {e}",))


def _parse(data: bytes, h: Header) -> Layout:
    cs, bits = h.cluster_size, h.cluster_bits
    regions = [Region(0, cs, "main-header", "cluster 0")]
    l1_entries: list[TableEntry] = []
    l2_entries: list[TableEntry] = []
    problems: list[str] = []
    width = 2 if h.extended_l2 else 1
    seen_l2: set[tuple[int, str]] = set()

    def walk_l1(offset: int, nb_entries: int, kind: str, label: str) -> None:
        l2_kind = "active-l2" if kind == "active-l1" else "inactive-l2"
        if nb_entries:
            regions.append(Region(offset, nb_entries * 8, kind, label))
        for index, entry in enumerate(_u64_table(data, offset, nb_entries)):
            if not entry:
                continue
            l1_entries.append(TableEntry(offset + 8 * index, entry, kind, index))
            l2_offset = entry & C.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            regions.append(Region(l2_offset, cs, l2_kind, f"L2 of {label}[{index}]"))
            if (l2_offset, l2_kind) in seen_l2:
                continue
            seen_l2.add((l2_offset, l2_kind))
            table = _u64_table(data, l2_offset, cs // 8)
            for i in range(0, len(table) - width + 1, width):
                e = table[i]
                bitmap = table[i + 1] if width == 2 else None
                if not e and not bitmap:
                    continue
                l2_entries.append(TableEntry(l2_offset + 8 * i, e, l2_kind, i // width, bitmap))
                if h.has_data_file and not e & _COMPRESSED:
                    continue             # data clusters live in the data file
                if e & _COMPRESSED:
                    host, csize = decode_compressed(e, bits)
                    regions.append(Region(host, csize, "compressed",
                                          f"{l2_kind} 0x{l2_offset:x}[{i // width}]"))
                elif e & _MASK:
                    regions.append(Region(e & _MASK, cs, "data",
                                          f"{l2_kind} 0x{l2_offset:x}[{i // width}]"))

    walk_l1(h.l1_table_offset, h.l1_size, "active-l1", "L1")
    # refcount structures
    reftable_entries: list[TableEntry] = []
    rt_size = h.refcount_table_clusters * cs
    if rt_size:
        regions.append(Region(h.refcount_table_offset, rt_size, "refcount-table", "reftable"))
    refblocks = []
    for index, entry in enumerate(_u64_table(data, h.refcount_table_offset, rt_size // 8)):
        offset = entry & C.REFT_OFFSET_MASK
        refblocks.append(offset if offset and not offset & (cs - 1) else 0)
        if entry:
            reftable_entries.append(TableEntry(h.refcount_table_offset + 8 * index, entry,
                                               "refcount-table", index))
        if offset:
            regions.append(Region(offset, cs, "refcount-block", f"refblock {index}"))
    # snapshots
    snapshots: list[tuple[int, SnapshotEntry]] = []
    if h.nb_snapshots:
        try:
            table = _snapshot_table_bytes(data, h)
            entries = decode_snapshot_table(table, h.nb_snapshots)
        except Qcow2Error as e:
            problems.append(f"snapshot table: {e}")
            regions.append(Region(h.snapshots_offset, min(h.nb_snapshots * 40, len(data) + cs),
                                  "snapshot-table", "snapshot table (undecodable)"))
            entries = ()
        pos = 0
        for sn in entries:
            pos = (pos + 7) & ~7
            snapshots.append((h.snapshots_offset + pos, sn))
            pos += sn.encoded_size
        if entries:
            regions.append(Region(h.snapshots_offset, snapshot_table_size(entries),
                                  "snapshot-table", "snapshot table"))
        for k, (_, sn) in enumerate(snapshots):
            if sn.l1_size > C.QCOW_MAX_L1_SIZE // 8:
                problems.append(f"snapshot {k}: l1_size {sn.l1_size} too large")
                continue
            walk_l1(sn.l1_table_offset, sn.l1_size, "inactive-l1", f"snapshot {sn.id} L1")
    # bitmaps
    ext = h.bitmaps
    if ext is not None and ext.nb_bitmaps:
        from .bitmap import BME_TABLE_ENTRY_OFFSET_MASK, decode_bitmap_directory
        size = min(ext.bitmap_directory_size, C.QCOW_MAX_BITMAP_DIRECTORY_SIZE)
        regions.append(Region(ext.bitmap_directory_offset, size, "bitmap-directory",
                              "bitmap directory"))
        try:
            raw = data[ext.bitmap_directory_offset:ext.bitmap_directory_offset + size]
            for bm in decode_bitmap_directory(raw, ext.nb_bitmaps):
                regions.append(Region(bm.bitmap_table_offset, bm.bitmap_table_size * 8,
                                      "bitmap-table", f"bitmap {bm.name!r}"))
                for value in _u64_table(data, bm.bitmap_table_offset, bm.bitmap_table_size):
                    if value & BME_TABLE_ENTRY_OFFSET_MASK:
                        regions.append(Region(value & BME_TABLE_ENTRY_OFFSET_MASK, cs, "data",
                                              f"bitmap {bm.name!r} data"))
        except Qcow2Error as e:
            problems.append(f"bitmap directory: {e}")
    crypto = h.crypto_header
    if crypto is not None:
        regions.append(Region(crypto.offset, crypto.length, "data", "encryption header"))
    return Layout(len(data), h, tuple(regions), tuple(l1_entries), tuple(l2_entries),
                  tuple(reftable_entries), tuple(snapshots), tuple(problems), tuple(refblocks))


def _snapshot_table_bytes(data: bytes, h: Header) -> bytes:
    """The snapshot table's bytes, walked entry by entry (as the image layer reads it)."""
    pos = 0
    base = h.snapshots_offset
    for index in range(h.nb_snapshots):
        fixed = data[base + pos:base + pos + 40].ljust(40, b"\0")
        id_len, name_len = struct.unpack_from(">HH", fixed, 12)
        extra_len, = struct.unpack_from(">I", fixed, 36)
        if extra_len > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            _raise_format(f"Too much extra metadata in snapshot table entry {index}")
        pos = (pos + 40 + extra_len + id_len + name_len + 7) & ~7
        if pos > C.QCOW_MAX_SNAPSHOTS_SIZE or base + pos > len(data) + (1 << 16):
            _raise_format("Snapshot table is too big or runs past the end of the file")
    return data[base:base + pos]


def _raise_format(msg: str):
    from .errors import FormatError
    raise FormatError(msg)


# -- corruptions -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Corruption:
    """Damage done to an image: ``patches`` (``(host_offset, new bytes)``, applied in order; the
    file grows with zeros if a patch lies past its end), then ``truncate_to`` (a new file length)
    if set.  ``kind`` names the class of damage (see :data:`qcow2.strategies.CORRUPTION_KINDS`),
    ``target`` the structure hit (a :class:`Region` label or header field), ``description`` says
    exactly what was done (old and new values, hex offsets)."""

    kind: str
    target: str
    description: str
    patches: tuple[tuple[int, bytes], ...] = ()
    truncate_to: int | None = None

    def apply(self, data: bytes) -> bytes:
        """The damaged copy of ``data``."""
        out = bytearray(data)
        for offset, new in self.patches:
            if offset + len(new) > len(out):
                out.extend(bytes(offset + len(new) - len(out)))
            out[offset:offset + len(new)] = new
        if self.truncate_to is not None:
            del out[self.truncate_to:]
        return bytes(out)

    def __str__(self) -> str:
        return f"[{self.kind}] {self.description}"

    def __repr__(self) -> str:
        return f"Corruption({self})"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))
