"""Packed submitit launchers: one scheduler job per model chunk, arrays within the cluster's limits.

Why not hydra-submitit-launcher as it is: it makes one array task per cell (every cell loads
its model again), submits the whole grid as one array (Slurm refuses arrays larger than
``MaxArraySize``), and blocks until every job ends (the login shell must live for days).
These launchers keep its configuration schema, executor set-up and per-cell Hydra job (each
cell still runs through ``hydra.core.utils.run_job`` with its own overrides and job folder)
and change three things:

* a task runs a *chunk* of cells of one model, in one process: the model is loaded once
  (``harness.run``'s process-wide model cache) and restored to pristine between cells;
* the chunks are submitted as as many arrays as the cluster's ``MaxArraySize`` needs, one
  resource class (GPUs, memory, CPUs, time) at a time, each array throttled by
  ``array_parallelism``; a claim file per array records which task holds which cells
  (:mod:`harness.cluster.claims`);
* on Slurm the launch returns once everything is queued (``wait: false``, the default);
  ``hydra.launcher.wait=true`` keeps waiting, with one progress line, for scripts.

Hydra's plain ``launch(job_overrides)`` still works: one cell per task.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import (
    BaseQueueConf,
    LocalQueueConf,
    SlurmQueueConf,
)
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

from harness.cluster.claims import write_claims

log = logging.getLogger(__name__)


@dataclass
class PackedSlurmConf(SlurmQueueConf):
    """``hydra/launcher=slurm``: hydra-submitit-launcher's Slurm settings plus kbit's own."""

    _target_: str = "hydra_plugins.kbit_launcher.PackedSlurmLauncher"
    wait: bool = False  # true: block until every job ended (with a progress line), as scripts want
    poll_s: float = 15.0  # seconds between looks at the scheduler and the store while waiting


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
    ) -> list[JobReturn]:
        """Run the cells of one packed job, one Hydra job each, in this process.

        A cell's failure is recorded by the cell itself (its ``failed`` record); the chunk
        goes on. On a requeue the same chunk starts again and cells already ok are skipped
        by the runner after their validation.
        """
        results = []
        for offset, overrides in enumerate(chunk):
            num = first_num + offset
            results.append(
                BaseSubmititLauncher.__call__(
                    self,  # type: ignore[arg-type]
                    list(overrides),
                    "hydra.sweep.dir",
                    num,
                    f"job_id_for_{num}",
                    singleton_state,
                )
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
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for index, spec in enumerate(specs):
            groups.setdefault(tuple(sorted(spec.resources.items())), []).append(index)
        submission = Submission(jobs=[None] * len(specs))
        limit = self._array_limit()
        for key, members in groups.items():
            executor.update_parameters(**self._parameters(dict(key)))
            for part in _slices(len(members), limit):
                indices = [members[i] for i in part]
                jobs = self._submit(executor, specs, indices, nums, state, submission)
                for i, job in zip(indices, jobs, strict=True):
                    submission.jobs[i] = job
                array_id = str(jobs[0].job_id).split("_")[0]
                label = specs[indices[0]].label
                submission.arrays.append((array_id, len(indices), label))
                self._claim(array_id, [specs[i] for i in indices])
        return submission

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
            write_claims(results_dir, sweep, array_id, tasks, launcher=self._EXECUTOR)

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

    def _all_ended(self, submission: Submission, jobs: list[Any]) -> bool:
        """One ``squeue`` for every array (submitit's per-job ``sacct`` polling lags a minute)."""
        from harness.cluster.claims import SchedulerUnavailable, live_tasks, scheduler_states

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
