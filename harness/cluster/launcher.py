"""Packed submitit launchers: one scheduler job per model chunk, arrays within the cluster's limits.

Why not hydra-submitit-launcher as it is: it makes one array task per cell (every cell loads
its model again), submits the whole grid as one array (Slurm refuses arrays larger than
``MaxArraySize``), and blocks until every job ends (the login shell must live for days).
These launchers keep its configuration schema, executor set-up and per-cell Hydra job (each
cell still runs through ``hydra.core.utils.run_job`` with its own overrides and job folder)
and change three things:

* a task runs a *chunk* of cells of one model, in one process: the model is loaded once
  (``harness.run.execute``'s process-wide model cache) and restored to pristine between cells;
* the chunks are submitted as as many arrays as the cluster's ``MaxArraySize`` needs, one
  resource class (GPUs, memory, CPUs, time) at a time, each array throttled by
  ``array_parallelism``; a claim file per array records which task holds which cells
  (:mod:`harness.cluster.leases`);
* on Slurm the launch returns once everything is queued (``wait: false``, the default);
  ``hydra.launcher.wait=true`` keeps waiting, with one progress line, for scripts.

Its schema adds ``srun_args`` (submitit's arguments for the job's ``srun`` line, e.g. a
container runtime), which hydra-submitit-launcher's lacks, and :meth:`sbatch_script` gives the
batch script of the first array as submitit would submit it (shown by a dry run).

Hydra's plain ``launch(job_overrides)`` still works: one cell per task.

A cell that cannot even start inside its job (its config does not compose there, a data type
family registered only in the launching process, an import error, an exception while
validating it) has no record of its own. The job then writes a ``failed`` record for it under
its planned id (:func:`harness.cluster.in_job.record_unrun_cell`, from the plan the launcher handed the job), runs the
rest of its chunk, and ends with an error (:class:`~harness.cluster.in_job.UnrunCells`: a non-zero exit, no "completed
successfully" in its log). A launcher that waits reads the error line of every job that left a
cell without a record (:func:`harness.cluster.in_job.job_error_line`: its result, else its log) and writes the
failed records itself where the job could not.

Plugins: before composing each cell, the job loads the plugins the cell names (its
``plugins`` list as the planner composed it, and the ``kbit.plugins`` entry points)
(:func:`harness.cluster.in_job.load_cell_plugins`), so a family, method or
figure registered by a user's module exists in the job as it did where the sweep was planned.

Why one module: it is one Hydra launcher plugin (its two config schemas, the shared mixin and
the Slurm and local launchers that hydra_plugins.kbit_launcher registers); submitit pickles the
launcher object into each job, so its submitting and its job-side methods are one class. What
runs around each cell in the job lives in :mod:`harness.cluster.in_job`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import (
    BaseQueueConf,
    LocalQueueConf,
    SlurmQueueConf,
)
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

from harness.cluster.in_job import (
    UnrunCells,
    error_line,
    limit_threads,
    load_cell_plugins,
    process_age,
    record_inode,
    record_unrun_cell,
)
from harness.cluster.leases import write_claims

log = logging.getLogger(__name__)


@dataclass
class PackedSlurmConf(SlurmQueueConf):
    """``hydra/launcher=slurm``: hydra-submitit-launcher's Slurm settings plus kbit's own."""

    _target_: str = "hydra_plugins.kbit_launcher.PackedSlurmLauncher"
    wait: bool = False  # true: block until every job ended (with a progress line), as scripts want
    poll_s: float = 15.0  # seconds between looks at the scheduler and the store while waiting
    # arguments added to the job's ``srun`` line before its Python (submitit's ``srun_args``;
    # hydra-submitit-launcher's schema lacks it): srun options (["--cpu-bind=none"]) or a
    # container runtime ([apptainer, exec, --nv, IMAGE]). An empty list adds nothing.
    srun_args: list[str] = field(default_factory=list)


@dataclass
class PackedLocalConf(LocalQueueConf):
    """``hydra/launcher=local``: submitit's local processes, packed like Slurm jobs."""

    _target_: str = "hydra_plugins.kbit_launcher.PackedLocalLauncher"
    wait: bool = True  # local processes are children of this one: always waited for
    poll_s: float = 2.0


class SubmissionError(RuntimeError):
    """The scheduler refused a submission. ``queued`` names the jobs that were queued before."""

    def __init__(self, message: str, queued: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.queued = list(queued)


@dataclass
class JobSpec:
    """What the sweeper hands the launcher for one job: its cells and its resources."""

    cells: list[list[str]]  # overrides of each cell, run in this order in one process
    claims: list[tuple[str, str, str]]  # (results_dir, sweep, cell_id) of each cell
    resources: dict[str, Any] = field(default_factory=dict)  # launcher params for this job
    label: str = ""  # e.g. "1 GPU, 32 GB, 8 CPU, 2h00" (for the plan printed before submitting)
    minutes: float = 0.0  # expected wall time of its cells
    model: str = ""  # the one model its cells share
    # per cell: where its record goes and what a failed record says when the cell cannot run
    # in the job ({"results_dir", "sweep", "cell_id", and record fields such as "model"})
    planned: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Submission:
    """What was queued: submitit jobs (one per packed job), and the arrays they form."""

    jobs: list[Any] = field(default_factory=list)  # submitit.Job, one per JobSpec, in order
    arrays: list[tuple[str, int, str]] = field(default_factory=list)  # (array id, tasks, label)

    @property
    def job_ids(self) -> list[str]:
        return [str(j.job_id) for j in self.jobs]


class _PackedMixin:
    """Chunk running and array submission shared by the Slurm and local launchers."""

    _EXECUTOR: str
    params: dict[str, Any]
    config: Any

    @property
    def waits(self) -> bool:
        return bool(self.params.get("wait", True))

    @property
    def poll_s(self) -> float:
        return float(self.params.get("poll_s", 10.0))

    # ------------------------------------------------------------------ in the job
    def __call__(  # type: ignore[override]
        self,
        chunk: list[list[str]],
        first_num: int,
        singleton_state: dict[type, Singleton],
        planned: Sequence[dict[str, Any]] | None = None,
    ) -> list[JobReturn]:
        """Run the cells of one packed job, one Hydra job each, in this process.

        A cell's failure is recorded by the cell itself (its ``failed`` record); the chunk
        goes on. On a requeue the same chunk starts again and cells already ok are skipped
        by the runner after their validation. A cell that raised before writing any record
        (composition, validation, an import inside the job) gets a ``failed`` record under
        its planned id (``planned[i]``) here; after the chunk the job raises
        :class:`UnrunCells`, so it does not end as "completed successfully".
        """
        started = time.monotonic()
        limit_threads(self.params.get("cpus_per_task"))
        results, unrun = [], []
        for offset, overrides in enumerate(chunk):
            num = first_num + offset
            target = planned[offset] if planned and offset < len(planned) else None
            before = record_inode(target)
            try:
                load_cell_plugins(overrides, target)  # before Hydra composes the cell
                ret = BaseSubmititLauncher.__call__(
                    self,  # type: ignore[arg-type]
                    list(overrides),
                    "hydra.sweep.dir",
                    num,
                    f"job_id_for_{num}",
                    singleton_state,
                )
            except Exception as err:  # loading its plugins or composing its config here
                ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
                ret.return_value = err
            results.append(ret)
            if ret.status != JobStatus.FAILED:
                continue
            err = ret._return_value
            line = error_line(err)
            log.error("cell %d of this job could not run: %s", offset, line, exc_info=err)
            if target is not None and record_inode(target) not in (before, None):
                unrun.append((line, "its own record"))  # the cell wrote one, then raised
                continue
            written = record_unrun_cell(target, line, err) if target else None
            unrun.append((line, written))
        log.info("job: %d cell(s) in %.1f s (process up %.1f s before the first cell)",
                  len(chunk), time.monotonic() - started, process_age(started))  # fmt: skip
        if unrun:
            recorded = sum(w is not None for _, w in unrun)
            raise UnrunCells(
                f"{len(unrun)} of {len(chunk)} cell(s) of this job could not run ({recorded} "
                f"failed record(s) written): {unrun[0][0]}"
            )
        return results

    # ------------------------------------------------------------------ submitting
    def _executor(self) -> Any:
        """A submitit executor set up as hydra-submitit-launcher sets it up."""
        import submitit

        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        executor.update_parameters(**self._parameters({}))
        return executor

    def _parameters(self, resources: dict[str, Any]) -> dict[str, Any]:
        """submitit parameter names for the launcher's settings with ``resources`` applied."""
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        skip = {"submitit_folder", "max_num_timeout", "wait", "poll_s", "_target_"}
        merged = {**self.params, **resources}
        return {
            (k if k in base else f"{self._EXECUTOR}_{k}"): v
            for k, v in merged.items()
            if k not in skip
        }

    def _array_limit(self) -> int | None:
        return None

    def _check_limits(self, n_jobs: int) -> None:
        """Raise :class:`SubmissionError` when the cluster would refuse ``n_jobs`` jobs."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        """Hydra's launcher interface: one cell per task, waited for (e.g. ``hydra/sweeper=basic``)."""
        specs = [JobSpec(cells=[list(o)], claims=[]) for o in job_overrides]
        submission = self.launch_packed(specs, initial_job_idx)
        return [r for job in submission.jobs for r in job.results()[0]]

    def launch_packed(self, specs: Sequence[JobSpec], initial_job_idx: int = 0) -> Submission:
        """Submit every packed job: one array per (resource class, ``MaxArraySize`` slice).

        Cluster limits are checked first, so a grid the scheduler would refuse queues
        nothing. A claim file is written right after each array is accepted.
        """
        assert self.config is not None
        self._check_limits(len(specs))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        executor = self._executor()
        state = Singleton.get_state()
        nums, num = [], initial_job_idx
        for spec in specs:
            nums.append(num)
            num += len(spec.cells)
        submission = Submission(jobs=[None] * len(specs))
        for resources, indices in self.arrays(specs):
            executor.update_parameters(**self._parameters(resources))
            jobs = self._submit(executor, specs, indices, nums, state, submission)
            for i, job in zip(indices, jobs, strict=True):
                submission.jobs[i] = job
            array_id = str(jobs[0].job_id).split("_")[0]
            label = specs[indices[0]].label
            submission.arrays.append((array_id, len(indices), label))
            self._claim(array_id, [specs[i] for i in indices])
        return submission

    def arrays(self, specs: Sequence[JobSpec]) -> list[tuple[dict[str, Any], list[int]]]:
        """The arrays :meth:`launch_packed` submits, in order: (resources, indices of ``specs``).

        One array per resource class (first seen first) and ``MaxArraySize`` slice; the dry
        run shows the first one's sbatch script from the same list.
        """
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for index, spec in enumerate(specs):
            groups.setdefault(tuple(sorted(spec.resources.items())), []).append(index)
        limit = self._array_limit()
        return [
            (dict(key), [members[i] for i in part])
            for key, members in groups.items()
            for part in _slices(len(members), limit)
        ]

    def sbatch_script(self, specs: Sequence[JobSpec]) -> str | None:
        """The batch script of the first array :meth:`launch_packed` would submit, as submitit
        writes it (None for a launcher without one, e.g. local processes).

        Why submitit's own text: what a user checks before spending GPU-hours (partition,
        account, ``--gpus-per-node``, time limit, setup lines, the ``srun`` line) must be what
        ``sbatch`` receives, not a template that may drift from it. Nothing is written.
        """
        return None

    def _submit(
        self,
        executor: Any,
        specs: Sequence[JobSpec],
        indices: list[int],
        nums: list[int],
        state: Any,
        submission: Submission,
    ) -> list[Any]:
        try:
            return executor.map_array(
                self,
                [specs[i].cells for i in indices],
                [nums[i] for i in indices],
                [state] * len(indices),
                [specs[i].planned for i in indices],
            )
        except Exception as err:  # sbatch's refusal, as submitit raises it
            queued = [a for a, _, _ in submission.arrays]
            text = " ".join(str(err).split())
            if len(text) > 400:
                text = text[:397] + "..."
            what = (
                "nothing was queued"
                if not queued
                else f"arrays {', '.join(queued)} were queued before and keep running; re-running "
                "the same command submits only the cells no live job holds"
            )
            raise SubmissionError(
                f"the scheduler refused a job array of {len(indices)} task(s): {text}; {what}",
                queued,
            ) from err

    def _claim(self, array_id: str, specs: Sequence[JobSpec]) -> None:
        """One claim file per (results folder, sweep) of the array's cells."""
        per_folder: dict[tuple[str, str], list[list[str]]] = {}
        for task, spec in enumerate(specs):
            for results_dir, sweep, cid in spec.claims:
                tasks = per_folder.setdefault((results_dir, sweep), [[] for _ in specs])
                tasks[task].append(cid)
        for (results_dir, sweep), tasks in per_folder.items():
            logs = self.params.get("submitit_folder")
            write_claims(results_dir, sweep, array_id, tasks, launcher=self._EXECUTOR, logs=logs)

    def finished(self, submission: Submission) -> Any:
        """A check ``() -> bool``: have all of ``submission``'s jobs ended? (asks at most
        once per ``poll_s``)."""
        jobs = list(submission.jobs)
        state = {"at": 0.0, "done": False}

        def check() -> bool:
            if not state["done"] and time.monotonic() - state["at"] >= self.poll_s:
                state["at"] = time.monotonic()
                state["done"] = self._all_ended(submission, jobs)
            return bool(state["done"])

        return check

    def _all_ended(self, submission: Submission, jobs: list[Any]) -> bool:
        return all(job.done() for job in jobs)


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], str]]:
    """File descriptor 2 goes to a temporary file for the duration (what child processes such
    as ``sbatch`` write there too); yields a function returning what was written so far."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)

        def text() -> str:
            tmp.flush()
            tmp.seek(0)
            return tmp.read().decode(errors="replace")

        try:
            yield text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _slices(n: int, limit: int | None) -> list[range]:
    """Consecutive index ranges of at most ``limit`` (None: one range)."""
    from harness.cluster.limits import array_slices

    return array_slices(n, limit)


class PackedSlurmLauncher(_PackedMixin, BaseSubmititLauncher):
    """``hydra/launcher=slurm``: packed jobs in arrays the cluster accepts, submit and return."""

    _EXECUTOR = "slurm"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._limits: Any = None

    def limits(self) -> Any:
        """The cluster's limits (``scontrol show config``, the user's association), read once."""
        if self._limits is None:
            from harness.cluster.limits import read_limits

            self._limits = read_limits()
        return self._limits

    def _array_limit(self) -> int | None:
        return self.limits().max_array_size

    def sbatch_script(self, specs: Sequence[JobSpec]) -> str | None:
        """The batch script of the first array, from submitit's Slurm executor set up exactly
        as :meth:`launch_packed` sets it up (the launcher's settings, the first array's
        resources, its task count as ``--array``); submitit builds an array's script the same
        way (a copy of the executor with ``map_count``) when it submits one.

        Why submitit's private methods (``_executor``, ``_make_submission_file_text``): it has
        no public way to render a script without submitting it. They are used here only;
        submitit's tested range is pinned in pyproject.toml (tests/test_versions.py)."""
        if not specs:
            return None
        resources, indices = self.arrays(specs)[0]
        executor = self._executor()
        executor.update_parameters(**self._parameters(resources))
        slurm = executor._executor  # submitit.SlurmExecutor behind the AutoExecutor
        if len(indices) > 1:  # submitit submits a single job without --array
            slurm = type(slurm)(slurm.folder, slurm.max_num_timeout)
            slurm.update_parameters(**executor._executor.parameters)
            slurm.parameters["map_count"] = len(indices)
        return slurm._make_submission_file_text(slurm._submitit_command_str, "dry-run")

    def _submit(
        self,
        executor: Any,
        specs: Sequence[JobSpec],
        indices: list[int],
        nums: list[int],
        state: Any,
        submission: Submission,
    ) -> list[Any]:
        """Submit one array with ``sbatch``'s own stderr captured: a refusal is then kbit's
        one line (which quotes the scheduler), not sbatch's lines printed beside it; what
        sbatch says about an accepted array is logged as a warning."""
        with _captured_stderr() as captured:
            try:
                return super()._submit(executor, specs, indices, nums, state, submission)
            finally:
                said = " ".join(captured().split())
                if said and not sys.exc_info()[0]:
                    log.warning("sbatch: %s", said[:400])

    def _all_ended(self, submission: Submission, jobs: list[Any]) -> bool:
        """One ``squeue`` for every array (submitit's per-job ``sacct`` polling lags a minute)."""
        from harness.cluster.leases import SchedulerUnavailable, live_tasks, scheduler_states

        try:
            states = scheduler_states()
        except SchedulerUnavailable as err:
            log.warning("cannot ask the scheduler (%s); asking submitit", err)
            return super()._all_ended(submission, jobs)
        return not live_tasks([a for a, _, _ in submission.arrays], states)

    def _check_limits(self, n_jobs: int) -> None:
        from harness.cluster.limits import submission_problem

        problem = submission_problem(n_jobs, self.limits())
        if problem:
            raise SubmissionError(problem)


class PackedLocalLauncher(_PackedMixin, BaseSubmititLauncher):
    """``hydra/launcher=local``: packed jobs as local processes (no scheduler), waited for."""

    _EXECUTOR = "local"

    @property
    def waits(self) -> bool:
        return True

    def _claim(self, array_id: str, specs: Sequence[JobSpec]) -> None:
        """No claim files: local processes are this command's children and end with it (a
        claim would send the next launch to a scheduler that does not know them)."""


def is_packed(launcher: Any) -> bool:
    """Whether the sweeper can hand ``launcher`` packed jobs."""
    return isinstance(launcher, _PackedMixin)
