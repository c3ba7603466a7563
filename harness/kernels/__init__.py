"""Kernels: the lowest layer of quantization, importing only torch and the standard library.

``torch_ops`` holds the exact nearest-code search, the block-scale arithmetic and the MX /
NVFP4 element grids as torch functions, run eagerly or through ``torch.compile``; ``native``
compiles ``native.c`` (the same arithmetic as CPU loops) on first use and calls it through
ctypes. All three paths give bit-identical results. Layering, enforced by
tests/test_layers.py: ``harness.kernels`` <- ``harness.dtypes`` <- ``harness.quantize``.
"""
