"""Bitmap directory codec: qemu-img-made directories round-trip and agree with qemu-img
info; generated directories round-trip; QEMU's structural checks."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

import qemu
from qcow2.bitmap import (BME_FLAG_AUTO, BME_FLAG_IN_USE, BitmapDirectoryEntry, bitmap_directory_size,
                          decode_bitmap_directory, decode_bitmap_table, encode_bitmap_directory)
from qcow2.errors import FormatError, RequestError
from qcow2.header import decode_header
from qcow2.tables import encode_u64_table


@pytest.fixture(scope="module")
def bitmap_image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bm") / "bm.qcow2")
    qemu.create(path, "64M")
    qemu.qemu_img("bitmap", "--add", path, "b0")
    qemu.qemu_img("bitmap", "--add", "-g", "512", "--disable", path, "bitmap-two")
    qemu.qemu_io(path, "write -P 0x55 0 1M")      # qemu-io has no bitmaps; data only
    return path


def _directory(path):
    data = open(path, "rb").read()
    header = decode_header(data[:2 << 20])
    ext = header.bitmaps
    return header, data, data[ext.bitmap_directory_offset:ext.bitmap_directory_offset + ext.bitmap_directory_size]


def test_qemu_directory_round_trips_and_matches_info(bitmap_image):
    header, data, raw = _directory(bitmap_image)
    entries = decode_bitmap_directory(raw, header.bitmaps.nb_bitmaps, cluster_size=header.cluster_size,
                                      image_size=header.size)
    assert encode_bitmap_directory(entries) == raw
    assert bitmap_directory_size(entries) == len(raw)
    info = qemu.info_json(bitmap_image)["format-specific"]["data"]["bitmaps"]
    assert [(e.name, e.granularity, e.auto, e.in_use) for e in entries] == [
        (b["name"], b["granularity"], "auto" in b["flags"], "in-use" in b["flags"]) for b in info]
    for e in entries:
        table = decode_bitmap_table(data[e.bitmap_table_offset:e.bitmap_table_offset + 8 * e.bitmap_table_size])
        assert len(table) == e.bitmap_table_size
        assert all(v & 0xFF000000000001FE == 0 for v in table)


def _e(name="b", **kw):
    fields = dict(bitmap_table_offset=0x60000, bitmap_table_size=1, flags=BME_FLAG_AUTO, type=1,
                  granularity_bits=16, name=name, extra=b"")
    fields.update(kw)
    return BitmapDirectoryEntry(**fields)


def test_properties():
    e = _e(flags=BME_FLAG_IN_USE, granularity_bits=20)
    assert e.in_use and not e.auto and e.granularity == 1 << 20
    assert e.encoded_size == 32


def test_structural_errors():
    raw = encode_bitmap_directory([_e("a"), _e("bb")])
    with pytest.raises(FormatError, match="^Broken bitmap directory$"):
        decode_bitmap_directory(raw[:-8], 2)
    with pytest.raises(FormatError, match="^Broken bitmap directory$"):
        decode_bitmap_directory(raw + bytes(8), 3)
    with pytest.raises(FormatError, match="^More bitmaps found than specified in header extension$"):
        decode_bitmap_directory(raw, 1)
    with pytest.raises(FormatError, match="^Less bitmaps found than specified in header extension$"):
        decode_bitmap_directory(raw, 3)
    with pytest.raises(FormatError, match="size is zero"):
        decode_bitmap_directory(b"", 1)
    assert decode_bitmap_directory(b"", 0) == ()


def test_qemu_constraints_when_image_parameters_are_given():
    ok = _e()
    assert decode_bitmap_directory(encode_bitmap_directory([ok]), 1, cluster_size=65536,
                                   image_size=1 << 30) == (ok,)
    bad = [_e(bitmap_table_offset=0x60200), _e(bitmap_table_size=0), _e(granularity_bits=8),
           _e(granularity_bits=32), _e(flags=4), _e(type=2), _e(bitmap_table_offset=0)]
    for entry in bad:
        raw = encode_bitmap_directory([entry])
        assert decode_bitmap_directory(raw, 1) == (entry,)          # structurally fine
        with pytest.raises(FormatError, match="^Bitmap 'b' doesn't satisfy the constraints$"):
            decode_bitmap_directory(raw, 1, cluster_size=65536, image_size=1 << 20)
    # a table too small for the image is fine only while the bitmap is in use
    small = _e(granularity_bits=9)    # one 64k cluster of bits covers 256 MiB at 512 B granularity
    raw = encode_bitmap_directory([small])
    with pytest.raises(FormatError):
        decode_bitmap_directory(raw, 1, cluster_size=65536, image_size=1 << 30)
    decode_bitmap_directory(encode_bitmap_directory([small.replace(flags=BME_FLAG_IN_USE)]), 1,
                            cluster_size=65536, image_size=1 << 30)
    with_extra = encode_bitmap_directory([_e(extra=b"12345678")])
    assert decode_bitmap_directory(with_extra, 1)[0].extra == b"12345678"
    with pytest.raises(FormatError, match="^Bitmap extra data is not supported$"):
        decode_bitmap_directory(with_extra, 1, cluster_size=65536)


def test_encode_rejects_out_of_range():
    with pytest.raises(RequestError):
        encode_bitmap_directory([_e(granularity_bits=256)])
    with pytest.raises(RequestError):
        encode_bitmap_directory([_e(name="x" * 65536)])


def test_bitmap_table():
    values = [0, 1, 0x50000, 0x00FFFFFFFFFFFE00]
    assert list(decode_bitmap_table(encode_u64_table(values))) == values


entry_st = st.builds(
    BitmapDirectoryEntry, bitmap_table_offset=st.integers(0, 2 ** 64 - 1),
    bitmap_table_size=st.integers(0, 2 ** 32 - 1), flags=st.integers(0, 2 ** 32 - 1),
    type=st.integers(0, 255), granularity_bits=st.integers(0, 255), name=st.text(max_size=30),
    extra=st.binary(max_size=20))


@given(st.lists(entry_st, max_size=8))
def test_generated_directories_round_trip(entries):
    raw = encode_bitmap_directory(entries)
    assert len(raw) % 8 == 0 and len(raw) == bitmap_directory_size(entries)
    if entries:
        assert decode_bitmap_directory(raw, len(entries)) == tuple(entries)
