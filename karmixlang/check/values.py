"""The checker's abstract values: what an expression is known to be before any checkpoint is
read. A Model is a space value of affine weight 1, a Delta of weight 0; a linear combination
carries the sum of its coefficients."""

from __future__ import annotations

from dataclasses import dataclass

TOL = 1e-9
# How many times larger than its inputs scaling may make a value (docs/language.md, "Numbers"):
# an fp32 computation from inputs below 3.4e32 cannot overflow from coefficients alone.
MAX_GAIN = 1e6


@dataclass(frozen=True)
class Ty:
    kind: str  # space cluster number keymap string bool map perm lib func any error
    weight: float | None = None  # affine weight of a space value or of a cluster's members
    value: object = None  # the constant, when known (numbers, strings, bools)
    size: int | None = None  # members of a cluster, when known without reading files
    # A space value or cluster: at most how many times larger than the largest input entry
    # its entries can get from scaling. A keymap: its largest |value|. None: not known here.
    gain: float | None = None
    # A space value or cluster made of layer slices: how many layers (docs/language.md,
    # "Layer slices"). None: whole models.
    layers: int | None = None

    def describe(self) -> str:
        if self.kind in ("space", "cluster"):
            inner = {1: "Model", 0: "Delta"}.get(affine(self.weight), "combination")
            return inner if self.kind == "space" else f"Cluster[{inner}]"
        return {"number": "Number", "keymap": "KeyMap", "string": "String", "bool": "Bool",
                "map": "Map", "perm": "Permutation", "lib": "imported file",
                "func": "function"}.get(self.kind, self.kind)


ANY = Ty("any")
ERR = Ty("error")
BUSY = Ty("error", value="busy")  # a def body's let being typed: meeting it again is a cycle
MODEL = Ty("space", 1.0, gain=1.0)
DELTA = Ty("space", 0.0, gain=1.0)


def affine(w: float | None) -> int | None:
    """1 for a Model, 0 for a Delta, None for any other (or unknown) weight."""
    if w is None:
        return None
    if abs(w - 1) <= TOL:
        return 1
    if abs(w) <= TOL:
        return 0
    return None



# ------------------------------------------------------------------ the type checker
