"""Regressions found by fuzzing (tests/test_fuzz_properties.py with qcow2.strategies, and the
atheris harness tools/fuzz_qcow2.py), each reproduced without Hypothesis or atheris.

Fixtures are made with qemu-img and bytes poked into them; qemu-img 7.2 is the reference where it
behaves sanely, and each test says where we deliberately do better.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

import qcow2
from qcow2 import constants as C
from qcow2.check import check_image
from qcow2.errors import CorruptImageError, OverlapError, Qcow2Error
from qcow2.image import Image

import qemu
from fuzz_support import poke, read_u64, tmpfs_or

KiB = 1024




def test_writes_past_the_host_offset_limit_are_refused(tmp_path):
    """Found by fuzzing (corruption "pointer-into-metadata": refcount_table_offset -> 0).  The
    refcount table then is cluster 0, and the header's first bytes ("QFI\\xfb" 0 0 0 2) read as a
    refcount block at 0x514649fb00000000, near 2^62.  Growing the disk allocates a cluster and
    wrote that refcount block there: on tmpfs a 5.8 EB sparse file (qemu-img 7.2 does exactly the
    same).  No qcow2 structure can lie at or past 2^56 (the guard does not even list such
    offsets), so the guard now refuses such writes as corruption: OverlapError, the image marked
    corrupt, the file unchanged but for the corrupt bit."""
    directory = tmpfs_or(tmp_path)
    try:
        path = os.path.join(directory, "img.qcow2")
        qemu.create(path, 0, options={"cluster_size": "512"})
        poke(path, 48, ">Q", 0)
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
    l1_offset = read_u64(path, 40)
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
    poke(path, 36, ">I", 3417856)
    with qcow2.open(path, "r+") as img:
        assert len(img.l1_table) == img.header.nb_l1_entries_needed == 1
        with pytest.raises(OverlapError, match="overlaps with active L1 table"):
            img.pwrite(b"\x44" * 1024, 0)


def test_refcount_table_entry_cut_by_the_end_of_the_file(tmp_path):
    """Found by fuzzing (refcount_table_clusters 1 -> 7 on a 512-byte-cluster image whose file
    does not end on a cluster boundary): the last refcount table entry inside the file was cut
    after 6 of its 8 bytes.  QEMU reads the missing bytes as zeros, so the entry is a (bogus)
    refcount block "outside image"; we dropped the partial entry and counted one corruption
    less."""
    path = str(tmp_path / "img.qcow2")
    qemu.create(path, "64K", options={"cluster_size": "512"})
    reftable = read_u64(path, 48)
    with open(path, "r+b") as f:        # entry 1 cut after 6 bytes: 0x0000_0000_1000_00..
        f.truncate(reftable + 8 + 6)
        f.seek(reftable + 8)
        f.write(b"\0\0\0\0\x10\0")
    poke(path, 56, ">I", 2)              # ... and the table runs past the end of the file
    ref = qemu.qemu_img("check", "--output=json", path, check=False)
    with qcow2.open(path) as img:
        res = img.check()
    assert "ERROR refcount block 1 is outside image" in res.messages
    assert "ERROR refcount block 1 is outside image" in ref.stderr
    assert res.corruptions == json.loads(ref.stdout)["corruptions"]


@pytest.mark.parametrize("layout", ["v2", "v3-over-backing", "v2-over-backing"])
def test_freeing_a_table_that_had_no_refcount(tmp_path, layout):
    """Found by fuzzing the writes (corruption "huge-value": the L1 table offset aimed 67
    clusters past the end of the file, where no refcount block counts anything).  Growing the
    disk moves the L1 table and frees the old one.  Its clusters have refcount 0: QEMU refuses
    that free ("qcow2_free_clusters failed: Invalid argument") and goes on.  We queued it: the
    resize then failed marking the image corrupt (refcount -1), or - version 2 over a backing
    file, where the grown area is first written with zeros - the data cluster allocated there in
    the meantime got the decrement: a live cluster freed.  Now such a decrement is dropped, and
    qemu-img check finds on our result what it finds on qemu-img's own (one leaked cluster, the
    first L1 table), no corruption.  (qemu-img 7.2 cannot grow a version 2 image over a backing
    file, "Failed to zero out new clusters": that variant is checked on our result alone.)"""
    path = str(tmp_path / "img.qcow2")
    opts = {"cluster_size": "512", "compat": "1.1" if layout.startswith("v3") else "0.10"}
    if "backing" in layout:
        base = str(tmp_path / "base.qcow2")
        qemu.create(base, "64K", options=opts)
        qemu.qemu_io(base, "write -P 0x11 0 64k")
        qemu.create(path, "512", options=opts, backing=base, backing_fmt="qcow2")
    else:
        qemu.create(path, "512", options=opts)
    poke(path, 40, ">Q", 0x8600)
    theirs = str(tmp_path / "theirs.qcow2")
    shutil.copyfile(path, theirs)
    with qcow2.open(path, "r+") as img:
        img.resize(33280)
        img.pwrite(b"\x55" * 4096, 0)
        assert not img.corrupt
    with qcow2.open(path) as img:
        assert img.pread(4096, 0) == b"\x55" * 4096
    ours = json.loads(qemu.qemu_img("check", "--output=json", path, check=False).stdout)
    assert ours.get("corruptions", 0) == 0 and ours.get("leaks") == 1
    if layout != "v2-over-backing":
        qemu.qemu_img("resize", theirs, "33280")
        qemu.qemu_io(theirs, "write -P 0x55 0 4k")
        ref = json.loads(qemu.qemu_img("check", "--output=json", theirs, check=False).stdout)
        assert ref.get("corruptions", 0) == 0 and ref.get("leaks") == 1


def test_header_rewrite_over_a_snapshot_table_at_offset_0_is_refused(tmp_path):
    """Found by fuzzing (nb_snapshots 0 -> 2 with snapshots_offset 0: the "snapshot table" is the
    header).  A header rewrite outside a snapshot-table repair must not overlap it: it would
    rewrite the snapshot entries too (here pointing a snapshot L1 at the refcount block, which the
    next refcount update then wrote over).  The resize is refused as an overlap and the image
    marked corrupt; only a repair, which moves the table away, rewrites the header over it."""
    path = str(tmp_path / "img.qcow2")
    qcow2.create(path, 0, cluster_size=512, compat="1.1", refcount_bits=1).close()
    poke(path, 60, ">I", 2)
    with Image(path, "r+", overlap_check="all") as img:
        with pytest.raises(OverlapError, match="overlaps with snapshot table"):
            img.resize(512)
        assert img.corrupt
    with open(path, "rb") as f:
        head = f.read(104)
    assert struct.unpack_from(">Q", head, 24)[0] == 0          # the size was not rewritten
    assert struct.unpack_from(">Q", head, 72)[0] & C.INCOMPAT_CORRUPT
