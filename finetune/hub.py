"""Pushing a run to the Hugging Face Hub: stage the folder that will be uploaded (the adapter, the merged model or the
model itself, with a model card from finetune/card.py), then upload it with huggingface_hub's client.

At the end of a run (`hub.push_to_hub=true hub.model_id=me/name`) or for a finished one
(`python finetune/push.py OUTPUT_DIR hub.model_id=me/name`). `hub.dry_run=true` stages and lists, uploads nothing.
The token is huggingface_hub's own (HF_TOKEN or the stored login): the suite never reads, logs or writes it, and
scrubs it from any error it reports. Which names are Hub IDs, and whether the Hub answers, is finetune/offline.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from finetune.config.shared import HubConfig, ModelConfig
from finetune.errors import HubError

log = logging.getLogger(__name__)

# Never staged: resumable training state, TensorBoard logs, best weights, the merged copy, pickled arguments.
LEFT_OUT_FILES = {"training_args.bin", "held_out_before.json", ".complete", "README.md"}
STAGING_MARK = ".finetune-hub-staging"  # in the staging root: the folder is ours to clear
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
)


@dataclass
class Run:
    """What a folder holds, as far as pushing it goes."""

    folder: Path
    stage: str  # pretrain, cpt, sft, dpo, or adapter / model for a folder no suite run wrote
    adapter: bool  # a LoRA adapter (adapter_config.json) rather than a whole model
    base: ModelConfig | None  # the base an adapter loads on, as the run loaded it (4-bit aside)
    quantized: bool  # the adapter was trained on a 4-bit base (QLoRA)
    script: str | None  # the entry script that made it


def describe(folder: str | Path) -> Run:
    """Read a run folder (or a plain model or adapter folder): its stage, and for an adapter its base."""
    from finetune import lineage, modeling

    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder}: no such folder (expected a run's training.output_dir)")
    adapter = (folder / "adapter_config.json").is_file()
    if not adapter and not (folder / "config.json").is_file():
        raise HubError(f"{folder} holds neither a model (config.json) nor an adapter (adapter_config.json)")
    saved_base = None
    if adapter:
        saved_base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if (folder / "lineage.json").is_file():
        stage = "cpt" if json.loads((folder / "lineage.json").read_text()).get("base") else "pretrain"
        return Run(folder, stage, adapter, None, False, "finetune/pretrain.py")
    if (dpo := lineage.dpo_recipe(folder)) is not None:
        from finetune.config.checking import build
        from finetune.dpo import sft_run_of

        policy = build(ModelConfig, dpo["model"], "model")
        sft = sft_run_of(policy.name_or_path)
        policy_adapter = Path(policy.name_or_path) / "adapter_config.json"
        # as finetune.dpo.load_policy loaded it: an adapter policy kept training on its base (4-bit for QLoRA)
        if policy_adapter.is_file() and sft is not None:
            base, quantized = sft.model, sft.quantization.load_in_4bit
        elif policy_adapter.is_file():
            adapter_base = json.loads(policy_adapter.read_text()).get("base_model_name_or_path")
            base = ModelConfig(name_or_path=adapter_base)
            quantized = bool((dpo.get("quantization") or {}).get("load_in_4bit"))
        else:  # a merged or full model: DPO trained a new LoRA on it
            base = policy
            quantized = bool((dpo.get("quantization") or {}).get("load_in_4bit"))
        return Run(folder, "dpo", adapter, base if adapter else None, quantized and adapter, "finetune/dpo.py")
    sft = modeling.run_recipe(folder)
    if sft is not None:
        base = sft.model if adapter else None
        return Run(folder, "sft", adapter, base, sft.quantization.load_in_4bit and adapter, "finetune/sft.py")
    base = ModelConfig(name_or_path=saved_base) if saved_base else None
    return Run(folder, "adapter" if adapter else "model", adapter, base, False, None)


# ----------------------------------------------------------------------------------------------------------------
# Staging
# ----------------------------------------------------------------------------------------------------------------


def staging_root(out: Path) -> Path:
    out = Path(out).resolve()  # `push.py .` stages beside the run, never inside it
    return out.parent / f"{out.name}-hub"


def targets(hub: HubConfig, run: Run) -> list[tuple[str, str]]:
    """(kind, repo ID) of each upload: kind is adapter, merged or model."""
    what = hub.what
    if not run.adapter:
        if what in ("adapter", "merged", "both"):
            raise HubError(
                f"hub.what={what}: {run.folder} holds a whole model (no LoRA adapter); it is pushed as it is "
                "(hub.what=auto)"
            )
        return [("model", hub.model_id)]
    if what in ("auto", "adapter"):
        return [("adapter", hub.model_id)]
    if what == "merged":
        return [("merged", hub.model_id)]
    return [("adapter", hub.model_id), ("merged", hub.merged_model_id or f"{hub.model_id}-merged")]


def stage(hub: HubConfig, out: str | Path) -> list[tuple[str, Path]]:
    """Write the folder(s) that would be uploaded, each with its model card; return (repo ID, folder) pairs.
    The run's own files are only read (copied or hard-linked), never changed."""
    from finetune import card, lineage

    run = describe(out)
    root = staging_root(run.folder)
    if root.exists():
        if not (root / STAGING_MARK).is_file():
            raise HubError(f"{root} exists and is not a staging folder this suite made: move it, then push again")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / STAGING_MARK).write_text("staged by finetune/hub.py for upload; cleared on every push\n")
    staged = []
    for kind, repo_id in targets(hub, run):
        dest = root / kind
        if kind == "merged":
            dtype = merge_adapter(run, dest, hub.merge_dtype, hub.max_shard_size)
        else:
            copy_run_files(run.folder, dest)
            dtype = None
        if kind == "adapter" and (hub_base := card.base_hub_id(run, hub)):
            point_adapter_at(dest / "adapter_config.json", hub_base)
        for name in ("recipe.yaml", "metrics.json", "heldout.json"):
            if (run.folder / name).is_file() and not (dest / name).exists():
                link_or_copy(run.folder / name, dest / name)
        if not (dest / "lineage.json").exists():  # the whole chain, read from the run folders that made it
            chain = lineage.lineage(str(run.folder))
            (dest / "lineage.json").write_text(json.dumps(chain, indent=2, ensure_ascii=False), encoding="utf-8")
        model_card = card.build(run, kind, repo_id, hub, merged_dtype=dtype)
        model_card.save(dest / "README.md")
        staged.append((repo_id, dest))
    return staged


def point_adapter_at(config_file: Path, base: str) -> None:
    """The staged adapter_config.json names the base by its Hub ID, not the local path it was trained from, so
    AutoPeftModelForCausalLM.from_pretrained(repo) works for whoever downloads it. The staged file may be a hard link
    to the run's: it is replaced, never written through."""
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    saved["base_model_name_or_path"] = base
    config_file.unlink()
    config_file.write_text(json.dumps(saved, indent=2), encoding="utf-8")


def copy_run_files(src: Path, dest: Path) -> None:
    """The run's top-level files (weights, configs, tokenizer, recipe, metrics); no sub-folder (checkpoints,
    TensorBoard logs, best weights, a merged copy) and no pickled training arguments."""
    dest.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in LEFT_OUT_FILES:
            link_or_copy(path, dest / path.name)


def link_or_copy(src: Path, dest: Path) -> None:
    # A hard link costs no space for multi-GB weights; the upload only reads it. Across filesystems: a copy.
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def merge_adapter(run: Run, dest: Path, dtype: str = "auto", max_shard_size: str = "5GB") -> str:
    """Base + adapter -> one safetensors model (sharded above max_shard_size) with the run's tokenizer and the
    base's generation config, in dest. The base is loaded in 16/32-bit, never 4-bit: merging into quantized weights
    would round the adapter away, so after QLoRA the merged model is the 16-bit base plus the adapter (the card says
    so). Returns the dtype merged in."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from finetune import modeling

    if run.base is None:
        raise HubError(f"{run.folder}: the adapter's base is unknown (no base_model_name_or_path in adapter_config)")
    if dtype == "auto":  # the base's own dtype, whatever the machine (modeling's auto would follow the GPU)
        dtype = saved_dtype(run.base)
    base = modeling.load_model(replace(run.base, dtype=dtype))  # no quantization argument: 16/32-bit weights
    merged = PeftModel.from_pretrained(base, str(run.folder)).merge_and_unload()
    merged.save_pretrained(dest, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(run.folder).save_pretrained(dest)  # the run's, with its chat template
    merged_dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
    del merged, base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("merged %s into %s (%s) in %s", run.folder, run.base.name_or_path, merged_dtype, dest)
    return merged_dtype


def saved_dtype(base: ModelConfig) -> str:
    """The dtype a model's config.json records (float32 where it records none or an unusual one)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        base.name_or_path, revision=base.revision, trust_remote_code=base.trust_remote_code
    )
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    dtype = dtype.removeprefix("torch.")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


# ----------------------------------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------------------------------


def check_can_push(hub: HubConfig) -> None:
    """Before a run trains: a push that cannot happen (offline) is refused now, not after hours of training."""
    if hub.push_to_hub and not hub.dry_run:
        offline_refusal(hub)


def offline_refusal(hub: HubConfig) -> None:
    from huggingface_hub import constants

    from finetune.offline import reachable

    why = (
        "offline mode is on (HF_HUB_OFFLINE=1)"
        if constants.is_offline_mode()
        else f"{os.environ.get('HF_ENDPOINT') or constants.ENDPOINT} cannot be reached"
        if not reachable()
        else None
    )
    if why:
        raise HubError(
            f"cannot push to {hub.model_id}: {why}. Nothing was uploaded and the run's outputs are as they were; "
            "hub.dry_run=true stages the folder that would be uploaded, or push later with "
            "`python finetune/push.py OUTPUT_DIR hub.model_id=...`"
        )


def push(hub: HubConfig, out: str | Path) -> list[tuple[str, Path]]:
    """Stage, then upload each staged folder (or, with hub.dry_run, list it). Returns (repo ID, folder) pairs."""
    if not hub.model_id:
        raise HubError("no hub.model_id: name the repository, e.g. hub.model_id=me/llama-alpaca-lora")
    if not hub.dry_run:
        offline_refusal(hub)
    try:
        staged = stage(hub, out)
    except HubError:
        raise
    except Exception as e:  # a full disk, an unreadable tokenizer, an adapter that doesn't fit its base: one line
        raise HubError(f"could not stage {out} for the Hub: {scrub(f'{type(e).__name__}: {first_line(e)}')}") from None
    try:
        upload_all(hub, staged)
    finally:
        if not hub.dry_run:  # uploaded or failed: the staged copy (a merged model's weights) is not kept
            shutil.rmtree(staging_root(Path(out)), ignore_errors=True)
    return staged


def upload_all(hub: HubConfig, staged: list[tuple[str, Path]]) -> None:
    for repo_id, folder in staged:
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        if hub.dry_run:
            print(f"dry run: {folder} would be uploaded to {repo_id} ({len(files)} files):")
            for name in files:
                print(f"  {name}  ({(folder / name).stat().st_size:,} bytes)")
            continue
        url = upload(hub, repo_id, folder)
        log.info("pushed %d files to %s", len(files), url)


def upload(hub: HubConfig, repo_id: str, folder: Path) -> str:
    """create_repo, create_branch (for hub.revision), upload_folder: huggingface_hub's client, its token."""
    from huggingface_hub import HfApi

    # HF_ENDPOINT read now, not at import: a mirror or a local stand-in set after start-up is honoured
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        api.create_repo(repo_id, private=hub.private, exist_ok=True, repo_type="model")
        if hub.revision and hub.revision != "main":
            api.create_branch(repo_id, branch=hub.revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=hub.revision,
            commit_message=f"Upload {folder.name} from finetune",
        )
    except Exception as e:  # the client's HTTP, offline and validation errors: one line, token scrubbed
        raise HubError(f"could not push to {repo_id}: {scrub(f'{type(e).__name__}: {first_line(e)}')}") from None
    return getattr(info, "commit_url", None) or f"{api.endpoint}/{repo_id}"


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def scrub(text: str) -> str:
    """Remove the token from a message: an error that echoes a request must not print it."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "<token>") if token else text
