"""Recipes: `recipe=NAME key.sub=value` -> a typed, checked recipe of one stage.

loading.py   finds the recipe in its stage's folder, composes it with Hydra, applies overrides
checking.py  types the composed dict into the stage's dataclasses (closest-key suggestions)
shared.py    sections every stage shares (model, quantization, lora, dataset spec, hub, training knobs)
sft.py, pretrain.py, eval.py   one schema per stage (DPO and the study add theirs)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config.checking import build, schema_keys, to_dict, to_yaml
from finetune.config.loading import SCRIPTS, available, compose, parse_args, recipe_writing, recipes_dir
from finetune.errors import RecipeError

__all__ = [
    "SCRIPTS",
    "available",
    "build",
    "compose",
    "load",
    "recipe_writing",
    "recipes_dir",
    "schema_keys",
    "to_dict",
    "to_yaml",
]


def load(argv: list[str], cls: type) -> tuple[Any, Path]:
    """`recipe=NAME key.sub=value ...` -> (recipe of schema `cls`, the recipe's file). `cls.stage` names the folder."""
    name, overrides = parse_args(argv, cls.stage)
    tree, file = compose(name, cls.stage, overrides)
    try:
        return build(cls, tree), file
    except RecipeError as e:
        raise RecipeError(f"recipe {file}: {e}") from None
