"""Out-of-core keys: evaluate a key's graph over chunks of its flattened elements when its
members do not fit the memory limit together (planning and the rules: outofcore.py).

The passes, in the key's evaluation order:
1. each whole-key filter (trim, della, ...) is computed one member at a time, in memory, and
   spilled to a temporary file in the compute dtype, or as its keep mask (a bit an element)
   when its result is its input or zero (outofcore.mask_spill): later passes then apply the
   mask to the input formed again;
2. each Gram method accumulates its members' Gram matrix over the chunks, then solves for
   its coefficients;
3. a last pass forms the outputs chunk by chunk and yields each piece (the executor tests it,
   casts it and hands it to the writer).
Inputs are read chunk by chunk in their stored dtype and widened per chunk.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import numpy as np
import torch

from karmixlang.diagnostics import KmxError, error
from karmixlang.io.header import TensorInfo
from karmixlang.ops import OPS, Chunk
from karmixlang.plan.executable import KeyJob
from karmixlang.plan.outofcore import MIN_CHUNK, barrier_groups, mask_spill, threshold_trim
from karmixlang.runtime import kernels as ops
from karmixlang.runtime.kernels import sparse as ops_sparse
from karmixlang.runtime.kernels.base import GramSum
from karmixlang.runtime.kernels.table import GRAM_SPLITS
from karmixlang.runtime.tensors import Reader, part

Span = tuple[int, int]
# A piece of an output: (index into job.outputs, byte offset within the key, bytes).
Piece = tuple[int, int, memoryview]
# A piece of an output's value: (index into job.outputs, element offset, values there).
ValuePiece = tuple[int, int, torch.Tensor]
# Integers of a float's width: a mask spill tests an entry's bits for +0.
_INTS = {8: torch.int64, 4: torch.int32, 2: torch.int16}
# Mask spills are packed this many bytes at a time.
_PACK_BYTES = 1 << 17
# The level of a trim's pass over the chunks that counts in its sampled bracket (levels 0 and
# 1: the radix selection's), and the blocks that sample is taken from.
_BRACKET = -1
_SAMPLE_BLOCKS = 16


class Streamed:
    """An out-of-core key's outputs, produced piece by piece as they are iterated: each piece
    must be written before the next is asked for (they live in reused buffers)."""

    def __init__(self, pieces: Iterator[Piece]):
        self.pieces = pieces

    def __iter__(self) -> Iterator[Piece]:
        return self.pieces


def run_chunked(ev, job: KeyJob, raw_ok: set[int], into: dict[int, str],
                spill_root: str) -> Iterator[ValuePiece]:
    """The outputs' values chunk by chunk, in writing order; each lives in reused buffers
    until the next is asked for. `raw_ok`: loads only copied (kept in their stored dtype);
    `into`: outputs accumulated in reused buffers (both as the executor decides for a whole
    key)."""
    return _ChunkedKey(ev, job, raw_ok, into, spill_root).pieces()


class _ChunkedKey:
    def __init__(self, ev, job: KeyJob, raw_ok: set[int], into: dict[int, str],
                 spill_root: str):
        self.ev, self.job, self.raw_ok, self.into = ev, job, raw_ok, into
        self.nodes = ev.nodes
        self.numel = math.prod(job.outputs[0].shape)
        self.chunk = job.ooc.chunk_elems
        self.spill_root = spill_root
        self.spill_reader = Reader()
        # node -> its value for a span, read back from spills (inputs not evaluated)
        self.given: dict[int, Callable[[Span | None], object]] = {}
        # node -> its value for a span from its inputs' values there (Gram methods once
        # solved, trims once their thresholds are known, filters spilled as masks)
        self.replaced: dict[int, Callable[[list, Span | None], object]] = {}
        self.tops: list[_Top] = []

    def spans(self) -> Iterator[Span]:
        for a in range(0, self.numel, self.chunk):
            yield a, min(self.numel, a + self.chunk)

    def pieces(self) -> Iterator[ValuePiece]:
        folder = tempfile.mkdtemp(prefix=".kmx-spill-", dir=self.spill_root)
        try:
            for batch in barrier_groups(self.nodes, self.job, self.ev.compute.itemsize):
                n = self.nodes[batch[0]]
                if threshold_trim(n, self.ev.compute.itemsize):
                    self.select_tops(batch)
                elif OPS[n.op].chunk is Chunk.GRAM:
                    self.solve(batch[0])
                else:
                    self.spill(batch[0], folder)
            targets = [o.node for o in self.job.outputs]
            for a, b in self.spans():
                values = self.evaluate(targets, (a, b), self.into)
                for k, o in enumerate(self.job.outputs):
                    yield k, a, values[o.node]
        finally:
            self.spill_reader.close()
            shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------ evaluation

    def evaluate(self, targets: list[int], span: Span | None, into: dict | None = None):
        """The targets' values over `span` (None: the whole key, shaped): the job's steps
        that lead to them, stopping at spilled values."""
        job, ev = self.job, self.ev
        if span is None or span[0] == 0:  # a pass starts: trims count their ties afresh
            for top in self.tops:
                top.seen = 0
        needed = self.needed(targets)
        keep = set(targets)
        values: dict[int, object] = {}
        for k, i in enumerate(job.steps):
            if i in needed:
                if i in self.given:
                    values[i] = self.given[i](span)
                elif i in self.replaced:
                    values[i] = self.replaced[i]([values[x] for x in self.nodes[i].inputs],
                                                 span)
                else:
                    values[i] = ev.step(i, job.key, values, i in self.raw_ok, job, into or {},
                                        span)
            for m in job.free_after[k]:
                if m not in keep:
                    values.pop(m, None)
        return values

    def needed(self, targets: list[int]) -> set[int]:
        out, stack = set(), list(targets)
        while stack:
            i = stack.pop()
            if i in out:
                continue
            n = self.nodes[i]
            if i in self.job.deferred:  # evaluated inside its consumer, from its inputs
                stack.extend(n.inputs)
                continue
            out.add(i)
            if i in self.given:
                continue
            stack.extend(self.job.reads(self.nodes, i))
        return out

    # ------------------------------------------------------------ Gram methods

    def solve(self, i: int) -> None:
        """One pass over the chunks accumulating the Gram matrix; then the node is formed from
        its inputs' chunks with the coefficients found."""
        n = self.nodes[i]
        split = GRAM_SPLITS[n.op]
        acc, args, kwargs = None, None, None
        for span in self.spans():
            values = self.evaluate(list(n.inputs), span)
            args, kwargs = self.ev.call_args(n, self.job.key, [values[x] for x in n.inputs])
            rows = split.rows(args)
            acc = acc or GramSum(len(rows))
            acc.add(rows, split.center(args, kwargs))
        form = split.solve(acc.result(), args, kwargs)
        key = self.job.key

        def formed(ins: list, span: Span | None):
            a, kw = self.ev.call_args(n, key, ins)
            return form(*a, **kw)

        self.replaced[i] = formed

    # ------------------------------------------------------------ trims by threshold

    def select_tops(self, batch: list[int]) -> None:
        """The trims of `batch` (alone, or per member inside ties; none needs another's
        result) without holding a member: each member's threshold, its exact k-th largest
        magnitude, is guessed from a sample (`sample_bits`), then found in one pass over the
        chunks that keeps the candidates around the guess (kernels/sparse.Bracket), all
        members in the same pass; where a guess missed, two more passes of a radix selection
        find it. Every chunk then keeps what is above it, and the ties at it by position, as
        the whole-key trim does (ops_sparse)."""
        members: list[tuple[_Top, int]] = []
        for i in batch:
            n = self.nodes[i]
            _, kwargs = self.ev.call_args(n, self.job.key, [None] * len(n.inputs))
            k = ops_sparse.kept_count(kwargs["density"], self.numel)
            tops = [_Top(k, self.numel, self.job.ooc.candidates) for _ in n.inputs]
            members += zip(tops, n.inputs)
            self.tops += tops
            self.replaced[i] = self.trimmed(n, tops, kwargs)
        inputs = list(dict.fromkeys(x for _, x in members))
        levels = (0, 1)
        if self.numel >= ops_sparse.BRACKET_MIN_ELEMS:
            samples = self.sample_bits(inputs)
            for top, x in members:
                top.guess(samples[x])
            levels = (_BRACKET, *levels)
        for level in levels:
            if all(top.settled for top, _ in members):
                break  # (every threshold is 0 at level 0: more zeros than entries to drop)
            for span in self.spans():
                values = self.evaluate(inputs, span)
                bits = {x: _magnitude_bits(values[x]) for x in inputs}
                for top, x in members:
                    top.count(bits[x], level)
            for top, _ in members:
                top.settle(level)

    def trimmed(self, n, tops: list[_Top], kwargs: dict):
        """The trim node's value for a span from its inputs', once its thresholds are known."""
        if OPS[n.op].chunk is Chunk.SPLIT:
            weights, rule = self.ev.weights(n.attr("weights")), kwargs.get("rule", "mass")
            return lambda ins, span: ops.elect(
                [top.keep(x) for top, x in zip(tops, ins)], weights, rule=rule)
        return lambda ins, span: tops[0].keep(ins[0])

    def sample_bits(self, inputs: list[int]) -> dict[int, np.ndarray]:
        """Each input's magnitude bits at about SAMPLE_ELEMS places, sorted: every fourth entry
        of _SAMPLE_BLOCKS blocks spread evenly over the key (at most a quarter of it), each
        evaluated alone. Only a guess is made from it; a trim evaluated inside a block counts
        its ties from that block, which the passes that follow count again from the start."""
        length = min(4 * ops_sparse.SAMPLE_ELEMS // _SAMPLE_BLOCKS,
                     self.numel // (4 * _SAMPLE_BLOCKS))
        length -= length % MIN_CHUNK
        last = (self.numel - length) // MIN_CHUNK
        parts: dict[int, list[np.ndarray]] = {x: [] for x in inputs}
        for j in range(_SAMPLE_BLOCKS):
            start = last * j // (_SAMPLE_BLOCKS - 1) * MIN_CHUNK
            values = self.evaluate(inputs, (start, start + length))
            for x in inputs:
                parts[x].append(_magnitude_bits(values[x]).numpy()[::4].copy())
        return {x: np.sort(np.concatenate(p)) for x, p in parts.items()}

    # ------------------------------------------------------------ whole-key filters

    def spill(self, i: int, folder: str) -> None:
        """Compute the filter one member at a time over the whole key and write each result
        to a temporary file; later passes read it back chunk by chunk."""
        n, key = self.nodes[i], self.job.key
        if OPS[n.op].chunk is Chunk.SPLIT:  # ties: trim each member alone, elect over chunks
            (_, weights), kwargs = self.ev.call_args(n, key, [None] * len(n.inputs))
            infos = []
            for m, x in enumerate(n.inputs):
                member = self.evaluate([x], None)[x]
                infos.append(self.write_spill(ops.trim(member, density=kwargs["density"]),
                                              folder, f"{i}-{m}"))
                del member
            rule = kwargs.get("rule", "mass")

            def elected(span):
                return ops.elect([self.read_spill(info, span) for info in infos], weights,
                                 rule=rule)

            self.given[i] = elected
            return
        values = self.evaluate(list(n.inputs), None)
        result = self.ev.kernel(n, key, [values[x] for x in n.inputs])
        del values
        if mask_spill(n):
            path = self.write_file(_kept_bits(result), folder, str(i))
            del result
            self.replaced[i] = lambda ins, span: ops_sparse.keep_where(
                self.read_mask(path, span, ins[0].shape), ins[0])
            return
        info = self.write_spill(result, folder, str(i))
        self.given[i] = lambda span: self.read_spill(info, span)

    def write_spill(self, t: torch.Tensor, folder: str, name: str) -> TensorInfo:
        data = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        path = self.write_file(data, folder, name)
        dtype = {torch.float32: "F32", torch.float64: "F64"}[t.dtype]
        return TensorInfo(name, dtype, tuple(t.shape), path, 0, data.nbytes)

    def write_file(self, data: memoryview, folder: str, name: str) -> str:
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                done = 0
                while done < data.nbytes:
                    done += os.pwrite(fd, data[done:], done)
            finally:
                os.close(fd)
        except OSError as exc:
            raise KmxError([error(
                "K0402", f"cannot write a temporary file for out-of-core key `{self.job.key}` "
                f"in `{folder}`: {exc.strerror}",
                help="out-of-core keys spill filtered members next to the output (see `kmx "
                     "plan`): free some space, or raise --memory-limit")]) from None
        return path

    def read_spill(self, info: TensorInfo, span: Span | None) -> torch.Tensor:
        t = self.spill_reader.read(part(info, span) if span else info)
        return t.to(self.ev.device)

    def read_mask(self, path: str, span: Span | None, shape) -> torch.Tensor:
        """The keep mask of `span` (None: the whole key) from a mask spill. Spans start at a
        multiple of the chunk, a power of two of at least MIN_CHUNK: on a byte."""
        start, stop = span or (0, self.numel)
        with open(path, "rb") as f:
            f.seek(start // 8)
            packed = np.frombuffer(f.read(-(-stop // 8) - start // 8), dtype=np.uint8)
        bits = np.unpackbits(packed, count=stop - start, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_)).reshape(shape).to(self.ev.device)


def _kept_bits(result: torch.Tensor) -> memoryview:
    """Where a masking filter's result is not +0, a bit an element (little-endian within a
    byte): applied to the input with kernels/sparse.keep_where, it gives the result bit for
    bit (an input entry of +0 is +0 kept or not; -0 is kept as such)."""
    flat = result.detach().reshape(-1).cpu()
    bits = flat.view(_INTS[flat.element_size()]).numpy()
    packed = np.empty(-(-bits.size // 8), dtype=np.uint8)
    step = 8 * _PACK_BYTES  # packs a slice at a time: no whole-key mask of bools
    for start in range(0, bits.size, step):
        packed[start // 8: -(-min(bits.size, start + step) // 8)] = np.packbits(
            bits[start:start + step] != 0, bitorder="little")
    return memoryview(packed)


def _magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    # A non-negative float32's bits, read as an int32, order exactly as its value.
    return t.detach().reshape(-1).abs().cpu().view(torch.int32)


class _Top:
    """One member's trim out of core: its threshold, the k-th largest magnitude (as bits),
    found by a bracket guessed from a sample (one pass: `guess`, then level _BRACKET), or,
    where the guess missed, by a two-level radix selection over the chunks (the high 16 bits,
    then the low 16 within the chosen bucket); then each chunk's mask. Ties at the threshold
    are kept by position, counted in `seen` over a pass's chunks in order."""

    def __init__(self, k: int, numel: int, candidates: int):
        self.k, self.numel, self.candidates = k, numel, candidates
        self.bracket: ops_sparse.Bracket | None = None
        self.hist: np.ndarray | None = None  # the radix levels' (where a guess missed)
        self.high = 0  # the threshold's high 16 bits, once level 0 is settled
        self.above = 0  # entries known to be above the threshold
        self.nonzero = 0  # entries whose magnitude is not 0 (level 0)
        self.threshold = 0
        self.room = 0  # entries equal to the threshold that are kept
        self.seen = 0
        self.settled = k == 0

    def guess(self, sample: np.ndarray) -> None:
        if not self.settled:
            self.bracket = ops_sparse.Bracket(self.numel - self.k, self.numel, sample,
                                              cap=self.candidates)

    def count(self, bits: torch.Tensor, level: int) -> None:
        if self.settled:
            return
        # numpy: its shifts, comparisons and masked copies are several times torch's on one
        # thread
        a = bits.numpy()
        if level == _BRACKET:
            self.bracket.add(a)
        elif level == 0:
            self.nonzero += int(np.count_nonzero(a))
            counts = np.bincount(a >> 16, minlength=1 << 16)
            if self.hist is None:
                self.hist = counts
            else:
                self.hist += counts
        else:
            self.hist += np.bincount(a[(a >> 16) == self.high] & 0xFFFF, minlength=1 << 16)

    def settle(self, level: int) -> None:
        if self.settled:
            return
        if level == _BRACKET:
            value = self.bracket.found()
            if value is not None:
                self.threshold, self.above = value, self.bracket.count_above(value)
                self.room = self.k - self.above
                self.settled = True
            self.bracket = None  # its candidates
            return
        if level == 0 and self.nonzero < self.k:
            # The k-th largest magnitude is 0 (a sparse task vector at a high density): every
            # non-zero entry is kept, and the first k - nonzero zeros by position.
            self.threshold, self.above, self.room = 0, self.nonzero, self.k - self.nonzero
            self.settled = True
            return
        # from the top bucket down: the bucket where the k-th largest falls
        from_top = self.hist[::-1].cumsum()
        index = int(np.searchsorted(from_top, self.k - self.above if level else self.k))
        bucket = (1 << 16) - 1 - index
        above = int(from_top[index - 1]) if index else 0
        if level == 0:
            self.high, self.above = bucket, above
        else:
            self.threshold = (self.high << 16) | bucket
            self.above += above
            self.room = self.k - self.above
            self.settled = True
        self.hist[:] = 0

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        if self.k == 0:
            return torch.zeros_like(x)
        flat = x.reshape(-1)
        out = torch.empty_like(flat)
        self.seen += ops_sparse.keep_largest(flat, self.threshold, self.room - self.seen, out)
        return out.reshape(x.shape)
