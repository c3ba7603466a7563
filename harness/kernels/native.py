"""The CPU kernels of ``native.c``: compiled on first use, cached, called through ctypes.

Why compile at run time rather than ship a binary: the loops are vectorised for the CPU they
run on (``-march=native``), and torch's own CPU ``torch.compile`` already needs the same C
compiler, so no new requirement is added. Why ctypes: it releases the GIL, so the block rows
are split over a small thread pool (``torch.get_num_threads()`` workers) with no OpenMP
runtime beside torch's.

The library is built once per (source, compiler flags, CPU) into ``$KBIT_CACHE_DIR/native``
(default ``~/.cache/kbit/native``) through a temporary file and an atomic rename, so
concurrent Slurm jobs sharing a home directory never load a half-written file. If there is no
compiler, the build fails, or ``$KBIT_NATIVE=0``, callers get ``None`` from :func:`library`
and use the torch path, which computes the same values.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from harness.files import atomic_write
from harness.kernels.scale_formats import SCALE_FORMATS

log = logging.getLogger(__name__)

NATIVE_ENV = "KBIT_NATIVE"  # "0": never use the compiled kernels
CACHE_ENV = "KBIT_CACHE_DIR"
ABI = 6  # must equal kbit_abi() in native.c
SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared", "-fno-strict-aliasing")
# the ids native.c knows the scale formats by (the element-grid formats run on torch only)
SCALE_FORMAT_IDS = {n: f.native_id for n, f in SCALE_FORMATS.items() if f.native_id is not None}
_PARALLEL_MIN_NUMEL = 1 << 16  # smaller tensors run on the calling thread

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_tag() -> str:
    """What -march=native depends on: the machine and its CPU feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kbit"
    return Path(root) / "native"


def _compile(cc: str, target: Path, march: bool) -> None:
    """Compile into a private folder beside ``target``, then install it atomically
    (:func:`harness.files.atomic_write`: fsynced, rwx & ~umask so a shared cache stays
    group-readable, renamed over ``target``), so a concurrent job never loads a half-written
    file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as work:
        out = Path(work) / target.name
        cmd = [cc, *FLAGS, *(["-march=native"] if march else []), str(SOURCE), "-o", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        atomic_write(target, out.read_bytes(), mode=0o777)  # a shared library: rwx & ~umask


def _build() -> ctypes.CDLL:
    """Compile (or find in the cache) and load the library; raises on any failure."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    errors = []
    for march in (True, False):
        key = "\n".join([SOURCE.read_text(), cc, " ".join(FLAGS), str(march), _cpu_tag()])
        target = _cache_dir() / f"kbit_native_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
        try:
            if not target.exists():
                log.info("compiling the native quantization kernels into %s", target)
                _compile(cc, target, march)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            errors.append(f"{'-march=native' if march else 'generic'}: {detail.strip()[:500]}")
            continue
        if lib.kbit_abi() != ABI:
            raise RuntimeError(f"{target}: ABI {lib.kbit_abi()}, expected {ABI}")
        _declare(lib)
        return lib
    raise RuntimeError("; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    common = [p, p, i64, i64, i64, ctypes.c_int, p, ctypes.c_int, i32, p]
    lib.kbit_quantize.argtypes = [*common, p, p]
    lib.kbit_fake.argtypes = [*common, p, p, p]
    lib.kbit_dequantize.argtypes = [p, p, p, i64, i64, i64, p, p, p, ctypes.c_int]
    lib.kbit_has_dequantize16.argtypes = []
    lib.kbit_has_dequantize16.restype = ctypes.c_int
    f32 = ctypes.c_float
    lib.kbit_hist.argtypes = [p, i64, i64, f32, f32, p]
    lib.kbit_select.argtypes = [p, i64, i64, f32, f32, p, p, p]
    lib.kbit_scales.argtypes = [p, p, i64, i64, i64, ctypes.c_int, p, p]
    lib.kbit_fit_hist.argtypes = [p, p, p, i64, i64, i64, f32, p]
    lib.kbit_fit_select.argtypes = [p, p, p, i64, i64, i64, f32, p, p, p]
    lib.kbit_fit_take.argtypes = [p, p, p, i64, p, i64, i64, p]
    for fn in (lib.kbit_quantize, lib.kbit_fake, lib.kbit_dequantize, lib.kbit_hist,
               lib.kbit_select, lib.kbit_scales, lib.kbit_fit_hist, lib.kbit_fit_select,
               lib.kbit_fit_take):  # fmt: skip
        fn.restype = None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, or the build failed: warned once)."""
    if os.environ.get(NATIVE_ENV, "1") in ("0", "false", "False"):
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _build()
            except Exception as exc:  # any build/load failure: the torch path is exact too
                log.warning("native quantization kernels unavailable (%s); using torch", exc)
                _state["lib"] = None
        return _state["lib"]  # type: ignore[return-value]


def _pool() -> ThreadPoolExecutor:
    """One worker per torch thread, created per process: a forked child inherits the pool
    object but not its threads, and would wait on it forever."""
    with _lock:
        key = (os.getpid(), torch.get_num_threads())
        if _state.get("pool_key") != key:
            old = _state.get("pool")
            if old is not None and _state["pool_key"][0] == os.getpid():  # type: ignore[index]
                old.shutdown(wait=False)  # type: ignore[union-attr]
            _state["pool"] = ThreadPoolExecutor(key[1], thread_name_prefix="kbit-native")
            _state["pool_key"] = key
        return _state["pool"]  # type: ignore[return-value]


def _row_spans(rows: int, numel: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1), one per torch thread (a single range for small tensors)."""
    workers = max(1, min(torch.get_num_threads(), rows)) if numel >= _PARALLEL_MIN_NUMEL else 1
    step = -(-rows // workers)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _each(fn, calls: list[tuple]) -> None:
    """fn(*call) for every call: on the calling thread if there is one, else in the pool."""
    if len(calls) == 1:
        fn(*calls[0])
        return
    for f in [_pool().submit(fn, *c) for c in calls]:
        f.result()


def _over_rows(fn, rows: int, numel: int, before: tuple, after: tuple) -> None:
    """fn(*before, r0, r1, *after) over row ranges, split across the thread pool."""
    _each(fn, [(*before, r0, r1, *after) for r0, r1 in _row_spans(rows, numel)])


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors: all on the CPU and contiguous."""
    return all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in tensors)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def search_args(lut) -> tuple:
    """(packed bucket table, shift, nbins, 15 keys or None) of a :class:`torch_ops.Lut`."""
    return lut.packed, lut.shift, lut.nbins, lut.keys16


def _search_rows(fn, xb, mean, lut, scale_format: str, middle: tuple, dest: torch.Tensor):
    """Run kbit_quantize or kbit_fake over float32 blocks ``xb`` [n, B]; return the scales.

    Both take (x, mean, r0, r1, B, fmt, packed, shift, nbins, keys16, *middle, scales, dest).
    """
    rows, block = xb.shape
    packed, shift, nbins, small = search_args(lut)
    scales = torch.empty(rows, 1, dtype=torch.float32)
    head = (xb.data_ptr(), _ptr(mean))
    tail = (block, SCALE_FORMAT_IDS[scale_format], packed.data_ptr(), shift, nbins, _ptr(small),
            *middle, scales.data_ptr(), dest.data_ptr())  # fmt: skip
    _over_rows(fn, rows, xb.numel(), head, tail)
    return scales


def quantize_rows(
    lib: ctypes.CDLL,
    xb: torch.Tensor,
    mean: torch.Tensor | None,
    lut,
    scale_format: str,
    codes: torch.Tensor,
) -> torch.Tensor:
    """Fill ``codes`` [n, B] (uint8) for float32 blocks ``xb`` [n, B]; return scales [n, 1]."""
    return _search_rows(lib.kbit_quantize, xb, mean, lut, scale_format, (), codes)


def fake_rows(
    lib: ctypes.CDLL,
    xb: torch.Tensor,
    mean: torch.Tensor | None,
    lut,
    scale_format: str,
    code: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Fill float32 ``out`` [n, B] with the fake-quantized blocks; return scales [n, 1]."""
    return _search_rows(lib.kbit_fake, xb, mean, lut, scale_format, (code.data_ptr(),), out)


_STREAM_MIN_BYTES = 16 << 20  # results above this bypass the cache (larger than L2 anyway)


def dequantize_rows(
    lib: ctypes.CDLL,
    codes: torch.Tensor,
    scale: torch.Tensor,
    mean: torch.Tensor | None,
    code: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Fill float32 ``out`` [n, B] with code[codes] * scale (+ mean)."""
    rows, block = codes.shape
    code16 = None
    if code.numel() <= 16 and block % 8 == 0 and lib.kbit_has_dequantize16():
        code16 = torch.zeros(16, dtype=torch.float32)
        code16[: code.numel()] = code
    stream = int(out.numel() * 4 >= _STREAM_MIN_BYTES and out.data_ptr() % 32 == 0)
    head = (codes.data_ptr(), scale.data_ptr(), _ptr(mean))
    tail = (block, code.data_ptr(), out.data_ptr(), _ptr(code16), stream)
    _over_rows(lib.kbit_dequantize, rows, codes.numel(), head, tail)


def histogram(lib: ctypes.CDLL, y: torch.Tensor, scale: float, buckets: int) -> torch.Tensor:
    """Counts (int64 [buckets]) of the histogram-select buckets of clamp(y / scale)."""
    spans = _row_spans(y.numel(), y.numel())
    hists = torch.zeros(len(spans), buckets, dtype=torch.int64)
    calls = [
        (y.data_ptr(), i0, i1, scale, buckets / 2, hists[j].data_ptr())
        for j, (i0, i1) in enumerate(spans)
    ]
    _each(lib.kbit_hist, calls)
    return hists.sum(0)


def select(
    lib: ctypes.CDLL, y: torch.Tensor, scale: float, wanted: torch.Tensor, total: int
) -> torch.Tensor:
    """clamp(y / scale) of every element in a wanted bucket, in index order (``total`` of them)."""
    spans = _row_spans(y.numel(), y.numel())
    bufs = torch.empty(len(spans), max(total, 1), dtype=torch.float32)
    counts = torch.zeros(len(spans), dtype=torch.int64)
    wanted_u8 = wanted.to(torch.uint8).contiguous()
    half = wanted_u8.numel() / 2
    calls = [
        (
            y.data_ptr(),
            i0,
            i1,
            scale,
            half,
            wanted_u8.data_ptr(),
            bufs[j].data_ptr(),
            counts[j:].data_ptr(),
        )
        for j, (i0, i1) in enumerate(spans)
    ]
    _each(lib.kbit_select, calls)
    return torch.cat([bufs[j, : int(counts[j])] for j in range(len(spans))])


# ---------------------------------------------------------------- fitting on block-normalised x
def block_scales(
    lib: ctypes.CDLL, xb: torch.Tensor, mean: torch.Tensor | None, scale_format: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored scales [n, 1], largest |normalised value| per row [n]) of blocks ``xb``."""
    rows, block = xb.shape
    scales = torch.empty(rows, 1, dtype=torch.float32)
    ymax = torch.empty(rows, dtype=torch.float32)
    head = (xb.data_ptr(), _ptr(mean))
    tail = (block, SCALE_FORMAT_IDS[scale_format], scales.data_ptr(), ymax.data_ptr())
    _over_rows(lib.kbit_scales, rows, xb.numel(), head, tail)
    return scales, ymax


def _part_rows(xb: torch.Tensor, mean: torch.Tensor | None, scale: torch.Tensor) -> list[tuple]:
    """The leading kernel arguments (xb, mean, scales, r0, r1, block) of each thread's rows."""
    head = (xb.data_ptr(), _ptr(mean), scale.data_ptr())
    return [(*head, r0, r1, xb.shape[1]) for r0, r1 in _row_spans(xb.shape[0], xb.numel())]


def fit_histogram(lib: ctypes.CDLL, parts: list[tuple], buckets: int) -> torch.Tensor:
    """Bucket counts of the normalised values of every part (xb, mean, scales)."""
    total = torch.zeros(buckets, dtype=torch.int64)
    for part in parts:
        rows = _part_rows(*part)
        hists = torch.zeros(len(rows), buckets, dtype=torch.int64)
        _each(
            lib.kbit_fit_hist, [(*a, buckets / 2, hists[j].data_ptr()) for j, a in enumerate(rows)]
        )
        total += hists.sum(0)
    return total


def fit_select(
    lib: ctypes.CDLL, parts: list[tuple], wanted: torch.Tensor, total: int
) -> torch.Tensor:
    """The normalised values in wanted buckets, over every part (``total`` of them)."""
    wanted_u8 = wanted.to(torch.uint8).contiguous()
    half = wanted_u8.numel() / 2
    picked = []
    for part in parts:
        rows = _part_rows(*part)
        bufs = torch.empty(len(rows), total + 1, dtype=torch.float32)  # + 1: see the C
        counts = torch.zeros(len(rows), dtype=torch.int64)
        calls = [
            (*a, half, wanted_u8.data_ptr(), bufs[j].data_ptr(), counts[j:].data_ptr())
            for j, a in enumerate(rows)
        ]
        _each(lib.kbit_fit_select, calls)
        picked += [bufs[j, : int(counts[j])] for j in range(len(rows))]
    return torch.cat(picked)


def fit_take(
    lib: ctypes.CDLL,
    flat: torch.Tensor,
    means: torch.Tensor | None,
    scales: torch.Tensor,
    block: int,
    idx: torch.Tensor,
) -> torch.Tensor:
    """The normalised values of the elements ``idx`` of ``flat`` (block scales ``scales``)."""
    idx = idx.to(torch.int64).contiguous()
    out = torch.empty(idx.numel(), dtype=torch.float32)
    head = (flat.data_ptr(), _ptr(means), scales.data_ptr(), block, idx.data_ptr())
    _over_rows(lib.kbit_fit_take, idx.numel(), idx.numel(), head, (out.data_ptr(),))
    return out
