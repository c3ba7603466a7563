"""Deterministic training of one zoo model: AdamW, warmup + cosine, random windows.

Determinism: the initial weights come from a seed derived from (family seed, size name), the
training windows from a separate seeded generator, dropout is off, and torch's deterministic
algorithms are switched on for the duration of the run. Same config + seed + device + thread
count give bit-identical weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.zoo.config import OptimizerConfig

log = logging.getLogger(__name__)


@dataclass
class TrainPlan:
    """What one size trains on and for how long."""

    steps: int
    batch_size: int
    context: int
    lr: float
    optimizer: OptimizerConfig
    eval_every: int
    seed: int


@contextmanager
def deterministic():
    """Switch on torch's deterministic algorithms and restore the previous setting after."""
    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed on CUDA
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def lr_at(step: int, plan: TrainPlan) -> float:
    """Linear warmup to plan.lr, then cosine decay to min_lr_ratio x plan.lr."""
    warmup = max(1, int(plan.optimizer.warmup_frac * plan.steps))
    if step < warmup:
        return plan.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, plan.steps - warmup)
    floor = plan.optimizer.min_lr_ratio
    return plan.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, plan: TrainPlan) -> torch.optim.Optimizer:
    # Weight decay on matrices only (not on norms and biases), the GPT/Pythia convention.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": plan.optimizer.weight_decay},
              {"params": other, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=plan.lr, betas=tuple(plan.optimizer.betas))


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, val: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over the fixed validation windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val), batch_size):
        chunk = val[i : i + batch_size]
        total += _loss(model, chunk).item() * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def val_windows(
    stream: np.ndarray, context: int, n_tokens: int, device: torch.device
) -> torch.Tensor:
    """Non-overlapping (context + 1)-token windows from the start of the held-out stream."""
    n = max(1, min(len(stream) - 1, n_tokens) // (context + 1))
    ids = torch.from_numpy(stream[: n * (context + 1)].astype(np.int64))
    return ids.view(n, context + 1).to(device)


def train(
    model: torch.nn.Module,
    stream: np.ndarray,
    val: torch.Tensor,
    plan: TrainPlan,
    log_path: Path,
    desc: str,
    checkpoints: dict[int, Callable[[torch.nn.Module, dict], None]] | None = None,
) -> dict:
    """Train in place; append loss points to ``log_path`` (JSON lines); return a summary.

    ``checkpoints``: step count -> callback(model, loss point), called right after that
    optimizer step with a validation point measured there. Saving a checkpoint reads the
    weights only (no random numbers are drawn), so the trained weights are the same with or
    without checkpoints.
    """
    checkpoints = checkpoints or {}
    device = next(model.parameters()).device
    data = torch.from_numpy(stream.astype(np.int64))
    if len(data) <= plan.context + 1:
        raise ValueError(f"training stream has {len(data)} tokens; need > context + 1")
    gen = torch.Generator().manual_seed(plan.seed)
    opt = _optimizer(model, plan)
    offsets = torch.arange(plan.context + 1)
    start, running = time.time(), []
    model.train()
    with open(log_path, "w", encoding="utf-8") as logf, deterministic():
        bar = tqdm(range(plan.steps), desc=desc, unit="step", mininterval=2.0)
        for step in bar:
            lr = lr_at(step, plan)
            for group in opt.param_groups:
                group["lr"] = lr
            starts = torch.randint(
                0, len(data) - plan.context - 1, (plan.batch_size, 1), generator=gen
            )
            loss = _loss(model, data[starts + offsets].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), plan.optimizer.grad_clip)
            opt.step()
            running.append(loss.item())
            last = step == plan.steps - 1
            keep = checkpoints.get(step + 1)
            if (step + 1) % plan.eval_every == 0 or last or keep is not None:
                point = {"step": step + 1, "tokens": (step + 1) * plan.batch_size * plan.context,
                         "lr": lr, "train_loss": float(np.mean(running)),
                         "val_loss": validation_loss(model, val, plan.batch_size),
                         "seconds": round(time.time() - start, 2)}  # fmt: skip
                logf.write(json.dumps(point) + "\n")
                logf.flush()
                bar.set_postfix(train=f"{point['train_loss']:.3f}", val=f"{point['val_loss']:.3f}")
                running = []
                if keep is not None:
                    keep(model, point)
                    model.train()
    return {
        "steps": plan.steps,
        "tokens_seen": plan.steps * plan.batch_size * plan.context,
        "final_val_loss": point["val_loss"],
        "final_train_loss": point["train_loss"],
        "train_seconds": round(time.time() - start, 1),
    }
