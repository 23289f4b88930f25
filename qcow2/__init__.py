"""qcow2: read, write, check and repair qcow2 disk images without QEMU.

Every host write is checked against a range map of the image's metadata; see DESIGN.md.
"""

from .errors import (BackingError, CorruptImageError, FormatError, NotQcow2Error, OverlapError,
                     Qcow2Error, ReadOnlyError, RequestError, UnsupportedError)
from .create import create
from .image import Extent, Image, ImageFile, RawImage, SnapshotView, open

__version__ = "0.1.0"

__all__ = [
    "open", "create", "Image", "ImageFile", "RawImage", "SnapshotView", "Extent",
    "Qcow2Error", "NotQcow2Error", "FormatError", "UnsupportedError", "CorruptImageError",
    "OverlapError", "BackingError", "RequestError", "ReadOnlyError",
]
