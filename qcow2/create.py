"""Creating images: ``qcow2.create`` and the engine of ``qcow2-tool create``.

Theory of operation
-------------------
Options are validated first, all of them, with qemu-img 7.2's messages; nothing is written for a
bad combination.  Then the file is laid out as qemu-img lays it out: the header (with the backing
format, data file and feature name table extensions, and the backing file name) in cluster 0, a
one-cluster refcount table in cluster 1 and one refcount block in cluster 2 counting those three.
The image is then opened ``"r+"`` and given its size by the writer, so the L1 table and every
refcount block and table growth go through the same allocator, guard and crash order as any later
write.  Preallocation (``metadata``: every L2 table and data cluster mapped; ``falloc``: and
reserved on the host; ``full``: and written with zeros) is done the same way, one L2 table at a
time with slice assignments, so a terabyte image costs seconds and bounded memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import constants as C
from .errors import BackingError, Qcow2Error, RequestError
from .header import FeatureName, Header, HeaderExtension, encode_feature_table, encode_header
from .storage import Storage
from .tables import encode_refblock, encode_u64_table

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
COMPAT_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_V3_HEADER_LENGTH = 112
_FEATURE_TABLE_MIN_CLUSTER = 8192   # qemu-img 7.2 leaves the table out of smaller clusters


@dataclass(frozen=True)
class CreateOptions:
    """Validated creation options (``qemu-img create -o`` names)."""

    size: int
    cluster_size: int = 65536
    version: int = 3
    refcount_bits: int = 16
    lazy_refcounts: bool = False
    extended_l2: bool = False
    compression_type: str = "zlib"
    preallocation: str = "off"
    backing_file: str | None = None
    backing_fmt: str | None = None
    data_file: str | None = None
    data_file_raw: bool = False


def validate(size: int, *, cluster_size: int = 65536, compat: str = "1.1", refcount_bits: int = 16,
             lazy_refcounts: bool = False, extended_l2: bool = False,
             compression_type: str = "zlib", preallocation: str = "off",
             backing_file: str | None = None, backing_fmt: str | None = None,
             data_file: str | None = None, data_file_raw: bool = False) -> CreateOptions:
    """Check every option and combination as qemu-img 7.2 does (its messages, its order);
    raises :class:`~qcow2.errors.RequestError`."""
    if compat not in COMPAT_VERSIONS:
        raise RequestError(f"Parameter 'version' does not accept value '{compat}'")
    version = COMPAT_VERSIONS[compat]
    if compression_type not in C.COMPRESSION_TYPE_NAMES.values():
        raise RequestError(f"Parameter 'compression-type' does not accept value "
                           f"'{compression_type}'")
    if preallocation not in PREALLOCATION_MODES:
        raise RequestError(f"Parameter 'preallocation' does not accept value '{preallocation}'")
    if not 0 <= size <= C.INT64_MAX:
        raise RequestError("Invalid image size specified. Must be between 0 and "
                           "9223372036854775807.")
    if cluster_size < 512 or cluster_size > 2 << 20 or cluster_size & (cluster_size - 1):
        raise RequestError("Cluster size must be a power of two between 512 and 2048k")
    v3 = " (use version=v3 or greater)"
    if version < 3 and lazy_refcounts:
        raise RequestError("Lazy refcounts only supported with compatibility level 1.1 and "
                           "above" + v3)
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise RequestError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise RequestError("Different refcount widths than 16 bits require compatibility level "
                           "1.1 or above" + v3)
    if backing_file is not None and preallocation != "off" and not extended_l2:
        raise RequestError("Backing file and preallocation can only be used at the same time if "
                           "extended_l2 is on")
    if data_file is not None and version < 3:
        raise RequestError("External data files are only supported with compatibility level 1.1 "
                           "and above" + v3)
    if data_file_raw and data_file is None:
        raise RequestError("data-file-raw requires data-file")
    if data_file_raw and backing_file is not None:
        raise RequestError("Backing file and data-file-raw cannot be used at the same time")
    if compression_type != "zlib" and version < 3:
        raise RequestError("Non-zlib compression type is only supported with compatibility "
                           "level 1.1 and above" + v3)
    if extended_l2:
        if version < 3:
            raise RequestError("Extended L2 entries are only supported with compatibility level "
                               "1.1 and above" + v3)
        if cluster_size < 1 << C.MIN_CLUSTER_BITS_EXTENDED_L2:
            raise RequestError("Extended L2 entries are only supported with cluster sizes of at "
                               "least 16384 bytes")
    size = -(-size // C.SECTOR_SIZE) * C.SECTOR_SIZE     # qemu-img rounds up to sectors
    return CreateOptions(size, cluster_size, version, refcount_bits, lazy_refcounts, extended_l2,
                         compression_type, preallocation, backing_file, backing_fmt, data_file,
                         data_file_raw)


def _header(o: CreateOptions) -> bytes:
    """Cluster 0 of a fresh image (size 0, no L1 yet; the writer gives it its size)."""
    cluster_bits = o.cluster_size.bit_length() - 1
    exts = []
    if o.backing_fmt is not None and o.backing_file is not None:
        exts.append(HeaderExtension(C.EXT_BACKING_FORMAT, o.backing_fmt.encode()))
    if o.data_file is not None:
        exts.append(HeaderExtension(C.EXT_DATA_FILE, o.data_file.encode()))
    incompat = compat = autoclear = 0
    if o.version >= 3:
        if o.cluster_size >= _FEATURE_TABLE_MIN_CLUSTER:
            exts.append(HeaderExtension(C.EXT_FEATURE_TABLE, encode_feature_table(_features())))
        incompat = ((C.INCOMPAT_DATA_FILE if o.data_file is not None else 0)
                    | (C.INCOMPAT_COMPRESSION if o.compression_type != "zlib" else 0)
                    | (C.INCOMPAT_EXTL2 if o.extended_l2 else 0))
        compat = C.COMPAT_LAZY_REFCOUNTS if o.lazy_refcounts else 0
        autoclear = C.AUTOCLEAR_DATA_FILE_RAW if o.data_file_raw else 0
    ctype = 0 if o.compression_type == "zlib" else C.COMPRESSION_TYPE_ZSTD
    header = Header(
        version=o.version, backing_file_offset=0, backing_file_size=0, cluster_bits=cluster_bits,
        size=0, crypt_method=0, l1_size=0, l1_table_offset=0,
        refcount_table_offset=o.cluster_size, refcount_table_clusters=1, nb_snapshots=0,
        snapshots_offset=0, incompatible_features=incompat, compatible_features=compat,
        autoclear_features=autoclear, refcount_order=o.refcount_bits.bit_length() - 1,
        header_length=_V3_HEADER_LENGTH if o.version >= 3 else C.V2_HEADER_LENGTH,
        compression_type=ctype, extensions=tuple(exts))
    if o.backing_file is not None:
        name = o.backing_file.encode()
        if len(name) > C.QCOW_MAX_BACKING_FILE_NAME:
            raise RequestError("Backing file name too long")
        offset = len(encode_header(header))
        header = header.replace(backing_file_offset=offset, backing_file_size=len(name),
                                backing_file=o.backing_file)
    return encode_header(header)


def _features() -> tuple[FeatureName, ...]:
    from .header import default_feature_table
    return default_feature_table()


def backing_size(image_path: str, backing_file: str, backing_fmt: str | None) -> int:
    """Virtual size of a backing file named as it will be stored (relative to the image's
    directory), for ``create`` without a size (a raw file counts whole sectors)."""
    from .image import _relative_to, open_layer
    path = _relative_to(image_path, backing_file)
    try:
        layer = open_layer(path, backing_fmt)
    except Qcow2Error as e:
        raise BackingError(f"{e}\nCould not open backing image.") from None
    try:
        return layer.size
    finally:
        layer.close()


def create_image_file(path: str, size: int | None, **options) -> CreateOptions:
    """Write a new qcow2 image (and its external data file); returns the validated options.

    ``size`` None takes the backing file's size.  An existing file is truncated, as qemu-img
    does.  On failure the files this call created are removed."""
    unsafe = options.pop("unsafe", False)
    cache = options.pop("cache", "writeback")
    if size is None:
        backing = options.get("backing_file")
        if backing is None or unsafe:
            raise RequestError("Image creation needs a size parameter")
        size = backing_size(path, backing, options.get("backing_fmt"))
    elif options.get("backing_file") is not None and not unsafe:
        backing_size(path, options["backing_file"], options.get("backing_fmt"))  # must open
    o = validate(size, **options)
    head = _header(o)
    created = []
    try:
        if o.data_file is not None:
            _make_data_file(path, o)
            created.append(o.data_file)
        created.append(path)
        _write_skeleton(path, o, head)
        _give_size(path, o, cache)
    except BaseException:
        for name in created:
            try:
                os.unlink(name)
            except OSError:
                pass
        raise
    return o


def _make_data_file(path: str, o: CreateOptions) -> None:
    # QEMU opens a relative data file name relative to the working directory
    data = Storage(o.data_file, create=True, what="data file")
    try:
        data.truncate(0)
        data.truncate(o.size)
    finally:
        data.close()


def _write_skeleton(path: str, o: CreateOptions, head: bytes) -> None:
    cs = o.cluster_size
    order = o.refcount_bits.bit_length() - 1
    file = Storage(path, create=True)
    try:
        file.truncate(0)
        reftable = encode_u64_table([2 * cs]).ljust(cs, b"\0")
        counts = [0] * ((cs * 8) >> order)
        counts[0:3] = [1, 1, 1]
        file.pwrite(head.ljust(cs, b"\0") + reftable + encode_refblock(counts, order), 0)
    finally:
        file.close()


#: The block layer's largest disk (INT64_MAX aligned down to 1 GiB), as QEMU 7.2 has it.
_MAX_LENGTH = C.INT64_MAX & ~((1 << 30) - 1)


def _check_size_fits(o: CreateOptions) -> None:
    """Refuse, in qemu-img's words, a size the block layer or the L1 table cannot hold (it is
    said after the "Formatting" line, as qemu-img says it)."""
    if o.size > C.INT64_MAX:           # the size rounded up to a sector went past 2^63 - 1
        raise RequestError("Could not resize image: Image size cannot be negative")
    if o.size > _MAX_LENGTH:
        raise RequestError(f"Could not resize image: offset({o.size}) exceeds "
                           f"maximum({_MAX_LENGTH})")
    entry_size = 16 if o.extended_l2 else 8
    span = o.cluster_size * (o.cluster_size // entry_size)
    if -(-o.size // span) > C.QCOW_MAX_L1_SIZE // 8:
        raise RequestError("The image size is too large for file format 'qcow2' (try using a "
                           "larger cluster size)")


def _give_size(path: str, o: CreateOptions, cache: str) -> None:
    """Open the skeleton read-write and let the writer allocate the L1 table and preallocate."""
    from .image import Image
    _check_size_fits(o)
    img = Image(path, "r+", open_backing=False, overlap_check="cached", cache=cache,
                _layer_only=True)
    try:
        with img._lock:
            img._writer.resize(o.size, False, hide_backing=False, preallocation=o.preallocation)
        img.flush()
    finally:
        img.close()


def create(path: str, size: int | None, *, cluster_size: int = 65536, compat: str = "1.1",
           refcount_bits: int = 16, lazy_refcounts: bool = False, extended_l2: bool = False,
           compression_type: str = "zlib", preallocation: str = "off",
           backing_file: str | None = None, backing_fmt: str | None = None,
           data_file: str | None = None, data_file_raw: bool = False, **open_options):
    """Create a qcow2 image and return it open ``"r+"`` (an :class:`~qcow2.image.Image`).

    Options are qemu-img create's for qcow2 (``compat`` "0.10"/"1.1"/"v2"/"v3", ``preallocation``
    "off"/"metadata"/"falloc"/"full", ...); an invalid value or combination raises
    :class:`~qcow2.errors.RequestError` with qemu-img's message and writes nothing.  ``size`` None
    takes the backing file's size.  ``open_options`` go to :func:`qcow2.open`.
    """
    from .image import Image
    create_image_file(path, size, cluster_size=cluster_size, compat=compat,
                      refcount_bits=refcount_bits, lazy_refcounts=lazy_refcounts,
                      extended_l2=extended_l2, compression_type=compression_type,
                      preallocation=preallocation, backing_file=backing_file,
                      backing_fmt=backing_fmt, data_file=data_file, data_file_raw=data_file_raw,
                      cache=open_options.get("cache", "writeback"))
    return Image(path, "r+", **open_options)
