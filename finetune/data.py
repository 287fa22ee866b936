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

from finetune.errors import DataError, HubUnreachableError
from finetune.hub import hub_message
from finetune.recipe import DataConfig, DatasetSpec

log = logging.getLogger(__name__)

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

# Each format's fields: (required, optional). `columns` in a spec maps these names to the dataset's own.
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "alpaca": (("instruction", "output"), ("input", "system")),
    "dolly": (("instruction", "response"), ("context", "system")),
    "conversations": (("conversations",), ("system",)),
    "messages": (("messages",), ()),
    "text": (("text",), ()),
}

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES = ("system", "user", "assistant")


def describe(spec: DatasetSpec) -> str:
    return f"dataset '{spec.path}'" + (f" (config {spec.name})" if spec.name else "")


def is_local(path: str) -> bool:
    return Path(path).suffix.lower() in LOCAL_BUILDERS or Path(path).exists()


def load_raw(spec: DatasetSpec):
    """Load one spec as a `datasets.Dataset`: a local file, or a Hub dataset by ID."""
    import datasets

    if is_local(spec.path):
        path = Path(spec.path)
        if not path.is_file():
            raise DataError(f"{describe(spec)}: file not found ({path.resolve()})")
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{describe(spec)}: unsupported file type '{path.suffix}', expected one of "
                            + ", ".join(LOCAL_BUILDERS))
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


def _turns(items: Any, spec: DatasetSpec, index: int, role_key: str, text_key: str, roles: dict) -> list[dict]:
    where = f"{describe(spec)}: record {index}"
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: expected a non-empty list of turns, got {type(items).__name__}")
    turns = []
    for t, turn in enumerate(items):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataError(f"{where}, turn {t}: expected keys '{role_key}' and '{text_key}', got {turn!r}"[:400])
        role = roles.get(turn[role_key])
        if role is None:
            raise DataError(f"{where}, turn {t}: unknown {role_key} {turn[role_key]!r}, expected one of "
                            + ", ".join(roles))
        if not isinstance(turn[text_key], str):
            raise DataError(f"{where}, turn {t}: '{text_key}' must be a string")
        turns.append({"role": role, "content": turn[text_key]})
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError(f"{where}: has no assistant turn to learn from")
    return turns


def to_example(record: dict, spec: DatasetSpec, index: int) -> dict:
    """One raw record -> {"turns": [...]} or {"text": str}. Raises DataError naming the record and field."""
    fmt = spec.format
    if fmt == "text":
        return {"text": str(_field(record, "text", spec, index, True))}
    if fmt in ("alpaca", "dolly"):
        response_key, input_key = ("output", "input") if fmt == "alpaca" else ("response", "context")
        turns = []
        system = _field(record, "system", spec, index, False)
        if system:
            turns.append({"role": "system", "content": str(system)})
        user = {"role": "user", "content": str(_field(record, "instruction", spec, index, True))}
        extra = _field(record, input_key, spec, index, False)
        if extra is not None and str(extra).strip():
            user["input"] = str(extra)
        turns += [user, {"role": "assistant", "content": str(_field(record, response_key, spec, index, True))}]
        return {"turns": turns}
    if fmt == "conversations":
        items = _field(record, "conversations", spec, index, True)
        return {"turns": _turns(items, spec, index, "from", "value", SHAREGPT_ROLES)}
    if fmt == "messages":
        items = _field(record, "messages", spec, index, True)
        return {"turns": _turns(items, spec, index, "role", "content", {r: r for r in ROLES})}
    raise DataError(f"{describe(spec)}: unknown format '{fmt}'")


def nfkc(example: dict) -> dict:
    if "text" in example:
        return {"text": unicodedata.normalize("NFKC", example["text"])}
    return {"turns": [{k: unicodedata.normalize("NFKC", v) for k, v in t.items()} for t in example["turns"]]}


def _weighted(examples: list[dict], weight: float, rng) -> list[dict]:
    """weight 2.0 repeats every example twice; 0.5 keeps a random half; 1.5 = once + a random half."""
    whole, frac = int(math.floor(weight)), weight - math.floor(weight)
    out = examples * whole
    if frac > 0:
        out += rng.sample(examples, round(frac * len(examples)))
    return out


def load_examples(cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """Load, check and mix every dataset of the recipe; return (train, held-out) canonical examples."""
    import random

    rng = random.Random(cfg.seed)
    per_dataset: list[tuple[DatasetSpec, list[dict]]] = []
    for spec in cfg.datasets:
        raw = load_raw(spec)
        if len(raw) == 0:
            raise DataError(f"{describe(spec)} has no records (split '{spec.split}')")
        order = list(range(len(raw)))
        if spec.max_samples is not None and spec.max_samples < len(raw):
            order = sorted(rng.sample(order, spec.max_samples))
        examples = [to_example(raw[i], spec, i) for i in order]
        if cfg.nfkc:
            examples = [nfkc(e) for e in examples]
        per_dataset.append((spec, examples))

    # Hold out before weighting, so a repeated example can't sit in both splits.
    total = sum(len(ex) for _, ex in per_dataset)
    n_eval = int(cfg.eval_size) if cfg.eval_size >= 1 else round(cfg.eval_size * total)
    if n_eval >= total:
        raise DataError(f"data.eval_size={cfg.eval_size} leaves no training examples out of {total}")
    held = set(rng.sample([(d, i) for d, (_, ex) in enumerate(per_dataset) for i in range(len(ex))], n_eval))
    train, evaluation = [], []
    for d, (spec, examples) in enumerate(per_dataset):
        evaluation += [e for i, e in enumerate(examples) if (d, i) in held]
        kept = [e for i, e in enumerate(examples) if (d, i) not in held]
        weighted = _weighted(kept, spec.weight, rng)
        log.info("%s: %d records used, %d training examples after weight %g",
                 describe(spec), len(examples), len(weighted), spec.weight)
        train += weighted
    rng.shuffle(train)
    return train, evaluation
