"""The pretraining stage's schema (finetune/pretrain.py): a new model's shape or the base to continue, the tokenizer,
the corpora and their mixture, and the token-batch training loop's knobs beyond the shared ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from finetune.config.shared import AttnImplementation, HubConfig, TrainingBase
from finetune.errors import RecipeError

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
    exclude: list[str] = field(default_factory=list)
    """Documents left out of training, validation and tokenizer training: names relative to the corpus's folder
    (`man1/ls.1.gz` under `/usr/share/man`), glob patterns allowed; e.g. the study's evaluation pages. Applied to
    the cached text when it is tokenised (nothing is read again); the log counts them."""
    exclude_from: str | None = None
    """A file of further names to leave out, one per line (a list too long for a command line: the study writes
    one, named by a hash of its contents)."""
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
    attn_implementation: AttnImplementation = "sdpa"
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
class TrainingConfig(TrainingBase):
    output_dir: str = "outputs/pretrain"
    """Where checkpoints (`checkpoint-N/`), the final model + tokenizer, lineage.json, log.jsonl and metrics.json go."""
    micro_batch_size: int = 8
    """Blocks per device per forward pass."""
    learning_rate: float = 4e-4
    """Peak learning rate (TinyLlama: 4e-4)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (norm weights are not decayed)."""
    log_every: int = 1
    """Log loss, learning rate, grad norm, tokens/s, MFU (GPU) and peak memory every N steps (a line each)."""
    eval_every: int | None = 100
    """Validation loss and perplexity (per corpus) every N steps, and before the first and after the last."""
    global_batch_tokens: int = 2**21
    """Tokens per optimiser step over all devices (TinyLlama: 2M). Gradient accumulation makes up the rest:
    accumulation = global_batch_tokens / (micro_batch_size x seq_len x devices), rounded, at least 1."""
    max_steps: int | None = None
    """Optimiser steps to train. null: max_tokens decides."""
    max_tokens: int | None = None
    """Training tokens, turned into steps of global_batch_tokens (used when max_steps is null)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to this share of the peak (LLaMA: 10%)."""
    warmup_steps: int = 2000
    """Linear warmup from 0 (TinyLlama: 2000). Continued pretraining warms up again from its own start."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (LLaMA: 0.9, 0.95)."""
    compile: bool = False
    """torch.compile the model: faster steps on GPU after a compile of a minute or two."""
    eval_blocks: int = 32
    """Validation blocks per corpus (at most), so evaluation stays short."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("global_batch_tokens", "eval_blocks"):
            if getattr(self, key) <= 0:
                raise RecipeError(f"training.{key} must be positive, got {getattr(self, key)}")
        if (self.max_steps is None) == (self.max_tokens is None):
            raise RecipeError(
                "set exactly one of training.max_steps and training.max_tokens "
                f"(got max_steps={self.max_steps}, max_tokens={self.max_tokens})"
            )
        if (self.max_steps or 1) <= 0 or (self.max_tokens or 1) <= 0:
            raise RecipeError("training.max_steps / training.max_tokens must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise RecipeError(f"training.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise RecipeError(f"training.betas expects two numbers in [0, 1), got {self.betas}")


@dataclass
class PretrainRecipe:
    stage: ClassVar[str] = "pretrain"

    model: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    """A new model's shape, or the checkpoint to continue from (`model.base`)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Reuse a tokenizer or train one on the corpora."""
    data: CorpusConfig = field(default_factory=CorpusConfig)
    """Corpora, their mixture weights, sequence length, validation split."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimiser, token batch, schedule, checkpoints, logging."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Push the model (weights, tokenizer, lineage, card) to the Hub at the end."""
    resume: bool = False
    """Continue exactly from the newest checkpoint in training.output_dir."""
    print_recipe: bool = False
    """Print the resolved recipe as YAML and exit without training."""

    def __post_init__(self):
        if not self.data.corpora:
            raise RecipeError("data.corpora is empty: name at least one corpus (name and path)")
        if not any(c.weight > 0 for c in self.data.corpora):
            raise RecipeError("data.corpora: at least one corpus needs a positive weight")
