"""Harness tasks: lm-evaluation-harness (`lm_eval.simple_evaluate`, the `eval` extra) on the model already loaded
(base + adapter included, as lm-eval's HFLM takes a model object), so every task scores the same weights the other
tasks do. A task is a harness task or group name (hellaswag, arc_easy, japanese_leaderboard, ...), or the name of a
local task YAML in eval/tasks/, whose relative data paths are resolved against that folder (lm-eval reads them
against the working directory), which is how the harness runs offline."""

from __future__ import annotations

import difflib
import functools
import logging
from pathlib import Path

import numpy as np

from finetune.config.eval import TaskSpec
from finetune.errors import HubUnreachableError, RecipeError

log = logging.getLogger(__name__)


def tasks_dir() -> Path:
    from finetune import shipped_dir

    return shipped_dir("eval") / "tasks"


def local_task(name: str) -> dict | None:
    """eval/tasks/NAME.yaml as a task config with its data files' paths made absolute, or None."""
    import yaml

    file = tasks_dir() / f"{name}.yaml"
    if not file.is_file():
        return None
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{file}: not a plain task YAML ({e}); local tasks hold no !function tags") from None

    def absolute(paths):
        if isinstance(paths, str):
            return str((file.parent / paths).resolve())
        if isinstance(paths, list):
            return [absolute(p) for p in paths]
        if isinstance(paths, dict):
            return {split: absolute(p) for split, p in paths.items()}
        return paths

    kwargs = config.get("dataset_kwargs") or {}
    if "data_files" in kwargs:
        kwargs["data_files"] = absolute(kwargs["data_files"])
    return config


def _require_harness() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise RecipeError(
            "harness tasks run lm-evaluation-harness, which is not installed: pip install 'finetune[eval]'"
        ) from None


@functools.cache
def task_manager(with_harness_tasks: bool):
    """lm-eval's task index, made once per process: with the harness's own ~15,000 tasks it takes seconds to build;
    local task configs need none of it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=with_harness_tasks, include_path=str(tasks_dir()))


def resolve(names: list[str]) -> list[str | dict]:
    """Each name as lm-eval takes it: a local task's config, else the name, checked against lm-eval's index."""
    _require_harness()
    resolved: list[str | dict] = [local_task(n) or n for n in names]
    unknown = [n for n in resolved if isinstance(n, str)]
    if unknown:
        known = set(task_manager(True).all_tasks)
        local = sorted(p.stem for p in tasks_dir().glob("*.yaml"))
        for name in unknown:
            if name not in known:
                near = difflib.get_close_matches(name, sorted(known | set(local)), n=3)
                raise RecipeError(
                    f"unknown harness task '{name}': not a task or group of lm-evaluation-harness, nor a task YAML in "
                    f"{tasks_dir()} (local: {', '.join(local) or 'none'})"
                    + (f". Did you mean {', '.join(near)}?" if near else "")
                )
    return resolved


def _is_offline_failure(error: Exception) -> bool:
    """A task's data could not be fetched from the Hub (offline, or no network), as datasets reports it."""
    kinds = {c.__name__ for c in type(error).__mro__}
    hub = {"ConnectionError", "OfflineModeIsEnabled", "DatasetNotFoundError", "LocalEntryNotFoundError", "Timeout"}
    text = str(error).lower()
    return bool(kinds & hub) or any(w in text for w in ("offline", "couldn't reach", "could not reach"))


def score(model, tokenizer, task: TaskSpec, batch_size: int, seed: int) -> dict:
    """{harness task name: {"metrics": {metric: value}, "stderr": {...}, "n": items, "samples": {metric: per-item
    values, by doc_id}}} for every task the spec names (a group's tasks each get a row)."""
    requested = resolve(task.harness_tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(
            model=lm,
            tasks=requested,
            task_manager=task_manager(any(isinstance(r, str) for r in requested)),
            num_fewshot=task.num_fewshot,
            limit=task.limit,
            log_samples=True,
            bootstrap_iters=0,  # stderr from the per-item values below, not lm-eval's 100k resamples
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except Exception as e:  # a Hub task's data, offline: one clear line instead of datasets' traceback
        if isinstance(e, RecipeError) or not _is_offline_failure(e):
            raise
        raise HubUnreachableError(
            f"task '{task.name}': lm-evaluation-harness could not load {task.harness_tasks} "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}). Offline, only local "
            f"task YAMLs in {tasks_dir()} run; e.g. harness_tasks=[quickstart_mc_en]"
        ) from None
    results = {}
    for name, values in out["results"].items():
        samples = out.get("samples", {}).get(name, [])
        # lm-eval names a metric "NAME,FILTER" (other keys, alias and sample_len, are not metrics); the filter is kept
        # in the name where it is not "none" (gsm8k's strict-match and flexible-extract)
        metrics = {
            (key.removesuffix(",none") if key.endswith(",none") else key): float(v)
            for key, v in values.items()
            if "," in key and "_stderr" not in key and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if not metrics:
            continue  # a group's row; its tasks have their own
        unfiltered = sorted((s for s in samples if s.get("filter", "none") == "none"), key=lambda s: s["doc_id"])
        per_item = {
            m: np.array([float(s[m]) for s in unfiltered])
            for m in metrics
            if unfiltered and all(isinstance(s.get(m), int | float) for s in unfiltered)
        }
        results[name] = {
            "metrics": metrics,
            "n": int(out.get("n-samples", {}).get(name, {}).get("effective", len(samples))),
            "samples": per_item,
        }
    return results
