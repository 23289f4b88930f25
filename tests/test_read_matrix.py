"""QEMU-agreement matrix for the read path.

Every image here is made by ``qemu-img``/``qemu-io`` 7.2 (never by our writer) over a matrix of
cluster sizes, compat levels, refcount widths, extended L2, compression types, zero writes,
discards, backing chains (qcow2 -> qcow2 -> raw, bigger and smaller overlays, with and without the
backing-format extension), external data files, internal snapshots and unaligned virtual sizes.
For each image we require:

* ``Image.pread`` of the whole disk == ``qemu-img convert -O raw``;
* ``[e.to_json() for e in Image.map()]`` == ``qemu-img map --output=json``;
* random unaligned reads (Hypothesis) == slices of the raw image, through ``pread``, ``readinto``
  and the ``as_file()`` view;
* for each internal snapshot, its view == ``qemu-img convert -l <snap> -O raw`` (on the common
  prefix: convert -l reads with the *current* virtual size) and == the image after
  ``qemu-img snapshot -a`` (which restores the snapshot's own disk size).

Images are built once per case (module-scoped fixture) and kept small; the file runs in well under
a minute on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2

from qemu import convert_raw, create, map_json, qemu_img, qemu_io, require_qemu

KiB = 1024
MiB = 1024 * KiB

# A bounded number of random reads per image: a quarter of the profile's budget (25 in "ci").
_RANDOM_READS = max(10, settings().max_examples // 4)


# -- building blocks ---------------------------------------------------------------------------

def _io(path, cmds, fmt="qcow2"):
    """Run qemu-io commands in batches (one process per batch of 40 commands)."""
    cmds = list(cmds)
    for i in range(0, len(cmds), 40):
        qemu_io(str(path), *cmds[i:i + 40], fmt=fmt)


def l2_coverage(cluster_size: int, extended_l2: bool) -> int:
    """Guest bytes one L2 table maps."""
    return cluster_size * (cluster_size // (16 if extended_l2 else 8))


def workload(cluster_size: int, size: int, *, compress=True, zero=True, discard=True,
             extended_l2=False, salt=0) -> list[str]:
    """qemu-io commands writing distinctive patterns at unaligned offsets, plus zero writes
    (with and without unmap), discards and compressed clusters, all clipped to ``size``."""
    cs = cluster_size
    p = lambda n: (n * 37 + salt * 11) % 255 + 1  # noqa: E731 - distinctive non-zero patterns
    ops: list[tuple[str, int, int]] = [
        (f"write -P {p(1)}", 1234, cs + 777),                 # unaligned, crosses a cluster
        (f"write -P {p(2)}", 3 * cs - 333, 2 * cs + 1000),    # spans three clusters
        (f"write -P {p(3)}", 9 * cs, 3 * cs),                 # aligned data ...
        (f"write -P {p(4)}", 16 * cs + 5, 3),                 # tiny write into a fresh cluster
        (f"write -P {p(5)}", size // 2 + 511, 1),             # one byte in the middle
        (f"write -P {p(6)}", size - 4321, 4321),              # the tail of the disk
    ]
    l2 = l2_coverage(cs, extended_l2)
    if l2 + 4 * cs < size - 8192:
        ops.append((f"write -P {p(7)}", l2 - 1000, 3000))     # crosses an L2 table boundary
    if zero:
        ops += [
            ("write -z", 6 * cs + 17, 2 * cs),                # unaligned zero write
            ("write -z -u", 9 * cs, cs),                      # ... zero+unmap over data
            ("write -z", 10 * cs, cs),                        # ... zero, keep allocation
            ("write -z -u", 18 * cs, 2 * cs),                 # zero+unmap over nothing
        ]
    if compress:
        ops += [
            (f"write -c -P {p(8)}", 13 * cs, cs),
            (f"write -c -P {p(9)}", 14 * cs, cs),
            ("write -c -P 0", 15 * cs, cs),                   # a compressed cluster of zeros
        ]
    if discard:
        ops += [("discard", 3 * cs, cs), ("discard", 14 * cs, cs)]
    cmds = []
    for op, offset, length in ops:
        if offset < 0 or offset + length > size or length <= 0:
            continue
        if "-c" in op.split() and (offset % 512 or length % 512):
            continue
        cmds.append(f"{op} {offset} {length}")
    return cmds


def opts(cluster_size=65536, compat="1.1", refcount_bits=None, extended_l2=False,
         compression_type=None, **extra) -> dict:
    o = {"cluster_size": cluster_size, "compat": compat}
    if refcount_bits is not None:
        o["refcount_bits"] = refcount_bits
    if extended_l2:
        o["extended_l2"] = "on"
    if compression_type is not None:
        o["compression_type"] = compression_type
    o.update(extra)
    return o


def strip_backing_format(path) -> None:
    """Turn the backing-format header extension into an unknown one, so readers must probe.

    (qemu-img 7.2 refuses to create or rebase without -F; an unknown extension type is ignored by
    QEMU, so the image stays valid and QEMU probes the backing format.)
    """
    with open(path, "r+b") as f:
        head = bytearray(f.read(4096))
        pos = head.find(bytes.fromhex("e2792aca"), 72)
        assert pos > 0, "no backing format extension found"
        f.seek(pos)
        f.write(bytes.fromhex("7a7a7a7a"))
    assert "backing file format" not in qemu_img("info", str(path)).stdout


def make_raw(path, size: int, writes: list[tuple[int, int, int]]) -> str:
    create(path, size, fmt="raw")
    _io(path, [f"write -P {pat} {off} {n}" for pat, off, n in writes], fmt="raw")
    return str(path)


# -- cases -------------------------------------------------------------------------------------

@dataclass
class Built:
    path: str
    snapshots: list[str] = field(default_factory=list)
    keep_sparse: bool = False


def allocate_host_files(d: str) -> None:
    """``posix_fallocate`` every qcow2 and data file of a case.

    qemu-img map asks the host file system about holes under qcow2 data clusters only when a
    heuristic (allocated host bytes < clusters with a refcount, "metadata preallocation") fires, and
    that depends on ext4's delayed-allocation state at the moment map runs: without this the oracle
    is not deterministic.  Raw backing files stay sparse (their holes are part of the matrix).  The
    case ``prealloc-metadata`` keeps its holes on purpose.
    """
    for name in os.listdir(d):
        if name.endswith((".qcow2", ".data")):
            fd = os.open(os.path.join(d, name), os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                if size:
                    os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
            finally:
                os.close(fd)


@dataclass
class Case:
    id: str
    build: Callable[[str], Built]


CASES: list[Case] = []


def case(id: str):
    def deco(fn):
        CASES.append(Case(id, fn))
        return fn
    return deco


def _simple(cluster_size, compat, refcount_bits, *, size=None, extended_l2=False,
            compression_type=None, compress=True):
    size = size or (64 * MiB if cluster_size >= 64 * KiB else 8 * MiB)

    def build(d):
        path = create(os.path.join(d, "img.qcow2"), size,
                      options=opts(cluster_size, compat, refcount_bits, extended_l2,
                                   compression_type))
        _io(path, workload(cluster_size, size, compress=compress, extended_l2=extended_l2))
        return Built(path)
    return build


# cluster size x compat x refcount width (v2 has 16-bit refcounts only)
for _cs in (512, 4 * KiB, 64 * KiB, 2 * MiB):
    for _rb in (1, 16, 64):
        case(f"v3-c{_cs}-rb{_rb}")(_simple(_cs, "1.1", _rb))
    case(f"v2-c{_cs}")(_simple(_cs, "0.10", None))
# zstd
for _cs in (4 * KiB, 64 * KiB, 2 * MiB):
    case(f"zstd-c{_cs}")(_simple(_cs, "1.1", 16, compression_type="zstd"))
# extended L2 (cluster >= 16k)
case("extl2-c16k")(_simple(16 * KiB, "1.1", 16, extended_l2=True))
case("extl2-c64k-zstd")(_simple(64 * KiB, "1.1", 64, extended_l2=True, compression_type="zstd"))
case("extl2-c2M-rb1")(_simple(2 * MiB, "1.1", 1, extended_l2=True))
# virtual sizes not cluster aligned (qemu-img create rounds them up to 512 bytes)
case("size1000000-c4k")(_simple(4 * KiB, "1.1", 16, size=1000000))
case("size1000000-c64k-v2")(_simple(64 * KiB, "0.10", None, size=1000000))
case("size1000000-c512")(_simple(512, "1.1", 16, size=1000000))
case("size123456789-c2M")(_simple(2 * MiB, "1.1", 16, size=123456789))
case("size123456789-c2M-extl2")(_simple(2 * MiB, "1.1", 16, size=123456789, extended_l2=True))


@case("convert-c-zstd-c64k")
def _convert_zstd(d):
    raw = make_raw(os.path.join(d, "src.raw"), 3 * MiB + 512,
                   [(0x3c, 100, 70000), (0x4d, 1 * MiB - 7, 9), (0x5e, 3 * MiB - 1000, 1500)])
    path = os.path.join(d, "img.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=65536",
             raw, path)
    return Built(path)


@case("convert-c-zlib-c4k-extl2")
def _convert_zlib(d):
    raw = make_raw(os.path.join(d, "src.raw"), 1 * MiB,
                   [(0x3c, 100, 70000), (0x4d, 512 * KiB - 7, 9), (0x5e, 1 * MiB - 1000, 1000)])
    path = os.path.join(d, "img.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=16384,extended_l2=on",
             raw, path)
    return Built(path)


# -- backing chains: qcow2 -> qcow2 -> raw ----------------------------------------------------

def _chain(*, raw_size, mid_size, top_size, mid_cs, top_cs, compat="1.1", with_fmt=True,
           top_extl2=False, mid_extl2=False):
    def build(d):
        make_raw(os.path.join(d, "base.raw"), raw_size,
                       [(0x11, 0, 5000), (0x12, raw_size // 2 - 3, 4099), (0x13, raw_size - 600,
                                                                              600)])
        mid = create(os.path.join(d, "mid.qcow2"), mid_size,
                     options=opts(mid_cs, compat, extended_l2=mid_extl2),
                     backing="base.raw", backing_fmt="raw")
        _io(mid, workload(mid_cs, mid_size, compress=True, extended_l2=mid_extl2, salt=1)
            + [f"write -P 0x21 {raw_size // 2 + 100} 3000"] if raw_size // 2 + 3100 < mid_size
            else workload(mid_cs, mid_size, extended_l2=mid_extl2, salt=1))
        top = create(os.path.join(d, "top.qcow2"), top_size,
                     options=opts(top_cs, compat, extended_l2=top_extl2),
                     backing="mid.qcow2", backing_fmt="qcow2")
        _io(top, workload(top_cs, top_size, compress=True, extended_l2=top_extl2, salt=2)[::2]
            + [f"write -P 0x31 {mid_size - 5000} 3000"] if mid_size < top_size
            else workload(top_cs, top_size, extended_l2=top_extl2, salt=2)[::2])
        if not with_fmt:
            strip_backing_format(mid)
            strip_backing_format(top)
        return Built(top)
    return build


case("chain-overlay-bigger")(_chain(raw_size=3 * MiB, mid_size=5 * MiB, top_size=8 * MiB,
                                    mid_cs=4 * KiB, top_cs=64 * KiB))
case("chain-overlay-smaller")(_chain(raw_size=8 * MiB, mid_size=5 * MiB, top_size=3 * MiB,
                                     mid_cs=64 * KiB, top_cs=4 * KiB))
case("chain-probed-bigger")(_chain(raw_size=3 * MiB, mid_size=5 * MiB, top_size=8 * MiB,
                                   mid_cs=64 * KiB, top_cs=512, with_fmt=False))
case("chain-probed-smaller")(_chain(raw_size=8 * MiB, mid_size=5 * MiB, top_size=3 * MiB,
                                    mid_cs=4 * KiB, top_cs=64 * KiB, with_fmt=False))
case("chain-v2")(_chain(raw_size=3 * MiB, mid_size=4 * MiB, top_size=5 * MiB,
                        mid_cs=4 * KiB, top_cs=64 * KiB, compat="0.10"))
case("chain-extl2")(_chain(raw_size=6 * MiB, mid_size=4 * MiB, top_size=8 * MiB,
                           mid_cs=16 * KiB, top_cs=64 * KiB, mid_extl2=True, top_extl2=True))
case("chain-raw-unaligned-size")(_chain(raw_size=1000000 + 7, mid_size=2 * MiB, top_size=3 * MiB,
                                        mid_cs=4 * KiB, top_cs=64 * KiB))


def _subclusters_over_backing(cluster_size, compat="1.1", backing_fmt="qcow2"):
    """Partial-cluster and subcluster writes (extended L2) over a fully written backing file."""
    def build(d):
        size = max(4 * MiB, 10 * cluster_size)
        sub = cluster_size // 32
        if backing_fmt == "raw":
            base = make_raw(os.path.join(d, "base.raw"), size, [(0x77, 0, size)])
        else:
            base = create(os.path.join(d, "base.qcow2"), size, options=opts(64 * KiB))
            _io(base, [f"write -P 0x77 0 {size}"])
        top = create(os.path.join(d, "top.qcow2"), size,
                     options=opts(cluster_size, compat, extended_l2=True),
                     backing=os.path.basename(base), backing_fmt=backing_fmt)
        cs = cluster_size
        _io(top, [
            "write -P 0x81 3000 512",                         # within one subcluster, unaligned
            f"write -P 0x82 {cs + sub - 10} 20",              # straddles two subclusters
            f"write -P 0x83 {2 * cs + 5 * sub} {3 * sub}",    # aligned subclusters
            f"write -z {3 * cs + sub} {sub}",                 # one zero subcluster
            f"write -z {3 * cs + 4 * sub + 100} {2 * sub}",   # unaligned zero range
            f"write -P 0x84 {4 * cs} {sub}",
            f"discard {4 * cs} {cs}",                         # discard a whole cluster
            f"write -P 0x85 {5 * cs} {cs}",
            f"write -z -u {5 * cs + 2 * sub} {4 * sub}",      # zero subclusters in data cluster
            f"write -P 0x86 {6 * cs + 31 * sub} {2 * sub}",   # last subcluster + next cluster
            f"write -z -u {8 * cs} {cs}",                     # a whole zero cluster
            f"write -P 0x87 {size - 700} 700",
        ])
        return Built(top)
    return build


case("subcl-c16k-over-qcow2")(_subclusters_over_backing(16 * KiB))
case("subcl-c64k-over-raw")(_subclusters_over_backing(64 * KiB, backing_fmt="raw"))
case("subcl-c2M-over-qcow2")(_subclusters_over_backing(2 * MiB))


@case("partial-clusters-v2-over-backing")
def _partial_v2(d):
    size = 2 * MiB
    base = make_raw(os.path.join(d, "base.raw"), size, [(0x66, 0, size)])
    top = create(os.path.join(d, "top.qcow2"), size, options=opts(4 * KiB, "0.10"),
                 backing=os.path.basename(base), backing_fmt="raw")
    _io(top, ["write -P 0x91 100 10", "write -z 5000 3000", "write -z 8192 8192",
              "write -z -u 65536 4096", "discard 16384 4096", "write -P 0x92 20000 1",
              f"write -c -P 0x93 {32 * KiB} 4096"])
    return Built(top)


# -- external data files -----------------------------------------------------------------------

def _data_file(cluster_size, raw: bool, *, extended_l2=False, backing=False):
    def build(d):
        size = 6 * MiB
        # absolute: qemu 7.2 resolves a relative data-file name against its *cwd*, not the image
        extra = {"data_file": os.path.join(d, "img.data")}
        if raw:
            extra["data_file_raw"] = "on"
        kw = {}
        if backing:
            base = make_raw(os.path.join(d, "base.raw"), 4 * MiB,
                            [(0x55, 0, 3000), (0x56, 2 * MiB - 9, 4 * KiB)])
            kw = {"backing": os.path.basename(base), "backing_fmt": "raw"}
        path = create(os.path.join(d, "img.qcow2"), size,
                      options=opts(cluster_size, extended_l2=extended_l2, **extra), **kw)
        _io(path, workload(cluster_size, size, compress=False, extended_l2=extended_l2))
        return Built(path)
    return build


case("datafile-c64k")(_data_file(64 * KiB, False))
case("datafile-raw-c4k")(_data_file(4 * KiB, True))
case("datafile-extl2-c32k")(_data_file(32 * KiB, False, extended_l2=True))
case("datafile-over-backing-c64k")(_data_file(64 * KiB, False, backing=True))


# -- internal snapshots ------------------------------------------------------------------------

def _snapshots(cluster_size, compat="1.1", extended_l2=False, resize=True):
    def build(d):
        path = create(os.path.join(d, "img.qcow2"), 2 * MiB,
                      options=opts(cluster_size, compat, extended_l2=extended_l2))
        _io(path, workload(cluster_size, 2 * MiB, extended_l2=extended_l2, salt=3)[:6])
        qemu_img("snapshot", "-c", "first", path)
        _io(path, ["write -P 0xa5 1000 70000", "write -z 200000 5000", "discard 0 4096"])
        if resize:
            qemu_img("resize", path, str(3 * MiB + 512))
            _io(path, [f"write -P 0xa6 {3 * MiB - 100} 600"])
        qemu_img("snapshot", "-c", "second", path)
        fresh = max(12 * cluster_size, 256 * KiB)   # never written before: compressed writes
        _io(path, ["write -P 0xa7 0 3333", f"write -c -P 0xa8 {fresh} {cluster_size}"])
        if resize:
            qemu_img("resize", "--shrink", path, str(1 * MiB + 512))
        qemu_img("snapshot", "-c", "third", path)
        _io(path, ["write -P 0xa9 77 7777"])
        return Built(path, ["first", "second", "3"])   # "3": by id
    return build


case("snap-c4k")(_snapshots(4 * KiB))
case("snap-c64k-extl2")(_snapshots(64 * KiB, extended_l2=True))
case("snap-c512-v2")(_snapshots(512, compat="0.10", resize=False))


@case("snap-over-backing-c64k")
def _snap_over_backing(d):
    base = make_raw(os.path.join(d, "base.raw"), 3 * MiB,
                    [(0x61, 0, 200000), (0x62, 2 * MiB - 5, 10)])
    path = create(os.path.join(d, "img.qcow2"), 2 * MiB, options=opts(64 * KiB),
                  backing=os.path.basename(base), backing_fmt="raw")
    _io(path, ["write -P 0xb1 1000 3000", "write -z 100000 70000"])
    qemu_img("snapshot", "-c", "before", path)
    qemu_img("resize", path, str(4 * MiB))
    _io(path, ["write -P 0xb2 500 100", "discard 0 65536", f"write -P 0xb3 {3 * MiB} 100"])
    qemu_img("snapshot", "-c", "after", path)
    _io(path, ["write -P 0xb4 0 65536"])
    return Built(path, ["before", "after"])


# -- preallocation: data clusters over host holes ---------------------------------------------

@case("prealloc-metadata-c64k")
def _prealloc_metadata(d):
    """Every cluster mapped, host file sparse: qemu-img map reports host holes under data clusters
    as ``"zero": true, "data": true`` (its metadata-preallocation heuristic)."""
    path = create(os.path.join(d, "img.qcow2"), 4 * MiB,
                  options=opts(64 * KiB, preallocation="metadata"))
    _io(path, ["write -P 0x44 70000 5000", "write -z 1048576 65536"])
    return Built(path, keep_sparse=True)


@case("prealloc-falloc-c4k")
def _prealloc_falloc(d):
    path = create(os.path.join(d, "img.qcow2"), 1 * MiB,
                  options=opts(4 * KiB, preallocation="falloc"))
    _io(path, ["write -P 0x45 7000 5000", "discard 65536 8192"])
    return Built(path)


# -- fixtures ----------------------------------------------------------------------------------

@dataclass
class Oracle:
    path: str
    raw: bytes
    map: list[dict]
    snapshots: dict  # name -> (convert -l bytes, bytes after snapshot -a)


SNAPSHOT_CASES = [c for c in CASES if c.id.startswith("snap-")]

@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def oracle(request, tmp_path_factory) -> Oracle:
    require_qemu()
    d = str(tmp_path_factory.mktemp(request.param.id))
    built = request.param.build(d)
    if not built.keep_sparse:
        allocate_host_files(d)
    ck = qemu_img("check", built.path, check=False)
    assert ck.returncode == 0, f"fixture is not clean: {ck.stdout}{ck.stderr}"
    raw = convert_raw(built.path, os.path.join(d, "out.raw"))
    os.unlink(os.path.join(d, "out.raw"))
    snaps = {}
    for name in built.snapshots:
        conv = convert_raw(built.path, os.path.join(d, "snap.raw"), "-l", name)
        copy = os.path.join(d, "applied.qcow2")
        shutil.copyfile(built.path, copy)
        qemu_img("snapshot", "-a", name, copy)
        applied = convert_raw(copy, os.path.join(d, "snap.raw"))
        os.unlink(copy)
        os.unlink(os.path.join(d, "snap.raw"))
        snaps[name] = (conv, applied)
    return Oracle(built.path, raw, map_json(built.path), snaps)


@pytest.fixture(scope="module")
def image(oracle):
    with qcow2.open(oracle.path) as img:
        yield img


# -- tests -------------------------------------------------------------------------------------

def test_size_matches_qemu(oracle, image):
    assert image.size == len(oracle.raw)


def test_full_read_matches_convert(oracle, image):
    data = image.pread(image.size, 0)
    assert len(data) == len(oracle.raw)
    if data != oracle.raw:
        first = next(i for i in range(len(data)) if data[i] != oracle.raw[i])
        pytest.fail(f"first difference at guest offset 0x{first:x}: "
                    f"ours {data[first:first + 8].hex()} qemu {oracle.raw[first:first + 8].hex()}")


def test_map_matches_qemu(oracle, image):
    ours = [e.to_json() for e in image.map()]
    assert json.loads(json.dumps(ours)) == oracle.map


def test_map_subranges_match_qemu(oracle, image):
    """map(offset, length) == qemu-img map --start-offset --max-length, unaligned ranges."""
    size = image.size
    cs = image.cluster_size
    for offset, length in ((1000, 3 * cs + 4097), (size // 2 - cs - 3, 2 * cs + 11),
                           (size - cs - 1, cs + 1)):
        offset = max(0, offset)
        length = min(length, size - offset)
        theirs = json.loads(qemu_img("map", "-f", "qcow2", "--output=json",
                                     f"--start-offset={offset}", f"--max-length={length}",
                                     oracle.path).stdout)
        assert [e.to_json() for e in image.map(offset, length)] == theirs, (offset, length)


def test_map_extents_tile_the_disk(image):
    pos = 0
    for e in image.map():
        assert e.start == pos and e.length > 0
        pos += e.length
    assert pos == image.size


def test_as_file_streams_whole_disk(oracle, image):
    f = image.as_file()
    chunks = []
    while True:
        b = f.read(777_777)
        if not b:
            break
        chunks.append(b)
    assert b"".join(chunks) == oracle.raw
    assert f.tell() == image.size


@settings(max_examples=_RANDOM_READS, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_unaligned_reads(oracle, image, data):
    size = image.size
    # bias offsets towards cluster and L2 boundaries, where mapping bugs live
    cs = image.cluster_size
    near = data.draw(st.sampled_from([0, cs, 3 * cs, 9 * cs, 13 * cs, size // 2, size - 4321,
                                      l2_coverage(cs, image.header.extended_l2), size]))
    offset = data.draw(st.one_of(st.integers(0, size),
                                 st.integers(max(0, min(size, near) - 700),
                                             max(0, min(size, near + 700)))), label="offset")
    length = data.draw(st.integers(0, min(size - offset, 3 * cs + 4096)), label="length")
    expect = oracle.raw[offset:offset + length]
    assert image.pread(length, offset) == expect
    buf = bytearray(length + 3)
    image.readinto(memoryview(buf)[1:1 + length], offset)
    assert buf[1:1 + length] == expect and buf[0] == 0 and buf[-2:] == b"\0\0"
    f = image.as_file()
    f.seek(offset)
    assert f.read(length) == expect


@pytest.mark.parametrize("oracle", SNAPSHOT_CASES, ids=[c.id for c in SNAPSHOT_CASES],
                         indirect=True)
def test_snapshots_match_qemu(oracle, image):
    assert oracle.snapshots
    for name, (converted, applied) in oracle.snapshots.items():
        view = image.snapshot(name)
        data = view.pread(view.size, 0)
        # convert -l reads the snapshot with the image's *current* size: compare the common prefix
        n = min(len(data), len(converted))
        assert data[:n] == converted[:n], name
        # snapshot -a restores the snapshot's own disk size: compare everything
        assert data == applied, name
        assert view.as_file().read() == applied, name


@pytest.mark.parametrize("oracle", SNAPSHOT_CASES, ids=[c.id for c in SNAPSHOT_CASES],
                         indirect=True)
def test_snapshot_random_reads(oracle, image):
    assert oracle.snapshots
    import random
    rng = random.Random(1234)
    for name, (_, applied) in oracle.snapshots.items():
        view = image.snapshot(name)
        for _ in range(50):
            off = rng.randrange(0, view.size + 1)
            n = rng.randrange(0, min(view.size - off, 200_000) + 1)
            assert view.pread(n, off) == applied[off:off + n], (name, off, n)
