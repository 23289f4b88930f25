"""Helpers to drive qemu-img / qemu-io 7.2, the oracle of the test suite.

In CI (``CI=true``) a missing qemu-img is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


def require_qemu() -> None:
    """Skip (locally) or fail (CI) when qemu-img/qemu-io are missing."""
    if QEMU_IMG and QEMU_IO:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("qemu-img/qemu-io not installed; CI must install qemu-utils")
    pytest.skip("qemu-img/qemu-io not installed")


def run(*args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a command, capturing text output."""
    require_qemu()
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True,
                          input=input)


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(QEMU_IMG or "qemu-img", *args, check=check)


def qemu_io(image: str, *commands: str, fmt: str = "qcow2", extra: tuple[str, ...] = ()) -> str:
    """Run qemu-io commands on an image; raises if qemu-io reports a failure."""
    argv = [QEMU_IO or "qemu-io", "-f", fmt, *extra]
    for c in commands:
        argv += ["-c", c]
    argv.append(str(image))
    proc = run(*argv)
    if "failed" in proc.stdout or "failed" in proc.stderr:
        raise AssertionError(f"qemu-io failed: {proc.stdout}{proc.stderr}")
    return proc.stdout


def create(path, size: int | str, *, fmt: str = "qcow2", options: dict | None = None,
           backing: str | None = None, backing_fmt: str | None = None) -> str:
    argv = ["create", "-f", fmt]
    opts = dict(options or {})
    if opts:
        argv += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    if backing:
        argv += ["-b", str(backing)]
        if backing_fmt:
            argv += ["-F", backing_fmt]
    argv += [str(path), str(size)]
    qemu_img(*argv)
    return str(path)


def map_json(path, fmt: str = "qcow2") -> list[dict]:
    return json.loads(qemu_img("map", "-f", fmt, "--output=json", str(path)).stdout)


def info_json(path, *extra: str) -> dict:
    return json.loads(qemu_img("info", "--output=json", *extra, str(path)).stdout)


def convert_raw(src, dst, *extra: str) -> bytes:
    qemu_img("convert", "-O", "raw", *extra, str(src), str(dst))
    with open(dst, "rb") as f:
        return f.read()


def check_json(path) -> tuple[int, dict | None]:
    proc = qemu_img("check", "--output=json", str(path), check=False)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except ValueError:
        return proc.returncode, None


def create_encrypted(path, fmt: str, size: str = "1M") -> str:
    """An AES (compat 0.10) or LUKS encrypted qcow2 image, made by qemu-img.

    LUKS creation benchmarks PBKDF2 and fails at random on busy virtual CPUs ("Unable to get
    accurate CPU usage"), so it is retried a few times.
    """
    opts = f"encrypt.format={fmt},encrypt.key-secret=sec0"
    if fmt == "aes":
        opts += ",compat=0.10"
    proc = None
    for _ in range(8):
        proc = qemu_img("create", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
                        "-o", opts, str(path), size, check=False)
        if proc.returncode == 0:
            return str(path)
    pytest.fail(f"qemu-img cannot create a {fmt} image: {proc.stderr.strip()}")
