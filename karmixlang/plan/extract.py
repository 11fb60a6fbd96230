"""LoRA extraction planned (docs/lora.md): a save `with lora=RANK` writes, for each key of its
Delta that a LoRA can hold, the kohya module(s) of that key — `lora_up.weight` (U·S),
`lora_down.weight` (Vh) of the key's truncated SVD and `alpha` = rank (scale 1) — instead of
the key. Keys a LoRA cannot hold (norms, biases, 3×3 convs without `lora_conv`, keys kohya has
no name for) are left out, and the plan lists them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from karmixlang.io.lora_map import kohya_modules
from karmixlang.plan.executable import Output


@dataclass
class Extraction:
    """One extraction save: its ranks, the modules it writes, the keys it leaves out."""
    rank: int
    conv_rank: int | None
    arch: str = "unknown"  # the family its keys show (io/layouts.detect)
    modules: set[str] = field(default_factory=set)
    left_out: dict[str, str] = field(default_factory=dict)  # key -> why

    def metadata(self) -> dict[str, str]:
        """What kohya's tools write about a LoRA (ss_*); the model spec's fields are every
        output's (runtime/outputs.py, io/modelspec.py)."""
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                "ss_network_alpha": str(self.rank)}
        if self.conv_rank is not None:
            meta["ss_network_args"] = (f'{{"conv_dim": "{self.conv_rank}", '
                                       f'"conv_alpha": "{self.conv_rank}"}}')
        return meta

    def report(self) -> dict:
        return {"rank": self.rank, "conv_rank": self.conv_rank, "arch": self.arch,
                "modules": len(self.modules),
                "left_out": [{"key": k, "reason": r} for k, r in sorted(self.left_out.items())]}


def factor_outputs(save_index: int, node: int, key: str, shape: tuple[int, ...], dtype: str,
                   ex: Extraction) -> list[Output] | str:
    """The outputs that write `key`'s modules, or why a LoRA cannot hold the key."""
    if len(shape) not in (2, 4):
        return f"a {len(shape)}-D tensor: a LoRA holds matrices and convs"
    kernel = tuple(shape[2:])
    conv = math.prod(kernel) > 1
    rank = ex.conv_rank if conv else ex.rank
    if rank is None:
        return f"a {'×'.join(map(str, kernel))} conv: add lora_conv=RANK to extract it"
    modules = kohya_modules(key, ex.arch)
    if modules is None:
        return "kohya names no module for this key"
    rows, rest = divmod(shape[0], len(modules))
    if rest:
        return f"{shape[0]} rows do not split into {len(modules)} modules"
    cols = math.prod(shape[1:])
    out = []
    for name, part, parts in modules:
        r = min(rank, rows, cols)
        span = (part * rows, (part + 1) * rows) if parts > 1 else None
        one = (1, 1) if len(shape) == 4 else ()
        for suffix, what, shp in ((".lora_up.weight", "up", (rows, r) + one),
                                  (".lora_down.weight", "down", (r, shape[1]) + kernel),
                                  (".alpha", "alpha", ())):
            out.append(Output(save_index, node, dtype, shp, None, name + suffix, (what, r, span)))
        ex.modules.add(name)
    return out
