"""quantize_model: every selected weight equals fake_quantize of its original; restore is exact."""

from __future__ import annotations

import pytest
import torch
from test_models_tiny import FAMILIES, tiny_model

from harness.models.loading import quantizable_modules
from harness.quantize import fake_quantize, quantize_model, restore_model


def linear_layout(module, weight):
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_weight_equals_fake_quantize_of_its_original(family):
    model, _ = tiny_model(family)
    before = snapshot(model)
    mods = quantizable_modules(model)
    report = quantize_model(model, "int", 4, 64, progress=False)
    assert report.modules == list(mods)
    assert report.n_quantized_params == sum(m.weight.numel() for m in mods.values())
    after = model.state_dict()
    for name, mod in mods.items():
        original = linear_layout(mod, before[f"{name}.weight"])
        want = linear_layout(mod, fake_quantize(original, "int", 4, 64))
        assert torch.equal(after[f"{name}.weight"], want), name
        assert not torch.equal(after[f"{name}.weight"], before[f"{name}.weight"]), name
    untouched = set(before) - {f"{n}.weight" for n in mods}
    for key in untouched:  # biases, norms, embeddings, head: bit-identical
        assert torch.equal(after[key], before[key]), key


def test_configs_chain_from_the_pristine_copy_and_restore_is_bit_identical():
    model, _ = tiny_model("gpt2")
    before = snapshot(model)
    quantize_model(model, "int", 3, 64, progress=False)
    quantize_model(model, "nf4", 4, 32, progress=False)  # must start from the originals
    name = "transformer.h.0.mlp.c_fc"
    want = fake_quantize(before[f"{name}.weight"].t(), "nf4", 4, 32).t()
    assert torch.equal(model.state_dict()[f"{name}.weight"], want)
    restore_model(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_embeddings_quantized_when_asked():
    model, _ = tiny_model("llama")
    before = snapshot(model)
    report = quantize_model(model, "int", 8, 64, quantize_embeddings=True, progress=False)
    assert "model.embed_tokens" in report.modules
    want = fake_quantize(before["model.embed_tokens.weight"], "int", 8, 64)
    assert torch.equal(model.model.embed_tokens.weight, want)
    quantize_model(model, "int", 8, 64, progress=False)  # next config: embeddings back to 16 bit
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def brute_force_outlier_columns(rows: list[torch.Tensor], fraction: float) -> set[int]:
    n = rows[0].shape[0]
    score = [1.0] * n
    for w in rows:
        for j in range(n):
            score[j] *= float(w[j].double().std())
    k = max(1, round(fraction * n))
    return set(sorted(range(n), key=lambda j: -score[j])[:k])


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama"])
def test_proxy_keeps_top_std_input_columns_in_16_bit(family):
    model, _ = tiny_model(family)
    before = snapshot(model)
    mods = dict(model.named_modules())
    fraction = 0.1
    report = quantize_model(model, "int", 4, 16, method="proxy", outlier_fraction=fraction,
                            progress=False)  # fmt: skip
    sources = {"opt": ["fc1"], "gpt2": ["mlp.c_fc"], "llama": ["mlp.gate_proj", "mlp.up_proj"]}
    target = {"opt": "fc2", "gpt2": "mlp.c_proj", "llama": "mlp.down_proj"}
    prefix = {"opt": "model.decoder.layers", "gpt2": "transformer.h", "llama": "model.layers"}
    for i in range(2):
        src = [f"{prefix[family]}.{i}.{s}" for s in sources[family]]
        tgt = f"{prefix[family]}.{i}.{target[family]}"
        rows = [linear_layout(mods[s], before[f"{s}.weight"]) for s in src]
        keep = sorted(brute_force_outlier_columns(rows, fraction))
        original = linear_layout(mods[tgt], before[f"{tgt}.weight"])
        now = linear_layout(mods[tgt], mods[tgt].weight.detach())
        assert torch.equal(now[:, keep], original[:, keep])
        zeroed = original.clone()
        zeroed[:, keep] = 0
        rest = [j for j in range(original.shape[1]) if j not in keep]
        want = fake_quantize(zeroed, "int", 4, 16)
        assert torch.equal(now[:, rest], want[:, rest])
        entry = next(t for t in report.tensors if t.name == tgt)
        assert entry.outlier_columns == len(keep)
        assert entry.outlier_numel == len(keep) * original.shape[0]
    total = sum(t.numel for t in report.tensors)
    assert report.n_quantized_params == total - sum(t.outlier_numel for t in report.tensors)


def test_illegal_inputs_fail_clearly():
    model, _ = tiny_model("opt")
    with pytest.raises(ValueError, match="method='gptq'"):
        quantize_model(model, "int", 4, 64, method="gptq", progress=False)
    with pytest.raises(ValueError, match="bits"):
        quantize_model(model, "nf4", 3, 64, progress=False)


def test_bit_count_by_hand():
    from harness.quantize.model import count_bits

    model, _ = tiny_model("opt")
    mods = quantizable_modules(model)
    report = quantize_model(
        model, "int", 4, 48, method="proxy", outlier_fraction=0.1, progress=False
    )
    n = sum(p.numel() for p in model.parameters())  # shared (tied) parameters counted once
    total = 16 * (n - sum(m.weight.numel() for m in mods.values()))
    for t in report.tensors:  # k bits + one fp16 scale per (tail-inclusive) block; outliers 16
        kept = t.numel - t.outlier_numel
        total += 4 * kept + 16 * -(-kept // 48) + 16 * t.outlier_numel
    count = count_bits(model, report)
    assert count.total_bits == total and count.bits_per_param == pytest.approx(total / n)
