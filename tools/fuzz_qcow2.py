#!/usr/bin/env python3
"""Coverage-guided fuzzing of the read side with atheris: open + read + map + info + check, and
repair (``check -r all``) of each input, which must either work or raise a ``Qcow2Error``.

atheris is not a project dependency; install it into the virtualenv by hand (a wheel exists for
CPython 3.8-3.11 on x86-64 Linux)::

    .venv/bin/pip install atheris
    .venv/bin/python tools/make_fuzz_corpus.py build/fuzz-corpus       # seed corpus
    mkdir -p build/fuzz-crashes
    .venv/bin/python tools/fuzz_qcow2.py build/fuzz-corpus -max_len=131072 -timeout=30 \\
        -rss_limit_mb=2048 -artifact_prefix=build/fuzz-crashes/ [-max_total_time=900] [-jobs=2]

Any other exception is a crash: libFuzzer stops and writes the input to ``crash-<sha1>`` (with
``-artifact_prefix``); replay it with ``tools/fuzz_qcow2.py CRASH_FILE`` and turn it into a plain
regression test under ``tests/`` (tests/test_fuzz_regressions.py).  A hang past ``-timeout``
seconds is a ``timeout-*`` artifact, a memory blow-up past ``-rss_limit_mb`` an ``oom-*`` one.

Each input is written to a scratch directory on tmpfs next to the backing files the seed corpus
names (``layer0.qcow2``, ``layer0.raw``) and an external data file ``image.data``, which is also
the working directory (relative data file names resolve against it).  Reads are bounded: the
first 1 MiB of the disk plus windows in its middle and at its end.
"""

from __future__ import annotations

import os
import shutil
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

with atheris.instrument_imports(include=["qcow2"]):
    from qcow2.check import check_image
    from qcow2.errors import Qcow2Error
    from qcow2.image import Image

_CHUNK = 256 << 10
_WORKDIR = None


def _setup() -> str:
    """The scratch directory, with the backing files and the data file inputs may name.

    libFuzzer ends the process from C (no Python cleanup runs), so the directories of earlier
    runs whose process is gone are removed here."""
    import glob
    import tempfile
    from make_fuzz_corpus import backing_files
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    for stale in glob.glob(os.path.join(base, "qcow2-atheris-*-")) + \
            glob.glob(os.path.join(base, "qcow2-atheris-*-*")):
        pid = os.path.basename(stale).split("-")[2]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(stale, ignore_errors=True)
    directory = tempfile.mkdtemp(prefix=f"qcow2-atheris-{os.getpid()}-", dir=base)
    for name, data in backing_files().items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    with open(os.path.join(directory, "image.data"), "wb") as f:
        f.truncate(1 << 20)
    os.chdir(directory)
    return directory


def _offsets(size: int) -> list[int]:
    offsets = list(range(0, min(size, 1 << 20), _CHUNK))
    for anchor in (size // 2 // 512 * 512, max(0, size - (1 << 19)) // 512 * 512):
        offsets += range(anchor, min(size, anchor + (1 << 19)), _CHUNK)
    return sorted(set(o for o in offsets if o < size))


def exercise(path: str) -> None:
    """Open, read, map, info, check, snapshots; then repair a copy and check it again."""
    try:
        img = Image(path, "r")
    except Qcow2Error:
        img = None
    if img is not None:
        with img:
            for step in (lambda: [img.pread(min(_CHUNK, img.size - o), o)
                                  for o in _offsets(img.size)],
                         lambda: sum(1 for _ in img.iter_map()),
                         img.info, img.check):
                try:
                    step()
                except Qcow2Error:
                    pass
            for sn in img.snapshots[:4]:
                try:
                    view = img.snapshot(sn.id)
                    view.pread(min(view.size, _CHUNK), 0)
                except Qcow2Error:
                    pass
    copy = path + ".repair"
    shutil.copyfile(path, copy)
    try:
        with Image(copy, "r+", _repair=True) as img:
            check_image(img, "all")
            img.check()
    except Qcow2Error:
        pass


def test_one_input(data: bytes) -> None:
    path = os.path.join(_WORKDIR, "image.qcow2")
    with open(path, "wb") as f:
        f.write(data)
    exercise(path)


def main() -> None:
    global _WORKDIR
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    args = sys.argv
    # replay: tools/fuzz_qcow2.py FILE... (no libFuzzer flags) runs each file once, loudly
    files = [a for a in args[1:] if not a.startswith("-") and os.path.isfile(a)]
    if files and len(files) == len(args) - 1:
        inputs = [open(f, "rb").read() for f in files]
        _WORKDIR = _setup()
        try:
            for name, data in zip(files, inputs):
                print(f"replaying {name} ({len(data)} bytes)")
                test_one_input(data)
        finally:
            os.chdir("/")
            shutil.rmtree(_WORKDIR, ignore_errors=True)
        print("no crash")
        return
    corpus = [os.path.abspath(a) if not a.startswith("-") else a for a in args[1:]]
    fixed = [args[0]] + [("-artifact_prefix=" + os.path.abspath(a.split("=", 1)[1]) + "/"
                          if a.startswith("-artifact_prefix=") else a) for a in corpus]
    _WORKDIR = _setup()
    atheris.Setup(fixed, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
