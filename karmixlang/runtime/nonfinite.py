"""The --nonfinite policy: NaN or Inf in an input (K0401), in a computed result (K0411), or
made by the cast to the output dtype (K0412). Stop with a diagnostic (the default), or copy
the key from the save's fallback (--nonfinite=fallback) and list it. The copies are the jobs
planned with each key (KeyJob.fallback); nothing is planned here.

Every output is tested once, on the bytes about to be written: NaN and Inf survive a cast, so
a finite cast result proves the value finite and in range. Only a failure looks further: at the
value in the compute dtype (K0411, or K0412 when only the cast overflowed), and at the inputs a
linear combination summed without testing them (K0401: it names the input, not the recipe).
A key copied as stored is not a result: it is tested only where the cast narrows its dtype,
for overflow. Out-of-core keys are tested piece by piece.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from karmixlang.diagnostics import KmxError, error
from karmixlang.ops import OPS
from karmixlang.plan.executable import Executable, KeyJob, Step
from karmixlang.runtime.tensors import as_bytes, cast, finite

# The keys finished before the stop are kept: a plain rerun would stop at them (K0306).
FALLBACK_HELP = ("continue with --resume --nonfinite=fallback to copy such keys from the "
                 "save's fallback")


class NonFinite(Exception):
    """Input `node` (an index into the node table) of a key holds NaN or Inf."""

    def __init__(self, node: int, key: str):
        self.node, self.key = node, key


class BadResult(Exception):
    """Output `index` of a key is not finite (K0411), or only once cast (K0412)."""

    def __init__(self, index: int, code: str):
        self.index, self.code = index, code


def copied_as_stored(nodes: tuple[Step, ...], job: KeyJob, raw_loads: set[int]) -> set[int]:
    """The outputs that are an input written as stored (through selections and unions)."""
    out = set()
    for k, o in enumerate(job.outputs):
        i = o.node
        while OPS[nodes[i].op].alias:  # a pick's input is a kernel's: it stops there
            i = job.reads(nodes, i)[0]
        if nodes[i].op == "load" and i in raw_loads:
            out.add(k)
    return out


def checked_bytes(ev, job: KeyJob, k: int, value: torch.Tensor, copied: bool, span=None,
                  buffer: str = "read") -> memoryview:
    """Output k's value (of the whole key, or of flat elements `span`) cast to its dtype,
    as bytes; raises BadResult, or NonFinite when an input is to blame."""
    flat = cast(value, job.outputs[k].dtype, ev.scratch, buffer)
    if (copied and not _narrows(value.dtype, flat.dtype)) or finite(flat):
        return as_bytes(flat)
    if copied:
        if not finite(value):
            return as_bytes(flat)  # NaN as stored: copies are written as they are
        raise BadResult(k, "K0412")
    if finite(value):
        raise BadResult(k, "K0412")
    ev.fresh().check_streamed(job, span)
    raise BadResult(k, "K0411")


def _narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    return src.is_floating_point and dst.is_floating_point and \
        torch.finfo(dst).max < torch.finfo(src).max


def on_input(exe: Executable, job: KeyJob, nf: NonFinite, nonfinite: str,
             fallbacks: list[str]) -> KeyJob:
    """The job to run instead of one with a non-finite input: the key copied from every
    save's fallback (planned with the key), or K0401."""
    if nonfinite != "fallback":
        raise input_error(exe, nf) from None
    if job.no_fallback is not None:
        raise no_fallback_error(exe, job.key, job.no_fallback, "K0401") from None
    fallbacks.append(nf.key)
    return job.fallback


def input_error(exe: Executable, nf: NonFinite) -> KmxError:
    return KmxError([error("K0401", f"`{exe.labels[nf.node]}` has NaN or Inf values in key "
                           f"`{nf.key}`", exe.origins.get(nf.node), label="this input",
                           help=f"{FALLBACK_HELP}; or fix the input and run again with --force "
                                "(the finished keys are discarded)")])


@contextmanager
def fallback_inputs(exe: Executable):
    """Computing a fallback: its own non-finite input stops the run (it has no fallback)."""
    try:
        yield
    except NonFinite as nf:
        raise input_error(exe, nf) from None


def on_result(ev, job: KeyJob, bad: BadResult, nonfinite: str,
              fallbacks: list[str]) -> memoryview:
    """The bytes of output `bad.index` for the whole key, copied from its save's fallback
    (--nonfinite=fallback), in fresh buffers; or the K0411/K0412 error."""
    exe = ev.exe
    if nonfinite != "fallback":
        raise result_error(exe, job, bad)
    save = job.outputs[bad.index].save
    copy = job.fallback
    index = next((j for j, o in enumerate(copy.outputs) if o.save == save), None) \
        if copy is not None else None
    if index is None:
        raise no_fallback_error(exe, job.key, save, bad.code)
    fresh = ev.fresh()
    try:
        with fallback_inputs(exe):
            _, value = fresh.run(copy)[index]
            data = checked_bytes(fresh, copy, index, value, index in fresh.copies(copy))
    except BadResult as again:
        raise result_error(exe, job, BadResult(bad.index, again.code), FALLBACK_TOO) from None
    fallbacks.append(f"{job.key} (`{exe.saves[save].written}`: {_WHAT[bad.code]})")
    return data


_WHAT = {"K0411": "non-finite result", "K0412": "overflows its dtype"}
FALLBACK_TOO = " (so has its fallback's value)"


def result_error(exe: Executable, job: KeyJob, bad: BadResult, also: str = "") -> KmxError:
    out = job.outputs[bad.index]
    save = exe.saves[out.save]
    if bad.code == "K0412":
        return KmxError([error(
            "K0412", f"key `{job.key}` of `{save.written}` overflows {out.dtype}{also}: its "
            f"finite values are too large for the output dtype", save.span, label="this save",
            help="save a wider dtype (dtype=\"fp32\") or scale the merge down, and run again "
                 f"with --force; or {FALLBACK_HELP}")])
    return KmxError([error(
        "K0411", f"key `{job.key}` of `{save.written}` has NaN or Inf values{also}: its "
        "computation overflowed", save.span, label="this save",
        help="look for huge values in the inputs, or weights that extrapolate them, and run "
             f"again with --force; or {FALLBACK_HELP}")])


def no_fallback_error(exe: Executable, key: str, save: int, code: str) -> KmxError:
    target = exe.saves[save]
    return KmxError([error(
        code, f"key `{key}` is non-finite and save `{target.written}` has no fallback with it",
        target.span, label="this save", help="give the save a fallback (`with fallback=NAME`)")])
