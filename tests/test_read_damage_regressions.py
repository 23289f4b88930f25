"""Damage found by trying the tool as a new user would (each compared with qemu-img 7.2)."""

import json
import os
import shutil
import struct
import tracemalloc

import pytest

import qcow2
from qcow2.cli import main
from qcow2.errors import BackingError, CorruptImageError, Qcow2Error

from qemu import convert_raw, create, map_json, qemu_img, qemu_io

MiB = 1 << 20


def poke(path, offset, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def u64(path, offset) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


@pytest.fixture
def over_raw(tmp_path):
    """A qcow2 image over a raw backing file named "back.raw" (name stored right after the
    header extensions)."""
    back = tmp_path / "back.raw"
    qemu_img("create", "-q", "-f", "raw", back, "4M")
    path = create(tmp_path / "base.qcow2", "4M", backing=str(back), backing_fmt="raw")
    qemu_io(path, "write -P 0x11 0 128k")
    return path


def _qemu_info(path):
    return json.loads(qemu_img("info", "--output=json", path).stdout)


def test_nul_in_backing_name_ends_the_name(over_raw, capsys):
    name_offset = u64(over_raw, 8)
    name_size = struct.unpack(">I", open(over_raw, "rb").read(20)[16:20])[0]
    with open(over_raw, "rb") as f:
        f.seek(name_offset)
        cut = f.read(name_size - 3).decode()  # ".../back." does not exist
    poke(over_raw, name_offset + name_size - 3, b"\0")
    with pytest.raises(BackingError, match=f"Could not open '{cut}': No such file"):
        qcow2.open(over_raw)
    proc = qemu_img("map", over_raw, check=False)
    assert main(["map", over_raw]) == 1
    err = capsys.readouterr().err
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.removeprefix("qcow2-tool: ") == proc.stderr.removeprefix("qemu-img: ")
    with qcow2.open(over_raw, open_backing=False) as img:
        ours = img.info()
    assert ours["backing-filename"] == _qemu_info(over_raw)["backing-filename"] == cut


def test_empty_backing_name_means_no_backing_file(over_raw):
    poke(over_raw, 16, bytes(4))  # backing_file_size = 0
    theirs = _qemu_info(over_raw)
    assert "backing-filename" not in theirs
    with qcow2.open(over_raw) as img:
        assert img.backing is None
        ours = img.info()
        assert not {"backing-filename", "full-backing-filename"} & set(ours)
        assert [e.to_json() for e in img.map()] == map_json(over_raw)


def test_l1_table_cut_by_end_of_file(tmp_path):
    path = create(tmp_path / "p.qcow2", "64M")
    l1 = u64(path, 40)
    os.truncate(path, l1 + 4)
    with qcow2.open(path) as img:
        assert [e.to_json() for e in img.map()] == map_json(path)
        assert img.pread(4096, 0) == bytes(4096)


def test_v2_zero_flag_is_corruption(tmp_path):
    path = create(tmp_path / "v2.qcow2", "16M", options={"compat": "0.10"})
    qemu_io(path, "write -P 1 0 64k")
    l2 = u64(path, u64(path, 40)) & 0x00FFFFFFFFFFFE00
    poke(path, l2 + 7, bytes([u64(path, l2) & 0xFF | 1]))
    assert qemu_img("convert", "-O", "raw", path, tmp_path / "q.raw", check=False).returncode == 1
    with qcow2.open(path) as img, pytest.raises(CorruptImageError,
                                                match="Zero cluster entry found in pre-v3 image"):
        img.pread(512, 0)


def test_broken_bitmap_directory_refused_at_open(tmp_path, capsys):
    path = create(tmp_path / "bm.qcow2", "4M")
    qemu_img("bitmap", "--add", path, "bm1")
    # the bitmaps extension follows the fixed v3 header (and the feature name table)
    with open(path, "rb") as f:
        head = f.read(65536)
    ext = head.index(struct.pack(">I", 0x23852875))
    directory = struct.unpack_from(">Q", head, ext + 8 + 16)[0]
    poke(path, directory + 16, b"\x02")  # bitmap type 2: unknown
    proc = qemu_img("convert", "-O", "raw", path, tmp_path / "q.raw", check=False)
    assert proc.returncode == 1
    with pytest.raises(Qcow2Error):
        qcow2.open(path)
    for argv in (["info", path], ["map", path], ["convert", "-O", "raw", path,
                                                 str(tmp_path / "o.raw")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"qcow2-tool: Could not open '{path}': ") and "Traceback" not in err


def test_convert_snapshot_uses_current_size(tmp_path):
    path = create(tmp_path / "s.qcow2", "8M")
    qemu_io(path, "write -P 1 0 1M", "write -P 2 7M 1M")
    qemu_img("snapshot", "-c", "s1", path)
    qemu_img("resize", "-q", "--shrink", path, "5M")
    expected = convert_raw(path, tmp_path / "q.raw", "-l", "s1")
    assert len(expected) == 5 * MiB
    assert main(["convert", "-O", "raw", "-l", "s1", path, str(tmp_path / "o.raw")]) == 0
    assert (tmp_path / "o.raw").read_bytes() == expected
    with qcow2.open(path) as img:
        assert img.snapshot("s1").size == 8 * MiB  # the snapshot's own size by default


def test_map_and_convert_stream_many_extents(tmp_path, capsys):
    """Every L1 entry points at one L2 table whose entries alternate a (zero-filled) data cluster
    and the zero flag: 65536 extents from a tiny file.  Neither map nor convert may hold them all
    in memory."""
    path = create(tmp_path / "many.qcow2", "4G")
    qemu_io(path, "write -P 0 0 64k")
    l1_offset = u64(path, 40)
    l1_entry = u64(path, l1_offset)
    l2 = l1_entry & 0x00FFFFFFFFFFFE00
    data = u64(path, l2)
    poke(path, l2, struct.pack(">QQ", data, 1) * 4096)
    poke(path, l1_offset, struct.pack(">Q", l1_entry) * 8)  # 8 L1 entries of 512 MiB
    with qcow2.open(path) as img:
        tracemalloc.start()
        try:
            count = sum(1 for _ in img.iter_map())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert count == 65536
        assert peak < 4 * MiB  # the list of 65536 extents alone would be larger
    out = tmp_path / "o.raw"
    tracemalloc.start()
    try:
        assert main(["convert", "-O", "raw", path, str(out)]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB
    assert os.path.getsize(out) == 4 << 30
    assert os.stat(out).st_blocks * 512 < 16 * MiB  # zero clusters and zero data stay holes
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("field", [12, 14])  # id_len, name_len of snapshot entry 0
def test_snapshot_strings_end_at_nul(tmp_path, field):
    path = create(tmp_path / "snap.qcow2", "4M")
    qemu_io(path, "write -P 3 0 64k")
    qemu_img("snapshot", "-c", "s1", path)
    qemu_img("snapshot", "-c", "s2", path)
    poke(path, u64(path, 64) + field, b"\xff\xff")
    theirs = _qemu_info(path)
    with qcow2.open(path) as img:
        ours = img.info()
        assert ours["snapshots"] == theirs["snapshots"]
        first = theirs["snapshots"][0]
        assert img.snapshot(first["id"]).entry is img.snapshots[0]
