"""Per-key fingerprints (plan/fingerprint.py): the same for recipes that differ only by
formatting, comments or names; different for every edit that can change a key's bytes, and
only for the keys it changes."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings, strategies as st

from karmixlang.api import compile as compile_recipe
from karmixlang.blocks import slot_of
from karmixlang.plan.fingerprint import header_identity, key_fingerprints

from conftest import recipe, tiny_models
from vcs_models import write_sdxl_models


def fingerprints(path: str, sets=None) -> list[dict[str, str]]:
    exe = compile_recipe(path, sets).schedule.executable
    return key_fingerprints(exe, header_identity(exe))


MBW = """
base sdxl = "base.safetensors"
model a = "a.safetensors"
model b = "b.safetensors"
let w = blocks("sdxl", BASE=0.2, IN04={in04}, OUT02=0.7, default=0.4)
save "out/m.safetensors" = lerp(sdxl, a, {t}) + (b - sdxl) * w
"""


def test_formatting_comments_and_renames_change_no_fingerprint(workdir):
    write_sdxl_models(workdir)
    one = recipe(workdir, MBW.format(in04=0.5, t=0.3), "one.kmx")
    two = recipe(workdir, """
        # the same merge, written differently
        base   sdxl_base="base.safetensors"   # renamed
        model tuned_a = "a.safetensors"
        model tuned_b = "b.safetensors"
        def mix(x, y, t) = lerp(x, y, t)
        let weights = blocks("sdxl", BASE=0.20, IN04=0.50, OUT02=0.70, default=0.40)
        let moved = (tuned_b - sdxl_base) * weights
        save "out/m.safetensors" = mix(sdxl_base, tuned_a, 0.3) + moved
        """, "two.kmx")
    a, b = fingerprints(one), fingerprints(two)
    assert len(a[0]) == 60 and a == b


def test_a_block_weight_edit_changes_only_that_blocks_keys(workdir):
    write_sdxl_models(workdir)
    old = fingerprints(recipe(workdir, MBW.format(in04=0.5, t=0.3), "old.kmx"))[0]
    new = fingerprints(recipe(workdir, MBW.format(in04=0.6, t=0.3), "new.kmx"))[0]
    changed = {k for k in old if old[k] != new[k]}
    assert changed == {k for k in old if slot_of("sdxl", k) == "IN04"} and changed
    # A weight every key uses changes every key.
    every = fingerprints(recipe(workdir, MBW.format(in04=0.5, t=0.31), "t.kmx"))[0]
    assert all(old[k] != every[k] for k in old)


EDITS = {
    "method": ('save "o.safetensors" = slerp(b, a, 0.3)', 'save "o.safetensors" = lerp(b, a, 0.3)'),
    "seed": ('save "o.safetensors" = b + dare(a - b, 0.5, seed=1)',
             'save "o.safetensors" = b + dare(a - b, 0.5, seed=2)'),
    "dtype": ('save "o.safetensors" = lerp(b, a, 0.3)',
              'save "o.safetensors" = lerp(b, a, 0.3) with dtype="bf16"'),
    "input": ('save "o.safetensors" = lerp(b, a, 0.3)', 'save "o.safetensors" = lerp(b, c, 0.3)'),
    "order": ('save "o.safetensors" = mean([a, c]) with fallback=b',
              'save "o.safetensors" = mean([c, a]) with fallback=b'),
    "member": ('save "o.safetensors" = b + mean(dare([a - b, c - b], 0.5, seed=1))',
               'save "o.safetensors" = b + mean(dare([c - b, a - b], 0.5, seed=1))'),
}


def test_every_edit_that_can_change_bytes_changes_the_fingerprints(workdir):
    tiny_models(workdir)
    head = 'base b = "base.safetensors"\nmodel a = "a.safetensors"\nmodel c = "c.safetensors"\n'
    for name, (old, new) in EDITS.items():
        fa = fingerprints(recipe(workdir, head + old, f"{name}-old.kmx"))[0]
        fb = fingerprints(recipe(workdir, head + new, f"{name}-new.kmx"))[0]
        computed = {k for k in fa if k not in ("pos_ids",)}  # an int key is copied either way
        assert all(fa[k] != fb[k] for k in computed), name


def test_an_input_tensor_of_another_dtype_changes_its_key(workdir):
    import numpy as np

    tiny_models(workdir, extra={"a": {"model.w": np.ones((6, 5), np.float16)}})
    path = recipe(workdir, 'base b = "base.safetensors"\nmodel a = "a.safetensors"\n'
                  'save "o.safetensors" = lerp(b, a, 0.3)\n')
    before = fingerprints(path)[0]
    tiny_models(workdir)  # model.w back to fp32: same path, another header entry
    after = fingerprints(path)[0]
    assert {k for k in before if before[k] != after[k]} == {"model.w"}


# A random recipe: block weights, a lerp weight, a method and a seed, written with random names,
# spacing and comments. Fingerprints must be equal exactly where the numbers that apply to the
# key are equal.
NAMES = st.sampled_from(["m", "mix", "x_1", "tuned", "zz"])
WEIGHTS = st.sampled_from([0.25, 0.5, 0.75])


@st.composite
def merges(draw):
    return {"in04": draw(WEIGHTS), "out02": draw(WEIGHTS), "default": draw(WEIGHTS),
            "t": draw(WEIGHTS), "seed": draw(st.sampled_from([1, 2])),
            "name": draw(NAMES), "pad": draw(st.sampled_from(["", " ", "   "])),
            "comment": draw(st.booleans())}


def write_merge(folder, m: dict, file: str) -> str:
    c = "  # a comment" if m["comment"] else ""
    return recipe(folder, f"""
        base sdxl = "base.safetensors"{c}
        model a = "a.safetensors"
        model b = "b.safetensors"
        let {m['name']} ={m['pad']} blocks("sdxl", IN04={m['in04']}, OUT02={m['out02']}, default={m['default']})
        save "out/m.safetensors" = lerp(sdxl, a, {m['t']}) + dare(b - sdxl, 0.5, seed={m['seed']}) * {m['name']}
        """, file)


def effective(m: dict, key: str) -> tuple:
    slot = slot_of("sdxl", key)
    w = m["in04"] if slot == "IN04" else m["out02"] if slot == "OUT02" else m["default"]
    return (w, m["t"], m["seed"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(merges(), merges())
def test_random_edits_change_exactly_the_keys_whose_numbers_change(workdir, x, y):
    if not os.path.exists(workdir / "base.safetensors"):
        write_sdxl_models(workdir, per_slot=1)
    fx = fingerprints(write_merge(workdir, x, "x.kmx"))[0]
    fy = fingerprints(write_merge(workdir, y, "y.kmx"))[0]
    for key in fx:
        assert (fx[key] == fy[key]) == (effective(x, key) == effective(y, key)), key


def test_a_reuse_identity_depends_on_the_tensor_data_not_the_whole_file():
    from karmixlang.io.hashes import FileHashes
    from karmixlang.io.header import TensorInfo
    from karmixlang.plan.fingerprint import content_identity

    t = TensorInfo("w", "F32", (2, 3), "f.safetensors", 100, 124)
    data = "1" * 64
    same_data = content_identity({"f.safetensors": FileHashes("a" * 64, data)})(0, t)
    assert same_data == content_identity({"f.safetensors": FileHashes("b" * 64, data)})(0, t)
    other = content_identity({"f.safetensors": FileHashes("a" * 64, "2" * 64)})
    assert other(0, t) != same_data


def test_a_reuse_identity_covers_every_part_of_a_virtual_tensor():
    from karmixlang.io.hashes import FileHashes
    from karmixlang.io.header import TensorInfo
    from karmixlang.plan.fingerprint import content_identity

    q = TensorInfo("q.weight", "F32", (2, 3), "q.safetensors", 8, 32)
    k = TensorInfo("k.weight", "F32", (2, 3), "k.safetensors", 8, 32)
    fused = TensorInfo("qk.weight", "F32", (4, 3), "q.safetensors", 8, 32, parts=(q, k))
    hashes = {f: FileHashes("a" * 64, "1" * 64) for f in ("q.safetensors", "k.safetensors")}
    before = content_identity(hashes)(0, fused)
    hashes["k.safetensors"] = FileHashes("a" * 64, "2" * 64)  # only the second part changed
    assert content_identity(hashes)(0, fused) != before
    turned = TensorInfo("qk.weight", "F32", (4, 3), "q.safetensors", 8, 32, parts=(q, k),
                        transpose=True)
    assert content_identity(hashes)(0, turned) != content_identity(hashes)(0, fused)
