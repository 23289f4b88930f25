"""Sizes as qemu-img and qemu-io spell them: parsing ``4M`` and printing ``64 MiB``.

:func:`parse_size` accepts what QEMU 7.2's size parser accepts (observed behaviour, checked by the
test suite against ``qemu-io``): a decimal number (leading zeros allowed, still decimal) or a hex
number with ``0x``; an optional ``+``; an optional decimal fraction (``1.5k``), which needs a
suffix other than bytes; one optional suffix letter ``B K M G T P E`` (either case; powers of
1024).  Leading whitespace is skipped, anything trailing is an error, and the value must fit in
a signed 64-bit integer.

Three printers:

- :func:`format_size` — qemu-img's human sizes (``64 MiB``, ``592 KiB``, ``0.999 KiB``, ``1.5 GiB``):
  three significant digits, switching unit at 1000 of the smaller one.
- :func:`format_io_size` — qemu-io's statistics sizes (``64 KiB``, ``1.500 KiB``, ``512 bytes``).
- :func:`format_io_time` — qemu-io's elapsed time (``00.00 sec``, or ``0:00:00.00`` machine form).
"""

from __future__ import annotations

import re
from fractions import Fraction

from .errors import RequestError

__all__ = ["SizeError", "parse_size", "format_size", "format_io_size", "format_io_time",
           "INT64_MAX"]

INT64_MAX = (1 << 63) - 1

_SUFFIXES = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_NUMBER = re.compile(r"\s*\+?(?:(0[xX][0-9a-fA-F]+)|([0-9]+)(?:\.([0-9]*))?)([A-Za-z]?)\Z")


class SizeError(RequestError):
    """A size argument could not be parsed.  ``too_large`` tells "out of range" from "garbage"."""

    def __init__(self, text: str, too_large: bool = False):
        self.text = text
        self.too_large = too_large
        what = "argument too large" if too_large else \
            "non-numeric argument, or extraneous/unrecognized suffix"
        super().__init__(f"{what} -- {text}")


def parse_size(text: str, default_suffix: str = "B", limit: int = INT64_MAX) -> int:
    """Parse a qemu size (``4M`` = 4 MiB, ``1.5k`` = 1536, ``0x1000``, ``512``) into bytes.

    ``default_suffix`` applies when the text has none.  Raises :class:`SizeError` (a
    ``RequestError``/``ValueError``) for anything qemu would refuse; ``err.too_large`` is set for
    values above ``limit`` (2^63 - 1, or 2^64 - 1 where qemu parses an unsigned size).  A
    fraction is rounded to the nearest byte.
    """
    m = _NUMBER.match(text)
    if m is None:
        raise SizeError(text)
    hex_digits, digits, fraction, suffix = m.groups()
    shift = _SUFFIXES.get((suffix or default_suffix).lower())
    if shift is None:
        raise SizeError(text)
    multiplier = 1 << (10 * shift)
    if hex_digits is not None:
        value = int(hex_digits, 16) * multiplier
    else:
        value = int(digits) * multiplier
        if fraction:
            part = Fraction(int(fraction), 10 ** len(fraction))
            if part and multiplier == 1:   # fractional bytes
                raise SizeError(text)
            value += int(part * multiplier + Fraction(1, 2))
    if value > limit:
        raise SizeError(text, too_large=True)
    return value


def format_size(size: int) -> str:
    """qemu-img's human size: ``0 B``, ``999 B``, ``0.999 KiB``, ``64 MiB``, ``2.19 MiB``.

    Three significant digits (C ``%.3g``); the unit grows once the value reaches 1000 of the
    current one.
    """
    unit = 0
    while unit < 6 and size >= 1000 * (1 << (10 * unit)):
        unit += 1
    value = size / (1 << (10 * unit))
    return "%0.3g %sB" % (value, ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")[unit])


def format_io_size(value: float) -> str:
    """qemu-io's statistics size: ``512 bytes``, ``64 KiB``, ``1.500 KiB``, ``10.752 MiB``."""
    for shift, suffix in ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"), (20, " MiB"),
                          (10, " KiB")):
        if value >= (1 << shift):
            value = value / (1 << shift)
            break
    else:
        suffix = " bytes"
    text = "%.3f" % value
    if text.endswith(".000"):
        text = text[:-4]
    return text + suffix


def format_io_time(seconds: float, machine: bool = False) -> str:
    """qemu-io's elapsed time: ``00.00 sec``; ``h:mm:ss.ss`` past an hour or when ``machine``."""
    if machine or seconds >= 3600:
        whole = int(seconds)
        return "%u:%02u:%05.2f" % (whole // 3600, whole // 60 % 60, seconds - whole // 60 * 60)
    return "%05.2f sec" % seconds


def c_hex(value: int) -> str:
    """``value`` as C's ``%#x`` prints it (QEMU's messages): ``0x1f``, but ``0`` for zero."""
    return f"{value:#x}" if value else "0"
