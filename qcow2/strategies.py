"""Hypothesis strategies for fuzzing qcow2 consumers: headers, table entries, whole images,
targeted metadata corruptions and operation sequences.

Install with the extra: ``pip install 'qcow2[hypothesis]'`` (``import qcow2`` never imports
Hypothesis; importing this module without it raises :class:`ImportError`).

What is here, and what for
--------------------------
* Codec level, no I/O: :func:`headers` (valid :class:`~qcow2.header.Header` values),
  :func:`header_bytes` (valid cluster-0 bytes), :func:`invalid_header_bytes` (cluster 0 with one
  rule broken, and which), :func:`l1_entries`, :func:`l2_entries`, :func:`reftable_entries`,
  :func:`refcount_values`, :func:`compressed_descriptors`, :func:`snapshot_entries`.  Feed them to
  a header or table parser.
* Image level: :func:`create_options` (valid :func:`qcow2.create` keyword arguments),
  :func:`operations` (lists of :class:`Op` valid for a disk size), :func:`images` (small valid
  images made by this library's writer, with data and internal snapshots: a
  :class:`GeneratedImage` carrying the file's bytes, the recipe and the guest bytes it must read
  as), :func:`image_chains` (the same over a backing chain of qcow2 and raw files).
* Damage: :func:`corruptions` (a targeted :class:`Corruption` for a given image, aimed at its real
  metadata, which it finds by parsing the bytes: :func:`metadata_layout`) and
  :func:`corrupted_images` (images with corruptions applied: a :class:`CorruptedImage`).  The
  classes of damage are :data:`CORRUPTION_KINDS`.

Images are built for real (a temporary directory, in ``/dev/shm`` when available) and returned as
bytes, so drawing one costs a few milliseconds; keep ``max_examples`` in the hundreds, not the
tens of thousands.  Everything drawn is deterministic given Hypothesis' choices, so failures shrink
and replay.  Reprs are short and say what was done (create options, operations, the corruption
with hex offsets and old/new values), which is what a failing test prints.

Example (a property of your own qcow2 reader)::

    from hypothesis import given
    from qcow2 import strategies as qst

    @given(qst.corrupted_images())
    def test_my_reader_never_crashes(tmp_path_factory, damaged):
        path = damaged.write_to(tmp_path_factory.mktemp("img"))
        try:
            my_reader.open(path).read_all()
        except my_reader.BadImage:
            pass
"""

from __future__ import annotations

try:
    from hypothesis import assume, strategies as st
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("qcow2.strategies needs Hypothesis; install the extra: "
                      "pip install 'qcow2[hypothesis]'") from exc

import importlib.util
import struct
from dataclasses import dataclass

from . import constants as C
from ._fuzzgen import (BackingLayer, Corruption, GeneratedImage, Layout, Op, Region, SnapshotStep,
                       TableEntry, build_chain, build_image, metadata_layout, pattern_bytes)

from .header import FeatureName, Header, HeaderExtension, encode_feature_table, encode_header
from .snapshot import SnapshotEntry
from .tables import compressed_params

__all__ = [
    # codec level
    "headers", "header_bytes", "invalid_header_bytes", "InvalidHeader", "l1_entries",
    "l2_entries", "reftable_entries", "refcount_values", "compressed_descriptors",
    "snapshot_entries",
    # image level
    "create_options", "disk_sizes", "operations", "images", "image_chains", "corruptions",
    "corrupted_images", "CORRUPTION_KINDS", "OP_KINDS",
    # what they draw
    "GeneratedImage", "BackingLayer", "CorruptedImage", "Corruption", "Op", "SnapshotStep",
    "Layout", "Region", "TableEntry", "metadata_layout", "build_image", "pattern_bytes",
]

KiB = 1 << 10
MiB = 1 << 20
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_HAVE_ZSTD = importlib.util.find_spec("zstandard") is not None

#: Interesting values for 32- and 64-bit fields: limits QEMU enforces and their neighbours.
INTERESTING_U32 = (0, 1, 2, 3, 7, 8, 9, 16, 21, 22, 64, 0x1FF, 0x200, 0x10000, 0x10001,
                   0x100000, 0x400000, 0x400001, 2 ** 31 - 1, 2 ** 31, _U32)
INTERESTING_U64 = (0, 1, 0x1FF, 0x200, 0x10000, 2 ** 31, 2 ** 32, 2 ** 55, 2 ** 56 - 0x200, 2 ** 56,
                   2 ** 62, 2 ** 63 - 1, 2 ** 63, _U64)


def _u32s():
    return st.one_of(st.sampled_from(INTERESTING_U32), st.integers(0, _U32))


def _u64s():
    return st.one_of(st.sampled_from(INTERESTING_U64), st.integers(0, _U64))


# =============================================================================================
# Codec level: headers
# =============================================================================================

_NAMES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40)


@st.composite
def headers(draw, *, versions=(2, 3), cluster_bits=None) -> Header:
    """Valid headers: a :class:`~qcow2.header.Header` that encodes (:func:`encode_header`) into
    one cluster and decodes back to itself, with every field inside QEMU 7.2's limits: any
    version, cluster size, refcount width, virtual size (up to what a 32 MiB L1 table maps), table
    offsets (aligned, possibly past any real file), feature bits (the known incompatible ones only,
    consistently with the compression type and extensions; unknown compatible and autoclear bits
    allowed), header extensions (backing format, feature name table, external data file name,
    unknown types) and a backing file name.  Use it to test a header parser's acceptance and
    round trip; encode it for a byte-level parser (:func:`header_bytes`)."""
    version = draw(st.sampled_from(versions))
    bits = draw(st.integers(C.MIN_CLUSTER_BITS, C.MAX_CLUSTER_BITS) if cluster_bits is None
                else st.just(cluster_bits))
    cs = 1 << bits
    incompat = compat = autoclear = 0
    refcount_order = 4
    header_length = C.V2_HEADER_LENGTH
    compression_type = 0
    extra_header = b""
    extended = False
    if version == 3:
        refcount_order = draw(st.integers(0, C.MAX_REFCOUNT_ORDER))
        extended = bits >= C.MIN_CLUSTER_BITS_EXTENDED_L2 and draw(st.booleans())
        compression_type = draw(st.sampled_from((0, 1)))
        header_length = draw(st.sampled_from((104, 112, 120, 128)) if not compression_type
                             else st.sampled_from((112, 120, 128)))
        header_length = min(header_length, cs)
        if header_length > 112:
            extra_header = draw(st.binary(min_size=header_length - 112,
                                          max_size=header_length - 112))
        incompat = ((C.INCOMPAT_EXTL2 if extended else 0)
                    | (C.INCOMPAT_COMPRESSION if compression_type else 0)
                    | draw(st.sampled_from((0, C.INCOMPAT_DIRTY, C.INCOMPAT_CORRUPT))))
        compat = draw(st.one_of(st.just(0), st.just(C.COMPAT_LAZY_REFCOUNTS), _u64s()))
        autoclear = draw(st.one_of(st.just(0), _u64s())) & ~C.AUTOCLEAR_KNOWN
    l2_bits = bits - (4 if extended else 3)
    span = 1 << (bits + l2_bits)                     # guest bytes one L1 entry maps
    max_l1 = C.QCOW_MAX_L1_SIZE // 8
    l1_size = draw(st.one_of(st.integers(0, 64), st.integers(0, max_l1)))
    size = draw(st.one_of(st.integers(0, l1_size * span), st.just(l1_size * span)))
    size = min(size, l1_size * span, C.INT64_MAX // C.SECTOR_SIZE * C.SECTOR_SIZE)

    def aligned(nb_bytes: int):
        top = (C.INT64_MAX - nb_bytes) // cs
        return st.one_of(st.integers(0, 64), st.integers(0, top)).map(lambda k: k * cs)

    l1_offset = draw(aligned(l1_size * 8))
    rt_clusters = draw(st.integers(1, C.QCOW_MAX_REFTABLE_SIZE // cs))
    rt_offset = draw(aligned(rt_clusters * cs))
    nb_snapshots = draw(st.one_of(st.integers(0, 4), st.integers(0, C.QCOW_MAX_SNAPSHOTS)))
    snap_offset = draw(aligned(nb_snapshots * 40))
    exts = []
    backing_file = None
    data_file = version == 3 and draw(st.booleans())
    if data_file:
        incompat |= C.INCOMPAT_DATA_FILE
        exts.append(HeaderExtension(C.EXT_DATA_FILE, draw(_NAMES).encode()))
        if draw(st.booleans()):
            autoclear |= C.AUTOCLEAR_DATA_FILE_RAW
    if draw(st.booleans()):
        backing_file = draw(_NAMES)
        if draw(st.booleans()):
            exts.append(HeaderExtension(C.EXT_BACKING_FORMAT,
                                        draw(st.sampled_from((b"qcow2", b"raw", b"x" * 15)))))
    if version == 3 and draw(st.booleans()):
        names = draw(st.lists(st.builds(FeatureName, st.integers(0, 2), st.integers(0, 63), _NAMES),
                              max_size=4))
        exts.append(HeaderExtension(C.EXT_FEATURE_TABLE, encode_feature_table(names)))
    for _ in range(draw(st.integers(0, 2))):
        ext_type = draw(st.integers(1, _U32).filter(lambda t: t not in (
            C.EXT_BACKING_FORMAT, C.EXT_FEATURE_TABLE, C.EXT_BITMAPS, C.EXT_CRYPTO_HEADER,
            C.EXT_DATA_FILE)))
        exts.append(HeaderExtension(ext_type, draw(st.binary(max_size=24))))
    h = Header(version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=bits,
               size=size, crypt_method=0, l1_size=l1_size, l1_table_offset=l1_offset,
               refcount_table_offset=rt_offset, refcount_table_clusters=rt_clusters,
               nb_snapshots=nb_snapshots, snapshots_offset=snap_offset,
               incompatible_features=incompat, compatible_features=compat,
               autoclear_features=autoclear, refcount_order=refcount_order,
               header_length=header_length, compression_type=compression_type,
               extra_header=extra_header, extensions=tuple(exts))
    # fit everything into cluster 0: drop optional extensions, then the backing file name
    while True:
        body = len(encode_header(h))
        name = backing_file.encode() if backing_file is not None else b""
        if body + (8 + len(name) if name else 0) <= cs:
            break
        droppable = [e for e in h.extensions if e.type != C.EXT_DATA_FILE]
        if droppable:
            h = h.replace(extensions=tuple(e for e in h.extensions if e is not droppable[-1]))
        elif backing_file is not None:
            backing_file = None
        else:
            h = h.replace(incompatible_features=h.incompatible_features & ~C.INCOMPAT_DATA_FILE,
                          autoclear_features=h.autoclear_features & ~C.AUTOCLEAR_DATA_FILE_RAW,
                          extensions=())
    if backing_file is not None:
        # the backing file name follows the extensions' end marker, as qemu-img writes it
        name = backing_file.encode()
        offset = len(encode_header(h))
        h = h.replace(backing_file_offset=offset, backing_file_size=len(name),
                      backing_file=backing_file)
    return h


def header_bytes(**kwargs):
    """Valid cluster-0 bytes (:func:`headers`, encoded; not padded to the cluster size): what a
    byte-level header parser must accept.  Keyword arguments go to :func:`headers`."""
    return headers(**kwargs).map(encode_header)


@dataclass(frozen=True)
class InvalidHeader:
    """Cluster-0 bytes that break exactly one rule (``violation``, e.g. ``"cluster_bits"``) of a
    header that was valid before; QEMU 7.2 refuses them, and so must any parser."""

    data: bytes
    violation: str
    detail: str

    def __repr__(self) -> str:
        return f"InvalidHeader({self.violation}: {self.detail}, {len(self.data)} bytes)"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


#: The rules :func:`invalid_header_bytes` breaks.
HEADER_VIOLATIONS = (
    "magic", "version", "cluster_bits", "header_length", "backing_file_offset",
    "compression_type", "compression_bit", "unknown_incompatible", "subcluster_size",
    "refcount_order", "no_refcount_table", "refcount_table_offset", "refcount_table_size",
    "snapshot_table_offset", "snapshot_count", "l1_table_offset", "l1_table_size", "l1_too_small",
    "image_too_big", "crypt_method", "extension_too_large", "backing_name_too_long",
    "data_file_missing", "data_file_raw_alone",
)


def _pack(buf: bytearray, offset: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, buf, offset, value)


def _unaligned(base: int, cluster_size: int):
    return st.integers(1, cluster_size - 1).map(lambda d: base + d)


#: The violations that set one header field to a drawn value: name -> (field offset, struct
#: format, detail template, ``values(header)`` strategy of the refused values).
_FIELD_VIOLATIONS = {
    "version": (4, ">I", "version {}",
                lambda h: st.integers(0, _U32).filter(lambda x: x not in (2, 3))),
    "backing_file_offset": (8, ">Q", "backing_file_offset 0x{:x}",
                            lambda h: st.integers(h.cluster_size + 1, _U64)),
    "backing_name_too_long": (16, ">I", "backing_file_size {}", lambda h: st.integers(
        min(C.QCOW_MAX_BACKING_FILE_NAME, h.cluster_size - h.backing_file_offset) + 1, _U32)),
    "cluster_bits": (20, ">I", "cluster_bits {}",
                     lambda h: st.one_of(st.integers(0, 8), st.integers(22, _U32))),
    "crypt_method": (32, ">I", "crypt_method {}", lambda h: st.integers(3, _U32)),
    "l1_table_size": (36, ">I", "l1_size {}",
                      lambda h: st.integers(C.QCOW_MAX_L1_SIZE // 8 + 1, _U32)),
    "l1_table_offset": (40, ">Q", "l1_table_offset 0x{:x} unaligned",
                        lambda h: _unaligned(h.l1_table_offset, h.cluster_size)),
    "refcount_table_offset": (48, ">Q", "refcount_table_offset 0x{:x} unaligned",
                              lambda h: _unaligned(h.refcount_table_offset, h.cluster_size)),
    "refcount_table_size": (56, ">I", "refcount_table_clusters {}", lambda h: st.integers(
        C.QCOW_MAX_REFTABLE_SIZE // h.cluster_size + 1, _U32)),
    "snapshot_count": (60, ">I", "nb_snapshots {}",
                       lambda h: st.integers(C.QCOW_MAX_SNAPSHOTS + 1, _U32)),
    "snapshot_table_offset": (64, ">Q", "snapshots_offset 0x{:x} unaligned",
                              lambda h: _unaligned(h.snapshots_offset, h.cluster_size)),
    "refcount_order": (96, ">I", "refcount_order {}", lambda h: st.integers(7, _U32)),
    "header_length": (100, ">I", "header_length {}", lambda h: st.one_of(
        st.integers(0, 103), st.integers(h.cluster_size + 1, _U32))),
    "compression_type": (104, ">B", "compression_type {}", lambda h: st.integers(2, 255)),
}


@st.composite
def invalid_header_bytes(draw, violations=HEADER_VIOLATIONS, *, versions=(2, 3),
                         cluster_bits=None) -> InvalidHeader:
    """Invalid cluster-0 bytes: a valid header (:func:`headers`) with one rule of QEMU 7.2's
    header validation broken — bad magic, version, cluster size, header length, backing file
    offset, compression type or bit, unknown incompatible feature, subclusters too small, refcount
    width, refcount table / snapshot table / L1 table offset or size, virtual size too big,
    encryption method, extension too large, backing file name too long, external data file bits
    without the file.  Returns an :class:`InvalidHeader` naming the rule.  Use it to check that a
    parser refuses each of them (with an error, not a crash)."""
    applicable = []
    h = draw(headers(versions=versions, cluster_bits=cluster_bits))
    v3 = h.version == 3
    cs = h.cluster_size
    for v in violations:
        if v in ("header_length", "refcount_order", "unknown_incompatible", "compression_bit",
                 "data_file_missing", "data_file_raw_alone") and not v3:
            continue
        if v == "compression_type" and not (v3 and h.header_length > 104):
            continue
        if v == "subcluster_size" and not (v3 and h.cluster_bits < C.MIN_CLUSTER_BITS_EXTENDED_L2):
            continue
        if v == "data_file_missing" and h.has_data_file:
            continue
        if v == "data_file_raw_alone" and h.has_data_file:
            continue
        if v == "extension_too_large" and not (v3 or h.extensions):
            continue
        if v == "backing_name_too_long" and not h.backing_file_offset:
            continue
        applicable.append(v)
    assume(applicable)
    v = draw(st.sampled_from(applicable))
    buf = bytearray(encode_header(h))
    buf.extend(bytes(max(0, 112 - len(buf))))
    incompat_off = 72
    if v in _FIELD_VIOLATIONS:
        offset, fmt, template, values = _FIELD_VIOLATIONS[v]
        value = draw(values(h))
        _pack(buf, offset, fmt, value)
        detail = template.format(value)
    elif v == "magic":
        magic = draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != C.QCOW_MAGIC_BYTES))
        buf[0:4] = magic
        detail = f"magic {magic!r}"
    elif v == "compression_bit":
        _pack(buf, incompat_off, ">Q", h.incompatible_features ^ C.INCOMPAT_COMPRESSION)
        detail = "compression type bit disagrees with the compression_type field"
    elif v == "unknown_incompatible":
        bit = draw(st.integers(5, 63))
        _pack(buf, incompat_off, ">Q", h.incompatible_features | (1 << bit))
        detail = f"incompatible feature bit {bit}"
    elif v == "subcluster_size":
        _pack(buf, incompat_off, ">Q", h.incompatible_features | C.INCOMPAT_EXTL2)
        detail = f"extended L2 with cluster_bits {h.cluster_bits}"
    elif v == "no_refcount_table":
        _pack(buf, 56, ">I", 0)
        detail = "refcount_table_clusters 0"
    elif v == "l1_too_small":
        shift = h.cluster_bits + h.l2_bits
        size = max(h.size, (h.l1_size << shift) + 1)
        size = min(size, C.INT64_MAX // C.SECTOR_SIZE * C.SECTOR_SIZE)
        if size <= h.l1_size << shift:           # cannot grow the size: shrink the L1 table
            _pack(buf, 36, ">I", max(0, h.nb_l1_entries_needed - 1))
            if not h.nb_l1_entries_needed:
                _pack(buf, 24, ">Q", 1 << shift)
                _pack(buf, 36, ">I", 0)
            detail = "l1_size below what the size needs"
        else:
            _pack(buf, 24, ">Q", size)
            detail = f"size 0x{size:x} needs more than l1_size {h.l1_size}"
    elif v == "image_too_big":
        value = draw(st.integers(2 ** 62, _U64))
        shift = h.cluster_bits + h.l2_bits
        if ((value + (1 << shift) - 1) & _U64) >> shift <= C.QCOW_MAX_L1_SIZE // 8:
            value = _U64 - (1 << shift) + 2          # wraps like QEMU's u64: still refused below
            _pack(buf, 36, ">I", 0)                  # ... then the L1 table is too small
        _pack(buf, 24, ">Q", value)
        detail = f"size 0x{value:x}"
    elif v == "extension_too_large":
        start = h.header_length
        if not h.extensions:      # add one extension header to make too large
            buf[start:start + 8] = struct.pack(">II", 0xDEADBEEF, 0)
        value = draw(st.integers(cs, _U32))
        _pack(buf, start + 4, ">I", value)
        detail = f"first extension length {value}"
    elif v == "data_file_missing":
        _pack(buf, incompat_off, ">Q", h.incompatible_features | C.INCOMPAT_DATA_FILE)
        detail = "external data file bit without the data file extension"
    else:  # data_file_raw_alone
        _pack(buf, 88, ">Q", h.autoclear_features | C.AUTOCLEAR_DATA_FILE_RAW)
        detail = "raw external data bit without a data file"
    return InvalidHeader(bytes(buf), v, detail)


# =============================================================================================
# Codec level: table entries
# =============================================================================================

def _aligned_offsets(cluster_size: int):
    return st.one_of(st.integers(1, 1024).map(lambda k: k * cluster_size),
                     st.integers(1, (C.MAX_HOST_OFFSET - 1) // cluster_size)
                     .map(lambda k: k * cluster_size))


def l1_entries(cluster_size: int = 65536, *, valid: bool | None = None):
    """L1 table entries (u64) for a cluster size: valid ones are 0 or a cluster-aligned L2 table
    offset below 2^56 with or without ``COPIED``; invalid ones have reserved bits set (bits 0-8,
    56-62) or an offset that is not cluster aligned.  ``valid=None`` draws both.  Use: fill an L1
    table for a mapping or checking routine, or patch one entry of a real image."""
    good = st.one_of(st.just(0), st.tuples(_aligned_offsets(cluster_size), st.booleans())
                     .map(lambda t: t[0] | (C.QCOW_OFLAG_COPIED if t[1] else 0)))
    reserved = st.tuples(good, st.sampled_from([b for b in range(64)
                                                if (1 << b) & C.L1E_RESERVED_MASK]))
    bad = reserved.map(lambda t: t[0] | (1 << t[1]))
    if cluster_size > 512:      # offset bits below the cluster size
        bad = st.one_of(bad, st.tuples(_aligned_offsets(cluster_size),
                                       st.integers(1, cluster_size // 512 - 1))
                        .map(lambda t: t[0] + t[1] * 512))
    return {True: good, False: bad, None: st.one_of(good, bad)}[valid]


def l2_entries(cluster_size: int = 65536, *, version: int = 3, extended_l2: bool = False,
               valid: bool | None = None):
    """L2 entries for a cluster size: an ``int`` (standard) or ``(entry, bitmap)`` (extended L2).

    Valid: unallocated, plain data (``COPIED`` or not), zero flag with or without a preallocated
    cluster (version 3), compressed descriptors; with extended L2 a consistent subcluster bitmap.
    Invalid: reserved bits, unaligned data offsets, ``COPIED`` on a compressed entry, and for
    extended L2 subclusters both allocated and zero, or allocated in a cluster without an offset.
    Use: test an L2 entry classifier or a guest-to-host mapper entry by entry.
    """
    bits = cluster_size.bit_length() - 1
    copied = st.sampled_from((0, C.QCOW_OFLAG_COPIED))
    data = st.tuples(_aligned_offsets(cluster_size), copied).map(lambda t: t[0] | t[1])
    kinds = [st.just(0), data, compressed_descriptors(bits)]
    if version >= 3 and not extended_l2:
        kinds.append(st.one_of(st.just(C.QCOW_OFLAG_ZERO),
                               data.map(lambda e: e | C.QCOW_OFLAG_ZERO)))
    good = st.one_of(*kinds)
    reserved_mask = C.L2E_STD_RESERVED_MASK | (C.QCOW_OFLAG_ZERO if extended_l2 else 0)
    bad = st.one_of(
        st.tuples(data, st.sampled_from([b for b in range(64) if (1 << b) & reserved_mask]))
        .map(lambda t: t[0] | (1 << t[1])),
        compressed_descriptors(bits).map(lambda e: e | C.QCOW_OFLAG_COPIED),
        *([data.map(lambda e: e + 512)] if cluster_size > 512 else []))
    if not extended_l2:
        return {True: good, False: bad, None: st.one_of(good, bad)}[valid]

    @st.composite
    def pair(draw, want_valid):
        entry = draw(good if want_valid else st.one_of(good, bad))
        compressed = bool(entry & C.QCOW_OFLAG_COMPRESSED)
        if want_valid:
            if compressed:
                return entry, 0
            alloc = draw(st.integers(0, _U32)) if entry & C.L2E_OFFSET_MASK else 0
            zero = draw(st.integers(0, _U32)) & ~alloc
            return entry, alloc | (zero << 32)
        if entry in (0,) or compressed:
            bitmap = draw(st.integers(1, _U64)) if compressed else draw(st.integers(1, _U32))
            return entry, bitmap
        sub = 1 << draw(st.integers(0, 31))
        return entry, sub | (sub << 32)

    return {True: pair(True), False: pair(False), None: st.one_of(pair(True), pair(False))}[valid]


def reftable_entries(cluster_size: int = 65536, *, valid: bool | None = None):
    """Refcount table entries: valid ones 0 or a cluster-aligned refcount block offset; invalid
    ones with reserved bits (0-8) set or an unaligned offset.  Use: a refcount-table reader's
    validation."""
    good = st.one_of(st.just(0), _aligned_offsets(cluster_size))
    bad = st.tuples(good, st.integers(1, 0x1FF)).map(lambda t: t[0] | t[1])
    if cluster_size > 512:
        bad = st.one_of(bad, _aligned_offsets(cluster_size).map(lambda o: o + 512))
    return {True: good, False: bad, None: st.one_of(good, bad)}[valid]


def refcount_values(refcount_bits: int = 16):
    """Refcount entry values for a width: 0, 1, 2, the maximum and anything in between.  Use:
    refcount block encoders and decoders (sub-byte widths are packed LSB first)."""
    top = (1 << refcount_bits) - 1
    return st.one_of(st.sampled_from(sorted({0, 1, min(2, top), top, max(0, top - 1)})),
                     st.integers(0, top))


def compressed_descriptors(cluster_bits: int = 16):
    """Compressed-cluster L2 entries (``QCOW_OFLAG_COMPRESSED`` set, ``COPIED`` clear): any host
    byte offset the descriptor holds (biased to small ones) and any sector count, including the
    maximum.  Use: a compressed-descriptor decoder, which must accept every such word."""
    offset_mask, shift, csize_mask = compressed_params(cluster_bits)
    return st.tuples(st.one_of(st.integers(0, 1 << 20), st.integers(0, offset_mask)),
                     st.one_of(st.sampled_from((0, csize_mask)), st.integers(0, csize_mask))) \
        .map(lambda t: C.QCOW_OFLAG_COMPRESSED | (t[1] << shift) | t[0])


@st.composite
def snapshot_entries(draw, *, cluster_size: int = 65536) -> SnapshotEntry:
    """Valid snapshot table entries: an aligned L1 offset, any L1 size QEMU accepts, id and name
    strings, dates, VM state sizes (64-bit ones in the extra data), the disk size and icount
    extra fields or not, unknown extra bytes up to QEMU's 1024-byte limit.  Use: a snapshot
    table parser's round trip (encode a list of them, decode it back)."""
    extra_len = draw(st.sampled_from((0, 8, 16, 24, 32, 1024)))
    vm_state = draw(st.one_of(st.just(0), st.integers(0, _U32), st.integers(0, _U64)))
    if extra_len < 8:
        vm_state &= _U32
    disk_size = draw(st.integers(0, _U64)) if extra_len >= 16 else None
    icount = draw(st.sampled_from((_U64, 0, 12345))) if extra_len >= 24 else None
    return SnapshotEntry(
        l1_table_offset=draw(_aligned_offsets(cluster_size)),
        l1_size=draw(st.integers(0, C.QCOW_MAX_L1_SIZE // 8)),
        id_str=draw(st.integers(1, 10 ** 6).map(str)), name=draw(_NAMES),
        date_sec=draw(st.integers(0, _U32)), date_nsec=draw(st.integers(0, 999_999_999)),
        vm_clock_nsec=draw(st.integers(0, _U64)), vm_state_size=vm_state,
        disk_size=disk_size, icount=icount,
        extra=(struct.pack(">QQQ", vm_state, disk_size or 0, icount or 0)[:min(extra_len, 24)]
               + draw(st.binary(min_size=max(0, extra_len - 24),
                                max_size=max(0, extra_len - 24)))))


# =============================================================================================
# Image level
# =============================================================================================

#: Operation kinds :func:`operations` draws.
OP_KINDS = ("pwrite", "write_zeroes", "discard", "write_compressed", "resize", "flush")
_CLUSTER_SIZES = (512, 1024, 4096, 16384, 65536)


@st.composite
def create_options(draw, *, cluster_sizes=_CLUSTER_SIZES, versions=("0.10", "1.1"),
                   preallocation: bool = True, data_files: bool = False,
                   backing: bool = False) -> dict:
    """Valid :func:`qcow2.create` keyword arguments (size excluded): cluster size, ``compat``,
    refcount width, lazy refcounts, extended L2, compression type (zstd only where the
    ``zstandard`` package is installed), preallocation mode, and with ``data_files`` an external
    data file (a relative name, see :class:`GeneratedImage`) possibly raw.  Only the combinations
    qemu-img accepts; ``backing=True`` leaves out those a backing file forbids."""
    cluster_size = draw(st.sampled_from(cluster_sizes))
    compat = draw(st.sampled_from(versions))
    opts: dict = {"cluster_size": cluster_size, "compat": compat}
    if compat == "1.1":
        opts["refcount_bits"] = draw(st.sampled_from((1, 2, 4, 8, 16, 32, 64)))
        opts["lazy_refcounts"] = draw(st.booleans())
        if cluster_size >= 1 << C.MIN_CLUSTER_BITS_EXTENDED_L2:
            opts["extended_l2"] = draw(st.booleans())
        if _HAVE_ZSTD:
            opts["compression_type"] = draw(st.sampled_from(("zlib", "zstd")))
        if data_files and not backing and draw(st.booleans()):
            opts["data_file"] = "image.data"
            opts["data_file_raw"] = draw(st.booleans())
    if preallocation and (not backing or opts.get("extended_l2")):
        opts["preallocation"] = draw(st.sampled_from(("off", "off", "metadata", "falloc", "full")))
    return opts


def disk_sizes(cluster_size: int, *, max_size: int = 1 * MiB):
    """Virtual disk sizes for small images: 0, whole clusters, and sizes that end inside a
    cluster (any multiple of 512), up to ``max_size`` bytes.  Use: with :func:`create_options`
    and :func:`operations` to build images your own way."""
    top = max(1, max_size // C.SECTOR_SIZE)
    return st.one_of(
        st.just(0),
        st.integers(1, max(1, max_size // cluster_size)).map(lambda n: n * cluster_size),
        st.integers(1, top).map(lambda n: n * C.SECTOR_SIZE))


def _guest_ranges(draw, size: int, cluster_size: int, max_clusters: int = 4):
    """An (offset, length) inside ``[0, size)``: aligned to clusters, sectors, or bytes."""
    align = draw(st.sampled_from((cluster_size, C.SECTOR_SIZE, 1)))
    offset = draw(st.integers(0, (size - 1) // align)) * align
    cap = min(size - offset, max_clusters * cluster_size)
    whole = (st.integers(1, cap // align).map(lambda n: n * align) if cap >= align
             else st.just(cap))
    length = draw(st.one_of(whole, st.integers(1, cap)))
    return offset, length


@st.composite
def operations(draw, size: int, cluster_size: int, *, max_ops: int = 6, kinds=OP_KINDS,
               max_size: int = 2 * MiB) -> list[Op]:
    """Lists of :class:`Op` valid for a disk of ``size`` bytes with ``cluster_size`` clusters,
    in order (a ``resize`` changes the size the later ones are drawn for): ``pwrite``,
    ``write_zeroes`` (sometimes ``may_unmap``), ``discard``, ``write_compressed`` (cluster
    aligned, whole clusters or up to the end of the disk), ``resize`` (grow up to ``max_size`` or
    shrink, multiples of 512) and ``flush``.  Use with :meth:`Op.apply` on any image opened for
    writing, and :meth:`Op.apply_model` for the guest bytes expected afterwards."""
    ops = []
    current = size
    for _ in range(draw(st.integers(0, max_ops))):
        kind = draw(st.sampled_from(kinds))
        if kind in ("pwrite", "write_zeroes", "discard") and current > 0:
            offset, length = _guest_ranges(draw, current, cluster_size)
            ops.append(Op(kind, offset, length, draw(st.integers(1, 255)),
                          kind == "write_zeroes" and draw(st.booleans())))
        elif kind == "write_compressed" and current > 0:
            offset = draw(st.integers(0, (current - 1) // cluster_size)) * cluster_size
            length = min(draw(st.integers(1, 3)) * cluster_size, current - offset)
            ops.append(Op(kind, offset, length, draw(st.integers(1, 255))))
        elif kind == "resize":
            new = draw(st.one_of(st.integers(0, max_size // C.SECTOR_SIZE),
                                 st.integers(0, max(0, current // C.SECTOR_SIZE)))) * C.SECTOR_SIZE
            ops.append(Op(kind, 0, new))
            current = new
        elif kind == "flush":
            ops.append(Op("flush"))
    return ops


@st.composite
def _steps(draw, size: int, cluster_size: int, *, max_ops: int, snapshots: bool, kinds,
           max_size: int):
    ops = draw(operations(size, cluster_size, max_ops=max_ops, kinds=kinds, max_size=max_size))
    steps: list = list(ops)
    if snapshots:
        for k in range(draw(st.integers(0, 2))):
            pos = draw(st.integers(0, len(steps)))
            steps.insert(pos, SnapshotStep(f"snap{k}", draw(st.integers(0, _U32))))
    return steps


def _op_kinds(opts: dict, kinds) -> tuple:
    if opts.get("data_file"):      # no compressed clusters with an external data file
        kinds = tuple(k for k in kinds if k != "write_compressed")
    return tuple(kinds)


@st.composite
def images(draw, *, options=None, max_ops: int = 6, max_size: int = 1 * MiB,
           snapshots: bool = True, data_files: bool = False, kinds=OP_KINDS) -> GeneratedImage:
    """Small valid images made by this library: :func:`create_options` (or the ``options``
    strategy given), a :func:`disk_sizes` size up to ``max_size``, then up to ``max_ops``
    :func:`operations` with up to two internal snapshots taken in between (``snapshots``).
    Draws a :class:`GeneratedImage`: the file's bytes (``.data``), the recipe, and the guest
    bytes it must read as (``.guest_data``); ``.write_to(directory)`` puts it on disk.  Every
    generated image passes ``qemu-img check`` (the test suite checks a sample).  Use it as input
    for a reader or writer, or as the starting point of :func:`corrupted_images`."""
    opts = draw(options if options is not None else create_options(data_files=data_files))
    cs = opts["cluster_size"]
    size = draw(disk_sizes(cs, max_size=max_size))
    steps = draw(_steps(size, cs, max_ops=max_ops, snapshots=snapshots and not opts.get("data_file"),
                        kinds=_op_kinds(opts, kinds), max_size=max_size))
    return build_image(size, opts, steps)


@st.composite
def image_chains(draw, *, max_depth: int = 3, raw_base: bool = True, max_ops: int = 4,
                 max_size: int = 512 * KiB, snapshots: bool = True) -> GeneratedImage:
    """Backing chains: 1 to ``max_depth`` qcow2 layers, each created over the one below (with
    or without a backing format), optionally over a raw base file, each with its own size,
    options and operations.  Draws the top :class:`GeneratedImage`; its ``backing`` holds the
    layers below, base first, and ``write_to(directory)`` writes the whole chain (names are
    relative, resolved against the image's directory as QEMU does).  Use: a reader's backing-file
    handling (copy-on-read through layers of different sizes and formats)."""
    layers = []
    depth = draw(st.integers(1, max_depth))
    raw = None
    if raw_base and draw(st.booleans()):
        n = draw(st.integers(1, max(1, max_size // C.SECTOR_SIZE)))
        raw = b"".join(pattern_bytes(0xB0 + k % 16, k * C.SECTOR_SIZE, C.SECTOR_SIZE)
                       for k in range(n))
    for k in range(depth):
        below = k > 0 or raw is not None
        opts = draw(create_options(backing=below))
        cs = opts["cluster_size"]
        size = draw(disk_sizes(cs, max_size=max_size))
        steps = draw(_steps(size, cs, max_ops=max_ops, snapshots=snapshots, kinds=OP_KINDS,
                            max_size=max_size))
        # with or without a backing format extension (without it the reader probes)
        layers.append((size, opts, tuple(steps), below and draw(st.booleans())))
    return build_chain(layers, raw_base=raw)


# =============================================================================================
# Corruptions
# =============================================================================================

#: Classes of damage :func:`corruptions` knows, each aimed at the image's real metadata.
CORRUPTION_KINDS = (
    "pointer-into-metadata",   # an L1/L2/reftable entry or header/snapshot table pointer aimed
                               # at another structure
    "unaligned-offset",        # a table pointer or header table offset moved off its alignment
    "reserved-bits",           # reserved bits of entries, bad subcluster bitmaps, unknown
                               # feature bits
    "refcount-off-by-one",     # a cluster's refcount one too high (leak) or one too low
    "copied-flag",             # COPIED flipped in an active L1 or L2 entry
    "truncated-table",         # the file cut inside a structure, or a table size field shrunk
    "snapshot-table-garbage",  # bytes of the snapshot table, its count or offset, an entry's
                               # L1 table
    "huge-value",              # sizes, counts and offsets at or past QEMU's limits
    "bit-flip",                # one bit flipped anywhere in a metadata structure
    "header-field",            # one header field set to an interesting value
    "feature-bits",            # dirty / corrupt bits
    "header-extension",        # the header extension area damaged
)

_HEADER_FIELDS = {   # name -> (offset, struct format); version 3 fields from 72 on
    "version": (4, ">I"), "backing_file_offset": (8, ">Q"), "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"), "size": (24, ">Q"), "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"), "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"), "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"), "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"), "header_length": (100, ">I"), "compression_type": (104, ">B"),
}
_V2_FIELDS = tuple(k for k, (off, _) in _HEADER_FIELDS.items() if off < 72)


def _field_patch(data: bytes, name: str, value: int) -> tuple[tuple[int, bytes], str]:
    offset, fmt = _HEADER_FIELDS[name]
    width = struct.calcsize(fmt)
    value &= (1 << (8 * width)) - 1
    old = int.from_bytes(data[offset:offset + width].ljust(width, b"\0"), "big")
    return (offset, struct.pack(fmt, value)), f"header {name} 0x{old:x} -> 0x{value:x}"


def _u64_patch(entry: TableEntry, value: int, what: str) -> tuple[tuple[int, bytes], str]:
    value &= _U64
    return ((entry.host_offset, struct.pack(">Q", value)),
            f"{what} {entry.table}[{entry.index}] at 0x{entry.host_offset:x}: "
            f"0x{entry.value:016x} -> 0x{value:016x}")


class _Target:
    """What corruptions of one image can aim at (computed once per image)."""

    def __init__(self, image):
        data = image.data if isinstance(image, GeneratedImage) else bytes(image)
        self.data = data
        self.layout = layout = metadata_layout(data)
        self.h = layout.header
        self.cs = layout.cluster_size
        self.meta = [r for r in layout.metadata() if r.length > 0]
        self.meta_in_file = [r for r in self.meta if r.host_offset < len(data)]
        self.l1 = list(layout.l1_entries)
        self.active_l1 = [e for e in self.l1 if e.table == "active-l1"]
        self.l2 = list(layout.l2_entries)
        self.active_l2 = [e for e in self.l2 if e.table == "active-l2"]
        self.std_l2 = [e for e in self.l2 if not e.value & C.QCOW_OFLAG_COMPRESSED]
        self.compressed_l2 = [e for e in self.l2 if e.value & C.QCOW_OFLAG_COMPRESSED]
        self.reftable = list(layout.reftable_entries)
        self.referenced = [k for k in layout.referenced_clusters()
                           if layout.refcount_location(k) is not None]
        nb_clusters = -(-len(data) // self.cs)
        used = set(self.referenced)
        self.unreferenced = [k for k in range(nb_clusters) if k not in used
                             and layout.refcount_location(k) is not None][:64]
        self.v3 = self.h is not None and self.h.version == 3
        self.fields = tuple(_HEADER_FIELDS) if self.v3 else _V2_FIELDS

    def applicable(self, kinds) -> list[str]:
        out = []
        for kind in kinds:
            if self.h is None and kind not in ("bit-flip", "header-field", "truncated-table"):
                continue
            if kind == "copied-flag" and not (self.active_l1 or self.active_l2):
                continue
            if kind == "refcount-off-by-one" and not (self.referenced or self.unreferenced):
                continue
            if kind in ("feature-bits",) and not self.v3:
                continue
            if kind == "snapshot-table-garbage" and self.h is None:
                continue
            if kind == "bit-flip" and not self.meta_in_file:
                continue
            out.append(kind)
        return out


def _refcount_patch(t: _Target, cluster: int, new: int) -> tuple[int, bytes]:
    offset, shift, bits = t.layout.refcount_location(cluster)
    new &= (1 << bits) - 1
    if bits < 8:
        byte = t.data[offset] if offset < len(t.data) else 0
        mask = ((1 << bits) - 1) << shift
        return offset, bytes(((byte & ~mask) | (new << shift),))
    return offset, new.to_bytes(bits // 8, "big")


def _pointer_sites(t: _Target):
    """(description, kind, getter) of everything that holds a host offset."""
    sites = []
    for e in t.l1:
        sites.append(("l1", e))
    for e in t.l2:
        sites.append(("l2", e))
    for e in t.reftable:
        sites.append(("reftable", e))
    for name in ("l1_table_offset", "refcount_table_offset", "snapshots_offset"):
        sites.append(("field", name))
    for host_offset, sn in t.layout.snapshots:
        sites.append(("snapshot-l1", (host_offset, sn)))
    return sites


def _set_pointer(t: _Target, site, new_offset: int, what: str):
    """Patches that make ``site`` point at ``new_offset`` (flags kept)."""
    kind, obj = site
    if kind == "field":
        patch, desc = _field_patch(t.data, obj, new_offset)
        return [patch], f"{what}: {desc}"
    if kind == "snapshot-l1":
        host_offset, sn = obj
        return ([(host_offset, struct.pack(">Q", new_offset & _U64))],
                f"{what}: snapshot {sn.id!r} l1_table_offset at 0x{host_offset:x}: "
                f"0x{sn.l1_table_offset:x} -> 0x{new_offset:x}")
    e = obj
    if kind == "l2" and e.value & C.QCOW_OFLAG_COMPRESSED:
        offset_mask, _, _ = compressed_params(t.h.cluster_bits)
        value = (e.value & ~offset_mask) | (new_offset & offset_mask)
    elif kind == "reftable":
        value = (e.value & C.REFT_RESERVED_MASK) | (new_offset & C.REFT_OFFSET_MASK)
    else:
        value = (e.value & ~C.L2E_OFFSET_MASK) | (new_offset & C.L2E_OFFSET_MASK)
    patch, desc = _u64_patch(e, value, what)
    return [patch], desc


def _c_pointer_into_metadata(draw, t: _Target):
    site = draw(st.sampled_from(_pointer_sites(t)))
    target = draw(st.sampled_from(t.meta))
    return _set_pointer(t, site, target.host_offset, f"aimed at {target}")


def _c_unaligned_offset(draw, t: _Target):
    cs = t.cs
    sites = [s for s in _pointer_sites(t)
             if s[0] in ("field", "snapshot-l1") or (cs > 512 and not (
                 s[0] == "l2" and s[1].value & C.QCOW_OFLAG_COMPRESSED))]
    site = draw(st.sampled_from(sites))
    kind, obj = site
    if kind == "field":
        current = int.from_bytes(t.data[_HEADER_FIELDS[obj][0]:][:8], "big")
    elif kind == "snapshot-l1":
        current = obj[1].l1_table_offset
    else:
        current = obj.value & (C.REFT_OFFSET_MASK if kind == "reftable" else C.L2E_OFFSET_MASK)
    if kind in ("field", "snapshot-l1"):
        delta = draw(st.one_of(st.sampled_from((8, 512, 1)), st.integers(1, cs - 1)))
    else:
        delta = draw(st.integers(1, max(1, cs // 512 - 1))) * 512
    return _set_pointer(t, site, current + delta, f"moved by 0x{delta:x}")


def _c_reserved_bits(draw, t: _Target):
    h = t.h
    choices = []
    if t.l1:
        choices.append("l1")
    if t.std_l2:
        choices.append("l2")
    if t.compressed_l2:
        choices.append("compressed-copied")
    if t.reftable:
        choices.append("reftable")
    if h.extended_l2 and t.l2:
        choices.append("bitmap")
    if t.v3:
        choices += ["incompat", "compat", "autoclear"]
    if not choices:
        choices.append("incompat-v2")
    which = draw(st.sampled_from(choices))
    if which == "l1":
        e = draw(st.sampled_from(t.l1))
        bit = draw(st.sampled_from([b for b in range(64) if (1 << b) & C.L1E_RESERVED_MASK]))
        patch, desc = _u64_patch(e, e.value | (1 << bit), f"reserved bit {bit} of")
        return [patch], desc
    if which == "l2":
        e = draw(st.sampled_from(t.std_l2))
        mask = C.L2E_STD_RESERVED_MASK | (C.QCOW_OFLAG_ZERO if h.extended_l2 else 0)
        bit = draw(st.sampled_from([b for b in range(64) if (1 << b) & mask]))
        patch, desc = _u64_patch(e, e.value | (1 << bit), f"reserved bit {bit} of")
        return [patch], desc
    if which == "compressed-copied":
        e = draw(st.sampled_from(t.compressed_l2))
        patch, desc = _u64_patch(e, e.value | C.QCOW_OFLAG_COPIED, "COPIED on compressed")
        return [patch], desc
    if which == "reftable":
        e = draw(st.sampled_from(t.reftable))
        bit = draw(st.integers(0, 8))
        patch, desc = _u64_patch(e, e.value | (1 << bit), f"reserved bit {bit} of")
        return [patch], desc
    if which == "bitmap":
        e = draw(st.sampled_from(t.l2))
        sub = draw(st.integers(0, 31))
        bitmap = e.bitmap or 0
        how = draw(st.sampled_from(("alloc+zero", "alloc-unallocated", "random")))
        if how == "alloc+zero":
            new = bitmap | (1 << sub) | (1 << (sub + 32))
        elif how == "alloc-unallocated":
            new = bitmap | (1 << sub)
        else:
            new = draw(st.integers(0, _U64))
        return ([(e.host_offset + 8, struct.pack(">Q", new))],
                f"subcluster bitmap of {e.table}[{e.index}] at 0x{e.host_offset + 8:x}: "
                f"0x{bitmap:016x} -> 0x{new:016x} ({how})")
    if which == "incompat-v2":
        patch, desc = _field_patch(t.data, "version", 3)
        return [patch], f"v2 image relabelled v3 ({desc})"
    name = {"incompat": "incompatible_features", "compat": "compatible_features",
            "autoclear": "autoclear_features"}[which]
    known = {"incompat": C.INCOMPAT_KNOWN, "compat": C.COMPAT_KNOWN,
             "autoclear": C.AUTOCLEAR_KNOWN}[which]
    bit = draw(st.integers(0, 63).filter(lambda b: not (1 << b) & known))
    offset, fmt = _HEADER_FIELDS[name]
    old = int.from_bytes(t.data[offset:offset + 8], "big")
    patch, desc = _field_patch(t.data, name, old | (1 << bit))
    return [patch], f"unknown feature bit {bit}: {desc}"


def _c_refcount_off_by_one(draw, t: _Target):
    pool = []
    if t.referenced:
        pool.append("referenced")
    if t.unreferenced:
        pool.append("unreferenced")
    which = draw(st.sampled_from(pool))
    cluster = draw(st.sampled_from(t.referenced if which == "referenced" else t.unreferenced))
    old = t.layout.refcount(t.data, cluster)
    delta = draw(st.sampled_from((1, -1))) if which == "referenced" else 1
    bits = t.h.refcount_bits
    new = (old + delta) % (1 << bits)
    offset, raw = _refcount_patch(t, cluster, new)
    return ([(offset, raw)], f"refcount of {which} cluster {cluster} (host 0x{cluster * t.cs:x}, "
                             f"entry at 0x{offset:x}): {old} -> {new} ({delta:+d}, "
                             f"refcount_bits {bits})")


def _c_copied_flag(draw, t: _Target):
    e = draw(st.sampled_from(t.active_l1 + t.active_l2))
    patch, desc = _u64_patch(e, e.value ^ C.QCOW_OFLAG_COPIED, "COPIED flipped in")
    return [patch], desc


def _c_truncated_table(draw, t: _Target):
    how = draw(st.sampled_from(("cut-file", "l1_size", "refcount_table_clusters")
                               if t.h is not None else ("cut-file",)))
    if how == "cut-file":
        region = draw(st.sampled_from(t.meta_in_file or [Region(0, len(t.data), "file")]))
        end = min(region.end, len(t.data))
        cut = draw(st.integers(region.host_offset, max(region.host_offset, end - 1)))
        return [], f"file cut at 0x{cut:x}, inside {region}", cut
    name = how
    offset, fmt = _HEADER_FIELDS[name]
    old = int.from_bytes(t.data[offset:offset + 4], "big")
    new = draw(st.integers(0, max(0, old - 1)))
    patch, desc = _field_patch(t.data, name, new)
    return [patch], f"table shrunk: {desc}"


def _c_snapshot_table_garbage(draw, t: _Target):
    h = t.h
    snaps = t.layout.snapshots
    choices = ["count", "offset"]
    if snaps:
        choices += ["splice", "lengths", "l1_size", "l1_offset"]
    which = draw(st.sampled_from(choices))
    if which == "count":
        new = draw(st.one_of(st.integers(h.nb_snapshots + 1, h.nb_snapshots + 4),
                             st.sampled_from((C.QCOW_MAX_SNAPSHOTS, C.QCOW_MAX_SNAPSHOTS + 1,
                                              _U32))))
        patches = [_field_patch(t.data, "nb_snapshots", new)[0]]
        desc = f"nb_snapshots {h.nb_snapshots} -> {new}"
        if not h.nb_snapshots:     # point the "table" at some cluster
            target = draw(st.sampled_from(t.meta + [Region(len(t.data) // t.cs * t.cs, t.cs,
                                                           "past-eof")]))
            patches.append(_field_patch(t.data, "snapshots_offset", target.host_offset)[0])
            desc += f", snapshots_offset -> {target}"
        return patches, desc
    if which == "offset":
        target = draw(st.sampled_from(t.meta))
        new = target.host_offset + draw(st.sampled_from((0, 0, 8, 512, 1)))
        patch, desc = _field_patch(t.data, "snapshots_offset", new)
        return [patch], f"{desc} ({target})"
    host_offset, sn = draw(st.sampled_from(snaps))
    if which == "splice":
        region_len = 40 + len(sn.extra) + len(sn.id_str) + len(sn.name)
        at = draw(st.integers(0, region_len - 1))
        junk = draw(st.binary(min_size=1, max_size=16))
        return ([(host_offset + at, junk)],
                f"snapshot {sn.id!r} entry at 0x{host_offset:x}: {len(junk)} bytes replaced at "
                f"+{at}: {junk.hex()}")
    if which == "lengths":
        field_offset, fmt, name = draw(st.sampled_from(((12, ">H", "id_str_size"),
                                                        (14, ">H", "name_size"),
                                                        (36, ">I", "extra_data_size"))))
        top = 0xFFFF if fmt == ">H" else _U32
        new = draw(st.one_of(st.sampled_from((0, 1023, 1024, 1025, top)), st.integers(0, top)))
        return ([(host_offset + field_offset, struct.pack(fmt, new))],
                f"snapshot {sn.id!r} {name} at 0x{host_offset + field_offset:x} -> {new}")
    if which == "l1_size":
        new = draw(st.one_of(st.sampled_from((0, C.QCOW_MAX_L1_SIZE // 8,
                                              C.QCOW_MAX_L1_SIZE // 8 + 1, _U32)),
                             st.integers(sn.l1_size + 1, sn.l1_size + 64)))
        return ([(host_offset + 8, struct.pack(">I", new))],
                f"snapshot {sn.id!r} l1_size at 0x{host_offset + 8:x}: {sn.l1_size} -> {new}")
    new = draw(st.one_of(st.sampled_from((0, 8, 2 ** 55, 2 ** 63 - 8)),
                         st.sampled_from([r.host_offset for r in t.meta])))
    return ([(host_offset, struct.pack(">Q", new))],
            f"snapshot {sn.id!r} l1_table_offset at 0x{host_offset:x}: "
            f"0x{sn.l1_table_offset:x} -> 0x{new:x}")


def _c_huge_value(draw, t: _Target):
    h = t.h
    choices = ["size", "l1_size", "refcount_table_clusters", "nb_snapshots", "far-pointer"]
    if t.compressed_l2:
        choices.append("compressed-sectors")
    if t.referenced:
        choices.append("refcount-max")
    which = draw(st.sampled_from(choices))
    if which in ("size", "l1_size", "refcount_table_clusters", "nb_snapshots"):
        fmt = _HEADER_FIELDS[which][1]
        value = draw(st.sampled_from(INTERESTING_U64 if fmt == ">Q" else INTERESTING_U32))
        if which == "size":
            value = draw(st.sampled_from((2 ** 40, 2 ** 50, 2 ** 55, 2 ** 62, 2 ** 63 - 512,
                                          2 ** 63 - 1, _U64, value)))
        patch, desc = _field_patch(t.data, which, value)
        return [patch], f"huge: {desc}"
    if which == "far-pointer":
        site = draw(st.sampled_from(_pointer_sites(t)))
        new = draw(st.sampled_from((2 ** 55, 2 ** 56 - t.cs, 2 ** 50, 2 ** 40,
                                    len(t.data) // t.cs * t.cs + 64 * t.cs)))
        return _set_pointer(t, site, new, "far past the end of the file")
    if which == "compressed-sectors":
        e = draw(st.sampled_from(t.compressed_l2))
        _, shift, csize_mask = compressed_params(h.cluster_bits)
        patch, desc = _u64_patch(e, e.value | (csize_mask << shift), "max sector count in")
        return [patch], desc
    cluster = draw(st.sampled_from(t.referenced))
    top = (1 << h.refcount_bits) - 1
    offset, raw = _refcount_patch(t, cluster, top)
    return [(offset, raw)], f"refcount of cluster {cluster} (entry at 0x{offset:x}) -> {top} (max)"


def _c_bit_flip(draw, t: _Target):
    region = draw(st.sampled_from(t.meta_in_file))
    end = min(region.end, len(t.data))
    at = draw(st.integers(region.host_offset, end - 1))
    bit = draw(st.integers(0, 7))
    return ([(at, bytes((t.data[at] ^ (1 << bit),)))],
            f"bit {bit} of byte 0x{at:x} flipped, in {region}")


def _c_header_field(draw, t: _Target):
    name = draw(st.sampled_from(t.fields))
    fmt = _HEADER_FIELDS[name][1]
    value = draw({">Q": _u64s(), ">I": _u32s(), ">B": st.integers(0, 255)}[fmt])
    patch, desc = _field_patch(t.data, name, value)
    return [patch], desc


def _c_feature_bits(draw, t: _Target):
    bits = draw(st.sampled_from((C.INCOMPAT_DIRTY, C.INCOMPAT_CORRUPT,
                                 C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT)))
    old = t.h.incompatible_features
    patch, desc = _field_patch(t.data, "incompatible_features", old | bits)
    patches = [patch]
    if bits & C.INCOMPAT_DIRTY and draw(st.booleans()):
        # a dirty image without lazy refcounts, or one with them
        compat = t.h.compatible_features ^ C.COMPAT_LAZY_REFCOUNTS
        patches.append(_field_patch(t.data, "compatible_features", compat)[0])
        desc += f", lazy refcounts flipped (compatible 0x{compat:x})"
    return patches, desc


def _c_header_extension(draw, t: _Target):
    h = t.h
    start = h.header_length
    end = h.backing_file_offset or t.cs
    which = draw(st.sampled_from(("length", "type", "garbage", "backing-format")))
    if which == "length":
        value = draw(_u32s())
        return ([(start + 4, struct.pack(">I", value))],
                f"first header extension length at 0x{start + 4:x} -> {value}")
    if which == "type":
        value = draw(st.sampled_from((C.EXT_BITMAPS, C.EXT_CRYPTO_HEADER, C.EXT_DATA_FILE,
                                      C.EXT_BACKING_FORMAT, 0xDEADBEEF)))
        return ([(start, struct.pack(">I", value))],
                f"first header extension type at 0x{start:x} -> 0x{value:x}")
    if which == "garbage":
        at = draw(st.integers(start, max(start, end - 1)))
        junk = draw(st.binary(min_size=1, max_size=32))
        return [(at, junk)], f"{len(junk)} bytes of header extension area at 0x{at:x}: {junk.hex()}"
    name = draw(st.binary(min_size=16, max_size=64))
    ext = struct.pack(">II", C.EXT_BACKING_FORMAT, len(name)) + name
    return [(start, ext)], f"backing format extension of {len(name)} bytes written at 0x{start:x}"


_MAKERS = {
    "pointer-into-metadata": _c_pointer_into_metadata,
    "unaligned-offset": _c_unaligned_offset,
    "reserved-bits": _c_reserved_bits,
    "refcount-off-by-one": _c_refcount_off_by_one,
    "copied-flag": _c_copied_flag,
    "truncated-table": _c_truncated_table,
    "snapshot-table-garbage": _c_snapshot_table_garbage,
    "huge-value": _c_huge_value,
    "bit-flip": _c_bit_flip,
    "header-field": _c_header_field,
    "feature-bits": _c_feature_bits,
    "header-extension": _c_header_extension,
}


def corruptions(image, *, kinds=CORRUPTION_KINDS):
    """Targeted damage for one image (a :class:`GeneratedImage` or the bytes of any qcow2 file):
    a strategy of :class:`Corruption` whose patches hit the image's real metadata, found by
    parsing it (:func:`metadata_layout`) — table pointers aimed at other structures, off their
    alignment or far past the end of the file; reserved bits; refcounts one too high or too low;
    ``COPIED`` flipped; truncated tables; snapshot table garbage; huge sizes and counts; bit flips;
    header fields and extensions; feature bits.  ``kinds`` restricts the classes
    (:data:`CORRUPTION_KINDS`).  ``corruption.apply(data)`` gives the damaged bytes."""
    target = _Target(image)
    usable = target.applicable(kinds)
    if not usable:
        raise ValueError(f"none of the corruption kinds {kinds} applies to this image")

    @st.composite
    def one(draw):
        kind = draw(st.sampled_from(usable))
        made = _MAKERS[kind](draw, target)
        patches, desc = made[0], made[1]
        truncate_to = made[2] if len(made) > 2 else None
        label = desc.split(":")[0]
        return Corruption(kind, label, desc, tuple(patches), truncate_to)

    return one()


@dataclass(frozen=True)
class CorruptedImage:
    """A generated image with corruptions applied: ``image`` (the valid original, with its recipe
    and backing chain), ``corruptions`` (what was done, in order) and ``data`` (the damaged bytes
    of the top image).  ``write_to(directory)`` writes the damaged image with the original's
    backing files and data file."""

    image: GeneratedImage
    corruptions: tuple[Corruption, ...]
    data: bytes

    @property
    def corruption(self) -> Corruption:
        """The first (usually only) corruption."""
        return self.corruptions[0]

    def write_to(self, directory) -> str:
        return self.image.write_to(directory, self.data)

    def __repr__(self) -> str:
        what = "; ".join(str(c) for c in self.corruptions)
        return f"CorruptedImage({what}; of {self.image!r})"

    def _repr_pretty_(self, printer, cycle) -> None:   # Hypothesis' failure reports
        printer.text(repr(self))


def corrupted_images(images_strategy=None, *, kinds=CORRUPTION_KINDS, max_corruptions: int = 1):
    """Damaged images: an image from ``images_strategy`` (default :func:`images`) with 1 to
    ``max_corruptions`` corruptions from :func:`corruptions` applied (each aimed at the original
    layout).  Draws a :class:`CorruptedImage`.  Use it to check that a consumer refuses or
    survives damage: errors, not crashes, hangs or writes onto metadata."""
    base = images_strategy if images_strategy is not None else images()

    @st.composite
    def damaged(draw):
        img = draw(base)
        target = _Target(img)
        if not target.applicable(kinds):
            assume(False)
        strategy = corruptions(img, kinds=kinds)
        done = [draw(strategy) for _ in range(draw(st.integers(1, max_corruptions)))]
        data = img.data
        for c in done:
            data = c.apply(data)
        return CorruptedImage(img, tuple(done), data)

    return damaged()
