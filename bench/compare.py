"""Compare two merge outputs key by key: python bench/compare.py KMX PEER [BASE]

Each argument is a .safetensors file or a folder of them (Hugging Face shards). Prints one JSON
object: for the keys both hold, the largest relative error ‖a − b‖ / ‖b‖ (per key, in fp64 on
the flattened tensor) and its key, the same over all keys at once (global), the largest error relative to the merged change
‖a − b‖ / ‖b − base‖ (stricter: the base dominates ‖b‖), the largest element-wise absolute
difference, and the keys only one side holds. Integer and bool keys count as equal or not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


class Tensors:
    """Lazy access to the tensors of a file or a folder of shards."""

    def __init__(self, path: str):
        p = Path(path)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        self.handles = [safe_open(str(f), framework="pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


def compare(a_path: str, b_path: str, base_path: str | None = None) -> dict:
    a, b = Tensors(a_path), Tensors(b_path)
    base = Tensors(base_path) if base_path else None
    common = sorted(a.keys() & b.keys())
    worst = {"rel": (0.0, None), "rel_delta": (0.0, None), "abs": (0.0, None)}
    mismatched_exact = []
    sq_diff = sq_ref = 0.0
    for k in common:
        x, y = a.get(k), b.get(k)
        if x.shape != y.shape:
            mismatched_exact.append(k)
            continue
        if not (x.is_floating_point() and y.is_floating_point()):
            if not torch.equal(x, y):
                mismatched_exact.append(k)
            continue
        x, y = x.double().reshape(-1), y.double().reshape(-1)
        if x.numel() == 0:
            continue
        diff = (x - y).norm().item()
        sq_diff += diff * diff
        sq_ref += y.norm().item() ** 2
        scores = {"rel": diff / max(y.norm().item(), 1e-30),
                  "abs": (x - y).abs().max().item()}
        if base is not None and k in base.where:
            change = (y - base.get(k).double().reshape(-1)).norm().item()
            # keys the merge leaves (almost) unchanged, such as shared buffers, have no
            # change to be relative to
            if change > 1e-4 * y.norm().item():
                scores["rel_delta"] = diff / change
        for name, v in scores.items():
            if v > worst[name][0] or v != v:  # NaN counts as worst
                worst[name] = (v, k)
    return {
        "keys_compared": len(common),
        "global_rel_err": (sq_diff / sq_ref) ** 0.5 if sq_ref else 0.0,
        "max_rel_err": worst["rel"][0], "max_rel_err_key": worst["rel"][1],
        "max_rel_err_of_change": worst["rel_delta"][0],
        "max_rel_err_of_change_key": worst["rel_delta"][1],
        "max_abs_err": worst["abs"][0],
        "only_in_kmx": len(a.keys() - b.keys()), "only_in_peer": len(b.keys() - a.keys()),
        "shape_or_exact_mismatch": mismatched_exact[:5],
    }


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    print(json.dumps(compare(*sys.argv[1:])))
