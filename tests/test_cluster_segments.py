"""Mapping.segments against a one-cluster-at-a-time model, on generated standard L2 tables.

segments() finds runs of entries that continue each other with array comparisons; the model
classifies every cluster on its own and merges afterwards.  Both must give the same segments, or
both raise for the same damaged entry."""

from array import array

from hypothesis import given, strategies as st

from qcow2.cluster import COMPRESSED, DATA, UNALLOCATED, ZERO, Mapping, Segment
from qcow2.errors import CorruptImageError

COPIED, COMPRESSED_FLAG, OFFSET_MASK = 1 << 63, 1 << 62, 0x00FFFFFFFFFFFE00


class _Tables:
    def __init__(self, tables):
        self.tables = tables

    def load(self, offset):
        return self.tables[offset]


def _model(l1, tables, cluster_bits, has_data_file, offset, length):
    cs = 1 << cluster_bits
    l2_entries = cs // 8
    out: list[Segment] = []
    pos, end = offset, offset + length
    while pos < end:
        n = min(end - pos, cs - pos % cs)
        l1_index, l2_index = divmod(pos >> cluster_bits, l2_entries)
        l2 = l1[l1_index] & OFFSET_MASK if l1_index < len(l1) else 0
        entry = tables[l2][l2_index] if l2 else 0
        host = entry & OFFSET_MASK
        if entry & COMPRESSED_FLAG:
            if has_data_file:
                raise CorruptImageError("compressed with data file")
            seg = Segment(COMPRESSED, pos, n, entry)
        else:
            if host % cs:
                raise CorruptImageError("unaligned")
            allocated = host or (has_data_file and entry & COPIED)
            where = host + pos % cs if allocated else -1
            kind = ZERO if entry & 1 else DATA if allocated else UNALLOCATED
            seg = Segment(kind, pos, n, where)
        last = out[-1] if out else None
        if (last and seg.kind == last.kind != COMPRESSED
                and (seg.host == last.host + last.length if last.host >= 0 else seg.host < 0)):
            out[-1] = Segment(last.kind, last.guest_offset, last.length + n, last.host)
        else:
            out.append(seg)
        pos += n
    return out


@st.composite
def _tables(draw):
    cluster_bits = draw(st.sampled_from([9, 12]))
    cs = 1 << cluster_bits
    l2_entries = cs // 8
    tables, l1 = {}, array("Q")
    for i in range(draw(st.integers(1, 3))):
        if draw(st.booleans()) and i:
            l1.append(0)
            continue
        table = array("Q")
        while len(table) < l2_entries:
            kind = draw(st.sampled_from("dDzZuxcb"))
            near_top = draw(st.integers(0, 9)) == 0
            base = ((1 << 56) - draw(st.integers(1, 8)) * cs if near_top
                    else draw(st.integers(1, 1 << 20)) * cs)
            for j in range(draw(st.integers(1, 80))):
                e = {"d": COPIED | (base + j * cs), "D": base + j * cs, "z": 1, "u": 0,
                     "Z": (base + j * cs) | 1, "c": COMPRESSED_FLAG | (base + 7 * j),
                     "x": draw(st.integers(0, (1 << 64) - 1)),
                     "b": COPIED | (base + draw(st.sampled_from([j, j + 1, 0])) * cs)}[kind]
                table.append(e)
        offset = (i + 1) * 7 * cs
        tables[offset] = table[:l2_entries]
        l1.append(offset | COPIED)
    return cluster_bits, l1, tables, draw(st.booleans())


@given(_tables(), st.data())
def test_segments_equal_one_cluster_model(spec, data):
    cluster_bits, l1, tables, has_data_file = spec
    size = len(l1) * ((1 << cluster_bits) // 8) << cluster_bits
    mapping = Mapping(l1=l1, cluster_bits=cluster_bits, extended_l2=False,
                      has_data_file=has_data_file, l2_cache=_Tables(tables))
    offset = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(1, size - offset))
    try:
        expected = _model(l1, tables, cluster_bits, has_data_file, offset, length)
    except CorruptImageError:
        expected = CorruptImageError
    try:
        got = mapping.segments(offset, length)
    except CorruptImageError:
        got = CorruptImageError
    assert got == expected
