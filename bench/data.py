"""Synthetic benchmark inputs with real key layouts, built once into the cache folder.

A suite is one base model and up to 16 fine-tunes of it that share a cluster direction (the
structure of a real pool, see karmixlang.demo.synth); fine-tune i is the same bytes whatever N, so
the N = 4 inputs are the first four of the N = 16 ones. Files are float16, as checkpoints ship.

    sd15     SD1.5 (LDM keys) at full size without the EMA copy: 1.07 B parameters, 2.1 GB
    sdxl-r   SDXL (SGM keys) with every width scaled by 1/4: 0.22 B parameters, 0.43 GB
    sdxl     SDXL at full size: 3.47 B parameters, 6.9 GB (opt-in, --full-sdxl)
    sdxl-w16 SDXL with every width scaled by 1/16, for pools of up to 257 (dgmla_scale.py)
    llm      a LLaMA-like model in Hugging Face's sharded form with a config.json (for
             mergekit, which only reads HF model folders): hidden 2048, 4 layers, vocab 32000,
             0.31 B parameters, 0.61 GB in 2 shards

A `-sparse` suite (sd15-sparse, sdxl-r-sparse, sdxl-sparse, and sd15-tiny-sparse: SD1.5 with
every width scaled by 1/16, for smoke runs) has the same base, and fine-tunes that leave
SPARSE_ZEROS of every float tensor's entries exactly as the base has them, as real fine-tunes
do: their task vectors are ~30 % exact zeros, the other entries differences of fp16 values
(few distinct magnitudes, many repeats). At density 0.7 the trim threshold then falls on zero.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from karmixlang.demo import synth

SEED = 2025
CLUSTER_SHIFT = 0.03  # the shared direction of the pool, relative to each tensor's scale
OWN_SHIFT = 0.01  # each fine-tune's own change
LLM = {"hidden": 2048, "n_layers": 4, "vocab": 32000, "shards": 2}
SPARSE_ZEROS = 0.3  # the fraction of each fine-tune's float entries left equal to the base's


@dataclass(frozen=True)
class Suite:
    name: str
    layout: str  # "sd1", "sdxl" or "llm"
    scale: float
    sharded: bool = False
    sparse: bool = False  # fine-tunes keep SPARSE_ZEROS of the base's entries exactly

    def root(self, cache: Path) -> Path:
        return cache / "data" / self.name

    def path(self, cache: Path, i: int | None) -> Path:
        """Input i (None: the base): a .safetensors file, or an HF folder for sharded suites."""
        name = "base" if i is None else f"ft-{i:02d}"
        return self.root(cache) / (name if self.sharded else f"{name}.safetensors")

    def files(self, cache: Path, i: int | None) -> list[Path]:
        """The safetensors files of input i."""
        p = self.path(cache, i)
        return sorted(p.glob("*.safetensors")) if self.sharded else [p]


SUITES = {
    "sd15": Suite("sd15", "sd1", 1.0),
    "sdxl-r": Suite("sdxl-r", "sdxl", 0.25),
    "sdxl": Suite("sdxl", "sdxl", 1.0),
    "llm": Suite("llm", "llm", 1.0, sharded=True),
    "sd15-sparse": Suite("sd15-sparse", "sd1", 1.0, sparse=True),
    "sdxl-r-sparse": Suite("sdxl-r-sparse", "sdxl", 0.25, sparse=True),
    "sdxl-sparse": Suite("sdxl-sparse", "sdxl", 1.0, sparse=True),
    "sd15-tiny-sparse": Suite("sd15-tiny-sparse", "sd1", 1 / 16, sparse=True),
    "sdxl-w16": Suite("sdxl-w16", "sdxl", 1 / 16),
}


def _layout(suite: Suite) -> dict:
    if suite.layout == "llm":
        return synth.llm_layout(LLM["n_layers"], LLM["hidden"], LLM["vocab"])
    layout = synth.load_layout(suite.layout)
    # SD1.5 checkpoints often ship without the EMA copy; merges never use it.
    return {k: s for k, s in layout.items() if s.component != "ema"}


def _llm_config() -> dict:
    h, heads = LLM["hidden"], LLM["hidden"] // 128
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": -(-h // 3) * 8,
        "num_attention_heads": heads, "num_key_value_heads": heads // 4,
        "num_hidden_layers": LLM["n_layers"], "vocab_size": LLM["vocab"],
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _write(suite: Suite, dest: Path, pairs, role: str) -> None:
    meta = {"format": "pt", "kmx_bench": json.dumps({"suite": suite.name, "role": role})}
    if not suite.sharded:
        _write_streamed(dest, pairs, meta)
        return
    tensors = dict(pairs)
    # Hugging Face's sharded form: contiguous runs of keys, an index naming each key's file,
    # and the config.json mergekit and transformers read the architecture from.
    names, shards = list(tensors), LLM["shards"]
    cuts = [len(names) * j // shards for j in range(shards + 1)]
    weight_map = {}
    dest.mkdir(parents=True, exist_ok=True)
    for j in range(shards):
        file = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        part = names[cuts[j]:cuts[j + 1]]
        synth.write_model(dest / file, {k: tensors[k] for k in part}, meta)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / "config.json").write_text(json.dumps(_llm_config(), indent=2) + "\n")
    # the index last: its presence marks a complete folder
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# numpy's dtype names (and the layouts' "bfloat16") -> safetensors' dtype codes
SAFETENSORS_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
                     "int64": "I64", "int32": "I32", "bool": "BOOL", "uint8": "U8"}


def safetensors_prefix(header: dict) -> bytes:
    """What precedes a safetensors file's data: the header's length, then the header (JSON),
    padded with spaces so that the data start 8-byte aligned."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def _write_streamed(dest: Path, pairs, meta: dict) -> None:
    """A safetensors file written key by key: the data go to a scratch file while the header
    is collected, then header and data are joined under a temporary name and renamed into
    place (a reader never sees a partial file)."""
    header, offset = {}, 0
    scratch = dest.with_name(f".{dest.name}.data")
    partial = dest.with_name(f".{dest.name}.partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(scratch, "wb") as fh:
            for name, x in pairs:
                x = x if x.flags.c_contiguous else x.copy(order="C")  # keeps 0-d shapes
                fh.write(memoryview(x).cast("B"))
                header[name] = {"dtype": SAFETENSORS_DTYPE[x.dtype.name],
                                "shape": list(x.shape),
                                "data_offsets": [offset, offset + x.nbytes]}
                offset += x.nbytes
        header["__metadata__"] = meta
        with open(partial, "wb") as out, open(scratch, "rb") as data:
            out.write(safetensors_prefix(header))
            shutil.copyfileobj(data, out, 64 << 20)
        os.replace(partial, dest)
    finally:
        scratch.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)


def _done(suite: Suite, cache: Path, i: int | None) -> bool:
    p = suite.path(cache, i)
    return (p / "model.safetensors.index.json").exists() if suite.sharded else p.exists()


def build(suite: Suite, cache: Path, n: int, log=print) -> None:
    """Write the base and fine-tunes 0..n-1 of `suite` that are not in the cache yet."""
    missing = [i for i in [None, *range(n)] if not _done(suite, cache, i)]
    if not missing:
        return
    layout = _layout(suite)
    t0 = time.monotonic()
    log(f"[data] {suite.name}: building {len(missing)} checkpoint(s) "
        f"({_params(layout, suite.scale) / 1e9:.2f} B parameters each) ...")

    def base() -> Mapping:  # key by key from its file: a full-size SDXL model is 6.9 GB
        return _Stored(suite.files(cache, None))

    for i in missing:
        if i is None:
            pairs = synth.iter_model(layout, suite.scale, (SEED, 0))
        else:
            direction = _InOrder(synth.iter_delta(layout, suite.scale, (SEED, 1),
                                                  CLUSTER_SHIFT))
            pairs = synth.iter_model(layout, suite.scale, (SEED, 2, i), base=base(),
                                     delta_scale=OWN_SHIFT, cluster_direction=direction)
            if suite.sparse:
                pairs = _untouched(pairs, base(), (SEED, 3, i))
        _write(suite, suite.path(cache, i), pairs, "base" if i is None else f"ft-{i}")
        if i is not None:
            log(f"[data] {suite.name}: ft-{i:02d} done ({time.monotonic() - t0:.0f} s)")
    log(f"[data] {suite.name}: ready in {time.monotonic() - t0:.0f} s")


class _Stored(Mapping):
    """The tensors of safetensors files, each read when asked for."""

    def __init__(self, files: list[Path]):
        self._files = {}
        for f in files:
            with safe_open(str(f), "np") as fh:
                self._files.update(dict.fromkeys(fh.keys(), f))

    def __getitem__(self, name: str) -> np.ndarray:
        with safe_open(str(self._files[name]), "np") as fh:
            return fh.get_tensor(name)

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class _InOrder(Mapping):
    """(name, array) pairs read as a mapping once, in their order: `m[name]` and `name in m`
    skip the pairs before `name`. A model read this way is never held whole."""

    def __init__(self, pairs: Iterator[tuple[str, np.ndarray]]):
        self._pairs = iter(pairs)
        self._current = next(self._pairs, None)

    def _seek(self, name: str) -> bool:
        while self._current is not None and self._current[0] != name:
            self._current = next(self._pairs, None)
        return self._current is not None

    def __contains__(self, name) -> bool:
        return self._seek(name)

    def __getitem__(self, name: str) -> np.ndarray:
        if not self._seek(name):
            raise KeyError(name)
        return self._current[1]

    def __iter__(self):
        raise TypeError("read in order only")

    def __len__(self) -> int:
        raise TypeError("read in order only")


def _untouched(pairs, base: Mapping, seed):
    """The pairs with a seeded SPARSE_ZEROS of each float tensor's entries set back to the
    base's: the task vector ft − base is exactly zero there."""
    rng = np.random.default_rng(seed)
    for name, x in pairs:
        if x.dtype.kind == "f" and x.size:
            same = rng.random(x.shape) < SPARSE_ZEROS
            x[same] = base[name][same]
        yield name, x


def build_second_base(suite: Suite, cache: Path, log=print) -> Path:
    """A second base of `suite`: the same layout drawn from another seed, i.e. another
    initialisation, the input weight matching aligns to the first base (bench/rebasin.py)."""
    path = suite.root(cache) / "base-2.safetensors"
    if not path.exists():
        t0 = time.monotonic()
        _write(suite, path, synth.iter_model(_layout(suite), suite.scale, (SEED, 3)), "base-2")
        log(f"[data] {suite.name}: base-2 ready in {time.monotonic() - t0:.0f} s")
    return path


def _params(layout: dict, scale: float) -> int:
    return sum(math.prod(synth.scaled_shape(s.shape, scale)) for s in layout.values())


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build the benchmark inputs (bench/run.py does "
                                 "this on demand)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kmx-bench"))
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("suites", nargs="+", choices=list(SUITES))
    a = ap.parse_args()
    for s in a.suites:
        build(SUITES[s], a.cache, a.n)
