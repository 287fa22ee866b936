"""The DPO stage's schema (finetune/dpo.py): the policy to align (an SFT run, a merged or full model), preference data
rendered as that run trained, DPO's own knobs (TRL's DPOTrainer), and the Trainer's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from finetune.config.shared import (
    HubConfig,
    LoraConfig,
    ModelConfig,
    PromptStyle,
    QuantizationConfig,
    TrainingBase,
    check_dataset_spec,
)
from finetune.errors import RecipeError

# TRL 1.16's DPO loss types (trl/trainer/dpo_config.py)
LOSS_TYPES = tuple(
    "sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard aot aot_unpaired apo_zero apo_down discopop sft "
    "sigmoid_norm".split()
)


PreferenceFormat = Literal["preference", "hh", "alpaca", "sharegpt"]


@dataclass
class PreferenceSpec:
    path: str = ""
    """Hub dataset ID (`Anthropic/hh-rlhf`) or a local .json/.jsonl/.csv/.parquet file."""
    format: PreferenceFormat = "preference"
    """preference (prompt/chosen/rejected), hh (HH-RLHF transcripts), alpaca or sharegpt (LLaMA-Factory's)."""
    name: str | None = None
    """Hub dataset configuration (subset) name."""
    split: str = "train"
    revision: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    """Field mapping from the format's names to this dataset's columns, e.g. {prompt: question}."""
    max_samples: int | None = None
    """Keep this many records, drawn at random with data.seed (before weighting). null keeps all."""
    weight: float = 1.0
    """Share in a mixture: 0.5 keeps a random half of this dataset, 2.0 repeats it twice."""

    def __post_init__(self):
        check_dataset_spec(self)


@dataclass
class PreferenceData:
    datasets: list[PreferenceSpec] = field(default_factory=list)
    """Preference datasets (path, format, columns, max_samples, weight, ...). Formats: preference (prompt/chosen/
    rejected, strings or message lists; without prompt, the implicit one chosen and rejected share), hh (HH-RLHF
    transcripts), alpaca and sharegpt (LLaMA-Factory's preference files)."""
    prompt_style: PromptStyle | None = None
    """null: the prompt style of the SFT run behind model.name_or_path (read from its recipe.yaml), so DPO trains on
    the token ids SFT and generation use; alpaca where there is no run."""
    system_prompt: str | None = None
    """null: that run's data.system_prompt."""
    nfkc: bool | None = None
    """null: that run's data.nfkc."""
    max_length: int = 1024
    """Tokens of prompt + answer. Longer pairs keep the prompt's end and the answers' starts (counted)."""
    eval_size: float = 0.05
    """Held-out share (or count, >= 1) of the pairs: reward accuracy and margin before and after training."""
    seed: int = 42
    """Seed of max_samples draws, weighting and the held-out split."""

    def __post_init__(self):
        if self.max_length < 16:
            raise RecipeError(f"data.max_length must be at least 16, got {self.max_length}")
        if self.eval_size < 0:
            raise RecipeError(f"data.eval_size must be >= 0, got {self.eval_size}")


@dataclass
class DPOConfig:
    beta: float = 0.1
    """How far the policy may move from the reference: larger keeps it closer (IPO: the regularisation tau)."""
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """TRL's loss types: sigmoid (DPO), ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot, apo_zero,
    apo_down, discopop, sft, sigmoid_norm, ... Several are combined with loss_weights (e.g. [sigmoid, sft]: DPO plus
    an SFT term on the chosen answers)."""
    loss_weights: list[float] | None = None
    """One weight per loss type (null: 1 each)."""
    label_smoothing: float = 0.0
    """robust: the probability that a label is flipped (in [0, 0.5)); exo_pair: epsilon."""
    precompute_ref_log_probs: bool = False
    """Compute the reference's log-probabilities of every pair once, before training: no reference forward pass per
    step (faster; with a full-model policy, no reference copy in memory)."""

    def __post_init__(self):
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if unknown or not self.loss_type:
            raise RecipeError(f"dpo.loss_type {unknown or '[]'}: expected names from {', '.join(LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise RecipeError("dpo.loss_weights needs one weight per dpo.loss_type")
        if self.beta <= 0:
            raise RecipeError(f"dpo.beta must be positive, got {self.beta}")
        if "robust" in self.loss_type and not 0 <= self.label_smoothing < 0.5:
            raise RecipeError("dpo.label_smoothing is a flip probability in [0, 0.5) with loss_type robust")


@dataclass
class TrainingConfig(TrainingBase):
    learning_rate: float = 5e-6
    """Peak learning rate: DPO moves a fine-tuned policy a little (5e-7 to 5e-6 full, 5e-6 to 5e-5 LoRA)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches (of pairs) per optimiser step."""
    num_epochs: float = 1.0
    max_steps: int | None = None
    """Stop after this many optimiser steps; null runs num_epochs."""
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.1
    optim: str = "adamw_torch"
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])

    def __post_init__(self):
        super().__post_init__()
        if self.gradient_accumulation_steps <= 0:
            raise RecipeError("training.gradient_accumulation_steps must be positive")
        if self.max_steps is not None and self.max_steps <= 0:
            raise RecipeError("training.max_steps must be positive or null")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise RecipeError(f"training.warmup_ratio is a share of the steps, in [0, 1); got {self.warmup_ratio}")


@dataclass
class DPORecipe:
    stage: ClassVar[str] = "dpo"

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to align: an SFT run's output folder (its adapter keeps training, a frozen copy of it is the
    reference; its base is loaded as the run loaded it, 4-bit included), or a merged or full model (a new LoRA is
    trained, the reference is the model with the adapter disabled)."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    """4-bit loading for a merged or full model (an SFT run's folder brings its own setting)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The new adapter, for a merged or full model (an SFT run's adapter brings its own); method full trains every
    weight against a frozen copy."""
    data: PreferenceData = field(default_factory=PreferenceData)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    resume: bool = False
    """Continue from the newest checkpoint in training.output_dir."""
    print_recipe: bool = False
    """Print the resolved recipe as YAML and exit without training."""

    def __post_init__(self):
        if not self.data.datasets:
            raise RecipeError("data.datasets is empty: name at least one preference dataset (path and format)")
        if self.quantization.load_in_4bit and self.lora.method == "full":
            raise RecipeError("quantization.load_in_4bit=true needs lora.method=lora (4-bit weights can't be trained)")
