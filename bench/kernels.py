"""Micro-benchmark of the sparse kernels (karmixlang/runtime/kernels/sparse.py).

Times trim, breadcrumbs, dare, della (each over every member, one after another), ties,
ties_merge and elect on seeded deltas of realistic sizes, with one intra-op thread and glibc
tuned as `kmx run` does (runtime/executor.py). Per kernel it prints the best and median wall
time of --reps runs and the peak growth of resident memory (median of three more runs;
inputs excluded, the kernel's result included). The deltas are differences of float16 weights, as
in bench/data.py, so equal magnitudes (ties at the trim threshold) are as common as in real
checkpoints.

    python bench/kernels.py                                  # all cases and kernels
    python bench/kernels.py --json /tmp/after.json
    python bench/kernels.py --module /tmp/sparse_old.py --json /tmp/before.json
    python bench/kernels.py --check /tmp/before.json         # same bits as those results?

Each kernel's results are hashed (SHA-256 of their bytes): --check compares the hashes with
an earlier --json, so that an optimisation can be shown not to change a single bit, and
--module runs another copy of kernels/sparse.py (an older version, say) in place of the
package's, for a before/after in one session. Peak memory is VmHWM, reset through
/proc/self/clear_refs (Linux) after malloc_trim, so that memory the heap kept from earlier
runs does not hide this run's allocations (tracemalloc does not see torch's). The timed runs
do not trim: like the runtime, they reuse what the heap keeps.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from karmixlang.runtime.kernels import sparse as ops_sparse  # noqa: E402

# name: (shape of the key, members)
CASES = {
    "1280x1280 N=4": ((1280, 1280), 4),
    "1280x1280 N=16": ((1280, 1280), 16),
    "10240x1280 N=4": ((10240, 1280), 4),
}
KERNELS = ("trim", "breadcrumbs", "dare", "della", "ties", "ties_merge", "elect")
SEED = 7
MIB = 1 << 20
_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD, as runtime/executor.py sets it
_LIBC.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


def load_module(path: str):
    """Another copy of kernels/sparse.py, imported as a module of karmixlang.runtime.kernels."""
    spec = importlib.util.spec_from_file_location("karmixlang.runtime.kernels.sparse_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deltas(shape: tuple[int, ...], n: int) -> list[torch.Tensor]:
    """n fine-tunes of one float16 base minus the base, in fp32: a shared direction (3 % of
    the weights' scale) plus each member's own change (1 %), as bench/data.py builds them."""
    gen = np.random.default_rng(SEED)
    scale = 0.02
    base = (gen.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)
    shared = gen.standard_normal(shape, dtype=np.float32) * (0.03 * scale)
    out = []
    for _ in range(n):
        own = gen.standard_normal(shape, dtype=np.float32) * (0.01 * scale)
        tuned = (base.astype(np.float32) + shared + own).astype(np.float16)
        out.append(torch.from_numpy(tuned.astype(np.float32) - base.astype(np.float32)))
    return out


Run = Callable[[], Iterator[list[torch.Tensor]]]


def kernels(ops, xs: list[torch.Tensor], key: str) -> dict[str, Run]:
    """name -> a run of that kernel over the cluster, yielding its results one call at a time
    (the caller drops each before the next, as a merge filters one member after another)."""
    ws = [1.0 + 0.25 * i for i in range(len(xs))]
    trimmed = [ops.trim(x, density=0.2) for x in xs]  # what TIES elects over

    def each(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Run:
        return lambda: ([fn(x, i)] for i, x in enumerate(xs))

    def once(fn: Callable[[], torch.Tensor | list[torch.Tensor]]) -> Run:
        def run():
            result = fn()
            yield result if isinstance(result, list) else [result]

        return run

    return {
        "trim": each(lambda x, i: ops.trim(x, density=0.2)),
        "breadcrumbs": each(lambda x, i: ops.breadcrumbs(x, density=0.2, gamma=0.01)),
        "dare": each(lambda x, i: ops.dare(x, p=0.9, seed=1, key=key, member=i)),
        "della": each(lambda x, i: ops.della(x, p=0.5, eps=0.1, seed=1, key=key, member=i)),
        "ties": once(lambda: ops.ties(xs, ws, density=0.2)),
        "ties_merge": once(lambda: ops.ties_merge(trimmed, ws)),
        "elect": once(lambda: ops.elect(trimmed, ws)),
    }


def digest(run: Run) -> str:
    h = hashlib.sha256()
    for results in run():
        for t in results:
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_all(run: Run) -> int:
    """Runs the kernel; the size in bytes of its largest single call's results."""
    out_bytes = 0
    for results in run():
        out_bytes = max(out_bytes, sum(t.numel() * t.element_size() for t in results))
        del results
    return out_bytes


def seconds(run: Run) -> float:
    t0 = time.perf_counter()
    run_all(run)
    return time.perf_counter() - t0


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_growth(run: Run) -> tuple[int, int]:
    """(peak growth of resident memory during a run, its largest call's results), in bytes."""
    gc.collect()
    _LIBC.malloc_trim(0)
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    out_bytes = run_all(run)
    return (status_kib("VmHWM") - before) * 1024, out_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="timed runs per kernel (default 5)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    ap.add_argument("--module", help="benchmark this copy of kernels/sparse.py instead")
    ap.add_argument("--json", help="write the results (times, memory, hashes) here")
    ap.add_argument("--check", help="compare the hashes with those of an earlier --json")
    args = ap.parse_args()

    torch.set_num_threads(1)  # as the runtime does: one key per core
    ops = load_module(args.module) if args.module else ops_sparse
    expected = {}
    if args.check:
        with open(args.check) as f:
            expected = {(r["case"], r["kernel"]): r["sha256"] for r in json.load(f)}
    rows, mismatches = [], []
    print(f"{'case':<16} {'kernel':<12} {'best ms':>9} {'median ms':>10} {'peak MiB':>9} "
          f"{'out MiB':>8}" + ("  same bits" if expected else ""))
    for case in args.cases:
        shape, n = CASES[case]
        table = kernels(ops, deltas(shape, n), key=f"model.{case}.weight")
        for name in args.kernels:
            run = table[name]
            sha = digest(run)  # also the warm-up
            times = [seconds(run) for _ in range(args.reps)]
            # Heap reuse can hide growth and an odd run shows more: the median of three.
            peaks, out_bytes = zip(*(peak_growth(run) for _ in range(3)))
            peak, out_bytes = int(np.median(peaks)), out_bytes[0]
            row = {
                "case": case,
                "kernel": name,
                "best_s": min(times),
                "median_s": float(np.median(times)),
                "peak_bytes": peak,
                "out_bytes": out_bytes,
                "sha256": sha,
            }
            rows.append(row)
            line = (f"{case:<16} {name:<12} {row['best_s'] * 1e3:>9.1f} "
                    f"{row['median_s'] * 1e3:>10.1f} {peak / MIB:>9.1f} {out_bytes / MIB:>8.1f}")
            if expected:
                want = expected.get((case, name))
                same = "n/a" if want is None else "yes" if want == sha else "NO"
                if same == "NO":
                    mismatches.append((case, name))
                line += f"  {same}"
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if mismatches:
        sys.exit(f"results differ from {args.check}: {mismatches}")


if __name__ == "__main__":
    main()
