"""The snapshot table in ``qemu-img check`` 7.2: read as the check reads it, reported, repaired.

Theory of operation
-------------------
qemu-img check opens an image without reading its snapshot table (a broken table must not stop the
check); the check reads it first, before any refcount is counted:

1. More than 65536 entries end the check ("snapshot table too large"); ``-r all`` drops the excess
   entries instead ("Discarding N overhanging snapshots").
2. The table must start on a cluster boundary and end inside a signed 64-bit offset, else the check
   ends ("snapshot table offset invalid"), whatever the repair mode.
3. The entries are read by :func:`qcow2.snapshot_table.read_snapshot_table`: more than 1024 bytes
   of extra data in an entry, or an entry ending past 64 MiB, end the check; ``-r all`` cuts the
   extra data and drops the entries past the limit.
4. Version 3 requires the virtual disk size in every entry's extra data: an entry without it is a
   corruption ("incomplete"); ``-r all`` fills in the current disk size.

The refcounts are then counted with the entries and the table length as read.  When step 1, 3 or
4 repaired something, the table is written anew after the refcount repairs, as QEMU writes it
(ids and names as C strings, 24 bytes of known extra data plus any unknown bytes kept): into the
first free clusters (allocated, and their refcounts written, first), through the image's storage
and so its guard (a new table landing on the old one's clusters is refused and marks the image
corrupt, as in QEMU), then one header write switches to it, then the old table's clusters are
freed.  Every count comes from the file, so hostile counts cost no memory (see
:mod:`qcow2.snapshot_table`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from . import constants as C
from .errors import OverlapError, Qcow2Error
from .overlap_types import OL_SNAPSHOT_TABLE
from .refcount import Refcounts
from .snapshot import SnapshotEntry, encode_snapshot_table
from .snapshot_table import (SnapshotReadError, SnapshotTableError, overhanging_hint,
                             read_snapshot_table, table_location_valid)

if TYPE_CHECKING:  # pragma: no cover
    from .check import CheckResult
    from .image import Image

__all__ = ["CheckFailed", "RewriteFailed", "read_for_check", "repair_snapshot_table",
           "NOTHING", "NB_ONLY", "REWRITE"]

_U64 = (1 << 64) - 1
_DISK_SIZE_EXTRA = 16       # extra_data_size that holds the disk size (required by version 3)


NOTHING, NB_ONLY, REWRITE = 0, 1, 2
"""What :func:`read_for_check` asks of the repair: nothing, a new entry count in the header (entries
were only dropped: the table stays where it is, as QEMU does), or a new table."""


class CheckFailed(Qcow2Error):
    """The check cannot go on: qemu-img prints ``errors`` (each an error line, possibly followed
    by hint lines), then ``Check failed: <reason>``."""

    def __init__(self, reason: str, errors: list[str] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.errors = errors or []


class RewriteFailed(Exception):
    """Writing the repaired table failed; the lines were printed, the check fails with EIO."""


def read_for_check(img: "Image", fix_errors: bool, say: Callable[[str], None],
                   res: "CheckResult") -> int:
    """Steps 1-4 of the module docstring.  Counts into ``res`` (a dropped entry is one fixed
    corruption); makes the entries read the image's snapshots (and the guard's).  Returns
    :data:`NOTHING`, :data:`NB_ONLY` or :data:`REWRITE` for :func:`repair_snapshot_table`.
    Raises :class:`CheckFailed`.  O(table size)."""
    h = img.header
    nb = h.nb_snapshots
    repaired = False
    if nb > C.QCOW_MAX_SNAPSHOTS:
        excess = nb - C.QCOW_MAX_SNAPSHOTS
        if not fix_errors:
            raise CheckFailed("File too large",
                              [f"ERROR snapshot table too large\n{overhanging_hint(excess)}"])
        say(f"Discarding {excess} overhanging snapshots")
        res.corruptions_fixed += excess
        nb = C.QCOW_MAX_SNAPSHOTS
    if not table_location_valid(h.snapshots_offset, nb, h.cluster_size):
        raise CheckFailed("Invalid argument", ["ERROR snapshot table offset invalid"])
    try:
        table = read_snapshot_table(img._file, h.snapshots_offset, nb, repair=fix_errors)
    except SnapshotTableError as e:
        raise CheckFailed("File too large", [
            f"ERROR failed to read the snapshot table: {e.reason}\n{e.hint}"]) from None
    except SnapshotReadError as e:
        raise CheckFailed("Input/output error",
                          [f"ERROR failed to read the snapshot table: {e}"]) from None
    for index, extra_len in table.extra_cut:
        say(f"Discarding too much extra metadata in snapshot table entry {index} "
            f"({extra_len} > {C.QCOW_MAX_SNAPSHOT_EXTRA_DATA})")
        res.corruptions_fixed += 1
        repaired = True
    if table.nb_overhanging:
        say(f"Discarding {table.nb_overhanging} overhanging snapshots (snapshot table is too big)")
        res.corruptions_fixed += table.nb_overhanging
    entries = table.entries
    if h.version >= 3:
        repaired |= _check_complete(entries, fix_errors, say, res)
    _install(img, entries, table.table_size)
    if repaired and fix_errors:
        return REWRITE
    return NB_ONLY if len(entries) != h.nb_snapshots else NOTHING


def _check_complete(entries: list[SnapshotEntry], fix_errors: bool,
                    say: Callable[[str], None], res: "CheckResult") -> bool:
    """Step 4: entries without a disk size; returns whether one was repaired."""
    repaired = False
    for index, entry in enumerate(entries):
        if len(entry.extra) >= _DISK_SIZE_EXTRA:
            continue
        if fix_errors:      # the rewrite gives it the current disk size (see _as_written)
            say(f"Repairing snapshot table entry {index} is incomplete")
            res.corruptions_fixed += 1
            repaired = True
        else:
            say(f"ERROR snapshot table entry {index} is incomplete")
            res.corruptions += 1
    return repaired


def _install(img: "Image", entries: list[SnapshotEntry], table_size: int) -> None:
    """Make the entries read the image's snapshots, as QEMU's in-memory table (the header's count
    in memory follows; the file changes only when the table is rewritten)."""
    img.snapshots = tuple(entries)
    img.snapshots_size = table_size
    if img.header.nb_snapshots != len(entries):
        img.header = img.header.replace(nb_snapshots=len(entries))
    if img._guard is not None:
        img._guard.rebuild()


def _as_written(entry: SnapshotEntry, disk_size: int) -> SnapshotEntry:
    """The entry as QEMU writes it back: id and name up to their first NUL, the 32-bit VM state
    size derived from the 64-bit one, a missing disk size as the current one, a missing
    instruction count as "none" (all ones)."""
    if (entry.vm_state_size32 is None and entry.disk_size is not None
            and entry.icount is not None and "\0" not in entry.id_str
            and "\0" not in entry.name):
        return entry
    return SnapshotEntry(      # the constructor: dataclasses.replace is slow for 65536 entries
        entry.l1_table_offset, entry.l1_size, entry.id, entry.display_name, entry.date_sec,
        entry.date_nsec, entry.vm_clock_nsec, entry.vm_state_size,
        entry.disk_size if entry.disk_size is not None else disk_size,
        entry.icount if entry.icount is not None else _U64, entry.extra)


def repair_snapshot_table(img: "Image", what: int, say: Callable[[str], None]) -> None:
    """Carry out what :func:`read_for_check` asked for (after the refcount repairs)."""
    if what == NB_ONLY:
        img._update_header(nb_snapshots=len(img.snapshots))
    elif what == REWRITE:
        rewrite_snapshot_table(img, say)


def rewrite_snapshot_table(img: "Image", say: Callable[[str], None]) -> None:
    """Write the image's (repaired) snapshots as a new table and free the old one (see the module
    docstring).  Raises :class:`RewriteFailed` when the guard refuses the write."""
    h = img.header
    cs = h.cluster_size
    old_offset, old_size = h.snapshots_offset, img.snapshots_size
    entries = [_as_written(e, img.size) for e in img.snapshots]
    data = encode_snapshot_table(entries)
    if img._guard is not None:      # the refcount structures may have been rebuilt elsewhere
        img._guard.rebuild()
    refcounts = Refcounts(img._file, h, guard=img._guard, write_header=img._update_header,
                          signal_corruption=img._fail_corrupt)
    new_offset = 0
    if entries:
        new_offset = refcounts.alloc(-(-len(data) // cs), "snapshot table")
        refcounts.flush()
        try:
            img._file.pwrite(data, new_offset)      # overlaps nothing, the old table included
        except OverlapError as e:
            say(f"qcow2: Marking image as corrupt: {e}; further corruption events will be "
                "suppressed")
            say("ERROR failed to update snapshot table: Input/output error")
            raise RewriteFailed() from None
        img._file.flush()
    # the old table may be the header itself (snapshots_offset 0, QEMU writes over it too)
    img._update_header(nb_snapshots=len(entries), snapshots_offset=new_offset,
                       _may_overlap=OL_SNAPSHOT_TABLE)
    img.snapshots = tuple(entries)
    img.snapshots_size = len(data)
    _free_old_table(refcounts, old_offset, old_size, cs, say)


def _free_old_table(refcounts: Refcounts, offset: int, size: int, cluster_size: int,
                    say: Callable[[str], None]) -> None:
    """Drop one reference from each cluster of the old table; all or nothing, as QEMU (a cluster
    already at refcount 0 fails the whole free, with QEMU's message).  O(table clusters)."""
    if size <= 0:
        return
    first = offset // cluster_size
    last = (offset + size - 1) // cluster_size
    if any(refcounts.refcount(k) == 0 for k in range(first, last + 1)):
        say("qcow2_free_clusters failed: Invalid argument")
        return
    for k in range(first, last + 1):
        refcounts.add(k, -1)
    refcounts.flush()
