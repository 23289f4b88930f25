"""qemu-img-made images for the codec tests (tests/test_header.py and friends).

Everything here is built with qemu-img / qemu-io, never with our own writer.
"""

from __future__ import annotations

import os
import struct
import subprocess

import qemu

#: name -> (qemu-img create options, extra setup). Each becomes <dir>/<name>.qcow2.
SPECS = {
    "v3": dict(options={}),
    "v2": dict(options={"compat": "0.10"}),
    "backing": dict(options={}, backing="base.qcow2", backing_fmt="qcow2"),
    "backing_v2": dict(options={"compat": "0.10"}, backing="base.qcow2", backing_fmt="qcow2"),
    "backing_raw_nofmt_v2": dict(options={"compat": "0.10"}, backing="base.raw", backing_fmt="raw"),
    "data_file": dict(options={"data_file": "{dir}/data.raw"}),
    "data_file_raw": dict(options={"data_file": "{dir}/data2.raw", "data_file_raw": "on"}),
    "zstd": dict(options={"compression_type": "zstd"}),
    "extended_l2": dict(options={"extended_l2": "on"}),
    "extended_l2_16k": dict(options={"extended_l2": "on", "cluster_size": "16k"}),
    "lazy_rc1_512": dict(options={"lazy_refcounts": "on", "refcount_bits": "1", "cluster_size": "512"},
                         size="1G"),
    "rc64_2m": dict(options={"refcount_bits": "64", "cluster_size": "2M"}),
    "bitmaps": dict(options={}, bitmaps=[("b0", None), ("bitmap-two", "65536")]),
    "snapshots": dict(options={}, snapshots=["s1", "second-snap"]),
    "snapshots_v2": dict(options={"compat": "0.10"}, snapshots=["only"]),
}


def build_all(directory) -> dict[str, str]:
    """Create every image of :data:`SPECS` in ``directory``; returns name -> path."""
    directory = str(directory)
    qemu.create(os.path.join(directory, "base.qcow2"), "64M")
    with open(os.path.join(directory, "base.raw"), "wb") as f:
        f.truncate(64 << 20)
    paths = {}
    for name, spec in SPECS.items():
        path = os.path.join(directory, name + ".qcow2")
        opts = {k: v.format(dir=directory) for k, v in spec["options"].items()}
        if "backing" in spec:
            qemu.create(path, spec.get("size", "64M"), options=opts,
                        backing=os.path.join(directory, spec["backing"]), backing_fmt=spec["backing_fmt"])
        else:
            qemu.create(path, spec.get("size", "64M"), options=opts)
        for bname, gran in spec.get("bitmaps", ()):
            argv = ["bitmap", "--add"] + (["-g", gran] if gran else []) + [path, bname]
            qemu.qemu_img(*argv)
        if spec.get("snapshots"):
            qemu.qemu_io(path, "write -P 0x11 0 64k")
            for sname in spec["snapshots"]:
                qemu.qemu_img("snapshot", "-c", sname, path)
        paths[name] = path
    return paths


def read_head(path, size: int = 2 << 20) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def poke(src: str, dst: str, pokes) -> bytes:
    """Copy ``src`` to ``dst`` applying ``pokes`` = [(struct format | "raw", offset, value)].

    Returns the first 2 MiB of the result.
    """
    with open(src, "rb") as f:
        data = bytearray(f.read())
    for fmt, offset, value in pokes:
        if fmt == "raw":
            data[offset:offset + len(value)] = value
        else:
            struct.pack_into(fmt, data, offset, value)
    with open(dst, "wb") as f:
        f.write(data)
    return bytes(data[:2 << 20])


def qemu_open_error(path: str, io: bool = False) -> str:
    """qemu-img info's (or, with ``io``, qemu-io's) open error for ``path``, "" if it opens."""
    qemu.require_qemu()
    if io:
        argv = [qemu.QEMU_IO, "-f", "qcow2", "-c", "read 0 512", path]
    else:
        argv = [qemu.QEMU_IMG, "info", "-f", "qcow2", path]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode == 0 and "Could not open" not in proc.stderr and "can't open" not in proc.stderr:
        return ""
    return proc.stderr
