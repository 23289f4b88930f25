"""Metadata types of the overlap map: bit numbers, QEMU's option names and message names.

Bits 0-8 are QEMU's ``QCOW2_OL_*`` in QEMU's order; 9 (bitmap tables) and 10 (the LUKS/FDE header)
are ours — QEMU does not protect those.  Masks are 16 bits wide; bits 11-15 are valid but unnamed.
"""

from __future__ import annotations

from typing import Mapping, Union

from .errors import RequestError

OverlapCheck = Union[str, Mapping[str, object], None]

OL_MAIN_HEADER = 1 << 0
OL_ACTIVE_L1 = 1 << 1
OL_ACTIVE_L2 = 1 << 2
OL_REFCOUNT_TABLE = 1 << 3
OL_REFCOUNT_BLOCK = 1 << 4
OL_SNAPSHOT_TABLE = 1 << 5
OL_INACTIVE_L1 = 1 << 6
OL_INACTIVE_L2 = 1 << 7
OL_BITMAP_DIRECTORY = 1 << 8
OL_BITMAP_TABLE = 1 << 9
OL_FDE_HEADER = 1 << 10
OL_ALL_TYPES = (1 << 11) - 1
OL_MASK_LIMIT = 0xFFFF

# (bit mask, overlap-check option name, name used in messages)
TYPES = (
    (OL_MAIN_HEADER, "main-header", "qcow2_header"),
    (OL_ACTIVE_L1, "active-l1", "active L1 table"),
    (OL_ACTIVE_L2, "active-l2", "active L2 table"),
    (OL_REFCOUNT_TABLE, "refcount-table", "refcount table"),
    (OL_REFCOUNT_BLOCK, "refcount-block", "refcount block"),
    (OL_SNAPSHOT_TABLE, "snapshot-table", "snapshot table"),
    (OL_INACTIVE_L1, "inactive-l1", "inactive L1 table"),
    (OL_INACTIVE_L2, "inactive-l2", "inactive L2 table"),
    (OL_BITMAP_DIRECTORY, "bitmap-directory", "bitmap directory"),
    (OL_BITMAP_TABLE, "bitmap-table", "bitmap table"),
    (OL_FDE_HEADER, "fde-header", "LUKS header"),
)
OPTION_NAMES = {option: mask for mask, option, _ in TYPES}

# The templates of QEMU's overlap-check option, plus our two types where they belong: the FDE
# header never moves (constant), bitmap tables change only when bitmaps are stored (cached).
OL_CONSTANT = (OL_MAIN_HEADER | OL_ACTIVE_L1 | OL_REFCOUNT_TABLE | OL_SNAPSHOT_TABLE
               | OL_BITMAP_DIRECTORY | OL_FDE_HEADER)
OL_CACHED = OL_CONSTANT | OL_ACTIVE_L2 | OL_REFCOUNT_BLOCK | OL_INACTIVE_L1 | OL_BITMAP_TABLE
OL_ALL = OL_CACHED | OL_INACTIVE_L2
TEMPLATES = {"none": 0, "constant": OL_CONSTANT, "cached": OL_CACHED, "all": OL_ALL}


def type_name(mask: int) -> str:
    """Message name of the lowest type bit in ``mask`` (QEMU reports the first type it finds)."""
    for bit, _, name in TYPES:
        if mask & bit:
            return name
    low = mask & -mask
    return f"metadata type bit {low.bit_length() - 1}"


def type_names(mask: int) -> list[str]:
    """Message names of every type bit in ``mask``, in bit order."""
    names = [name for bit, _, name in TYPES if mask & bit]
    names += [f"metadata type bit {b}" for b in range(11, 16) if mask & (1 << b)]
    return names


def parse_overlap_check(value: OverlapCheck) -> int:
    """Turn QEMU-style ``overlap-check`` settings into a type mask.

    ``value`` is a template name (``"none"``, ``"constant"``, ``"cached"``, ``"all"``), or a mapping
    with an optional ``"template"`` and per-type booleans by QEMU's option names, e.g.
    ``{"template": "cached", "inactive-l2": True}``.  ``None`` means ``"cached"``.
    """
    if value is None:
        value = "cached"
    if isinstance(value, str):
        value = {"template": value}
    if not isinstance(value, Mapping):
        raise RequestError(f"overlap_check must be a template name or a mapping, not {value!r}")
    template = value.get("template", "cached")
    if template not in TEMPLATES:
        raise RequestError(f"Unsupported value '{template}' for qcow2 option 'overlap-check'. "
                           f"Allowed are any of the following: {', '.join(TEMPLATES)}")
    mask = TEMPLATES[template]
    for key, enabled in value.items():
        if key == "template":
            continue
        if key not in OPTION_NAMES:
            raise RequestError(f"Unknown overlap-check option '{key}'")
        if not isinstance(enabled, bool):
            raise RequestError(f"overlap-check option '{key}' must be a boolean, not {enabled!r}")
        mask = mask | OPTION_NAMES[key] if enabled else mask & ~OPTION_NAMES[key]
    return mask
