"""A synthetic result store shaped like a real sweep: for benchmarks, demos and smoke tests.

The numbers follow a smooth made-up law (accuracy rises with log2 parameters, falls as k
shrinks, with a cliff at 3 bits), not a measurement. Known-answer tests build their own
tiny grids by hand instead, so that their expected values do not come from this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness.records import MEAN_ZEROSHOT_TASK, Record, cell_path, write_cell

TASKS = ("lambada_openai", "winogrande", "hellaswag", "piqa")
TASK_VERSION = "1.0+synthetic"
# A data type, or (name, overrides): overrides land in dtype_overrides as sorted JSON.
DtypeSpec = str | tuple[str, dict]


def data_source(task: str) -> str:
    """A made-up but well-formed local data source of one task."""
    return f"local:synthetic/{task}.jsonl;sha256={hashlib.sha256(task.encode()).hexdigest()}"


def data_digest(tasks: Sequence[str] = TASKS, version: str = TASK_VERSION) -> str:
    """Short hash of every task's source and version, as the runner records one per cell."""
    text = "\n".join(f"{t}={data_source(t)}@{version}" for t in sorted(tasks))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _dtype_spec(spec: DtypeSpec) -> tuple[str, str]:
    """(name, overrides JSON) of a data-type spec."""
    name, overrides = (spec, {}) if isinstance(spec, str) else spec
    return name, json.dumps(overrides, sort_keys=True)


# Extra bits per parameter for one fp16 scale per block (synthetic stand-in for the record's
# own total_model_bits, which the real runner computes in harness.bits).
_SCALE_BITS = 16


def synthetic_cells(
    families: Sequence[str] = ("pythia", "opt"),
    sizes: Sequence[float] = (125e6, 350e6, 1.3e9, 2.7e9, 6.7e9),
    ks: Sequence[int] = (3, 4, 5, 6, 8, 16),
    dtypes: Sequence[DtypeSpec] = ("int", "float", "quantile"),
    block_sizes: Sequence[int | None] = (64, 128, 256, None),
    variants: Sequence[tuple[str, bool, float]] = (("blockwise", False, 0.0),),
    n_examples: int = 100,
    sweep: str = "synthetic",
    seed: int = 0,
    device_class: str = "cpu",
    compute_dtype: str = "float32",
) -> list[list[Record]]:
    """The rows of every cell of a grid, one inner list per cell (16-bit once per model).

    Current-schema records: numerics (``device_class``, ``compute_dtype``), data provenance
    (per-row ``data_source`` and ``task_version``, the cell's ``data_digest``) and data-type
    overrides (``dtypes`` entries may be ``(name, {field: value})``).
    """
    rng = np.random.default_rng(seed)
    quantized = [
        dict(method=m, centering=c, outlier_fraction=o, dtype=d, block_size=b)
        for (m, c, o) in variants
        for d in dtypes
        for b in block_sizes
    ]
    baseline = [dict(method="none", centering=False, outlier_fraction=0.0, dtype="none")]
    numerics = dict(device_class=device_class, compute_dtype=compute_dtype)
    cells = []
    for fi, family in enumerate(families):
        for n_params in sizes:
            for k in ks:
                for cfg in baseline if k == 16 else quantized:
                    model = dict(sweep=sweep, family=family, fi=fi, n_params=n_params, k=k)
                    cells.append(_cell(rng, n_examples, **model, **cfg, **numerics))
    return cells


def _cell(
    rng,
    n_ex,
    *,
    sweep,
    family,
    fi,
    n_params,
    k,
    method,
    centering,
    outlier_fraction,
    dtype,
    block_size=None,
    device_class="cpu",
    compute_dtype="float32",
):
    outl, bs = outlier_fraction, block_size
    dtype, overrides = _dtype_spec(dtype)
    lp = math.log2(n_params)
    degradation = {3: 0.12, 4: 0.02, 5: 0.01, 6: 0.005}.get(k, 0.0)
    quality = 0.3 + 0.45 / (1 + math.exp(-(lp - 31) / 1.5)) - degradation - 0.01 * fi
    quality += 0.002 * (dtype == "quantile") + (0.004 if bs and bs <= 64 else 0.0)
    quality += 0.003 * centering + 0.01 * (method == "proxy")
    per_bit = k + (_SCALE_BITS / bs if bs else 0.0) if k != 16 else 16.0
    total_bits = n_params * per_bit
    variant = hashlib.sha256(f"{overrides}|{device_class}|{compute_dtype}".encode()).hexdigest()
    cell_id = f"{family}-{int(n_params)}-{k}-{method}-{dtype}-{bs}-{int(centering)}-{outl:g}"
    cell_id += f"-{variant[:6]}"
    base = dict(
        sweep=sweep,
        cell_id=cell_id,
        model=f"zoo:{family}/{n_params / 1e6:g}M",
        model_family=family,
        n_params=int(n_params),
        n_nonembedding_params=int(n_params * 0.9),
        method=method,
        dtype=dtype,
        dtype_family=dtype,
        dtype_overrides=overrides,
        bits=k,
        block_size=bs,
        centering=centering,
        outlier_fraction=outl,
        total_model_bits=total_bits,
        bits_per_param=per_bit,
        device_class=device_class,
        compute_dtype=compute_dtype,
        data_digest=data_digest(),
    )
    source = {t: dict(data_source=data_source(t), task_version=TASK_VERSION) for t in TASKS}
    rows, accs = [], []
    for task in TASKS:
        samples = (rng.random(n_ex) < quality).astype(float).tolist()
        acc = float(np.mean(samples))
        accs.append(acc)
        se = math.sqrt(acc * (1 - acc) / n_ex)
        rows.append(
            Record(
                **base,
                task=task,
                metric="acc",
                value=acc,
                stderr=se,
                n_samples=n_ex,
                per_sample=samples,
                **source[task],
            )
        )
        rows.append(
            Record(
                **base,
                task=task,
                metric="acc_norm",
                value=acc,
                stderr=se,
                n_samples=n_ex,
                **source[task],
            )
        )
    rows.append(
        Record(
            **base,
            task=MEAN_ZEROSHOT_TASK,
            metric="acc",
            value=float(np.mean(accs)),
            n_samples=n_ex * len(TASKS),
            data_source=";".join(source[t]["data_source"] for t in TASKS),
            task_version=TASK_VERSION,
        )
    )
    ppl = math.exp(4.5 - 2.5 * (quality - 0.3)) * (30 if k == 3 and lp < 29 else 1)
    wiki = dict(data_source=data_source("wikitext2"), task_version=TASK_VERSION)
    rows.append(Record(**base, task="wikitext2", metric="ppl", value=ppl, n_samples=1000, **wiki))
    return rows


def write_synthetic_store(
    results_dir: str | os.PathLike, cells: list[list[Record]] | None = None, **grid
) -> Path:
    """Write a synthetic grid (or the given cells) as a store; returns ``results_dir``."""
    cells = synthetic_cells(**grid) if cells is None else cells
    for rows in cells:
        write_cell(rows, cell_path(results_dir, rows[0].sweep, rows[0].cell_id))
    return Path(results_dir)
