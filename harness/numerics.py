"""Which device and dtype a model runs in, decided without loading it or touching a GPU.

The device class and compute dtype enter a cell's identity (harness.config.identity), so a login
node without a GPU must compute the same answer as the GPU node that will run the cell:
:func:`resolve_numerics` takes ``cuda_available`` / ``bf16_supported`` to answer for that
machine. harness.models.loading loads weights in exactly what this module resolves, so what a record
says is what was loaded (docs/loading.md, "Device and dtype").
"""

from __future__ import annotations

import re

import torch

from harness.names import unknown_name

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Compute dtype name -> torch dtype; harness.models.loading and harness.models.files use it too.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPUTE_DTYPES = ("auto", *TORCH_DTYPES)
_HALF = ("float16", "bfloat16")


def device_class(device: str, *, cuda_available: bool | None = None) -> str:
    """``cpu`` | ``cuda`` | ``mps`` for a device string; ``auto`` picks cuda when there is one.

    ``cuda_available`` lets a login node without a GPU compute what a GPU node would do.
    """
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise unknown_name("device", device, DEVICES)
    if device == "auto":
        available = torch.cuda.is_available() if cuda_available is None else cuda_available
        return "cuda" if available else "cpu"
    return device.split(":")[0]


def resolve_numerics(
    device: str,
    compute_dtype: str,
    checkpoint_dtype: str | None,
    *,
    cuda_available: bool | None = None,
    bf16_supported: bool | None = None,
) -> tuple[str, str]:
    """(device class, compute dtype name) a model will be loaded in, without loading it.

    Both enter the cell identity, so they must be computable without a GPU: pass
    ``cuda_available`` / ``bf16_supported`` to answer for the machine the cell will run on.
    ``auto`` compute dtype: float32 off CUDA (half matmuls are slow or missing there); on CUDA
    the checkpoint's own 16-bit dtype (casting fp16 weights to bf16 loses 3 mantissa bits),
    else bfloat16 where supported, else float16.
    """
    dev = device_class(device, cuda_available=cuda_available)
    if compute_dtype not in COMPUTE_DTYPES:
        raise unknown_name("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    if compute_dtype != "auto":
        return dev, compute_dtype
    if dev != "cuda":
        return dev, "float32"
    if checkpoint_dtype in _HALF:
        return dev, checkpoint_dtype
    if bf16_supported is None:  # ask the real GPU only when there is one; else assume a modern one
        bf16_supported = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
    return dev, "bfloat16" if bf16_supported else "float16"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> the first GPU if there is one, else the CPU; ``cuda:N`` keeps its index."""
    dev = device_class(device)
    return torch.device(dev if device == "auto" else device)


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    """:func:`resolve_numerics` for a torch device and a checkpoint of unknown dtype."""
    return TORCH_DTYPES[resolve_numerics(device.type, compute_dtype, None)[1]]
