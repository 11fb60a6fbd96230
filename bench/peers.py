"""Throwaway virtual environments for the peers (sd-mecha, mergekit) and the bench tools
(matplotlib for the plot, py-spy for profiles).

Each lives under CACHE/venvs/NAME, made with `python -m venv --system-site-packages` and a
`.pth` line naming the folder the harness's own torch is imported from (the system one, or a
virtual environment's such as `.ci/run`'s), so it reuses that torch instead of downloading
another one. Packages that declare a torch dependency are installed with --no-deps, and the
rest of their dependencies explicitly, under a constraints file that pins torch to the
installed version: pip can then never replace it.
Nothing here is a dependency of karmixlang.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

# name -> (packages installed with --no-deps, their remaining dependencies, import check)
SPECS = {
    "sd-mecha": (
        ["sd-mecha==1.1.8"],
        ["tqdm>=4.66.2", "click>=8.1.7", "fuzzywuzzy>=0.18.0", "python-Levenshtein",
         "PyYAML>=6.0.1", "scipy>=1.14.0", "safetensors>=0.4.2", "numpy>=1.26.0"],
        "import sd_mecha",
    ),
    "mergekit": (
        ["mergekit==0.1.5", "accelerate>=1.6.0,<2", "peft>=0.18.0"],
        ["tqdm>=4.67.1,<5", "click>=8.2.1,<9", "safetensors>=0.5.2,<1", "pydantic>=2.10.6,<3",
         "immutables>=0.21,<1", "transformers>=5.0,<6.0", "tokenizers>=0.20.1",
         "huggingface_hub", "typing-extensions", "sentencepiece", "protobuf", "scipy",
         "psutil", "packaging", "PyYAML", "numpy"],
        "import mergekit.merge, mergekit.config",
    ),
    "tools": ([], ["matplotlib", "py-spy"], "import matplotlib"),  # plot and profiler
}


class Unavailable(Exception):
    """A peer that could not be installed; the harness skips it with this message."""


def _torch_version() -> str:
    import torch

    return torch.__version__


def _share_torch(root: Path) -> None:
    """Put the folder holding the harness's torch on the new venv's path, after its own
    packages. --system-site-packages alone reaches the base interpreter's packages only,
    which lack torch when the harness runs from a virtual environment."""
    import torch

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = root / "lib" / version / "site-packages"
    (site / "harness-torch.pth").write_text(f"{Path(torch.__file__).parent.parent}\n")


def ensure(name: str, cache: Path, log=print) -> Path:
    """The python of the venv for `name`, installing it on first use. Raises Unavailable."""
    nodeps, deps, check = SPECS[name]
    root = cache / "venvs" / name
    py = root / "bin" / "python"
    stamp = root / ".kmx-bench-ok"
    if stamp.exists():
        return py
    log(f"[venv] installing {name} into {root} (once) ...")
    try:
        venv.EnvBuilder(system_site_packages=True, with_pip=True, clear=True).create(root)
    except Exception as exc:  # noqa: BLE001 - any failure means: skip this peer
        raise Unavailable(f"{name}: cannot create a venv: {exc}") from exc
    _share_torch(root)
    constraints = root / "constraints.txt"
    constraints.write_text(f"torch=={_torch_version()}\n")
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "-c", str(constraints)]
    steps = ([pip + ["--no-deps", *nodeps]] if nodeps else []) + ([pip + deps] if deps else [])
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise Unavailable(f"{name}: pip failed: {r.stderr.strip()[-800:]}")
    # The system torch must still be the one this venv imports.
    r = subprocess.run([str(py), "-c", f"{check}; import torch; print(torch.__file__)"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Unavailable(f"{name}: installed but `{check}` fails: {r.stderr.strip()[-800:]}")
    if str(root) in r.stdout:
        raise Unavailable(f"{name}: pip put a torch into the venv ({r.stdout.strip()})")
    stamp.write_text("ok\n")
    log(f"[venv] {name} ready")
    return py


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="install the peers' venvs")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kmx-bench"))
    ap.add_argument("names", nargs="+", choices=list(SPECS))
    a = ap.parse_args()
    for n in a.names:
        try:
            print(ensure(n, a.cache))
        except Unavailable as e:
            print(f"skipped: {e}", file=sys.stderr)
