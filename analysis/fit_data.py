"""The cells of a precision-scaling-law fit and their paired window bootstrap.

Selects the quantized cells (method, block size, bits, data types) with a known ``train_tokens``
(D) and a 16-bit baseline of the same checkpoint, and reads every selected cell's per-window
held-out NLL into one ``cells × windows`` matrix. Every perplexity window is the same text for
every cell of a family, so a bootstrap replicate draws *one* resampling of the window indices
and applies it to every cell and its baseline (paired): a replicate is a row of multinomial
counts over the windows, and every replicate mean of every cell is one matrix product.

analysis/fit_law.py fits the law on these; docs/fit.md has the decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.load import Results, measure_column, training_tokens
from analysis.tables import QUANT_CONFIG, VARIANT_COLUMNS, overrides_text
from harness.records import AXES_COLUMN, BASELINE_BITS

log = logging.getLogger(__name__)

DEFAULT_TASK = "heldout"
DEFAULT_METHOD = "blockwise"
DEFAULT_BITS = (3, 4, 5, 6, 7, 8)
DEFAULT_N_BOOT = 1000
DEFAULT_LEVEL = 0.95
TOKENS_COLUMN = "train_tokens"
# Cells of one fit share every quantization and evaluation field apart from k (the method and
# block size are chosen by the fit's options): the record schema's axes (harness.records).
GROUP_COLUMNS = [*(c for c in QUANT_CONFIG if c not in ("method", "block_size")), AXES_COLUMN,
                 *VARIANT_COLUMNS]  # fmt: skip


class FitInputError(ValueError):
    """The store cannot support the fit (missing column, too few sizes, ...): one line, exit 2."""


@dataclass
class LawData:
    """The selected cells of a store with their per-window NLL, ready to fit.

    ``cells``: one row per selected cell, quantized and 16-bit baselines alike, with ``key``,
    ``model``, ``group`` (label of the fit it belongs to, "" for baselines), ``N``, ``D``,
    ``k``, ``total_model_bits``, ``row`` (its row of ``nll``) and ``base_row`` (the row of its
    baseline; its own row for a baseline). ``nll``: ``(cells, windows)`` per-window mean NLL.
    ``excluded``: cells left out before fitting, with the reason.
    """

    cells: pd.DataFrame
    nll: np.ndarray
    excluded: pd.DataFrame
    task: str
    method: str
    block_size: int | None
    bits: tuple[int, ...]
    sweeps: list[str] = field(default_factory=list)

    @property
    def n_windows(self) -> int:
        return int(self.nll.shape[1])

    @property
    def groups(self) -> list[str]:
        return sorted(g for g in self.cells["group"].unique() if g)

    def quantized(self, group: str | None = None) -> pd.DataFrame:
        q = self.cells[self.cells["k"] != BASELINE_BITS]
        return q if group is None else q[q["group"] == group]

    def deltas(self, means: np.ndarray, cells: pd.DataFrame | None = None) -> np.ndarray:
        """ΔL of ``cells`` (default all) from row means ``(..., rows of nll)``: the cell's mean
        minus its baseline's, on the same (resampled) windows."""
        cells = self.cells if cells is None else cells
        return means[..., cells["row"].to_numpy()] - means[..., cells["base_row"].to_numpy()]


def _levels(values: pd.Series) -> str:
    uniq = sorted(pd.unique(values.dropna()))
    shown = ", ".join(f"{v:.4g}" for v in uniq[:8]) + (", ..." if len(uniq) > 8 else "")
    return f"{len(uniq)} ({shown})"


def _group_labels(cells: pd.DataFrame) -> pd.Series:
    """``int``, ``float{exponent_bits=3}``, plus the fields that vary among the cells."""
    label = cells["dtype"].astype(str) + cells["dtype_overrides"].map(overrides_text)
    for col in GROUP_COLUMNS[2:]:
        if cells[col].astype(str).nunique() > 1:
            label = label + f" {col}=" + cells[col].astype(str)
    return label


def read_train_tokens(results: Results) -> pd.Series | None:
    """``train_tokens`` per cell key (NaN where unknown; the rule of
    :func:`analysis.load.training_tokens`), or None when the cell frame has no such column."""
    cells = results.cells
    if TOKENS_COLUMN not in cells.columns:
        return None
    return pd.Series(training_tokens(cells).to_numpy(), index=cells["key"].to_numpy())


def collect(
    results: Results,
    task: str = DEFAULT_TASK,
    method: str = DEFAULT_METHOD,
    block_size: int | None = None,
    bits: Sequence[int] = DEFAULT_BITS,
    dtypes: Sequence[str] | None = None,
) -> LawData:
    """Select the cells of the fit and read their per-window NLL; :class:`FitInputError` if
    the store cannot support a fit (the message says what it has)."""
    cells = results.cells
    if cells.empty:
        raise FitInputError(f"no ok cells in {results.results_dir}")
    nll_col = measure_column(task, "nll")
    if nll_col not in cells.columns:
        have = sorted(c.split(":")[0] for c in cells.columns if c.endswith(":nll"))
        raise FitInputError(f"no {task!r} nll rows (--task); perplexity tasks with nll: {have}")
    tokens = read_train_tokens(results)
    if tokens is None:
        raise FitInputError(
            f"the store has no {TOKENS_COLUMN} column (tokens each model was trained on, D); "
            "re-run the cells with a runner that records it"
        )
    cells = cells.assign(D=cells["key"].map(tokens).astype(float))
    cells = cells.assign(
        N=cells["n_nonembedding_params"].astype(float), k=cells["bits"].astype(int)
    )
    quant = cells[(cells["method"] == method) & (cells["k"] != BASELINE_BITS)]
    if quant.empty:
        have = sorted(set(cells.loc[cells["k"] != BASELINE_BITS, "method"]))
        raise FitInputError(f"no quantized cells with --method {method!r}; methods: {have}")
    sizes = quant["block_size"]
    if block_size is None:
        counts = sizes.fillna(-1).astype(int).value_counts()
        block_size = None if counts.index[0] == -1 else int(counts.index[0])
    keep = sizes.isna() if block_size is None else sizes == block_size
    if not keep.any():
        have = sorted({"tensor" if pd.isna(b) else int(b) for b in sizes})
        raise FitInputError(f"--block-size {block_size}: no such cells; block sizes: {have}")
    quant = quant[keep & quant["k"].isin(list(bits))]
    if quant.empty:
        raise FitInputError(f"--bits {list(bits)}: no cells; bits: {sorted(set(cells['k']))}")
    if dtypes:
        missing = sorted(set(dtypes) - set(quant["dtype"]))
        if missing:
            raise FitInputError(
                f"--dtype {missing}: no such cells; dtypes: {sorted(set(quant['dtype']))}"
            )
        quant = quant[quant["dtype"].isin(list(dtypes))]
    base = cells[cells["k"] == BASELINE_BITS]
    if quant["D"].isna().all():
        raise FitInputError(
            f"no selected cell records {TOKENS_COLUMN} (tokens trained on, D): the fit needs "
            "zoo checkpoints trained to known token counts"
        )
    excluded: list[tuple[str, str]] = []
    unknown_d = quant["D"].isna() | ~(quant["D"] > 0)
    excluded += [(k, f"{TOKENS_COLUMN} unknown") for k in quant.loc[unknown_d, "key"]]
    quant = quant[~unknown_d].sort_values("key")
    # The same configuration of the same checkpoint twice (e.g. in two sweeps): the first key.
    dup = quant.duplicated(["model", "k", *GROUP_COLUMNS])
    excluded += [(k, "duplicate of an earlier cell (same model and configuration)")
                 for k in quant.loc[dup, "key"]]  # fmt: skip
    quant = quant[~dup]
    # One baseline per checkpoint and evaluation variant (the first key if a store holds two).
    match = ["model", *VARIANT_COLUMNS]
    base = base.sort_values("key").drop_duplicates(match)
    quant = quant.merge(
        base[[*match, "key"]].rename(columns={"key": "base_key"}), on=match, how="left"
    )
    no_base = quant["base_key"].isna()
    excluded += [(k, "no 16-bit baseline of its model") for k in quant.loc[no_base, "key"]]
    quant = quant[~no_base]
    base = base[base["key"].isin(set(quant["base_key"]))]
    windows = _read_windows(results, [*quant["key"], *base["key"]], task)
    lengths = pd.Series({k: len(v) for k, v in windows.items()}, dtype=int)
    n_win = int(lengths.mode().iloc[0]) if not lengths.empty else 0
    usable = {k for k, n in lengths.items() if n == n_win and n > 0}
    bad = ~quant["key"].isin(usable) | ~quant["base_key"].isin(usable)
    for key, bkey in quant.loc[bad, ["key", "base_key"]].itertuples(index=False):
        why = "no per-window nll" if key not in windows or bkey not in windows else None
        excluded.append((key, why or f"window count differs from the {n_win} of the others"))
    quant = quant[~bad]
    _require_levels(quant, results.results_dir, excluded)
    base = base[base["key"].isin(set(quant["base_key"]))]
    frame = pd.concat([quant.assign(group=_group_labels(quant)), base.assign(group="")])
    frame = frame.reset_index(drop=True)
    frame["row"] = np.arange(len(frame))
    row_of = dict(zip(frame["key"], frame["row"], strict=True))
    frame["base_row"] = frame["base_key"].map(row_of).fillna(frame["row"]).astype(int)
    nll = np.stack([np.asarray(windows[k], dtype=float) for k in frame["key"]])
    cols = ["key", "model", "group", "dtype", "N", "D", "k", "total_model_bits", "row", "base_row"]
    ex = pd.DataFrame(excluded, columns=["key", "reason"])
    if not ex.empty:
        log.warning("kbit-fit: %d cell(s) left out before fitting: %s", len(ex),
                    ex["reason"].value_counts().to_dict())  # fmt: skip
    return LawData(
        cells=frame[cols],
        nll=nll,
        excluded=ex,
        task=task,
        method=method,
        block_size=block_size,
        bits=tuple(int(b) for b in bits),
        sweeps=sorted({k.split("/", 1)[0] for k in frame["key"]}),
    )


def _read_windows(results: Results, keys: list[str], task: str) -> dict[str, np.ndarray]:
    ps = results.per_sample(keys)
    ps = ps[(ps["task"] == task) & (ps["metric"] == "nll")].drop_duplicates("key")
    return {k: np.asarray(v, dtype=float) for k, v in zip(ps["key"], ps["per_sample"], strict=True)}


def _require_levels(quant: pd.DataFrame, where: str, excluded: list[tuple[str, str]]) -> None:
    """>= 2 distinct N, D and k, else one line saying what the store has."""
    for col, what in (("N", "model sizes (N)"), ("D", "token counts (D)"), ("k", "bit widths")):
        n = quant[col].nunique()
        if n < 2:
            left = pd.Series([r for _, r in excluded]).value_counts().to_dict()
            also = f"; left out: {left}" if left else ""
            raise FitInputError(
                f"need >= 2 distinct {what} among the usable cells; {where} has "
                f"{_levels(quant[col].astype(float))}{also}"
            )


# --------------------------------------------------------------------------------------------
# bootstrap


def window_weights(n_windows: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``(n_boot, n_windows)`` resampling weights: multinomial counts / n_windows.

    ``weights @ values`` gives the mean of an index resample of every column of ``values``
    at once; the same row applied to every cell is what pairs them.
    """
    rng = np.random.default_rng([seed, n_windows])
    counts = rng.multinomial(n_windows, np.full(n_windows, 1.0 / n_windows), size=n_boot)
    return counts / n_windows


def replicate_means(data: LawData, n_boot: int, seed: int = 0) -> np.ndarray:
    """``(n_boot, cells)`` bootstrap means of every cell's NLL, one shared resample per row."""
    return window_weights(data.n_windows, n_boot, seed) @ data.nll.T


def percentile_bounds(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    a = (1 - level) / 2
    return np.nanquantile(reps, a, axis=0), np.nanquantile(reps, 1 - a, axis=0)
