"""Expand a sweep's grid: ``hydra.sweeper.params`` x each of ``grids`` x the command line.

Refused here, before anything is composed (:class:`harness.sweep.errors.SweepError`, one line):
a value that does not parse, an interval (not a grid), a value ``kbit-run`` would refuse on its
command line, a part with no cells, and a grid above ``hydra.sweeper.max_cells`` (counted from
its dimensions, never by listing it). The cells come out with the model varying slowest, so an
in-process launch reuses each loaded model for all its cells.

Also used by ``kbit-download`` (:mod:`harness.cluster.download`) to list a sweep's models
exactly as the sweeper expands them.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, RangeSweep

from harness.config.overrides import check_overrides
from harness.config.schema import ConfigError
from harness.sweep.errors import SweepError


def product(overrides: Sequence[Override]) -> list[list[str]]:
    """Cartesian product of parsed overrides as ``key=value`` lists, first key slowest.

    Hydra's basic sweeper expands a grid this way (``BasicSweeper.split_arguments`` in
    hydra-core 1.3: a key given twice keeps its first position and its last values; an
    interval is not a grid); written here on the public :class:`Override` API so the
    sweeper does not depend on Hydra's internals.
    """
    dims: OrderedDict[str, list[str]] = OrderedDict()
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            dims[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            dims[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise SweepError(
                f"Sweep not launched (nothing was queued or written): {override.input_line}: an "
                "interval is not a grid; allowed: a list a,b,c, range(...), choice(...) or "
                "glob(...)",
                refused=True,
            )
    return [list(cell) for cell in itertools.product(*dims.values())]


def expand_grid(overrides: Sequence[Override]) -> list[list[str]]:
    """Cartesian product of the overrides, as ``key=value`` lists, model varying slowest.

    Hydra's basic sweeper varies the first-given key slowest; the model may come from the
    command line (after the overlay's params), so it is moved to the front explicitly:
    consecutive cells of one model then share its loaded weights in an in-process launch.
    """
    return expand_grid_order(product(overrides))


def _value_of(cell: Sequence[str], key: str) -> str | None:
    for item in cell:
        k, _, v = item.partition("=")
        if k.lstrip("+~") == key:
            return v
    return None


def expand_grid_order(cells: list[list[str]]) -> list[list[str]]:
    """Stable re-ordering of cells so each model's cells are contiguous (first-seen order)."""
    models: OrderedDict[str, int] = OrderedDict()
    for cell in cells:
        models.setdefault(_value_of(cell, "model") or "", len(models))
    return sorted(cells, key=lambda cell: models[_value_of(cell, "model") or ""])


def expand_union(
    parser: OverridesParser,
    params: dict[str, str],
    grids: Sequence[dict[str, str]] | None,
    arguments: Sequence[str],
    max_cells: int | None = None,
) -> list[list[str]]:
    """The union over ``grids`` of product(params x grid x command line), model slowest.

    Why: a grid of every data type at every bit width contains illegal cells (nf4 exists only
    at 4 bits), and the baselines are one bit width for all types; a union of products says
    exactly what to run. Command-line overrides apply to every part (and win over both).

    Refused (:class:`SweepError`, one line) before anything is expanded: a value that does not
    parse, a grid part with no cells (a swept field with no values), and a grid of more than
    ``max_cells`` cells (counted from its dimensions: a grid of millions is refused at once).
    """
    parts = _grid_parts(parser, params, grids, arguments)
    total = 0
    for where, overrides in parts:
        size, empty = _part_size(overrides)
        if empty:
            origin = "the command line" if empty[0].input_line in arguments else where
            raise SweepError(
                f"Sweep not launched (nothing was queued or written): the grid has no cells: "
                f"{empty[0].input_line} ({origin}) has no values; allowed: at least one value "
                "for every swept field",
                refused=True,
            )
        total += size
    if max_cells is not None and total > max_cells:
        raise SweepError(
            f"Sweep not launched (nothing was queued or written): the grid has {total:,} cells, "
            f"above hydra.sweeper.max_cells={max_cells}; allowed: at most {max_cells:,} cells per "
            "launch: split the sweep (e.g. one launch per model), or raise "
            "hydra.sweeper.max_cells (null: no cap)",
            refused=True,
        )
    cells: list[list[str]] = []
    for _where, overrides in parts:
        cells += expand_grid(overrides)
    return expand_grid_order(cells)


def _grid_parts(
    parser: OverridesParser,
    params: dict[str, str],
    grids: Sequence[dict[str, str]] | None,
    arguments: Sequence[str],
) -> list[tuple[str, list[Override]]]:
    """Each part of the union as parsed overrides, and where it comes from (for messages)."""
    parts: list[tuple[str, list[Override]]] = []
    for i, part in enumerate(grids or [{}]):
        merged = {**params, **{str(k): str(v) for k, v in dict(part).items()}}
        listed = [f"{k}={v}" for k, v in merged.items()]
        where = f"hydra.sweeper.grids[{i}] with params" if grids else "hydra.sweeper.params"
        try:
            overrides = parser.parse_overrides([*listed, *arguments])
        except Exception as err:  # Hydra's override grammar: one line naming the value
            raise SweepError(
                f"Sweep not launched (nothing was queued or written): {where} or the command "
                f"line: {err}",
                refused=True,
            ) from None
        for o in overrides:
            if o.is_sweep_override() and not o.is_discrete_sweep():
                raise SweepError(
                    f"Sweep not launched (nothing was queued or written): {o.input_line}: an "
                    "interval is not a grid; allowed: a list a,b,c, range(...), choice(...) or "
                    "glob(...)",
                    refused=True,
                )
        try:  # the rules kbit-run applies to its command line, for values a sweep file sets
            check_overrides([o.input_line for o in overrides])
        except ConfigError as err:
            raise SweepError(
                f"Sweep not launched (nothing was queued or written): {where}: {err}",
                refused=True,
            ) from None
        parts.append((where if grids or params else "the command line", overrides))
    return parts


def _part_size(overrides: Sequence[Override]) -> tuple[int, list[Override]]:
    """Cells of product(overrides) as Hydra's basic sweeper expands it (a key given twice:
    the last wins), counted without expanding; and the sweeps that have no value."""
    dims: dict[str, tuple[int, Override]] = {}
    for o in overrides:
        dims[o.get_key_element()] = (_values_count(o), o)
    size = math.prod(n for n, _ in dims.values())
    return size, [o for n, o in dims.values() if n == 0]


def _values_count(override: Override) -> int:
    """How many values a (discrete) override sweeps: a range arithmetically (a range of a
    billion values is counted, not listed), anything else by listing it."""
    if not override.is_sweep_override():
        return 1
    value = override.value()
    if isinstance(value, RangeSweep) and not all(
        isinstance(x, int) for x in (value.start, value.stop, value.step)
    ):
        n = math.ceil((value.stop - value.start) / value.step) if value.step else 0
        if n > 1_000_000:  # float steps: listing a million values would stall the check
            return n
    elif isinstance(value, RangeSweep):
        return len(range(int(value.start), int(value.stop), int(value.step or 1)))
    return sum(1 for _ in override.sweep_string_iterator())
