"""Shared helpers: tiny checkpoints written by the tests themselves, and kmx's command line
run in this process."""

from __future__ import annotations

import os
import signal
import textwrap

import numpy as np
import pytest

from karmixlang.cli import main
from karmixlang.demo.synth import write_model


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder for recipes and checkpoints, with the user cache kept inside it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    return tmp_path


def recipe(folder, text: str, name: str = "r.kmx") -> str:
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text).lstrip())
    return path


def tiny_models(folder, names=("base", "a", "b", "c"), seed=0, extra=None) -> dict:
    """Small fp32 models sharing one key set, plus an integer buffer; returns the arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, name in enumerate(names):
        tensors = {
            "model.w": rng.normal(size=(6, 5)).astype(np.float32),
            "model.conv": rng.normal(size=(3, 2, 3, 3)).astype(np.float32),
            "model.scalar": np.array(rng.normal(), dtype=np.float32),
            "model.bias": rng.normal(size=(7,)).astype(np.float16),
            "vae.decoder": rng.normal(size=(4,)).astype(np.float32),
            "pos_ids": np.arange(5, dtype=np.int64).reshape(1, 5),
        }
        tensors.update((extra or {}).get(name, {}))
        write_model(os.path.join(folder, f"{name}.safetensors"), tensors)
        out[name] = tensors
    return out


def fuzz_examples(default: int) -> int:
    """Hypothesis examples for a fuzz test: bounded in CI, raised for a release run with
    KMX_FUZZ_EXAMPLES (docs/reliability.md)."""
    return int(os.environ.get("KMX_FUZZ_EXAMPLES", default))


def cli(capsys, *argv) -> tuple[int, str, str]:
    """`kmx ARGV` in this process -> (exit code, stdout, stderr). argparse's own exits count as
    codes; no output may hold a traceback or an internal error."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "internal error" not in out + err
    return code, out, err


def default_sigint() -> None:
    """preexec_fn for a kmx child that must see Ctrl-C: a test runner started in the
    background by a non-interactive shell ignores SIGINT, children inherit that, and kmx
    then leaves it ignored on purpose."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
