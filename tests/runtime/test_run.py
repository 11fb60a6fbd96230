"""`kmx run`: results against numpy computed from the formulas, determinism, atomic outputs,
overwrite rules, resume, non-finite inputs, sharding."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import reference_np as ref
from karmixlang.api import compile as compile_recipe
from karmixlang.diagnostics import KmxError
from karmixlang.runtime.executor import RunOptions, execute
from karmixlang.demo.synth import make_model, write_demo_pool, write_model, write_sharded_llm

from conftest import default_sigint, recipe, tiny_models


def run(path, **kw):
    overrides = kw.pop("overrides", None)
    threads = kw.get("threads", 1)
    return execute(compile_recipe(path, overrides, threads=threads or 1,
                                  compute_dtype=kw.get("compute_dtype", "fp32"),
                                  strict=kw.get("strict", False),
                                  memory_limit=kw.get("memory_limit")), RunOptions(**kw))


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def f64(d):
    return {k: v.astype(np.float64) for k, v in d.items() if v.dtype.kind == "f"}


def test_arithmetic_lerp_mean_union_and_fallback_match_numpy(workdir):
    m = tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        model b = "b.safetensors"
        model c = "c.safetensors"
        let soup = mean([a: 2, b, c])
        save "out/x.safetensors" = o + 0.5*(soup - o) + 0.25*(a - b) | select(c, "vae.*")
        save "out/y.safetensors" = lerp(a, add_difference(b, c, o, alpha=0.3), t=0.25) with dtype="fp16", fallback=a
    """)
    run(path)
    x, y = load_file(str(workdir / "out/x.safetensors")), load_file(str(workdir / "out/y.safetensors"))
    o, a, b, c = (f64(m[n]) for n in ("base", "a", "b", "c"))
    for k in ("model.w", "model.conv", "model.scalar", "model.bias"):
        soup = (2 * a[k] + b[k] + c[k]) / 4
        want_x = o[k] + 0.5 * (soup - o[k]) + 0.25 * (a[k] - b[k])
        assert x[k].dtype == m["base"][k].dtype  # default dtype: the fallback's
        np.testing.assert_allclose(x[k], want_x.astype(x[k].dtype), rtol=2e-6, atol=1e-6)
        want_y = ref.lerp(a[k], ref.add_difference(b[k], c[k], o[k], 0.3), 0.25)
        assert y[k].dtype == np.float16
        np.testing.assert_array_equal(y[k], want_y.astype(np.float32).astype(np.float16))
    assert np.array_equal(x["vae.decoder"], m["c"]["vae.decoder"])  # the right side of |
    assert x["pos_ids"].dtype == np.int64 and np.array_equal(x["pos_ids"], m["base"]["pos_ids"])
    assert y["model.scalar"].shape == ()


def test_dgmla_matches_the_reference_implementation(workdir):
    m = tiny_models(workdir, names=("base", "a", "b", "c", "d"))
    path = recipe(workdir, """
        import "std/recipes.kmx" as std
        base o = "base.safetensors"
        cluster pool = balanced([["a.safetensors", "b.safetensors"], ["c.safetensors", "d.safetensors"]])
        save "out.safetensors" = std.dgmla(pool, o, 7) with dtype="fp32"
    """)
    run(path, compute_dtype="fp64")
    out = load_file(str(workdir / "out.safetensors"))
    o = f64(m["base"])
    for k in ("model.w", "model.conv", "model.bias", "model.scalar"):
        deltas = [f64(m[n])[k] - o[k] for n in "abcd"]
        ws = [0.5, 0.5, 0.5, 0.5]
        dropped = [ref.della(d, 0.1, -0.05, 7, False, False, k, i) for i, d in enumerate(deltas)]
        voted = ref.elect(dropped, ws, "mass")
        center = ref.geometric_median(voted + [np.zeros_like(o[k])], ws + [1.0], 1e-6, 100, 1e-20)
        np.testing.assert_allclose(out[k], (o[k] + center).astype(np.float32), rtol=1e-5,
                                   atol=1e-6, err_msg=k)


def test_threads_give_bit_identical_files(workdir):
    write_demo_pool(workdir, arch="sd1", scale=1 / 32, n_per_cluster=2, seed=3)
    path = recipe(workdir, """
        import "std/recipes.kmx" as std
        base a = "base-a.safetensors"
        model donor = "vae-donor.safetensors"
        cluster pool = balanced([glob("a/*.safetensors"), glob("b/*.safetensors")])
        save "out/m.safetensors" = std.dgmla(pool, a, 1) | select(donor, "first_stage_model.*") with dtype="bf16"
    """)
    digests = []
    for threads in (1, 2, 3):
        run(path, threads=threads, force=True)
        digests.append(digest(workdir / "out/m.safetensors"))
    assert len(set(digests)) == 1
    meta = safe_open(str(workdir / "out/m.safetensors"), "pt").metadata()
    inputs = json.loads(meta["kmx_inputs"])
    assert len(inputs) == 6 and all(i["hash"].startswith("sha256:") for i in inputs)
    assert all(i["hash"] != "sha256:" + "0" * 64 for i in inputs)  # placeholders replaced


def test_same_recipe_twice_gives_the_same_file(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        cluster pool = ["a.safetensors", "b.safetensors", "c.safetensors"]
        save "out.safetensors" = o + ties_merge(dare(pool - o, p=0.5, seed=3), rule="mass")
    """)
    run(path)
    first = digest(workdir / "out.safetensors")
    meta = safe_open(str(workdir / "out.safetensors"), "np").metadata()
    assert meta["kmx_recipe"].startswith("base o =") and "kmx_graph" in meta
    run(path, force=True)
    assert digest(workdir / "out.safetensors") == first


def test_existing_output_needs_force_and_resume_of_a_complete_output_does_nothing(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out.safetensors" = lerp(o, a, t=0.5)
    """)
    run(path)
    with pytest.raises(KmxError) as exc:
        run(path)
    assert exc.value.diagnostics[0].code == "K0306"
    assert run(path, resume=True).nothing_to_do


def test_nonfinite_input_is_an_error_or_copied_from_the_fallback(workdir):
    bad = np.ones((6, 5), np.float32)
    bad[2, 3] = np.nan
    m = tiny_models(workdir, extra={"b": {"model.w": bad}})
    path = recipe(workdir, """
        base o = "base.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = lerp(o, b, t=0.5)
    """)
    with pytest.raises(KmxError) as exc:
        run(path)
    d = exc.value.diagnostics[0]
    assert d.code == "K0401" and "model.w" in d.message and "`b`" in d.message
    assert not (workdir / "out.safetensors").exists()
    result = run(path, nonfinite="fallback", force=True)
    assert result.fallbacks == ["model.w"]
    out = load_file(str(workdir / "out.safetensors"))
    assert np.array_equal(out["model.w"], m["base"]["model.w"])


def test_sharded_input_and_sharded_output(workdir):
    llm = write_sharded_llm(workdir / "llm", n_layers=2, hidden=32, seed=0, shards=2,
                            n_finetunes=2)
    path = recipe(workdir, f"""
        base o = "{llm['base']}"
        cluster pool = ["{llm['finetunes'][0]}", "{llm['finetunes'][1]}"]
        save "out/merged.safetensors" = o + ties_merge(trim(pool - o, density=0.5)) with shard="20KB"
    """)
    run(path)
    index = json.loads((workdir / "out/merged.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((workdir / "out" / s).exists() for s in shards)
    assert not (workdir / "out/merged.safetensors").exists()


@pytest.fixture(scope="module")
def slow_merge(tmp_path_factory):
    """Inputs big enough for a run of a few seconds, and the bytes of an uninterrupted run."""
    folder = tmp_path_factory.mktemp("slow")
    base = make_model("sd1", 1 / 8, seed=1, dtype="float32")
    write_model(folder / "base.safetensors", base)
    for i in range(3):
        write_model(folder / f"m{i}.safetensors",
                    make_model("sd1", 1 / 8, seed=5 + i, base=base, dtype="float32"))
    path = recipe(folder, """
        base o = "base.safetensors"
        cluster pool = ["m0.safetensors", "m1.safetensors", "m2.safetensors"]
        save "out.safetensors" = o + geometric_median(della(pool - o, p=0.3, eps=0.1, seed=1), maxiter=20)
    """)
    env = {**os.environ, "XDG_CACHE_HOME": str(folder / ".cache")}
    clean = _kmx("run", path, "-q", "--threads", "2", env=env)
    assert clean.wait(timeout=300) == 0, clean.stderr.read()
    expected = digest(folder / "out.safetensors")
    os.remove(folder / "out.safetensors")
    return folder, path, env, expected


def _kmx(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "karmixlang", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint, **kw)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_resumes_to_identical_bytes(slow_merge, sig):
    folder, path, env, expected = slow_merge
    inputs = {f: digest(folder / f) for f in ("base.safetensors", "m0.safetensors")}
    proc = _kmx("run", path, "-q", "--threads", "2", env=env)
    journal = folder / ".out.safetensors.kmx-journal"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not journal.exists() or journal.stat().st_size < 200):
        time.sleep(0.05)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert not (folder / "out.safetensors").exists(), "a partial file under the final name"
    if sig != signal.SIGKILL:
        assert rc == 1 and "K0403" in stderr and "--resume" in stderr and "Traceback" not in stderr
    resumed = _kmx("run", path, "-q", "--resume", "--threads", "1", env=env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert digest(folder / "out.safetensors") == expected
    assert {f: digest(folder / f) for f in inputs} == inputs
    assert not journal.exists()
    os.remove(folder / "out.safetensors")


def test_a_run_that_skips_interpreter_teardown_still_flushes_its_report_and_exit_code(workdir):
    # __main__ ends a process that loaded torch with os._exit: what was printed to a pipe
    # must all arrive, and the exit code must be the command's.
    tiny_models(workdir)
    path = recipe(workdir, """
        model a = "a.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = lerp(a, b, t=0.5)
    """)
    ok = _kmx("run", path, "--threads", "1", env={**os.environ, "NO_COLOR": "1"})
    out, err = ok.communicate(timeout=120)
    assert ok.returncode == 0, err
    assert "Done:" in out + err and "out.safetensors" in out + err
    assert (workdir / "out.safetensors").exists()
    again = _kmx("run", path, "--threads", "1")  # the output exists: K0306, exit 1
    out, err = again.communicate(timeout=120)
    assert again.returncode == 1 and "K0306" in err and "Traceback" not in err


def test_a_tight_memory_limit_runs_one_key_at_a_time_with_the_same_result(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        cluster pool = ["a.safetensors", "b.safetensors", "c.safetensors"]
        save "out.safetensors" = o + geometric_median(pool - o)
    """)
    run(path, threads=2)
    free = digest(workdir / "out.safetensors")
    run(path, threads=2, memory_limit=1, force=True)
    assert digest(workdir / "out.safetensors") == free


def test_a_key_selection_fallback_copies_integer_buffers(workdir):
    m = tiny_models(workdir)
    path = recipe(workdir, """
        model a = "a.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = exclude(lerp(a, b, t=0.5), "vae.*") with fallback=exclude(a, "vae.*")
    """)
    run(path)
    out = load_file(str(workdir / "out.safetensors"))
    assert "vae.decoder" not in out
    assert out["pos_ids"].dtype == np.int64 and np.array_equal(out["pos_ids"], m["a"]["pos_ids"])


def test_stale_hash_cache_entries_are_recomputed(workdir):
    from karmixlang.io.hashes import HashCache, compute_hashes

    tiny_models(workdir)
    cache = HashCache()
    a = str(workdir / "a.safetensors")
    for stale in ("blake2b:" + "1" * 32, "sha256:" + "1" * 64, {"sha256": "1" * 63},
                  {"sha256": "X" * 64, "data_sha256": "1" * 64}):
        cache.data[cache.key(a)] = stale
        assert cache.get(a) == compute_hashes(a)


def test_the_heaps_free_pages_are_released_after_each_large_key_only(workdir, monkeypatch):
    """The plan's heap reserve counts no key over HEAP_RELEASE_ABOVE because the run hands
    the heaps' free pages back after each such key; smaller keys leave them for reuse."""
    from karmixlang.runtime import executor

    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        cluster pool = ["a.safetensors", "b.safetensors", "c.safetensors"]
        save "out.safetensors" = o + ties_merge(trim(pool - o, density=0.5))
    """)
    compiled = compile_recipe(path, threads=1)
    sizes = sorted(j.est_bytes for j in compiled.schedule.jobs)
    released = []
    monkeypatch.setattr(executor, "release_free_memory", lambda: released.append(1))
    monkeypatch.setattr(executor, "HEAP_RELEASE_ABOVE", sizes[-2])  # the largest keys only
    execute(compiled, RunOptions(threads=1))
    assert sizes[-1] > sizes[-2] and len(released) == sizes.count(sizes[-1])


def test_releasing_free_memory_returns_a_fragmented_heaps_pages(tmp_path):
    """release_free_memory (glibc's malloc_trim) gives back the free blocks that sit between
    blocks still in use, which the heap's own trimming, at its top only, keeps."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    script = tmp_path / "heap.py"
    script.write_text(textwrap.dedent("""
        import torch
        from karmixlang.runtime.allocator import release_free_memory, tune_allocator
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        tune_allocator()
        blocks = [torch.ones(4 << 20) for _ in range(24)]  # 16 MB each: heap blocks
        del blocks[::2]  # freed between kept ones: not at the heap's top
        before = rss()
        release_free_memory()
        print(before - rss())
    """))
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, check=True)
    assert int(out.stdout) > 100 << 20  # most of the twelve freed 16 MB blocks
