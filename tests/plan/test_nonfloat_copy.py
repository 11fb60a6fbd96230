"""A non-float key identical in every input of a save is copied as is, with no fallback
(the plan says so); inputs whose copies differ keep today's error (K0310)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import recipe, tiny_models
from karmixlang.cli import main
from karmixlang.plan import schedule as sched_mod
from reference_np import sum_

LINEAR = """
    model a = "a.safetensors"
    model b = "b.safetensors"
    save "out.safetensors" = 0.3*a + 0.7*b
"""


def test_identical_position_ids_are_copied_and_the_rest_computed(workdir, capsys):
    arrays = tiny_models(workdir, names=("a", "b"))
    path = recipe(workdir, LINEAR)
    assert main(["plan", path]) == 0
    text = capsys.readouterr().out
    assert "no fallback" in text and "pos_ids: identical non-float in every input (I64)" in text
    assert "0 copied from fallback, 1 copied as is" in text
    assert main(["run", path, "-q"]) == 0
    out = load_file(workdir / "out.safetensors")
    assert out["pos_ids"].dtype == np.int64
    assert out["pos_ids"].tobytes() == arrays["a"]["pos_ids"].tobytes()
    for k in ("model.w", "model.conv", "vae.decoder"):
        want = sum_([arrays["a"][k].astype(np.float64), arrays["b"][k].astype(np.float64)],
                    [0.3, 0.7]).astype(np.float32)
        np.testing.assert_allclose(out[k], want, rtol=1e-6, atol=1e-6)


def test_differing_position_ids_keep_the_error(workdir, capsys):
    tiny_models(workdir, names=("a", "b"),
                extra={"b": {"pos_ids": np.array([[0, 1, 2, 3, 5]], np.int64)}})
    assert main(["plan", recipe(workdir, LINEAR)]) == 1
    err = capsys.readouterr().err
    assert "K0310" in err and "pos_ids" in err


@pytest.mark.parametrize("other", [np.arange(5, dtype=np.int32).reshape(1, 5),
                                   np.arange(6, dtype=np.int64).reshape(1, 6)],
                         ids=["dtype", "shape"])
def test_another_dtype_or_shape_is_not_identical(workdir, capsys, other):
    tiny_models(workdir, names=("a", "b"), extra={"b": {"pos_ids": other}})
    assert main(["plan", recipe(workdir, LINEAR)]) == 1
    assert "pos_ids" in capsys.readouterr().err


def test_copies_larger_than_the_read_limit_are_not_compared(workdir, capsys, monkeypatch):
    tiny_models(workdir, names=("a", "b"))
    monkeypatch.setattr(sched_mod, "IDENTICAL_READ_LIMIT", 39)  # pos_ids holds 40 bytes
    assert main(["plan", recipe(workdir, LINEAR)]) == 1
    assert "K0310" in capsys.readouterr().err


def test_a_plain_dtype_conversion_needs_no_fallback(workdir, capsys):
    arrays = tiny_models(workdir, names=("a",))
    path = recipe(workdir, """
        model a = "a.safetensors"
        save "x.safetensors" = a with dtype="fp16"
    """)
    assert main(["run", path, "-q"]) == 0
    out = load_file(workdir / "x.safetensors")
    assert out["pos_ids"].tobytes() == arrays["a"]["pos_ids"].tobytes()
    for k, v in arrays["a"].items():
        if v.dtype.kind == "f":
            assert out[k].dtype == np.float16
            np.testing.assert_array_equal(out[k], v.astype(np.float16))
