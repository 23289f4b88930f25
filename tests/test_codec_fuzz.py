"""Fuzzing the decoders: random bytes and mutated qemu-img headers may only ever raise
Qcow2Error subclasses; whatever decodes satisfies the limits and re-encodes faithfully."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

import codec_images
from qcow2 import constants as C
from qcow2.bitmap import decode_bitmap_directory, decode_bitmap_table
from qcow2.errors import Qcow2Error
from qcow2.header import decode_feature_table, decode_header, encode_header
from qcow2.snapshot import decode_snapshot_table, encode_snapshot_table
from qcow2.tables import (decode_compressed, decode_refblock, decode_u64_table, l2_cluster_type,
                          l2_subcluster_type)

SEEDS = ["v3", "v2", "backing", "backing_v2", "data_file", "data_file_raw", "zstd", "extended_l2",
         "bitmaps", "snapshots", "lazy_rc1_512"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    paths = codec_images.build_all(tmp_path_factory.mktemp("fuzz"))
    return _Seeds({name: codec_images.read_head(paths[name], 4096) for name in SEEDS})


class _Seeds(dict):
    def __repr__(self):            # keep Hypothesis' failure reports readable
        return f"<{len(self)} qemu-img headers>"


def _decode_or_qcow2_error(buf, **kw):
    try:
        header = decode_header(buf, **kw)
    except Qcow2Error:
        return None
    _check_decoded(header, kw)
    return header


def _check_decoded(h, kw):
    """What every successfully decoded header guarantees to the layers above."""
    assert h.version in (2, 3)
    assert C.MIN_CLUSTER_BITS <= h.cluster_bits <= C.MAX_CLUSTER_BITS
    assert h.header_length <= h.cluster_size
    assert h.refcount_order <= C.MAX_REFCOUNT_ORDER
    assert h.l1_size * 8 <= C.QCOW_MAX_L1_SIZE and h.l1_size >= h.nb_l1_entries_needed
    assert h.l1_table_offset % h.cluster_size == 0
    assert h.refcount_table_offset % h.cluster_size == 0
    assert h.refcount_table_clusters * h.cluster_size <= C.QCOW_MAX_REFTABLE_SIZE
    assert h.crypt_method == 0
    if not kw.get("check"):
        assert h.refcount_table_clusters > 0 and h.nb_snapshots <= C.QCOW_MAX_SNAPSHOTS
    assert not h.incompatible_features & ~C.INCOMPAT_KNOWN
    if h.backing_file is not None:
        assert len(h.backing_file.encode("utf-8", "surrogateescape")) <= C.QCOW_MAX_BACKING_FILE_NAME
    if h.bitmaps is not None:
        assert 1 <= h.bitmaps.nb_bitmaps <= C.QCOW_MAX_BITMAPS
    try:
        again = encode_header(h)
    except Qcow2Error:
        return      # odd but valid layouts (e.g. a backing name inside the header) need not re-encode
    assert decode_header(again, **kw) == h


@given(st.binary(max_size=1024))
def test_random_bytes(buf):
    _decode_or_qcow2_error(buf)
    _decode_or_qcow2_error(buf, check=True, no_io=True)


@given(st.binary(max_size=600))
def test_random_bytes_behind_a_valid_magic(rest):
    _decode_or_qcow2_error(C.QCOW_MAGIC_BYTES + rest)


# (offset, struct format) of every header field, to overwrite with random values
FIELDS = [(4, ">I"), (8, ">Q"), (16, ">I"), (20, ">I"), (24, ">Q"), (32, ">I"), (36, ">I"),
          (40, ">Q"), (48, ">Q"), (56, ">I"), (60, ">I"), (64, ">Q"), (72, ">Q"), (80, ">Q"),
          (88, ">Q"), (96, ">I"), (100, ">I"), (104, ">B"), (0x70, ">I"), (0x74, ">I"),
          (0x78, ">Q"), (0x80, ">Q")]
_interesting = st.one_of(st.integers(0, 2 ** 64 - 1), st.sampled_from(
    [0, 1, 2, 3, 4, 7, 8, 9, 14, 16, 21, 22, 0x1FF, 0x200, 0x10000, 0x10001, 2 ** 31 - 1, 2 ** 31,
     2 ** 32 - 1, 2 ** 56, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]))


@st.composite
def mutated_header(draw, seeds):
    buf = bytearray(seeds[draw(st.sampled_from(SEEDS))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "flip", "splice"]))
        if kind == "field":
            offset, fmt = draw(st.sampled_from(FIELDS))
            value = draw(_interesting) & ((1 << (8 * struct.calcsize(fmt))) - 1)
            struct.pack_into(fmt, buf, offset, value)
        elif kind == "flip":
            bit = draw(st.integers(0, 8 * 1024 - 1))
            buf[bit // 8] ^= 1 << (bit % 8)
        else:
            offset = draw(st.integers(0, 1000))
            chunk = draw(st.binary(min_size=1, max_size=24))
            buf[offset:offset + len(chunk)] = chunk
    if draw(st.booleans()):
        del buf[draw(st.integers(0, len(buf))):]       # truncated reads
    return bytes(buf)


@given(data=st.data())
def test_mutated_qemu_headers(seeds, data):
    buf = data.draw(mutated_header(seeds))
    _decode_or_qcow2_error(buf)
    _decode_or_qcow2_error(buf, check=True)


@given(st.binary(max_size=400), st.integers(0, 70000))
def test_snapshot_table_decoder(buf, nb):
    try:
        entries = decode_snapshot_table(buf, nb)
    except Qcow2Error:
        return
    assert len(entries) == nb
    assert all(len(e.extra) <= C.QCOW_MAX_SNAPSHOT_EXTRA_DATA for e in entries)
    assert decode_snapshot_table(encode_snapshot_table(entries), nb) == entries


@given(st.binary(max_size=400), st.integers(0, 70000), st.sampled_from([None, 512, 65536]),
       st.integers(0, 2 ** 64 - 1))
def test_bitmap_directory_decoder(buf, nb, cluster_size, image_size):
    try:
        entries = decode_bitmap_directory(buf, nb, cluster_size=cluster_size, image_size=image_size)
    except Qcow2Error:
        return
    assert len(entries) == nb


@given(st.binary(max_size=300), st.integers(-2, 8))
def test_table_decoders(buf, order):
    for decoder in (decode_u64_table, decode_bitmap_table):
        try:
            assert len(decoder(buf)) == len(buf) // 8
        except Qcow2Error:
            assert len(buf) % 8
    try:
        assert len(decode_refblock(buf, order)) * (1 << order) >= len(buf) * 8 - 63
    except Qcow2Error:
        pass
    names = decode_feature_table(buf)       # never fails: a partial entry is ignored
    assert len(names) == len(buf) // 48


@given(st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1), st.integers(9, 21), st.integers(0, 31))
def test_entry_decoders_accept_any_word(entry, bitmap, cluster_bits, index):
    host_offset, size = decode_compressed(entry, cluster_bits)
    assert 0 < size <= (1 << (cluster_bits - 8)) * 512 and host_offset < 1 << 62
    l2_cluster_type(entry)
    l2_subcluster_type(entry, bitmap, index)
