"""Model cards for pushed runs, built with huggingface_hub's ModelCard / ModelCardData: metadata the Hub indexes
(base_model, datasets, language, license, library_name, pipeline_tag, tags) and a body with the lineage chain read
from the run folders (pretrain -> CPT -> SFT -> DPO), the evaluation table where eval/ results name the run, the
commands that reproduce it and how to load it."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from finetune import lineage
from finetune.config.shared import HubConfig
from finetune.offline import is_hub_id

STAGE_NAMES = {
    "pretrain": "pretraining",
    "cpt": "continued pretraining",
    "sft": "supervised fine-tuning",
    "dpo": "DPO",
    "adapter": "adapter",
    "base": "base model",
    "model": "model",
    "merged": "merged model",
}
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")
LATIN = re.compile(r"[A-Za-z]")


def build(run, kind: str, repo_id: str, hub: HubConfig, merged_dtype: str | None = None):
    """The card of one upload: kind is adapter, merged or model (see finetune.hub.targets)."""
    from huggingface_hub import ModelCard, ModelCardData

    stages = lineage.chain(lineage.lineage(str(run.folder)))
    base_id = base_hub_id(run, hub, stages)
    datasets = sorted({d for s in stages for d in data_names(s) if is_hub_id(d)})
    tags = ["finetune", *(s["stage"] for s in stages if s["stage"] in ("pretrain", "cpt", "sft", "dpo"))]
    method = stages[-1].get("method")
    if run.quantized:
        method = "qlora"
    if method:
        tags.append(method)
    if kind == "merged":
        tags.append("merged")
    data = ModelCardData(
        base_model=base_id,
        datasets=datasets or None,
        language=hub.language or languages(stages),
        license=hub.license or "other",
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
    )
    body = "\n".join(
        [
            f"# {repo_id.split('/')[-1]}",
            "",
            summary(run, kind, stages, base_id, merged_dtype),
            "",
            "## Lineage",
            "",
            lineage_table(stages),
            "",
            *evaluation(run.folder),
            "## Reproduce",
            "",
            reproduce(stages),
            "",
            "## Load",
            "",
            how_to_load(kind, repo_id, base_id or (run.base.name_or_path if run.base else None)),
            "",
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def base_hub_id(run, hub: HubConfig, stages: list[dict] | None = None) -> str | None:
    """The card's base_model: the model this one was made from directly (an adapter's or a merge's base, a CPT
    run's or a full fine-tune's starting point), by Hub ID; hub.base_model_id names a local one you pushed. The
    chain's root (a Hub model several stages back) is not it: an adapter on a local CPT run of Llama is not an
    adapter for Llama."""
    if hub.base_model_id:
        return hub.base_model_id
    if run.base is not None:
        direct = run.base.name_or_path
    else:
        stages = stages if stages is not None else lineage.chain(lineage.lineage(str(run.folder)))
        direct = stages[-1].get("base")
    return direct if isinstance(direct, str) and is_hub_id(direct) else None


def data_names(stage: dict) -> list[str]:
    return [*(stage.get("datasets") or []), *(c.get("path", "") for c in stage.get("corpora") or [])]


def languages(stages: list[dict]) -> list[str]:
    """en and/or ja, read from the data every stage trained on: a local file's text (kana and kanji against Latin
    letters), a Hub ID's name (ja, japanese), a corpus's name. English where nothing says otherwise."""
    found = set()
    for s in stages:
        for corpus in s.get("corpora") or []:
            found |= name_languages(f"{corpus.get('name', '')} {corpus.get('path', '')}")
        for path in s.get("datasets") or []:
            found |= file_languages(Path(path)) if Path(path).is_file() else name_languages(path)
    return sorted(found) or ["en"]


def name_languages(name: str) -> set[str]:
    parts = set(re.split(r"[-_/.\s\[\]*]+", name.lower()))
    return {"ja"} if parts & {"ja", "japanese", "jp"} else {"en"}


def file_languages(path: Path) -> set[str]:
    text = path.read_bytes()[:200_000].decode("utf-8", errors="ignore")
    if path.suffix == ".jsonl":  # values only: English keys (instruction, output) say nothing of the language
        values = []
        for line in text.splitlines()[:-1]:
            try:
                values.append(json.dumps(json.loads(line), ensure_ascii=False))
            except json.JSONDecodeError:
                continue
        text = " ".join(re.sub(r'"[a-z_]+":', "", v) for v in values)
    text = unicodedata.normalize("NFKC", text)
    cjk, latin = len(CJK.findall(text)), len(LATIN.findall(text))
    found = set()
    if cjk >= 0.1 * (cjk + latin):
        found.add("ja")
    if latin >= 0.5 * (cjk + latin):
        found.add("en")
    return found or {"en"}


def summary(run, kind: str, stages: list[dict], base_id: str | None, merged_dtype: str | None) -> str:
    last = stages[-1]
    what = {
        "adapter": "A LoRA adapter",
        "merged": "A merged model (base + LoRA adapter, one set of weights)",
        "model": "A model",
    }[kind]
    made = f"made by the finetune suite's {STAGE_NAMES.get(last['stage'], last['stage'])} stage"
    base = base_id or (run.base.name_or_path if run.base else None)
    text = f"{what} {made}" + (f" on `{base}`." if base and kind != "model" else ".")
    if kind == "merged" and run.quantized:
        text += (
            f" The adapter was trained with QLoRA on the 4-bit base; for merging, the base was reloaded in "
            f"{merged_dtype} (not 4-bit) and the adapter added to it, so this model is the {merged_dtype} base plus "
            "the adapter, which differs slightly from the 4-bit base plus the adapter that training measured."
        )
    elif kind == "merged":
        text += f" Merged in {merged_dtype}."
    if base and not is_hub_id(base):
        text += (
            f" The base `{base}` is a local model, not on the Hub (set hub.base_model_id to its Hub ID once pushed)."
        )
    return text


def lineage_table(stages: list[dict]) -> str:
    rows = [
        "| # | stage | model | method | data | tokens | final losses |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(stages, 1):
        name = s.get("hub_id") or s.get("path") or s.get("name") or ""
        data = ", ".join(f"`{d}`" for d in data_names(s)) or "-"
        tokens = s.get("tokens_seen") or s.get("train_tokens")
        losses = [
            f"{label} {s[key]:.4f}"
            for label, key in (("train", "train_loss"), ("validation", "val_loss"), ("eval", "eval_loss"))
            if isinstance(s.get(key), (int, float))
        ]
        if s["stage"] == "dpo" and s.get("held_out_after"):
            before, after = s.get("held_out_before") or {}, s["held_out_after"]
            losses.append(
                f"held-out reward accuracy {fmt(before.get('reward_accuracy'))} -> {fmt(after.get('reward_accuracy'))}"
                f", margin {fmt(before.get('reward_margin'))} -> {fmt(after.get('reward_margin'))}"
            )
        method = s.get("method") or ("beta " + str(s["beta"]) if s.get("beta") else "-")
        if s["stage"] == "dpo":
            method = f"{method}, beta {s.get('beta')}, {'+'.join(s.get('loss_type') or [])}"
        rows.append(
            f"| {i} | {STAGE_NAMES.get(s['stage'], s['stage'])} | `{name}` | {method} | {data} | "
            f"{f'{tokens:,}' if isinstance(tokens, int) else '-'} | {'; '.join(losses) or '-'} |"
        )
    return "\n".join(rows)


def fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def evaluation(folder: Path) -> list[str]:
    """The side-by-side tables of every eval/evaluate.py result (results.json + results.md) that scored this run:
    in the run's own folder or beside it."""
    found = []
    candidates = sorted({*folder.glob("*/results.json"), *folder.parent.glob("*/results.json")})
    for results in candidates:
        try:
            models = json.loads(results.read_text(encoding="utf-8")).get("models", {})
        except (json.JSONDecodeError, OSError):
            continue
        paths = [(m or {}).get("path") for m in models.values()]
        if any(p and Path(p).resolve() == folder.resolve() for p in paths) and results.with_suffix(".md").is_file():
            table = results.with_suffix(".md").read_text(encoding="utf-8")
            title, _, table = table.partition("\n")  # "# Evaluation: A vs B"
            table = re.sub(r"^(#+) ", r"#\1 ", table, flags=re.M)  # its headings below this card's
            found += [f"## {title.lstrip('# ')} (`{results.parent}`)", "", table.strip(), ""]
    return found


def reproduce(stages: list[dict]) -> str:
    scripts = {"pretrain": "finetune/pretrain.py", "cpt": "finetune/pretrain.py", "sft": "finetune/sft.py"}
    scripts["dpo"] = "finetune/dpo.py"
    lines = [
        "Each stage's resolved recipe is its run folder's `recipe.yaml` (this repository holds the last one); the "
        "paths are those of the machine that ran it:",
        "",
    ]
    lines.append("```bash")
    for s in stages:
        if s["stage"] in scripts:
            recipe = f"{s.get('path', 'RUN')}/recipe.yaml"  # resolved: overrides included
            lines.append(f"accelerate launch {scripts[s['stage']]} recipe={recipe} hub.push_to_hub=false")
    lines.append("```")
    return "\n".join(lines)


def how_to_load(kind: str, repo_id: str, base: str | None) -> str:
    if kind == "adapter":
        return "\n".join(
            [
                "```python",
                "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "",
                f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                f'model = PeftModel.from_pretrained(base, "{repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
                "```",
            ]
        )
    return "\n".join(
        [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            "```",
        ]
    )
