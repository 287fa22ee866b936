"""Recipes: the typed schema of an SFT run, and how `recipe=NAME key.sub=value` becomes one.

A recipe is a YAML file in `recipes/` (shipped in the package as `finetune.recipes`). It may inherit from
another with Hydra's defaults list and change a few keys:

    defaults:
      - alpaca
      - _self_
    training:
      learning_rate: 1.0e-4

Command-line overrides use Hydra's own grammar (`key.sub=value`, `~key` to delete). Hydra composes the
recipe and its parents; the result is then checked against the dataclasses below, so a misspelt key names
the closest valid one and a wrong type names the type expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.errors import RecipeError

DatasetFormat = Literal["alpaca", "dolly", "conversations", "messages", "text"]
PromptStyle = Literal["alpaca", "alpaca-ja", "llama2", "chatml", "chat_template"]


# ----------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------


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
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
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
        if not self.path:
            raise RecipeError("every entry of data.datasets needs a `path` (Hub ID or local file)")
        if self.weight <= 0:
            raise RecipeError(f"dataset {self.path}: weight must be positive, got {self.weight}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise RecipeError(f"dataset {self.path}: max_samples must be positive, got {self.max_samples}")


@dataclass
class DataConfig:
    datasets: list[DatasetSpec] = field(default_factory=list)
    """Datasets to mix; each is a spec (path, format, columns, max_samples, weight)."""
    prompt_style: PromptStyle = "alpaca"
    """How a record becomes text: alpaca (Stanford Alpaca), alpaca-ja (指示/入力/応答), llama2 ([INST]),
    chatml (<|im_start|>), chat_template (the tokenizer's own)."""
    system_prompt: str | None = None
    """System prompt for records that have none (alpaca styles: replaces the "Below is an instruction..."
    preamble). Saved in the run's chat template as its default."""
    max_length: int = 1024
    """Tokens per sequence (per packed block when packing). Longer examples are cut at the end; the count
    of cut examples is logged."""
    packing: bool | None = None
    """Pack several examples into one sequence, position ids reset at each example so none attends to
    another. null: on where the model supports it (LLaMA and most HF decoders do)."""
    nfkc: bool = False
    """NFKC-normalise text (full-width ＡＢＣ -> ABC, half-width ｶﾅ -> カナ); useful for Japanese."""
    train_on_prompt: bool = False
    """Also compute loss on prompt tokens. false: loss only on responses (and their EOS)."""
    eval_size: float = 0.0
    """Held-out share of the mixed data for eval loss: a fraction (<1) or a count of records (>=1)."""
    seed: int = 42
    """Seed for max_samples draws, weighting and the held-out split."""

    def __post_init__(self):
        if self.max_length < 16:
            raise RecipeError(f"data.max_length must be at least 16, got {self.max_length}")
        if self.eval_size < 0:
            raise RecipeError(f"data.eval_size must be >= 0, got {self.eval_size}")


@dataclass
class TrainingConfig:
    output_dir: str = "outputs/run"
    """Where checkpoints, the adapter, the resolved recipe and metrics.json go."""
    micro_batch_size: int = 4
    """Sequences (packed blocks when packing) per device per forward pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimiser step. Global batch = micro_batch_size x this x number of devices."""
    num_epochs: float = 1.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimiser steps; -1 runs num_epochs."""
    learning_rate: float = 2e-4
    """Peak learning rate. 2e-4 is usual for LoRA; full fine-tuning wants ~1e-5."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name: cosine, linear, constant, constant_with_warmup, ..."""
    warmup_ratio: float = 0.03
    """Share of steps spent warming up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    optim: str = "adamw_torch"
    """transformers optimiser name; `paged_adamw_8bit` saves memory with QLoRA on GPU."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision. auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, ~30% slower."""
    logging_steps: int = 10
    """Log loss, lr, tokens/s and peak memory every N steps."""
    eval_steps: int | None = None
    """Evaluate on the held-out split every N steps (null: at the end only)."""
    save_steps: int = 500
    """Write a checkpoint every N steps (resume=true continues from the latest)."""
    save_total_limit: int | None = 2
    """Keep only the newest N checkpoints."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Loggers: tensorboard, wandb, mlflow, ... ([] for none). TensorBoard logs go to output_dir/runs."""
    seed: int = 42
    """Seed for model init of new weights (adapters) and data order."""
    merge_adapter: bool = False
    """Also save the base with the adapter merged in (output_dir/merged), loadable without PEFT."""

    def __post_init__(self):
        for key in ("micro_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
            if getattr(self, key) <= 0:
                raise RecipeError(f"training.{key} must be positive, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            raise RecipeError(f"training.learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise RecipeError(f"training.warmup_ratio is a share of the steps, in [0, 1); got {self.warmup_ratio}")


@dataclass
class HubConfig:
    push_to_hub: bool = False
    """Push the adapter (and merged model, if saved) to the Hub at the end."""
    model_id: str | None = None
    """Hub repository to push to, e.g. `me/llama-alpaca-lora`."""
    private: bool = True
    """Create the repository as private."""

    def __post_init__(self):
        if self.push_to_hub and not self.model_id:
            raise RecipeError("hub.push_to_hub=true needs hub.model_id (e.g. hub.model_id=me/my-adapter)")


@dataclass
class SFTRecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    """4-bit loading of the base (QLoRA)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapter settings, or full fine-tuning."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets, prompt style, sequence length, packing."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimiser, batch, schedule, checkpoints, logging."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Pushing results to the Hugging Face Hub."""
    resume: bool = False
    """Continue from the newest checkpoint in training.output_dir."""
    print_recipe: bool = False
    """Print the resolved recipe as YAML and exit without training."""
    print_example: bool = False
    """Print the first record of each dataset as the model will see it (token pieces, the learned ones inside
    [[ ]]) and exit without training."""

    def __post_init__(self):
        if not self.data.datasets:
            raise RecipeError("data.datasets is empty: name at least one dataset (path and format)")
        if self.quantization.load_in_4bit and self.lora.method == "full":
            raise RecipeError("quantization.load_in_4bit=true needs lora.method=lora (4-bit weights can't be trained)")


# ----------------------------------------------------------------------------------------------------------
# Pretraining schema (finetune/pretrain.py): from scratch, or continued from any LLaMA checkpoint
# ----------------------------------------------------------------------------------------------------------

CorpusFormat = Literal["auto", "text", "records", "man"]


@dataclass
class CorpusSpec:
    name: str = ""
    """Short name, used in logs, metrics (`val_loss/NAME`) and the cache (e.g. `en`, `ja`)."""
    path: str = ""
    """A local file, folder or glob (`/usr/share/man/ja/man*/*.gz`), or a Hub dataset ID (streamed)."""
    format: CorpusFormat = "auto"
    """auto: by suffix. text (.txt/.md: one document per file), records (.jsonl/.json/.parquet or a Hub
    dataset: one document per record's `text_field`), man (roff manual pages, rendered with groff)."""
    text_field: str = "text"
    """The field holding a record's text."""
    hub_name: str | None = None
    """Hub dataset configuration (subset) name."""
    split: str = "train"
    """Hub split to stream."""
    revision: str | None = None
    """Hub revision of the dataset."""
    max_documents: int | None = None
    """Use at most this many documents: a seeded random subset of local files, or the first N of a Hub
    stream. null: all (a Hub stream must set this or be finite)."""
    expect_documents: int | None = None
    """Warn when the corpus has fewer documents than this (e.g. a package that was meant to provide them is
    missing). null: no check."""
    weight: float = 1.0
    """Share of training blocks drawn from this corpus; weights are normalised over the corpora, so
    `{ja: 0.8, en: 0.2}` replays 20% of an original English corpus during continued pretraining."""

    def __post_init__(self):
        if not self.name or not self.path:
            raise RecipeError("every entry of data.corpora needs a `name` and a `path` (file, folder, glob or Hub ID)")
        if self.weight < 0:
            raise RecipeError(f"corpus '{self.name}': weight must be >= 0, got {self.weight}")
        if self.max_documents is not None and self.max_documents <= 0:
            raise RecipeError(f"corpus '{self.name}': max_documents must be positive, got {self.max_documents}")


@dataclass
class CorpusConfig:
    corpora: list[CorpusSpec] = field(default_factory=list)
    """Corpora to mix by weight. A corpus of weight 0 is only evaluated (its validation loss is logged)."""
    seq_len: int = 2048
    """Tokens per packed block. Documents are joined with EOS and cut into blocks of this length."""
    val_fraction: float = 0.01
    """Share of each corpus's documents held out for validation (chosen by a hash of the document's name,
    so the same documents are held out in every run, continued pretraining included)."""
    nfkc: bool = False
    """NFKC-normalise text (full-width ＡＢＣ -> ABC, half-width ｶﾅ -> カナ)."""
    cache_dir: str = "outputs/cache"
    """Where tokenised corpora are cached, keyed by corpus, files and tokenizer: tokenised once per machine."""
    seed: int = 1234
    """Seed of max_documents draws and of the block order (a fixed permutation per corpus and epoch)."""

    def __post_init__(self):
        if self.seq_len < 8:
            raise RecipeError(f"data.seq_len must be at least 8, got {self.seq_len}")
        if not 0.0 < self.val_fraction < 0.5:
            raise RecipeError(f"data.val_fraction is a share of documents in (0, 0.5); got {self.val_fraction}")
        names = [c.name for c in self.corpora]
        if len(set(names)) != len(names):
            raise RecipeError(f"data.corpora: names must be unique, got {names}")


@dataclass
class TokenizerConfig:
    name_or_path: str | None = None
    """Reuse this tokenizer (Hub ID or folder). null: the base model's when continuing, else train one."""
    vocab_size: int = 32000
    """Vocabulary of a trained tokenizer (byte-level BPE: every byte is a token, so nothing is unknown)."""
    train_chars: int = 20_000_000
    """Characters of training text (spread over the corpora by weight) to train the tokenizer on."""


@dataclass
class ArchitectureConfig:
    base: str | None = None
    """Continue pretraining this LLaMA checkpoint (Hub ID or folder). null: a new model of the shape below."""
    hidden_size: int = 2048
    """Model width (TinyLlama 1.1B: 2048)."""
    intermediate_size: int = 5632
    """SwiGLU MLP width (TinyLlama: 5632)."""
    num_layers: int = 22
    """Decoder layers (TinyLlama: 22)."""
    num_heads: int = 32
    """Attention heads (TinyLlama: 32)."""
    num_kv_heads: int = 4
    """Key/value heads: grouped-query attention, num_heads/num_kv_heads query heads share one (TinyLlama: 4)."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output head (LLaMA doesn't; saves vocab x hidden parameters)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    """Attention kernel; sdpa picks flash attention on GPUs that have it."""
    init_seed: int = 0
    """Seed of the new model's initial weights."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise RecipeError(
                f"model: hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}),"
                f" and num_heads by num_kv_heads ({self.num_kv_heads})"
            )


@dataclass
class PretrainTrainingConfig:
    output_dir: str = "outputs/pretrain"
    """Where checkpoints/, the final model + tokenizer, lineage.json, log.jsonl and metrics.json go."""
    micro_batch_size: int = 8
    """Blocks per device per forward pass."""
    global_batch_tokens: int = 2**21
    """Tokens per optimiser step over all devices (TinyLlama: 2M). Gradient accumulation makes up the rest:
    accumulation = global_batch_tokens / (micro_batch_size x seq_len x devices), rounded, at least 1."""
    max_steps: int | None = None
    """Optimiser steps to train. null: max_tokens decides."""
    max_tokens: int | None = None
    """Training tokens, turned into steps of global_batch_tokens (used when max_steps is null)."""
    learning_rate: float = 4e-4
    """Peak learning rate (TinyLlama: 4e-4)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to this share of the peak (LLaMA: 10%)."""
    warmup_steps: int = 2000
    """Linear warmup from 0 (TinyLlama: 2000). Continued pretraining warms up again from its own start."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (LLaMA: 0.9, 0.95)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (norm weights are not decayed)."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast (fp32 master weights) on GPUs with bf16, fp32 elsewhere."""
    compile: bool = False
    """torch.compile the model: faster steps on GPU after a compile of a minute or two."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, ~30% slower."""
    fused_loss: bool = True
    """Fuse the output layer into the loss, chunk by chunk: the micro_batch x seq_len x vocab logits never exist
    (8 GiB at TinyLlama's 16 x 2048 x 32000 in fp32), ~10% faster on CPU. Applies on one process without
    torch.compile; with DDP, FSDP or compile the model's own head runs."""
    log_every: int = 1
    """Log loss, lr, grad norm, tokens/s, MFU and peak memory every N steps."""
    eval_every: int = 100
    """Validation loss and perplexity (per corpus) every N steps, and before the first and after the last."""
    eval_blocks: int = 32
    """Validation blocks per corpus (at most), so evaluation stays short."""
    save_every: int = 500
    """Write a checkpoint (model, optimiser, scheduler, data position, RNG) every N steps, and at the end."""
    keep_checkpoints: int = 2
    """Keep only the newest N checkpoints."""
    seed: int = 42
    """Seed of the RNGs (torch, numpy, random) the run starts with."""

    def __post_init__(self):
        for key in (
            "micro_batch_size",
            "global_batch_tokens",
            "log_every",
            "eval_every",
            "save_every",
            "keep_checkpoints",
            "eval_blocks",
        ):
            if getattr(self, key) <= 0:
                raise RecipeError(f"training.{key} must be positive, got {getattr(self, key)}")
        if (self.max_steps is None) == (self.max_tokens is None):
            raise RecipeError(
                "set exactly one of training.max_steps and training.max_tokens "
                f"(got max_steps={self.max_steps}, max_tokens={self.max_tokens})"
            )
        if (self.max_steps or 1) <= 0 or (self.max_tokens or 1) <= 0:
            raise RecipeError("training.max_steps / training.max_tokens must be positive")
        if self.learning_rate <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise RecipeError(
                f"training.learning_rate must be positive and min_lr_ratio in [0, 1], got "
                f"{self.learning_rate}, {self.min_lr_ratio}"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise RecipeError(f"training.betas expects two numbers in [0, 1), got {self.betas}")


@dataclass
class PretrainRecipe:
    model: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    """A new model's shape, or the checkpoint to continue from (`model.base`)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Reuse a tokenizer or train one on the corpora."""
    data: CorpusConfig = field(default_factory=CorpusConfig)
    """Corpora, their mixture weights, sequence length, validation split."""
    training: PretrainTrainingConfig = field(default_factory=PretrainTrainingConfig)
    """Optimiser, token batch, schedule, checkpoints, logging."""
    resume: bool = False
    """Continue exactly from the newest checkpoint in training.output_dir."""
    print_recipe: bool = False
    """Print the resolved recipe as YAML and exit without training."""

    def __post_init__(self):
        if not self.data.corpora:
            raise RecipeError("data.corpora is empty: name at least one corpus (name and path)")
        if not any(c.weight > 0 for c in self.data.corpora):
            raise RecipeError("data.corpora: at least one corpus needs a positive weight")


# ----------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with errors that name the key
# ----------------------------------------------------------------------------------------------------------
# Written by hand rather than with OmegaConf structured configs: OmegaConf 2.3 has no unions (we need
# `str | list[str]`), and its errors neither suggest the closest key nor say which recipe file was at fault.


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
    names = {f.name for f in dataclasses.fields(cls)}
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


# ----------------------------------------------------------------------------------------------------------
# Loading: recipe=NAME + overrides
# ----------------------------------------------------------------------------------------------------------


def recipes_dir() -> Path:
    from finetune import shipped_dir

    return shipped_dir("recipes")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


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


def parse_args(argv: list[str]) -> tuple[str, list]:
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
            "no recipe given: add recipe=NAME (one of: " + ", ".join(available_recipes()) + ") or recipe=path/to.yaml"
        )
    return str(name), rest


def compose(name: str) -> tuple[dict, Path]:
    """Compose recipe `name` (with its defaults list) into a plain dict; return it and the recipe's file."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        config_dir, config_name = as_path.resolve().parent, as_path.stem
    else:
        config_dir, config_name = recipes_dir(), name
        if not (config_dir / f"{name}.yaml").is_file():
            guess = difflib.get_close_matches(name, available_recipes(), n=1)
            hint = f" Did you mean '{guess[0]}'?" if guess else ""
            raise RecipeError(f"no recipe '{name}' in {config_dir}.{hint} Available: {', '.join(available_recipes())}")
    file = config_dir / f"{config_name}.yaml"
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = hydra_compose(config_name=config_name)
    except HydraException as e:
        raise RecipeError(f"could not compose recipe {file}: {e}") from None
    return OmegaConf.to_container(cfg, resolve=True), file


def load(argv: list[str], cls: type = SFTRecipe) -> tuple[Any, Path]:
    """`recipe=NAME key.sub=value ...` -> (validated recipe, recipe file)."""
    name, overrides = parse_args(argv)
    tree, file = compose(name)
    for o in overrides:
        _set(tree, o.key_or_group, o.value(), delete=o.is_delete())
    try:
        return build(cls, tree), file
    except RecipeError as e:
        raise RecipeError(f"recipe {file}: {e}{_other_script_hint(file, cls)}") from None


SCRIPTS = {"SFTRecipe": "sft.py", "PretrainRecipe": "pretrain.py"}


def script_of(file: Path, text: str | None = None) -> str | None:
    """The entry script a recipe's header launches it with (`... finetune/pretrain.py recipe=NAME` ->
    `pretrain.py`), or None."""
    text = file.read_text(encoding="utf-8") if text is None else text
    found = re.search(rf"finetune/(\w+\.py) recipe={re.escape(file.stem)}\b", text)
    return found.group(1) if found else None


def recipe_writing(path: str) -> str | None:
    """`finetune/pretrain.py recipe=pretrain-tiny` if a shipped recipe writes to `path` (e.g. outputs/pretrain-tiny)."""
    for file in sorted(recipes_dir().glob("*.yaml")):
        text = file.read_text(encoding="utf-8")
        if re.search(rf"^\s*output_dir:\s*{re.escape(path.rstrip('/'))}/?\s*(#.*)?$", text, re.MULTILINE):
            return f"finetune/{script_of(file, text) or 'sft.py'} recipe={file.stem}"
    return None


def _other_script_hint(file: Path, cls: type) -> str:
    """If the recipe's header names another script than the one running, say so."""
    script = script_of(file)
    if script and script != SCRIPTS.get(cls.__name__, script):
        return f" (this recipe is for finetune/{script})"
    return ""
