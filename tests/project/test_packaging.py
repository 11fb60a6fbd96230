"""The wheel carries the grammar, the stdlib, the error pages and the demo data, and an
installed kmx finds them without a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_installed_wheel_finds_its_data(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(wheels)], check=True,
                   capture_output=True)
    (wheel,) = wheels.glob("karmixlang-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("karmixlang/syntax/grammar.lark", "karmixlang/stdlib/recipes.kmx",
                     "karmixlang/errors/K0201.md", "karmixlang/data/sdxl-sgm.json.gz",
                     "karmixlang/data/demo.kmx", "karmixlang/data/template-ties.kmx"):
        assert required in names, required

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    recipe = tmp_path / "r.kmx"
    recipe.write_text('import "std/recipes.kmx" as std\nbase o = "o.safetensors"\n'
                      'cluster pool = ["a.safetensors", "b.safetensors"]\n'
                      'save "out.safetensors" = std.ties_merging(pool, o)\n')
    code = ("import sys, karmixlang, karmixlang.resources as r; "
            "assert karmixlang.__file__.startswith(sys.argv[1]), karmixlang.__file__; "
            "from karmixlang.cli import main; "
            "assert main(['check', sys.argv[2]]) == 0; assert main(['explain', 'K0201']) == 0; "
            "from karmixlang.demo.synth import load_layout; assert len(load_layout('sd1')) > 1000")
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", code, str(target), str(recipe)], cwd=tmp_path,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout
