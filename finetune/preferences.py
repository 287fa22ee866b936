"""Preference data for DPO: load the datasets a recipe names, check every pair, render and tokenise them exactly as
SFT renders and tokenises the same conversation (prompts.py), cut them to max_length, hold some out.

Every format becomes one canonical pair:

    {"prompt": [turns ending on a user turn], "chosen": str, "rejected": str, "origin": "dataset 'x' record 7"}

Formats (`format` in a dataset spec; field names can be mapped with `columns`, as in SFT):
- `preference`: `prompt` (a string, or a list of messages) with `chosen` and `rejected` (strings, or message lists
  whose last turn is the answer, UltraFeedback style); without `prompt`, chosen and rejected are whole
  conversations that share every turn but the last (TRL's implicit prompt).
- `hh`: Anthropic's HH-RLHF transcripts, `chosen` and `rejected` as "\\n\\nHuman: ...\\n\\nAssistant: ..." text.
- `alpaca`: LLaMA-Factory's preference files, `instruction`, `input`, `chosen`, `rejected` (optional `system`,
  `history`).
- `sharegpt`: LLaMA-Factory's, `conversations` (from/value turns, ending on the human's) and `chosen`, `rejected`
  (a {from, value} turn or a string); llm-jp/hh-rlhf-12k-ja has this layout with string answers.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from finetune.config.dpo import PreferenceData, PreferenceSpec
from finetune.errors import DataError
from finetune.instructions import SHAREGPT_ROLES, describe, load_raw, nfkc

log = logging.getLogger(__name__)

FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "preference": (("chosen", "rejected"), ("prompt", "system")),
    "hh": (("chosen", "rejected"), ()),
    "alpaca": (("instruction", "chosen", "rejected"), ("input", "system", "history")),
    "sharegpt": (("conversations", "chosen", "rejected"), ("system",)),
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _get(record: dict, name: str, spec: PreferenceSpec, index: int) -> Any:
    column = spec.columns.get(name, name)
    if column not in record or record[column] is None:
        mapped = f" (mapped from '{name}')" if column != name else ""
        raise DataError(
            f"{describe(spec)}: record {index} has no '{column}'{mapped}; format '{spec.format}' needs fields "
            f"{', '.join(FORMAT_FIELDS[spec.format][0])}; the record has: {', '.join(sorted(record)) or 'none'}"
        )
    return record[column]


def _optional(record: dict, name: str, spec: PreferenceSpec) -> Any:
    return record.get(spec.columns.get(name, name))


def _messages(value: Any, where: str, what: str) -> list[dict]:
    """A message list ({role, content} or ShareGPT's {from, value}) as canonical turns."""
    if not isinstance(value, list):
        raise DataError(f"{where}: '{what}' must be a string or a list of messages, got {type(value).__name__}")
    turns = []
    for t, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: '{what}' turn {t} is not a message: {m!r}"[:300])
        role = m.get("role", SHAREGPT_ROLES.get(m.get("from")))
        content = m.get("content", m.get("value"))
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise DataError(
                f"{where}: '{what}' turn {t} needs role user/assistant/system and text content: {m!r}"[:300]
            )
        turns.append({"role": role, "content": content})
    return turns


def _answer(value: Any, where: str, what: str) -> tuple[list[dict], str]:
    """(the turns before the answer, the answer) of a chosen/rejected field: a string, one message, or a list."""
    if isinstance(value, str):
        return [], value
    if isinstance(value, dict):
        value = [value]
    turns = _messages(value, where, what)
    if not turns or turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: '{what}' must end with the assistant's answer")
    return turns[:-1], turns[-1]["content"]


def _hh(text: str, where: str, what: str) -> list[dict]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"{where}: '{what}' is not an HH-RLHF transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    turns = [
        {"role": "user" if who == "Human" else "assistant", "content": said.strip()}
        for who, said in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: '{what}' must end with an Assistant turn")
    return turns


def to_pair(record: dict, spec: PreferenceSpec, index: int) -> dict:
    """One raw record -> a canonical pair, or a DataError naming the dataset, the record and the field."""
    from finetune.instructions import _history
    from finetune.prompts import check_turns

    fmt, where = spec.format, f"{describe(spec)}: record {index}"
    chosen_raw, rejected_raw = _get(record, "chosen", spec, index), _get(record, "rejected", spec, index)
    system = _optional(record, "system", spec)
    prompt: list[dict] = [{"role": "system", "content": str(system)}] if system else []
    if fmt == "hh":
        if not isinstance(chosen_raw, str) or not isinstance(rejected_raw, str):
            raise DataError(f"{where}: HH-RLHF's chosen and rejected are transcripts (strings)")
        chosen_turns, rejected_turns = _hh(chosen_raw, where, "chosen"), _hh(rejected_raw, where, "rejected")
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise DataError(f"{where}: chosen and rejected transcripts differ before their last Assistant turn")
        prompt += chosen_turns[:-1]
        chosen, rejected = chosen_turns[-1]["content"], rejected_turns[-1]["content"]
    elif fmt == "alpaca":
        prompt += _history(_optional(record, "history", spec), spec, index)
        user = {"role": "user", "content": str(_get(record, "instruction", spec, index))}
        extra = _optional(record, "input", spec)
        if extra is not None and str(extra).strip():
            user["input"] = str(extra)
        prompt.append(user)
        (_, chosen), (_, rejected) = _answer(chosen_raw, where, "chosen"), _answer(rejected_raw, where, "rejected")
    elif fmt == "sharegpt":
        prompt += _messages(_get(record, "conversations", spec, index), where, "conversations")
        (_, chosen), (_, rejected) = _answer(chosen_raw, where, "chosen"), _answer(rejected_raw, where, "rejected")
    else:  # preference: explicit prompt, or the implicit one chosen and rejected share
        given = _optional(record, "prompt", spec)
        before_c, chosen = _answer(chosen_raw, where, "chosen")
        before_r, rejected = _answer(rejected_raw, where, "rejected")
        if given is None:
            if before_c != before_r or not before_c:
                raise DataError(
                    f"{where}: no 'prompt', and chosen and rejected don't share the turns before their answers "
                    "(an implicit prompt needs both conversations to differ only in the last turn)"
                )
            prompt += before_c
        else:
            asked = (
                [{"role": "user", "content": given}] if isinstance(given, str) else _messages(given, where, "prompt")
            )
            if before_c or before_r:  # UltraFeedback: the answers' lists repeat the conversation, prompt included
                if before_c != before_r or before_c[-len(asked) :] != asked:
                    raise DataError(
                        f"{where}: 'prompt' and the turns before the answers in 'chosen' and 'rejected' disagree"
                    )
                asked = before_c
            prompt += asked
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user turn")
    try:
        check_turns(prompt)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "origin": f"{describe(spec)} record {index}"}


def load_pairs(cfg: PreferenceData) -> tuple[list[dict], list[dict]]:
    """Load, check and mix the datasets; return (train, held-out) canonical pairs (held out before weighting)."""
    import random

    from finetune.instructions import _weighted, held_out_positions

    rng = random.Random(cfg.seed)
    per_dataset = []
    for spec in cfg.datasets:
        if spec.format not in FORMAT_FIELDS:
            known = ", ".join(FORMAT_FIELDS)
            raise DataError(f"{describe(spec)}: format '{spec.format}' is not a preference format ({known})")
        raw = load_raw(spec)
        if len(raw) == 0:
            raise DataError(f"{describe(spec)} has no records (split '{spec.split}')")
        order = list(range(len(raw)))
        if spec.max_samples is not None and spec.max_samples < len(raw):
            order = sorted(rng.sample(order, spec.max_samples))
        pairs = [to_pair(raw[i], spec, i) for i in order]
        required, optional = FORMAT_FIELDS[spec.format]
        used = {spec.columns.get(f, f) for f in required + optional}
        if spec.format == "preference":
            used |= {spec.columns.get("prompt", "prompt")}
        unused = sorted(set(raw.column_names) - used)
        if unused:  # said aloud, as SFT does: e.g. the bundled files' rejected_kind
            log.info("%s: column(s) not used by format '%s': %s", describe(spec), spec.format, ", ".join(unused))
        if cfg.nfkc:
            pairs = [_normalised(p) for p in pairs]
        per_dataset.append((spec, pairs))
    held = held_out_positions([len(p) for _, p in per_dataset], cfg.eval_size, rng, "pairs")  # SFT's rule
    train, evaluation = [], []
    for d, (spec, pairs) in enumerate(per_dataset):
        evaluation += [p for i, p in enumerate(pairs) if (d, i) in held]
        train += _weighted([p for i, p in enumerate(pairs) if (d, i) not in held], spec.weight, rng)
        log.info("%s: %d pairs", describe(spec), len(pairs))
    rng.shuffle(train)
    return train, evaluation


def _normalised(pair: dict) -> dict:
    turns = nfkc({"turns": pair["prompt"]})["turns"]
    answers = nfkc({"turns": [{"content": pair["chosen"]}, {"content": pair["rejected"]}]})["turns"]
    return pair | {"prompt": turns, "chosen": answers[0]["content"], "rejected": answers[1]["content"]}


# ----------------------------------------------------------------------------------------------------------
# Tokenising: SFT's rendering, then cut to max_length
# ----------------------------------------------------------------------------------------------------------


def tokenize_pairs(pairs: list[dict], cfg: PreferenceData, tokenizer, name: str = "train") -> tuple[list[dict], dict]:
    """Pairs -> rows of prompt_ids, chosen_ids, rejected_ids (what TRL's DPO collator takes), with the ids SFT and
    generation use: `prompt_ids + chosen_ids` is SFT's encoding of the conversation that ends with the chosen answer,
    and prompt_ids is what finetune.generate feeds for the prompt. Too long a pair keeps the prompt's end and each
    answer's start. Pairs with an empty answer, the same answer twice, or a prompt that fills max_length are
    dropped, and each is counted and listed by its record."""
    from finetune.prompts import encode_many

    problems = {"empty_answer": [], "identical_answers": [], "prompt_fills_max_length": []}
    usable = []
    for p in pairs:
        if not p["chosen"].strip() or not p["rejected"].strip():
            problems["empty_answer"].append(p["origin"])
        elif p["chosen"] == p["rejected"]:
            problems["identical_answers"].append(p["origin"])
        else:
            usable.append(p)
    style, system = cfg.prompt_style, cfg.system_prompt
    conversations = []
    for p in usable:
        conversations += [
            {"turns": p["prompt"]},
            {"turns": [*p["prompt"], {"role": "assistant", "content": p["chosen"]}]},
            {"turns": [*p["prompt"], {"role": "assistant", "content": p["rejected"]}]},
        ]
    encoded = encode_many(conversations, style, tokenizer, system) if conversations else []
    rows, cut, seams = [], 0, 0
    for k, p in enumerate(usable):
        prompt, chosen, rejected = (encoded[3 * k + j]["input_ids"] for j in range(3))
        n = len(prompt)
        if chosen[:n] != prompt or rejected[:n] != prompt:  # a token across the prompt's end: start where they part
            seams += 1
            n = min(_common(prompt, chosen), _common(prompt, rejected))
        row = {"prompt_ids": prompt[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}
        longest = max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        if len(row["prompt_ids"]) + longest > cfg.max_length:
            # the prompt keeps its end (what the answer follows), at most half the length when the answers need it
            keep = max(cfg.max_length - longest, cfg.max_length // 2)
            if len(row["prompt_ids"]) >= cfg.max_length:
                problems["prompt_fills_max_length"].append(p["origin"])
                continue
            row["prompt_ids"] = row["prompt_ids"][-keep:] if len(row["prompt_ids"]) > keep else row["prompt_ids"]
            room = cfg.max_length - len(row["prompt_ids"])
            row["chosen_ids"], row["rejected_ids"] = row["chosen_ids"][:room], row["rejected_ids"][:room]
            cut += 1
        rows.append(row)
    stats = {"pairs": len(pairs), "used": len(rows), "cut_to_max_length": cut, "prompt_answer_seams": seams}
    for kind, origins in problems.items():
        stats[kind] = len(origins)
        if origins:
            shown = "; ".join(origins[:10]) + (" ..." if len(origins) > 10 else "")
            log.warning("%s: %d pairs dropped (%s): %s", name, len(origins), kind.replace("_", " "), shown)
    stats["dropped"] = {k: v for k, v in problems.items() if v}
    if cut:
        kept = "the prompt's end, the answers' starts kept"
        log.warning("%s: %d pairs cut to data.max_length=%d (%s)", name, cut, cfg.max_length, kept)
    if not rows:
        raise DataError(f"{name}: no usable preference pair (see the counts above)")
    return rows, stats


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
