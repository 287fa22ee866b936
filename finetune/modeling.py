"""Model loading: base model and tokenizer (Hub ID, folder or built-in), 4-bit quantisation, LoRA config,
and the dtype/precision choice for the device at hand."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

from finetune.config.shared import LoraConfig, ModelConfig, QuantizationConfig
from finetune.errors import HubUnreachableError, RecipeError
from finetune.offline import hub_message

log = logging.getLogger(__name__)


def quiet_library_warnings() -> None:
    """Silence two warnings no user can act on: bitsandbytes asking for the `kernels` package (which downloads
    kernels from the Hub at run time) on CPU, and peft calling transformers 5's renamed gradient_checkpointing."""
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing` is deprecated", category=FutureWarning)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Attention kernels that honour position-id resets, so packed examples never attend to each other
# (transformers builds a block-diagonal mask from them for sdpa/eager; flash-attn uses cu_seqlens).
# sdpa_segments (finetune/attention.py) runs each packed example on its own.
PACKING_ATTENTION = {"sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention", "sdpa_segments"}


def resolve(name_or_path: str) -> str:
    """`builtin:NAME` -> the folder of that built-in base (built on first use); anything else unchanged."""
    if name_or_path.startswith("builtin:"):
        from finetune import builtin

        return str(builtin.ensure(name_or_path.split(":", 1)[1]))
    return name_or_path


def resolve_precision(precision: str) -> str:
    """The one rule for `auto`, in every stage: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError("training.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    return precision


def auto_dtype(name: str) -> torch.dtype:
    """A dtype key (`auto`, `float32`, `bfloat16`, `float16`): `auto` follows resolve_precision."""
    if name == "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[resolve_precision("auto")]
    return DTYPES[name]


def trainer_arguments(training, data_seed: int, output_dir, evaluate: bool) -> dict:
    """The TrainingArguments the Trainer-based stages (SFT, DPO) set alike from their recipe's training section;
    each stage adds its own (packing, DPO's beta, ...). `evaluate`: there is held-out data to evaluate."""
    import torch

    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=training.micro_batch_size,
        # SFT's training.eval_batch_size (DPO has none: pairs are evaluated as they train)
        per_device_eval_batch_size=getattr(training, "eval_batch_size", None) or training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        num_train_epochs=training.num_epochs,
        max_steps=training.max_steps or -1,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio,  # a float < 1 is a share of the steps
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=training.optim,
        # transformers 5 renamed it; setting both keeps TRL's default (True) from winning silently
        activation_checkpointing=training.gradient_checkpointing,
        gradient_checkpointing=training.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),  # without it, transformers refuses training.precision=bf16 on a CPU
        logging_steps=training.log_every,
        logging_first_step=True,
        eval_strategy="steps" if training.eval_every and evaluate else "no",
        eval_steps=training.eval_every,
        save_steps=training.save_every,
        save_total_limit=None,  # checkpoints.CheckpointCallback rotates, after the new checkpoint is complete
        report_to=training.report_to or "none",
        seed=training.seed,
        data_seed=data_seed,
        **precision_flags(training.precision),
    )


def precision_flags(precision: str) -> dict:
    """TrainingArguments' bf16/fp16 flags."""
    precision = resolve_precision(precision)
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def missing(what: str, name: str) -> RecipeError | None:
    """The error for a local model path that does not exist (naming the recipe that writes it, where one does), or
    None when `name` exists, is a Hub ID (the one rule: offline.is_hub_id) or a built-in base."""
    from finetune.config import recipe_writing
    from finetune.offline import is_hub_id

    if Path(name).exists() or name.startswith("builtin:"):
        return None
    if made_by := recipe_writing(name):
        return RecipeError(
            f"no {what} in '{name}' yet: it is what `accelerate launch {made_by}` writes; run that first"
        )
    if not is_hub_id(name):  # a local path that is missing is not a Hub failure
        return RecipeError(f"no {what} at '{name}': that path does not exist")
    return None


def from_pretrained(what: str, name: str, loader, **kwargs):
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as e:
        if Path(name).exists():
            raise RecipeError(f"could not load {what} from {name}: {e}") from None
        if error := missing(what, name):
            raise error from None
        raise HubUnreachableError(hub_message(f"{what} '{name}'", e)) from None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    name = resolve(cfg.tokenizer or cfg.name_or_path)
    tokenizer = from_pretrained(
        "tokenizer", name, AutoTokenizer.from_pretrained, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    return with_eos_and_pad(tokenizer, name)


def with_eos_and_pad(tokenizer, name: str):
    """Refuse a tokenizer without EOS (it ends every pretraining document and every fine-tuning answer); pad
    with EOS where it has no pad token."""
    if tokenizer.eos_token_id is None:
        raise RecipeError(f"tokenizer {name} has no EOS token: documents and answers could never end")
    if tokenizer.pad_token is None:
        # Safe: padding is masked by position in the collator, so EOS labels are kept (see prompts.py).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(cfg: QuantizationConfig):
    if not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=auto_dtype(cfg.compute_dtype),
    )


def load_model(cfg: ModelConfig, quant: QuantizationConfig | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=auto_dtype(cfg.dtype),
        attn_implementation=cfg.attn_implementation,
    )
    qconfig = quantization_config(quant) if quant else None
    if qconfig is not None:
        from accelerate import PartialState

        kwargs["quantization_config"] = qconfig
        # each process holds a whole 4-bit copy on its own device (DDP), as in the QLoRA recipes
        kwargs["device_map"] = {"": PartialState().local_process_index} if torch.cuda.is_available() else "cpu"
    return from_pretrained("model", resolve(cfg.name_or_path), AutoModelForCausalLM.from_pretrained, **kwargs)


def run_recipe(folder: str | Path):
    """The SFT recipe a run folder was trained with (its recipe.yaml), or None where the folder holds no SFT run
    (a pretraining run, a downloaded model, a bare adapter)."""
    import yaml

    from finetune import config
    from finetune.config.checking import RENAMED
    from finetune.config.sft import SFTRecipe

    file = Path(folder) / "recipe.yaml"
    if not file.is_file():
        return None
    saved = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    if not isinstance(saved.get("data"), dict) or "datasets" not in saved["data"] or "dpo" in saved:
        return None  # another stage's recipe (pretraining has data.corpora, DPO a dpo section)
    training = saved.get("training") or {}  # a run saved before the knobs were renamed still loads
    saved["training"] = {RENAMED.get(k, k): v for k, v in training.items()}
    try:
        return config.build(SFTRecipe, saved)
    except RecipeError as e:
        raise RecipeError(f"{file}: {e}") from None


def load_for_inference(name_or_path: str, dtype: str = "auto"):
    """(model in eval mode, tokenizer, SFT recipe or None) for any model a user points at: an SFT run's output folder
    (its base loaded as the run loaded it, 4-bit included, plus the adapter), an adapter folder (base from
    adapter_config.json), a model folder, `builtin:NAME` or a Hub ID (an adapter repo loads with its base)."""
    import dataclasses
    import json

    folder = Path(name_or_path)
    run = run_recipe(folder) if folder.is_dir() else None
    if folder.is_dir() and (folder / "adapter_config.json").is_file():
        quiet_library_warnings()  # before peft imports bitsandbytes
        from peft import PeftModel

        if run is not None:
            base_cfg, quant = run.model, run.quantization
        else:
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise RecipeError(f"{folder / 'adapter_config.json'} names no base_model_name_or_path")
            base_cfg, quant = ModelConfig(name_or_path=base), None
        if dtype != "auto":
            base_cfg = dataclasses.replace(base_cfg, dtype=dtype)
        model = PeftModel.from_pretrained(load_model(base_cfg, quant), str(folder))
        has_tokenizer = (folder / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)) if has_tokenizer else base_cfg)
    elif folder.is_dir() and not (folder / "config.json").is_file():
        raise RecipeError(
            f"'{folder}' holds neither a model (config.json) nor an adapter (adapter_config.json): is it the "
            "output_dir of a finished run?"
        )
    else:
        cfg = ModelConfig(name_or_path=name_or_path, dtype=dtype)
        model, tokenizer = load_model(cfg), load_tokenizer(cfg)
    if torch.cuda.is_available() and model.device.type == "cpu" and not getattr(model, "is_loaded_in_4bit", False):
        model.to("cuda")  # a Trainer moves the model in training; here nothing else would
    return model.eval(), tokenizer, run


def peft_config(cfg: LoraConfig):
    if cfg.method == "full":
        return None
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        modules_to_save=cfg.modules_to_save,
    )


def supports_packing(model) -> bool:
    """Packing is safe when the attention kernel honours position-id resets and forward takes position_ids."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return impl in PACKING_ATTENTION and "position_ids" in inspect.signature(model.forward).parameters
