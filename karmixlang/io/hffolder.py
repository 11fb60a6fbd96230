"""A save into a folder: a Hugging Face model folder that `transformers` loads.

A save whose path does not end in `.safetensors` writes a folder (docs/language.md): the
merged tensors as `model.safetensors` (or `model-0000i-of-0000N.safetensors` shards with
`model.safetensors.index.json`, 5GB shards by default, as `save_pretrained` writes them), and
beside them its *side files*: `config.json`, `generation_config.json`, the tokenizer files and
chat template, and a model card `README.md`.

The side files are planned, not found at run time: `FolderSave` is the narrow type between
planning (plan/folders.py) and writing (runtime/outputs.py). Each `SideFile` is one file name
and where its bytes come from — copied byte for byte from a path (`copy_from`), or generated
at plan time (`generated`, the exact bytes written) — plus `origin`, the line the plan shows.
Nothing else decides what a folder holds: the writer writes exactly `FolderSave.files`.

How another planner changes a folder's side files (e.g. `tokenizer="union"`, which writes a
generated tokenizer and a larger vocabulary):

    folder = folder.with_files(
        SideFile("tokenizer.json", "generated: the union vocabulary", generated=data),
        drop=("vocab.json", "merges.txt", "tokenizer.model"))  # files that would disagree
    folder = folder.with_config(vocab_size=len(union))

`with_files` replaces files by name (or adds them) and drops the named ones; `with_config`
sets fields of the generated `config.json`. Both return a new `FolderSave`. `config.json`'s
`vocab_size` is already the embedding's row count of the written tensors, so a merge whose
embeddings have the union's rows gets the right one without `with_config`.

Writing is whole-folder atomic: everything goes to the hidden sibling `.NAME.kmx-partial/`,
which is renamed to NAME once complete; an existing NAME is first moved aside to
`.NAME.kmx-old/` and removed after the rename (`publish`). Torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace

from karmixlang.io.files import PARTIAL_SUFFIX, hidden_path, write_all
from karmixlang.io.layouts.llm import layer_count

WEIGHTS_NAME = "model.safetensors"
DEFAULT_SHARD = "5GB"  # transformers' save_pretrained default max_shard_size
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
CARD = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
COPIED = (GENERATION_CONFIG, *TOKENIZER_FILES)  # copied as they are when the source has them
OLD_SUFFIX = ".kmx-old"  # an existing folder, moved aside while the new one takes its name
# The config fields that hold the layer count, whichever the architecture's config uses.
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")
# Embedding keys: the input embedding of the architectures llm.py knows, by name suffix.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                      "embed_in.weight")
_TORCH_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                 "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def is_folder_path(path: str) -> bool:
    """A save path names a folder unless it ends in `.safetensors` (docs/language.md)."""
    return not path.endswith(".safetensors")


def staging_path(folder: str) -> str:
    """The hidden sibling a folder is written into before it takes its name."""
    return hidden_path(os.path.normpath(folder), PARTIAL_SUFFIX)


def weights_path(folder: str) -> str:
    """Where the tensors of a folder save are written: inside its staging folder."""
    return os.path.join(staging_path(folder), WEIGHTS_NAME)


def tensor_path(save_path: str) -> str:
    """Where a save's tensors are written: its path, or a folder save's staging file."""
    return weights_path(save_path) if is_folder_path(save_path) else save_path


def published_path(path: str, folder: str) -> str:
    """A file's name once its staging folder has become `folder`."""
    staging = staging_path(folder)
    rel = os.path.relpath(path, staging)
    return path if rel.startswith("..") else os.path.normpath(os.path.join(folder, rel))


def source_folder(checkpoint_path: str) -> str:
    """The folder of a checkpoint as a recipe names it: the folder itself, or the one holding
    its file (`.../model.safetensors.index.json`, `.../model.safetensors`)."""
    return checkpoint_path if os.path.isdir(checkpoint_path) else os.path.dirname(checkpoint_path)


@dataclass(frozen=True)
class SideFile:
    """One file of a folder save beside its tensors. Exactly one of `copy_from` (a path,
    copied byte for byte when the folder is written) and `generated` (the bytes) is set;
    `origin` says where it comes from, for the plan."""

    name: str
    origin: str
    copy_from: str | None = None
    generated: bytes | None = None

    def __post_init__(self):
        if (self.copy_from is None) == (self.generated is None):
            raise ValueError(f"side file {self.name!r}: give exactly one of copy_from, generated")
        if os.path.basename(self.name) != self.name or self.name.startswith("."):
            raise ValueError(f"side file {self.name!r} must be a plain file name")

    def content(self) -> bytes:
        if self.generated is not None:
            return self.generated
        with open(self.copy_from, "rb") as f:
            return f.read()


@dataclass(frozen=True)
class FolderSave:
    """What a folder save writes beside its tensors: `path` the final folder, `source` the
    folder the copied files come from (the `tokenizer=` model's, default the save's
    fallback), `files` sorted by name."""

    path: str
    source: str
    files: tuple[SideFile, ...]

    def get(self, name: str) -> SideFile | None:
        return next((f for f in self.files if f.name == name), None)

    def with_files(self, *files: SideFile, drop: Iterable[str] = ()) -> FolderSave:
        """These files added or put in place of those of the same name; `drop` removed."""
        gone = set(drop) | {f.name for f in files}
        kept = [f for f in self.files if f.name not in gone]
        return replace(self, files=tuple(sorted(kept + list(files), key=lambda f: f.name)))

    def with_config(self, **fields) -> FolderSave:
        """`config.json` with these fields set (its origin notes them)."""
        old = self.get(CONFIG)
        config = json.loads(old.content())
        config.update(fields)
        note = ", ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        return self.with_files(SideFile(CONFIG, f"{old.origin}; {note}",
                                        generated=_json_bytes(config)))


def _json_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def true_config(config: dict, tensors: list[tuple[str, str, tuple[int, ...]]]
                ) -> tuple[dict, list[str]]:
    """The source's config with the fields that describe the tensors made true for the
    written ones: the layer count (whichever of LAYER_FIELDS the config has), `vocab_size`
    (the embedding's rows) and the dtype (`torch_dtype` and/or `dtype`, whichever it has;
    `torch_dtype` when neither). Returns the config and the changed fields, for the plan."""
    out = dict(config)
    changed = []

    def put(name, value):
        if out.get(name) != value:
            changed.append(f"{name}={value}")
        out[name] = value

    layers = layer_count(k for k, _, _ in tensors)
    for name in LAYER_FIELDS:
        if name in out and layers:
            put(name, layers)
    embedding = next((shape for k, _, shape in sorted(tensors)
                      if k.endswith(EMBEDDING_SUFFIXES) and len(shape) == 2), None)
    if embedding is not None and "vocab_size" in out:
        put("vocab_size", embedding[0])
    dtype = written_dtype(tensors)
    if dtype is not None:
        for name in [n for n in ("torch_dtype", "dtype") if n in out] or ["torch_dtype"]:
            put(name, dtype)
    return out, changed


def written_dtype(tensors) -> str | None:
    """The torch dtype name most of the written float bytes have (ties: the name first in
    sorted order), None without float tensors."""
    weight: dict[str, int] = {}
    for _, dt, shape in tensors:
        if dt in _TORCH_DTYPES:
            n = 1
            for d in shape:
                n *= d
            weight[_TORCH_DTYPES[dt]] = weight.get(_TORCH_DTYPES[dt], 0) + n
    return min(weight, key=lambda k: (-weight[k], k)) if weight else None


def model_card(title: str, base_models: list[str], methods: list[str], recipe: str,
               version: str) -> bytes:
    """README.md: the YAML front matter the Hugging Face Hub reads (`base_model`,
    `library_name`, `tags`), then the methods and the recipe."""
    yaml = ["---", "base_model:"] + [f"- {json.dumps(m)}" for m in base_models] + [
        "library_name: transformers", "tags:", "- merge", "- kmx", "---"]
    fence = "```"
    while fence in recipe:  # a recipe holding ``` still shows as one code block
        fence += "`"
    body = [f"# {title}", "",
            f"A merge made with kmx (karmixlang {version}) from these models:", ""]
    body += [f"- {m}" for m in base_models]
    body += ["", "## Methods", "", ", ".join(f"`{m}`" for m in methods) or "(none: a copy)",
             "", "## Recipe", "", fence + "kmx", recipe.rstrip("\n"), fence, ""]
    return ("\n".join(yaml + [""] + body)).encode()


def plan_side_files(path: str, source: str, source_name: str,
                    tensors: list[tuple[str, str, tuple[int, ...]]], card: bytes) -> FolderSave:
    """The side files of a folder save at `path`, from the folder `source` (which must hold
    a readable JSON `config.json`: the caller checks). `source_name` names it for the plan."""
    with open(os.path.join(source, CONFIG), "rb") as f:
        config, changed = true_config(json.load(f), tensors)
    note = f"from {source_name}" + (f", with {', '.join(changed)}" if changed else "")
    files = [SideFile(CONFIG, note, generated=_json_bytes(config)),
             SideFile(CARD, "generated: model card", generated=card)]
    files += [SideFile(n, f"copied from {source_name}", copy_from=os.path.join(source, n))
              for n in COPIED if os.path.isfile(os.path.join(source, n))]
    return FolderSave(path, source, tuple(sorted(files, key=lambda f: f.name)))


# ---------------------------------------------------------------- writing

def write_side_files(staging: str, folder: FolderSave) -> None:
    """Write every side file into the staging folder, durably (fsync)."""
    for f in folder.files:
        target = os.path.join(staging, f.name)
        try:
            os.unlink(target)  # a stale file from an interrupted run is never followed
        except FileNotFoundError:
            pass
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o666)
        try:
            write_all(fd, f.content())
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(staging)


def publish(staging: str, folder: str) -> None:
    """Rename the staging folder to `folder`. An existing `folder` is moved aside first and
    removed only once the new one is in place, so the name never holds a half-written
    folder; at worst (a crash between the two renames) the old one is left at
    `.NAME.kmx-old`."""
    old = hidden_path(os.path.normpath(folder), OLD_SUFFIX)
    if os.path.lexists(old):
        shutil.rmtree(old)
    replacing = os.path.lexists(folder)
    if replacing:
        os.rename(folder, old)
    os.rename(staging, folder)
    _fsync_dir(os.path.dirname(os.path.abspath(folder)))
    if replacing:
        shutil.rmtree(old)


def foreign_files(folder: str) -> list[str]:
    """What an existing folder holds besides the files a folder save writes (tensor files,
    the index, the side files): a folder holding anything else is not replaced."""
    known = {CONFIG, CARD, WEIGHTS_NAME, WEIGHTS_NAME + ".index.json", *COPIED}
    return sorted(n for n in os.listdir(folder) if n not in known and not (
        n.startswith("model-") and n.endswith(".safetensors")))


def discard(staging: str) -> None:
    """Remove a staging folder (a fresh start: nothing of an earlier run is published)."""
    if os.path.isdir(staging) and not os.path.islink(staging):
        shutil.rmtree(staging)
    elif os.path.lexists(staging):
        os.unlink(staging)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
