"""Model shapes of the zoo: one Hugging Face config builder per architecture.

All builders take the same size fields (layers, width, heads, FFN width), so a family differs
only in size, and switch off dropout so that training is deterministic and matches the
models' evaluation behaviour. ``transformers`` is imported by the builders, not here, so that
checking a family's ``architecture`` (``kbit-zoo`` refusing a bad value) does not load it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class SizeShape(Protocol):
    """The size fields a builder reads (a :class:`harness.zoo.config.SizeConfig` has them).

    Why a protocol rather than the config class: harness.zoo.config checks ``architecture``
    against :data:`ARCHITECTURES`, so this module must not import it back.
    """

    layers: int
    width: int
    heads: int
    ffn: int | None


ConfigBuilder = Callable[[SizeShape, int, int, int, int], "PretrainedConfig"]


def _ffn(size: SizeShape) -> int:
    return size.ffn if size.ffn is not None else 4 * size.width


def _gpt_neox(size: SizeShape, vocab: int, context: int, eos: int, pad: int) -> PretrainedConfig:
    # Pythia's shape: parallel residual, rotary on a quarter of each head, untied head.
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab, hidden_size=size.width, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, intermediate_size=_ffn(size),
        max_position_embeddings=context, rotary_pct=0.25, use_parallel_residual=True,
        hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip


def _gpt2(size: SizeShape, vocab: int, context: int, eos: int, pad: int) -> PretrainedConfig:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab, n_embd=size.width, n_layer=size.layers, n_head=size.heads,
        n_inner=_ffn(size), n_positions=context, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip


def _opt(size: SizeShape, vocab: int, context: int, eos: int, pad: int) -> PretrainedConfig:
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=vocab, hidden_size=size.width, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, ffn_dim=_ffn(size), max_position_embeddings=context,
        word_embed_proj_dim=size.width, do_layer_norm_before=True, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip


def _llama(size: SizeShape, vocab: int, context: int, eos: int, pad: int) -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=size.width, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.heads,
        intermediate_size=_ffn(size), max_position_embeddings=context,
        attention_dropout=0.0, tie_word_embeddings=False,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip


ARCHITECTURES: dict[str, ConfigBuilder] = {
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
    "opt": _opt,
    "llama": _llama,
}


def build_config(
    architecture: str, size: SizeShape, vocab: int, context: int, eos: int, pad: int
) -> PretrainedConfig:
    """The Hugging Face config of one size (architecture validated by config.validate)."""
    return ARCHITECTURES[architecture](size, vocab, context, eos, pad)
