"""Writer regressions found by random operation sequences compared with qemu-img.

Each test replays the smallest sequence that showed the bug, then asks qemu-img: ``check`` must be
clean and ``compare`` against a raw model must match.
"""

from __future__ import annotations

import json
import os

import pytest

import qcow2
from tests.qemu import create, qemu_img, qemu_io


def _assert_like_model(path, model: bytes, tmp_path) -> None:
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    check = qemu_img("check", str(path), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(path), str(raw), check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def _compressible(n: int, seed: int) -> bytes:
    unit = bytes([seed]) * 100 + os.urandom(10)
    return (unit * (n // len(unit) + 1))[:n]


def test_compressed_descriptor_bit0_is_not_a_zero_flag(tmp_path):
    """A compressed entry whose host offset is odd has bit 0 set; a partial overwrite must copy
    the cluster's data, not treat it as a zero cluster."""
    path = tmp_path / "v2.qcow2"
    create(path, 2 * 65536 * 4, options={"compat": "0.10", "cluster_size": 16384})
    model = bytearray(2 * 65536 * 4)
    with qcow2.open(str(path), "r+") as img:
        for k in range(4):   # several compressed clusters: most get odd host offsets
            data = _compressible(16384, k + 1)
            img.write_compressed(data, 16384 * (8 + k))
            model[16384 * (8 + k):16384 * (9 + k)] = data
        img.pwrite(b"\x07" * 1000, 16384 * 9 + 5000)        # partial: copy-on-write
        model[16384 * 9 + 5000:16384 * 9 + 6000] = b"\x07" * 1000
        img.write_zeroes(16384 * 10 + 100, 200)
        model[16384 * 10 + 100:16384 * 10 + 300] = bytes(200)
        assert img.pread(len(model), 0) == bytes(model)
    _assert_like_model(path, bytes(model), tmp_path)


def test_reused_host_offset_does_not_return_stale_compressed_data(tmp_path):
    """A freed compressed cluster's host offset is reused by a new compressed cluster with the
    same descriptor: reads must show the new data."""
    path = tmp_path / "c.qcow2"
    cs = 4096
    create(path, 3 << 20, options={"compat": "0.10", "cluster_size": cs})
    with qcow2.open(str(path), "r+") as img:
        old = _compressible(cs, 2)
        img.write_compressed(old, 2973696)
        assert img.pread(cs, 2973696) == old
        img.resize(2267648, shrink=True)                 # frees that cluster
        new = _compressible(2 * cs, 3)
        img.write_compressed(new, 1888256)
        assert img.pread(2 * cs, 1888256) == new
        model = bytearray(2267648)
        model[1888256:1888256 + 2 * cs] = new
    _assert_like_model(path, bytes(model), tmp_path)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_growing_hides_the_backing_file(tmp_path, compat):
    """Shrink then grow: the new area reads as zeros, not as the backing file (QEMU zeroes it)."""
    base = tmp_path / "base.qcow2"
    create(base, 1 << 20)
    qemu_io(str(base), "write -P 0x5a 0 1M")
    top = tmp_path / "top.qcow2"
    create(top, 1 << 20, options={"compat": compat, "cluster_size": 512},
           backing=str(base), backing_fmt="qcow2")
    with qcow2.open(str(top), "r+") as img:
        img.resize(583168, shrink=True)
        img.resize(1 << 20)
        assert img.pread(1 << 20, 0) == b"\x5a" * 583168 + bytes((1 << 20) - 583168)
    _assert_like_model(top, b"\x5a" * 583168 + bytes((1 << 20) - 583168), tmp_path)


def test_writes_over_snapshots_copy_shared_tables_and_clusters(tmp_path):
    """Writes after qemu-img snapshots copy the shared L2 table and data clusters; the snapshots
    keep their data (read back through qemu-img convert -l)."""
    path = tmp_path / "s.qcow2"
    create(path, 4 << 20, options={"cluster_size": 65536})
    qemu_io(str(path), "write -P 0x11 0 2M", "write -c -P 0x22 3M 64k")
    qemu_img("snapshot", "-c", "s1", str(path))
    with qcow2.open(str(path), "r+") as img:
        img.pwrite(b"\x33" * 5000, 65536 - 100)
        img.pwrite(b"\x44" * 100, (3 << 20) + 7)            # into the compressed cluster
        img.discard(1 << 20, 1 << 20)
        model = bytearray(img.pread(img.size, 0))
    expected = bytearray(4 << 20)
    expected[0:2 << 20] = b"\x11" * (2 << 20)
    expected[3 << 20:(3 << 20) + 65536] = b"\x22" * 65536
    snap = bytes(expected)
    expected[65536 - 100:65536 + 4900] = b"\x33" * 5000
    expected[(3 << 20) + 7:(3 << 20) + 107] = b"\x44" * 100
    expected[1 << 20:2 << 20] = bytes(1 << 20)
    assert model == expected
    _assert_like_model(path, bytes(expected), tmp_path)
    snap_raw = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "s1", "-O", "raw", str(path), str(snap_raw))
    assert snap_raw.read_bytes() == snap


def test_discard_with_raw_data_file_keeps_partial_clusters(tmp_path):
    """With a raw external data file a discard zeroes the whole clusters it covers (the data file
    must read as the disk) but, as any discard, leaves the partial clusters at its edges alone:
    QEMU 7.2 keeps those bytes.  (Found with qemu-io while building tests/test_writer_model.py.)"""
    cs = 4096
    path = tmp_path / "raw-data.qcow2"
    data_file = tmp_path / "data.raw"
    model = bytearray(b"\x11" * 65536) + bytes((1 << 20) - 65536)
    with qcow2.create(str(path), 1 << 20, cluster_size=cs, data_file=str(data_file),
                      data_file_raw=True) as img:
        img.pwrite(b"\x11" * 65536, 0)
        img.discard(1000, 20000)               # whole clusters 1..4; bytes 1000.. and ..21000 stay
        model[cs:5 * cs] = bytes(4 * cs)
        assert img.pread(65536, 0) == model[:65536]
    _assert_like_model(path, bytes(model), tmp_path)
    assert data_file.read_bytes()[:65536] == model[:65536]


@pytest.mark.parametrize("zeroed_by", ["qemu-io", "writer"])
def test_zero_cluster_at_data_file_offset_0_has_no_host_offset(tmp_path, zeroed_by):
    """With an external data file, guest cluster 0 maps to data file offset 0 (L2 entry: offset 0
    plus COPIED).  Zeroed in place it becomes offset 0 + COPIED + zero flag, which QEMU reads as
    a plain zero cluster (the zero flag is tested before the offset-0 rule): ``map`` must show it
    without a host offset, as qemu-img map does.  (Found by tests/test_writer_model.py.)"""
    path = str(tmp_path / "df.qcow2")
    with qcow2.create(path, 1 << 20, cluster_size=512, data_file=str(tmp_path / "data.raw")) as img:
        img.pwrite(b"\x07" * 1536, 0)
        if zeroed_by == "writer":
            img.write_zeroes(0, 1024)
    if zeroed_by == "qemu-io":
        qemu_io(path, "write -z 0 1024")
    theirs = json.loads(qemu_img("map", "--output=json", path).stdout)
    with qcow2.open(path) as img:
        assert img._l2_cache.load(img.l1_table[0] & 0x00FFFFFFFFFFFE00)[0] == (1 << 63) | 1
        assert [e.to_json() for e in img.map()] == theirs
        assert theirs[0] == {"start": 0, "length": 512, "depth": 0, "present": True,
                             "zero": True, "data": False}
        assert theirs[1]["offset"] == 512                  # the next one keeps its offset
        assert img.pread(2048, 0) == bytes(1024) + b"\x07" * 512 + bytes(512)
    _assert_like_model(path, bytes(1024) + b"\x07" * 512 + bytes((1 << 20) - 1536), tmp_path)
