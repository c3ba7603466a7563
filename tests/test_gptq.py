# ruff: noqa: F811  (the session fixture nano_zoo is imported, then requested by name)
"""GPTQ with kbit rounding: equal to fake_quantize without error feedback, equal to the
paper's plain algorithm with it, and better than round-to-nearest on a trained model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_models_tiny import tiny_model
from zoo_fixtures import nano_zoo  # noqa: F401  (session fixture)

from harness.dtypes import codebook, is_data_dependent
from harness.models.loading import linear_weight, quantizable_modules
from harness.quantize import fake_quantize, quantize_blockwise
from harness.quantize.blockwise import normalised_values
from harness.quantize.gptq import (
    calibration_ids,
    gptq_quantize_model,
    gptq_quantize_weight,
    relative_error,
)

log = logging.getLogger(__name__)

FAMILIES = ["int", "float", "dynamic", "normal", "quantile"]


def correlated_hessian(n_in: int, n_tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """2/n X^T X of random inputs with correlated features and uneven energy (as in LLMs)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=gen) / n_in**0.5 + torch.eye(n_in)
    energy = torch.rand(n_in, generator=gen) * 3 + 0.1
    x = torch.randn(n_tokens, n_in, generator=gen) @ mix * energy
    return 2 / n_tokens * x.T @ x


# ----------------------------------------------------------------------------- reference
def reference_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, dtype: str, bits: int, block_size: int,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The paper's algorithm, slowly and obviously, in float64: (quantized weight, codes).

    Column by column, no lazy batches; H^-1 is updated by the OBS elimination formula
    (H^-1 <- H^-1 - H^-1[:, j] H^-1[j, :] / H^-1[j, j]) instead of a Cholesky factor.
    A group's scale (absmax rounded to fp16, via kbit's quantize_blockwise) is taken from the
    current weights when its first column comes; rounding is argmin |y - code| (ties: the
    first, i.e. lower, code). Needs block_size | in_features.
    """
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    fitted = normalised_values(w.float(), block_size) if is_data_dependent(dtype) else None
    code = codebook(dtype, bits, fitted).to(torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    codes = torch.zeros(w.shape, dtype=torch.long)
    scale = torch.zeros(w.shape[0], dtype=torch.float64)
    for j in range(w.shape[1]):
        if j % block_size == 0:
            group = w[:, j : j + block_size].float()
            scale = quantize_blockwise(group.reshape(-1), code.float(), block_size).scales
            scale = scale.to(torch.float64)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        y = (w[:, j] / safe).clamp(-1, 1)
        codes[:, j] = (y.unsqueeze(1) - code.unsqueeze(0)).abs().argmin(dim=1)
        q[:, j] = code[codes[:, j]] * scale
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j + 1 :] -= err.unsqueeze(1) * hinv[j, j + 1 :].unsqueeze(0)
        hinv -= hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return q, codes


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("block_size", [32, 64, None])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", FAMILIES)
def test_identity_hessian_equals_fake_quantize(dtype: str, bits: int, block_size) -> None:
    """No error feedback (H = I): GPTQ's rounding must be kbit's, bit for bit."""
    w = torch.randn(48, 192, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[3, 7] = 0.9  # an outlier, so block scales differ a lot
    q = gptq_quantize_weight(w, torch.eye(192), dtype=dtype, bits=bits, block_size=block_size)
    assert torch.equal(q, fake_quantize(w, dtype, bits, block_size))


@pytest.mark.parametrize(
    ("shape", "block_size", "scale_format", "centering", "act_order"),
    [
        ((40, 96), 64, "fp16", True, False),  # blocks wrap around row ends
        ((7, 32), 64, "bf16", False, False),  # blocks span two rows (tiny models)
        ((30, 100), 48, "e8m0", False, False),  # tail block
        ((64, 128), 32, "fp32", True, True),  # act_order: static groups
        ((64, 128), None, "fp16", True, False),
    ],
)
def test_identity_hessian_matches_any_layout(shape, block_size, scale_format, centering, act_order):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.05 + 0.01
    kw = dict(scale_format=scale_format, centering=centering)
    for dtype in ("int", "quantile"):
        q = gptq_quantize_weight(
            w, torch.eye(shape[1]), dtype=dtype, bits=4, block_size=block_size,
            act_order=act_order, lazy_cols=40, **kw,
        )  # fmt: skip
        assert torch.equal(q, fake_quantize(w, dtype, 4, block_size, **kw)), dtype


@pytest.mark.parametrize(
    ("dtype", "bits", "block_size", "lazy_cols"),
    [
        ("int", 4, 128, 128),
        ("quantile", 3, 128, 128),
        ("int", 3, 64, 48),  # groups start mid-batch and end in the next batch
    ],
)
def test_matches_reference_gptq(dtype: str, bits: int, block_size: int, lazy_cols: int) -> None:
    """kbit's GPTQ (float32, lazy batches, Cholesky) against the plain float64 algorithm.

    Tolerance: >= 99.9% of elements bit-identical (the float32 cast of the reference's
    code * scale, which is exact in float64) and the rest at most about one code step apart.
    Why not 100%: float32 vs float64 and another summation order move a weight by ~1e-6
    relative before rounding; one landing within that of a decision threshold takes the
    other code, and its different error then feeds the later columns of its row. Measured
    on this machine: 100% identical in all three cases (max |diff| = 0 in float32).
    """
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=gen) * 0.02
    h = correlated_hessian(512)
    q = gptq_quantize_weight(
        w, h, dtype=dtype, bits=bits, block_size=block_size, lazy_cols=lazy_cols
    )
    ref, _ = reference_gptq(w, h, dtype, bits, block_size)
    same = (q == ref.float()).float().mean().item()  # code * scale: exact in float64
    scale = w.abs().amax(dim=1, keepdim=True).to(torch.float64)
    worst = ((q.to(torch.float64) - ref).abs() / scale).max().item()
    log.warning(
        "reference %s%d B=%d lazy=%d: identical %.5f, max diff / row absmax %.3g",
        dtype, bits, block_size, lazy_cols, same, worst,
    )  # fmt: skip
    assert same >= 0.999
    fitted = normalised_values(w, block_size) if dtype == "quantile" else None
    code = codebook(dtype, bits, fitted)
    assert worst <= float((code[1:] - code[:-1]).max()) * 1.5 + 1e-6
    assert relative_error(w, q, h) == pytest.approx(relative_error(w, ref.float(), h), rel=1e-3)


def test_gptq_beats_rtn_with_correlated_inputs() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(128, 256, generator=gen) * 0.02
    h = correlated_hessian(256)
    rtn = relative_error(w, fake_quantize(w, "int", 3, 64), h)
    for act_order in (False, True):
        q = gptq_quantize_weight(w, h, dtype="int", bits=3, block_size=64, act_order=act_order)
        assert relative_error(w, q, h) < 0.9 * rtn, act_order  # measured 0.85 and 0.64 x RTN


def test_dead_columns_are_zeroed() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    h = correlated_hessian(64)
    h[5, :] = 0
    h[:, 5] = 0
    q = gptq_quantize_weight(w, h, dtype="int", bits=4, block_size=32)
    assert torch.all(q[:, 5] == 0)
    assert torch.isfinite(q).all()


def test_bad_inputs_are_refused() -> None:
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize_weight(w, torch.eye(8), dtype="int", bits=4, block_size=16)
    with pytest.raises(ValueError, match="element-grid"):
        gptq_quantize_weight(w, torch.eye(16), dtype="e2m1", bits=4, block_size=16,
                             scale_format="nvfp4")  # fmt: skip
    with pytest.raises(ValueError, match="lazy_cols"):
        gptq_quantize_weight(w, torch.eye(16), dtype="int", bits=4, block_size=16, lazy_cols=0)


def test_calibration_ids_windows_are_seeded_slices() -> None:
    ids = torch.arange(1000)
    a = calibration_ids(ids, None, 8, 64, seed=0)
    assert a.shape == (8, 64)
    assert torch.equal(a, calibration_ids(ids, None, 8, 64, seed=0))
    assert not torch.equal(a, calibration_ids(ids, None, 8, 64, seed=1))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="need at least"):
        calibration_ids(torch.arange(64), None, 1, 64, seed=0)


def test_calibration_ids_tokenizes_text() -> None:
    _, tok = tiny_model("gpt_neox")
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = calibration_ids(tok, text, 4, 16, seed=0)
    full = torch.tensor(tok(text).input_ids)
    for row in ids:
        starts = [i for i in range(full.numel() - 15) if torch.equal(full[i : i + 16], row)]
        assert starts
    with pytest.raises(ValueError, match="tokens"):
        calibration_ids(tok, "short", 1, 16, seed=0)


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2", "opt", "llama"])
def test_tiny_architectures_run(family: str) -> None:
    model, _ = tiny_model(family)
    modules = quantizable_modules(model)
    before = {n: linear_weight(m).detach().clone() for n, m in modules.items()}
    calib = torch.randint(
        0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)
    )
    errors = gptq_quantize_model(model, modules, calib, dtype="int", bits=4, block_size=64)
    assert list(errors) == list(modules)
    for name, module in modules.items():
        assert 0 < errors[name] < 0.5, (name, errors[name])
        after = linear_weight(module)
        assert not torch.equal(after, before[name]), name
        # written in the right layout (a transposed square Conv1D write would be ~1.4 off)
        assert torch.linalg.norm(after - before[name]) < 0.3 * torch.linalg.norm(before[name])
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()


# ----------------------------------------------------------------------------- trained model
def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(
        folder
    )


def _training_text(folder: Path, chars: int = 200_000) -> str:
    """Text from a *training* document of the zoo's corpus: calibrating on the held-out text
    that perplexity is measured on would flatter GPTQ."""
    import json

    from harness.zoo.corpus import normalize

    meta = json.loads((folder / "kbit_zoo.json").read_text(encoding="utf-8"))["corpus"]
    held = set(meta["heldout"])
    files = sorted(p for p in Path(meta["source"]).glob("*.txt") if p.name not in held)
    return normalize(files[0].read_text(encoding="utf-8", errors="replace"))[:chars]


def _calibration(folder: Path, tok, n: int = 16) -> torch.Tensor:
    """n windows of the model's full context (64 tokens for nano) from training text."""
    seqlen = json_config(folder)["max_position_embeddings"]
    return calibration_ids(tok, _training_text(folder), n, seqlen, seed=0)


def json_config(folder: Path) -> dict:
    import json

    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


@torch.no_grad()
def _unquantized_hessians(model, modules, calib) -> dict[str, torch.Tensor]:
    from harness.quantize.gptq import HessianAccumulator

    accs = {
        n: HessianAccumulator(linear_weight(m).shape[1], m.weight.device)
        for n, m in modules.items()
    }
    hooks = [
        m.register_forward_hook(lambda _m, i, _o, a=accs[n]: a.add(i[0]))
        for n, m in modules.items()
    ]
    for row in calib:
        model(row.unsqueeze(0))
    for hook in hooks:
        hook.remove()
    return {n: a.h for n, a in accs.items()}


@pytest.mark.slow  # the nano_zoo fixture trains 3 models (~20-60 s) unless KBIT_ZOO_DIR has them
def test_gptq_reconstruction_beats_rtn_on_trained_model(nano_zoo) -> None:
    """Per linear of a trained nano model, same H for both: GPTQ's ||WX - QX|| < RTN's."""
    folder = nano_zoo["l2d64"]
    model, tok = _load(folder)
    modules = quantizable_modules(model)
    hessians = _unquantized_hessians(model, modules, _calibration(folder, tok))
    for dtype in FAMILIES:
        for bits in (3, 4):
            g_tot = r_tot = 0.0
            for name, module in modules.items():
                w = linear_weight(module).detach().float()
                h = hessians[name]
                g = relative_error(
                    w, gptq_quantize_weight(w, h, dtype=dtype, bits=bits, block_size=64), h
                )
                r = relative_error(w, fake_quantize(w, dtype, bits, 64), h)
                assert g < r, (dtype, bits, name, g, r)
                g_tot, r_tot = g_tot + g, r_tot + r
            n = len(modules)
            log.warning(
                "%s%d mean rel. error: GPTQ %.4f RTN %.4f", dtype, bits, g_tot / n, r_tot / n
            )


@pytest.mark.slow  # the nano_zoo fixture trains 3 models (~20-60 s) unless KBIT_ZOO_DIR has them
def test_gptq_perplexity_beats_rtn_at_3_bits(nano_zoo) -> None:
    """Held-out perplexity of the largest nano model, int3 block 64: GPTQ < RTN.

    Measured: fp32 118.383, RTN 118.520, GPTQ 118.474 (128 x 64-token training windows);
    this undertrained model loses little to 3 bits, so the margin is small but seeded.
    """
    from harness.evaluate import perplexity
    from harness.quantize import quantize_model

    folder = nano_zoo["l2d64"]
    text = (folder / "kbit_eval" / "heldout.txt").read_text(encoding="utf-8")
    model, tok = _load(folder)
    quantize_model(model, "int", 3, 64, progress=False)
    rtn = perplexity(model, tok, text)
    model, tok = _load(folder)
    calib = _calibration(folder, tok, 128)
    gptq_quantize_model(
        model, quantizable_modules(model), calib, dtype="int", bits=3, block_size=64
    )
    gptq = perplexity(model, tok, text)
    log.warning("int3 b64 held-out perplexity: GPTQ %.3f RTN %.3f", gptq, rtn)
    assert gptq < rtn
