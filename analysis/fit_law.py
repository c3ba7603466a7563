"""The precision scaling law fitted to a result store, with its leave-one-out self-check.

The law (Ouyang et al. 2024, *Low-Bit Quantization Favors Undertrained LLMs*, "QiD") is

    ΔL(N, D, k) = A · D^β / (N^α · k^γ)

where ΔL is the quantization-induced loss increase: held-out NLL (nats/token) of a k-bit cell
minus the NLL of the 16-bit baseline of the same checkpoint, N the non-embedding parameters
and D the tokens the checkpoint was trained on (``train_tokens``). It is fitted by least
squares in log space, ``log ΔL = log A + β log D − α log N − γ log k``, on the cells whose ΔL
is above the noise floor.

Uncertainty comes from the paired window bootstrap of analysis/fit_data.py (measurement
noise) plus the law's own misfit; the leave-one-out check predicts each left-out model size
(and the largest D) from the rest. analysis/fit_optimal.py finds the bit-optimal k,
analysis/fit.py holds the command (``kbit-fit``) and its outputs; docs/fit.md the decisions.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.fit_data import (
    DEFAULT_LEVEL,
    DEFAULT_N_BOOT,
    FitInputError,
    LawData,
    percentile_bounds,
    replicate_means,
)
from analysis.stats import Interval

log = logging.getLogger(__name__)

# theta = (log A, beta, alpha, gamma): log dL = log A + beta log D - alpha log N - gamma log k
THETA = ("log_A", "beta", "alpha", "gamma")
BOOT_METHOD = "paired window bootstrap"
MIN_LOG_VAR = 1e-10  # a noiseless cell still gets a finite weight


# --------------------------------------------------------------------------------------------
# the fit


def design(N: np.ndarray, D: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Rows ``(1, log D, -log N, -log k)``, so that ``design @ theta = log ΔL``."""
    N, D, k = (np.asarray(v, dtype=float) for v in (N, D, k))
    return np.column_stack([np.ones_like(N), np.log(D), -np.log(N), -np.log(k)])


def predict(theta: np.ndarray, N, D, k) -> np.ndarray:
    """ΔL of the law at (N, D, k) for ``theta`` = (log A, β, α, γ) (or a stack of them)."""
    return np.exp(np.asarray(theta) @ design(N, D, k).T)


def _wls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    sw = np.sqrt(w)
    return np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)[0]


def _wls_batched(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares per replicate row of ``y``; ``w`` (n_boot, cells), 0 = left out."""
    y = np.where(w > 0, y, 0.0)
    gram = np.einsum("bi,ij,ik->bjk", w, x, x)
    rhs = np.einsum("bi,ij->bj", w * y, x)
    return np.einsum("bjk,bk->bj", np.linalg.pinv(gram), rhs)


def log_variance(reps: np.ndarray) -> np.ndarray:
    """Bootstrap variance of log ΔL per cell (over the replicates where ΔL > 0)."""
    logs = np.log(np.where(reps > 0, reps, np.nan))
    # a cell positive in fewer than 2 replicates has no variance: nan -> inf (no weight)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        v = np.nanvar(logs, axis=0, ddof=1) if reps.shape[0] > 1 else np.zeros(reps.shape[1])
    return np.maximum(np.nan_to_num(v, nan=np.inf), MIN_LOG_VAR)


def misfit_variance(x: np.ndarray, y: np.ndarray, v: np.ndarray) -> float:
    """τ²: variance of log ΔL around the law beyond measurement noise ``v`` (method of
    moments of meta-regression, DerSimonian & Laird generalised to a design matrix)."""
    w = 1.0 / v
    theta = _wls(x, y, w)
    q = float((w * (y - x @ theta) ** 2).sum())
    xtwx_inv = np.linalg.pinv(x.T @ (x * w[:, None]))
    trace = float(np.trace(xtwx_inv @ (x.T @ (x * (w**2)[:, None]))))
    denom = w.sum() - trace
    df = len(y) - x.shape[1]
    return max(0.0, (q - df) / denom) if denom > 0 else 0.0


@dataclass
class _Fitted:
    theta: np.ndarray
    theta_reps: np.ndarray  # bootstrap + misfit
    theta_reps_window: np.ndarray  # bootstrap alone
    tau: float  # misfit SD (log space)
    resid_sd: float  # plain residual SD (log space, ddof = 4)
    r2: float


def _fit_arrays(
    x: np.ndarray,
    delta: np.ndarray,
    reps: np.ndarray,
    used: np.ndarray,
    v: np.ndarray,
    rng: np.random.Generator,
) -> _Fitted:
    """Weighted least squares of log ΔL on ``x`` over the ``used`` cells, and per replicate.

    Weights 1 / (v_i + τ²): a cell measured to 2% counts more than one measured to 40%, but
    once the law itself misses by more than the noise (τ), cells count about equally. In a
    replicate a used cell whose ΔL is not positive has no logarithm: it is left out of that
    replicate's fit only. The weights are those of the full data in every replicate.

    The window bootstrap only knows the measurement noise. The law's misfit (τ² per cell,
    independent) moves the fit too, by a normal with covariance
    ``(XᵀWX)⁻¹ XᵀW τ² W X (XᵀWX)⁻¹``; one draw of it is added to each replicate, so
    ``theta_reps`` carry both (``theta_reps_window``: the bootstrap alone).
    """
    xu, y, vu = x[used], np.log(delta[used]), v[used]
    tau2 = misfit_variance(xu, y, vu)
    w = np.zeros(len(delta))
    w[used] = 1.0 / (vu + tau2)
    theta = _wls(xu, y, w[used])
    resid = y - xu @ theta
    dof = max(int(used.sum()) - x.shape[1], 1)
    tot = float(((y - y.mean()) ** 2).sum())
    r2 = float(1 - (resid @ resid) / tot) if tot > 0 else float("nan")
    wb = np.where(reps > 0, w[None, :], 0.0)
    ylog = np.log(np.where(reps > 0, reps, 1.0))
    window = _wls_batched(x, ylog, wb)
    theta_reps = window
    if tau2 > 0:
        wu = w[used]
        bread = np.linalg.pinv(xu.T @ (xu * wu[:, None]))
        cov = bread @ (xu.T @ (xu * (tau2 * wu**2)[:, None])) @ bread
        theta_reps = window + rng.multivariate_normal(np.zeros(len(theta)), cov, len(window))
    sd = float(np.sqrt(resid @ resid / dof))
    return _Fitted(theta, theta_reps, window, math.sqrt(tau2), sd, r2)


@dataclass
class LawFit:
    """One fitted law (one data type / configuration) with its bootstrap intervals."""

    group: str
    theta: np.ndarray  # (log A, beta, alpha, gamma) on all used cells
    theta_reps: np.ndarray  # (n_boot, 4): the fit per bootstrap replicate, + a misfit draw
    params: dict[str, Interval]  # alpha, beta, gamma, A, log_A
    tau: float  # SD of log ΔL around the law beyond the measurement noise (misfit)
    resid_sd: float  # plain residual SD of log ΔL (ddof = 4)
    r2: float  # in log space
    # key, model, N, D, k, delta, delta_low, delta_high, log_var, used, reason, fitted
    cells: pd.DataFrame
    level: float = DEFAULT_LEVEL
    params_window: dict[str, Interval] = field(default_factory=dict)  # measurement noise only

    @property
    def n_used(self) -> int:
        return int(self.cells["used"].sum())

    def exclusions(self) -> dict[str, int]:
        return self.cells.loc[~self.cells["used"], "reason"].value_counts().to_dict()

    def to_dict(self) -> dict:
        return {
            "group": self.group,
            "n_cells": len(self.cells),
            "n_used": self.n_used,
            "excluded": self.exclusions(),
            "params": {k: v.to_dict() for k, v in self.params.items()},
            "params_window_bootstrap_only": {k: v.to_dict() for k, v in self.params_window.items()},
            "misfit_sd_log": self.tau,
            "resid_sd_log": self.resid_sd,
            "r2_log": self.r2,
        }


def noise_floor(
    delta: np.ndarray, reps: np.ndarray, level: float, min_delta: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(used mask, CI low, CI high, reasons): a cell is used when ΔL > 0, the lower end of its
    paired bootstrap interval is > 0 and (with ``min_delta``) ΔL >= min_delta."""
    low, high = percentile_bounds(reps, level)
    reasons = []
    for d, lo in zip(delta, low, strict=True):
        if not d > 0:
            reasons.append("ΔL <= 0")
        elif not lo > 0:
            reasons.append("ΔL interval reaches 0 (noise)")
        elif min_delta is not None and d < min_delta:
            reasons.append("ΔL < --min-delta")
        else:
            reasons.append("")
    used = np.array([r == "" for r in reasons], dtype=bool)
    return used, low, high, reasons


def _check_rank(x: np.ndarray, what: str) -> None:
    if np.linalg.matrix_rank(x) < x.shape[1]:
        raise FitInputError(
            f"{what}: log N, log D and log k are collinear among the used cells, so the "
            "exponents are not identifiable (vary D independently of N)"
        )


def fit_group(
    data: LawData,
    group: str,
    means: np.ndarray,
    level: float = DEFAULT_LEVEL,
    min_delta: float | None = None,
    seed: int = 0,
) -> LawFit:
    """Fit the law to one group's cells; ``means``: :func:`replicate_means` of ``data``."""
    q = data.quantized(group)
    delta, reps = data.deltas(data.nll.mean(axis=1), q), data.deltas(means, q)
    used, low, high, reasons = noise_floor(delta, reps, level, min_delta)
    sub = q[used]
    for col, what in (("N", "model sizes"), ("D", "token counts"), ("k", "bit widths")):
        if sub[col].nunique() < 2:
            raise FitInputError(
                f"{group}: {int(used.sum())} of {len(q)} cells are above the noise floor and they "
                f"hold {sub[col].nunique()} distinct {what}; the fit needs >= 2"
            )
    x = design(q["N"], q["D"], q["k"])
    _check_rank(x[used], group)
    v = log_variance(reps)
    fitted = _fit_arrays(x, delta, reps, used, v, np.random.default_rng([seed, 2]))
    theta = fitted.theta
    params = _intervals(theta, fitted.theta_reps, level, BOOT_METHOD + " + misfit")
    window = _intervals(theta, fitted.theta_reps_window, level, BOOT_METHOD)
    frame = q[["key", "model", "N", "D", "k"]].assign(
        delta=delta, delta_low=low, delta_high=high, log_var=v, used=used, reason=reasons,
        fitted=np.exp(x @ theta),
    ).reset_index(drop=True)  # fmt: skip
    return LawFit(group, theta, fitted.theta_reps, params, fitted.tau, fitted.resid_sd,
                  fitted.r2, frame, level, window)  # fmt: skip


def _intervals(theta: np.ndarray, reps: np.ndarray, level: float, how: str) -> dict[str, Interval]:
    """Percentile intervals of log A, β, α, γ and of A = exp(log A)."""
    lo, hi = percentile_bounds(reps, level)
    out = {n: Interval(float(theta[i]), float(lo[i]), float(hi[i]), level, how)
           for i, n in enumerate(THETA)}  # fmt: skip
    a = out["log_A"]
    out["A"] = Interval(*(float(np.exp(v)) for v in (a.estimate, a.low, a.high)), level, how)
    return out


def fit_law(
    data: LawData,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
    min_delta: float | None = None,
    means: np.ndarray | None = None,
) -> dict[str, LawFit]:
    """The law fitted per group (data type / configuration), with bootstrap CIs.

    A group that cannot be fitted is logged and left out; :class:`FitInputError` when none can.
    """
    means = replicate_means(data, n_boot, seed) if means is None else means
    fits, errors = {}, []
    for group in data.groups:
        try:
            fits[group] = fit_group(data, group, means, level, min_delta, seed)
        except FitInputError as err:
            errors.append(str(err))
            log.warning("kbit-fit: %s", err)
    if not fits:
        raise FitInputError("no group could be fitted: " + "; ".join(errors))
    return fits


# --------------------------------------------------------------------------------------------
# leave-one-out


def leave_one_out(
    fit: LawFit,
    data: LawData,
    means: np.ndarray,
    seed: int = 0,
    held_out: str = "all",
) -> pd.DataFrame:
    """Leave each model size (and the largest D) out, fit on the rest, predict what was left.

    ``held_out``: ``"N"`` (each size), ``"D"`` (the largest D) or ``"all"`` (both).
    Prediction interval of a left-out cell (log space): the training fit's bootstrap
    prediction plus a normal draw with the training fit's misfit variance τ² and the cell's
    own measurement variance. The *group* interval, for the geometric mean ΔL of the left-out
    cells, adds one such draw shared by all of them per replicate (variance τ² + the mean
    measurement variance): a size- or D-wide offset is exactly what the check looks for, and
    cells of one checkpoint share its baseline, so the scatter is not divided by the number of
    cells (conservative). Only cells above the noise floor are predicted.

    One row per left-out set: ``left_out``, ``value``, ``n_train``, ``n_cells``,
    ``observed_gm``, ``predicted_gm``, ``low``, ``high``, ``cell_coverage``, ``verdict``
    ("within its interval" / "outside its interval" / "not checked: <why>").
    """
    if held_out not in ("N", "D", "all"):
        raise ValueError(f"held_out={held_out!r}: allowed 'N', 'D', 'all'")
    q = data.quantized(fit.group)
    cells = fit.cells
    used = cells["used"].to_numpy()
    reps_all = data.deltas(means, q)
    x = design(cells["N"], cells["D"], cells["k"])
    v = cells["log_var"].to_numpy()
    y = np.log(np.where(cells["delta"] > 0, cells["delta"], np.nan))
    sets: list[tuple[str, float, np.ndarray]] = []
    if held_out in ("N", "all"):
        sets += [("N", float(n), cells["N"].to_numpy() == n) for n in sorted(cells["N"].unique())]
    if held_out in ("D", "all"):
        dmax = float(cells["D"].max())
        sets.append(("D (largest)", dmax, cells["D"].to_numpy() == dmax))
    rng = np.random.default_rng([seed, 1])
    lo_q, hi_q = (1 - fit.level) / 2, 1 - (1 - fit.level) / 2
    rows = []
    for what, value, out in sets:
        train, test = used & ~out, used & out
        row = {"group": fit.group, "left_out": what, "value": value,
               "n_train": int(train.sum()), "n_cells": int(test.sum())}  # fmt: skip
        why = _cannot_check(cells, train, test, x)
        if why:
            rows.append({**row, "verdict": f"not checked: {why}"})
            continue
        fitted = _fit_arrays(x, cells["delta"].to_numpy(), reps_all, train, v, rng)
        theta, tau2, vt = fitted.theta, fitted.tau**2, v[test]
        xt = x[test]
        pred_b = fitted.theta_reps @ xt.T  # (n_boot, cells): log ΔL predicted per replicate
        noise = rng.standard_normal(pred_b.shape) * np.sqrt(tau2 + vt)
        cell_lo, cell_hi = np.quantile(pred_b + noise, [lo_q, hi_q], axis=0)
        shared = rng.standard_normal(pred_b.shape[0]) * math.sqrt(tau2 + vt.mean())
        group_b = pred_b.mean(axis=1) + shared
        g_lo, g_hi = np.quantile(group_b, [lo_q, hi_q])
        obs = y[test]
        obs_gm = float(obs.mean())
        inside = g_lo <= obs_gm <= g_hi
        rows.append({
            **row,
            "observed_gm": float(np.exp(obs_gm)),
            "predicted_gm": float(np.exp((xt @ theta).mean())),
            "low": float(np.exp(g_lo)),
            "high": float(np.exp(g_hi)),
            "cell_coverage": float(((obs >= cell_lo) & (obs <= cell_hi)).mean()),
            "misfit_sd_log": fitted.tau,
            "verdict": "within its interval" if inside else "outside its interval",
        })  # fmt: skip
    return pd.DataFrame(rows)


def _cannot_check(cells: pd.DataFrame, train: np.ndarray, test: np.ndarray, x: np.ndarray) -> str:
    if not test.any():
        return "no left-out cell above the noise floor"
    sub = cells[train]
    for col, what in (("N", "sizes"), ("D", "token counts"), ("k", "bit widths")):
        if sub[col].nunique() < 2:
            return f"the rest holds {sub[col].nunique()} distinct {what}"
    if np.linalg.matrix_rank(x[train]) < x.shape[1] or train.sum() <= x.shape[1]:
        return "the rest cannot identify the exponents"
    return ""
