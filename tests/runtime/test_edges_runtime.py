"""Run-time edges (docs/reliability.md, "Run-time edges"): results that overflow are coded
errors at the save (K0411, K0412) or copies from the fallback, never a silent NaN; CLI edges
are usage errors or diagnostics, never exit 3; errors found while running point at the
recipe line responsible; Ctrl-C from the first moment is exit 130 without a traceback."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch

from karmixlang.api import compile as compile_recipe
from karmixlang.cli import main
from karmixlang.demo.synth import write_model
from karmixlang.diagnostics import KmxError
from karmixlang.plan import outofcore
from karmixlang.runtime.executor import RunOptions, execute
from karmixlang.runtime.ray import executor as ray_exec

from conftest import default_sigint, fuzz_examples, recipe, tiny_models

HUGE = (-3e38, 3e38)  # finite in fp32; their difference is not


def two_models(folder, shape=(64, 64), big=None, at=7, half=None) -> dict:
    """`base` and `a`, finite: `big` = (base's, a's) value at flat index `at` of `w`; `half`
    makes `h[3]` of `a` that large (any mix of it past 65504 overflows fp16)."""
    rng = np.random.default_rng(1)
    out = {}
    for i, name in enumerate(("base", "a")):
        w = rng.normal(size=shape).astype(np.float32)
        if big is not None:
            w.reshape(-1)[at] = big[i]
        h = rng.normal(size=(8,)).astype(np.float32)
        if half is not None and name == "a":
            h[3] = half
        out[name] = {"w": w, "h": h, "ok": rng.normal(size=(5,)).astype(np.float32)}
        write_model(os.path.join(folder, f"{name}.safetensors"), out[name])
    return out


def run(path, **opts):
    threads = opts.setdefault("threads", 1)
    return execute(compile_recipe(path, threads=threads), RunOptions(**opts))


def diagnostic(exc) -> object:
    return exc.value.diagnostics[0]


# ------------------------------------------------------------------ 1. non-finite results

OVERFLOW = {
    "linear": 'save "out/x.safetensors" = o + 2 * (a - o)',
    "kernel": 'save "out/x.safetensors" = o + median([a - o, 2 * (a - o), o - a])',
    "nested": ('let d = 4 * (a - o)\nlet e = 4 * d\n'
               'save "out/x.safetensors" = o + 4 * e'),
}


@pytest.mark.parametrize("name", sorted(OVERFLOW))
def test_an_overflowing_result_is_K0411_at_the_save(workdir, name):
    two_models(workdir, big=HUGE)
    path = recipe(workdir, 'base o = "base.safetensors"\nmodel a = "a.safetensors"\n'
                  + OVERFLOW[name] + "\n")
    with pytest.raises(KmxError) as exc:
        run(path)
    d = diagnostic(exc)
    line = OVERFLOW[name].count("\n") + 3
    assert d.code == "K0411" and "`w`" in d.message and "out/x.safetensors" in d.message
    assert d.span.file == path and d.span.line == line and d.span.col == 1
    assert "--nonfinite=fallback" in d.help
    assert not (workdir / "out/x.safetensors").exists()


def test_nonfinite_fallback_copies_the_overflowing_key_and_lists_it(workdir):
    m = two_models(workdir, big=HUGE)
    path = recipe(workdir, f"""
        base o = "base.safetensors"
        model a = "a.safetensors"
        {OVERFLOW["linear"]}
    """)
    result = run(path, nonfinite="fallback")
    assert result.fallbacks == ["w (`out/x.safetensors`: non-finite result)"]
    out = load_file(str(workdir / "out/x.safetensors"))
    assert np.array_equal(out["w"], m["base"]["w"])  # the fallback: the only base
    want = m["base"]["ok"] + 2 * (m["a"]["ok"] - m["base"]["ok"])
    assert np.allclose(out["ok"], want, rtol=1e-6) and np.isfinite(out["ok"]).all()


def test_a_result_that_overflows_fp16_is_K0412_or_its_fallback(workdir, capsys):
    m = two_models(workdir, half=2e5)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out/x.safetensors" = lerp(o, a, t=0.75) with dtype="fp16"
    """)
    assert main(["run", path, "-q"]) == 1
    err = capsys.readouterr().err
    assert "error[K0412]" in err and "`h`" in err and "F16" in err and ":3:1" in err
    assert "Traceback" not in err and not (workdir / "out/x.safetensors").exists()
    assert main(["run", path, "-q", "--force", "--nonfinite=fallback"]) == 0
    err = capsys.readouterr().err
    assert "1 key(s) with non-finite values were copied from the fallback" in err
    assert "h (`out/x.safetensors`: overflows its dtype)" in err
    out = load_file(str(workdir / "out/x.safetensors"))
    assert np.array_equal(out["h"], m["base"]["h"].astype(np.float16))
    assert np.isfinite(out["w"]).all()


def test_a_copy_into_a_narrower_dtype_that_overflows_is_K0412(workdir):
    two_models(workdir, half=2e5)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out/x.safetensors" = lerp(o, a, t=0.5) | select(a, "h") with dtype="fp16"
    """)
    with pytest.raises(KmxError) as exc:
        run(path)
    assert diagnostic(exc).code == "K0412" and "`h`" in diagnostic(exc).message


def test_finite_results_at_the_edge_of_fp16_are_written(workdir):
    m = two_models(workdir, half=65504.0)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out/x.safetensors" = a + 0 * (o - a) with dtype="fp16"
    """)
    run(path)
    assert load_file(str(workdir / "out/x.safetensors"))["h"][3] == np.float16(65504.0)
    assert np.array_equal(load_file(str(workdir / "out/x.safetensors"))["h"],
                          m["a"]["h"].astype(np.float16))


@pytest.fixture
def chunked(monkeypatch):
    """Keys of 16 KB and more run out of core, in several chunks."""
    monkeypatch.setattr(outofcore, "KERNEL_SLICE_ELEMS", 1 << 10)
    monkeypatch.setattr(outofcore, "CHUNK_ABOVE_BYTES", 16 << 10)
    monkeypatch.setattr(outofcore, "TRIM_IN_MEMORY_BYTES", 16 << 10)


@pytest.mark.parametrize("dtype, code", [("fp32", "K0411"), ("fp16", "K0412")])
def test_out_of_core_pieces_are_tested_and_fall_back_whole(workdir, chunked, dtype, code):
    """The bad value sits in the last chunk, after earlier pieces were written."""
    two_models(workdir, shape=(128, 128), at=128 * 128 - 1,
               big=HUGE if dtype == "fp32" else (0.0, 2e5))
    formula = "o + 2 * (a - o)" if dtype == "fp32" else "lerp(o, a, t=0.5)"
    path = recipe(workdir, f"""
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out/x.safetensors" = {formula} with dtype="{dtype}"
    """)
    compiled = compile_recipe(path)
    assert [j.key for j in compiled.schedule.jobs if j.ooc] == ["w"]
    assert next(j for j in compiled.schedule.jobs if j.ooc).ooc.chunks > 1
    with pytest.raises(KmxError) as exc:
        execute(compiled, RunOptions(threads=1))
    assert diagnostic(exc).code == code and "`w`" in diagnostic(exc).message
    assert diagnostic(exc).span.line == 3
    result = execute(compile_recipe(path), RunOptions(threads=1, nonfinite="fallback",
                                                      force=True))
    assert [f.split()[0] for f in result.fallbacks] == ["w"]
    got = open(workdir / "out/x.safetensors", "rb").read()
    outofcore.CHUNK_ABOVE_BYTES = 1 << 62  # the same run in memory: the same bytes
    assert not any(j.ooc for j in compile_recipe(path).schedule.jobs)
    run(path, nonfinite="fallback", force=True)
    assert open(workdir / "out/x.safetensors", "rb").read() == got


def recipe_with_a_bad_input(workdir, value: float) -> str:
    """A recipe whose model `b` holds `value` (NaN or Inf) in one entry of model.w."""
    bad = np.ones((6, 5), np.float32)
    bad[1, 1] = value
    tiny_models(workdir, extra={"b": {"model.w": bad}})
    return recipe(workdir, """
        base o = "base.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = o + 0.5 * (b - o)
    """)


def test_nan_in_an_input_is_K0401_at_the_model_line(workdir):
    path = recipe_with_a_bad_input(workdir, np.inf)
    with pytest.raises(KmxError) as exc:
        run(path)
    d = diagnostic(exc)
    assert d.code == "K0401" and "`b`" in d.message and (d.span.line, d.span.col) == (2, 1)


# ------------------------------------------------------------------ 2. CLI edges

@pytest.mark.parametrize("threads", ["-1", "-8", "two"])
def test_bad_threads_is_a_usage_error_before_anything_is_written(workdir, capsys, threads):
    tiny_models(workdir)
    path = recipe(workdir, 'base o = "base.safetensors"\nmodel a = "a.safetensors"\n'
                  'save "out/x.safetensors" = lerp(o, a, t=0.5)\n')
    for command in (["run", path, "-q"], ["plan", path], ["demo", str(workdir / "d")]):
        with pytest.raises(SystemExit) as exc:
            main(command + ["--threads", threads])
        assert exc.value.code == 2
        assert "--threads" in capsys.readouterr().err
    assert not (workdir / "out").exists() and not (workdir / "d").exists()
    assert main(["run", path, "-q", "--threads", "0"]) == 0


@pytest.mark.parametrize("address", [":::", "http://x:notaport", "x:notaport", "host",
                                     "ray://h:1/path", "h:70000", ""])
def test_a_malformed_ray_address_is_K0407_before_ray_starts(workdir, capsys, monkeypatch,
                                                           address):
    def no_ray():
        raise AssertionError("Ray was imported for a malformed address")

    monkeypatch.setattr(ray_exec, "_import_ray", no_ray)
    tiny_models(workdir)
    path = recipe(workdir, 'base o = "base.safetensors"\nmodel a = "a.safetensors"\n'
                  'save "out/x.safetensors" = lerp(o, a, t=0.5)\n')
    assert main(["run", path, "-q", "--executor", "ray", "--address", address]) == 1
    err = capsys.readouterr().err
    assert "error[K0407]" in err and "is not a Ray address" in err and "Traceback" not in err
    assert not (workdir / "out").exists()
    with pytest.raises(KmxError):  # the API checks too
        execute(compile_recipe(path), RunOptions(executor="ray", address=address))


@pytest.mark.parametrize("address", ["auto", "local", "10.0.0.5:6379", "ray://head:10001",
                                     "[::1]:6379"])
def test_well_formed_ray_addresses_pass_the_check(address):
    ray_exec.check_address(address)


def test_kmx_new_creates_missing_folders_and_reports_unwritable_paths(workdir, capsys):
    target = workdir / "a" / "b" / "merge.kmx"
    assert main(["new", str(target)]) == 0
    assert target.read_text().strip() and main(["check", str(target)]) in (0, 1)
    (workdir / "file").write_text("x")
    assert main(["new", str(workdir / "file" / "merge.kmx")]) == 1
    err = capsys.readouterr().err
    assert "error[K0402]" in err and "Traceback" not in err
    assert main(["new", str(workdir / "a"), "--force"]) == 1  # a folder
    assert "error[K0402]" in capsys.readouterr().err
    assert sorted(os.listdir(workdir / "a")) == ["b"]  # no temporary file left behind


def test_ctrl_c_at_any_early_moment_exits_130_without_a_traceback(workdir):
    """SIGINT at random moments of `python -m karmixlang check` (start-up, imports, the
    check). A signal that lands before kmx's first line is the interpreter's own start-up,
    with no kmx frame in what it prints; every other one is exit 130 and one line."""
    tiny_models(workdir)
    path = recipe(workdir, 'base o = "base.safetensors"\nmodel a = "a.safetensors"\n'
                  'save "out/x.safetensors" = lerp(o, a, t=0.5)\n')
    command = [sys.executable, "-m", "karmixlang", "check", path]
    # The moments are drawn over one whole run as timed here, so a slow or busy machine
    # spreads them over the same stages as a fast one. A fresh clone's first run also
    # compiles every .pyc: run once before timing, or most moments fall after the end.
    subprocess.run(command, capture_output=True, timeout=60)
    start = time.monotonic()
    subprocess.run(command, capture_output=True, timeout=60)
    whole = time.monotonic() - start
    rng = random.Random(7)
    ours = 0
    for _ in range(10):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_sigint)
        time.sleep(rng.uniform(0.0, whole))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        if "Traceback" in err or (proc.returncode == -signal.SIGINT and not err):
            # Before Python set up its handler (killed by the signal: a shell's 130), or in
            # site, before kmx's first line: no kmx frame.
            assert "karmixlang" not in err.replace("__editable___karmixlang", ""), err
            continue
        if proc.returncode == -signal.SIGINT and err.endswith(": ok\n"):
            continue  # after kmx's last line, in the interpreter's shutdown
        assert proc.returncode in (0, 130), (proc.returncode, err)
        if proc.returncode == 130:
            assert err.strip().splitlines()[-1] == "interrupted", err
            ours += 1
    assert ours >= 3


# ------------------------------------------------------------------ 3. places

def test_an_input_truncated_during_the_run_points_at_its_model_line(workdir, capsys):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out/x.safetensors" = lerp(o, a, t=0.5)
    """)
    compiled = compile_recipe(path)
    os.truncate(workdir / "a.safetensors", 200)
    with pytest.raises(KmxError) as exc:
        execute(compiled, RunOptions(threads=1))
    d = diagnostic(exc)
    assert d.code == "K0302" and "a.safetensors" in d.message and d.span.line == 2


def test_an_output_that_exists_is_K0306_at_its_save(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out/x.safetensors" = lerp(o, a, t=0.5)
        save "out/y.safetensors" = lerp(o, a, t=0.25)
    """)
    run(path)
    os.unlink(workdir / "out/x.safetensors")
    with pytest.raises(KmxError) as exc:
        run(path)
    d = diagnostic(exc)
    assert d.code == "K0306" and "y.safetensors" in d.message
    assert (d.span.line, d.label) == (4, "this save")


LIMITED = """
import resource, sys
from karmixlang.cli import main
resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))
for path in sys.argv[1:]:
    print("== " + path, file=sys.stderr)
    print(main(["run", path, "-q"]), file=sys.stderr)
"""


def test_too_many_open_files_is_a_coded_error_with_help(workdir):
    """30 inputs read at once, then 30 outputs written at once, under 24 descriptors."""
    names = ["base"] + [f"m{i}" for i in range(30)]
    tiny_models(workdir, names=names)
    terms = " + ".join(f"0.01 * (m{i} - o)" for i in range(30))
    decls = "\n".join(f'model m{i} = "m{i}.safetensors"' for i in range(30))
    inputs = recipe(workdir, f'base o = "base.safetensors"\n{decls}\n'
                    f'save "out/x.safetensors" = o + {terms}\n', "inputs.kmx")
    saves = "\n".join(f'save "out/s{i}.safetensors" = lerp(o, m1, t=0.5) with '
                       f'metadata={{"i": "{i}"}}' for i in range(30))
    outputs = recipe(workdir, f'base o = "base.safetensors"\nmodel m1 = "m1.safetensors"\n'
                     f'{saves}\n', "outputs.kmx")
    proc = subprocess.run([sys.executable, "-c", LIMITED, inputs, outputs],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    _, first, second = proc.stderr.split("== ")
    assert first.strip().endswith("\n1") and second.strip().endswith("\n1"), proc.stderr
    assert "error[K0302]" in first and "too many open files" in first
    assert "ulimit -n" in first and "inputs.kmx:" in first and "this input" in first
    assert "error[K0402]" in second and "ulimit -n" in second
    assert "outputs.kmx:" in second and "this save" in second


# ------------------------------------------------------------------ 4. edges, at random

EDGE_NUMBERS = ["0", "0.0", "1e-45", "1e-300", "5e-324", "3e38", "1e38", "65504", "1e308",
                "-1", "-0.0", "-1e308", "0.5", "1", "2", "1e5", "123456789", "1e-7"]
# Texts that look like numbers to a person but not to the grammar: diagnostics, not crashes.
ODD_TEXT = ["nan", "inf", "-inf", "NaN", "1e309", "1e", "0x10", "1_000", "", "--", "1.2.3"]


@st.composite
def edge_recipe(draw):
    t = draw(st.sampled_from(EDGE_NUMBERS + ODD_TEXT))
    w = draw(st.sampled_from(EDGE_NUMBERS))
    form = draw(st.sampled_from([
        "lerp(o, a, t=T)",
        "o + W * (a - o)",
        "o + T * (a - o) + W * (b - o)",
        "mean([a: W, b: T])",
        "o + sum_([a - o: W, b - o: T])",
        "o + W * dare(a - o, p=0.5, seed=1)",
        "slerp(a, b, t=T)",
        "o + median([a - o, b - o: W])",
        "add_difference(o, a, b, alpha=W)",
        "train_difference(o, a, b, alpha=T)",
        "o + iso(a - o, z=T)",
        "o + clamp(a - o, lo=-W, hi=W)",
        "o + geometric_median([a - o, b - o: W])",
        "o + karcher([a - o: W, b - o])",
        "o + ties_merge([a - o: W, b - o: T])",
        "o + breadcrumbs(a - o, density=0.5, gamma=T)",
    ]))
    dtype = draw(st.sampled_from(["", ' with dtype="fp16"', ' with dtype="bf16"']))
    use_param = draw(st.booleans())
    body = form.replace("W", w).replace("T", "t" if use_param else t)
    param = "param t = 0.5\n" if use_param else ""
    sets = [f"t={t}"] if use_param else draw(st.sampled_from([[], ["t=1e308"], ["x=1"]]))
    text = (f'{param}base o = "base.safetensors"\nmodel a = "a.safetensors"\n'
            f'model b = "b.safetensors"\nsave "out/x.safetensors" = {body}{dtype}\n')
    return text, sets, draw(st.sampled_from([True, False, False]))


@settings(max_examples=fuzz_examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=edge_recipe())
def test_edge_numbers_are_diagnostics_or_success_never_a_crash(workdir, capsys, case):
    text, sets, do_run = case
    limit = sys.getrecursionlimit()
    try:
        check_plan_run(workdir, capsys, text, sets, do_run)
    finally:
        sys.setrecursionlimit(limit)  # main() raises it; hypothesis wants it back


def check_plan_run(workdir, capsys, text, sets, do_run):
    if not (workdir / "base.safetensors").exists():
        tiny_models(workdir, names=("base", "a", "b"))
    path = recipe(workdir, text)
    set_args = [a for s in sets for a in ("--set", s)]
    for command in (["check", path], ["plan", path], ["run", path, "-q", "--force"]):
        if command[0] == "run" and not do_run:
            continue
        try:
            code = main(command + set_args)
        except SystemExit as exc:  # argparse: a usage error
            code = exc.code
        captured = capsys.readouterr()
        assert code in (0, 1, 2), (code, text, sets, captured.err)
        assert "Traceback" not in captured.err + captured.out, captured.err
        assert "internal error" not in captured.err, (text, sets, captured.err)
        if code == 0 and command[0] == "run":
            out = load_torch(str(workdir / "out/x.safetensors"))
            assert all(torch.isfinite(v).all() for v in out.values() if v.is_floating_point())
        if code != 0:
            assert "error[K" in captured.err or "usage:" in captured.err, captured.err
            break


# ------------------------------------------------------------------ 5. the planned schedule

def three_models(folder) -> dict:
    """`base`, `a` and `b`; at flat index 7 of `w`: 0, 3e38 and -3e38."""
    m = two_models(folder, big=(0.0, 3e38))
    m["b"] = {k: -v for k, v in m["a"].items()}
    write_model(os.path.join(folder, "b.safetensors"), m["b"])
    return m


TWO_SAVES = """
    base o = "base.safetensors"
    model a = "a.safetensors"
    model b = "b.safetensors"
    save "out/x.safetensors" = {x}
    save "out/y.safetensors" = {y}
"""


def test_a_bad_result_falls_back_in_its_own_save_even_where_another_has_none(workdir):
    """y has no fallback (no base): x's overflowing key is still copied from x's, y is
    computed; the run plans nothing and changes nothing in the compiled schedule."""
    m = three_models(workdir)
    path = recipe(workdir, TWO_SAVES.format(x="o + 2 * (a - o)", y="0.5 * a + 0.5 * b"))
    compiled = compile_recipe(path, threads=1)
    job = next(j for j in compiled.schedule.jobs if j.key == "w")
    assert job.no_fallback == 1 and [o.save for o in job.fallback.outputs] == [0]
    text = compiled.schedule.executable.dumps()
    result = execute(compiled, RunOptions(threads=1, nonfinite="fallback"))
    assert compiled.schedule.executable.dumps() == text
    assert result.fallbacks == ["w (`out/x.safetensors`: non-finite result)"]
    x, y = (load_file(str(workdir / f"out/{n}.safetensors")) for n in "xy")
    assert np.array_equal(x["w"], m["base"]["w"])
    assert np.allclose(y["w"], 0.5 * m["a"]["w"] + 0.5 * m["b"]["w"], atol=1e-6)


def test_a_bad_result_in_a_save_without_fallback_stops_at_that_save(workdir):
    three_models(workdir)
    path = recipe(workdir, TWO_SAVES.format(x="lerp(o, a, t=0.5)", y="2 * a - b"))
    with pytest.raises(KmxError) as exc:
        run(path, nonfinite="fallback")
    d = diagnostic(exc)
    assert d.code == "K0411" and "out/y.safetensors" in d.message and "no fallback" in d.message
    assert d.span.line == 5 and not (workdir / "out/y.safetensors").exists()


def worker_run(compiled, nonfinite: str):
    """What a Ray task computes for every key, from the serialized schedule alone."""
    exe = compiled.schedule.executable
    return ray_exec.compute_group(exe.part(exe.jobs).dumps(), "cpu", nonfinite)


@pytest.mark.parametrize("formula, dtype, code", [
    ("o + 2 * (a - o)", "fp32", "K0411"), ("lerp(o, a, t=0.75)", "fp16", "K0412")])
def test_a_worker_reports_bad_results_as_a_local_run_does(workdir, formula, dtype, code):
    if dtype == "fp32":
        two_models(workdir, big=HUGE)
    else:
        two_models(workdir, half=2e5)
    path = recipe(workdir, f"""
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out/x.safetensors" = {formula} with dtype="{dtype}"
    """)
    compiled = compile_recipe(path, threads=1)
    with pytest.raises(KmxError) as local:
        execute(compiled, RunOptions(threads=1))
    os.unlink(path)  # a worker never reads the recipe: the places come with the schedule
    with pytest.raises(KmxError) as worker:
        worker_run(compiled, "error")
    assert diagnostic(worker) == diagnostic(local) and diagnostic(worker).code == code
    assert diagnostic(worker).span.line == 3
    local = execute(compiled, RunOptions(threads=1, nonfinite="fallback", force=True))
    _, fallbacks = worker_run(compiled, "fallback")
    assert fallbacks == local.fallbacks and len(fallbacks) == 1


def test_a_worker_names_a_bad_input_at_its_model_line(workdir):
    path = recipe_with_a_bad_input(workdir, np.nan)
    with pytest.raises(KmxError) as exc:
        worker_run(compile_recipe(path, threads=1), "error")
    d = diagnostic(exc)
    assert d.code == "K0401" and "`b`" in d.message and (d.span.line, d.label) == (2, "this input")


@pytest.mark.parametrize("address", ["[::1", "ray://[::1"])
def test_a_malformed_ipv6_ray_address_is_K0407(address):
    from karmixlang.runtime.ray.executor import check_address

    with pytest.raises(KmxError) as exc:
        check_address(address)
    assert exc.value.diagnostics[0].code == "K0407"
