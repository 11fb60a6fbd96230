#!/usr/bin/env python3
"""Weight matching of two full-size SDXL checkpoints: kmx's `align(..., spec="sdxl")` against
sd-mecha 1.1.8's `rebasin`, wall time, CPU time and peak RSS of each tool's process.

    python bench/rebasin.py --mecha-python /work/venv-mecha/bin/python
    python bench/rebasin.py --tools kmx --iterations 10 --keep

Inputs (bench/data.py, cached): the "sdxl" suite's base (A) and a second base drawn from
another seed (B): two initialisations of the same layout, 6.9 GB each in fp16. Each tool
permutes B to match A and writes the result (fp16). After the runs the script reports, for
B and for each tool's output, the relative distance ||A - X|| / ||A|| over every float key
(weight matching can only lower it) and deletes the outputs (the inputs stay in the cache
unless --clean). Results are appended to CACHE/rebasin-results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data  # noqa: E402
import peers  # noqa: E402
from run import measure, warm  # noqa: E402

SUITE = data.SUITES["sdxl"]


def kmx_command(a: Path, b: Path, out: Path, iterations: int, folder: Path) -> list[str]:
    recipe = folder / "rebasin.kmx"
    recipe.write_text(
        f'base a = "{a}"\nmodel b = "{b}"\n\n'
        f'save "{out}" = align(b, to=a, spec="sdxl", iterations={iterations}) '
        'with dtype="fp16"\n')
    return [sys.executable, "-m", "karmixlang", "run", str(recipe), "--force", "-q"]


def mecha_command(py: Path, a: Path, b: Path, out: Path, iterations: int,
                  folder: Path) -> list[str]:
    spec = folder / "sd-mecha-rebasin.json"
    spec.write_text(json.dumps({"model": str(b), "ref": str(a), "out": str(out),
                                "iters": iterations}))
    return [str(py), str(HERE / "workers" / "mecha_rebasin.py"), str(spec)]


def distance(a_path: Path, x_path: Path) -> float:
    """||A - X|| / ||A|| over the float keys both hold, accumulated in fp64 key by key."""
    num = den = 0.0
    with safe_open(str(a_path), "np") as a, safe_open(str(x_path), "np") as x:
        for key in sorted(set(a.keys()) & set(x.keys())):
            ta = a.get_tensor(key)
            if ta.dtype.kind != "f" or ta.size == 0:
                continue
            ta = ta.astype(np.float64)
            num += float(np.sum((ta - x.get_tensor(key).astype(np.float64)) ** 2))
            den += float(np.sum(ta * ta))
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kmx-bench"))
    ap.add_argument("--tools", default="kmx,sd-mecha")
    ap.add_argument("--iterations", type=int, default=10,
                    help="passes over the groups at most (sd-mecha's default `iters`)")
    ap.add_argument("--mecha-python", type=Path,
                    help="a python with sd-mecha 1.1.8 (default: bench/peers.py's venv)")
    ap.add_argument("--timeout", type=float, default=3 * 3600)
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--clean", action="store_true", help="delete the inputs afterwards too")
    args = ap.parse_args()

    data.build(SUITE, args.cache, 0)
    a = SUITE.path(args.cache, None)
    b = data.build_second_base(SUITE, args.cache)
    folder = args.cache / "rebasin"
    folder.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    results = []
    for tool in args.tools.split(","):
        out = folder / f"{tool}.safetensors"
        out.unlink(missing_ok=True)
        if tool == "kmx":
            cmd = kmx_command(a, b, out, args.iterations, folder)
        else:
            py = args.mecha_python or peers.ensure("sd-mecha", args.cache)
            cmd = mecha_command(py, a, b, out, args.iterations, folder)
        warm([a, b])
        m = measure(cmd, folder / f"{tool}.log", args.timeout, env)
        rec = {"tool": tool, "iterations": args.iterations, "cmd": " ".join(cmd),
               "time": time.strftime("%Y-%m-%d %H:%M:%S"), **m}
        if m["rc"] == 0 and out.exists():
            rec["distance"] = distance(a, out)
        print(json.dumps(rec), flush=True)
        results.append(rec)
        if not args.keep:
            out.unlink(missing_ok=True)
    results.append({"tool": "unaligned B", "distance": distance(a, b)})
    print(json.dumps(results[-1]), flush=True)
    log = args.cache / "rebasin-results.json"
    old = json.loads(log.read_text()) if log.exists() else []
    log.write_text(json.dumps(old + results, indent=1) + "\n")
    if args.clean:
        a.unlink()
        b.unlink()


if __name__ == "__main__":
    main()
