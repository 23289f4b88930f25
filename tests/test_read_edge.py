"""Robustness of the read path on damaged, hostile and unusual files.

Fixtures are made by qemu-img/qemu-io and then damaged by poking bytes at offsets read straight
from the on-disk header with ``struct`` (not with our own codecs), so a codec bug cannot hide a
reader bug.  Only :class:`qcow2.Qcow2Error` subclasses may escape ``qcow2.open``, ``pread`` and
``map``; where QEMU 7.2 can still read a damaged image, we must read the same bytes.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2
from qcow2 import (BackingError, CorruptImageError, FormatError, NotQcow2Error, Qcow2Error,
                   RequestError, UnsupportedError)

from qemu import QEMU_IMG, create, create_encrypted, qemu_img, qemu_io, require_qemu

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB
COMPRESSED_GUEST = 1 * MiB       # guest offset of the compressed cluster in the rich image
ZERO_GUEST = 2 * MiB             # guest offset of a zero cluster
DATA_GUEST = 0                   # guest offset of the first data cluster


# -- raw on-disk helpers (independent of qcow2.header / qcow2.tables) ---------------------------

def u64(path, offset) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def u32(path, offset) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">I", f.read(4))[0]


def poke(path, offset, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def l1_offset(path) -> int:
    return u64(path, 40)


def l2_offset(path, l1_index=0) -> int:
    return u64(path, l1_offset(path) + 8 * l1_index) & 0x00FFFFFFFFFFFE00


def l2_entry_pos(path, guest_offset) -> int:
    """Host offset of the (standard, 8-byte) L2 entry mapping ``guest_offset``."""
    cluster_bits = u32(path, 20)
    l2_entries = (1 << cluster_bits) // 8
    index = guest_offset >> cluster_bits
    return l2_offset(path, index // l2_entries) + 8 * (index % l2_entries)


def exercise(img, limit=4 * MiB) -> bytes:
    """Everything a reader does: read (bounded), map, as_file, every snapshot."""
    n = min(img.size, limit)
    data = img.pread(n, 0)
    img.map(0, n)
    img.as_file().read(4096)
    for entry in getattr(img, "snapshots", ()):
        view = img.snapshot(entry.id_str)
        m = min(view.size, limit)
        view.pread(m, 0)
        view.map(0, m)
    return data


def open_and_read(path, limit=4 * MiB) -> bytes:
    with qcow2.open(str(path)) as img:
        return exercise(img, limit)


def qemu_raw(path, tmp_path) -> bytes | None:
    """The raw bytes qemu-img convert produces, or None when QEMU cannot read the image."""
    out = tmp_path / "qemu-out.raw"
    proc = subprocess.run([QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", str(path), str(out)],
                          capture_output=True, text=True)
    if proc.returncode:
        return None
    data = out.read_bytes()
    out.unlink()
    return data


def assert_reads_like_qemu(path, tmp_path) -> None:
    """Where qemu-img reads the image we read the same bytes; where it refuses, we refuse."""
    theirs = qemu_raw(path, tmp_path)
    if theirs is None:
        with pytest.raises(Qcow2Error):
            open_and_read(path)
    else:
        assert open_and_read(path) == theirs[:4 * MiB]


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rich_template(tmp_path_factory) -> str:
    """A 4 MiB image, 64k clusters: data, a compressed cluster, a zero cluster, a snapshot."""
    require_qemu()
    d = tmp_path_factory.mktemp("rich")
    path = create(d / "rich.qcow2", 4 * MiB, options={"cluster_size": CLUSTER})
    qemu_io(path, "write -P 0x5a 0 100000", f"write -c -P 0x6b {COMPRESSED_GUEST} {CLUSTER}",
            f"write -P 0x11 {ZERO_GUEST} {CLUSTER}", f"write -z {ZERO_GUEST} {CLUSTER}")
    qemu_img("snapshot", "-c", "snap", path)
    qemu_io(path, "write -P 0x7c 3000 5000", "write -P 0x7d 3145728 70000")
    return path


@pytest.fixture
def rich(rich_template, tmp_path) -> str:
    path = str(tmp_path / "img.qcow2")
    shutil.copyfile(rich_template, path)
    return path


# -- not an image at all -----------------------------------------------------------------------

def test_empty_file(tmp_path):
    p = tmp_path / "empty"
    p.write_bytes(b"")
    with pytest.raises(NotQcow2Error):
        qcow2.open(str(p))


@pytest.mark.parametrize("content", [b"hello world" * 1000, bytes(1 * MiB), b"QFI\x00" + bytes(508),
                                     b"QFI", b"\xfbIFQ" + bytes(200)],
                         ids=["text", "zeros", "qcow-v1-magic", "short-magic", "byteswapped"])
def test_not_qcow2(tmp_path, content):
    p = tmp_path / "file"
    p.write_bytes(content)
    with pytest.raises(NotQcow2Error, match="not in qcow2 format"):
        qcow2.open(str(p))


def test_directory(tmp_path):
    with pytest.raises(Qcow2Error, match="regular file"):
        qcow2.open(str(tmp_path))


def test_missing_file(tmp_path):
    with pytest.raises(Qcow2Error, match="No such file or directory"):
        qcow2.open(str(tmp_path / "nope.qcow2"))


def test_raw_image_is_not_qcow2(tmp_path):
    """A raw image of qemu's making is refused as qcow2 with qemu's words."""
    p = create(tmp_path / "r.raw", 1 * MiB, fmt="raw")
    with pytest.raises(NotQcow2Error):
        qcow2.open(p)


# -- truncation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [0, 3, 4, 7, 8, 19, 20, 23, 24, 35, 36, 71, 72, 99, 100, 103, 104,
                                 105, 112, 200, 1000, 4096])
def test_header_cut(rich, cut, tmp_path):
    """QEMU refuses a header cut before byte 104 ('qcow2 header too short'), and reads past EOF
    as zeros after that: we refuse where QEMU refuses and read QEMU's bytes where it reads."""
    os.truncate(rich, cut)
    assert_reads_like_qemu(rich, tmp_path)


def test_truncated_anywhere_is_read_like_qemu_or_refused(rich_template, tmp_path):
    """Cut the file at metadata and data boundaries (and one byte either side)."""
    size = os.path.getsize(rich_template)
    points = {size - 1, size - 512, CLUSTER, CLUSTER + 1}
    for k in range(1, size // CLUSTER + 1):
        points |= {k * CLUSTER - 1, k * CLUSTER, k * CLUSTER + 1, k * CLUSTER + 4321}
    points = sorted(p for p in points if 0 < p < size)
    path = tmp_path / "cut.qcow2"
    for cut in points:
        shutil.copyfile(rich_template, path)
        os.truncate(path, cut)
        assert_reads_like_qemu(path, tmp_path)


def test_l1_beyond_eof(rich, tmp_path):
    poke(rich, 40, struct.pack(">Q", 64 * MiB))          # aligned, far past EOF
    assert_reads_like_qemu(rich, tmp_path)


def test_l2_beyond_eof(rich, tmp_path):
    l1 = l1_offset(rich)
    poke(rich, l1, struct.pack(">Q", (1 << 63) | 64 * MiB))
    assert_reads_like_qemu(rich, tmp_path)


def test_data_cluster_beyond_eof(rich, tmp_path):
    poke(rich, l2_entry_pos(rich, DATA_GUEST), struct.pack(">Q", (1 << 63) | 256 * MiB))
    assert_reads_like_qemu(rich, tmp_path)


# -- corrupt tables ------------------------------------------------------------------------------

def test_unaligned_l2_offset(rich):
    l1 = l1_offset(rich)
    entry = u64(rich, l1)
    poke(rich, l1, struct.pack(">Q", entry + 512))
    img = qcow2.open(rich)          # the L1 table itself is fine; the error comes on use
    with pytest.raises(CorruptImageError, match="0x[0-9a-f]+"):
        img.pread(512, 0)
    with pytest.raises(CorruptImageError):
        img.map()
    img.close()


def test_unaligned_data_cluster_offset(rich):
    pos = l2_entry_pos(rich, DATA_GUEST)
    entry = u64(rich, pos)
    poke(rich, pos, struct.pack(">Q", entry + 512))
    with qcow2.open(rich) as img:
        with pytest.raises(CorruptImageError, match="unaligned"):
            img.pread(1, 0)
        with pytest.raises(CorruptImageError):
            img.map(0, CLUSTER)
        # the rest of the disk stays readable
        assert img.pread(16, 3 * MiB) != bytes(16)
    rc = subprocess.run([QEMU_IMG, "convert", "-O", "raw", rich, rich + ".raw"],
                        capture_output=True).returncode
    assert rc != 0, "qemu reads an unaligned data cluster: the fixture is wrong"


def test_unaligned_zero_alloc_cluster_offset(rich):
    """A zero cluster that keeps its allocation must be aligned too (QEMU: -EIO)."""
    pos = l2_entry_pos(rich, ZERO_GUEST)
    entry = u64(rich, pos)
    assert entry & 1, "fixture: the zero write did not leave a zero flag"
    if not entry & 0x00FFFFFFFFFFFE00:
        pytest.skip("qemu dropped the allocation of the zero cluster")
    poke(rich, pos, struct.pack(">Q", entry + 512))
    with qcow2.open(rich) as img:
        with pytest.raises(CorruptImageError):
            img.map(ZERO_GUEST, CLUSTER)


@pytest.mark.parametrize("garbage", [b"\xff" * 64, bytes(64), os.urandom(64)],
                         ids=["ff", "zeros", "random"])
def test_compressed_garbage(rich, garbage):
    descriptor = u64(rich, l2_entry_pos(rich, COMPRESSED_GUEST))
    assert descriptor & (1 << 62), "fixture: no compressed cluster"
    x = 62 - (16 - 8)
    host = descriptor & ((1 << x) - 1)
    poke(rich, host, garbage)
    with qcow2.open(rich) as img:
        with pytest.raises(CorruptImageError, match="0x[0-9a-f]+"):
            img.pread(CLUSTER, COMPRESSED_GUEST)
        assert img.pread(100, 0) == b"\x5a" * 100


def test_compressed_descriptor_beyond_eof(rich):
    pos = l2_entry_pos(rich, COMPRESSED_GUEST)
    x = 62 - (16 - 8)
    poke(rich, pos, struct.pack(">Q", (1 << 62) | (3 << x) | (200 * MiB + 77)))
    with qcow2.open(rich) as img:
        with pytest.raises(CorruptImageError):
            img.pread(10, COMPRESSED_GUEST + 5)


def test_compressed_descriptor_short(rich):
    """A descriptor claiming one sector for a stream that needs more: CorruptImageError."""
    pos = l2_entry_pos(rich, COMPRESSED_GUEST)
    descriptor = u64(rich, pos)
    x = 62 - (16 - 8)
    host = descriptor & ((1 << x) - 1)
    # point at the uncompressed data cluster: a valid-looking offset with non-deflate bytes
    data_host = u64(rich, l2_entry_pos(rich, DATA_GUEST)) & 0x00FFFFFFFFFFFE00
    poke(rich, pos, struct.pack(">Q", (1 << 62) | data_host))
    assert host != data_host
    with qcow2.open(rich) as img:
        with pytest.raises(CorruptImageError):
            img.pread(CLUSTER, COMPRESSED_GUEST)


def test_compressed_cluster_in_extended_l2_with_bitmap(tmp_path):
    path = create(tmp_path / "x.qcow2", 1 * MiB,
                  options={"cluster_size": CLUSTER, "extended_l2": "on"})
    qemu_io(path, f"write -c -P 0x12 0 {CLUSTER}")
    l2 = l2_offset(path)
    assert u64(path, l2) & (1 << 62)
    poke(path, l2 + 8, struct.pack(">Q", 1))             # a subcluster bit on a compressed entry
    with qcow2.open(path) as img:
        with pytest.raises(CorruptImageError):
            img.pread(512, 0)


def test_extended_l2_alloc_and_zero_bits(tmp_path):
    path = create(tmp_path / "x.qcow2", 1 * MiB,
                  options={"cluster_size": CLUSTER, "extended_l2": "on"})
    qemu_io(path, "write -P 0x12 0 2048")
    l2 = l2_offset(path)
    bitmap = u64(path, l2 + 8)
    assert bitmap & 1
    poke(path, l2 + 8, struct.pack(">Q", bitmap | (1 << 32)))   # subcluster 0 data AND zero
    with qcow2.open(path) as img:
        with pytest.raises(CorruptImageError, match="0x"):
            img.pread(512, 0)


# -- encryption and header limits --------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["luks", "aes"])
def test_encrypted_image_refused(tmp_path, fmt):
    path = create_encrypted(tmp_path / f"{fmt}.qcow2", fmt)
    assert u32(path, 32) == (2 if fmt == "luks" else 1)
    with pytest.raises(UnsupportedError, match="encryption is not supported"):
        qcow2.open(path)
    with pytest.raises(UnsupportedError, match="encryption is not supported"):
        qcow2.open(path, open_backing=False)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        try:
            fn()
        except Qcow2Error:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_l1_size_over_limit_is_refused_without_allocating(rich):
    poke(rich, 24, struct.pack(">Q", 1 << 60))             # virtual size needing a huge L1
    poke(rich, 36, struct.pack(">I", 0xFFFFFFFF))
    with pytest.raises(FormatError, match="Active L1 table too large|Image is too big"):
        qcow2.open(rich)
    assert _peak(lambda: qcow2.open(rich)) < 4 * MiB


def test_l1_size_just_over_limit(rich):
    poke(rich, 24, struct.pack(">Q", (1 << 22) * (1 << 29)))
    poke(rich, 36, struct.pack(">I", (32 * MiB) // 8 + 1))
    with pytest.raises(FormatError, match="Active L1 table too large"):
        qcow2.open(rich)


def test_max_l1_beyond_eof_does_not_allocate(rich):
    poke(rich, 24, struct.pack(">Q", (1 << 22) * (1 << 29)))  # needs 4M L1 entries
    poke(rich, 36, struct.pack(">I", (32 * MiB) // 8))       # = the 32 MiB limit: legal
    assert _peak(lambda: open_and_read(rich, limit=1 * MiB)) < 8 * MiB


def test_snapshot_huge_l1_does_not_allocate(rich):
    nb = u32(rich, 60)
    assert nb == 1
    snap = u64(rich, 64)
    poke(rich, snap + 8, struct.pack(">I", (32 * MiB) // 8))
    img = qcow2.open(rich)
    try:
        assert _peak(lambda: img.snapshot("snap").pread(4096, 0)) < 8 * MiB
    finally:
        img.close()


def test_snapshot_l1_over_limit(rich):
    snap = u64(rich, 64)
    poke(rich, snap + 8, struct.pack(">I", (32 * MiB) // 8 + 1))
    try:
        img = qcow2.open(rich)
    except FormatError:
        return                      # refused at open: fine too
    with img, pytest.raises(FormatError, match="too large"):
        img.snapshot("snap")


def test_snapshot_unaligned_l1(rich):
    snap = u64(rich, 64)
    off = u64(rich, snap)
    poke(rich, snap, struct.pack(">Q", off + 8))
    try:
        img = qcow2.open(rich)
    except FormatError:
        return
    with img, pytest.raises(FormatError, match="0x"):
        img.snapshot("snap")


def test_unknown_snapshot(rich):
    with qcow2.open(rich) as img, pytest.raises(Qcow2Error, match="nope"):
        img.snapshot("nope")


def test_unaligned_header_size_like_qemu(tmp_path):
    path = create(tmp_path / "x.qcow2", 1000448, options={"cluster_size": 4096})
    qemu_io(path, "write -P 0x33 999000 1448")
    poke(path, 24, struct.pack(">Q", 1000000))
    theirs = qemu_raw(path, tmp_path)
    with qcow2.open(path) as img:
        assert img.size == len(theirs)
        assert img.pread(img.size, 0) == theirs


def test_unaligned_header_size_reads_consistently(tmp_path):
    """Whatever size we expose, the bytes agree with QEMU's on the common prefix."""
    path = create(tmp_path / "x.qcow2", 1000448, options={"cluster_size": 4096})
    qemu_io(path, "write -P 0x33 999000 1448")
    poke(path, 24, struct.pack(">Q", 1000000))
    theirs = qemu_raw(path, tmp_path)
    with qcow2.open(path) as img:
        ours = img.pread(img.size, 0)
    n = min(len(ours), len(theirs))
    assert ours[:n] == theirs[:n]


# -- backing files -------------------------------------------------------------------------------

def _overlay(tmp_path, name, backing, fmt="qcow2") -> str:
    """An overlay created with -u (qemu-img does not open, so it can point anywhere)."""
    path = str(tmp_path / name)
    qemu_img("create", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, path, "1M")
    return path


def test_missing_backing_file(tmp_path):
    top = _overlay(tmp_path, "top.qcow2", "missing.qcow2")
    with pytest.raises(BackingError, match="missing.qcow2"):
        qcow2.open(top)
    # without the backing chain the image opens (qemu-img info's no-backing open)
    with qcow2.open(top, open_backing=False) as img:
        assert img.backing_filename == "missing.qcow2"


def test_backing_is_a_directory(tmp_path):
    os.mkdir(tmp_path / "d")
    top = _overlay(tmp_path, "top.qcow2", "d", fmt="raw")
    with pytest.raises(BackingError):
        qcow2.open(top)


def test_backing_symlink_loop_unreadable(tmp_path):
    """An unopenable backing file.  (chmod 000 does not stop root, and the suite runs as root,
    so we use ELOOP, which stops everyone; chmod is covered below only for non-root users.)"""
    os.symlink("b.raw", tmp_path / "a.raw")
    os.symlink("a.raw", tmp_path / "b.raw")
    top = _overlay(tmp_path, "top.qcow2", "a.raw", fmt="raw")
    with pytest.raises(BackingError):
        qcow2.open(top)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read chmod 000 files (see ELOOP test)")
def test_backing_chmod_000(tmp_path):
    base = create(tmp_path / "base.qcow2", 1 * MiB)
    top = _overlay(tmp_path, "top.qcow2", "base.qcow2")
    os.chmod(base, 0)
    try:
        with pytest.raises(BackingError, match="Permission denied"):
            qcow2.open(top)
    finally:
        os.chmod(base, 0o644)


def test_backing_wrong_format(tmp_path):
    create(tmp_path / "base.raw", 1 * MiB, fmt="raw")
    top = _overlay(tmp_path, "top.qcow2", "base.raw", fmt="qcow2")   # says qcow2, is raw
    with pytest.raises(BackingError):
        qcow2.open(top)


def test_backing_unknown_format(tmp_path):
    create(tmp_path / "base.raw", 1 * MiB, fmt="raw")
    top = _overlay(tmp_path, "top.qcow2", "base.raw", fmt="vmdk")
    with pytest.raises(BackingError):
        qcow2.open(top)


def test_backing_self_loop(tmp_path):
    top = _overlay(tmp_path, "a.qcow2", "a.qcow2")
    with pytest.raises(BackingError, match="loop"):
        qcow2.open(top)


def test_backing_two_cycle(tmp_path):
    _overlay(tmp_path, "a.qcow2", "b.qcow2")
    _overlay(tmp_path, "b.qcow2", "a.qcow2")
    with pytest.raises(BackingError, match="loop"):
        qcow2.open(str(tmp_path / "a.qcow2"))


def test_backing_loop_through_other_spellings(tmp_path):
    """a -> ./sub/../b -> (absolute) a, and a hard link: the same file under other names."""
    os.mkdir(tmp_path / "sub")
    _overlay(tmp_path, "a.qcow2", "./sub/../b.qcow2")
    _overlay(tmp_path, "b.qcow2", str(tmp_path / "a.qcow2"))
    with pytest.raises(BackingError, match="loop"):
        qcow2.open(str(tmp_path / "a.qcow2"))
    _overlay(tmp_path, "h.qcow2", "h2.qcow2")
    os.link(tmp_path / "h.qcow2", tmp_path / "h2.qcow2")
    with pytest.raises(BackingError, match="loop"):
        qcow2.open(str(tmp_path / "h.qcow2"))


def test_backing_loop_with_format_probing(tmp_path):
    """A loop found while probing (no backing-format extension) is a loop too."""
    _overlay(tmp_path, "a.qcow2", "b.qcow2")
    _overlay(tmp_path, "b.qcow2", "a.qcow2")
    for name in ("a.qcow2", "b.qcow2"):
        p = str(tmp_path / name)
        head = open(p, "rb").read(4096)
        pos = head.find(bytes.fromhex("e2792aca"), 72)
        assert pos > 0
        poke(p, pos, bytes.fromhex("7a7a7a7a"))
    with pytest.raises(BackingError, match="loop"):
        qcow2.open(str(tmp_path / "a.qcow2"))


def test_deep_backing_chain(tmp_path):
    require_qemu()
    create(tmp_path / "c0.qcow2", 1 * MiB)
    qemu_io(str(tmp_path / "c0.qcow2"), "write -P 0x42 0 512")
    depth = 400
    for i in range(1, depth + 1):
        _overlay(tmp_path, f"c{i}.qcow2", f"c{i - 1}.qcow2")
    with qcow2.open(str(tmp_path / f"c{depth}.qcow2")) as img:
        assert img.pread(512, 0) == b"\x42" * 512
        assert img.map(0, 512)[0].depth == depth


def test_relative_data_file_with_cwd_at_image(tmp_path, monkeypatch):
    """QEMU 7.2 resolves a relative data-file name against its cwd (not the image directory); with
    cwd = the image directory both resolutions agree, and so must the bytes."""
    monkeypatch.chdir(tmp_path)
    create("img.qcow2", 1 * MiB, options={"data_file": "img.data"})
    qemu_io("img.qcow2", "write -P 0x24 1000 5000")
    theirs = qemu_raw("img.qcow2", tmp_path)
    with qcow2.open("img.qcow2") as img:
        assert img.pread(img.size, 0) == theirs


def test_missing_data_file(tmp_path):
    path = create(tmp_path / "img.qcow2", 1 * MiB,
                  options={"data_file": str(tmp_path / "img.data")})
    os.unlink(tmp_path / "img.data")
    with pytest.raises(Qcow2Error, match="img.data"):
        qcow2.open(path)


# -- requests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,offset", [
    (-1, 0),
    (1, -1), (1, 4 * MiB), (4 * MiB + 1, 0), (2, 4 * MiB - 1), (0, 4 * MiB + 1)])
def test_bad_requests(rich, length, offset):
    with qcow2.open(rich) as img:
        with pytest.raises(RequestError):
            img.pread(length, offset)
        assert isinstance(RequestError("x"), ValueError)


def test_zero_length_reads(rich):
    with qcow2.open(rich) as img:
        assert img.pread(0, 0) == b""
        assert img.pread(0, img.size) == b""
        assert img.map(img.size, 0) == []
        f = img.as_file()
        f.seek(0, 2)
        assert f.read(10) == b""


def test_as_file_read_past_end(rich):
    with qcow2.open(rich) as img:
        f = img.as_file()
        f.seek(10 * MiB)
        assert f.read(10) == b""
        assert f.readinto(bytearray(10)) == 0


def test_concurrent_readers_agree(rich_template, tmp_path):
    import threading
    theirs = qemu_raw(rich_template, tmp_path)
    errors = []
    with qcow2.open(rich_template) as img:
        def worker(seed):
            import random
            rng = random.Random(seed)
            try:
                for _ in range(200):
                    off = rng.randrange(0, img.size)
                    n = rng.randrange(0, min(img.size - off, 200_000) + 1)
                    if img.pread(n, off) != theirs[off:off + n]:
                        errors.append((off, n))
            except Exception as e:       # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


# -- fuzzing: only Qcow2Error may escape ---------------------------------------------------------

@pytest.fixture(scope="module")
def metadata_ranges(rich_template):
    """(offset, length) of the header cluster, L1, L2, reftable, refblock, snapshot table and the
    snapshot's L1 of the rich image, read with struct."""
    p = rich_template
    ranges = [(0, 512), (l1_offset(p), 8 * u32(p, 36)), (l2_offset(p), 512),
              (u64(p, 48) & ~0x1FF, 64), (u64(p, u64(p, 48)) & ~0x1FF, 64), (u64(p, 64), 128)]
    snap = u64(p, 64)
    ranges.append((u64(p, snap), 8 * u32(p, snap + 8)))
    return ranges


@settings(max_examples=max(20, settings().max_examples // 2),
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_metadata_raises_only_qcow2_errors(rich_template, metadata_ranges, tmp_path_factory,
                                                  data):
    blob = bytearray(open(rich_template, "rb").read())
    for _ in range(data.draw(st.integers(1, 4), label="nb_pokes")):
        start, length = data.draw(st.sampled_from(metadata_ranges), label="range")
        pos = start + data.draw(st.integers(0, max(0, length - 1)), label="pos")
        value = data.draw(st.sampled_from([
            st.binary(min_size=1, max_size=8),
            st.sampled_from([b"\xff" * 8, b"\x80" + bytes(7), b"\x00" * 8, b"\x40" + bytes(7),
                             b"\x7f\xff\xff\xff", b"\x00\x00\x02\x00"]),
        ]).flatmap(lambda s: s), label="bytes")
        blob[pos:pos + len(value)] = value
    d = tmp_path_factory.mktemp("fuzz")
    path = d / "f.qcow2"
    path.write_bytes(bytes(blob))
    tracemalloc.start()
    try:
        open_and_read(path, limit=1 * MiB)
    except Qcow2Error:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        shutil.rmtree(d)
    assert peak < 16 * MiB   # no allocation driven by an unchecked size field


def test_all_public_errors_are_qcow2_errors():
    for cls in (BackingError, CorruptImageError, FormatError, NotQcow2Error, RequestError,
                UnsupportedError):
        assert issubclass(cls, Qcow2Error)
    assert sys.modules["qcow2"].open is qcow2.open
