"""The SFT stage's schema (finetune/sft.py): instruction data, and the Trainer's knobs beyond the shared ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from finetune.config.shared import (
    DatasetSpec,
    HubConfig,
    LoraConfig,
    ModelConfig,
    PromptStyle,
    QuantizationConfig,
    TrainingBase,
)
from finetune.errors import RecipeError


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
    padding_free: bool | None = None
    """Without packing: join each micro-batch's examples into one row with no padding, position ids restarting at
    each example so none attends to another (TRL's padding_free). The same batches and the same loss as padding
    them, without the padding's compute. null: on where the model's attention supports it and
    micro_batch_size > 1."""
    group_by_length: bool = False
    """With padded batches (packing and padding_free off): draw micro-batches of similar length (the Trainer's
    group_by_length: shuffled megabatches, each sorted by length), so less of each batch is padding; the log gives
    the padding share. Changes the order of examples, so losses differ from a run without it."""
    nfkc: bool = False
    """NFKC-normalise text (full-width ＡＢＣ -> ABC, half-width ｶﾅ -> カナ); useful for Japanese."""
    train_on_prompt: bool = False
    """Also compute loss on prompt tokens. false: loss only on responses (and their EOS)."""
    eval_size: float = 0.0
    """Held-out share of the mixed data for eval loss: a fraction (<1) or a count of records (>=1)."""
    eval_datasets: list[DatasetSpec] = field(default_factory=list)
    """Held-out data given as datasets of their own (a dev set), instead of a share of `datasets` (eval_size 0)."""
    seed: int = 42
    """Seed for max_samples draws, weighting and the held-out split."""

    def __post_init__(self):
        if self.max_length < 16:
            raise RecipeError(f"data.max_length must be at least 16, got {self.max_length}")
        if self.eval_size < 0:
            raise RecipeError(f"data.eval_size must be >= 0, got {self.eval_size}")
        if self.eval_size and self.eval_datasets:
            raise RecipeError("data.eval_size and data.eval_datasets both name held-out data: keep one")


@dataclass
class TrainingConfig(TrainingBase):
    eval_every: int | float | None = None
    """Evaluate on the held-out data every N steps, and at the end (null: at the end only). A float below 1 is a
    share of the run's steps (the Trainer's rule): 0.125 evaluates eight times, whatever the data's size."""
    learning_rate: float = 2e-4
    """Peak learning rate. 2e-4 is usual for LoRA; full fine-tuning wants ~1e-5."""
    eval_batch_size: int | None = None
    """Sequences (packed blocks when packing) per evaluation pass; null: micro_batch_size. Evaluation keeps no
    activations for a backward pass, so it can take more than training."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimiser step. Global batch = micro_batch_size x this x number of devices."""
    num_epochs: float = 1.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps; null runs num_epochs."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name: cosine, linear, constant, constant_with_warmup, ..."""
    warmup_ratio: float = 0.03
    """Share of steps spent warming up linearly from 0."""
    optim: str = "adamw_torch"
    """transformers optimiser name; `paged_adamw_8bit` saves memory with QLoRA on GPU."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Loggers: tensorboard, wandb, mlflow, ... ([] for none). TensorBoard logs go to output_dir/runs."""
    log_token_metrics: bool = True
    """Log the entropy and top-1 accuracy of the learned tokens (TRL's `entropy`, `mean_token_accuracy`),
    computed on logging steps and in evaluation only, so other steps pay nothing for them."""
    keep_best: bool = False
    """End with the weights of the evaluation (every eval_every steps) with the lowest held-out loss, not the last
    step's: a small set overfits before its last epoch, a large one is still improving. The best trained weights
    (the adapter, or every weight in full fine-tuning) are kept in output_dir/best/, so a resume keeps them too."""
    merge_adapter: bool = False
    """Also save the base with the adapter merged in (output_dir/merged), loadable without PEFT."""

    def __post_init__(self):
        super().__post_init__()
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise RecipeError(f"training.eval_batch_size must be positive or null, got {self.eval_batch_size}")
        if self.gradient_accumulation_steps <= 0:
            raise RecipeError(
                f"training.gradient_accumulation_steps must be positive, got {self.gradient_accumulation_steps}"
            )
        if self.max_steps is not None and self.max_steps <= 0:
            raise RecipeError(f"training.max_steps must be positive or null, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise RecipeError(f"training.warmup_ratio is a share of the steps, in [0, 1); got {self.warmup_ratio}")


@dataclass
class SFTRecipe:
    stage: ClassVar[str] = "sft"

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
