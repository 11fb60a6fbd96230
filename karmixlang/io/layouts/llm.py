"""Where the numbered layers of a Hugging Face transformer are in its key names.

A decoder's repeated blocks sit under one numbered container: `model.layers.N.` (LLaMA,
Mistral, Qwen, Gemma), `transformer.h.N.` (GPT-2, Falcon), `gpt_neox.layers.N.`,
`model.decoder.layers.N.` (OPT), `transformer.blocks.N.` (MPT). Every other key (embeddings,
final norm, output head) is outside the stack. Torch-free: names only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# a container segment named exactly `layers`, `h` or `blocks` (not `double_blocks`), then the index
_LAYER_KEY = re.compile(r"^(?P<stack>(?:.*\.)?(?:layers|h|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class LayerKey:
    """`stack` is the container (`model.layers`), `index` the layer number, `rest` the name
    within the layer (`self_attn.q_proj.weight`)."""

    stack: str
    index: int
    rest: str

    def renumbered(self, index: int) -> str:
        return f"{self.stack}.{index}.{self.rest}"


def split_layer_key(key: str) -> LayerKey | None:
    """The layer a key belongs to, or None for a key outside the layer stack."""
    m = _LAYER_KEY.match(key)
    if m is None:
        return None
    return LayerKey(m["stack"], int(m["index"]), m["rest"])


def layer_count(keys: Iterable[str]) -> int:
    """How many layers the keys hold: one more than the highest layer index (0 without layers)."""
    indices = [lk.index for lk in map(split_layer_key, keys) if lk is not None]
    return max(indices) + 1 if indices else 0
