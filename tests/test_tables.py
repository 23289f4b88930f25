"""Table codecs: u64 tables, L2 entry classification, compressed descriptors, refcount
blocks of every width, extended L2 bitmaps; checked in memory and against qemu-img images."""

from __future__ import annotations

import array
import zlib

import pytest
from hypothesis import given, strategies as st

import qemu
from qcow2 import constants as C
from qcow2.errors import FormatError, RequestError
from qcow2.header import decode_header
from qcow2.tables import (ClusterType, SubclusterType, compressed_params, decode_compressed,
                          decode_refblock, decode_u64_table, encode_compressed, encode_refblock,
                          encode_u64_table, l1_reserved_bits, l2_cluster_type, l2_reserved_bits,
                          l2_subcluster_type, refblock_entries, reftable_reserved_bits,
                          subcluster_bitmap, validate_subcluster_bitmap)

u64 = st.integers(0, 2 ** 64 - 1)


# -- u64 tables ----------------------------------------------------------------------------------

@given(st.lists(u64, max_size=200))
def test_u64_table_round_trip(values):
    encoded = encode_u64_table(values)
    assert len(encoded) == 8 * len(values)
    assert encoded == b"".join(v.to_bytes(8, "big") for v in values)
    decoded = decode_u64_table(encoded)
    assert isinstance(decoded, array.array) and decoded.typecode == "Q"
    assert list(decoded) == values


def test_u64_table_rejects_partial_entries_and_big_values():
    with pytest.raises(FormatError):
        decode_u64_table(bytes(9))
    with pytest.raises(RequestError):
        encode_u64_table([1 << 64])


def test_encode_u64_table_does_not_mutate_its_argument():
    table = array.array("Q", [1, 2, 3])
    encode_u64_table(table)
    assert list(table) == [1, 2, 3]


# -- L1 / L2 entries -----------------------------------------------------------------------------

def test_l2_cluster_types():
    off = 0x50000
    assert l2_cluster_type(0) == ClusterType.UNALLOCATED
    assert l2_cluster_type(C.QCOW_OFLAG_COPIED) == ClusterType.UNALLOCATED
    assert l2_cluster_type(C.QCOW_OFLAG_COPIED, has_data_file=True) == ClusterType.NORMAL
    assert l2_cluster_type(off) == ClusterType.NORMAL
    assert l2_cluster_type(off | C.QCOW_OFLAG_COPIED) == ClusterType.NORMAL
    assert l2_cluster_type(C.QCOW_OFLAG_ZERO) == ClusterType.ZERO_PLAIN
    assert l2_cluster_type(off | C.QCOW_OFLAG_ZERO) == ClusterType.ZERO_ALLOC
    assert l2_cluster_type(C.QCOW_OFLAG_COMPRESSED | 5) == ClusterType.COMPRESSED
    # extended L2: bit 0 is reserved, not the zero flag
    assert l2_cluster_type(C.QCOW_OFLAG_ZERO, extended_l2=True) == ClusterType.UNALLOCATED
    assert l2_cluster_type(off | C.QCOW_OFLAG_ZERO, extended_l2=True) == ClusterType.NORMAL


def test_reserved_bits():
    assert l1_reserved_bits(0x50000 | C.QCOW_OFLAG_COPIED) == 0
    assert l1_reserved_bits(0x50000 | 1) == 1
    assert l1_reserved_bits(1 << 62) == 1 << 62
    assert l2_reserved_bits(0x50000 | C.QCOW_OFLAG_COPIED | C.QCOW_OFLAG_ZERO) == 0
    assert l2_reserved_bits(0x50000 | C.QCOW_OFLAG_ZERO, extended_l2=True) == 1
    assert l2_reserved_bits(0x50000 | 2) == 2
    assert l2_reserved_bits(1 << 56) == 1 << 56
    assert l2_reserved_bits(C.QCOW_OFLAG_COMPRESSED | (1 << 61) | 0x1FF) == 0
    assert l2_reserved_bits(C.QCOW_OFLAG_COMPRESSED | C.QCOW_OFLAG_COPIED) == C.QCOW_OFLAG_COPIED
    assert reftable_reserved_bits(0x20000) == 0 and reftable_reserved_bits(0x20001) == 1


# -- compressed descriptors ----------------------------------------------------------------------

@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_compressed_params(cluster_bits):
    offset_mask, shift, csize_mask = compressed_params(cluster_bits)
    assert shift == 62 - (cluster_bits - 8)
    assert offset_mask == (1 << shift) - 1
    assert csize_mask << shift | offset_mask == (1 << 62) - 1     # fields tile bits 0..61


@pytest.mark.parametrize("cluster_bits", range(9, 22))
@given(data=st.data())
def test_compressed_round_trip_every_cluster_size(cluster_bits, data):
    offset_mask, _, csize_mask = compressed_params(cluster_bits)
    host_offset = data.draw(st.integers(0, offset_mask))
    nb_sectors = data.draw(st.integers(1, csize_mask + 1))
    size = nb_sectors * 512 - (host_offset & 511)
    entry = encode_compressed(host_offset, size, cluster_bits)
    assert entry & C.QCOW_OFLAG_COMPRESSED and not entry & C.QCOW_OFLAG_COPIED
    assert l2_cluster_type(entry) == ClusterType.COMPRESSED
    assert decode_compressed(entry, cluster_bits) == (host_offset, size)
    # any smaller size in the same last sector encodes the same
    assert encode_compressed(host_offset, size - data.draw(st.integers(0, min(511, size - 1))),
                             cluster_bits) == entry


def test_compressed_limits():
    offset_mask, _, csize_mask = compressed_params(16)
    with pytest.raises(RequestError):
        encode_compressed(offset_mask + 1, 512, 16)
    with pytest.raises(RequestError):
        encode_compressed(0, (csize_mask + 1) * 512 + 1, 16)
    with pytest.raises(RequestError):
        encode_compressed(0, 0, 16)
    with pytest.raises(RequestError):
        compressed_params(22)
    # the spec's example shape: offset 0x12345 needs its first sector partly
    assert decode_compressed(encode_compressed(0x12345, 1000, 16), 16) == (0x12345, 1536 - 0x145)


@pytest.mark.parametrize("cluster_size", ["512", "4k", "64k", "2M"])
def test_compressed_descriptors_of_qemu_images(tmp_path, cluster_size):
    """Decode what qemu-img convert -c wrote and inflate it back to the guest data."""
    raw_path = tmp_path / "src.raw"
    pattern = (bytes(range(256)) * 32 + b"qcow2" * 1000)
    cs = {"512": 512, "4k": 4096, "64k": 65536, "2M": 2 << 20}[cluster_size]
    guest = (pattern * (cs // len(pattern) + 1))[:cs] * 2
    raw_path.write_bytes(guest)
    path = str(tmp_path / "c.qcow2")
    qemu.qemu_img("convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster_size}", str(raw_path), path)
    data = open(path, "rb").read()
    header = decode_header(data[:2 << 20])
    l1 = decode_u64_table(data[header.l1_table_offset:header.l1_table_offset + 8 * header.l1_size])
    l2_offset = l1[0] & C.L1E_OFFSET_MASK
    l2 = decode_u64_table(data[l2_offset:l2_offset + header.cluster_size])
    for index in range(2):
        assert l2_cluster_type(l2[index]) == ClusterType.COMPRESSED
        host_offset, size = decode_compressed(l2[index], header.cluster_bits)
        assert (host_offset + size) % 512 == 0
        stream = data[host_offset:host_offset + size]
        out = zlib.decompressobj(-15).decompress(stream, header.cluster_size)
        assert out == guest[index * cs:(index + 1) * cs]


# -- refcount blocks -----------------------------------------------------------------------------

@pytest.mark.parametrize("order", range(7))
@given(data=st.data())
def test_refblock_round_trip_every_width(order, data):
    bits = 1 << order
    per_byte = max(1, 8 // bits)
    n = data.draw(st.integers(0, 64)) * per_byte
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n))
    encoded = encode_refblock(values, order)
    assert len(encoded) == n * bits // 8
    assert list(decode_refblock(encoded, order)) == values


@pytest.mark.parametrize("order", range(7))
def test_refblock_matches_a_naive_bit_reader(order):
    """Entry i occupies bits [i*w, (i+1)*w) of the block, counting bits LSB first in each
    byte for sub-byte widths, big-endian for whole bytes."""
    bits = 1 << order
    block = bytes((i * 37 + 11) & 0xFF for i in range(512))
    decoded = decode_refblock(block, order)
    assert len(decoded) == 512 * 8 // bits == refblock_entries(512, order)
    if bits >= 8:
        width = bits // 8
        expect = [int.from_bytes(block[i * width:(i + 1) * width], "big") for i in range(len(decoded))]
    else:
        whole = int.from_bytes(block, "little")
        expect = [(whole >> (i * bits)) & ((1 << bits) - 1) for i in range(len(decoded))]
    assert list(decoded) == expect
    assert encode_refblock(decoded, order) == block


def test_sub_byte_packing_is_lsb_first():
    assert encode_refblock([1, 0, 0, 0, 0, 0, 0, 0], 0) == b"\x01"
    assert encode_refblock([0, 0, 0, 0, 0, 0, 0, 1], 0) == b"\x80"
    assert encode_refblock([3, 1, 0, 2], 1) == bytes([0b10000111])
    assert encode_refblock([0xA, 0x5], 2) == b"\x5a"
    assert encode_refblock([1], 0) == b"\x01"          # padded to a whole byte
    assert list(decode_refblock(b"\x5a", 2)) == [0xA, 0x5]


def test_refblock_rejects_values_too_wide():
    for order in range(7):
        with pytest.raises(RequestError):
            encode_refblock([1 << (1 << order)], order)
        with pytest.raises(RequestError):
            encode_refblock([-1], order)
    with pytest.raises(FormatError):
        decode_refblock(b"\0", 7)
    with pytest.raises(FormatError):
        decode_refblock(b"\0" * 3, 4)


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_refblocks_of_qemu_images(tmp_path, refcount_bits):
    path = str(tmp_path / "r.qcow2")
    qemu.create(path, "64M", options={"refcount_bits": refcount_bits})
    qemu.qemu_io(path, "write -P 0x22 0 64k")
    if refcount_bits > 1:
        qemu.qemu_img("snapshot", "-c", "s", path)
    data = open(path, "rb").read()
    header = decode_header(data[:2 << 20])
    assert header.refcount_bits == refcount_bits
    reftable = decode_u64_table(data[header.refcount_table_offset:
                                     header.refcount_table_offset + header.cluster_size])
    block_offset = reftable[0] & C.REFT_OFFSET_MASK
    refcounts = decode_refblock(data[block_offset:block_offset + header.cluster_size], header.refcount_order)
    assert len(refcounts) == header.refcount_block_entries
    nb_clusters = (len(data) + header.cluster_size - 1) // header.cluster_size
    # every cluster of the file is in use (qemu-img leaves no holes here); those past the end are free
    assert all(refcounts[i] >= 1 for i in range(nb_clusters))
    assert not any(refcounts[nb_clusters:])
    l1 = decode_u64_table(data[header.l1_table_offset:header.l1_table_offset + 8])
    l2_offset = l1[0] & C.L1E_OFFSET_MASK
    data_offset = decode_u64_table(data[l2_offset:l2_offset + 8])[0] & C.L2E_OFFSET_MASK
    shared = 2 if refcount_bits > 1 else 1           # the snapshot shares the L2 and the data
    assert refcounts[l2_offset // header.cluster_size] == shared
    assert refcounts[data_offset // header.cluster_size] == shared
    assert encode_refblock(refcounts, header.refcount_order) == \
        data[block_offset:block_offset + header.cluster_size]


# -- extended L2 ---------------------------------------------------------------------------------

def test_subcluster_bitmap_and_validation():
    assert subcluster_bitmap(0x0000000F_00000003) == (0x3, 0xF)
    off = 0x50000
    validate_subcluster_bitmap(off, 0x0000000C_00000003)
    validate_subcluster_bitmap(0, 0xFFFFFFFF_00000000)
    validate_subcluster_bitmap(C.QCOW_OFLAG_COMPRESSED | 7, 0)
    with pytest.raises(FormatError, match="allocated and reading as zero"):
        validate_subcluster_bitmap(off, 0x00000001_00000001)
    with pytest.raises(FormatError, match="compressed"):
        validate_subcluster_bitmap(C.QCOW_OFLAG_COMPRESSED | 7, 1)
    with pytest.raises(FormatError, match="no host offset"):
        validate_subcluster_bitmap(0, 1)
    validate_subcluster_bitmap(C.QCOW_OFLAG_COPIED, 1, has_data_file=True)


def test_subcluster_types():
    off = 0x50000
    bitmap = (0b0100 << 32) | 0b0001
    assert l2_subcluster_type(off, bitmap, 0) == SubclusterType.NORMAL
    assert l2_subcluster_type(off, bitmap, 1) == SubclusterType.UNALLOCATED_ALLOC
    assert l2_subcluster_type(off, bitmap, 2) == SubclusterType.ZERO_ALLOC
    assert l2_subcluster_type(0, 0b0100 << 32, 2) == SubclusterType.ZERO_PLAIN
    assert l2_subcluster_type(0, 0, 31) == SubclusterType.UNALLOCATED_PLAIN
    assert l2_subcluster_type(0, 1, 0) == SubclusterType.INVALID
    assert l2_subcluster_type(C.QCOW_OFLAG_COMPRESSED | 9, 0, 5) == SubclusterType.COMPRESSED
    with pytest.raises(RequestError):
        l2_subcluster_type(off, 0, 32)


def test_extended_l2_entries_of_a_qemu_image(tmp_path):
    path = str(tmp_path / "x.qcow2")
    qemu.create(path, "64M", options={"extended_l2": "on"})
    qemu.qemu_io(path, "write -P 0x33 0 2k", "write -P 0x44 4k 2k", "write -z 8k 2k")
    data = open(path, "rb").read()
    header = decode_header(data[:2 << 20])
    l1 = decode_u64_table(data[header.l1_table_offset:header.l1_table_offset + 8])
    l2_offset = l1[0] & C.L1E_OFFSET_MASK
    words = decode_u64_table(data[l2_offset:l2_offset + header.cluster_size])
    entry, bitmap = words[0], words[1]
    validate_subcluster_bitmap(entry, bitmap)
    assert subcluster_bitmap(bitmap) == (0b00101, 0b10000)     # 2k subclusters 0 and 2; 4 zero
    assert [l2_subcluster_type(entry, bitmap, i) for i in range(5)] == [
        SubclusterType.NORMAL, SubclusterType.UNALLOCATED_ALLOC, SubclusterType.NORMAL,
        SubclusterType.UNALLOCATED_ALLOC, SubclusterType.ZERO_ALLOC]
