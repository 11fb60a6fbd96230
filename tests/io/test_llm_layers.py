from hypothesis import given, settings
from hypothesis import strategies as st

from karmixlang.io.layouts.llm import LayerKey, Slice, layer_count, split_layer_key


def test_llama_gpt2_and_opt_layer_keys_split_into_stack_index_and_rest():
    assert split_layer_key("model.layers.12.self_attn.q_proj.weight") == \
        LayerKey("model.layers", 12, "self_attn.q_proj.weight")
    assert split_layer_key("transformer.h.3.mlp.c_fc.weight") == LayerKey("transformer.h", 3, "mlp.c_fc.weight")
    assert split_layer_key("model.decoder.layers.0.fc1.bias") == LayerKey("model.decoder.layers", 0, "fc1.bias")


def test_keys_outside_the_stack_and_sd_blocks_are_not_layers():
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"):
        assert split_layer_key(key) is None, key


def test_renumbering_keeps_stack_and_rest_and_count_is_highest_index_plus_one():
    lk = split_layer_key("model.layers.7.mlp.up_proj.weight")
    assert lk.renumbered(30) == "model.layers.30.mlp.up_proj.weight"
    assert layer_count(["model.layers.0.a", "model.layers.9.b", "lm_head.weight"]) == 10
    assert layer_count(["lm_head.weight"]) == 0


# ---------------------------------------------------------------- layer slices (Slice)

OTHERS = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


def model_keys(n: int) -> list[str]:
    return OTHERS + [f"model.layers.{i}.{r}" for i in range(n)
                     for r in ("mlp.up_proj.weight", "input_layernorm.weight")]


@st.composite
def stacks(draw):
    n = draw(st.integers(1, 12))
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, n - 1))
        parts.append((start, draw(st.integers(start + 1, n))))
    return n, parts


@settings(max_examples=60, deadline=None)
@given(stacks())
def test_slice_steps_stack_parts_as_written_by_hand(case):
    """stack(layers(x, s1, e1), layers(x, s2, e2), ...) through the steps lowering gives it
    (ir/lower.py: a slice, then a shift without the other keys) equals the stack by hand."""
    n, parts = case
    keys = model_keys(n)
    got: dict[str, str] = {}
    offset = 0
    for j, (start, end) in enumerate(parts):
        steps = [Slice(start, end)] + ([Slice(0, None, offset, False)] if j else [])
        for key in keys:
            new = key
            for step in steps:
                new = new if new is None else step.key(new)
            if new is not None:
                assert new not in got, new  # parts never collide
                got[new] = key
        offset += end - start
    want = {k: k for k in OTHERS}
    at = 0
    for start, end in parts:
        for i in range(start, end):
            for r in ("mlp.up_proj.weight", "input_layernorm.weight"):
                want[f"model.layers.{at + i - start}.{r}"] = f"model.layers.{i}.{r}"
        at += end - start
    assert got == want
    assert layer_count(got) == sum(e - s for s, e in parts)


def test_a_slice_without_an_end_shifts_every_layer_and_drops_the_others_when_told():
    assert Slice(0, None, 5, False).key("model.layers.2.mlp.up_proj.weight") == \
        "model.layers.7.mlp.up_proj.weight"
    assert Slice(0, None, 5, False).key("lm_head.weight") is None
    assert Slice(0, 0).key("model.layers.0.x") is None and Slice(0, 0).key("lm_head.weight") == \
        "lm_head.weight"  # a stacked save's fallback: no layer keys, the others kept
