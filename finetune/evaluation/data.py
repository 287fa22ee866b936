"""A task's examples and their rendering. Examples come from dataset specs (read as SFT reads them) or from an SFT
run's held-out split (its recipe's data, eval_size and seed: the records it set aside and never trained on). Both
models of a comparison read the same prompts: the rendering (prompt style, system prompt, NFKC, max length) is
decided once per task, from the task, else from the SFT run behind `model`, else behind `compare`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from finetune.config.eval import TaskSpec
from finetune.errors import DataError, RecipeError

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 1024


@dataclass
class Rendering:
    prompt_style: str
    system_prompt: str | None
    nfkc: bool
    max_length: int
    source: str
    """Where the settings came from: the task, an SFT run's recipe, or the defaults."""

    def data_config(self):
        """SFT's data config for these settings (no datasets: the examples are loaded already)."""
        from finetune.config.sft import DataConfig

        return DataConfig(
            prompt_style=self.prompt_style, system_prompt=self.system_prompt, max_length=self.max_length, nfkc=False
        )


def rendering(task: TaskSpec, runs: dict) -> Rendering:
    """`runs`: {path: SFT recipe or None} of the models compared, `model` first."""
    run_path, run = next(((p, r) for p, r in runs.items() if r is not None), (None, None))
    data = run.data if run is not None else None
    return Rendering(
        prompt_style=task.prompt_style or (data.prompt_style if data else "alpaca"),
        system_prompt=task.system_prompt if task.system_prompt is not None else (data.system_prompt if data else None),
        nfkc=data.nfkc if data else False,
        max_length=task.max_length or (data.max_length if data else DEFAULT_MAX_LENGTH),
        source=("the task" if task.prompt_style else f"the SFT run {run_path}")
        if task.prompt_style or run is not None
        else "the defaults (no SFT run behind either model)",
    )


def examples(task: TaskSpec, render: Rendering, seed: int) -> list[dict]:
    """The task's canonical examples ({"turns"} or {"text"}, with `origin`), NFKC-normalised as the rendering says."""
    from finetune import modeling
    from finetune.config.sft import DataConfig
    from finetune.instructions import describe, load_examples, nfkc

    where = f"task '{task.name}'"
    if task.heldout_of:
        run = modeling.run_recipe(task.heldout_of)
        if run is None:
            raise RecipeError(
                f"{where}: heldout_of '{task.heldout_of}' is not an SFT run's output folder (no recipe.yaml with "
                "data.datasets)"
            )
        if not run.data.eval_size:
            raise DataError(f"{where}: the run {task.heldout_of} held nothing out (its data.eval_size is 0)")
        found = load_examples(run.data)[1]  # the same split, drawn with the run's seed
        recorded = Path(task.heldout_of) / "heldout.json"
        if recorded.is_file():  # written by the run: the data must not have changed since
            origins = json.loads(recorded.read_text(encoding="utf-8"))["origins"]
            if origins != [e.get("origin") for e in found]:
                raise DataError(
                    f"{where}: the held-out split of {task.heldout_of} comes out differently from the one the run "
                    f"recorded in {recorded} ({len(origins)} records): its data changed since training (a Hub "
                    "dataset without a pinned revision, an edited file), so those records may have been trained on"
                )
        if render.nfkc and not run.data.nfkc:
            found = [nfkc(e) for e in found]
        if task.only:
            paths = [d.path for d in run.data.datasets]
            missing = [p for p in task.only if p not in paths]
            if missing:
                raise RecipeError(
                    f"{where}: only names {missing}, which the run {task.heldout_of} did not train on; its datasets "
                    f"are {paths}"
                )
            prefixes = tuple(f"{describe(d)} record " for d in run.data.datasets if d.path in task.only)
            found = [e for e in found if e["origin"].startswith(prefixes)]
        what = f"the held-out split of {task.heldout_of}" + (f" ({', '.join(task.only)})" if task.only else "")
    else:
        found = load_examples(DataConfig(datasets=task.datasets, nfkc=render.nfkc, seed=seed))[0]  # weights are 1
        what = ", ".join(d.path for d in task.datasets)
    if task.type == "generation":  # a text document has no prompt and reference: skipped, and said
        documents = sum("turns" not in e for e in found)
        if documents:
            log.warning(
                "%s: %d text documents skipped (a generation item is a prompt and its answer)", where, documents
            )
            found = [e for e in found if "turns" in e]
    if task.max_examples is not None and task.max_examples < len(found):
        import random

        keep = sorted(random.Random(seed).sample(range(len(found)), task.max_examples))
        found = [found[i] for i in keep]  # a seeded draw across every dataset, in order
    if not found:
        raise DataError(f"{where}: the eval set is empty ({what} gave no examples)")
    log.info("%s: %d examples from %s", where, len(found), what)
    return found


def prompt_and_reference(example: dict) -> tuple[list[dict], str]:
    """A generation item: the turns before the last assistant turn, and that turn's text."""
    turns = example["turns"]
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    return turns[:last], turns[last]["content"]
