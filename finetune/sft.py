"""Supervised fine-tuning (LoRA, QLoRA, DoRA, full) of a LLaMA-family model on instruction data.

One CPU, offline (bundled data, built-in tiny LLaMA):
    accelerate launch finetune/sft.py recipe=quickstart
One GPU:
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml finetune/sft.py recipe=alpaca
    accelerate launch finetune/sft.py recipe=alpaca-qlora training.micro_batch_size=8
Many GPUs (DDP, FSDP, DeepSpeed ZeRO-2/3):
    accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 8 finetune/sft.py recipe=alpaca
    accelerate launch --config_file recipes/accelerate/fsdp.yaml finetune/sft.py recipe=alpaca lora.method=full

Any key can be overridden (`training.learning_rate=1e-4`, `data.max_length=2048`); `print_recipe=true`
prints the resolved recipe and exits; `print_example=true` prints the first record of each dataset as the
model will see it (token pieces, learned ones inside [[ ]]) and exits. `resume=true` continues from the newest
complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from finetune import recipe as recipes
from finetune.errors import RecipeError, run_cli
from finetune.recipe import SFTRecipe

log = logging.getLogger("finetune.sft")


def make_trainer_class():
    """TRL's SFTTrainer plus per-log tokens/s, MFU and peak memory, and a completion mark on checkpoints."""
    from trl import SFTTrainer

    from finetune.throughput import Throughput, mark_complete

    class Trainer(SFTTrainer):
        def log(self, logs: dict, start_time: float | None = None) -> None:
            if self.model.training and "loss" in logs:
                if not hasattr(self, "_throughput"):
                    self._throughput = Throughput(self.model.num_parameters(), self.accelerator.num_processes)
                logs.update(self._throughput.update({"num_tokens": getattr(self, "_total_train_tokens", None)}))
            super().log(logs, start_time)

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                mark_complete(Path(self.args.output_dir, f"checkpoint-{self.state.global_step}"))

    return Trainer


def main(argv: list[str]) -> dict:
    cfg, recipe_file = recipes.load(argv, SFTRecipe)
    if cfg.print_recipe:
        print(recipes.to_yaml(cfg), end="")
        return {}
    from finetune.data import is_local
    from finetune.hub import go_offline_if_unreachable

    names = [cfg.model.name_or_path, cfg.model.tokenizer or ""] + [d.path for d in cfg.data.datasets]
    go_offline_if_unreachable([n for n in names if n and not n.startswith("builtin:") and not is_local(n)])
    if cfg.print_example:
        from finetune import modeling
        from finetune.data import preview

        print(preview(cfg.data, modeling.load_tokenizer(cfg.model)))
        return {}
    return train(cfg, recipe_file)[1]


def train(cfg: SFTRecipe, recipe_file: Path | None = None, callbacks: list | None = None):
    """Run the recipe; return (trainer, metrics). `callbacks` are extra transformers TrainerCallbacks."""
    from finetune import modeling

    modeling.quiet_library_warnings()  # before trl/peft import bitsandbytes

    import datasets
    import torch
    from accelerate import PartialState
    from trl import SFTConfig

    from finetune import prompts, throughput
    from finetune.data import load_examples

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
    checkpoint = throughput.latest_complete_checkpoint(out) if cfg.resume else None
    if not cfg.resume and any(out.glob("checkpoint-*")):
        raise RecipeError(
            f"{out} already holds checkpoints: add resume=true to continue that run, or choose "
            "another training.output_dir (nothing there is overwritten)"
        )
    if cfg.resume and checkpoint is None:
        log.warning("resume=true but %s has no complete checkpoint: starting from step 0", out)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipes.to_yaml(cfg), encoding="utf-8")
    log.info("recipe %s resolved (saved to %s):\n%s", recipe_file, out / "recipe.yaml", recipes.to_yaml(cfg))

    # ------------------------------------------------------------------------------------------------------
    # Model and data
    # ------------------------------------------------------------------------------------------------------
    tokenizer = modeling.load_tokenizer(cfg.model)
    train_examples, eval_examples = load_examples(cfg.data)
    train_rows, data_stats = prompts.tokenize_examples(train_examples, cfg.data, tokenizer, "train")
    eval_rows = prompts.tokenize_examples(eval_examples, cfg.data, tokenizer, "eval")[0] if eval_examples else []
    # Saved with the adapter: apply_chat_template then renders exactly the text this style trained on.
    tokenizer.chat_template = prompts.saved_chat_template(cfg.data.prompt_style, cfg.data.system_prompt, tokenizer)
    log.info("data: %d training and %d held-out examples", len(train_rows), len(eval_rows))

    model = modeling.load_model(cfg.model, cfg.quantization)
    packing = cfg.data.packing if cfg.data.packing is not None else modeling.supports_packing(model)
    if packing and not modeling.supports_packing(model):
        raise RecipeError(
            f"data.packing=true, but attention '{model.config._attn_implementation}' of this model "
            "ignores position-id resets: packed examples would attend to each other"
        )
    log.info(
        "model %s (%s parameters, %s), packing %s",
        cfg.model.name_or_path,
        f"{model.num_parameters():,}",
        model.dtype,
        "on" if packing else "off",
    )

    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=cfg.training.micro_batch_size,
        per_device_eval_batch_size=cfg.training.micro_batch_size,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        num_train_epochs=cfg.training.num_epochs,
        max_steps=cfg.training.max_steps,
        learning_rate=cfg.training.learning_rate,
        lr_scheduler_type=cfg.training.lr_scheduler,
        warmup_steps=cfg.training.warmup_ratio,  # a float < 1 is a share of the steps
        weight_decay=cfg.training.weight_decay,
        max_grad_norm=cfg.training.max_grad_norm,
        optim=cfg.training.optim,
        # transformers 5 renamed it; setting both keeps TRL's default (True) from winning silently
        activation_checkpointing=cfg.training.gradient_checkpointing,
        gradient_checkpointing=cfg.training.gradient_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(),
        logging_steps=cfg.training.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if cfg.training.eval_steps and eval_rows else "no",
        eval_steps=cfg.training.eval_steps,
        save_steps=cfg.training.save_steps,
        save_total_limit=cfg.training.save_total_limit,
        report_to=cfg.training.report_to or "none",
        seed=cfg.training.seed,
        data_seed=cfg.data.seed,
        max_length=cfg.data.max_length,
        packing=packing,
        packing_strategy="bfd",  # best-fit decreasing, padding-free: position ids reset per example
        **modeling.precision_flags(cfg.training.precision),
    )
    Trainer = make_trainer_class()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=modeling.peft_config(cfg.lora),
        callbacks=callbacks,
    )
    trainable, total = (
        sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        sum(p.numel() for p in trainer.model.parameters()),
    )
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    # ------------------------------------------------------------------------------------------------------
    # Train
    # ------------------------------------------------------------------------------------------------------
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    elapsed = time.perf_counter() - started

    # ------------------------------------------------------------------------------------------------------
    # Save
    # ------------------------------------------------------------------------------------------------------
    trainer.save_model(str(out))  # the adapter (or the full model), and the tokenizer
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tokens = getattr(trainer, "_total_train_tokens", 0)
    metrics = {
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "global_step": trainer.state.global_step,
        "train_runtime_s": round(elapsed, 2),
        "train_tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
        "peak_mem_gb": round(throughput.peak_memory_gb(), 3),
        "peak_mem_kind": "cuda_allocated" if torch.cuda.is_available() else "cpu_max_rss",
        "trainable_params": trainable,
        "total_params": total,
        "packing": packing,
        "data": data_stats | {"train_rows": len(train_rows), "eval_rows": len(eval_rows)},
    }

    # ------------------------------------------------------------------------------------------------------
    # Evaluate
    # ------------------------------------------------------------------------------------------------------
    if eval_rows:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    if state.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        if cfg.training.merge_adapter and cfg.lora.method == "lora":
            merge(cfg, out)
        if cfg.hub.push_to_hub:
            push(cfg, out)
    log.info(
        "done: train loss %.4f%s, %s tokens/s, peak memory %.2f GB; adapter in %s",
        metrics["train_loss"],
        f", eval loss {metrics['eval_loss']:.4f}" if eval_rows else "",
        metrics["tokens_per_s"],
        metrics["peak_mem_gb"],
        out,
    )
    return trainer, metrics


def merge(cfg: SFTRecipe, out: Path) -> Path:
    """Base (full precision, even after QLoRA) + adapter -> one plain model in out/merged."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from finetune import modeling

    base = modeling.load_model(cfg.model)
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    merged.save_pretrained(out / "merged")
    AutoTokenizer.from_pretrained(out).save_pretrained(out / "merged")  # with the run's chat template
    log.info("merged model saved to %s", out / "merged")
    return out / "merged"


def push(cfg: SFTRecipe, out: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(cfg.hub.model_id, private=cfg.hub.private, exist_ok=True)
    api.upload_folder(
        repo_id=cfg.hub.model_id, folder_path=str(out), ignore_patterns=["checkpoint-*", "runs/*", "merged/*"]
    )
    log.info("pushed %s to https://huggingface.co/%s", out, cfg.hub.model_id)


def cli() -> None:
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
