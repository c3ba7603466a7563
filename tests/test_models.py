"""Which weights are quantizable, per family: the exact expected sets, written out by hand."""

from __future__ import annotations

import pytest
import torch
from test_models_tiny import FAMILIES, tiny_model
from torch import nn

from harness.models.loading import (
    count_params,
    guess_family,
    quantizable_modules,
    resolve_compute_dtype,
    resolve_model_path,
)
from harness.quantize.methods.proxy import proxy_pairs

PER_BLOCK = {
    "gpt_neox": ("gpt_neox.layers", ["attention.query_key_value", "attention.dense",
                                     "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "opt": ("model.decoder.layers", ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                     "self_attn.out_proj", "fc1", "fc2"]),
    "bloom": ("transformer.h", ["self_attention.query_key_value", "self_attention.dense",
                                "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "llama": ("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
}  # fmt: skip
EMBEDDINGS = {
    "gpt_neox": ["gpt_neox.embed_in"],
    "gpt2": ["transformer.wte", "transformer.wpe"],
    "opt": ["model.decoder.embed_tokens", "model.decoder.embed_positions"],
    "bloom": ["transformer.word_embeddings"],
    "llama": ["model.embed_tokens"],
}
UNTIED_HEAD = {"gpt_neox": "lm_head", "llama": "lm_head"}  # the others tie head = embedding


def expected(family: str) -> set[str]:
    prefix, names = PER_BLOCK[family]
    return {f"{prefix}.{i}.{n}" for i in range(2) for n in names}


@pytest.mark.parametrize("family", FAMILIES)
def test_quantizable_set_is_exactly_the_block_linears(family):
    model, _ = tiny_model(family)
    assert set(quantizable_modules(model)) == expected(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_and_head_only_when_asked(family):
    model, _ = tiny_model(family)
    with_emb = set(quantizable_modules(model, embeddings=True))
    assert with_emb == expected(family) | set(EMBEDDINGS[family])
    if family in UNTIED_HEAD:
        assert set(quantizable_modules(model, head=True)) == expected(family) | {
            UNTIED_HEAD[family]
        }
    else:  # tied: quantizing the head alone would quantize the embedding behind the user's back
        with pytest.raises(ValueError, match="tied"):
            quantizable_modules(model, head=True)
        assert set(quantizable_modules(model, embeddings=True, head=True)) == with_emb


def test_gpt2_conv1d_is_selected():
    model, _ = tiny_model("gpt2")
    mods = quantizable_modules(model)
    assert {type(m).__name__ for m in mods.values()} == {"Conv1D"}


def test_parameter_counts_match_brute_force():
    model, _ = tiny_model("gpt_neox")
    total, nonembed = count_params(model)
    assert total == sum(p.numel() for p in model.parameters())
    embed = model.gpt_neox.embed_in.weight.numel() + model.get_output_embeddings().weight.numel()
    assert nonembed == total - embed


def test_parameter_counts_exclude_a_head_bias_and_need_no_layer_list():
    import transformers as tf

    cfg = tf.GPTJConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                        n_positions=64, bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(cfg)
    assert model.lm_head.bias is not None  # GPT-J's head has a bias: it is part of the head
    total, nonembed = count_params(model)
    head = model.lm_head.weight.numel() + model.lm_head.bias.numel()
    assert nonembed == total - model.transformer.wte.weight.numel() - head
    flat = _NoLayers()  # no decoder-block list: still counted, every Embedding is one
    flat.embed = nn.Embedding(10, 4)
    flat.get_output_embeddings = lambda: None
    assert count_params(flat) == (4 * 4 + 4 + 10 * 4, 4 * 4 + 4)


class _NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"model_type": "mystery", "num_hidden_layers": 2})()
        self.proj = nn.Linear(4, 4)


def test_unknown_architecture_without_layers_fails_clearly():
    with pytest.raises(ValueError, match=r"mystery.*decoder layers"):
        quantizable_modules(_NoLayers())


class _EmptyLayers(_NoLayers):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.LayerNorm(4), nn.LayerNorm(4)])


def test_architecture_with_no_linear_in_layers_is_refused():
    with pytest.raises(ValueError, match="quantize nothing"):
        quantizable_modules(_EmptyLayers())


@pytest.mark.parametrize("family", FAMILIES)
def test_proxy_pairs_are_consecutive_mlp_layers(family):
    model, _ = tiny_model(family)
    pairs = proxy_pairs(model)
    assert len(pairs) == 2
    mods = dict(model.named_modules())
    for sources, target in pairs:
        w_out = mods[target].weight
        n_in = w_out.shape[0] if type(mods[target]).__name__ == "Conv1D" else w_out.shape[1]
        for s in sources:  # hidden units of the source = input dims of the target
            w_src = mods[s].weight
            n_hidden = w_src.shape[1] if type(mods[s]).__name__ == "Conv1D" else w_src.shape[0]
            assert n_hidden == n_in


def test_model_path_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        resolve_model_path(str(tmp_path / "missing" / "model"))
    with pytest.raises(ValueError, match=r"no config.json"):
        resolve_model_path(str(tmp_path))
    assert resolve_model_path("EleutherAI/pythia-70m") is None  # a hub id: loaded later


def test_compute_dtype_and_family_guess():
    assert resolve_compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="compute_dtype='fp8'"):
        resolve_compute_dtype("fp8", torch.device("cpu"))
    assert guess_family("EleutherAI/pythia-70m") == "pythia"
    assert guess_family("facebook/opt-125m") == "opt"
    assert guess_family("zoo:tinyneox/s2") == "tinyneox"
    assert guess_family("/data/my_model", "llama") == "llama"
