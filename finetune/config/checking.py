"""Typed checking: a plain dict (a composed recipe) becomes the stage's dataclasses, key by key.

Written by hand (~130 lines) rather than handed to a library, having weighed the two that would do it:
- OmegaConf structured configs (Hydra's own) have no unions (we need `str | list[str]`), and their errors neither
  suggest the closest key nor name the recipe file at fault.
- pydantic dataclasses with `extra="forbid"` (axolotl's choice) check types well, but report an unknown key as
  "Extra inputs are not permitted" with no suggestion, coerce "4" to 4 silently in lax mode, and would add a
  dependency the suite does not otherwise need; we would still wrap every error to add the closest key.
What is kept here: every key checked against the schema's type hints, the closest valid key suggested (in the same
section first, then anywhere), the key and the type expected named in every message.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

import yaml

from finetune.errors import RecipeError

# Knobs renamed when the stages took one set of names (issue 8); a recipe that still uses an old name is told the new.
RENAMED = {
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints",
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return tp.__name__


def _coerce(tp: Any, value: Any, key: str, root: type) -> Any:
    origin = typing.get_origin(tp)
    wrong = RecipeError(f"key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            try:
                return _coerce(member, value, key, root)
            except RecipeError:
                continue
        raise wrong
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise wrong
    if origin is list:
        if not isinstance(value, list | tuple):
            raise wrong
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}.{i}", root) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(val_tp, v, f"{key}.{k}", root) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, root)
    if tp is type(None):
        if value is None:
            return None
        raise wrong
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise TypeError(f"schema type {tp!r} of '{key}' is not supported")  # a bug in the schema, not user input


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. `training.learning_rate`."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        keys.append(path)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(schema_keys(hints[f.name], path + "."))
    return keys


def _unknown_key(key: str, cls: type, root: type) -> RecipeError:
    """Suggest the closest field of the same section, else the closest key anywhere (`learning_rat` at the top
    level -> `training.learning_rate`)."""
    prefix, _, leaf = key.rpartition(".")
    names = [f.name for f in dataclasses.fields(cls)]
    if RENAMED.get(leaf) in names:
        new = f"{prefix}.{RENAMED[leaf]}" if prefix else RENAMED[leaf]
        return RecipeError(f"unknown key '{key}': it is now '{new}' (one name per knob in every stage)")
    near = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
    if near:
        guess = f"{prefix}.{near[0]}" if prefix else near[0]
    else:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in schema_keys(root)}
        near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        guess = by_leaf[near[0]] if near else None
    hint = f" Did you mean '{guess}'?" if guess else ""
    return RecipeError(f"unknown key '{key}'.{hint} Valid keys here: {', '.join(names)}")


def build(cls: type, data: Any, where: str = "", root: type | None = None) -> Any:
    """Build dataclass `cls` from a dict, checking every key and type (`root`: the whole recipe's class)."""
    if not isinstance(data, dict):
        raise RecipeError(f"key '{where or 'recipe'}' expects {_type_name(cls)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise _unknown_key(path, cls, root or cls)
        kwargs[key] = _coerce(hints[key], value, path, root or cls)
    return cls(**kwargs)


def to_dict(recipe: Any) -> dict:
    return dataclasses.asdict(recipe)


def to_yaml(recipe: Any) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True)
