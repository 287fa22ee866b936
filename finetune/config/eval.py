"""The evaluation stage's schema (eval/evaluate.py): the model to score (and one to put beside it), the tasks, and
where the results go. A task is a loss, a generation or a harness task; its keys are checked against its type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from finetune.config.shared import DatasetSpec, PromptStyle
from finetune.errors import RecipeError

TaskType = Literal["loss", "generation", "harness"]
GenerationMetric = Literal["exact_match", "char_f1", "chrf", "bleu"]

# Keys that mean something for one kind of task only: set on another kind, they are refused rather than ignored.
_ONLY_FOR = {
    "datasets": ("loss", "generation"),
    "heldout_of": ("loss", "generation"),
    "only": ("loss", "generation"),
    "max_examples": ("loss", "generation"),
    "prompt_style": ("loss", "generation"),
    "system_prompt": ("loss", "generation"),
    "max_length": ("loss", "generation"),
    "max_new_tokens": ("generation",),
    "do_sample": ("generation",),
    "temperature": ("generation",),
    "top_p": ("generation",),
    "language": ("generation",),
    "metrics": ("generation",),
    "harness_tasks": ("harness",),
    "num_fewshot": ("harness",),
    "limit": ("harness",),
}


@dataclass
class TaskSpec:
    name: str = ""
    """Short name, used in results.json, results.md and generations.jsonl (e.g. `heldout-loss`, `ja-qa`)."""
    type: TaskType = "loss"
    """loss: mean negative log-likelihood and perplexity of the responses (of the whole text for `text` data),
    rendered and tokenised exactly as SFT does. generation: greedy (or sampled) answers to each prompt, scored
    against the reference answer. harness: tasks of lm-evaluation-harness (`lm_eval.simple_evaluate`)."""
    # Data (loss and generation)
    datasets: list[DatasetSpec] = field(default_factory=list)
    """Datasets as in SFT recipes (path, format, columns, max_samples, ...). Generation uses each record's last
    assistant turn as the reference and the turns before it as the prompt."""
    heldout_of: str | None = None
    """Instead of `datasets`: the held-out split of an SFT run (its output folder): the records its recipe's
    data.eval_size set aside with its data.seed, which the run never trained on."""
    only: list[str] = field(default_factory=list)
    """With heldout_of: keep the held-out records of these dataset paths only (e.g. the Japanese ones)."""
    max_examples: int | None = None
    """Score at most this many examples, drawn at random (eval.seed) from all of the task's data. null: all."""
    prompt_style: PromptStyle | None = None
    """null: the prompt style of the SFT run behind `model` (else behind `compare`, else alpaca), so both models
    read the same prompts."""
    system_prompt: str | None = None
    """null: that run's data.system_prompt."""
    max_length: int | None = None
    """Tokens per example; longer ones are cut (loss) or their prompt's start dropped (generation), and counted.
    null: that run's data.max_length (1024 without a run)."""
    # Generation
    max_new_tokens: int = 128
    """Tokens generated at most per prompt; generation stops earlier at EOS."""
    do_sample: bool = False
    """false: greedy decoding (reproducible). true: sampling with temperature and top_p."""
    temperature: float = 0.7
    """Sampling temperature (do_sample=true)."""
    top_p: float = 1.0
    """Nucleus sampling mass (do_sample=true)."""
    language: Literal["auto", "en", "ja"] = "auto"
    """Language of the references: BLEU tokenises Japanese with MeCab (sacrebleu's `ja-mecab`, the `ja` extra),
    English with sacrebleu's `13a`. auto: Japanese when a fifth of the references' characters are kana or kanji."""
    metrics: list[GenerationMetric] = field(default_factory=lambda: ["exact_match", "char_f1", "chrf", "bleu"])
    """Generation metrics: exact_match and char_f1 (per example, after NFKC normalisation), chrf and bleu
    (sacrebleu, corpus level)."""
    # Harness
    harness_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness task or group names (hellaswag, arc_easy, japanese_leaderboard,
    ja_leaderboard_jcommonsenseqa, ...), or the name of a local task YAML in eval/tasks/ (runs offline)."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt. null: each task's own default."""
    limit: int | None = None
    """Items per harness task at most (null: all). For smoke runs; a limited score is not the benchmark's."""

    def __post_init__(self):
        if not self.name:
            raise RecipeError("every entry of tasks needs a `name`")
        where = f"task '{self.name}'"
        for key, types in _ONLY_FOR.items():
            spec = TaskSpec.__dataclass_fields__[key]
            default = spec.default_factory() if callable(spec.default_factory) else spec.default
            if self.type not in types and getattr(self, key) != default:
                raise RecipeError(f"{where}: '{key}' applies to {' and '.join(types)} tasks, not to {self.type} tasks")
        if self.type == "harness":
            if not self.harness_tasks:
                raise RecipeError(f"{where}: a harness task needs harness_tasks (e.g. [hellaswag, arc_easy])")
        elif bool(self.datasets) == bool(self.heldout_of):
            raise RecipeError(f"{where}: give either datasets or heldout_of (an SFT run's output folder)")
        if self.only and not self.heldout_of:
            raise RecipeError(f"{where}: 'only' selects datasets of heldout_of's run; list datasets directly instead")
        for key in ("max_examples", "max_length", "limit"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise RecipeError(f"{where}: {key} must be positive or null, got {getattr(self, key)}")
        if self.max_new_tokens <= 0:
            raise RecipeError(f"{where}: max_new_tokens must be positive, got {self.max_new_tokens}")
        weighted = [d.path for d in self.datasets if d.weight != 1.0]
        if weighted:
            raise RecipeError(
                f"{where}: datasets {weighted} have a weight; evaluation scores each record once (use max_samples)"
            )
        if self.type == "generation" and not self.metrics:
            raise RecipeError(f"{where}: metrics is empty: name at least one of exact_match, char_f1, chrf, bleu")


@dataclass
class EvalConfig:
    output_dir: str = "outputs/eval"
    """Where results.json, results.md and generations.jsonl go."""
    batch_size: int = 8
    """Examples per forward pass (loss), prompts per generate call, requests per harness batch."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype. auto: bfloat16 on a GPU that supports it, float16 on older GPUs, float32 on CPU."""
    bootstrap_samples: int = 1000
    """Resamples of the evaluation items for the 95% interval of each difference between the two models."""
    seed: int = 42
    """Seed of sampling (do_sample=true) and of the bootstrap."""

    def __post_init__(self):
        if self.batch_size <= 0:
            raise RecipeError(f"eval.batch_size must be positive, got {self.batch_size}")
        if self.bootstrap_samples < 0:
            raise RecipeError(f"eval.bootstrap_samples must be >= 0, got {self.bootstrap_samples}")


@dataclass
class EvalRecipe:
    stage: ClassVar[str] = "eval"

    model: str = ""
    """The model to evaluate: a Hub ID, a model folder, an adapter folder (its base read from
    adapter_config.json) or a run's output folder (pretraining or SFT)."""
    compare: str | None = None
    """A second model, the same kinds as `model`, scored on the same items and put beside it (e.g. the base of
    an adapter). results.md gives model - compare with a paired bootstrap 95% interval over the items."""
    tasks: list[TaskSpec] = field(default_factory=list)
    """What to score."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Output folder, batch size, dtype, bootstrap."""
    print_recipe: bool = False
    """Print the resolved recipe as YAML and exit without evaluating."""

    def __post_init__(self):
        if not self.model:
            raise RecipeError("no model to evaluate: add model=PATH (a Hub ID, a model, adapter or run folder)")
        if not self.tasks:
            raise RecipeError("tasks is empty: name at least one loss, generation or harness task")
        names = [t.name for t in self.tasks]
        if len(set(names)) < len(names):
            raise RecipeError(f"task names must be unique, got {names}")
