"""Folder saves: which model each one's config and tokenizer come from, and the side files it
writes (io/hffolder.FolderSave), planned from headers and the source folder's small files.

The source is the save's `tokenizer=` model, else its fallback when that is a plain model
(the one base), and must be a Hugging Face folder with a `config.json` (K0340, K0341). A
planner that changes a folder's tokenizer (tokenizer="union") starts from `plan_folders`'
result and substitutes files with `FolderSave.with_files` / `with_config`.
"""

from __future__ import annotations

import json
import os

from karmixlang import __version__
from karmixlang.builtins import BY_OP
from karmixlang.diagnostics import KmxError, error
from karmixlang.io.guard import save_tensors
from karmixlang.io.hffolder import CONFIG, FolderSave, is_folder_path, model_card, \
    plan_side_files, source_folder
from karmixlang.ir.graph import Graph, reachable
from karmixlang.plan.vocab import with_union_tokenizer


def plan_folders(graph: Graph, sched, recipe_text: str) -> dict[int, FolderSave]:
    """Save index -> its FolderSave, for every save into a folder. Raises KmxError."""
    folders, diags = {}, []
    loads = {n.attr("path"): n for n in reachable(graph.roots()) if n.op == "load"}
    for i, save in enumerate(graph.saves):
        if not is_folder_path(save.path) or (os.path.lexists(save.path) and
                                             not os.path.isdir(save.path)):
            continue  # a file where the folder goes: the output guard says why (K0305, K0342)
        try:
            folders[i] = _plan(graph, sched, i, save, loads, recipe_text)
        except KmxError as e:
            diags += e.diagnostics
    if diags:
        raise KmxError(diags)
    return folders


def _plan(graph, sched, index, save, loads, recipe_text) -> FolderSave:
    # "union" (plan/vocab.py) starts from the fallback's tokenizer and substitutes its own
    path = save.tokenizer if save.tokenizer != "union" else None
    if path is None and save.fallback is not None and save.fallback.op == "load":
        path = save.fallback.attr("path")
    if path is None:
        raise KmxError([error(
            "K0341", f"`{save.written}` is a folder, but no model gives its config and "
                     "tokenizer: the save has no single base", save.span, label="this save",
            help="name the model: `with tokenizer=NAME` (a model read from a Hugging Face "
                 "folder)")])
    node = loads.get(path)
    name = f"`{graph.display_name(node)}`" if node is not None else f"`{os.path.basename(path)}`"
    folder = source_folder(path)
    why = _config_problem(os.path.join(folder, CONFIG))
    if why:
        raise KmxError([error(
            "K0340", f"`{save.written}` is a folder, which takes its config and tokenizer from "
                     f"{name}, but {why}", save.span, label="this save",
            help="name a model read from a Hugging Face folder (one with config.json): "
                 "`with tokenizer=NAME`; or save a single file: a path ending in "
                 "`.safetensors`")])
    tensors = save_tensors(sched, index)
    card = model_card(os.path.basename(os.path.normpath(save.path)), _models(graph, save),
                      _methods(save), recipe_text, __version__)
    return with_union_tokenizer(plan_side_files(save.path, folder, name, tensors, card),
                                sched.vocab.get(index))


def _config_problem(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return f"`{path}` does not exist"
    except (OSError, ValueError) as e:
        return f"`{path}` is not readable JSON ({e})"
    return None if isinstance(doc, dict) else f"`{path}` is not a JSON object"


def _models(graph: Graph, save) -> list[str]:
    """The models a save is made from (the fallback first): a Hugging Face folder's name (a
    folder with a config.json), else the file's."""
    roots = ([save.fallback] if save.fallback is not None else []) + [save.expr]
    names = []
    for n in reachable(roots):
        if n.op in ("load", "lora"):
            path = n.attr("path")
            folder = source_folder(path)
            hf = os.path.isfile(os.path.join(folder, CONFIG))
            name = os.path.basename(os.path.normpath(folder if hf else path))
            if name not in names:
                names.append(name)
    return names


def _methods(save) -> list[str]:
    """The builtins a save's expression calls, as the recipe spells them, sorted; arithmetic
    on models (`a + 0.5*(b - a)`) as `weighted sum`."""
    found = set()
    for n in reachable([save.expr]):
        if n.op in BY_OP:
            found.add(BY_OP[n.op].name)
        elif n.op == "lincomb":
            found.add("weighted sum")
    return sorted(found)

