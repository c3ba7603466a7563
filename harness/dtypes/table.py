"""``table``: a lookup-table data type declared in YAML (a published or learned codebook).

An entry lists its values (``values: [...]``) or names a file of them (``values_file:``); they
are normalised by their largest magnitude into [-1, 1], so a table may be written in any unit
(bitsandbytes' FP4 in multiples of 1/16, AF4 already in [-1, 1]). Checked before any work:
finite, distinct, at most 2^k of them, and zero among them unless the entry states
``has_zero: false`` (a table without zero cannot store a zero weight exactly, which is a
choice worth writing down). With ``bits: null`` a table of n values is a k = ceil(log2 n) bit
type only: the same table at a larger k would spend bits on codes it never uses.

A table is a *shared* codebook: one constant for every tensor, like ``nf4``, so it costs no
per-tensor storage in the total model bits (:mod:`harness.bits` counts only data-dependent
codebooks, which are stored with each tensor).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from harness.dtypes.family_registry import register_family
from harness.dtypes.spec import DtypeSpec
from harness.files import user_path

TABLE_OPTIONS = ("values", "values_file", "has_zero")
_NUMBER_SEP = re.compile(r"[\s,\[\]]+")


@dataclass
class TableSpec(DtypeSpec):
    """A :class:`DtypeSpec` with the lookup-table fields (only ``family: table`` reads them)."""

    values: list[float] | None = None  # the table, any unit: normalised by max |v|
    values_file: str | None = None  # or a file of them ($VAR and ~ expanded; YAML list or text)
    has_zero: bool | None = None  # null/true: 0 must be a value; false: states it is not


def read_values_file(value: str) -> list[float]:
    """The numbers of a values file: a YAML/JSON list, or numbers separated by whitespace or
    commas ('#' starts a comment). A ValueError naming ``values_file`` otherwise."""
    path = user_path(value, "values_file")
    if not path.is_file():
        raise ValueError(f"values_file={value!r} is not a file; allowed: a readable file of "
                         "numbers (a YAML/JSON list, or one number per line)")  # fmt: skip
    text = path.read_text()
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        loaded = None
    if isinstance(loaded, list):
        items: list = loaded
    else:
        body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        items = [t for t in _NUMBER_SEP.split(body) if t]
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"values_file={value!r}: {exc}; allowed: numbers only") from exc


def raw_values(spec: DtypeSpec) -> list[float]:
    """The entry's numbers as written (not yet normalised): from ``values`` or ``values_file``."""
    given = getattr(spec, "values", None)
    file = getattr(spec, "values_file", None)
    if (given is None) == (file is None):
        raise ValueError(
            f"dtype {spec.name!r}: values={given!r}, values_file={file!r}; allowed: exactly one "
            "of values (a list of numbers) and values_file (a path)"
        )
    return read_values_file(file) if file is not None else [float(v) for v in given]


def identity_node(node: dict[str, Any]) -> dict[str, Any]:
    """A composed ``dtype`` node as a cell id should hash it: ``values_file`` replaced by
    ``values_sha256``, the digest of the numbers the file holds (as a sorted JSON list of
    floats), so a moved file keeps its cells and an edited one makes new cells. Other nodes
    are returned unchanged (every stored cell keeps its id). For
    ``harness.config.identity.identity_data``; a file that cannot be read is left as it is
    (validation refuses the cell before any id matters)."""
    if node.get("family") != "table" or not node.get("values_file"):
        return node
    try:
        numbers = read_values_file(str(node["values_file"]))
    except ValueError:
        return node
    out = {k: v for k, v in node.items() if k != "values_file"}
    text = json.dumps(sorted(numbers))
    out["values_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return out


def table_bits(n: int) -> int:
    """The k of a table of ``n`` values: the fewest bits that index them (at least 1)."""
    return max(1, math.ceil(math.log2(n)))


def normalised(spec: DtypeSpec) -> torch.Tensor:
    """The validated table in [-1, 1] (float64, sorted): see the module docstring's checks."""
    what = f"dtype {spec.name!r}"
    values = raw_values(spec)
    if len(values) < 2:
        raise ValueError(f"{what}: {len(values)} value(s); allowed: at least 2 values")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: value {bad[0]} is not finite; allowed: finite numbers")
    seen: set[float] = set()
    for v in values:
        if v in seen:  # 0.0 and -0.0 are one value
            raise ValueError(f"{what}: value {v} appears twice; allowed: distinct values")
        seen.add(v)
    has_zero = 0.0 in seen
    stated = getattr(spec, "has_zero", None)
    if stated is False and has_zero:
        raise ValueError(f"{what}: has_zero=false but 0 is one of the values; allowed: "
                         "has_zero: true or null when the table holds 0")  # fmt: skip
    if stated is not False and not has_zero:
        raise ValueError(f"{what}: values have no 0; allowed: add 0, or state has_zero: false "
                         "(then a zero weight is not stored exactly)")  # fmt: skip
    table = torch.tensor(sorted(values), dtype=torch.float64)
    return table / table.abs().max()


def validate_table(spec: DtypeSpec, bits: int) -> None:
    """Every check of :func:`normalised`, plus: at most 2^k values, and with ``bits: null``
    only the k that indexes the table without unused codes."""
    n = normalised(spec).numel()
    if n > 2**bits:
        raise ValueError(f"bits={bits}: dtype {spec.name!r} has {n} values, more than "
                         f"2^{bits}; allowed: bits >= {table_bits(n)}")  # fmt: skip
    if spec.bits is None and bits != table_bits(n):
        raise ValueError(f"bits={bits}: dtype {spec.name!r} is a table of {n} values; "
                         f"allowed: bits={table_bits(n)} (or set bits: in the entry)")  # fmt: skip


@register_family(
    "table",
    bits=range(1, 9),
    validate=validate_table,
    options=TABLE_OPTIONS,
    schema=TableSpec,
)
def table_codebook(spec: DtypeSpec, bits: int, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The entry's own values, normalised to max |v| = 1 (the tensor is not read)."""
    return normalised(spec)
