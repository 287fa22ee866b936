"""Checkpoints, the same way in every stage (pretraining's own loop, and the Trainer under SFT and DPO).

- One folder naming: `output_dir/checkpoint-N`, the Trainer's (transformers' PREFIX_CHECKPOINT_DIR).
- A checkpoint counts only once complete: its `.complete` mark is written last, after the recipe it was written
  under (`recipe.yaml`). Pretraining writes into a hidden folder renamed into place; the Trainer writes in place
  and `CheckpointCallback.on_save` marks it. A checkpoint without the mark (a kill mid-save) is never resumed from.
- Rotation happens only after the new checkpoint is marked, so a kill at any moment leaves at least one.
- `start()` runs before anything is written: an output folder that holds checkpoints is refused without
  `resume=true`, and a resume whose recipe differs from the checkpoint's (other data, batch, learning rate, ...)
  is refused naming each key, since it would not continue the run it claims to.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from finetune.errors import RecipeError

log = logging.getLogger(__name__)

COMPLETE = ".complete"  # written last; holds what besides the recipe decides the run's steps (e.g. processes)
RECIPE = "recipe.yaml"
PATTERN = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
# Keys a resumed run may change: they decide what is logged, kept or pushed, or how a step is computed.
MAY_CHANGE = (
    "resume",
    "print_recipe",
    "print_example",
    "hub.",
    "training.output_dir",
    "training.log_every",
    "training.eval_every",
    "training.eval_batch_size",
    "training.eval_blocks",
    "training.save_every",
    "training.keep_checkpoints",
    "training.report_to",
    "training.log_token_metrics",
    "training.merge_adapter",
    # how a step is computed, not what: e.g. to resume after running out of memory
    "training.gradient_checkpointing",
    "training.compile",
    "training.fused_loss",
    "model.attn_implementation",
    "data.cache_dir",
)


def name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def _step_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    found = [
        (int(m.group(1)), d)
        for d in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if (m := PATTERN.fullmatch(d.name)) and d.is_dir()
    ]
    return sorted(found)


def complete(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first."""
    return [d for _, d in _step_dirs(output_dir) if (d / COMPLETE).exists()]


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete(output_dir)
    return found[-1] if found else None


def mark_complete(folder: Path, recipe: dict, info: dict | None = None) -> None:
    """Write the recipe the checkpoint was made under, then the mark that makes it count."""
    (folder / RECIPE).write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
    (folder / COMPLETE).write_text(json.dumps(info or {}), encoding="utf-8")


def rotate(output_dir: str | Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints (all if None); delete older ones, and any incomplete checkpoint
    older than the newest complete one (a save that a kill interrupted). Call only after marking the new one."""
    done = complete(output_dir)
    if not done:
        return
    newest = int(PATTERN.fullmatch(done[-1].name).group(1))
    doomed = done[:-keep] if keep else []
    doomed += [d for step, d in _step_dirs(output_dir) if step < newest and not (d / COMPLETE).exists()]
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)


def save_state(accelerator, output_dir: Path, step: int, recipe: dict, info: dict, keep: int | None) -> Path:
    """accelerate's save_state (weights, optimiser, scheduler, RNG, registered objects) into a hidden folder that
    is marked complete and renamed into place, then rotation: pretraining's save."""
    final, tmp = output_dir / name(step), output_dir / f".{name(step)}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        mark_complete(tmp, recipe, info)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        rotate(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        flat = {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}.").items()}
        return flat | {f"{prefix}length": len(tree)}
    return {prefix.rstrip("."): tree}


def changed_keys(old: dict, new: dict) -> list[str]:
    """`key was A, now B` for every key that differs between two recipes (dicts), but those a resume may change."""
    a, b = _flat(old), _flat(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(MAY_CHANGE) or a.get(key, "absent") == b.get(key, "absent"):
            continue
        out.append(f"{key} was {a.get(key, 'absent')!r}, now {b.get(key, 'absent')!r}")
    return out


def open_run(cfg, recipe_file: Path | None, log: logging.Logger):
    """The start the Trainer-based stages (SFT, DPO) share: logging (INFO on the main process), the checkpoint to
    resume from (`start`, before anything is written), the resolved recipe saved and printed. Returns (the
    accelerate PartialState, output folder, recipe as a dict, run info, checkpoint or None)."""
    import datasets
    from accelerate import PartialState

    from finetune import config, throughput

    state = PartialState()
    logging.basicConfig(
        level=logging.INFO if state.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    datasets.disable_progress_bars()
    if state.num_processes == 1:
        throughput.warn_if_cpu_threads_capped(log)
    out = Path(cfg.training.output_dir)
    recipe = config.to_dict(cfg)
    run_info = {"processes": state.num_processes}  # with the recipe, decides every step's batch
    checkpoint = start(out, cfg.resume, recipe, run_info)  # refuses before anything is overwritten
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE).write_text(config.to_yaml(cfg), encoding="utf-8")
    log.info("recipe %s resolved (saved to %s):\n%s", recipe_file, out / RECIPE, config.to_yaml(cfg))
    return state, out, recipe, run_info, checkpoint


def start(output_dir: str | Path, resume: bool, recipe: dict, info: dict | None = None) -> Path | None:
    """Before a run writes anything: the checkpoint to resume from (None: start at step 0), or a RecipeError if the
    folder holds another run's checkpoints without resume=true, or if the checkpoint was written under settings
    that differ from this recipe's (`info`: what else decides the steps, e.g. the number of processes)."""
    out = Path(output_dir)
    if any((out / "checkpoints").glob("step-*")):
        raise RecipeError(
            f"{out}/checkpoints/ holds checkpoints of an older version of the suite (step-N), which this one can't "
            "resume (it writes checkpoint-N): finish that run with the version that began it, or start a new one in "
            "another training.output_dir"
        )
    found = _step_dirs(out)
    if found and not resume:
        raise RecipeError(
            f"{out} already holds checkpoints (newest: {found[-1][1].name}): add resume=true to continue that run, "
            "or choose another training.output_dir (nothing there is overwritten)"
        )
    checkpoint = latest(out) if resume else None
    if resume and checkpoint is None:
        if found:  # a save a kill interrupted
            log.warning("resume=true but %s holds no complete checkpoint: starting from step 0", out)
        else:
            log.info("resume=true: %s holds no checkpoint yet, so the run starts from step 0", out)
        return None
    if checkpoint is not None:
        if not (checkpoint / RECIPE).exists():
            raise RecipeError(
                f"resume=true: {checkpoint} holds no {RECIPE} (an older version wrote it), so whether this recipe "
                "continues it can't be checked: start a new run in another training.output_dir"
            )
        saved = yaml.safe_load((checkpoint / RECIPE).read_text(encoding="utf-8")) or {}
        saved_info = json.loads((checkpoint / COMPLETE).read_text(encoding="utf-8") or "{}")
        changed = changed_keys(saved, recipe) + changed_keys(saved_info, info or {})
        if changed:
            raise RecipeError(
                f"resume=true: {checkpoint} was written with other settings, so this run would not continue it "
                f"as it began: {'; '.join(changed)}. Set them back, or start a new run in another training.output_dir"
            )
    return checkpoint


class CheckpointCallback(TrainerCallback):
    """The Trainer's side (SFT, DPO). The Trainer is given no save_total_limit: this callback marks each checkpoint
    complete in `on_save` (called once the Trainer has written all of it), then rotates. It also asks for a log line
    at every save step and at the last step, so the log history a checkpoint carries covers every step before it
    and a resumed run's train loss (train_loss below) is the whole run's, not the resumed part's."""

    def __init__(self, recipe: dict, info: dict, keep: int | None):
        self.recipe, self.info, self.keep = recipe, info, keep

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every process has written its part (shards, RNG state) before the mark
        if args.should_save:
            mark_complete(Path(args.output_dir, name(state.global_step)), self.recipe, self.info)
            rotate(args.output_dir, self.keep)


def train_loss(log_history: list[dict]) -> float | None:
    """Mean training loss over every step so far, from the logged losses weighted by the steps each covers. The
    Trainer's own `training_loss` counts only the steps this process ran, which after a resume is part of the run."""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last else None


class BestWeights(TrainerCallback):
    """`training.keep_best`: after each evaluation whose loss is the lowest so far, the trained weights (only those:
    the adapter, or every weight in full fine-tuning) go to output_dir/best/ (written beside, then renamed: never
    half-written); at the end of training they are loaded back, so the run saves and reports its best evaluation,
    not its last step. Kept on disk rather than in memory so a resumed run still knows its best."""

    FOLDER = "best"

    def __init__(self, output_dir: str | Path):
        self.folder = Path(output_dir) / self.FOLDER
        info = self.folder / "best.json"
        self.best = json.loads(info.read_text()) if info.is_file() else None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or model is None or (self.best is not None and loss >= self.best["eval_loss"]):
            return
        self.best = {"step": state.global_step, "eval_loss": loss}
        if not args.should_save:
            return
        from safetensors.torch import save_file

        tmp = self.folder.with_name(self.folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trained = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(tmp / "weights.safetensors"))
        (tmp / "best.json").write_text(json.dumps(self.best))
        shutil.rmtree(self.folder, ignore_errors=True)
        tmp.rename(self.folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.best is None or model is None or not (self.folder / "weights.safetensors").is_file():
            return
        from safetensors.torch import load_file

        weights = load_file(str(self.folder / "weights.safetensors"), device=str(next(model.parameters()).device))
        missing = set(weights) - {n for n, _ in model.named_parameters()}
        if missing:
            raise RecipeError(f"{self.folder} holds weights this model lacks ({sorted(missing)[:3]}...)")
        model.load_state_dict(weights, strict=False)
        log.info(
            "keep_best: the weights of step %d (eval loss %.4f) restored", self.best["step"], self.best["eval_loss"]
        )
