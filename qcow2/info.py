"""What ``qemu-img info`` and ``qemu-img map`` print, built from an open image.

Theory of operation
-------------------
*info.*  :func:`image_info` returns the dict ``qemu-img info --output=json`` (7.2) prints: the same
keys, present under the same conditions, **in the same order**.  QEMU prints its JSON objects in
hash-table order, not in declaration order; the orders below (``_TOP_KEYS`` and friends) were
observed on qemu-img 7.2 output and are fixed tables here.  :func:`dumps_qemu_json` prints a value
the way QEMU's JSON writer pretty-prints it (4-space indent, ``[`` / ``]`` on their own lines even
for an empty list, ``\\uXXXX`` escapes for control and non-ASCII characters, upper-case hex), and
:func:`format_info_human` renders the dict as the plain-text ``qemu-img info``.

*map.*  :meth:`Image.map` computes the extents (QEMU's metadata-preallocation refinement
included); :func:`format_map_json` / :func:`format_map_human` print them exactly as
``qemu-img map`` does.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from .errors import Qcow2Error
from .units import format_size

if TYPE_CHECKING:  # pragma: no cover
    from .image import Extent, RawImage

__all__ = ["image_info", "raw_info", "format_info_human", "format_snapshot_table",
           "dumps_qemu_json", "format_map_json", "format_map_human", "MapOutputError"]

_ICOUNT_NONE = (1 << 64) - 1


# -- info ---------------------------------------------------------------------------------------
def image_info(img, backing_chain: bool = False):
    """``qemu-img info --output=json``'s dict for ``img`` (an Image, or a RawImage backing file).

    With ``backing_chain`` a list: this image, then each image of its (opened) backing chain, as
    ``qemu-img info --backing-chain`` prints them.  Reads the bitmap directory when the image has
    trusted bitmaps; otherwise uses only what is in memory and the host file's allocated size.
    """
    if not backing_chain:
        return _one_info(img)
    out = []
    layer = img
    while layer is not None:
        out.append(_one_info(layer))
        layer = getattr(layer, "backing", None)
    return out


def raw_info(raw: "RawImage") -> dict:
    """The info dict of a raw file (a backing file): qemu-img's five keys."""
    return {"virtual-size": raw.size, "filename": raw.filename, "format": "raw",
            "actual-size": raw.actual_size, "dirty-flag": False}


def _one_info(img) -> dict:
    if getattr(img, "format", "qcow2") == "raw":
        return raw_info(img)
    h = img.header
    d: dict = {}
    if h.backing_file_name is not None and h.backing_format is not None:
        d["backing-filename-format"] = h.backing_format
    if img.snapshots:
        d["snapshots"] = [_snapshot_info(sn) for sn in img.snapshots]
    d["virtual-size"] = img.size
    d["filename"] = img.filename
    d["cluster-size"] = img.cluster_size
    d["format"] = "qcow2"
    d["actual-size"] = img.actual_size
    d["format-specific"] = {"type": "qcow2", "data": _qcow2_specific(img)}
    if h.backing_file_name is not None:
        d["full-backing-filename"] = img.full_backing_filename
    if h.crypt_method:
        d["encrypted"] = True
    if h.backing_file_name is not None:
        d["backing-filename"] = h.backing_file_name
    d["dirty-flag"] = h.dirty
    return d


def _snapshot_info(sn) -> dict:
    d: dict = {}
    if sn.icount is not None and sn.icount != _ICOUNT_NONE:
        d["icount"] = sn.icount
    d["vm-clock-nsec"] = sn.vm_clock_nsec % 1_000_000_000
    d["name"] = sn.display_name
    d["date-sec"] = sn.date_sec
    d["date-nsec"] = sn.date_nsec
    d["vm-clock-sec"] = sn.vm_clock_nsec // 1_000_000_000
    d["id"] = sn.id
    d["vm-state-size"] = sn.vm_state_size
    return d


def _qcow2_specific(img) -> dict:
    h = img.header
    d: dict = {}
    if h.version == 2:
        d["compat"] = "0.10"
        d["compression-type"] = h.compression_type_name
        d["refcount-bits"] = h.refcount_bits
        return d
    d["compat"] = "1.1"
    d["compression-type"] = h.compression_type_name
    d["lazy-refcounts"] = h.lazy_refcounts
    bitmaps = _bitmaps_info(img)
    if bitmaps:
        d["bitmaps"] = bitmaps
    d["refcount-bits"] = h.refcount_bits
    if h.data_file is not None:
        d["data-file"] = h.data_file
    if h.has_data_file:
        d["data-file-raw"] = h.data_file_raw
    d["corrupt"] = h.corrupt
    d["extended-l2"] = h.extended_l2
    return d


def _bitmaps_info(img) -> list:
    out = []
    for e in img.bitmap_directory():
        flags = []
        if e.in_use:
            flags.append("in-use")
        if e.auto:
            flags.append("auto")
        out.append({"flags": flags, "name": e.name, "granularity": e.granularity})
    return out


# -- QEMU's JSON pretty printer -------------------------------------------------------------------
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                  "\t": "\\t"}


def _json_string(text: str) -> str:
    raw = os.fsencode(text) if any(0xDC80 <= ord(c) <= 0xDCFF for c in text) else None
    if raw is not None:  # undecodable file-name bytes: QEMU prints U+FFFD for them
        text = raw.decode("utf-8", "replace")
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)))
        else:
            out.append("\\u%04X" % code)
    out.append('"')
    return "".join(out)


def _json_lines(value, indent: int, out: list) -> None:
    pad = "    " * (indent + 1)
    end = "    " * indent
    if isinstance(value, dict):
        out.append("{\n")
        for i, (k, v) in enumerate(value.items()):
            out.append(f"{pad}{_json_string(k)}: ")
            _json_lines(v, indent + 1, out)
            out.append(",\n" if i + 1 < len(value) else "\n")
        out.append(end + "}")
    elif isinstance(value, (list, tuple)):
        out.append("[\n")
        for i, v in enumerate(value):
            out.append(pad)
            _json_lines(v, indent + 1, out)
            out.append(",\n" if i + 1 < len(value) else "\n")
        out.append(end + "]")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif value is None:
        out.append("null")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(repr(value))
    else:
        out.append(_json_string(str(value)))


def dumps_qemu_json(value) -> str:
    """``value`` as QEMU's pretty JSON writer prints it (no trailing newline)."""
    out: list = []
    _json_lines(value, 0, out)
    return "".join(out)


# -- human info -----------------------------------------------------------------------------------
def _dump_human(value, indent: int, out: list) -> None:
    """QEMU's plain-text dump of a QAPI object: ``key: value``, dashes as spaces, lists as [i]."""
    pad = "    " * indent
    items = value.items() if isinstance(value, dict) else \
        ((f"[{i}]", v) for i, v in enumerate(value))
    for key, v in items:
        key = key.replace("-", " ")
        if isinstance(v, (dict, list, tuple)):
            out.append(f"{pad}{key}:\n")
            _dump_human(v, indent + 1, out)
        else:
            text = "true" if v is True else "false" if v is False else str(v)
            out.append(f"{pad}{key}: {text}\n")


def _snapshot_row(id_str: str, name: str, vm_size: str, date: str, clock: str, icount: str) -> str:
    return "%-9s %-16s %8s%20s%13s%11s\n" % (id_str, name, vm_size, date, clock, icount)


def format_snapshot_table(snapshots: Sequence[dict]) -> str:
    """``qemu-img info``'s / ``snapshot -l``'s snapshot table (header line included)."""
    lines = [_snapshot_row("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")]
    for sn in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
        secs = sn["vm-clock-sec"]
        clock = "%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60,
                                         sn["vm-clock-nsec"] // 1_000_000)
        icount = str(sn["icount"]) if "icount" in sn else ""
        lines.append(_snapshot_row(sn["id"], sn["name"], format_size(sn["vm-state-size"]), date,
                                   clock, icount))
    return "".join(lines)


def format_info_human(d) -> str:
    """Plain-text ``qemu-img info`` for one info dict, or a --backing-chain list (blank-line
    separated).  Ends with a newline."""
    if isinstance(d, list):
        return "\n".join(format_info_human(x) for x in d)
    out = [f"image: {d['filename']}\n", f"file format: {d['format']}\n",
           f"virtual size: {format_size(d['virtual-size'])} ({d['virtual-size']} bytes)\n",
           f"disk size: {format_size(d['actual-size'])}\n"]
    if d.get("encrypted"):
        out.append("encrypted: yes\n")
    if "cluster-size" in d:
        out.append(f"cluster_size: {d['cluster-size']}\n")
    if d.get("dirty-flag"):
        out.append("cleanly shut down: no\n")
    if "backing-filename" in d:
        line = f"backing file: {d['backing-filename']}"
        full = d.get("full-backing-filename")
        if full is not None and full != d["backing-filename"]:
            line += f" (actual path: {full})"
        out.append(line + "\n")
    if "backing-filename-format" in d:
        out.append(f"backing file format: {d['backing-filename-format']}\n")
    if d.get("snapshots"):
        out.append("Snapshot list:\n")
        out.append(format_snapshot_table(d["snapshots"]))
    spec = d.get("format-specific")
    if spec is not None:
        out.append("Format specific information:\n")
        _dump_human(spec["data"], 1, out)
    return "".join(out)


# -- map ------------------------------------------------------------------------------------------
def iter_map_json(extents: Iterable["Extent"], start: int = 0) -> Iterator[str]:
    """``qemu-img map --output=json`` text, byte for byte, in pieces as the extents come.  An
    empty range prints one zero-length entry at ``start``, as qemu-img does."""
    first = True
    for e in extents:
        row = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth},'
               f' "present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}')
        if e.offset is not None:
            row += f', "offset": {e.offset}'
        yield ("[" if first else ",\n") + row + "}"
        first = False
    if first:
        yield (f'[{{ "start": {start}, "length": 0, "depth": 0, "present": false,'
               f' "zero": false, "data": false}}')
    yield "]\n"


def format_map_json(extents: Iterable["Extent"], start: int = 0) -> str:
    """:func:`iter_map_json` as one string (newline-terminated)."""
    return "".join(iter_map_json(extents, start))


def _b(flag: bool) -> str:
    return "true" if flag else "false"


class MapOutputError(Qcow2Error):
    """Human map output is impossible (compressed or external clusters); ``text`` holds the
    lines printed before the offending extent."""

    def __init__(self, text: str):
        super().__init__("File contains external, encrypted or compressed clusters.")
        self.text = text


def iter_map_human(extents: Iterable["Extent"], filenames: Sequence[str]) -> Iterator[str]:
    """``qemu-img map`` human text in lines; ``filenames[depth]`` names each layer's host file.

    Only data that is not zero is listed.  Raises :class:`MapOutputError` on a data extent
    without a host offset, as qemu-img refuses those.
    """
    yield "Offset          Length          Mapped to       File\n"
    for e in extents:
        if e.data and e.offset is None:
            raise MapOutputError("")
        if e.data and not e.zero:
            yield "%-16s%-16s%-16s%s\n" % (_hex(e.start), _hex(e.length), _hex(e.offset),
                                            filenames[e.depth])


def format_map_human(extents: Iterable["Extent"], filenames: Sequence[str]) -> str:
    """:func:`iter_map_human` as one string; a :class:`MapOutputError` carries the text printed
    before the offending extent."""
    out: list[str] = []
    try:
        out.extend(iter_map_human(extents, filenames))
    except MapOutputError:
        raise MapOutputError("".join(out)) from None
    return "".join(out)


def _hex(n: int) -> str:
    return "%#x" % n if n else "0"
