#!/usr/bin/env python3
"""Where a short `kmx run` spends its time: a phase breakdown of streaming merges.

    python bench/startup.py sdxl-r-n4-ws sdxl-r-n2-ad      # cases bench/run.py wrote

For each case (its CACHE/runs/CASE/merge.kmx must exist: run bench/run.py on it first), runs
the CLI's run path in a fresh process, inputs warmed as bench/run.py warms them, with
timestamps at each phase boundary (wall and this process's CPU seconds):

    imports    Python start to the CLI imported (before `kmx run` does anything)
    compile    check, lower, optimize, read headers, plan (torch-free); with the overlap,
               torch loads on a thread meanwhile
    runtime    import of the runtime (torch) once compiling is done: what the overlap left
    open       execute() up to the first key started: output layout, partial files created
    first key  the first key finished
    stream     the first to the last key finished
    commit     the last key to execute() returned: hashes, fsync, rename
    exit       execute() returned to the process gone (the summary printed, then os._exit
               after a run that loaded torch, or the interpreter's shutdown)

Prints one line per case and writes CACHE/startup.json. Run it several times on a loaded
machine: CPU seconds are steadier than wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PHASES = ("imports", "compile", "runtime", "open", "first key", "stream", "commit", "exit")


def child(recipe: str, out: str) -> None:
    """In a fresh process: run `kmx run RECIPE --force -q` through the program's own path
    (karmixlang.__main__, its exit included), with api.execute wrapped to timestamp the
    phases."""
    marks = [("start", time.time(), time.process_time())]

    def mark(name):
        marks.append((name, time.time(), time.process_time()))

    from karmixlang import api, cli
    from karmixlang.__main__ import main as kmx_main
    mark("imports")
    compile_ = cli._compile
    execute = api.execute

    def timed_compile(args):
        compiled = compile_(args)
        mark("compile")
        return compiled

    class Progress:
        def start(self, *a):
            mark("open")

        def advance(self, keys, nbytes):
            if not any(m[0] == "first key" for m in marks):
                mark("first key")
            self.last = (time.time(), time.process_time())

        def finish(self):
            marks.append(("stream", *self.last))

    def timed_execute(compiled, progress=None, **options):
        import karmixlang.runtime.executor  # noqa: F401  what the overlap has not loaded yet
        mark("runtime")
        result = execute(compiled, Progress(), **options)
        mark("commit")
        return result

    def dump(rc):
        mark("returned")
        with open(out, "w") as f:
            json.dump({"rc": rc, "marks": marks}, f)

    def timed_exit(code):  # kmx ends a run that loaded torch with os._exit: time it so
        dump(code)
        real_exit(code)

    real_exit, os._exit = os._exit, timed_exit
    cli._compile, api.execute = timed_compile, timed_execute
    sys.argv = ["kmx", "run", recipe, "--force", "-q"]
    dump(kmx_main())


def breakdown(marks: list, exited: float, cpu_total: float) -> dict:
    """Seconds per phase, wall and CPU, from the child's marks (first = process start)."""
    by = {name: (w, c) for name, w, c in marks}
    order = ["start", "imports", "compile", "runtime", "open", "first key", "stream", "commit"]
    rows = {}
    for a, b in zip(order, order[1:]):
        rows[b] = (by[b][0] - by[a][0], by[b][1] - by[a][1])
    rows["exit"] = (exited - by["commit"][0], cpu_total - by["returned"][1])
    return rows


def run_case(cache: Path, case: str) -> dict:
    import run as bench_run

    folder = cache / "runs" / case
    recipe = folder / "merge.kmx"
    if not recipe.exists():
        raise SystemExit(f"{recipe} is missing: run bench/run.py on {case} first")
    inputs = [Path(line.strip().strip('",').split('"')[-1]) for line in recipe.read_text()
              .splitlines() if ".safetensors" in line and "save" not in line]
    for old in (folder / "kmx").glob("*.safetensors"):  # a run would reuse it, not merge
        old.unlink()
    bench_run.warm(inputs)
    os.sync()
    out = folder / "startup-marks.json"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(recipe), str(out)],
                            stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(proc.pid, 0)
    exited = time.time()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{case}: kmx run failed")
    doc = json.loads(out.read_text())
    doc["marks"][0] = ["start", t0, 0.0]  # the process's start, not the interpreter's
    rows = breakdown(doc["marks"], exited, ru.ru_utime + ru.ru_stime)
    return {"case": case, "wall_s": exited - t0, "cpu_s": ru.ru_utime + ru.ru_stime,
            "rss_bytes": ru.ru_maxrss * 1024, "phases": rows,
            "load": os.getloadavg()[0]}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:4])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kmx-bench"))
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    results = []
    for _ in range(a.repeat):
        for case in a.cases:
            r = run_case(a.cache, case)
            results.append(r)
            cells = "  ".join(f"{p} {w:.2f}/{c:.2f}" for p, (w, c) in r["phases"].items())
            print(f"{case}: wall {r['wall_s']:.2f} s cpu {r['cpu_s']:.2f} s "
                  f"(load {r['load']:.1f})  [wall/cpu] {cells}", flush=True)
    (a.cache / "startup.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
