"""How many tokens a model was trained on: the D of a precision scaling law.

Quantization damage grows with training tokens (Ouyang et al. 2024), so every record carries
the count when it is known, and None when it is not (never a guess):

* zoo models and their checkpoints (``zoo:<family>/<size>@<tokens>``): the ``train_tokens``
  their build wrote into ``kbit_zoo.json`` (older builds: the summary's ``tokens_seen``);
* Pythia (EleutherAI/pythia-*, any size, deduped or not): 2,097,152 tokens per step (1024
  sequences x 2048 tokens), 143,000 steps for the released models, or the step named in the
  model id or folder name (``...step1000``, as the hub's revisions are called);
* anything else: None.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

PYTHIA_TOKENS_PER_STEP = 1024 * 2048
PYTHIA_FINAL_STEP = 143_000
_PYTHIA = re.compile(r"pythia-[0-9.]+[mb]", re.IGNORECASE)
_STEP = re.compile(r"(?:^|[^a-z])step[-_]?(\d+)", re.IGNORECASE)


def train_tokens(spec: str, path: Path | None = None) -> int | None:
    """Training tokens of the model ``spec`` (loaded from ``path`` when local), or None."""
    if path is not None:
        meta = Path(path) / "kbit_zoo.json"
        if meta.is_file():
            info = json.loads(meta.read_text())
            tokens = info.get("train_tokens", (info.get("summary") or {}).get("tokens_seen"))
            return int(tokens) if tokens is not None else None
    name = f"{spec} {Path(path).name if path is not None else ''}"
    if _PYTHIA.search(name):
        step = _STEP.search(name)
        return (int(step.group(1)) if step else PYTHIA_FINAL_STEP) * PYTHIA_TOKENS_PER_STEP
    return None
