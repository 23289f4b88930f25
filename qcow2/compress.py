"""Cluster compression codecs: raw deflate (compression type 0) and zstd (type 1).

A compressed cluster is stored as a stream that must expand to exactly one cluster; bytes after the
end of the stream (sector padding) are ignored.  Decompression output is capped at the cluster size,
so a hostile stream cannot make us allocate more than one cluster.  zlib and zstd release the GIL
while they work, so several threads can (de)compress in parallel.
"""

from __future__ import annotations

import io
import zlib

from .constants import COMPRESSION_TYPE_ZLIB, COMPRESSION_TYPE_ZSTD
from .errors import CorruptImageError, UnsupportedError

_zstd = None  # optional dependency, imported on first use: only zstd images need it (saves
# ~3 ms of every start, zstandard imports platform)


def _need_zstd():
    global _zstd
    if _zstd is None:
        try:
            import zstandard
        except ImportError:  # pragma: no cover - exercised only where zstandard is missing
            raise UnsupportedError("zstd compressed clusters need the 'zstandard' package "
                                   "(pip install qcow2[zstd])") from None
        _zstd = zstandard
    return _zstd


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int,
                       host_offset: int = 0) -> bytes:
    """Expand one compressed cluster; raise ``CorruptImageError`` unless it yields a whole cluster."""
    try:
        if compression_type == COMPRESSION_TYPE_ZLIB:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        elif compression_type == COMPRESSION_TYPE_ZSTD:
            reader = _need_zstd().ZstdDecompressor().stream_reader(io.BytesIO(data))
            out = reader.read(cluster_size)
        else:
            raise UnsupportedError(f"Unknown compression type {compression_type}")
    except (zlib.error, ValueError, getattr(_zstd, "ZstdError", ValueError)) as e:
        raise CorruptImageError(
            f"Could not decompress cluster at host offset 0x{host_offset:x}: {e}") from None
    if len(out) != cluster_size:
        raise CorruptImageError(
            f"Compressed cluster at host offset 0x{host_offset:x} expands to {len(out)} bytes, "
            f"not the cluster size {cluster_size}")
    return out



def compress_cluster(data: bytes, compression_type: int) -> bytes:
    """Compress one cluster as QEMU can read it back: raw deflate with a 4 KiB window (QEMU
    inflates with that window), or one zstd frame.  Releases the GIL while it works."""
    if compression_type == COMPRESSION_TYPE_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
        return c.compress(data) + c.flush()
    if compression_type == COMPRESSION_TYPE_ZSTD:
        return _need_zstd().ZstdCompressor().compress(data)
    raise UnsupportedError(f"Unknown compression type {compression_type}")
