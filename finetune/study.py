"""The study: does a large fine-tuning set make continued pretraining (CPT) unnecessary?

One CPU, offline (English -> Japanese translation of manual pages, a 7M-parameter base; under 30 minutes):
    python finetune/study.py recipe=study-quickstart
A TinyLlama-class base on GPUs, Japanese CPT on a Hub corpus, Japanese instruction data, on a Slurm cluster:
    python finetune/study.py recipe=study-tinyllama-ja study.executor=slurm study.slurm.partition=gpu

Arms: the base without CPT; CPT on the target-language corpus at each budget (cpt.steps); the same budgets on the
original language alone (the control); optionally from scratch. Each arm is fine-tuned on nested subsets of N
examples (sft.sizes) with each seed, and every cell is evaluated. Every stage runs through the suite's own entry
scripts (finetune/pretrain.py, finetune/sft.py, eval/evaluate.py) as jobs (submitit: local, slurm or debug); a
finished cell is skipped when the study runs again, so a killed study continues where it stopped.
Writes results.csv, results.json, study.png and report.md into study.output_dir.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from finetune import config
from finetune.config.eval import EvalRecipe
from finetune.config.sft import SFTRecipe
from finetune.config.study import StudyRecipe
from finetune.errors import DataError, run_cli

log = logging.getLogger("finetune.study")


def main(argv: list[str]) -> dict:
    cfg, recipe_file = config.load(argv, StudyRecipe)
    if cfg.print_recipe:
        print(config.to_yaml(cfg), end="")
        return {}
    from finetune.offline import go_offline_if_unreachable, is_hub_id

    names = [cfg.base.path or ""] + [d.path for d in cfg.data.pool + cfg.data.eval]
    go_offline_if_unreachable([n for n in names if is_hub_id(n)])
    return run(cfg, recipe_file)


def run(cfg: StudyRecipe, recipe_file: Path | None = None) -> dict:
    import numpy as np

    from finetune import findings, grid, jobs

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    started = time.perf_counter()
    out = Path(cfg.study.output_dir).resolve()  # absolute: jobs may run elsewhere (a cluster node)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(config.to_yaml(cfg), encoding="utf-8")
    log.info("recipe %s resolved (saved to %s)", recipe_file, out / "recipe.yaml")

    # ------------------------------------------------------------------------------------------------------
    # Data: the task's splits, nested subsets, the swapped-source control
    # ------------------------------------------------------------------------------------------------------
    cells = grid.cells(cfg, out)
    data_keys = grid.data_keys(cfg)
    grid.check_data(cells, data_keys)  # before the data files are rewritten for other keys
    files = grid.prepare_data(cfg, out / "data")
    log.info("data: %s", json.dumps(files.stats))

    # ------------------------------------------------------------------------------------------------------
    # Contamination: evaluation items against every corpus and fine-tuning set the models learn from
    # ------------------------------------------------------------------------------------------------------
    recipes = {"cpt": grid.pretraining_recipe(cfg.cpt.recipe, cfg.cpt.overrides)}
    if cfg.base.path is None:  # the study pretrains the base: its corpora are decontaminated like CPT's
        recipes = {"base": grid.pretraining_recipe(cfg.base.recipe, cfg.base.overrides)} | recipes
    index = evaluation_index(cfg, files)
    # an item too short for an n-gram that a corpus holds whole leaves the evaluation set
    whole = grid.found_whole(list(recipes.items()), files.excluded_pages, index)
    files = grid.drop_items(cfg, files, set().union(*whole.values()), "found_whole_in_a_corpus")
    index = evaluation_index(cfg, files)
    exclusions, found = {}, {}
    for stage, recipe in recipes.items():  # appended after the user's overrides, so none can drop them
        exclusions[stage], found[stage] = grid.decontaminated(recipe, files.excluded_pages, index, files.folder)
    contamination = check_contamination(cfg, files, index, exclusions, found)

    # ------------------------------------------------------------------------------------------------------
    # Jobs: the base (when absent), CPT at each budget and its control, then every cell (SFT, evaluation)
    # ------------------------------------------------------------------------------------------------------
    launch = jobs.launcher(cfg.study)
    arms = {a.name: a for a in grid.arms(cfg, out)}
    base = arms["base"]
    work: list[jobs.Job] = []
    pretraining: dict[str, dict] = {}  # arm -> {stage: the resolved recipe it trains with}
    if cfg.base.path is None:
        overrides = [*cfg.base.overrides, *exclusions["base"]]
        recipe = grid.pretraining_recipe(cfg.base.recipe, [*overrides, f"training.output_dir={base.model}"])
        grid.check_pretrained("the base", Path(base.model), recipe)
        pretraining["base"] = {"base": config.to_dict(recipe)}
        command = grid.pretrain_command(launch, cfg.base.recipe, Path(base.model), overrides)
        work.append(jobs.Job("base", [command], out / "logs" / "base.log", Path(base.model) / "metrics.json"))
    for arm in arms.values():
        chain = {"base": pretraining["base"]["base"]} if cfg.base.path is None else {}
        if arm.kind in ("cpt", "control"):
            overrides = [f"model.base={base.model}", f"training.max_steps={arm.steps}", *cfg.cpt.overrides]
            overrides += exclusions["cpt"] + (grid.control_overrides(cfg) if arm.kind == "control" else [])
            recipe = grid.pretraining_recipe(cfg.cpt.recipe, [*overrides, f"training.output_dir={arm.model}"])
            grid.check_pretrained(arm.name, Path(arm.model), recipe)
            chain["cpt"] = config.to_dict(recipe)
            command = grid.pretrain_command(launch, cfg.cpt.recipe, Path(arm.model), overrides)
            after = ["base"] if cfg.base.path is None else []
            log_file, done_file = out / "logs" / f"{arm.name}.log", Path(arm.model) / "metrics.json"
            work.append(jobs.Job(arm.name, [command], log_file, done_file, after))
        pretraining[arm.name] = chain
    if "scratch" in arms and cfg.base.path is None:
        work.append(scratch_job(arms["scratch"], base, out, cfg.data.seed))
    elif "scratch" in arms:
        make_scratch(str(base.model), str(arms["scratch"].model), cfg.data.seed)
    eval_recipe = grid.eval_recipe(cfg, files, out / "eval-cell.yaml")
    evaluation = config.to_dict(config.load([f"recipe={eval_recipe}"], EvalRecipe)[0])
    evaluation.pop("model")
    planned = []
    for cell in cells:
        sft = config.to_dict(config.load(grid.sft_args(cfg, cell, files), SFTRecipe)[0]) if cell.n != 0 else None
        planned.append((cell, grid.cell_record(cell, sft, evaluation, pretraining[cell.arm.name], data_keys)))
    grid.check_finished(planned)  # before anything runs: a changed key would silently mix two studies
    # Longest first (examples trained on): the short cells fill the gaps at the end instead of one long cell
    # running alone while the other slots idle
    sizes = {c.name: files.train_size if c.n == -1 else c.n for c in cells}
    cost = {name: n * grid.epochs(cfg, max(n, 1)) for name, n in sizes.items()}
    for cell, keys in sorted(planned, key=lambda p: -cost[p[0].name]):
        commands = [[*launch, grid.script("sft"), *grid.sft_args(cfg, cell, files)]] if cell.n != 0 else []
        commands.append(grid.eval_command(cell, eval_recipe))
        after = [cell.arm.name] if cell.arm.name in {j.name for j in work} else []
        if not (cell.eval_dir / "results.json").is_file():
            grid.record(cell, keys)
        work.append(jobs.Job(cell.name, commands, cell.folder / "log.txt", cell.eval_dir / "results.json", after))
    pending = [j for j in work if not j.done.exists()]
    skipped = len(work) - len(pending)
    log.info(
        "%d jobs, %d finished earlier (skipped), %d to run (%s)", len(work), skipped, len(pending), cfg.study.executor
    )
    done = [0]

    def report(job, seconds):
        done[0] += 1
        log.info("[%d/%d] %s done in %.0f s", done[0], len(pending), job.name, seconds)

    jobs.run(work, cfg.study, out / "jobs", Path.cwd(), report)

    # ------------------------------------------------------------------------------------------------------
    # Results: a row per cell, the fits and the answer
    # ------------------------------------------------------------------------------------------------------
    rows, items = collect(cfg, cells, files)
    references = reference_points(cfg, files, eval_recipe)
    analysis = findings.analyse(rows, items, cfg)
    context = {
        "contamination": contamination,
        "data": files.stats,
        "compute": add_costs(rows, str(base.model)),
        "limits": limits(cfg, rows, files, contamination, references),
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    findings.write_table(rows, out)
    findings.write_json(rows, analysis, references, context, out)
    findings.plot(rows, analysis, references, out)
    findings.report(rows, analysis, references, context, out)
    log.info(
        "study done in %.1f minutes: %s (report.md, study.png, results.csv, results.json)", context["minutes"], out
    )
    print((out / "report.md").read_text(encoding="utf-8").split("\n## Cross-entropy")[0])
    return {"rows": rows, "analysis": analysis, "items": {k: np.asarray(v).shape for k, v in items.items()}}


# ----------------------------------------------------------------------------------------------------------
# Steps of the study, in the order it takes them
# ----------------------------------------------------------------------------------------------------------


def evaluation_index(cfg: StudyRecipe, files):
    from finetune import contamination, grid

    records = [json.loads(line) for line in files.eval.read_text(encoding="utf-8").splitlines()]
    return contamination.Index(
        [grid.record_texts(r) for r in records], cfg.contamination.word_ngram, cfg.contamination.char_ngram
    )


def check_contamination(cfg: StudyRecipe, files, index, exclusions: dict, found: dict) -> dict:
    """How many evaluation items share text with each corpus the models learn from (its training and validation
    text as it will be tokenised: every exclusion applied) and with the fine-tuning and dev sets; refuse above
    contamination.max_share. A base given by path is checked against the corpora its run recorded, if any: those
    the study can't change. Each count comes with what was excluded to reach it."""
    import yaml

    from finetune import grid
    from finetune.config.pretrain import PretrainRecipe

    recipes = []
    for stage, name, overrides in (
        ("base", cfg.base.recipe, cfg.base.overrides),
        ("cpt", cfg.cpt.recipe, cfg.cpt.overrides),
    ):
        if stage in exclusions:
            recipes.append((stage, grid.pretraining_recipe(name, [*overrides, *exclusions[stage]])))
    sources: dict[str, object] = {}
    saved = Path(cfg.base.path or "") / "recipe.yaml"
    if cfg.base.path and saved.is_file() and (saved.parent / "lineage.json").is_file():  # a pretraining run
        recipes.insert(0, ("base", config.build(PretrainRecipe, yaml.safe_load(saved.read_text(encoding="utf-8")))))
    elif cfg.base.path:
        sources[f"the base's own pretraining data ({cfg.base.path})"] = None  # a Hub model: not checkable here
    for stage, recipe in recipes:
        for spec in recipe.data.corpora:
            sources[f"{stage} corpus {spec.name}"] = (t for _, t in grid.corpus_documents(spec, recipe.data, []))
    for name, path in (("fine-tuning set", files.folder / "train.jsonl"), ("dev set", files.dev)):
        sources[name] = (line for line in path.read_text(encoding="utf-8").splitlines())
    result = {}
    for name, documents in sources.items():
        stage, _, corpus_name = name.partition(" corpus ")
        removed = found.get(stage, {}).get(corpus_name)
        entry = {}
        if removed:
            entry["held_out_pages_excluded"] = removed["held_out_pages"]
            entry["overlapping_documents_excluded"] = len(removed["overlapping_documents"])
        if documents is None:
            result[name] = entry | {"items": None, "share": None}
            continue
        hits = index.hits(documents)
        result[name] = entry | {"items": len(hits), "share": round(len(hits) / index.size, 4)}
        log.info(
            "contamination: %d of %d evaluation items share text with the %s%s",
            len(hits),
            index.size,
            name,
            f" (after excluding {entry['held_out_pages_excluded']} held-out pages and "
            f"{entry['overlapping_documents_excluded']} documents that overlapped)"
            if entry
            else "",
        )
    worst = {k: v for k, v in result.items() if v["share"] is not None and v["share"] > cfg.contamination.max_share}
    if worst:
        shown = "; ".join(f"{k}: {v['items']} items ({100 * v['share']:.1f}%)" for k, v in worst.items())
        raise DataError(
            f"the evaluation set overlaps what the models train on beyond contamination.max_share="
            f"{cfg.contamination.max_share}: {shown}. A base pretrained elsewhere can't be cleaned by the study: "
            "set base.path=null to have it pretrain one without the evaluation pages, or choose other pages"
        )
    return result


def make_scratch(base: str, out: str, seed: int) -> None:
    """A model of the base's shape and tokenizer with fresh random weights: the from-scratch arm."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(out)
    if (folder / "config.json").is_file():
        return
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    (tmp / "lineage.json").write_text(json.dumps({"stage": "scratch", "shape_and_tokenizer_of": base, "seed": seed}))
    (tmp / "metrics.json").write_text("{}")
    tmp.rename(folder)


def scratch_job(arm, base, out: Path, seed: int):
    from finetune import jobs

    code = f"from finetune.study import make_scratch; make_scratch({str(base.model)!r}, {str(arm.model)!r}, {seed})"
    return jobs.Job(
        arm.name,
        [[sys.executable, "-c", code]],
        out / "logs" / "scratch.log",
        Path(arm.model) / "metrics.json",
        ["base"],
    )


def collect(cfg: StudyRecipe, cells, files) -> tuple[list[dict], dict]:
    """A row per cell (metrics, costs, paths) and each cell's per-item NLL on the evaluation items."""
    import numpy as np

    from finetune import grid

    rows, items = [], {}
    for cell in cells:
        results = json.loads((cell.eval_dir / "results.json").read_text())
        metric = {(t, r["metric"]): r["model"] for t, task in results["tasks"].items() for r in task["rows"]}
        sft_metrics = json.loads((cell.sft_dir / "metrics.json").read_text()) if cell.n != 0 else {}
        arm_lineage = Path(cell.arm.model) / "lineage.json"
        lineage = json.loads(arm_lineage.read_text()) if arm_lineage.is_file() else {}
        n = files.train_size if cell.n == -1 else cell.n
        rows.append(
            {
                "arm": cell.arm.name,
                "kind": cell.arm.kind,
                "steps": cell.arm.steps,
                "n": n,
                "n_key": cell.n,
                "seed": cell.seed,
                "ce": metric[("ce", "nll")],
                "ce_swapped": metric[("ce-swapped", "nll")],
                "chrf": metric[("generation", "chrf")],
                "bleu": metric[("generation", "bleu")],
                "exact_match": metric[("generation", "exact_match")],
                "char_f1": metric[("generation", "char_f1")],
                "cpt_tokens": lineage.get("tokens_seen", 0) if cell.arm.kind in ("cpt", "control") else 0,
                "sft_tokens": sft_metrics.get("train_tokens", 0),
                "sft_trainable_params": sft_metrics.get("trainable_params"),
                "sft_total_params": sft_metrics.get("total_params"),
                "sft_steps": sft_metrics.get("global_step"),
                "sft_best_step": sft_metrics.get("best_step"),
                "sft_epochs": round(grid.epochs(cfg, n), 2) if cell.n != 0 else 0,
                "path": str(cell.folder),
            }
        )
        per_item = [json.loads(line) for line in (cell.eval_dir / "items.jsonl").read_text().splitlines()]
        ce_items = sorted((r for r in per_item if r["task"] == "ce"), key=lambda r: r["item"])
        items[(cell.arm.name, cell.n, cell.seed)] = np.array([[r["nll"], r["tokens"]] for r in ce_items])
    lengths = {len(v) for v in items.values()}
    if len(lengths) != 1:
        raise DataError(
            f"the cells scored different numbers of evaluation items ({sorted(lengths)}); see their items.jsonl"
        )
    return rows, items


def reference_points(cfg: StudyRecipe, files, eval_recipe: Path) -> dict:
    """chrF and BLEU of outputs no model wrote, on the items the cells answer: one constant answer (the most common
    training target), the source copied, and the target of the training pair whose source shares most words."""
    import re
    from collections import Counter

    from finetune.config.eval import EvalRecipe
    from finetune.evaluation import data
    from finetune.evaluation import metrics as M

    task = next(t for t in config.load([f"recipe={eval_recipe}"], EvalRecipe)[0].tasks if t.type == "generation")
    examples = data.examples(
        task, data.rendering(task, {}), config.load([f"recipe={eval_recipe}"], EvalRecipe)[0].eval.seed
    )
    items = [data.prompt_and_reference(e) for e in examples]
    references = [ref for _, ref in items]
    sources = [turns[-1].get("input") or turns[-1]["content"] for turns, _ in items]
    train = [json.loads(line) for line in (files.folder / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    if files.format == "alpaca":
        pairs = [(r["input"], r["output"]) for r in train]
    else:
        pairs = [(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in train]
    words = [set(re.findall(r"\w+", s.lower())) for s, _ in pairs]

    def nearest(source: str) -> str:
        mine = set(re.findall(r"\w+", source.lower()))
        scores = [len(mine & w) / max(len(mine | w), 1) for w in words]
        return pairs[int(max(range(len(scores)), key=scores.__getitem__))][1]

    constant = Counter(t for _, t in pairs).most_common(1)[0][0]
    outputs = {
        "constant answer": [constant] * len(references),
        "source copied": sources,
        "nearest training pair": [nearest(s) for s in sources],
    }
    from sacrebleu.metrics import CHRF

    bleu = M.bleu_metric(task.language if task.language != "auto" else M.language_of(references))[0]
    return {
        name: {
            "chrf": M.corpus_score(CHRF(), M.corpus_statistics(CHRF(), preds, references)),
            "bleu": M.corpus_score(bleu, M.corpus_statistics(bleu, preds, references)),
        }
        for name, preds in outputs.items()
    }


def flops_per_token(model_path: str, seq_len: int) -> int | None:
    """Training FLOPs per token with every weight trained (throughput.flops_per_token, the suite's one formula), on
    the model's shape alone (its config, built on the meta device: no weights are read); None where the config can't
    be had (a Hub model, offline)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.throughput import flops_per_token as formula

    try:
        shape = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape)
    return formula(model, seq_len)


def add_costs(rows: list[dict], base_model: str) -> dict:
    """Tokens and FLOPs of each stage into every row (pretraining of the base, the arm's CPT, the cell's SFT), and
    per stage for the report. A frozen weight costs 4 FLOPs per token, not 6 (the one formula), so LoRA cells count
    2 x their frozen weights less than full fine-tuning. FLOPs are None where the base's shape is unknown."""
    lineage_file = Path(base_model) / "lineage.json"
    lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
    base_tokens = lineage.get("tokens_seen")  # None: pretrained elsewhere (a Hub model), not counted here
    full = flops_per_token(base_model, lineage.get("seq_len") or 2048)

    def flops(tokens, frozen=0):
        return None if full is None or tokens is None else tokens * (full - 2 * frozen)

    stages = {"pretraining (base)": {"tokens": base_tokens, "flops": flops(base_tokens)}}
    for r in rows:
        r["pretrain_tokens"] = 0 if r["kind"] == "scratch" else base_tokens
        frozen = (r.pop("sft_total_params") or 0) - (r.pop("sft_trainable_params") or 0)
        r["sft_flops"] = flops(r["sft_tokens"], frozen)
        parts = [flops(r["pretrain_tokens"]), flops(r["cpt_tokens"]), r["sft_flops"]]
        r["total_flops"] = None if None in parts else sum(parts)
        if r["kind"] in ("cpt", "control"):
            stages.setdefault(f"CPT {r['arm']}", {"tokens": r["cpt_tokens"], "flops": flops(r["cpt_tokens"])})
        sft = stages.setdefault(f"SFT, all cells of {r['arm']}", {"tokens": 0, "flops": 0})
        sft["tokens"] += r["sft_tokens"]
        sft["flops"] = None if sft["flops"] is None or r["sft_flops"] is None else sft["flops"] + r["sft_flops"]
    return stages


def evaluated(stats: dict):
    """The evaluation items the cells scored: after those a corpus holds whole were removed, where any were."""
    return stats.get("eval_pairs_used", stats.get("eval_pairs", stats.get("eval")))


def limits(cfg: StudyRecipe, rows: list[dict], files, contamination: dict, references: dict) -> list[str]:
    """What the data can and cannot show, read from this run."""
    seeds, sizes = sorted({r["seed"] for r in rows}), sorted({r["n"] for r in rows if r["n"] > 0})
    out = [
        f"Scale: evaluation on {evaluated(files.stats)} items; fine-tuning sets of "
        f"{sizes[0]} to {sizes[-1]} examples; CPT budgets of {', '.join(map(str, cfg.cpt.steps))} steps. A crossover "
        "fitted here is this model's and this task's; it need not carry to larger models or other tasks.",
    ]
    if len(seeds) == 1:
        out.append(
            "One fine-tuning seed per cell: the intervals cover evaluation items, not seed noise"
            + (" (the pilot measured it at <= 0.03 nats on this task)" if cfg.data.source == "manpages" else "")
            + "; raise sft.seeds to include it."
        )
    seen = {r["n"]: round(r["n"] * r["sft_epochs"]) for r in rows if r["n"] > 0}
    if len(set(seen.values())) > 1:
        out.append(
            "The cells saw different numbers of examples ("
            + ", ".join(f"N={n}: {e}" for n, e in sorted(seen.items()))
            + "): epochs shrink as N grows, so part of what a larger N buys here is more training steps."
        )
    unfinished = [r for r in rows if r["n"] == sizes[-1] and r.get("sft_best_step") == r.get("sft_steps")]
    if unfinished:
        out.append(
            f"At N={sizes[-1]} the best dev loss of {len(unfinished)} cell(s) came at their last evaluation: those "
            "runs were still improving, so their cross-entropy is an upper bound (raise sft.min_epochs to see more)."
        )
    best = max((r["chrf"] for r in rows), default=0.0)
    floor = max((v["chrf"] for v in references.values()), default=0.0)
    if best <= floor + 1.0:
        out.append(
            f"Generation metrics do not separate the arms: no cell's chrF ({best:.1f}) clears the best reference "
            f"point ({floor:.1f}) by a point; at this scale the models do not translate; cross-entropy is the evidence."
        )
    unchecked = [k for k, v in contamination.items() if v["share"] is None]
    if unchecked:
        out.append(f"Not checked for contamination: {', '.join(unchecked)}.")
    return out


def cli() -> None:
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
