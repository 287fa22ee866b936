"""Generation tasks: each item's prompt (the turns before its last answer) rendered with the task's prompt style into
the token ids training put before a response (prompts.encode_many, the ids finetune.generate feeds), answered by
finetune.generate's batched generation, and each answer cut at EOS and the style's end of turn."""

from __future__ import annotations

import logging
import time

from finetune.config.eval import TaskSpec
from finetune.evaluation.data import Rendering, prompt_and_reference

log = logging.getLogger(__name__)


def user_text(turns: list[dict]) -> str:
    """The last user turn as a reader would see it: its text and, after a blank line, its input."""
    last = turns[-1]
    return last["content"] + (f"\n\n{last['input']}" if last.get("input") else "")


def score(
    model, tokenizer, examples: list[dict], render: Rendering, task: TaskSpec, batch_size: int, seed: int, progress=None
) -> dict:
    """{"prompts", "references", "predictions", "new_tokens", "prompts_cut", "seconds", ...} in the examples' order."""
    import torch

    from finetune.generate import decode, generate_ids, stop_ids
    from finetune.prompts import encode_many

    items = [prompt_and_reference(e) for e in examples]
    encoded = encode_many(
        [{"turns": turns} for turns, _ in items], render.prompt_style, tokenizer, render.system_prompt
    )
    room = max(render.max_length - task.max_new_tokens, 1)
    prompt_ids = [row["input_ids"][-room:] for row in encoded]  # the prompt's end is what the answer follows
    cut = sum(len(row["input_ids"]) > room for row in encoded)
    if cut:
        log.warning(
            "task '%s': %d prompts were longer than max_length - max_new_tokens = %d tokens; their start was dropped",
            task.name,
            cut,
            room,
        )
    torch.manual_seed(seed)
    started = time.perf_counter()
    new = generate_ids(
        model,
        tokenizer,
        prompt_ids,
        task.max_new_tokens,
        task.do_sample,
        task.temperature,
        task.top_p,
        batch_size,
        progress,
    )
    seconds = time.perf_counter() - started
    new_tokens = sum(len(n) for n in new)
    return {
        "prompts": [user_text(turns) for turns, _ in items],
        "references": [ref for _, ref in items],
        "predictions": [decode(tokenizer, render.prompt_style, n) for n in new],
        "prompt_tokens": sum(len(p) for p in prompt_ids),
        "new_tokens": new_tokens,
        "stopped": sum(bool(n) and n[-1] in stop_ids(model, tokenizer) for n in new),
        "prompts_cut": cut,
        "n": len(items),
        "seconds": seconds,
        "examples_per_s": len(items) / seconds if seconds else None,
        "tokens_per_s": new_tokens / seconds if seconds else None,
    }
