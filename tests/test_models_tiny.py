"""Tiny random-weight causal LMs of every supported family, built from configs (no hub).

Helpers imported by the other test modules (``from test_models_tiny import ...``), plus a
check that each one saves and loads back offline through ``harness.models.loading.load_model``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# A small byte-level BPE, trained on a fixed text so any evaluation text tokenizes.
_TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst "
    "of times. Call me Ishmael. In the beginning the universe was created. Question: Answer: "
) * 20

FAMILIES = ["gpt_neox", "gpt2", "opt", "bloom", "llama"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_TRAIN_TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )  # fmt: skip


def tiny_config(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=256, **common)  # fmt: skip
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                            max_position_embeddings=256, word_embed_proj_dim=32,
                            pad_token_id=1, **common)  # fmt: skip
    if family == "bloom":
        return tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=64,
                              max_position_embeddings=256, **common)  # fmt: skip
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    """(model, tokenizer) with random weights; float32, eval mode."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)))
    return model.eval(), tok


def save_tiny(family: str, folder: Path, seed: int = 0) -> Path:
    model, tok = tiny_model(family, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_round_trips_offline(family, tmp_path):
    from harness.models.loading import count_params, load_model

    model, _ = tiny_model(family)
    folder = save_tiny(family, tmp_path / family)
    loaded = load_model(str(folder), device="cpu")
    assert loaded.architecture == family
    assert loaded.compute_dtype == torch.float32
    assert loaded.device_class == "cpu" and loaded.device == torch.device("cpu")
    assert loaded.info is not None and loaded.info.n_params == count_params(model)[0]
    for (name, p), (name2, q) in zip(
        model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert name == name2 and torch.equal(p, q)
