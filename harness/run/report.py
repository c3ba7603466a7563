"""The short results table a cell or a sweep ends with (lm-eval style, plain text on stdout).

Why: a researcher who runs ``kbit-run`` wants to see the numbers the cell measured without
opening its parquet file. The table is made from the cell files themselves (never from values
kept in memory), so what it shows is exactly what the store holds.

Two shapes, chosen by :func:`results_table`:

* **long**: a row per (cell, task, metric): task, metric, value, stderr, n (examples for a
  zero-shot task, predicted tokens for a perplexity set), status, and the quantization
  columns (bits, dtype, method, block_size) -- with one cell those go in a header line, with
  several only those that vary between the cells are columns. A failed row shows its first
  error line; each cell's file path is printed under its rows.
* **compact**: a line per cell with its key measures (the ppl of its first perplexity set and
  ``zeroshot_mean``), when the long table would not fit ``max_lines`` (a sweep). At most
  ``max_lines`` lines, then ``... N more cells; kbit-status / kbit-plot show them all``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from harness.records import MEAN_ZEROSHOT_TASK, STATUS_OK, read_cell

__all__ = ["QUANT_COLUMNS", "cell_summary", "print_results", "read_cells_frame", "results_table"]

QUANT_COLUMNS = ("model", "bits", "dtype", "method", "block_size")
MAX_LINES = 40
_READ_COLUMNS = ("cell_id", "sweep", "model", "bits", "dtype", "dtype_overrides", "method",
                 "block_size", "task", "metric", "value", "stderr", "n_samples", "status",
                 "error")  # fmt: skip
_ERROR_CHARS = 160
_MORE = "`kbit-status RESULTS_DIR` and `kbit-plot` show them all"


def read_cells_frame(paths: Iterable[str | Path]) -> pd.DataFrame:
    """The rows of the given cell files as a DataFrame (plus a ``path`` column), in order.

    A missing or unreadable file is left out (a sweep's table shows what exists; the
    sweep's summary line counts the cells without a record). Only the columns a table needs
    are read (no per-example values).
    """
    frames = []
    for path in paths:
        try:
            table = read_cell(path).select(list(_READ_COLUMNS))
        except Exception:  # no file or not a cell file: nothing to show
            continue
        frame = table.to_pandas()
        frame["path"] = str(path)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*_READ_COLUMNS, "path"])
    return pd.concat(frames, ignore_index=True)


def _number(value: object, metric: object = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    value = float(value)  # type: ignore[arg-type]
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if metric == "ppl" and abs(value) >= 1e6:
        return f"{value:.4g}"
    return f"{value:.4f}" if metric != "ppl" else f"{value:.3f}"


def _plain(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quant_value(row: pd.Series, column: str) -> str:
    if column == "dtype":
        extra = row.get("dtype_overrides")
        dtype = _plain(row.get("dtype"))
        return dtype if extra in (None, "", "{}") else f"{dtype}{extra}"
    if column == "block_size" and row.get("method") == "none":
        return "-"
    return _plain(row.get(column))


def _error_line(error: object) -> str:
    text = "" if error is None else str(error).strip()
    line = (text.splitlines() or [""])[0]
    return line if len(line) <= _ERROR_CHARS else line[: _ERROR_CHARS - 3] + "..."


def _align(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                 enumerate(zip(r, widths, strict=True))]  # fmt: skip
        out.append("  ".join(cells).rstrip())
    return out


def _varying(frame: pd.DataFrame) -> list[str]:
    """The quantization columns whose value differs between the cells."""
    cells = frame.drop_duplicates("cell_id")
    return [c for c in QUANT_COLUMNS
            if cells.apply(lambda r, c=c: _quant_value(r, c), axis=1).nunique() > 1]  # fmt: skip


def _header(row: pd.Series, columns: Iterable[str]) -> str:
    return "  ".join(f"{c}={_quant_value(row, c)}" for c in columns)


def cell_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: its quantization columns, status, the ppl of its first perplexity
    set (column ``<set> ppl``) and ``zeroshot_mean`` (when measured), its first error line
    and its file. Cells in the order they first appear."""
    rows = []
    for cid, cell in frame.groupby("cell_id", sort=False):
        first = cell.iloc[0]
        ok = cell[cell["status"] == STATUS_OK]
        row = {"cell_id": cid, **{c: _quant_value(first, c) for c in QUANT_COLUMNS}}
        row["status"] = STATUS_OK if (cell["status"] == STATUS_OK).all() else "failed"
        ppl = ok[ok["metric"] == "ppl"]
        if not ppl.empty:
            row[f"{ppl.iloc[0]['task']} ppl"] = ppl.iloc[0]["value"]
        mean = ok[(ok["task"] == MEAN_ZEROSHOT_TASK) & (ok["metric"] == "acc")]
        if not mean.empty:
            row[MEAN_ZEROSHOT_TASK] = mean.iloc[0]["value"]
        errors = [e for e in cell["error"] if isinstance(e, str) and e.strip()]
        row["error"] = _error_line(errors[0]) if errors else ""
        row["path"] = first.get("path", "")
        rows.append(row)
    return pd.DataFrame(rows)


def _long_table(frame: pd.DataFrame) -> list[str]:
    cells = list(dict.fromkeys(frame["cell_id"]))
    varying = _varying(frame) if len(cells) > 1 else []
    head = ["cell"] * (len(cells) > 1) + varying + ["task", "metric", "value", "stderr", "n",
                                                    "status"]  # fmt: skip
    right = {head.index(c) for c in ("value", "stderr", "n")}
    lines: list[str] = []
    if len(cells) == 1:
        first = frame.iloc[0]
        lines.append(f"cell {cells[0]}  {_header(first, QUANT_COLUMNS)}")
    else:
        fixed = [c for c in QUANT_COLUMNS if c not in varying]
        if fixed:
            lines.append(f"{len(cells)} cells, all with {_header(frame.iloc[0], fixed)}")
    rows = [head]
    notes: list[str] = []
    for cid in cells:
        cell = frame[frame["cell_id"] == cid]
        for _, r in cell.iterrows():
            status = str(r["status"])
            if status != STATUS_OK and isinstance(r.get("error"), str):
                status = f"{status}: {_error_line(r['error'])}"
            row = [str(cid)] * (len(cells) > 1) + [_quant_value(r, c) for c in varying]
            row += [_plain(r["task"]), _plain(r["metric"]), _number(r["value"], r["metric"]),
                    _number(r["stderr"]), _plain(r["n_samples"]), status]  # fmt: skip
            rows.append(row)
        notes.append(f"{cid}: {cell.iloc[0].get('path', '')}")
    lines += _align(rows, right)
    if len(cells) == 1:
        lines.append(f"file: {frame.iloc[0].get('path', '')}")
    else:
        lines += ["files:", *(f"  {n}" for n in notes)]
    return lines


def _compact_table(frame: pd.DataFrame, max_lines: int) -> list[str]:
    summary = cell_summary(frame)
    varying = _varying(frame)
    fixed = [c for c in QUANT_COLUMNS if c not in varying]
    measures = [c for c in summary.columns if c.endswith(" ppl")][:1]
    measures += [MEAN_ZEROSHOT_TASK] if MEAN_ZEROSHOT_TASK in summary.columns else []
    head = ["cell", *varying, *measures, "status"]
    right = {head.index(m) for m in measures}
    rows = [head]
    shown = summary.iloc[:max_lines]
    for _, s in shown.iterrows():
        row = [str(s["cell_id"]), *(str(s[c]) for c in varying)]
        row += [_number(s.get(m), "ppl" if m.endswith(" ppl") else "acc") for m in measures]
        row.append(s["status"] if not s["error"] else f"{s['status']}: {s['error']}")
        rows.append(row)
    lines = [f"{len(summary)} cells" + (f", all with {_header(frame.iloc[0], fixed)}"
                                        if fixed else "")]  # fmt: skip
    lines += _align(rows, right)
    if len(summary) > max_lines:
        lines.append(f"... {len(summary) - max_lines} more cells; {_MORE}")
    folders = sorted({str(Path(p).parent) for p in summary["path"] if p})
    if folders:
        lines.append("files: " + ", ".join(f"{f}/<cell>.parquet" for f in folders))
    return lines


def results_table(
    frame: pd.DataFrame, max_lines: int = MAX_LINES, compact: bool | None = None
) -> str:
    """The results of the cells in ``frame`` (rows as :func:`read_cells_frame` gives them) as
    plain text, lm-eval style; see the module docstring for the two shapes.

    ``compact=None`` picks the long table when it fits ``max_lines`` rows, else the compact
    one. Returns "" for an empty frame.
    """
    if frame.empty:
        return ""
    if compact is None:
        compact = len(frame) > max_lines
    lines = _compact_table(frame, max_lines) if compact else _long_table(frame)
    return "\n".join(lines)


def print_results(paths: Iterable[str | Path], stream: TextIO | None = None,
                  max_lines: int = MAX_LINES) -> None:  # fmt: skip
    """The results table of the cells in ``paths`` on ``stream`` (default: stdout, the
    results' channel; log lines and progress stay on stderr); nothing when none is readable.

    Past ``max_lines`` cells only the first ``max_lines`` files are read (a line per cell,
    then how many more): a sweep of 20,000 cells does not read 20,000 files to print 40 lines.
    """
    paths = list(paths)
    extra = max(0, len(paths) - max_lines)
    text = results_table(read_cells_frame(paths[:max_lines]), max_lines,
                         compact=True if extra else None)  # fmt: skip
    if text and extra:
        text += f"\n... {extra} more cells; {_MORE}"
    if text:
        out: Any = sys.stdout if stream is None else stream
        out.write(text + "\n")
        out.flush()
