"""Helpers of the fuzzing properties (tests/test_fuzz_properties.py) and their regression tests:
termination and memory guards, the exercise every image gets, a recorder of host writes at the
one door to the disk, and the qemu-img side of the comparisons."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import tempfile
import tracemalloc
from dataclasses import dataclass

from qcow2 import cli
from qcow2._fuzzgen import KIND_TO_OL, scratch_directory
from qcow2.check import check_image
from qcow2.errors import Qcow2Error
from qcow2.image import Image
from qcow2.storage import Storage

import qemu

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
DEEP = PROFILE == "deep"

#: Per-example guards: generous bounds that only a hang or a runaway allocation can reach.
TIME_LIMIT_S = 60
MEMORY_LIMIT_BYTES = 64 << 20          # tracemalloc peak, plus 4x the file size
ADDRESS_SPACE_HEADROOM_BYTES = 2 << 30  # RLIMIT_AS above the process's current size
READ_CHUNK = 256 << 10
MAX_READ_BYTES = 4 << 20               # guest bytes read per image (reads are also sampled)


def scaled(n_ci: int, factor: int = 25) -> int:
    """Examples for a costly test: ``n_ci`` under the ``ci`` profile, ``factor`` times more
    under ``deep``."""
    return n_ci * factor if DEEP else n_ci


class Watchdog(BaseException):
    """Raised in the test by SIGALRM when an example runs too long.  A BaseException, so that no
    ``except Exception`` in the library can swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """Fail with :class:`Watchdog` if the block runs longer than ``seconds`` (wall clock)."""
    def on_alarm(signum, frame):
        raise Watchdog(f"{what} did not finish within {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _vm_size() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def address_space_limit(headroom: int = ADDRESS_SPACE_HEADROOM_BYTES):
    """Cap the process's address space at its current size plus ``headroom`` for the block: a
    runaway allocation then raises MemoryError (a non-Qcow2Error, so the property fails) instead
    of taking the machine down."""
    try:
        old = resource.getrlimit(resource.RLIMIT_AS)
        limit = _vm_size() + headroom
        if old[1] != resource.RLIM_INFINITY:
            limit = min(limit, old[1])
        resource.setrlimit(resource.RLIMIT_AS, (limit, old[1]))
    except (OSError, ValueError):      # no /proc or no permission: run unguarded
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


@contextlib.contextmanager
def memory_limit(limit_bytes: int, what: str):
    """Assert that the block's tracemalloc peak stays under ``limit_bytes``."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()
    assert peak <= limit_bytes, f"{what}: peak {peak} bytes > {limit_bytes}"


@contextlib.contextmanager
def scratch():
    """A scratch directory (tmpfs when available), the working directory for the block (external
    data file names are relative to it), removed afterwards."""
    directory = scratch_directory()
    old = os.getcwd()
    os.chdir(directory)
    try:
        yield directory
    finally:
        os.chdir(old)
        shutil.rmtree(directory, ignore_errors=True)


# -- what every image goes through --------------------------------------------------------------

@dataclass
class Outcome:
    """What happened to one step of :func:`exercise`: ``None`` (it worked) or the Qcow2Error."""

    step: str
    error: Qcow2Error | None = None


def _read_offsets(size: int) -> list[int]:
    """Where to read: the start, and windows at the middle and the end of the disk."""
    offsets = list(range(0, min(size, MAX_READ_BYTES // 2), READ_CHUNK))
    for anchor in (size // 2, size - MAX_READ_BYTES // 4):
        anchor = max(0, anchor) // 512 * 512
        offsets += range(anchor, min(size, anchor + MAX_READ_BYTES // 4), READ_CHUNK)
    return sorted(set(o for o in offsets if o < size))


def _guarded(outcomes: list, step: str, fn):
    try:
        result = fn()
    except Qcow2Error as e:
        outcomes.append(Outcome(step, e))
        return None
    outcomes.append(Outcome(step))
    return result


def exercise(path: str, *, repair: bool = True) -> list[Outcome]:
    """Open ``path`` read-only; read (bounded), map, info, check; read each snapshot; then, on a
    copy, repair (``check -r all`` as qemu-img opens for it) and check again.  Every step either
    works or raises a Qcow2Error (recorded); anything else propagates."""
    outcomes: list[Outcome] = []
    img = _guarded(outcomes, "open", lambda: Image(path, "r"))
    if img is not None:
        with img:
            def read():
                for offset in _read_offsets(img.size):
                    img.pread(min(READ_CHUNK, img.size - offset), offset)
            _guarded(outcomes, "read", read)
            _guarded(outcomes, "map", lambda: sum(1 for _ in img.iter_map()))
            _guarded(outcomes, "info", img.info)
            _guarded(outcomes, "check", img.check)
            for sn in img.snapshots[:4]:
                def read_snapshot(sn=sn):
                    view = img.snapshot(sn.id)
                    view.pread(min(view.size, READ_CHUNK), 0)
                _guarded(outcomes, f"snapshot {sn.id!r}", read_snapshot)
    if repair:
        copy = path + ".repair"
        shutil.copyfile(path, copy)
        img = _guarded(outcomes, "open r+", lambda: Image(copy, "r+", _repair=True))
        if img is not None:
            with img:
                _guarded(outcomes, "repair", lambda: check_image(img, "all"))
                _guarded(outcomes, "check after repair", img.check)
    return outcomes


# -- host writes at the one door -------------------------------------------------------------------

@dataclass(frozen=True)
class Write:
    """One host write that reached the image file: ``how`` is ``"pwrite"``, ``"allocate"`` or
    ``"truncate"`` (then ``length`` is the new file length), ``ign`` the metadata types the
    caller declared it may touch."""

    how: str
    host_offset: int
    length: int
    ign: int

    def __str__(self) -> str:
        names = [k for k, bit in KIND_TO_OL.items() if self.ign & bit]
        return f"{self.how} 0x{self.host_offset:x}+0x{self.length:x} ign={names or 0}"


class WriteRecorder:
    """Record every completed write to one file through :class:`Storage` (class-level wrappers,
    so writes made while opening are seen too).  Refused writes (the guard raises before writing)
    are not recorded: they wrote nothing."""

    def __init__(self, path: str):
        self.path = os.path.realpath(path)
        self.writes: list[Write] = []

    def _mine(self, storage) -> bool:
        return os.path.realpath(storage.path) == self.path

    def __enter__(self):
        real_pwrite, real_allocate, real_truncate = Storage.pwrite, Storage.allocate, Storage.truncate
        rec = self

        def pwrite(storage, data, host_offset, ign=0):
            n = real_pwrite(storage, data, host_offset, ign)
            if rec._mine(storage) and n:
                rec.writes.append(Write("pwrite", host_offset, n, ign))
            return n

        def allocate(storage, host_offset, length, ign=0):
            real_allocate(storage, host_offset, length, ign)
            if rec._mine(storage) and length:
                rec.writes.append(Write("allocate", host_offset, length, ign))

        def truncate(storage, length):
            real_truncate(storage, length)
            if rec._mine(storage):
                rec.writes.append(Write("truncate", length, 0, 0))

        self._saved = (real_pwrite, real_allocate, real_truncate)
        Storage.pwrite, Storage.allocate, Storage.truncate = pwrite, allocate, truncate
        return self

    def __exit__(self, *exc):
        Storage.pwrite, Storage.allocate, Storage.truncate = self._saved
        return False

    def take(self) -> list[Write]:
        """The writes recorded since the last call."""
        out, self.writes = self.writes, []
        return out


def changed_ranges(before: bytes, after: bytes, block: int = 512) -> list[tuple[int, int]]:
    """``(offset, end)`` runs of bytes that differ.  A longer file is compared with ``before``
    padded with zeros (the gap a write past the end leaves reads as zeros); a shorter one adds
    the missing part as a change."""
    out = []
    padded = before + bytes(max(0, len(after) - len(before)))
    n = min(len(padded), len(after))
    mv_a, mv_b = memoryview(padded), memoryview(after)
    pos = 0
    while pos < n:
        end = min(n, pos + block)
        if mv_a[pos:end] != mv_b[pos:end]:
            for i in range(pos, end):
                if padded[i] != after[i]:
                    if out and out[-1][1] == i:
                        out[-1] = (out[-1][0], i + 1)
                    else:
                        out.append((i, i + 1))
        pos = end
    if len(after) < len(before):
        out.append((len(after), len(before)))
    return out


# -- qemu-img ----------------------------------------------------------------------------------------

QEMU_TIMEOUT_S = 20
"""qemu-img runs longer than this are no reference (see test_fuzz_properties._qemu_excluded)."""


@dataclass
class CheckRun:
    """One check: exit code (None: qemu-img ran past :data:`QEMU_TIMEOUT_S`) and the JSON summary
    (None when the tool printed none)."""

    rc: int | None
    summary: dict | None
    stderr: str


def qemu_check(path: str, *args: str) -> CheckRun:
    """``qemu-img check --output=json [args] path``; a crash is rc < 0 (signal), a run longer than
    :data:`QEMU_TIMEOUT_S` rc None.  Its address space is capped at 4 GiB (it may try to allocate
    terabytes for a hostile image)."""
    qemu.require_qemu()

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    try:
        proc = subprocess.run([qemu.QEMU_IMG, "check", "-f", "qcow2", "--output=json", *args,
                               path], capture_output=True, text=True, timeout=QEMU_TIMEOUT_S,
                              preexec_fn=limit)
    except subprocess.TimeoutExpired as e:
        return CheckRun(None, None, f"timeout after {e.timeout} s")
    try:
        summary = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        summary = None
    return CheckRun(proc.returncode, summary, proc.stderr)


def our_check(path: str, *args: str) -> CheckRun:
    """``qcow2-tool check --output=json [args] path``, in process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["check", "-f", "qcow2", "--output=json", *args, path])
    text = out.getvalue()
    try:
        summary = json.loads(text) if text.strip() else None
    except ValueError:
        summary = None
    return CheckRun(rc, summary, err.getvalue())


def poke(path, offset: int, fmt: str, value: int) -> None:
    """Overwrite the ``struct`` field ``fmt`` at ``offset`` of the file with ``value``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def read_u64(path, offset: int) -> int:
    """The big-endian 64-bit field at ``offset`` of the file."""
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def tmpfs_or(tmp_path) -> str:
    """A directory on tmpfs when there is one (it allows sparse files of hundreds of TiB, which
    is what some regression cases need to show), else ``tmp_path``."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return tempfile.mkdtemp(prefix="qcow2-regress-", dir="/dev/shm")
    return str(tmp_path)
