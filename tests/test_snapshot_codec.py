"""Snapshot table codec: qemu-img-made tables round-trip byte for byte and agree with
qemu-img info; generated tables round-trip; limits use qemu-img 7.2's messages."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, strategies as st

import codec_images
import qemu
from qcow2.errors import FormatError, RequestError
from qcow2.header import decode_header
from qcow2.snapshot import (SNAPSHOT_ENTRY_HEADER_SIZE, SnapshotEntry, decode_snapshot_table,
                            encode_snapshot_table, snapshot_table_size)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return codec_images.build_all(tmp_path_factory.mktemp("snap"))


def _table(path):
    data = open(path, "rb").read()
    header = decode_header(data[:2 << 20])
    return header, data[header.snapshots_offset:header.snapshots_offset + (64 << 20)]


@pytest.mark.parametrize("name", ["snapshots", "snapshots_v2"])
def test_qemu_table_round_trips_and_matches_info(images, name):
    header, raw = _table(images[name])
    entries = decode_snapshot_table(raw, header.nb_snapshots)
    size = snapshot_table_size(entries)
    assert encode_snapshot_table(entries) == raw[:size]
    assert decode_snapshot_table(encode_snapshot_table(entries), len(entries)) == entries
    info = qemu.info_json(images[name])["snapshots"]
    assert [(e.id_str, e.name, e.date_sec, e.date_nsec, e.vm_state_size, e.vm_clock_nsec)
            for e in entries] == [
        (s["id"], s["name"], s["date-sec"], s["date-nsec"], s["vm-state-size"],
         s["vm-clock-sec"] * 10 ** 9 + s["vm-clock-nsec"]) for s in info]
    for e in entries:
        assert e.l1_size == header.l1_size
        assert e.l1_table_offset % header.cluster_size == 0
        if header.version == 3:
            assert e.disk_size == header.size
            assert len(e.extra) >= 16


def test_extra_data_limit_message_matches_qemu(images, tmp_path):
    header, raw = _table(images["snapshots"])
    second = (SNAPSHOT_ENTRY_HEADER_SIZE + 24 + 1 + 2 + 7) & ~7     # entry 0: extra 24, id "1", name "s1"
    for index, entry_offset in ((0, 0), (1, second)):
        path = str(tmp_path / f"x{index}.qcow2")
        data = codec_images.poke(images["snapshots"], path,
                                 [(">I", header.snapshots_offset + entry_offset + 36, 1025)])
        message = f"Too much extra metadata in snapshot table entry {index}"
        assert message in codec_images.qemu_open_error(path)
        with pytest.raises(FormatError) as info:
            decode_snapshot_table(data[header.snapshots_offset:], header.nb_snapshots)
        assert str(info.value) == message


def _entry(i, name_len=1, extra=b"", id_len=0):
    return SnapshotEntry(l1_table_offset=0x30000, l1_size=1, id_str=str(i).ljust(id_len, "i"),
                         name="n" * name_len,
                         date_sec=i, date_nsec=0, vm_clock_nsec=0, vm_state_size=0, disk_size=None,
                         icount=None, extra=extra)


def test_table_size_limit_message():
    # 512 entries of maximal id+name pass 64 MiB at the last entry, as in qemu-img 7.2
    entries = [_entry(i, name_len=65535, id_len=65535) for i in range(512)]
    raw = encode_snapshot_table(entries)
    assert len(raw) > 64 << 20
    assert len(decode_snapshot_table(raw, 511)) == 511
    with pytest.raises(FormatError) as info:
        decode_snapshot_table(raw, 512)
    assert str(info.value) == "Snapshot table is too big"


def test_table_size_limit_message_is_qemus(images, tmp_path):
    """Cross-check the wording once with qemu-img on a sparse file."""
    n, offset = 520, 0x100000
    entries = [_entry(i, name_len=65535, id_len=65535) for i in range(n)]
    table = encode_snapshot_table(entries)
    path = str(tmp_path / "big.qcow2")
    codec_images.poke(images["v3"], path, [(">I", 60, n), (">Q", 64, offset)])
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(table)
    assert "Snapshot table is too big" in codec_images.qemu_open_error(path)
    os.unlink(path)


def test_truncated_table_names_entry_and_field():
    raw = encode_snapshot_table([_entry(0), _entry(1, name_len=20)])
    with pytest.raises(FormatError, match=r"entry 1 truncated: name"):
        decode_snapshot_table(raw[:-5], 2)
    with pytest.raises(FormatError, match=r"entry 1 truncated: header"):
        decode_snapshot_table(raw[:60], 2)
    with pytest.raises(FormatError, match=r"entry 2 truncated: header"):
        decode_snapshot_table(raw, 3)
    with pytest.raises(FormatError, match="Too many snapshots"):
        decode_snapshot_table(raw, 65537)


def test_known_extra_fields_override_raw_extra():
    base = _entry(0, extra=bytes(24)).replace(disk_size=0, icount=0)
    changed = base.replace(disk_size=1 << 40, vm_state_size=1 << 33, icount=7)
    (again,) = decode_snapshot_table(encode_snapshot_table([changed]), 1)
    assert (again.disk_size, again.vm_state_size, again.icount) == (1 << 40, 1 << 33, 7)
    assert again.extra[:24] == struct.pack(">QQQ", 1 << 33, 1 << 40, 7)


def test_unknown_extra_tail_is_preserved():
    extra = struct.pack(">QQQ", 5, 6, 7) + b"future-field"
    entry = _entry(0, extra=extra).replace(vm_state_size=5, disk_size=6, icount=7)
    assert decode_snapshot_table(encode_snapshot_table([entry]), 1) == (entry,)


def test_encode_rejects_what_cannot_be_stored():
    with pytest.raises(RequestError):
        encode_snapshot_table([_entry(0).replace(name="x" * 65536)])
    with pytest.raises(RequestError):
        encode_snapshot_table([_entry(0, extra=bytes(16))])          # disk_size None but stored
    with pytest.raises(RequestError):
        encode_snapshot_table([_entry(0, extra=bytes(1025))])
    with pytest.raises(RequestError):
        encode_snapshot_table([_entry(0).replace(vm_state_size32=1)])   # 32-bit field disagrees


text = st.text(max_size=20)
u32 = st.integers(0, 2 ** 32 - 1)
u64 = st.integers(0, 2 ** 64 - 1)


@st.composite
def entries(draw):
    extra_len = draw(st.sampled_from([0, 8, 16, 24, 40]))
    extra = draw(st.binary(min_size=extra_len, max_size=extra_len))
    vm_state_size = draw(u64 if extra_len >= 8 else u32)
    vm32 = None
    if extra_len >= 8 and draw(st.booleans()):
        vm32 = draw(u32)
        if vm32 == (vm_state_size if vm_state_size <= 0xFFFFFFFF else 0):
            vm32 = None
    return SnapshotEntry(
        l1_table_offset=draw(u64), l1_size=draw(u32), id_str=draw(text), name=draw(text),
        date_sec=draw(u32), date_nsec=draw(u32), vm_clock_nsec=draw(u64),
        vm_state_size=vm_state_size,
        disk_size=draw(u64) if extra_len >= 16 else None,
        icount=draw(u64) if extra_len >= 24 else None,
        extra=extra, vm_state_size32=vm32)


def _normalised(e):
    """The extra bytes as the encoder writes them (known fields set)."""
    return decode_snapshot_table(encode_snapshot_table([e]), 1)[0]


@given(st.lists(entries(), max_size=6))
def test_generated_tables_round_trip(table):
    raw = encode_snapshot_table(table)
    assert len(raw) == snapshot_table_size(table)
    decoded = decode_snapshot_table(raw, len(table))
    assert decoded == tuple(_normalised(e) for e in table)
    for got, want in zip(decoded, table):
        assert (got.vm_state_size, got.disk_size, got.icount, got.id_str, got.name) == \
            (want.vm_state_size, want.disk_size, want.icount, want.id_str, want.name)
    assert encode_snapshot_table(decoded) == raw
