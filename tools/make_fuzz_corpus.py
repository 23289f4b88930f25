#!/usr/bin/env python3
"""Write the seed corpus of the atheris harness (tools/fuzz_qcow2.py): small valid images.

    .venv/bin/python tools/make_fuzz_corpus.py [DIRECTORY]     # default: build/fuzz-corpus

Each seed is a qcow2 file made by this library's writer (``qcow2._fuzzgen.build_image``, no
Hypothesis needed): a grid of create options (version 2 and 3, cluster sizes 512 B to 16 KiB,
refcount widths 1 to 64, lazy refcounts, extended L2, zlib and zstd), each with data, zero and
compressed clusters, discards, and for most an internal snapshot; some over a backing file named
``layer0.qcow2`` or ``layer0.raw`` (the harness puts such files next to the image it opens; see
:func:`backing_files`).  Seeds are a few KiB each (the largest under 128 KiB): run the harness with
``-max_len=131072``.
Deterministic: the same command writes the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from qcow2._fuzzgen import Op, SnapshotStep, build_image  # noqa: E402

KiB = 1024


def _steps(cluster_size: int, size: int, compressed: bool = True) -> list:
    cs = cluster_size
    steps = [Op("pwrite", 0, min(size, 3 * cs + 100), 1),
             Op("pwrite", size // 2, min(cs, size - size // 2), 2),
             Op("write_zeroes", cs, cs),
             Op("discard", 2 * cs, cs)]
    if compressed and cs >= 1024:
        steps.append(Op("write_compressed", 4 * cs, 2 * cs, 3))
    steps += [SnapshotStep("s1", 1), Op("pwrite", 100, 700, 4)]
    return steps


#: (name, size, create options, snapshots? or "lean": a few subcluster writes, no snapshot)
SEEDS = [
    ("v3-512", 64 * KiB, dict(cluster_size=512), True),
    ("v2-512", 64 * KiB, dict(cluster_size=512, compat="0.10"), True),
    ("v3-1k-rc1", 96 * KiB, dict(cluster_size=1024, refcount_bits=1), False),
    ("v3-1k-rc2", 96 * KiB, dict(cluster_size=1024, refcount_bits=2), True),
    ("v3-1k-rc4-lazy", 96 * KiB, dict(cluster_size=1024, refcount_bits=4, lazy_refcounts=True),
     True),
    ("v3-2k-rc8", 128 * KiB, dict(cluster_size=2048, refcount_bits=8), True),
    ("v3-4k-rc32", 256 * KiB, dict(cluster_size=4096, refcount_bits=32), True),
    ("v3-512-rc64", 64 * KiB, dict(cluster_size=512, refcount_bits=64), True),
    ("v3-1k-zstd", 96 * KiB, dict(cluster_size=1024, compression_type="zstd"), True),
    ("v3-16k-extl2", 64 * KiB, dict(cluster_size=16384, extended_l2=True), "lean"),
    ("v3-512-prealloc", 16 * KiB, dict(cluster_size=512, preallocation="metadata"), False),
    ("v3-512-odd-size", 33 * KiB + 512, dict(cluster_size=512), True),
    ("v3-512-empty", 0, dict(cluster_size=512), False),
]


def backing_files() -> dict[str, bytes]:
    """The backing files seeds (and mutants) may name: ``layer0.qcow2`` and ``layer0.raw``."""
    base = build_image(64 * KiB, dict(cluster_size=512),
                       [Op("pwrite", 0, 64 * KiB, 0x42), Op("discard", 8 * KiB, 8 * KiB)],
                       name="layer0.qcow2")
    raw = bytes((0x5A,)) * (48 * KiB)
    return {"layer0.qcow2": base.data, "layer0.raw": raw}


def seeds() -> dict[str, bytes]:
    """Seed name -> image bytes."""
    from qcow2._fuzzgen import BackingLayer
    out = {}
    for name, size, options, snapshots in SEEDS:
        steps = _steps(options["cluster_size"], size) if size else []
        if snapshots == "lean":      # 16 KiB clusters: keep the file under 128 KiB
            steps = [Op("pwrite", 512, 1024, 1), Op("write_zeroes", 4096, 2048),
                     Op("write_compressed", 16384, 16384, 3)]
        elif not snapshots:
            steps = [s for s in steps if not isinstance(s, SnapshotStep)]
        out[name] = build_image(size, options, steps).data
    files = backing_files()
    base = BackingLayer("layer0.qcow2", "qcow2", files["layer0.qcow2"], bytes(64 * KiB))
    raw = BackingLayer("layer0.raw", "raw", files["layer0.raw"], files["layer0.raw"])
    for layer, fmt in ((base, "qcow2"), (raw, None)):
        opts = dict(cluster_size=512, backing_file=layer.name)
        if fmt:
            opts["backing_fmt"] = fmt
        out[f"over-{layer.name}"] = build_image(
            64 * KiB, opts, [Op("pwrite", 1000, 3000, 7), Op("write_zeroes", 16 * KiB, 4 * KiB)],
            backing=(layer,)).data
    return out


def main(argv: list[str]) -> int:
    directory = argv[1] if len(argv) > 1 else os.path.join("build", "fuzz-corpus")
    os.makedirs(directory, exist_ok=True)
    total = 0
    for name, data in seeds().items():
        digest = hashlib.sha1(data).hexdigest()[:12]
        with open(os.path.join(directory, f"{name}-{digest}.qcow2"), "wb") as f:
            f.write(data)
        total += len(data)
    print(f"{len(SEEDS) + 2} seeds, {total} bytes, in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
