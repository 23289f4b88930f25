"""Copying a guest disk: the engine of ``qcow2-tool convert`` (``-O raw`` and ``-O qcow2``).

Theory of operation
-------------------
Only the extents ``map`` does not report as zeros are read; they are read in chunks aligned to
:data:`CHUNK_SIZE` (2 MiB) and written to the target (already truncated to the disk size, so
everything not written is a hole).  Inside data, aligned all-zero blocks of ``sparse_size`` bytes
(qemu-img's ``-S``, 4 KiB by default; 0 writes everything) are skipped too.  One buffer is reused
for the whole copy.  (A writer thread overlapping reads and writes was measured and gained
nothing here: both are page-cache copies on the same two cores.)

To a qcow2 image (:func:`copy_to_image`) the same chunks are written through
:meth:`~qcow2.Image.pwrite`, whole zero clusters skipped (they stay unallocated, as qemu-img leaves
them), or, compressed, through :meth:`~qcow2.Image.write_compressed` one run of non-zero clusters
at a time (compression runs in threads).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from .storage import Storage

CHUNK_SIZE = 2 << 20
DEFAULT_SPARSE_SIZE = 4096


def copy_to_raw(reader, target: Storage, *, sparse_size: int = DEFAULT_SPARSE_SIZE,
                progress: Callable[[int], None] | None = None) -> None:
    """Copy every guest byte of ``reader`` (an :class:`~qcow2.Image`, a snapshot view, a raw
    device) to ``target`` at the same offsets, leaving zero runs as holes.

    ``target`` must already have the disk's size (and read as zeros); ``progress(done_bytes)`` is
    called after each chunk.  O(disk size / CHUNK_SIZE) Python steps.
    """
    size = reader.size
    ranges = _data_ranges(reader.iter_map()) if sparse_size else [(0, size)]
    zeros = bytes(CHUNK_SIZE)
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    for start, end in ranges:
        pos = start
        while pos < end:
            n = min(CHUNK_SIZE - pos % CHUNK_SIZE, end - pos)
            reader.readinto(view[:n], pos)
            _write_sparse(target, buf, n, pos, sparse_size, zeros)
            pos += n
            if progress is not None:
                progress(pos)
    if progress is not None:
        progress(size)


def _write_sparse(dst: Storage, buf: bytearray, n: int, guest_offset: int, granularity: int,
                  zeros: bytes) -> None:
    """Write ``buf[:n]`` at ``guest_offset`` except aligned all-zero blocks of ``granularity``
    bytes (left as holes).  C-speed checks: one compare for an all-zero chunk, one ``find`` to
    rule out any zero block, a per-block scan only for mixed chunks."""
    view = memoryview(buf)
    if granularity == 0:
        dst.pwrite(view[:n], guest_offset)
        return
    if buf.startswith(zeros if n == len(zeros) else bytes(n)):
        return
    zero_block = zeros[:granularity] if granularity <= len(zeros) else bytes(granularity)
    if buf.find(zero_block, 0, n) < 0:
        dst.pwrite(view[:n], guest_offset)
        return
    run_start = -1
    pos = 0
    while pos < n:
        step = min(granularity - (guest_offset + pos) % granularity, n - pos)
        block_zero = step == granularity and buf.startswith(zero_block, pos, pos + step)
        if block_zero:
            if run_start >= 0:
                dst.pwrite(view[run_start:pos], guest_offset + run_start)
                run_start = -1
        elif run_start < 0:
            run_start = pos
        pos += step
    if run_start >= 0:
        dst.pwrite(view[run_start:n], guest_offset + run_start)


def _data_ranges(extents) -> Iterator[tuple[int, int]]:
    """Merge consecutive extents that need copying into ``(start, end)`` guest ranges (lazily)."""
    run = None
    for e in extents:
        if e.zero:
            continue
        if run is not None and run[1] == e.start:
            run = (run[0], e.start + e.length)
            continue
        if run is not None:
            yield run
        run = (e.start, e.start + e.length)
    if run is not None:
        yield run


def copy_to_image(reader, target, *, compress: bool = False,
                  progress: Callable[[int], None] | None = None) -> None:
    """Copy every guest byte of ``reader`` into the qcow2 image ``target`` (fresh, same size),
    leaving all-zero clusters (subclusters with extended L2) unallocated.  O(disk size / CHUNK_SIZE) Python steps plus one
    C-level compare per cluster."""
    size = reader.size
    cs = target.cluster_size
    unit = cs if compress else target.header.subcluster_size   # what may stay unallocated
    chunk = max(CHUNK_SIZE, cs)
    zeros = bytes(cs)
    # two buffers: the next chunk is read in a thread (preadv releases the GIL) while this one is
    # written, so reading the source and writing the target overlap
    bufs = [bytearray(chunk), bytearray(chunk)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for k, (pos, n) in enumerate(_chunks(reader.iter_map(), size, cs, chunk)):
            buf = bufs[k % 2]
            reading = pool.submit(reader.readinto, memoryview(buf)[:n], pos)
            if pending is not None:
                _write_pending(target, pending, unit, zeros[:unit], compress, progress)
            pending = (reading, buf, n, pos)
        if pending is not None:
            _write_pending(target, pending, unit, zeros[:unit], compress, progress)
    target.flush()
    if progress is not None:
        progress(size)


def _chunks(extents, size: int, cs: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(guest_offset, length)`` pieces of at most ``chunk`` bytes, whole clusters (the last may
    end at ``size``), covering every extent that is not known to read as zeros."""
    for start, end in _data_ranges(extents):
        pos = start - start % cs
        while pos < end:
            n = min(chunk - pos % chunk, -(-end // cs) * cs - pos, size - pos)
            yield pos, n
            pos += n


def _write_pending(target, pending, unit: int, zeros: bytes, compress: bool, progress) -> None:
    reading, buf, n, pos = pending
    reading.result()                      # the read's error, if any, is raised here
    _write_clusters(target, buf, n, pos, unit, zeros, compress)
    if progress is not None:
        progress(pos + n)


def _write_clusters(target, buf: bytearray, n: int, guest_offset: int, cs: int, zeros: bytes,
                    compress: bool) -> None:
    """Write the non-zero ``cs``-byte units of ``buf[:n]`` (runs of them in one call).  The zero
    test is ``bytearray.startswith`` (a memcmp; comparing memoryviews goes byte by byte, 100x
    slower on a zero cluster)."""
    view = memoryview(buf)
    run = -1
    for off in range(0, n + cs, cs):
        zero = off >= n or buf.startswith(zeros if n - off >= cs else zeros[:n - off],
                                          off, off + cs)
        if not zero and run < 0:
            run = off
        elif zero and run >= 0:
            stop = min(off, n)
            if compress:
                target.write_compressed(view[run:stop], guest_offset + run)
            else:
                target.pwrite(view[run:stop], guest_offset + run)
            run = -1
