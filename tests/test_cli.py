"""qcow2-tool info / map / convert / io against qemu-img and qemu-io 7.2.

Images are built with qemu-img/qemu-io; our output must equal theirs byte for byte (info JSON and
text, map JSON and text, qemu-io lines minus the timing figures), converted raw files must be
identical and sparse, and errors must read like qemu-img's, with exit status 1 and no traceback.
The CLI runs in-process (``qcow2.cli.main`` with capsys); one test runs ``python -m qcow2`` and the
installed ``qcow2-tool`` script.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import qcow2
from qcow2.cli import main
from qcow2.info import dumps_qemu_json
from qcow2.units import SizeError, format_io_size, format_size, parse_size

from qemu import QEMU_IMG, QEMU_IO, create, qemu_img, qemu_io, require_qemu, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- helpers --------------------------------------------------------------------------------------
def tool(capsys, *argv: str) -> tuple[int, str, str]:
    """Run qcow2-tool in-process; returns (status, stdout, stderr)."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def qemu(*argv: str, prog: str | None = None) -> tuple[int, str, str]:
    require_qemu()
    proc = subprocess.run([prog or QEMU_IMG, *[str(a) for a in argv]], capture_output=True,
                          text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def as_qemu_err(err: str) -> str:
    return err.replace("qcow2-tool: ", "qemu-img: ")


_TIMING = re.compile(r"^(\S+(?: \S+)?, \d+ ops; ).*$", re.M)
_CSV = re.compile(r"^(\d+,\d+),.*$", re.M)


def untimed(text: str) -> str:
    """qemu-io output with the timing figures removed (they differ run to run)."""
    return _CSV.sub(r"\1,TIME", _TIMING.sub(r"\1TIME", text))


def poke(path, offset: int, data: bytes) -> None:
    """Patch bytes of a fixture made by qemu-img (fixtures only; never the library's images)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# -- fixture images (built once per session with qemu-img / qemu-io) -------------------------------
def _plain(d):
    p = create(d / "plain.qcow2", "64M")
    qemu_io(p, "write -P 0xab 0 128k", "write -z 1M 64k", "write -P 1 2M 4k")
    return p


def _small_clusters(d):
    p = create(d / "c512.qcow2", "8M", options={"cluster_size": 512})
    qemu_io(p, "write -P 0x11 0 3k", "write -P 0x22 1M 700", "write -z 2M 4k")
    return p


def _c4k_refcount1(d):
    p = create(d / "c4k.qcow2", "16M", options={"cluster_size": 4096, "refcount_bits": 1})
    qemu_io(p, "write -P 0x33 4k 40k", "write -P 0x44 9M 8k")
    return p


def _c2m_refcount64(d):
    p = create(d / "c2m.qcow2", "100M", options={"cluster_size": "2M", "refcount_bits": 64})
    qemu_io(p, "write -P 0x55 3M 1M", "write -z 50M 2M")
    return p


def _v2(d):
    p = create(d / "v2.qcow2", "1G", options={"compat": "0.10"})
    qemu_io(p, "write -P 0x66 0 64k", "write -z 64k 64k")
    qemu_img("snapshot", "-c", "first", p)
    qemu_io(p, "write -P 0x67 0 64k")
    return p


def _compressed(d):
    p = create(d / "comp.qcow2", "4M")
    qemu_io(p, "write -c -P 5 0 64k", "write -P 6 64k 64k", "write -c -P 7 192k 64k")
    return p


def _zstd_extl2(d):
    p = create(d / "zx.qcow2", "100M", options={"extended_l2": "on", "compression_type": "zstd",
                                                 "cluster_size": "128k", "refcount_bits": 8,
                                                 "lazy_refcounts": "on"})
    qemu_io(p, "write -P 0x77 0 4k", "write -P 0x78 132k 8k", "write -z 8k 4k",
            "write -c -P 0x79 1M 128k")
    return p


def _snapshots(d):
    p = create(d / "snaps.qcow2", "32M")
    qemu_io(p, "write -P 0xa1 0 64k")
    qemu_img("snapshot", "-c", "one", p)
    qemu_io(p, "write -P 0xa2 0 64k", "write -P 0xa3 1M 64k")
    qemu_img("snapshot", "-c", "a rather long snapshot name", p)
    qemu_io(p, "write -P 0xa4 64k 64k")
    return p


def _bitmaps(d):
    p = create(d / "bitmaps.qcow2", "20M")
    qemu_img("bitmap", "--add", p, "b1")
    qemu_img("bitmap", "--add", "-g", "128k", "--disable", p, "b0")
    return p


def _chain(d):
    base = create(d / "base.raw", "32M", fmt="raw")
    qemu_io(base, "write -P 7 0 64k", "write -P 8 5M 64k", fmt="raw")
    mid = create(d / "mid.qcow2", "32M", backing="base.raw", backing_fmt="raw")
    qemu_io(mid, "write -P 9 64k 64k")
    top = create(d / "top.qcow2", "48M", options={"compat": "0.10"}, backing="mid.qcow2",
                 backing_fmt="qcow2")
    qemu_io(top, "write -P 10 128k 64k", "write -z 0 4k")
    return top


def _data_file(d):
    p = create(d / "df.qcow2", "16M", options={"data_file": str(d / "df.data")})
    qemu_io(p, "write -P 3 0 100k", "write -P 4 5M 64k")
    return p


def _data_file_raw(d):
    p = create(d / "dfr.qcow2", "16M", options={"data_file": str(d / "dfr.data"),
                                                 "data_file_raw": "on"})
    qemu_io(p, "write -P 3 0 100k")
    return p


def _dirty(d):
    p = create(d / "dirty.qcow2", "8M", options={"lazy_refcounts": "on"})
    run(QEMU_IO, "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "sigraise 9", p, check=False)
    return p


def _corrupt(d):
    p = create(d / "corrupt.qcow2", "8M")
    qemu_io(p, "write -P 1 0 64k")
    poke(p, 79, b"\x02")   # incompatible feature bit 1: corrupt
    return p


def _odd_size(d):
    p = create(d / "odd.qcow2", "1048064")   # 1023.5 KiB: "0.999 MiB"
    qemu_io(p, "write -P 2 1000k 2k")
    return p


def _empty(d):
    return create(d / "empty.qcow2", "0")


def _mostly_empty_big(d):
    p = create(d / "sparse.qcow2", "2G")
    qemu_io(p, "write -P 0x5a 1G 64k", "write -P 0 1500M 256k", "write -z 100M 1M")
    return p


BUILDERS = {f.__name__.lstrip("_"): f for f in (
    _plain, _small_clusters, _c4k_refcount1, _c2m_refcount64, _v2, _compressed, _zstd_extl2,
    _snapshots, _bitmaps, _chain, _data_file, _data_file_raw, _dirty, _corrupt, _odd_size,
    _empty, _mostly_empty_big)}
NO_HUMAN_MAP = {"compressed", "zstd_extl2"}   # qemu-img refuses: compressed clusters


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    require_qemu()
    return tmp_path_factory.mktemp("cli-images")


_built: dict[str, str] = {}


def built(name: str, image_dir) -> str:
    """The fixture image ``name``, built on first use."""
    if name not in _built:
        _built[name] = str(BUILDERS[name](image_dir))
    return _built[name]


@pytest.fixture
def image(request, image_dir):
    return built(request.param, image_dir)


all_images = pytest.mark.parametrize("image", sorted(BUILDERS), indirect=True)


# -- info -----------------------------------------------------------------------------------------
@all_images
@pytest.mark.parametrize("chain", [False, True], ids=["single", "backing-chain"])
def test_info_json_identical_to_qemu(capsys, image, chain):
    extra = ["--backing-chain"] if chain else []
    q_status, q_out, q_err = qemu("info", "--output=json", *extra, image)
    assert q_status == 0, q_err
    status, out, err = tool(capsys, "info", "--output=json", *extra, image)
    assert (status, err) == (0, "")
    assert json.loads(out) == json.loads(q_out)          # every key and value
    assert out == q_out                                   # and the very same text (key order)


@all_images
@pytest.mark.parametrize("chain", [False, True], ids=["single", "backing-chain"])
def test_info_human_identical_to_qemu(capsys, image, chain):
    extra = ["--backing-chain"] if chain else []
    q_status, q_out, _ = qemu("info", *extra, image)
    status, out, err = tool(capsys, "info", *extra, image)
    assert (status, err) == (0, "")
    assert out == q_out


@all_images
def test_image_info_api_matches_cli(capsys, image):
    with qcow2.open(image, "r", open_backing=False) as img:
        d = img.info()
    status, out, _ = tool(capsys, "info", "--output=json", image)
    assert status == 0
    assert d == json.loads(out)
    assert list(d) == list(json.loads(out))


def test_info_does_not_open_backing_file(capsys, image_dir):
    base = create(image_dir / "gone-base.qcow2", "1M")
    top = create(image_dir / "gone-top.qcow2", "1M", backing=base, backing_fmt="qcow2")
    os.unlink(base)
    q = qemu("info", "--output=json", top)
    status, out, err = tool(capsys, "info", "--output=json", top)
    assert (status, out, err) == (0, q[1], "")
    assert json.loads(out)["backing-filename"] == base


def test_info_snapshot_table_fields(capsys, image_dir):
    """Snapshot VM state size / clock / icount as qemu-img prints them, including a missing icount
    (all ones) and sizes that switch unit (fields poked into a qemu-made snapshot table)."""
    p = create(image_dir / "snapfields.qcow2", "1M")
    names = ["n" * k for k in (3, 15, 16, 17, 30)]
    for name in names:
        qemu_img("snapshot", "-c", name, p)
    values = [(1023, 1_500_000_000, 5), (1047552, 3_600_000_000_000, (1 << 64) - 1),
              (1048576, 86_399_999_999_999, 12345678901), (1536, 123_456_789_012_345, 1),
              (12345678901234, 7, 7)]
    with open(p, "rb") as f:
        header = f.read(72)
    nb, table = struct.unpack(">IQ", header[60:72])
    pos = table
    with open(p, "r+b") as f:
        for vm_size, clock, icount in values[:nb]:
            f.seek(pos)
            fixed = f.read(40)
            _, _, id_len, name_len, _, _, _, _, extra_len = struct.unpack(">QIHHIIQII", fixed)
            assert extra_len >= 24
            f.seek(pos + 24)
            f.write(struct.pack(">Q", clock))
            f.seek(pos + 40)
            f.write(struct.pack(">QQQ", vm_size, 1 << 20, icount))
            pos = (pos + 40 + extra_len + id_len + name_len + 7) & ~7
    for output in ("json", "human"):
        q = qemu("info", f"--output={output}", p)
        assert q[0] == 0
        assert tool(capsys, "info", f"--output={output}", p) == (0, q[1], "")
    status, out, _ = tool(capsys, "info", "--output=json", p)
    snaps = json.loads(out)["snapshots"]
    assert "icount" not in snaps[1] and snaps[2]["icount"] == 12345678901
    assert (snaps[1]["vm-clock-sec"], snaps[1]["vm-clock-nsec"]) == (3600, 0)


@pytest.mark.parametrize("size", ["512", "1000448", "1048064", "1G", "1536M", "3T"])
def test_info_human_sizes(capsys, image_dir, size):
    p = create(image_dir / f"size-{size}.qcow2", size)
    q = qemu("info", p)
    assert tool(capsys, "info", p) == (0, q[1], "")


def test_info_json_escapes_like_qemu(capsys, image_dir):
    name = image_dir / "w\x01e\x7f\"q\\\tz\u00e9\U0001F600.qcow2"
    p = create(name, "1M")
    q = qemu("info", "--output=json", p)
    status, out, _ = tool(capsys, "info", "--output=json", p)
    assert status == 0 and out == q[1]
    assert "\\u007F" in out and "\\uD83D\\uDE00" in out


def test_dumps_qemu_json_empty_containers():
    assert dumps_qemu_json({"a": [], "b": {}}) == '{\n    "a": [\n    ],\n    "b": {\n    }\n}'


# -- map ------------------------------------------------------------------------------------------
@all_images
def test_map_json_identical_to_qemu(capsys, image):
    q = qemu("map", "--output=json", image)
    assert q[0] == 0, q[2]
    assert tool(capsys, "map", "--output=json", image) == (0, q[1], "")


@all_images
def test_map_human_identical_to_qemu(capsys, image):
    q_status, q_out, q_err = qemu("map", image)
    status, out, err = tool(capsys, "map", "-f", "qcow2", image)
    assert (status, out, as_qemu_err(err)) == (q_status, q_out, q_err)
    if os.path.basename(image).split(".")[0] in ("comp", "zx"):
        assert status == 1
        assert err == "qcow2-tool: File contains external, encrypted or compressed clusters.\n"


@pytest.mark.parametrize("image", ["plain", "compressed", "chain", "small_clusters"],
                         indirect=True)
@pytest.mark.parametrize("window", [("100000", "100000"), ("0", "1"), ("1k", "0"), ("5M", None),
                                    ("100M", None), ("0x10", "3M"), (None, "1.5k")])
def test_map_window_identical_to_qemu(capsys, image, window):
    start, length = window
    extra = []
    if start is not None:
        extra += ["--start-offset", start]
    if length is not None:
        extra += ["--max-length", length]
    q = qemu("map", "--output=json", *extra, image)
    assert q[0] == 0
    assert tool(capsys, "map", "--output=json", *extra, image) == (0, q[1], "")


@pytest.mark.parametrize("option,value", [("--start-offset", "1x"), ("--start-offset", "-1"),
                                          ("--start-offset", "8E"), ("--max-length", "abc"),
                                          ("--max-length", "8E"), ("--start-offset", "1 ")])
def test_map_bad_offsets_like_qemu(capsys, option, value, image_dir):
    p = create(image_dir / "mapopts.qcow2", "1M")
    q = qemu("map", option, value, p)
    status, out, err = tool(capsys, "map", option, value, p)
    assert q[0] == status == 1
    assert (out, as_qemu_err(err)) == (q[1], q[2])


# -- convert --------------------------------------------------------------------------------------
def _blocks(path) -> int:
    return os.stat(path).st_blocks


@all_images
def test_convert_identical_to_qemu(capsys, image, tmp_path):
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    qemu_img("convert", "-O", "raw", image, theirs)
    assert tool(capsys, "convert", "-O", "raw", image, ours) == (0, "", "")
    assert ours.read_bytes() == theirs.read_bytes()
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    # never more allocated than qemu-img's output (+ the first block qemu allocates)
    assert _blocks(ours) <= _blocks(theirs) + 8


def test_convert_sparse_output(capsys, tmp_path, image_dir):
    src = built("mostly_empty_big", image_dir)
    dst = tmp_path / "sparse.raw"
    assert tool(capsys, "convert", "-O", "raw", src, dst)[0] == 0
    assert os.path.getsize(dst) == 2 << 30
    # 64 KiB of data; the 256 KiB written as zero bytes and the zero cluster stay holes
    assert _blocks(dst) * 512 <= 128 * 1024
    with open(dst, "rb") as f:
        f.seek(1 << 30)
        assert f.read(65536) == b"\x5a" * 65536


def test_convert_fully_allocated_with_S0(capsys, tmp_path, image_dir):
    src = create(image_dir / "s0.qcow2", "4M")
    qemu_io(src, "write -P 1 1M 64k")
    dst = tmp_path / "full.raw"
    assert tool(capsys, "convert", "-S", "0", src, dst)[0] == 0
    assert _blocks(dst) * 512 >= 4 << 20
    assert dst.read_bytes() == bytes(1 << 20) + b"\x01" * 65536 + bytes(3 * (1 << 20) - 65536)


@pytest.mark.parametrize("spec", ["one", "1", "snapshot.name=one", "snapshot.id=1",
                                  "a rather long snapshot name", "snapshot.id=2"])
def test_convert_snapshot(capsys, tmp_path, image_dir, spec):
    src = built("snapshots", image_dir)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    qemu_img("convert", "-O", "raw", "-l", spec, src, theirs)
    assert tool(capsys, "convert", "-O", "raw", "-l", spec, src, ours) == (0, "", "")
    assert ours.read_bytes() == theirs.read_bytes()


def test_convert_missing_snapshot(capsys, tmp_path, image_dir):
    src = create(image_dir / "nosnap.qcow2", "1M")
    q = qemu("convert", "-O", "raw", "-l", "nosuch", src, tmp_path / "q.raw")
    status, out, err = tool(capsys, "convert", "-O", "raw", "-l", "nosuch", src, tmp_path / "o")
    assert q[0] == status == 1
    assert as_qemu_err(err) == q[2]


def test_convert_progress_and_existing_target(capsys, tmp_path, image_dir):
    src = create(image_dir / "prog.qcow2", "8M")
    qemu_io(src, "write -P 3 0 1M")
    dst = tmp_path / "p.raw"
    dst.write_bytes(b"\xff" * (16 << 20))     # an existing, larger target is truncated
    status, out, err = tool(capsys, "convert", "-p", "-O", "raw", src, dst)
    assert (status, err) == (0, "")
    assert out.startswith("    (0.00/100%)\r") and out.endswith("    (100.00/100%)\r\n")
    assert re.fullmatch(r"(    \(\d+\.\d\d/100%\)\r)+\n", out)
    assert dst.read_bytes() == b"\x03" * (1 << 20) + bytes(7 << 20)


def test_convert_bad_sparse_size_and_target(capsys, tmp_path, image_dir):
    src = create(image_dir / "badS.qcow2", "1M")
    for value in ("1000", "abc", "32M"):
        q = qemu("convert", "-O", "raw", "-S", value, src, tmp_path / "q.raw")
        status, _, err = tool(capsys, "convert", "-O", "raw", "-S", value, src, tmp_path / "o")
        assert q[0] == status == 1
        assert as_qemu_err(err) == q[2]
    q = qemu("convert", "-O", "raw", src, tmp_path)
    status, _, err = tool(capsys, "convert", "-O", "raw", src, tmp_path)
    assert q[0] == status == 1
    assert as_qemu_err(err) == q[2]


# -- io -------------------------------------------------------------------------------------------
IO_COMMANDS = [
    "read -P 0xab 0 64k", "read -P 0xab 0 128k", "read -P 0xcd 0 64k", "read -P 0xab 64k 64k",
    "read -v 0 40", "read -v 65530 20", "read -q -P 0xcd 0 64k", "read 0 1536", "read 0 512",
    "read 0 1", "read 0 0", "read 64M 1", "read 64M 0", "read 63M 2M", "read 0x10 1k",
    "read 1.5k 1k", "read 1k 1.5", "read 1K 1B", "read 1x 1", "read 0 1x", "read -1 1",
    "read 0 -1", "read", "read 0", "read 0 1 2", "read -Z 0 1", "read 1 1", "read -P 300 0 1",
    "read -P zz 0 1", "read -P 0253 0 1", "read -P 0x 0 1", "read -P 08 0 1", "read -P -0 0 1",
    "read -s 10 -l 100 -P 0xab 0 64k", "read -s 65000 -l 1000 -P 0xab 0 64k", "read -C 0 64k",
    "read -v -C 0 16", "read -q -C 0 16", "read 0 2G", "read 0 3G", "read 0 2147483136",
    "read -p 0 1", "read -a 0 1", "read -l 10 0 64k", "read -s 10 0 64k",
    "read -P 0xab -P 0xcd 0 64k", "read -P 0xcd -l 0 0 64k", "read -P 0xcd -s 1k 0 64k",
    "read -P 0xcd -s 1x 0 64k", "read 0 16 -v", "read -vq 0 16", "read -P0xcd 0 16", "read -P",
    "read 0 1 -P", "r 0 16", "  read   0   16  ", "read -- 0 16", "bogus 1 2", "read 8E 1",
    "read 0 8E", "read 2147483136 0", "read -v 2M 100", "read -v 1M 64k",
    "read -P 0 1M 64k", "read -P 1 2M 4k", "read -P 0 2M 8k",
]


@pytest.fixture(scope="module")
def io_image(image_dir):
    p = create(image_dir / "io.qcow2", "64M")
    qemu_io(p, "write -P 0xab 0 128k", "write -z 1M 64k", "write -P 1 2M 4k")
    qemu_img("snapshot", "-c", "s", p)
    qemu_io(p, "write -P 0xcd 0 64k")
    return p


@pytest.mark.parametrize("command", IO_COMMANDS)
def test_io_read_like_qemu_io(capsys, io_image, command):
    q_status, q_out, q_err = qemu("-f", "qcow2", "-c", command, io_image, prog=QEMU_IO)
    status, out, err = tool(capsys, "io", "-f", "qcow2", "-c", command, io_image)
    assert (status, untimed(out), err) == (q_status, untimed(q_out), q_err)


def test_io_several_commands_and_exit_status(capsys, io_image):
    cmds = ["read -P 0xcd 0 64k", "read 64M 1", "read -q -P 0xab 64k 64k"]
    argv = [a for c in cmds for a in ("-c", c)]
    q = qemu(*argv, io_image, prog=QEMU_IO)
    status, out, err = tool(capsys, "io", *argv, io_image)
    assert q[0] == status == 1                       # one command failed, all ran
    assert untimed(out) == untimed(q[1])
    status, out, _ = tool(capsys, "io", "-r", "-c", cmds[0], "-c", cmds[2], io_image)
    assert status == 0 and out.startswith("read 65536/65536 bytes at offset 0\n")


def test_io_timing_line_format(capsys, io_image):
    status, out, _ = tool(capsys, "io", "-c", "read 0 1536", io_image)
    assert status == 0
    assert re.fullmatch(r"read 1536/1536 bytes at offset 0\n1\.500 KiB, 1 ops; \d\d\.\d\d sec "
                        r"\(\d+(\.\d{3})? (bytes|KiB|MiB|GiB|TiB)/sec and \d+\.\d{4} ops/sec\)\n", out)


def test_io_commands_from_stdin(capsys, io_image, monkeypatch):
    import io as _io
    monkeypatch.setattr(sys, "stdin", _io.StringIO("read -P 0xcd 0 4k\nread -P 0xcd 1M 4k\n"))
    status, out, _ = tool(capsys, "io", io_image)
    assert status == 1
    assert "Pattern verification failed at offset 1048576, 4096 bytes" in out


def test_io_parse_sizes_match_qemu_io(capsys, image_dir):
    """The size parser against qemu-io's, on one 2 PiB image: parse errors, range errors and
    accepted values (reads of 0 bytes print the parsed offset)."""
    p = create(image_dir / "huge.qcow2", "2P")
    texts = ["0X10", "1e3", "1.5G", "1.25k", "0.5k", ".5k", "5.k", "1kB", "1b", "1B", "1t", "1P",
             "1E", "7E", "8E", "16E", "9223372036854775807", "9223372036854775808",
             "99999999999999999999", "0x", "00010", "010k", "+1", "-0", "1M5", "k", "0.1", "1.1b",
             "0x1.8k", "1.k", "1.5b", "0.3k", "0.7k", "1.9k", "1.001k", "0.99999k",
             "0xffffffffffffffff", "1,5k", "0x10M", "0x1K"]
    cmds = [f"read -- {t} 0" for t in texts]
    argv = [a for c in cmds for a in ("-c", c)]
    q = qemu(*argv, p, prog=QEMU_IO)
    status, out, err = tool(capsys, "io", *argv, p)
    assert status == q[0]
    assert untimed(out) == untimed(q[1])


# -- errors ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(image_dir):
    d = image_dir / "bad"
    d.mkdir()
    good = create(d / "good.qcow2", "64M")
    qemu_io(good, "write -P 1 0 256k")
    (d / "junk.bin").write_bytes(os.urandom(100000))
    (d / "adir").mkdir()
    data = open(good, "rb").read()
    (d / "trunc.qcow2").write_bytes(data[:50])
    (d / "short.qcow2").write_bytes(data[:200000])   # tables fine, data past EOF
    qemu_img("create", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", d / "miss.qcow2",
             "1M")
    qemu_img("create", "-f", "qcow2", "-u", "-b", "loop2.qcow2", "-F", "qcow2", d / "loop1.qcow2",
             "1M")
    qemu_img("create", "-f", "qcow2", "-u", "-b", "loop1.qcow2", "-F", "qcow2", d / "loop2.qcow2",
             "1M")
    return d


OPEN_ERRORS = {
    "nonexist.qcow2": "Could not open '{p}': Could not open '{p}': No such file or directory",
    "adir": "Could not open '{p}': 'file' driver requires '{p}' to be a regular file",
    "trunc.qcow2": "Could not open '{p}': qcow2 header too short",
}


@pytest.mark.parametrize("name", sorted(OPEN_ERRORS))
@pytest.mark.parametrize("command", [["info"], ["info", "-f", "qcow2"], ["info", "--backing-chain"],
                                     ["map", "--output=json"], ["convert", "-O", "raw"]])
def test_open_errors_like_qemu(capsys, bad_files, tmp_path, name, command):
    path = str(bad_files / name)
    extra = [str(tmp_path / "out.raw")] if command[0] == "convert" else []
    q = qemu(*command, path, *extra)
    status, out, err = tool(capsys, *command, path, *extra)
    assert q[0] == status == 1
    assert out == ""
    assert err == "qcow2-tool: " + OPEN_ERRORS[name].format(p=path) + "\n"
    assert as_qemu_err(err) == q[2]


@pytest.mark.parametrize("command", [["info"], ["map"], ["convert"], ["io", "-c", "read 0 1"]])
def test_not_qcow2(capsys, bad_files, tmp_path, command):
    path = str(bad_files / "junk.bin")
    extra = [str(tmp_path / "o.raw")] if command[0] == "convert" else []
    q = qemu(command[0], "-f", "qcow2", path, *extra) if command[0] != "io" else None
    forced = ["-f", "qcow2"] if command[0] == "convert" else []   # unforced: probed as raw
    status, out, err = tool(capsys, *command, *forced, path, *extra)
    assert status == 1 and out == ""
    if q is not None:
        assert err == f"qcow2-tool: Could not open '{path}': Image is not in qcow2 format\n"
        assert as_qemu_err(err) == q[2]
    else:   # qemu-io's words (qemu-io -f qcow2 -c 'read 0 1' junk.bin)
        theirs = run(QEMU_IO, "-f", "qcow2", "-c", "read 0 1", path, check=False)
        assert err == f"qcow2-tool: can't open device {path}: Image is not in qcow2 format\n"
        assert err.replace("qcow2-tool", "qemu-io") == theirs.stderr + theirs.stdout


def test_convert_probes_raw_like_qemu_img(capsys, bad_files, tmp_path):
    """Without -f, a file that is not qcow2 is converted as raw, as qemu-img does."""
    path = str(bad_files / "junk.bin")
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    q = qemu("convert", "-O", "raw", path, str(theirs))
    assert tool(capsys, "convert", "-O", "raw", path, str(ours)) == (q[0], q[1], "") == \
        (0, "", "")
    assert ours.read_bytes() == theirs.read_bytes()


def test_truncated_data_reads_zero(capsys, bad_files, tmp_path):
    path = str(bad_files / "short.qcow2")
    for argv in (["info", "--output=json"], ["map", "--output=json"]):
        q = qemu(*argv, path)
        assert tool(capsys, *argv, path) == (0, q[1], "")
    qemu_img("convert", "-O", "raw", path, tmp_path / "q.raw")
    assert tool(capsys, "convert", path, tmp_path / "o.raw")[0] == 0
    assert (tmp_path / "o.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()


def test_missing_backing_file(capsys, bad_files, tmp_path):
    path = str(bad_files / "miss.qcow2")
    missing = str(bad_files / "missing.qcow2")
    q = qemu("info", "--output=json", path)            # info does not need the backing file
    assert tool(capsys, "info", "--output=json", path) == (0, q[1], "")
    q = qemu("info", "--backing-chain", path)
    status, out, err = tool(capsys, "info", "--backing-chain", path)
    assert q[0] == status == 1 and out == ""
    assert as_qemu_err(err) == q[2]
    for argv in (["map"], ["convert", "-O", "raw"]):
        extra = [str(tmp_path / "o.raw")] if argv[0] == "convert" else []
        q = qemu(*argv, path, *extra)
        status, out, err = tool(capsys, *argv, path, *extra)
        assert q[0] == status == 1
        assert err == (f"qcow2-tool: Could not open '{path}': Could not open backing file: "
                       f"Could not open '{missing}': No such file or directory\n")
        assert as_qemu_err(err) == q[2]


def test_backing_loop_is_an_error_not_a_hang(capsys, bad_files, tmp_path):
    path = str(bad_files / "loop1.qcow2")
    q = qemu("info", "--backing-chain", path)
    status, out, err = tool(capsys, "info", "--backing-chain", path)
    assert q[0] == status == 1 and out == ""
    assert as_qemu_err(err) == q[2]
    assert "creates an infinite loop" in err
    # qemu-img map / convert hang or fail on a lock here; we refuse cleanly
    for argv in (["map"], ["convert", path, str(tmp_path / "o.raw")], ["io", "-c", "read 0 1"]):
        full = argv if argv[0] == "convert" else argv + [path]
        status, out, err = tool(capsys, *full)
        assert status == 1
        opening = f"can't open device {path}" if argv[0] == "io" else f"Could not open '{path}'"
        assert err.startswith(f"qcow2-tool: {opening}: ")     # qemu-io's words for io
        assert "loop" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["info", "--output=xml", "{p}"], "--output must be used with human or json as argument."),
    (["map", "--output=yaml", "{p}"], "--output must be used with human or json as argument."),
])
def test_bad_options_like_qemu(capsys, bad_files, argv, message):
    p = str(bad_files / "good.qcow2")
    argv = [a.format(p=p) for a in argv]
    q = qemu(*argv)
    status, out, err = tool(capsys, *argv)
    assert q[0] == status == 1
    assert err == f"qcow2-tool: {message}\n" and as_qemu_err(err) == q[2]


@pytest.mark.parametrize("argv", [[], ["info"], ["map", "a", "b"], ["frobnicate", "x"],
                                  ["info", "--bogus", "x"], ["convert", "only-one"]])
def test_usage_errors_exit_1(capsys, argv):
    status, out, err = tool(capsys, *argv)
    assert status == 1
    assert "usage: qcow2-tool" in err and "error:" in err and "Traceback" not in err


def test_unsupported_format_option(capsys, bad_files):
    p = str(bad_files / "good.qcow2")
    status, out, err = tool(capsys, "info", "-f", "vmdk", p)
    assert status == 1 and out == ""
    assert err.startswith(f"qcow2-tool: Could not open '{p}': ")


def test_help_exits_0(capsys):
    status, out, _ = tool(capsys, "--help")
    assert status == 0 and "convert" in out and "map" in out


# -- units ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [
    ("0", 0), ("512", 512), ("4M", 4 << 20), ("4m", 4 << 20), ("1k", 1024), ("1K", 1024),
    ("1B", 1), ("1b", 1), ("2G", 2 << 30), ("1T", 1 << 40), ("1P", 1 << 50), ("7E", 7 << 60),
    ("0x10", 16), ("0X1k", 1024), ("00010", 10), ("+5", 5), (" 1", 1), ("1.5k", 1536),
    ("0.3k", 307), ("0.7k", 717), ("5.k", 5120), ("9223372036854775807", (1 << 63) - 1),
])
def test_parse_size_accepts(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text,too_large", [
    ("", False), ("k", False), ("1x", False), ("1kB", False), ("1KiB", False), ("-1", False),
    ("1.5", False), ("1.5b", False), (".5k", False), ("1e3", False), ("0x", False),
    ("0x1.8k", False), ("1 ", False), ("1M5", False), ("8E", True), ("16E", True),
    ("9223372036854775808", True), ("0xffffffffffffffff", True),
])
def test_parse_size_rejects(text, too_large):
    with pytest.raises(SizeError) as info:
        parse_size(text)
    assert info.value.too_large is too_large
    assert isinstance(info.value, ValueError) and isinstance(info.value, qcow2.Qcow2Error)


@given(st.integers(min_value=0, max_value=(1 << 40)), st.sampled_from("bkmgtBKMGT"))
def test_parse_size_suffix_property(n, suffix):
    shift = "bkmgt".index(suffix.lower()) * 10
    if n << shift > (1 << 63) - 1:
        with pytest.raises(SizeError) as info:
            parse_size(f"{n}{suffix}")
        assert info.value.too_large
    else:
        assert parse_size(f"{n}{suffix}") == n << shift
    assert parse_size(hex(n)) == n


@pytest.mark.parametrize("size,text", [
    (0, "0 B"), (999, "999 B"), (1000, "0.977 KiB"), (1023, "0.999 KiB"), (1024, "1 KiB"),
    (1536, "1.5 KiB"), (331776, "324 KiB"), (1047552, "0.999 MiB"), (64 << 20, "64 MiB"),
    (2297856, "2.19 MiB"), (12345678901234, "11.2 TiB"), (5000000000, "4.66 GiB"),
])
def test_format_size(size, text):
    assert format_size(size) == text


@pytest.mark.parametrize("value,text", [(0, "0 bytes"), (512, "512 bytes"), (1536, "1.500 KiB"),
                                        (65536, "64 KiB"), (11274289.15, "10.752 MiB")])
def test_format_io_size(value, text):
    assert format_io_size(value) == text


# -- entry points ---------------------------------------------------------------------------------
def test_python_dash_m(bad_files):
    p = str(bad_files / "good.qcow2")
    expected = qemu("info", "--output=json", p)[1]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "qcow2", "info", "--output=json", p],
                          capture_output=True, text=True, env=env, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, expected, "")
    proc = subprocess.run([sys.executable, "-m", "qcow2", "info", p + ".nope"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("qcow2-tool: Could not open ")


def test_console_script(bad_files):
    # next to the interpreter running the tests (a virtualenv's bin/), else on PATH
    beside = os.path.join(os.path.dirname(sys.executable), "qcow2-tool")
    script = beside if os.path.exists(beside) else shutil.which("qcow2-tool")
    if script is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("qcow2-tool console script is not installed (tools/setup.sh installs it)")
        pytest.skip("qcow2-tool console script is not installed (pip install -e .)")
    p = str(bad_files / "good.qcow2")
    proc = subprocess.run([script, "info", "--output=json", p], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout) == (0, qemu("info", "--output=json", p)[1])


def test_convert_refuses_to_overwrite_its_source(capsys, tmp_path, image_dir):
    src = tmp_path / "self.qcow2"
    create(src, "1M")
    qemu_io(str(src), "write -P 9 0 64k")
    before = src.read_bytes()
    status, _, err = tool(capsys, "convert", "-O", "raw", src, src)
    assert status == 1 and "being read" in err
    assert src.read_bytes() == before


@pytest.mark.parametrize("argv", [
    ["check", "{missing}"], ["check", "{dir}"], ["check", ""], ["info", ""],
    ["check", "-f", "raw", "{dir}"], ["check", "-f", "raw", "{raw}"], ["check", "{raw}"],
    ["check", "-r", "bogus", "{raw}"], ["io", "-c", "read 0 1", "{missing}"],
    ["io", "-c", "read 0 1", "{dir}"], ["io", "-r", "-c", "read 0 1", "{dir}"],
    ["io", "-c", "read 0 1", ""],
])
def test_open_and_argument_errors_in_qemus_words(capsys, tmp_path, argv):
    """Found by a new-user review: each as qemu-img (or qemu-io for io) says it, exit code too."""
    (tmp_path / "d").mkdir()
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(65536))
    names = {"missing": str(tmp_path / "missing.qcow2"), "dir": str(tmp_path / "d"),
             "raw": str(raw)}
    argv = [a.format(**names) for a in argv]
    if argv[0] == "io":
        q = qemu(*argv[1:], prog=QEMU_IO)
        q = (q[0], q[1], q[2].replace("qemu-io", "qcow2-tool"))
    else:
        q = qemu(*argv)
        q = (q[0], q[1], q[2].replace("qemu-img", "qcow2-tool"))
    assert tool(capsys, *argv) == q


@pytest.mark.parametrize("argv", [["info", "--", "{img}"], ["check", "--", "{img}"],
                                  ["map", "--output=json", "--", "{img}"],
                                  ["io", "-c", "read 0 1", "--", "{img}"]])
def test_double_dash_before_a_name_starting_with_a_dash(capsys, tmp_path, monkeypatch, argv):
    """``--`` ends the options, as for qemu-img, also now that options and operands may be
    intermixed (found by a review: the name after ``--`` was lost)."""
    monkeypatch.chdir(tmp_path)
    create("./-img.qcow2", "1M")
    argv = [a.format(img="-img.qcow2") for a in argv]
    status, out, err = tool(capsys, *argv)
    assert (status, err) == (0, "")
    if argv[0] == "io":
        q = qemu("-c", "read 0 1", "--", "-img.qcow2", prog=QEMU_IO)
        assert untimed(out) == untimed(q[1])
    else:
        assert out == qemu(*argv)[1]
