"""Scopes: the cells of a store that a claim compares with each other.

A scope is one model family, one training-token count where the store records one, and one
numerics and data set (:data:`analysis.tables.VARIANT_COLUMNS`): cells that are never compared
across. :func:`split_scopes` cuts a store's cells into scopes; :func:`scope_data` gathers what
a claim reads about one (:class:`analysis.claims.model.ScopeData`).
"""

from __future__ import annotations

import pandas as pd

from analysis.claims.compare import samples_by_key
from analysis.claims.model import Scope, ScopeData
from analysis.load import Results, fill_config_defaults, tokens_text, training_tokens
from analysis.tables import VARIANT_COLUMNS, config_keys, variant_labels


def tokens_label(cells: pd.DataFrame) -> pd.Series:
    """The training-token count of each cell's model as text ('' when the store has none).

    :func:`analysis.load.training_tokens` where the store records it; else the
    ``@<tokens>`` suffix of a zoo checkpoint's model name (``zoo:tokens/l2d64@1M``); else ''.
    """
    if "train_tokens" in cells.columns:
        return training_tokens(cells).map(tokens_text)
    names = cells["model"].astype(str)
    return names.map(lambda m: m.rsplit("@", 1)[1] if "@" in m else "")


def model_id(cells: pd.DataFrame) -> pd.Series:
    """One model (checkpoint included): model name plus training tokens where recorded."""
    return cells["model"].astype(str) + "@" + cells["_tokens"]


def split_scopes(cells: pd.DataFrame) -> list[tuple[Scope, pd.DataFrame]]:
    """The store's cells cut into scopes: (family, training tokens, numerics and data).

    Within a scope the same configuration of the same model measured twice (in two sweeps)
    is kept once (the first by key), so no comparison counts it twice.
    """
    cells = fill_config_defaults(cells).copy()
    cells["_tokens"] = tokens_label(cells)
    cells["_model"] = model_id(cells)
    cells["_cfg"] = config_keys(cells)
    cells["_variant"] = ""
    for _, group in cells.groupby("model_family", sort=True):
        cells.loc[group.index, "_variant"] = variant_labels(group, group)
    out = []
    group_cols = ["model_family", "_tokens", *VARIANT_COLUMNS]
    for _, group in cells.groupby(group_cols, sort=True, dropna=False):
        group = group.sort_values("key")
        dups = group.duplicated(["_model", "bits", "_cfg"])
        group = group[~dups].reset_index(drop=True)
        family, tokens, variant = (
            str(group["model_family"].iloc[0]),
            str(group["_tokens"].iloc[0]),
            str(group["_variant"].iloc[0]),
        )
        name = (
            family + (f" @{tokens} tokens" if tokens else "") + (f" ({variant})" if variant else "")
        )
        scope = Scope(
            name=name,
            model_family=family,
            train_tokens=tokens,
            variant=variant,
            sweeps=sorted(group["sweep"].astype(str).unique()),
            n_models=int(group["_model"].nunique()),
            n_cells=len(group),
        )
        if dups.any():
            scope.notes.append(
                f"{int(dups.sum())} repeated cell(s) (same model and config) kept once"
            )
        out.append((scope, group))
    return out


def nll_column(cells: pd.DataFrame, nll_task: str | None = None) -> str | None:
    """The held-out NLL column the claims use: ``nll_task``, else wikitext2, else the first."""
    cols = sorted(c for c in cells.columns if c.endswith(":nll"))
    if nll_task:
        return f"{nll_task}:nll" if f"{nll_task}:nll" in cols else None
    cols = sorted(cols, key=lambda c: c != "wikitext2:nll")
    return cols[0] if cols else None


def scope_data(
    results: Results,
    scope: Scope,
    measured: pd.DataFrame,
    nll_col: str | None,
    n_boot: int,
    level: float,
    seed: int,
) -> ScopeData:
    """What the claims read about ``scope``: its ``measured`` cells and their per-example data.

    ``nll_col`` is the store's held-out NLL column; where the scope has no per-window data of
    it, the scope notes that and the claims get ``nll_col=None`` (no NLL detail rows).
    """
    per_sample = results.per_sample(measured["key"].tolist())
    nll_name = nll_col.split(":")[0] if nll_col else None
    samples, nll_samples = samples_by_key(per_sample, nll_name)
    if nll_col and not nll_samples:
        scope.notes.append(f"no per-window {nll_col} data: NLL comparisons skipped")
    return ScopeData(
        scope=scope,
        cells=measured,
        per_sample=per_sample,
        samples=samples,
        nll_samples=nll_samples,
        nll_col=nll_col if nll_samples else None,
        n_boot=n_boot,
        level=level,
        seed=seed,
    )
