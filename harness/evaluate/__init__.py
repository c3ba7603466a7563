"""Evaluation: perplexity (GPTQ protocol) and zero-shot accuracy (lm-eval) of a model in memory."""

from harness.evaluate.datasets import load_text, token_ids
from harness.evaluate.perplexity import PerplexityResult, perplexity, perplexity_details
from harness.evaluate.timing import ForwardTimer
from harness.evaluate.zeroshot import TaskResult, ZeroShotResult, evaluate_zeroshot, mean_accuracy

__all__ = [
    "ForwardTimer",
    "PerplexityResult",
    "TaskResult",
    "ZeroShotResult",
    "evaluate_zeroshot",
    "load_text",
    "mean_accuracy",
    "perplexity",
    "perplexity_details",
    "token_ids",
]
