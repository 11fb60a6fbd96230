"""The --nonfinite policy: NaN or Inf in an input (K0401), in a computed result (K0411), or
made by the cast to the output dtype (K0412). Stop with a diagnostic (the default), or copy
the key from the save's fallback (--nonfinite=fallback) and list it.

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

from ..api import Compiled
from ..diagnostics import KmxError, error
from ..ir import Node
from ..schedule import COMPUTE_ITEMSIZE, KeyJob, Output, make_job, node_keys
from .tensors import as_bytes, cast, finite

FALLBACK_HELP = ("or run with --nonfinite=fallback to copy such keys from the save's fallback")


class NonFinite(Exception):
    """An input of a key holds NaN or Inf."""

    def __init__(self, node: Node, key: str):
        self.node, self.key = node, key


class BadResult(Exception):
    """Output `index` of a key is not finite (K0411), or only once cast (K0412)."""

    def __init__(self, index: int, code: str):
        self.index, self.code = index, code


def copied_as_stored(job: KeyJob, raw_loads: set[int]) -> set[int]:
    """The outputs that are an input written as stored (through selections and unions)."""
    out = set()
    for k, o in enumerate(job.outputs):
        n = o.node
        while n.op in ("select", "exclude", "union"):
            n = job.union_choice[id(n)] if n.op == "union" else n.inputs[0]
        if n.op == "load" and id(n) in raw_loads:
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


def on_input(compiled: Compiled, opts, job: KeyJob, nf: NonFinite,
             fallbacks: list[str]) -> KeyJob:
    """The job to run instead of one with a non-finite input: the key copied from every
    save's fallback, or K0401."""
    if opts.nonfinite != "fallback":
        raise input_error(compiled, nf) from None
    fallbacks.append(nf.key)
    return fallback_job(compiled, job, range(len(job.outputs)), "non-finite input")


def input_error(compiled: Compiled, nf: NonFinite) -> KmxError:
    name = compiled.graph.names.get(nf.node, nf.node.attr("path"))
    spans = compiled.graph.origins.get(nf.node) or [None]
    return KmxError([error("K0401", f"`{name}` has NaN or Inf values in key `{nf.key}`",
                           spans[0], label="this input",
                           help=f"fix the input, {FALLBACK_HELP}")])


@contextmanager
def fallback_inputs(compiled: Compiled):
    """Computing a fallback: its own non-finite input stops the run (it has no fallback)."""
    try:
        yield
    except NonFinite as nf:
        raise input_error(compiled, nf) from None


def on_result(compiled: Compiled, ev, job: KeyJob, bad: BadResult,
              fallbacks: list[str]) -> memoryview:
    """The bytes of output `bad.index` for the whole key, copied from its save's fallback
    (--nonfinite=fallback), in fresh buffers; or the K0411/K0412 error."""
    if ev.opts.nonfinite != "fallback":
        raise result_error(compiled, job, bad)
    copy = fallback_job(compiled, job, [bad.index], "non-finite result")
    fresh = ev.fresh()
    try:
        with fallback_inputs(compiled):
            (_, value), = fresh.run(copy)
            data = checked_bytes(fresh, copy, 0, value, 0 in fresh.copies(copy))
    except BadResult as again:
        raise result_error(compiled, job, BadResult(bad.index, again.code),
                           " (so has its fallback's value)") from None
    save = compiled.graph.saves[job.outputs[bad.index].save]
    fallbacks.append(f"{job.key} (`{save.written}`: {_WHAT[bad.code]})")
    return data


_WHAT = {"K0411": "non-finite result", "K0412": "overflows its dtype"}


def result_error(compiled: Compiled, job: KeyJob, bad: BadResult, also: str = "") -> KmxError:
    out = job.outputs[bad.index]
    save = compiled.graph.saves[out.save]
    if bad.code == "K0412":
        return KmxError([error(
            "K0412", f"key `{job.key}` of `{save.written}` overflows {out.dtype}{also}: its "
            f"finite values are too large for the output dtype", save.span, label="this save",
            help="save a wider dtype (dtype=\"fp32\"), scale the merge down, "
                 + FALLBACK_HELP)])
    return KmxError([error(
        "K0411", f"key `{job.key}` of `{save.written}` has NaN or Inf values{also}: its "
        "computation overflowed", save.span, label="this save",
        help="look for huge weights or coefficients in this save's expression, "
             + FALLBACK_HELP)])


def fallback_job(compiled: Compiled, job: KeyJob, indices, why: str) -> KeyJob:
    """The key's outputs at `indices` copied from their saves' fallbacks."""
    graph = compiled.graph
    keys = node_keys(graph, compiled.schedule.headers)
    outputs = []
    for i in indices:
        o = job.outputs[i]
        save = graph.saves[o.save]
        fb = save.fallback
        if fb is None or not keys[fb].has(job.key):
            raise KmxError([error(
                "K0401" if why == "non-finite input" else "K0411",
                f"key `{job.key}` is non-finite and save `{save.written}` has no fallback "
                "with it", save.span, label="this save",
                help="give the save a fallback (`with fallback=NAME`)")])
        outputs.append(Output(o.save, fb, o.dtype, o.shape, why))
    order = {n: i for i, n in enumerate(graph.topo())}
    item = COMPUTE_ITEMSIZE[compiled.plan.data["compute_dtype"]]
    return make_job(job.key, outputs, keys, order, compiled.schedule.headers, item)
