"""Header codec: qemu-img-made images round-trip byte for byte, valid headers round-trip
through encode/decode, and every validation message is qemu-img 7.2's (each bad header
is shown to qemu-img AND to decode_header, and both must say the same thing)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

import codec_images
import qemu
from qcow2 import constants as C
from qcow2.errors import FormatError, NotQcow2Error, UnsupportedError
from qcow2.header import (FeatureName, Header, HeaderExtension, decode_feature_table, decode_header,
                          default_feature_table, encode_feature_table, encode_header)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return codec_images.build_all(tmp_path_factory.mktemp("hdr"))


# -- images made by qemu-img -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(codec_images.SPECS))
def test_qemu_image_round_trips_byte_for_byte(images, name):
    raw = codec_images.read_head(images[name])
    header = decode_header(raw)
    encoded = encode_header(header)
    assert encoded == raw[:len(encoded)]
    assert decode_header(encoded) == header
    header._check()


@pytest.mark.parametrize("name", sorted(codec_images.SPECS))
def test_qemu_image_fields_match_qemu_img_info(images, name):
    header = decode_header(codec_images.read_head(images[name]))
    info = qemu.info_json(images[name])
    spec = info["format-specific"]["data"]
    assert header.size == info["virtual-size"]
    assert header.cluster_size == info["cluster-size"]
    assert {"0.10": 2, "1.1": 3}[spec["compat"]] == header.version
    assert header.backing_file == info.get("backing-filename")
    assert header.backing_format == info.get("backing-filename-format")
    if header.version == 3:
        assert header.refcount_bits == spec["refcount-bits"]
        assert header.lazy_refcounts == spec["lazy-refcounts"]
        assert header.extended_l2 == spec.get("extended-l2", False)
        assert header.compression_type_name == spec["compression-type"]
        assert header.data_file == spec.get("data-file")
        assert header.data_file_raw == spec.get("data-file-raw", False)
        assert header.corrupt == spec["corrupt"]
        names = [b["name"] for b in spec.get("bitmaps", [])]
        if names:
            assert header.bitmaps is not None and header.bitmaps.nb_bitmaps == len(names)
        else:
            assert header.bitmaps is None
    assert header.nb_snapshots == len(info.get("snapshots", []))
    assert header.l1_size >= header.nb_l1_entries_needed


def test_derived_values_of_extended_l2(images):
    h = decode_header(codec_images.read_head(images["extended_l2"]))
    assert h.l2_entry_size == 16 and h.l2_entries == 4096 and h.subcluster_size == 2048
    h = decode_header(codec_images.read_head(images["v3"]))
    assert h.l2_entry_size == 8 and h.l2_entries == 8192 and h.subcluster_size == 65536
    assert h.nb_l1_entries_needed == 1 and h.refcount_block_entries == 32768


def test_default_feature_table_is_what_qemu_writes(images):
    header = decode_header(codec_images.read_head(images["v3"]))
    assert header.feature_names == default_feature_table()
    assert encode_feature_table(default_feature_table()) == header.extension(C.EXT_FEATURE_TABLE).data
    assert [f.name for f in default_feature_table()] == [
        "dirty bit", "corrupt bit", "external data file", "compression type",
        "extended L2 entries", "lazy refcounts", "bitmaps", "raw external data"]


def test_feature_table_round_trip_and_limits():
    names = (FeatureName(0, 9, "nine"), FeatureName(2, 63, "x" * 46))
    assert decode_feature_table(encode_feature_table(names)) == names
    assert decode_feature_table(encode_feature_table(names) + b"\1\2partial") == names
    with pytest.raises(FormatError):
        encode_feature_table([FeatureName(0, 1, "y" * 47)])


# -- every validation message, against qemu-img 7.2 --------------------------------------------

FT = 0x70   # where qemu-img 7.2 puts the first extension (header_length 112)


def _ext(ext_type, payload, declared_len=None):
    n = len(payload) if declared_len is None else declared_len
    body = struct.pack(">II", ext_type, n) + payload
    return body + bytes(-len(body) % 8) + bytes(8)


def _bitmaps_ext(nb, reserved, size, offset):
    return _ext(C.EXT_BITMAPS, struct.pack(">IIQQ", nb, reserved, size, offset))


_NAMED_TABLE = _ext(C.EXT_FEATURE_TABLE, bytes([0, 9]) + b"nine".ljust(46, b"\0")
                    + bytes([1, 5]) + b"compat five".ljust(46, b"\0"))

# (id, image, pokes, message, exception class, open with I/O)
BAD_HEADERS = [
    ("magic", "v3", [(">I", 0, 0x12345678)], "Image is not in qcow2 format", NotQcow2Error, False),
    ("version4", "v3", [(">I", 4, 4)], "Unsupported qcow2 version 4", UnsupportedError, False),
    ("version1", "v3", [(">I", 4, 1)], "Unsupported qcow2 version 1", UnsupportedError, False),
    ("cluster_bits8", "v3", [(">I", 20, 8)], "Unsupported cluster size: 2^8", UnsupportedError, False),
    ("cluster_bits22", "v3", [(">I", 20, 22)], "Unsupported cluster size: 2^22", UnsupportedError, False),
    ("header_short", "v3", [(">I", 100, 100)], "qcow2 header too short", FormatError, False),
    ("header_exceeds", "v3", [(">I", 100, 0x10008)], "qcow2 header exceeds cluster size", FormatError, False),
    ("backing_offset", "v3", [(">Q", 8, 0x10001)], "Invalid backing file offset", FormatError, False),
    ("compression_unknown", "v3", [("B", 104, 2)], "qcow2: unknown compression type: 2",
     UnsupportedError, False),
    ("compression_no_bit", "v3", [("B", 104, 1)],
     "qcow2: Compression type incompatible feature bit must be set", FormatError, False),
    ("compression_bit_only", "v3", [(">Q", 72, C.INCOMPAT_COMPRESSION)],
     "qcow2: Compression type incompatible feature bit must not be set", FormatError, False),
    ("compression_before_features", "v3", [("B", 104, 2), (">Q", 72, 1 << 8 | C.INCOMPAT_COMPRESSION)],
     "qcow2: unknown compression type: 2", UnsupportedError, False),
    ("unknown_incompat", "v3", [(">Q", 72, 1 << 5)],
     "Unsupported qcow2 feature(s): Unknown incompatible feature: 20", UnsupportedError, False),
    ("unknown_incompat_63", "v3", [(">Q", 72, (1 << 63) | (1 << 5) | 1)],
     "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000020",
     UnsupportedError, False),
    ("incompat_named_by_table", "v3", [(">Q", 72, (1 << 5) | (1 << 9)), ("B", FT + 8 + 48 * 4 + 1, 5)],
     "Unsupported qcow2 feature(s): extended L2 entries, Unknown incompatible feature: 200",
     UnsupportedError, False),
    ("incompat_own_table", "v3", [(">Q", 72, (1 << 9) | (1 << 5)), ("raw", FT, _NAMED_TABLE)],
     "Unsupported qcow2 feature(s): nine, Unknown incompatible feature: 20", UnsupportedError, False),
    ("subcluster_size", "extended_l2", [(">I", 20, 13)], "Unsupported subcluster size: 256",
     UnsupportedError, False),
    ("refcount_order", "v3", [(">I", 96, 7)],
     "Reference count entry width too large; may not exceed 64 bits", FormatError, False),
    ("no_reftable", "v3", [(">I", 56, 0)], "Image does not contain a reference count table",
     FormatError, False),
    ("reftable_large", "v3", [(">I", 56, 129)], "Reference count table too large", FormatError, False),
    ("reftable_unaligned", "v3", [(">Q", 48, 0x10200)], "Reference count table offset invalid",
     FormatError, False),
    ("reftable_int64", "v3", [(">Q", 48, (1 << 63) - 0x10000)], "Reference count table offset invalid",
     FormatError, False),
    ("snapshots_many", "v3", [(">I", 60, 65537)], "Snapshot table too large", FormatError, False),
    ("snapshots_unaligned", "v3", [(">I", 60, 1), (">Q", 64, 0x200)], "Snapshot table offset invalid",
     FormatError, False),
    ("l1_large", "v3", [(">I", 36, 4 * 1024 * 1024 + 1)], "Active L1 table too large", FormatError, False),
    ("l1_unaligned", "v3", [(">Q", 40, 0x30008)], "Active L1 table offset invalid", FormatError, False),
    ("too_big", "v3", [(">Q", 24, 1 << 62)], "Image is too big", FormatError, False),
    ("l1_small", "v3", [(">I", 36, 0)], "L1 table is too small", FormatError, False),
    ("l1_small_v2", "v2", [(">Q", 24, 1 << 40)], "L1 table is too small", FormatError, False),
    ("encryption_method", "v3", [(">I", 32, 3)], "Unsupported encryption method 3", UnsupportedError, False),
    ("encryption_method_after_l1", "v3", [(">I", 32, 3), (">I", 36, 0)], "L1 table is too small",
     FormatError, False),
    ("encryption_method_before_ext", "v3", [(">I", 32, 3), (">I", FT + 4, 0x10000)],
     "Unsupported encryption method 3", UnsupportedError, False),
    ("extension_large", "v3", [(">I", FT + 4, 0x10000)], "Header extension too large", FormatError, False),
    ("extension_large_v2", "backing_v2", [(">I", 72 + 4, 0x1000)], "Header extension too large",
     FormatError, False),
    ("backing_format_long", "v3", [("raw", FT, _ext(C.EXT_BACKING_FORMAT, b"q" * 16))],
     "ERROR: ext_backing_format: len=16 too large (>=16)", FormatError, False),
    ("crypto_ext_no_luks", "v3", [("raw", FT, _ext(C.EXT_CRYPTO_HEADER, bytes(16)))],
     "CRYPTO header extension only expected with LUKS encryption method", FormatError, False),
    ("bitmaps_ext_len", "v3", [("raw", FT, _ext(C.EXT_BITMAPS, bytes(23)))],
     "bitmaps_ext: Invalid extension length", FormatError, False),
    ("bitmaps_reserved", "v3", [(">Q", 88, 1), ("raw", FT, _bitmaps_ext(1, 1, 8, 0x50000))],
     "bitmaps_ext: Reserved field is not zero", FormatError, False),
    ("bitmaps_many", "v3", [(">Q", 88, 1), ("raw", FT, _bitmaps_ext(65536, 0, 8, 0x50000))],
     "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535",
     FormatError, False),
    ("bitmaps_zero", "v3", [(">Q", 88, 1), ("raw", FT, _bitmaps_ext(0, 0, 8, 0x50000))],
     "found bitmaps extension with zero bitmaps", FormatError, False),
    ("bitmaps_unaligned", "v3", [(">Q", 88, 1), ("raw", FT, _bitmaps_ext(1, 0, 8, 0x50008))],
     "bitmaps_ext: invalid bitmap directory offset", FormatError, False),
    ("bitmaps_dir_size", "v3", [(">Q", 88, 1), ("raw", FT, _bitmaps_ext(1, 0, 1024 * 65535 + 1, 0x50000))],
     "bitmaps_ext: bitmap directory size (67107841) exceeds the maximum supported size (67107840)",
     FormatError, False),
    ("backing_name_long", "v3", [(">Q", 8, 0x1000), (">I", 16, 1024)], "Backing file name too long",
     FormatError, False),
    ("backing_name_past_cluster", "v3", [(">Q", 8, 0xFF00), (">I", 16, 0x101)],
     "Backing file name too long", FormatError, False),
    ("data_file_missing", "v3", [(">Q", 72, C.INCOMPAT_DATA_FILE)],
     "'data-file' is required for this image", FormatError, True),
    ("data_file_raw_alone", "v3", [(">Q", 88, C.AUTOCLEAR_DATA_FILE_RAW)],
     "data-file-raw requires a data file", FormatError, True),
    ("size_sectors", "v3", [(">Q", 24, (1 << 64) - (1 << 29) + 1)],
     "Could not refresh total sector count: File too large", FormatError, False),
]


@pytest.mark.parametrize("case", BAD_HEADERS, ids=[c[0] for c in BAD_HEADERS])
def test_validation_message_is_qemu_img_7_2s(images, tmp_path, case):
    name, base, pokes, message, exc_class, io = case
    path = str(tmp_path / f"{name}.qcow2")
    raw = codec_images.poke(images[base], path, pokes)
    assert message in codec_images.qemu_open_error(path, io=io)
    with pytest.raises(exc_class) as info:
        decode_header(raw)
    assert str(info.value) == message


def test_data_file_checks_are_skipped_without_io(images, tmp_path):
    """qemu-img info (BDRV_O_NO_IO) opens these; so does decode_header(no_io=True)."""
    for pokes in ([(">Q", 72, C.INCOMPAT_DATA_FILE)], [(">Q", 88, C.AUTOCLEAR_DATA_FILE_RAW)]):
        path = str(tmp_path / "x.qcow2")
        raw = codec_images.poke(images["v3"], path, pokes)
        assert codec_images.qemu_open_error(path, io=False) == ""
        assert decode_header(raw, no_io=True).size == 64 << 20


def test_check_mode_leaves_reftable_and_snapshot_table_to_the_checker(images, tmp_path):
    raw = codec_images.poke(images["v3"], str(tmp_path / "a"), [(">I", 56, 0)])
    assert decode_header(raw, check=True).refcount_table_clusters == 0
    raw = codec_images.poke(images["v3"], str(tmp_path / "b"), [(">I", 60, 65537)])
    assert decode_header(raw, check=True).nb_snapshots == 65537
    # the other limits stay enforced in check mode
    raw = codec_images.poke(images["v3"], str(tmp_path / "c"), [(">I", 36, 0)])
    with pytest.raises(FormatError, match="L1 table is too small"):
        decode_header(raw, check=True)


def test_stale_bitmaps_extension_is_ignored_like_qemu(images, tmp_path):
    path = str(tmp_path / "stale.qcow2")
    raw = codec_images.poke(images["v3"], path, [("raw", FT, _bitmaps_ext(0, 0, 0, 1))])
    assert "considered inconsistent" in qemu.qemu_img("info", "-f", "qcow2", path).stderr
    header = decode_header(raw)
    assert header.bitmaps is None and header.stale_bitmaps
    assert header.bitmaps_extension.nb_bitmaps == 0


@pytest.mark.parametrize("fmt", ["aes", "luks"])
def test_encrypted_images_are_refused(tmp_path, fmt):
    path = qemu.create_encrypted(tmp_path / f"{fmt}.qcow2", fmt)
    raw = codec_images.read_head(path)
    assert raw[32:36] == struct.pack(">I", 1 if fmt == "aes" else 2)
    with pytest.raises(UnsupportedError, match="encryption is not supported"):
        decode_header(raw)


def test_short_buffers_read_as_zeros():
    with pytest.raises(NotQcow2Error):
        decode_header(b"")
    with pytest.raises(UnsupportedError, match="Unsupported qcow2 version 0"):
        decode_header(b"QFI\xfb")


def test_header_length_between_104_and_112_keeps_compression_type(images, tmp_path):
    path = str(tmp_path / "h105.qcow2")
    raw = codec_images.poke(images["zstd"], path, [(">I", 100, 105)])
    assert codec_images.qemu_open_error(path) == ""
    header = decode_header(raw)
    assert header.header_length == 105 and header.compression_type == 1
    assert header.feature_names == ()          # the extension chain now starts at byte 105
    assert decode_header(encode_header(header)) == header


def test_unknown_extension_and_extra_header_are_preserved(images):
    base = decode_header(codec_images.read_head(images["v3"]))
    header = base.replace(header_length=128, extra_header=bytes(range(16)),
                          extensions=base.extensions + (HeaderExtension(0x12345678, b"abc"),))
    again = decode_header(encode_header(header))
    assert again == header
    assert again.extension(0x12345678).data == b"abc"


def test_encode_refuses_inconsistent_headers(images):
    base = decode_header(codec_images.read_head(images["v3"]))
    with pytest.raises(FormatError):
        encode_header(base.replace(backing_file="x"))                   # no offset
    with pytest.raises(FormatError):
        encode_header(base.replace(version=2, header_length=72, refcount_order=1))  # v3 field on v2
    with pytest.raises(FormatError):
        encode_header(base.replace(header_length=120))                  # extra_header missing
    with pytest.raises(FormatError):
        encode_header(base.replace(size=1 << 64))


# -- Hypothesis: valid headers round-trip ------------------------------------------------------

_KNOWN_EXT = {C.EXT_END, C.EXT_BACKING_FORMAT, C.EXT_FEATURE_TABLE, C.EXT_BITMAPS,
              C.EXT_CRYPTO_HEADER, C.EXT_DATA_FILE}
_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=12)


@st.composite
def valid_headers(draw) -> Header:
    version = draw(st.sampled_from([2, 3]))
    extended = version == 3 and draw(st.booleans())
    cluster_bits = draw(st.integers(14 if extended else 9, 21))
    cluster_size = 1 << cluster_bits
    l2_bits = cluster_bits - (4 if extended else 3)
    max_l1 = C.QCOW_MAX_L1_SIZE // 8
    size = draw(st.integers(0, min(max_l1 << (cluster_bits + l2_bits), 1 << 62)))
    needed = (size + (1 << (cluster_bits + l2_bits)) - 1) >> (cluster_bits + l2_bits)
    l1_size = draw(st.integers(needed, max_l1))
    offset = st.integers(0, (1 << (56 - cluster_bits)) - 1).map(lambda n: n * cluster_size)
    rt_clusters = draw(st.integers(1, C.QCOW_MAX_REFTABLE_SIZE // cluster_size))
    nb_snapshots = draw(st.integers(0, C.QCOW_MAX_SNAPSHOTS))
    fields = dict(version=version, cluster_bits=cluster_bits, size=size, crypt_method=0,
                  l1_size=l1_size, l1_table_offset=draw(offset), refcount_table_offset=draw(offset),
                  refcount_table_clusters=rt_clusters, nb_snapshots=nb_snapshots,
                  snapshots_offset=draw(offset))
    exts = []
    incompat = compat = autoclear = 0
    header_length = 72
    compression_type = 0
    extra = b""
    refcount_order = 4
    if version == 3:
        refcount_order = draw(st.integers(0, 6))
        compression_type = draw(st.integers(0, 1))
        incompat = draw(st.sampled_from([0, 1, 2, 3])) | (C.INCOMPAT_EXTL2 if extended else 0)
        incompat |= C.INCOMPAT_COMPRESSION if compression_type else 0
        compat = draw(st.integers(0, 2 ** 64 - 1))
        autoclear = draw(st.integers(0, 2 ** 64 - 1)) & ~C.AUTOCLEAR_DATA_FILE_RAW
        header_length = draw(st.sampled_from([104, 105, 108, 112, 120, 136]))
        if header_length == 104:
            compression_type = 0
            incompat &= ~C.INCOMPAT_COMPRESSION
        extra = draw(st.binary(min_size=max(0, header_length - 112), max_size=max(0, header_length - 112)))
        if draw(st.booleans()):
            exts.append(HeaderExtension(C.EXT_DATA_FILE, draw(_names).encode()))
            incompat |= C.INCOMPAT_DATA_FILE
            if draw(st.booleans()):
                autoclear |= C.AUTOCLEAR_DATA_FILE_RAW
        if autoclear & C.AUTOCLEAR_BITMAPS and draw(st.booleans()):
            exts.append(HeaderExtension(C.EXT_BITMAPS, struct.pack(
                ">IIQQ", draw(st.integers(1, C.QCOW_MAX_BITMAPS)), 0,
                draw(st.integers(0, C.QCOW_MAX_BITMAP_DIRECTORY_SIZE)), draw(offset))))
    if draw(st.booleans()):
        exts.append(HeaderExtension(C.EXT_BACKING_FORMAT, draw(_names).encode()))
    for _ in range(draw(st.integers(0, 2))):
        ext_type = draw(st.integers(1, 2 ** 32 - 1).filter(lambda t: t not in _KNOWN_EXT))
        exts.append(HeaderExtension(ext_type, draw(st.binary(max_size=20))))
    if draw(st.booleans()):
        exts.append(HeaderExtension(C.EXT_FEATURE_TABLE, encode_feature_table(default_feature_table()[:2])))
    exts = draw(st.permutations(exts))
    used = header_length + sum(8 + ((len(e.data) + 7) & ~7) for e in exts) + 8
    backing = None
    bfo = bfs = 0
    if draw(st.booleans()):
        backing = draw(_names)
        bfo = used + draw(st.integers(0, 16))
        bfs = len(backing.encode())
        used = bfo + bfs
    if used > cluster_size:
        exts, backing, bfo, bfs = [], None, 0, 0
        if incompat & C.INCOMPAT_DATA_FILE:
            incompat &= ~C.INCOMPAT_DATA_FILE
            autoclear &= ~C.AUTOCLEAR_DATA_FILE_RAW
        if header_length + 8 > cluster_size:
            header_length, extra = 104, b""
            compression_type = 0
            incompat &= ~C.INCOMPAT_COMPRESSION
    return Header(**fields, backing_file_offset=bfo, backing_file_size=bfs,
                  incompatible_features=incompat, compatible_features=compat,
                  autoclear_features=autoclear, refcount_order=refcount_order,
                  header_length=header_length, compression_type=compression_type,
                  extra_header=extra, extensions=tuple(exts), backing_file=backing)


@given(valid_headers())
def test_valid_headers_round_trip(header):
    encoded = encode_header(header)
    assert len(encoded) <= header.cluster_size
    assert decode_header(encoded) == header
    assert encode_header(decode_header(encoded)) == encoded


@given(valid_headers(), st.binary(min_size=0, max_size=64))
def test_bytes_after_the_end_marker_are_ignored(header, junk):
    encoded = encode_header(header)
    if header.backing_file is None and len(encoded) + len(junk) <= header.cluster_size:
        assert decode_header(encoded + junk) == header
