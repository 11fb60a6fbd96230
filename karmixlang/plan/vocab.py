"""Embedding rows matched by token: each input read in its save's target vocabulary.

A save's target vocabulary is its tokenizer model's (`tokenizer=MODEL`; by default the
save's fallback, else its first input), or with `tokenizer="union"` that model's
vocabulary followed by every token another input has and it lacks, in recipe order, with
ids after its highest token id (so the union has none of its padding rows). Row i of the target holds the token with id i. Each input is
read through a row gather (io/views.gather_rows) that gives row i that token's row in the
input, or — when the input lacks the token — the input's own mean row of that key (the mean
over the rows of its own tokens). Rows that hold no token (the tokenizer model padding its
embedding) are the tokenizer model's own rows, and the mean row for the others.

Embedding-shaped keys are the float keys outside the layer stack (io/layouts/llm.py) whose
first dimension is the input's embedding row count (config.json `vocab_size`, else one more
than its highest token id): `embed_tokens.weight`, `lm_head.weight`, a head's bias.

Without `tokenizer=`, a save matches rows by token only when every input has a vocabulary and
they are not all the same; an input whose rows already are the target's is read as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from karmixlang.diagnostics import KmxError, Span, error
from karmixlang.io.dtypes import DTYPES
from karmixlang.io.header import CheckpointHeader
from karmixlang.io.layouts.llm import split_layer_key
from karmixlang.io.union_tokenizer import STALE, added_entry, union_files
from karmixlang.io.views import gather_rows
from karmixlang.io.hffolder import FolderSave, SideFile, source_folder
from karmixlang.io.vocab import Vocabulary, read_vocabulary, vocabulary_file
from karmixlang.ir.graph import Graph, Node
from karmixlang.plan.views import save_loads

UNION = "union"
Runs = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class InputVocab:
    """One input as its save's vocabulary reads it, for the plan."""

    path: str  # the input as planned
    file: str  # its vocabulary file
    tokens: int  # how many tokens its vocabulary holds
    rows: int  # its embedding rows
    lacking: int  # target tokens it does not have (their rows are its mean row)
    keys: tuple[str, ...]  # the keys read by token


@dataclass(frozen=True)
class SaveVocab:
    """A save whose embedding rows are matched by token."""

    mode: str  # "union" or "model"
    source: str  # the tokenizer model's folder
    file: str  # its vocabulary file
    rows: int  # the target's rows (the output embedding's)
    tokens: int  # tokens in the target vocabulary
    added: tuple[dict, ...]  # union: the added tokens' tokenizer.json entries, by id
    inputs: tuple[InputVocab, ...]
    files: tuple[tuple[str, bytes], ...] = ()  # union: the generated tokenizer files


def plan_vocabularies(graph: Graph, headers: dict[Node, CheckpointHeader]
                      ) -> tuple[dict[Node, CheckpointHeader], dict[int, SaveVocab]]:
    """The headers with every embedding-shaped key read in its save's vocabulary, and per
    save that matches rows by token, what it does."""
    out, plans, chosen = dict(headers), {}, {}
    vocabs: dict[str, Vocabulary | None] = {}
    if all(s.tokenizer is None for s in graph.saves) and not any(
            vocabulary_file(source_folder(n.attr("path"))) for n in headers if n.op == "load"):
        return out, plans  # no vocabulary anywhere (every non-LLM merge): nothing to match
    order = {n: i for i, n in enumerate(graph.topo())}

    def vocab(path: str, span: Span | None) -> Vocabulary | None:
        folder = source_folder(path)
        if folder not in vocabs:
            vocabs[folder] = read_vocabulary(folder, span)
        return vocabs[folder]

    for i, save in enumerate(graph.saves):
        loads = [n for n in save_loads(graph, save, order) if n.op == "load"]
        found = {n.attr("path"): vocab(n.attr("path"), (graph.origins.get(n) or [None])[0])
                 for n in loads}
        choice = save.tokenizer
        if choice not in (None, UNION):
            found.setdefault(choice, vocab(choice, save.span))
        if not loads or not _matches(found, choice, save.span):
            continue
        source = loads[0].attr("path") if choice in (None, UNION) else choice
        target = _Target(found[source], choice == UNION,
                         [v for p, v in found.items() if p != source], save.span)
        inputs = []
        for n in loads:
            path = n.attr("path")
            v = found[path]
            gather = target.gather(v, own=path == source)
            keys = embedding_keys(out[n], v.rows)
            if n in chosen and chosen[n][0] != gather:
                other = graph.saves[chosen[n][1]].written
                raise KmxError([error(
                    "K0348", f"`{path}` would be read in two vocabularies: this save's and "
                    f"the save of `{other}`'s", save.span, label="in this save",
                    help="give both saves the same `tokenizer=`")])
            if gather != ((0, v.rows),) and n not in chosen:
                out[n] = gather_rows(out[n], keys, gather, _runs(sorted(
                    {r for r in v.ids.values() if r < v.rows})))
            chosen[n] = (gather, i)
            inputs.append(InputVocab(path, v.source, len(v.ids), v.rows, target.lacking(v),
                                     tuple(keys)))
        added = target.added_entries()
        files = union_files(source_folder(source), list(added), save.span) if added else {}
        plans[i] = SaveVocab(UNION if choice == UNION else "model", source_folder(source),
                             target.vocab.source, target.rows, target.tokens, added,
                             tuple(inputs), tuple(sorted(files.items())))
    return out, plans


def with_union_tokenizer(folder: FolderSave, vocab: SaveVocab | None) -> FolderSave:
    """A folder save's side files with a union's generated tokenizer files in place of the
    copied ones, and without the slow tokenizer files that would disagree with them."""
    if vocab is None or not vocab.files:
        return folder
    return folder.with_files(*(SideFile(name, "generated: the union vocabulary", generated=data)
                               for name, data in vocab.files), drop=STALE)


def _matches(found: dict[str, Vocabulary | None], choice: str | None,
             span: Span | None) -> bool:
    """Whether the save reads its inputs by token: asked for (then every input needs a
    vocabulary, K0345), or by default when every input has one and they differ."""
    if choice is None:
        known = [v for v in found.values() if v is not None]
        return len(known) == len(found) and len({(frozenset(v.ids.items()), v.rows)
                                                  for v in known}) > 1
    missing = [p for p, v in found.items() if v is None]
    if missing:
        raise KmxError([error(
            "K0345", f"`{missing[0]}` has no vocabulary: no tokenizer.json, vocab.json or "
            "tokenizer.model beside it", span, label="this save matches rows by token",
            help="name Hugging Face model folders that hold their tokenizer files, or drop "
                 "`tokenizer=`")])
    return True


def embedding_keys(header: CheckpointHeader, rows: int) -> list[str]:
    """The keys whose rows are token rows (see the module docstring)."""
    return [k for k, t in header.tensors.items()
            if t.shape and t.shape[0] == rows and DTYPES[t.dtype].is_float
            and split_layer_key(k) is None]


def _runs(rows: list[int]) -> Runs:
    """Consecutive source rows as (first, count) runs; -1 (the mean row) runs too."""
    out: list[list[int]] = []
    for r in rows:
        if out and ((r < 0 and out[-1][0] < 0) or (r >= 0 and out[-1][0] >= 0
                                                    and out[-1][0] + out[-1][1] == r)):
            out[-1][1] += 1
        else:
            out.append([r, 1])
    return tuple((a, n) for a, n in out)


class _Target:
    """The target vocabulary: which token each row holds."""

    def __init__(self, vocab: Vocabulary, union: bool, others: list[Vocabulary],
                 span: Span | None):
        for v in [vocab] + others:
            if v.size > v.rows:
                raise KmxError([error(
                    "K0346", f"the vocabulary of `{v.source}` has token ids up to "
                    f"{v.size - 1}, but its embedding has {v.rows} rows (config.json "
                    "`vocab_size`)", span, label="in this save",
                    help="the folder's tokenizer and weights do not belong together")])
        # A union's added tokens take the ids after the tokenizer model's highest one (the
        # ids the tokenizers library gives them, io/union_tokenizer.py): its padding rows go.
        self.vocab = vocab
        self.own_rows = vocab.size if union else vocab.rows
        self.row_token = vocab.tokens_by_id()
        self.added: list[tuple[str, Vocabulary]] = []
        if union:
            seen = set(vocab.ids)
            for v in others:
                for token, _ in sorted(v.ids.items(), key=lambda item: item[1]):
                    if token not in seen:
                        seen.add(token)
                        self.row_token[vocab.size + len(self.added)] = token
                        self.added.append((token, v))
        self.rows = self.own_rows + len(self.added)
        self.tokens = len(vocab.ids) + len(self.added)

    def gather(self, v: Vocabulary, own: bool) -> Runs:
        """Each target row's source row in `v` (-1: its mean row)."""
        tokens = self.row_token
        return _runs([i if own and i < self.own_rows else
                      v.ids.get(tokens[i], -1) if i in tokens else -1
                      for i in range(self.rows)])

    def lacking(self, v: Vocabulary) -> int:
        return sum(1 for t in self.row_token.values() if t not in v.ids)

    def added_entries(self) -> tuple[dict, ...]:
        """The union's added tokens as tokenizer.json entries, with the flags each had."""
        out = []
        for k, (token, v) in enumerate(self.added):
            flags = next((e for e in v.added if e.get("content") == token), {})
            out.append(added_entry(token, self.vocab.size + k, flags))
        return tuple(out)
