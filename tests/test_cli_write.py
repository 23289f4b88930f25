"""qcow2-tool's writing commands against qemu-io / qemu-img 7.2: ``io -c 'write|discard|flush'``
and ``resize``.

Method: one base image per layout is made by qemu-img/qemu-io (data, zero and compressed clusters,
optionally over a backing file).  For every command, two copies of it are changed, one by qemu-io
(or qemu-img), one by us: the exit status and stdout (timing figures removed) must be equal,
qemu's stderr lines must appear in ours (we may add the detail of an error), the two images must
read the same (``qemu-img compare``), and ours must pass ``qemu-img check`` with no errors and no
leaks.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from qcow2.cli import main

from qemu import QEMU_IMG, QEMU_IO, qemu_img, qemu_io, require_qemu, run
from test_cli import tool, untimed

SIZE = 4 << 20


def _layout(directory, name: str, options: str, backing: bool) -> str:
    path = directory / f"{name}.qcow2"
    argv = ["create", "-q", "-f", "qcow2", "-o", options]
    if backing:
        base = directory / f"{name}-base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
        qemu_io(str(base), "write -P 0x11 0 4M")
        argv += ["-b", str(base), "-F", "qcow2"]
    qemu_img(*argv, str(path), str(SIZE))
    qemu_io(str(path), "write -P 0xab 0 128k", "write -z 256k 64k", "write -c -P 0x22 1M 128k",
            "write -P 0x33 2M 8k")
    return str(path)


LAYOUTS = {
    "v3": ("cluster_size=65536", False),
    "v3-backing": ("cluster_size=65536", True),
    "v2-backing": ("compat=0.10,cluster_size=4096", True),
    "extended": ("cluster_size=65536,extended_l2=on", True),
    "small": ("cluster_size=512,refcount_bits=1", False),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    require_qemu()
    directory = tmp_path_factory.mktemp("write-layouts")
    pattern = directory / "pattern.bin"
    pattern.write_bytes(b"qcow2-pattern-file\x00\xff")
    (directory / "empty.bin").write_bytes(b"")
    return directory, {name: _layout(directory, name, *spec) for name, spec in LAYOUTS.items()}


# commands that change the image, run on every layout
WRITE_COMMANDS = [
    "write 0 64k", "write -P 0x5a 512 1k", "write -P 0x5a 100 70000", "write 4M 0",
    "write -P 1 3M 1M", "write -P 1 4095k 2k", "w 64k 512",
    "write -z 0 64k", "write -z 1000 3000", "write -zu 0 256k", "write -z 1M 128k",
    "write -z -n 0 64k", "write -z -n 1 1", "write -z -n 300k 1k",
    "write -c 0 64k", "write -c 64k 64k", "write -c 1M 128k", "write -c 3M 128k",
    "write -c 3968k 128k", "write -c 512 64k", "write -z -c 512k 64k", "write -f 0 4k",
    "write -s {pattern} 0 100", "discard 0 64k", "discard 0 4M", "discard 100 200k",
    "d 64k 64k", "flush",
]
# commands refused before the image is touched (parsing, options, ranges): one layout
WRITE_REFUSED = [
    "write 4M 1", "write -1 1", "write 0 x", "write -P 300 0 1", "write -Z 0 1", "write",
    "write 0", "write 0 1 2", "write -u 0 1", "write -n 0 1", "write -z -P 1 0 1",
    "write -z -b 0 512", "write -b 1 512", "write -b 0 1", "write 0 3G", "write -z -n 0 3G",
    "write -c 0 512", "write -c 0 1", "write -c 4M 0", "write -C 0 4k", "write -q 0 4k",
    "write -C -q 0 1", "write -p 0 1", "write -s {empty} 0 10", "write -s {missing} 0 10",
    "write -s {pattern} -P 1 0 1", "discard 4M 1", "discard 0 x", "discard -C 0 64k",
    "discard -q 0 64k", "discard -Z 0 1", "discard 0", "discard 0 3G", "flush 1", "aio_flush",
]


def _ours_and_theirs(layouts, layout, tmp_path):
    directory, paths = layouts
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(paths[layout], ours)
    shutil.copy(paths[layout], theirs)
    return directory, str(ours), str(theirs)


def _assert_same_images(ours: str, theirs: str) -> None:
    compare = run(QEMU_IMG, "compare", "-f", "qcow2", "-F", "qcow2", ours, theirs, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    check = run(QEMU_IMG, "check", "--output=json", ours, check=False)
    report = json.loads(check.stdout)
    assert check.returncode == 0 and "leaks" not in report and "corruptions" not in report, report


def _assert_stderr_contains(ours: str, theirs: str, prog: str) -> None:
    lines = [line.replace("qcow2-tool: ", f"{prog}: ").replace("qcow2-tool --help",
                                                                f"{prog} --help")
             for line in ours.splitlines()]
    for line in theirs.splitlines():
        assert line in lines, (ours, theirs)
        lines = lines[lines.index(line) + 1:]


@pytest.mark.parametrize("layout, command",
                         [(layout, c) for layout in sorted(LAYOUTS) for c in WRITE_COMMANDS]
                         + [("v3-backing", c) for c in WRITE_REFUSED])
def test_io_write_like_qemu_io(capsys, layouts, tmp_path, layout, command):
    directory, ours, theirs = _ours_and_theirs(layouts, layout, tmp_path)
    command = command.format(pattern=directory / "pattern.bin", empty=directory / "empty.bin",
                             missing=directory / "missing.bin")
    q = run(QEMU_IO, "-f", "qcow2", "-c", command, theirs, check=False)
    status, out, err = tool(capsys, "io", "-f", "qcow2", "-c", command, ours)
    assert (status, untimed(out)) == (q.returncode, untimed(q.stdout)), (out, err, q.stdout,
                                                                        q.stderr)
    _assert_stderr_contains(err, q.stderr, "qemu-io")
    _assert_same_images(ours, theirs)


def test_io_vm_state_write_is_refused(capsys, layouts, tmp_path):
    """``write -b`` (the VM state area past the disk) is not supported: qemu-io's errno text,
    exit 1, and the image is untouched (qemu-io would write it)."""
    _, ours, _ = _ours_and_theirs(layouts, "v3", tmp_path)
    before = open(ours, "rb").read()
    status, out, _ = tool(capsys, "io", "-c", "write -b 0 512", ours)
    assert (status, out) == (1, "write failed: Operation not supported\n")
    assert open(ours, "rb").read() == before


def test_io_sequence_and_read_only(capsys, layouts, tmp_path):
    """Several commands in one session (one open), then a read-only session refusing writes."""
    _, ours, theirs = _ours_and_theirs(layouts, "v3-backing", tmp_path)
    cmds = ["write -P 7 60k 8k", "discard 0 64k", "write -z 1M 64k", "flush",
            "write -c 3M 64k", "read -P 7 64k 4k", "read -P 0 0 60k", "write -P 9 4M 1"]
    argv = [a for c in cmds for a in ("-c", c)]
    q = run(QEMU_IO, "-f", "qcow2", *argv, theirs, check=False)
    status, out, _ = tool(capsys, "io", *argv, ours)
    assert (status, untimed(out)) == (q.returncode, untimed(q.stdout)) and status == 1
    _assert_same_images(ours, theirs)
    before = open(ours, "rb").read()
    q = run(QEMU_IO, "-r", "-f", "qcow2", "-c", "write 0 1", "-c", "discard 0 64k", theirs,
            check=False)
    status, out, err = tool(capsys, "io", "-r", "-c", "write 0 1", "-c", "discard 0 64k", ours)
    assert (status, out) == (q.returncode, q.stdout) == (1, "")
    _assert_stderr_contains(err, q.stderr, "qemu-io")
    assert open(ours, "rb").read() == before


# resizes that succeed, on every layout
RESIZE_DONE = [
    ["{img}", "8M"], ["{img}", "+1.5k"], ["{img}", "++1M"], ["--shrink", "{img}", "1M"],
    ["--shrink", "{img}", "-512k"], ["--shrink", "{img}", "3M"], ["-q", "{img}", "+64k"],
    ["--preallocation=metadata", "{img}", "+1M"], ["--preallocation=falloc", "{img}", "+100k"],
    ["--preallocation=full", "{img}", "+1M"], ["-f", "qcow2", "{img}", "+0"],
]
# refused ones: one layout
RESIZE_REFUSED = [
    ["{img}", "-1M"], ["{img}", "1M"], ["--shrink", "{img}", "1001"], ["{img}", "+1"],
    ["{img}", "foo"], ["{img}", "+-1M"], ["{img}", "+"], ["{img}", "0"],
    ["--shrink", "{img}", "0"], ["{img}", "-100M"], ["{img}", "15E"], ["{img}", "+16E"],
    ["{img}", "18446744073709551616"], ["{img}", "4E"], ["{img}", "-q", "2M"], ["{img}"],
    ["-q", "1M"], ["{img}", "{img}", "2M"], ["--preallocation=bogus", "{img}", "+1M"],
    ["--preallocation=full", "--shrink", "{img}", "1M"], ["{missing}", "1M"],
]


@pytest.mark.parametrize("layout, argv",
                         [(layout, a) for layout in ("v3-backing", "v2-backing", "extended",
                                                     "small") for a in RESIZE_DONE]
                         + [("v3", a) for a in RESIZE_REFUSED + [["{img}", "1P"]]])
def test_resize_like_qemu_img(capsys, layouts, tmp_path, layout, argv):
    directory, ours, theirs = _ours_and_theirs(layouts, layout, tmp_path)
    missing = str(directory / "missing.qcow2")
    q = run(QEMU_IMG, "resize", *[a.format(img=theirs, missing=missing) for a in argv],
            check=False)
    status, out, err = tool(capsys, "resize", *[a.format(img=ours, missing=missing)
                                                for a in argv])
    assert (status, out) == (q.returncode, q.stdout), (out, err, q.stdout, q.stderr)
    assert err.replace("qcow2-tool", "qemu-img").replace(ours, theirs) == q.stderr
    ours_size = json.loads(qemu_img("info", "--output=json", ours).stdout)["virtual-size"]
    theirs_size = json.loads(qemu_img("info", "--output=json", theirs).stdout)["virtual-size"]
    assert ours_size == theirs_size
    _assert_same_images(ours, theirs)


def test_resize_over_snapshot_keeps_it(capsys, layouts, tmp_path):
    """Shrinking and growing an image with an internal snapshot: the snapshot reads as before."""
    _, ours, _ = _ours_and_theirs(layouts, "v3", tmp_path)
    qemu_img("snapshot", "-c", "s1", ours)
    before = tmp_path / "before.raw"
    qemu_img("convert", "-l", "s1", "-O", "raw", ours, str(before))
    assert tool(capsys, "resize", "--shrink", ours, "1M")[0] == 0
    assert tool(capsys, "resize", ours, "16M")[0] == 0
    after = tmp_path / "after.raw"
    qemu_img("convert", "-l", "s1", "-O", "raw", ours, str(after))   # at the image's new size
    old = before.read_bytes()
    assert after.read_bytes() == old + bytes((16 << 20) - len(old))
    status, out, _ = tool(capsys, "io", "-c", "read -P 0 1M 15M", "-c", "read -P 0xab 0 128k",
                          ours)
    assert status == 0, out
    _assert_same_images(ours, ours)


@pytest.mark.parametrize("options, steps", [
    ("data_file_raw=on", [["{img}", "8M"], ["--shrink", "{img}", "3M"], ["{img}", "5M"]]),
    ("data_file_raw=off", [["{img}", "8M"], ["--shrink", "{img}", "3M"],
                           ["--preallocation=metadata", "{img}", "5M"]]),
    ("data_file_raw=on", [["--preallocation=full", "{img}", "6M"]]),
])
def test_resize_with_data_file_like_qemu_img(capsys, tmp_path, options, steps):
    """The external data file follows the disk's size (grown and cut with it), and a raw data
    file stays mapped 1:1 over the grown space, as QEMU keeps them."""
    require_qemu()
    images = {}
    for who in ("ours", "theirs"):
        img = str(tmp_path / f"{who}.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-o",
                 f"data_file={tmp_path / who}.raw,{options}", img, "4M")
        qemu_io(img, "write -P 0x5c 0 4M")
        images[who] = img
    for argv in steps:
        q = run(QEMU_IMG, "resize", "-q", *[a.format(img=images["theirs"]) for a in argv],
                check=False)
        status, out, err = tool(capsys, "resize", "-q", *[a.format(img=images["ours"])
                                                          for a in argv])
        assert (status, out, err) == (q.returncode, q.stdout, q.stderr), argv
        maps = [qemu_img("map", "--output=json", images[w]).stdout for w in ("ours", "theirs")]
        assert maps[0] == maps[1], argv
        assert os.path.getsize(tmp_path / "ours.raw") == os.path.getsize(tmp_path / "theirs.raw")
        assert qemu_img("check", "-q", images["ours"], check=False).returncode == 0
        _assert_same_images(images["ours"], images["theirs"])


def test_resize_refuses_v2_image_with_snapshots(capsys, tmp_path):
    """A v2 snapshot table records no disk size: qemu-img refuses to resize such an image."""
    require_qemu()
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", ours, "8M")
    qemu_img("snapshot", "-c", "s1", ours)
    shutil.copy(ours, theirs)
    before = open(ours, "rb").read()
    q = run(QEMU_IMG, "resize", theirs, "16M", check=False)
    status, out, err = tool(capsys, "resize", ours, "16M")
    assert (status, out) == (q.returncode, q.stdout) == (1, "")
    assert err.replace("qcow2-tool", "qemu-img") == q.stderr
    assert open(ours, "rb").read() == before


def test_console_entry_parses_negative_size(tmp_path):
    """``resize IMG -1M`` through ``main()`` with sys.argv-like input (no ``--`` needed)."""
    require_qemu()
    img = str(tmp_path / "n.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, "2M")
    assert main(["resize", "--shrink", img, "-1M"]) == 0
    assert json.loads(qemu_img("info", "--output=json", img).stdout)["virtual-size"] == 1 << 20


@pytest.mark.parametrize("raw", ["on", "off"])
def test_compressed_write_with_data_file_is_not_supported(capsys, tmp_path, raw):
    """qemu-io refuses a compressed write to an image with an external data file (ENOTSUP),
    before looking at the allocation (a raw data file has every cluster allocated)."""
    require_qemu()
    outs = []
    for who in ("ours", "theirs"):
        img = str(tmp_path / f"{who}.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-o",
                 f"data_file={tmp_path / who}.raw,data_file_raw={raw}", img, "1M")
        if who == "theirs":
            outs.append(run(QEMU_IO, "-c", "write -c 0 64k", img, check=False).stdout)
        else:
            _, out, _ = tool(capsys, "io", "-c", "write -c 0 64k", img)
            outs.append(out)
    assert outs[0] == outs[1] == "write failed: Operation not supported\n"


@pytest.mark.parametrize("options", ["cluster_size=65536", "cluster_size=512",
                                     "cluster_size=512,refcount_bits=64",
                                     "cluster_size=4096,refcount_bits=1", "compat=0.10"])
def test_shrink_gives_the_file_tail_back_like_qemu_img(capsys, tmp_path, options):
    """After a shrink the file ends at its last cluster in use, refcount blocks that count only
    themselves unlinked, as qemu-img leaves it (found by a new-user review: ours kept the tail)."""
    require_qemu()
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, ours, "8M")
    qemu_io(ours, "write -P 1 0 6M", "write -c -P 2 6M 1M")
    shutil.copy(ours, theirs)
    qemu_img("resize", "-q", "--shrink", theirs, "1M")
    assert tool(capsys, "resize", "-q", "--shrink", ours, "1M")[0] == 0
    assert os.path.getsize(ours) == os.path.getsize(theirs) < 8 << 20
    _assert_same_images(ours, theirs)
    # and the image goes on growing and taking writes cleanly
    assert tool(capsys, "resize", "-q", ours, "4M")[0] == 0
    assert tool(capsys, "io", "-c", "write -P 4 1M 3M", ours)[0] == 0
    _assert_same_images(ours, ours)


def test_shrink_unlinks_empty_refcount_blocks_stored_elsewhere(capsys, tmp_path):
    """Refcount blocks that count nothing after a shrink are unlinked also when they are stored
    outside the range they cover (our writer places them so), as qemu-img does (found by a
    review: ours kept 25 such blocks linked)."""
    require_qemu()
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    assert tool(capsys, "create", "-q", "-f", "qcow2", "-o",
                "cluster_size=512,refcount_bits=64", ours, "64M")[0] == 0
    assert tool(capsys, "io", "-c", "write -P 1 0 30M", "-c", "write -P 2 40M 20M", ours)[0] == 0
    shutil.copy(ours, theirs)
    qemu_img("resize", "-q", "--shrink", theirs, "1M")
    assert tool(capsys, "resize", "-q", "--shrink", ours, "1M")[0] == 0

    def linked(path):
        with open(path, "rb") as f:
            head = f.read(64)
            offset, clusters = int.from_bytes(head[48:56], "big"), int.from_bytes(head[56:60], "big")
            f.seek(offset)
            table = f.read(clusters * 512)
        return sum(1 for i in range(0, len(table), 8) if table[i:i + 8] != bytes(8))
    assert linked(ours) == linked(theirs)
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    _assert_same_images(ours, theirs)


@pytest.mark.parametrize("options, argv", [
    ("", ["{img}", "3M"]),                                   # a larger data file is cut
    ("", ["--preallocation=falloc", "{img}", "3000320"]),     # whole clusters
    ("data_file_raw=on", ["{img}", "3000320"]),
])
def test_resize_data_file_size_like_qemu_img(capsys, tmp_path, options, argv):
    require_qemu()
    images = {}
    for who in ("ours", "theirs"):
        img = str(tmp_path / f"{who}.qcow2")
        opts = f"data_file={tmp_path / who}.raw" + (f",{options}" if options else "")
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, img, "1M")
        os.truncate(tmp_path / f"{who}.raw", 10 << 20)
        images[who] = img
    qemu_img("resize", "-q", *[a.format(img=images["theirs"]) for a in argv])
    assert tool(capsys, "resize", "-q", *[a.format(img=images["ours"]) for a in argv])[0] == 0
    assert os.path.getsize(tmp_path / "ours.raw") == os.path.getsize(tmp_path / "theirs.raw")
    _assert_same_images(images["ours"], images["theirs"])
