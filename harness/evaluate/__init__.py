"""Evaluation: perplexity (GPTQ protocol) and zero-shot accuracy (lm-eval) of a model in memory."""

from harness.evaluate.datasets import check_text_file, load_text, text_source, token_ids
from harness.evaluate.perplexity import (
    PerplexityResult,
    limit_windows,
    perplexity,
    perplexity_details,
)
from harness.evaluate.task_catalog import (
    builtin_task_names,
    check_task_names,
    local_task,
    local_task_names,
    register_task_dir,
    task_cost,
)
from harness.evaluate.task_data import TaskSource, check_files, task_sources
from harness.evaluate.timing import ForwardTimer
from harness.evaluate.zeroshot import TaskResult, ZeroShotResult, evaluate_zeroshot, mean_accuracy

__all__ = [
    "ForwardTimer",
    "PerplexityResult",
    "TaskResult",
    "TaskSource",
    "ZeroShotResult",
    "builtin_task_names",
    "check_files",
    "check_task_names",
    "check_text_file",
    "evaluate_zeroshot",
    "limit_windows",
    "load_text",
    "local_task",
    "local_task_names",
    "mean_accuracy",
    "perplexity",
    "perplexity_details",
    "register_task_dir",
    "task_cost",
    "task_sources",
    "text_source",
    "token_ids",
]
