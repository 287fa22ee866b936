"""Prompt styles: canonical turns -> token ids and labels, with loss only on responses.

A style renders a conversation as segments `(text_or_ids, trained)`. Segments are tokenised one at a time
and concatenated, so the boundary between prompt (masked, label -100) and response (learned) is exact,
and the same segments without the last response are what `generate` feeds the model. EOS is appended to
every response by id, and kept in the labels, so the model learns to stop even when pad and EOS share an id
(padding is masked by the collator, never by comparing ids).
"""

from __future__ import annotations

import logging
from typing import Any

from finetune.errors import DataError

log = logging.getLogger(__name__)

IGNORE = -100

ALPACA = {
    "preamble": "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    "preamble_input": "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.",
    "instruction": "### Instruction:\n",
    "input": "### Input:\n",
    "response": "### Response:\n",
}
# The Japanese Alpaca-style prompt used by Japanese instruction-tuned LLaMA derivatives.
ALPACA_JA = {
    "preamble": "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。",
    "preamble_input": "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。"
    "要求を適切に満たす応答を書きなさい。",
    "instruction": "### 指示:\n",
    "input": "### 入力:\n",
    "response": "### 応答:\n",
}
# A common Japanese system prompt for Llama-2-chat style models (ELYZA's); set data.system_prompt to use it.
LLAMA2_JA_SYSTEM = "あなたは誠実で優秀な日本人のアシスタントです。"

Segment = tuple[Any, bool]  # (str text or list of token ids, trained?)


def _user_text(turn: dict) -> str:
    return turn["content"] + ("\n\n" + turn["input"] if turn.get("input") else "")


def _pairs(turns: list[dict]) -> tuple[str | None, list[tuple[dict, dict | None]]]:
    """Split turns into (system, [(user, assistant-or-None), ...]); checks the order."""
    system = None
    rest = turns
    if turns and turns[0]["role"] == "system":
        system, rest = turns[0]["content"], turns[1:]
    pairs: list[tuple[dict, dict | None]] = []
    i = 0
    while i < len(rest):
        user = rest[i]
        if user["role"] != "user":
            raise DataError(f"turn {i + (system is not None)}: expected a user turn, got {user['role']}")
        reply = rest[i + 1] if i + 1 < len(rest) else None
        if reply is not None and reply["role"] != "assistant":
            raise DataError(f"turn {i + 1 + (system is not None)}: expected an assistant turn, got {reply['role']}")
        pairs.append((user, reply))
        i += 2
    return system, pairs


def _alpaca(turns: list[dict], words: dict, eos: list[int], **_) -> list[Segment]:
    system, pairs = _pairs(turns)
    segments: list[Segment] = []
    for n, (user, reply) in enumerate(pairs):
        head = ""
        if n == 0:
            head = (system or words["preamble_input" if user.get("input") else "preamble"]) + "\n\n"
        prompt = head + words["instruction"] + user["content"] + "\n\n"
        if user.get("input"):
            prompt += words["input"] + user["input"] + "\n\n"
        prompt += words["response"]
        segments.append((("\n\n" if n else "") + prompt, False))
        if reply is not None:
            segments += [(reply["content"], True), (eos, True)]
    return segments


def _llama2(turns: list[dict], bos: list[int], eos: list[int], system_prompt: str | None, **_) -> list[Segment]:
    system, pairs = _pairs(turns)
    system = system or system_prompt
    segments: list[Segment] = []
    for n, (user, reply) in enumerate(pairs):
        text = _user_text(user)
        if n == 0 and system:
            text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
        if n:  # the first BOS is added for the whole sequence
            segments.append((bos, False))
        segments.append((f"[INST] {text} [/INST]", False))
        if reply is not None:
            segments += [(" " + reply["content"], True), (eos, True)]
    return segments


def _chatml(turns: list[dict], eos: list[int], system_prompt: str | None, **_) -> list[Segment]:
    system, pairs = _pairs(turns)
    system = system or system_prompt
    segments: list[Segment] = []
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    for n, (user, reply) in enumerate(pairs):
        sep = "\n" if n else ""
        segments.append((f"{sep}{head if n == 0 else ''}<|im_start|>user\n{_user_text(user)}<|im_end|>\n"
                         "<|im_start|>assistant\n", False))
        if reply is not None:
            segments += [(reply["content"] + "<|im_end|>", True), (eos, True)]
    return segments


def _chat_template(turns: list[dict], tokenizer, eos: list[int], system_prompt: str | None, **_) -> list[Segment]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.prompt_style=chat_template, but the tokenizer has no chat template")
    system, pairs = _pairs(turns)
    messages = [{"role": "system", "content": system or system_prompt}] if (system or system_prompt) else []
    segments: list[Segment] = []
    rendered = ""
    for user, reply in pairs:
        messages.append({"role": "user", "content": _user_text(user)})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        segments.append((prompt[len(rendered):], False))
        if reply is None:
            break
        messages.append({"role": "assistant", "content": reply["content"]})
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the tokenizer's chat template renders a conversation so that its prompt is not a "
                            "prefix of the whole; choose another data.prompt_style")
        answer = full[len(prompt):]
        segments.append((answer, True))
        if tokenizer.eos_token is None or not answer.rstrip().endswith(tokenizer.eos_token):
            segments.append((eos, True))
        rendered = full
    return segments


STYLES = {
    "alpaca": lambda turns, **kw: _alpaca(turns, ALPACA, **kw),
    "alpaca-ja": lambda turns, **kw: _alpaca(turns, ALPACA_JA, **kw),
    "llama2": _llama2,
    "chatml": _chatml,
    "chat_template": _chat_template,
}


def segments_for(example: dict, style: str, tokenizer, system_prompt: str | None = None) -> list[Segment]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if "text" in example:
        return [(bos, False), (example["text"], True), (eos, True)]
    body = STYLES[style](example["turns"], tokenizer=tokenizer, bos=bos, eos=eos, system_prompt=system_prompt)
    # chat templates write their own BOS; the other styles start with the tokenizer's
    return body if style == "chat_template" else [(bos, False), *body]


def encode(segments: list[Segment], tokenizer, train_on_prompt: bool = False) -> dict[str, list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for piece, trained in segments:
        ids = piece if isinstance(piece, list) else tokenizer(piece, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if (trained or train_on_prompt) else [IGNORE] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def prompt_ids(turns: list[dict], style: str, tokenizer, system_prompt: str | None = None) -> list[int]:
    """Token ids of a conversation that ends on a user turn, ready for `generate`."""
    if turns[-1]["role"] != "user":
        raise ValueError("the last turn of a prompt must be the user's")
    segments = segments_for({"turns": turns}, style, tokenizer, system_prompt)
    return encode(segments, tokenizer)["input_ids"]


def tokenize_examples(examples: list[dict], cfg, tokenizer, name: str = "train") -> tuple[list[dict], dict]:
    """Tokenise canonical examples with data config `cfg`; cut to max_length. Returns rows and counts.

    An example whose prompt alone fills max_length has nothing left to learn; it is dropped, and counted.
    """
    rows, cut, dropped = [], 0, []
    for i, example in enumerate(examples):
        try:
            row = encode(segments_for(example, cfg.prompt_style, tokenizer, cfg.system_prompt), tokenizer,
                         cfg.train_on_prompt)
        except DataError as e:
            raise DataError(f"{name} example {i}: {e}") from None
        if len(row["input_ids"]) > cfg.max_length:
            cut += 1
            row = {k: v[: cfg.max_length] for k, v in row.items()}
        if all(label == IGNORE for label in row["labels"][1:]):
            dropped.append(i)
            continue
        rows.append(row)
    stats = {"examples": len(examples), "cut_to_max_length": cut, "dropped_prompt_fills_max_length": len(dropped)}
    if cut or dropped:
        log.warning(
            "%s: %d of %d examples were cut to data.max_length=%d; %d dropped because the prompt alone fills it%s",
            name, cut, len(examples), cfg.max_length, len(dropped), f" (indices {dropped[:10]})" if dropped else "")
    if not rows:
        raise DataError(f"{name}: no example has a response within data.max_length={cfg.max_length}")
    return rows, stats
