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


def containers(keys: Iterable[str]) -> list[str]:
    """The layer containers the keys use (`model.layers`), sorted."""
    return sorted({lk.stack for lk in map(split_layer_key, keys) if lk is not None})


@dataclass(frozen=True)
class Slice:
    """One view step on a model's layers (`layers(x, start, end)`, and `stack`'s shift of a
    later part): the layers `start <= i < end` (end None: every one) renumbered
    `i - start + offset`; keys outside the stack kept when `others`, else left out."""

    start: int
    end: int | None
    offset: int = 0
    others: bool = True

    def key(self, key: str) -> str | None:
        """The key's name through the step, or None when the step leaves it out."""
        lk = split_layer_key(key)
        if lk is None:
            return key if self.others else None
        if lk.index < self.start or (self.end is not None and lk.index >= self.end):
            return None
        return lk.renumbered(lk.index - self.start + self.offset)
