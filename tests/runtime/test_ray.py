"""The Ray executor: key groups (always), the driver's errors without a cluster, and runs on
a local 2-CPU Ray that must give the local executor's bytes (skipped without ray)."""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from karmixlang.api import compile as compile_recipe
from karmixlang.cli import main
from karmixlang.diagnostics import KmxError, error
from karmixlang.plan.groups import group_keys
from karmixlang.runtime.executor import RunOptions, execute, make_executor

from conftest import recipe, tiny_models

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray is not installed: pip install "
                               "'karmixlang[ray]' to run the Ray executor's tests")

TWO_SAVES = """
    base o = "base.safetensors"
    model a = "a.safetensors"
    model b = "b.safetensors"
    save "out/x.safetensors" = lerp(o, a, t=0.3)
    save "out/y.safetensors" = o + ties_merge(dare([a, b] - o, p=0.5, seed=1)) with dtype="fp16"
"""


def job(key, read, est=10, out=(("F32", (2,)),)):
    outputs = [SimpleNamespace(dtype=d, shape=s) for d, s in out]
    return SimpleNamespace(key=key, read_bytes=read, est_bytes=est, outputs=outputs)


# ------------------------------------------------------------------ groups

def test_groups_pack_keys_in_order_up_to_the_target_and_a_big_key_goes_alone():
    jobs = [job("a", 40), job("b", 50), job("c", 20), job("big", 500), job("d", 10),
            job("e", 95)]
    groups = group_keys(jobs, target_bytes=100, max_keys=64, min_groups=1)
    assert [g.keys for g in groups] == [("a", "b"), ("c",), ("big",), ("d",), ("e",)]
    assert [g.bytes_read for g in groups] == [90, 20, 500, 10, 95]
    assert groups[0].result_bytes == 16 and groups[0].peak_bytes == 10


def test_groups_cap_their_keys_and_a_small_merge_still_spreads():
    jobs = [job(f"k{i:02}", 1, est=i) for i in range(40)]
    assert [len(g.keys) for g in group_keys(jobs, max_keys=16, min_groups=1)] == [16, 16, 8]
    groups = group_keys(jobs, min_groups=16)  # 40 keys: at most 3 per group
    assert len(groups) == 14 and all(len(g.keys) <= 3 for g in groups)
    assert [k for g in groups for k in g.keys] == [j.key for j in jobs]
    assert groups[-1].peak_bytes == 39
    assert group_keys(jobs) == group_keys(list(jobs)) and group_keys([]) == []


def test_plan_shows_the_groups_only_for_the_ray_executor(workdir, capsys):
    tiny_models(workdir)
    path = recipe(workdir, TWO_SAVES)
    assert "groups" not in compile_recipe(path).plan.data
    groups = compile_recipe(path, executor="ray").plan.data["groups"]
    assert [g["first"] for g in groups] == [j.key for j in compile_recipe(path).schedule.jobs]
    assert all(g["keys"] == 1 and g["first"] == g["last"] for g in groups)
    assert main(["plan", path, "--executor", "ray"]) == 0
    out = capsys.readouterr().out
    assert "Ray key groups (6 tasks for 6 keys" in out and "reads" in out


def test_the_plan_elides_the_middle_of_many_groups():
    from karmixlang.plan.report import _groups_text

    groups = [{"keys": 2, "first": f"k{i}a", "last": f"k{i}b", "bytes_read": 10}
              for i in range(20)]
    lines = _groups_text(groups)
    assert len(lines) == 1 + 8 + 1 and "… 12 more groups" in lines[5]
    assert "k0a … k0b" in lines[1] and "k19a" in lines[-1]


# ------------------------------------------------------------------ errors, no cluster needed

def test_kmx_error_pickles_with_its_diagnostics():
    exc = pickle.loads(pickle.dumps(KmxError([error("K0401", "bad", help="h")])))
    assert isinstance(exc, KmxError) and exc.diagnostics[0].code == "K0401"
    assert exc.diagnostics[0].help == "h"


def test_without_ray_the_executor_is_a_diagnostic(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(KmxError) as exc:
        make_executor(RunOptions(executor="ray"), 1, 1 << 30)
    d = exc.value.diagnostics[0]
    assert d.code == "K0407" and "karmixlang[ray]" in d.help


def test_an_unreachable_address_is_a_diagnostic_in_seconds():
    from karmixlang.runtime.ray.executor import _probe

    with pytest.raises(KmxError) as exc:
        _probe("127.0.0.1:1")
    assert exc.value.diagnostics[0].code == "K0407"
    assert "127.0.0.1:1" in exc.value.diagnostics[0].message
    _probe("auto")  # no host:port: left to Ray


def test_a_worker_that_sees_other_inputs_or_none_refuses(workdir):
    from karmixlang.runtime.ray.executor import compute_group

    tiny_models(workdir)
    exe = compile_recipe(recipe(workdir, TWO_SAVES)).schedule.executable
    payload = exe.part([j for j in exe.jobs if j.key == "model.w"]).dumps()
    with open(workdir / "a.safetensors", "ab") as f:  # another file at that path
        f.write(b"\0" * 8)
    with pytest.raises(KmxError) as exc:
        compute_group(payload, "cpu", "error")
    d = exc.value.diagnostics[0]
    assert d.code == "K0407" and "a.safetensors" in d.message and "shared" in d.help
    (workdir / "a.safetensors").unlink()  # a worker that does not see it at all
    with pytest.raises(KmxError) as exc:
        compute_group(payload, "cpu", "error")
    assert exc.value.diagnostics[0].code == "K0407"
    assert "cannot see" in exc.value.diagnostics[0].message


# ------------------------------------------------------------------ runs on a local Ray

@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray for the module (its start costs seconds); the executor uses it as it is."""
    import ray

    cache = tmp_path_factory.mktemp("ray-cache")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 10**6,  # the tests' results are tiny; spare /dev/shm
             runtime_env={"env_vars": {"XDG_CACHE_HOME": str(cache)}})
    yield ray
    ray.shutdown()


def run(path, **kw):
    return execute(compile_recipe(path), RunOptions(threads=2, force=True, **kw))


def digests(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((folder / "out").glob("*.safetensors"))}


@needs_ray
def test_ray_output_is_bit_identical_to_the_local_one(local_ray, workdir):
    tiny_models(workdir)
    path = recipe(workdir, TWO_SAVES)
    run(path)
    local = digests(workdir)
    result = run(path, executor="ray")
    assert result.keys == 6 and not result.fallbacks
    assert digests(workdir) == local and len(local) == 2
    assert local_ray.is_initialized()  # not shut down: the test started it


@needs_ray
def test_ray_nonfinite_error_then_resume_with_fallback(local_ray, workdir):
    bad = np.ones((6, 5), np.float32)
    bad[2, 3] = np.nan
    tiny_models(workdir, extra={"b": {"model.w": bad}})
    path = recipe(workdir, """
        base o = "base.safetensors"
        model b = "b.safetensors"
        save "out/z.safetensors" = lerp(o, b, t=0.5)
    """)
    run(path, nonfinite="fallback")
    local = digests(workdir)
    (workdir / "out/z.safetensors").unlink()
    with pytest.raises(KmxError) as exc:
        run(path, executor="ray")
    d = exc.value.diagnostics[0]
    assert d.code == "K0401" and "model.w" in d.message and "`b`" in d.message
    assert not (workdir / "out/z.safetensors").exists()
    result = execute(compile_recipe(path), RunOptions(executor="ray", resume=True,
                                                      nonfinite="fallback"))
    assert result.keys == 6 and result.fallbacks == ["model.w"]  # never finished before
    assert digests(workdir) == local


@needs_ray
def test_ray_out_of_core_key_gives_the_in_memory_bytes(local_ray, workdir):
    rng = np.random.default_rng(1)
    big = {n: {"big.w": rng.normal(size=(256, 256)).astype(np.float16)}
           for n in ("base", "a", "b", "c")}
    tiny_models(workdir, extra=big)
    path = recipe(workdir, """
        base o = "base.safetensors"
        cluster pool = ["a.safetensors", "b.safetensors", "c.safetensors"]
        save "out/m.safetensors" = o + median(dare(pool - o, p=0.5, seed=3))
    """)
    run(path)
    in_memory = digests(workdir)
    limit = 3 << 20  # big.w runs in chunks, its dare results spilled (in a worker too)
    compiled = compile_recipe(path, threads=1, memory_limit=limit)
    assert [j.key for j in compiled.schedule.jobs if j.ooc is not None] == ["big.w"]
    execute(compiled, RunOptions(executor="ray", memory_limit=limit, force=True))
    assert digests(workdir) == in_memory


@needs_ray
def test_ray_reuses_unchanged_keys_to_the_local_bytes(local_ray, workdir):
    """Keys the replaced output holds are copied by the driver; Ray computes the rest."""
    tiny_models(workdir)
    path = recipe(workdir, TWO_SAVES)
    run(path)
    # One key's weight changes: the five others are copied from the outputs being replaced.
    recipe(workdir, TWO_SAVES.replace("t=0.3", 't=by_key({"model.w": 0.5, "*": 0.3})'))
    result = run(path, executor="ray")
    assert result.keys == 6 and result.reused == 5
    reused = digests(workdir)
    assert run(path, reuse=False).reused == 0
    assert digests(workdir) == reused
