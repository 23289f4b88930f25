"""QMP wire form of events and the subscriber mechanism."""

import io
import json

from qcow2.events import (BLOCK_IMAGE_CORRUPTED, Event, EventEmitter, image_corrupted_event,
                          json_lines_writer, overlap_limit_event)


def test_qmp_wire_form_numbers_and_timestamp():
    e = overlap_limit_event("drive0", 1 << 40, 65536)
    e = Event(e.name, e.data, timestamp=1700000000.25)
    wire = json.loads(e.to_json())
    assert wire == {"event": "QCOW2_OVERLAP_CHECK_MEMORY_LIMIT_REACHED",
                    "data": {"reference": "drive0", "start": 1 << 40, "length": 65536},
                    "timestamp": {"seconds": 1700000000, "microseconds": 250000}}
    assert isinstance(wire["data"]["start"], int)


def test_optional_members_omitted():
    assert overlap_limit_event("x").to_qmp()["data"] == {"reference": "x"}
    d = image_corrupted_event("", "node0", "msg").to_qmp()["data"]
    assert d == {"device": "", "node-name": "node0", "msg": "msg", "fatal": True}
    d = image_corrupted_event("dev", None, "m", offset=512, size=8, fatal=False).data
    assert list(d) == ["device", "msg", "offset", "size", "fatal"]
    assert image_corrupted_event("d", None, "m").name == BLOCK_IMAGE_CORRUPTED


def test_microseconds_never_overflow():
    wire = Event("X", {}, timestamp=5.9999999).to_qmp()["timestamp"]
    assert wire == {"seconds": 6, "microseconds": 0}


def test_emitter_order_and_unsubscribe():
    seen = []
    a = lambda e: seen.append(("a", e.name))  # noqa: E731
    b = lambda e: seen.append(("b", e.name))  # noqa: E731
    em = EventEmitter(a, None)
    em.subscribe(b)
    em.emit(Event("E1", {}))
    em.unsubscribe(a)
    em.emit(Event("E2", {}))
    assert seen == [("a", "E1"), ("b", "E1"), ("b", "E2")]


def test_json_lines_writer():
    buf = io.StringIO()
    w = json_lines_writer(buf)
    w(Event("A", {"n": 1}))
    w(Event("B", {"n": 2}))
    lines = buf.getvalue().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["A", "B"]
