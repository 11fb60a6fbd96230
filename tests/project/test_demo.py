"""The README's first quick-start command: `kmx demo` runs the whole pipeline on its own data."""

from __future__ import annotations

from safetensors import safe_open

from karmixlang.cli import main


def test_kmx_demo_merges_its_synthetic_checkpoints(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    assert main(["demo", str(tmp_path / "demo"), "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "Plan for" in out and "Distance of each output to each base" in out
    outputs = sorted((tmp_path / "demo" / "out").glob("*.safetensors"))
    assert [p.name for p in outputs] == ["demo-on-a.safetensors", "demo-on-b.safetensors"]
    with safe_open(str(outputs[0]), "np") as f:
        assert len(list(f.keys())) > 1000 and "kmx_recipe" in f.metadata()
