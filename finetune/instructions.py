"""Instruction data: load the datasets a recipe names, check every record, mix them, hold some out.

Every format becomes one canonical shape, a list of turns:

    [{"role": "system"|"user"|"assistant", "content": str, "input": str (optional, user turns)}, ...]

or, for the `text` format, a plain document. `prompts.py` turns that into token ids and labels.
"""

from __future__ import annotations

import logging
import math
import unicodedata
from pathlib import Path
from typing import Any

from finetune.config.sft import DataConfig
from finetune.config.shared import DatasetSpec
from finetune.errors import DataError, HubUnreachableError
from finetune.offline import hub_message, is_hub_id

log = logging.getLogger(__name__)

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

# Each format's fields: (required, optional). `columns` in a spec maps these names to the dataset's own.
# `system` and `history` follow LLaMA-Factory's dataset conventions (dataset_info.json), which many Hub sets use.
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "alpaca": (("instruction", "output"), ("input", "system", "history")),
    "dolly": (("instruction", "response"), ("context", "system", "history")),
    "conversations": (("conversations",), ("system",)),
    "messages": (("messages",), ("system",)),
    "text": (("text",), ()),
}
RESPONSE_FIELD = {"alpaca": "output", "dolly": "response", "conversations": "conversations", "messages": "messages"}

# Fields that carry training meaning the suite can't honour: refused, unless a spec lists them in ignore_fields.
_MULTIMODAL = "the suite trains text-only LLaMA models, which can't see {field}"
_TOOLS = "tool descriptions and calls are not rendered by the prompt styles, so the model would never see them"
REFUSED_FIELDS = {
    "label": "a KTO label (an answer marked good or bad): SFT would learn the bad answers as good ones",
    "kto_tag": "a KTO label (an answer marked good or bad): SFT would learn the bad answers as good ones",
    "chosen": "a preference pair (chosen/rejected), which is DPO data",
    "rejected": "a preference pair (chosen/rejected), which is DPO data",
    **{f: _MULTIMODAL for f in ("images", "image", "videos", "video", "audios", "audio")},
    **{f: _TOOLS for f in ("tools", "functions", "tool_calls")},
}
TOOL_ROLES = {"function_call", "observation", "tool", "function", "ipython"}

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES = ("system", "user", "assistant")


def describe(spec: DatasetSpec) -> str:
    return f"dataset '{spec.path}'" + (f" (config {spec.name})" if spec.name else "")


def load_raw(spec: DatasetSpec):
    """Load one spec as a `datasets.Dataset`: a local file, or a Hub dataset by ID."""
    import datasets

    if not is_hub_id(spec.path):
        path = Path(spec.path)
        if not path.is_file():
            raise DataError(f"{describe(spec)}: file not found ({path.resolve()})")
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{describe(spec)}: unsupported file type '{path.suffix}', expected one of " + ", ".join(LOCAL_BUILDERS)
            )
        kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except Exception as e:  # pyarrow/json errors: report the file, not a 40-frame traceback
            raise DataError(f"{describe(spec)}: could not read {path} as {builder}: {e}") from None
    try:
        return datasets.load_dataset(spec.path, spec.name, split=spec.split, revision=spec.revision)
    except Exception as e:
        raise HubUnreachableError(hub_message(f"dataset '{spec.path}'", e)) from None


def _field(record: dict, name: str, spec: DatasetSpec, index: int, required: bool) -> Any:
    column = spec.columns.get(name, name)
    value = record.get(column)
    if value is None or (isinstance(value, str) and required and not value.strip()):
        if not required:
            return None
        mapped = f" (mapped from '{name}')" if column != name else ""
        present = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"{describe(spec)}: record {index} has no '{column}'{mapped} (or it is empty); "
            f"format '{spec.format}' needs fields {', '.join(FORMAT_FIELDS[spec.format][0])}; "
            f"the record has: {present}"
        )
    return value


def _used_columns(spec: DatasetSpec) -> set[str]:
    required, optional = FORMAT_FIELDS[spec.format]
    return {spec.columns.get(f, f) for f in required + optional}


def _empty(value: Any) -> bool:
    # LLaMA-Factory writes "no tools" as the JSON string "[]"
    return value in (None, [], {}) or (isinstance(value, str) and value.strip() in ("", "[]", "{}"))


def _check_refused(record: dict, spec: DatasetSpec, index: int, ignored: dict[str, int]) -> None:
    """Refuse a record holding a field the suite can't honour, unless the spec ignores it (then count it)."""
    used = _used_columns(spec)
    found = [f for f in REFUSED_FIELDS if f in record and f not in used and not _empty(record[f])]
    for f in found:
        if f in spec.ignore_fields:
            ignored[f] = ignored.get(f, 0) + 1
    found = [f for f in found if f not in spec.ignore_fields]
    if not found:
        return
    where = f"{describe(spec)}: record {index}"
    if {"chosen", "rejected"} & set(found):
        response = RESPONSE_FIELD.get(spec.format, "output")
        raise DataError(
            f"{where} has 'chosen' and 'rejected': {REFUSED_FIELDS['chosen']}, which SFT can't learn as one "
            "answer: train on the pairs with DPO (finetune/dpo.py, whose formats include LLaMA-Factory's alpaca and "
            f"sharegpt preference files), or, to fine-tune on the preferred answers, map them: columns: "
            f"{{{response}: chosen}}, ignore_fields: [rejected]"
        )
    field = found[0]
    if field in ("label", "kto_tag"):
        raise DataError(
            f"{where} has '{field}' ({record[field]!r}): {REFUSED_FIELDS[field]}. Keep only the good "
            f"answers in the file, or add ignore_fields: [{field}] to learn every answer"
        )
    raise DataError(
        f"{where} has '{field}': {REFUSED_FIELDS[field].format(field=field)}. To train on the text "
        f"alone, add ignore_fields: [{field}] to this dataset (each record it is dropped from is counted)"
    )


def _turns(
    items: Any, spec: DatasetSpec, index: int, role_key: str, text_key: str, roles: dict, ignored: dict[str, int]
) -> list[dict]:
    where = f"{describe(spec)}: record {index}"
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: expected a non-empty list of turns, got {type(items).__name__}")
    turns = []
    for t, turn in enumerate(items):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataError(f"{where}, turn {t}: expected keys '{role_key}' and '{text_key}', got {turn!r}"[:400])
        if turn[role_key] in TOOL_ROLES or turn.get("tool_calls"):
            raise DataError(
                f"{where}, turn {t}: a tool call or tool result ({role_key} {turn[role_key]!r}): "
                f"{_TOOLS}; remove such conversations from the file"
            )
        role = roles.get(turn[role_key])
        if role is None:
            raise DataError(
                f"{where}, turn {t}: unknown {role_key} {turn[role_key]!r}, expected one of " + ", ".join(roles)
            )
        if isinstance(turn[text_key], list):
            raise DataError(
                f"{where}, turn {t}: '{text_key}' is a list of content parts (text, images, ...); "
                "the suite trains on plain text: give each turn's text as a string"
            )
        if not isinstance(turn[text_key], str):
            raise DataError(f"{where}, turn {t}: '{text_key}' must be a string")
        if role == "assistant" and turn.get("weight") in (0, False):  # OpenAI's format: do not learn this turn
            if "weight" not in spec.ignore_fields:
                raise DataError(
                    f"{where}, turn {t} has weight 0 (OpenAI's format: do not learn this turn); the "
                    "suite learns every assistant turn: remove the turn, or add ignore_fields: [weight] "
                    "to learn it anyway"
                )
            ignored["weight"] = ignored.get("weight", 0) + 1
        turns.append({"role": role, "content": turn[text_key]})
    return turns


def _history(value: Any, spec: DatasetSpec, index: int) -> list[dict]:
    """LLaMA-Factory's `history`: earlier exchanges as [[instruction, response], ...], oldest first."""
    turns = []
    for h, pair in enumerate(value or []):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(
                f"{describe(spec)}: record {index}, history item {h}: expected [instruction, response] "
                f"(two strings), got {pair!r}"[:400]
            )
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def to_example(record: dict, spec: DatasetSpec, index: int, ignored: dict[str, int] | None = None) -> dict:
    """One raw record -> {"turns": [...]} or {"text": str}, with its `origin` (dataset and record).

    Raises DataError naming the dataset, the record and the field; `ignored` counts fields dropped by the spec's
    ignore_fields."""
    from finetune.prompts import check_turns

    fmt = spec.format
    origin = f"{describe(spec)} record {index}"
    ignored = {} if ignored is None else ignored
    _check_refused(record, spec, index, ignored)
    if fmt == "text":
        return {"text": str(_field(record, "text", spec, index, True)), "origin": origin}
    system = _field(record, "system", spec, index, False)
    turns = [{"role": "system", "content": str(system)}] if system else []
    if fmt in ("alpaca", "dolly"):
        response_key, input_key = ("output", "input") if fmt == "alpaca" else ("response", "context")
        turns += _history(_field(record, "history", spec, index, False), spec, index)
        user = {"role": "user", "content": str(_field(record, "instruction", spec, index, True))}
        extra = _field(record, input_key, spec, index, False)
        if extra is not None and str(extra).strip():
            user["input"] = str(extra)
        turns += [user, {"role": "assistant", "content": str(_field(record, response_key, spec, index, True))}]
    elif fmt in ("conversations", "messages"):
        items = _field(record, fmt, spec, index, True)
        listed = (
            _turns(items, spec, index, "from", "value", SHAREGPT_ROLES, ignored)
            if fmt == "conversations"
            else _turns(items, spec, index, "role", "content", {r: r for r in ROLES}, ignored)
        )
        try:
            # The record's own list, before a `system` field goes in front, so turn numbers are the record's own
            # (alpaca and dolly records are in order by construction).
            check_turns(listed)
        except DataError as e:
            raise DataError(f"{describe(spec)}: record {index}: {e}") from None
        if turns and listed[0]["role"] == "system":
            raise DataError(f"{describe(spec)}: record {index} has both a 'system' field and a system turn; keep one")
        turns += listed
    else:
        raise DataError(f"{describe(spec)}: unknown format '{fmt}'")
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError(f"{describe(spec)}: record {index}: has no assistant turn to learn from")
    return {"turns": turns, "origin": origin}


def nfkc(example: dict) -> dict:
    normal = {"origin": example["origin"]} if "origin" in example else {}
    if "text" in example:
        return normal | {"text": unicodedata.normalize("NFKC", example["text"])}
    return normal | {"turns": [{k: unicodedata.normalize("NFKC", v) for k, v in t.items()} for t in example["turns"]]}


def _weighted(examples: list[dict], weight: float, rng) -> list[dict]:
    """weight 2.0 repeats every example twice; 0.5 keeps a random half; 1.5 = once + a random half."""
    whole, frac = int(math.floor(weight)), weight - math.floor(weight)
    out = examples * whole
    if frac > 0:
        out += rng.sample(examples, round(frac * len(examples)))
    return out


def report_fields(spec: DatasetSpec, columns: list[str], ignored: dict[str, int], records: int) -> None:
    """Say aloud which columns were not used (metadata such as Dolly's `category`) and what ignore_fields dropped."""
    unused = sorted(set(columns) - _used_columns(spec) - set(spec.ignore_fields))
    if unused:
        log.info("%s: column(s) not used by format '%s': %s", describe(spec), spec.format, ", ".join(unused))
    for f, n in sorted(ignored.items()):
        where = f"{n} turns" if f == "weight" else f"{n} of {records} records"
        log.warning("%s: ignore_fields dropped '%s' from %s", describe(spec), f, where)


def _load_spec(spec: DatasetSpec, cfg: DataConfig, rng) -> list[dict]:
    """One dataset's records as checked canonical examples (max_samples drawn with `rng`, NFKC as the config says)."""
    raw = load_raw(spec)
    if len(raw) == 0:
        raise DataError(f"{describe(spec)} has no records (split '{spec.split}')")
    order = list(range(len(raw)))
    if spec.max_samples is not None and spec.max_samples < len(raw):
        order = sorted(rng.sample(order, spec.max_samples))
    ignored: dict[str, int] = {}
    examples = [to_example(raw[i], spec, i, ignored) for i in order]
    report_fields(spec, raw.column_names, ignored, len(examples))
    return [nfkc(e) for e in examples] if cfg.nfkc else examples


def held_out_positions(sizes: list[int], eval_size: float, rng, what: str) -> set[tuple[int, int]]:
    """The (dataset, record) positions held out: a share `eval_size` (or a count, >= 1) of all records, drawn with
    `rng` across the datasets. SFT's examples and DPO's pairs are split by this one rule."""
    total = sum(sizes)
    n_eval = int(eval_size) if eval_size >= 1 else round(eval_size * total)
    if n_eval >= total:
        raise DataError(f"data.eval_size={eval_size} leaves no training {what} out of {total}")
    return set(rng.sample([(d, i) for d, n in enumerate(sizes) for i in range(n)], n_eval))


def load_examples(cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """Load, check and mix every dataset of the recipe; return (train, held-out) canonical examples. Held out:
    `eval_datasets`, or a share `eval_size` of the datasets' records."""
    import random

    rng = random.Random(cfg.seed)
    per_dataset = [(spec, _load_spec(spec, cfg, rng)) for spec in cfg.datasets]

    # Hold out before weighting, so a repeated example can't sit in both splits.
    held = held_out_positions([len(ex) for _, ex in per_dataset], cfg.eval_size, rng, "examples")
    train, evaluation = [], []
    for d, (spec, examples) in enumerate(per_dataset):
        evaluation += [e for i, e in enumerate(examples) if (d, i) in held]
        kept = [e for i, e in enumerate(examples) if (d, i) not in held]
        weighted = _weighted(kept, spec.weight, rng)
        log.info(
            "%s: %d records used, %d training examples after weight %g",
            describe(spec),
            len(examples),
            len(weighted),
            spec.weight,
        )
        train += weighted
    rng.shuffle(train)
    for spec in cfg.eval_datasets:
        evaluation += _load_spec(spec, cfg, rng)
    return train, evaluation


def preview(cfg: DataConfig, tokenizer) -> str:
    """The first record of each dataset as the model will see it: what `print_example=true` prints."""
    from finetune.prompts import IGNORE, encode, show

    out = []
    for spec in cfg.datasets:
        raw = load_raw(spec)
        if len(raw) == 0:
            raise DataError(f"{describe(spec)} has no records (split '{spec.split}')")
        example = to_example(raw[0], spec, 0)
        example = nfkc(example) if cfg.nfkc else example
        row = encode(example, cfg.prompt_style, tokenizer, cfg.system_prompt, cfg.train_on_prompt)
        n, learned = len(row["input_ids"]), sum(label != IGNORE for label in row["labels"])
        cut = f"; cut to data.max_length={cfg.max_length} in training" if n > cfg.max_length else ""
        out.append(
            f"=== {describe(spec)}, record 0 (format {spec.format}, prompt style {cfg.prompt_style}): "
            f"{n} tokens, {learned} learned{cut}\n"
            f"--- text\n{tokenizer.decode(row['input_ids'])}\n"
            f"--- token pieces, learned ones inside [[ ]]\n{show(row, tokenizer)}\n"
        )
    return "\n".join(out)
