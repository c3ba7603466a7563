"""The model card (README.md) and metadata (kbit_zoo.json) of a zoo model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def _loss_table(log_path: Path, rows: int = 8) -> str:
    points = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    keep = points[:: max(1, len(points) // rows)]
    if points and keep[-1] is not points[-1]:
        keep.append(points[-1])
    lines = ["| step | tokens | lr | train loss | val loss |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['step']} | {p['tokens']:,} | {p['lr']:.2e} | {p['train_loss']:.4f} | "
              f"{p['val_loss']:.4f} |" for p in keep]  # fmt: skip
    return "\n".join(lines)


def _fit_line(counts: dict) -> str:
    """What the card says about the examples' length in tokens (absent in older builds)."""
    if "context" not in counts:
        return (
            "\nThese files predate fitting the examples to the context: some may be longer "
            "than the model reads; run `kbit-zoo` for this family again to refit them."
        )
    return (
        f'\nEvery example fits the context: the longest `query + " " + choice` holds '
        f"{counts['mc_longest_tokens']} tokens and the longest passage "
        f"{counts['lastword_longest_tokens']} tokens, of {counts['context']} (recipe "
        f"{counts['recipe']})."
    )


def write_card(folder: Path, meta: dict) -> None:
    """README.md: corpus, tokens seen, validation loss, parameter counts, loss curve, config."""
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["kbit-zoo", meta["family"], meta["architecture"]]}  # fmt: skip
    s = meta["summary"]
    spec = f"zoo:{meta['family']}/{meta['size']}"
    if meta.get("checkpoint") and meta.get("train_tokens") != meta.get("final_tokens"):
        spec += f"@{meta['checkpoint']}"
        what = (
            f"This folder is the checkpoint after {s['tokens_seen']:,} of the "
            f"{meta['final_tokens']:,} training tokens (`@{meta['checkpoint']}`).\n\n"
        )
    else:
        what = ""
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---
# kbit zoo: {meta["family"]}/{meta["size"]}

A small {meta["architecture"]} causal LM trained from scratch by `kbit-zoo` as one member of
the `{meta["family"]}` family (models that differ only in size). Load it offline with
`AutoModelForCausalLM.from_pretrained(<this folder>)`, or use it in the harness as
`model={spec}`.

{what}
| | |
|---|---|
| corpus | {meta["corpus"]["name"]} (sha256 prefix `{meta["corpus"]["hash"]}`, {meta["corpus"]["train_docs"]} training / {meta["corpus"]["heldout_docs"]} held-out documents) |
| held-out documents | {", ".join(meta["corpus"]["heldout"])} |
| tokenizer | {meta["tokenizer"]} (vocabulary {meta["vocab_size"]}) |
| shape | {meta["shape"]["layers"]} layers, width {meta["shape"]["width"]}, {meta["shape"]["heads"]} heads, FFN {meta["shape"]["ffn"]} |
| parameters | {meta["n_params"]:,} total, {meta["n_nonembedding_params"]:,} non-embedding |
| tokens seen | {s["tokens_seen"]:,} ({s["steps"]} steps x {meta["batch_size"]} x {meta["context"]} tokens) |
| final validation loss | {s["final_val_loss"]:.4f} nats/token on {meta["val_tokens"]:,} held-out tokens |
| final train loss | {s["final_train_loss"]:.4f} |
| trained on | {meta["device"]} in {s["train_seconds"]} s |
| family hash / size hash | `{meta["family_hash"]}` / `{meta["size_hash"]}` |

## Loss curve (full log: train_log.jsonl)

{_loss_table(folder / "train_log.jsonl")}

## Held-out evaluation files (kbit_eval/)

- `heldout.txt`: held-out text for perplexity.
- `mc.jsonl` ({meta["eval_sets"]["mc_items"]} items): which continuation is the real one;
  score `query + " " + choice`; chance = 1/{meta["mc_choices"]}.
- `lastword.jsonl` ({meta["eval_sets"]["lastword_items"]} items): LAMBADA-style; the target is
  the last whitespace-separated word of `text`.
{_fit_line(meta["eval_sets"])}

## Family config

```yaml
{yaml.safe_dump(meta["config"], sort_keys=False).strip()}
```
"""
    (folder / "README.md").write_text(text, encoding="utf-8")
    (folder / "kbit_zoo.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
