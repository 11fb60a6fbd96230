"""The safetensors dtype table, and the spellings users write for a save dtype.

Kept free of torch so that `kmx plan` can size tensors from headers alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """One safetensors dtype. `bits` rather than bytes: F4 and F6 pack several values per byte."""

    name: str
    bits: int
    is_float: bool  # holds values merge arithmetic applies to (False for ints, bools and scales)
    rank: int  # position in safetensors' own enum; its writer orders tensors by it

    @property
    def itemsize(self) -> int:
        """Bytes per element; sub-byte dtypes have none (use `nbytes`)."""
        if self.bits % 8:
            raise ValueError(f"{self.name} packs {self.bits}-bit elements; it has no byte size")
        return self.bits // 8


def _table() -> dict[str, DType]:
    # Listed in the order of safetensors' `Dtype` enum (the `rank`), which its writer sorts by.
    rows = [
        ("BOOL", 8, False),
        ("F4", 4, True),
        ("F6_E2M3", 6, True),
        ("F6_E3M2", 6, True),
        ("U8", 8, False),
        ("I8", 8, False),
        ("F8_E5M2", 8, True),
        ("F8_E4M3", 8, True),
        # Exponent-only block scales (MX formats): averaging them is meaningless, so not "float".
        ("F8_E8M0", 8, False),
        ("F8_E4M3FNUZ", 8, True),
        ("F8_E5M2FNUZ", 8, True),
        ("I16", 16, False),
        ("U16", 16, False),
        ("F16", 16, True),
        ("BF16", 16, True),
        ("I32", 32, False),
        ("U32", 32, False),
        ("F32", 32, True),
        ("C64", 64, False),  # complex: not a weight dtype any merge method handles
        ("F64", 64, True),
        ("I64", 64, False),
        ("U64", 64, False),
    ]
    return {name: DType(name, bits, is_float, rank)
            for rank, (name, bits, is_float) in enumerate(rows)}


DTYPES: dict[str, DType] = _table()


def nbytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes a tensor of this dtype and shape occupies, or None when that is not whole bytes
    (a packed sub-byte tensor with an odd element count) or the dtype is unknown."""
    dt = DTYPES.get(dtype)
    if dt is None:
        return None
    numel = 1
    for d in shape:
        numel *= d
    total_bits = numel * dt.bits
    return None if total_bits % 8 else total_bits // 8


# What a recipe's `dtype=` may say. Users write fp16/bf16; people coming from torch write its
# names; the safetensors names themselves come from `kmx plan` output.
_USER_SPELLINGS: dict[str, str] = {
    "fp16": "F16", "float16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
    "fp32": "F32", "float32": "F32", "float": "F32",
    "fp64": "F64", "float64": "F64", "double": "F64",
    "fp8_e4m3fn": "F8_E4M3", "float8_e4m3fn": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2", "float8_e5m2": "F8_E5M2",
}
# The float dtypes a checkpoint can be written in: torch >= 2.1 casts to each of them (the
# FNUZ fp8 variants and the packed F4/F6 are not among them).
SAVE_DTYPES = frozenset(_USER_SPELLINGS.values())
_USER_SPELLINGS.update({name.lower(): name for name in SAVE_DTYPES})

USER_DTYPE_NAMES: tuple[str, ...] = ("fp16", "bf16", "fp32", "fp64", "fp8_e4m3fn", "fp8_e5m2")
"""The spellings to suggest in help text and docs (the rest are accepted too)."""


def parse_user_dtype(s: str) -> str | None:
    """The safetensors dtype for a user's spelling ("fp16", "torch.bfloat16", "F32", ...),
    or None when it names no dtype a checkpoint can be written in. Case-insensitive."""
    key = s.strip().lower()
    if key.startswith("torch."):
        key = key[len("torch."):]
    return _USER_SPELLINGS.get(key)
