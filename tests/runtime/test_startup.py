"""runtime/startup.py: what `kmx run` does while torch loads — the read-ahead of the first
keys' byte ranges, and the background import — and that a run's start-up imports no more
than it needs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from itertools import accumulate

from conftest import recipe, tiny_models
from karmixlang.api import compile
from karmixlang.runtime import startup
from karmixlang.runtime.readahead import Readahead


def compiled_mean(workdir):
    tiny_models(workdir)
    return compile(recipe(workdir, """
        model a = "a.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = 0.3*a + 0.7*b
    """))


def advised(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, off, n, how: calls.append((os.readlink(f"/proc/self/fd/{fd}"),
                                                              off, n, how)))
    return calls


def test_prefetch_advises_the_first_keys_ranges_up_to_the_limit(workdir, monkeypatch):
    jobs = compiled_mean(workdir).schedule.jobs
    calls = advised(monkeypatch)
    ranges = [(s.file, s.begin, s.end - s.begin) for j in jobs for i in j.tensors.values()
              for s in i.segments]
    # A limit under the first range's bytes: that range only, in its file.
    n = startup.prefetch(jobs, limit=1)
    assert [c[:3] for c in calls] == ranges[:1] and n == ranges[0][2]
    assert {c[3] for c in calls} == {os.POSIX_FADV_WILLNEED}
    calls.clear()
    total = sum(s.end - s.begin for j in jobs for i in j.tensors.values() for s in i.segments)
    assert startup.prefetch(jobs, limit=1 << 40) == total and len(calls) == sum(
        len(i.segments) for j in jobs for i in j.tensors.values())


def test_prefetch_changes_no_input_and_skips_files_it_cannot_open(workdir, monkeypatch):
    jobs = compiled_mean(workdir).schedule.jobs
    before = {f: os.stat(workdir / f) for f in ("a.safetensors", "b.safetensors")}
    os.remove(workdir / "b.safetensors")
    calls = advised(monkeypatch)
    startup.prefetch(jobs)
    assert calls and all(c[0].endswith("a.safetensors") for c in calls)
    after = os.stat(workdir / "a.safetensors")
    assert (after.st_mtime_ns, after.st_size) == (before["a.safetensors"].st_mtime_ns,
                                                  before["a.safetensors"].st_size)


def test_readahead_keeps_a_window_of_ranges_advised_past_the_keys_started(workdir,
                                                                        monkeypatch):
    jobs = compiled_mean(workdir).schedule.jobs
    calls = advised(monkeypatch)
    ranges = [(s.file, s.begin, s.end - s.begin) for j in jobs for i in j.tensors.values()
              for s in i.segments]
    ends = list(accumulate(r[2] for r in ranges))

    def through(limit):  # how many ranges, in order, cover `limit` bytes
        return next((k + 1 for k, end in enumerate(ends) if end >= limit), len(ranges))

    def advised_so_far():  # a call's ranges go a file at a time: compare as multisets
        return sorted(c[:3] for c in calls)

    first_job = sum(s.end - s.begin for i in jobs[0].tensors.values() for s in i.segments)
    window = ranges[0][2] + 1  # needs the first two ranges
    ahead = Readahead(jobs, window)
    assert ahead.start(-1) == ends[1] and advised_so_far() == sorted(ranges[:2])
    # job 0 started: advised on from where it stopped, until `window` past job 0
    ahead.start(0)
    assert advised_so_far() == sorted(ranges[:through(first_job + window)])
    # the last job started: every range advised, each once
    ahead.start(len(jobs) - 1)
    assert ahead.start(len(jobs) - 1) == 0 and advised_so_far() == sorted(ranges)


def test_readahead_holds_one_descriptor_at_a_time_and_none_after(workdir, monkeypatch):
    """The Reader keeps a descriptor per input; the read-ahead must not keep a second one (a
    pool of hundreds of inputs would need twice the shell's limit), nor take many at once
    beside torch's import in the background (a failed import there broke torch)."""
    jobs = compiled_mean(workdir).schedule.jobs
    advised(monkeypatch)
    open_now, most = set(), []
    real_open, real_close = os.open, os.close

    def counting_open(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        open_now.add(fd)
        most.append(len(open_now))
        return fd

    def counting_close(fd):
        open_now.discard(fd)
        real_close(fd)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "close", counting_close)
    ahead = Readahead(jobs, 1 << 40)
    assert ahead.start(-1) > 0
    assert len({s.file for j in jobs for i in j.tensors.values() for s in i.segments}) == 2
    assert most and max(most) == 1 and not open_now


def test_a_failed_background_import_is_left_to_the_main_thread(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    raised = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    startup.load_torch_in_background().join(10)
    assert raised == []


def test_the_runtime_loads_without_scipy():
    # scipy.optimize is re-basin's alone: ~0.3 s of every other run's start-up.
    code = "import sys, karmixlang.runtime.executor; assert 'scipy' not in sys.modules, 'scipy'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
