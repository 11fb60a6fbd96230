#!/usr/bin/env python3
"""DGMLA at the scale of the merge the project is about (issue #18): one practitioner merged 257
SDXL fine-tunes with DGMLA in sd-mecha, in 41 hours and up to 3.5 TB of RAM. This disk holds
a handful of full-size SDXL checkpoints (6.9 GB each), not 257, so the cost is measured in two
places and fitted:

- full size (`sdxl`, 3.47 B parameters) at small N: the cost per model of reading, filtering
  and electing full-size keys, from the disk (`--cold` evicts the inputs from the page cache
  before each run, as a 1.8 TB pool would be);
- the same SDXL layout at 1/16 of every width (`sdxl-w16`, 13.6 M parameters, 27 MB a file)
  at N up to 257: what grows faster than N (the Gram matrix of the geometric median is N²
  per element), and the per-key, per-model overhead, on a real 257-model run.

    python bench/dgmla_scale.py run --suite sdxl-w16 --n 32,64,128,257
    python bench/dgmla_scale.py run --suite sdxl --n 1,2,3,4 --cold --memory-limit 16GB
    python bench/dgmla_scale.py disk       # cold read and fsynced write speed of this disk
    python bench/dgmla_scale.py gram       # the Gram matrix of 257 members alone, per element
    python bench/dgmla_scale.py plan --memory-limit 14GB   # kmx plan of 257 full-size inputs
    python bench/dgmla_scale.py fit        # the fit and the 257-model projection
    python bench/dgmla_scale.py fit --full-commits 30cf45c   # full-size runs of one commit

Each run is `kmx run` of `std.dgmla(pool, b, seed)` (one base; `--two-bases` runs the
"choose a side" recipe of examples/astolfokarmix.kmx: two bases, a balanced pool, a save per
base) in a fresh process: wall, CPU and peak RSS (bench/run.py's `measure`), appended to
CACHE/dgmla-results.json with the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data  # noqa: E402
from run import SEED, kmx_version, measure, warm  # noqa: E402

TARGET_N = 257
WRITE_TEST_BYTES = 8 << 30  # the write test's size: well past the page cache's dirty limits


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages only; no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def recipe(base: Path, models: list[Path], out: Path, second_base: Path | None) -> str:
    """One base: `std.dgmla(pool, b, seed)`. With a second base, the "choose a side" recipe:
    half the pool counts as fine-tunes of each base (only the cost is measured), balanced,
    a save per base."""
    head = f'import "std/recipes.kmx" as std\n\nparam seed = {SEED}\n\nbase b = "{base}"\n'
    if second_base is None:
        pool = ",\n    ".join(f'"{m}"' for m in models)
        return (head + f"cluster pool = [\n    {pool},\n]\n\n"
                f'save "{out}" = std.dgmla(pool, b, seed) with dtype="fp16"\n')
    half = (len(models) + 1) // 2
    first = ",\n    ".join(f'"{m}"' for m in models[:half])
    second = ",\n    ".join(f'"{m}"' for m in models[half:])
    side_b = out.with_name(out.stem + "-b2.safetensors")
    return (head + f'base b2 = "{second_base}"\n'
            f"cluster xa = [\n    {first},\n]\ncluster xb = [\n    {second},\n]\n"
            "cluster pool = balanced([xa, xb])\n\n"
            f'save "{out}" = std.dgmla(pool, b, seed) with dtype="fp16"\n'
            f'save "{side_b}" = std.dgmla(pool, b2, seed) with dtype="fp16"\n')


def run(args) -> None:
    suite = data.SUITES[args.suite]
    ns = [int(x) for x in args.n.split(",")]
    data.build(suite, args.cache, max(ns))
    folder = args.cache / "dgmla-scale"
    folder.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    for n in ns:
        out = folder / f"{suite.name}-n{n}.safetensors"
        path = folder / "merge.kmx"
        base2 = data.build_second_base(suite, args.cache) if args.two_bases else None
        files = [suite.path(args.cache, i) for i in [None, *range(n)]]
        path.write_text(recipe(files[0], files[1:], out, base2))
        files += [base2] if base2 else []
        evict(files) if args.cold else warm(files)
        for f in folder.glob(f"{suite.name}-n{n}*.safetensors"):
            f.unlink()
        # --no-reuse: an earlier output of the same recipe would otherwise be copied key by key
        cmd = [sys.executable, "-m", "karmixlang", "run", str(path), "--force", "-q", "--no-reuse",
               *(["--memory-limit", args.memory_limit] if args.memory_limit else [])]
        m = measure(cmd, folder / f"{suite.name}-n{n}.log", args.timeout, env)
        rec = {"suite": suite.name, "n": n, "two_bases": args.two_bases, "cold": args.cold,
               "memory_limit": args.memory_limit, "params": data._params(
                   data._layout(suite), suite.scale), "commit": kmx_version(),
               "time": time.strftime("%Y-%m-%d %H:%M:%S"),
               "load_before": os.getloadavg()[0], **m}
        print(json.dumps(rec), flush=True)
        _append(args.cache, rec)
        for f in folder.glob(f"{suite.name}-n{n}*.safetensors"):
            f.unlink()


def plan(args) -> None:
    """The plan of the 257-model merge on full-size SDXL headers (sparse files: real headers,
    data regions that are holes; nothing is written) at the memory limit given: peak memory,
    reads, and the out-of-core keys' temporary files and extra reads, summed over all keys.
    Written to CACHE/dgmla-plan.json for `fit`."""
    from plan_speed import sparse_sdxl

    from karmixlang.api import compile
    from karmixlang.machine import default_threads
    from karmixlang.units import parse_size

    folder = args.cache / "dgmla-plan"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"sdxl-{i:03d}.safetensors" for i in range(TARGET_N + 2)]
    for p in paths:
        if not p.exists():
            sparse_sdxl(p)
    rows = []
    for two_bases in (False, True):
        path = folder / f"dgmla-{'two' if two_bases else 'one'}-base.kmx"
        path.write_text(recipe(paths[0], paths[2:], folder / "out.safetensors",
                               paths[1] if two_bases else None))
        compiled = compile(str(path), threads=default_threads(),
                           memory_limit=parse_size(args.memory_limit))
        totals = compiled.plan.data["totals"]
        chunked = [j for j in compiled.schedule.jobs if j.ooc is not None]
        rows.append({
            "two_bases": two_bases, "memory_limit": args.memory_limit, "n": TARGET_N,
            **{k: totals[k] for k in ("inputs", "keys", "bytes_read", "bytes_written",
                                      "peak_memory_bytes", "peak_memory_key", "threads")},
            "ooc_keys": len(chunked),
            "ooc_spill_write_bytes": sum(j.ooc.spill_bytes for j in chunked),
            "ooc_extra_read_bytes": sum(j.ooc.extra_read_bytes for j in chunked),
            "largest_spill_bytes": max((j.ooc.spill_bytes for j in chunked), default=0)})
        print(json.dumps(rows[-1]), flush=True)
    (args.cache / "dgmla-plan.json").write_text(json.dumps(rows, indent=1) + "\n")


def _fit(rows: list[dict], degree: int) -> np.ndarray:
    """Least-squares polynomial in N (coefficients low to high) of the wall times."""
    n = np.array([r["n"] for r in rows], float)
    t = np.array([r["wall_s"] + r["sync_s"] for r in rows], float)
    return np.linalg.lstsq(np.vander(n, degree + 1, increasing=True), t, rcond=None)[0]


def disk(args) -> None:
    """This disk's throughput as the 257-model run would see it: the full-size inputs read
    cold (evicted from the page cache first), and WRITE_TEST_BYTES written and fsynced.
    Appended to CACHE/dgmla-results.json as a "disk" record."""
    suite = data.SUITES[args.suite]
    files = [suite.path(args.cache, i) for i in [None, *range(args.n)]]
    evict(files)
    read_s = warm(files)
    size = sum(f.stat().st_size for f in files)
    scratch = args.cache / "dgmla-scale" / "disk-test.bin"
    scratch.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(64 << 20)
    blocks = min(size, WRITE_TEST_BYTES) // len(block)
    t0 = time.perf_counter()
    with open(scratch, "wb", buffering=0) as fh:
        for _ in range(blocks):
            fh.write(block)
        os.fsync(fh.fileno())
    write_s = time.perf_counter() - t0
    scratch.unlink()
    rec = {"disk": True, "bytes": size, "read_gbps": size / read_s / 1e9,
           "write_gbps": blocks * len(block) / write_s / 1e9,
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": os.getloadavg()[0]}
    print(json.dumps(rec), flush=True)
    _append(args.cache, rec)


def gram(args) -> None:
    """The geometric median's N² part at N = 257, timed on its own as kmx's key threads run
    it: `--threads` threads (kmx's default), each set up as the runtime sets one up (one
    torch and one BLAS thread) and summing a Gram matrix (runtime/kernels/base.GramSum, fp64
    products of fp32 members, slice by slice) over its share of 257 members of `--elements`
    each, as separate keys would. Seconds per element of one member; appended as a "gram"
    record."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from karmixlang.machine import default_threads
    from karmixlang.runtime.evaluate import prepare_process
    from karmixlang.runtime.kernels.base import GramSum

    prepare_process()
    threads = args.threads or default_threads()
    torch.manual_seed(0)
    members = [torch.randn(args.elements) for _ in range(TARGET_N)]
    share = args.elements // threads

    def key(t: int, length: int = share) -> None:
        acc = GramSum(TARGET_N)
        acc.add([m[t * share: t * share + length] for m in members])
        acc.result()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda t: key(t, 1 << 16), range(threads)))  # warm-up: the allocator
        t0, c0 = time.perf_counter(), time.process_time()
        list(pool.map(key, range(threads)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    elements = share * threads
    rec = {"gram": True, "n": TARGET_N, "elements": elements, "threads": threads,
           "wall_s": wall, "cpu_s": cpu, "s_per_element": wall / elements,
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": os.getloadavg()[0]}
    print(json.dumps(rec), flush=True)
    _append(args.cache, rec)


def _append(cache: Path, rec: dict) -> None:
    log = cache / "dgmla-results.json"
    old = json.loads(log.read_text()) if log.exists() else []
    log.write_text(json.dumps(old + [rec], indent=1) + "\n")


def fit(args) -> None:
    """Wall time at 257 per base's merge = the full-size fit a + b·N (cold: reading,
    filtering, electing, the median, writing) + the Gram matrix at 257 (its measured seconds
    per element × the parameters) + the small-width fit's N² coefficient × 257² (what grows
    as N² per key whatever its size: the Weiszfeld iterations on N×N matrices; it holds that
    width's small Gram too, counted twice: on the safe side) + the extra disk traffic of the
    out-of-core keys at 257 (the plan's temporary files and extra reads, which small N does
    not have) at the measured disk speed."""
    records = json.loads((args.cache / "dgmla-results.json").read_text())
    last = {kind: [r for r in records if r.get(kind)][-1:] for kind in ("disk", "gram")}
    rows = [r for r in records if "suite" in r and r["rc"] == 0 and not r["two_bases"]]
    small = [r for r in rows if r["suite"] == args.small]
    full = [r for r in rows if r["suite"] == args.full and r["cold"] and (
        not args.full_commits or r["commit"] in args.full_commits.split(","))]
    if len({r["n"] for r in small}) < 3 or len({r["n"] for r in full}) < 2 or not all(
            last.values()):
        sys.exit("need runs at >= 3 pool sizes of the small suite, >= 2 cold full-size "
                 "ones, a disk and a gram record")
    a_s, b_s, c_s = _fit(small, 2)
    a_f, b_f = _fit(full, 1)
    io, g = last["disk"][0], last["gram"][0]
    gram_s = g["s_per_element"] * full[0]["params"]
    out = {"small": {"suite": args.small, "fit_s": [a_s, b_s, c_s], "points": _points(small)},
           "full": {"suite": args.full, "fit_s": [a_f, b_f], "points": _points(full)},
           "gram_257_full_s": gram_s, "disk": {k: io[k] for k in ("read_gbps", "write_gbps")},
           "projection": []}
    for p in json.loads((args.cache / "dgmla-plan.json").read_text()):
        bases, n = (2 if p["two_bases"] else 1), p["n"]
        linear = bases * (a_f + b_f * n)
        square = bases * (gram_s + max(c_s, 0.0) * n ** 2)
        ooc = (p["ooc_extra_read_bytes"] / (io["read_gbps"] * 1e9)
               + p["ooc_spill_write_bytes"] / (io["write_gbps"] * 1e9))
        out["projection"].append({
            "bases": bases, "n": n, "memory_limit": p["memory_limit"],
            "hours": (linear + square + ooc) / 3600, "linear_h": linear / 3600,
            "n2_h": square / 3600, "out_of_core_io_h": ooc / 3600,
            "plan_peak_memory_gib": p["peak_memory_bytes"] / 2**30})
    print(json.dumps(out, indent=1))


def _points(rows: list[dict]) -> list[tuple]:
    """(N, wall s, CPU s, peak RSS GiB) of each run."""
    return [(r["n"], round(r["wall_s"], 1), round(r["cpu_s"], 1),
             round(r["rss_bytes"] / 2**30, 2)) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kmx-bench"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--suite", default="sdxl-w16", choices=list(data.SUITES))
    r.add_argument("--n", default="32,64,128,257", help="pool sizes, comma list")
    r.add_argument("--cold", action="store_true", help="evict the inputs from the page cache "
                   "before each run (else they are read once first)")
    r.add_argument("--two-bases", action="store_true")
    r.add_argument("--memory-limit", help="kmx's --memory-limit (default: kmx's)")
    r.add_argument("--timeout", type=float, default=4 * 3600)
    d = sub.add_parser("disk")
    d.add_argument("--suite", default="sdxl", choices=list(data.SUITES))
    d.add_argument("--n", type=int, default=4, help="read the base and this many fine-tunes")
    g = sub.add_parser("gram")
    g.add_argument("--elements", type=int, default=1 << 20)
    g.add_argument("--threads", type=int, help="key threads (default: kmx's)")
    p = sub.add_parser("plan")
    p.add_argument("--memory-limit", default="14GB")
    f = sub.add_parser("fit")
    f.add_argument("--small", default="sdxl-w16")
    f.add_argument("--full", default="sdxl")
    f.add_argument("--full-commits", help="comma list: fit only the full-size runs made at "
                   "these commits (after a change to the per-model cost)")
    args = ap.parse_args()
    {"run": run, "disk": disk, "gram": gram, "plan": plan, "fit": fit}[args.cmd](args)


if __name__ == "__main__":
    main()
