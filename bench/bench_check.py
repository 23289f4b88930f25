#!/usr/bin/env python3
"""Check benchmark: ``qcow2-tool check`` vs ``qemu-img check``, wall time and peak memory.

    python3 bench/bench_check.py [--size 1G] [--repeat 3] [--workdir bench/work]
                                 [--out bench/results]

Two images, built once and cached in the work directory:

  small-clusters  bench_read's seeded 1 GiB raw file (3/4 data) converted by ``qemu-img convert
                  -O qcow2 -o cluster_size=512``: about 1.5 million allocated clusters
  snapshots       bench_write's 1 GiB, 64 KiB-cluster image with 20 internal snapshots

For each: ``python3 -m qcow2 check IMG``, the same with ``--overlap-mem 4M`` (the overlap map
capped; on the small-cluster image it then announces the ranges it cannot cover), and ``qemu-img
check IMG``; fresh processes in interleaved rounds, best and median wall time, CPU time and peak
RSS (GNU time).  ``ours-*-inproc`` is our check alone, timed inside its process (without the
interpreter start, the import and the open that every fresh ``python3 -m qcow2`` pays).  Checked once: our JSON output equals qemu-img's.  Ratios ours / qemu-img for
time (target <= 1.0) and peak memory (target <= 2.0).  Writes bench/results/check.json and
check.md.  Nothing is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_read import machine_info, qemu_img, summarise  # noqa: E402
from bench_write import run_rounds, save_results, snapshot_image, start  # noqa: E402


def small_cluster_image(workdir: str, raw: str, size: int) -> str:
    """The 512-byte-cluster image converted from the raw file (cached)."""
    path = os.path.join(workdir, f"check512-{size}.qcow2")
    if not os.path.exists(path):
        print(f"converting to {path} ...", file=sys.stderr)
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", raw,
                 path + ".tmp", capture=False)
        os.replace(path + ".tmp", path)
    return path


# the check alone, inside the process (no interpreter start, import or open): what the
# algorithm costs, apart from the fixed cost of a Python process
INPROC_SCRIPT = r"""
import sys, time
import qcow2
from qcow2.check import check_image
img = qcow2.open(sys.argv[1], "r", _repair=True, overlap_check="none")
t0 = time.perf_counter()
check_image(img)
print(f"{time.perf_counter() - t0:.6f}")
"""


def check_json(cmd: list[str], env) -> tuple[int, dict | None]:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except ValueError:
        return proc.returncode, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="size of the small-cluster image, default 1G")
    args, size, workdir, env, load_before, raw = start(ap, argv)
    py = sys.executable
    images = {"small-clusters": small_cluster_image(workdir, raw, size),
              "snapshots": snapshot_image(workdir)}
    plan = {}
    for name, img in images.items():
        plan[f"ours-{name}"] = [py, "-m", "qcow2", "check", img]
        plan[f"ours-{name}-4M"] = [py, "-m", "qcow2", "check", "--overlap-mem", "4M",
                                   "--events", os.devnull, img]
        plan[f"qemu-{name}"] = ["qemu-img", "check", img]
        plan[f"ours-{name}-inproc-run"] = [py, "-c", INPROC_SCRIPT, img]
    checks = {}
    notes = []
    print("checking outputs ...", file=sys.stderr)
    for name, img in images.items():
        theirs = check_json(["qemu-img", "check", "--output=json", img], env)
        for extra in ([], ["--overlap-mem", "4M", "--events", os.devnull]):
            ours = check_json([py, "-m", "qcow2", "check", "--output=json", *extra, img], env)
            label = f"{name}{' --overlap-mem 4M' if extra else ''}: JSON and exit code equal"
            checks[label] = ours == theirs
        # how much the capped map could not cover (from the human summary)
        human = subprocess.run([py, "-m", "qcow2", "check", "--overlap-mem", "4M", "--events",
                                os.devnull, img], env=env, capture_output=True, text=True)
        line = [ln for ln in human.stdout.splitlines() if ln.startswith("Not overlap-checked")]
        notes.append(f"{name} with --overlap-mem 4M: " + (line[0] if line else
                                                          "every metadata cluster fitted"))
    for k, v in checks.items():
        print(f"  {k}: {'yes' if v else 'NO'}", file=sys.stderr)
        if not v:
            notes.append(f"OUTPUT MISMATCH: {k}")
    summary, stdouts = run_rounds({k: (lambda: None, argv) for k, argv in plan.items()},
                                  args.repeat, env)
    for name in images:
        summary.pop(f"ours-{name}-inproc-run")
        summary[f"ours-{name}-inproc"] = summarise(
            [float(text) for text in stdouts[f"ours-{name}-inproc-run"]])
    ratios = {}
    for name in images:
        for suffix in ("", "-4M", "-inproc"):
            a, b = summary[f"ours-{name}{suffix}"], summary[f"qemu-{name}"]
            ratios[f"time ours-{name}{suffix} / qemu-{name}"] = {
                "best": a["best_s"] / b["best_s"], "median": a["median_s"] / b["median_s"],
                "target": 1.0}
            if a.get("peak_rss_kib") and b["peak_rss_kib"]:
                peak = a["peak_rss_kib"] / b["peak_rss_kib"]
                ratios[f"peak RSS ours-{name}{suffix} / qemu-{name}"] = {
                    "best": peak, "median": peak, "target": 2.0}
    for name, v in ratios.items():
        print(f"{name}: best {v['best']:.2f}x, median {v['median']:.2f}x", file=sys.stderr)
    load_after = os.getloadavg()
    notes.append("peak RSS: the largest of the runs, measured by GNU time (%M) when installed; "
                 "ours includes the interpreter (python3 -c pass: about 9 MiB)")
    notes.append(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, "
                 f"on {os.cpu_count()} CPUs")
    doc = {"machine": machine_info(workdir), "repeat": args.repeat, "size": size,
           "images": {k: os.path.basename(v) for k, v in images.items()}, "checks": checks,
           "summary": summary, "ratios": ratios, "notes": notes}
    if not args.no_write:
        save_results(doc, args.out, "check", "Check benchmark (bench/bench_check.py)", __doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
