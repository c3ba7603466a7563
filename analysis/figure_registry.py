"""Figures declared once: a name, the function that draws it and the output path that saves it.

Every figure that an analysis command writes is one :class:`FigureSpec` registered here with
:func:`register_figure`; the commands list them (:func:`registered_figures`) instead of keeping
names of their own. Four output paths draw figures, each from its own input:

========== ================================================ ================================
path       input passed to ``build`` / ``skip_reason``        drawn by
========== ================================================ ================================
``plot``   :class:`analysis.plot_figures.PlotInputs`         ``kbit-plot`` (one file per
           (cells, k, perplexity column, cap, main curves)   format; ``{k}`` in the name is
                                                             filled with ``--k``)
``heldout`` :class:`analysis.heldout.HeldoutLoss`            ``kbit-plot`` (held-out loss)
``fit``    :class:`analysis.fit.FitReport`                   ``kbit-fit``
``claims`` :class:`analysis.claims.Report`                   ``kbit-plot --report``
========== ================================================ ================================

``build`` returns a :class:`matplotlib.figure.Figure`, or None when its data compare nothing
(the command then writes nothing for it and says so in one INFO line); ``skip_reason``, where
given, says before drawing why there is nothing to draw (None: draw).

A plugin adds a figure by calling :func:`register_figure` when it is imported (an entry point
of the ``kbit.plugins`` group, loaded by :func:`load_figure_plugins` before a command lists its
figures)::

    from analysis.figure_registry import register_figure

    @register_figure("my_bits_k{k}", path="plot", description="my view at fixed k")
    def my_figure(inputs):  # analysis.plot_figures.PlotInputs
        ...
        return fig  # or None

Names are unique across paths (they are file names in one output folder); registering a
taken name raises :class:`ValueError` unless ``replace=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

FIGURE_PATHS = ("plot", "heldout", "fit", "claims")

Builder = Callable[[Any], Figure | None]
SkipReason = Callable[[Any], str | None]


@dataclass(frozen=True)
class FigureSpec:
    """One registered figure (see the module docstring for what each path passes)."""

    name: str  # file stem; "{k}" is filled with kbit-plot's --k on the plot path
    build: Builder
    path: str = "plot"
    skip_reason: SkipReason | None = None
    description: str = ""

    def file_name(self, k: int | None = None) -> str:
        """The file stem, ``{k}`` filled in where the path has a k."""
        return self.name.format(k=k) if k is not None else self.name


_REGISTRY: dict[str, FigureSpec] = {}


def register_figure(
    name: str,
    *,
    path: str = "plot",
    skip_reason: SkipReason | None = None,
    description: str = "",
    replace: bool = False,
) -> Callable[[Builder], Builder]:
    """Decorator: register ``build`` as figure ``name`` of output path ``path``.

    Returns the function unchanged, so a figure function stays callable on its own. Refuses
    (ValueError) an unknown path and a name already registered (unless ``replace``).
    """
    if path not in FIGURE_PATHS:
        raise ValueError(f"figure {name!r}: path={path!r}; allowed: {list(FIGURE_PATHS)}")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"figure name {name!r}: must be a plain file stem")

    def decorator(build: Builder) -> Builder:
        if name in _REGISTRY and not replace and _REGISTRY[name].build is not build:
            raise ValueError(
                f"figure {name!r} is already registered (path {_REGISTRY[name].path!r}); "
                "pass replace=True to replace it"
            )
        _REGISTRY[name] = FigureSpec(name, build, path, skip_reason, description)
        return build

    return decorator


def unregister_figure(name: str) -> None:
    """Remove figure ``name`` (a test or a plugin taking one back); KeyError if unknown."""
    del _REGISTRY[name]


def registered_figures(path: str | None = None) -> list[FigureSpec]:
    """The figures of ``path`` (all paths when None), in registration order."""
    if path is not None and path not in FIGURE_PATHS:
        raise ValueError(f"path={path!r}; allowed: {list(FIGURE_PATHS)}")
    return [s for s in _REGISTRY.values() if path is None or s.path == path]


def figure_spec(name: str) -> FigureSpec:
    """The figure registered as ``name`` (KeyError naming the registered ones if none)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no figure {name!r}; registered: {sorted(_REGISTRY)}") from None


def load_figure_plugins() -> None:
    """Load the ``kbit.plugins`` entry points (:func:`harness.plugins.load_plugins`), so that
    the figures they register are listed. Why at call time: listing figures is the one moment
    a command needs them, and importing plugins at import time would be a side effect of
    ``import``. Raises :class:`harness.plugins.PluginError` (a ValueError, one line) for a
    plugin that cannot be loaded."""
    from harness.plugins import load_plugins

    load_plugins()


def save_registered(
    spec: FigureSpec,
    inputs: Any,
    out: str | Path,
    save: Callable[..., list[Path]],
    name: str | None = None,
    formats: tuple[str, ...] | None = None,
) -> list[Path] | None:
    """Build ``spec`` from ``inputs`` and save it with ``save(fig, out, name, formats=...)``;
    None (nothing written) when the figure declines (its build returned None).

    ``save`` is the caller's :func:`analysis.figures.save_figure` (passed in, so that a
    command's own reference to it is the one used)."""
    fig = spec.build(inputs)
    if fig is None:
        return None
    kwargs = {} if formats is None else {"formats": formats}
    return save(fig, out, name or spec.name, **kwargs)
