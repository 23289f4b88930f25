"""Regressions found by fuzzing in the checker, the check command and the open path, each
reproduced without Hypothesis (tests/test_fuzz_properties.py found them by comparing our check
and repair with qemu-img 7.2's on generated damaged images).

Fixtures are made with qemu-img and bytes poked into them; qemu-img 7.2 is the reference.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys

import pytest

import qcow2
from qcow2 import cli
from qcow2 import constants as C
from qcow2.check import check_image
from qcow2.image import Image

import qemu
from fuzz_support import our_check, poke, qemu_check, read_u64, tmpfs_or




def _qemu_check_limited(path, *args):
    """qemu-img check with a 4 GiB address space (it may try to allocate terabytes)."""
    qemu.require_qemu()

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    return subprocess.run([qemu.QEMU_IMG, "check", "-f", "qcow2", *args, str(path)],
                          capture_output=True, text=True, preexec_fn=limit, timeout=120)


@pytest.mark.parametrize("where", ["tmpfs", "tmp_path"])
def test_repair_of_refcount_block_far_outside_the_file_is_bounded(tmp_path, where):
    """Found by fuzzing (corruption "huge-value": refcount_table_clusters 1 -> 2).  The second
    reftable cluster is refcount block 0, whose refcounts (0x0001 0x0001 0x0001 ...) read as a
    refcount block offset of 0x0001000100010000: 256 TiB past the end of a 1.5 KiB file.
    ``check -r all`` grows the file for a refcount block outside it.  Where the file system
    refuses that size (ext4) qemu-img reports it and rebuilds the refcounts; where it allows it
    (tmpfs) qemu-img's count array cannot be allocated: "Check failed: Cannot allocate memory".
    We had a MemoryError there (the array sized by the offset).  Now: the same exit code and
    failure as qemu-img, and the file is not left at 256 TiB (qemu-img leaves it so)."""
    directory = tmpfs_or(tmp_path) if where == "tmpfs" else str(tmp_path)
    try:
        path = os.path.join(directory, "img.qcow2")
        qemu.create(path, 0, options={"compat": "0.10", "cluster_size": "512"})
        poke(path, 56, ">I", 2)
        theirs = path + ".qemu"
        shutil.copyfile(path, theirs)
        size = os.path.getsize(path)
        ref = _qemu_check_limited(theirs, "-r", "all")
        ours = our_check(path, "-r", "all")
        assert ours.rc == ref.returncode, (ours.stderr, ref.stderr)
        if ref.returncode == 1:
            assert "Check failed: Cannot allocate memory" in ref.stderr
            assert "Check failed: Cannot allocate memory" in ours.stderr
            assert os.path.getsize(path) == size
        else:
            assert "ERROR could not resize image" in ours.stderr
            assert qemu.qemu_img("check", path, check=False).returncode == 0
    finally:
        if where == "tmpfs":
            shutil.rmtree(directory, ignore_errors=True)


def test_check_count_array_growth_is_capped(tmp_path):
    """The same case through the API on any file system: the check's result says what happened
    (no exception), and whatever the outcome the file never grows by more than a cluster or two
    in our hands."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, 0, options={"compat": "0.10", "cluster_size": "512"})
    poke(path, 56, ">I", 2)
    size = os.path.getsize(path)
    with Image(path, "r+", _repair=True) as img:
        res = check_image(img, "all")
    assert res.failed in (None, "Cannot allocate memory")
    assert os.path.getsize(path) <= size + 4 * 512



def _same_as_qemu(path, *args):
    """Our check and qemu-img's on two copies: exit code and JSON summary (file name aside)."""
    theirs = path + ".qemu"
    shutil.copyfile(path, theirs)
    ref = qemu_check(theirs, *args)
    ours = our_check(path, *args)
    assert ours.rc == ref.rc, (ours.stderr, ref.stderr)
    if ref.summary is not None:
        ref.summary["filename"] = path
    assert ours.summary == ref.summary, (ours.stderr, ref.stderr)
    return ours, ref


@pytest.mark.parametrize("args", [(), ("-r", "leaks"), ("-r", "all")])
def test_refcount_block_offset_past_int64(tmp_path, args):
    """Found by fuzzing (bit-flip of bit 63 of a refcount table entry; also a refcount table
    aimed at the L1 table, whose entries carry COPIED = bit 63).  The refcount block then lies at
    0x8000000000020000: qemu-img cannot read it (EIO), so each cluster it covers is "Can't get
    refcount for cluster N: Input/output error", a check error; we read zeros and reported
    corruptions.  Repairing, qemu-img cannot size a file to it ("ERROR could not resize image:
    Invalid argument") and rebuilds; ours raised OverflowError from ftruncate."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, 0, options={"compat": "0.10", "preallocation": "metadata"})
    reftable = read_u64(path, 48)
    poke(path, reftable, ">Q", read_u64(path, reftable) | 1 << 63)
    ours, ref = _same_as_qemu(path, *args)
    if not args:
        assert "Can't get refcount for cluster 0: Input/output error" in ours.stderr
    if args == ("-r", "all"):
        assert "ERROR could not resize image: Invalid argument" in ours.stderr
        assert qemu.qemu_img("check", path, check=False).returncode == 0
    with Image(path, "r+", _repair=True) as img:      # the API: a result, no exception
        check_image(img, "all")


def test_copied_flags_of_an_unaligned_l2_table(tmp_path):
    """Found by fuzzing (an L1 entry moved off its alignment by 0x200).  qemu-img's OFLAG_COPIED
    pass reads the L2 table where the entry points, unaligned, and checks its entries (the
    refcount of an unaligned data offset is that of the cluster holding it); we skipped both and
    counted one corruption less."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, "100K", options={"cluster_size": "4096"})
    qemu.qemu_io(path, "write -P 0xa5 0 4k", "write -P 6 8k 4k")   # 0xa5..: COPIED set
    l1 = read_u64(path, 40)
    poke(path, l1, ">Q", read_u64(path, l1) + 0x200)
    ours, _ = _same_as_qemu(path)
    assert "OFLAG_COPIED data cluster" in ours.stderr
    _same_as_qemu(path, "-r", "all")


def test_check_with_format_qcow2_of_a_file_without_the_magic(tmp_path):
    """Found by fuzzing (bit 0 of byte 0 flipped).  ``check -f qcow2`` opens the file as qcow2:
    "Could not open 'X': Image is not in qcow2 format", exit 1, as qemu-img; we probed it anyway
    and answered "This image format does not support checks", exit 63 (right only without -f)."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, "1M")
    poke(path, 0, ">B", ord("Q") ^ 1)
    for args in (["-f", "qcow2"], []):
        ref = subprocess.run([qemu.QEMU_IMG, "check", *args, path], capture_output=True,
                             text=True)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["check", *args, path])
        assert rc == ref.returncode
        assert err.getvalue().removeprefix("qcow2-tool: ") == ref.stderr.removeprefix("qemu-img: ")


def test_data_file_extension_without_the_incompatible_bit_is_ignored(tmp_path):
    """Found by fuzzing (the end marker of a version 2 image's extensions turned into a
    data-file extension with an empty name).  Without the external-data-file incompatible bit
    QEMU ignores the name and reads the image's own file; we tried to open a data file named ''
    ("Could not open '': No such file or directory")."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, "64K", options={"compat": "0.10", "cluster_size": "1024"})
    qemu.qemu_io(path, "write -P 7 0 2k")
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">II", 0x44415441, 0))
    _same_as_qemu(path)
    with qcow2.open(path) as img:
        assert img.pread(2048, 0) == b"\x07" * 2048
    assert json.loads(qemu.qemu_img("info", "--output=json", path).stdout)["format"] == "qcow2"


def test_rebuild_switches_the_guard_to_the_new_refcount_structures(tmp_path):
    """Found by fuzzing (one bit flipped in the refcount table: entry 290 = 0x4000, unaligned for
    64 KiB clusters).  ``check -r all`` rebuilds the refcount structures; the guard still
    protected the old entry's "block" (0x4000-0x14000, i.e. clusters 0 and 1), so the final
    header write switching to the new table was refused and the repair failed, where qemu-img's
    repair succeeds.  Now the guard drops the old structures and enters the new ones first."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, 0, options={"compat": "0.10"})
    poke(path, read_u64(path, 48) + 8 * 290, ">Q", 0x4000)
    ours, _ = _same_as_qemu(path, "-r", "all")
    assert ours.rc == 0 and "Rebuilding refcount structure" in ours.stderr
    assert qemu.qemu_img("check", path, check=False).returncode == 0


def _reftable_entry_far_away(tmp_path, nb_clusters_away: int) -> str:
    """A 512-byte-cluster image whose refcount table entry 1 points ``nb_clusters_away``
    clusters into the (non-existent) rest of the file."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, 0, options={"compat": "0.10", "cluster_size": "512"})
    poke(path, read_u64(path, 48) + 8, ">Q", nb_clusters_away * 512)
    return path


def test_compare_after_a_repair_grew_the_file_is_per_block(tmp_path):
    """Found by atheris (a timeout: 37 s on one input).  ``check -r all`` grows the file for a
    refcount block outside it; the comparison then walked every cluster of the grown file in
    Python, also where there is no refcount block and nothing is referenced.  Now such ranges
    are skipped in bulk: the comparison's Python steps grow with the number of refcount blocks,
    not clusters (counted with a line tracer, not timed).  The verdict is qemu-img's."""
    path = _reftable_entry_far_away(tmp_path, 100_000)
    from qcow2 import check as check_module
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if frame.f_code is check_module._Checker.compare.__code__:
            if event == "line":
                lines += 1
            return tracer
        return None
    copy = path + ".copy"
    shutil.copyfile(path, copy)
    with Image(copy, "r+", _repair=True) as img:
        sys.settrace(tracer)
        try:
            res = check_image(img, "all")
        finally:
            sys.settrace(None)
    assert res.failed is None and res.corruptions_fixed
    assert lines < 20_000, f"{lines} lines run in compare() for 100000 clusters"
    _same_as_qemu(path)
    # repaired, qemu-img finds both copies clean (its rebuild puts each new refcount block inside
    # the range it covers, ours at the first free cluster: image-end-offset differs)
    theirs = path + ".qemu"
    shutil.copyfile(path, theirs)
    assert qemu_check(theirs, "-r", "all").rc == our_check(path, "-r", "all").rc == 0
    assert qemu.qemu_img("check", path, check=False).returncode == 0


def test_repair_refuses_to_grow_the_file_past_the_count_cap(tmp_path):
    """A deliberate difference from qemu-img: a refcount block 5M clusters past the end of the
    file would make the check's count array grow by 10 MiB; past the cap (8 MiB) the repair
    fails with QEMU's words for a failed allocation, "Check failed: Cannot allocate memory",
    and leaves the file as it was (qemu-img grows it to 2.5 GB and goes on)."""
    path = _reftable_entry_far_away(tmp_path, 5 << 20)
    size = os.path.getsize(path)
    ours = our_check(path, "-r", "all")
    assert ours.rc == 1 and "Check failed: Cannot allocate memory" in ours.stderr
    assert os.path.getsize(path) == size


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("args", [(), ("-r", "all")])
def test_l2_entry_with_copied_and_offset_zero_is_unallocated(tmp_path, compat, args):
    """Found by fuzzing (an L2 entry aimed at the header: 0x8000000000000a00 -> COPIED with
    host offset 0).  Without an external data file, offset 0 means unallocated whatever the
    COPIED bit says, as qemu-img counts it; the bulk path of our check counted a reference to
    cluster 0 (an error where qemu-img sees one leak), and its repair set the header's refcount
    to 2, which qemu-img then reported as leaked."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, 512, options={"compat": compat, "cluster_size": "512"})
    qemu.qemu_io(path, "write -P 1 0 512")
    l2 = read_u64(path, read_u64(path, 40)) & C.L1E_OFFSET_MASK
    poke(path, l2, ">Q", 1 << 63)
    _same_as_qemu(path, *args)
    assert qemu.qemu_img("check", path, check=False).returncode == (0 if args else 3)


@pytest.mark.parametrize("args", [(), ("-r", "all")])
def test_file_ending_inside_a_sector_counts_in_whole_sectors(tmp_path, args):
    """Found by fuzzing (a 1544-byte image whose L1 table was moved to 0x800, the cluster after
    the file's partial last sector).  QEMU measures the file in whole sectors, so the table is not
    "beyond the end of the file by one cluster or more": qemu-img counts its reference (an error
    for cluster 4, refcount 0); we reported the region as past the end."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, 512, options={"compat": "0.10", "cluster_size": "512"})
    os.truncate(path, 3 * 512 + 8)
    poke(path, 40, ">Q", 0x800)
    ours, ref = _same_as_qemu(path, *args)
    assert ref.rc == (0 if args else 2), ref.stderr
    if args:     # repaired alike: qemu-img sees the same in both copies
        assert qemu.qemu_img("check", path, check=False).returncode == \
            qemu.qemu_img("check", path + ".qemu", check=False).returncode


def test_l1_table_grown_over_l2_tables_checks_each_distinct_table_once(tmp_path, monkeypatch):
    """Found by fuzzing (l1_size 1 -> 0x10001 on a 64 KiB-cluster image: the L1 table runs over
    L2 tables and data, whose entries then name the same few clusters as "L2 tables" ~14,000
    times).  qemu-img reads each again in 0.4 s; our per-table decoding in Python took 8.6 s and
    the fuzz watchdog fired with repair on top.  The table bytes' answer is now kept, so each
    distinct table is decoded once; the result is still qemu-img's."""
    from qcow2 import check as check_module
    from qcow2._fuzzgen import Op, SnapshotStep, build_image
    image = build_image(0, {"cluster_size": 65536, "compat": "0.10"},
                        [Op("resize", 0, 0x6d600), Op("pwrite", 0x60000, 0xd600, 142),
                         SnapshotStep("snap0"), Op("pwrite", 0x39e00, 0x211, 70)])
    path = str(tmp_path / "img.qcow2")
    with open(path, "wb") as f:
        f.write(image.data)
    poke(path, 36, ">I", 0x10001)
    calls = {"lookups": 0, "decoded": 0}
    lookup, decode = check_module._Checker._plain_offsets, check_module._Checker._plain_offsets_of

    def counted(name, fn):
        def wrapper(self, raw):
            calls[name] += 1
            return fn(self, raw)
        return wrapper
    monkeypatch.setattr(check_module._Checker, "_plain_offsets", counted("lookups", lookup))
    monkeypatch.setattr(check_module._Checker, "_plain_offsets_of", counted("decoded", decode))
    with Image(path, "r") as img:
        check_image(img, None)
    assert calls["lookups"] > 10_000 and calls["decoded"] < 100, calls
    _same_as_qemu(path)
    _same_as_qemu(path, "-r", "all")
