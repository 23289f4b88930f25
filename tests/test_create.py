"""``qcow2.create`` and ``qcow2-tool create`` against ``qemu-img create`` 7.2.

For each option set both tools create an image; ``qemu-img check`` must be clean on ours, and
``qemu-img info``/``map`` must say the same about both (file names and sizes on disk aside).
Invalid options must fail with qemu-img's message and status, writing nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import qcow2
from tests.qemu import qemu_img, qemu_io

MiB = 1 << 20

CASES = [
    ({}, 64 * MiB),
    ({"compat": "0.10"}, 64 * MiB),
    ({"compat": "v3", "cluster_size": 512, "refcount_bits": 64}, 1 << 30),
    ({"cluster_size": 512, "refcount_bits": 1}, 64 * MiB),
    ({"cluster_size": 1024, "refcount_bits": 2}, 3 * MiB + 512),
    ({"cluster_size": 2 * MiB, "refcount_bits": 32}, 100 * MiB),
    ({"extended_l2": True, "compression_type": "zstd", "lazy_refcounts": True}, 100 * MiB),
    ({"refcount_bits": 8, "cluster_size": 4096}, 5000),
    ({}, 0),
    ({"preallocation": "metadata"}, MiB),
    ({"preallocation": "metadata", "extended_l2": True, "cluster_size": 16384}, 3 * MiB),
    ({"preallocation": "falloc", "cluster_size": 4096}, MiB),
    ({"preallocation": "full", "cluster_size": 2 * MiB}, 5 * MiB),
    ({"preallocation": "metadata", "cluster_size": 512}, 2 * MiB),
    ({"data_file": "DATA", "data_file_raw": True}, 10 * MiB),
    ({"data_file": "DATA"}, 10 * MiB),
    ({"data_file": "DATA", "preallocation": "full", "cluster_size": 65536}, MiB),
]


def _opt_string(options: dict) -> str:
    def value(v):
        return "on" if v is True else "off" if v is False else str(v)
    return ",".join(f"{k}={value(v)}" for k, v in options.items())


def _info(path) -> dict:
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    for key in ("filename", "actual-size", "dirty-flag"):
        info.pop(key, None)
    info["format-specific"]["data"].pop("data-file", None)
    return info


def _map(path) -> list:
    return json.loads(qemu_img("map", "--output=json", str(path)).stdout)


@pytest.mark.parametrize("options,size", CASES, ids=[_opt_string(c) or "default" for c, _ in CASES])
def test_create_matches_qemu_img(tmp_path, monkeypatch, options, size):
    monkeypatch.chdir(tmp_path)     # relative data file names resolve against the cwd
    ours_opts = {k: ("ours.raw" if v == "DATA" else v) for k, v in options.items()}
    theirs_opts = {k: ("theirs.raw" if v == "DATA" else v) for k, v in options.items()}
    with qcow2.create("ours.qcow2", size, **ours_opts) as img:
        assert img.size == -(-size // 512) * 512
    argv = ["create", "-q", "-f", "qcow2"]
    if theirs_opts:
        argv += ["-o", _opt_string(theirs_opts)]
    qemu_img(*argv, "theirs.qcow2", str(size))
    check = qemu_img("check", "ours.qcow2", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert _info("ours.qcow2") == _info("theirs.qcow2")
    assert _map("ours.qcow2") == _map("theirs.qcow2")
    if not options:   # the plain case is byte for byte what qemu-img writes
        assert (tmp_path / "ours.qcow2").read_bytes() == (tmp_path / "theirs.qcow2").read_bytes()
    if "data_file" in options:
        assert os.path.getsize("ours.raw") == os.path.getsize("theirs.raw")


def test_created_image_takes_writes_like_qemu(tmp_path):
    """An image we create, written by qemu-io, reads back identically through both."""
    path = tmp_path / "w.qcow2"
    qcow2.create(str(path), 4 * MiB, cluster_size=4096, refcount_bits=4).close()
    qemu_io(str(path), "write -P 0x3c 12345 1M", "write -z 2M 64k")
    with qcow2.open(str(path)) as img:
        data = img.pread(4 * MiB, 0)
    assert data[12345:12345 + MiB] == b"\x3c" * MiB
    assert data[:12345] == bytes(12345)
    assert qemu_img("check", str(path)).returncode == 0


def test_backing_size_and_relative_name(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "3M")
    top = tmp_path / "sub" / "top.qcow2"
    top.parent.mkdir()
    with qcow2.create(str(top), None, backing_file="../base.qcow2", backing_fmt="qcow2") as img:
        assert img.size == 3 * MiB
        assert img.backing_filename == "../base.qcow2"
    info = json.loads(qemu_img("info", "--output=json", str(top)).stdout)
    assert info["backing-filename"] == "../base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 3 * MiB


def _run_ours(args, cwd):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(qcow2.__file__)))
    return subprocess.run([sys.executable, "-m", "qcow2", "create", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


CLI_CASES = [
    "t.qcow2",
    "-b a.qcow2 -F qcow2 t.qcow2",
    "-b nonexist.qcow2 -F qcow2 t.qcow2",
    "-u -b nonexist.qcow2 -F qcow2 t.qcow2",
    "-u -b nonexist.qcow2 -F qcow2 t.qcow2 1M",
    "-b a.qcow2 -F qcow2 -o preallocation=metadata t.qcow2",
    "-b a.qcow2 -F qcow2 -o preallocation=metadata,extended_l2=on t.qcow2",
    "-b a.qcow2 -F raw t.qcow2",
    "-o compat=1.1 t.qcow2 1M",
    "-o compat=v2 t.qcow2 1M",
    "-o compat=2.0 t.qcow2 1M",
    "t.qcow2 9E",
    "t.qcow2 1.5M",
    "t.qcow2 1000",
    "-q t.qcow2 1M",
    "-o cluster_size=1000 t.qcow2 1M",
    "-o cluster_size=256 t.qcow2 1M",
    "-o cluster_size=4M t.qcow2 1M",
    "-o cluster_size=64k t.qcow2 1M",
    "-o cluster_size=abc t.qcow2 1M",
    "-o refcount_bits=3 t.qcow2 1M",
    "-o refcount_bits=128 t.qcow2 1M",
    "-o compat=0.10,refcount_bits=8 t.qcow2 1M",
    "-o compat=0.10,lazy_refcounts=on t.qcow2 1M",
    "-o compat=0.10,extended_l2=on t.qcow2 1M",
    "-o cluster_size=8192,extended_l2=on t.qcow2 1M",
    "-o compat=0.10,compression_type=zstd t.qcow2 1M",
    "-o compat=0.10,data_file=x.raw t.qcow2 1M",
    "-o data_file_raw=on t.qcow2 1M",
    "-o data_file=e4.raw,data_file_raw=on -b a.qcow2 -F qcow2 t.qcow2",
    "-o lazy_refcounts=maybe t.qcow2 1M",
    "-o extended_l2=yes t.qcow2 1M",
    "-o compression_type=lz4 t.qcow2 1M",
    "-o preallocation=foo t.qcow2 1M",
    "-o foo=bar t.qcow2 1M",
    "-o size=1M t.qcow2 1M",
    "-o size=2M t.qcow2",
    "-f raw t.raw 1M",
    "t.qcow2 1X",
    "t.qcow2 1e3",
    "t.qcow2 64P",
    "-o cluster_size=512 t.qcow2 129G",
    "-o cluster_size=16k,extended_l2=on t.qcow2 1P",
    "t.qcow2 9223372036854775807",
    "t.qcow2 9223372036854775296",
    "t.qcow2 -o cluster_size=4096 1M",
    "t.qcow2 1M -o compat=0.10",
    "-o extended_l2,cluster_size=16k t.qcow2 1M",
    "-o nolazy_refcounts t.qcow2 1M",
    "-o compat t.qcow2 1M",
    "-o cluster_size t.qcow2 1M",
    "-o nofoo t.qcow2 1M",
    "-o , t.qcow2 1M",
    "-o cluster_size=4k, t.qcow2 1M",
    "-o cluster_size=4k,,, t.qcow2 1M",
    "-b a.qcow2 -F qcow2 -o compat=0.10 t.qcow2",
    "-b a.qcow2 -F qcow2 -o compat=1.1,lazy_refcounts=on,data_file=d.raw t.qcow2",
]


@pytest.mark.parametrize("option", ["encryption=on", "encrypt.format=luks", "encrypt.format=aes"])
def test_encrypted_creation_is_refused_and_writes_nothing(tmp_path, option):
    """We create no encrypted images: asked for one, we refuse (exit 1, as qemu-img without a
    key secret) rather than create a plain image."""
    ours = _run_ours(["-f", "qcow2", "-o", option, "t.qcow2", "1M"], tmp_path)
    assert ours.returncode == 1
    assert ours.stderr == ("qcow2-tool: t.qcow2: encryption is not supported (qcow2-tool creates "
                           "unencrypted images)\n")
    assert not (tmp_path / "t.qcow2").exists()


@pytest.mark.parametrize("argv", CLI_CASES)
def test_cli_create_like_qemu_img(tmp_path, argv):
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "64M")
    args = argv.split()
    if "-f" not in args:
        args = ["-f", "qcow2", *args]
    theirs = subprocess.run(["qemu-img", "create", *args], cwd=tmp_path, capture_output=True,
                            text=True)
    made = sorted(p.name for p in tmp_path.iterdir())
    for name in made:
        if name != "a.qcow2":
            (tmp_path / name).rename(tmp_path / f"qemu-{name}")
    ours = _run_ours(args, tmp_path)
    assert ours.returncode == theirs.returncode
    assert ours.stdout == theirs.stdout
    expected_err = theirs.stderr.replace("qemu-img:", "qcow2-tool:")
    assert ours.stderr.rstrip("\n") == expected_err.rstrip("\n")
    if theirs.returncode == 0 and args[1] == "qcow2":
        target = next(a for a in args if a.endswith(".qcow2") and a not in ("a.qcow2",
                                                                             "nonexist.qcow2"))
        if "nonexist" not in argv:
            assert _info(tmp_path / target) == _info(tmp_path / f"qemu-{target}")
    else:
        # a refused creation writes nothing
        assert not (tmp_path / "t.qcow2").exists() or theirs.returncode == 0
