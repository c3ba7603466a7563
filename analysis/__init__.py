"""Analysis of kbit result stores: tidy frames, scaling figures, bit-optimal tables, advice.

Imports nothing from ``harness.quantize``: analysis reads records, it never re-derives them.
"""
