#!/usr/bin/env python3
"""Read benchmark: our read path vs ``qemu-img bench`` and ``qemu-img convert -O raw``.

    python3 bench/bench_read.py [--size 1G] [--repeat 5] [--workdir bench/work] [--profile]

The image: a raw file of ``--size`` bytes is built deterministically (seeded) from 1 MiB units
(64 KiB units below 64 MiB) grouped into runs of 1..24 units, each run random bytes, zeros or
text (log lines with lorem ipsum), so that exactly 3/4 of the units hold data; ``qemu-img convert
-O qcow2 -o cluster_size=64k`` turns it into a qcow2 image whose zero runs are unallocated
(768 MiB allocated of 1 GiB).  Both files are cached in the work directory (default bench/work/,
gitignored) and rebuilt only when the parameters change.

Measured, interleaved (the order rotates every round), best-of-N and median wall time with the page
cache warm (one untimed read of the image first), every command a fresh process:

  ours-read      ``python3 -c``: qcow2.open + Image.readinto with a reused 2 MiB buffer over the
                 whole disk; the same process also reports the time of the read loop alone
                 (``ours-read-inproc``, i.e. without interpreter start and import)
  qemu-bench     ``qemu-img bench -f qcow2 -c SIZE/64k -s 65536 -d 8 IMG`` (reads the whole disk)
  qemu-convert   ``qemu-img convert -f qcow2 -O raw IMG OUT``
  ours-convert   ``python3 -m qcow2 convert -O raw IMG OUT`` (only when qcow2/cli.py has it)
  lib-convert    a library stand-in for ``convert`` (map + readinto + pwrite, holes for zeros),
                 so that the library's convert cost is known even before the CLI exists
  py-startup     ``python3 -c "import qcow2"`` (the fixed cost included in every ours-* number)

OUT is on the work directory's filesystem and deleted (untimed) after each run; the outputs are
compared byte for byte (cmp) once, with each other and with the raw source.  Ratios printed and
stored: ours-read / qemu-bench and ours-convert / qemu-convert (target: <= 1.0).

Writes bench/results/read.json (samples, summary, machine info) and bench/results/read.md.
``--profile`` prints a cProfile of the read path (top 15) to stderr and stores it in read.md.
Nothing is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import hashlib
import io
import json
import os
import platform
import pstats
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SEED = 20240601
CLUSTER_SIZE = 65536
LAYOUT_VERSION = 1  # bump when the generator changes, to invalidate cached images
MAX_RUN_UNITS = 24
DEFAULT_BUFFER = 2 << 20

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A size with qemu's suffixes (k/K = KiB, M = MiB, G = GiB, T = TiB)."""
    t = text.strip().upper()
    unit = t[-1] if t and t[-1] in _SUFFIXES else ""
    return int(float(t[:len(t) - len(unit)]) * _SUFFIXES[unit])


# ---------------------------------------------------------------------------------------------
# the source image


_LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt "
          "ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation "
          "ullamco laboris nisi ut aliquip ex ea commodo consequat").split()


def _text_block(rnd: random.Random, size: int) -> bytes:
    """``size`` bytes of log-like text lines (timestamps, hosts, lorem ipsum)."""
    lines = []
    total = 0
    t = 1_700_000_000
    while total < size:
        t += rnd.randrange(1, 5000)
        words = " ".join(rnd.choice(_LOREM) for _ in range(rnd.randrange(4, 16)))
        line = (f"{datetime.datetime.fromtimestamp(t, datetime.timezone.utc):%Y-%m-%dT%H:%M:%S}Z "
                f"node{rnd.randrange(64):02d} svc[{rnd.randrange(1, 65536)}]: "
                f"{rnd.choice(('INFO', 'WARN', 'DEBUG', 'ERROR'))} {words}\n")
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def layout(size: int, seed: int = SEED) -> tuple[int, list[tuple[str, int]]]:
    """(unit, runs): runs of (kind, nb_units), kinds 'random'/'zero'/'text'; 1/4 of units zero."""
    unit = (1 << 20) if size >= (64 << 20) else CLUSTER_SIZE
    if size % unit:
        raise SystemExit(f"--size must be a multiple of {unit} bytes")
    nb_units = size // unit
    left = {"zero": nb_units // 4}
    left["random"] = (nb_units - left["zero"]) // 2
    left["text"] = nb_units - left["zero"] - left["random"]
    rnd = random.Random(seed)
    runs: list[tuple[str, int]] = []
    prev = None
    while sum(left.values()):
        kinds = [k for k in ("random", "zero", "text") if left[k] and k != prev] or \
                [k for k in left if left[k]]
        kind = rnd.choices(kinds, weights=[left[k] for k in kinds])[0]
        n = min(left[kind], rnd.randint(1, MAX_RUN_UNITS))
        if kind == prev:  # only one kind left: merge
            runs[-1] = (kind, runs[-1][1] + n)
        else:
            runs.append((kind, n))
        left[kind] -= n
        prev = kind
    return unit, runs


def build_raw(path: str, size: int, seed: int = SEED) -> dict:
    """Write the raw source (zero runs are holes).  Returns a summary of the layout."""
    unit, runs = layout(size, seed)
    rnd = random.Random(seed + 1)
    text = _text_block(random.Random(seed + 2), 4 << 20)
    counts = {"random": 0, "zero": 0, "text": 0}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.truncate(size)
        pos = 0
        for kind, n in runs:
            counts[kind] += n * unit
            if kind == "zero":
                pos += n * unit
                continue
            f.seek(pos)
            for _ in range(n):
                if kind == "random":
                    f.write(rnd.randbytes(unit))
                else:  # text: the block rotated by a unit-dependent amount, never all zero
                    start = rnd.randrange(len(text) - unit)
                    f.write(text[start:start + unit])
                pos += unit
    os.replace(tmp, path)
    return {"unit": unit, "nb_runs": len(runs), "bytes": counts}


def qemu_img(*args: str, capture: bool = True) -> str:
    r = subprocess.run(["qemu-img", *args], check=True, text=True,
                       stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    return r.stdout if capture else ""


def prepare(workdir: str, size: int) -> tuple[str, str, dict]:
    """The cached (raw, qcow2) pair for ``size``; built when missing or stale."""
    os.makedirs(workdir, exist_ok=True)
    tag = f"read-{size}-s{SEED}-v{LAYOUT_VERSION}"
    raw = os.path.join(workdir, tag + ".raw")
    img = os.path.join(workdir, tag + ".qcow2")
    manifest_path = os.path.join(workdir, tag + ".json")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        if (os.path.getsize(raw) == size and os.path.exists(img)
                and manifest.get("qcow2_bytes") == os.path.getsize(img)):
            return raw, img, manifest
    except (OSError, ValueError):
        pass
    t0 = time.perf_counter()
    print(f"building {raw} ...", file=sys.stderr)
    summary = build_raw(raw, size)
    t1 = time.perf_counter()
    print(f"converting to {img} ...", file=sys.stderr)
    if os.path.exists(img):
        os.unlink(img)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER_SIZE}", raw, img,
             capture=False)
    t2 = time.perf_counter()
    extents = json.loads(qemu_img("map", "-f", "qcow2", "--output=json", img))
    allocated = sum(e["length"] for e in extents if e["data"])
    manifest = dict(summary, size=size, seed=SEED, layout_version=LAYOUT_VERSION,
                    cluster_size=CLUSTER_SIZE, allocated_bytes=allocated,
                    qcow2_bytes=os.path.getsize(img), build_s=round(t1 - t0, 2),
                    convert_s=round(t2 - t1, 2))
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2)
    return raw, img, manifest


def warm(path: str) -> None:
    """Read the whole file once (untimed) so that every contender starts with a warm page cache."""
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


# ---------------------------------------------------------------------------------------------
# our side, as code run in a fresh interpreter


READ_SCRIPT = r"""
import sys, time
t0 = time.perf_counter()
import qcow2
img = qcow2.open(sys.argv[1])
size, bufsize = img.size, int(sys.argv[2])
buf = bytearray(bufsize)
view = memoryview(buf)
t1 = time.perf_counter()
for off in range(0, size - bufsize + 1, bufsize):
    img.readinto(buf, off)
tail = size % bufsize
if tail:
    img.readinto(view[:tail], size - tail)
t2 = time.perf_counter()
img.close()
print(f"{t1 - t0:.6f} {t2 - t1:.6f}")
"""

# A stand-in for `convert -O raw` built on the public API: data/compressed extents are read in
# chunks and written at the same offset, zero and unallocated extents are left as holes.
LIB_CONVERT_SCRIPT = r"""
import os, sys
import qcow2
img = qcow2.open(sys.argv[1])
chunk = int(sys.argv[3])
buf = bytearray(chunk)
view = memoryview(buf)
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, img.size)
for ext in img.map():
    if ext.zero or not ext.data:
        continue
    pos, end = ext.start, ext.start + ext.length
    while pos < end:
        n = min(chunk, end - pos)
        part = view[:n]
        img.readinto(part, pos)
        done = 0
        while done < n:
            done += os.pwrite(fd, part[done:], pos + done)
        pos += n
os.close(fd)
img.close()
"""


SRC = ROOT  # the checkout whose qcow2 package is measured (--src)


def _env(workdir: str | None = None) -> dict:
    """Environment for our subprocesses: the repo on the path and, given ``workdir``, a bytecode
    cache under ``workdir/pycache`` (an installed package has its .pyc files; without them every
    start recompiles the package, which is a cost of the environment, not of the code)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if workdir is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(workdir, "pycache")
    return env


def cli_convert_available() -> tuple[bool, str]:
    """Whether ``python -m qcow2 convert`` exists yet (another helper is writing the CLI)."""
    if not os.path.exists(os.path.join(SRC, "qcow2", "cli.py")):
        return False, "qcow2/cli.py does not exist"
    r = subprocess.run([sys.executable, "-m", "qcow2", "convert", "--help"], env=_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=SRC)
    if r.returncode != 0:
        return False, "python -m qcow2 convert --help failed: " + r.stdout.strip()[-300:]
    return True, ""


# ---------------------------------------------------------------------------------------------
# timing


LAST_CPU = [0.0]  # user+sys CPU seconds of the last timed() child (all its threads)


def timed(cmd: list[str], env=None) -> tuple[float, str]:
    """Wall time of one run of ``cmd`` (a fresh process); its CPU time goes to LAST_CPU."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       cwd=SRC)
    dt = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAST_CPU[0] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return dt, r.stdout


def summarise(samples: list[float], cpu: list[float] | None = None) -> dict:
    out = {"best_s": min(samples), "median_s": statistics.median(samples),
           "mean_s": statistics.fmean(samples), "n": len(samples),
           "samples_s": [round(s, 6) for s in samples]}
    if cpu:
        out["cpu_best_s"] = min(cpu)
        out["cpu_median_s"] = statistics.median(cpu)
    return out


def files_equal(a: str, b: str) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def profile_read(img_path: str, bufsize: int, top: int = 15) -> str:
    """cProfile of one full read in this process; the top entries by internal time."""
    sys.path.insert(0, SRC)
    import qcow2
    prof = cProfile.Profile()
    buf = bytearray(bufsize)
    with qcow2.open(img_path) as img:
        size = img.size
        prof.enable()
        for off in range(0, size - bufsize + 1, bufsize):
            img.readinto(buf, off)
        prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# machine info and reports


def machine_info(workdir: str = ".") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        qver = qemu_img("--version").splitlines()[0]
    except (OSError, subprocess.CalledProcessError):
        qver = None
    try:
        fs = subprocess.run(["df", "--output=fstype", workdir], capture_output=True, text=True,
                            cwd=ROOT).stdout.split()[-1]
    except (OSError, IndexError):
        fs = None
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "python_impl": platform.python_implementation(), "platform": platform.platform(),
            "qemu_img": qver, "filesystem": fs,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


LABELS = {
    "ours-read": "ours: python3 -c 'qcow2.open + readinto' (whole disk, fresh process)",
    "ours-read-inproc": "ours: the read loop alone (no interpreter start/import/open)",
    "qemu-bench": "qemu-img bench -f qcow2 -c C -s 65536 -d 8",
    "ours-convert": "ours: python3 -m qcow2 convert -O raw",
    "qemu-convert": "qemu-img convert -f qcow2 -O raw",
    "lib-convert": "ours: library convert stand-in (map + readinto + pwrite)",
    "py-startup": "python3 -c 'import qcow2' (startup only)",
    "py-bare": "python3 -c pass (interpreter start only)",
    "py-bare-nosite": "python3 -S -c pass (interpreter start without site/.pth files)",
    "py-startup-nopyc": "python3 -c 'import qcow2' without .pyc files (PYTHONDONTWRITEBYTECODE=1)",
    "ours-open-inproc": "ours: import qcow2 + open, inside the process",
}


THROUGHPUT_KEYS = ("ours-read", "ours-read-inproc", "qemu-bench", "qemu-convert", "ours-convert",
                   "lib-convert")


def render_table(doc: dict) -> str:
    size = doc["image"]["size"]
    rows = ["| measure | best (s) | median (s) | best GiB/s | CPU best (s) | runs |",
            "|---|---:|---:|---:|---:|---:|"]
    for key, s in doc["summary"].items():
        gibs = f"{size / s['best_s'] / (1 << 30):.2f}" if key in THROUGHPUT_KEYS else ""
        cpu_text = f"{s['cpu_best_s']:.3f}" if "cpu_best_s" in s else ""
        rows.append(f"| {key}: {LABELS.get(key, key)} | {s['best_s']:.3f} | {s['median_s']:.3f} | "
                    f"{gibs} | {cpu_text} | {s['n']} |")
    return "\n".join(rows)


def render_ratios(doc: dict) -> str:
    rows = ["| ratio | best | median | target |", "|---|---:|---:|---:|"]
    for name, r in doc["ratios"].items():
        rows.append(f"| {name} | {r['best']:.2f}x | {r['median']:.2f}x | <= 1.00x |")
    return "\n".join(rows)


def render_md(doc: dict) -> str:
    m, im = doc["machine"], doc["image"]
    out = [
        "# Read benchmark (bench/bench_read.py)",
        "",
        f"{m['date']} · {m['cpu']} · {m['nproc']} CPUs · Python {m['python']} · {m['qemu_img']} · "
        f"filesystem {m['filesystem']}",
        "",
        f"Image: {im['size'] >> 20} MiB virtual, {im['cluster_size'] >> 10} KiB clusters, "
        f"{im['allocated_bytes'] >> 20} MiB allocated (random {im['bytes']['random'] >> 20} MiB, "
        f"text {im['bytes']['text'] >> 20} MiB, zero/unallocated {im['bytes']['zero'] >> 20} MiB, "
        f"{im['nb_runs']} runs); made by `qemu-img convert -O qcow2` from a seeded raw file. "
        f"Page cache warm; every command a fresh process; {doc['repeat']} interleaved rounds; "
        f"read buffer {doc['buffer_size'] >> 10} KiB.",
        "",
        render_table(doc),
        "",
        render_ratios(doc),
        "",
    ]
    out += [f"- {n}" for n in doc["notes"]]
    if doc.get("profile"):
        out += ["", "## Profile of the read loop (cProfile, by tottime)", "", "```",
                doc["profile"].strip(), "```"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="virtual disk size (qemu suffixes), default 1G")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds (best-of/median)")
    ap.add_argument("--workdir", default=os.path.join(HERE, "work"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--buffer", default="2M", help="our read buffer size, default 2M")
    ap.add_argument("--profile", action="store_true", help="cProfile our read path once")
    ap.add_argument("--no-write", action="store_true", help="do not write results files")
    ap.add_argument("--src", default=ROOT,
                    help="checkout whose qcow2 package is measured (A/B of a patch), default: "
                         "this repository")
    args = ap.parse_args(argv)
    global SRC
    SRC = os.path.abspath(args.src)
    size = parse_size(args.size)
    bufsize = parse_size(args.buffer)
    workdir = os.path.abspath(args.workdir)
    if not shutil.which("qemu-img"):
        print("qemu-img not found", file=sys.stderr)
        return 2

    load_before = os.getloadavg()
    raw, img, manifest = prepare(workdir, size)
    warm(img)
    env = _env(workdir)
    py = sys.executable
    nb_requests = size // 65536
    out_path = {k: os.path.join(workdir, f"out-{k}.raw")
                for k in ("qemu-convert", "ours-convert", "lib-convert")}
    cli_ok, cli_why = cli_convert_available()
    notes = []
    if not cli_ok:
        notes.append(f"ours-convert not measured: the CLI is not there yet ({cli_why}); "
                     f"lib-convert (the library doing the same job) is measured instead")
        print("note: " + notes[-1], file=sys.stderr)

    commands = {
        "ours-read": [py, "-c", READ_SCRIPT, img, str(bufsize)],
        "qemu-bench": ["qemu-img", "bench", "-f", "qcow2", "-c", str(nb_requests), "-s", "65536",
                       "-d", "8", img],
        "qemu-convert": ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", img,
                         out_path["qemu-convert"]],
        "lib-convert": [py, "-c", LIB_CONVERT_SCRIPT, img, out_path["lib-convert"],
                        str(bufsize)],
        "py-startup": [py, "-c", "import qcow2"],
        "py-bare": [py, "-c", "pass"],
        "py-bare-nosite": [py, "-S", "-c", "pass"],
        "py-startup-nopyc": [py, "-c", "import qcow2"],
    }
    if cli_ok:
        commands["ours-convert"] = [py, "-m", "qcow2", "convert", "-O", "raw", img,
                                    out_path["ours-convert"]]
    envs = {k: env for k in commands}
    envs["py-startup-nopyc"] = dict(_env(), PYTHONDONTWRITEBYTECODE="1")
    samples: dict[str, list[float]] = {k: [] for k in commands}
    cpu: dict[str, list[float]] = {k: [] for k in commands}
    samples["ours-read-inproc"] = []
    samples["ours-open-inproc"] = []

    for p in out_path.values():
        if os.path.exists(p):
            os.unlink(p)
    # one untimed pass of everything: correctness of the outputs, and a warm start for all
    print("checking outputs ...", file=sys.stderr)
    for key in ("qemu-convert", "ours-convert", "lib-convert"):
        if key in commands:
            timed(commands[key], env)
    equal = {}
    for key in ("ours-convert", "lib-convert"):
        if key in commands:
            equal[f"{key} == qemu-convert"] = files_equal(out_path[key], out_path["qemu-convert"])
    equal["qemu-convert == raw source"] = files_equal(out_path["qemu-convert"], raw)
    for p in out_path.values():
        if os.path.exists(p):
            os.unlink(p)
    # our whole-disk read must equal the source, too (hash inside a fresh process)
    digest_script = (READ_SCRIPT.replace("img.readinto(buf, off)",
                                         "img.readinto(buf, off); h.update(buf)")
                     .replace("t1 = time.perf_counter()\n", "import hashlib; h = hashlib.sha256()\n"
                              "t1 = time.perf_counter()\n", 1)
                     .replace('print(f"{t1 - t0:.6f} {t2 - t1:.6f}")', "print(h.hexdigest())"))
    _, ours_digest = timed([py, "-c", digest_script, img, str(bufsize)], env)
    h = hashlib.sha256()
    with open(raw, "rb", buffering=0) as f:
        b = bytearray(bufsize)
        while n := f.readinto(b):
            h.update(memoryview(b)[:n])
    equal["ours-read == raw source (sha256)"] = ours_digest.strip() == h.hexdigest()
    for k, v in equal.items():
        print(f"  {k}: {'yes' if v else 'NO'}", file=sys.stderr)
        if not v:
            notes.append(f"OUTPUT MISMATCH: {k}")

    order = list(commands)
    for rnd_i in range(args.repeat):
        rot = order[rnd_i % len(order):] + order[:rnd_i % len(order)]
        for key in rot:
            if key in out_path:
                os.sync()  # untimed: no writer starts behind another's dirty-page backlog
            dt, stdout = timed(commands[key], envs[key])
            samples[key].append(dt)
            cpu[key].append(LAST_CPU[0])
            if key == "ours-read":
                t_open, t_read = map(float, stdout.split())
                samples["ours-read-inproc"].append(t_read)
                samples["ours-open-inproc"].append(t_open)
            if key in out_path and os.path.exists(out_path[key]):
                os.unlink(out_path[key])
        print(f"round {rnd_i + 1}/{args.repeat}: " +
              ", ".join(f"{k} {samples[k][-1]:.3f}s" for k in samples), file=sys.stderr)

    summary = {k: summarise(v, cpu.get(k)) for k, v in samples.items() if v}
    ratios = {}

    def ratio(name, a, b):
        if a in summary and b in summary:
            ratios[name] = {"best": summary[a]["best_s"] / summary[b]["best_s"],
                            "median": summary[a]["median_s"] / summary[b]["median_s"]}

    ratio("ours-read / qemu-bench", "ours-read", "qemu-bench")
    ratio("ours-read-inproc / qemu-bench", "ours-read-inproc", "qemu-bench")
    ratio("ours-convert / qemu-convert", "ours-convert", "qemu-convert")
    ratio("lib-convert / qemu-convert", "lib-convert", "qemu-convert")

    profile = profile_read(img, bufsize) if args.profile else None
    if profile:
        print(profile, file=sys.stderr)

    notes.append("qemu-img bench issues the reads through QEMU's block layer with queue depth 8 "
                 "(aio=threads); ours reads synchronously, one preadv per contiguous host run.")
    notes.append("our subprocesses run with a bytecode cache (PYTHONPYCACHEPREFIX under the work "
                 "directory), as an installed package has; py-startup-nopyc shows the start without "
                 "one (this repo's sessions set PYTHONDONTWRITEBYTECODE=1).")
    notes.append("ours-read includes interpreter start, `import qcow2` and open (see py-startup, "
                  "ours-open-inproc); ours-read-inproc is the read loop alone.")
    load_after = os.getloadavg()
    notes.append(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, "
                 f"on {os.cpu_count()} CPUs: other work on the machine inflates medians more than "
                 f"best-of-N.")
    doc = {"benchmark": "read", "machine": machine_info(workdir), "src": SRC,
           "loadavg_before": load_before, "loadavg_after": load_after, "repeat": args.repeat,
           "buffer_size": bufsize, "image": manifest, "commands": commands,
           "outputs_equal": equal, "summary": summary, "ratios": ratios, "notes": notes,
           "profile": profile}
    # the scripts are long: store them once, not inline in every command
    doc["commands"] = {k: (v if "-c" not in v else v[:v.index("-c") + 1] + ["<script>"] +
                           v[v.index("-c") + 2:]) for k, v in commands.items()}
    doc["commands"] = {k: [os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in v]
                       for k, v in doc["commands"].items()}

    print(render_table(doc))
    print()
    print(render_ratios(doc))
    for n in notes:
        print("- " + n)
    if not args.no_write:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "read.json"), "w") as f:
            json.dump(doc, f, indent=2)
        with open(os.path.join(args.out, "read.md"), "w") as f:
            f.write(render_md(doc))
        print(f"wrote {os.path.join(args.out, 'read.json')} and read.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
