"""The inputs of a zoo build, checked before any work: one function, one line per refusal.

``kbit-zoo`` and :func:`harness.zoo.build.build_family` both go through
:func:`check_request`, so they refuse the same inputs the same way (a
:class:`~harness.zoo.config.ZooConfigError` of one line naming the field, the value and what
is allowed) and nothing is written before it passes. Kept apart from ``build.py`` so that a
refusal does not wait for ``transformers`` to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.config.schema import DEVICE_PATTERN, DEVICES_ALLOWED, device_problem
from harness.files import writable_dir_problem
from harness.names import unknown_name
from harness.zoo.config import FamilyConfig, ZooConfigError, load_family_config
from harness.zoo.corpus import corpus_hash
from harness.zoo.paths import zoo_dir_path


@dataclass
class BuildRequest:
    """A checked build (:func:`check_request`): what ``build.build`` trains, where and how."""

    family: FamilyConfig
    zoo_dir: Path  # expanded (harness.files.user_path): the folder checked is the one written
    device: str
    sizes: list[str] | None  # None = every size of the family
    threads: int | None  # None = torch's default
    corpus_hash: str


def check_device(device: object) -> str:
    """``device`` as kbit-run spells it, and present on this machine (else one line): the
    rules of :data:`harness.config.schema.DEVICE_PATTERN` and :func:`harness.config.schema.device_problem`."""
    text = str(device)
    if not DEVICE_PATTERN.match(text):
        raise ZooConfigError(f"device={device!r} is unknown; allowed: {DEVICES_ALLOWED}")
    problem = device_problem(text)
    if problem:
        raise ZooConfigError(problem)
    return text


def check_threads(threads: object) -> int | None:
    """Torch CPU threads: an integer >= 1 (an environment variable gives a string) or None."""
    if threads is None or (isinstance(threads, str) and not threads.strip()):
        return None
    value: int | None = None
    if isinstance(threads, int) and not isinstance(threads, bool):
        value = threads
    elif isinstance(threads, str) and threads.strip().isdigit():
        value = int(threads)
    if value is None or value < 1:
        raise ZooConfigError(
            f"threads={threads!r}; allowed: an integer >= 1, or null (torch's default)"
        )
    return value


def check_sizes(cfg: FamilyConfig, sizes: object) -> list[str] | None:
    """The sizes to build (None = all): names the family has; one name may be given bare."""
    if sizes is None:
        return None
    names = [sizes] if isinstance(sizes, str) else list(sizes)  # type: ignore[call-overload]
    known = [s.name for s in cfg.sizes]
    if not names:
        raise ZooConfigError(
            f"sizes=[]; allowed: null (every size) or a list of the sizes of family "
            f"{cfg.name}: {known}"
        )
    for name in names:
        if str(name) not in known:
            err = unknown_name("sizes", str(name), known, what=f"the sizes of family {cfg.name}")
            raise ZooConfigError(str(err))
    return [str(n) for n in names]


def check_request(
    name_or_cfg: str | Path | dict | FamilyConfig,
    zoo_dir: str | Path | None = None,
    corpus: str | Path | None = None,
    device: object = "auto",
    sizes: object = None,
    threads: object = None,
) -> BuildRequest:
    """Every value rule of a build, before any work: one :class:`ZooConfigError` line.

    Why one place: ``kbit-zoo`` and :func:`build_family` must refuse the same inputs, and
    before anything is written (not the zoo folder, not a log folder). The family config
    (keys, types, sizes, counts, rates, corpus folder), the sizes asked for, the device, the
    thread count and the zoo folder are checked in turn; the corpus is read (its hash also
    proves it has the two documents a split needs), nothing is created.
    """
    cfg = load_family_config(name_or_cfg)
    if corpus is not None:
        cfg.corpus = str(corpus)
        cfg = load_family_config(cfg)  # validates (and expands) the override
    chosen = check_sizes(cfg, sizes)
    dev = check_device(device)
    n_threads = check_threads(threads)
    zoo = zoo_dir_path(zoo_dir)
    problem = writable_dir_problem(zoo if zoo_dir is None else zoo_dir, "zoo_dir")
    if problem:
        raise ZooConfigError(f"{problem}; allowed: a folder kbit-zoo may write (zoo_dir=...)")
    return BuildRequest(cfg, zoo, dev, chosen, n_threads, corpus_hash(cfg.corpus))
