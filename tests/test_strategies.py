"""The shipped strategies (``qcow2.strategies``) draw what their docstrings promise.

Valid things are valid by the codecs and by qemu-img 7.2 (``check`` clean, guest bytes identical
through ``qemu-img convert``, snapshots readable); invalid headers are refused; corruptions change
what they say they change; operation lists are valid for their disk; the module needs Hypothesis
only when imported, and says how to get it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qcow2 import constants as C
from qcow2 import strategies as qst
from qcow2.errors import Qcow2Error, RequestError
from qcow2.header import decode_header, encode_header
from qcow2.image import Image
from qcow2.snapshot import decode_snapshot_table, encode_snapshot_table
from qcow2.tables import (ClusterType, decode_compressed, l1_reserved_bits, l2_cluster_type,
                          l2_reserved_bits, reftable_reserved_bits, validate_subcluster_bitmap)

import qemu
from fuzz_support import scaled, scratch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


# -- packaging -----------------------------------------------------------------------------------

_BLOCK_HYPOTHESIS = ("import sys\n"
                     "class Block:\n"
                     "    def find_spec(self, name, path=None, target=None):\n"
                     "        if name == 'hypothesis' or name.startswith('hypothesis.'):\n"
                     "            raise ImportError('No module named ' + repr(name))\n"
                     "sys.meta_path.insert(0, Block())\n")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_importing_qcow2_does_not_import_hypothesis():
    proc = _python("import sys, qcow2, qcow2.cli, qcow2.check, qcow2.image, qcow2._fuzzgen\n"
                   "print(sorted(m for m in sys.modules if m.split('.')[0] == 'hypothesis'))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_strategies_without_hypothesis_name_the_extra():
    proc = _python(_BLOCK_HYPOTHESIS + "import qcow2\n"
                   "try:\n    import qcow2.strategies\n"
                   "except ImportError as e:\n    print('ImportError:', e)\n")
    assert proc.returncode == 0, proc.stderr
    assert "ImportError:" in proc.stdout and "qcow2[hypothesis]" in proc.stdout


def test_every_public_strategy_is_documented():
    for name in qst.__all__:
        obj = getattr(qst, name)
        if callable(obj):
            doc = getattr(obj, "__doc__", None) or ""
            assert len(doc.split()) >= 8, f"{name} needs a docstring saying what it draws"


def test_the_extra_is_declared():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'hypothesis = ["hypothesis' in text


# -- codec level ---------------------------------------------------------------------------------

@settings(max_examples=scaled(60, 10), deadline=None, suppress_health_check=_HEALTH)
@given(qst.headers())
def test_headers_round_trip(h):
    assert decode_header(encode_header(h)) == h
    assert len(encode_header(h)) <= h.cluster_size


@pytest.mark.parametrize("violation", qst.HEADER_VIOLATIONS)
@settings(max_examples=scaled(4, 10), deadline=None, suppress_health_check=_HEALTH)
@given(data=st.data())
def test_invalid_headers_are_refused(violation, data):
    versions = (3,) if violation in ("header_length", "refcount_order", "unknown_incompatible",
                                     "compression_bit", "compression_type", "subcluster_size",
                                     "data_file_missing", "data_file_raw_alone") else (2, 3)
    bits = (C.MIN_CLUSTER_BITS, 13) if violation == "subcluster_size" else None
    if bits:
        h = data.draw(st.integers(*bits).flatmap(lambda b: qst.invalid_header_bytes(
            (violation,), versions=versions, cluster_bits=b)))
    else:
        h = data.draw(qst.invalid_header_bytes((violation,), versions=versions))
    assert h.violation == violation
    with pytest.raises(Qcow2Error):
        decode_header(h.data)


@settings(max_examples=scaled(40, 10), deadline=None, suppress_health_check=_HEALTH)
@given(cs=st.sampled_from([512, 4096, 65536]), data=st.data())
def test_table_entries(cs, data):
    bits = cs.bit_length() - 1
    good = data.draw(qst.l1_entries(cs, valid=True))
    assert not l1_reserved_bits(good) and not good & C.L1E_OFFSET_MASK & (cs - 1)
    bad = data.draw(qst.l1_entries(cs, valid=False))
    assert l1_reserved_bits(bad) or bad & C.L1E_OFFSET_MASK & (cs - 1)
    good = data.draw(qst.reftable_entries(cs, valid=True))
    assert not reftable_reserved_bits(good) and not good & (cs - 1)
    bad = data.draw(qst.reftable_entries(cs, valid=False))
    assert reftable_reserved_bits(bad) or bad & (cs - 1)
    e = data.draw(qst.l2_entries(cs, valid=True))
    assert not l2_reserved_bits(e)
    if l2_cluster_type(e) in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
        assert not e & C.L2E_OFFSET_MASK & (cs - 1)
    e = data.draw(qst.l2_entries(cs, valid=False))
    assert l2_reserved_bits(e) or (not e & C.QCOW_OFLAG_COMPRESSED
                                   and e & C.L2E_OFFSET_MASK & (cs - 1))
    if cs >= 16384:
        entry, bitmap = data.draw(qst.l2_entries(cs, extended_l2=True, valid=True))
        validate_subcluster_bitmap(entry, bitmap)
        entry, bitmap = data.draw(qst.l2_entries(cs, extended_l2=True, valid=False))
        with pytest.raises(Qcow2Error):
            if l2_reserved_bits(entry, extended_l2=True):
                raise Qcow2Error("reserved bits")
            validate_subcluster_bitmap(entry, bitmap)
    d = data.draw(qst.compressed_descriptors(bits))
    assert d & C.QCOW_OFLAG_COMPRESSED and not d & C.QCOW_OFLAG_COPIED
    decode_compressed(d, bits)
    width = data.draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
    assert 0 <= data.draw(qst.refcount_values(width)) < 1 << width


@settings(max_examples=scaled(30, 10), deadline=None, suppress_health_check=_HEALTH)
@given(st.lists(qst.snapshot_entries(), max_size=3))
def test_snapshot_entries_round_trip(entries):
    raw = encode_snapshot_table(entries)
    assert decode_snapshot_table(raw, len(entries)) == tuple(entries)


# -- image level -----------------------------------------------------------------------------------

@settings(max_examples=scaled(10, 10), deadline=None, suppress_health_check=_HEALTH)
@given(image=st.one_of(qst.images(), qst.image_chains(max_depth=2)))
def test_generated_images_are_valid_for_qemu(image):
    """Every generated image passes qemu-img check and reads, through qemu-img convert, as the
    recipe's guest bytes; each internal snapshot converts too (``-l``)."""
    qemu.require_qemu()
    with scratch() as directory:
        path = image.write_to(directory)
        proc = qemu.qemu_img("check", path, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        raw = os.path.join(directory, "out.raw")
        assert qemu.convert_raw(path, raw) == image.guest_data
        with Image(path) as img:
            names = [s.display_name for s in img.snapshots]
        for step in image.steps:
            if isinstance(step, qst.SnapshotStep):
                assert step.name in names
        for name in names:
            qemu.qemu_img("convert", "-l", name, "-O", "raw", path, raw)


@settings(max_examples=scaled(20, 10), deadline=None, suppress_health_check=_HEALTH)
@given(data=st.data())
def test_operations_are_valid_for_their_disk(data):
    """Operation lists never make a request the library refuses as invalid (RequestError)."""
    opts = data.draw(qst.create_options(preallocation=False))
    size = data.draw(qst.disk_sizes(opts["cluster_size"], max_size=256 << 10))
    ops = data.draw(qst.operations(size, opts["cluster_size"]))
    with scratch() as directory:
        import qcow2
        with qcow2.create(os.path.join(directory, "x.qcow2"), size, **opts) as img:
            for op in ops:
                try:
                    op.apply(img)
                except RequestError as e:      # pragma: no cover - the property
                    raise AssertionError(f"{op}: {e}") from e


@pytest.mark.parametrize("kind", qst.CORRUPTION_KINDS)
@settings(max_examples=scaled(5, 10), deadline=None, suppress_health_check=_HEALTH)
@given(data=st.data())
def test_corruptions_do_what_they_say(kind, data):
    damaged = data.draw(qst.corrupted_images(kinds=(kind,)))
    c = damaged.corruption
    assert c.kind == kind and c.description
    assert damaged.data == c.apply(damaged.image.data)
    if c.truncate_to is not None:
        assert len(damaged.data) == c.truncate_to < len(damaged.image.data)
    for offset, new in c.patches:
        assert damaged.data[offset:offset + len(new)] == new
    layout = qst.metadata_layout(damaged.image.data)
    if kind in ("pointer-into-metadata", "copied-flag", "reserved-bits", "refcount-off-by-one",
                "bit-flip", "unaligned-offset"):
        # aimed at real metadata: every patch lies inside a structure of the original image
        for offset, new in c.patches:
            assert any(r.host_offset <= offset < r.end for r in layout.metadata()), (c, offset)
