"""check(): the library API, the overlap map inside the check, its memory budget and events,
bounded cost on hostile offsets, and the repair of dirty lazy-refcount images at open."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import subprocess
import tracemalloc

import pytest

import qcow2
from qcow2 import cli
from qcow2.check import CheckResult
from tests.qemu import qemu_img, qemu_io


def _poke_u64(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def _image(tmp_path, name="img.qcow2", size="4M", options=None, writes=("write -P 1 0 256k",)):
    path = tmp_path / name
    argv = ["create", "-q", "-f", "qcow2"]
    if options:
        argv += ["-o", options]
    qemu_img(*argv, str(path), size)
    if writes:
        qemu_io(str(path), *writes)
    return path


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_image_check_api_clean(tmp_path):
    path = _image(tmp_path)
    with qcow2.open(str(path)) as img:
        result = img.check()
    assert isinstance(result, CheckResult)
    assert result.exit_code == 0
    assert result.allocated_clusters == 4
    assert result.to_json()["image-end-offset"] == 0x90000
    assert result.overlaps == [] and result.unprotected == []


def test_repair_needs_read_write(tmp_path):
    path = _image(tmp_path)
    with qcow2.open(str(path)) as img:
        with pytest.raises(qcow2.Qcow2Error, match="read-write"):
            img.check(repair="all")


def test_data_overlapping_metadata_is_named(tmp_path):
    path = _image(tmp_path)
    l2 = 0x40000
    _poke_u64(path, l2 + 8, (1 << 63) | 0x20000)          # a data cluster on the refcount block
    with qcow2.open(str(path)) as img:
        result = img.check()
    assert result.corruptions            # qemu-img's counters see a refcount mismatch ...
    assert any("0x20000" in line and "refcount block" in line for line in result.overlaps)


def test_metadata_overlapping_metadata_is_named(tmp_path):
    path = _image(tmp_path)
    _poke_u64(path, 0x30000, (1 << 63) | 0x10000)        # L1 entry -> the refcount table
    with qcow2.open(str(path)) as img:
        result = img.check()
    assert any("0x10000" in line and "active L2 table" in line and "refcount table" in line
               for line in result.overlaps), result.overlaps


def test_tables_shared_with_snapshots_are_not_overlaps(tmp_path):
    """After ``qemu-img snapshot -c`` the active L1 and the snapshot's share their L2 tables and
    data clusters: that is sharing (refcount 2), not metadata on metadata."""
    path = _image(tmp_path, writes=("write -P 1 0 256k", "write -c -P 2 1M 64k"))
    qemu_img("snapshot", "-c", "s1", str(path))
    qemu_io(str(path), "write -P 3 2M 64k")
    code, out, err = _run(["check", str(path)])
    assert code == 0 and "OVERLAP" not in err, err
    with qcow2.open(str(path)) as img:
        assert img.check().overlaps == []


def test_overlap_mem_limit_events_and_summary(tmp_path):
    path = _image(tmp_path, size="8M", options="cluster_size=512",
                  writes=("write -P 1 0 1M", "write -P 2 4M 1M"))
    plain = _run(["check", "--output=json", str(path)])
    code, out, err = _run(["check", "--overlap-mem", "400", str(path)])
    assert code == plain[0] == 0
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert events, err
    for ev in events:
        assert ev["event"] == "QCOW2_OVERLAP_CHECK_MEMORY_LIMIT_REACHED"
        assert set(ev["data"]) == {"reference", "start", "length"}
        assert ev["data"]["reference"] == "img.qcow2"
    assert "Not overlap-checked (overlap map memory limit): 0x" in out
    # one event per merged unprotected range (not one per refused table), as the summary names
    summary = out.split("Not overlap-checked (overlap map memory limit): ")[1].strip()
    spans = [(e["data"]["start"], e["data"]["start"] + e["data"]["length"]) for e in events]
    assert summary == ", ".join(f"0x{a:x}-0x{b:x}" for a, b in spans)
    assert len(events) <= 16
    # the JSON output keeps exactly qemu-img's keys
    code, out, err = _run(["check", "--overlap-mem", "400", "--output=json", str(path)])
    assert json.loads(out) == json.loads(plain[1])


def test_events_file(tmp_path):
    path = _image(tmp_path, size="8M", options="cluster_size=512", writes=("write 0 1M",))
    events = tmp_path / "events.jsonl"
    code, out, err = _run(["check", "--overlap-mem", "400", "--events", str(events),
                           str(path)])
    assert code == 0
    assert not [line for line in err.splitlines() if line.startswith("{")]
    lines = events.read_text().splitlines()
    assert lines and all(json.loads(line)["event"] == "QCOW2_OVERLAP_CHECK_MEMORY_LIMIT_REACHED"
                         for line in lines)


@pytest.mark.parametrize("value", ["abc", "-1", "4Q"])
def test_bad_overlap_mem_is_an_error(tmp_path, value):
    path = _image(tmp_path)
    code, out, err = _run(["check", "--overlap-mem", value, str(path)])
    assert code == 1
    assert err.startswith("qcow2-tool: Invalid --overlap-mem value")
    assert out == ""


def test_overlap_check_none_skips_the_map(tmp_path):
    path = _image(tmp_path)
    _poke_u64(path, 0x40000 + 8, (1 << 63) | 0x20000)
    code, out, err = _run(["check", "--overlap-check", "none", str(path)])
    assert code == 2
    assert "OVERLAP" not in err


def test_raw_file_is_not_checked(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(4096))
    code, out, err = _run(["check", str(raw)])
    assert code == 63
    assert err == "qcow2-tool: This image format does not support checks\n"


def test_pointer_at_32_pib_costs_nothing(tmp_path):
    """iotest 138's point: a data pointer far past the end must not size any allocation."""
    path = _image(tmp_path)
    _poke_u64(path, 0x40000 + 8 * 7, (1 << 63) | (32 << 50))
    with qcow2.open(str(path)) as img:
        tracemalloc.start()
        try:
            result = img.check()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    theirs = json.loads(qemu_img("check", "--output=json", str(path), check=False).stdout)
    assert result.corruptions == theirs["corruptions"]
    assert any("exceeding the end of the file" in m for m in result.messages)
    assert peak < 4 << 20


def test_dirty_lazy_refcount_image_is_repaired_at_read_write_open(tmp_path):
    path = _image(tmp_path, options="lazy_refcounts=on", writes=())
    subprocess.run(["qemu-io", "-c", "write -P 9 0 192k", "-c", "abort", str(path)],
                   capture_output=True)
    before = qemu_img("check", str(path), check=False)
    assert before.returncode != 0                  # the abort left refcounts behind
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    assert info["dirty-flag"] is True
    with qcow2.open(str(path), "r+") as img:
        assert not img.header.dirty
        assert img.pread(4, 0) == b"\x09" * 4
    after = qemu_img("check", str(path), check=False)
    assert after.returncode == 0, after.stdout + after.stderr


def test_repair_clears_the_corrupt_bit(tmp_path):
    path = _image(tmp_path)
    with open(path, "r+b") as f:
        f.seek(72)
        flags = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", flags | 2))
    with pytest.raises(qcow2.CorruptImageError, match="Image is corrupt; cannot be opened"):
        qcow2.open(str(path), "r+")
    copy = tmp_path / "copy.qcow2"
    shutil.copy(path, copy)
    code, out, err = _run(["check", "-r", "all", str(copy)])
    assert code == 0
    with qcow2.open(str(copy), "r+") as img:      # consistent again: opens read-write
        assert not img.header.corrupt


def _refblock_at_504_pib(path) -> None:
    """512-byte clusters, 1-bit refcounts, a 3-cluster refcount table at 0x200 whose entry 64 -
    the first bytes of refcount block 0 at 0x400 - points 504 PiB away (found by fuzzing)."""
    image = bytearray(1536)
    image[0:4] = b"QFI\xfb"
    struct.pack_into(">I", image, 4, 3)
    struct.pack_into(">I", image, 20, 9)
    struct.pack_into(">Q", image, 48, 0x200)
    struct.pack_into(">I", image, 56, 3)
    struct.pack_into(">I", image, 100, 0x70)
    struct.pack_into(">Q", image, 0x200, 0x400)
    image[0x400] = 0x07
    path.write_bytes(bytes(image))


def test_repair_that_cannot_grow_the_file_fails_like_qemu(tmp_path):
    """``-r all`` wants to grow the file up to a refcount block far past the end; the file system
    refuses (EFBIG).  qemu-img reports it, goes on, and fails the rebuild; so do we - with the
    same lines and exit status, without a traceback and without growing the file."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    _refblock_at_504_pib(ours)
    _refblock_at_504_pib(theirs)
    q = subprocess.run(["qemu-img", "check", "-r", "all", str(theirs)], capture_output=True,
                       text=True)
    code, out, err = _run(["check", "-r", "all", str(ours)])
    assert (code, out) == (q.returncode, q.stdout) == (1, "")
    assert err.replace("qcow2-tool:", "qemu-img:").replace(str(ours), str(theirs)) == q.stderr
    assert "Could not resize file: File too large" in err
    assert ours.stat().st_size == 1536
