"""Where a model came from, read from the run folders that made it: pretraining writes lineage.json (base,
tokenizer, corpora, tokens); an SFT or DPO run's recipe.yaml names its base (or policy), data and method, its
metrics.json the tokens and losses. Evaluation results and model cards (finetune/card.py) carry it."""

from __future__ import annotations

import json
from pathlib import Path


def lineage(name_or_path: str, depth: int = 0) -> dict:
    """The chain behind a model: a pretraining run's lineage.json, an SFT run's base (with the base's own lineage),
    data and method, an adapter's base, or just the Hub ID or name it was loaded by."""
    from finetune import modeling
    from finetune.offline import is_hub_id

    folder = Path(name_or_path)
    if not folder.is_dir():
        return {"hub_id": name_or_path} if is_hub_id(name_or_path) else {"name": name_or_path}
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
    if (folder / "lineage.json").is_file():
        found = {"path": str(folder)} | json.loads((folder / "lineage.json").read_text(encoding="utf-8"))
        if found.get("built_by") == "finetune.pretrain":  # a pretraining run: its final losses from metrics.json
            found["stage"] = "cpt" if found.get("base") else "pretrain"
            found["train_loss"] = metrics.get("final_train_loss")
            found["val_loss"] = (metrics.get("final_val") or {}).get("val_loss")
        return found
    dpo = dpo_recipe(folder)
    if dpo is not None:
        return {
            "path": str(folder),
            "stage": "dpo",
            "method": "full" if dpo["lora"].get("method") == "full" else "lora",
            "datasets": [d["path"] for d in dpo["data"]["datasets"]],
            "prompt_style": metrics.get("prompt_style"),
            "beta": dpo["dpo"].get("beta"),
            "loss_type": dpo["dpo"].get("loss_type"),
            "reference": metrics.get("reference"),
            "train_tokens": metrics.get("train_tokens"),
            "train_loss": metrics.get("train_loss"),
            "held_out_before": metrics.get("held_out_before"),
            "held_out_after": metrics.get("held_out_after"),
            "base": dpo["model"]["name_or_path"],  # the policy DPO started from
            "base_lineage": lineage(dpo["model"]["name_or_path"], depth + 1) if depth < 8 else None,
        }
    if folder.name == "merged" and not (folder / "recipe.yaml").is_file() and modeling.run_recipe(folder.parent):
        # SFT's training.merge_adapter output: the run's base + adapter
        return {
            "path": str(folder),
            "stage": "merged",
            "base": str(folder.parent),
            "base_lineage": lineage(str(folder.parent), depth + 1) if depth < 8 else None,
        }
    run = modeling.run_recipe(folder)
    if run is not None:
        return {
            "path": str(folder),
            "stage": "sft",
            "method": "qlora" if run.quantization.load_in_4bit else run.lora.method,
            "datasets": [d.path for d in run.data.datasets],
            "prompt_style": run.data.prompt_style,
            "train_tokens": metrics.get("train_tokens"),
            "train_loss": metrics.get("train_loss"),
            "eval_loss": metrics.get("eval_loss"),
            "base": run.model.name_or_path,
            "base_lineage": lineage(run.model.name_or_path, depth + 1) if depth < 8 else None,
        }
    if (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return {"path": str(folder), "stage": "adapter", "base": base}
    return {"path": str(folder)}


def dpo_recipe(folder: str | Path) -> dict | None:
    """A DPO run's saved recipe (as plain data), or None where the folder holds no DPO run."""
    import yaml

    file = Path(folder) / "recipe.yaml"
    if not file.is_file():
        return None
    saved = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    return saved if isinstance(saved.get("dpo"), dict) else None


def chain(found: dict) -> list[dict]:
    """A lineage as a list, oldest first (pretrain -> CPT -> SFT -> DPO), each entry without its base's lineage."""
    stages = []
    while found:
        entry = {k: v for k, v in found.items() if k != "base_lineage"}
        if "stage" not in entry:  # a base's lineage.json as saved inside a CPT run's, or a Hub ID
            pretrained = entry.get("built_by") == "finetune.pretrain"
            entry["stage"] = ("cpt" if entry.get("base") else "pretrain") if pretrained else "base"
        stages.append(entry)
        found = found.get("base_lineage")
    return stages[::-1]
