"""`kmx inspect` and the run summary print SHA-256, AutoV2 and AutoV3 as sha256sum gives them."""

from __future__ import annotations

import hashlib
import json
import struct

from conftest import recipe, tiny_models
from karmixlang.cli import main


def _expected(path) -> tuple[str, str, str]:
    """(sha256, AutoV2, AutoV3) from the formula: the whole file; its first 10 hex digits; the
    SHA-256 of the bytes after the 8-byte length and the header, first 12 hex digits."""
    raw = path.read_bytes()
    full = hashlib.sha256(raw).hexdigest()
    n = struct.unpack("<Q", raw[:8])[0]
    return full, full[:10], hashlib.sha256(raw[8 + n:]).hexdigest()[:12]


def test_inspect_prints_the_three_hashes(workdir, capsys):
    tiny_models(workdir, names=("a",))
    path = workdir / "a.safetensors"
    full, v2, v3 = _expected(path)
    assert main(["inspect", str(path)]) == 0
    assert f"SHA-256 {full} · AutoV2 {v2} · AutoV3 {v3}" in capsys.readouterr().out
    assert main(["inspect", "--json", str(path)]) == 0
    got = json.loads(capsys.readouterr().out)["hashes"][str(path)]
    assert (got["sha256"], got["autov2"], got["autov3"]) == (full, v2, v3)
    assert got["data_sha256"].startswith(v3)
    assert main(["inspect", "--no-hash", str(path)]) == 0
    assert "SHA-256" not in capsys.readouterr().out


def test_the_run_summary_prints_each_outputs_hashes(workdir, capsys):
    tiny_models(workdir, names=("base", "a"))
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out.safetensors" = lerp(o, a, t=0.5)
    """)
    assert main(["run", path, "-q"]) == 0
    full, v2, v3 = _expected(workdir / "out.safetensors")
    assert f"out.safetensors: SHA-256 {full} · AutoV2 {v2} · AutoV3 {v3}" in \
        capsys.readouterr().err
