"""Consistency check and repair, with qemu-img check 7.2's semantics.

Theory of operation
-------------------
*Snapshot table.*  Read first, the way qemu-img check reads it (tolerant of what a normal open
refuses, with its messages and its repairs; see :mod:`qcow2.check_snapshots`).  A table repaired
there is written anew once the refcounts are repaired.

*Counting.*  Every reference the image makes is counted into an array indexed by host cluster,
sized by the host file (one cluster of slack, as QEMU allows a structure to end up to one cluster
past the end of the file): the header, the active L1 table and its L2 tables and data clusters,
each internal snapshot's L1/L2 tables and data, the snapshot table, the refcount table and blocks,
the bitmap directory, tables and data clusters, the encryption header.  A reference more than one
cluster past the end of the file is an error of its own and costs nothing (iotest 138: a data
pointer at 32 PiB).  L2 tables are decoded in bulk and scanned with one Python step per entry.

*Comparing.*  For every cluster of the file the refcount on disk is compared with the count:
higher on disk is a leak, lower a corruption (a zero on disk for a referenced cluster means the
refcount structures themselves must be rebuilt).  Then the ``COPIED`` flags of the active tables
are compared with the refcounts.  Messages, counters, the order of repairs and the re-check follow
qemu-img 7.2, so scripts reading either tool's output agree.

*Repairing* (``repair="leaks"`` / ``"all"``): refcounts are set to the counts one block at a time,
``COPIED`` flags rewritten, and when the structures are broken a new refcount table and new blocks
are written into clusters no reference uses (never onto live data, iotest 108), after which one
header write switches to them.  All repair writes go through the image's storage and guard.

*Overlaps.*  All metadata is also entered into a budgeted :class:`~qcow2.overlap.RangeMap`; a
structure overlapping another structure of a different type, and data overlapping metadata, are
reported naming both.  When the budget refuses, the ranges no longer checked are announced as
``QCOW2_OVERLAP_CHECK_MEMORY_LIMIT_REACHED`` events and listed in the result; the check goes on.
"""

from __future__ import annotations

import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from . import constants as C
from .bitmap import BME_TABLE_ENTRY_OFFSET_MASK
from .check_snapshots import CheckFailed, RewriteFailed, read_for_check, repair_snapshot_table
from .snapshot_table import MAX_READ_END
from .errors import OverlapError, Qcow2Error
from .guard import LimitReporter
from .metadata import iter_metadata
from .overlap import RangeMap
from .overlap_types import (OL_ACTIVE_L1, OL_ACTIVE_L2, OL_INACTIVE_L2, OL_REFCOUNT_BLOCK,
                            OL_REFCOUNT_TABLE, parse_overlap_check, type_name)
from .refcount import RefcountReader
from .units import c_hex
from .tables import decode_compressed, decode_u64_table, encode_refblock, encode_u64_table

if TYPE_CHECKING:  # pragma: no cover
    from .image import Image

DEFAULT_OVERLAP_MEM = 64 << 20
"""Default memory budget of the check's overlap map (bytes): enough for any image up to several
terabytes of metadata at 64 KiB clusters; ``--overlap-mem`` changes it."""

# qemu-img prints its JSON keys in the order of QEMU's QDict hash buckets
_JSON_ORDER = ("image-end-offset", "compressed-clusters", "total-clusters", "corruptions",
               "corruptions-fixed", "check-errors", "leaks", "leaks-fixed", "allocated-clusters",
               "filename", "format", "fragmented-clusters")
_CHECK_FRAG_INFO = 1
# types one structure may legitimately have at once: an L2 table both snapshots and the active
# disk point to (its refcount tells; the refcount comparison checks that)
_SHARED_WITH = {OL_ACTIVE_L2: OL_INACTIVE_L2, OL_INACTIVE_L2: OL_ACTIVE_L2}
_COPIED = C.QCOW_OFLAG_COPIED
_COMPRESSED = C.QCOW_OFLAG_COMPRESSED
_ZERO = C.QCOW_OFLAG_ZERO
_MASK = C.L2E_OFFSET_MASK
#: How much a repair may grow the check's per-cluster count array (bytes) when it grows the file
#: for a refcount block outside it; beyond, the check fails as QEMU's does when its allocation fails.
_MAX_COUNTER_GROWTH_BYTES = 8 << 20


def _wrap_int64(value: int) -> int:
    """``value`` as a signed 64-bit C integer computes it (wrapping)."""
    return ((value + (1 << 63)) & ((1 << 64) - 1)) - (1 << 63)


@dataclass
class CheckResult:
    """What a check found (and repaired): qemu-img check's counters, plus our overlap findings.

    ``messages`` are the per-item lines qemu-img prints on stderr, in order; ``overlaps`` the
    overlap findings; ``unprotected`` the host ranges the overlap map could not cover."""

    filename: str = ""
    format: str = "qcow2"
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    unprotected: list[tuple[int, int]] = field(default_factory=list)
    failed: str | None = None     # "Check failed: <reason>" when the check could not complete
    errors: list[str] = field(default_factory=list)   # error messages printed before that (a
    # message may go on with hint lines, which qemu-img prints without its program prefix)

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit status: 0 clean, 1 failed, 2 corruptions, 3 leaks only."""
        if self.failed is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0

    def to_json(self) -> dict:
        """qemu-img check --output=json's object (its keys, its order, its omissions)."""
        values = {"image-end-offset": self.image_end_offset,
                  "compressed-clusters": self.compressed_clusters,
                  "total-clusters": self.total_clusters, "corruptions": self.corruptions,
                  "corruptions-fixed": self.corruptions_fixed, "check-errors": self.check_errors,
                  "leaks": self.leaks, "leaks-fixed": self.leaks_fixed,
                  "allocated-clusters": self.allocated_clusters, "filename": self.filename,
                  "format": self.format, "fragmented-clusters": self.fragmented_clusters}
        always = ("check-errors", "filename", "format")
        return {k: values[k] for k in _JSON_ORDER if k in always or values[k]}

    def human(self) -> str:
        """qemu-img check's human summary (after a repair, of the re-check)."""
        out = []
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.\n")
        else:
            if self.corruptions:
                out.append(f"\n{self.corruptions} errors were found on the image.\n"
                           "Data may be corrupted, or further writes to the image may corrupt "
                           "it.\n")
            if self.leaks:
                out.append(f"\n{self.leaks} leaked clusters were found on the image.\n"
                           "This means waste of disk space, but no harm to data.\n")
            if self.check_errors:
                out.append(f"\n{self.check_errors} internal errors have occurred during the "
                           "check.\n")
        if self.total_clusters and self.allocated_clusters:
            a = self.allocated_clusters
            out.append(f"{a}/{self.total_clusters} = {a * 100.0 / self.total_clusters:0.2f}% "
                       f"allocated, {self.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
                       f"{self.compressed_clusters * 100.0 / a:0.2f}% compressed clusters\n")
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}\n")
        if self.unprotected:
            ranges = ", ".join(f"0x{s:x}-0x{s + n:x}" for s, n in self.unprotected)
            out.append(f"Not overlap-checked (overlap map memory limit): {ranges}\n")
        return "".join(out)


class _Counter:
    """References per host cluster, sized by the file; counts saturate at the entry width."""

    def __init__(self, nb_clusters: int, refcount_order: int):
        code = "H" if refcount_order <= 4 else ("L" if refcount_order == 5 else "Q")
        self.counts = array.array(code, bytes(array.array(code).itemsize * (nb_clusters + 1)))
        self.max = (1 << (1 << refcount_order)) - 1
        self.highest = -1     # highest index counted

    def grow(self, nb: int) -> None:
        """Make room for ``nb`` clusters (the file grew during a repair).

        Raises :class:`CheckFailed` ("Cannot allocate memory", QEMU's failure when it cannot
        enlarge its count array) past :data:`_MAX_COUNTER_GROWTH_BYTES`: a refcount table entry
        far past the end of the file must not size an allocation (found by fuzzing: a 256 TiB
        offset was a MemoryError where the file system allows such a file, e.g. tmpfs)."""
        missing = nb - len(self.counts)
        if missing * self.counts.itemsize > _MAX_COUNTER_GROWTH_BYTES:
            raise CheckFailed("Cannot allocate memory")
        if missing > 0:
            self.counts.extend(array.array(self.counts.typecode,
                                           bytes(self.counts.itemsize * missing)))


class _Checker:
    """One run of the algorithm over an image (see the module docstring)."""

    def __init__(self, img: "Image", fix: int, say: Callable[[str], None],
                 overlap_map: RangeMap | None):
        self.img = img
        h = img.header
        self.fix = fix
        self.say = say
        self.cs = h.cluster_size
        self.bits = h.cluster_bits
        self.order = h.refcount_order
        self.extended = h.extended_l2
        self.has_data_file = h.has_data_file
        self.file = img._file
        # QEMU's file length is in whole sectors (bdrv_getlength): a file that ends inside a
        # sector counts as reaching its end (found by fuzzing: an L1 table in the cluster after
        # a 1544-byte file was "beyond the end" for us, counted by qemu-img)
        self.file_size = -(-self.file.size // C.SECTOR_SIZE) * C.SECTOR_SIZE
        self.nb_file_clusters = -(-self.file_size // self.cs)
        self.map = overlap_map
        self.overlaps: dict[str, None] = {}   # findings, once each (tables may be shared)
        self._low_checks = self._low_byte_checks()
        self._plain_seen: dict[bytes, list[int] | None] = {}   # table bytes -> _plain_offsets
        self.refcounts = RefcountReader(img._file, h)   # what is on disk now
        self._repaired: dict[int, array.array] = {}     # refcount blocks changed by a repair

    # -- counting ------------------------------------------------------------------------------
    def inc(self, res: CheckResult, counter: _Counter, offset: int, size: int) -> None:
        if size <= 0:
            return
        signed = _wrap_int64(offset)      # QEMU keeps offsets in signed 64-bit integers
        if _wrap_int64(signed + size - self.file_size) >= self.cs:
            self.say("ERROR: counting reference for region exceeding the end of the file by one "
                     f"cluster or more: offset 0x{offset:x} size 0x{size:x}")
            res.corruptions += 1
            return
        if signed < 0:      # QEMU would size its count array by this offset, and fail
            raise CheckFailed("Cannot allocate memory")
        counts = counter.counts
        first = offset >> self.bits
        last = (offset + size - 1) >> self.bits
        for k in range(first, last + 1):
            if k >= len(counts):       # cannot happen with the bound above; stay safe
                counts.extend(array.array(counts.typecode, bytes(counts.itemsize *
                                                                 (k + 1 - len(counts)))))
            if counts[k] == counter.max:
                self.say(f"ERROR: overflow cluster offset=0x{k << self.bits:x}")
                self.say("Use qemu-img amend to increase the refcount entry width or qemu-img "
                         "convert to create a clean copy if the image cannot be opened for "
                         "writing")
                res.corruptions += 1
                continue
            counts[k] += 1
        if last > counter.highest:
            counter.highest = last

    def calculate(self, res: CheckResult) -> tuple[_Counter, bool]:
        """Count every reference; returns the counts and whether the refcount structures need a
        rebuild."""
        img = self.img
        h = img.header
        counter = _Counter(self.nb_file_clusters, self.order)
        rebuild = False
        self.inc(res, counter, 0, self.cs)
        self.check_l1(res, counter, h.l1_table_offset, h.l1_size, _CHECK_FRAG_INFO)
        if self.has_data_file and img.snapshots:
            self.say(f"ERROR {len(img.snapshots)} snapshots in image with data file")
            res.corruptions += 1
        for sn in img.snapshots:
            self.check_snapshot_l1(res, counter, sn)
        self.inc(res, counter, h.snapshots_offset, img.snapshots_size)
        self.inc(res, counter, h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        crypto = h.crypto_header
        if crypto is not None:
            self.inc(res, counter, crypto.offset, crypto.length)
        self.count_bitmaps(res, counter)
        rebuild |= self.check_refblocks(res, counter)
        return counter, rebuild

    def check_snapshot_l1(self, res: CheckResult, counter: _Counter, sn) -> None:
        """A snapshot's L1 table, after QEMU's two checks of its table entry (alignment first)."""
        where = f"ERROR snapshot {sn.id} ({sn.display_name})"
        if sn.l1_table_offset & (self.cs - 1):
            self.say(f"{where} l1_offset={c_hex(sn.l1_table_offset)}: L1 table is not cluster "
                     "aligned; snapshot table entry corrupted")
            res.corruptions += 1
        elif sn.l1_size > C.QCOW_MAX_L1_SIZE // 8:
            self.say(f"{where} l1_size={c_hex(sn.l1_size)}: L1 table is too large; snapshot "
                     "table entry corrupted")
            res.corruptions += 1
        else:
            self.check_l1(res, counter, sn.l1_table_offset, sn.l1_size, 0)

    def check_l1(self, res: CheckResult, counter: _Counter, l1_offset: int, l1_size: int,
                 flags: int) -> None:
        """Count an L1 table and its L2 tables.  As QEMU: every non-zero entry is followed, even
        one whose offset bits are zero (an L2 table at offset 0); reserved bits and misalignment
        are reported after the table is counted.  An L1 table ending where QEMU cannot read fails
        the check (EIO)."""
        if not l1_size:
            return
        self.inc(res, counter, l1_offset, l1_size * 8)
        if l1_offset + l1_size * 8 > MAX_READ_END:
            self.say("ERROR: I/O error in check_refcounts_l1")
            raise CheckFailed("Input/output error")
        l1 = self.img._read_l1(l1_offset, l1_size)
        for entry in l1:
            if not entry:
                continue
            if entry & C.L1E_RESERVED_MASK:
                self.say(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            l2_offset = entry & C.L1E_OFFSET_MASK
            self.inc(res, counter, l2_offset, self.cs)
            if l2_offset & (self.cs - 1):
                self.say(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry "
                         "corrupted")
                res.corruptions += 1
            self.check_l2(res, counter, l2_offset, flags)

    def _plain_offsets(self, raw: bytes) -> list[int] | None:
        """Host offsets of a standard L2 table's entries when every used entry is a plain, aligned
        data cluster inside the file, as in nearly every table (checked with C-level byte
        operations); None when any entry needs the entry-by-entry path.  The answer for the last
        few distinct tables is kept (a damaged L1 table may name the same clusters thousands of
        times); callers must not change the list."""
        if self.extended or self.has_data_file:
            return None
        if raw in self._plain_seen:
            return self._plain_seen[raw]
        if len(self._plain_seen) >= 16:
            self._plain_seen.clear()
        answer = self._plain_seen[raw] = self._plain_offsets_of(raw)
        return answer

    def _plain_offsets_of(self, raw: bytes) -> list[int] | None:
        n = len(raw) // 8
        if raw[0::8].translate(None, b"\x00\x80"):
            return None                      # compressed, reserved high bits
        for position, table in self._low_checks:
            if raw[position::8].translate(table).count(0) != n:
                return None                  # zero flag, reserved low bits, unaligned
        # the high bytes hold nothing but COPIED now: clear them, keep the non-zero offsets (0 is
        # unallocated) - C-level loops only (found by fuzzing: an L1 table grown over L2 tables
        # made 14,000 references to 8192-entry "tables", 8.6 s where qemu-img takes 0.4 s)
        plain = bytearray(raw)
        plain[0::8] = bytes(n)
        offsets = list(filter(None, decode_u64_table(plain)))
        if offsets and max(offsets) + self.cs - self.file_size > 0:
            return None                      # past the end of the file: say what is wrong
        return offsets

    def _low_byte_checks(self) -> list[tuple[int, bytes]]:
        """(byte position, translate table) pairs: a byte maps to 0 unless it has bits that must
        be clear in a plain entry (bits 0-8 and the offset bits below the cluster size)."""
        checks = []
        low_mask = (1 << self.bits) - 1
        for position in range(7, -1, -1):
            m = (low_mask >> (8 * (7 - position))) & 0xFF
            if not m:
                break
            checks.append((position, bytes(1 if b & m else 0 for b in range(256))))
        return checks

    def _count_plain(self, res: CheckResult, counter: _Counter, offsets: list[int],
                     frag: int) -> bool:
        """Count a plain table's clusters a run of consecutive clusters at a time: a run whose
        counts are all equal (fresh, or shared by every snapshot alike) takes one slice
        assignment.  False, with nothing counted, when a count would overflow (the entry-by-entry
        path reports it)."""
        cs, bits = self.cs, self.bits
        counts, cmax = counter.counts, counter.max
        first = offsets[0]
        if offsets == list(range(first, first + len(offsets) * cs, cs)):
            runs = [(first >> bits, len(offsets))]       # one run, the usual table: C-level test
        else:
            runs = []
            ascending = True
            start = prev = first
            for offset in offsets[1:]:
                if offset != prev + cs:
                    runs.append((start >> bits, ((prev - start) >> bits) + 1))
                    ascending = ascending and offset > prev
                    start = offset
                prev = offset
            runs.append((start >> bits, ((prev - start) >> bits) + 1))
            if not ascending and len(set(offsets)) != len(offsets):
                return False          # a cluster twice in one table: counted one by one
        if any(max(counts[k0:k0 + n]) >= cmax for k0, n in runs):
            return False
        for k0, n in runs:
            part = counts[k0:k0 + n]
            value = part[0]
            if part.count(value) == n:
                counts[k0:k0 + n] = array.array(counts.typecode, (value + 1,)) * n
            else:
                for k in range(k0, k0 + n):
                    counts[k] += 1
        counter.highest = max(counter.highest, max(k0 + n - 1 for k0, n in runs))
        if frag:
            res.allocated_clusters += len(offsets)
            res.fragmented_clusters += len(runs) - 1
        if self.map is not None:
            for k0, n in runs:
                self._data_run(k0 << bits, (k0 + n) << bits)
        return True

    def check_l2(self, res: CheckResult, counter: _Counter, l2_offset: int, flags: int) -> None:
        raw = self.file.pread(self.cs, l2_offset)
        offsets = self._plain_offsets(raw)
        if offsets is not None and (not offsets or self._count_plain(res, counter, offsets,
                                                                     flags & _CHECK_FRAG_INFO)):
            return
        table = decode_u64_table(raw)
        width = 2 if self.extended else 1
        frag = flags & _CHECK_FRAG_INFO
        cs, bits = self.cs, self.bits
        counts, cmax = counter.counts, counter.max
        limit = min(len(counts), self.nb_file_clusters + 1)
        data_file = self.has_data_file
        next_contiguous = 0
        run_start = run_end = -1
        zero_flag_used = not self.extended
        for i in range(0, len(table), width):
            entry = table[i]
            if not entry and (width == 1 or not table[i + 1]):
                continue
            bitmap = table[i + 1] if width == 2 else 0
            if entry & _COMPRESSED:
                if entry & _COPIED:
                    self.say(f"ERROR: coffset=0x{entry & ((1 << (62 - (bits - 8))) - 1):x}: "
                             "copied flag must never be set for compressed clusters")
                    entry &= ~_COPIED
                    res.corruptions += 1
                if data_file:
                    self.say(f"ERROR compressed cluster {i // width} with data file, "
                             f"entry=0x{entry:x}")
                    res.corruptions += 1
                    continue
                if bitmap:
                    self.say(f"ERROR compressed cluster {i // width} with non-zero subcluster "
                             f"allocation bitmap, entry=0x{entry:x}")
                    res.corruptions += 1
                    continue
                coffset, csize = decode_compressed(entry, bits)
                self.inc(res, counter, coffset, csize)
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
                continue
            if entry & C.L2E_STD_RESERVED_MASK:
                self.say(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            offset = entry & _MASK
            zero = zero_flag_used and entry & _ZERO
            if not offset and not (data_file and entry & _COPIED and not zero):
                if not zero and bitmap & 0xFFFFFFFF:
                    res.corruptions += 1
                    self.say("ERROR: Unallocated cluster has non-zero subcluster allocation "
                             "map")
                continue
            # an allocated cluster (normal or preallocated zero)
            if (bitmap >> 32) & bitmap:
                res.corruptions += 1
                self.say(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                         "allocation bitmap")
            if offset & (cs - 1):
                res.corruptions += 1
                contains_data = bool(bitmap & 0xFFFFFFFF) if self.extended else not zero
                if contains_data:
                    self.say(f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 "
                             "entry corrupted.")
                else:
                    repair = bool(self.fix & REPAIR_ERRORS)
                    self.say(f"{'Repairing' if repair else 'ERROR'} offset={offset:x}: "
                             "Preallocated cluster is not properly aligned; L2 entry corrupted.")
                    if repair:   # make it a plain zero cluster; it references nothing now
                        table[i] = 0 if self.extended else _ZERO
                        if self.extended:
                            table[i + 1] = 0xFFFFFFFF << 32
                        entry_bytes = encode_u64_table(table[i:i + width])
                        self.repair_write(entry_bytes, l2_offset + 8 * i,
                                          OL_ACTIVE_L2 if frag else OL_INACTIVE_L2,
                                          on_overlap="ERROR: Overlap check failed")
                        res.corruptions -= 1
                        res.corruptions_fixed += 1
                        continue
            if frag:
                res.allocated_clusters += 1
                if next_contiguous and offset != next_contiguous:
                    res.fragmented_clusters += 1
                next_contiguous = offset + cs
            if data_file:
                continue
            k = offset >> bits
            if offset >= self.file_size or k >= limit or offset & (cs - 1):
                self.inc(res, counter, offset, cs)      # the slow path says what is wrong
            elif counts[k] == cmax:
                self.inc(res, counter, offset, cs)
            else:
                counts[k] += 1
                if k > counter.highest:
                    counter.highest = k
            if self.map is not None:
                if offset == run_end:
                    run_end += cs
                else:
                    self._data_run(run_start, run_end)
                    run_start, run_end = offset, offset + cs
        if self.map is not None:
            self._data_run(run_start, run_end)

    def _data_run(self, start: int, end: int) -> None:
        if start < 0 or end <= start or start >= C.MAX_HOST_OFFSET:
            return
        hit = self.map.check(start, end - start)
        if hit:
            self.overlaps[f"OVERLAP data clusters 0x{start:x}-0x{end:x} overlap "
                          f"{type_name(hit)}"] = None

    def count_bitmaps(self, res: CheckResult, counter: _Counter) -> None:
        ext = self.img.header.bitmaps
        if ext is None or not ext.nb_bitmaps:
            return
        self.inc(res, counter, ext.bitmap_directory_offset, ext.bitmap_directory_size)
        for entry in self.img.bitmap_directory():
            size = entry.bitmap_table_size * 8
            self.inc(res, counter, entry.bitmap_table_offset, size)
            table = decode_u64_table(self.file.pread_in_file(size, entry.bitmap_table_offset, 8))
            for value in table:
                offset = value & BME_TABLE_ENTRY_OFFSET_MASK
                if offset:
                    self.inc(res, counter, offset, self.cs)

    def check_refblocks(self, res: CheckResult, counter: _Counter) -> bool:
        rebuild = False
        reftable = self.refcounts.reftable
        for i, raw in enumerate(reftable):
            if not raw:
                continue
            offset = raw & C.REFT_OFFSET_MASK
            if raw & C.REFT_RESERVED_MASK:
                self.say(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset & (self.cs - 1):
                self.say(f"ERROR refcount block {i} is not cluster aligned; refcount table entry "
                         "corrupted")
                res.corruptions += 1
                rebuild = True
                continue
            cluster = offset >> self.bits
            if cluster >= self.nb_file_clusters:
                repair = bool(self.fix & REPAIR_ERRORS)
                res.corruptions += 1
                self.say(f"{'Repairing' if repair else 'ERROR'} refcount block {i} is outside "
                         "image")
                if repair:       # grow the file so that the (zero) block exists
                    if offset > C.INT64_MAX - self.cs:
                        # no file can be that long (QEMU checks this first; found by fuzzing:
                        # an OverflowError from ftruncate on a reftable entry with bit 63 set)
                        self.say("ERROR could not resize image: Invalid argument")
                        rebuild = True
                        continue
                    length = self.file.size
                    try:
                        self.file.truncate(offset + self.cs)
                    except Qcow2Error as e:      # e.g. past the file system's largest file
                        self.say(f"qcow2-tool: {e}")
                        self.say("ERROR could not resize image: "
                                 f"{str(e).rsplit(': ', 1)[-1]}")
                        rebuild = True
                        continue
                    try:
                        counter.grow(-(-self.file.size // self.cs) + 1)
                    except CheckFailed:    # unlike QEMU, do not leave the huge file behind
                        self.file.truncate(length)
                        raise
                    self.file_size = self.file.size
                    self.nb_file_clusters = -(-self.file_size // self.cs)
                    self._plain_seen.clear()       # its answers depend on the file's size
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self.inc(res, counter, offset, self.cs)
                continue
            self.inc(res, counter, offset, self.cs)
            if counter.counts[cluster] != 1:
                self.say(f"ERROR refcount block {i} refcount={counter.counts[cluster]}")
                res.corruptions += 1
                rebuild = True
        return rebuild

    def img_corrupt(self, msg: str) -> None:
        """QEMU's corruption report: fatal (corrupt bit) on a writable image, else a warning;
        printed once per image."""
        img = self.img
        if img._corrupt:
            return
        if img.mode == "r+":
            self.say(f"qcow2: Marking image as corrupt: {msg}; further corruption events will be "
                     "suppressed")
        else:
            self.say(f"qcow2: Image is corrupt: {msg}; further non-fatal corruption events will "
                     "be suppressed")
        img.signal_corruption(msg)

    # -- comparing --------------------------------------------------------------------------------
    def compare(self, res: CheckResult, counter: _Counter, fix: int) -> tuple[int, bool]:
        """Compare on-disk refcounts with the counts; repair what ``fix`` allows.  Returns the
        highest cluster in use and whether a rebuild is needed."""
        counts = counter.counts
        nb = max(self.nb_file_clusters, counter.highest + 1)
        refcounts = self.refcounts
        highest = 0
        rebuild = False
        entries = refcounts._entries
        reftable = refcounts.reftable
        for r in range(-(-nb // entries)):
            first = r * entries
            n = min(entries, nb - first)
            raw = reftable[r] & C.REFT_OFFSET_MASK if r < len(reftable) else 0
            if raw & (self.cs - 1):
                self.img_corrupt(f"Refblock offset {c_hex(raw)} unaligned (reftable index: "
                                 f"{c_hex(r)})")
                for i in range(first, first + n):
                    self.say(f"Can't get refcount for cluster {i}: Input/output error")
                res.check_errors += n
                continue
            if raw and raw + self.cs > MAX_READ_END:
                # QEMU's read of such a block fails (EIO; found by fuzzing: a reftable entry with
                # bit 63 set read as zeros here, corruptions instead of qemu-img's check errors)
                for i in range(first, first + n):
                    self.say(f"Can't get refcount for cluster {i}: Input/output error")
                res.check_errors += n
                continue
            block = refcounts._block(r)
            on_disk = block[:n] if block is not None else None
            wanted = counts[first:first + n]
            if on_disk is None and wanted.count(0) == n:
                continue   # no block, nothing referenced: nothing to say (bulk; found by fuzzing:
                # a file grown by a repair took seconds here, one Python step per cluster)
            if on_disk is not None and on_disk == wanted:
                used = wanted.tobytes().rstrip(b"\0")
                if used:
                    highest = first + (len(used) - 1) // wanted.itemsize
                continue
            for j in range(n):
                i = first + j
                refcount1 = on_disk[j] if on_disk is not None else 0
                refcount2 = wanted[j]
                if refcount1 or refcount2:
                    highest = i
                if refcount1 == refcount2:
                    continue
                fixed = None
                if refcount1 == 0:
                    rebuild = True
                elif refcount1 > refcount2 and fix & REPAIR_LEAKS:
                    fixed = "leaks"
                elif refcount1 < refcount2 and fix & REPAIR_ERRORS:
                    fixed = "corruptions"
                what = "Repairing" if fixed else ("ERROR" if refcount1 < refcount2 else "Leaked")
                self.say(f"{what} cluster {i} refcount={refcount1} reference={refcount2}")
                if fixed:
                    block[j] = refcount2
                    self._repaired[r] = block
                    if fixed == "leaks":
                        res.leaks_fixed += 1
                    else:
                        res.corruptions_fixed += 1
                    continue
                if refcount1 < refcount2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        return highest, rebuild

    def refcount_now(self, cluster: int) -> int | None:
        """The refcount of a cluster including repairs not yet written; None when it cannot be
        read (an unaligned refcount block, or one QEMU cannot read: see :meth:`compare`)."""
        r, i = divmod(cluster, self.refcounts._entries)
        block = self._repaired.get(r)
        if block is None:
            reftable = self.refcounts.reftable
            raw = reftable[r] & C.REFT_OFFSET_MASK if r < len(reftable) else 0
            if raw & (self.cs - 1) or (raw and raw + self.cs > MAX_READ_END):
                return None
            block = self.refcounts._block(r)
        return 0 if block is None else block[i]

    def _copied_ok(self, raw: bytes) -> bool:
        """True when a plain table's entries all carry COPIED and their clusters, consecutive,
        all have refcount 1 on disk: nothing to report (bulk comparisons only)."""
        offsets = self._plain_offsets(raw)
        if not offsets:
            return offsets is not None
        if raw[0::8].count(0x80) != len(offsets):
            return False
        first, n, cs = offsets[0], len(offsets), self.cs
        if offsets != list(range(first, first + n * cs, cs)):
            return False
        entries = self.refcounts._entries
        k = first >> self.bits
        while n:
            r, i = divmod(k, entries)
            m = min(n, entries - i)
            if self.refcount_now(k) is None:
                return False
            block = self._repaired.get(r) or self.refcounts._block(r)
            if block is None or block[i:i + m].count(1) != m:
                return False
            k += m
            n -= m
        return True

    def write_repairs(self) -> None:
        """Write the refcount blocks changed by repairs (QEMU writes its refcount cache back when
        the check completes; a failed repair loses them)."""
        for r, block in sorted(self._repaired.items()):
            offset = self.refcounts.reftable[r] & C.REFT_OFFSET_MASK
            self.repair_write(encode_refblock(block, self.order), offset, OL_REFCOUNT_BLOCK,
                              "ERROR writing refblock")
        self._repaired.clear()

    def check_copied(self, res: CheckResult, fix: int) -> None:
        img = self.img
        if fix & REPAIR_ERRORS:
            repair = True
        elif fix & REPAIR_LEAKS:
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        width = 2 if self.extended else 1
        l1 = img._read_l1(img.header.l1_table_offset, img.header.l1_size)
        for index, entry in enumerate(l1):
            l2_offset = entry & C.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            refcount = self.refcount_now(l2_offset >> self.bits)
            if refcount is None:
                continue
            if (refcount == 1) != bool(entry & _COPIED):
                self.say(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 cluster: "
                         f"l1_index={index} l1_entry={entry:x} refcount={refcount}")
                if repair:
                    l1[index] = (entry | _COPIED) if refcount == 1 else (entry & ~_COPIED)
                    sector = index & ~63          # QEMU rewrites the L1 sector holding it
                    self.repair_write(encode_u64_table(l1[sector:sector + 64]),
                                      img.header.l1_table_offset + 8 * sector, OL_ACTIVE_L1)
                    res.corruptions_fixed += 1
                else:
                    res.corruptions += 1
            # An unaligned L2 table is read where it points, and an unaligned data offset's
            # refcount is that of the cluster holding it, as qemu-img 7.2 does (found by fuzzing:
            # skipping them lost qemu-img's OFLAG_COPIED errors on such entries)
            raw = self.file.pread(self.cs, l2_offset)
            if self._copied_ok(raw):
                continue
            table = decode_u64_table(raw)
            changed = False
            for i in range(0, len(table), width):
                e = table[i]
                if e & _COMPRESSED:
                    continue
                offset = e & _MASK
                if not offset and not (self.has_data_file and e & _COPIED):
                    continue
                if self.has_data_file:
                    refcount = 1
                else:
                    refcount = self.refcount_now(offset >> self.bits)
                    if refcount is None:
                        continue
                if (refcount == 1) != bool(e & _COPIED):
                    self.say(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data cluster: "
                             f"l2_entry={e:x} refcount={refcount}")
                    if repair:
                        table[i] = (e | _COPIED) if refcount == 1 else (e & ~_COPIED)
                        changed = True
                        res.corruptions_fixed += 1
                    else:
                        res.corruptions += 1
            if changed:
                self.repair_write(encode_u64_table(table), l2_offset, OL_ACTIVE_L2)

    # -- rebuilding -------------------------------------------------------------------------------
    def rebuild(self, counter: _Counter) -> None:
        """Write new refcount blocks and a new table for ``counter`` into free clusters (by the
        counts: never onto anything referenced), then switch the header to them."""
        cs, bits = self.cs, self.bits
        entries = (cs * 8) >> self.order
        counts = counter.counts
        used = list(counts)
        first_free = 0

        def alloc(n: int) -> int:
            nonlocal first_free
            start = first_free
            while True:
                while start < len(used) and used[start]:
                    start += 1
                run = 0
                while run < n and (start + run >= len(used) or not used[start + run]):
                    run += 1
                if run == n:
                    break
                start += run + 1
            if start + n > len(used):
                used.extend([0] * (start + n - len(used)))
            for k in range(start, start + n):
                used[k] = 1
            if n == 1 or start == first_free:
                first_free = start + n
            return start

        blocks: dict[int, int] = {}
        table_clusters = 0
        table_start = -1
        while True:
            changed = False
            for r in range(-(-len(used) // entries)):
                if r not in blocks and any(used[r * entries:(r + 1) * entries]):
                    blocks[r] = alloc(1)
                    changed = True
            need = -(-((max(blocks) + 1) * 8) // cs) if blocks else 1
            if table_start < 0 or need > table_clusters:
                if table_start >= 0:
                    for k in range(table_start, table_start + table_clusters):
                        used[k] = 0
                table_clusters = need
                table_start = alloc(table_clusters)
                changed = True
            if not changed:
                break
        table = array.array("Q", bytes(table_clusters * cs))
        for r, cluster in sorted(blocks.items()):
            values = used[r * entries:(r + 1) * entries]
            values += [0] * (entries - len(values))
            self.repair_write(encode_refblock(values, self.order), cluster << bits, 0,
                              "ERROR writing refblock")
            table[r] = cluster << bits
        self.repair_write(encode_u64_table(table), table_start << bits, 0,
                          "ERROR writing reftable")
        self.file.flush()
        guard = self.img._guard
        if guard is not None:
            # The header write switches to the new structures: the old ones stop being metadata
            # now, the new ones start (found by fuzzing: a damaged refcount table entry aimed into
            # cluster 0 made the guard refuse the header write; QEMU's rebuild writes it unchecked)
            for offset, length, type_bit in list(iter_metadata(
                    self.img, OL_REFCOUNT_TABLE | OL_REFCOUNT_BLOCK)):
                guard.leave(offset, length, type_bit)
            guard.enter(table_start << bits, table_clusters * cs, OL_REFCOUNT_TABLE)
            for cluster in blocks.values():
                guard.enter(cluster << bits, cs, OL_REFCOUNT_BLOCK)
        self.img._update_header(refcount_table_offset=table_start << bits,
                                refcount_table_clusters=table_clusters)

    def repair_write(self, data, offset: int, ign: int, what: str | None = None,
                     on_overlap: str | None = None) -> None:
        """A repair write.  Once the image is marked corrupt every write fails (as in QEMU); a
        write the guard refuses marks it (and prints ``on_overlap`` after QEMU's marking line).
        Either way the check then fails with ``what``."""
        failure = _RepairFailed(f"{what}: Input/output error" if what else "")
        if self.img._corrupt:
            raise failure
        try:
            self.file.pwrite(data, offset, ign=ign)
        except OverlapError as e:
            self.say(f"qcow2: Marking image as corrupt: {e}; further corruption events will be "
                     "suppressed")
            if on_overlap:
                self.say(on_overlap)
            raise failure from None

    # -- overlap map ----------------------------------------------------------------------------
    def enter_metadata(self) -> None:
        """Enter every structure into the map, reporting overlaps between different types.  An L2
        table shared by the active L1 and a snapshot's is one table, not an overlap."""
        for offset, length, type_bit in iter_metadata(self.img, self.types):
            hit = self.map.check(offset, length, type_bit | _SHARED_WITH.get(type_bit, 0))
            if hit:
                self.overlaps[f"OVERLAP {type_name(type_bit)} at 0x{offset:x} "
                              f"(0x{length:x} bytes) overlaps {type_name(hit)}"] = None
            self.map.add(offset, length, type_bit)


class _RepairFailed(Exception):
    """A repair write failed: qemu-img prints the message, then ``Check failed``."""


REPAIR_LEAKS = 1
REPAIR_ERRORS = 2
_FIX = {None: 0, "leaks": REPAIR_LEAKS, "all": REPAIR_LEAKS | REPAIR_ERRORS}


def _check_once(img: "Image", fix: int, say, overlap_map: RangeMap | None, filename: str,
                types: int = 0, limits: LimitReporter | None = None) -> CheckResult:
    """qemu-img 7.2's check of refcounts and COPIED flags, with its repair order."""
    res = CheckResult(filename=filename)
    res.total_clusters = -(-img.size // img.cluster_size)
    snapshot_repair = read_for_check(img, bool(fix & REPAIR_ERRORS), say, res)
    checker = _Checker(img, fix, say, overlap_map)
    if overlap_map is not None and types:
        checker.types = types
        with limits.batch(overlap_map):      # one event per merged range, not per table
            checker.enter_metadata()
    counter, rebuild = checker.calculate(res)
    pre = _copy(res)
    highest, need = checker.compare(res, counter, 0)
    rebuild |= need
    if rebuild and fix & REPAIR_ERRORS:
        old = _copy(res)
        say("Rebuilding refcount structure")
        checker.rebuild(counter)
        res.corruptions = res.leaks = 0
        checker = _Checker(img, fix, say, None)
        counter, rebuild = checker.calculate(res)
        fresh_leaks = 0
        if fix & REPAIR_LEAKS:
            saved = _copy(res)
            scratch = CheckResult()
            highest, still = checker.compare(scratch, counter, REPAIR_LEAKS)
            if still:
                say("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = scratch.leaks
            _restore(res, saved)
        if res.corruptions < old.corruptions:
            res.corruptions_fixed += old.corruptions - res.corruptions
        if res.leaks < old.leaks:
            res.leaks_fixed += old.leaks - res.leaks
        res.leaks += fresh_leaks
    elif fix:
        if rebuild:
            say("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            res.failed = "Input/output error"
            return res
        if res.leaks or res.corruptions:
            _restore(res, pre)
            highest, _ = checker.compare(res, counter, fix)
    checker.check_copied(res, fix)
    checker.write_repairs()
    if fix & REPAIR_ERRORS:
        repair_snapshot_table(img, snapshot_repair, say)
    res.image_end_offset = (highest + 1) * img.cluster_size
    res.overlaps = list(checker.overlaps)
    return res


def _copy(res: CheckResult) -> CheckResult:
    return CheckResult(**{k: getattr(res, k) for k in (
        "filename", "format", "corruptions", "leaks", "check_errors", "corruptions_fixed",
        "leaks_fixed", "image_end_offset", "total_clusters", "allocated_clusters",
        "fragmented_clusters", "compressed_clusters")})


def _restore(res: CheckResult, saved: CheckResult) -> None:
    for k in ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed",
              "allocated_clusters", "fragmented_clusters", "compressed_clusters"):
        setattr(res, k, getattr(saved, k))


def check_image(img: "Image", repair: str | None = None, *, overlap_mem: int | None = None,
                overlap_types="all", events=None, reference: str | None = None,
                filename: str | None = None,
                say: Callable[[str], None] | None = None) -> CheckResult:
    """Check (and with ``repair`` = ``"leaks"`` or ``"all"``, repair) an open image.

    Repair needs the image opened ``"r+"`` (``qcow2.open(path, "r+", _repair=True)`` also opens
    a corrupt one).  After a repair the image is checked again, as qemu-img does; the result is
    that of the re-check with the ``*_fixed`` counts of the repair.  A clean repaired image gets
    its dirty and corrupt bits cleared.  ``overlap_mem`` caps the overlap map (bytes; default
    :data:`DEFAULT_OVERLAP_MEM`); refusals become events on ``events`` (an EventEmitter) and
    ranges in ``result.unprotected``.  Per-item lines go to ``say`` (default: kept only in
    ``result.messages``).  ``overlap_types`` selects the structures entered into the overlap map
    (an ``overlap_check`` value; "none" disables the map).  O(metadata + allocated clusters).
    """
    if repair not in _FIX:
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    fix = _FIX[repair]
    if fix and img.mode != "r+":
        raise Qcow2Error("Repairing needs the image opened read-write")
    messages: list[str] = []

    def emit(line: str) -> None:
        messages.append(line)
        if say is not None:
            say(line)

    name = filename if filename is not None else img.filename
    ref = reference if reference is not None else (img.device or img.node_name)
    budget = DEFAULT_OVERLAP_MEM if overlap_mem is None else overlap_mem
    emitter = events if events is not None else img.events
    types = parse_overlap_check(overlap_types)
    limits = LimitReporter(ref, emitter)
    overlap_map = RangeMap(img.cluster_size, budget, limits)
    with img._lock:
        img.flush_metadata()
        try:
            res = _check_once(img, fix, emit, overlap_map if types else None, name, types,
                              limits)
            if fix and (res.corruptions_fixed or res.leaks_fixed) and res.failed is None:
                img.reload_metadata()
                again = _check_once(img, 0, emit, None, name)
                again.corruptions_fixed = res.corruptions_fixed
                again.leaks_fixed = res.leaks_fixed
                again.overlaps = res.overlaps
                res = again
            elif fix:
                img.reload_metadata()
            if fix and res.failed is None and not res.check_errors and not res.corruptions:
                img._mark_consistent()
        except _RepairFailed as e:
            res = CheckResult(filename=name, failed="Input/output error")
            if str(e):
                res.errors.append(str(e))
        except RewriteFailed:
            res = CheckResult(filename=name, failed="Input/output error")
        except CheckFailed as e:
            res = CheckResult(filename=name, check_errors=1, failed=e.reason, errors=e.errors)
        except OverlapError as e:    # a repair write the guard refused (it marked the image)
            emit(f"qcow2: Marking image as corrupt: {e}; further corruption events will be "
                 "suppressed")
            res = CheckResult(filename=name, failed="Input/output error")
        except Qcow2Error as e:
            res = CheckResult(filename=name, check_errors=1, failed=str(e))
    res.messages = messages
    res.unprotected = overlap_map.unprotected()
    return res
