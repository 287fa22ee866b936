"""Loading: `recipe=NAME key.sub=value ...` becomes a plain dict, which checking.build types.

A stage's recipes live in its own folder (`recipes/sft/`, `recipes/pretrain/`, ...; shipped inside the package
as `finetune/recipes/`), so `finetune/sft.py recipe=alpaca` reads `recipes/sft/alpaca.yaml`. Hydra composes the
recipe with its defaults list (a recipe inherits from another of its folder and changes a few keys); the
command line's overrides (Hydra's grammar: `key.sub=value`, `~key` to delete, list items by index) are applied
to the composed tree before `${...}` interpolations are resolved, so an interpolation follows an override.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from finetune.errors import RecipeError

# The entry script of each stage: the folder a script reads its recipes from, and the script a recipe runs with.
SCRIPTS = {
    "pretrain": "finetune/pretrain.py",
    "sft": "finetune/sft.py",
    "dpo": "finetune/dpo.py",
    "eval": "eval/evaluate.py",
    "study": "finetune/study.py",
}


def recipes_dir(stage: str | None = None) -> Path:
    from finetune import shipped_dir

    return shipped_dir("recipes") / stage if stage else shipped_dir("recipes")


def available(stage: str) -> list[str]:
    return sorted(p.stem for p in recipes_dir(stage).glob("*.yaml"))


def stage_of(name: str) -> str | None:
    """The stage whose folder holds recipe `name`, or None."""
    return next((s for s in SCRIPTS if (recipes_dir(s) / f"{name}.yaml").is_file()), None)


def _set(tree: dict, dotted: str, value: Any, delete: bool = False) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is not an index of the list")
            node = node[int(part)]
        else:
            if node.get(part) is None:  # a missing or null section becomes a mapping
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"override '{dotted}': '{last}' is not an index of the list")
        if delete:
            node.pop(int(last))
        else:
            node[int(last)] = value
    elif delete:
        node.pop(last, None)
    else:
        node[last] = value


def parse_args(argv: list[str], stage: str) -> tuple[str, list]:
    """Split `recipe=NAME k=v ...` into the recipe name and Hydra's parsed overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides(list(argv))
    except HydraException as e:
        raise RecipeError(f"could not parse the command line: {e}") from None
    name = None
    rest = []
    for o in overrides:
        if o.key_or_group == "recipe":
            name = o.value()
        else:
            rest.append(o)
    if name is None:
        raise RecipeError(
            f"no recipe given: add recipe=NAME (one of: {', '.join(available(stage))}) or recipe=path/to.yaml"
        )
    return str(name), rest


def find(name: str, stage: str) -> Path:
    """The file of recipe `name` (a path to a .yaml, or a name in the stage's folder)."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path.resolve()
    file = recipes_dir(stage) / f"{name}.yaml"
    if file.is_file():
        return file
    other = stage_of(name)
    if other:
        raise RecipeError(
            f"'{name}' is a recipe of the {other} stage (recipes/{other}/{name}.yaml), not of {stage}: "
            f"run it with `accelerate launch {SCRIPTS[other]} recipe={name}`"
        )
    guess = difflib.get_close_matches(name, available(stage), n=1)
    hint = f" Did you mean '{guess[0]}'?" if guess else ""
    raise RecipeError(f"no recipe '{name}' in {recipes_dir(stage)}.{hint} Available: {', '.join(available(stage))}")


def compose(name: str, stage: str, overrides: list = ()) -> tuple[dict, Path]:
    """Compose recipe `name` (with its defaults list), apply the overrides, then resolve interpolations; return the
    plain dict and the recipe's file."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    file = find(name, stage)
    try:
        with initialize_config_dir(config_dir=str(file.parent), version_base=None):
            cfg = hydra_compose(config_name=file.stem)
    except HydraException as e:
        raise RecipeError(f"could not compose recipe {file}: {e}") from None
    tree = OmegaConf.to_container(cfg, resolve=False)
    for o in overrides:
        _set(tree, o.key_or_group, o.value(), delete=o.is_delete())
    try:
        return OmegaConf.to_container(OmegaConf.create(tree), resolve=True), file
    except OmegaConfBaseException as e:
        raise RecipeError(f"recipe {file}: could not resolve an interpolation: {e}") from None


def recipe_writing(path: str) -> str | None:
    """`finetune/pretrain.py recipe=pretrain-tiny` if a shipped recipe writes to `path` (e.g. outputs/pretrain-tiny)."""
    import yaml

    for stage, script in SCRIPTS.items():
        for file in sorted(recipes_dir(stage).glob("*.yaml")):
            output_dir = ((yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("training") or {}).get(
                "output_dir"
            )
            if output_dir and str(output_dir).rstrip("/") == path.rstrip("/"):
                return f"{script} recipe={file.stem}"
    return None
