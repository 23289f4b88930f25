"""Regressions found by fuzzing (tests/test_fuzz_properties.py with qcow2.strategies, and the
atheris harness tools/fuzz_qcow2.py), each reproduced without Hypothesis or atheris.

Fixtures are made with qemu-img and bytes poked into them; qemu-img 7.2 is the reference where it
behaves sanely, and each test says where we deliberately do better.
"""

from __future__ import annotations

import os
import resource
import shutil
import struct
import subprocess

import pytest

import qcow2
from qcow2 import constants as C
from qcow2.check import check_image
from qcow2.errors import CorruptImageError, OverlapError, Qcow2Error
from qcow2.image import Image

import qemu
from fuzz_support import our_check

KiB = 1024


def _poke(path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _u64(path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def _tmpfs_or(tmp_path):
    """A directory on tmpfs when there is one (it allows sparse files of hundreds of TiB, which
    is what some of these cases need to show), else ``tmp_path``."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        import tempfile
        return tempfile.mkdtemp(prefix="qcow2-regress-", dir="/dev/shm")
    return str(tmp_path)


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
    directory = _tmpfs_or(tmp_path) if where == "tmpfs" else str(tmp_path)
    try:
        path = os.path.join(directory, "img.qcow2")
        qemu.create(path, 0, options={"compat": "0.10", "cluster_size": "512"})
        _poke(path, 56, ">I", 2)
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
    _poke(path, 56, ">I", 2)
    size = os.path.getsize(path)
    with Image(path, "r+", _repair=True) as img:
        res = check_image(img, "all")
    assert res.failed in (None, "Cannot allocate memory")
    assert os.path.getsize(path) <= size + 4 * 512


def test_writes_past_the_host_offset_limit_are_refused(tmp_path):
    """Found by fuzzing (corruption "pointer-into-metadata": refcount_table_offset -> 0).  The
    refcount table then is cluster 0, and the header's first bytes ("QFI\\xfb" 0 0 0 2) read as a
    refcount block at 0x514649fb00000000, near 2^62.  Growing the disk allocates a cluster and
    wrote that refcount block there: on tmpfs a 5.8 EB sparse file (qemu-img 7.2 does exactly the
    same).  No qcow2 structure can lie at or past 2^56 (the guard does not even list such
    offsets), so the guard now refuses such writes as corruption: OverlapError, the image marked
    corrupt, the file unchanged but for the corrupt bit."""
    directory = _tmpfs_or(tmp_path)
    try:
        path = os.path.join(directory, "img.qcow2")
        qemu.create(path, 0, options={"cluster_size": "512"})
        _poke(path, 48, ">Q", 0)
        before = open(path, "rb").read()
        img = qcow2.open(path, "r+")
        with pytest.raises(OverlapError, match="past the host offset limit .*0x514649fb00000000"):
            img.resize(512)
        assert img.corrupt
        img.close()
        after = open(path, "rb").read()
        assert len(after) == len(before)
        assert struct.unpack_from(">Q", after, 72)[0] & C.INCOMPAT_CORRUPT
        assert after[:72] == before[:72] and after[80:] == before[80:]
    finally:
        if directory != str(tmp_path):
            shutil.rmtree(directory, ignore_errors=True)


def test_guard_refuses_any_write_reaching_past_2_56(tmp_path):
    """The guard's limit itself, for every metadata mode (even ``none``)."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, "1M")
    for mode in ("none", "cached", "all"):
        with qcow2.open(path, "r+", overlap_check=mode) as img:
            img.guard.check_write(C.MAX_HOST_OFFSET - 512, 512)     # ends at the limit: fine
            with pytest.raises(OverlapError, match="host offset limit"):
                img.guard.check_write(C.MAX_HOST_OFFSET - 512, 513)
            assert img.corrupt
        with Image(path, "r+", _repair=True) as img:                # clear the corrupt bit
            assert check_image(img, "all").failed is None


def test_write_to_an_image_cut_inside_its_l1_table(tmp_path):
    """Found by fuzzing (corruption "truncated-table": the file cut at the L1 table).  The reader
    keeps only the L1 entries inside the file; the writer indexed entries up to ``l1_size`` and
    failed with IndexError.  QEMU reads the missing entries as zeros; so do we now, and the
    result is byte-identical to qemu-io's."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, "64K", options={"cluster_size": "512"})
    l1_offset = _u64(path, 40)
    with open(path, "r+b") as f:
        f.truncate(l1_offset)
    theirs = str(tmp_path / "qemu.qcow2")
    shutil.copyfile(path, theirs)
    qemu.qemu_io(theirs, "write -P 0x33 0 512")
    with qcow2.open(path, "r+") as img:
        img.pwrite(b"\x33" * 512, 0)
    assert open(path, "rb").read() == open(theirs, "rb").read()
    with qcow2.open(path) as img:
        assert img.pread(512, 0) == b"\x33" * 512


def test_file_cut_inside_the_header_refuses_writes_cleanly(tmp_path):
    """Found by fuzzing: the file cut at byte 0x3c (inside the header: the L1 table, the
    snapshot fields and everything after read as missing).  A write must fail with a Qcow2Error
    (the refcount structures are gone, so the first allocation would be cluster 0), never with
    another exception."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, "512", options={"cluster_size": "512", "compat": "0.10"})
    with open(path, "r+b") as f:
        f.truncate(0x3C)
    try:
        img = qcow2.open(path, "r+")
    except Qcow2Error:
        return
    with img:
        with pytest.raises(CorruptImageError):
            img.pwrite(b"x" * 512, 0)


def test_writer_l1_table_stops_at_what_the_size_needs(tmp_path):
    """Found by atheris (a slow unit): with the fix above the writer extended its L1 table up to
    a hostile ``l1_size`` (3.4M entries of zeros past the end of the file), which the guard then
    walked in Python at every rebuild.  Writes only ever index the entries the virtual size
    needs, so the table is extended only that far.  (The 27 MiB such an L1 table claims covers
    the end of the file, so the first allocation overlaps it: refused, as qemu-io refuses it.)"""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, "64K", options={"cluster_size": "1024"})
    _poke_u32(path, 36, 3417856)
    with qcow2.open(path, "r+") as img:
        assert len(img.l1_table) == img.header.nb_l1_entries_needed == 1
        with pytest.raises(OverlapError, match="overlaps with active L1 table"):
            img.pwrite(b"\x44" * 1024, 0)


def _poke_u32(path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">I", value))
