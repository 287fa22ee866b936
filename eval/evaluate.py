"""Evaluate a model (a base, a base + adapter, a merged model) and put a second one beside it: response loss,
generation metrics with Japanese-aware scoring, and lm-evaluation-harness tasks.

Offline, after `make quickstart` (the tiny base against its quickstart adapter):
    python eval/evaluate.py recipe=eval-quickstart
Any model (Hub ID, model folder, adapter folder, run folder) against another, on a recipe's tasks:
    python eval/evaluate.py recipe=eval-ja model=outputs/dolly-ja compare=elyza/ELYZA-japanese-Llama-2-7b
    accelerate launch eval/evaluate.py recipe=eval-ja model=outputs/dolly-ja eval.batch_size=32
Keys override as in every stage (`eval.output_dir=outputs/eval-x`, `tasks.0.max_examples=50`); `print_recipe=true`
prints the resolved recipe. Writes results.json, results.md (printed at the end) and generations.jsonl.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is eval/evaluate.py: run as a script, its folder leads sys.path, where it would shadow the `evaluate`
# package that lm-evaluation-harness imports for some tasks. The folder holds no module of ours, so drop it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import gc  # noqa: E402
import logging  # noqa: E402

from finetune import config  # noqa: E402
from finetune.config.eval import EvalRecipe  # noqa: E402
from finetune.errors import RecipeError, run_cli  # noqa: E402

log = logging.getLogger("finetune.eval")


def main(argv: list[str]) -> dict:
    cfg, recipe_file = config.load(argv, EvalRecipe)
    if cfg.print_recipe:
        print(config.to_yaml(cfg), end="")
        return {}
    from finetune import modeling
    from finetune.offline import go_offline_if_unreachable, is_hub_id

    # Every Hub name the run will load: the models, a run folder's base and data, the tasks' datasets
    names = [cfg.model, cfg.compare or ""] + [d.path for t in cfg.tasks for d in t.datasets]
    for path in {cfg.model, cfg.compare, *(t.heldout_of for t in cfg.tasks)} - {None}:
        if Path(path).is_dir() and (run := modeling.run_recipe(path)) is not None:
            names += [run.model.name_or_path] + [d.path for d in run.data.datasets + run.data.eval_datasets]
    go_offline_if_unreachable([n for n in names if is_hub_id(n)])
    return evaluate(cfg, recipe_file)


def evaluate(cfg: EvalRecipe, recipe_file: Path | None = None) -> dict:
    """Score `cfg.model` (and `cfg.compare`) on every task; write and return the results."""
    import datasets
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from finetune import modeling, throughput
    from finetune.evaluation import data, generation, harness, loss, report
    from finetune.lineage import lineage

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    datasets.disable_progress_bars()
    if PartialState().num_processes > 1:
        raise RecipeError("evaluation runs in one process: launch it with --num_processes 1 (or plain python)")
    throughput.warn_if_cpu_threads_capped(log)
    out = Path(cfg.eval.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(config.to_yaml(cfg), encoding="utf-8")
    log.info("recipe %s resolved (saved to %s):\n%s", recipe_file, out / "recipe.yaml", config.to_yaml(cfg))

    # ------------------------------------------------------------------------------------------------------
    # Tasks' data: the same items and the same rendering for both models
    # ------------------------------------------------------------------------------------------------------
    paths = {"model": cfg.model} | ({"compare": cfg.compare} if cfg.compare else {})
    for role, path in paths.items():  # before any data is read
        if error := modeling.missing("model", path):
            raise RecipeError(f"{role}: {error}")
    for task in cfg.tasks:  # harness task names checked (and lm-eval imported) before hours of scoring
        if task.type == "harness":
            harness.resolve(task.harness_tasks)
    runs = {path: modeling.run_recipe(path) if Path(path).is_dir() else None for path in paths.values()}
    renderings = {t.name: data.rendering(t, runs) for t in cfg.tasks if t.type != "harness"}
    items = {t.name: data.examples(t, renderings[t.name], cfg.eval.seed) for t in cfg.tasks if t.type != "harness"}
    for name, r in renderings.items():
        log.info("task '%s': prompt style %s (from %s), max_length %d", name, r.prompt_style, r.source, r.max_length)

    # ------------------------------------------------------------------------------------------------------
    # Score each model in turn (one in memory at a time)
    # ------------------------------------------------------------------------------------------------------
    raw: dict[str, dict] = {t.name: {} for t in cfg.tasks}
    models = {}
    for role, path in paths.items():
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # each model's own peak (on CPU: the process's, so far)
        model, tokenizer, run = modeling.load_for_inference(path, cfg.eval.dtype)
        kind = (
            ("SFT run" if run is not None else "adapter")
            if hasattr(model, "peft_config")
            else ("SFT run, full weights" if run is not None else "model")
        )
        models[role] = {"path": path, "kind": kind, "lineage": lineage(path)}
        log.info("%s: %s (%s, %s parameters)", role, path, kind, f"{model.num_parameters():,}")
        for task in cfg.tasks:
            label = f"{role} · {task.name}"
            if task.type == "harness":
                raw[task.name][role] = harness.score(model, tokenizer, task, cfg.eval.batch_size, cfg.eval.seed)
                continue
            examples, render, batch = items[task.name], renderings[task.name], cfg.eval.batch_size
            with tqdm(total=len(examples), desc=label, unit="example") as bar:
                if task.type == "loss":
                    result = loss.score(model, tokenizer, examples, render, batch, task.name, bar.update)
                else:
                    result = generation.score(
                        model, tokenizer, examples, render, task, batch, cfg.eval.seed, bar.update
                    )
            raw[task.name][role] = result
            log.info("%s: %d examples in %.1f s", label, result["n"], result["seconds"])
        models[role]["peak_mem_gb"] = round(throughput.peak_memory_gb(), 3)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------------
    # Metrics, differences, files
    # ------------------------------------------------------------------------------------------------------
    samples, seed = cfg.eval.bootstrap_samples, cfg.eval.seed
    results = {"recipe": config.to_dict(cfg), "models": models, "tasks": {}}
    generations, per_item = [], []
    for task in cfg.tasks:
        per_model = raw[task.name]
        entry: dict = {"type": task.type}
        if task.type == "harness":
            entry["rows"] = report.harness_rows(per_model, samples, seed)
        else:
            entry["rendering"] = vars(renderings[task.name])
            entry["n"] = len(items[task.name])
            if task.type == "loss":
                entry["rows"] = report.loss_rows(per_model, samples, seed)
                keep = ("n", "tokens", "data", "seconds", "examples_per_s", "tokens_per_s")
                for role, r in per_model.items():  # each item's NLL, for analyses over items (the study's bootstrap)
                    per_item += [
                        {"task": task.name, "role": role, "item": i, "origin": items[task.name][i].get("origin")}
                        | {"nll": float(nll), "tokens": int(tokens)}
                        for i, (nll, tokens) in zip(r["items"], r["stats"], strict=True)
                    ]
            else:
                entry["rows"], entry["scoring"] = report.generation_rows(task, per_model, samples, seed)
                keep = ("n", "prompt_tokens", "new_tokens", "stopped", "prompts_cut", "seconds")
                keep += ("examples_per_s", "tokens_per_s")
                first = next(iter(per_model.values()))
                for i, (prompt, reference) in enumerate(zip(first["prompts"], first["references"], strict=True)):
                    generations.append(
                        {"task": task.name, "origin": items[task.name][i].get("origin"), "prompt": prompt}
                        | {"reference": reference}
                        | {role: r["predictions"][i] for role, r in per_model.items()}
                    )
            entry["runs"] = {role: {k: r[k] for k in keep} for role, r in per_model.items()}
        results["tasks"][task.name] = entry
    report.write(out, results, generations, per_item)
    print(report.markdown(results))
    log.info("results in %s (results.json, results.md, generations.jsonl, items.jsonl)", out)
    return results


def cli() -> None:
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
