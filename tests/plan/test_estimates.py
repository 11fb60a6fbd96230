"""The plan's peak-memory estimate: the terms that follow the kernels' real temporaries
(bench/estimates.py checks them against measured runs), and the streaming peak's bounds.

Inputs are header-only: a safetensors header and a sparse data region (planning reads no
tensor data), so keys can have real sizes at no cost."""

from __future__ import annotations

import json
import os
import struct

from karmixlang.api import compile as compile_recipe
from karmixlang.ops import OPS
from karmixlang.plan.outofcore import slice_step
from karmixlang.plan.schedule import HEAP_TRIM_THRESHOLD

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
    limit, and a heap keeps at most its trim threshold of freed blocks per thread. The plan
    must not add whole keys again for what the heap keeps (it said ~2.6× the limit)."""
    pool(tmp_path, 257, {"a.w": (512, 512), "b.w": (384, 512)})
    limit = 400 * MB
    # (a whole-key filter, as DGMLA's della: the keys are not chunked below the limit)
    c = plan(tmp_path, 'import "std/recipes.kmx" as std\n'
                       'save "out.safetensors" = std.breadcrumbs_ties(pool, o)', threads=2,
             memory_limit=limit)
    totals = c.plan.data["totals"]
    largest = max(j.est_bytes for j in c.schedule.jobs)
    assert largest > HEAP_TRIM_THRESHOLD  # a key the heap cannot keep whole
    assert sum(sorted(j.est_bytes for j in c.schedule.jobs)[-2:]) > limit  # not both at once
    assert largest <= totals["peak_memory_bytes"] <= limit + 2 * HEAP_TRIM_THRESHOLD


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


def test_della_is_charged_the_sort_its_key_size_takes():
    # Keys up to RADIX_SORT_MAX_ELEMS sort by radix (28 B/el while sorting); longer ones are
    # ranked group by group (10 B/el and 56 B an entry of one group of RANK_GROUP): a
    # whole-key estimate at a known size takes the one that runs.
    from karmixlang.ops import RADIX_SORT_MAX_ELEMS, RANK_GROUP

    della = OPS["della"].workspace
    assert della.whole_key(1, 4, RADIX_SORT_MAX_ELEMS) == della(1, 4) == 28
    assert RANK_GROUP == RADIX_SORT_MAX_ELEMS // 8
    assert della.whole_key(1, 4, RADIX_SORT_MAX_ELEMS + 1) == 10 + 7  # 56 / 8, rounded up
    assert della.whole_key(1, 4, 4 * RADIX_SORT_MAX_ELEMS) == 10 + 2
    assert OPS["trim"].workspace.whole_key(1, 4, 1 << 30) == OPS["trim"].workspace(1, 4)
