"""Models larger than one GPU: the placement plan (fake GPU sizes), and per-device in-place
quantization / restore / evaluation through a device map, all on the CPU.

What needs real GPUs (weights on cuda:0..N, logits crossing devices) is checked by
``benchmarks/multi_gpu_check.py``.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_models_tiny import save_tiny, tiny_config, tiny_tokenizer

from harness.models.placement import (
    Placement,
    input_device,
    map_device_class,
    meta_model,
    move_to,
    plan_placement,
)

BF16 = torch.bfloat16


def pythia_like():
    """A small GPT-NeoX (Pythia's architecture) with 8 decoder blocks."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(hidden_size=128, num_hidden_layers=8, num_attention_heads=4,
                         intermediate_size=512, vocab_size=512, max_position_embeddings=256)  # fmt: skip


@pytest.fixture(scope="module")
def pythia():
    cfg = pythia_like()
    model = meta_model(cfg)
    weight_bytes = sum(p.numel() for p in model.parameters()) * 2  # bf16, nothing shared
    return cfg, model, weight_bytes


def independent_bytes(model, device_map) -> dict:
    """Parameter bytes (bf16) per device: each device-map entry's own submodule, summed."""
    out: dict = {}
    for name, device in device_map.items():
        module = model if name == "" else model.get_submodule(name)
        out[device] = out.get(device, 0) + sum(p.numel() * 2 for p in module.parameters())
    return out


def test_fits_one_gpu_is_not_sharded(pythia):
    cfg, _, weight_bytes = pythia
    plan = plan_placement(cfg, BF16, [weight_bytes * 2] * 4, headroom=1.25)
    assert isinstance(plan, Placement)
    assert not plan.sharded and plan.device_map is None and plan.max_memory is None
    assert plan.weight_bytes == weight_bytes and plan.devices == [0]
    # the parameter count gives the same decision without building the meta model
    n_params = weight_bytes // 2
    same = plan_placement(cfg, "bfloat16", [weight_bytes * 2] * 4, n_params=n_params)
    assert not same.sharded and same.weight_bytes == weight_bytes


def test_one_gpu_never_shards_even_when_too_small(pythia):
    cfg, _, weight_bytes = pythia
    plan = plan_placement(cfg, BF16, [weight_bytes // 4])
    assert not plan.sharded and "only GPU" in plan.reason


def test_sharded_plan_spreads_blocks_over_four_gpus(pythia):
    cfg, model, weight_bytes = pythia
    headroom = 1.25
    gpus = [int(weight_bytes * headroom * 0.35)] * 4  # each GPU may hold 35% of the weights
    plan = plan_placement(cfg, BF16, gpus, headroom=headroom)
    assert plan.sharded and plan.devices == [0, 1, 2, 3]
    assert plan.max_memory == {i: int(g / headroom) for i, g in enumerate(gpus)}
    # per-device weight bytes against an independent sum over the meta model's submodules
    want = independent_bytes(model, plan.device_map)
    assert {d: b for d, b in plan.per_device_bytes.items() if b} == want
    assert sum(want.values()) == weight_bytes
    for device, used in want.items():
        assert used <= plan.max_memory[device], device
    # decoder blocks are never split: no entry below a block, every block named whole
    blocks = {f"gpt_neox.layers.{i}" for i in range(cfg.num_hidden_layers)}
    assert blocks <= set(plan.device_map)
    assert not [k for k in plan.device_map if re.match(r"gpt_neox\.layers\.\d+\.", k)]
    assert "GPTNeoXLayer" in model._no_split_modules
    # blocks run in order over the GPUs: the device index never goes back
    order = [plan.device_map[f"gpt_neox.layers.{i}"] for i in range(cfg.num_hidden_layers)]
    assert order == sorted(order)
    assert plan.device_map["gpt_neox.embed_in"] == 0


def test_every_parameter_is_placed_once(pythia):
    cfg, model, weight_bytes = pythia
    plan = plan_placement(cfg, BF16, [int(weight_bytes / 2)] * 4)
    keys = list(plan.device_map)
    for name, _ in model.named_parameters():
        owners = [k for k in keys if name.startswith(k + ".")]
        assert len(owners) == 1, (name, owners)


def test_too_large_for_all_gpus_is_refused(pythia):
    cfg, _, weight_bytes = pythia
    with pytest.raises(ValueError, match="never offloads"):
        plan_placement(cfg, BF16, [weight_bytes // 8] * 4)


@pytest.mark.parametrize(
    ("gpus", "headroom", "match"),
    [([], 1.25, "at least one GPU"), ([10**9], 0.5, "headroom")],
)
def test_bad_inputs_are_refused(pythia, gpus, headroom, match):
    with pytest.raises(ValueError, match=match):
        plan_placement(pythia[0], BF16, gpus, headroom=headroom)


def test_plan_from_a_model_folder_and_a_dict(tmp_path):
    folder = save_tiny("gpt_neox", tmp_path / "neox")
    from_folder = plan_placement(folder, "float32", [4096, 4096, 10**6, 10**6])
    cfg = tiny_config("gpt_neox", len(tiny_tokenizer())).to_dict()
    from_dict = plan_placement(cfg, "float32", [4096, 4096, 10**6, 10**6])
    assert from_folder.sharded and from_folder.device_map == from_dict.device_map


def test_device_map_classes():
    assert map_device_class({"a": 0, "b": "cuda:1"}) == "cuda"
    assert map_device_class({"": "cpu"}) == "cpu"
    for bad in ({"a": 0, "b": "cpu"}, {"a": 0, "b": "disk"}):
        with pytest.raises(ValueError, match="no offload"):
            map_device_class(bad)


def test_move_to_reaches_nested_tensors():
    t = torch.ones(2)
    obj = ((t, 3), {"mask": t, "pos": (t, [t])}, "x")
    moved = move_to(obj, torch.device("meta"))
    assert moved[0][0].is_meta and moved[0][1] == 3 and moved[2] == "x"
    assert moved[1]["mask"].is_meta and moved[1]["pos"][1][0].is_meta
    assert move_to(t, torch.device("cpu")) is t  # already there: not copied


# ----------------------------------------------------------------------------- device-mapped
@pytest.fixture(scope="module")
def neox_folder(tmp_path_factory):
    return save_tiny("gpt_neox", tmp_path_factory.mktemp("placement") / "neox")


def cpu_map(folder) -> dict[str, str]:
    """The plan's per-block map for 4 fake GPUs, every GPU replaced by the CPU."""
    plan = plan_placement(folder, "float32", [75000, 75000, 75000, 10**6])
    assert plan.sharded and len(plan.devices) > 1
    return dict.fromkeys(plan.device_map, "cpu")


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_explicit_device_map_load_quantize_restore(neox_folder, monkeypatch, tmp_path):
    from accelerate import dispatch_model

    from harness.evaluate import perplexity_details
    from harness.models.loading import load_model
    from harness.quantize import quantize_model, restore_model

    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path))
    plain = load_model(str(neox_folder), device="cpu")
    device_map = cpu_map(neox_folder)
    mapped = load_model(str(neox_folder), device_map=device_map)
    assert mapped.device_map == device_map and mapped.device == torch.device("cpu")
    assert mapped.device_class == "cpu" and mapped.placement is None
    assert plain.device_map is None
    # accelerate's per-block hooks, as a sharded load has them (force_hooks: one device)
    model = dispatch_model(mapped.model, device_map, force_hooks=True)
    assert hasattr(model.gpt_neox.layers[0], "_hf_hook")
    assert input_device(model) == torch.device("cpu")

    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, ids), logits(plain.model, ids))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = "The quick brown fox jumps over the lazy dog. " * 40

    for m in (plain.model, model):
        quantize_model(m, "int", 3, 32, progress=False)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.startswith("gpt_neox.layers.") for k in changed)
    for k, v in model.state_dict().items():  # same weights as the plain model's
        assert torch.equal(v, plain.model.state_dict()[k]), k
    ppl = [perplexity_details(m, plain.tokenizer, text, 32, progress=False).ppl
           for m in (plain.model, model)]  # fmt: skip
    assert ppl[0] == ppl[1]

    assert restore_model(model) == len(changed)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(
        logits(model, ids), logits(load_model(str(neox_folder), device="cpu").model, ids)
    )


def test_gptq_through_device_map_hooks_equals_plain(neox_folder):
    from accelerate import dispatch_model

    from harness.models.loading import load_model
    from harness.quantize import quantize_model

    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    plain = load_model(str(neox_folder), device="cpu").model
    device_map = cpu_map(neox_folder)
    mapped = load_model(str(neox_folder), device_map=device_map).model
    mapped = dispatch_model(mapped, device_map, force_hooks=True)
    for m in (plain, mapped):
        quantize_model(m, "int", 4, 32, method="gptq", calibration=calib, progress=False)
    for k, v in mapped.state_dict().items():
        assert torch.equal(v, plain.state_dict()[k]), k


def test_device_map_against_a_device_is_refused(neox_folder):
    from harness.models.loading import load_model

    with pytest.raises(ValueError, match="device_map"):
        load_model(str(neox_folder), device="cuda", device_map={"": "cpu"})


def test_pristine_copy_refuses_offloaded_weights():
    from harness.quantize.model import pristine_weights

    model = meta_model(tiny_config("gpt_neox", 320))
    with pytest.raises(ValueError, match="meta device"):
        pristine_weights(model, ["gpt_neox.layers.0.mlp.dense_h_to_4h"])


def test_sharded_plan_for_a_load(neox_folder):
    """load_model's planning step with fake GPU sizes (the load itself needs real GPUs)."""
    from harness.models.files import inspect_model
    from harness.models.loading import _plan

    info = inspect_model(str(neox_folder))
    plan = _plan(info, str(neox_folder), torch.float32, [75000, 75000, 75000, 10**6], 1.25, False)
    assert plan is not None and plan.sharded and len(plan.devices) > 1
    assert _plan(info, str(neox_folder), torch.float32, [10**9, 10**9], 1.25, False) is None
    assert _plan(info, str(neox_folder), torch.float32, [10], 1.25, False) is None  # one GPU


def test_zeroshot_through_device_map_hooks_equals_plain(
    neox_folder, data_root, monkeypatch, tmp_path
):
    from accelerate import dispatch_model

    from harness.evaluate.zeroshot import evaluate_zeroshot
    from harness.models.loading import load_model

    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path))
    plain = load_model(str(neox_folder), device="cpu")
    device_map = cpu_map(neox_folder)
    mapped = load_model(str(neox_folder), device_map=device_map)
    model = dispatch_model(mapped.model, device_map, force_hooks=True)
    res = [evaluate_zeroshot(m, plain.tokenizer, ["piqa"], data_root=data_root, limit=8,
                             batch_size=4).tasks["piqa"] for m in (plain.model, model)]  # fmt: skip
    assert res[0].n == res[1].n == 8
    assert res[0].per_sample == res[1].per_sample
