#!/usr/bin/env python3
"""Write benchmark: our writer vs qemu-img, side by side in one run.

    python3 bench/bench_write.py [--size 1G] [--writes 262144] [--snap-writes 20000]
                                 [--repeat 3] [--settle 2] [--workdir bench/work] [--out bench/results]

Three measurements, each a pair of fresh processes run in interleaved rounds (best and median of
``--repeat``; page cache warm):

  convert     ``python3 -m qcow2 convert -O qcow2 RAW OUT`` against ``qemu-img convert -f raw
              -O qcow2 RAW OUT``; RAW is bench_read's seeded 1 GiB file (3/4 data, zero runs as
              holes).  Checked once: ``qemu-img compare`` of the two outputs, ``qemu-img check``
              of ours.
  seq-write   ``--writes`` sequential 4 KiB allocating writes into a fresh 1 GiB image: ours
              through the Python API (``Image.pwrite`` in a loop, then ``close``, which flushes and
              fsyncs), against ``qemu-img bench -w -c N -s 4096 -d 1``.  Our process also reports
              the write loop alone (``-inproc``).
  snap-write  ``--snap-writes`` sequential 4 KiB writes (each first write to a cluster copies it:
              the data is shared with the snapshots) into an image with 20 internal snapshots
              made by qemu-img, with ``overlap_check="all"`` and ``"none"``; and the same for
              QEMU (``qemu-img bench --image-opts driver=qcow2,overlap-check=...``).  The ratio
              all/none is what the overlap map costs; QEMU's own all/none ratio is printed next
              to ours.

Ratios (targets): ours-convert / qemu-convert (<= 1.0), ours-seq-write / qemu-seq-write (<= 1.0),
ours-snap-all / ours-snap-none (<= 1.03).  Writes bench/results/write.json and write.md.  Nothing
is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_read import (ROOT, _env, machine_info, parse_size, prepare, qemu_img,  # noqa: E402
                        summarise, warm)

NB_SNAPSHOTS = 20
SNAP_LAYOUT_VERSION = 1


_GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


def measure(cmd: list[str], env=None) -> tuple[float, float, int | None, str]:
    """One fresh process: (wall s, CPU s, peak RSS KiB or None, stdout).

    The child is reaped with ``os.wait4``: its own CPU time.  Peak memory needs care: Linux keeps a
    process's RSS high-water mark across ``exec``, so a child forked from this (large) Python
    process would report at least our size.  GNU time (Debian package ``time``), small itself,
    forks the command from its own small image and reports the command's peak (``%M``); without
    it the peak is not measured.  Output goes through temporary files (no pipe to fill up)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("w+") as peak:
        argv = [_GNU_TIME, "-q", "-f", "%M", "-o", peak.name, *cmd] if _GNU_TIME else cmd
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                               f"{err.read().strip()[-2000:]}")
        rss = int(peak.read().split()[-1]) if _GNU_TIME else None
        return wall, usage.ru_utime + usage.ru_stime, rss, out.read()


WRITE_SCRIPT = r"""
import sys, time
t0 = time.perf_counter()
import qcow2
path, nb_writes, size, check = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
buf = bytes(range(256)) * (size // 256)
img = qcow2.open(path, "r+", overlap_check=check)
t1 = time.perf_counter()
pwrite = img.pwrite
for k in range(nb_writes):
    pwrite(buf, k * size)
t2 = time.perf_counter()
img.close()
t3 = time.perf_counter()
print(f"{t2 - t1:.6f} {t3 - t2:.6f}")
"""


def snapshot_image(workdir: str) -> str:
    """A 1 GiB, 64 KiB-cluster image with 128 MiB of data and 20 internal snapshots, each taken
    after 2 MiB more were written (qemu-img/qemu-io); cached in the work directory."""
    path = os.path.join(workdir, f"snap{NB_SNAPSHOTS}-v{SNAP_LAYOUT_VERSION}.qcow2")
    if os.path.exists(path):
        return path
    tmp = path + ".tmp"
    qemu_img("create", "-q", "-f", "qcow2", tmp, "1G", capture=False)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 128M", tmp], check=True,
                   stdout=subprocess.DEVNULL)
    for i in range(NB_SNAPSHOTS):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {i + 2} {i * 4}M 2M", tmp],
                       check=True, stdout=subprocess.DEVNULL)
        qemu_img("snapshot", "-c", f"s{i}", tmp, capture=False)
    os.replace(tmp, path)
    return path


def fresh_image(path: str, size: int) -> None:
    if os.path.exists(path):
        os.unlink(path)
    qemu_img("create", "-q", "-f", "qcow2", path, str(size), capture=False)


def copy_image(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)


def run_rounds(plan: dict, repeat: int, env, after=None, settle: float = 0.0) -> tuple[dict, dict]:
    """Run every ``plan`` entry (key -> (untimed setup, argv)) ``repeat`` times, interleaved:
    the plan's order in odd rounds, reversed in even ones, so the entries compared with each other
    (adjacent in the plan) run back to back, each first in half the rounds, and share the
    machine's state of the moment (the disk's write-back, here, varies by seconds from minute to
    minute).  ``after(key)`` runs untimed after each run; each run starts after a ``sync`` and
    ``settle`` seconds of rest (a file system mounted with ``discard`` trims what the last run
    freed after the sync returns).  Returns the summaries (with the peak RSS) and each key's
    stdouts."""
    samples = {k: [] for k in plan}
    cpu = {k: [] for k in plan}
    rss = {k: [] for k in plan}
    stdouts = {k: [] for k in plan}
    order = list(plan)
    for r in range(repeat):
        for key in (order if r % 2 == 0 else order[::-1]):
            setup, argv = plan[key]
            setup()
            os.sync()          # untimed: nobody starts behind another run's dirty pages
            time.sleep(settle)
            wall, cpu_s, rss_kib, stdout = measure(argv, env)
            samples[key].append(wall)
            cpu[key].append(cpu_s)
            rss[key].append(rss_kib)
            stdouts[key].append(stdout)
            if after is not None:
                after(key)
        print(f"round {r + 1}/{repeat}: " +
              ", ".join(f"{k} {samples[k][-1]:.3f}s" for k in samples), file=sys.stderr)
    summary = {k: dict(summarise(v, cpu[k]), peak_rss_kib=max(rss[k], key=lambda x: x or 0))
               for k, v in samples.items()}
    return summary, stdouts


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--workdir", default=os.path.join(HERE, "work"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--no-write", action="store_true", help="do not write results files")


def start(ap: argparse.ArgumentParser, argv) -> tuple:
    """Parse the arguments (``--size`` among them), make the work directory and bench_read's raw
    file of that size: ``(args, size, workdir, env, load_before, raw)``."""
    add_common_args(ap)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    load_before = os.getloadavg()
    raw, _, _ = prepare(workdir, size)
    return args, size, workdir, _env(workdir), load_before, raw


def save_results(doc: dict, out_dir: str, name: str, title: str, docstring: str) -> None:
    """``<out_dir>/<name>.json`` (everything) and ``<name>.md`` (the report)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(doc, f, indent=2)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(render_md(doc, title, docstring))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="raw source / image size, default 1G")
    ap.add_argument("--writes", type=int, default=262144, help="sequential 4 KiB writes")
    ap.add_argument("--snap-writes", type=int, default=20000, help="writes over the snapshots")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds of rest after the sync before each run, default 2")
    args, size, workdir, env, load_before, raw = start(ap, argv)
    py = sys.executable
    warm(raw)
    snap_base = snapshot_image(workdir)
    out = {k: os.path.join(workdir, f"w-{k}.qcow2") for k in
           ("ours-convert", "qemu-convert", "ours-seq", "qemu-seq", "snap")}

    def convert_ours():
        return [py, "-m", "qcow2", "convert", "-O", "qcow2", raw, out["ours-convert"]]

    def convert_qemu():
        return ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out["qemu-convert"]]

    def snap_qemu(mode):
        return ["qemu-img", "bench", "--image-opts", "-w", "-c", str(args.snap_writes), "-s",
                "4096", "-d", "1",
                f"driver=qcow2,overlap-check={mode},file.filename={out['snap']}"]

    # key -> (setup before the run (untimed), command)
    plan = {
        "ours-convert": (lambda: None, convert_ours),
        "qemu-convert": (lambda: None, convert_qemu),
        "ours-seq-write": (lambda: fresh_image(out["ours-seq"], 1 << 30),
                           lambda: [py, "-c", WRITE_SCRIPT, out["ours-seq"], str(args.writes),
                                    "4096", "cached"]),
        "qemu-seq-write": (lambda: fresh_image(out["qemu-seq"], 1 << 30),
                           lambda: ["qemu-img", "bench", "-f", "qcow2", "-w", "-c",
                                    str(args.writes), "-s", "4096", "-d", "1", out["qemu-seq"]]),
        "ours-snap-all": (lambda: copy_image(snap_base, out["snap"]),
                          lambda: [py, "-c", WRITE_SCRIPT, out["snap"], str(args.snap_writes),
                                   "4096", "all"]),
        "ours-snap-none": (lambda: copy_image(snap_base, out["snap"]),
                           lambda: [py, "-c", WRITE_SCRIPT, out["snap"], str(args.snap_writes),
                                    "4096", "none"]),
        "qemu-snap-all": (lambda: copy_image(snap_base, out["snap"]), lambda: snap_qemu("all")),
        "qemu-snap-none": (lambda: copy_image(snap_base, out["snap"]), lambda: snap_qemu("none")),
    }
    notes = []
    # untimed correctness pass: both converts, compared; our seq-write and snap images checked
    print("checking outputs ...", file=sys.stderr)
    for key in ("ours-convert", "qemu-convert"):
        measure(plan[key][1](), env)
    checks = {
        "ours-convert == qemu-convert (qemu-img compare)": subprocess.run(
            ["qemu-img", "compare", "-q", out["ours-convert"], out["qemu-convert"]]).returncode == 0,
        "ours-convert == raw source (qemu-img compare)": subprocess.run(
            ["qemu-img", "compare", "-q", "-F", "raw", out["ours-convert"], raw]).returncode == 0,
    }
    for key in ("ours-seq-write", "ours-snap-all"):
        plan[key][0]()
        measure(plan[key][1](), env)
        target = out["ours-seq"] if key == "ours-seq-write" else out["snap"]
        checks[f"{key}: qemu-img check clean"] = subprocess.run(
            ["qemu-img", "check", "-q", target]).returncode == 0
    for k, v in checks.items():
        print(f"  {k}: {'yes' if v else 'NO'}", file=sys.stderr)
        if not v:
            notes.append(f"OUTPUT PROBLEM: {k}")

    def remove_converted(key):
        for path in (out["ours-convert"], out["qemu-convert"]):
            if key.endswith("convert") and os.path.exists(path):
                os.unlink(path)

    summary, stdouts = run_rounds({k: (setup, command()) for k, (setup, command) in plan.items()},
                                  args.repeat, env, remove_converted, args.settle)
    for key in ("ours-seq-write", "ours-snap-all", "ours-snap-none"):   # loop + close, in process
        summary[key + "-inproc"] = summarise([sum(map(float, text.split()))
                                              for text in stdouts[key]])
    ratios = {}

    def ratio(name, a, b, target):
        ratios[name] = {"best": summary[a]["best_s"] / summary[b]["best_s"],
                        "median": summary[a]["median_s"] / summary[b]["median_s"],
                        "target": target}

    ratio("ours-convert / qemu-convert", "ours-convert", "qemu-convert", 1.0)
    ratio("ours-seq-write / qemu-seq-write", "ours-seq-write", "qemu-seq-write", 1.0)
    ratio("ours-seq-write-inproc / qemu-seq-write", "ours-seq-write-inproc", "qemu-seq-write",
          1.0)
    ratio("ours-snap-all / ours-snap-none", "ours-snap-all", "ours-snap-none", 1.03)
    ratio("ours-snap-all-inproc / ours-snap-none-inproc", "ours-snap-all-inproc",
          "ours-snap-none-inproc", 1.03)
    ratio("qemu-snap-all / qemu-snap-none (QEMU's own cost)", "qemu-snap-all", "qemu-snap-none",
          None)
    ratio("ours-snap-all / qemu-snap-all", "ours-snap-all", "qemu-snap-all", None)
    for name, v in ratios.items():
        print(f"{name}: best {v['best']:.2f}x, median {v['median']:.2f}x", file=sys.stderr)
    load_after = os.getloadavg()
    notes.append(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, "
                 f"on {os.cpu_count()} CPUs")
    doc = {"machine": machine_info(workdir), "repeat": args.repeat, "size": size,
           "writes": args.writes, "snap_writes": args.snap_writes, "checks": checks,
           "summary": summary, "ratios": ratios, "notes": notes}
    if not args.no_write:
        save_results(doc, args.out, "write", "Write benchmark (bench/bench_write.py)", __doc__)
    for path in out.values():
        if os.path.exists(path):
            os.unlink(path)
    return 0


def render_md(doc: dict, title: str, docstring: str) -> str:
    """Markdown report shared by the write and check benchmarks: machine line, what was measured
    (the script's docstring), the timings table (with peak RSS), the ratios and the notes."""
    m = doc["machine"]
    lines = [f"# {title}", "",
             f"{m['date']} · {m['cpu']} · {m['nproc']} CPUs · Python {m['python']} · "
             f"{m['qemu_img']} · filesystem {m['filesystem']} · {doc['repeat']} interleaved "
             "rounds, every command a fresh process", "",
             "| measure | best (s) | median (s) | CPU best (s) | peak RSS (MiB) | runs |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, s in doc["summary"].items():
        cpu_text = f"{s['cpu_best_s']:.3f}" if "cpu_best_s" in s else ""
        rss_text = f"{s['peak_rss_kib'] / 1024:.1f}" if s.get("peak_rss_kib") else ""
        lines.append(f"| {key} | {s['best_s']:.3f} | {s['median_s']:.3f} | {cpu_text} | "
                     f"{rss_text} | {s['n']} |")
    lines += ["", "| ratio | best | median | target |", "|---|---:|---:|---:|"]
    for name, r in doc["ratios"].items():
        target = f"<= {r['target']:.2f}x" if r.get("target") else ""
        lines.append(f"| {name} | {r['best']:.2f}x | {r['median']:.2f}x | {target} |")
    lines += ["", "Checks: " + ", ".join(f"{k}: {'yes' if v else 'NO'}"
                                         for k, v in doc["checks"].items()), ""]
    lines += [f"- {n}" for n in doc["notes"]]
    lines += ["", "## What is measured", "", "```", docstring.strip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
