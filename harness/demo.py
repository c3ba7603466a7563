"""``kbit-demo``: the README's main job, offline, from nothing to the k-bit scaling plot.

Three stages, each visible as it runs and each resumable (re-running skips finished work):

1. build (or reuse) the ``demo`` zoo family: 4 GPT-NeoX models trained on the corpus shipped
   inside the package, so a fresh machine without a network has everything it needs;
2. run ``sweeps/demo.yaml`` through ``kbit-run --multirun`` with Hydra's basic launcher (local
   and in-process, so consecutive cells of one model reuse the loaded model), writing one
   parquet file per cell into the result store;
3. ``kbit-plot`` the store: the scaling figures, the bit-optimal table and the headline
   figure, held-out loss against total model bits with paired per-window intervals
   (:func:`analysis.heldout.heldout_figures`), whose findings it prints.

The sweep runs in a child process, exactly the command a user would type, so the demo
exercises the same path as a real sweep (grid validation, resume, records).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("harness.demo")

SWEEP = "demo"
FAMILY = "demo"
HEADLINE = "heldout_bits.png"  # the figure the README opens with
FINDINGS = "heldout_findings.md"  # its numbers, which the README's caption quotes
# figure in --out -> its copy in the checkout's docs/img (the README shows both)
README_FIGURES = {HEADLINE: "demo_heldout.png", "scaling_acc.png": "demo_scaling.png"}


def checkout_figures() -> dict[str, Path]:
    """{figure in --out: its copy in docs/img/} of the source checkout kbit runs from.

    The README shows the figures the demo makes; an editable install in a checkout refreshes
    them. An installed wheel has no docs/ folder: then ``{}``, and nothing outside --out is
    written.
    """
    docs = Path(__file__).resolve().parents[1] / "docs"
    if not docs.is_dir():
        return {}
    return {name: docs / "img" / copy for name, copy in README_FIGURES.items()}


def findings_text(path: Path) -> str:
    """The '## Findings' bullets of the findings file (what the README caption quotes)."""
    text = path.read_text()
    start = text.find("## Findings")
    if start < 0:
        return ""
    body = text[start:].split("\n## ", 2)[0]
    return "\n".join(line for line in body.splitlines()[1:] if line.strip()) + "\n"


def sweep_command(
    results_dir: Path, zoo_dir: Path | None, family: str, extra: Sequence[str]
) -> list[str]:
    """The ``kbit-run --multirun`` command of the demo sweep (as the first line of its YAML).

    Another family replaces the sweep's model axis with every size of that family.
    """
    from harness.zoo.paths import family_sizes

    cmd = [sys.executable, "-m", "harness.run.execute", "--multirun", f"+sweeps@_global_={SWEEP}"]
    cmd.append(f"results_dir={results_dir}")
    if zoo_dir is not None:
        cmd.append(f"zoo_dir={zoo_dir}")
    if family != FAMILY:
        models = ",".join(f"zoo:{family}/{size}" for size in family_sizes(family))
        cmd.append(f"hydra.sweeper.params.model='{models}'")  # quoted: one value, not a sweep
    return cmd + list(extra)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kbit-demo",
        description="Build the demo model family, run the demo sweep offline, plot the results.",
    )
    p.add_argument("--results", default="results", help="result store (default: ./results)")
    p.add_argument("--out", default="figures", help="figures and tables (default: ./figures)")
    p.add_argument("--zoo-dir", help="model cache (default: $KBIT_ZOO_DIR or ~/.cache/kbit/zoo)")
    p.add_argument(
        "--corpus",
        help="train the family on this folder of .txt files instead of the packaged corpus "
        "(sets $KBIT_CORPUS_DIR for the sweep too, so zoo:demo/... resolves to this build)",
    )
    p.add_argument(
        "--family",
        default=FAMILY,
        help=f"zoo family to build and sweep (default: {FAMILY}; e.g. nano for a quick check)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for the family build"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="extra Hydra overrides for the sweep, e.g. eval.limit=50 or device=cuda",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kbit-demo``; returns the process exit status."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    from analysis.cli import plot_main  # deferred: keeps `kbit-demo --help` instant
    from harness.zoo import build_family

    results, out = Path(args.results).resolve(), Path(args.out).resolve()
    zoo_dir = Path(args.zoo_dir).resolve() if args.zoo_dir else None
    env = dict(os.environ)
    if args.corpus:
        env["KBIT_CORPUS_DIR"] = str(Path(args.corpus).resolve())
    start = time.time()

    log.info("1/3 building (or reusing) the %r model family", args.family)
    corpus = env.get("KBIT_CORPUS_DIR")
    build_family(args.family, zoo_dir=zoo_dir, corpus=corpus, threads=args.threads)
    built = time.time()

    cmd = sweep_command(results, zoo_dir, args.family, args.overrides)
    log.info("2/3 running the demo sweep: %s", " ".join(cmd[2:]))
    status = subprocess.run(cmd, env=env, check=False).returncode
    if status != 0:
        log.error("the demo sweep failed (exit %d); re-run kbit-demo to resume it", status)
        return status
    swept = time.time()

    log.info("3/3 plotting %s into %s", results, out)
    status = plot_main([str(results), "--out", str(out), "--sweep", SWEEP])
    if status != 0:
        return status
    if not (out / HEADLINE).is_file():  # kbit-plot draws it from per-window held-out losses
        log.warning(
            "no per-window held-out losses in %s (cells from before they were recorded?): "
            "held-out loss figure skipped; re-run those cells to get it",
            results,
        )
    # Only the stock demo (its family, its grid) may stand in for the README's figures.
    stock = args.family == FAMILY and not args.overrides
    for name, copy in (checkout_figures() if stock else {}).items():
        if (out / name).is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / name, copy)
            log.info("README figure refreshed: %s", copy)
    table = out / "bit_optimal_k.md"
    if table.is_file():
        sys.stdout.write(f"\nBit-optimal k per total-bit budget, accuracy ({table}):\n\n")
        sys.stdout.write(table.read_text() + "\n")
    if (out / FINDINGS).is_file():
        sys.stdout.write(f"\nHeld-out loss against total bits ({out / FINDINGS}):\n\n")
        sys.stdout.write(findings_text(out / FINDINGS) + "\n")
    log.info(
        "done in %.0f s (family %.0f s, sweep %.0f s, plots %.0f s); figures in %s",
        time.time() - start, built - start, swept - built, time.time() - swept, out,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
