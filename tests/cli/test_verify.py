"""`kmx verify`: an untouched output verifies (recomputed bit for bit, FILE untouched); one byte
changed in an input or in the output fails with the culprit named; inputs moved are found
with --set; a file kmx did not write is refused."""

from __future__ import annotations

import hashlib
import os
import shutil

from safetensors.numpy import save_file
import numpy as np

from conftest import cli, recipe, tiny_models

TEXT = """
    param models = "models"
    base o = "${models}/base.safetensors"
    model a = "${models}/a.safetensors"
    save "out/m.safetensors" = lerp(o, a, 0.3) with dtype="fp16"
"""


def kmx(capsys, *argv) -> tuple[int, str]:
    code, out, err = cli(capsys, *argv)
    return code, out + err


def made(workdir, capsys, *flags) -> str:
    (workdir / "models").mkdir()
    tiny_models(workdir / "models", names=("base", "a"))
    path = recipe(workdir, TEXT, "merge.kmx")
    assert kmx(capsys, "run", "-q", path, *flags)[0] == 0
    return str(workdir / "out/m.safetensors")


def flip(path, offset_from_end=1) -> None:
    data = bytearray(open(path, "rb").read())
    data[-offset_from_end] ^= 0x40
    open(path, "wb").write(bytes(data))


def test_an_untouched_output_verifies_and_is_not_touched(workdir, capsys):
    out = made(workdir, capsys)
    before = (hashlib.sha256(open(out, "rb").read()).hexdigest(), os.stat(out).st_mtime_ns)
    rc, text = kmx(capsys, "verify", out)
    assert rc == 0 and "verified" in text and "6 keys" in text, text
    assert kmx(capsys, "verify", "--hashes-only", out)[0] == 0
    assert (hashlib.sha256(open(out, "rb").read()).hexdigest(), os.stat(out).st_mtime_ns) == before
    assert sorted(os.listdir(workdir / "out")) == ["m.safetensors"]  # no temporary left


def test_one_byte_of_an_input_names_the_input(workdir, capsys):
    out = made(workdir, capsys)
    flip(workdir / "models/a.safetensors")
    for flags in ((), ("--hashes-only",)):
        rc, text = kmx(capsys, "verify", *flags, out)
        assert rc == 1 and "K0514" in text and "a.safetensors" in text, text


def test_one_byte_of_the_output_names_the_key(workdir, capsys):
    out = made(workdir, capsys)
    flip(out)  # the last tensor in the file's data region
    rc, text = kmx(capsys, "verify", out)
    assert rc == 1 and "K0515" in text and "1 keys differ" in text, text


def test_moved_inputs_are_found_with_set(workdir, capsys):
    out = made(workdir, capsys)
    shutil.move(workdir / "models", workdir / "elsewhere")
    assert kmx(capsys, "verify", out)[0] == 1  # K0301: not where the recipe says
    rc, text = kmx(capsys, "verify", "--set", f"models={workdir / 'elsewhere'}", out)
    assert rc == 0, text


def test_a_sharded_output_verifies(workdir, capsys):
    global TEXT
    old = TEXT
    TEXT = TEXT.replace('dtype="fp16"', 'dtype="fp16", shard="200B"')
    try:
        made(workdir, capsys)
    finally:
        TEXT = old
    index = str(workdir / "out/m.safetensors.index.json")
    rc, text = kmx(capsys, "verify", index)
    assert rc == 0, text


def test_a_file_kmx_did_not_write_is_refused(workdir, capsys):
    path = str(workdir / "plain.safetensors")
    save_file({"x": np.zeros(2, np.float32)}, path)
    rc, text = kmx(capsys, "verify", path)
    assert rc == 1 and "K0516" in text and "not a kmx output" in text
