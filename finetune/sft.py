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

from finetune import config
from finetune.config.sft import SFTRecipe
from finetune.errors import RecipeError, run_cli

log = logging.getLogger("finetune.sft")


def make_trainer_class():
    """TRL's SFTTrainer plus tokens/s, MFU and peak memory in every log line (read from the Trainer's public state)."""
    from trl import SFTTrainer

    from finetune.throughput import Throughput

    class Trainer(SFTTrainer):
        throughput: Throughput | None = None  # set once the model is wrapped (its trainable parameters are known)

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if self.model.training and "loss" in logs and self.throughput is not None:
                logs.update(self.throughput.update(self.state.num_input_tokens_seen))
            super().log(logs, start_time)

    return Trainer


def main(argv: list[str]) -> dict:
    cfg, recipe_file = config.load(argv, SFTRecipe)
    if cfg.print_recipe:
        print(config.to_yaml(cfg), end="")
        return {}
    from finetune.offline import go_offline_if_unreachable, is_hub_id

    names = [cfg.model.name_or_path, cfg.model.tokenizer or ""] + [d.path for d in cfg.data.datasets]
    go_offline_if_unreachable([n for n in names if is_hub_id(n)])
    if cfg.print_example:
        from finetune import modeling
        from finetune.instructions import preview

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

    from finetune import checkpoints, prompts, throughput
    from finetune.instructions import load_examples

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
    checkpoint = checkpoints.start(out, cfg.resume, recipe, run_info)  # refuses before anything is overwritten
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(config.to_yaml(cfg), encoding="utf-8")
    log.info("recipe %s resolved (saved to %s):\n%s", recipe_file, out / "recipe.yaml", config.to_yaml(cfg))

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
        max_steps=cfg.training.max_steps or -1,
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
        logging_steps=cfg.training.log_every,
        logging_first_step=True,
        eval_strategy="steps" if cfg.training.eval_every and eval_rows else "no",
        eval_steps=cfg.training.eval_every,
        save_steps=cfg.training.save_every,
        save_total_limit=None,  # checkpoints.CheckpointCallback rotates, after the new checkpoint is complete
        # tokens trained on, in the Trainer's state (saved with checkpoints): padding-free packing has no padding
        include_num_input_tokens_seen="all" if packing else "non_padding",
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
        callbacks=[checkpoints.CheckpointCallback(recipe, run_info, cfg.training.keep_checkpoints), *(callbacks or [])],
    )
    trainable, total = (
        sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        sum(p.numel() for p in trainer.model.parameters()),
    )
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    trainer.throughput = throughput.Throughput(
        throughput.flops_per_token(trainer.model, cfg.data.max_length), state.num_processes
    )

    # ------------------------------------------------------------------------------------------------------
    # Train
    # ------------------------------------------------------------------------------------------------------
    tokens_before = 0
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
        tokens_before = json.loads((checkpoint / "trainer_state.json").read_text())["num_input_tokens_seen"]
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    elapsed = time.perf_counter() - started

    # ------------------------------------------------------------------------------------------------------
    # Save
    # ------------------------------------------------------------------------------------------------------
    trainer.save_model(str(out))  # the adapter (or the full model), and the tokenizer
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tokens = trainer.state.num_input_tokens_seen  # the whole run's, a resumed one included
    metrics = {
        "train_loss": checkpoints.train_loss(trainer.state.log_history),  # likewise
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "global_step": trainer.state.global_step,
        "train_runtime_s": round(elapsed, 2),
        "train_tokens": tokens,
        # over the steps this run trained (after a resume, not the ones before it)
        "tokens_per_s": round((tokens - tokens_before) / elapsed, 1) if elapsed else None,
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
            from finetune import hub

            hub.push(cfg.hub, out)
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


def cli() -> None:
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
