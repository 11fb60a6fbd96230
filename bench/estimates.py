#!/usr/bin/env python3
"""The plan's peak-memory estimate against the measured growth of resident memory, per merge.

    python bench/estimates.py                          # the default cases (below)
    python bench/estimates.py --cases sdxl-r:4:ws,dgmla llm:4:della
    python bench/estimates.py --json est.json

For each case (suite:N:merges, the merges named as in bench/run.py, the TIES-family sweep's
tf-FILTER-VALUE-RULE included) the recipe bench/run.py writes is planned with `kmx plan --json`
(totals.peak_memory_bytes) and run in a fresh process through the API
(RunResult.peak_rss_delta: resident memory sampled every 10 ms, above what the process held
when the run started), so that an earlier run can neither hide growth nor leave memory behind.
That process gets the allocator setting `kmx run` restarts itself with (glibc's small-block
cache off: karmixlang/__main__.py), so it measures what `kmx run` holds.
Issue #18's target: every ratio measured / estimated in [0.5, 1.0] — never under-estimated,
never more than twice over. Inputs come from bench/data.py (built on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import data  # noqa: E402
import run  # noqa: E402

sys.path.insert(0, str(HERE.parent))
from karmixlang.__main__ import allocator_env  # noqa: E402

BASIC = ["ws", "ad", "ties", "dare", "della", "gm", "ms", "dgmla"]
SWEEP = ["tf-trim-0.3-count", "tf-trim-0.7-mass", "tf-ties-0.3-count", "tf-dare-0.9-count",
         "tf-della-0.5-count"]
DEFAULT = [f"sdxl-r:4:{','.join(BASIC + SWEEP)}", f"llm:4:{','.join(BASIC)}"]

_RUN = """
import json, sys
from karmixlang.api import compile
from karmixlang.runtime.executor import RunOptions, execute
r = execute(compile(sys.argv[1]), RunOptions(force=True))
print(json.dumps({"peak_rss_delta": r.peak_rss_delta, "seconds": r.seconds}))
"""


def parse_cases(specs: list[str]) -> list[tuple[str, int, str]]:
    cases = []
    for spec in specs:
        suite, n, merges = spec.split(":")
        for m in merges.split(","):
            if suite not in data.SUITES or m not in run.MERGES:
                raise SystemExit(f"unknown suite or merge in {spec!r}: {suite}, {m}")
            cases.append((suite, int(n), m))
    return cases


def measure(cache: Path, suite: str, n: int, merge: str) -> dict:
    data.build(data.SUITES[suite], cache, n)
    case = run.Case(SimpleNamespace(cache=cache, out_dtype="fp16"), suite, n, merge)
    case.command("kmx", None)  # writes the recipe
    recipe = case.dir / "merge.kmx"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    run_env = allocator_env(env) or env  # as `kmx run` restarts itself
    plan = subprocess.run([sys.executable, "-m", "karmixlang", "plan", "--json", str(recipe)],
                          capture_output=True, text=True, env=env)
    if plan.returncode:
        raise SystemExit(f"kmx plan failed on {recipe}:\n{plan.stdout}{plan.stderr}")
    totals = json.loads(plan.stdout)["totals"]
    done = subprocess.run([sys.executable, "-c", _RUN, str(recipe)], capture_output=True,
                          text=True, env=run_env)
    if done.returncode:
        raise SystemExit(f"run failed on {recipe}:\n{done.stdout}{done.stderr}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    run.clean(case, ["kmx"])
    return {"case": case.name, "suite": suite, "n": n, "merge": merge,
            "estimated": totals["peak_memory_bytes"], "peak_key": totals["peak_memory_key"],
            "threads": totals["threads"], "measured_rss_delta": measured["peak_rss_delta"],
            "ratio": measured["peak_rss_delta"] / max(1, totals["peak_memory_bytes"]),
            "run_s": measured["seconds"], "load": os.getloadavg()[0]}


def table(rows: list[dict]) -> str:
    lines = ["| case | plan estimate | measured growth | measured / estimate | peak key |",
             "|---|---|---|---|---|"]
    for r in rows:
        ok = 0.5 <= r["ratio"] <= 1.0
        ratio = f"{r['ratio']:.2f}" if ok else f"**{r['ratio']:.2f}**"
        lines.append(f"| {r['suite']} N={r['n']} {run.MERGES[r['merge']][0]} ({r['merge']}) "
                     f"| {r['estimated'] / 2**20:.0f} MiB | {r['measured_rss_delta'] / 2**20:.0f}"
                     f" MiB | {ratio} | `{r['peak_key']}` |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kmx-bench"))
    ap.add_argument("--cases", nargs="+", default=DEFAULT, metavar="SUITE:N:MERGES")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    rows = []
    for suite, n, merge in parse_cases(a.cases):
        rows.append(measure(a.cache, suite, n, merge))
        r = rows[-1]
        print(f"[{r['case']}] estimate {r['estimated'] / 2**20:.0f} MiB, measured "
              f"{r['measured_rss_delta'] / 2**20:.0f} MiB ({r['ratio']:.2f}), load "
              f"{r['load']:.1f}", flush=True)
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    misses = [r["case"] for r in rows if not 0.5 <= r["ratio"] <= 1.0]
    if misses:
        print(f"outside [0.5, 1.0] measured/estimated: {', '.join(misses)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
