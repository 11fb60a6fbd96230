"""A model folder's vocabulary (token string -> id), read from its tokenizer files only.

Planning needs to know, for every input whose embedding rows are matched by token, which
token each row holds, and nothing else: no tensor data, no tokenizer library. The files are
tried in the order the Hugging Face fast tokenizers prefer them:

1. `tokenizer.json` — the `tokenizers` library's file: `model.vocab` (a token -> id map for
   BPE, WordPiece and WordLevel; a list of `[piece, score]` whose index is the id for
   Unigram) plus `added_tokens`;
2. `vocab.json` (GPT-2's slow tokenizers), plus `added_tokens.json`;
3. `tokenizer.model` (SentencePiece; the `sentencepiece` library, imported only then), plus
   `added_tokens.json`.

With 2 and 3, the added tokens of `tokenizer_config.json` (`added_tokens_decoder`) count too.
A folder's embedding row count is its `config.json` `vocab_size` when it has one (models pad
it past the last token id), else one more than the highest token id.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from karmixlang.diagnostics import KmxError, Span, error

VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
MAX_VOCAB_FILE_BYTES = 512 * 2**20  # far above any real tokenizer (Gemma's is ~35 MB)


@dataclass(frozen=True)
class Vocabulary:
    """`ids`: every token the tokenizer knows, model vocabulary and added tokens alike;
    `added`: the added tokens' entries as tokenizer.json writes them (content, id, flags);
    `rows`: the embedding rows the model holds for it."""

    source: str  # the file read
    ids: dict[str, int]
    added: tuple[dict, ...]
    rows: int

    @property
    def size(self) -> int:
        """The token ids' extent: one more than the highest id."""
        return max(self.ids.values(), default=-1) + 1

    def tokens_by_id(self) -> dict[int, str]:
        """Each id's token; where two tokens share an id (an added token spelled as a vocabulary
        entry), the one met first in the file."""
        out: dict[int, str] = {}
        for token, i in self.ids.items():
            out.setdefault(i, token)
        return out


def vocabulary_file(folder: str) -> str | None:
    for name in VOCAB_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def read_vocabulary(folder: str, span: Span | None = None) -> Vocabulary | None:
    """The folder's vocabulary, or None when it has no tokenizer file; K0345 when one is
    unreadable."""
    path = vocabulary_file(folder)
    if path is None:
        return None
    name = os.path.basename(path)
    try:
        if name == "tokenizer.json":
            ids, added = _from_tokenizer_json(_json(path))
        else:
            ids = _from_vocab_json(path) if name == "vocab.json" else _from_sentencepiece(path)
            added = _extra_added(folder)
            for entry in added:
                ids[entry["content"]] = entry["id"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KmxError([error("K0345", f"cannot read the vocabulary of `{path}`: {_why(exc)}",
                              span, help="the tokenizer file is damaged or of a kind kmx does "
                                         "not read; docs/language.md, \"Vocabularies\"")])
    rows = _config_rows(folder)
    return Vocabulary(path, ids, tuple(added),
                      rows if rows is not None else max(ids.values(), default=-1) + 1)


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, KeyError):
        return f"no field {exc}"
    return str(exc)


def _json(path: str):
    with open(path, "rb") as f:
        data = f.read(MAX_VOCAB_FILE_BYTES + 1)
    if len(data) > MAX_VOCAB_FILE_BYTES:
        raise ValueError("the file is larger than any tokenizer file")
    return json.loads(data)


def _ids(pairs) -> dict[str, int]:
    out: dict[str, int] = {}
    for token, i in pairs:
        if not isinstance(token, str) or not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"entry {token!r}: {i!r} is not a token and an id")
        out[token] = i
    return out


def _from_tokenizer_json(data: dict) -> tuple[dict[str, int], list[dict]]:
    vocab = data["model"]["vocab"]
    if isinstance(vocab, list):  # Unigram: [piece, score] at index = id
        ids = _ids((entry[0], i) for i, entry in enumerate(vocab))
    elif isinstance(vocab, dict):
        ids = _ids(vocab.items())
    else:
        raise ValueError("`model.vocab` is neither a map nor a list")
    added = list(data.get("added_tokens") or [])
    ids.update(_ids((a["content"], a["id"]) for a in added))
    return ids, added


def _from_vocab_json(path: str) -> dict[str, int]:
    data = _json(path)
    if not isinstance(data, dict):
        raise ValueError("not a token -> id map")
    return _ids(data.items())


def _from_sentencepiece(path: str) -> dict[str, int]:
    try:  # only for folders whose one tokenizer file is a SentencePiece model
        import sentencepiece
    except ImportError:
        raise ValueError("reading tokenizer.model needs the `sentencepiece` library: "
                         "pip install 'karmixlang[sentencepiece]'") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (RuntimeError, OSError) as exc:  # sentencepiece reports a bad file as RuntimeError
        raise ValueError(str(exc)) from None
    return {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())}


def _extra_added(folder: str) -> list[dict]:
    """Added tokens of a folder without tokenizer.json: added_tokens.json, then
    tokenizer_config.json's added_tokens_decoder (which also says which are special)."""
    found: dict[str, dict] = {}
    path = os.path.join(folder, "added_tokens.json")
    if os.path.isfile(path):
        for token, i in _ids(_json(path).items()).items():
            found[token] = {"id": i, "content": token, "special": False}
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
        decoder = _json(path).get("added_tokens_decoder") or {}
        for i, entry in decoder.items():
            found[entry["content"]] = dict(entry, id=int(i))
    return sorted(found.values(), key=lambda e: e["id"])


def _config_rows(folder: str) -> int | None:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        size = _json(path).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None  # hfout's config handling reports a bad config.json; rows come from ids
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None
