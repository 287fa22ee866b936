"""Sections every stage shares: the model to load (with 4-bit quantisation and LoRA), a dataset spec, the Hub, and
the training knobs that carry one name in every stage (where a run writes, how often it logs, evaluates and
saves, how many checkpoints it keeps). A stage's own schema (`config/sft.py`, `config/pretrain.py`, ...) adds
the rest; DPO and evaluation take these same sections, so one key means one thing in every recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from finetune.errors import RecipeError

DatasetFormat = Literal["alpaca", "dolly", "conversations", "messages", "text"]
PromptStyle = Literal["alpaca", "alpaca-ja", "llama2", "chatml", "chat_template"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"]


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny-llama"
    """Hub ID (`TinyLlama/TinyLlama_v1.1`), local folder, or `builtin:tiny-llama`: a small LLaMA the suite
    builds itself (tokenizer trained on the bundled data) for offline CPU runs."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    tokenizer: str | None = None
    """Tokenizer Hub ID or folder, when it differs from the model's."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype. `auto`: bfloat16 on a GPU that supports it, float16 on older GPUs, float32 on CPU."""
    attn_implementation: AttnImplementation = "sdpa"
    """Attention kernel. `sdpa` works everywhere, packing included."""
    trust_remote_code: bool = False
    """Allow models that ship their own Python code on the Hub."""


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in 4 bits with bitsandbytes (runs on CPU and GPU)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type. NF4 is the QLoRA paper's choice for normally distributed weights."""
    double_quant: bool = True
    """Quantise the quantisation constants too: saves ~0.4 bit per parameter, costs a little speed."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the 4-bit layers compute in. `auto`: bfloat16 on GPU, float32 on CPU."""


@dataclass
class LoraConfig:
    method: Literal["lora", "full"] = "lora"
    """`lora` trains low-rank adapters on a frozen base (with 4-bit quantisation: QLoRA); `full` trains
    every weight."""
    r: int = 16
    """Rank of the adapter matrices."""
    alpha: int = 32
    """Scale numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rsLoRA)."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear` (every linear layer but the output head, as in QLoRA) or a
    list of names such as [q_proj, v_proj]."""
    use_dora: bool = False
    """DoRA: learn a magnitude vector beside the direction update (better at low rank, ~slower)."""
    use_rslora: bool = False
    """rsLoRA: scale by alpha/sqrt(r), which keeps high ranks stable."""
    modules_to_save: list[str] | None = None
    """Modules trained fully and saved with the adapter, e.g. [embed_tokens, lm_head] after adding tokens."""

    def __post_init__(self):
        if self.r <= 0:
            raise RecipeError(f"lora.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise RecipeError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class DatasetSpec:
    path: str = ""
    """Hub dataset ID (`tatsu-lab/alpaca`) or a local .json/.jsonl/.csv/.parquet/.txt file."""
    format: DatasetFormat = "alpaca"
    """Record layout: alpaca (instruction/input/output), dolly (instruction/context/response), conversations
    (ShareGPT `from`/`value`), messages (`role`/`content`), text (one document per record)."""
    name: str | None = None
    """Hub dataset configuration (subset) name."""
    split: str = "train"
    """Split to read, e.g. `train` or `train[:1000]`."""
    revision: str | None = None
    """Hub revision of the dataset."""
    columns: dict[str, str] = field(default_factory=dict)
    """Field mapping from the format's field names to this dataset's columns, e.g. {output: response}."""
    max_samples: int | None = None
    """Keep this many records, drawn at random with data.seed (before weighting). null keeps all."""
    weight: float = 1.0
    """Share in a mixture: 0.5 keeps a random half of this dataset, 2.0 repeats it twice."""
    ignore_fields: list[str] = field(default_factory=list)
    """Fields the suite can't train on (images, tools, KTO `label`, preference `rejected`, a turn's `weight: 0`,
    ...) are refused; list one here to train without it instead. Records it is dropped from are counted."""

    def __post_init__(self):
        check_dataset_spec(self)


def check_dataset_spec(spec) -> None:
    """The keys every dataset spec shares (SFT's DatasetSpec, DPO's PreferenceSpec): path, weight, max_samples."""
    if not spec.path:
        raise RecipeError("every entry of data.datasets needs a `path` (Hub ID or local file)")
    if spec.weight <= 0:
        raise RecipeError(f"dataset {spec.path}: weight must be positive, got {spec.weight}")
    if spec.max_samples is not None and spec.max_samples <= 0:
        raise RecipeError(f"dataset {spec.path}: max_samples must be positive, got {spec.max_samples}")


@dataclass
class HubConfig:
    """Pushing a run to the Hugging Face Hub, with a model card (finetune/hub.py, finetune/card.py). At the end of a
    run (push_to_hub=true) or later: `python finetune/push.py OUTPUT_DIR hub.model_id=me/name`. The token comes from
    HF_TOKEN or `hf auth login`, never from a recipe."""

    push_to_hub: bool = False
    """Push at the end of the run."""
    model_id: str | None = None
    """Hub repository to push to, e.g. `me/llama-alpaca-lora`."""
    private: bool = True
    """Create the repository as private (an existing repository keeps its visibility)."""
    revision: str | None = None
    """Branch to push to (created from main when missing); null: main."""
    what: Literal["auto", "adapter", "merged", "both"] = "auto"
    """adapter: the LoRA adapter alone; merged: base + adapter merged into one model (after QLoRA the base is
    reloaded in 16-bit, not 4-bit, before merging); both: the adapter to model_id and the merged model to
    merged_model_id. auto: the adapter for LoRA/QLoRA runs, the model itself for full fine-tuning and pretraining."""
    merged_model_id: str | None = None
    """Where hub.what=both sends the merged model; null: model_id + '-merged'."""
    merge_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype the base is loaded in for merging; auto: the base's own (its config's dtype)."""
    max_shard_size: str = "5GB"
    """Largest safetensors shard of a merged or full model."""
    base_model_id: str | None = None
    """Hub ID of the base when the run's base is a local folder you have pushed (the card's base_model)."""
    license: str | None = None
    """The card's license (set it to the base's and the data's terms); null: 'other'."""
    language: list[str] | None = None
    """The card's languages; null: read from the data (Japanese where kana or kanji make up a share of the text)."""
    dry_run: bool = False
    """Stage the exact folder(s) that would be uploaded, print the path and the files, upload nothing."""

    def __post_init__(self):
        if self.push_to_hub and not self.model_id:
            raise RecipeError("hub.push_to_hub=true needs hub.model_id (e.g. hub.model_id=me/my-adapter)")
        for key in ("model_id", "merged_model_id", "base_model_id"):
            name = getattr(self, key)
            if name is not None:
                from huggingface_hub.utils import HFValidationError, validate_repo_id

                try:
                    validate_repo_id(name)
                except HFValidationError as e:
                    raise RecipeError(f"hub.{key}={name!r} is not a Hub repository ID (user/name): {e}") from None


@dataclass
class TrainingBase:
    """The training knobs every stage names the same way. A stage's TrainingConfig subclasses this, adds its own
    knobs and may change a default (a field redeclared keeps its place)."""

    output_dir: str = "outputs/run"
    """Where checkpoints (`checkpoint-N/`), the trained weights, the resolved recipe and metrics.json go."""
    micro_batch_size: int = 4
    """Sequences (packed blocks when packing) per device per forward pass."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    precision: Precision = "auto"
    """Mixed precision. auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU
    (finetune.modeling.resolve_precision, the one rule for every stage)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, ~30% slower."""
    seed: int = 42
    """Seed of the RNGs the run starts with (new weights such as adapters, dropout, data order)."""
    fused_loss: bool = True
    """Fuse the output layer into the loss, chunk by chunk: the micro_batch x seq_len x vocab logits never exist
    (8 GiB at TinyLlama's 16 x 2048 x 32000 in fp32). Pretraining: ~10% faster on CPU; SFT: only the positions
    whose label is learned reach the output layer (prompt and padding never do). Applies on one process (without
    torch.compile in pretraining, without fp16); with DDP, FSDP or DeepSpeed the head runs inside the wrapped
    forward (SFT: TRL's fused LM head). The log says which."""
    # Logging and checkpoints
    log_every: int = 10
    """Log loss, learning rate, grad norm, tokens/s, MFU (GPU) and peak memory every N optimiser steps."""
    eval_every: int | None = None
    """Evaluate on the held-out data every N steps, and at the end (null: at the end only)."""
    save_every: int = 500
    """Write a checkpoint every N steps and at the end (resume=true continues from the newest complete one)."""
    keep_checkpoints: int | None = 2
    """Keep the newest N complete checkpoints (null: keep all). An older one is deleted only after the new one
    is complete, so a kill at any moment leaves at least one."""

    def __post_init__(self):
        for key in ("micro_batch_size", "log_every", "save_every"):
            if getattr(self, key) <= 0:
                raise RecipeError(f"training.{key} must be positive, got {getattr(self, key)}")
        for key in ("eval_every", "keep_checkpoints"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise RecipeError(f"training.{key} must be positive or null, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            raise RecipeError(f"training.learning_rate must be positive, got {self.learning_rate}")
