"""`kmx demo`: synthetic checkpoints with the real SDXL key layout (1/16 size), a recipe that
merges them on each of two bases, its plan, the run, and what came out. No downloads."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from karmixlang import console


def _demo_recipe() -> str:
    from importlib import resources

    return resources.files("karmixlang").joinpath("data", "demo.kmx").read_text(encoding="utf-8")


def _distance(a: dict, b: dict) -> float:
    total = 0.0
    for k, v in a.items():
        if v.dtype.kind == "f" and k in b:
            total += float(np.sum((v.astype(np.float64) - b[k].astype(np.float64)) ** 2))
    return total ** 0.5


def run_demo(directory: str | None, threads: int = 0) -> int:
    from safetensors.numpy import load_file

    from karmixlang.api import compile as compile_recipe, execute
    from karmixlang.demo.synth import write_demo_pool

    folder = directory or tempfile.mkdtemp(prefix="kmx-demo-")
    os.makedirs(folder, exist_ok=True)
    console.heading(f"Writing synthetic SDXL-layout checkpoints to {folder} ...", to_err=True)
    pool = write_demo_pool(folder, arch="sdxl", scale=1 / 16, n_per_cluster=3, seed=0)
    recipe = os.path.join(folder, "demo.kmx")
    with open(recipe, "w", encoding="utf-8") as f:
        f.write(_demo_recipe())
    compiled = compile_recipe(recipe, threads=threads or 1)
    console.heading(f"\n$ kmx plan {recipe}\n")
    console.plan(compiled.plan)
    console.heading(f"\n$ kmx run {recipe} --force\n")
    result = execute(compiled, console.progress(), threads=threads, force=True)
    console.line(f"Done: {result.keys:,} keys in {result.seconds:.1f} s.", "green")
    bases = {"base-a": load_file(str(pool["base_a"])), "base-b": load_file(str(pool["base_b"]))}
    console.line("\nDistance of each output to each base (a merge built on a base stays near it):")
    for path in result.outputs:
        merged = load_file(path)
        dists = ", ".join(f"{name} {_distance(merged, b):.1f}" for name, b in bases.items())
        console.line(f"  {os.path.relpath(path, folder)}: {dists}")
    console.heading(f"\nTry next: kmx plan {recipe} --json · kmx fmt --diff {recipe} · "
                    f"kmx new my-merge.kmx")
    return 0
