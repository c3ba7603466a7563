"""What a planned cell carries to its job: what packing needs of it, what a ``failed`` record
written for it says when it cannot start, and the plugins its job loads first.

Why its own module: the planner (:mod:`harness.sweep.plan`) takes this while it has each
cell's composed config, and the packer and the job read it; neither needs the other's code.
"""

from __future__ import annotations

from typing import Any

from harness.cluster.in_job import PLUGIN_MODULES
from harness.cluster.packing import cell_tokens


def cell_meta(cfg: Any, resolved: Any) -> dict[str, Any]:
    """What packing needs of a cell, taken while the planner has its composed config, and
    what a failed record written in its job says of it when the cell cannot start there
    (``record``: :data:`harness.cluster.in_job.RECORD_FIELDS`)."""
    device_class = str(getattr(resolved, "device_class", None) or "cpu")
    compute_dtype = str(getattr(resolved, "compute_dtype", None) or "float32")
    return {
        "model": str(cfg.model),
        "zoo_dir": str(cfg.get("zoo_dir") or ""),
        "trust_remote_code": bool(cfg.get("trust_remote_code", False)),
        "device": str(cfg.get("device") or "auto"),  # as configured: "auto" or explicit
        "device_class": device_class,
        "compute_dtype": compute_dtype,
        "tokens": cell_tokens(cfg),
        "record": _record_fields(cfg, device_class, compute_dtype),
        "plugins": [str(m) for m in (cfg.get("plugins") or [])],
    }


def _record_fields(cfg: Any, device_class: str, compute_dtype: str) -> dict[str, Any]:
    """The identity fields of a cell's record, as plain values (best effort: a field the
    config does not have is left out, and the record keeps its default)."""

    def name_of(value: Any) -> Any:
        return value.get("name") if hasattr(value, "get") else value

    fields: dict[str, Any] = {"device_class": device_class, "compute_dtype": compute_dtype}
    try:
        bits = int(cfg.get("bits"))
        baseline = bits == 16
        dtype, method = cfg.get("dtype"), cfg.get("method")
        fields.update(
            model=str(cfg.get("model")), bits=bits, centering=bool(cfg.get("centering")),
            scale_format=str(cfg.get("scale_format") or "fp16"),
            method="none" if baseline else str(name_of(method) or ""),
            dtype="none" if baseline else str(name_of(dtype) or ""),
            dtype_family="none" if baseline else str(
                (dtype.get("family") if hasattr(dtype, "get") else "") or ""),
            block_size=None if baseline else cfg.get("block_size"),
        )  # fmt: skip
        if cfg.get("model_family"):
            fields["model_family"] = str(cfg.get("model_family"))
    except (TypeError, ValueError, AttributeError, KeyError):
        pass
    return fields


def planned_cell(cell: Any) -> dict[str, Any]:
    """Where a planned cell's record goes, what its job writes there if the cell cannot
    start (:func:`harness.cluster.in_job.record_unrun_cell`), and the plugin modules its
    job loads before composing it (``plugin_modules``: the cell's ``plugins`` as planned)."""
    return {
        **dict(cell.meta.get("record") or {}),
        "results_dir": str(cell.results_dir),
        "sweep": str(cell.sweep),
        "cell_id": str(cell.cell_id),
        PLUGIN_MODULES: list(cell.meta.get("plugins") or []),
    }
