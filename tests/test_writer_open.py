"""Opening an image read-write (``qcow2.open(path, "r+")``), compared with what QEMU 7.2 does when
it opens an image read-write:

* lazy refcounts: the dirty bit is set on disk before the first write lands, and cleared at close;
* a dirty image (a writer with lazy refcounts died) is repaired at a read-write open;
* a corrupt image refuses a read-write open with QEMU's message;
* unknown autoclear bits are cleared; unknown compatible bits and unknown header extensions are
  kept (the header bytes end up exactly as QEMU leaves them);
* a file we may not open for writing fails with the operating system's reason, as qemu-io says it.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess

import pytest

import qcow2
from qcow2 import constants as C
from qcow2.errors import CorruptImageError, Qcow2Error, ReadOnlyError, RequestError
from qcow2.header import decode_header

from qemu import QEMU_IO, create, info_json, qemu_img, qemu_io, require_qemu

UNKNOWN_EXT = 0x1234ABCD
UNKNOWN_COMPAT = 1 << 7
UNKNOWN_AUTOCLEAR = 1 << 9


def _header(path):
    with open(path, "rb") as f:
        return decode_header(f.read(65536))


def _run(*argv) -> subprocess.CompletedProcess:
    require_qemu()
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True)


def _qemu_io_any(path, *cmds) -> subprocess.CompletedProcess:
    argv = [QEMU_IO or "qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    return _run(*argv, path)


def _set_u64(path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def _insert_extension(path, ext_type: int, data: bytes) -> None:
    """Add a header extension just before the end marker (inside cluster 0)."""
    with open(path, "r+b") as f:
        head = bytearray(f.read(65536))
        pos = struct.unpack(">I", head[100:104])[0]           # header_length
        while True:
            t, n = struct.unpack(">II", head[pos:pos + 8])
            if t == 0:
                break
            pos += 8 + (n + 7 & ~7)
        blob = struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8) + bytes(8)
        head[pos:pos + len(blob)] = blob
        f.seek(0)
        f.write(head)


def _check_rc(path) -> int:
    return qemu_img("check", str(path), check=False).returncode


# -- lazy refcounts and the dirty bit --------------------------------------------------------------

def test_lazy_refcounts_dirty_while_open_after_first_write(tmp_path):
    path = str(tmp_path / "lazy.qcow2")
    create(path, "16M", options={"lazy_refcounts": "on"})
    assert not _header(path).dirty
    with qcow2.open(path, "r+") as img:
        assert not _header(path).dirty and not img.header.dirty   # opening alone: clean
        img.pread(512, 0)
        assert not _header(path).dirty
        img.pwrite(b"\1" * 4096, 0)
        assert _header(path).dirty and img.header.dirty           # on disk before returning
        img.pwrite(b"\2" * 4096, 1 << 20)
        img.flush()
        assert _header(path).dirty                                # a flush does not clean it
        # what another reader sees meanwhile: a dirty image, as qemu-img reports it
        assert info_json(path)["dirty-flag"] is True
    assert not _header(path).dirty
    assert "dirty-flag" not in info_json(path) or info_json(path)["dirty-flag"] is False
    assert _check_rc(path) == 0


def test_without_lazy_refcounts_never_dirty(tmp_path):
    path = str(tmp_path / "plain.qcow2")
    create(path, "16M")
    with qcow2.open(path, "r+") as img:
        img.pwrite(b"\1" * 4096, 0)
        assert not _header(path).dirty
        img.write_zeroes(0, 65536)
        img.discard(0, 1 << 20)
        assert not _header(path).dirty
    assert _check_rc(path) == 0


def test_lazy_refcounts_bad_request_does_not_dirty(tmp_path):
    path = str(tmp_path / "lazy.qcow2")
    create(path, "16M", options={"lazy_refcounts": "on"})
    before = open(path, "rb").read()
    with qcow2.open(path, "r+") as img:
        with pytest.raises(RequestError):
            img.pwrite(b"x", img.size)
        assert not _header(path).dirty
    assert open(path, "rb").read() == before


@pytest.fixture
def dirty_image(tmp_path):
    """A lazy-refcounts image whose writer (qemu-io) aborted: dirty bit set, refcounts of the new
    clusters never written.  Returns (path, a copy QEMU repaired by opening it read-write)."""
    path = str(tmp_path / "dirty.qcow2")
    create(path, "64M", options={"lazy_refcounts": "on"})
    _qemu_io_any(path, "write -P 7 0 1M", "write -P 8 8M 64k", "abort")
    assert _header(path).dirty
    assert _check_rc(path) == 2                 # refcounts too low: corruptions
    repaired = str(tmp_path / "qemu-repaired.qcow2")
    shutil.copy(path, repaired)
    _qemu_io_any(repaired, "flush")
    assert not _header(repaired).dirty and _check_rc(repaired) == 0
    return path, repaired


def test_dirty_image_repaired_at_read_write_open(dirty_image):
    path, repaired = dirty_image
    events = []
    with qcow2.open(path, "r+", on_event=events.append) as img:
        assert not img.header.dirty and not _header(path).dirty
        assert not img.corrupt
        assert img.pread(65536, 0) == b"\7" * 65536
    assert events == []
    assert _check_rc(path) == 0
    cmp = qemu_img("compare", path, repaired, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_dirty_image_writable_after_repair(dirty_image, tmp_path):
    path, _ = dirty_image
    with qcow2.open(path, "r+") as img:
        img.pwrite(b"\x09" * 200000, 4 << 20)        # allocations must not reuse counted clusters
        img.pwrite(b"\5" * 512, 100)
    assert _check_rc(path) == 0
    raw = str(tmp_path / "out.raw")
    qemu_img("convert", "-O", "raw", path, raw)
    with open(raw, "rb") as f:
        data = f.read()
    assert data[100:612] == b"\5" * 512 and data[612:65536] == b"\7" * (65536 - 612)
    assert data[4 << 20:(4 << 20) + 200000] == b"\x09" * 200000
    assert data[8 << 20:(8 << 20) + 65536] == b"\x08" * 65536


def test_dirty_image_read_only_open_changes_nothing(dirty_image):
    path, _ = dirty_image
    before = open(path, "rb").read()
    with qcow2.open(path) as img:
        assert img.header.dirty
        assert img.pread(65536, 8 << 20) == b"\x08" * 65536
    assert open(path, "rb").read() == before


# -- corrupt images ------------------------------------------------------------------------------

@pytest.fixture
def corrupt_image(tmp_path):
    path = str(tmp_path / "corrupt.qcow2")
    create(path, "16M")
    qemu_io(path, "write -P 3 0 64k")
    h = _header(path)
    _set_u64(path, 72, h.incompatible_features | C.INCOMPAT_CORRUPT)
    return path


def test_corrupt_image_refuses_read_write(corrupt_image):
    before = open(corrupt_image, "rb").read()
    proc = _qemu_io_any(corrupt_image, "write 0 512")
    assert "Image is corrupt; cannot be opened read/write" in proc.stderr
    with pytest.raises(CorruptImageError) as exc:
        qcow2.open(corrupt_image, "r+")
    assert str(exc.value) == "Image is corrupt; cannot be opened read/write"
    assert open(corrupt_image, "rb").read() == before
    with qcow2.open(corrupt_image) as img:          # read-only is fine
        assert img.corrupt and img.pread(65536, 0) == b"\3" * 65536


def test_corrupt_image_opens_for_repair(corrupt_image):
    """The private repair open (what `check -r` uses) is the one way in; the open alone changes
    nothing and the image still says it is corrupt."""
    before = open(corrupt_image, "rb").read()
    with qcow2.open(corrupt_image, "r+", _repair=True) as img:
        assert img.corrupt and img.mode == "r+"
    assert open(corrupt_image, "rb").read() == before


# -- feature bits and header extensions ---------------------------------------------------------

@pytest.fixture
def unknown_features(tmp_path):
    """A qemu-img image with an unknown header extension, an unknown compatible bit and an unknown
    autoclear bit poked in; `qemu-img check` accepts it."""
    path = str(tmp_path / "features.qcow2")
    create(path, "64M")
    _insert_extension(path, UNKNOWN_EXT, b"hello")
    _set_u64(path, 80, UNKNOWN_COMPAT)
    _set_u64(path, 88, UNKNOWN_AUTOCLEAR)
    assert _check_rc(path) == 0
    h = _header(path)
    assert h.extension(UNKNOWN_EXT).data[:5] == b"hello"
    return path


def test_unknown_autoclear_cleared_at_read_write_open(unknown_features, tmp_path):
    """Like QEMU: cleared as soon as the image is opened read-write, with no write at all; the
    header bytes end up exactly as QEMU leaves them."""
    theirs, ours = str(tmp_path / "theirs.qcow2"), str(tmp_path / "ours.qcow2")
    shutil.copy(unknown_features, theirs)
    shutil.copy(unknown_features, ours)
    _qemu_io_any(theirs, "flush")
    with qcow2.open(ours, "r+") as img:
        assert img.header.autoclear_features == 0
        assert _header(ours).autoclear_features == 0            # on disk already
    h = _header(ours)
    assert h.autoclear_features == 0 and _header(theirs).autoclear_features == 0
    assert h.compatible_features == UNKNOWN_COMPAT
    assert open(ours, "rb").read() == open(theirs, "rb").read()


def test_read_only_open_keeps_unknown_autoclear(unknown_features):
    before = open(unknown_features, "rb").read()
    with qcow2.open(unknown_features) as img:
        assert img.header.autoclear_features == UNKNOWN_AUTOCLEAR
    assert open(unknown_features, "rb").read() == before


def test_unknown_compat_bits_and_extensions_kept_through_writes(unknown_features, tmp_path):
    theirs, ours = str(tmp_path / "theirs.qcow2"), str(tmp_path / "ours.qcow2")
    shutil.copy(unknown_features, theirs)
    shutil.copy(unknown_features, ours)
    cmds = ["write -P 1 0 512", "write -P 2 32M 200k", "write -z 64k 64k"]
    _qemu_io_any(theirs, *cmds)
    with qcow2.open(ours, "r+") as img:
        img.pwrite(b"\1" * 512, 0)
        img.pwrite(b"\2" * 204800, 32 << 20)
        img.write_zeroes(65536, 65536)
        img.resize(128 << 20)                 # a header rewrite of its own
    qemu_img("resize", theirs, "128M")
    h = _header(ours)
    assert h.compatible_features == UNKNOWN_COMPAT
    assert h.extension(UNKNOWN_EXT) is not None
    assert h.extension(UNKNOWN_EXT).data[:5] == b"hello"
    assert h.autoclear_features == 0
    assert _check_rc(ours) == 0
    assert qemu_img("compare", theirs, ours, check=False).returncode == 0
    # the extension area (everything after the fixed header) is byte for byte QEMU's
    with open(ours, "rb") as f, open(theirs, "rb") as g:
        mine, qemus = f.read(4096), g.read(4096)
    assert mine[h.header_length:] == qemus[h.header_length:]


def test_unknown_incompatible_bit_refuses_both_modes(tmp_path):
    path = str(tmp_path / "incompat.qcow2")
    create(path, "16M")
    _set_u64(path, 72, 1 << 20)
    proc = _qemu_io_any(path, "read 0 512")
    assert "Unsupported qcow2 feature(s)" in proc.stderr
    for mode in ("r", "r+"):
        with pytest.raises(Qcow2Error) as exc:
            qcow2.open(path, mode)
        assert "Unsupported qcow2 feature(s)" in str(exc.value)


# -- files we may not write ------------------------------------------------------------------------

def test_immutable_file_refuses_read_write_open(tmp_path):
    """As root, permissions do not stop us; an immutable file (chattr +i) does.  Same words as
    qemu-io."""
    path = str(tmp_path / "ro.qcow2")
    create(path, "16M")
    if subprocess.run(["chattr", "+i", path], capture_output=True).returncode:
        pytest.skip("chattr +i is not available on this file system")
    try:
        proc = _qemu_io_any(path, "write 0 512")
        expected = f"Could not open '{path}': Operation not permitted"
        assert expected in proc.stderr
        with pytest.raises(Qcow2Error) as exc:
            qcow2.open(path, "r+")
        assert str(exc.value) == expected
        with qcow2.open(path) as img:
            assert img.pread(512, 0) == bytes(512)
            with pytest.raises(ReadOnlyError):
                img.pwrite(b"x", 0)
    finally:
        subprocess.run(["chattr", "-i", path], check=False)


def test_read_only_file_system_refuses_read_write_open(tmp_path, monkeypatch):
    """A read-only file system, simulated: os.open fails with EROFS for writable opens."""
    path = str(tmp_path / "img.qcow2")
    create(path, "16M")
    real_open = os.open

    def fake_open(p, flags, *args, **kwargs):
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), p)
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(Qcow2Error) as exc:
        qcow2.open(path, "r+")
    assert str(exc.value) == f"Could not open '{path}': Read-only file system"
    with qcow2.open(path) as img:
        assert img.size == 16 << 20


def test_bad_mode_refused(tmp_path):
    path = str(tmp_path / "img.qcow2")
    create(path, "16M")
    before = open(path, "rb").read()
    for mode in ("w", "rw", "a", "r+b", ""):
        with pytest.raises(RequestError):
            qcow2.open(path, mode)
    assert open(path, "rb").read() == before
