"""Numerics behind issue 21: GPTQ replays every decoder layer with its own inputs, methods refuse
what their kernels cannot do before loading, MX scales of tiny blocks equal torchao's, and HQQ's
scale and zero point are exactly what its bits are counted as.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from harness.models.loading import decoder_layers, quantizable_modules
from harness.quantize.gptq import gptq_quantize_model

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
SEQLEN = 16  # longer than the sliding window (4), so sliding and full masks differ


# ----------------------------------------------------------------------------- GPTQ per-layer inputs
def alternating_model(family: str) -> torch.nn.Module:
    """A tiny random decoder whose layers alternate sliding-window (window 4) and full attention.

    Gemma 3 also gives its local layers another rotary base than its global ones, so both the
    attention mask and the position embeddings differ from layer to layer.
    """
    torch.manual_seed(0)
    common = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        layer_types=LAYER_TYPES, sliding_window=4,
    )  # fmt: skip
    if family == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        return Gemma3ForCausalLM(Gemma3TextConfig(**common)).eval()
    if family == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        return Gemma2ForCausalLM(Gemma2Config(**common)).eval()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True)).eval()


def same(a: Any, b: Any) -> bool:
    """Structural equality with tensors compared bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)):
        return (
            isinstance(b, (tuple, list))
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


class Spy:
    """Every call of every decoder layer: (args, kwargs) as the layer received them."""

    def __init__(self, layers) -> None:
        self.calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]

    def _hook(self, index: int):
        def record(_mod, args, kwargs):
            self.calls[index].append((args, dict(kwargs)))

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def calibration(model, n: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (n, SEQLEN), generator=gen)


@torch.no_grad()
def true_inputs(model, calib: torch.Tensor) -> list[list[tuple[tuple, dict]]]:
    """Each layer's inputs in an ordinary unquantized forward, one per calibration window."""
    _, layers = decoder_layers(model)
    spy = Spy(layers)
    try:
        for row in calib:
            model(row.unsqueeze(0), use_cache=False)
    finally:
        spy.remove()
    return spy.calls


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "qwen2"])
def test_gptq_feeds_every_layer_its_own_inputs(family):
    """What GPTQ feeds each layer equals what the model's own forward feeds it.

    Only the last layer's linears are quantized, so layers 0..2 stay exact and the inputs GPTQ
    replays through them (and feeds the last layer's Hessian pass) must equal the true ones bit
    for bit: hidden states, masks, position embeddings, position ids.
    """
    model = alternating_model(family)
    calib = calibration(model)
    truth = true_inputs(model, calib)
    prefix, layers = decoder_layers(model)
    last = f"{prefix}.{len(layers) - 1}."
    modules = {n: m for n, m in quantizable_modules(model).items() if n.startswith(last)}
    assert modules
    spy = Spy(layers)
    try:
        gptq_quantize_model(model, modules, calib, dtype="int", bits=4, block_size=16)
    finally:
        spy.remove()
    n = len(calib)
    for index, calls in enumerate(spy.calls):
        # the capture pass, then the Hessian pass (last layer) or the output pass (the others)
        assert len(calls) == 2 * n, (index, len(calls))
        for k, (args, kwargs) in enumerate(calls):
            ref_args, ref_kwargs = truth[index][k % n]
            assert same(args, ref_args), (family, index, k)
            assert same(kwargs, ref_kwargs), (family, index, k, sorted(kwargs))


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "qwen2"])
@torch.no_grad()
def test_layer_zero_inputs_would_be_wrong_for_the_other_attention_type(family):
    """The old behaviour (layer 0's kwargs for every layer) is wrong on these models: a full-
    attention layer run with layer 0's (sliding-window) mask gives other hidden states."""
    model = alternating_model(family)
    truth = true_inputs(model, calibration(model, n=1))
    _, layers = decoder_layers(model)
    zero_kwargs = truth[0][0][1]
    for index, layer_type in enumerate(LAYER_TYPES):
        args, kwargs = truth[index][0]
        if layer_type == LAYER_TYPES[0]:
            continue
        assert not same(kwargs, zero_kwargs), index
        own = layers[index](*args, **kwargs)
        borrowed = layers[index](*args, **zero_kwargs)
        own = own[0] if isinstance(own, tuple) else own
        borrowed = borrowed[0] if isinstance(borrowed, tuple) else borrowed
        assert (own - borrowed).abs().max().item() > 1e-3, index


def test_gptq_quantizes_an_alternating_model_whole():
    """Every linear of the Gemma 3 model quantized: finite logits, errors reported per module."""
    model = alternating_model("gemma3")
    calib = calibration(model)
    modules = quantizable_modules(model)
    errors = gptq_quantize_model(model, modules, calib, dtype="int", bits=4, block_size=16)
    assert list(errors) == list(modules)
    assert all(0 < e < 1 for e in errors.values()), errors
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()


# ----------------------------------------------------------------------------- HQQ: computed as counted
SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def hqq_library(weight: torch.Tensor, bits: int, group_size: int, compute_dtype: torch.dtype):
    """hqq's own HQQLinear on a copy of ``weight`` (what kbit must reproduce)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
    return HQQLinear(linear, config, compute_dtype=compute_dtype, device="cpu", del_orig=False)


@pytest.mark.parametrize("scale_format", sorted(SCALE_DTYPES))
def test_hqq_dequantizes_with_the_stored_scale_and_zero(scale_format):
    """kbit's HQQ weights are (codes - zero) * scale with exactly the scale and zero point HQQ
    stores when its compute dtype is the record's scale format (float16 by default), in
    float32 arithmetic: the representation the bits are counted for, nothing finer."""
    from harness.quantize.hqq import hqq_fake_quantize

    dtype = SCALE_DTYPES[scale_format]
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    layer = hqq_library(w, 4, 32, dtype)
    scale, zero = layer.meta["scale"], layer.meta["zero"]
    assert scale.dtype == dtype and zero.dtype == dtype  # what HQQ keeps per group
    codes = layer.unpack(dtype=torch.float32)
    expected = ((codes - zero.float()) * scale.float()).reshape(w.shape)
    got = hqq_fake_quantize(w, 4, 32, scale_dtype=dtype)
    assert torch.equal(got, expected)
    # the scale and zero point used are representable in the counted format ...
    if dtype != torch.float32:
        full = hqq_library(w, 4, 32, torch.float32)
        assert torch.equal(full.meta["scale"].to(dtype).float(), scale.float())
        # ... and float32 ones would not be (the old behaviour computed with them)
        assert not torch.equal(full.meta["scale"].to(dtype).float(), full.meta["scale"])
        assert not torch.equal(hqq_fake_quantize(w, 4, 32), got)
    # HQQ's own dequantization in its compute dtype agrees up to that dtype's rounding
    theirs = layer.dequantize().float()
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 0.0}[dtype]
    assert (theirs - got).abs().max().item() <= tol * w.abs().max().item()


@pytest.mark.parametrize("scale_format", ["fp16", "fp32"])
def test_hqq_bits_are_a_brute_force_count_of_what_is_stored(scale_format):
    """count_bits of an HQQ cell = every stored tensor's bits: codes at k bits, HQQ's scale and
    zero point tensors at their element size, every other parameter at 16 bits; and the cell's
    weights are computed from exactly those stored tensors."""
    from test_models_tiny import tiny_model

    from harness.quantize import quantize_model
    from harness.quantize.model import count_bits, linear_layout

    model, _ = tiny_model("llama")
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = quantize_model(model, "int", 4, 32, scale_format=scale_format, method="hqq",
                            progress=False)  # fmt: skip
    counted = count_bits(model, report).total_bits
    modules = dict(model.named_modules())
    brute, quantized_names = 0, set()
    for entry in report.tensors:
        module = modules[entry.name]
        weight = linear_layout(pristine[f"{entry.name}.weight"], module)
        layer = hqq_library(weight, 4, 32, SCALE_DTYPES[scale_format])
        meta = layer.meta
        # the cell's weights are computed from exactly these stored tensors
        codes = layer.unpack(dtype=torch.float32)
        stored = ((codes - meta["zero"].float()) * meta["scale"].float()).reshape(weight.shape)
        assert torch.equal(linear_layout(module.weight, module), stored), entry.name
        brute += weight.numel() * 4
        brute += sum(meta[k].numel() * meta[k].element_size() * 8 for k in ("scale", "zero"))
        quantized_names.add(f"{entry.name}.weight")
    brute += 16 * sum(p.numel() for n, p in model.named_parameters() if n not in quantized_names)
    assert counted == brute


# ----------------------------------------------------------------------------- refused before loading
METHODS = ["blockwise", "proxy", "gptq", "hqq"]
SCALE_FORMATS = ["fp16", "bf16", "fp32", "e8m0", "mx", "nvfp4"]
# one entry per codebook kind: int grid, float grid (E2M1), asymmetric int, fixed non-grid
# table (nf4), data-dependent (quantile); bits each can take
DTYPES = {"int": 4, "e2m1": 4, "int_asym": 4, "nf4": 4, "quantile": 4}


def _outcome(fn) -> str | None:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("method", METHODS)
def test_method_validation_refuses_exactly_what_quantizing_refuses(method):
    """For every (method, scale format, data type kind, centering): the method's validate
    (what ``validate_cell`` runs before loading) refuses iff quantizing a tiny model fails,
    with the same one-line reason; every allowed combination quantizes without error."""
    from test_models_tiny import tiny_model

    from harness.quantize import quantize_model
    from harness.quantize.methods import QuantRequest, get_method, make_settings
    from harness.quantize.model import restore_model

    model, _ = tiny_model("gpt_neox")
    calib = torch.randint(0, model.config.vocab_size, (2, 16),
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    mismatches, refused, allowed = [], 0, 0
    entry = get_method(method)
    assert entry.validate is not None
    for dtype, bits in DTYPES.items():
        for scale_format in SCALE_FORMATS:
            for centering in (False, True):
                request = QuantRequest(dtype, bits, 32, scale_format, centering,
                                       settings=make_settings(method))  # fmt: skip
                said = _outcome(lambda r=request: entry.validate(r.settings, r))
                restore_model(model)
                did = _outcome(lambda d=dtype, b=bits, s=scale_format, c=centering:
                               quantize_model(model, d, b, 32, scale_format=s, centering=c,
                                              method=method, calibration=calib, progress=False))  # fmt: skip
                case = (dtype, scale_format, centering)
                if (said is None) != (did is None) or (said and "\n" in said):
                    mismatches.append((case, said, did))
                refused += said is not None
                allowed += said is None
    assert not mismatches, mismatches[:5]
    assert refused and allowed  # both kinds occur: the comparison can fail either way


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["format=mxfp4", "method=gptq"], ["scale_format='mx'", "GPTQ", "allowed"]),
        (["format=nvfp4", "method=gptq"], ["scale_format='nvfp4'", "GPTQ", "allowed"]),
        (["scale_format=e8m0", "centering=true"], ["centering=True", "e8m0", "fp16"]),
        (["scale_format=mx", "dtype=nf4"], ["scale_format='mx'", "not a float or int grid"]),
        (["scale_format=nvfp4", "bits=4", "dtype=int"], ["nvfp4", "E2M1"]),
        (["scale_format=mx", "dtype=quantile", "method=proxy"], ["data-dependent"]),
        (["format=mxfp4", "method=hqq"], ["method=hqq", "dtype"]),
    ],
)
def test_validate_cell_refuses_method_format_pairs_before_loading(overrides, words, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    """``format=mxfp4 method=gptq`` (issue 21: failed after loading, 27 s in) and the
    other pairs a method's kernels refuse: one line from validate_cell, no model loaded."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from test_models_tiny import save_tiny

    from harness.config.schema import register_schema
    from harness.run import execute as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    model = save_tiny("gpt_neox", tmp_path / "tiny")
    register_schema()
    GlobalHydra.instance().clear()
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=[
            f"model={model}", "bits=4", "block_size=32", "eval=ppl",
            "eval.perplexity.0.path=" + str(model / "config.json"),
            f"results_dir={tmp_path / 'r'}", *overrides,
        ])  # fmt: skip
    GlobalHydra.instance().clear()
    with pytest.raises(run.ConfigError) as err:
        run.validate_cell(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert all(w in message for w in words), message
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.parquet"))
