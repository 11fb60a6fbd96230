"""`kmx convert`: pickle checkpoints to safetensors, bit-exact, running none of their code."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from karmixlang.cli import main
from karmixlang.diagnostics import KmxError
from karmixlang.runtime.convert import check_bounds
from karmixlang.runtime.unpickle import PickledTensor, StorageRef
from conftest import recipe


def _state() -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    return OrderedDict([
        ("model.w", w), ("model.w_t", w.t()), ("model.part", w[1:3, ::2]),  # views of one storage
        ("model.h", torch.randn(3, generator=g).half()),
        ("model.bf", torch.randn(4, generator=g).bfloat16()),
        ("cond.position_ids", torch.arange(5).reshape(1, 5)),
        ("model.p", torch.nn.Parameter(torch.randn(2, generator=g))),
        ("model.empty", torch.zeros(0, 3)), ("model.scalar", torch.tensor(1.5)),
        ("model.mask", torch.tensor([True, False])),
    ])


def _assert_same(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    for k, t in ref.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k], t.detach()), k


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_convert_is_bit_exact_against_torch_load(workdir, capsys, legacy):
    src, dst = workdir / "m.ckpt", workdir / "m.safetensors"
    torch.save({"state_dict": _state(), "global_step": 7, "dtype": torch.float16}, src,
               _use_new_zipfile_serialization=not legacy)
    assert main(["convert", str(src), str(dst)]) == 0
    err = capsys.readouterr().err
    assert "10 tensors" in err and "global_step" in err and "`state_dict`" in err
    _assert_same(load_file(dst), torch.load(src, weights_only=True)["state_dict"])


@pytest.mark.parametrize("wrapper", [("model",), ("module",), ("state_dict", "model"), ()])
def test_the_usual_nesting_is_unwrapped(workdir, wrapper):
    obj = _state()
    for k in reversed(wrapper):
        obj = {k: obj, "epoch": 3}
    torch.save(obj, workdir / "m.pt")
    assert main(["convert", str(workdir / "m.pt"), str(workdir / "o.safetensors")]) == 0
    _assert_same(load_file(workdir / "o.safetensors"), _state())


def test_dtype_casts_floats_only(workdir):
    torch.save(_state(), workdir / "m.pth")
    assert main(["convert", str(workdir / "m.pth"), str(workdir / "o.safetensors"),
                 "--dtype", "fp16"]) == 0
    got, ref = load_file(workdir / "o.safetensors"), _state()
    for k, t in ref.items():
        want = t.detach().half() if t.is_floating_point() else t
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    assert main(["convert", str(workdir / "m.pth"), str(workdir / "p.safetensors"),
                 "--dtype", "int3"]) == 2


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.mark.parametrize("how", ["plain_pickle", "inside_torch_save", "beside_the_state"])
def test_a_hostile_pickle_is_refused_and_its_payload_never_runs(workdir, capsys, how):
    target = str(workdir / "PWNED")
    src = workdir / "evil.ckpt"
    if how == "plain_pickle":
        with open(src, "wb") as f:
            pickle.dump({"state_dict": _Payload(target)}, f)
    elif how == "inside_torch_save":
        torch.save({"state_dict": {"w": torch.ones(2), "x": _Payload(target)}}, src)
    else:
        torch.save({"state_dict": {"w": torch.ones(2)}, "hook": _Payload(target)}, src)
    assert main(["convert", str(src), str(workdir / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "K0330" in err and "mkdir" in err and "Traceback" not in err
    assert not os.path.exists(target)
    assert not (workdir / "o.safetensors").exists()
    assert [n for n in os.listdir(workdir) if "kmx-partial" in n] == []


@pytest.mark.parametrize("content,code", [
    (b"\x80\x04garbage", "K0331"),
    (b"PK\x03\x04" + b"\0" * 40, "K0331"),
    (None, "K0332"),
])
def test_broken_or_empty_files_give_coded_errors(workdir, capsys, content, code):
    src = workdir / "x.ckpt"
    if content is None:
        torch.save({"global_step": 3}, src)
    else:
        src.write_bytes(content)
    assert main(["convert", str(src), str(workdir / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert code in err and "Traceback" not in err
    assert not (workdir / "o.safetensors").exists()


def test_a_tensor_past_its_storage_is_refused():
    t = PickledTensor(StorageRef("0", "F32", 4, lambda: bytes(16)), 2, (3,), (1,))
    with pytest.raises(KmxError) as info:
        check_bounds("k", t)
    assert info.value.diagnostics[0].code == "K0331"
    check_bounds("k", PickledTensor(t.storage, 1, (3,), (1,)))  # up to the last element: fine


def test_never_over_an_input_and_only_with_force(workdir, capsys):
    src, dst = workdir / "m.ckpt", workdir / "o.safetensors"
    torch.save(_state(), src)
    assert main(["convert", str(src), str(src)]) == 1
    assert "K0305" in capsys.readouterr().err
    dst.write_bytes(b"old")
    assert main(["convert", str(src), str(dst)]) == 1
    assert "K0306" in capsys.readouterr().err and dst.read_bytes() == b"old"
    assert main(["convert", str(src), str(dst), "--force"]) == 0
    _assert_same(load_file(dst), _state())


def test_a_recipe_naming_a_ckpt_gets_the_convert_command(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    torch.save(_state(), workdir / "old.ckpt")
    path = recipe(workdir, """
        model old = "old.ckpt"
        save "out.safetensors" = old
    """)
    assert main(["plan", path]) == 1
    err = capsys.readouterr().err
    want = f"kmx convert {workdir / 'old.ckpt'} {workdir / 'old.safetensors'}"
    assert "K0308" in err and want in err
    # ... and the command it gives works
    assert main(want.split()[1:]) == 0
    _assert_same(load_file(workdir / "old.safetensors"), _state())
