"""The tokenizer files of a union vocabulary: the tokenizer model's, with the tokens the other
inputs add, at the ids plan/vocab.py gave their rows.

Generated from the tokenizer model's `tokenizer.json` (a union needs one: K0347) as JSON,
without the `tokenizers` library. Every token the union adds is one of its `added_tokens`,
with the flags it had in its own model's `added_tokens` (`special`, `normalized`, `lstrip`,
`rstrip`, `single_word`) or, for a token of that model's vocabulary, none set. The
`tokenizers` library gives an added token that is not in the model vocabulary the next id
after the model's and the earlier added tokens', in file order, so the union's ids are dense
after the tokenizer model's highest id: exactly the ids plan/vocab.py gave the rows. Such a
token is looked up and decoded by id like any other; text is encoded into it only where its
literal spelling appears (a special token such as `<|im_start|>` is matched as it should;
a byte-level `Ġword` of another model is not produced from " word").

`tokenizer_config.json`'s `added_tokens_decoder` gets the added tokens too. The slow
tokenizer files (`vocab.json`, `merges.txt`, `tokenizer.model`, `added_tokens.json`) would
disagree with the union and are left out of the folder: `transformers` loads the fast
tokenizer from `tokenizer.json` alone.
"""

from __future__ import annotations

import json
import os

from karmixlang.diagnostics import KmxError, Span, error

STALE = ("vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
_FLAGS = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
          "special": False}


def added_entry(token: str, token_id: int, flags: dict) -> dict:
    """An added-token entry of tokenizer.json: the flags a token had in its own model's
    added tokens (`flags`, empty for a model-vocabulary token), unset ones false."""
    return dict(_FLAGS, **{k: flags[k] for k in _FLAGS if k in flags}, id=token_id,
                content=token)


def union_files(folder: str, new_entries: list[dict],
                span: Span | None = None) -> dict[str, bytes]:
    """`tokenizer.json` (and `tokenizer_config.json` when the folder has one) of the tokenizer
    model in `folder` with the added tokens `new_entries` (`added_entry`s)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise KmxError([error(
            "K0347", f"`tokenizer=\"union\"` needs the tokenizer model's tokenizer.json; "
            f"`{folder}` has none", span, label="in this save",
            help="make a model whose folder has tokenizer.json the save's base (or "
                 "`fallback=`), or keep one model's vocabulary with `tokenizer=MODEL`")])
    doc = _load(path)
    doc["added_tokens"] = sorted(list(doc.get("added_tokens") or []) + new_entries,
                                 key=lambda e: e["id"])
    out = {"tokenizer.json": _dump(doc)}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        config = _load(config_path)
        decoder = dict(config.get("added_tokens_decoder") or {})
        for e in new_entries:
            decoder[str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
        config["added_tokens_decoder"] = decoder
        out["tokenizer_config.json"] = _dump(config)
    return out


def _load(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _dump(doc) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
