"""Caches of metadata tables (L2 tables, refcount blocks), with write-back.

Theory of operation
-------------------
A :class:`TableCache` keeps decoded tables (``array`` objects, mutable in place) keyed by their host
offset, in LRU order.  Readers call :meth:`~TableCache.load`; the writer changes a table in place
and calls :meth:`~TableCache.mark_dirty`.  Dirty tables are written back by :meth:`flush`, or when
they are evicted.

Crash order (DESIGN.md rule 5) is kept by *dependencies*: a cache may name a callable,
``before_writeback``, that is run before any of its dirty tables reaches the disk.  The image wires
the L2 cache's ``before_writeback`` to "flush the refcount cache, then fsync", so a new cluster's
refcount (and the data the table maps) is always on disk before an L2 entry that points to it.  The
reverse order (a reference removed before its refcount drops) is kept by the refcount side itself:
decrements are queued and applied only after the L2 tables and the L1 table were written, and an
fsync (see :mod:`qcow2.refcount` and ``Writer.flush_metadata``).

The cache does no I/O of its own: ``read(host_offset) -> table`` and ``write(host_offset, table)``
are given by the owner (the write goes through :class:`~qcow2.storage.Storage`, i.e. the guard).
Thread-safe for concurrent readers; writers are serialised by the image's lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

Table = object  # an array.array; kept abstract here


class TableCache:
    """LRU cache of decoded tables with dirty tracking.

    ``capacity`` is the number of tables kept (at least 4).  Every operation is O(1) except
    :meth:`flush`, which is O(dirty tables · log) (tables are written in ascending host order).
    """

    def __init__(self, read: Callable[[int], Table], capacity: int,
                 write: Callable[[int, Table], None] | None = None,
                 before_writeback: Callable[[], None] | None = None):
        self._read = read
        self._write = write
        self.before_writeback = before_writeback
        self._capacity = max(4, capacity)
        self._tables: OrderedDict[int, Table] = OrderedDict()
        self._dirty: set[int] = set()
        self._lock = threading.RLock()

    def set_writeback(self, write: Callable[[int, Table], None],
                      before_writeback: Callable[[], None] | None = None) -> None:
        """Make the cache writable: ``write(host_offset, table)`` writes one table back, after
        ``before_writeback()`` (the dependency) has run."""
        self._write = write
        self.before_writeback = before_writeback

    def load(self, host_offset: int) -> Table:
        """The table at ``host_offset`` (read and decoded on a miss)."""
        with self._lock:
            table = self._tables.get(host_offset)
            if table is not None:
                self._tables.move_to_end(host_offset)
                return table
        table = self._read(host_offset)
        with self._lock:
            already = self._tables.get(host_offset)
            if already is not None:  # another reader won the race: keep one copy
                return already
            self._insert(host_offset, table)
        return table

    def put(self, host_offset: int, table: Table) -> None:
        """Insert a table created in memory (a new or copied table); it is dirty."""
        with self._lock:
            self._insert(host_offset, table)
            self._dirty.add(host_offset)

    def mark_dirty(self, host_offset: int, table: Table) -> None:
        """Note that ``table`` (at ``host_offset``) was changed and must be written back."""
        with self._lock:
            if self._tables.get(host_offset) is not table:
                self._insert(host_offset, table)
            self._dirty.add(host_offset)

    def forget(self, host_offset: int) -> None:
        """Drop a table without writing it (the table was freed)."""
        with self._lock:
            self._tables.pop(host_offset, None)
            self._dirty.discard(host_offset)

    @property
    def nb_dirty(self) -> int:
        return len(self._dirty)

    def is_dirty(self, host_offset: int) -> bool:
        return host_offset in self._dirty

    def flush(self) -> None:
        """Write every dirty table back (after ``before_writeback``), in ascending host order."""
        with self._lock:
            if not self._dirty:
                return
            if self.before_writeback is not None:
                self.before_writeback()
            for host_offset in sorted(self._dirty):
                self._write_one(host_offset)

    def clear(self) -> None:
        """Forget every table, dirty or not (after a flush, or when metadata was rewritten)."""
        with self._lock:
            self._tables.clear()
            self._dirty.clear()

    # -- internals -----------------------------------------------------------------------------
    def _write_one(self, host_offset: int) -> None:
        assert self._write is not None, "read-only cache has dirty tables"
        self._write(host_offset, self._tables[host_offset])
        self._dirty.discard(host_offset)

    def _insert(self, host_offset: int, table: Table) -> None:
        self._tables[host_offset] = table
        self._tables.move_to_end(host_offset)
        while len(self._tables) > self._capacity:
            victim = next(iter(self._tables))
            if victim in self._dirty:
                if self.before_writeback is not None:
                    self.before_writeback()
                self._write_one(victim)
            del self._tables[victim]

    def _check(self) -> None:
        """Invariants: dirty tables are cached; the size respects the capacity."""
        with self._lock:
            assert self._dirty <= set(self._tables), "dirty table not cached"
            assert len(self._tables) <= self._capacity
