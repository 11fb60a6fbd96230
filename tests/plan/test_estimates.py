"""The plan's peak-memory estimate: the terms that follow the kernels' real temporaries
(bench/estimates.py checks them against measured runs), and the streaming peak's bounds.

Inputs are header-only: a safetensors header and a sparse data region (planning reads no
tensor data), so keys can have real sizes at no cost."""

from __future__ import annotations

import json
import math
import os
import struct

from karmixlang.api import compile as compile_recipe
from karmixlang.ops import OPS
from karmixlang.plan.outofcore import slice_step
from karmixlang.plan.schedule import HEAP_RELEASE_ABOVE, THREAD_OVERHEAD

from conftest import recipe

MB = 1 << 20


def header_only(path, tensors: dict[str, tuple[int, ...]]) -> None:
    """An fp16 safetensors file with these keys, its data a hole (never read by planning)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset,
                                                                              offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def pool(folder, members: int, tensors: dict[str, tuple[int, ...]]) -> None:
    header_only(os.path.join(folder, "base.safetensors"), tensors)
    os.makedirs(os.path.join(folder, "m"))
    for i in range(members):
        header_only(os.path.join(folder, "m", f"{i:03}.safetensors"), tensors)


HEAD = 'base o = "base.safetensors"\ncluster pool = glob("m/*.safetensors")\n'


def plan(folder, text: str, **options):
    return compile_recipe(recipe(folder, HEAD + text), **options)


def test_many_members_stay_within_what_admission_allows(tmp_path):
    """257 members of keys under 32 MB each (the 257-model DGMLA's case, small): every key
    holds far more than the limit's share, yet admission runs them one at a time under the
    limit, and after a key over HEAP_RELEASE_ABOVE the heaps hand their free pages back. The
    plan must not add whole keys again for what the heap keeps (it said ~2.6× the limit)."""
    pool(tmp_path, 257, {"a.w": (512, 512), "b.w": (384, 512)})
    limit = 400 * MB
    # (a whole-key filter, as DGMLA's della: the keys are not chunked below the limit)
    c = plan(tmp_path, 'import "std/recipes.kmx" as std\n'
                       'save "out.safetensors" = std.breadcrumbs_ties(pool, o)', threads=2,
             memory_limit=limit)
    totals = c.plan.data["totals"]
    largest = max(j.est_bytes for j in c.schedule.jobs)
    assert largest > HEAP_RELEASE_ABOVE  # a key the heap does not keep
    assert sum(sorted(j.est_bytes for j in c.schedule.jobs)[-2:]) > limit  # not both at once
    assert largest <= totals["peak_memory_bytes"] <= limit + 2 * HEAP_RELEASE_ABOVE


def _heap_reserve(c, threads: int) -> int:
    """What the streaming peak adds beyond the `threads` largest keys and each thread's own
    overhead."""
    live = sum(sorted(j.est_bytes for j in c.schedule.jobs)[-threads:])
    return c.plan.data["totals"]["peak_memory_bytes"] - live - threads * THREAD_OVERHEAD


FOUR_KEYS = {f"k{i}.w": (1024, 1024 + i) for i in range(4)}  # two in flight, two before


def test_the_heap_reserve_is_earlier_keys_temporaries_not_their_read_buffers(tmp_path):
    """A weighted sum reads its members through the thread's reused buffers, which stay
    allocated from key to key (they are the keys in flight's own): what a thread's heap keeps
    beside the key it runs is an earlier key's result and its finiteness check, not that
    whole key again. Each key runs once, so the earlier keys are the next largest ones."""
    pool(tmp_path, 4, FOUR_KEYS)
    c = plan(tmp_path, 'save "out.safetensors" = mean(pool) with dtype="fp16"', threads=2,
             memory_limit=1 << 40)
    earlier = sorted(c.schedule.jobs, key=lambda j: j.est_bytes)[:2]
    assert all(0 < j.scratch_bytes < j.est_bytes for j in earlier)
    # the fp32 result, its fp16 cast and the fp32 copy the check sums
    assert _heap_reserve(c, 2) == sum(j.est_bytes - j.scratch_bytes for j in earlier) == \
        sum(math.prod(j.outputs[0].shape) * (4 + 2 + 4) for j in earlier)


def test_the_heap_reserve_is_whole_earlier_keys_of_temporaries(tmp_path):
    """A trim-and-elect key frees many temporaries of its own size: a heap can keep an
    earlier such key's worth beside the next (measured on the LLM TIES bench: 283-524 MiB for
    two threads' keys of 150 MiB), more than the 64 MB a single glibc heap holds, so the
    reserve is those keys' temporaries, up to HEAP_RELEASE_ABOVE (after a larger key the
    runtime releases the free pages: the 257-member test above)."""
    pool(tmp_path, 4, {f"k{i}.w": (2048, 2048 + i) for i in range(4)})
    c = plan(tmp_path, 'save "out.safetensors" = o + ties_merge(trim(pool - o, density=0.2))',
             threads=2, memory_limit=1 << 40)
    earlier = sorted(c.schedule.jobs, key=lambda j: j.est_bytes)[:2]
    assert all(j.ooc is None and 64 * MB < j.est_bytes <= HEAP_RELEASE_ABOVE for j in earlier)
    assert _heap_reserve(c, 2) == sum(j.est_bytes - j.scratch_bytes for j in earlier)


def test_stacking_kernels_are_charged_per_slice_not_per_key(tmp_path):
    """ties_merge stacks its members one kernel slice at a time: beyond a slice, a larger key
    adds only what scales with the key (the members, the result, read buffers), and the
    stack's share is the same slice's whatever the key's size."""
    n = 8
    step = slice_step(n)
    sizes = {f"k{m}.w": (m * step // 1024, 1024) for m in (1, 2, 4)}  # 1, 2 and 4 slices
    pool(tmp_path, n, sizes)
    c = plan(tmp_path, 'save "out.safetensors" = o + ties_merge(pool - o)', threads=1,
             memory_limit=1 << 40)
    est = {j.key: j.mem_bytes for j in c.schedule.jobs}
    per_element = (est["k4.w"] - est["k2.w"]) // (2 * step)
    assert est["k2.w"] - est["k1.w"] == per_element * step  # linear beyond one slice
    stack = OPS["ties_merge"].workspace.per_slice_element(n, 4) * step
    assert est["k1.w"] - per_element * step == stack  # one slice's stack, whatever the size
    assert per_element < n * 4 * 2  # the members and no more than one copy of them


def test_della_is_charged_the_sort_its_key_size_and_dtype_take():
    # fp32 sorts packed keys at any size (9 B/el). fp64 keys up to RADIX_SORT_MAX_ELEMS sort
    # by radix (33 B/el); longer ones are ranked group by group (11 B/el and 56 B an entry of
    # one group of RANK_GROUP): a whole-key estimate at a known size takes the one that runs.
    from karmixlang.ops import RADIX_SORT_MAX_ELEMS, RANK_GROUP

    della = OPS["della"].workspace
    for numel in (1, RADIX_SORT_MAX_ELEMS, RADIX_SORT_MAX_ELEMS + 1, 1 << 30):
        assert della.whole_key(1, 4, numel) == della(1, 4) == 9
        assert della.whole_key(1, 2, numel) == 9
    assert della.whole_key(1, 8, RADIX_SORT_MAX_ELEMS) == della(1, 8) == 33
    assert RANK_GROUP == RADIX_SORT_MAX_ELEMS // 8
    assert della.whole_key(1, 8, RADIX_SORT_MAX_ELEMS + 1) == 11 + 7  # 56 / 8, rounded up
    assert della.whole_key(1, 8, 4 * RADIX_SORT_MAX_ELEMS) == 11 + 2
    assert OPS["trim"].workspace.whole_key(1, 4, 1 << 30) == OPS["trim"].workspace(1, 4)


def test_della_keys_over_half_a_gib_a_member_spill_their_members(tmp_path):
    """SD1.5's largest convolutions (29.5 M elements): one member's DELLA holds ~0.86 GB, so
    the key runs in chunks, each member filtered alone and spilled, instead of holding all
    four results beside the sort; a 14.7 M-element key (~0.43 GB a member) runs whole."""
    pool(tmp_path, 4, {"conv.big": (1280, 2560, 3, 3), "conv.mid": (1280, 1280, 3, 3)})
    compiled = plan(tmp_path, 'save "out.safetensors" = o + ties_merge(della(pool - o, '
                              'p=0.5, eps=0.1, seed=3), rule="count")', threads=2)
    jobs = {j.key: j for j in compiled.schedule.jobs}
    big = jobs["conv.big"].ooc
    assert big is not None and not big.over_limit and big.spilled == 4
    assert 512 * MB < big.whole_bytes <= 1024 * MB
    assert jobs["conv.mid"].ooc is None
