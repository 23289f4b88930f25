"""The overlap guard: the policy around the range map.

Theory of operation
-------------------
An :class:`OverlapGuard` owns one ``RangeMap`` (Cython or pure Python, see :mod:`qcow2.overlap`)
holding the host clusters of the metadata types that are enabled (QEMU's ``overlap-check`` modes
``none``/``constant``/``cached``/``all`` plus per-type overrides).  It is filled from a *source*, a
callable returning ``(host_offset, length, type)`` triples (:func:`qcow2.metadata.iter_metadata` for
an image), at open and on :meth:`rebuild`; the writer keeps it current with :meth:`enter` and
:meth:`leave` as tables are allocated and freed.  :meth:`check_write` is called by
:class:`~qcow2.storage.Storage` before every host write.

When the map's memory budget refuses to store a range, the map calls back once for that newly
unprotected range and the guard emits ``QCOW2_OVERLAP_CHECK_MEMORY_LIMIT_REACHED``; writes there are
no longer checked (never refused by mistake).  A bulk fill (:meth:`rebuild`, the check's map) would
report every refused table on its own - thousands of events for one lack of memory - so a
:class:`LimitReporter` batches them: the events of a bulk fill are the merged unprotected ranges
that are new at its end (at most the map's 16).  Raising :attr:`budget` and calling :meth:`rebuild`
brings protection back.  All methods are thread-safe (one lock around the map).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterable, Iterator

from . import constants as C
from .errors import OverlapError
from .events import EventEmitter, overlap_limit_event
from .overlap import RangeMap
from .overlap_types import OL_MASK_LIMIT, OverlapCheck, parse_overlap_check, type_name
from .units import c_hex

Source = Callable[[int], Iterable[tuple[int, int, int]]]
CorruptionHandler = Callable[[str, int, int], None]


class LimitReporter:
    """The range map's ``on_limit`` callback: one memory-limit event per newly unprotected range,
    or, inside :meth:`batch`, one per merged unprotected range that is new when the batch ends."""

    def __init__(self, reference: str, events: EventEmitter):
        self.reference = reference
        self.events = events
        self._batching = False

    def __call__(self, start: int, length: int) -> None:
        if not self._batching:
            self.events.emit(overlap_limit_event(self.reference, start, length))

    @contextlib.contextmanager
    def batch(self, range_map) -> Iterator[None]:
        """Hold the events of a bulk fill of ``range_map``; emit the merged new ranges after it."""
        before = set(range_map.unprotected())
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
        for start, length in range_map.unprotected():
            if (start, length) not in before:
                self.events.emit(overlap_limit_event(self.reference, start, length))


class OverlapGuard:
    """Checks host writes against the image's metadata.

    ``reference`` names the image in events (device name, else node name); ``on_corruption(msg,
    offset, size)`` is called before :class:`OverlapError` is raised, so the image can mark itself
    corrupt.  ``budget`` caps the map's memory in bytes (None: unlimited).
    """

    def __init__(self, cluster_size: int, *, overlap_check: OverlapCheck = "cached",
                 budget: int | None = None, reference: str = "", source: Source | None = None,
                 events: EventEmitter | None = None,
                 on_corruption: CorruptionHandler | None = None):
        self.types = parse_overlap_check(overlap_check)
        self.reference = reference
        self._source = source
        self._events = events if events is not None else EventEmitter()
        self._on_corruption = on_corruption
        self._lock = threading.RLock()
        self._limits = LimitReporter(reference, self._events)
        self._map = RangeMap(cluster_size, budget, self._limits)

    # -- keeping the map current ------------------------------------------------------------------
    def enter(self, host_offset: int, length: int, types: int) -> None:
        """Protect ``[host_offset, host_offset+length)`` as ``types`` (only enabled types count)."""
        mask = types & self.types
        if mask and length:
            with self._lock:
                self._map.add(host_offset, length, mask)

    def leave(self, host_offset: int, length: int, types: int) -> None:
        """Stop protecting that range as ``types`` (it was freed or moved)."""
        mask = types & self.types
        if mask and length:
            with self._lock:
                self._map.remove(host_offset, length, mask)

    def rebuild(self) -> None:
        """Forget the map and re-enter every enabled structure from the source."""
        with self._lock:
            self._map.clear()
            if self._source is not None and self.types:
                with self._limits.batch(self._map):
                    for host_offset, length, type_bit in self._source(self.types):
                        self.enter(host_offset, length, type_bit)

    # -- checking -----------------------------------------------------------------------------
    def overlaps(self, host_offset: int, length: int, ign: int = 0) -> int:
        """Mask of protected types overlapping the range, minus ``ign``.  O(log n); no allocation."""
        with self._lock:
            return self._map.check(host_offset, length, ign & OL_MASK_LIMIT)

    def check_write(self, host_offset: int, length: int, ign: int = 0) -> None:
        """Raise :class:`OverlapError` (after ``on_corruption``) if the write would hit metadata,
        or would reach past the 2^56 host offset limit (where no qcow2 structure can be: the
        offset came from a damaged pointer, e.g. a refcount table aimed at the header, whose
        bytes then read as refcount block offsets near 2^62; QEMU 7.2 writes there, growing the
        file to exabytes where the file system allows it - found by fuzzing)."""
        if host_offset + length > C.MAX_HOST_OFFSET:
            msg = (f"Preventing invalid write past the host offset limit (offset "
                   f"{c_hex(host_offset)}, length {c_hex(length)}, limit "
                   f"{c_hex(C.MAX_HOST_OFFSET)})")
            if self._on_corruption is not None:
                self._on_corruption(msg, host_offset, length)
            raise OverlapError(msg, host_offset, length, 0)
        hit = self.overlaps(host_offset, length, ign)
        if not hit:
            return
        msg = f"Preventing invalid write on metadata (overlaps with {type_name(hit)})"
        if self._on_corruption is not None:
            self._on_corruption(msg, host_offset, length)
        raise OverlapError(msg, host_offset, length, hit)

    # -- memory ---------------------------------------------------------------------------------
    @property
    def budget(self) -> int | None:
        """The map's memory cap in bytes; raise it, then :meth:`rebuild`, to restore protection."""
        return self._map.budget

    @budget.setter
    def budget(self, value: int | None) -> None:
        with self._lock:
            self._map.budget = value

    @property
    def memory_used(self) -> int:
        return self._map.memory_used

    def unprotected(self) -> list[tuple[int, int]]:
        """Host byte ranges that are no longer overlap-checked (merged, ascending)."""
        with self._lock:
            return self._map.unprotected()

    def _check(self) -> None:
        with self._lock:
            self._map._check()
