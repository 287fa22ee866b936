"""Push a finished run to the Hugging Face Hub, with a model card (lineage, evaluation, how to reproduce and load).

    python finetune/push.py outputs/quickstart hub.model_id=me/tiny-quickstart-lora
    python finetune/push.py outputs/quickstart hub.model_id=me/tiny-quickstart hub.what=merged hub.dry_run=true
    python finetune/push.py outputs/pretrain-tiny hub.model_id=me/tiny-llama      # pretraining: the full model

OUTPUT_DIR is a run's training.output_dir (pretraining, SFT, DPO) or any model or adapter folder. The run's saved
hub section is the starting point, the command line's hub.* keys override it (schema: finetune/config/shared.py,
HubConfig). The token comes from HF_TOKEN or `hf auth login`. `hub.dry_run=true` stages the exact folder that would
be uploaded (OUTPUT_DIR-hub/) and lists it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from finetune.errors import HubError, RecipeError, run_cli


def parse(argv: list[str]):
    """(run folder, HubConfig): the run's saved hub section with the command line's hub.* overrides."""
    import yaml

    from finetune.config.checking import build
    from finetune.config.loading import _set
    from finetune.config.shared import HubConfig

    folders = [a for a in argv if "=" not in a]
    if len(folders) != 1:
        raise RecipeError("usage: python finetune/push.py OUTPUT_DIR hub.model_id=USER/NAME [hub.KEY=VALUE ...]")
    folder = Path(folders[0])
    if not folder.is_dir():
        raise HubError(f"{folder}: no such folder (expected a run's training.output_dir)")
    saved = {}
    if (folder / "recipe.yaml").is_file():
        saved = (yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("hub") or {}
    tree = {"hub": dict(saved, push_to_hub=True, dry_run=False)}  # push_to_hub is what this command does
    for arg in (a for a in argv if "=" in a):
        key, value = arg.split("=", 1)
        if not key.startswith("hub."):
            raise RecipeError(f"{arg}: push.py takes hub.* keys only (e.g. hub.model_id=me/name, hub.what=merged)")
        _set(tree, key, yaml.safe_load(value) if value else None)
    return folder, build(HubConfig, tree["hub"], "hub")


def main(argv: list[str]) -> list:
    from finetune import hub

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    folder, cfg = parse(argv)
    return hub.push(cfg, folder)


def cli() -> None:
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
