"""Out-of-core planning: how a key whose in-memory evaluation does not fit `--memory-limit`
runs in chunks instead (runtime/chunked.py executes it). No torch here.

A key's graph is evaluated over chunks of its flattened elements, in passes:

- element-wise ops (arithmetic, means, medians, sign election, clamp, dare — whose random
  stream is indexed by flat position...) work on a chunk as on the whole key, so they cost
  nothing extra;
- Gram methods (geometric_median, model_stock, karcher, slerp) need the members' fp64 Gram
  matrix: one pass accumulates it chunk by chunk, the iterations run on coefficients, and
  the result is formed chunk by chunk in a later pass — one extra pass each;
- whole-key filters (trim, della, breadcrumbs, iso, and the trim inside ties) need a
  rank, threshold or SVD of the whole tensor: each filtered member is computed alone, in
  memory, and spilled to a temporary file in the compute dtype, which later passes read in
  chunks. A single member of the key must therefore fit the limit.

Chunks are a power of two in length, so they split into the same slices that the in-memory
kernels use (ops_base.flat_slices): out-of-core results are bit-identical to in-memory ones
whenever the chunk is at least one such slice.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ir import Node

GRAM_OPS = frozenset({"geometric_median", "model_stock", "karcher", "slerp"})
WHOLE_OPS = frozenset({"trim", "della", "breadcrumbs", "iso"})
SPLIT_OPS = frozenset({"ties"})  # trim each member whole, elect chunk by chunk
MIN_CHUNK = 1 << 12
# An out-of-core key takes at most this share of the limit per thread in flight, leaving the
# rest for other keys, read buffers and what the allocator keeps.
OOC_SHARE = 2


@dataclass(frozen=True)
class OutOfCore:
    chunk_elems: int
    chunks: int
    gram_passes: int  # extra passes over the inputs, one per Gram method
    spilled: int  # whole-key filter results written to temporary files
    spill_bytes: int
    extra_read_bytes: int  # reads beyond reading every input once (repeat passes, spills)
    whole_bytes: int  # peak of computing one whole-key filter in memory
    chunk_bytes: int  # peak of evaluating one chunk


def barriers(steps: list[Node]) -> list[Node]:
    """The nodes that need a whole key (in evaluation order)."""
    return [n for n in steps if n.op in GRAM_OPS | WHOLE_OPS | SPLIT_OPS]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def plan_key(job, per_element: float, limit: int, threads: int, item: int, headers,
             whole_per_element) -> OutOfCore:
    """The chunked evaluation of `job`. `per_element`: the in-memory peak bytes per element
    (an upper bound for one chunk's); `whole_per_element(node)`: the same for computing one
    whole-key filter alone (the caller refuses a key whose `whole_bytes` exceed the limit)."""
    numel = _numel(job.outputs[0].shape)
    walls = barriers(job.steps)
    # A Gram pass stacks a slice of its rows in the compute dtype and again in fp64 (the
    # in-memory estimate leaves this out: there the slice is capped by the kernel).
    per_element += max((len(n.inputs) * (item + 8) for n in walls if n.op in GRAM_OPS),
                       default=0)
    budget = max(1, limit // (OOC_SHARE * max(1, threads)))
    chunk = max(MIN_CHUNK, _pow2_floor(int(budget / max(per_element, 1.0))))
    chunk = min(chunk, max(MIN_CHUNK, 1 << max(0, (numel - 1).bit_length())))
    spilled = sum(len(n.inputs) if n.op in SPLIT_OPS else 1 for n in walls
                  if n.op not in GRAM_OPS)
    whole = max((int(whole_per_element(n) * numel) for n in walls if n.op not in GRAM_OPS),
                default=0)
    gram_passes = sum(1 for n in walls if n.op in GRAM_OPS)
    reads = _pass_reads(job, walls, headers, item * numel)
    return OutOfCore(chunk, -(-numel // chunk), gram_passes, spilled, spilled * numel * item,
                     max(0, reads - job.read_bytes), whole, int(chunk * per_element))


def _pass_reads(job, walls: list[Node], headers, spill_size: int) -> int:
    """Bytes read by all passes: each barrier's pass, then the final one. A pass reads the
    loads under its targets, stopping at filters already spilled (read back instead)."""
    spilled: set[int] = set()
    total = 0

    def reads(targets) -> int:
        seen, stack, got = set(), list(targets), 0
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if id(n) in spilled:
                got += spill_size * (len(n.inputs) if n.op in SPLIT_OPS else 1)
            elif n.op == "load":
                info = headers[n].tensors.get(job.key)
                got += info.nbytes if info is not None else 0
            elif n.op == "union":
                stack.append(job.union_choice[id(n)])
            else:
                stack.extend(n.inputs)
        return got

    for n in walls:
        total += reads(n.inputs)
        if n.op not in GRAM_OPS:
            spilled.add(id(n))
    return total + reads([o.node for o in job.outputs])
