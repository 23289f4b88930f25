"""Exceptions raised by the qcow2 package.

Every error a damaged, hostile or unsupported image can provoke is a subclass of
:class:`Qcow2Error`; the messages name the offending field and its value (offsets
in hex), and where QEMU 7.2 has a well-known wording for the same condition we
use the same words so that scripts matching on qemu-img's output keep working.
"""

from __future__ import annotations


class Qcow2Error(Exception):
    """Base class of every error raised for an image, an option or a request."""


class NotQcow2Error(Qcow2Error):
    """The file is not a qcow2 image (bad magic); qemu-img's exit code 63 for check."""


class FormatError(Qcow2Error):
    """A header field, table or entry violates the qcow2 format or QEMU's limits."""


class UnsupportedError(Qcow2Error):
    """A valid image uses something this library does not implement (e.g. encryption)."""


class CorruptImageError(Qcow2Error):
    """The image is marked corrupt, or a write was refused because it would corrupt it."""


class OverlapError(CorruptImageError):
    """A host write would have landed on metadata; nothing was written."""

    def __init__(self, message: str, offset: int = 0, size: int = 0, types: int = 0):
        super().__init__(message)
        self.offset = offset
        self.size = size
        self.types = types


class BackingError(Qcow2Error):
    """The backing chain could not be opened (missing file, loop, bad format)."""


class RequestError(Qcow2Error, ValueError):
    """A caller's request is invalid: negative or overflowing offset/length, bad option."""


class ReadOnlyError(Qcow2Error):
    """A write was attempted on an image opened read-only."""
