"""A checkpoint's files read without their data: which weight files, which tensors, which shapes.

Same preference as transformers: model.safetensors, its sharded index, then the pickle formats,
read only by torch's ``weights_only`` loader on the meta device (nothing in a pickle runs).
A truncated safetensors file, a shard outside the folder, a missing shard and a pickle that
would run code are refused here, at validation, with one line naming the file
(docs/loading.md, "Pre-load inspection"). :mod:`harness.models.files` decides from this
whether a model can run; :mod:`harness.models.weights` compares the tensors with config.json.
"""

from __future__ import annotations

import json
import math
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_HEADER_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


class ModelFileRefused(ValueError):
    """A model input that cannot run; the message names the file, the problem and the fix."""


def read_json_object(file: Path) -> dict:
    """The JSON object in ``file``; anything else is refused with the file named."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileRefused(
            f"{file} is not valid JSON ({exc}); expected the file save_pretrained writes"
        ) from None
    if not isinstance(data, dict):
        raise ModelFileRefused(
            f"{file} holds a JSON {type(data).__name__}, not an object; expected the file save_pretrained writes"
        )
    return data


# A checkpoint's tensors as read without their data: name -> (dtype, shape, file it is in).
Tensors = dict[str, tuple[str, tuple[int, ...], Path]]


def _safetensors_header(file: Path) -> tuple[int, dict[str, int], Tensors]:
    """(elements stored, elements per dtype, tensors) from a safetensors header; no tensor
    data is read.

    Refuses a file whose header does not parse or whose size differs from what the header's
    data offsets say (a truncated copy or download).
    """
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > _MAX_HEADER or 8 + n > size:
            raise ModelFileRefused(
                f"{file}: safetensors header does not parse (file is {size} bytes, header length "
                f"field {n}): truncated or not a safetensors file; allowed: a complete copy"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileRefused(
            f"{file}: safetensors header is not valid JSON ({exc}); allowed: a complete copy"
        ) from None
    if not isinstance(header, dict):
        raise ModelFileRefused(
            f"{file}: safetensors header is not a JSON object; allowed: a complete copy"
        )
    end, per_dtype, tensors = 0, Counter(), {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
            per_dtype[str(entry["dtype"])] += math.prod(shape)
            end = max(end, int(stop), int(begin))
        except (TypeError, KeyError, ValueError):
            raise ModelFileRefused(
                f"{file}: tensor {name!r} lacks dtype/shape/data_offsets in the safetensors header"
            ) from None
        tensors[name] = (str(entry["dtype"]), shape, file)
    expected = 8 + n + end
    if size != expected:
        problem = "truncated" if size < expected else "longer than its header says"
        raise ModelFileRefused(
            f"{file}: {problem}: the header's data offsets need {expected} bytes, the file has "
            f"{size}; allowed: a complete copy of the checkpoint"
        )
    return sum(per_dtype.values()), dict(per_dtype), tensors


def escapes_folder(name: str) -> bool:
    """Whether a path written relative to a folder leaves it (absolute, a drive, ``..``).

    For names a model folder gives or is given (an index's shard names, a ``model:``
    perplexity path). Lexical on purpose: a Hugging Face cache snapshot's files are symlinks
    into ``../blobs``, which is fine; a *name* that climbs out of the folder is not.
    """
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return (posix.is_absolute() or bool(windows.drive) or windows.root != ""
            or ".." in posix.parts or ".." in windows.parts)  # fmt: skip


def _index_shards(index: Path) -> tuple[list[Path], list[str]]:
    """(present shard files, missing shard names) that a sharded checkpoint's index names.

    A shard name outside the index's folder (``../x``, an absolute path) is refused: loading
    must read only the model folder.
    """
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFileRefused(
            f"{index} has no weight_map; expected the index save_pretrained writes"
        )
    names = sorted(set(map(str, weight_map.values())))
    outside = [n for n in names if escapes_folder(n)]
    if outside:
        raise ModelFileRefused(
            f"{index}: weight_map names shard {outside[0]!r} outside the model folder "
            f"{str(index.parent)!r}; allowed: shard file names inside that folder"
        )
    shards = [index.parent / name for name in names]
    return [s for s in shards if s.is_file()], [str(s.relative_to(index.parent))
                                                for s in shards if not s.is_file()]  # fmt: skip


def _refuse_missing_shards(index: Path, missing: list[str]) -> None:
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelFileRefused(
            f"{index} names shard files that are missing: {missing[:5]}{more}; "
            "allowed: every shard the index names, next to it"
        )


def _pickle_tensors(file: Path) -> Tensors:
    """The tensors of a pickle checkpoint, read by torch's ``weights_only`` unpickler onto the
    meta device: only the pickle's metadata is read, and nothing in it is executed.

    Why before loading: a pickle that calls ``os.system`` (or any other callable) is refused
    here, at validation, instead of after the runner has started a cell.
    """
    import torch

    def load(mmap: bool) -> Any:
        return torch.load(file, weights_only=True, mmap=mmap, map_location="meta")

    try:
        try:
            data = load(mmap=True)
        except RuntimeError as exc:  # the pre-1.6 (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            data = load(mmap=False)
    except pickle.UnpicklingError:
        raise ModelFileRefused(
            f"{file}: holds objects that torch's weights_only loader refuses (unpickling them "
            f"could run code); refused before loading; allowed: a {SAFE_WEIGHTS} copy of the "
            f"weights, or plain tensors in {file.name}"
        ) from None
    except Exception as exc:  # torch raises many types for a corrupt archive
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelFileRefused(
            f"{file}: does not load as a torch checkpoint ({type(exc).__name__}: {first}); "
            f"allowed: a complete {SAFE_WEIGHTS}, or a {PT_WEIGHTS} written by torch.save"
        ) from None
    if not isinstance(data, dict):
        raise ModelFileRefused(
            f"{file}: holds a {type(data).__name__}, not a state dict (name -> tensor); "
            "allowed: the file save_pretrained or torch.save(model.state_dict()) writes"
        )
    return {str(k): (str(v.dtype).removeprefix("torch."), tuple(v.shape), file)
            for k, v in data.items() if isinstance(v, torch.Tensor)}  # fmt: skip


@dataclass(frozen=True)
class Weights:
    """What :func:`check_weights` found: format, elements, dominant dtype, tensors."""

    format: str | None  # safetensors | pytorch | None
    n_params: int | None = None
    dtype: str | None = None
    tensors: Tensors | None = None  # None when not every file is here (a hub snapshot)
    files: tuple[Path, ...] = ()


def check_weights(folder: Path, *, require: bool) -> Weights:
    """The weights transformers would load: format, elements stored, dominant float dtype and
    the tensors' names and shapes (read without their data).

    Same preference as transformers: model.safetensors, its sharded index, then the pickle
    formats (read here and at load time only by torch's weights_only loader, see
    :func:`harness.models.loading.load_model`). With ``require`` False (a hub snapshot that downloads
    weights at load time) absent files pass.
    """
    if (folder / SAFE_WEIGHTS).is_file():
        shards, missing = [folder / SAFE_WEIGHTS], []
    elif (folder / SAFE_INDEX).is_file():
        shards, missing = _index_shards(folder / SAFE_INDEX)
        if require:
            _refuse_missing_shards(folder / SAFE_INDEX, missing)
    elif (folder / PT_INDEX).is_file() or (folder / PT_WEIGHTS).is_file():
        if (folder / PT_INDEX).is_file():
            shards, missing = _index_shards(folder / PT_INDEX)
            if require:
                _refuse_missing_shards(folder / PT_INDEX, missing)
        else:
            shards, missing = [folder / PT_WEIGHTS], []
        tensors: Tensors = {}
        for shard in shards:
            tensors.update(_pickle_tensors(shard))
        return Weights("pytorch", None, None, None if missing else tensors, tuple(shards))
    elif require:
        raise ModelFileRefused(
            f"{folder} has no weight files; allowed: {SAFE_WEIGHTS}, {SAFE_INDEX} with its "
            f"shards, or {PT_WEIGHTS} (read with torch's weights_only loader)"
        )
    else:
        return Weights(None)
    total, counts, tensors = 0, Counter(), {}
    for shard in shards:
        n, per_dtype, found = _safetensors_header(shard)
        total += n
        counts.update(per_dtype)
        tensors.update(found)
    floats = [(n, _HEADER_DTYPES[d]) for d, n in counts.items() if d in _HEADER_DTYPES]
    dominant = max(floats)[1] if floats else None
    return Weights("safetensors", None if missing else total, dominant,
                    None if missing else tensors, tuple(shards))  # fmt: skip
