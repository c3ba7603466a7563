"""``python -m harness.evaluate --data-root DIR --out DIR``: write kbit's local lm-eval tasks
into a folder for ``lm_eval --include_path`` (see :mod:`harness.evaluate.tasks`)."""

from harness.evaluate.tasks import main

main()
