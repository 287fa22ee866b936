"""The study's schema (finetune/study.py): does a large fine-tuning set make continued pretraining unnecessary? A grid
of arms (no CPT, CPT on the target language at token budgets, the same budgets on the original language as a control,
optionally from scratch) x fine-tuning sizes x seeds, each cell run through the suite's own entry points."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from finetune.config.shared import DatasetSpec
from finetune.errors import RecipeError


@dataclass
class SlurmConfig:
    partition: str | None = None
    """Slurm partition (null: the cluster's default)."""
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 64
    timeout_min: int = 240
    """Wall-clock limit of one job (a pretraining budget or one cell)."""
    account: str | None = None
    additional: dict[str, str] = field(default_factory=dict)
    """Further sbatch options (submitit's slurm_additional_parameters), e.g. {qos: high}."""


@dataclass
class RunConfig:
    output_dir: str = "outputs/study"
    """Everything the study writes: data/, base/, cpt-*/, cells/, results.csv, results.json, study.png, report.md."""
    executor: Literal["local", "slurm", "debug"] = "local"
    """Where jobs run: local (submitit's LocalExecutor: subprocesses on this machine), slurm (submitit on a cluster),
    debug (one after another in the study's process: the entry scripts still run as subprocesses)."""
    max_parallel: int = 2
    """Jobs running at once. On a machine without a GPU its cores are shared among them (2 on 2 cores: 1.4x the
    work of one at a time, for the small models a CPU trains); a cluster takes many."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    launcher: list[str] | None = None
    """How each job starts an entry script, e.g. [accelerate, launch, --config_file, recipes/accelerate/ddp.yaml].
    null: `accelerate launch --num_processes 1` where a GPU is, plain `python` on a CPU (accelerate would start a
    second interpreter, seconds per job, and give it one thread)."""


@dataclass
class BaseConfig:
    path: str | None = None
    """The base every arm starts from: a model folder or Hub ID. null: pretrain one with `recipe` into
    output_dir/base (when absent), the evaluation pages excluded from its corpora."""
    recipe: str = "pretrain-tiny"
    """Pretraining recipe (recipes/pretrain) that builds the base when `path` is null."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides for that pretraining run."""


@dataclass
class CPTConfig:
    recipe: str = "cpt-ja"
    """Continued-pretraining recipe (recipes/pretrain) of the target-language arm; its base is replaced by the
    study's."""
    steps: list[int] = field(default_factory=lambda: [60])
    """Token budgets, as optimiser steps of the recipe's global_batch_tokens: one CPT checkpoint per budget."""
    target_corpora: list[str] = field(default_factory=lambda: ["ja"])
    """The recipe's corpora that are the target language; the rest are replay."""
    control: bool = True
    """Also continue pretraining on the original-language corpora alone (the recipe's other corpora, weights
    rescaled) at each budget: more training without the new language, so one isn't mistaken for the other."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides for every CPT run."""


@dataclass
class TaskData:
    source: Literal["manpages", "datasets"] = "manpages"
    """manpages: English -> Japanese pairs aligned from Debian's manpages and manpages-ja (finetune/pairs.py), split
    by page, the evaluation pages excluded from every pretraining and CPT corpus. datasets: `pool` (fine-tuning
    data) and `eval` as dataset specs."""
    en_root: str = "/usr/share/man"
    ja_root: str = "/usr/share/man/ja"
    """manpages: where the English and the Japanese pages are installed."""
    eval_pages: int = 50
    dev_pages: int = 20
    """manpages: pages held out for evaluation, and for the dev split that picks each cell's best checkpoint."""
    pool: list[DatasetSpec] = field(default_factory=list)
    """datasets: the fine-tuning pool; dev and (without `eval`) evaluation items are drawn from it."""
    eval: list[DatasetSpec] = field(default_factory=list)
    """datasets: evaluation items (null: `eval_size` items drawn from the pool)."""
    eval_size: int = 500
    dev_size: int = 200
    seed: int = 0
    """Seed of the page split (or the pool's), the nested subsets and the swapped sources."""


@dataclass
class SFTGrid:
    recipe: str = "study-sft"
    """SFT recipe (recipes/sft) every cell fine-tunes with; model, data and output are the cell's."""
    sizes: list[int] = field(default_factory=lambda: [0, 100, 300, 1000, -1])
    """Fine-tuning set sizes N; 0 evaluates the arm's model without fine-tuning, -1 is the whole training split.
    Subsets are nested: each smaller set is part of every larger one."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One fine-tuning run per seed (the subset is the same; initialisation of new weights and order differ)."""
    examples_per_cell: int = 2400
    min_epochs: float = 2.0
    max_epochs: float = 8.0
    """Epochs of a cell: examples_per_cell / N, within [min_epochs, max_epochs]; the dev split picks the best
    evaluation (training.keep_best), so a small set stops before it overfits and a large one isn't cut short."""
    evals_per_cell: int = 8
    """Dev evaluations per cell (training.eval_every is set from it)."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides for every cell's SFT."""


@dataclass
class CellEval:
    generation_examples: int = 100
    """Evaluation items each cell also answers by greedy generation (chrF, BLEU); the loss uses all of them."""
    max_new_tokens: int = 48
    batch_size: int = 16
    harness_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks each cell also runs (e.g. [ja_leaderboard_jcommonsenseqa])."""
    language: Literal["auto", "en", "ja"] = "ja"


@dataclass
class FitConfig:
    tolerance: float = 0.05
    """The CPT gain (nats of response cross-entropy) below which CPT counts as unnecessary: N* is where the fitted
    gain falls below it."""
    bootstrap: int = 200
    """Resamples (of seeds and evaluation items) for the intervals of the gain and N*."""
    starts: int = 64
    """Starting points of each fit (the Chinchilla replications' grid, thinned)."""
    huber_delta: float = 1e-3


@dataclass
class ContaminationConfig:
    word_ngram: int = 13
    """English n-gram length in words (GPT-3's decontamination used 13)."""
    char_ngram: int = 20
    """Japanese n-gram length in characters (no spaces between words)."""
    max_share: float = 0.02
    """Refuse the study when more than this share of the evaluation items shares an n-gram with a training corpus
    or a fine-tuning set."""


@dataclass
class StudyRecipe:
    stage: ClassVar[str] = "study"

    study: RunConfig = field(default_factory=RunConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    cpt: CPTConfig = field(default_factory=CPTConfig)
    scratch: bool = False
    """Also an arm from scratch: a randomly initialised model of the base's shape and tokenizer, fine-tuned alone."""
    data: TaskData = field(default_factory=TaskData)
    sft: SFTGrid = field(default_factory=SFTGrid)
    eval: CellEval = field(default_factory=CellEval)
    fit: FitConfig = field(default_factory=FitConfig)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    print_recipe: bool = False
    """Print the resolved recipe as YAML and exit."""

    def __post_init__(self):
        sizes = self.sft.sizes
        if not sizes or any(n < -1 for n in sizes) or len(set(sizes)) < len(sizes):
            raise RecipeError(f"sft.sizes must be distinct sizes >= 0 (or -1 for all), got {sizes}")
        if sum(n != 0 for n in sizes) < 3:
            raise RecipeError("sft.sizes needs at least three sizes above 0 to fit L(N) = E + A/N^alpha")
        if not self.cpt.steps or any(s <= 0 for s in self.cpt.steps):
            raise RecipeError(f"cpt.steps must be positive step counts, got {self.cpt.steps}")
        if not self.sft.seeds or len(set(self.sft.seeds)) < len(self.sft.seeds):
            raise RecipeError(f"sft.seeds must be distinct, and at least one, got {self.sft.seeds}")
        if self.sft.evals_per_cell < 2:
            raise RecipeError(f"sft.evals_per_cell must be 2 or more (dev evaluations), got {self.sft.evals_per_cell}")
        if not 0 < self.sft.min_epochs <= self.sft.max_epochs or self.sft.examples_per_cell <= 0:
            raise RecipeError("sft needs 0 < min_epochs <= max_epochs and examples_per_cell > 0")
        weighted = [d.path for d in self.data.pool + self.data.eval if d.weight != 1.0]
        if weighted:
            raise RecipeError(f"data.pool and data.eval take each record once; {weighted} have a weight")
        if self.data.source == "datasets" and not self.data.pool:
            raise RecipeError("data.source=datasets needs data.pool (the fine-tuning data)")
        if self.study.max_parallel <= 0:
            raise RecipeError(f"study.max_parallel must be positive, got {self.study.max_parallel}")
        if not 0 < self.contamination.max_share < 1:
            raise RecipeError(f"contamination.max_share is a share in (0, 1), got {self.contamination.max_share}")
