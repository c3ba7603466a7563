"""``kbit-fit RESULTS_DIR``: fitted precision scaling laws from a result store.

Fits ΔL(N, D, k) = A · D^β / (N^α · k^γ) (Ouyang et al. 2024) per data type with paired
window-bootstrap CIs, checks the fit by leaving each model size (and the largest D) out and
predicting it, and finds the bit-optimal k per total-bit budget with its bootstrap interval.
Writes ``fit.json`` (everything, with inputs and versions), ``fit.md`` (the tables) and
``fit.png`` / ``fit.pdf`` into ``--out`` (default ``./fit``). The computations live in
:mod:`analysis.fit_law`; decisions in docs/fit.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from analysis.figure_registry import (
    load_figure_plugins,
    register_figure,
    registered_figures,
    save_registered,
)
from analysis.figures import FORMATS, MARKERS, OKABE_ITO
from analysis.fit_data import (
    DEFAULT_BITS,
    DEFAULT_LEVEL,
    DEFAULT_METHOD,
    DEFAULT_N_BOOT,
    DEFAULT_TASK,
    FitInputError,
    LawData,
    collect,
    replicate_means,
)
from analysis.fit_law import LawFit, design, fit_law, leave_one_out, predict
from analysis.fit_optimal import bit_optimal
from analysis.load import Results, load_results, tokens_text
from analysis.tables import to_markdown
from harness.files import atomic_output, atomic_write
from harness.store_cli import OneLineParser, StoreRefusal, check_store, output_dir, refuse

__all__ = [
    "FitInputError",
    "FitReport",
    "LawData",
    "LawFit",
    "bit_optimal",
    "collect",
    "design",
    "fit_law",
    "fit_main",
    "fit_store",
    "leave_one_out",
    "predict",
    "write_outputs",
]

log = logging.getLogger("analysis.fit")

OUT_NAMES = ("fit.json", "fit.md", "fit.png", "fit.pdf")  # without plugin figures


class FitReport:
    """Everything ``kbit-fit`` computes from one store: fits, self-checks, bit-optimal k."""

    def __init__(
        self,
        data: LawData,
        fits: dict[str, LawFit],
        loo: pd.DataFrame,
        optimal: pd.DataFrame,
        options: dict,
        results: Results | None = None,
    ):
        self.data, self.fits, self.loo, self.optimal = data, fits, loo, optimal
        self.options = options
        self.results = results

    def exponents_table(self) -> pd.DataFrame:
        """One row per fitted group: exponents and A with their CIs, cells, residual scatter."""
        rows = []
        for group, fit in self.fits.items():
            row = {"group": group, "cells used": f"{fit.n_used}/{len(fit.cells)}"}
            for name in ("alpha", "beta", "gamma", "A"):
                p = fit.params[name]
                row[name] = f"{p.estimate:.4g} [{p.low:.4g}, {p.high:.4g}]"
            row["misfit sd (log)"] = round(fit.tau, 4)
            row["resid sd (log)"] = round(fit.resid_sd, 4)
            row["R² (log)"] = round(fit.r2, 4)
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        res = self.results
        return {
            "law": "dL(N, D, k) = A * D^beta / (N^alpha * k^gamma); dL = NLL(k-bit) - NLL(16-bit)",
            "inputs": {
                "results_dir": str(res.results_dir) if res is not None else None,
                "sweeps": self.data.sweeps,
                "task": self.data.task,
                "method": self.data.method,
                "block_size": self.data.block_size,
                "bits": list(self.data.bits),
                "n_windows": self.data.n_windows,
                "n_cells": len(self.data.cells),
                "n_quantized_cells": len(self.data.quantized()),
                "n_baselines": int((self.data.cells["group"] == "").sum()),
                "excluded_before_fit": self.data.excluded.to_dict("records"),
                "skipped_files": [[str(p), r] for p, r in (res.problems if res else [])],
                "legacy_cells_excluded": res.n_legacy if res is not None else 0,
            },
            "options": self.options,
            "versions": versions(),
            "fits": {g: f.to_dict() for g, f in self.fits.items()},
            "leave_one_out": _records(self.loo),
            "bit_optimal": _records(self.optimal),
            "cells": {g: _records(f.cells) for g, f in self.fits.items()},
        }


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-safe rows: NaN -> null, numpy scalars -> Python."""
    out = []
    for row in frame.to_dict("records"):
        clean = {}
        for k, v in row.items():
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            clean[str(k)] = v
        out.append(clean)
    return out


def versions() -> dict[str, str]:
    """Versions of what produced the numbers."""
    import matplotlib

    out = {"numpy": np.__version__, "pandas": pd.__version__, "matplotlib": matplotlib.__version__}
    try:
        out["kbit-harness"] = metadata.version("kbit-harness")
    except metadata.PackageNotFoundError:
        out["kbit-harness"] = "unknown"
    return out


def fit_store(
    results: Results,
    task: str = DEFAULT_TASK,
    method: str = DEFAULT_METHOD,
    block_size: int | None = None,
    bits: Sequence[int] = DEFAULT_BITS,
    dtypes: Sequence[str] | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
    min_delta: float | None = None,
) -> FitReport:
    """Select, fit, self-check and find the bit-optimal k; :class:`FitInputError` if the
    store cannot support it. Deterministic for a given store, options and seed."""
    data = collect(results, task, method, block_size, bits, dtypes)
    means = replicate_means(data, n_boot, seed)
    fits = fit_law(data, n_boot, seed, level, min_delta, means=means)
    loo = pd.concat(
        [leave_one_out(fit, data, means, seed) for fit in fits.values()], ignore_index=True
    )
    optimal = bit_optimal(data, means, level)
    options = dict(task=task, method=method, block_size=data.block_size, bits=list(bits),
                   dtypes=list(dtypes) if dtypes else None, n_boot=n_boot, seed=seed,
                   level=level, min_delta=min_delta)  # fmt: skip
    return FitReport(data, fits, loo, optimal, options, results)


# --------------------------------------------------------------------------------------------
# outputs


def _loo_table(loo: pd.DataFrame) -> pd.DataFrame:
    if loo.empty:
        return loo
    frame = loo.copy()
    frame["interval"] = [
        f"[{lo:.4g}, {hi:.4g}]" if pd.notna(lo) else ""
        for lo, hi in zip(frame.get("low", np.nan), frame.get("high", np.nan), strict=True)
    ]
    cols = ["group", "left_out", "value", "n_train", "n_cells", "observed_gm", "predicted_gm",
            "interval", "cell_coverage", "verdict"]  # fmt: skip
    return frame[[c for c in cols if c in frame.columns]]


def _optimal_table(optimal: pd.DataFrame) -> pd.DataFrame:
    if optimal.empty:
        return optimal

    def braces(ks: list) -> str:
        return "{" + ", ".join(map(str, ks)) + "}"

    frame = optimal.assign(k_set=optimal["k_set"].map(braces))
    kcols = sorted((c for c in frame.columns if c.startswith("k=")), key=lambda c: int(c[2:]))
    cols = ["group", "comparison", "log2_budget", "best_k", "share", "k_set", "n_sizes", *kcols]
    return frame[cols]


def markdown(report: FitReport) -> str:
    data, opts = report.data, report.options
    lines = [
        "# Precision scaling law fit (kbit-fit)",
        "",
        "ΔL(N, D, k) = A · D^β / (N^α · k^γ), ΔL = held-out NLL of the k-bit cell − NLL of the "
        "16-bit baseline of the same checkpoint (nats/token); N = non-embedding parameters, "
        "D = train_tokens. Least squares in log space on the cells above the noise floor.",
        "",
        f"- store: {report.results.results_dir if report.results else ''} "
        f"(sweeps {', '.join(data.sweeps)}); task {data.task!r}, {data.n_windows} windows",
        f"- cells: method {data.method}, block size {data.block_size}, bits {list(data.bits)}; "
        f"{len(data.quantized())} quantized + {(data.cells['group'] == '').sum()} baselines",
        f"- {opts['n_boot']} paired window-bootstrap replicates (seed {opts['seed']}), "
        f"{round(100 * opts['level'])}% percentile intervals",
    ]
    if not data.excluded.empty:
        counts = data.excluded["reason"].value_counts().to_dict()
        lines.append(f"- left out before fitting: {counts}")
    lines += ["", "## Exponents", "", to_markdown(report.exponents_table()).rstrip(), ""]
    for group, fit in report.fits.items():
        if fit.exclusions():
            lines.append(f"- {group}: cells not fitted: {fit.exclusions()}")
    lines += [
        "",
        "## Leave-one-out self-check",
        "",
        "Each model size (and the largest D) left out, the law fitted on the rest, the left-out "
        "cells predicted: geometric-mean ΔL observed vs predicted, with the prediction interval "
        "(fit bootstrap + training residual scatter); cell_coverage = share of left-out cells "
        "inside their own interval.",
        "",
        to_markdown(_loo_table(report.loo)).rstrip(),
        "",
        "## Bit-optimal k per budget",
        "",
        "Lowest interpolated held-out NLL per total-bit budget (log2 bits), per data type and "
        "D level, among the sizes at that D (k=16: the 16-bit baselines); share = bootstrap "
        "replicates choosing best_k; k_set = every k chosen in at least "
        f"{100 * (1 - opts['level']) / 2:g}% of them. An empty k column: that k was not "
        "measured at that budget (its curve does not reach it), not a loss.",
        "",
        to_markdown(_optimal_table(report.optimal)).rstrip(),
        "",
    ]
    return "\n".join(lines)


@register_figure("fit", path="fit", description="ΔL·k^γ̂ vs D per group, fitted lines per N")
def figure(report: FitReport) -> Figure:
    """ΔL·k^γ̂ vs D (log-log), a panel per group: points coloured by N with bootstrap error
    bars, marker per k, hollow where not fitted; the fitted A·D^β/N^α line per N."""
    fits = list(report.fits.values())
    n = len(fits)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    width, height = 4.6 * ncols + 1.4, 3.8 * nrows + 0.5
    fig = Figure(figsize=(width, height))
    grid = dict(left=0.75 / width, right=1 - 1.6 / width, bottom=0.6 / height,
                top=1 - 0.8 / height, wspace=0.35, hspace=0.55)  # fmt: skip
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=grid).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    sizes = sorted({float(v) for f in fits for v in f.cells["N"]})
    ks = sorted({int(v) for f in fits for v in f.cells["k"]})
    color = {s: OKABE_ITO[i % len(OKABE_ITO)] for i, s in enumerate(sizes)}
    marker = {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(ks)}
    for ax, fit in zip(axes, fits, strict=False):
        c = fit.cells
        a, beta, alpha, gamma = (fit.params[p].estimate for p in ("A", "beta", "alpha", "gamma"))
        scale = c["k"].to_numpy(float) ** gamma
        pos = c["delta"].to_numpy() > 0
        for (nn, k), sub in c[pos].groupby(["N", "k"]):
            s = scale[sub.index]
            y = sub["delta"].to_numpy() * s
            err = np.vstack([y - np.clip(sub["delta_low"], 1e-300, None) * s,
                             sub["delta_high"] * s - y]).clip(min=0)  # fmt: skip
            face = [color[nn] if u else "none" for u in sub["used"]]
            ok = sub["used"].to_numpy()  # a noise-floor cell's interval reaches 0: no bar
            ax.errorbar(sub["D"][ok], y[ok], yerr=err[:, ok], fmt="none", ecolor=color[nn],
                        alpha=0.5, lw=0.8)  # fmt: skip
            ax.scatter(sub["D"], y, marker=marker[k], facecolors=face, edgecolors=color[nn], s=22)
        d = np.geomspace(c["D"].min(), c["D"].max(), 50)
        for nn in sizes:
            if (c["N"] == nn).any():
                ax.plot(d, a * d**beta / nn**alpha, color=color[nn], lw=1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        # D spans about a decade: tick the measured values (0.5M ... 8M), no crowded minors
        ax.set_xticks(sorted(set(c["D"].astype(float))))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: tokens_text(x)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training tokens D")
        ax.set_ylabel(f"ΔL · k^{gamma:.3g} (nats)")
        ax.set_title(f"{fit.group}: α={alpha:.3g} β={beta:.3g} γ={gamma:.3g}", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        hidden = int((~pos).sum())
        if hidden:
            ax.text(0.02, 0.02, f"{hidden} cell(s) with ΔL <= 0 not shown", fontsize=7,
                    transform=ax.transAxes)  # fmt: skip
    handles = [Line2D([], [], color=color[s], lw=1.5, label=f"N={_si(s)}") for s in sizes]
    handles += [
        Line2D([], [], ls="none", marker=marker[k], color="0.3", label=f"k={k}") for k in ks
    ]
    handles.append(
        Line2D([], [], ls="none", marker="o", mfc="none", color="0.3", label="not fitted")
    )
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.suptitle("quantization-induced loss vs training tokens (lines: fitted law)", fontsize=10)
    return fig


def _si(x: float) -> str:
    """1.6e6 -> '1.6M' (legend labels)."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _save_atomic(fig: Figure, out: Path, name: str, formats: Sequence[str] = FORMATS) -> list[Path]:
    """``name.<ext>`` for each format, each written atomically (a reader never sees half)."""
    paths = []
    for ext in formats:
        with atomic_output(out / f"{name}.{ext}") as fh:
            fig.savefig(fh, format=ext, dpi=150)
        paths.append(out / f"{name}.{ext}")
    return paths


def write_outputs(report: FitReport, out: str | Path) -> list[Path]:
    """``fit.json``, ``fit.md``, ``fit.png``, ``fit.pdf`` into ``out`` (atomic writes); the
    figures are those registered on the ``fit`` path (:mod:`analysis.figure_registry`):
    ``fit``, then any plugin's."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        atomic_write(out / "fit.json", json.dumps(report.to_dict(), indent=2, ensure_ascii=False)
                     + "\n"),
        atomic_write(out / "fit.md", markdown(report)),
    ]  # fmt: skip
    for spec in registered_figures("fit"):
        if spec.skip_reason is None or spec.skip_reason(report) is None:
            paths += save_registered(spec, report, out, _save_atomic) or []
    return paths


# --------------------------------------------------------------------------------------------
# command


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="kbit-fit", description=" ".join(fit_main.__doc__.split()))
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="the result store")
    p.add_argument("--sweep", action="append", help="only this sweep (repeatable)")
    p.add_argument("--out", default="fit", help="output folder (default: ./fit)")
    p.add_argument("--task", default=DEFAULT_TASK, help="perplexity task with per-window nll "
                   f"(default {DEFAULT_TASK})")  # fmt: skip
    p.add_argument(
        "--method", default=DEFAULT_METHOD, help="quantization method (default blockwise)"
    )
    p.add_argument("--block-size", type=int, default=None,
                   help="block size (default: the most common among the quantized cells)")  # fmt: skip
    p.add_argument("--bits", type=int, nargs="+", default=list(DEFAULT_BITS),
                   help="bit widths to fit (default 3..8)")  # fmt: skip
    p.add_argument("--dtype", action="append", help="data type to fit (repeatable; default all)")
    p.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT,
                   help=f"bootstrap replicates (default {DEFAULT_N_BOOT})")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--level", type=float, default=DEFAULT_LEVEL, help="interval level (0.95)")
    p.add_argument("--min-delta", type=float, default=None,
                   help="also leave out cells with ΔL below this (nats); default: only the "
                   "bootstrap noise floor")  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _option_problem(args: argparse.Namespace) -> str | None:
    if args.n_boot < 20:
        return f"--n-boot {args.n_boot}: must be >= 20 (percentile intervals need replicates)"
    if not 0 < args.level < 1:
        return f"--level {args.level}: must be in (0, 1)"
    if args.block_size is not None and args.block_size < 1:
        return f"--block-size {args.block_size}: must be >= 1"
    bad = [b for b in args.bits if not 1 <= b < 16]
    if bad:
        return f"--bits {bad}: quantized bit widths are 1..15"
    if args.min_delta is not None and not args.min_delta > 0:
        return f"--min-delta {args.min_delta}: must be > 0"
    return None


def fit_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kbit-fit``: fit the precision scaling law of a store; exit 0 ok, 2 when
    an option or the store cannot support the fit (one line saying what is missing)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as err:  # argparse has printed its one-line usage error
        return int(err.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(message)s",
    )
    problem = _option_problem(args)
    if problem:
        return refuse("kbit-fit", problem)
    try:  # the rule every store tool shares (harness.store_cli)
        out = output_dir("--out", args.out)
        root = check_store(args.results_dir, args.sweep)
    except StoreRefusal as err:
        return refuse("kbit-fit", err)
    try:
        load_figure_plugins()  # a plugin's fit figures are registered before they are listed
    except ValueError as err:  # harness.plugins.PluginError: one line naming the plugin
        return refuse("kbit-fit", err)
    results = load_results(root, args.sweep)
    try:
        report = fit_store(results, args.task, args.method, args.block_size, args.bits,
                           args.dtype, args.n_boot, args.seed, args.level, args.min_delta)  # fmt: skip
    except FitInputError as err:
        sys.stderr.write(f"kbit-fit: {err}\n")
        return 2
    written = write_outputs(report, out)
    sys.stdout.write(to_markdown(report.exponents_table()) + "\n")
    sys.stdout.write(to_markdown(_loo_table(report.loo)) + "\n")
    sys.stdout.write(f"wrote {', '.join(p.name for p in written)} to {args.out}\n")
    return 0
