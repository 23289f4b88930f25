"""The overlap guard on real images made by qemu-img: every metadata type is detected, data is not,
modes and overrides select types, the memory budget announces what it can no longer protect."""

import json

import pytest

import qcow2
from qcow2 import overlap_types as T
from qcow2.errors import OverlapError, RequestError
from qcow2.events import OVERLAP_CHECK_MEMORY_LIMIT_REACHED
from qcow2.guard import OverlapGuard
from qcow2.metadata import iter_metadata
from qcow2.overlap_types import parse_overlap_check

from qemu import create, qemu_img, qemu_io

CLUSTER = 4096


@pytest.fixture(scope="module")
def rich_image(tmp_path_factory):
    """Snapshots (inactive L1/L2), bitmaps (directory + tables), data, several L2 tables."""
    path = str(tmp_path_factory.mktemp("guard") / "rich.qcow2")
    create(path, "8M", options={"cluster_size": CLUSTER})
    qemu_io(path, "write -P 1 0 256k", "write -P 3 6M 64k")
    qemu_img("snapshot", "-c", "s1", path)
    qemu_io(path, "write -P 2 64k 64k")
    qemu_img("snapshot", "-c", "s2", path)
    qemu_img("bitmap", "--add", path, "bm0")
    qemu_img("bitmap", "--add", "-g", "64k", path, "bm1")
    return path


def _by_type(img, types):
    found = {}
    for offset, length, type_bit in iter_metadata(img, types):
        found.setdefault(type_bit, []).append((offset, length))
    return found


def test_every_type_present_in_rich_image(rich_image):
    with qcow2.open(rich_image) as img:
        found = _by_type(img, T.OL_ALL)
    expected = {T.OL_MAIN_HEADER, T.OL_ACTIVE_L1, T.OL_ACTIVE_L2, T.OL_REFCOUNT_TABLE,
                T.OL_REFCOUNT_BLOCK, T.OL_SNAPSHOT_TABLE, T.OL_INACTIVE_L1, T.OL_INACTIVE_L2,
                T.OL_BITMAP_DIRECTORY, T.OL_BITMAP_TABLE}
    assert expected <= set(found)


@pytest.mark.parametrize("bit,option,name", [t for t in T.TYPES if t[0] != T.OL_FDE_HEADER])
def test_write_on_each_type_is_refused_with_qemu_name(rich_image, bit, option, name):
    with qcow2.open(rich_image, overlap_check="all") as img:
        found = _by_type(img, bit)[bit]
        for offset, length in found:
            for probe in (offset, offset + length - 1):
                with pytest.raises(OverlapError) as exc:
                    img.guard.check_write(probe, 1)
                # in a valid image only L2 tables are shared (by the active L1 and a snapshot's)
                shared_l2 = T.OL_ACTIVE_L2 | T.OL_INACTIVE_L2
                types = exc.value.types
                assert types == bit or (bit & shared_l2 and types == shared_l2)
                first = types & -types  # QEMU names the first type in its order
                assert str(exc.value) == ("Preventing invalid write on metadata "
                                          f"(overlaps with {T.type_name(first)})")
                if types == bit:
                    assert name in str(exc.value)
                # allowed when the write says it may touch that type
                img.guard.check_write(probe, 1, ign=exc.value.types)


def test_data_clusters_are_free(rich_image):
    with qcow2.open(rich_image, overlap_check="all") as img:
        hosts = [e.offset for e in img.map() if e.data and e.offset is not None]
        assert hosts
        for host in hosts:
            img.guard.check_write(host, CLUSTER)
        meta = {o for o, _, _ in iter_metadata(img, T.OL_ALL)}
        assert not meta & set(hosts)


@pytest.mark.parametrize("template", ["none", "constant", "cached", "all"])
def test_templates_select_types(rich_image, template):
    mask = T.TEMPLATES[template]
    with qcow2.open(rich_image, overlap_check=template) as img:
        assert img.guard.types == mask
        for bit, _, _ in T.TYPES:
            for offset, length in _by_type(img, T.OL_ALL).get(bit, []):
                hit = img.guard.overlaps(offset, length)
                if mask & bit:
                    assert hit & bit
                else:
                    assert not hit & bit


def test_per_type_override(rich_image):
    mask = parse_overlap_check({"template": "cached", "inactive-l2": True, "active-l2": False})
    assert mask == (T.OL_CACHED | T.OL_INACTIVE_L2) & ~T.OL_ACTIVE_L2
    with qcow2.open(rich_image, overlap_check={"template": "none", "inactive-l2": True}) as img:
        (offset, _), *_ = _by_type(img, T.OL_INACTIVE_L2)[T.OL_INACTIVE_L2]
        assert img.guard.overlaps(offset, 1) == T.OL_INACTIVE_L2
        assert img.guard.overlaps(0, 1) == 0  # header not protected in "none"


@pytest.mark.parametrize("bad", ["bogus", {"template": "x"}, {"no-such-type": True},
                                 {"active-l1": "yes"}, 42])
def test_bad_overlap_check_fails_at_open(rich_image, bad):
    with pytest.raises(RequestError):
        qcow2.open(rich_image, overlap_check=bad)


def test_corruption_callback_before_error():
    calls = []
    guard = OverlapGuard(512, overlap_check="all",
                         on_corruption=lambda msg, off, size: calls.append((msg, off, size)))
    guard.enter(0, 512, T.OL_MAIN_HEADER)
    guard.enter(4096, 1024, T.OL_ACTIVE_L1 | T.OL_ACTIVE_L2)
    with pytest.raises(OverlapError) as exc:
        guard.check_write(4600, 8)
    assert str(exc.value) == "Preventing invalid write on metadata (overlaps with active L1 table)"
    assert calls == [(str(exc.value), 4600, 8)]
    guard.check_write(4600, 8, ign=T.OL_ACTIVE_L1 | T.OL_ACTIVE_L2)
    guard.leave(4096, 1024, T.OL_ACTIVE_L1)
    with pytest.raises(OverlapError, match="active L2 table"):
        guard.check_write(4096, 1)
    guard.check_write(8192, 1 << 20)
    guard._check()


def test_fde_header_type_is_guarded():
    guard = OverlapGuard(65536, overlap_check="constant")
    guard.enter(65536, 2 << 20, T.OL_FDE_HEADER)
    with pytest.raises(OverlapError, match=r"overlaps with LUKS header"):
        guard.check_write(3 << 20 - 1, 1)


def test_memory_limit_event_once_per_range(rich_image):
    events = []
    from qcow2.overlap import RangeMap
    tiny = RangeMap(CLUSTER).memory_used  # the fixed overhead: nothing fits beyond it
    with qcow2.open(rich_image, overlap_check="all", overlap_mem=tiny, node_name="node7",
                    on_event=events.append) as img:
        guard = img.guard
        assert events, "a budget at the fixed overhead must refuse the metadata"
        assert guard.memory_used <= tiny
        ranges = [(e.data["start"], e.data["length"]) for e in events]
        assert len(ranges) == len(set(ranges))
        for event in events:
            qmp = event.to_qmp()
            assert qmp["event"] == OVERLAP_CHECK_MEMORY_LIMIT_REACHED
            assert qmp["data"]["reference"] == "node7"
            assert set(qmp["timestamp"]) == {"seconds", "microseconds"}
            json.loads(event.to_json())
        covered = guard.unprotected()
        assert sorted(ranges) == covered      # the bulk fill reports the merged ranges, once
        for offset, length, _ in iter_metadata(img, T.OL_ALL):
            assert any(s <= offset and offset + length <= s + n for s, n in covered)
        # nothing is refused by mistake while unprotected
        guard.check_write(0, CLUSTER)
        # raising the budget and rebuilding brings protection back, silently
        n = len(events)
        guard.budget = None
        guard.rebuild()
        assert len(events) == n
        assert guard.unprotected() == []
        with pytest.raises(OverlapError):
            guard.check_write(0, 1)


def test_device_name_wins_over_node_name(rich_image):
    events = []
    from qcow2.overlap import RangeMap
    tiny = RangeMap(CLUSTER).memory_used
    with qcow2.open(rich_image, overlap_mem=tiny, device="virtio0", node_name="n1",
                    on_event=events.append) as img:
        img.guard
    assert events and {e.data["reference"] for e in events} == {"virtio0"}


def test_default_reference_is_deterministic(rich_image):
    refs = []
    from qcow2.overlap import RangeMap
    tiny = RangeMap(CLUSTER).memory_used
    for _ in range(2):
        events = []
        with qcow2.open(rich_image, overlap_mem=tiny, on_event=events.append) as img:
            img.guard
        refs.append({e.data["reference"] for e in events})
    assert refs[0] == refs[1] == {"rich.qcow2"}


@pytest.mark.parametrize("overlap_check", ["cached", "all"])
def test_memory_per_metadata_cluster_on_qemu_512_layout(tmp_path, overlap_check):
    """The layout qemu-img convert makes with 512-byte clusters (an L2 table every 65 clusters, a
    refcount block every 257): at most 4 bytes per metadata cluster beyond the fixed overhead."""
    import random

    from qcow2.overlap import FIXED_OVERHEAD
    raw = tmp_path / "src.raw"
    raw.write_bytes(random.Random(7).randbytes(8 << 20))
    img_path = tmp_path / "c512.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", raw, img_path)
    with qcow2.open(str(img_path), overlap_check=overlap_check) as img:
        guard = img.guard
        nb_clusters = sum(-(-length // 512) for _, length, _ in iter_metadata(img, guard.types))
        assert nb_clusters > 300
        assert (guard.memory_used - FIXED_OVERHEAD) / nb_clusters <= 4
        assert guard.unprotected() == []
        guard._check()
