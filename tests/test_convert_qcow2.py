"""``qcow2-tool convert -O qcow2`` against ``qemu-img convert -O qcow2``: same guest content,
clean images, zero clusters left unallocated, options and compression honoured."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

import qcow2
from qcow2 import cli
from tests.qemu import qemu_img, qemu_io

MiB = 1 << 20


def _ours(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _raw_source(path, size=8 * MiB):
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MiB + 123)
        f.write(os.urandom(300000))
        f.seek(5 * MiB)
        f.write(b"\x5a" * 65536)
        f.seek(6 * MiB)
        f.write(bytes(65536))           # explicit zeros: stay unallocated
    return path


def _allocated(path) -> list:
    return [(e["start"], e["length"]) for e in
            json.loads(qemu_img("map", "--output=json", str(path)).stdout) if e["data"]]


@pytest.mark.parametrize("options", ["", "cluster_size=4096", "compat=0.10",
                                     "cluster_size=2M,refcount_bits=64",
                                     "extended_l2=on,cluster_size=128k", "preallocation=metadata"])
def test_raw_to_qcow2(tmp_path, options):
    src = _raw_source(tmp_path / "src.raw")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    extra = ["-o", options] if options else []
    code, out, err = _ours("convert", "-f", "raw", "-O", "qcow2", *extra, str(src), str(ours))
    assert (code, out, err) == (0, "", "")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *extra, str(src), str(theirs))
    assert qemu_img("check", str(ours)).returncode == 0
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", str(ours), str(src)).returncode == 0
    if "preallocation" not in options:
        assert _allocated(ours) == _allocated(theirs)


@pytest.mark.parametrize("tail", [b"\x01", b"\0"])
def test_raw_with_partial_last_cluster(tmp_path, tail):
    """A disk that ends inside a cluster: the last partial cluster stays unallocated when its
    bytes are zeros (whatever the reused buffer held before) and is copied when they are not."""
    src = tmp_path / "src.raw"
    size = 4 * MiB + 65536 + 1536         # three chunks: the last reuses the first one's buffer
    with open(src, "wb") as f:
        f.write(os.urandom(4 * MiB + 65536) + bytes(1535) + tail)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    assert _ours("convert", "-f", "raw", "-O", "qcow2", str(src), str(ours))[0] == 0
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(src), str(theirs))
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", str(ours), str(src)).returncode == 0
    assert _allocated(ours) == _allocated(theirs)
    assert _allocated(ours)[-1][0] + _allocated(ours)[-1][1] == (size if tail != b"\0"
                                                                 else 4 * MiB + 65536)


def test_qcow2_to_qcow2_compressed_zstd(tmp_path):
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "4M")
    qemu_io(str(src), "write -P 0x11 0 1M", "write -P 0x22 2M 64k", "write -z 3M 64k")
    dst = tmp_path / "dst.qcow2"
    code, _, err = _ours("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
                         str(src), str(dst))
    assert code == 0, err
    assert qemu_img("check", str(dst)).returncode == 0
    assert qemu_img("compare", str(src), str(dst)).returncode == 0
    check = json.loads(qemu_img("check", "--output=json", str(dst)).stdout)
    assert check["compressed-clusters"] == 17
    info = json.loads(qemu_img("info", "--output=json", str(dst)).stdout)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
def test_compressed_clusters_packed_as_densely_as_qemu_img(tmp_path, cluster_size):
    """Compressed clusters follow each other byte by byte, straddling two host clusters where the
    next one is contiguous, as QEMU packs them (found by a new-user review: we started a new host
    cluster whenever one did not fit, and 4 KiB-cluster files came out ~45% larger)."""
    src = tmp_path / "src.raw"
    text = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i
                    for i in range(40000))
    src.write_bytes(os.urandom(256 << 10) + text)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    options = f"cluster_size={cluster_size}"
    assert _ours("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, str(src),
                 str(ours))[0] == 0
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, str(src), str(theirs))
    assert qemu_img("check", str(ours)).returncode == 0
    assert qemu_img("compare", str(ours), str(theirs)).returncode == 0
    # qemu-img pads the file to a whole cluster at the end (or one more); the rest is the same
    assert os.path.getsize(ours) <= os.path.getsize(theirs) <= os.path.getsize(ours) + cluster_size


def test_snapshot_to_qcow2(tmp_path):
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "2M")
    qemu_io(str(src), "write -P 0x33 0 1M")
    qemu_img("snapshot", "-c", "s1", str(src))
    qemu_io(str(src), "write -P 0x44 0 1M")
    dst = tmp_path / "dst.qcow2"
    assert _ours("convert", "-l", "s1", "-O", "qcow2", str(src), str(dst))[0] == 0
    with qcow2.open(str(dst)) as img:
        assert img.pread(MiB, 0) == b"\x33" * MiB


def test_target_that_is_the_source_is_refused(tmp_path):
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "1M")
    qemu_io(str(src), "write -P 1 0 64k")
    before = src.read_bytes()
    code, _, err = _ours("convert", "-O", "qcow2", str(src), str(src))
    assert code == 1 and "being read" in err
    assert src.read_bytes() == before


def test_bad_option_is_refused_and_writes_nothing(tmp_path):
    src = _raw_source(tmp_path / "src.raw", MiB)
    dst = tmp_path / "dst.qcow2"
    code, _, err = _ours("convert", "-O", "qcow2", "-o", "cluster_size=1000", str(src), str(dst))
    assert code == 1
    assert "Cluster size must be a power of two between 512 and 2048k" in err
    code, _, err = _ours("convert", "-c", "-O", "raw", str(src), str(dst))
    assert code == 1 and "Compression not supported" in err


def _fsyncs(monkeypatch) -> list:
    calls = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        return real(fd)
    monkeypatch.setattr(os, "fsync", counting)
    return calls


@pytest.mark.parametrize("mode, synced", [(None, False), ("unsafe", False), ("writeback", True),
                                          ("none", True), ("directsync", True)])
def test_target_cache_mode(tmp_path, monkeypatch, mode, synced):
    """qemu-img convert writes its target with cache=unsafe unless ``-t`` says otherwise: no
    fsync; the other modes make the target durable.  The image is the same either way."""
    src = _raw_source(tmp_path / "src.raw")
    dst = tmp_path / "dst.qcow2"
    calls = _fsyncs(monkeypatch)
    flags = ["-t", mode] if mode else []
    assert _ours("convert", *flags, "-O", "qcow2", str(src), str(dst)) == (0, "", "")
    assert bool(calls) == synced
    assert qemu_img("compare", "-F", "raw", str(dst), str(src)).returncode == 0
    assert qemu_img("check", str(dst)).returncode == 0


@pytest.mark.parametrize("flag, message", [("-t", "Invalid cache option: bogus"),
                                           ("-T", "Invalid source cache option: bogus")])
def test_bad_cache_mode_is_refused_like_qemu_img(tmp_path, flag, message):
    src = _raw_source(tmp_path / "src.raw", MiB)
    theirs = qemu_img("convert", flag, "bogus", "-O", "qcow2", str(src), str(tmp_path / "q"),
                      check=False)
    code, out, err = _ours("convert", flag, "bogus", "-O", "qcow2", str(src),
                           str(tmp_path / "o"))
    assert (code, out) == (theirs.returncode, theirs.stdout) == (1, "")
    assert err.replace("qcow2-tool:", "qemu-img:") == theirs.stderr == f"qemu-img: {message}\n"
    assert not (tmp_path / "o").exists()


def test_library_cache_unsafe_skips_fsync(tmp_path, monkeypatch):
    """``cache="unsafe"``: writes and flushes never fsync (QEMU's meaning); the closed image is
    still consistent.  An unknown mode is a RequestError."""
    path = str(tmp_path / "u.qcow2")
    calls = _fsyncs(monkeypatch)
    with qcow2.create(path, 4 * MiB, cache="unsafe") as img:
        img.pwrite(b"\x11" * 70000, 12345)
        img.flush()
    assert calls == []
    assert qemu_img("check", path).returncode == 0
    with qcow2.open(path, "r+") as img:         # writeback, the default, does fsync
        img.pwrite(b"\x22", 0)
        img.flush()
    assert calls
    with pytest.raises(qcow2.RequestError, match="cache"):
        qcow2.open(path, "r+", cache="directsync")
