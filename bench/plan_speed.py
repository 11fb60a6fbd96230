#!/usr/bin/env python3
"""Planning speed over 50 SDXL-sized inputs.

    python bench/plan_speed.py

Writes 50 sparse SDXL checkpoints (the real SGM key layout at full size, fp16: a real header,
then a data region extended with truncate(), so nothing is written and each file reads as
zeros) and times karmixlang.api.compile on recipes over them, in-process (median of --repeat)
and as `kmx plan --json` (a fresh process: imports included). Target: < 2 s. The plan's memory estimate against runs: bench/estimates.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

N_INPUTS = 50
RECIPES = {
    # name -> recipe body over `b` (a base), `b2` (a second base) and `pool` (the other 48)
    "weighted sum": "save \"{out}\" = mean(pool) with dtype=\"fp16\", fallback=b",
    "TIES": "save \"{out}\" = std.ties_merging(pool, b, density=0.2) with dtype=\"fp16\"",
    "DGMLA, two bases": (
        "save \"{out}-a.safetensors\" = std.dgmla(pool, b, seed) with dtype=\"fp16\"\n"
        "save \"{out}-b.safetensors\" = std.dgmla(pool, b2, seed) with dtype=\"fp16\""),
}
def sparse_sdxl(path: Path) -> None:
    """A full-size SDXL checkpoint whose data region is a hole (reads as zeros)."""
    from data import SAFETENSORS_DTYPE, safetensors_prefix

    from karmixlang.demo import synth
    from karmixlang.io.dtypes import nbytes

    header, offset = {}, 0
    for key, spec in synth.load_layout("sdxl").items():
        dtype = "float16" if spec.dtype.startswith(("float", "bfloat")) else spec.dtype
        code = SAFETENSORS_DTYPE[dtype]
        n = nbytes(code, tuple(spec.shape))
        header[key] = {"dtype": code, "shape": list(spec.shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    prefix = safetensors_prefix(header)
    with open(path, "wb") as f:
        f.write(prefix)
        f.truncate(len(prefix) + offset)


def recipe_text(body: str, base: str, base2: str, pool: list[str], out: str) -> str:
    members = ",\n    ".join(f'"{p}"' for p in pool)
    return ('import "std/recipes.kmx" as std\n\nparam seed = 1\n\n'
            f'base b = "{base}"\nbase b2 = "{base2}"\n'
            f"cluster pool = [\n    {members},\n]\n\n" + body.format(out=out) + "\n")


def planning(cache: Path, repeat: int) -> list[dict]:
    from karmixlang import api

    root = cache / "plan-speed"
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"sdxl-{i:02d}.safetensors" for i in range(N_INPUTS)]
    for p in paths:
        if not p.exists():
            sparse_sdxl(p)
    rows = []
    for name, body in RECIPES.items():
        recipe = root / (name.replace(" ", "-").replace(",", "") + ".kmx")
        recipe.write_text(recipe_text(body, str(paths[0]), str(paths[1]),
                                      [str(p) for p in paths[2:]], str(root / "out")))
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            api.compile(str(recipe))
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "karmixlang", "plan", "--json", str(recipe)],
                           capture_output=True, text=True)
        cli = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"kmx plan failed on {recipe}:\n{r.stdout}{r.stderr}")
        rows.append({"recipe": name, "inputs": N_INPUTS,
                     "compile_s_median": statistics.median(times),
                     "compile_s_first": times[0], "kmx_plan_json_s": cli})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kmx-bench"))
    ap.add_argument("--repeat", type=int, default=3, help="in-process compiles per recipe")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    results = {"planning": planning(a.cache, a.repeat)}
    print("| recipe (50 SDXL inputs) | compile, in-process (median) | first | kmx plan --json |")
    print("|---|---|---|---|")
    for r in results["planning"]:
        print(f"| {r['recipe']} | {r['compile_s_median']:.2f} s | {r['compile_s_first']:.2f} s "
              f"| {r['kmx_plan_json_s']:.2f} s |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
