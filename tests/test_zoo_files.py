"""The zoo's files: caches get the umask's permissions; finished folders are installed atomically."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from harness.zoo import build
from harness.zoo.config import TokenizerConfig
from harness.zoo.tokenizer import get_tokenizer, token_stream

TEXTS = ["The quick brown fox jumps over the lazy dog.\n\nIt runs away."] * 20


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664)])
def test_tokenizer_and_stream_caches_follow_the_umask(tmp_path: Path, umask: int, mode: int):
    old = os.umask(umask)
    try:
        tok = get_tokenizer(TokenizerConfig(vocab_size=300), TEXTS, "k", tmp_path, 64)
        stream = token_stream(tok, TEXTS, "k", tmp_path)
    finally:
        os.umask(old)
    files = [tmp_path / "tokenizers" / "k.json", tmp_path / "data" / "k.npy"]
    assert [stat.S_IMODE(p.stat().st_mode) for p in files] == [mode, mode]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["k.json", "k.npy"]
    # the caches read back to what was built
    again = get_tokenizer(TokenizerConfig(vocab_size=300), [], "k", tmp_path, 64)
    assert again.get_vocab() == tok.get_vocab()
    assert np.array_equal(token_stream(again, TEXTS, "k", tmp_path), stream)


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights").write_text(text)
    return path


def test_install_folder_replaces_a_stale_build(tmp_path: Path):
    final = _folder(tmp_path / "s", "old")
    build._install_folder(_folder(tmp_path / ".tmp-s", "new"), final)
    assert (final / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # nothing left aside


def test_install_folder_into_an_empty_place(tmp_path: Path):
    build._install_folder(_folder(tmp_path / ".tmp-s", "new"), tmp_path / "s")
    assert (tmp_path / "s" / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_install_folder_keeps_a_concurrent_build(tmp_path: Path, monkeypatch):
    """Another build installs the same folder between our two renames: its folder stays."""
    final = _folder(tmp_path / "s", "stale")
    real = os.replace

    def racing_replace(src, dst):
        real(src, dst)
        if Path(dst).name.startswith(".old-"):  # the other build wins the race right here
            _folder(final, "theirs")

    monkeypatch.setattr(build.os, "replace", racing_replace)
    build._install_folder(_folder(tmp_path / ".tmp-s", "ours"), final)
    assert (final / "weights").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
