"""Per-model job resources: parameter counts from config.json, the sizing rule, overrides.

Counts are checked against independent references: the real model transformers builds from
the same config (its own ``parameters()``), and the published sizes of real checkpoints from
their config.json content (OPT-125m, Pythia-70m, GPT-2, BLOOM-176B).
"""

from __future__ import annotations

import logging
import math

import pytest
from omegaconf import OmegaConf
from test_model_safety import cache_snapshot, edit_json, hub_cache, refused, with_custom_code
from test_models_tiny import save_tiny

from harness.cluster import resources as res
from harness.cluster.resources import (
    ResourceConf,
    Resources,
    check_resource_conf,
    config_param_count,
    dtype_bytes,
    model_param_count,
    parse_params,
    resources_for,
)

__all__ = ["hub_cache"]  # a fixture used by name below

# The published config.json of real checkpoints (fields that shape the model; dropout,
# token ids and versions left as on the hub where they were short).
OPT_125M = {
    "_name_or_path": "facebook/opt-125m", "activation_dropout": 0.0,
    "activation_function": "relu", "architectures": ["OPTForCausalLM"],
    "attention_dropout": 0.0, "bos_token_id": 2, "do_layer_norm_before": True, "dropout": 0.1,
    "eos_token_id": 2, "ffn_dim": 3072, "hidden_size": 768, "init_std": 0.02, "layerdrop": 0.0,
    "max_position_embeddings": 2048, "model_type": "opt", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "prefix": "</s>", "torch_dtype": "float16",
    "transformers_version": "4.21.0.dev0", "use_cache": True, "vocab_size": 50272,
    "word_embed_proj_dim": 768,
}  # fmt: skip
PYTHIA_70M = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
    "hidden_act": "gelu", "hidden_size": 512, "initializer_range": 0.02,
    "intermediate_size": 2048, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
    "model_type": "gpt_neox", "num_attention_heads": 8, "num_hidden_layers": 6,
    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
    "use_parallel_residual": True, "vocab_size": 50304,
}  # fmt: skip
GPT2 = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
    "bos_token_id": 50256, "eos_token_id": 50256, "model_type": "gpt2", "n_ctx": 1024,
    "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257,
}  # fmt: skip
BLOOM_176B = {
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
    "architectures": ["BloomForCausalLM"], "attention_softmax_in_fp32": True,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_dropout": 0.0, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": True, "model_type": "bloom",
    "n_embed": 14336, "n_layer": 70, "num_attention_heads": 112, "pad_token_id": 3,
    "pretraining_tp": 4, "slow_but_exact": False, "transformers_version": "4.21.0",
    "use_cache": True, "vocab_size": 250880,
}  # fmt: skip
# Published totals: OPT model card / HF; Pythia README table; GPT-2 (HF); BLOOM model card.
PUBLISHED = [
    (OPT_125M, 125_239_296), (PYTHIA_70M, 70_426_624), (GPT2, 124_439_808),
    (BLOOM_176B, 176_247_271_424),
]  # fmt: skip


def real_count(config: dict) -> int:
    """The reference: the real model's own parameters (shared tensors once), weights allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **kwargs))
    return sum(p.numel() for p in model.parameters())


SMALL = {  # small but not trivial: tied and untied heads, OPT's projections, GQA
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 3,
                 "num_attention_heads": 4, "intermediate_size": 160, "vocab_size": 1000,
                 "max_position_embeddings": 128, "tie_word_embeddings": False},
    "gpt_neox_tied": {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 999,
                      "tie_word_embeddings": True},
    "opt": {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "ffn_dim": 96, "vocab_size": 1003,
            "max_position_embeddings": 200, "word_embed_proj_dim": 32},
    "opt_post_ln": {"model_type": "opt", "hidden_size": 48, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "ffn_dim": 96, "vocab_size": 500,
                    "do_layer_norm_before": False, "word_embed_proj_dim": 48},
    "bloom": {"model_type": "bloom", "hidden_size": 64, "n_layer": 3, "n_head": 4,
              "vocab_size": 1200},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
             "n_positions": 96, "vocab_size": 777},
    "gpt2_untied": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
                    "vocab_size": 777, "tie_word_embeddings": False},
    "llama_gqa": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2,
                  "intermediate_size": 96, "vocab_size": 500},
}  # fmt: skip


# ----------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", sorted(SMALL))
def test_config_count_equals_the_real_model(name):
    assert config_param_count(SMALL[name]) == real_count(SMALL[name])


@pytest.mark.parametrize(
    "config,published", PUBLISHED, ids=["opt-125m", "pythia-70m", "gpt2", "bloom"]
)
def test_published_configs_give_the_published_sizes(config, published):
    assert config_param_count(config) == published


def test_bloom_176b_is_counted_without_weights_and_then_cached(monkeypatch):
    """Counted on the meta device (no 352 GB allocated: the count itself is the check; its
    speed, ~0.05 s after transformers' import, is measured by benchmarks/plan_bench.py)."""
    config = dict(BLOOM_176B, n_layer=69)  # not cached by another test
    n = config_param_count(config)
    assert n == 176_247_271_424 - 14336 * (12 * 14336 + 13)  # one block fewer
    monkeypatch.setattr(res, "_count_config", lambda *a: pytest.fail("not cached"))
    assert config_param_count(dict(reversed(list(config.items())))) == n  # same content


def test_auto_map_is_ignored_never_run():
    config = dict(SMALL["gpt2"], auto_map={"AutoModelForCausalLM": "evil.Model"})
    assert config_param_count(config) == real_count(SMALL["gpt2"])


def test_unknown_or_non_causal_architectures_are_refused():
    refused(lambda: config_param_count({"model_type": "evil_lm"}),
            "model_type='evil_lm'", "known to transformers", "trust_remote_code=true")  # fmt: skip
    refused(lambda: config_param_count({"model_type": "evil_lm"}, trust_remote_code=True),
            "model_param_count", "trust_remote_code=True")  # fmt: skip
    refused(lambda: config_param_count({"model_type": "gpt_neoxx"}), "did you mean 'gpt_neox'")
    refused(lambda: config_param_count({"hidden_size": 4}), "no model_type")
    refused(lambda: config_param_count({"model_type": "t5"}), "no causal-LM class")


def test_local_folder_uses_the_safetensors_count(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "m")
    from harness.models.loading import inspect_model

    assert model_param_count(str(folder)) == inspect_model(str(folder)).n_params > 0


def test_cached_hub_id_is_counted_from_its_config_alone(tmp_path, hub_cache):
    import json

    (tmp_path / "config.json").write_text(json.dumps(PYTHIA_70M))
    cache_snapshot(hub_cache, "EleutherAI/pythia-70m", {"config.json": tmp_path / "config.json"})
    assert model_param_count("EleutherAI/pythia-70m") == 70_426_624


def test_uncached_hub_id_offline_and_custom_code_are_refused(tmp_path, hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(lambda: model_param_count("org/absent"), "HF_HUB_OFFLINE", "not in the local cache")
    marker = tmp_path / "MARKER"
    folder = with_custom_code(save_tiny("gpt2", tmp_path / "evil"), marker)
    refused(lambda: model_param_count(str(folder)), "auto_map", "trust_remote_code=true")
    assert not marker.exists()


EXTRA_CODE = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel
class ExtraConfig(GPT2Config):
    model_type = "extra_lm"
class ExtraModel(GPT2LMHeadModel):
    config_class = ExtraConfig
    def __init__(self, config):
        super().__init__(config)
        self.extra = torch.nn.Parameter(torch.zeros(7))
"""


def test_trusted_custom_code_is_counted_by_running_it_only_when_needed(tmp_path, hub_cache):
    good = save_tiny("gpt2", tmp_path / "good")
    expected = model_param_count(str(good))
    marker = tmp_path / "MARKER"
    with_custom_code(good, marker)
    # a trusted local folder has safetensors headers: counted without running anything
    assert model_param_count(str(good), trust_remote_code=True) == expected
    assert not marker.exists()
    # a hub id with config.json and code, no weights: only its own class knows its size
    (tmp_path / "modeling_extra.py").write_text(EXTRA_CODE)
    auto_map = {"AutoConfig": "modeling_extra.ExtraConfig",
                "AutoModelForCausalLM": "modeling_extra.ExtraModel"}  # fmt: skip
    edit_json(good / "config.json", model_type="extra_lm", auto_map=auto_map)
    files = {
        "config.json": good / "config.json",
        "modeling_extra.py": tmp_path / "modeling_extra.py",
    }
    cache_snapshot(hub_cache, "org/extra", files)
    refused(lambda: model_param_count("org/extra"), "auto_map", "trust_remote_code=true")
    assert model_param_count("org/extra", trust_remote_code=True) == expected + 7


# ----------------------------------------------------------------------------- the rule
GB = 2**30


def test_tiny_model_gets_one_gpu_and_the_minimums():
    r = resources_for("EleutherAI/pythia-70m", 70_426_624, "float16", ResourceConf(), 10)
    assert r == Resources(gpus=1, mem_gb=16, cpus=8, timeout_min=30)
    assert r.label() == "1 GPU, 16 GB, 8 CPU, 0h30"
    assert r.launcher_params() == {"gpus_per_node": 1, "mem_gb": 16, "cpus_per_task": 8,
                                   "timeout_min": 30}  # fmt: skip


@pytest.mark.parametrize(
    "n_params,dtype,gpus,mem_gb",
    [
        (65_719_701_504, "float16", 2, math.ceil(65_719_701_504 * 2 / GB * 1.5)),  # opt-66b
        (66_000_000_000, "bfloat16", 2, 185),
        (30_000_000_000, "float16", 1, 84),
        (176_247_271_424, "bfloat16", 6, 493),  # bloom
        (13_000_000_000, "float32", 1, 73),  # 48.4 GB x 1.3 = 63 GB < 80
        (6_700_000_000, "float16", 1, 19),
    ],
)
def test_gpus_and_host_memory_follow_the_weights(n_params, dtype, gpus, mem_gb):
    r = resources_for("m", n_params, dtype, ResourceConf())
    assert (r.gpus, r.mem_gb, r.cpus) == (gpus, mem_gb, 8 * gpus)
    assert r.timeout_min == 2880  # unknown length: the partition's limit


def test_time_limit_from_the_job_minutes_with_margin_and_load():
    conf = ResourceConf()
    weights_gb = 65_719_701_504 * 2 / GB
    r = resources_for("opt-66b", 65_719_701_504, "float16", conf, job_minutes=100)
    assert r.timeout_min == math.ceil(100 * 1.5 + 5 + weights_gb / 30) == 160
    assert r.label() == "2 GPU, 184 GB, 16 CPU, 2h40"
    assert resources_for("m", 10**8, "float16", conf, job_minutes=10**6).timeout_min == 2880
    assert resources_for("m", 10**8, "float16", conf, job_minutes=0).timeout_min == 30


def test_cpu_device_asks_for_no_gpu_and_holds_the_model_in_host_memory():
    conf = ResourceConf(device="cpu")
    r = resources_for("m", 10_000_000_000, "float32", conf)
    assert (r.gpus, r.cpus) == (0, 8)
    assert r.mem_gb == math.ceil(10_000_000_000 * 4 / GB * (1.3 + 1.5))
    assert r.launcher_params()["gpus_per_node"] is None
    assert r.label().startswith("0 GPU, ")


def test_a_model_that_fits_no_node_is_refused_with_what_it_needs():
    msg = refused(
        lambda: resources_for("bigscience/bloom", 176_247_271_424, "float32", ResourceConf()),
        "model='bigscience/bloom'", "176,247,271,424 parameters", "float32", "needs 11 GPUs",
        "80 GB", "gpus_per_node=8", "16-bit compute_dtype",
    )  # fmt: skip
    assert "models['bigscience/bloom'].gpus" in msg
    refused(lambda: resources_for("m", 10**9, "auto", ResourceConf()),
            "compute_dtype='auto'", "resolve_numerics")  # fmt: skip
    assert dtype_bytes("bfloat16") == 2 and dtype_bytes("float32") == 4


def test_classes_then_model_overrides_win_globs_after_exact_specs(caplog):
    conf = OmegaConf.structured(ResourceConf)
    conf.classes = [
        {"max_params": "2B", "mem_gb": 32, "timeout_min": 60},
        {"max_params": 2e10, "gpus": 2, "cpus": 4},
    ]
    conf.models = {
        "facebook/opt-*": {"timeout_min": 90},
        "facebook/opt-1*": {"timeout_min": 999},  # a later glob: never reached for opt-1.3b
        "facebook/opt-1.3b": {"mem_gb": 48},
        "bigscience/*": {"gpus": 8, "cpus": None},
    }
    check_resource_conf(conf)
    small = resources_for("EleutherAI/pythia-1b", 10**9, "float16", conf)
    assert small == Resources(1, 32, 8, 60)  # first class
    assert resources_for("facebook/opt-1.3b", 13 * 10**8, "float16", conf) == Resources(
        1, 48, 8, 60
    )
    assert resources_for("facebook/opt-350m", 35 * 10**7, "float16", conf).timeout_min == 90
    mid = resources_for("EleutherAI/pythia-12b", 12 * 10**9, "float16", conf)
    assert mid == Resources(2, 34, 4, 2880)  # second class: gpus and cpus set, memory by rule
    # an override's gpus: cpus follow it unless set; a count past the rule's need is fine
    assert resources_for("bigscience/bloom-7b1", 7 * 10**9, "float16", conf).cpus == 4  # class
    big = resources_for("bigscience/bloom", 176_247_271_424, "bfloat16", conf)
    assert (big.gpus, big.cpus) == (8, 64)
    with caplog.at_level(logging.WARNING, logger=res.__name__):
        conf.models = {"facebook/opt-66b": {"gpus": 1}}
        assert resources_for("facebook/opt-66b", 66 * 10**9, "float16", conf).gpus == 1
    assert "the rule needs 2 GPUs, an override sets 1" in caplog.text


def test_an_override_past_the_node_is_refused():
    conf = ResourceConf(models={"m": {"gpus": 16}})
    refused(
        lambda: resources_for("m", 10**9, "float16", conf), "is set to 16 GPUs", "gpus_per_node=8"
    )
    refused(lambda: check_resource_conf(conf), "models['m'].gpus=16", "allowed: 0..8")


# ----------------------------------------------------------------------------- validation
def test_defaults_and_a_yaml_conf_pass():
    check_resource_conf(ResourceConf())
    check_resource_conf(None)
    yaml = """
    gpu_memory_gb: 141
    classes: [{max_params: 1.5e9, gpus: 1, mem_gb: 24}, {max_params: 70B, gpus: 4}]
    models: {"facebook/opt-66b": {gpus: 2}}
    """
    conf = OmegaConf.merge(OmegaConf.structured(ResourceConf), OmegaConf.create(yaml))
    check_resource_conf(conf)
    assert resources_for("facebook/opt-66b", 66 * 10**9, "float16", conf).gpus == 2


@pytest.mark.parametrize(
    "conf,fragments",
    [
        ({"gpu_mem_gb": 80}, ["gpu_mem_gb", "did you mean 'gpu_memory_gb'"]),
        ({"gpu_memory_gb": 0}, ["gpu_memory_gb=0", "a number > 0"]),
        ({"gpus_per_node": 1.5}, ["gpus_per_node=1.5", "an integer >= 1"]),
        ({"headroom": 0.9}, ["headroom=0.9", ">= 1"]),
        ({"min_mem_gb": True}, ["min_mem_gb=True"]),
        ({"max_timeout_min": 10}, ["max_timeout_min=10", "min_timeout_min"]),
        ({"device": "gpu"}, ["device='gpu'", "['cpu', 'cuda']"]),
        ({"classes": {"max_params": 1}}, ["classes=", "a list"]),
        ({"classes": [{"gpus": 1}]}, ["classes[0]", "no max_params"]),
        ({"classes": [{"max_params": "big"}]}, ["max_params='big'", "1.5B"]),
        (
            {"classes": [{"max_params": 1e9, "gpu": 2}]},
            ["classes[0] key='gpu'", "did you mean 'gpus'"],
        ),
        ({"classes": [{"max_params": 1e10}, {"max_params": 1e9}]}, ["classes[1]", "never used"]),
        ({"models": {"m": {"mem_gb": -1}}}, ["models['m'].mem_gb=-1", "an integer >= 1"]),
        ({"models": {"m": 3}}, ["models['m']=3", "a mapping"]),
        ({"models": [1]}, ["models=", "a mapping"]),
    ],
)
def test_bad_settings_are_refused_in_one_line(conf, fragments):
    refused(lambda: check_resource_conf(conf), *fragments)


def test_param_counts_can_be_written_with_suffixes():
    assert parse_params("1.5B") == 1.5e9 and parse_params("70m") == 7e7
    assert parse_params(2e12) == parse_params("2T")
    refused(lambda: parse_params(0), "a parameter count > 0")
