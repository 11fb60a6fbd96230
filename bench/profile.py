#!/usr/bin/env python3
"""Profile kmx on bench cases with py-spy (all threads, sampled) and print the hotspots.

    python bench/profile.py sdxl-r-n4-ties sdxl-r-n4-dgmla      # cases bench/run.py wrote

For each case (its CACHE/runs/CASE/merge.kmx must exist: run bench/run.py on it first),
records `kmx run` with py-spy (installed in the bench tools venv) into
CACHE/profiles/CASE.txt (collapsed stacks; feed them to any flamegraph tool), then prints the
share of samples per karmixlang function, inclusive (anywhere on the stack) and self (the
innermost karmixlang frame: time in torch/numpy calls counts for the kmx line that made them).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:]*):?(?P<line>\d*)\)$")


def frames(stack: str) -> list[tuple[str, str, str]]:
    out = []
    for f in stack.split(";"):
        m = FRAME.match(f.strip())
        if m:
            out.append((m["func"], m["file"], m["line"]))
    return out


def short(file: str) -> str:
    i = file.find("karmixlang/")
    return file[i:] if i >= 0 else Path(file).name


def summarize(raw: Path, top: int) -> str:
    incl, own, lines = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    for row in raw.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        n = int(count)
        total += n
        fs = frames(stack)
        kmx = [(fn, short(fl), ln) for fn, fl, ln in fs if "karmixlang/" in fl]
        for key in {(fn, fl) for fn, fl, _ in kmx}:
            incl[key] += n
        if kmx:
            fn, fl, ln = kmx[-1]
            own[(fn, fl)] += n
            lines[f"{fl}:{ln} ({fn})"] += n
        else:
            leaf = fs[-1] if fs else ("?", "?", "")
            own[(leaf[0], short(leaf[1]))] += n
    out = [f"{raw.name}: {total} samples (all threads)", "", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {fl}:{fn}" for (fn, fl), n in incl.most_common(top)]
    out += ["", "self (innermost kmx frame):"]
    out += [f"  {100 * n / total:5.1f}%  {fl}:{fn}" for (fn, fl), n in own.most_common(top)]
    out += ["", "hottest kmx lines:"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in lines.most_common(top)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kmx-bench"))
    ap.add_argument("--rate", type=int, default=50, help="samples per second")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--reuse", action="store_true", help="summarize existing profiles only")
    a = ap.parse_args()
    spy = peers.ensure("tools", a.cache).parent / "py-spy"
    (a.cache / "profiles").mkdir(parents=True, exist_ok=True)
    for case in a.cases:
        recipe = a.cache / "runs" / case / "merge.kmx"
        raw = a.cache / "profiles" / f"{case}.txt"
        if not a.reuse:
            if not recipe.exists():
                raise SystemExit(f"{recipe} does not exist: run bench/run.py on {case} first")
            subprocess.run([str(spy), "record", "-r", str(a.rate), "-f", "raw", "-o", str(raw),
                            "--", sys.executable, "-m", "karmixlang", "run", str(recipe),
                            "--force", "-q"], check=True, capture_output=True)
        print(summarize(raw, a.top), "\n")


if __name__ == "__main__":
    main()
