"""Weight matching with sd-mecha 1.1.8 (in its venv): python mecha_rebasin.py SPEC.json

SPEC: {"model": PATH, "ref": PATH, "out": PATH, "iters": INT}. sd_mecha.rebasin permutes
`model` to match `ref` (its SDXL permutation graph: UNet attention heads, feed-forwards and
embeddings; both text encoders' heads and MLPs) and the result is written as fp16, merged in
fp32 like every other sd-mecha run of the bench.
"""

import json
import sys

import sd_mecha
import torch


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    recipe = sd_mecha.rebasin(sd_mecha.model(spec["model"]), sd_mecha.model(spec["ref"]),
                              iters=spec["iters"])
    sd_mecha.merge(recipe, merge_dtype=torch.float32, output_dtype=torch.float16,
                   output=spec["out"])


if __name__ == "__main__":
    main()
