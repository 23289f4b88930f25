"""The overlap range map: selects the Cython implementation or its pure-Python twin.

``QCOW2_NO_EXTENSIONS=1`` forces the twin (:mod:`qcow2._overlap_py`); ``QCOW2_REQUIRE_EXTENSIONS=1``
turns a missing or broken extension into an ImportError.  ``IMPLEMENTATION`` says which one is in
use ("c-extension" or "pure-python").  Both have the same API, docstrings and cost formula.
"""

from __future__ import annotations

import os as _os

if _os.environ.get("QCOW2_NO_EXTENSIONS") == "1":
    from ._overlap_py import FIXED_OVERHEAD, RangeMap
    IMPLEMENTATION = "pure-python"
else:
    try:
        from ._overlap import FIXED_OVERHEAD, RangeMap
        IMPLEMENTATION = "c-extension"
    except ImportError:
        if _os.environ.get("QCOW2_REQUIRE_EXTENSIONS") == "1":
            raise
        from ._overlap_py import FIXED_OVERHEAD, RangeMap
        IMPLEMENTATION = "pure-python"

from .overlap_types import (OL_ACTIVE_L1, OL_ACTIVE_L2, OL_ALL, OL_ALL_TYPES,  # noqa: E402
                            OL_BITMAP_DIRECTORY, OL_BITMAP_TABLE, OL_CACHED, OL_CONSTANT,
                            OL_FDE_HEADER, OL_INACTIVE_L1, OL_INACTIVE_L2, OL_MAIN_HEADER,
                            OL_MASK_LIMIT, OL_REFCOUNT_BLOCK, OL_REFCOUNT_TABLE,
                            OL_SNAPSHOT_TABLE, TYPES)

__all__ = [
    "IMPLEMENTATION", "RangeMap", "FIXED_OVERHEAD", "TYPES",
    "OL_MAIN_HEADER", "OL_ACTIVE_L1", "OL_ACTIVE_L2", "OL_REFCOUNT_TABLE", "OL_REFCOUNT_BLOCK",
    "OL_SNAPSHOT_TABLE", "OL_INACTIVE_L1", "OL_INACTIVE_L2", "OL_BITMAP_DIRECTORY",
    "OL_BITMAP_TABLE", "OL_FDE_HEADER", "OL_ALL", "OL_ALL_TYPES", "OL_CONSTANT", "OL_CACHED",
    "OL_MASK_LIMIT",
]
