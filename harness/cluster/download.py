"""``kbit-download``: put a sweep's hub models into the HF cache before a cluster launch.

Why: the jobs of a sweep run on compute nodes that often have no internet, and a few dozen
jobs fetching the same 350 GB checkpoint at once is how a shared filesystem and a hub rate
limit go down. So the models are fetched once, from a login node, into the HF cache that
every node sees (``HF_HOME`` on the shared filesystem), and the jobs read it with
``HF_HUB_OFFLINE=1``. Before that, ``--plan`` says how much disk it takes.

It takes the sweep's own command-line overrides (``kbit-download +sweeps@_global_=paper``,
``model=a,b``, ``--config-dir DIR``), composes them with Hydra's compose API as ``kbit-run``
would, and expands the sweep's ``params`` / ``grids`` with the sweeper's own
:func:`harness.sweep.expand.expand_union` to its list of models. (So this command sits with
the entry points, above the sweep; the rest of :mod:`harness.cluster` never imports the sweep.)

Size on disk of a hub model (no weight is read): the ``total_size`` of its safetensors (else
``.bin``) index when the repository has one; otherwise its parameter count
(:func:`harness.cluster.resources.model_param_count`, from config.json on PyTorch's meta
device) x the bytes per parameter of the checkpoint's ``torch_dtype`` (float32 when the
config names none, as transformers saves then). Config and tokenizer files add a few MB.

Downloading keeps one weight format per model: the top-level ``*.safetensors`` files when the
repository has them, else the ``pytorch_model*.bin`` files, plus config, generation config and
tokenizer files (:func:`download_patterns`); ``huggingface_hub.snapshot_download`` fetches
exactly those names, so a repository's ONNX, TF, Flax or duplicate weights are never fetched.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config.overrides import conf_dir
from harness.config.refusals import EXIT_FAILED, EXIT_REFUSED

log = logging.getLogger(__name__)

PROG = "kbit-download"
GIB = 2**30
SAFE_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"
# top-level files a model needs besides its weights: config, generation config, tokenizers
# (fast JSON, sentencepiece, GPT-2 BPE, WordPiece, tiktoken) and chat templates
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
    "tokenizer.model", "spiece.model", "chat_template.json", "chat_template.jinja",
)  # fmt: skip


class DownloadError(ValueError):
    """Input ``kbit-download`` refuses (one line: the field, the value, what is allowed)."""


@dataclass
class ModelSize:
    """One model of the plan: its size on disk (None: nothing to download) and how it is known."""

    model: str
    bytes: int | None
    how: str


@dataclass
class SweepModels:
    """The models a sweep's cells use, in the sweep's order (the model varies slowest)."""

    sweep: str
    models: list[str]
    cells: int
    zoo_dir: str | None
    trust_remote_code: bool


# ----------------------------------------------------------------------------- the models
def _task_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides Hydra hands a sweeper as its arguments (not ``hydra.*`` ones)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def compose_sweep(overrides: Sequence[str], config_dir: str | None = None) -> Any:
    """The sweep's config as ``kbit-run --multirun`` composes it, with its ``hydra`` node
    (``hydra.sweeper.params`` / ``grids``); ``config_dir`` is ``--config-dir`` (a launcher
    profile folder). Raises :class:`DownloadError` with one line when it does not compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from harness.config.refusals import input_error_line
    from harness.files import PathError, user_path
    from harness.run.execute import prepare_command_line, register_schema

    extra = []
    if config_dir is not None:
        try:
            folder = user_path(config_dir, "--config-dir")
        except PathError as err:
            raise DownloadError(str(err)) from None
        if not folder.is_dir():
            raise DownloadError(f"--config-dir={config_dir!r}: no such folder; allowed: a folder "
                                "of config groups such as hydra/launcher/<name>.yaml")  # fmt: skip
        extra.append(f"hydra.searchpath=[file://{folder.resolve()}]")
    try:
        checked = prepare_command_line(list(overrides))
        register_schema()
        # a multirun composes the base config without the swept values (the sweeper expands them)
        parsed = OverridesParser.create().parse_overrides(checked)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            return compose("config", overrides=[*fixed, *extra], return_hydra_config=True)
    except Exception as err:  # composition reads only the overrides and the config folders
        line = input_error_line(err) or (str(err).strip().splitlines() or [repr(err)])[0]
        raise DownloadError(line) from None


def sweep_models(overrides: Sequence[str], config_dir: str | None = None) -> SweepModels:
    """The distinct models of the sweep ``overrides`` describe, expanded as the sweeper does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from harness.sweep.errors import NOT_LAUNCHED, SweepError
    from harness.sweep.expand import expand_union

    cfg = compose_sweep(overrides, config_dir)
    parser = OverridesParser.create()
    sweeper = cfg.hydra.sweeper
    params = {str(k): str(v) for k, v in (sweeper.get("params") or {}).items()}
    grids = OmegaConf.to_container(sweeper.grids) if sweeper.get("grids") else None
    try:
        cells = expand_union(
            parser, params, grids, _task_overrides(overrides),
            max_cells=sweeper.get("max_cells"),
        )  # fmt: skip
    except SweepError as err:
        raise DownloadError(str(err).replace(NOT_LAUNCHED, "")) from None
    default = OmegaConf.select(cfg, "model", default=None, throw_on_missing=False)
    values: dict[str, str] = {}  # a cell's override as Hydra writes it (escaped) -> its value
    models: dict[str, None] = {}
    for cell in cells:
        given = next((o for o in reversed(cell) if o.lstrip("+").split("=", 1)[0] == "model"), None)
        if given is not None and given not in values:
            values[given] = str(parser.parse_overrides([given])[0].value())
        value = values[given] if given is not None else default
        if value is None or value == "???":
            raise DownloadError("model is not set; allowed: model=<hub id>[,...] or a sweep "
                                "(+sweeps@_global_=NAME) whose grid sets it")  # fmt: skip
        models.setdefault(str(value), None)
    zoo_dir = OmegaConf.select(cfg, "zoo_dir", default=None)
    return SweepModels(
        sweep=str(cfg.get("sweep", "adhoc")), models=list(models), cells=len(cells),
        zoo_dir=str(zoo_dir) if zoo_dir else None,
        trust_remote_code=bool(cfg.get("trust_remote_code", False)),
    )  # fmt: skip


# ----------------------------------------------------------------------------- sizes
def _is_hub_id(spec: str, zoo_dir: str | None) -> bool:
    """A hub id, not a ``zoo:`` model or a local folder (refused like kbit-run when neither)."""
    from harness.models.files import resolve_model_path

    try:
        return resolve_model_path(spec, zoo_dir) is None
    except (ValueError, OSError) as err:
        raise DownloadError(str(err).splitlines()[0]) from None


def _hub_file(repo: str, name: str) -> Path | None:
    """``name`` of ``repo`` from the HF cache, else (online) fetched alone; None when the
    repository has no such file or it cannot be fetched (the caller falls back)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, name)
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return None  # known absent, or offline and not cached
    try:
        return Path(hf_hub_download(repo, name))
    except Exception:  # absent (404) or unreachable: the config.json route says which
        return None


def _index_total(file: Path) -> int | None:
    """``metadata.total_size`` of a weights index (bytes of every tensor), else None."""
    try:
        total = json.loads(file.read_text(encoding="utf-8"))["metadata"]["total_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(total) if isinstance(total, int | float) and total > 0 else None


def checkpoint_dtype(config: dict) -> str:
    """The dtype a checkpoint is stored in, from config.json (``dtype`` in transformers 5,
    ``torch_dtype`` before); float32 when it names none, as transformers saves then."""
    from harness.numerics import TORCH_DTYPES

    value = config.get("dtype", config.get("torch_dtype"))
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    return name if name in TORCH_DTYPES else "float32"


def model_size(spec: str, zoo_dir: str | None = None, trust_remote_code: bool = False) -> ModelSize:
    """What ``spec`` takes on disk once downloaded; nothing for a local folder or zoo model."""
    from harness.cluster.resources import model_param_count
    from harness.models.files import read_model_config
    from harness.numerics import TORCH_DTYPES

    if not _is_hub_id(spec, zoo_dir):
        kind = "zoo model (kbit-zoo builds it)" if spec.startswith("zoo:") else "local folder"
        return ModelSize(spec, None, f"{kind}: nothing to download")
    for name in (SAFE_INDEX, PT_INDEX):
        index = _hub_file(spec, name)
        total = _index_total(index) if index is not None else None
        if total:
            return ModelSize(spec, total, f"total_size of {name}")
    try:
        config = read_model_config(spec, zoo_dir)
        n_params = model_param_count(spec, zoo_dir, trust_remote_code)
    except ValueError as err:
        raise DownloadError(str(err).splitlines()[0]) from None
    dtype = checkpoint_dtype(config)
    size = TORCH_DTYPES[dtype].itemsize
    return ModelSize(spec, n_params * size, f"{n_params:,} parameters x {size} bytes ({dtype})")


def hub_cache_dir() -> Path:
    """Where ``snapshot_download`` writes (``HF_HUB_CACHE``, else ``HF_HOME``/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the filesystem ``folder`` is (or will be) on; None when unknown."""
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:,.2f} GiB"


def plan_text(models: SweepModels, sizes: Sequence[ModelSize]) -> str:
    """The plan ``--plan`` prints: one line per model, then the total and the free space."""
    hub = [s for s in sizes if s.bytes is not None]
    width = max([len(s.model) for s in sizes] + [5])
    lines = [
        f"sweep {models.sweep}: {len(models.models)} model(s) in {models.cells} cells, "
        f"{len(hub)} to download (one weight format each, plus config and tokenizer files):"
    ]
    for s in sizes:
        lines.append(f"  {s.model:<{width}}  {_gib(s.bytes):>14}  {s.how}")
    total = sum(s.bytes or 0 for s in hub)
    cache = hub_cache_dir()
    free = free_bytes(cache)
    where = f"free there: {_gib(free)}" if free is not None else "free space unknown"
    lines.append(f"  {'total':<{width}}  {_gib(total):>14}  into {cache} ({where})")
    if free is not None and free < total:
        lines.append(f"  not enough space: {_gib(total - free)} short (models already cached "
                     "there count again in the total)")  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------- downloading
def download_patterns(files: Sequence[str], trust_remote_code: bool = False) -> list[str]:
    """The exact file names to fetch of a repository listing ``files``: its top-level
    safetensors weights (and their index), else its ``pytorch_model*.bin`` weights (and
    index), plus config and tokenizer files (``*.py`` too with ``trust_remote_code``).

    Exact names, not globs: ``snapshot_download``'s patterns match across folders, and a
    ``*.safetensors`` would also fetch ``onnx/`` or ``original/`` copies of the weights.
    Raises :class:`DownloadError` when the repository has weights in neither format.
    """
    top = [f for f in files if "/" not in f]
    safe = sorted(f for f in top if f.endswith(".safetensors"))
    if safe:
        weights = safe + [f for f in top if f == SAFE_INDEX]
    else:
        weights = sorted(f for f in top if f.startswith("pytorch_model") and f.endswith(".bin"))
        weights += [f for f in top if f == PT_INDEX]
    if not weights:
        raise DownloadError(
            f"no weights in safetensors or pytorch format among the repository's top-level "
            f"files ({', '.join(sorted(top)[:8])}); allowed: a transformers checkpoint"
        )
    side = [f for f in top if f in SIDE_FILES or f.endswith(".tiktoken")]
    if trust_remote_code:
        side += [f for f in top if f.endswith(".py")]
    return weights + sorted(side)


def download_model(repo: str, trust_remote_code: bool = False) -> Path:
    """Fetch ``repo``'s files of :func:`download_patterns` into the HF cache; its snapshot."""
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(repo)
    patterns = download_patterns(files, trust_remote_code)
    return Path(snapshot_download(repo_id=repo, allow_patterns=patterns))


# ----------------------------------------------------------------------------- the command
class _Parser(argparse.ArgumentParser):
    """argparse with kbit's refusal: one line naming the problem and what is allowed, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _refuse(f"{message}; allowed: --plan, --config-dir DIR, and kbit-run's overrides (--help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Download a sweep's hub models into the HF cache (HF_HOME), one weight "
        "format each; --plan prints each model's size on disk and the total instead.",
        epilog="Example: kbit-download --plan +sweeps@_global_=paper   (docs/sweeps.md)",
    )
    parser.add_argument("--plan", "--dry-run", action="store_true", dest="plan",
                        help="print the models, their size on disk and the total; download nothing")  # fmt: skip
    parser.add_argument("--config-dir", "-cd", default=None,
                        help="a folder of extra config groups, as kbit-run --config-dir")  # fmt: skip
    parser.add_argument("--multirun", "-m", action="store_true",
                        help="accepted and ignored: the sweep's own command line works as is")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="the sweep's overrides, as for kbit-run")
    return parser


def _refuse(line: str) -> None:
    sys.stderr.write(f"{PROG}: {line}\n")
    sys.exit(EXIT_REFUSED)


def run(argv: Sequence[str]) -> int:
    """``kbit-download``'s work; returns the exit status (refusals exit 2 from here)."""
    args = _parser().parse_args(list(argv))
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if not args.plan and offline:
        _refuse("HF_HUB_OFFLINE is set: downloading needs the hub; allowed: unset it on a "
                "machine with internet (a login node), or --plan to print the sizes only")  # fmt: skip
    try:
        models = sweep_models(args.overrides, args.config_dir)
        sizes = [model_size(m, models.zoo_dir, models.trust_remote_code) for m in models.models]
    except DownloadError as err:
        _refuse(str(err))
    print(plan_text(models, sizes), flush=True)
    if args.plan:
        print("plan only (--plan): nothing downloaded", flush=True)
        return 0
    for size in sizes:
        if size.bytes is None:
            continue
        print(f"downloading {size.model} (~{_gib(size.bytes)}) ...", flush=True)
        try:
            path = download_model(size.model, models.trust_remote_code)
        except DownloadError as err:
            _refuse(f"model={size.model!r}: {err}")
        except Exception as err:  # the hub's errors span many types; one line, then stop
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            sys.stderr.write(f"{PROG}: model={size.model!r}: download failed ({type(err).__name__}: "
                             f"{first}); models fetched before stay; re-running resumes\n")  # fmt: skip
            return EXIT_FAILED
        print(f"  -> {path}", flush=True)
    print(f"done: the jobs must see {hub_cache_dir()} (the same HF_HOME or HF_HUB_CACHE) and "
          "run with HF_HUB_OFFLINE=1 (the launcher's setup lines)", flush=True)  # fmt: skip
    return 0


def main() -> None:
    """``kbit-download``: exit 0 done, 1 a download failed, 2 the input was refused."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
