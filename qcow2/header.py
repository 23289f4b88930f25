"""The qcow2 image header: cluster 0 as a frozen :class:`Header`, and back.

Theory of operation
-------------------
Cluster 0 holds, in this order: the fixed header fields (72 bytes for version 2,
``header_length`` bytes for version 3, of which we know the first 105), a chain of
header extensions (``u32 type, u32 length, data, zero padding to 8``) ended by a
type-0 extension, and optionally the backing file name at ``backing_file_offset``.

:func:`decode_header` turns those bytes into a :class:`Header` and validates every
field that can be validated from cluster 0 alone, in the order QEMU 7.2's
``qemu-img`` does, so the first problem reported is the one qemu-img reports and the
message has qemu-img's wording (tests poke bytes into qemu-img-made images and compare
both).  Things that need the rest of the file (the L1 table contents, the refcount
structures, the snapshot table bytes, the bitmap directory) are left to their own
codecs and to the image layer.

:func:`encode_header` is the inverse: unknown header bytes (``extra_header``) and
unknown extensions are kept verbatim, so an image rewritten by us keeps what a newer
writer put there.

Short buffers behave like QEMU's reads past the end of a file: missing bytes read as
zeros.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Iterable

from . import constants as C
from .errors import FormatError, NotQcow2Error, Qcow2Error, UnsupportedError

__all__ = [
    "HeaderExtension", "FeatureName", "BitmapsExtension", "CryptoHeaderExtension", "Header",
    "decode_header", "encode_header", "encode_header_fields", "encode_feature_table", "decode_feature_table",
    "default_feature_table", "HEADER_V2_STRUCT", "HEADER_V3_STRUCT",
]

# Fixed fields: magic .. snapshots_offset (72 bytes), then the version 3 fields
# incompatible .. header_length (32 bytes), then compression_type (1 byte, padded to 8).
HEADER_V2_STRUCT = struct.Struct(">4sIQIIQIIQQIIQ")
HEADER_V3_STRUCT = struct.Struct(">QQQII")
_EXT_HDR = struct.Struct(">II")
_COMPRESSION_TYPE_OFFSET = 104
#: Size of the header fields QEMU 7.2 knows, padding included; bytes of a longer header
#: past this point are "unknown header fields" (:attr:`Header.extra_header`).
KNOWN_HEADER_SIZE = 112
_BITMAPS_EXT = struct.Struct(">IIQQ")
_CRYPTO_EXT = struct.Struct(">QQ")
_U64 = (1 << 64) - 1
_INT_MAX = (1 << 31) - 1
_SNAPSHOT_HEADER_SIZE = 40   # fixed part of a snapshot table entry (QEMU's unit for the limit)
_L1E_SIZE = 8
_REFTABLE_ENTRY_SIZE = 8


@dataclass(frozen=True)
class HeaderExtension:
    """One header extension: ``type`` (u32) and its payload without padding."""

    type: int
    data: bytes


@dataclass(frozen=True)
class FeatureName:
    """One entry of the feature name table (extension 0x6803f857)."""

    type: int   # 0 incompatible, 1 compatible, 2 autoclear
    bit: int
    name: str


@dataclass(frozen=True)
class BitmapsExtension:
    """The bitmaps extension (0x23852875): where the bitmap directory is."""

    nb_bitmaps: int
    bitmap_directory_size: int
    bitmap_directory_offset: int
    reserved: int = 0


@dataclass(frozen=True)
class CryptoHeaderExtension:
    """The full disk encryption header pointer (0x0537be77): host byte range."""

    offset: int
    length: int


def _decode_str(data: bytes) -> str:
    """A name as C code sees it: up to the first NUL, utf-8 with surrogateescape."""
    nul = data.find(b"\0")
    if nul >= 0:
        data = data[:nul]
    return data.decode("utf-8", "surrogateescape")


def _encode_str(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Header:
    """The decoded qcow2 header (cluster 0). Frozen; use :meth:`replace` to change it.

    Fields are the on-disk fields, by their spec names, plus ``extra_header`` (header
    bytes past the fields we know, kept verbatim), ``extensions`` (file order, end
    marker excluded, unknown ones included) and ``backing_file`` (the name stored in
    cluster 0, or None when ``backing_file_offset`` is 0).
    """

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = C.V3_MIN_HEADER_LENGTH      # 72 for v2
    compression_type: int = 0
    extra_header: bytes = b""
    extensions: tuple[HeaderExtension, ...] = ()
    backing_file: str | None = None

    # -- derived values ------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry: 16 with extended L2, else 8."""
        return C.L2E_SIZE_EXTENDED if self.extended_l2 else C.L2E_SIZE_NORMAL

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table (one cluster)."""
        return self.cluster_size // self.l2_entry_size

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def subcluster_size(self) -> int:
        """Bytes per subcluster (the cluster size without extended L2)."""
        if self.extended_l2:
            return self.cluster_size // C.SUBCLUSTERS_PER_CLUSTER
        return self.cluster_size

    @property
    def refcount_block_entries(self) -> int:
        """Refcount entries per refcount block."""
        return (self.cluster_size * 8) >> self.refcount_order

    @property
    def nb_l1_entries_needed(self) -> int:
        """L1 entries needed to map ``size`` bytes (QEMU's ``size_to_l1``)."""
        shift = self.cluster_bits + self.l2_bits
        return (self.size + (1 << shift) - 1) >> shift

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & C.COMPAT_LAZY_REFCOUNTS)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW)

    @property
    def compression_type_name(self) -> str:
        return C.COMPRESSION_TYPE_NAMES.get(self.compression_type, str(self.compression_type))

    def extension(self, type: int) -> HeaderExtension | None:
        """The first extension of that type, or None. O(number of extensions)."""
        for ext in self.extensions:
            if ext.type == type:
                return ext
        return None

    @property
    def backing_format(self) -> str | None:
        ext = self.extension(C.EXT_BACKING_FORMAT)
        return None if ext is None else _decode_str(ext.data)

    @property
    def data_file(self) -> str | None:
        """The external data file name (cut at the first NUL byte, as QEMU reads C strings)."""
        ext = self.extension(C.EXT_DATA_FILE)
        return None if ext is None else _decode_str(ext.data.split(b"\0", 1)[0])

    @property
    def backing_file_name(self) -> str | None:
        """The backing file name as QEMU uses it: cut at the first NUL byte; an empty name means
        no backing file.  (:attr:`backing_file` keeps the stored bytes for re-encoding.)"""
        if self.backing_file is None:
            return None
        return self.backing_file.split("\0", 1)[0] or None

    @property
    def feature_names(self) -> tuple[FeatureName, ...]:
        ext = self.extension(C.EXT_FEATURE_TABLE)
        return () if ext is None else decode_feature_table(ext.data)

    @property
    def bitmaps_extension(self) -> BitmapsExtension | None:
        """The bitmaps extension as stored, trusted or not (None if absent or malformed)."""
        ext = self.extension(C.EXT_BITMAPS)
        if ext is None or len(ext.data) != _BITMAPS_EXT.size:
            return None
        nb, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(ext.data)
        return BitmapsExtension(nb, dir_size, dir_offset, reserved)

    @property
    def bitmaps(self) -> BitmapsExtension | None:
        """The bitmaps extension if it is to be trusted (autoclear bit 0 set), else None.

        A bitmaps extension without the autoclear bit was left by a program that did
        not know about bitmaps; QEMU then ignores it (and drops it on the next header
        write), and so do we: see :attr:`stale_bitmaps`.
        """
        if not self.autoclear_features & C.AUTOCLEAR_BITMAPS:
            return None
        return self.bitmaps_extension

    @property
    def stale_bitmaps(self) -> bool:
        """A bitmaps extension is present but its autoclear bit is clear."""
        return (self.extension(C.EXT_BITMAPS) is not None
                and not self.autoclear_features & C.AUTOCLEAR_BITMAPS)

    @property
    def crypto_header(self) -> CryptoHeaderExtension | None:
        ext = self.extension(C.EXT_CRYPTO_HEADER)
        if ext is None or len(ext.data) != _CRYPTO_EXT.size:
            return None
        return CryptoHeaderExtension(*_CRYPTO_EXT.unpack(ext.data))

    def replace(self, **changes) -> "Header":
        """A copy with ``changes`` applied (:func:`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def _check(self) -> None:
        """Invariant: the header encodes, and decodes back to itself."""
        again = decode_header(encode_header(self))
        assert again == self, (again, self)


# -- feature name table -----------------------------------------------------------------

_DEFAULT_FEATURES = (
    FeatureName(C.FEATURE_TYPE_INCOMPATIBLE, 0, "dirty bit"),
    FeatureName(C.FEATURE_TYPE_INCOMPATIBLE, 1, "corrupt bit"),
    FeatureName(C.FEATURE_TYPE_INCOMPATIBLE, 2, "external data file"),
    FeatureName(C.FEATURE_TYPE_INCOMPATIBLE, 3, "compression type"),
    FeatureName(C.FEATURE_TYPE_INCOMPATIBLE, 4, "extended L2 entries"),
    FeatureName(C.FEATURE_TYPE_COMPATIBLE, 0, "lazy refcounts"),
    FeatureName(C.FEATURE_TYPE_AUTOCLEAR, 0, "bitmaps"),
    FeatureName(C.FEATURE_TYPE_AUTOCLEAR, 1, "raw external data"),
)


def default_feature_table() -> tuple[FeatureName, ...]:
    """The feature names QEMU 7.2 writes into every image it creates, in its order."""
    return _DEFAULT_FEATURES


def encode_feature_table(names: Iterable[FeatureName]) -> bytes:
    """Serialise feature names as 48-byte entries (u8 type, u8 bit, 46-byte name)."""
    out = bytearray()
    for fn in names:
        raw = _encode_str(fn.name)
        if len(raw) > C.FEATURE_NAME_SIZE:
            raise FormatError(f"Feature name too long ({len(raw)} > {C.FEATURE_NAME_SIZE} bytes): {fn.name!r}")
        if not (0 <= fn.type <= 255 and 0 <= fn.bit <= 255):
            raise FormatError(f"Feature table entry out of range: type={fn.type} bit={fn.bit}")
        out += bytes((fn.type, fn.bit)) + raw.ljust(C.FEATURE_NAME_SIZE, b"\0")
    return bytes(out)


def decode_feature_table(data: bytes) -> tuple[FeatureName, ...]:
    """Parse a feature name table payload. A trailing partial entry is ignored. O(n)."""
    data = bytes(data)
    n = len(data) // C.FEATURE_ENTRY_SIZE
    out = []
    for i in range(n):
        e = data[i * C.FEATURE_ENTRY_SIZE:(i + 1) * C.FEATURE_ENTRY_SIZE]
        out.append(FeatureName(e[0], e[1], _decode_str(e[2:])))
    return tuple(out)


def _unsupported_features_message(table_data: bytes | None, mask: int) -> str:
    """qemu-img's "Unsupported qcow2 feature(s): ..." for unknown incompatible bits.

    Names come from the feature table (incompatible entries only, in table order, the
    table ending at the first entry with an empty name); bits without a name are
    reported together as a hex mask.
    """
    parts = []
    if table_data:
        size = C.FEATURE_ENTRY_SIZE
        for i in range(len(table_data) // size + (1 if len(table_data) % size else 0)):
            e = table_data[i * size:(i + 1) * size].ljust(size, b"\0")
            raw_name = e[2:]
            if raw_name[0] == 0:
                break
            if e[0] == C.FEATURE_TYPE_INCOMPATIBLE:
                bit = 1 << (e[1] & 63)     # a C shift on x86 uses the low 6 bits
                if mask & bit:
                    nul = raw_name.find(b"\0")
                    name = raw_name if nul < 0 else raw_name[:nul]
                    parts.append(name.decode("utf-8", "replace"))
                    mask &= ~bit
    if mask:
        parts.append(f"Unknown incompatible feature: {mask:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(parts)


# -- decoding -------------------------------------------------------------------------------

def _walk_extensions(buf: bytes, start: int, end: int, crypt_method: int, autoclear: int,
                     cluster_size: int) -> tuple[list[HeaderExtension], bytes | None, Qcow2Error | None, bool]:
    """Walk the extension chain in ``buf[start:end]`` the way QEMU does.

    Returns (extensions, last feature table payload seen, first error or None,
    end marker seen). The walk stops at the end marker, at ``end``, or at the first
    error.
    """
    exts: list[HeaderExtension] = []
    table = None
    offset = start
    while offset < end:
        ext_type, ext_len = _EXT_HDR.unpack_from(buf, offset)
        offset += _EXT_HDR.size
        if offset > end or ext_len > end - offset:
            return exts, table, FormatError("Header extension too large"), False
        if ext_type == C.EXT_END:
            return exts, table, None, True
        data = bytes(buf[offset:offset + ext_len])
        err: Qcow2Error | None = None
        if ext_type == C.EXT_BACKING_FORMAT:
            if ext_len > C.QCOW_MAX_BACKING_FORMAT_LEN:
                err = FormatError(f"ERROR: ext_backing_format: len={ext_len} too large "
                                  f"(>={C.QCOW_MAX_BACKING_FORMAT_LEN + 1})")
        elif ext_type == C.EXT_FEATURE_TABLE:
            table = data
        elif ext_type == C.EXT_CRYPTO_HEADER:
            if crypt_method != C.QCOW_CRYPT_LUKS:
                err = FormatError("CRYPTO header extension only expected with LUKS encryption method")
            elif ext_len != _CRYPTO_EXT.size:
                err = FormatError(f"CRYPTO header extension size {ext_len}, but expected size {_CRYPTO_EXT.size}")
        elif ext_type == C.EXT_BITMAPS:
            err = _check_bitmaps_ext(data, autoclear, cluster_size)
        exts.append(HeaderExtension(ext_type, data))
        if err is not None:
            return exts, table, err, False
        offset += (ext_len + 7) & ~7
    return exts, table, None, False


def _check_bitmaps_ext(data: bytes, autoclear: int, cluster_size: int) -> Qcow2Error | None:
    if len(data) != _BITMAPS_EXT.size:
        return FormatError("bitmaps_ext: Invalid extension length")
    if not autoclear & C.AUTOCLEAR_BITMAPS:
        return None     # stale: QEMU warns and ignores it
    nb, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(data)
    if reserved != 0:
        return FormatError("bitmaps_ext: Reserved field is not zero")
    if nb > C.QCOW_MAX_BITMAPS:
        return FormatError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported "
                           f"maximum of {C.QCOW_MAX_BITMAPS}")
    if nb == 0:
        return FormatError("found bitmaps extension with zero bitmaps")
    if dir_offset & (cluster_size - 1):
        return FormatError("bitmaps_ext: invalid bitmap directory offset")
    if dir_size > C.QCOW_MAX_BITMAP_DIRECTORY_SIZE:
        return FormatError(f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum "
                           f"supported size ({C.QCOW_MAX_BITMAP_DIRECTORY_SIZE})")
    return None


def _validate_table(offset: int, entries: int, entry_len: int, max_bytes: int, name: str,
                    cluster_size: int) -> None:
    if entries > max_bytes // entry_len:
        raise FormatError(f"{name} too large")
    if C.INT64_MAX - entries * entry_len < offset or offset & (cluster_size - 1):
        raise FormatError(f"{name} offset invalid")


def decode_header(buf: bytes, *, check: bool = False, no_io: bool = False) -> Header:
    """Decode and validate cluster 0.

    ``buf`` is the start of the file (at least cluster 0 when the file has it; 2 MiB
    is always enough). Missing bytes read as zeros, as QEMU's reads past EOF do.
    With ``check=True`` the validation is that of ``qemu-img check`` (QEMU's
    BDRV_O_CHECK open): a missing refcount table and a bad snapshot table location
    are left for the checker to report instead of refusing the image. With
    ``no_io=True`` (QEMU's BDRV_O_NO_IO, used by ``qemu-img info``) the external data
    file requirements are not enforced, since no data is going to be read.

    Order of the checks (the first failing one is reported, as by qemu-img 7.2): magic,
    version, cluster size, header length, backing file offset, compression type,
    unknown incompatible features, subcluster size, refcount width, refcount table,
    snapshot table location, L1 table, virtual size, encryption method, header
    extensions, backing file name, external data file, then (ours) encryption, which
    this library does not implement: crypt_method 1 or 2 raises
    :class:`UnsupportedError` ("... encryption is not supported ...") only once the
    rest of the header has been found valid.

    Raises :class:`NotQcow2Error` for a bad magic, :class:`UnsupportedError` for
    versions, features and encryption we do not handle, :class:`FormatError` for
    anything else, with qemu-img 7.2's message where it has one. Never raises
    anything but a :class:`Qcow2Error`. O(size of cluster 0).
    """
    try:
        return _decode_header(buf, check, no_io)
    except Qcow2Error:
        raise
    except Exception as exc:   # defensive: hostile input must never escape as another type
        raise FormatError(f"Invalid qcow2 header: {type(exc).__name__}: {exc}") from exc


def _decode_header(buf: bytes, check: bool, no_io: bool) -> Header:
    buf = bytes(buf)
    if len(buf) < KNOWN_HEADER_SIZE:
        buf = buf.ljust(KNOWN_HEADER_SIZE, b"\0")
    (magic, version, bfo, bfs, cluster_bits, size, crypt_method, l1_size, l1_off,
     rt_off, rt_clusters, nb_snapshots, snap_off) = HEADER_V2_STRUCT.unpack_from(buf, 0)
    if magic != C.QCOW_MAGIC_BYTES:
        raise NotQcow2Error("Image is not in qcow2 format")
    if version < 2 or version > 3:
        raise UnsupportedError(f"Unsupported qcow2 version {version}")
    if cluster_bits < C.MIN_CLUSTER_BITS or cluster_bits > C.MAX_CLUSTER_BITS:
        raise UnsupportedError(f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    if len(buf) < cluster_size:
        buf = buf.ljust(cluster_size, b"\0")

    compression_type = 0
    extra_header = b""
    if version == 2:
        incompat = compat = autoclear = 0
        refcount_order = 4
        header_length = C.V2_HEADER_LENGTH
    else:
        incompat, compat, autoclear, refcount_order, header_length = \
            HEADER_V3_STRUCT.unpack_from(buf, HEADER_V2_STRUCT.size)
        if header_length < C.V3_MIN_HEADER_LENGTH:
            raise FormatError("qcow2 header too short")
    if header_length > cluster_size:
        raise FormatError("qcow2 header exceeds cluster size")
    if version == 3:
        if header_length > _COMPRESSION_TYPE_OFFSET:
            compression_type = buf[_COMPRESSION_TYPE_OFFSET]
        if header_length > KNOWN_HEADER_SIZE:
            extra_header = buf[KNOWN_HEADER_SIZE:header_length]
    if bfo > cluster_size:
        raise FormatError("Invalid backing file offset")
    ext_end = bfo if bfo else cluster_size

    # Compression type: the field and the incompatible bit must agree.
    if compression_type > C.COMPRESSION_TYPE_ZSTD:
        raise UnsupportedError(f"qcow2: unknown compression type: {compression_type}")
    if compression_type != C.COMPRESSION_TYPE_ZLIB and not incompat & C.INCOMPAT_COMPRESSION:
        raise FormatError("qcow2: Compression type incompatible feature bit must be set")
    if compression_type == C.COMPRESSION_TYPE_ZLIB and incompat & C.INCOMPAT_COMPRESSION:
        raise FormatError("qcow2: Compression type incompatible feature bit must not be set")

    unknown_incompat = incompat & ~C.INCOMPAT_KNOWN
    if unknown_incompat:
        _, table, _, _ = _walk_extensions(buf, header_length, ext_end, crypt_method, autoclear,
                                          cluster_size)
        raise UnsupportedError(_unsupported_features_message(table, unknown_incompat))

    extended_l2 = bool(incompat & C.INCOMPAT_EXTL2)
    if extended_l2 and cluster_bits < C.MIN_CLUSTER_BITS_EXTENDED_L2:
        raise UnsupportedError(f"Unsupported subcluster size: {cluster_size // C.SUBCLUSTERS_PER_CLUSTER}")
    if refcount_order > C.MAX_REFCOUNT_ORDER:
        raise FormatError("Reference count entry width too large; may not exceed 64 bits")

    if rt_clusters == 0 and not check:
        raise FormatError("Image does not contain a reference count table")
    _validate_table(rt_off, rt_clusters, cluster_size, C.QCOW_MAX_REFTABLE_SIZE,
                    "Reference count table", cluster_size)
    if not check:
        _validate_table(snap_off, nb_snapshots, _SNAPSHOT_HEADER_SIZE,
                        _SNAPSHOT_HEADER_SIZE * C.QCOW_MAX_SNAPSHOTS, "Snapshot table", cluster_size)
    _validate_table(l1_off, l1_size, _L1E_SIZE, C.QCOW_MAX_L1_SIZE, "Active L1 table", cluster_size)
    shift = cluster_bits + cluster_bits - (4 if extended_l2 else 3)
    l1_needed = ((size + (1 << shift) - 1) & _U64) >> shift   # QEMU computes this in u64
    if l1_needed > _INT_MAX:
        raise FormatError("Image is too big")
    if l1_size < l1_needed:
        raise FormatError("L1 table is too small")
    if crypt_method > C.QCOW_CRYPT_LUKS:
        raise UnsupportedError(f"Unsupported encryption method {crypt_method}")

    exts, _, err, _ = _walk_extensions(buf, header_length, ext_end, crypt_method, autoclear,
                                       cluster_size)
    if err is not None:
        raise err

    backing_file = None
    if bfo:
        if bfs > min(C.QCOW_MAX_BACKING_FILE_NAME, cluster_size - bfo):
            raise FormatError("Backing file name too long")
        backing_file = buf[bfo:bfo + bfs].decode("utf-8", "surrogateescape")

    if not no_io:
        if incompat & C.INCOMPAT_DATA_FILE:
            if not any(e.type == C.EXT_DATA_FILE for e in exts):
                raise FormatError("'data-file' is required for this image")
        elif autoclear & C.AUTOCLEAR_DATA_FILE_RAW:
            raise FormatError("data-file-raw requires a data file")

    # QEMU keeps the size in 512-byte sectors as a signed 64-bit number of bytes.
    if size // C.SECTOR_SIZE > C.INT64_MAX // C.SECTOR_SIZE:
        raise FormatError("Could not refresh total sector count: File too large")

    if crypt_method != C.QCOW_CRYPT_NONE:
        kind = "AES" if crypt_method == C.QCOW_CRYPT_AES else "LUKS"
        raise UnsupportedError(f"qcow2 {kind} encryption is not supported "
                               f"(crypt_method={crypt_method})")

    return Header(
        version=version, backing_file_offset=bfo, backing_file_size=bfs,
        cluster_bits=cluster_bits, size=size, crypt_method=crypt_method, l1_size=l1_size,
        l1_table_offset=l1_off, refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters, nb_snapshots=nb_snapshots,
        snapshots_offset=snap_off, incompatible_features=incompat,
        compatible_features=compat, autoclear_features=autoclear,
        refcount_order=refcount_order, header_length=header_length,
        compression_type=compression_type, extra_header=bytes(extra_header),
        extensions=tuple(exts), backing_file=backing_file)


# -- encoding -------------------------------------------------------------------------------

def encode_header_fields(header: Header) -> bytes:
    """Serialise the header's fields only (``header_length`` bytes; 72 for version 2): what a
    writer rewrites in place when a field changes, leaving extensions and the backing file name
    untouched.  Raises :class:`FormatError` when a field cannot be stored."""
    h = header
    try:
        fixed = HEADER_V2_STRUCT.pack(
            C.QCOW_MAGIC_BYTES, h.version, h.backing_file_offset, h.backing_file_size,
            h.cluster_bits, h.size, h.crypt_method, h.l1_size, h.l1_table_offset,
            h.refcount_table_offset, h.refcount_table_clusters, h.nb_snapshots,
            h.snapshots_offset)
        if h.version == 2:
            if (h.incompatible_features or h.compatible_features or h.autoclear_features
                    or h.refcount_order != 4 or h.header_length != C.V2_HEADER_LENGTH
                    or h.compression_type or h.extra_header):
                raise FormatError("A version 2 header cannot store version 3 fields "
                                  f"(header_length={h.header_length}, refcount_order={h.refcount_order})")
            out = bytearray(fixed)
        else:
            if h.header_length < C.V3_MIN_HEADER_LENGTH:
                raise FormatError(f"header_length {h.header_length} is below {C.V3_MIN_HEADER_LENGTH}")
            out = bytearray(fixed + HEADER_V3_STRUCT.pack(
                h.incompatible_features, h.compatible_features, h.autoclear_features,
                h.refcount_order, h.header_length))
            if h.header_length > _COMPRESSION_TYPE_OFFSET:
                out += bytes((h.compression_type,))
            elif h.compression_type:
                raise FormatError(f"compression_type {h.compression_type} needs header_length > 104")
            known = min(h.header_length, KNOWN_HEADER_SIZE)
            out += bytes(known - len(out))
            if h.header_length > KNOWN_HEADER_SIZE:
                if len(h.extra_header) != h.header_length - KNOWN_HEADER_SIZE:
                    raise FormatError(f"extra_header is {len(h.extra_header)} bytes, header_length "
                                      f"{h.header_length} needs {h.header_length - KNOWN_HEADER_SIZE}")
                out += h.extra_header
            elif h.extra_header:
                raise FormatError("extra_header given but header_length leaves no room for it")
    except struct.error as exc:
        raise FormatError(f"Header field out of range: {exc}") from None
    return bytes(out)


def encode_header(header: Header) -> bytes:
    """Serialise a header: fields, extensions (each padded to 8), end marker, then the
    backing file name at ``backing_file_offset`` (zero fill in between).

    The end marker is left out only when the extensions exactly fill the space before
    the backing file name (or the cluster), as a decoded header of that shape had none.
    Raises :class:`FormatError` when the fields cannot be stored (out of range, or the
    pieces do not fit in cluster 0 / overlap). O(size of the result).
    """
    h = header
    out = bytearray(encode_header_fields(h))
    cluster_size = 1 << h.cluster_bits
    ext_end = h.backing_file_offset or cluster_size
    for ext in h.extensions:
        if not 0 < ext.type <= 0xFFFFFFFF:
            raise FormatError(f"Invalid header extension type 0x{ext.type:x}")
        out += _EXT_HDR.pack(ext.type, len(ext.data)) + ext.data
        out += bytes(-len(ext.data) % 8)      # padded relative to the extension, as read
    if len(out) < ext_end:
        out += _EXT_HDR.pack(C.EXT_END, 0)
    if len(out) > ext_end and h.extensions:
        raise FormatError(f"Header extensions end at 0x{len(out):x}, past "
                          f"{'the backing file name' if h.backing_file_offset else 'cluster 0'} "
                          f"(0x{ext_end:x})")
    if h.backing_file is not None:
        name = _encode_str(h.backing_file)
        if not h.backing_file_offset or len(name) != h.backing_file_size:
            raise FormatError(f"backing_file_offset 0x{h.backing_file_offset:x} / backing_file_size "
                              f"{h.backing_file_size} do not describe the backing file name "
                              f"({len(name)} bytes)")
        if h.backing_file_offset + len(name) > cluster_size:
            raise FormatError("Backing file name too long")
        if h.backing_file_offset < len(out):
            raise FormatError(f"backing_file_offset 0x{h.backing_file_offset:x} overlaps the header")
        out += bytes(h.backing_file_offset - len(out)) + name
    elif h.backing_file_offset:
        raise FormatError(f"backing_file_offset 0x{h.backing_file_offset:x} set without a backing_file")
    return bytes(out)
