"""The one table of graph ops: what each op is, for every stage that needs to know it.

Lowering, the schedule, out-of-core planning and the runtime read an op's properties here
instead of testing its name. The user-facing side of a builtin (its name, parameters, types,
docs) stays in builtins.BUILTINS, whose entries name their op (`Builtin.op`); the torch
function that runs an op with `kernel` set is found in runtime/kernels/table.py under that
name. tests/project/test_opspec.py checks the three against each other. No torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

# Bytes per element of a read buffer before conversion (fp32 inputs; fp16: 2).
RAW_READ = 4


class Chunk(Enum):
    """How an op runs when its key is evaluated in chunks (plan/outofcore.py,
    runtime/chunked.py)."""

    ELEMENTWISE = "element-wise"  # a chunk is computed as the whole key is: no extra pass
    GRAM = "Gram"  # one pass accumulates the inputs' fp64 Gram matrix (runtime GRAM_SPLITS);
    # the result is then formed chunk by chunk from coefficients
    THRESHOLD = "threshold"  # trim's own scheme: two passes find the k-th largest magnitude
    # (fp32 only; in fp64 it is a WHOLE filter); runtime/chunked.py runs it for trim only
    WHOLE = "whole"  # a whole-key filter: computed alone in memory, spilled, read in chunks
    SPLIT = "split"  # ties: each member goes through `split` (by threshold, or spilled),
    # the rest (the election) runs chunk by chunk


@dataclass(frozen=True)
class Workspace:
    """Temporary bytes per element an op needs beyond its output, while it runs (an estimate,
    documented in plan-format.md; the factors are checked against runs with bench/estimates.py)."""

    per_input: float = 0.0  # × inputs × itemsize: the stacked inputs (and sorting buffers)
    tensors: int = 0  # × itemsize: tensors of the compute dtype
    bytes: int = 0  # fixed bytes: magnitudes, random draws, ranks
    # The kernel stacks its inputs one slice at a time (runtime/kernels/base.flat_slices:
    # `inputs` rows of plan/outofcore.slice_step(inputs) elements): the stacked part, and
    # `slice_tensors` temporaries of one slice each, are bounded by the slice, not the key.
    sliced: bool = False
    slice_tensors: int = 0
    # (elements, bytes, fixed): a key of more elements needs `bytes` per element and `fixed`
    # bytes in all instead of `bytes` (DELLA ranks long keys group by group); known only
    # where the key's size is (whole_key)
    long: tuple[int, int, int] | None = None
    # At an 8-byte compute dtype (fp64), this workspace instead (DELLA sorts fp64 magnitudes
    # another way than narrower ones)
    fp64: Workspace | None = None

    def at(self, itemsize: int) -> Workspace:
        """The workspace that applies at a compute dtype of `itemsize` bytes."""
        return self.fp64 if itemsize == 8 and self.fp64 else self

    def __call__(self, inputs: int, itemsize: int) -> int:
        """Bytes per element of the key (the part that grows with the whole key)."""
        w = self.at(itemsize)
        stacked = 0 if w.sliced else w.per_input * inputs * itemsize
        return int(stacked + w.tensors * itemsize + w.bytes)

    def whole_key(self, inputs: int, itemsize: int, numel: int) -> int:
        """Bytes per element of a key of `numel` elements (__call__ is the bound for any)."""
        w = self.at(itemsize)
        if w.long and numel > w.long[0]:
            _, per_element, fixed = w.long
            return w(inputs, itemsize) - w.bytes + per_element + math.ceil(fixed / numel)
        return w(inputs, itemsize)

    def per_slice_element(self, inputs: int, itemsize: int) -> int:
        """Bytes per element of one slice (0 unless `sliced`)."""
        w = self.at(itemsize)
        return int((w.per_input * inputs + w.slice_tensors) * itemsize) if w.sliced else 0

    def describe(self) -> str:
        over = " (per slice)" if self.sliced else ""
        parts = ([f"{self.per_input:g} × inputs × n·b{over}"] if self.per_input else []) + \
            ([f"{self.slice_tensors} × n·b (per slice)"] if self.slice_tensors else []) + \
            ([f"{self.tensors} × n·b"] if self.tensors else []) + \
            ([f"{self.bytes}·n bytes"] if self.bytes else [])
        long = (f" ({self.long[1]}·n + {self.long[2]:,} bytes instead for keys over "
                f"{self.long[0]:,} elements)" if self.long else "")
        fp64 = f"; at fp64: {self.fp64.describe()}" if self.fp64 else ""
        return (" + ".join(parts) or "0") + long + fp64


ONE_TENSOR = Workspace(tensors=1)
# DELLA on fp64 ranks keys of up to this many elements with one radix sort (32 B/el of
# temporaries: 540 MB here); longer ones in groups of about RANK_GROUP entries, each sorted
# alone (runtime/kernels/sparse.py). fp32 and narrower sort packed keys at any size.
RADIX_SORT_MAX_ELEMS = 1 << 24
RANK_GROUP = 1 << 21


def _lincomb_coeffs(node, key: str) -> list[float]:
    # A per-key coefficient (ir.graph.KeyMap) is evaluated at the key.
    return [c.at(key) if hasattr(c, "at") else c for c in node.attr("coeffs")]


def _sum_coeffs(node, key: str) -> list[float]:
    return list(node.attr("weights"))


def _mean_coeffs(node, key: str) -> list[float]:
    ws = list(node.attr("weights"))
    total = math.fsum(ws)
    return [w / total for w in ws]


# How much larger than its inputs' entries an op's result can get, for the checker's scaling
# bound (check/values.Ty.gain, K0204): gain(g, gains, arg, size), where g is the largest of
# its tensor arguments' gains, gains maps each tensor parameter to its gain, arg(name,
# default) is a number or bool argument's value (None: unknown), and size the number of
# members of its cluster argument (None: unknown). None: it cannot be bounded.
Gain = Callable[[float, dict, Callable, "int | None"], "float | None"]


def within_inputs(g, gains, arg, size):
    """Means, medians, elections and most filters: no entry beyond the inputs' largest."""
    return g


def _interpolation(param: str, default: float | None = None) -> Gain:
    def gain(g, gains, arg, size):  # (1 − t)·a + t·b
        t = arg(param, default)
        return None if t is None else (abs(1 - t) + abs(t)) * g
    return gain


def _difference(k: float) -> Gain:
    def gain(g, gains, arg, size):  # a + k·alpha·(b − c)
        alpha = arg("alpha", 1.0)
        return None if alpha is None else gains["a"] + k * abs(alpha) * (gains["b"] + gains["c"])
    return gain


def _dare_gain(g, gains, arg, size):  # kept entries rescaled by 1 / (1 − p)
    p, rescale = arg("p", None), arg("rescale", True)
    return None if p is None else 0.0 if p >= 1 else g / (1 - p) if rescale else g


def _sum_gain(g, gains, arg, size):
    return g * (size or 1)


@dataclass(frozen=True)
class OpSpec:
    name: str
    kernel: str | None = None  # the runtime kernel that runs it; None: the runtime itself
    # Σ cᵢxᵢ of its inputs: `coefficients(node, key)` gives the cᵢ. Its inputs may be read
    # and accumulated one at a time (schedule: deferred inputs).
    coefficients: Callable[[object, str], list[float]] | None = None
    alias: bool = False  # its value is (a part of) its input's tensor: no copy, no memory
    broadcast: bool = False  # applied to a cluster, works on each member (lowering)
    seeded: bool = False  # random: gets a `member` attribute, and key=/member= at run time
    per_member: bool = False  # returns one tensor per member: a node plus a `pick` each
    chunk: Chunk = Chunk.ELEMENTWISE
    split: str | None = None  # Chunk.SPLIT: the filter each member goes through alone
    workspace: Workspace = field(default=ONE_TENSOR)
    gain: Gain = within_inputs  # see Gain; not counted: DELLA's rescaling, iso past its spectrum
    # F(x + c) = F(x) + c: `b + F(c − b)` equals F(c), whatever the base b (K0213)
    translation_equivariant: bool = False
    # The attribute values under which the node's result is its one input where an entry is
    # kept and +0 elsewhere, bit for bit (empty: always; None: never): an out-of-core spill
    # of it then holds the keep mask, a bit an element, and later passes apply it to the
    # input formed again (plan/outofcore.py, runtime/chunked.py)
    masks: tuple[tuple[str, object], ...] | None = None

    @property
    def linear(self) -> bool:
        return self.coefficients is not None

    @property
    def stacks(self) -> bool:
        """It stacks its inputs (its workspace grows with their number)."""
        return self.workspace.per_input > 0

    @property
    def barrier(self) -> bool:
        """Out of core, it needs the whole key (an extra pass or a spill)."""
        return self.chunk is not Chunk.ELEMENTWISE

    def tensors(self, inputs: int) -> int:
        """The tensors its value holds."""
        return 0 if self.alias else inputs if self.per_member else 1


def _structural(name: str, **props) -> OpSpec:
    return OpSpec(name, None, **props)


def _kernel(name: str, **props) -> OpSpec:
    return OpSpec(name, name, **props)


def _stacked(factor: float = 1.0) -> Workspace:
    return Workspace(per_input=factor)


def _sliced(factor: float, slice_tensors: int = 0, **whole) -> Workspace:
    return Workspace(per_input=factor, sliced=True, slice_tensors=slice_tensors, **whole)


_NONE = Workspace()

OPS: dict[str, OpSpec] = {s.name: s for s in [
    # ------------------------------------------------------------ structural
    _structural("load", workspace=Workspace(bytes=RAW_READ)),  # the read buffer
    # a LoRA's delta of one key: the result, plus one product of a fused key's row slice
    # (runtime/kernels/lora.py); its modules' factors are small beside the key
    _structural("lora", workspace=ONE_TENSOR),
    _structural("lincomb", coefficients=_lincomb_coeffs),
    _structural("select", alias=True, broadcast=True, workspace=_NONE),
    _structural("exclude", alias=True, broadcast=True, workspace=_NONE),
    # key-wise: the optimizer's `views` pass moves it into the loads below it (ir/optimize.py)
    _structural("rename", alias=True, broadcast=True, workspace=_NONE),
    # layer slices (`layers`, and `stack`'s shifts): renames too, moved into the loads
    _structural("layers", alias=True, broadcast=True, workspace=_NONE),
    _structural("union", alias=True, workspace=_NONE),
    _structural("pick", alias=True, workspace=_NONE),
    # re-basin: index_select along the permuted axes (runtime/rebasin.py); the permutations
    # are solved before the keys run (plan/rebasin.py). Whole key: a gather is not chunkable.
    _structural("permute", broadcast=True, chunk=Chunk.WHOLE),
    # ------------------------------------------------------------ interpolation
    _kernel("lerp", gain=_interpolation("t")),
    _kernel("slerp", chunk=Chunk.GRAM, gain=_interpolation("t")),
    _kernel("add_difference", gain=_difference(1.0)),
    _kernel("train_difference", gain=_difference(1.8)),
    # ------------------------------------------------------------ means and medians
    _kernel("mean", coefficients=_mean_coeffs, workspace=_stacked(),
            translation_equivariant=True),
    _kernel("sum_", coefficients=_sum_coeffs, workspace=_stacked(), gain=_sum_gain),
    # per slice: the stack, its sorted values, int64 order, fp64 weights and their cumsum;
    # gathers and the result
    _kernel("median", workspace=_sliced(8.5, 5), translation_equivariant=True),
    # Gram methods: per slice the stack and its fp64 copy (3 × n·b in fp32), and the centre
    # slice widened to fp64; the whole-key centre (the weighted mean; model_stock: the mean)
    _kernel("geometric_median", chunk=Chunk.GRAM, workspace=_sliced(3, 2, tensors=1),
            translation_equivariant=True),
    _kernel("model_stock", chunk=Chunk.GRAM, workspace=_sliced(3, 2, tensors=1)),
    _kernel("karcher", chunk=Chunk.GRAM, workspace=_sliced(3)),
    # per slice: the votes' stack; their sum, magnitudes' sum, sign, a member's sign, the
    # agreement, numerator and denominator (kernels/sparse.py)
    _kernel("ties_merge", workspace=_sliced(1, 7)),
    # ------------------------------------------------------------ filters on deltas
    # magnitudes, partitioned in place (kernels/sparse.py, bench/kernels.py)
    _kernel("trim", broadcast=True, chunk=Chunk.THRESHOLD, workspace=Workspace(bytes=4),
            masks=()),
    # random draws, slice by slice
    _kernel("dare", broadcast=True, seeded=True, workspace=Workspace(bytes=2), gain=_dare_gain),
    # fp32 (and narrower) sorts magnitude bits packed with positions, at any size: 8 B/el
    # beside the ranks, which become the result (measured 8.1 on 29.5M and 63M elements;
    # charged 9). fp64 sorts by torch's radix: the bits, their sorted copy, the int64 order
    # and the sort's own copies (measured 32 B/el, charged 33); longer keys rank group by
    # group: the bits, the ranks and a mask (measured 10.1 B/el, charged 11) and one group's
    # positions, values, sort, order and new ranks (52 B an entry of the group, charged 56
    # with the slices' temporaries)
    _kernel("della", broadcast=True, seeded=True, chunk=Chunk.WHOLE,
            workspace=Workspace(bytes=9, fp64=Workspace(
                bytes=33, long=(RADIX_SORT_MAX_ELEMS, 11, 56 * RANK_GROUP))),
            masks=(("rescale", False),)),
    _kernel("breadcrumbs", broadcast=True, chunk=Chunk.WHOLE, workspace=Workspace(bytes=4),
            masks=()),
    _kernel("clamp", broadcast=True),
    _kernel("iso", broadcast=True, chunk=Chunk.WHOLE, workspace=Workspace(tensors=3),  # SVD
            gain=_interpolation("z", 0.0)),
    # ------------------------------------------------------------ cluster filters
    # per slice: the votes' stack; their sum, magnitudes' sum, sign, a member's sign, the
    # agreement (ties: after each member's trim, whose magnitudes are 4 bytes per element)
    _kernel("elect", per_member=True, workspace=_sliced(1, 5)),
    _kernel("ties", per_member=True, chunk=Chunk.SPLIT, split="trim",
            workspace=_sliced(1, 5, bytes=4)),
    # ------------------------------------------------------------ inputs
    _kernel("zeros_like"),
]}
