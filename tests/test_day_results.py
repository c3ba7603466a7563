"""The researcher's day, evaluation side (issue 22): results tables, perplexity limit and
progress, the default zero-shot mean, and lm-eval's truncation warnings summarised.

Every value a table prints is checked against the cell's parquet file; perplexity under a
limit against a brute-force loss of the first windows; truncation counts against our own
tokenization of the requests.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from zoo_fixtures import nano_zoo, read_jsonl  # noqa: F401  (the session fixture)

from harness.records import MEAN_ZEROSHOT_TASK, STATUS_FAILED, Record, read_cell, write_cell
from harness.run.report import cell_summary, read_cells_frame, results_table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIZE = "l2d64"  # the nano model, passed by folder (the fixture's build, whatever its corpus)


def _kbit_run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    return subprocess.run([str(BIN / "kbit-run"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def _table_rows(stdout: str) -> list[list[str]]:
    """The data rows of a printed long table: the lines after its ``task metric ...`` head."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(r"\btask\s+metric\s+value", line))
    head = lines[start].split()
    rows = []
    for line in lines[start + 1 :]:
        parts = line.split()
        if len(parts) < len(head) or line.startswith(("file", "[")):
            break
        rows.append(parts)
    return [head, *rows]


def _close(printed: str, value: float | None, digits: int) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return printed == "-"
    return abs(float(printed) - value) <= 0.51 * 10**-digits + 1e-4 * abs(value)


def _check_table_against_file(stdout: str, path: Path) -> None:
    rows = _table_rows(stdout)
    head, body = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(head)}
    stored = read_cell(path).to_pandas()
    assert len(body) == len(stored), (stdout, stored[["task", "metric"]])
    for parts, (_, rec) in zip(body, stored.iterrows(), strict=True):
        assert parts[col["task"]] == rec["task"] and parts[col["metric"]] == rec["metric"]
        digits = 3 if rec["metric"] == "ppl" else 4
        assert _close(parts[col["value"]], rec["value"], digits), (parts, rec["value"])
        assert _close(parts[col["stderr"]], rec["stderr"], 4), (parts, rec["stderr"])
        assert int(parts[col["n"]]) == rec["n_samples"]
        assert parts[col["status"]] == rec["status"]


# ----------------------------------------------------------------------------- single cell
def test_single_cell_prints_its_results_and_summarises_truncation(nano_zoo, tmp_path):  # noqa: F811
    """A nano cell ends with a table holding exactly its parquet's values (again when it is
    already done); lm-eval's per-request truncation warnings become one line per task whose
    count equals our own count of the requests longer than the context."""
    folder = nano_zoo[SIZE]
    results = tmp_path / "r"
    args = [f"model={folder}", "eval=zoo", f"results_dir={results}"]
    first = _kbit_run(args, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (path,) = (results / "adhoc").glob("*.parquet")
    stored = read_cell(path).to_pandas()
    _check_table_against_file(first.stdout, path)
    header = next(line for line in first.stdout.splitlines() if line.startswith("cell "))
    assert path.stem in header
    for field in ("bits", "dtype", "method", "block_size"):
        assert f"{field}={stored[field].iloc[0]}" in header
    assert f"file: {path}" in first.stdout

    both = first.stdout + first.stderr
    assert "exceeds model's maximum length" not in both
    # our count for zoo_mc: lm-eval scores " " + choice after the query; a request is cut when
    # its tokens exceed the model's context + 1 (the last token is not fed)
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    context = AutoConfig.from_pretrained(folder).max_position_embeddings
    items = read_jsonl(folder / "kbit_eval" / "mc.jsonl")
    lengths = [len(tok(it["query"] + " " + c, add_special_tokens=False).input_ids)
               for it in items for c in it["choices"]]  # fmt: skip
    expected = sum(n > context + 1 for n in lengths)
    line = re.search(r"zoo_mc: (\d+) of (\d+) requests did not fit the model's (\d+)-token", both)
    if expected:
        assert line, both[-3000:]
        assert (int(line[1]), int(line[2]), int(line[3])) == (expected, len(lengths), context)
    else:
        assert line is None

    again = _kbit_run(args, tmp_path)  # already done: the stored results again
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already done" in again.stdout + again.stderr
    _check_table_against_file(again.stdout, path)


def test_limited_cell_mean_and_sweep_table(nano_zoo, tmp_path):  # noqa: F811
    """A multirun of 2 nano cells with eval.limit=4 prints a table naming every cell with
    its file's values; each cell scored 4 perplexity windows and 4 examples per task, and its
    zeroshot_mean (mean_of null) is the plain mean of its task accuracies."""
    results = tmp_path / "r"
    args = ["-m", f"model={nano_zoo[SIZE]}", "eval=zoo", "eval.limit=4", "bits=3,4",
            f"results_dir={results}", f"hydra.sweep.dir={tmp_path / 'multirun'}"]  # fmt: skip
    done = _kbit_run(args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    paths = sorted((results / "adhoc").glob("*.parquet"))
    assert len(paths) == 2
    rows = _table_rows(done.stdout)
    col = {name: i for i, name in enumerate(rows[0])}
    assert {"cell", "bits"} <= set(col)
    frame = read_cells_frame(paths)
    for parts in rows[1:]:
        rec = frame[(frame["cell_id"] == parts[col["cell"]]) & (frame["task"] == parts[col["task"]])
                    & (frame["metric"] == parts[col["metric"]])]  # fmt: skip
        assert len(rec) == 1, parts
        digits = 3 if parts[col["metric"]] == "ppl" else 4
        assert _close(parts[col["value"]], rec["value"].iloc[0], digits)
        assert int(parts[col["bits"]]) == rec["bits"].iloc[0]
    assert {p[col["cell"]] for p in rows[1:]} == {p.stem for p in paths}
    assert len(rows) - 1 == len(frame)

    seqlen = 64  # eval=zoo: seqlen null = the nano model's 64 positions
    for _, cell in frame.groupby("cell_id"):
        by = {(r.task, r.metric): r for r in cell.itertuples()}
        assert by[("heldout", "ppl")].n_samples == 4 * (seqlen - 1)
        assert by[("zoo_mc", "acc")].n_samples == 4 and by[("zoo_lastword", "acc")].n_samples == 4
        mean = by[(MEAN_ZEROSHOT_TASK, "acc")].value
        accs = [by[(t, "acc")].value for t in ("zoo_mc", "zoo_lastword")]
        assert mean == pytest.approx(sum(accs) / 2, abs=1e-12)

    compact = results_table(frame, max_lines=1)  # many cells: one line per cell, capped
    assert "... 1 more cells" in compact
    summary = cell_summary(frame)
    shown = summary.iloc[0]
    line = next(x for x in compact.splitlines() if x.startswith(shown["cell_id"]))
    assert f"{shown['heldout ppl']:.3f}" in line and f"{shown[MEAN_ZEROSHOT_TASK]:.4f}" in line


# ----------------------------------------------------------------------------- perplexity limit
@pytest.fixture(scope="module")
def nano_model(nano_zoo):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = nano_zoo[SIZE]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder), folder


@pytest.mark.parametrize("limit, keep", [(3, 3), (0.25, None)])
def test_perplexity_limit_is_the_first_windows(nano_model, limit, keep):
    """eval.limit=N scores the first N windows, a fraction the first ceil(f * windows):
    equal to a brute-force loss of exactly those windows."""
    from harness.evaluate import perplexity_details

    model, tok, folder = nano_model
    text = (folder / "kbit_eval" / "heldout.txt").read_text(encoding="utf-8")[:20000]
    seqlen = 32
    ids = tok(text, return_tensors="pt").input_ids[0]
    n_windows = ids.numel() // seqlen
    keep = keep or math.ceil(limit * n_windows)
    assert keep < n_windows
    with torch.no_grad():
        losses = [model(input_ids=ids[i * seqlen : (i + 1) * seqlen][None],
                        labels=ids[i * seqlen : (i + 1) * seqlen][None]).loss.item()
                  for i in range(keep)]  # fmt: skip
    res = perplexity_details(model, tok, text, seqlen, batch_size=2, limit=limit, progress=False)
    assert res.n_windows == keep and res.n_tokens == keep * (seqlen - 1)
    assert res.nll == pytest.approx(sum(losses) / keep, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(sum(losses) / keep), rel=1e-5)
    full = perplexity_details(model, tok, text, seqlen, batch_size=2, progress=False)
    assert full.n_windows == n_windows


def test_perplexity_progress_is_quiet(nano_model, monkeypatch):
    """A short perplexity on a non-terminal writes nothing; on a terminal the line is drawn
    in place and erased; a job log gets plain lines (no carriage returns) at most every
    LOG_INTERVAL_S."""
    from harness import progress
    from harness.evaluate import perplexity_details

    model, tok, folder = nano_model
    text = (folder / "kbit_eval" / "heldout.txt").read_text(encoding="utf-8")[:6000]

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    perplexity_details(model, tok, text, 32, batch_size=4, label="perplexity heldout")
    assert quiet.getvalue() == ""

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(progress, "REDRAW_S", 0.0)
    res = perplexity_details(model, tok, text, 32, batch_size=4, label="perplexity heldout")
    drawn = tty.getvalue()
    assert f"perplexity heldout: {res.n_windows}/{res.n_windows} windows" in drawn
    assert drawn.startswith("\r") and drawn.endswith("\r\x1b[K")  # erased at the end

    log_file = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log_file)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    perplexity_details(model, tok, text, 32, batch_size=4, label="perplexity heldout")
    lines = log_file.getvalue().splitlines()
    assert lines and "\r" not in log_file.getvalue()
    assert all(re.fullmatch(r"perplexity heldout: \d+/\d+ windows, ETA \S+", x) for x in lines)


# ----------------------------------------------------------------------------- truncation
def test_truncation_warnings_summarised_per_task(nano_model, caplog):
    """Each request lm-eval cuts is one warning of its own; inside truncation_summary none
    reaches a handler and one line per task gives the count, which equals our count of the
    requests whose tokens exceed the model's context + 1."""
    from lm_eval.api.instance import Instance

    from harness.evaluate.zeroshot import make_lm, truncation_summary

    model, tok, folder = nano_model
    words = (folder / "kbit_eval" / "heldout.txt").read_text(encoding="utf-8").split()
    pairs = {"short_task": [], "long_task": []}
    for i in range(40):
        n = 5 + 3 * i  # contexts from 5 to 122 words
        task = "long_task" if i % 2 else "short_task"
        pairs[task].append((" ".join(words[i : i + n]), " " + words[i + n]))
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=0,
                         metadata=(task, j, 1))
                for task, ps in pairs.items() for j, p in enumerate(ps)]  # fmt: skip
    lm = make_lm(model, tok, batch_size=8)
    context = model.config.max_position_embeddings
    expected = {task: sum(len(tok(c + x, add_special_tokens=False).input_ids) > context + 1
                          for c, x in ps) for task, ps in pairs.items()}  # fmt: skip
    assert all(expected.values())  # the case is real: both tasks have cut requests
    with caplog.at_level(logging.WARNING), truncation_summary(lm) as counter:
        lm.loglikelihood(requests, disable_tqdm=True)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "exceeds model's maximum length" in m]
    assert counter.requests == sum(expected.values())
    for task, n in expected.items():
        want = (f"{task}: {n} of {len(pairs[task])} requests did not fit the model's "
                f"{context}-token context and were truncated on the left (lm-eval)")  # fmt: skip
        assert want in messages, messages
    assert not hasattr(lm.__dict__, "loglikelihood") and "loglikelihood" not in lm.__dict__


# ----------------------------------------------------------------------------- mean_of and id
def test_mean_of_null_is_every_task_and_keeps_the_cell_id(nano_zoo, tmp_path):  # noqa: F811
    """mean_of null (the shipped configs) names the same cell as the tasks listed by hand, so
    stores made before null still resume; [] is another cell; a list naming a task that
    does not run is refused in one line. A limit on a cell with perplexity is a new id."""
    from hydra import compose, initialize_config_dir

    from harness.config.identity import cell_id
    from harness.config.schema import ConfigError, check_cell, mean_tasks, register_schema

    register_schema()
    base = [f"model={nano_zoo[SIZE]}", "eval=zoo", "device=cpu", f"results_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfgs = {name: compose("config", overrides=base + extra) for name, extra in {
            "null": [],
            "listed": ["eval.mean_of=[zoo_mc,zoo_lastword]"],
            "none": ["eval.mean_of=[]"],
            "limit_null": ["eval.limit=null"],
            "limit": ["eval.limit=4"],
            "one_task": ["eval.tasks=[zoo_mc]"],
            "bad": ["eval.mean_of=[zoo_mc,piqa]"],
        }.items()}  # fmt: skip
    assert cfgs["null"].eval.mean_of is None
    ids = {k: cell_id(v) for k, v in cfgs.items() if k != "bad"}
    assert ids["null"] == ids["listed"] == ids["limit_null"]
    assert len({ids["null"], ids["none"], ids["limit"], ids["one_task"]}) == 4
    assert mean_tasks(cfgs["one_task"].eval.tasks, None) == ["zoo_mc"]
    check_cell(cfgs["one_task"])  # one task, mean_of null: a valid cell (its mean = that task)
    with pytest.raises(ConfigError) as err:
        check_cell(cfgs["bad"])
    assert "\n" not in str(err.value) and "eval.mean_of" in str(err.value)
    assert "piqa" in str(err.value)


def test_limit_perplexity_false_scores_every_window_and_keeps_the_older_id(nano_zoo, tmp_path):  # noqa: F811
    """``eval.limit_perplexity=false`` (the shipped held-out sweeps): the limit caps the tasks
    only, as before issue 22, so the cell hashes exactly as it did then (no ``limit_scope``, the
    setting itself not hashed) and the runner scores every window."""
    from hydra import compose, initialize_config_dir

    from harness.config.identity import cell_config, cell_id
    from harness.config.schema import register_schema
    from harness.run.execute import perplexity_limit

    register_schema()
    base = [f"model={nano_zoo[SIZE]}", "eval=zoo", "device=cpu", f"results_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        both = compose("config", overrides=[*base, "eval.limit=4"])
        tasks = compose("config", overrides=[*base, "eval.limit=4", "eval.limit_perplexity=false"])
        demo = compose("config", overrides=["+sweeps@_global_=demo", *base])
    assert perplexity_limit(both.eval) == 4 and perplexity_limit(tasks.eval) is None
    assert demo.eval.limit == 200 and perplexity_limit(demo.eval) is None
    old_form, new_form = cell_config(tasks), cell_config(both)
    assert "limit_scope" not in old_form["eval"] and "limit_perplexity" not in old_form["eval"]
    assert old_form["eval"]["limit"] == 4
    # the two differ by the new key only: the older hash of a tasks-only limit is kept
    assert new_form["eval"].pop("limit_scope") == "tasks+perplexity"
    assert new_form == old_form
    assert cell_id(tasks) != cell_id(both)


# ----------------------------------------------------------------------------- failed rows
def test_table_shows_failed_rows_with_their_error(tmp_path):
    """A failed cell's row says failed and its first error line; the file path follows."""
    path = tmp_path / "adhoc" / "deadbeefdeadbeef.parquet"
    rec = Record(cell_id="deadbeefdeadbeef", model="m", bits=4, dtype="int", method="blockwise",
                 block_size=64, status=STATUS_FAILED,
                 error="OutOfMemoryError: CUDA out of memory\nTraceback ...")  # fmt: skip
    write_cell([rec], path)
    text = results_table(read_cells_frame([path, tmp_path / "missing.parquet"]))
    assert "failed: OutOfMemoryError: CUDA out of memory" in text
    assert "Traceback" not in text and f"file: {path}" in text
    assert results_table(pd.DataFrame()) == ""


def test_sweep_table_is_capped_and_reads_only_what_it_shows(tmp_path, monkeypatch):
    """Past max_lines cells: a line per cell for the first max_lines (their stored ppl and
    zeroshot_mean), then how many more; the files past the cap are never opened."""
    import harness.run.report as report

    paths = []
    for i in range(5):
        cid = f"{i:016x}"
        common = dict(cell_id=cid, model="m", bits=3 + i % 2, dtype="int", method="blockwise",
                      block_size=64)  # fmt: skip
        rows = [Record(**common, task="wikitext2", metric="ppl", value=10.0 + i, n_samples=127),
                Record(**common, task=MEAN_ZEROSHOT_TASK, metric="acc", value=0.5 + i / 100,
                       stderr=0.01, n_samples=40)]  # fmt: skip
        paths.append(write_cell(rows, tmp_path / "s" / f"{cid}.parquet"))
    opened = []
    real = report.read_cell
    monkeypatch.setattr(report, "read_cell", lambda p: opened.append(Path(p)) or real(p))
    out = io.StringIO()
    report.print_results(paths, out, max_lines=2)
    text = out.getvalue()
    assert opened == paths[:2]
    assert "... 3 more cells" in text
    for i, path in enumerate(paths):
        line = [x for x in text.splitlines() if x.startswith(path.stem)]
        if i < 2:
            assert (
                len(line) == 1
                and f"{10.0 + i:.3f}" in line[0]
                and f"{0.5 + i / 100:.4f}" in line[0]
            )
        else:
            assert not line


@pytest.mark.parametrize("value", ["2", "yes", "on"])
def test_limit_perplexity_takes_true_or_false_only(value):
    """The new boolean follows the command-line rule of every boolean (OmegaConf alone would
    read 2, yes or on as true): refused in one line naming the field, the value, what is
    allowed; true/false pass."""
    from harness.config.schema import ConfigError
    from harness.run.execute import prepare_command_line

    with pytest.raises(ConfigError) as err:
        prepare_command_line(["model=x", f"eval.limit_perplexity={value}"])
    assert str(err.value) == (
        f"eval.limit_perplexity={value} is not a boolean; allowed: true or false"
    )
    for ok in ("true", "false"):
        assert f"eval.limit_perplexity={ok}" in prepare_command_line(
            ["model=x", f"eval.limit_perplexity={ok}"]
        )
