"""Planning time of the paper grid (19,994 cells): compose, validate, dedupe, look up; no weights.

Runs ``kbit-run --multirun +sweeps@_global_=paper`` in-process through Hydra's own multirun
machinery (the real :class:`harness.sweep.plan.KbitSweeper`: ``expand_union`` -> ``CellComposer`` ->
``plan_sweep`` -> ``validate_cell``), stops it right after planning (nothing is launched or
written), and prints cells, wall and CPU seconds and ms per cell of the planning step.

The 26 hub models are unreachable here, so a temporary HF cache is built holding each model's
``config.json`` (their published architecture fields; values are approximate where they do not
matter) under ``models--<org>--<name>/snapshots/<rev>/`` with ``refs/main``, as
``huggingface_hub`` leaves it after fetching config.json alone; ``HF_HUB_OFFLINE=1``. A hub
snapshot without weights or tokenizer files is what validation sees for a hub id before the
first load (weights and tokenizer download at load time), so that is representative.

Evaluation: ``eval=paper`` as the overlay has it, with the data from ``KBIT_DATA_ROOT`` (the
shared/data layout: kbit's local task definitions); set it, or the hub datasets are used (which
need network or a populated HF datasets cache).

Every weight-loading entry point (``torch.load``, ``safetensors`` loaders,
``from_pretrained``) is patched to raise while planning: the plan must read no weights.

It prints the machine's load average (``os.getloadavg``) beside every timing: on a shared
machine the wall time is the CPU time times the contention. Targets (issue 21): the paper grid
(~20,000 cells) planned in <= 60 s on 2 cores; a grid above ``hydra.sweeper.max_cells``
(default 100,000) refused before it is expanded, in < 5 s for 300,000 cells (``--cap``: the
paper grid x 16 seeds = 319,904 cells, timed from the start of the multirun to the refusal).

Usage (pin to one core; timings on a shared machine are noisy, repeat)::

    taskset -c 1 python benchmarks/plan_bench.py [--profile] [--repeat N] [--cap] [-- overrides]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import io
import json
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAPER_CELLS = 19_994
PLAN_TARGET_S = 60.0  # a 20,000-cell grid, planned on 2 cores
CAP_TARGET_S = 5.0  # a 300,000-cell grid, refused by the size cap


def _opt(hidden: int, layers: int, heads: int, proj: int | None = None) -> dict[str, Any]:
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "ffn_dim": 4 * hidden,
        "word_embed_proj_dim": proj or hidden, "vocab_size": 50272,
        "max_position_embeddings": 2048, "do_layer_norm_before": proj is None,
        "activation_function": "relu", "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
        "torch_dtype": "float16",
    }  # fmt: skip


def _bloom(hidden: int, layers: int, heads: int, dtype: str = "float16") -> dict[str, Any]:
    return {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom", "hidden_size": hidden,
        "n_layer": layers, "n_head": heads, "vocab_size": 250880, "layer_norm_epsilon": 1e-5,
        "apply_residual_connection_post_layernorm": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 3, "torch_dtype": dtype,
    }  # fmt: skip


def _pythia(hidden: int, layers: int, heads: int, vocab: int = 50304) -> dict[str, Any]:
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": 4 * hidden, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True,
        "hidden_act": "gelu", "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float16",
    }  # fmt: skip


def _gpt2(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    # GPT-2's configs name no dtype (the checkpoints are float32)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": hidden,
        "n_layer": layers, "n_head": heads, "n_positions": 1024, "n_ctx": 1024,
        "vocab_size": 50257, "activation_function": "gelu_new", "bos_token_id": 50256,
        "eos_token_id": 50256,
    }  # fmt: skip


# The paper grid's models (sweeps/paper.yaml) and their config.json (architecture fields).
HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/opt-125m": _opt(768, 12, 12),
    "facebook/opt-350m": _opt(1024, 24, 16, proj=512),
    "facebook/opt-1.3b": _opt(2048, 24, 32),
    "facebook/opt-2.7b": _opt(2560, 32, 32),
    "facebook/opt-6.7b": _opt(4096, 32, 32),
    "facebook/opt-13b": _opt(5120, 40, 40),
    "facebook/opt-30b": _opt(7168, 48, 56),
    "facebook/opt-66b": _opt(9216, 64, 72),
    "bigscience/bloom-560m": _bloom(1024, 24, 16),
    "bigscience/bloom-1b1": _bloom(1536, 24, 16),
    "bigscience/bloom-1b7": _bloom(2048, 24, 16),
    "bigscience/bloom-3b": _bloom(2560, 30, 32),
    "bigscience/bloom-7b1": _bloom(4096, 30, 32),
    "bigscience/bloom": _bloom(14336, 70, 112, dtype="bfloat16"),
    "EleutherAI/pythia-70m": _pythia(512, 6, 8),
    "EleutherAI/pythia-160m": _pythia(768, 12, 12),
    "EleutherAI/pythia-410m": _pythia(1024, 24, 16),
    "EleutherAI/pythia-1b": _pythia(2048, 16, 8),
    "EleutherAI/pythia-1.4b": _pythia(2048, 24, 16),
    "EleutherAI/pythia-2.8b": _pythia(2560, 32, 32),
    "EleutherAI/pythia-6.9b": _pythia(4096, 32, 32),
    "EleutherAI/pythia-12b": _pythia(5120, 36, 40, vocab=50688),
    "openai-community/gpt2": _gpt2(768, 12, 12),
    "openai-community/gpt2-medium": _gpt2(1024, 24, 16),
    "openai-community/gpt2-large": _gpt2(1280, 36, 20),
    "openai-community/gpt2-xl": _gpt2(1600, 48, 25),
}


def build_fake_hub(cache: Path, configs: dict[str, dict[str, Any]] = HUB_CONFIGS) -> Path:
    """An HF hub cache (the layout ``huggingface_hub`` writes) holding only each config.json."""
    for repo, config in configs.items():
        org, name = repo.split("/")
        folder = cache / f"models--{org}--{name}"
        body = json.dumps({**config, "_name_or_path": repo}, indent=2, sort_keys=True).encode()
        blob_id = hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()
        rev = hashlib.sha1(repo.encode()).hexdigest()  # 40 hex digits, stable per repo
        (folder / "blobs").mkdir(parents=True, exist_ok=True)
        (folder / "blobs" / blob_id).write_bytes(body)
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(rev)
        snapshot = folder / "snapshots" / rev
        snapshot.mkdir(parents=True, exist_ok=True)
        link = snapshot / "config.json"
        if not link.exists():
            link.symlink_to(os.path.relpath(folder / "blobs" / blob_id, snapshot))
    return cache


class WeightRead(AssertionError):
    """Planning tried to read a weight file."""


@contextlib.contextmanager
def no_weight_reads() -> Iterator[list[str]]:
    """Make every weight-loading entry point raise (and record the attempt) inside the block."""
    import safetensors
    import safetensors.torch
    import torch
    import transformers

    import harness.models.loading

    attempts: list[str] = []

    def refuse(what: str) -> Callable[..., Any]:
        def raiser(*args: Any, **kwargs: Any) -> Any:
            attempts.append(what)
            raise WeightRead(f"planning read weights: {what}{args[:1]}")

        return raiser

    patches: list[tuple[Any, str, Any]] = [
        (torch, "load", refuse("torch.load")),
        (safetensors.torch, "load_file", refuse("safetensors.torch.load_file")),
        (safetensors.torch, "load", refuse("safetensors.torch.load")),
        (safetensors, "safe_open", refuse("safetensors.safe_open")),
        (transformers.PreTrainedModel, "from_pretrained", classmethod(refuse("from_pretrained"))),
        (transformers.AutoModelForCausalLM, "from_pretrained", refuse("AutoModel.from_pretrained")),
        (transformers.AutoTokenizer, "from_pretrained", refuse("AutoTokenizer.from_pretrained")),
        (harness.models.loading, "load_model", refuse("harness.models.loading.load_model")),
    ]
    absent = object()
    saved = [(obj, name, vars(obj).get(name, absent)) for obj, name, _ in patches]
    try:
        for obj, name, new in patches:
            setattr(obj, name, new)
        yield attempts
    finally:
        for obj, name, old in saved:
            if old is absent:  # inherited: drop the patch, the inherited attribute shows again
                delattr(obj, name)
            else:
                setattr(obj, name, old)


class _Stop(Exception):
    """Raised after planning, so the sweeper launches nothing and writes nothing."""


def plan_paper(
    results_dir: Path, extra: list[str] = (), profile: cProfile.Profile | None = None
) -> dict[str, Any]:
    """Plan the paper sweep through Hydra's multirun exactly as ``kbit-run --multirun`` does.

    Returns {plan, grid, wall_s, cpu_s} of the planning step (``plan_sweep``: compose,
    validate, dedupe, look up) and the whole sweeper call up to the end of planning.
    """
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins

    # Hydra's plugin scan re-executes its core plugin modules: scan first, as kbit-run does
    Plugins.instance()
    import harness.sweep.plan as sweep_module
    from harness.config.schema import register_schema

    register_schema()
    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2(
        task_name="run", config_search_path=create_config_search_path(str(CONF))
    )
    real_plan = sweep_module.plan_sweep
    out: dict[str, Any] = {}

    def timed_plan(grid: Any, *args: Any, **kwargs: Any) -> Any:
        out["grid"] = len(grid)
        wall, cpu = time.perf_counter(), time.process_time()
        if profile is not None:
            profile.enable()
        try:
            out["plan"] = real_plan(grid, *args, **kwargs)
        finally:
            if profile is not None:
                profile.disable()
            out["wall_s"] = time.perf_counter() - wall
            out["cpu_s"] = time.process_time() - cpu
        raise _Stop

    overrides = ["+sweeps@_global_=paper", f"results_dir={results_dir}", *extra]
    sweep_module.plan_sweep = timed_plan
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    try:
        hydra.multirun(
            config_name="config", task_function=_never, overrides=overrides,
            with_log_configuration=False,
        )  # fmt: skip
    except _Stop:
        pass
    finally:
        sweep_module.plan_sweep = real_plan
        GlobalHydra.instance().clear()
    out["total_wall_s"] = time.perf_counter() - start_wall
    out["total_cpu_s"] = time.process_time() - start_cpu
    if "plan" not in out:
        raise RuntimeError("the sweeper never reached planning")
    return out


def refuse_big(results_dir: Path, seeds: int = 16) -> dict[str, Any]:
    """The paper grid x ``seeds`` seeds (319,904 cells for 16) through Hydra's multirun: the
    sweeper must refuse it by its size before expanding it. Returns {message, wall_s, cpu_s,
    cells} (wall and CPU from the start of the multirun to the refusal)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins

    Plugins.instance()
    import harness.sweep.plan as sweep_module
    from harness.config.schema import register_schema

    register_schema()
    GlobalHydra.instance().clear()
    real_plan = sweep_module.plan_sweep

    def no_plan(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a grid above the cap must be refused before it is planned")

    wall, cpu = time.perf_counter(), time.process_time()
    sweep_module.plan_sweep = no_plan
    try:
        hydra = Hydra.create_main_hydra2(
            task_name="run", config_search_path=create_config_search_path(str(CONF))
        )
        hydra.multirun(
            config_name="config", task_function=_never, with_log_configuration=False,
            overrides=["+sweeps@_global_=paper", f"results_dir={results_dir}",
                       f"seed=range(0,{seeds})"],
        )  # fmt: skip
    except sweep_module.SweepError as err:
        message = str(err)
    else:
        raise AssertionError("the grid above the cap was not refused")
    finally:
        sweep_module.plan_sweep = real_plan
        GlobalHydra.instance().clear()
    return {"message": message, "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu, "cells": PAPER_CELLS * seeds}  # fmt: skip


def load() -> str:
    """The machine's load average (1, 5, 15 min) and its CPU count, for the timings' context."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def _never(cfg: Any) -> None:
    raise AssertionError("planning must not launch a cell")


@contextlib.contextmanager
def fake_hub_env(tmp: Path) -> Iterator[Path]:
    """HF_HOME / HF_HUB_CACHE pointing at a fake cache of the paper's models, offline.

    Must be entered before ``huggingface_hub`` is imported (it reads the paths at import).
    """
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("fake_hub_env must be entered before huggingface_hub is imported")
    hub = build_fake_hub(tmp / "hf" / "hub")
    env = {"HF_HOME": str(tmp / "hf"), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield hub
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="cProfile top-15 of the planning")
    parser.add_argument("--repeat", type=int, default=1, help="plan N times (fresh process state "
                        "only for the first: later runs show warm caches)")  # fmt: skip
    parser.add_argument("--sort", default="tottime", help="profile sort key (tottime, cumulative)")
    parser.add_argument(
        "--models",
        type=int,
        default=0,
        help="plan only the first N models of the grid (quick looks)",
    )
    parser.add_argument("--cap", action="store_true", help="also time the refusal of a "
                        "319,904-cell grid by hydra.sweeper.max_cells")  # fmt: skip
    parser.add_argument("extra", nargs="*", help="extra overrides for kbit-run (after --)")
    args = parser.parse_args()
    if not os.environ.get("KBIT_DATA_ROOT"):
        print("note: KBIT_DATA_ROOT is not set: eval=paper reads hub datasets", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="kbit-plan-bench-") as tmp, fake_hub_env(Path(tmp)):
        import logging

        logging.basicConfig(level=logging.WARNING)
        print(f"affinity: {sorted(os.sched_getaffinity(0))}  data_root: "
              f"{os.environ.get('KBIT_DATA_ROOT')}")  # fmt: skip
        extra = list(args.extra)
        if args.models:
            extra.append("model=" + ",".join(list(HUB_CONFIGS)[: args.models]))
        for i in range(args.repeat):
            prof = cProfile.Profile() if args.profile else None
            results = Path(tmp) / f"results{i}"
            before = load()
            with no_weight_reads() as attempts:
                out = plan_paper(results, extra, prof)
            plan = out["plan"]
            assert not attempts, attempts
            assert not results.exists(), "planning wrote into the results folder"
            n = out["grid"]
            print(f"run {i}: {n} cells in the grid, {len(plan.cells)} unique, "
                  f"{plan.duplicates} duplicates, {plan.invalid} invalid, "
                  f"{len(plan.problems)} problem(s)")  # fmt: skip
            for problem in plan.problems[:5]:
                print(f"  problem: {problem}")
            print(f"  plan_sweep: wall {out['wall_s']:.2f} s, cpu {out['cpu_s']:.2f} s, "
                  f"{1000 * out['wall_s'] / n:.3f} ms/cell wall, "
                  f"{1000 * out['cpu_s'] / n:.3f} ms/cell cpu")  # fmt: skip
            print(
                f"  whole multirun up to the end of planning (compose master config, expand, "
                f"plan): wall {out['total_wall_s']:.2f} s, cpu {out['total_cpu_s']:.2f} s"
            )
            print(f"  {before} before, {load()} after")
            if n >= 15_000:
                print(f"  target: <= {PLAN_TARGET_S:.0f} s for ~20,000 cells on 2 cores: "
                      f"{'met' if out['total_wall_s'] <= PLAN_TARGET_S else 'MISSED'} "
                      f"({out['total_wall_s'] / PLAN_TARGET_S:.2f} of the target)")  # fmt: skip
            if prof is not None:
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats(args.sort).print_stats(15)
                print(text.getvalue())
        if n != PAPER_CELLS and not args.models and not args.extra:
            print(f"warning: expected {PAPER_CELLS} cells, got {n}", file=sys.stderr)
        if args.cap:
            before = load()
            results = Path(tmp) / "results_cap"
            big = refuse_big(results)
            assert not results.exists(), "the refused grid wrote into the results folder"
            print(f"size cap: a {big['cells']:,}-cell grid refused in wall {big['wall_s']:.2f} s, "
                  f"cpu {big['cpu_s']:.2f} s (target < {CAP_TARGET_S:.0f} s: "
                  f"{'met' if big['wall_s'] < CAP_TARGET_S else 'MISSED'}); {before}")  # fmt: skip
            print(f"  kbit-run: {big['message']}")


if __name__ == "__main__":
    main()
