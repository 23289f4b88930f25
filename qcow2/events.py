"""QMP-style events, delivered to subscribers instead of being polled.

An :class:`Event` has a name, a ``data`` dict and a timestamp; :meth:`Event.to_qmp` gives the QMP
wire form ``{"event": NAME, "data": {...}, "timestamp": {"seconds": s, "microseconds": us}}`` with
integers as JSON numbers.  An :class:`EventEmitter` holds the subscribers (callables taking one
``Event``); the CLI subscribes a writer of JSON lines.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

OVERLAP_CHECK_MEMORY_LIMIT_REACHED = "QCOW2_OVERLAP_CHECK_MEMORY_LIMIT_REACHED"
BLOCK_IMAGE_CORRUPTED = "BLOCK_IMAGE_CORRUPTED"

Subscriber = Callable[["Event"], None]


@dataclass(frozen=True)
class Event:
    """One event: ``name``, ``data`` (JSON-able dict) and the time it was raised."""

    name: str
    data: dict
    timestamp: float = field(default_factory=time.time)

    def to_qmp(self) -> dict:
        """The QMP wire form as a dict."""
        seconds = int(self.timestamp)
        micro = int(round((self.timestamp - seconds) * 1_000_000))
        if micro >= 1_000_000:
            seconds, micro = seconds + 1, micro - 1_000_000
        return {"event": self.name, "data": dict(self.data),
                "timestamp": {"seconds": seconds, "microseconds": micro}}

    def to_json(self) -> str:
        """One line of JSON (the QMP wire form)."""
        import json  # lazily: most processes never emit an event

        return json.dumps(self.to_qmp(), separators=(", ", ": "))


def overlap_limit_event(reference: str, start: int | None = None,
                        length: int | None = None) -> Event:
    """``QCOW2_OVERLAP_CHECK_MEMORY_LIMIT_REACHED``: host bytes no longer overlap-checked."""
    data: dict = {"reference": reference}
    if start is not None:
        data["start"] = start
    if length is not None:
        data["length"] = length
    return Event(OVERLAP_CHECK_MEMORY_LIMIT_REACHED, data)


def image_corrupted_event(device: str, node_name: str | None, msg: str, *, offset: int | None = None,
                          size: int | None = None, fatal: bool = True) -> Event:
    """``BLOCK_IMAGE_CORRUPTED`` with QMP's optional members omitted when unknown."""
    data: dict = {"device": device}
    if node_name is not None:
        data["node-name"] = node_name
    data["msg"] = msg
    if offset is not None:
        data["offset"] = offset
    if size is not None:
        data["size"] = size
    data["fatal"] = fatal
    return Event(BLOCK_IMAGE_CORRUPTED, data)


class EventEmitter:
    """A set of subscribers; ``emit`` calls each in subscription order (thread-safe)."""

    def __init__(self, *subscribers: Subscriber | None):
        self._subscribers: list[Subscriber] = [s for s in subscribers if s is not None]
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.remove(subscriber)

    def emit(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for s in subscribers:
            s(event)


def json_lines_writer(stream: TextIO) -> Subscriber:
    """A subscriber that writes each event as one JSON line to ``stream`` and flushes it."""
    def write(event: Event) -> None:
        stream.write(event.to_json() + "\n")
        stream.flush()
    return write
