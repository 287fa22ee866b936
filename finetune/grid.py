"""The study's grid: its data files (splits, nested fine-tuning subsets, the swapped-source control), its arms (the
base, CPT at each budget, the control CPT, optionally from scratch) and cells (arm x size N x seed), and the commands
that run each through the suite's own entry scripts. A finished cell (its results.json written) is skipped; one whose
recipe keys changed since it finished is refused, naming the keys."""

from __future__ import annotations

import functools
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from finetune import config
from finetune.config.study import StudyRecipe
from finetune.errors import DataError, RecipeError

log = logging.getLogger(__name__)

CELL_FILE = "cell.json"


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TaskFiles:
    folder: Path
    format: str
    """The files' dataset format: alpaca (man-page pairs: instruction, input, output) or messages."""
    train_size: int
    sizes: dict[int, Path]
    """N -> the fine-tuning subset (the first N of one seeded order, so every smaller set is part of the larger)."""
    dev: Path
    eval: Path
    eval_swapped: Path
    """The evaluation items with each source replaced by another item's (a seeded derangement): a model that uses
    its input scores worse on these."""
    excluded_pages: list[str] = field(default_factory=list)
    """Manual pages (evaluation and dev) kept out of every pretraining and CPT corpus."""
    stats: dict = field(default_factory=dict)


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation that moves every index (n >= 2)."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


def _swapped(records: list[dict], key: str, seed: int) -> list[dict]:
    order = _derangement(len(records), seed)
    return [r | {key: records[j][key]} for r, j in zip(records, order, strict=True)]


def prepare_data(cfg: StudyRecipe, folder: Path) -> TaskFiles:
    """Write the study's data files once (kept while the data keys are unchanged, checked by the cells)."""
    from finetune import contamination, pairs

    folder.mkdir(parents=True, exist_ok=True)
    meta_file = folder / "meta.json"
    wanted = {"data": config.to_dict(cfg)["data"], "sizes": cfg.sft.sizes}
    wanted["contamination"] = config.to_dict(cfg)["contamination"]
    if meta_file.is_file() and (meta := json.loads(meta_file.read_text()))["recipe"] == wanted:
        return _files(cfg, folder, meta)
    d = cfg.data
    if d.source == "manpages":
        built = pairs.build(d.eval_pages, d.dev_pages, d.seed, pairs.PairFilter(), Path(d.en_root), Path(d.ja_root))
        train = [pairs.as_instruction(r) for r in built["train"]]
        dev = [pairs.as_instruction(r) for r in built["dev"]]
        evaluation = [pairs.as_instruction(r) for r in built["eval"]]
        excluded, stats, fmt, swap_key = (
            built["pages"]["eval"] + built["pages"]["dev"],
            built["stats"],
            "alpaca",
            "input",
        )
    else:
        train, dev, evaluation, stats = _from_datasets(cfg)
        excluded, fmt, swap_key = [], "messages", None
    # Pairs that share an n-gram with an evaluation item (the same option text on another page, a boilerplate
    # sentence) would teach the evaluation: dropped, and counted.
    index = contamination.Index(
        [record_texts(r) for r in evaluation], cfg.contamination.word_ngram, cfg.contamination.char_ngram
    )
    for name, records in (("train", train), ("dev", dev)):
        kept = [r for r in records if not index.items_in(" \n".join(record_texts(r)))]
        stats[f"{name}_pairs_dropped_as_overlapping_evaluation"] = len(records) - len(kept)
        records[:] = kept
    stats["train_pairs_used"], stats["dev_pairs_used"] = len(train), len(dev)
    random.Random(d.seed).shuffle(train)  # one order: subset N is its first N records
    _write(folder / "train.jsonl", train)
    _write(folder / "dev.jsonl", dev)
    _write(folder / "eval.jsonl", evaluation)
    if swap_key is None:  # messages: swap the user turn that asks
        swapped = _swap_last_user(evaluation, d.seed)
    else:
        swapped = _swapped(evaluation, swap_key, d.seed)
    _write(folder / "eval-swapped.jsonl", swapped)
    for n in cfg.sft.sizes:
        if n > 0:
            if n > len(train):
                raise DataError(f"sft.sizes asks for {n} fine-tuning examples; the training split has {len(train)}")
            _write(folder / f"train-{n}.jsonl", train[:n])
    meta = {"recipe": wanted, "format": fmt, "train_size": len(train), "excluded_pages": excluded, "stats": stats}
    meta_file.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return _files(cfg, folder, meta)


def record_texts(record: dict) -> list[str]:
    """The texts of a data file's record: an Alpaca record's input and output, or a messages record's turns."""
    if "messages" in record:
        return [m["content"] for m in record["messages"]]
    return [record.get("input", ""), record["output"]]


def _files(cfg: StudyRecipe, folder: Path, meta: dict) -> TaskFiles:
    sizes = {n: folder / ("train.jsonl" if n == -1 else f"train-{n}.jsonl") for n in cfg.sft.sizes if n != 0}
    return TaskFiles(
        folder=folder,
        format=meta["format"],
        train_size=meta["train_size"],
        sizes=sizes,
        dev=folder / "dev.jsonl",
        eval=folder / "eval.jsonl",
        eval_swapped=folder / "eval-swapped.jsonl",
        excluded_pages=meta["excluded_pages"],
        stats=meta["stats"],
    )


def _as_messages(example: dict) -> dict:
    """A canonical example as a `messages` record; a user turn's `input` (Alpaca, Dolly) joins its text after a
    blank line, as the chat styles render it."""
    return {
        "messages": [
            {"role": t["role"], "content": t["content"] + (f"\n\n{t['input']}" if t.get("input") else "")}
            for t in example["turns"]
        ]
    }


def _from_datasets(cfg: StudyRecipe):
    """Instruction data from dataset specs: a pool for fine-tuning, dev and (without data.eval) evaluation items."""
    from finetune.config.sft import DataConfig
    from finetune.instructions import load_examples

    d = cfg.data
    pool = [e for e in load_examples(DataConfig(datasets=d.pool, seed=d.seed))[0] if "turns" in e]
    evaluation = load_examples(DataConfig(datasets=d.eval, seed=d.seed))[0] if d.eval else pool[: d.eval_size]
    rest = pool if d.eval else pool[d.eval_size :]
    dev, train = rest[: d.dev_size], rest[d.dev_size :]
    stats = {"pool": len(pool), "train": len(train), "dev": len(dev), "eval": len(evaluation)}
    return (
        [_as_messages(e) for e in train],
        [_as_messages(e) for e in dev],
        [_as_messages(e) for e in evaluation],
        stats,
    )


def _swap_last_user(records: list[dict], seed: int) -> list[dict]:
    def last_user(r):
        return max(i for i, m in enumerate(r["messages"]) if m["role"] == "user")

    order = _derangement(len(records), seed)
    out = []
    for r, j in zip(records, order, strict=True):
        messages = [dict(m) for m in r["messages"]]
        messages[last_user(r)]["content"] = records[j]["messages"][last_user(records[j])]["content"]
        out.append({"messages": messages})
    return out


# ----------------------------------------------------------------------------------------------------------
# Arms and cells
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Arm:
    name: str
    """base, cpt-target-T, cpt-control-T or scratch."""
    model: Path | str
    kind: str
    """base, cpt (target language), control (original language only, same budget), scratch."""
    steps: int = 0
    """CPT budget in optimiser steps (0 for base and scratch)."""


@dataclass
class Cell:
    arm: Arm
    n: int
    """Fine-tuning set size (0: the arm's model as it is; -1: the whole training split)."""
    seed: int
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.arm.name}/n{self.n if self.n >= 0 else 'all'}-s{self.seed}"

    @property
    def sft_dir(self) -> Path:
        return self.folder / "sft"

    @property
    def eval_dir(self) -> Path:
        return self.folder / "eval"

    @property
    def model(self) -> str:
        return str(self.sft_dir if self.n != 0 else self.arm.model)


def arms(cfg: StudyRecipe, out: Path) -> list[Arm]:
    base = cfg.base.path or str(out / "base")
    found = [Arm("base", base, "base")]
    for steps in cfg.cpt.steps:
        found.append(Arm(f"cpt-target-{steps}", out / "cpt" / f"target-{steps}", "cpt", steps))
        if cfg.cpt.control:
            found.append(Arm(f"cpt-control-{steps}", out / "cpt" / f"control-{steps}", "control", steps))
    if cfg.scratch:
        found.append(Arm("scratch", out / "scratch", "scratch"))
    return found


def cells(cfg: StudyRecipe, out: Path) -> list[Cell]:
    found = []
    for arm in arms(cfg, out):
        for n in cfg.sft.sizes:
            for seed in cfg.sft.seeds[:1] if n == 0 else cfg.sft.seeds:  # N=0 trains nothing: one cell
                label = f"n{n if n >= 0 else 'all'}-s{seed}"
                found.append(Cell(arm, n, seed, out / "cells" / arm.name / label))
    return found


def epochs(cfg: StudyRecipe, size: int) -> float:
    """examples_per_cell / N, within [min_epochs, max_epochs]."""
    return min(cfg.sft.max_epochs, max(cfg.sft.min_epochs, cfg.sft.examples_per_cell / size))


# ----------------------------------------------------------------------------------------------------------
# What decides a cell's result: recorded when it starts, compared when the study runs again
# ----------------------------------------------------------------------------------------------------------

# Keys no cell's result depends on: where and how jobs run, the analysis, the grid's other points.
_NOT_RESULTS = ("study.", "fit.", "print_recipe", "sft.sizes", "sft.seeds", "cpt.steps", "cpt.control")


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


# Keys of the stage recipes that the study sets per cell or per arm (from keys it records itself).
_SET_BY_STUDY = {
    "sft": (
        "model.name_or_path",
        "data.datasets",
        "data.eval_datasets",
        "training.output_dir",
        "training.num_epochs",
        "training.eval_every",
        "training.seed",
        "training.keep_best",
        "resume",
    ),
    "pretrain": ("model.base", "training.output_dir", "training.max_steps", "resume"),
}


@functools.cache
def _stage_recipe(stage: str, name: str, overrides: tuple[str, ...]) -> dict:
    """A stage recipe as the study runs it, flattened, less the keys the study sets per cell or arm: an edit to the
    recipe's file changes a cell's result as surely as an edit to the study's recipe."""
    from finetune.config.pretrain import PretrainRecipe
    from finetune.config.sft import SFTRecipe

    schema = SFTRecipe if stage == "sft" else PretrainRecipe
    flat = _flat(config.to_dict(config.load([f"recipe={name}", *overrides], schema)[0]))
    return {k: v for k, v in flat.items() if not k.startswith(_SET_BY_STUDY[stage]) and not k.endswith(".exclude")}


def decisive_keys(cfg: StudyRecipe, cell: Cell) -> dict:
    """The recipe keys (dotted) a cell's result depends on: the study's, and those of the SFT recipe it fine-tunes
    with, the CPT recipe of its arm and the pretraining recipe of a base the study builds (prefixed sft_recipe.,
    cpt_recipe., base_recipe.). The corpora's exclusions follow from the data keys."""
    keys = {k: v for k, v in _flat(config.to_dict(cfg)).items() if not k.startswith(_NOT_RESULTS)}
    if cell.arm.kind in ("base", "scratch"):
        keys = {k: v for k, v in keys.items() if not k.startswith(("cpt.", "scratch"))}
    if cell.arm.kind != "scratch":
        keys.pop("scratch", None)
    stages = [("sft_recipe", "sft", cfg.sft.recipe, cfg.sft.overrides)]
    if cell.arm.kind in ("cpt", "control"):
        stages.append(("cpt_recipe", "pretrain", cfg.cpt.recipe, cfg.cpt.overrides))
    if cfg.base.path is None:
        stages.append(("base_recipe", "pretrain", cfg.base.recipe, cfg.base.overrides))
    for prefix, stage, name, overrides in stages:
        keys |= {f"{prefix}.{k}": v for k, v in _stage_recipe(stage, name, tuple(overrides)).items()}
    return keys


def check_finished(cfg: StudyRecipe, found: list[Cell]) -> None:
    """Refuse to run where a finished cell would now be computed differently, naming the keys."""
    for cell in found:
        recorded = cell.folder / CELL_FILE
        if not (cell.eval_dir / "results.json").is_file() or not recorded.is_file():
            continue
        old = json.loads(recorded.read_text())["keys"]
        new = decisive_keys(cfg, cell)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
            raise RecipeError(
                f"cell {cell.name} finished under other settings, which would change its result: {shown}. Set them "
                f"back, or write this study to another study.output_dir"
            )


def record(cfg: StudyRecipe, cell: Cell) -> None:
    cell.folder.mkdir(parents=True, exist_ok=True)
    info = {"arm": cell.arm.name, "n": cell.n, "seed": cell.seed, "keys": decisive_keys(cfg, cell)}
    (cell.folder / CELL_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------


def script(name: str) -> str:
    """The entry script's path, from a checkout or an installed package."""
    from finetune import shipped_dir

    if name == "evaluate":
        return str(shipped_dir("eval") / "evaluate.py")
    return str(Path(__file__).resolve().parent / f"{name}.py")


def decontaminated(recipe_name: str, overrides: list[str], pages: list[str], index) -> tuple[list[str], dict]:
    """Overrides that leave out of each corpus of a pretraining recipe the study's held-out pages (manual-page
    corpora: names relative to the corpus's folder, as the pages are named) and every document that shares an
    n-gram with an evaluation item (a copy of a held-out page under another name, shared boilerplate); and per corpus
    what was found. The corpora's text caches are built here if absent (the pretraining run reuses them)."""
    from finetune import corpus
    from finetune.config.pretrain import PretrainRecipe

    recipe = config.load([f"recipe={recipe_name}", *overrides], PretrainRecipe)[0]
    out, found = [], {}
    for i, spec in enumerate(recipe.data.corpora):
        text_dir = corpus.extract_text(spec, recipe.data)
        held = set(pages) if spec.format == "man" or "/man" in spec.path else set()
        overlapping = set()
        for split in ("train", "val"):
            with (text_dir / f"{split}.jsonl").open(encoding="utf-8") as f:
                for line in f:
                    doc = json.loads(line)
                    if doc["name"] not in held and index.items_in(doc["text"]):
                        overlapping.add(doc["name"])
        exclude = sorted(set(spec.exclude) | held | overlapping)
        if exclude:
            out.append(f"data.corpora.{i}.exclude={json.dumps(exclude, ensure_ascii=False)}")
        found[spec.name] = {"held_out_pages": len(held), "overlapping_documents": sorted(overlapping)}
    return out, found


def pretrain_command(launch: list[str], recipe: str, out: Path, overrides: list[str]) -> list[str]:
    return [*launch, script("pretrain"), f"recipe={recipe}", f"training.output_dir={out}", *overrides, "resume=true"]


def control_overrides(cfg: StudyRecipe) -> list[str]:
    """The CPT recipe's target-language corpora at weight 0 (kept, for their validation loss): the control continues
    on the original language alone, at the same budget."""
    from finetune.config.pretrain import PretrainRecipe

    recipe = config.load([f"recipe={cfg.cpt.recipe}", *cfg.cpt.overrides], PretrainRecipe)[0]
    targets = [i for i, c in enumerate(recipe.data.corpora) if c.name in cfg.cpt.target_corpora]
    missing = set(cfg.cpt.target_corpora) - {c.name for c in recipe.data.corpora}
    if missing or len(targets) == len(recipe.data.corpora):
        raise RecipeError(
            f"cpt.target_corpora {cfg.cpt.target_corpora} must name some, not all, of recipe {cfg.cpt.recipe}'s "
            f"corpora ({[c.name for c in recipe.data.corpora]})"
        )
    return [f"data.corpora.{i}.weight=0" for i in targets]


def sft_command(cfg: StudyRecipe, launch: list[str], cell: Cell, files: TaskFiles) -> list[str]:
    data = f"[{{path: '{files.sizes[cell.n]}', format: {files.format}}}]"
    dev = f"[{{path: '{files.dev}', format: {files.format}}}]"
    return [
        *launch,
        script("sft"),
        f"recipe={cfg.sft.recipe}",
        f"model.name_or_path={cell.arm.model}",
        f"data.datasets={data}",
        f"data.eval_datasets={dev}",
        f"training.output_dir={cell.sft_dir}",
        f"training.num_epochs={epochs(cfg, files.train_size if cell.n == -1 else cell.n)}",
        f"training.eval_every={1 / cfg.sft.evals_per_cell}",
        f"training.seed={cell.seed}",
        "training.keep_best=true",
        *cfg.sft.overrides,
        "resume=true",
    ]


def eval_recipe(cfg: StudyRecipe, files: TaskFiles, path: Path) -> Path:
    """The evaluation every cell runs (written once): the response cross-entropy on the evaluation items, the same
    with swapped sources, greedy generations scored by chrF and BLEU, any harness tasks; prompted as the cells
    fine-tune (the SFT recipe's prompt style and system prompt)."""
    import yaml

    from finetune.config.sft import SFTRecipe

    sft = config.load([f"recipe={cfg.sft.recipe}", *cfg.sft.overrides], SFTRecipe)[0].data
    render = {"prompt_style": sft.prompt_style, "system_prompt": sft.system_prompt, "max_length": sft.max_length}
    spec = {"format": files.format}
    tasks = [
        {"name": "ce", "type": "loss", "datasets": [{"path": str(files.eval)} | spec]} | render,
        {"name": "ce-swapped", "type": "loss", "datasets": [{"path": str(files.eval_swapped)} | spec]} | render,
        {
            "name": "generation",
            "type": "generation",
            "datasets": [{"path": str(files.eval)} | spec],
            "max_examples": cfg.eval.generation_examples,
            "max_new_tokens": cfg.eval.max_new_tokens,
            "language": cfg.eval.language,
            "metrics": ["chrf", "bleu", "exact_match", "char_f1"],
        }
        | render,
    ]
    if cfg.eval.harness_tasks:
        tasks.append({"name": "harness", "type": "harness", "harness_tasks": list(cfg.eval.harness_tasks)})
    recipe = {
        "model": "set-per-cell",
        "tasks": tasks,
        "eval": {"batch_size": cfg.eval.batch_size, "bootstrap_samples": 0, "seed": cfg.data.seed},
    }
    text = "# Written by finetune/study.py: the evaluation every cell of the study runs (model= per cell).\n"
    path.write_text(text + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def eval_command(cell: Cell, recipe: Path) -> list[str]:
    import sys

    return [
        sys.executable,
        script("evaluate"),
        f"recipe={recipe}",
        f"model={cell.model}",
        f"eval.output_dir={cell.eval_dir}",
    ]
