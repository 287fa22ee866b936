"""Loss tasks: each example's negative log-likelihood summed over its learned tokens (an instruction example's
responses and their EOS; every token of a text document), tokenised by SFT's own function, so the tokens scored are
the tokens a run trained on. Examples are batched by length, right-padded."""

from __future__ import annotations

import math
import time

import numpy as np

from finetune.evaluation.data import Rendering


def collate(rows: list[dict], pad_id: int, device) -> dict:
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def score(model, tokenizer, examples: list[dict], render: Rendering, batch_size: int, name: str, progress=None) -> dict:
    """{"items": example indices scored, "stats": (items x 2) array of (NLL sum, tokens), "nll", "ppl", "tokens",
    "data": SFT's counts (cut, dropped), "seconds"}."""
    from finetune.fused_loss import learned_token_nll
    from finetune.prompts import tokenize_examples

    kept: list[int] = []
    rows, data_stats = tokenize_examples(examples, render.data_config(), tokenizer, name, kept=kept)
    stats = np.zeros((len(rows), 2))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = collate([rows[i] for i in batch], tokenizer.pad_token_id, model.device)
        nll = learned_token_nll(model, inputs)
        learned = (inputs["labels"][:, 1:] != -100).sum(1)
        stats[batch, 0] = nll.sum(1).double().cpu().numpy()
        stats[batch, 1] = learned.cpu().numpy()
        if progress is not None:
            progress(len(batch))
    seconds = time.perf_counter() - started
    tokens = int(stats[:, 1].sum())
    nll = float(stats[:, 0].sum() / max(tokens, 1))
    return {
        "items": kept,
        "stats": stats,
        "nll": nll,
        "ppl": math.exp(min(nll, 50)),
        "tokens": tokens,
        "n": len(rows),
        "data": data_stats,
        "seconds": seconds,
        "examples_per_s": len(rows) / seconds if seconds else None,
        "tokens_per_s": sum(len(r["input_ids"]) for r in rows) / seconds if seconds else None,
    }
