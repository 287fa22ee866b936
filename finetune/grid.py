"""The study's grid: its data files (splits, nested fine-tuning subsets, the swapped-source control), its arms (the
base, CPT at each budget, the control CPT, optionally from scratch) and cells (arm x size N x seed), and the commands
that run each through the suite's own entry scripts. A finished cell (its results.json written) is skipped; one whose
recipe keys changed since it finished is refused, naming the keys."""

from __future__ import annotations

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


def data_keys(cfg: StudyRecipe) -> dict:
    """The study's keys its data files follow from (the contamination threshold is a check, not an input)."""
    tree = config.to_dict(cfg)
    return {"data": tree["data"], "sizes": cfg.sft.sizes} | {
        "ngrams": [cfg.contamination.word_ngram, cfg.contamination.char_ngram]
    }


def cell_record(cell: Cell, sft: dict | None, evaluation: dict, arm: dict[str, dict], data: dict) -> dict:
    """What a cell's result follows from: the SFT recipe it runs (resolved, its overrides applied), the evaluation's,
    the pretraining recipes of its arm (the base the study builds, its CPT), the data keys."""
    return {"arm": cell.arm.name, "n": cell.n, "seed": cell.seed, "data": data, "sft": sft, "eval": evaluation} | {
        "pretraining": arm
    }


def _changes(part: str, old, new) -> list[str]:
    from finetune.checkpoints import changed_keys

    if old is None or new is None:
        return [] if old == new else [f"{part} was {old!r}, now {new!r}"[:300]]
    return [f"{part}.{change}" for change in changed_keys(old, new)]


def check_finished(found: list[tuple[Cell, dict]]) -> None:
    """Refuse to run where a finished cell would now be computed differently, naming the keys. Keys a resume may
    change (logging, checkpoint cadence, output folders: checkpoints.MAY_CHANGE) are not compared."""
    for cell, new in found:
        recorded = cell.folder / CELL_FILE
        if not (cell.eval_dir / "results.json").is_file() or not recorded.is_file():
            continue
        old = json.loads(recorded.read_text())
        changed = _changes("data", old.get("data"), new["data"]) + _changes("sft", old.get("sft"), new["sft"])
        changed += _changes("eval", old.get("eval"), new["eval"])
        for stage in set(old.get("pretraining", {})) | set(new["pretraining"]):
            changed += _changes(stage, old.get("pretraining", {}).get(stage), new["pretraining"].get(stage))
        if changed:
            raise RecipeError(
                f"cell {cell.name} finished under other settings, which would change its result: "
                f"{'; '.join(changed[:6])}. Set them back, or write this study to another study.output_dir"
            )


def check_data(found: list[Cell], keys: dict) -> None:
    """The data keys alone, before the data files are made again for other keys."""
    for cell in found:
        recorded = cell.folder / CELL_FILE
        if (cell.eval_dir / "results.json").is_file() and recorded.is_file():
            changed = _changes("data", json.loads(recorded.read_text()).get("data"), keys)
            if changed:
                raise RecipeError(
                    f"cell {cell.name} finished on other data: {'; '.join(changed[:6])}. Set them back, or write "
                    "this study to another study.output_dir"
                )


def check_pretrained(name: str, folder: Path, recipe) -> None:
    """A finished pretraining job (the base, a CPT budget) is reused only if it ran the recipe the study would run
    now (its saved recipe.yaml against this one, keys a resume may change aside)."""
    import yaml

    from finetune.checkpoints import changed_keys

    saved = folder / "recipe.yaml"
    if not (folder / "metrics.json").is_file() or not saved.is_file():
        return
    changed = changed_keys(yaml.safe_load(saved.read_text(encoding="utf-8")), config.to_dict(recipe))
    if changed:
        raise RecipeError(
            f"{name} ({folder}) was trained under other settings than the study's now: {'; '.join(changed[:6])}. "
            "Set them back, or write this study to another study.output_dir"
        )


def record(cell: Cell, keys: dict) -> None:
    cell.folder.mkdir(parents=True, exist_ok=True)
    (cell.folder / CELL_FILE).write_text(json.dumps(keys, indent=2, ensure_ascii=False, default=str))


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------


def script(name: str) -> str:
    """The entry script's path, from a checkout or an installed package."""
    from finetune import shipped_dir

    if name == "evaluate":
        return str(shipped_dir("eval") / "evaluate.py")
    return str(Path(__file__).resolve().parent / f"{name}.py")


# ----------------------------------------------------------------------------------------------------------
# Decontamination: what the models learn from shares no text with the evaluation items
# ----------------------------------------------------------------------------------------------------------


def pretraining_recipe(name: str, overrides: list[str]):
    from finetune.config.pretrain import PretrainRecipe

    return config.load([f"recipe={name}", *overrides], PretrainRecipe)[0]


def _held(spec, pages: list[str]) -> set[str]:
    """The held-out pages, for a corpus of manual pages (named as the pages are, relative to its folder)."""
    return set(pages) if spec.format == "man" or "/man" in spec.path else set()


def corpus_documents(spec, data, pages: list[str], held_found: list | None = None):
    """(name, text) of every document a corpus would train on (both splits: validation text is read too) but the
    held-out pages (their names, where present, go to `held_found`) and the corpus's own exclusions. Builds the text
    cache if absent (pretraining reuses it)."""
    from finetune import corpus

    text_dir = corpus.extract_text(spec, data)
    skip, held = corpus._Excluded(corpus.exclusions(spec)), _held(spec, pages)
    for split in ("train", "val"):
        with (text_dir / f"{split}.jsonl").open(encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                if doc["name"] in held:
                    if held_found is not None:
                        held_found.append(doc["name"])
                elif not skip(doc["name"]):
                    yield doc["name"], doc["text"]


def found_whole(recipes: list, pages: list[str], index) -> dict[str, set[int]]:
    """Per corpus, the evaluation items whose texts, too short for an n-gram, occur whole in it: those items are
    removed from the evaluation (a page's text can't be excluded for a phrase that a hundred pages share)."""
    found = {}
    for stage, recipe in recipes:
        for spec in recipe.data.corpora:
            hits = set()
            for _, text in corpus_documents(spec, recipe.data, pages):
                hits |= index.items_in(text) & index.short_items
            found[f"{stage} corpus {spec.name}"] = hits
    return found


def decontaminated(recipe, pages: list[str], index, folder: Path) -> tuple[list[str], dict]:
    """Overrides (to append after the user's) that leave out of each corpus of a pretraining recipe the held-out
    pages and every document sharing an n-gram with an evaluation item (a copy of a held-out page under another
    name, a paragraph two pages share); their names go to a file named by a hash of its contents (a command line
    can't hold thousands). And, per corpus, what was left out."""
    import hashlib

    out, found = [], {}
    for i, spec in enumerate(recipe.data.corpora):
        held, present = _held(spec, pages), []
        overlapping = sorted(
            name
            for name, text in corpus_documents(spec, recipe.data, pages, present)
            if index.items_in(text, whole=False)
        )
        names = sorted(held | set(overlapping))
        if names:
            text = "\n".join(names) + "\n"
            file = folder / f"exclude-{spec.name}-{hashlib.sha1(text.encode()).hexdigest()[:12]}.txt"
            file.write_text(text, encoding="utf-8")
            out.append(f"data.corpora.{i}.exclude_from={file}")
        found[spec.name] = {"held_out_pages": len(present), "overlapping_documents": overlapping}
    return out, found


def drop_items(cfg: StudyRecipe, files: TaskFiles, items: set[int], why: str) -> TaskFiles:
    """Remove evaluation items (indices into eval.jsonl), rebuild the swapped control, and count them in the data's
    stats under `why`."""
    if not items:
        return files
    records = [json.loads(line) for line in files.eval.read_text(encoding="utf-8").splitlines()]
    kept = [r for i, r in enumerate(records) if i not in items]
    if len(kept) < 2:
        raise DataError(f"{len(items)} of {len(records)} evaluation items are {why}: too few remain to evaluate")
    _write(files.eval, kept)
    if files.format == "alpaca":
        _write(files.eval_swapped, _swapped(kept, "input", cfg.data.seed))
    else:
        _write(files.eval_swapped, _swap_last_user(kept, cfg.data.seed))
    meta_file = files.folder / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["stats"][f"eval_items_removed_{why}"] = meta["stats"].get(f"eval_items_removed_{why}", 0) + len(items)
    meta["stats"]["eval_pairs_used"] = len(kept)
    meta_file.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return _files(cfg, files.folder, meta)


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


def sft_args(cfg: StudyRecipe, cell: Cell, files: TaskFiles) -> list[str]:
    """A cell's SFT command-line: the study's SFT recipe with the cell's model, data, epochs and seed."""
    data = f"[{{path: '{files.sizes[cell.n]}', format: {files.format}}}]"
    dev = f"[{{path: '{files.dev}', format: {files.format}}}]"
    return [
        f"recipe={cfg.sft.recipe}",
        f"model.name_or_path={cell.arm.model}",
        f"data.datasets={data}",
        f"data.eval_datasets={dev}",
        f"training.output_dir={cell.sft_dir}",
        f"training.num_epochs={epochs(cfg, files.train_size if cell.n == -1 else cell.n)}",
        f"training.eval_every={1 / cfg.sft.evals_per_cell:.6f}",
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
