#!/usr/bin/env python3
"""Benchmark of the overlap range map: Cython map vs pure-Python twin vs a naive linear list.

    python3 bench/bench_overlap.py [--quick] [--sizes 1000,10000] [--out bench/results]

Layout ("qemu-512"): the metadata qemu-img lays out with 512-byte clusters — an active L2 table
every 65 clusters and a refcount block every 256 (plus header, refcount table and L1 at the
start), each an isolated single-cluster run, entered in ascending order. For each size
(number of stored runs: 10^3 .. 10^7) and implementation it measures

- add throughput: runs/s while building the map (ascending order);
- check latency: ns per ``check(offset, 512)`` call at random cluster offsets in the layout's
  span, called from Python; timed with ``time.perf_counter_ns`` over batches of calls, the batch
  mean is one sample, median and p99 over samples. The Python loop and call overhead is included;
  the cost of an empty loop of the same shape is reported as ``loop_ns``;
- remove throughput: runs/s removing a random sample of the stored runs (exact range and mask);
- memory_used in bytes per run and per metadata cluster (the map's own accounting; for the naive
  list an estimate of its Python objects via sys.getsizeof).

The naive map is the approach QEMU used before it had an overlap map with a range structure: a
plain Python list of (start, end, mask) scanned linearly for every check. It is implemented here.
Implementations whose next size would take too long (projected > --max-seconds) stop with a note.

Writes bench/results/overlap.json, overlap.md and overlap.svg (a hand-written log-log plot of
check latency and add throughput vs runs). Nothing is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

L2, REFBLOCK = 1 << 2, 1 << 4
CS = 512


# ---------------------------------------------------------------------------------------------
# layouts


def qemu512(nb_runs: int):
    """Yield (cluster_index, mask) ascending for the first ``nb_runs`` metadata clusters."""
    yield 0, 1 << 0   # header
    yield 1, 1 << 3   # refcount table
    yield 2, 1 << 1   # L1
    produced = 3
    l2, rb = 3, 5
    while produced < nb_runs:
        if l2 < rb:
            yield l2, L2
            l2 += 65
        elif rb < l2:
            yield rb, REFBLOCK
            rb += 256
        else:
            yield l2, L2 | REFBLOCK
            l2 += 65
            rb += 256
        produced += 1


def qemu512_span(nb_runs: int) -> int:
    """Clusters spanned by the first nb_runs metadata clusters (approximately, generous)."""
    return int(nb_runs / (1 / 65 + 1 / 256)) + 300


# ---------------------------------------------------------------------------------------------
# the naive QEMU-style list


class NaiveListMap:
    """A list of (start, end, mask) byte ranges, scanned linearly; no merging, no budget."""

    def __init__(self, cluster_size):
        self.cs = cluster_size
        self.items: list[tuple[int, int, int]] = []

    def add(self, offset, length, types):
        cs = self.cs
        self.items.append((offset // cs * cs, -(-(offset + length) // cs) * cs, types))
        return True

    def check(self, offset, length, ignore=0):
        end = offset + length
        out = 0
        for s, e, m in self.items:
            if s < end and offset < e:
                out |= m
        return out & ~ignore

    def remove(self, offset, length, types):
        cs = self.cs
        start, end = offset // cs * cs, -(-(offset + length) // cs) * cs
        new = []
        for s, e, m in self.items:
            if s < end and start < e and m & types:
                if s < start:
                    new.append((s, start, m))
                if m & ~types:
                    new.append((max(s, start), min(e, end), m & ~types))
                if end < e:
                    new.append((end, e, m))
            else:
                new.append((s, e, m))
        self.items = new
        return True

    @property
    def memory_used(self):
        n = len(self.items)
        if not n:
            return sys.getsizeof(self.items)
        s, e, m = self.items[-1]
        per = sys.getsizeof(self.items[-1]) + sys.getsizeof(s) + sys.getsizeof(e) + 8
        return sys.getsizeof(self.items) + n * per

    def __len__(self):
        return len(self.items)


# ---------------------------------------------------------------------------------------------
# measurements


def build(cls, nb_runs):
    m = cls(CS)
    add = m.add
    gc.disable()
    t0 = time.perf_counter_ns()
    for c, mask in qemu512(nb_runs):
        add(c * CS, CS, mask)
    t1 = time.perf_counter_ns()
    gc.enable()
    return m, (t1 - t0) / 1e9


def time_checks(m, span, nb_samples, batch, rnd):
    check = m.check
    samples = []
    loop = []
    queries = [rnd.randrange(span) * CS for _ in range(batch)]
    hits = sum(1 for q in queries if check(q, CS))
    gc.disable()
    for _ in range(nb_samples):
        t0 = time.perf_counter_ns()
        for q in queries:
            check(q, CS)
        t1 = time.perf_counter_ns()
        for q in queries:
            abs(q)
        t2 = time.perf_counter_ns()
        samples.append((t1 - t0) / batch)
        loop.append((t2 - t1) / batch)
    gc.enable()
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(round(0.99 * (len(samples) - 1))))]
    return {"median_ns": statistics.median(samples), "p99_ns": p99,
            "loop_ns": statistics.median(loop), "hit_ratio": hits / batch,
            "samples": nb_samples, "batch": batch}


def time_removes(m, nb_runs, nb_removes, rnd):
    chosen = sorted(rnd.sample(range(nb_runs), min(nb_removes, nb_runs)))
    wanted = set(chosen)
    ops = [(c * CS, CS, mask) for i, (c, mask) in enumerate(qemu512(nb_runs)) if i in wanted]
    rnd.shuffle(ops)
    remove = m.remove
    gc.disable()
    t0 = time.perf_counter_ns()
    for off, ln, mask in ops:
        remove(off, ln, mask)
    t1 = time.perf_counter_ns()
    gc.enable()
    return len(ops) / ((t1 - t0) / 1e9), len(ops)


def memory_layouts(cls, n, rnd):
    """bytes/run for the spec's memory targets at n runs (the map's own accounting)."""
    out = {}
    # target 1, random order
    items = list(qemu512(n))
    rnd.shuffle(items)
    m = cls(CS)
    for c, mask in items:
        m.add(c * CS, CS, mask)
    out["qemu512_random_order_bytes_per_metadata_cluster"] = m.memory_used / len(items)
    # target 2: sparse, random lengths up to 2^20 clusters, random 16-bit masks, below 2^56 bytes
    pts = sorted(rnd.sample(range(1 << 47), n + 1))
    runs = []
    for p, q in zip(pts, pts[1:]):
        if q - p >= 2:
            ln = rnd.randrange(1, min(1 << 20, q - p - 1) + 1)
            runs.append((p, ln, rnd.randrange(1, 1 << 16)))
    m = cls(CS)
    for c, ln, mask in runs:
        m.add(c * CS, ln * CS, mask)
    out["sparse_random_bytes_per_run"] = m.memory_used / len(m)
    rnd.shuffle(runs)
    m = cls(CS)
    for c, ln, mask in runs:
        m.add(c * CS, ln * CS, mask)
    out["sparse_random_shuffled_bytes_per_run"] = m.memory_used / len(m)
    # target 3: every cluster metadata, 2 types alternating
    m = cls(CS)
    for c in range(n):
        m.add(c * CS, CS, L2 if c % 2 else REFBLOCK)
    out["dense_alternating_bytes_per_cluster"] = m.memory_used / n
    return out


# ---------------------------------------------------------------------------------------------
# output


def fmt_si(x):
    if x is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.1f}"


def write_svg(path, results, sizes):
    """Two log-log panels by hand: check median latency and add throughput vs runs."""
    import math
    colors = {"cython": "#d62728", "twin": "#1f77b4", "naive": "#7f7f7f"}
    W, H, PW, PH, ML, MT = 960, 420, 360, 280, 80, 50
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>']
    panels = [("check latency, median ns/call (log)", "check_median_ns"),
              ("add throughput, runs/s (log)", "add_runs_per_s")]
    xs = [math.log10(s) for s in sizes]
    xmin, xmax = min(xs), max(xs)
    for pi, (title, key) in enumerate(panels):
        x0 = ML + pi * (PW + 120)
        y0 = MT
        vals = [r[key] for r in results if r.get(key)]
        if not vals:
            continue
        ymin = math.floor(math.log10(min(vals)))
        ymax = math.ceil(math.log10(max(vals)))
        if ymax == ymin:
            ymax += 1

        def px(v, x0=x0):
            return x0 + (math.log10(v) - xmin) / max(xmax - xmin, 1e-9) * PW

        def py(v, ymin=ymin, ymax=ymax):
            return y0 + PH - (math.log10(v) - ymin) / (ymax - ymin) * PH

        parts.append(f'<text x="{x0 + PW / 2}" y="{y0 - 18}" text-anchor="middle" '
                     f'font-weight="bold">{title}</text>')
        parts.append(f'<rect x="{x0}" y="{y0}" width="{PW}" height="{PH}" fill="none" '
                     f'stroke="black"/>')
        for e in range(ymin, ymax + 1):
            y = py(10 ** e)
            parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + PW}" y2="{y:.1f}" '
                         f'stroke="#ddd"/>')
            parts.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">1e{e}</text>')
        for s in sizes:
            x = px(s)
            parts.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + PH}" '
                         f'stroke="#ddd"/>')
            parts.append(f'<text x="{x:.1f}" y="{y0 + PH + 16}" text-anchor="middle">'
                         f'1e{int(round(math.log10(s)))}</text>')
        parts.append(f'<text x="{x0 + PW / 2}" y="{y0 + PH + 34}" text-anchor="middle">'
                     f'runs stored</text>')
        for impl, color in colors.items():
            pts = [(px(r["runs_requested"]), py(r[key])) for r in results
                   if r["impl"] == impl and r.get(key)]
            if not pts:
                continue
            parts.append('<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>'.format(
                color, " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)))
            for x, y in pts:
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
    names = {"cython": "Cython map", "twin": "pure-Python twin", "naive": "naive linear list"}
    for i, (impl, color) in enumerate(colors.items()):
        lx, y = ML + 200 * i, H - 20
        parts.append(f'<line x1="{lx}" y1="{y}" x2="{lx + 24}" y2="{y}" stroke="{color}" '
                     f'stroke-width="2"/>')
        parts.append(f'<text x="{lx + 30}" y="{y + 4}">{names[impl]}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes 10^3..10^5, fewer samples")
    ap.add_argument("--sizes", help="comma-separated run counts (overrides the default)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="skip a size whose projected build time exceeds this "
                         "(default 150, quick 20)")
    args = ap.parse_args(argv)
    sizes = [10**3, 10**4, 10**5] if args.quick else [10**3, 10**4, 10**5, 10**6, 10**7]
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    max_s = args.max_seconds or (20.0 if args.quick else 150.0)
    nb_samples = 500 if args.quick else 2000

    from qcow2 import _overlap_py
    impls = {}
    notes = []
    try:
        from qcow2 import _overlap
        impls["cython"] = _overlap.RangeMap
    except ImportError as exc:
        notes.append(f"C extension missing ({exc}); build it with "
                     "`python3 setup.py build_ext --inplace`.")
    impls["twin"] = _overlap_py.RangeMap
    impls["naive"] = NaiveListMap
    # The naive list's check is O(n) in Python: past 10^5 runs one check costs milliseconds.
    caps = {"cython": None, "twin": 10**6, "naive": 10**5}

    load_start = os.getloadavg()
    results = []
    stopped = {}
    rnd_master = random.Random(20240601)
    for impl, cls in impls.items():
        last_rate = None
        for n in sizes:
            if caps[impl] and n > caps[impl]:
                stopped.setdefault(impl, f"stopped after {caps[impl]:.0e} runs (fixed cap: too "
                                         "slow beyond)")
                continue
            if impl != "cython" and last_rate and n / last_rate > max_s:
                stopped.setdefault(impl, f"stopped before {n:.0e} runs: projected build "
                                         f"{n / last_rate:.0f}s > {max_s:.0f}s")
                continue
            rnd = random.Random(rnd_master.random())
            m, build_s = build(cls, n)
            last_rate = n / build_s
            nb_meta = n
            span = qemu512_span(n)
            # batch so that one sample is >= ~1 ms of work for slow implementations
            batch = 100 if impl != "naive" else max(2, min(100, 2_000_000 // (n * 20)))
            samples = nb_samples if impl != "naive" else 20
            chk = time_checks(m, span, samples, batch, rnd)
            used = m.memory_used
            nb_stored = len(m)
            rm_n = {"cython": 10**5, "twin": 2 * 10**4, "naive": 100}[impl]
            rm_rate, rm_done = time_removes(m, n, rm_n, rnd)
            row = {
                "impl": impl, "runs_requested": n, "runs_stored": nb_stored,
                "metadata_clusters": nb_meta, "build_s": round(build_s, 3),
                "add_runs_per_s": round(last_rate), "check_median_ns": round(chk["median_ns"], 1),
                "check_p99_ns": round(chk["p99_ns"], 1), "check_loop_ns": round(chk["loop_ns"], 1),
                "check_hit_ratio": round(chk["hit_ratio"], 4),
                "check_samples": chk["samples"], "check_batch": chk["batch"],
                "remove_runs_per_s": round(rm_rate), "removes_timed": rm_done,
                "memory_used": used, "bytes_per_run": round(used / nb_stored, 3),
                "bytes_per_metadata_cluster": round(used / nb_meta, 3),
                "memory_note": "estimate of Python objects (sys.getsizeof)" if impl == "naive"
                else "map's own accounting (memory_used)",
            }
            results.append(row)
            print(f"{impl:7s} {n:>9,d} runs: add {fmt_si(row['add_runs_per_s'])}/s  "
                  f"check median {row['check_median_ns']:.0f} ns p99 {row['check_p99_ns']:.0f} ns "
                  f" remove {fmt_si(row['remove_runs_per_s'])}/s  "
                  f"{row['bytes_per_run']:.2f} B/run", flush=True)
            del m
            gc.collect()

    ratios = []
    by = {(r["impl"], r["runs_requested"]): r for r in results}
    for n in sizes:
        c, t = by.get(("cython", n)), by.get(("twin", n))
        if c and t:
            ratios.append({"runs": n,
                           "check_speedup": round(t["check_median_ns"] / c["check_median_ns"], 1),
                           "add_speedup": round(c["add_runs_per_s"] / t["add_runs_per_s"], 1),
                           "remove_speedup": round(c["remove_runs_per_s"]
                                                   / t["remove_runs_per_s"], 1)})

    targets = {}
    if "cython" in impls:
        tn = 10**4 if args.quick else 10**5
        targets = {"runs": tn, **{k: round(v, 3) for k, v in
                                  memory_layouts(impls["cython"], tn, random.Random(7)).items()}}

    env = {"engine_sha256": _engine_digest(), "python": platform.python_version(),
           "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "processor": _cpu_name(), "quick": args.quick,
           "loadavg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)]}
    try:
        import Cython
        env["cython"] = Cython.__version__
    except ImportError:
        pass
    for impl, why in stopped.items():
        notes.append(f"{impl}: {why}")
    notes.append("check: one sample = mean ns/call over a batch of 100 calls (naive: fewer); "
                 "median and p99 over the samples. The machine is shared (2 cores, other jobs "
                 "running), so p99 includes scheduler noise.")
    notes.append("check latency includes the Python for-loop and method-call overhead "
                 "(check_loop_ns is an empty loop of the same shape, abs(q) per element).")
    notes.append("naive: memory is an estimate of its Python objects (sys.getsizeof), not a "
                 "budgeted accounting; it never merges runs.")
    notes.append("check queries are check(offset, 512) at uniformly random clusters of the "
                 "layout's span (hit_ratio = fraction landing on metadata).")

    os.makedirs(args.out, exist_ok=True)
    doc = {"layout": "qemu-512: isolated single-cluster runs, active L2 every 65 clusters, "
                     "refcount block every 256, ascending", "environment": env,
           "results": results, "ratios_cython_vs_twin": ratios, "memory_targets": targets,
           "notes": notes}
    with open(os.path.join(args.out, "overlap.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    md = _markdown(doc)
    with open(os.path.join(args.out, "overlap.md"), "w") as f:
        f.write(md)
    write_svg(os.path.join(args.out, "overlap.svg"), results, sizes)
    print()
    print(md)


def _engine_digest():
    """Short digest of the engine sources measured (qcow2/_overlap.pyx + _overlap_py.py)."""
    import hashlib
    h = hashlib.sha256()
    for name in ("_overlap.pyx", "_overlap_py.py"):
        try:
            with open(os.path.join(os.path.dirname(HERE), "qcow2", name), "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()[:12]


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _markdown(doc):
    lines = ["# Overlap range map benchmark", "",
             f"Layout: {doc['layout']}. Generated by `python3 bench/bench_overlap.py"
             f"{' --quick' if doc['environment']['quick'] else ''}`.", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in doc["environment"].items()), "",
             "| impl | runs | add runs/s | check median ns | check p99 ns | remove runs/s "
             "| bytes/run | bytes/metadata cluster |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        lines.append(f"| {r['impl']} | {r['runs_requested']:,} | {fmt_si(r['add_runs_per_s'])} "
                     f"| {r['check_median_ns']:.0f} | {r['check_p99_ns']:.0f} "
                     f"| {fmt_si(r['remove_runs_per_s'])} | {r['bytes_per_run']:.2f} "
                     f"| {r['bytes_per_metadata_cluster']:.2f} |")
    if doc["ratios_cython_vs_twin"]:
        lines += ["", "Cython vs pure-Python twin (× faster):", "",
                  "| runs | check | add | remove |", "|---:|---:|---:|---:|"]
        for r in doc["ratios_cython_vs_twin"]:
            lines.append(f"| {r['runs']:,} | {r['check_speedup']} | {r['add_speedup']} "
                         f"| {r['remove_speedup']} |")
    if doc["memory_targets"]:
        t = doc["memory_targets"]
        lines += ["", f"Memory targets (Cython map, {t['runs']:,} runs, memory_used incl. all "
                      "overheads):", ""]
        for k, v in t.items():
            if k != "runs":
                lines.append(f"- {k}: {v}")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
