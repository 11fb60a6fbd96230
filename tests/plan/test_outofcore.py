"""Out-of-core keys: a key whose members do not fit --memory-limit runs in chunks, with the
same bytes as the in-memory run; the plan says which keys and what it costs; measured memory
stays under the limit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from karmixlang.api import compile as compile_recipe
from karmixlang.diagnostics import KmxError
from karmixlang.plan import outofcore
from karmixlang.runtime import chunked
from karmixlang.runtime.executor import RunOptions, execute
from karmixlang.runtime.kernels import base as kernel_base, sparse
from karmixlang.demo.synth import write_model, write_tuned_pool

from conftest import recipe

MB = 1 << 20


def pool(folder, n: int, big=(256, 256), seed=0) -> None:
    """A base and `n` fine-tunes: one large fp16 key, smaller fp32 keys, an integer buffer."""
    rng = np.random.default_rng(seed)
    base = {
        "big.w": rng.normal(size=big).astype(np.float16),
        "conv.w": rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
        "norm.b": rng.normal(size=(16,)).astype(np.float32),
        "ids": np.arange(6, dtype=np.int64),
    }
    write_tuned_pool(folder, base, n, rng)


HEAD = """
import "std/recipes.kmx" as std
base o = "base.safetensors"
cluster pool = glob("m/*.safetensors")
"""

RECIPES = {
    "geometric_median": 'save "out.safetensors" = o + geometric_median(pool - o)',
    "dgmla": 'save "out.safetensors" = std.dgmla(pool, o, 7)',
    "model_stock": 'save "out.safetensors" = std.model_stock_soup(pool, o)',
    "karcher_slerp": ('model a = "m/000.safetensors"\nmodel b = "m/001.safetensors"\n'
                      'save "out.safetensors" = o + karcher(pool - o) + slerp(a, b, t=0.3) - a'),
    "ties": 'save "out.safetensors" = std.ties_merging(pool, o)',
    "ties_soup": 'save "out.safetensors" = std.ties_soup(pool, o)',
    "dare_median": 'save "out.safetensors" = o + median(dare(pool - o, p=0.5, seed=3))',
    "dare_ties": 'save "out.safetensors" = std.dare_ties(pool, o, 11)',
    "breadcrumbs": 'save "out.safetensors" = std.breadcrumbs_ties(pool, o)',
    "dgmiz_two_saves": ('save "out.safetensors" = std.dgmiz(pool, o, 5)\n'
                        'save "avg.safetensors" = mean(pool) with dtype="fp16", fallback=o'),
}


@pytest.fixture
def small_slices(monkeypatch):
    """Kernel slices small enough that the tiny test keys still split into several: the
    out-of-core chunks then cover whole slices, as they do at real sizes. Nothing is chunked
    below the limit, so the reference runs hold whole keys."""
    monkeypatch.setattr(outofcore, "KERNEL_SLICE_ELEMS", 1 << 14)
    monkeypatch.setattr(outofcore, "CHUNK_ABOVE_BYTES", 1 << 62)


def run_both(folder, text: str, limit: int):
    path = recipe(folder, HEAD + text)
    chunked = compile_recipe(path, threads=2, memory_limit=limit)
    ooc = [j for j in chunked.schedule.jobs if j.ooc is not None]
    execute(chunked, RunOptions(threads=2, memory_limit=limit))
    outs = [s.path for s in chunked.graph.saves]
    got = {p: open(p, "rb").read() for p in outs}
    execute(compile_recipe(path, threads=2), RunOptions(threads=2, force=True, reuse=False))
    want = {p: open(p, "rb").read() for p in outs}
    return ooc, got, want


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_out_of_core_output_is_bit_identical(tmp_path, small_slices, name):
    pool(tmp_path, 6)
    # under every recipe's in-memory estimate of big.w (the kernels' stacks are per slice),
    # and above DELLA's floor: one member and its radix sort, 48 B/el
    limit = 13 * MB // 4 if name in ("dgmla", "dgmiz_two_saves") else 9 * MB // 4
    ooc, got, want = run_both(tmp_path, RECIPES[name], limit)
    assert [j.key for j in ooc] == ["big.w"]
    assert ooc[0].ooc.chunks > 1
    for path in want:
        assert got[path] == want[path], path


def test_a_median_of_many_members_out_of_core_is_bit_identical(tmp_path, small_slices):
    members = 33  # enough for the Gram sum by BLAS syrk, added chunk by chunk
    assert kernel_base._SYRK_ROWS <= members
    pool(tmp_path, members)
    ooc, got, want = run_both(tmp_path, RECIPES["geometric_median"], 8 * MB)
    assert [j.key for j in ooc] == ["big.w"] and ooc[0].ooc.chunks > 1
    assert got == want


def test_a_large_della_key_within_the_limit_spills_its_members_with_the_same_bytes(
        tmp_path, monkeypatch):
    pool(tmp_path, 4)
    path = recipe(tmp_path, HEAD + 'save "out.safetensors" = std.della_ties(pool, o, 3)')
    monkeypatch.setattr(outofcore, "SPILL_ABOVE_BYTES", 1 * MB)  # big.w holds ~3 MB
    monkeypatch.setattr(outofcore, "CHUNK_ABOVE_BYTES", 256 << 10)
    spilling = compile_recipe(path, threads=2)
    [job] = [j for j in spilling.schedule.jobs if j.ooc is not None]
    assert job.key == "big.w" and not job.ooc.over_limit and job.ooc.spilled == 4
    execute(spilling, RunOptions(threads=2))
    got = open(spilling.graph.saves[0].path, "rb").read()
    monkeypatch.setattr(outofcore, "SPILL_ABOVE_BYTES", 1 << 62)
    in_memory = compile_recipe(path, threads=2)
    assert all(j.ooc is None for j in in_memory.schedule.jobs)
    execute(in_memory, RunOptions(threads=2, force=True, reuse=False))
    assert open(in_memory.graph.saves[0].path, "rb").read() == got


def test_plan_names_out_of_core_keys_and_their_cost(tmp_path):
    pool(tmp_path, 6)
    path = recipe(tmp_path, HEAD + RECIPES["dgmla"])
    data = json.loads(subprocess.run(
        [sys.executable, "-m", "karmixlang", "plan", path, "--json", "--memory-limit", "4MB",
         "--threads", "2"], capture_output=True, text=True, check=True).stdout)
    ooc = data["totals"]["out_of_core"]
    assert ooc["keys"] == 1 and ooc["examples"][0]["key"] == "big.w"
    ex = ooc["examples"][0]
    assert ex["extra_passes"] == 1  # one geometric median
    assert ex["spilled"] == 6  # every member's DELLA result
    # DGMLA's DELLA does not rescale: each member spills its keep mask, a bit an element
    mask, stored = 256 * 256 // 8, 256 * 256 * 2  # big.w is fp16
    assert ex["spill_bytes"] == 6 * mask
    # each DELLA reads its member and the base; the Gram pass and the last pass read the
    # masks and, to form the deltas again, every member and the base; the inputs once less
    assert ex["extra_read_bytes"] == 6 * 2 * stored + 2 * (6 * mask + 7 * stored) - 7 * stored
    text = subprocess.run([sys.executable, "-m", "karmixlang", "plan", path, "--memory-limit",
                           "4MB", "--threads", "2"], capture_output=True, text=True,
                          check=True).stdout
    assert "Out of core (1 key run in chunks: 1 too large" in text and "big.w" in text
    # Unlimited, nothing goes out of core and the plan says nothing about it.
    plain = subprocess.run([sys.executable, "-m", "karmixlang", "plan", path],
                           capture_output=True, text=True, check=True).stdout
    assert "Out of core" not in plain


def test_trim_finds_its_threshold_in_passes_and_spills_nothing(tmp_path):
    pool(tmp_path, 3)
    path = recipe(tmp_path, HEAD + RECIPES["ties"])
    job = next(j for j in compile_recipe(path, memory_limit=512 << 10).schedule.jobs if j.ooc)
    assert job.ooc.spilled == 0 and job.ooc.whole_bytes == 0
    assert job.ooc.passes == 1  # the three members' trims share their pass
    # In fp64 the magnitude bits do not fit the two 16-bit levels: trims spill there.
    job = next(j for j in compile_recipe(path, memory_limit=3 << 20, compute_dtype="fp64")
               .schedule.jobs if j.ooc)
    assert job.ooc.spilled == 3


def sparse_pool(folder, n: int, seed=0, shape=(256, 256)) -> None:
    """Fine-tunes that keep 30 % of the base's entries as they are (exact zeros in their task
    vectors, as real fine-tunes have), the rest fp16 differences (many repeated magnitudes)."""
    rng = np.random.default_rng(seed)
    base = {"big.w": rng.normal(size=shape).astype(np.float16)}
    write_model(os.path.join(folder, "base.safetensors"), base)
    os.makedirs(os.path.join(folder, "m"), exist_ok=True)
    for i in range(n):
        w = base["big.w"] + (0.05 * rng.normal(size=shape)).astype(np.float16)
        same = rng.random(w.shape) < 0.3
        w[same] = base["big.w"][same]
        write_model(os.path.join(folder, "m", f"{i:03d}.safetensors"), {"big.w": w})


def count_levels(monkeypatch) -> list:
    """The levels of the out-of-core trims' counting passes, one entry a member and chunk."""
    levels = []
    count = chunked._Top.count
    monkeypatch.setattr(chunked._Top, "count",
                        lambda top, bits, level: levels.append(level) or count(top, bits, level))
    return levels


@pytest.mark.parametrize("density, rule", [(0.3, "count"), (0.7, "mass"), (0.75, "count"),
                                           (0.9, "mass")])
def test_trim_by_threshold_among_many_zeros_is_bit_identical(tmp_path, small_slices,
                                                              monkeypatch, density, rule):
    """At a density past the share of non-zero entries the threshold is 0: its ties (the
    zeros) are kept by position across chunks, and the second selection pass is skipped."""
    sparse_pool(tmp_path, 4)
    levels = count_levels(monkeypatch)
    text = f'save "out.safetensors" = o + ties_merge(trim(pool - o, density={density}), ' \
           f'rule="{rule}") with dtype="fp32"'
    ooc, got, want = run_both(tmp_path, text, 1 * MB)
    assert [j.key for j in ooc] == ["big.w"] and ooc[0].ooc.chunks > 1
    assert got == want
    # ~70 % of each task vector is non-zero: past that density one pass finds the thresholds
    assert (1 in levels) == (density < 0.7)


@pytest.mark.parametrize("density, rule", [(0.1, "mass"), (0.5, "count"), (0.75, "mass")])
@pytest.mark.parametrize("guess", ["holds", "misses"])
def test_trims_found_from_a_sampled_bracket_are_bit_identical(tmp_path, small_slices,
                                                              monkeypatch, density, rule, guess):
    """A key of 2**18 entries finds its members' thresholds in one pass over the candidates
    around a sampled guess, all members in the same pass; where a guess misses (forced here)
    the radix selection's two passes find them; the bytes are the in-memory run's either way."""
    sparse_pool(tmp_path, 4, shape=(512, 512))
    if guess == "misses":
        monkeypatch.setattr(sparse.Bracket, "found", lambda self: None)
    levels = count_levels(monkeypatch)
    text = f'save "out.safetensors" = o + ties_merge(ties(pool - o, density={density}, ' \
           f'rule="{rule}"), rule="{rule}") with dtype="fp32"'
    ooc, got, want = run_both(tmp_path, text, 4 * MB)
    assert [j.key for j in ooc] == ["big.w"] and ooc[0].ooc.passes == 1
    assert got == want
    chunks = ooc[0].ooc.chunks
    if guess == "holds":
        assert levels == [chunked._BRACKET] * (4 * chunks)
    else:  # past the zeros (density 0.75) the radix selection needs one level, else two
        radix = [0] if density > 0.7 else [0, 1]
        assert levels == [lv for lv in [chunked._BRACKET, *radix] for _ in range(4 * chunks)]


def test_trims_of_trims_select_in_groups_that_need_none_of_each_other(tmp_path, small_slices):
    """A trim of a cluster's trimmed members needs their thresholds first: two groups of
    passes, each shared by the members, with the in-memory bytes."""
    sparse_pool(tmp_path, 3, shape=(512, 512))
    text = 'save "out.safetensors" = o + ties_merge(trim(trim(pool - o, density=0.6), ' \
           'density=0.3)) with dtype="fp32"'
    ooc, got, want = run_both(tmp_path, text, 4 * MB)
    job = ooc[0]
    nodes = compile_recipe(recipe(tmp_path, HEAD + text), memory_limit=4 * MB).schedule.executable.nodes
    assert [len(g) for g in outofcore.barrier_groups(nodes, job, 4)] == [3, 3]
    assert job.ooc.passes == 2
    assert got == want


def test_a_large_trim_key_runs_in_chunks_below_the_limit(tmp_path, monkeypatch):
    """trim finds its thresholds without temporary files, so a large key that fits the limit
    runs in chunks, bounding the memory of the keys in flight."""
    monkeypatch.setattr(outofcore, "CHUNK_ABOVE_BYTES", 1 * MB)
    monkeypatch.setattr(outofcore, "TRIM_IN_MEMORY_BYTES", 1 * MB)
    sparse_pool(tmp_path, 4)
    path = recipe(tmp_path, HEAD + RECIPES["ties"])
    job = next(j for j in compile_recipe(path).schedule.jobs if j.key == "big.w")
    assert job.ooc is not None and not job.ooc.over_limit and job.ooc.spilled == 0
    assert job.est_bytes <= 1 * MB < job.mem_bytes


def test_trims_stay_in_memory_up_to_their_own_threshold(tmp_path, monkeypatch):
    """A key whose only barriers are trims by threshold is chunked above TRIM_IN_MEMORY_BYTES,
    not CHUNK_ABOVE_BYTES: in memory it is read once, chunked three times."""
    monkeypatch.setattr(outofcore, "CHUNK_ABOVE_BYTES", 1 * MB)
    sparse_pool(tmp_path, 4)
    path = recipe(tmp_path, HEAD + RECIPES["ties"])
    job = next(j for j in compile_recipe(path).schedule.jobs if j.key == "big.w")
    assert job.ooc is None and job.est_bytes > 1 * MB
    monkeypatch.setattr(outofcore, "TRIM_IN_MEMORY_BYTES", job.est_bytes - 1)
    job = next(j for j in compile_recipe(path).schedule.jobs if j.key == "big.w")
    assert job.ooc is not None and job.est_bytes <= 1 * MB


def test_a_member_that_cannot_fit_is_a_planning_error(tmp_path):
    pool(tmp_path, 3)
    path = recipe(tmp_path, HEAD + 'save "out.safetensors" = std.della_ties(pool, o, 1)')
    with pytest.raises(KmxError) as exc:
        compile_recipe(path, memory_limit=512 << 10)
    d = exc.value.diagnostics[0]
    assert d.code == "K0408" and "big.w" in d.message and "--memory-limit" in d.help


@pytest.mark.parametrize("name, big", [("geometric_median", (4096, 4096)),
                                       ("dgmla", (2048, 2048)), ("ties", (2048, 2048))])
def test_many_models_run_under_a_tight_limit(tmp_path, monkeypatch, name, big):
    """32 fine-tunes of a large key (2 GB to hold in fp32 for the geometric median; 1.6 GB
    for DGMLA, whose DELLA spills each member; 1.4 GB for TIES, whose trims find their
    thresholds in passes) merged under a 256 MB limit. Measured in a fresh process (resident
    growth during the run)."""
    pool(tmp_path, 32, big=big)
    path = recipe(tmp_path, HEAD + RECIPES[name])
    proc = subprocess.run([sys.executable, "-m", "karmixlang", "run", path, "--memory-limit",
                           "256MB", "--threads", "2", "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    peak = re.search(r"peak memory ([\d.]+) (MB|GB|KB|B) \(resident growth\)", proc.stderr)
    value = float(peak.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[peak.group(2)]
    assert value < 256 * MB, proc.stderr
    chunked = open(tmp_path / "out.safetensors", "rb").read()
    # The reference holds the whole key: nothing chunked to save memory either.
    monkeypatch.setattr(outofcore, "CHUNK_ABOVE_BYTES", 1 << 62)
    reference = compile_recipe(path, threads=2)
    assert not any(j.ooc for j in reference.schedule.jobs)
    execute(reference, RunOptions(threads=2, force=True, reuse=False))
    assert open(tmp_path / "out.safetensors", "rb").read() == chunked


def test_nan_in_an_out_of_core_key_falls_back_whole(tmp_path, small_slices):
    """A NaN found in a later chunk, after earlier pieces were written: with
    --nonfinite=fallback the key is rewritten whole from the fallback, as in memory."""
    pool(tmp_path, 6)
    path = os.path.join(tmp_path, "m", "003.safetensors")
    tensors = load_file(path)
    tensors["big.w"][-1, -1] = np.nan  # in the last chunk
    write_model(path, tensors)
    text = RECIPES["geometric_median"] + " with fallback=o"
    chunked = compile_recipe(recipe(tmp_path, HEAD + text), threads=1, memory_limit=2 * MB)
    assert [j.key for j in chunked.schedule.jobs if j.ooc is not None] == ["big.w"]
    with pytest.raises(KmxError) as exc:
        execute(chunked, RunOptions(threads=1, memory_limit=2 * MB))
    assert exc.value.diagnostics[0].code == "K0401"
    result = execute(chunked, RunOptions(threads=1, memory_limit=2 * MB, nonfinite="fallback",
                                         force=True))
    assert result.fallbacks == ["big.w"]
    got = open(tmp_path / "out.safetensors", "rb").read()
    execute(compile_recipe(os.path.join(tmp_path, "r.kmx"), threads=1),
            RunOptions(threads=1, nonfinite="fallback", force=True, reuse=False))
    assert open(tmp_path / "out.safetensors", "rb").read() == got
