"""Per-family data-type options: a field that does not belong to the family is refused.

``DtypeSpec`` is one flat class (a cell id hashes every field), so before this change
``dtype=int dtype.exponent_bits=3`` was accepted, ignored by the int family, and made a new cell
id. Each family now declares the fields it reads; a field outside them, set away from its
default, is refused in one line naming the field, the value and the family's allowed fields:
in a YAML entry, as an override, and by ``kbit-run`` before any model loads.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.dtypes import (
    COMMON_FIELDS,
    DtypeSpec,
    check,
    clear_cache,
    codebook,
    entries,
    families,
    foreign_fields,
    get_spec,
    legal_bits,
)

BIN = Path(sys.executable).parent

# What each family's function reads, written down from the family modules' docstrings and
# code (not from the registry): the reference the declared options are compared against.
READS = {
    "int": {"asymmetric"},
    "float": {"exponent_bits", "mantissa_bits", "bias", "special"},
    "dynamic": {"signed"},
    "normal": {"offset"},
    "quantile": {"estimator", "sample_size", "seed"},
    "table": {"values", "values_file", "has_zero"},
}
FLAT = {f.name for f in dataclasses.fields(DtypeSpec)}


def test_each_builtin_family_declares_exactly_the_fields_it_reads():
    fams = families()
    for name, reads in READS.items():
        assert set(fams[name].options) == reads, name
        assert fams[name].allowed_fields == COMMON_FIELDS + fams[name].options


def test_every_flat_field_belongs_to_some_family():
    """No field of the flat class is read by nobody (it would be settable only to be refused)."""
    owned = set(COMMON_FIELDS).union(*READS.values())
    assert owned >= FLAT


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("int", "exponent_bits", 3),
        ("int", "offset", 0.9),
        ("float", "asymmetric", True),
        ("nf4", "estimator", "approx"),
        ("quantile", "signed", False),
        ("dynamic", "special", "fn"),
        ("int_asym", "seed", 3),
    ],
)
def test_a_foreign_override_is_refused_in_one_line_with_the_allowed_fields(name, field, value):
    family = entries()[name].family
    with pytest.raises(ValueError) as err:
        check(name, legal_bits(name)[0], **{field: value})
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{field}=" in msg and repr(value) in msg and f"family {family!r}" in msg
    allowed = msg.split("allowed fields of", 1)[1]
    for own in ("name", "family", "bits", *sorted(READS[family])):
        assert own in allowed
    assert field not in allowed


def test_an_own_override_still_works_and_changes_the_codebook():
    assert len(codebook("int", 4, asymmetric=True)) == 16  # 2^k levels
    assert len(codebook("int", 4)) == 15  # 2^k - 1 levels
    e3 = codebook("float", 6, exponent_bits=3)
    e2 = codebook("float", 6, exponent_bits=2)
    assert not bool((e3.numel() == e2.numel()) and (e3 == e2).all())


def test_a_foreign_field_at_its_default_is_accepted():
    """``signed: true`` is the default: the int family's codebook is the same either way, and
    the composed node (and so the cell id) is unchanged, so nothing is refused."""
    assert foreign_fields(get_spec("int", signed=True)) == []
    assert (codebook("int", 4, signed=True) == codebook("int", 4)).all()


def test_every_shipped_entry_sets_only_its_family_fields():
    for name, spec in entries().items():
        assert foreign_fields(spec) == [], name


@pytest.fixture
def dtype_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KBIT_DTYPE_DIR", str(tmp_path))
    clear_cache()
    yield tmp_path
    monkeypatch.delenv("KBIT_DTYPE_DIR")
    clear_cache()


def test_a_yaml_entry_with_a_foreign_field_is_refused_when_used(dtype_dir):
    (dtype_dir / "int_e3.yaml").write_text("name: int_e3\nfamily: int\nexponent_bits: 3\n")
    with pytest.raises(ValueError) as err:
        check("int_e3", 4)
    msg = str(err.value)
    assert "int_e3.yaml" in msg and "exponent_bits=3" in msg
    assert "allowed fields of 'int': name, family, bits, asymmetric" in msg
    assert "int" in entries()  # one bad file spoils only its own name


def test_a_yaml_entry_with_a_typo_still_names_the_closest_field(dtype_dir):
    (dtype_dir / "typo.yaml").write_text("name: typo\nfamily: float\nexponent_bitz: 3\n")
    with pytest.raises(ValueError, match=r"exponent_bitz.*did you mean 'exponent_bits'"):
        check("typo", 4)


def test_kbit_run_refuses_a_foreign_field_before_loading(tmp_path):
    """The issue's example, end to end: one line, exit 2, nothing written (the model does not
    exist, so a run that got as far as loading would say so instead)."""
    results = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [str(BIN / "kbit-run"), f"model={tmp_path / 'no-model'}", "dtype=int", "bits=4",
         "dtype.exponent_bits=3", f"results_dir={results}", "device=cpu"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kbit-run: ")
    assert "exponent_bits=3" in lines[0] and "allowed fields of 'int'" in lines[0]
    assert not results.exists() or not any(results.rglob("*"))
