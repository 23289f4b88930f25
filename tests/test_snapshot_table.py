"""Opening images with damaged snapshot tables (what ``qemu-img info`` does with them), and the
bounded cost of reading hostile tables.  The images are the check scenarios of
``test_check_qemu.py`` (built with qemu-img, then poked)."""

from __future__ import annotations

import json
import subprocess
import tracemalloc

import pytest

import qcow2
from qcow2.check_snapshots import CheckFailed
from qcow2.snapshot_table import SnapshotTableError, read_snapshot_table
from qcow2.storage import Storage
from tests.qemu import QEMU_IMG, require_qemu
from tests.test_check_qemu import (_header, _poke, _snapshots, _write_snapshots,
                                   s_snapshot_extra_data, s_snapshot_l1_fields_bad,
                                   s_snapshot_l1_offset_negative, s_snapshot_l1_past_eof,
                                   s_snapshot_table_cut_by_eof, s_snapshot_table_offset_unaligned,
                                   s_snapshot_table_past_eof, s_snapshot_table_too_big,
                                   s_v2_snapshot_extra_data, _one_snapshot)


def _qemu_info(path) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, "info", "--output=json", str(path)], capture_output=True,
                          text=True)


@pytest.mark.parametrize("build, error_type, where", [
    (s_snapshot_extra_data, SnapshotTableError, (3, "extra_data_size", 1025)),
    (s_v2_snapshot_extra_data, SnapshotTableError, (1, "extra_data_size", 1025)),
    (s_snapshot_table_too_big, SnapshotTableError, (512, "table_size", 72 + 512 * 131136 - 2)),
    (s_snapshot_table_offset_unaligned, qcow2.FormatError, None),
])
def test_open_refuses_what_qemu_img_info_refuses(tmp_path, build, error_type, where):
    """Same message as qemu-img info (both lines: QEMU's reason, then its hint), a FormatError
    subclass that also names the entry, the field and its value."""
    require_qemu()
    path = tmp_path / "img.qcow2"
    build(path)
    theirs = _qemu_info(path)
    assert theirs.returncode == 1
    with pytest.raises(error_type) as info:
        qcow2.open(str(path))
    assert f"qemu-img: Could not open '{path}': {info.value}\n" == theirs.stderr
    if where is not None:
        assert (info.value.index, info.value.field, info.value.value) == where


@pytest.mark.parametrize("build", [s_snapshot_l1_fields_bad, s_snapshot_l1_past_eof,
                                   s_snapshot_l1_offset_negative, s_snapshot_table_past_eof,
                                   s_snapshot_table_cut_by_eof])
def test_open_reads_what_qemu_img_info_reads(tmp_path, build):
    """Damage that only the check reports: the image opens and lists the snapshots as qemu-img
    info does (ids and names as stored, a cut name padded with NULs by the zeros past EOF)."""
    require_qemu()
    path = tmp_path / "img.qcow2"
    build(path)
    theirs = _qemu_info(path)
    assert theirs.returncode == 0, theirs.stderr
    expected = [(s["id"], s["name"]) for s in json.loads(theirs.stdout).get("snapshots", [])]
    with qcow2.open(str(path)) as img:
        assert [(s.id, s.display_name) for s in img.snapshots] == expected


def test_hostile_table_costs_no_memory(tmp_path):
    """4 GiB of declared extra data and 65536 entries past the end of the file: the repairing read
    skips the extra data unread and stops at 64 MiB; memory stays at the read window."""
    path = tmp_path / "img.qcow2"
    _one_snapshot(path)
    table = _snapshots(path)
    table[0]["extra_len"] = 0xFFFFFFFF
    _write_snapshots(path, table, nb=65536)
    file = Storage(str(path))
    try:
        with pytest.raises(SnapshotTableError, match="Too much extra metadata"):
            read_snapshot_table(file, _header(path, "snapshots_offset"), 65536)
        tracemalloc.start()
        read = read_snapshot_table(file, _header(path, "snapshots_offset"), 65536, repair=True)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        file.close()
    assert read.extra_cut == [(0, 0xFFFFFFFF)] and read.nb_overhanging == 65536
    assert read.entries == [] and peak < 8 << 20


def test_negative_l1_offset_fails_the_check_without_allocating(tmp_path):
    path = tmp_path / "img.qcow2"
    s_snapshot_l1_offset_negative(path)
    with qcow2.open(str(path)) as img:
        tracemalloc.start()
        result = img.check()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert result.failed == "Cannot allocate memory" and peak < 16 << 20


def test_check_failure_carries_qemu_lines(tmp_path):
    """The library result of a check that cannot start: the error with its hint line."""
    path = tmp_path / "img.qcow2"
    _one_snapshot(path)
    _poke(path, 60, ">I", 65540)
    with qcow2.open(str(path), "r", _repair=True) as img:
        result = img.check()
    assert result.failed == "File too large" and result.exit_code == 1
    assert result.errors == ["ERROR snapshot table too large\nYou can force-remove all 4 "
                             "overhanging snapshots with qemu-img check -r all"]
    assert issubclass(CheckFailed, qcow2.Qcow2Error)
