"""The writer, model-checked: random operation sequences against a bytearray, judged by qemu-img.

Method.  A Hypothesis state machine creates an image with random options (cluster sizes 512 B to
2 MiB, small ones weighted up; refcount widths 1..64; compat 0.10 and 1.1; lazy refcounts; extended
L2; zlib/zstd; preallocation; a backing file - raw, qcow2 written by qemu-io, or qcow2 over raw -
with or without its format; an external data file, raw or not) and runs random operations on it:
unaligned and cluster/L2-table crossing ``pwrite``, ``write_zeroes`` (with and without unmap),
``discard``, ``write_compressed``, ``resize`` both ways, ``flush``, close and reopen (with a tiny
L2 cache, or every overlap check on), dropping the image unclosed after a flush (a lazy-refcounts
image is then repaired by the next open), writes by qemu-io between two opens, and internal
snapshots made, applied and deleted by ``qemu-img snapshot`` while the image is closed.  One
sequence in five is shaped for table growth (512-byte clusters, 32/64-bit refcounts, a large disk:
the refcount table and the L1 table move).  The model is the guest disk as a ``bytearray``
plus one frozen copy per snapshot, with QEMU 7.2's semantics (checked with qemu-io):

- ``write_zeroes`` reads zeros; growing reads zeros (a backing file does not show through);
- ``discard`` acts on whole clusters only (plus the partial last cluster when the range reaches
  the end of the disk); they read as zeros, except on a version 2 image with a backing file, where
  QEMU refuses discards and nothing changes;
- a snapshot keeps its content whatever is written later; applying one makes the disk the
  snapshot (its size too).

After every step the library's own invariants are checked (``Refcounts._check``,
``TableCache._check``, the guard's range map ``_check`` and equality with a map rebuilt from the
image's metadata, the header and snapshot codecs' ``_check``, the header in memory equal to the one
on disk, no corruption event).  Reads are compared with the model at random.  At the end
of every sequence the image is closed, ``qemu-img check`` must find no corruption and no leak,
``qemu-img compare`` must find it identical to the model written as a raw file, our ``map`` must
equal ``qemu-img map``'s, and every snapshot read through ``qemu-img convert -l`` must equal its
frozen copy.

Cost: under the "ci" profile 100 sequences of up to 25 steps (30-60 s on two busy cores; the
scratch files live in /dev/shm when it exists, as every flush fsyncs); ``HYPOTHESIS_PROFILE=deep``
runs the profile's many examples with sequences of up to 60 steps.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

import qcow2
from qcow2 import constants as C
from qcow2.errors import UnsupportedError
from qcow2.events import BLOCK_IMAGE_CORRUPTED
from qcow2.guard import OverlapGuard
from qcow2.header import decode_header
from qcow2.metadata import iter_metadata
from tests.qemu import QEMU_IMG, QEMU_IO, require_qemu

DEEP = os.environ.get("HYPOTHESIS_PROFILE") == "deep"
STEPS_PER_SEQUENCE = 60 if DEEP else 25
SEQUENCES = settings().max_examples if DEEP else min(100, settings().max_examples)

MIB = 1 << 20
MAX_DISK_SIZE = 8 * MIB
MAX_SNAPSHOTS = 3
# small clusters exercise more structure (L2 tables, refcount blocks, table growth) per byte
CLUSTER_BITS = st.sampled_from([9] * 6 + [10] * 3 + [11] * 2 + [12] * 3 + [13] * 2 + [14] * 2
                               + [15, 16, 16, 17, 18, 19, 20, 21])
# a memory file system when there is one: every flush fsyncs, and a busy disk would dominate
SCRATCH_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
PATTERN_PERIOD = 251          # prime: a copy misplaced by any whole-sector amount shows


def pattern(seed: int, nb_bytes: int) -> bytes:
    """Deterministic non-zero bytes that differ per seed and per position."""
    block = bytes(((seed * 37 + i * 11) % 255) + 1 for i in range(PATTERN_PERIOD))
    return (block * (nb_bytes // PATTERN_PERIOD + 1))[:nb_bytes]


def content(kind: str, seed: int, nb_bytes: int) -> bytes:
    """Guest data of one of several kinds (compressible, incompressible, zeros, mixed)."""
    if kind == "pattern":
        return pattern(seed, nb_bytes)
    if kind == "random":
        return random.Random(seed).randbytes(nb_bytes)
    if kind == "zeros":
        return bytes(nb_bytes)
    half = nb_bytes // 2                          # mixed: zeros then incompressible
    return bytes(half) + random.Random(seed).randbytes(nb_bytes - half)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True)


def qemu_img(*argv: str) -> subprocess.CompletedProcess:
    return run(QEMU_IMG, *argv)


def assert_qemu_check_clean(path: str) -> None:
    proc = qemu_img("check", "--output=json", path)
    assert proc.returncode == 0, f"qemu-img check rc={proc.returncode}: {proc.stdout}{proc.stderr}"
    report = json.loads(proc.stdout)
    assert not report.get("corruptions") and not report.get("leaks"), report
    assert not report.get("check-errors"), report


class WriterModel(RuleBasedStateMachine):
    """One image, its model, and the snapshots' frozen models."""

    def __init__(self):
        super().__init__()
        self.img = None
        self.dir = tempfile.mkdtemp(prefix="qcow2-model-", dir=SCRATCH_DIR)
        self.events: list = []
        self.snapshots: dict[str, bytes] = {}
        self.next_snapshot = 0
        self.seed = 0

    # -- creation ----------------------------------------------------------------------------------
    @initialize(data=st.data())
    def create_image(self, data):
        draw = data.draw
        # one sequence in five is shaped for table growth: 512-byte clusters, wide refcounts, a
        # large disk (the refcount table then grows within a few big writes)
        growth = draw(st.integers(0, 4), label="growth_shape") == 0
        cluster_bits = 9 if growth else draw(CLUSTER_BITS, label="cluster_bits")
        cs = 1 << cluster_bits
        v3 = growth or draw(st.booleans(), label="v3")
        opts = {"cluster_size": cs, "compat": "1.1" if v3 else "0.10"}
        if v3:
            # wide refcounts on small clusters: refcount blocks cover little, so the refcount
            # table must grow (at 512 bytes and 64 bits one table cluster covers 2 MiB)
            widths = [64, 64, 32, 16, 8, 1, 2, 4] if cs <= 1024 else [16, 16, 1, 2, 4, 8, 32, 64]
            if growth:
                widths = [64, 32]
            opts["refcount_bits"] = draw(st.sampled_from(widths), label="refcount_bits")
            opts["lazy_refcounts"] = draw(st.booleans(), label="lazy_refcounts")
            opts["compression_type"] = draw(st.sampled_from(["zlib", "zstd"]), label="compression")
            if cluster_bits >= 14:
                opts["extended_l2"] = draw(st.booleans(), label="extended_l2")
        max_clusters = max(2, MAX_DISK_SIZE // cs)
        nb_clusters = draw(st.one_of(st.integers(1, 40), st.integers(1, min(600, max_clusters)),
                                     st.integers(1, max_clusters)), label="nb_clusters")
        if growth:
            nb_clusters = draw(st.integers(max_clusters // 2, max_clusters), label="nb_clusters")
        size = nb_clusters * cs
        if draw(st.booleans(), label="unaligned_size") and cs > 512:
            size -= draw(st.integers(1, cs // 512 - 1)) * 512
        size = max(512, min(size, MAX_DISK_SIZE))

        backing = draw(st.sampled_from(["none", "none", "raw", "qcow2", "qcow2", "qcow2-on-raw"]),
                       label="backing")
        self.backing_model = b""
        if backing != "none":
            self._make_backing(draw, backing, size, opts)
        if v3 and draw(st.integers(0, 3), label="data_file") == 0:
            opts["data_file"] = os.path.join(self.dir, "data.raw")
            if backing == "none":
                opts["data_file_raw"] = draw(st.booleans(), label="data_file_raw")
        prealloc = draw(st.sampled_from(["off"] * 6 + ["metadata", "falloc", "full"]),
                        label="preallocation")
        if backing == "none" or opts.get("extended_l2"):
            opts["preallocation"] = prealloc

        self.opts = opts
        self.cs = cs
        self.v3 = v3
        self.extended = bool(opts.get("extended_l2"))
        self.l2_span = (cs // (16 if self.extended else 8)) * cs
        self.has_backing = backing != "none"
        self.data_file = "data_file" in opts
        self.data_file_raw = bool(opts.get("data_file_raw"))
        self.path = os.path.join(self.dir, "img.qcow2")
        self.model = bytearray(self._below(0, size))
        self.img = qcow2.create(self.path, size, on_event=self.events.append, **opts)
        assert self.img.size == size

    def _make_backing(self, draw, kind: str, size: int, opts: dict) -> None:
        """A backing file, its model, and the options naming it."""
        nb_sectors = draw(st.integers(1, 2 * -(-size // 512) + 4), label="backing_sectors")
        backing_size = nb_sectors * 512
        raw_path = os.path.join(self.dir, "base.raw")
        if kind in ("raw", "qcow2-on-raw"):
            # a raw file of any length; QEMU sees whole sectors (the last one padded with zeros)
            cut = draw(st.integers(0, 511), label="raw_cut") if kind == "raw" else 0
            raw = bytearray(pattern(200, backing_size - cut))
            raw[:len(raw) // 3] = bytes(len(raw) // 3)     # a zero area too
            with open(raw_path, "wb") as f:
                f.write(raw)
            model = bytes(raw) + bytes(cut)
        if kind == "raw":
            path, fmt = raw_path, "raw"
        else:
            path, fmt = os.path.join(self.dir, "base.qcow2"), "qcow2"
            base_cs = draw(st.sampled_from([512, 4096, 65536]), label="base_cluster_size")
            argv = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={base_cs}"]
            if kind == "qcow2-on-raw":
                argv += ["-b", "base.raw", "-F", "raw"]
            else:
                model = bytes(backing_size)
            proc = qemu_img(*argv, path, str(backing_size))
            assert proc.returncode == 0, proc.stderr
            model = bytearray(model)
            commands = []
            for k in range(draw(st.integers(0, 4), label="base_writes")):
                off = draw(st.integers(0, backing_size - 1))
                n = draw(st.integers(1, min(backing_size - off, 3 * base_cs)))
                if draw(st.booleans()):
                    commands += ["-c", f"write -P {0x30 + k} {off} {n}"]
                    model[off:off + n] = bytes([0x30 + k]) * n
                else:
                    commands += ["-c", f"write -z {off} {n}"]
                    model[off:off + n] = bytes(n)
            if commands:
                proc = run(QEMU_IO, "-f", "qcow2", *commands, path)
                assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout
            model = bytes(model)
        self.backing_model = model
        absolute = draw(st.booleans(), label="absolute_backing_name")
        opts["backing_file"] = path if absolute else os.path.basename(path)
        if draw(st.integers(0, 3), label="backing_fmt") != 0:
            opts["backing_fmt"] = fmt

    def _below(self, offset: int, length: int) -> bytes:
        """What the backing file shows at ``[offset, +length)`` (zeros past its end)."""
        part = self.backing_model[offset:offset + length]
        return part + bytes(length - len(part))

    # -- drawing requests ------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.img.size

    def _offset(self, data) -> int:
        size, cs, span = self.size, self.cs, self.l2_span
        where = data.draw(st.sampled_from(["any", "cluster", "cluster", "l2", "end"]), label="at")
        if where == "any":
            return data.draw(st.integers(0, size - 1))
        if where == "end":
            return size - data.draw(st.integers(1, min(size, 3 * cs)))
        unit = cs if where == "cluster" else span
        base = data.draw(st.integers(0, (size - 1) // unit)) * unit
        delta = data.draw(st.sampled_from([0, 0, 1, -1, 512, -512, cs // 2, -cs, -cs // 2 + 7]))
        return min(max(0, base + delta), size - 1)

    def _range(self, data) -> tuple[int, int]:
        offset = self._offset(data)
        room = self.size - offset
        cs = self.cs
        kind = data.draw(st.sampled_from(["small", "clusters", "aligned", "big", "huge",
                                          "to_end"]), label="length")
        if kind == "small":
            length = data.draw(st.integers(1, 1200))
        elif kind == "clusters":
            length = data.draw(st.integers(1, 3 * cs))
        elif kind == "aligned":
            length = data.draw(st.integers(1, 4)) * cs - offset % cs
        elif kind == "big":             # across an L2 table boundary or two
            length = data.draw(st.integers(1, max(4 * cs, min(2 * MIB, 2 * self.l2_span))))
        elif kind == "huge":            # many refcount blocks at once, refcount table growth
            length = data.draw(st.integers(1, 4 * MIB))
        else:
            length = room
        return offset, max(1, min(length, room))

    def _data(self, data, nb_bytes: int) -> bytes:
        kind = data.draw(st.sampled_from(["pattern", "pattern", "random", "zeros", "mixed"]),
                         label="content")
        self.seed += 1
        return content(kind, self.seed, nb_bytes)

    # -- write rules -----------------------------------------------------------------------------
    @precondition(lambda self: self.img is not None and self.img.size > 0)
    @rule(data=st.data())
    def pwrite(self, data):
        offset, length = self._range(data)
        buf = self._data(data, length)
        assert self.img.pwrite(buf, offset) == length
        self.model[offset:offset + length] = buf

    @precondition(lambda self: self.img is not None and self.img.size > 0)
    @rule(data=st.data(), may_unmap=st.booleans())
    def write_zeroes(self, data, may_unmap):
        offset, length = self._range(data)
        self.img.write_zeroes(offset, length, may_unmap=may_unmap)
        self.model[offset:offset + length] = bytes(length)

    @precondition(lambda self: self.img is not None and self.img.size > 0)
    @rule(data=st.data())
    def discard(self, data):
        offset, length = self._range(data)
        self.img.discard(offset, length)
        self._discarded(offset, length)

    def _discarded(self, offset: int, length: int) -> None:
        """The model after a discard (QEMU 7.2's semantics, see the module docstring)."""
        cs, size = self.cs, self.size
        end = offset + length
        first = -(-offset // cs) * cs
        stop = end // cs * cs
        if end == size:                      # the partial last cluster of the disk counts
            stop = -(-end // cs) * cs
        if first < stop and (self.v3 or not self.has_backing):
            stop = min(stop, size)
            self.model[first:stop] = bytes(stop - first)

    @precondition(lambda self: self.img is not None and self.img.size > 0 and not self.data_file)
    @rule(data=st.data())
    def write_compressed(self, data):
        cs, size = self.cs, self.size
        first = data.draw(st.integers(0, (size - 1) // cs), label="cluster")
        nb = data.draw(st.integers(1, 3), label="nb_clusters")
        offset = first * cs
        length = min(nb * cs, size - offset)
        buf = self._data(data, length)
        assert self.img.write_compressed(buf, offset) == length
        self.model[offset:offset + length] = buf

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def resize(self, data):
        size, cs = self.size, self.cs
        if data.draw(st.booleans(), label="grow") or size <= 512:
            limit = MAX_DISK_SIZE - size
            if limit < 512:
                return
            step = data.draw(st.one_of(st.integers(1, 8), st.integers(1, limit // 512)),
                             label="grow_sectors") * 512
            new_size = size + min(step, limit // 512 * 512)
            if data.draw(st.booleans(), label="to_whole_clusters"):
                new_size = min(MAX_DISK_SIZE, -(-new_size // cs) * cs)
        else:
            new_size = data.draw(st.integers(1, size // 512 - 1), label="shrink_to_sectors") * 512
        if self.img.snapshots and self.img.header.version < 3:    # refused, as by qemu-img
            with pytest.raises(UnsupportedError, match="Can't resize a v2 image which has "
                                                       "snapshots"):
                self.img.resize(new_size, shrink=new_size < size)
            assert self.img.size == size
            return
        self.img.resize(new_size, shrink=new_size < size)
        assert self.img.size == new_size
        if new_size < size:
            del self.model[new_size:]
        else:
            self.model += bytes(new_size - size)

    @precondition(lambda self: self.img is not None)
    @rule()
    def flush(self):
        self.img.flush()

    @precondition(lambda self: self.img is not None)
    @rule(tiny_l2_cache=st.booleans(), check_all=st.booleans())
    def reopen(self, tiny_l2_cache, check_all):
        self.img.close()
        self.img = None
        self._reopen(tiny_l2_cache, check_all)
        assert self.img.size == len(self.model)
        assert self.img.pread(self.size, 0) == self.model

    @precondition(lambda self: self.img is not None)
    @rule()
    def abandon_after_flush(self):
        """Flush, then drop the image as a killed process would (no close: a lazy-refcounts
        image stays dirty); the next read-write open repairs what needs repairing."""
        img = self.img
        img.flush()
        img._closed = True                     # the close path must not run
        img._file.close()
        if img._data is not img._file:
            img._data.close()
        img.close()                            # only the (read-only) backing chain
        self.img = None
        self._reopen()
        assert self.img.size == len(self.model)
        assert not self.img.header.dirty
        assert self.img.pread(self.size, 0) == self.model

    def _reopen(self, tiny_l2_cache=False, check_all=False):
        options = {"on_event": self.events.append}
        if tiny_l2_cache:
            options["l2_cache_size"] = 4 * self.cs      # four tables: evictions all the time
        if check_all:
            options["overlap_check"] = "all"
        self.img = qcow2.open(self.path, "r+", **options)

    @precondition(lambda self: self.img is not None and self.img.size > 0)
    @rule(data=st.data(), op=st.sampled_from(["write", "zero", "zero_unmap", "discard"]))
    def qemu_io_write(self, data, op):
        """QEMU writes the image between two of our opens: our writer must carry on from
        QEMU's metadata (its allocation, zero clusters, subclusters) and QEMU from ours."""
        offset, length = self._range(data)
        self.img.close()
        self.img = None
        value = 0x40 + self.seed % 64
        self.seed += 1
        command = {"write": f"write -P {value} {offset} {length}",
                   "zero": f"write -z {offset} {length}",
                   "zero_unmap": f"write -z -u {offset} {length}",
                   "discard": f"discard {offset} {length}"}[op]
        proc = run(QEMU_IO, "-f", "qcow2", "-c", command, self.path)
        assert proc.returncode == 0 and "failed" not in proc.stdout + proc.stderr, \
            proc.stdout + proc.stderr
        self._reopen()
        if op == "write":
            self.model[offset:offset + length] = bytes([value]) * length
        elif op == "discard":
            self._discarded(offset, length)
        else:
            self.model[offset:offset + length] = bytes(length)

    # -- internal snapshots, made by qemu-img while the image is closed -------------------------
    def _qemu_snapshot(self, *argv: str) -> bool:
        """Close, run ``qemu-img snapshot``, reopen.  When qemu-img refuses (e.g. a refcount
        would overflow a narrow refcount width) the image is restored from a copy."""
        self.img.close()
        self.img = None
        assert_qemu_check_clean(self.path)          # whatever qemu-img does, we left it clean
        saved = self.path + ".saved"
        shutil.copyfile(self.path, saved)
        proc = qemu_img("snapshot", *argv, self.path)
        if proc.returncode != 0:
            os.replace(saved, self.path)
        else:
            os.unlink(saved)
        self._reopen()
        return proc.returncode == 0

    @precondition(lambda self: self.img is not None and not self.data_file
                  and len(self.snapshots) < MAX_SNAPSHOTS)
    @rule()
    def snapshot_create(self):
        name = f"snap{self.next_snapshot}"
        self.next_snapshot += 1
        if self._qemu_snapshot("-c", name):
            self.snapshots[name] = bytes(self.model)
        assert self.img.size == len(self.model)

    @precondition(lambda self: self.img is not None and self.snapshots)
    @rule(data=st.data())
    def snapshot_apply(self, data):
        name = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
        if self._qemu_snapshot("-a", name):
            self.model = bytearray(self.snapshots[name])
            assert self.img.size == len(self.model)

    @precondition(lambda self: self.img is not None and self.snapshots)
    @rule(data=st.data())
    def snapshot_delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
        if self._qemu_snapshot("-d", name):
            del self.snapshots[name]
        assert self.img.size == len(self.model)

    # -- reads -------------------------------------------------------------------------------------
    @precondition(lambda self: self.img is not None and self.img.size > 0)
    @rule(data=st.data())
    def read(self, data):
        offset, length = self._range(data)
        assert self.img.pread(length, offset) == self.model[offset:offset + length]

    @precondition(lambda self: self.img is not None and self.snapshots)
    @rule(data=st.data())
    def read_snapshot(self, data):
        name = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
        expected = self.snapshots[name]
        view = self.img.snapshot(name)
        assert view.size == len(expected)
        offset = data.draw(st.integers(0, len(expected) - 1))
        length = data.draw(st.integers(1, len(expected) - offset))
        assert view.pread(length, offset) == expected[offset:offset + length]

    # -- invariants and the verdict ----------------------------------------------------------------
    @invariant()
    def library_invariants(self):
        img = self.img
        if img is None:
            return
        assert not img.corrupt
        assert [e for e in self.events if e.name == BLOCK_IMAGE_CORRUPTED] == []
        assert len(self.model) == img.size
        img._writer.refcounts._check()
        img._l2_cache._check()
        img.guard._check()
        img.header._check()
        on_disk = decode_header(img._file.pread(min(img._file.size, 1 << C.MAX_CLUSTER_BITS), 0))
        assert on_disk == img.header              # header changes are written at once
        for entry in img.snapshots:
            entry._check()
        assert img.guard.unprotected() == []
        fresh = OverlapGuard(self.cs, overlap_check=img._guard_options["overlap_check"],
                             source=lambda types: iter_metadata(img, types))
        fresh.rebuild()
        assert list(img.guard._map.runs()) == list(fresh._map.runs())

    def teardown(self):
        try:
            if self.img is not None:
                self.img.close()
                if sys.exc_info()[0] is None:     # a failing step is reported as it is
                    self._verdict()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _verdict(self):
        assert_qemu_check_clean(self.path)
        raw = os.path.join(self.dir, "model.raw")
        with open(raw, "wb") as f:
            f.write(self.model)
        proc = qemu_img("compare", "-f", "qcow2", "-F", "raw", self.path, raw)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = qemu_img("map", "--output=json", self.path)   # the allocation as QEMU sees it
        assert proc.returncode == 0, proc.stderr
        with qcow2.open(self.path) as img:
            assert [e.to_json() for e in img.map()] == json.loads(proc.stdout)
        for name, expected in self.snapshots.items():
            out = os.path.join(self.dir, f"{name}.raw")
            proc = qemu_img("convert", "-l", name, "-O", "raw", self.path, out)
            assert proc.returncode == 0, proc.stderr
            with open(out, "rb") as f:
                got = f.read()
            # convert -l reads the snapshot at the image's current size
            n = min(len(got), len(expected))
            assert got[:n] == expected[:n], name


def test_writer_against_model_and_qemu():
    """Random sequences of writes, zeroes, discards, compressed writes, resizes, reopens and
    snapshots: reads equal the model; qemu-img check is clean and compare equal."""
    require_qemu()
    run_state_machine_as_test(WriterModel, settings=settings(
        max_examples=SEQUENCES, stateful_step_count=STEPS_PER_SEQUENCE))
