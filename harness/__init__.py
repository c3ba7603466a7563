"""kbit: a k-bit inference scaling-law harness.

Quantize families of causal LMs with block-wise k-bit data types, evaluate perplexity and
zero-shot accuracy, and record every grid cell to a parquet store.
"""

__version__ = "0.1.0"
