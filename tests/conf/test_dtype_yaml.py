"""Every conf/dtype entry composes through Hydra against the DtypeSpec schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from harness.config.schema import register_schema
from harness.dtypes import entries, get_family, legal_bits
from harness.dtypes.spec import DtypeSpec

CONF = Path(__file__).resolve().parents[2] / "conf"
NAMES = sorted(p.stem for p in (CONF / "dtype").glob("*.yaml"))


@pytest.fixture
def hydra_compose():
    register_schema()  # the cell schema conf/config.yaml starts from, and register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield compose
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("name", NAMES)
def test_entry_composes_and_matches_the_library_view(hydra_compose, name):
    cfg = hydra_compose("config", overrides=[f"dtype={name}", "model=x"])
    # every entry composes as its family's schema: DtypeSpec, or TableSpec for family: table
    assert OmegaConf.get_type(cfg.dtype) is get_family(entries()[name].family).schema
    assert issubclass(get_family(entries()[name].family).schema, DtypeSpec)
    spec = OmegaConf.to_object(cfg.dtype)
    assert spec == entries()[name]
    assert legal_bits(name), name


@pytest.mark.parametrize(
    "override", ["dtype.exponent_bitz=3", "dtype.bits=four", "dtype.estimator=median"]
)
def test_schema_rejects_unknown_keys_and_wrong_types(hydra_compose, override):
    with pytest.raises(Exception, match=r"exponent_bitz|four|median"):
        hydra_compose("config", overrides=["dtype=float", "model=x", override])


def test_default_entry_is_int(hydra_compose):
    assert hydra_compose("config", overrides=["model=x"]).dtype.name == "int"


@pytest.mark.parametrize(
    ("body", "match"), [("bitz: 4", "bitz"), ("bits: four", "four"), ("signed: maybe", "maybe")]
)
def test_typo_in_a_yaml_entry_fails_at_compose(tmp_path, body, match):
    (tmp_path / "dtype").mkdir()
    (tmp_path / "config.yaml").write_text("defaults:\n  - dtype: bad\n  - _self_\n")
    (tmp_path / "dtype" / "bad.yaml").write_text(
        f"defaults:\n  - dtype_schema\n  - _self_\nname: bad\nfamily: int\n{body}\n"
    )
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with (
            initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"),
            pytest.raises(Exception, match=match),
        ):
            compose("config")
    finally:
        GlobalHydra.instance().clear()


USER_ENTRY = "defaults:\n  - dtype_schema\n  - _self_\nname: {name}\nfamily: float\nbits: 6\nexponent_bits: 3\n"


@pytest.fixture
def user_dtype_dir(tmp_path, monkeypatch):
    """A $KBIT_DTYPE_DIR with one good entry and a bad sibling."""
    (tmp_path / "e3m2_user.yaml").write_text(USER_ENTRY.format(name="e3m2_user"))
    (tmp_path / "broken.yaml").write_text("name: broken\nfamily: int\nbitz: 4\n")
    monkeypatch.setenv("KBIT_DTYPE_DIR", str(tmp_path))
    yield tmp_path
    monkeypatch.delenv("KBIT_DTYPE_DIR")
    register_schema()  # forget the user entries again


def test_user_entry_composes_through_hydra(user_dtype_dir, hydra_compose, caplog):
    cfg = hydra_compose("config", overrides=["dtype=e3m2_user", "bits=6", "model=x"])
    assert OmegaConf.get_type(cfg.dtype) is DtypeSpec
    spec = OmegaConf.to_object(cfg.dtype)
    assert spec == entries()["e3m2_user"]  # Hydra and codebook() read the same entry
    assert legal_bits("e3m2_user") == [6]
    # the bad sibling blocks nothing, but is named at registration
    assert hydra_compose("config", overrides=["dtype=nf4", "model=x"]).dtype.name == "nf4"


def test_bad_user_entry_composes_and_fails_when_used(user_dtype_dir, caplog):
    """Registration only notes a bad entry (debug): an unrelated run stays quiet, and a run
    that names it gets the entry's own problem as its one line (tests/test_refused_inputs)."""
    from harness.dtypes import get_spec

    with caplog.at_level("DEBUG", logger="harness.dtypes"):
        register_schema()
    assert "broken.yaml: field='bitz' is unknown" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["dtype=broken", "model=x"])
    GlobalHydra.instance().clear()
    with pytest.raises(ValueError, match=r"broken\.yaml: field='bitz' is unknown"):
        get_spec(cfg.dtype.name)


def test_removed_user_entry_is_forgotten(user_dtype_dir, monkeypatch):
    register_schema()
    monkeypatch.setenv("KBIT_DTYPE_DIR", str(user_dtype_dir / "elsewhere"))
    (user_dtype_dir / "elsewhere").mkdir()
    register_schema()
    GlobalHydra.instance().clear()
    with (
        initialize_config_dir(config_dir=str(CONF), version_base="1.3"),
        pytest.raises(Exception, match="e3m2_user"),
    ):
        compose("config", overrides=["dtype=e3m2_user", "model=x"])
    GlobalHydra.instance().clear()
