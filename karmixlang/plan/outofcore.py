"""Out-of-core planning: how a key whose in-memory evaluation does not fit `--memory-limit`
runs in chunks instead (runtime/chunked.py executes it). No torch here.

A key's graph is evaluated over chunks of its flattened elements, in passes (each op's kind is
its `chunk` in ops.OPS):

- element-wise ops (arithmetic, means, medians, sign election, clamp, dare — whose random
  stream is indexed by flat position...) work on a chunk as on the whole key, so they cost
  nothing extra;
- Gram methods (geometric_median, model_stock, karcher, slerp) need the members' fp64 Gram
  matrix: one pass accumulates it chunk by chunk, the iterations run on coefficients, and
  the result is formed chunk by chunk in a later pass — one extra pass each;
- trim (alone or inside ties) finds each member's threshold, the exact k-th largest
  magnitude of its fp32 bits, in one pass that keeps the candidates around a guess made from
  a sample of blocks of the key (at most a quarter of a pass), two passes of a radix
  selection more where the guess missed; then it masks chunk by chunk. Trims that need none
  of each other's results (the members of a cluster) share their passes (`barrier_groups`):
  one extra pass for them all, and no member is ever held whole;
- the other whole-key filters (della, breadcrumbs, iso; trim in fp64) need a
  rank, threshold or SVD of the whole tensor: each filtered member is computed alone, in
  memory, and spilled to a temporary file in the compute dtype, which later passes read in
  chunks. A single member of the key must therefore fit the limit. A filter whose result is
  its input or zero entry by entry (della without rescale, breadcrumbs, trim: OPS' `masks`)
  spills only its keep mask, a bit an element; later passes read the mask and form the
  input again from its own inputs (for a task vector: the model and the base, in their
  stored dtype), a fraction of the compute-dtype result's bytes.

Chunks are a power of two in length, so they split into the same slices that the in-memory
kernels use (runtime/kernels/base.flat_slices): out-of-core results are bit-identical to in-memory ones
whenever the chunk is at least one such slice, which the chunk length is raised to when the
limit allows.

A key that fits the limit but is large (CHUNK_ABOVE_BYTES; TRIM_IN_MEMORY_BYTES where its only
barriers are trims by threshold) and needs no whole-key filter runs in chunks as well: it
costs at most the Gram and trim passes' rereads (cheaper than faulting in whole-key buffers)
and bounds resident memory. A key whose other whole-key filter holds over SPILL_ABOVE_BYTES
for one member does too, spilling the filter's results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from karmixlang.io.dtypes import DTYPES
from karmixlang.ops import OPS, Chunk

# The kernels work on power-of-two slices of a key's flattened elements, about this many
# elements in all over the stacked rows (runtime/kernels/base.flat_slices).
KERNEL_SLICE_ELEMS = 1 << 21
MIN_SLICE = 1 << 12
MIN_CHUNK = MIN_SLICE
# A key over the limit gets chunks of at most this share of it, leaving the rest for other
# keys, read buffers and what the allocator keeps (admission keeps the sum under the limit).
OOC_SHARE = 4
# A key that fits the limit but would hold more than this runs in chunks too, when that costs
# no temporary files (no whole-key filter but trims by threshold): large buffers cost page
# faults, and resident memory then stays near this per key in flight.
CHUNK_ABOVE_BYTES = 32 << 20
# ... but a key whose only barriers are trims by threshold stays in memory up to this: there
# one read and a radix selection of each member's threshold (kernels/sparse.py) take less
# than the chunked trims' three passes over the inputs (SD1.5 TIES, N = 4: 40.9 -> 35.7 s,
# resident growth 91 -> 559 MB; sd-mecha holds ~6 GB)
TRIM_IN_MEMORY_BYTES = 256 << 20
# A key that fits, but whose whole-key filter alone would hold more than this for one
# member, runs in chunks even though that spills the filter's results (DELLA on an
# embedding or the largest convolutions: a few keys of a checkpoint, whatever the pool's
# size): the filter then holds one member, never all of them beside its sort. At 1 GiB,
# two of SD1.5's 29.5 M-element DELLA keys in flight held a run at ~2.0 GiB; at 512 MiB
# ~1.5 GiB in most runs, in the same time (their temporary files stay in the page cache).
SPILL_ABOVE_BYTES = 512 << 20
# The candidates around the guessed thresholds of a group of trims (OutOfCore.candidates) may
# take this much in a key that fits the limit.
CANDIDATE_BYTES = 64 << 20


def slice_step(rows: int) -> int:
    """The kernels' slice length for `rows` stacked tensors (a power of two)."""
    return max(MIN_SLICE, _pow2_floor(KERNEL_SLICE_ELEMS // max(rows, 1)))


@dataclass(frozen=True)
class OutOfCore:
    chunk_elems: int
    chunks: int
    passes: int  # extra passes over the inputs: one per Gram method, one per group of trims
    spilled: int  # whole-key filter results written to temporary files
    spill_bytes: int
    extra_read_bytes: int  # reads beyond reading every input once (repeat passes, spills)
    whole_bytes: int  # peak of computing one whole-key filter in memory
    chunk_bytes: int  # peak of evaluating one chunk
    over_limit: bool  # chunked because it does not fit the limit (else: to bound memory)
    candidates: int  # entries of a trim's member kept around its guessed threshold, at most


def threshold_trim(n, itemsize: int) -> bool:
    """trim, and the trim inside ties, find each member's threshold in passes over the
    chunks (an exact selection on fp32 magnitude bits) instead of spilling; other whole-key
    filters, and fp64, are spilled."""
    return itemsize == 4 and OPS[n.op].chunk in (Chunk.THRESHOLD, Chunk.SPLIT)


def barrier_groups(nodes, job, itemsize: int) -> list[list[int]]:
    """The key's barriers in groups that run their passes together, in an order that
    evaluates each after the barriers it reads from: a trim by threshold joins the first
    group of trims after the last group holding a barrier upstream of it (the trims of a
    cluster's members share one group, their trims' trims the next); every other barrier is
    a group of its own, after those before it in evaluation order."""
    groups: list[list[int]] = []
    for i in barriers(nodes, job.steps):
        if not threshold_trim(nodes[i], itemsize):
            groups.append([i])
            continue
        upstream = _upstream(nodes, job, i)
        after = max((g for g, group in enumerate(groups) if upstream.intersection(group)),
                    default=-1)
        joins = next((g for g in range(after + 1, len(groups))
                      if threshold_trim(nodes[groups[g][0]], itemsize)), None)
        if joins is None:
            groups.append([i])
        else:
            groups[joins].append(i)
    return groups


def _upstream(nodes, job, i: int) -> set[int]:
    """The nodes whose values node i's value is computed from, for this key."""
    seen, stack = set(), list(job.reads(nodes, i))
    while stack:
        x = stack.pop()
        if x not in seen:
            seen.add(x)
            stack.extend(job.reads(nodes, x))
    return seen


def barriers(nodes, steps) -> list[int]:
    """The steps that need a whole key (in evaluation order); `nodes`: the node table."""
    return [i for i in steps if OPS[nodes[i].op].barrier]


def _gram(n) -> bool:
    return OPS[n.op].chunk is Chunk.GRAM


def _spilled_members(n) -> int:
    """Temporary files a spilled filter writes: one per member when it is split (ties)."""
    return len(n.inputs) if OPS[n.op].chunk is Chunk.SPLIT else 1


def mask_spill(n) -> bool:
    """A spilled filter whose spill is its keep mask (one file, a bit an element)."""
    masks = OPS[n.op].masks
    return (OPS[n.op].chunk is not Chunk.SPLIT and masks is not None
            and all(n.attr(name) == value for name, value in masks))


def _spill_bytes(n, numel: int, item: int) -> int:
    """Bytes of a spilled filter's temporary files."""
    return -(-numel // 8) if mask_spill(n) else _spilled_members(n) * numel * item


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def chunking_for(job, nodes, per_element: float, limit: int, item: int,
                 whole_per_element, chunk_per_element: float) -> OutOfCore | None:
    """The chunked evaluation of `job` (over the node table `nodes`) under `limit`, or None
    when it fits and chunking it would not pay. `per_element`: the in-memory peak bytes per
    element (an upper bound for one chunk's); `whole_per_element(node, numel)`: the same for
    computing one whole-key filter alone (the caller refuses a key whose `whole_bytes` exceed
    the limit); `chunk_per_element`: the peak bytes per element of a chunk of at most one
    kernel slice (a kernel's per-slice stack, which the key's estimate spreads over the
    key, is whole there). The chunk length depends on the limit, never on the thread count:
    the bytes of a result must not."""
    numel = math.prod(job.outputs[0].shape)
    walls = [nodes[i] for i in barriers(nodes, job.steps)]
    over = per_element * numel > limit
    if any(DTYPES[t.dtype].bits % 8 for t in job.tensors.values()):
        return None  # packed sub-byte elements (F4, F6) cannot be cut at any element
    if not all(t.flat for t in job.tensors.values()):
        return None  # a transposed view or a row gather has no flat byte ranges: read whole
    spills = [n for n in walls if not _gram(n) and not threshold_trim(n, item)]
    whole = max((int(whole_per_element(n, numel) * numel) for n in spills), default=0)
    trims_only = walls and all(threshold_trim(n, item) for n in walls)
    in_memory_up_to = TRIM_IN_MEMORY_BYTES if trims_only else CHUNK_ABOVE_BYTES
    if not over and (per_element * numel <= in_memory_up_to or
                     spills and whole <= SPILL_ABOVE_BYTES):
        return None
    rows = max((len(n.inputs) for n in walls if _gram(n)), default=0)
    per_element = chunk_per_element
    budget = limit // OOC_SHARE if over else CHUNK_ABOVE_BYTES
    chunk = max(MIN_CHUNK, _pow2_floor(int(budget / max(per_element, 1.0))))
    # Whole kernel slices make the Gram sums, hence the bytes, those of the in-memory run.
    step = slice_step(rows) if rows else 0
    if chunk < step and step * per_element <= limit // 2:
        chunk = step
    chunk = min(chunk, max(MIN_CHUNK, 1 << max(0, (numel - 1).bit_length())))
    if not over and chunk >= numel:
        return None
    spilled = sum(_spilled_members(n) for n in spills)
    groups = barrier_groups(nodes, job, item)
    passes = sum(1 for g in groups if _gram(nodes[g[0]]) or threshold_trim(nodes[g[0]], item))
    reads = _pass_reads(job, nodes, groups, numel, item)
    # A group's members keep their candidates during its first pass, together: a 16th of
    # the key each at most, and all of them within CANDIDATE_BYTES, or a chunk's budget over
    # the limit (past it, a guess is given up for the radix selection's passes).
    trimmed = max((sum(len(nodes[i].inputs) for i in g) for g in groups
                   if threshold_trim(nodes[g[0]], item)), default=0)
    candidates = min(numel // 16,
                     (budget if over else CANDIDATE_BYTES) // max(trimmed * item, 1))
    return OutOfCore(chunk, -(-numel // chunk), passes, spilled,
                     sum(_spill_bytes(n, numel, item) for n in spills),
                     max(0, reads - job.read_bytes), whole,
                     int(chunk * per_element) + trimmed * candidates * item, over, candidates)


def _pass_reads(job, nodes, groups: list[list[int]], numel: int, item: int) -> int:
    """Bytes read by all passes: each group of barriers' pass (a group of trims: the one
    that finds their thresholds when their guesses hold), then the final one. A pass reads
    the loads under its targets, stopping at filters already spilled (read back instead; a
    mask spill reads its mask and the loads under its input too)."""
    spilled: set[int] = set()
    total = 0

    def reads(targets) -> int:
        seen, stack, got = set(), list(targets), 0
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            n = nodes[i]
            if i in spilled:
                got += _spill_bytes(n, numel, item)
                if mask_spill(n):
                    stack.extend(job.reads(nodes, i))
            elif n.op == "load":
                info = job.tensors.get(i)
                got += info.nbytes if info is not None else 0
            else:
                stack.extend(job.reads(nodes, i))
        return got

    for group in groups:
        total += reads([x for i in group for x in nodes[i].inputs])
        if not _gram(nodes[group[0]]) and not threshold_trim(nodes[group[0]], item):
            spilled.add(group[0])
    return total + reads([o.node for o in job.outputs])
