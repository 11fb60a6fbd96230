from karmixlang.io.layouts.llm import LayerKey, layer_count, split_layer_key


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
