"""Where a model came from, read from the run folders that made it: pretraining writes lineage.json (base,
tokenizer, corpora, tokens); an SFT run's recipe.yaml names its base, data and method. Evaluation results carry it,
and so will model cards."""

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
    if (folder / "lineage.json").is_file():
        return {"path": str(folder)} | json.loads((folder / "lineage.json").read_text(encoding="utf-8"))
    run = modeling.run_recipe(folder)
    if run is not None:
        metrics_file = folder / "metrics.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
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
