"""A result store as one tidy frame, from Python (a notebook): what the figures plot.

``load_store("results")`` or ``load_store("results", "demo")`` is the cell frame of
:func:`analysis.load.load_results`: one row per cell, the frame ``kbit-plot`` draws from, with
the same cells left out (failed, legacy, unreadable), each reported by a logged warning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

from analysis.load import load_results
from harness.files import user_path


def load_store(
    results_dir: str | os.PathLike, sweeps: Sequence[str] | str | None = None
) -> pd.DataFrame:
    """One row per ``ok`` cell of the store (or of ``sweeps``: a name or names), as the
    figures read it.

    Columns:

    * configuration, one value per cell (:data:`analysis.load.CONFIG_COLUMNS`): ``key``
      (``<sweep>/<cell_id>``, unique across sweeps), ``sweep``, ``cell_id``,
      ``schema_version``, ``model``, ``model_family``, ``n_params``,
      ``n_nonembedding_params``, ``train_tokens``, ``method``, ``dtype``, ``dtype_family``,
      ``dtype_overrides``, ``bits`` (16 = the unquantized baseline), ``block_size``,
      ``scale_format``, ``centering``, ``outlier_fraction``, ``method_settings``,
      ``total_model_bits``, ``bits_per_param``, ``device_class``, ``compute_dtype``,
      ``data_digest``, ``trust_remote_code``;
    * one measurement column per task and metric the store holds,
      ``<task>:<metric>`` (:func:`analysis.load.measure_column`), e.g. ``wikitext2:ppl``,
      ``heldout:nll``, ``zoo_mc:acc``, and ``zeroshot_mean:acc`` (the paper's y axis,
      :data:`analysis.load.ACC_COLUMN`); NaN where a cell did not measure it;
    * ``<task>:<metric>:stderr`` beside each measurement that has a standard error
      (zero-shot rows; perplexity has none).

    Left out, each logged as a warning (``logging``) as ``kbit-plot`` does: failed cells (any
    failed row, non-finite evaluations included), legacy cells (``schema_version`` < 2) and
    unreadable files. Per-example values are not in the frame (they are the bulk of a store):
    ``analysis.load.load_results(...).per_sample()`` reads them.

    ``results_dir``: ``~`` and ``$VAR`` are expanded (:func:`harness.files.user_path`); a
    folder that does not exist, or a sweep the store does not hold, raises
    :class:`FileNotFoundError` (an empty sweep folder gives an empty frame).
    """
    root = user_path(results_dir, "results_dir")
    if not root.is_dir():
        raise FileNotFoundError(f"results_dir={os.fspath(results_dir)!r}: no such folder ({root})")
    names = [sweeps] if isinstance(sweeps, str) else None if sweeps is None else list(sweeps)
    missing = [s for s in names or [] if not (root / s).is_dir()]
    if missing:
        held = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise FileNotFoundError(
            f"sweeps={missing}: not in the store {root}; allowed: {held or 'none (empty store)'}"
        )
    return load_results(root, names).cells
