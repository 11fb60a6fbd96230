"""Test accuracy of the digits example's checkpoints (numpy and safetensors only, no torch).

    python examples/rebasin-digits/evaluate.py models/base-1/ft-0.safetensors out/*.safetensors

The network is read from the key names alone: `layers.0`, `layers.1`, ... each a linear layer
(`weight` [out, in], `bias` [out]), ReLU between them, so other widths and depths work too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

HERE = Path(__file__).resolve().parent


def logits(tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    n_layers = sum(1 for key in tensors if key.endswith(".weight"))
    h = x.astype(np.float64)
    for i in range(n_layers):
        h = h @ tensors[f"layers.{i}.weight"].astype(np.float64).T + tensors[f"layers.{i}.bias"]
        if i < n_layers - 1:
            h = np.maximum(h, 0.0)
    return h


def accuracy(path: str | Path, test: str | Path = HERE / "test.npz") -> float:
    split = np.load(test)
    return float((logits(load_file(str(path)), split["x"]).argmax(1) == split["y"]).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--test", type=Path, default=HERE / "test.npz", help="the test split")
    args = ap.parse_args(argv)
    for path in args.checkpoints:
        print(f"{accuracy(path, args.test):6.1%}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
