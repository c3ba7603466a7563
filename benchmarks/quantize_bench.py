"""Block-wise quantizer speed, side by side in one run.

    python benchmarks/quantize_bench.py            # 4096 x 4096 float32, B = 64, + 100M quantiles
    python benchmarks/quantize_bench.py --no-100m  # skip the 100M-element quantile estimation

Every candidate is timed once per round, rounds interleaved, median reported, so machine
load hits all of them alike. Ratios: vs bitsandbytes' CPU quantize_blockwise +
dequantize_blockwise (8-bit dynamic; target <= 1.0) and vs a plain copy_ of the tensor into
a preallocated buffer (the memory floor; target <= 5). Quantile estimation of a 100M-element
tensor is compared with torch.sort of the same tensor (target <= 2).

Outputs: the copy_ floor writes into a preallocated buffer, so the rows compared with it do
too (kbit's ``out=``); otherwise the ratio would mostly measure page faults on a fresh 64 MB
result, which on this kind of machine cost several copies' worth. bitsandbytes' CPU
dequantize has no ``out=`` (only its quantize does), so it allocates its result, and the
rows compared with it, marked ``fresh``, allocate theirs too. Quantile rows include fitting
the codebook to the tensor (two passes of a histogram select over it, or a 1M-value sample),
except the ``(pre-fitted)`` rows, which time the quantizer with an already fitted codebook.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from harness.dtypes import codebook, is_data_dependent
from harness.dtypes.population import fit_population
from harness.quantize import dequantize_blockwise, fake_quantize, quantize_blockwise

CASES = [
    (name, k)
    for k in (4, 8)
    for name in ("int", "int_asym", "float", "dynamic", "normal", "quantile", "quantile_approx")
]
CASES += [("nf4", 4), ("e2m1", 4), ("fp8_e4m3", 8)]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def candidates(x: torch.Tensor, block: int) -> dict[str, Callable[[], object]]:
    dst = torch.empty_like(x)
    codes = torch.empty(x.shape, dtype=torch.uint8)
    out = {"copy_ (floor)": lambda: dst.copy_(x)}
    try:
        import bitsandbytes.functional as bnb

        dyn = bnb.create_dynamic_map(signed=True)
        absmax = torch.empty(-(-x.numel() // block))

        def bnb_qdq():
            q, state = bnb.quantize_blockwise(
                x, code=dyn, blocksize=block, absmax=absmax, out=codes
            )
            return bnb.dequantize_blockwise(q, state)

        out["bitsandbytes dynamic k=8"] = bnb_qdq
    except ImportError:
        print("bitsandbytes not installed: no reference kernel")

    def qdq(name: str, k: int, fresh: bool = False):
        fitted = fit_population(x, block) if is_data_dependent(name) else None
        q = quantize_blockwise(x, codebook(name, k, fitted), block, out=None if fresh else codes)
        return dequantize_blockwise(q, out=None if fresh else dst)

    for name, k in CASES:
        out[f"{name} k={k} q+dq"] = lambda name=name, k=k: qdq(name, k)
        out[f"{name} k={k} q+dq fresh"] = lambda name=name, k=k: qdq(name, k, fresh=True)
        out[f"{name} k={k} fake"] = lambda name=name, k=k: fake_quantize(x, name, k, block, out=dst)
        out[f"{name} k={k} fake fresh"] = lambda name=name, k=k: fake_quantize(x, name, k, block)
    for k in (4, 8):  # quantile without its fit: the per-tensor kernel cost, like any codebook
        fitted_code = codebook("quantile", k, fit_population(x, block))
        out[f"quantile k={k} q+dq (pre-fitted)"] = lambda c=fitted_code: dequantize_blockwise(
            quantize_blockwise(x, c, block, out=codes), out=dst
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-100m", action="store_true", help="skip the 100M quantile estimation")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.cols)
    cands = candidates(x, args.block_size)
    t0 = time.perf_counter()
    for fn in cands.values():  # warm-up: torch.compile, caches, allocator
        fn()
        fn()
    print(
        f"warm-up (incl. torch.compile) {time.perf_counter() - t0:.1f} s; threads {torch.get_num_threads()}"
    )
    times: dict[str, list[float]] = {name: [] for name in cands}
    for _ in range(args.rounds):
        for name, fn in cands.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ref = med.get("bitsandbytes dynamic k=8")
    floor = med["copy_ (floor)"]
    print(
        f"\n{args.rows}x{args.cols} float32, B={args.block_size}, median of {args.rounds} interleaved rounds"
    )
    print("/copy: rows writing into preallocated buffers; /bnb: rows allocating their result")
    print(f"{'candidate':34s} {'ms':>9s} {'/copy':>7s} {'/bnb':>7s}")
    for name, t in med.items():
        fresh = name.endswith("fresh") or name.startswith("bitsandbytes")
        r_copy = "" if fresh else f"{t / floor:7.2f}"
        r_bnb = f"{t / ref:7.2f}" if ref and fresh else ""
        print(f"{name:34s} {t * 1e3:9.1f} {r_copy:>7s} {r_bnb:>7s}")
    summary(med, floor, ref)
    if not args.no_100m:
        bench_quantiles()


def summary(med: dict[str, float], floor: float, ref: float | None) -> None:
    """The worst ratio of each kind, against its target.

    The copy target is read for quantizing with a codebook: fixed types, and quantile with a
    pre-fitted one. Fitting a quantile codebook is estimation, timed against torch.sort by
    bench_quantiles; the rows that fit and quantize in one call are reported alongside.
    """
    kbit = {n: t for n, t in med.items() if " k=" in n and not n.startswith("bitsandbytes")}
    buffers = {n: t / floor for n, t in kbit.items() if not n.endswith("fresh")}
    fitting = {
        n: r for n, r in buffers.items() if n.startswith("quantile") and "pre-fitted" not in n
    }
    with_code = {n: r for n, r in buffers.items() if n not in fitting}
    worst = max(with_code, key=with_code.get)
    print(f"worst /copy, quantizing with a codebook: {with_code[worst]:.2f} ({worst})  target <= 5")
    if fitting:
        print(f"quantile fit + quantize in one call, /copy: {min(fitting.values()):.1f}-"
              f"{max(fitting.values()):.1f}  (fit itself: see the 100M estimation below)")  # fmt: skip
    if ref:
        fresh = {n: t / ref for n, t in kbit.items() if n.endswith("fresh")}
        worst = max(fresh, key=fresh.get)
        print(f"worst /bnb (fits included): {fresh[worst]:.2f} ({worst})  target <= 1.0")


def bench_quantiles(n: int = 100_000_000) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    t_sort = timed(lambda: torch.sort(x))
    t_exact = timed(lambda: codebook("quantile", 8, x))
    t_approx = timed(lambda: codebook("quantile_approx", 8, x))
    print(f"\nquantile codebook of a {n:,}-element tensor (k=8) vs torch.sort of it")
    print(f"torch.sort          {t_sort:7.2f} s")
    print(f"quantile (exact)    {t_exact:7.2f} s   ratio {t_exact / t_sort:5.2f}")
    print(f"quantile_approx     {t_approx:7.2f} s   ratio {t_approx / t_sort:5.2f}")


if __name__ == "__main__":
    main()
