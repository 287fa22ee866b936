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
import shutil
import sys
import time
from pathlib import Path

from finetune import config
from finetune.config.sft import SFTRecipe
from finetune.errors import RecipeError, run_cli

log = logging.getLogger("finetune.sft")


def make_trainer_class():
    """TRL's SFTTrainer with the suite's loss (only learned positions reach the output layer, see
    fused_loss.learned_positions_loss), diagnostics on logging steps only, and tokens/s, MFU, padding share and
    peak memory in every log line (read from the Trainer's public state)."""
    import torch
    from trl import SFTTrainer

    from finetune.fused_loss import fused_loss_unsupported, learned_positions_loss
    from finetune.throughput import Throughput

    class Trainer(SFTTrainer):
        throughput: Throughput | None = None  # set once the model is wrapped (its trainable parameters are known)

        def __init__(self, *args, fused_loss: bool = True, token_metrics: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.token_metrics = token_metrics
            # Decided once: the learned-positions loss calls the decoder and the head's weight directly, which
            # only a model that no wrapper shards or synchronises allows. Elsewhere TRL's fused LM head runs inside
            # the wrapped forward (DDP syncs, FSDP and ZeRO-3 gather), scoring learned positions on Triton devices.
            why_not = (
                "training.fused_loss=false"
                if not fused_loss
                else f"{self.accelerator.distributed_type.value} needs the head inside the wrapped forward"
                if self.accelerator.distributed_type.value != "NO"
                else f"nn.DataParallel over {self.args.n_gpu} GPUs in one process"
                if self.args.n_gpu > 1
                else "fp16's softmax gradient would underflow before the loss scaler"
                if self.args.fp16
                else "MoE router loss"
                if self.aux_loss_enabled
                else fused_loss_unsupported(self.accelerator.unwrap_model(self.model))
            )
            self.fused = not why_not
            self.loss_path = (
                "output layer fused into the loss, on learned positions only"
                if self.fused
                else f"TRL's fused LM head inside the model's forward ({why_not})"
            )
            # padded positions and all positions of the padded batches trained so far, and at the last log line
            self._padding = torch.zeros((), dtype=torch.long, device=self.args.device)
            self._positions = 0
            self._logged = (0, 0)

        def _logs_this_step(self) -> bool:
            """Whether the optimiser step being computed will be logged (the Trainer logs after it)."""
            step, every = self.state.global_step + 1, self.args.logging_steps
            return (step == 1 and self.args.logging_first_step) or step % every == 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or self.aux_loss_enabled:  # logits for compute_metrics, MoE router loss: TRL's own
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if model.training else "eval"
            if mode == "train" and "attention_mask" in inputs:  # padded batches; packed ones have no padding
                self._padding += (inputs["attention_mask"] == 0).sum()  # summed on the device: no sync per step
                self._positions += inputs["attention_mask"].numel()
            stats = {} if self.token_metrics and (mode == "eval" or self._logs_this_step()) else None
            if self.fused:
                # accelerate's mixed precision wraps model.forward, which this path does not call: enter it here
                with self.accelerator.autocast():
                    loss = learned_positions_loss(
                        self.accelerator.unwrap_model(model), inputs, num_items_in_batch, stats
                    )
            else:
                # TRL's compute_loss, less its metrics on every micro-batch (a host sync each)
                outputs = model(**{**inputs, "use_cache": False}, fused_lm_head=True)
                count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
                loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    loss = loss * (self.accelerator.num_processes // self.get_tp_size())
                if stats is not None:
                    stats.update(entropy_sum=outputs.entropy.detach().sum(), top1=outputs.is_top1.sum())
                    stats["count"] = outputs.label_mask.sum()
            if stats:
                gathered = self.accelerator.gather_for_metrics(
                    torch.stack([stats["entropy_sum"].float(), stats["top1"].float(), stats["count"].float()])[None]
                ).sum(0)
                entropy, top1, count = gathered.tolist()
                self._metrics[mode]["entropy"].append(entropy / count if count else 0.0)
                self._metrics[mode]["mean_token_accuracy"].append(top1 / count if count else 0.0)
            return loss

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if self.model.training and "loss" in logs and self.throughput is not None:
                logs.update(self.throughput.update(self.state.num_input_tokens_seen))
                padding, positions = self._padding.item(), self._positions
                if positions > self._logged[1]:
                    logs["padding_share"] = round((padding - self._logged[0]) / (positions - self._logged[1]), 4)
                self._logged = (padding, positions)
            super().log(logs, start_time)

        def padding_share(self) -> float | None:
            """Share of the padded batches' positions that were padding, over the run (None when packed)."""
            return round(self._padding.item() / self._positions, 4) if self._positions else None

    return Trainer


def main(argv: list[str]) -> dict:
    cfg, recipe_file = config.load(argv, SFTRecipe)
    if cfg.print_recipe:
        print(config.to_yaml(cfg), end="")
        return {}
    from finetune.offline import go_offline_if_unreachable, is_hub_id

    names = [cfg.model.name_or_path, cfg.model.tokenizer or ""] + [d.path for d in cfg.data.datasets]
    go_offline_if_unreachable([n for n in names if is_hub_id(n)])
    from finetune import hub

    hub.check_can_push(cfg.hub)  # before training, not after it
    if cfg.print_example:
        from finetune import modeling
        from finetune.instructions import preview

        print(preview(cfg.data, modeling.load_tokenizer(cfg.model)))
        return {}
    return train(cfg, recipe_file)[1]


def train(cfg: SFTRecipe, recipe_file: Path | None = None, callbacks: list | None = None, trainer_class=None):
    """Run the recipe; return (trainer, metrics). `callbacks` are extra transformers TrainerCallbacks;
    `trainer_class` replaces the suite's Trainer (bench/sft_throughput.py measures TRL's own against it)."""
    from finetune import modeling

    modeling.quiet_library_warnings()  # before trl/peft import bitsandbytes

    import datasets
    import torch
    from trl import SFTConfig

    from finetune import checkpoints, prompts, throughput
    from finetune.instructions import load_examples

    state, out, recipe, run_info, checkpoint = checkpoints.open_run(cfg, recipe_file, log)
    if state.is_main_process and checkpoint is None:  # a fresh run: best weights a killed run left are not this run's
        shutil.rmtree(out / checkpoints.BestWeights.FOLDER, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------------
    # Model and data
    # ------------------------------------------------------------------------------------------------------
    tokenizer = modeling.load_tokenizer(cfg.model)
    train_examples, eval_examples = load_examples(cfg.data)
    if state.is_main_process and eval_examples:  # what evaluation's heldout_of checks it recomputes the same
        origins = [e.get("origin") for e in eval_examples]
        (out / "heldout.json").write_text(json.dumps({"count": len(origins), "origins": origins}, ensure_ascii=False))
    train_rows, data_stats = prompts.tokenize_examples(train_examples, cfg.data, tokenizer, "train")
    eval_rows = prompts.tokenize_examples(eval_examples, cfg.data, tokenizer, "eval")[0] if eval_examples else []
    # Saved with the adapter: apply_chat_template then renders exactly the text this style trained on.
    tokenizer.chat_template = prompts.saved_chat_template(cfg.data.prompt_style, cfg.data.system_prompt, tokenizer)
    log.info("data: %d training and %d held-out examples", len(train_rows), len(eval_rows))

    if cfg.training.keep_best and not (eval_rows and cfg.training.eval_every):
        raise RecipeError(
            "training.keep_best=true picks the weights of the best evaluation: it needs held-out data "
            "(data.eval_size or data.eval_datasets) and training.eval_every"
        )
    if cfg.training.keep_best and state.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise RecipeError(f"training.keep_best keeps whole weights, which {state.distributed_type.value} shards")
    model = modeling.load_model(cfg.model, cfg.quantization)
    packing = cfg.data.packing if cfg.data.packing is not None else modeling.supports_packing(model)
    if packing and not modeling.supports_packing(model):
        raise RecipeError(
            f"data.packing=true, but attention '{model.config._attn_implementation}' of this model "
            "ignores position-id resets: packed examples would attend to each other"
        )
    padding_free = not packing and (
        cfg.data.padding_free
        if cfg.data.padding_free is not None
        else modeling.supports_packing(model) and cfg.training.micro_batch_size > 1
    )
    if padding_free and not modeling.supports_packing(model):
        raise RecipeError(
            f"data.padding_free=true, but attention '{model.config._attn_implementation}' of this model "
            "ignores position-id resets: the examples of a micro-batch would attend to each other"
        )
    if (
        (packing or padding_free)
        and model.config._attn_implementation == "sdpa"
        and model.config.model_type == "llama"  # no sliding window, soft-capping or position bias to honour
        and not torch.cuda.is_available()
    ):
        # No variable-length kernel on the CPU: attend per packed example rather than over a masked whole row
        from finetune import attention

        model.set_attn_implementation(attention.register())
    log.info(
        "model %s (%s parameters, %s), %s, attention %s",
        cfg.model.name_or_path,
        f"{model.num_parameters():,}",
        model.dtype,
        "packing" if packing else "padding-free batches" if padding_free else "padded batches",
        model.config._attn_implementation,
    )

    args = SFTConfig(
        **modeling.trainer_arguments(cfg.training, cfg.data.seed, out, evaluate=bool(eval_rows)),
        dataloader_pin_memory=torch.cuda.is_available(),
        # tokens trained on, in the Trainer's state (saved with checkpoints): padding-free rows have no padding
        include_num_input_tokens_seen="all" if packing or padding_free else "non_padding",
        train_sampling_strategy="group_by_length"
        if cfg.data.group_by_length and not (packing or padding_free)
        else "random",
        # examples are already cut to max_length (prompts.tokenize_examples); TRL refuses it with padding_free alone
        max_length=None if padding_free else cfg.data.max_length,
        padding_free=padding_free,
        packing=packing,
        packing_strategy="bfd",  # best-fit decreasing, padding-free: position ids reset per example
    )
    Trainer = trainer_class or make_trainer_class()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=modeling.peft_config(cfg.lora),
        callbacks=[
            checkpoints.CheckpointCallback(recipe, run_info, cfg.training.keep_checkpoints),
            *([checkpoints.BestWeights(out)] if cfg.training.keep_best else []),
            *(callbacks or []),
        ],
        fused_loss=cfg.training.fused_loss,
        token_metrics=cfg.training.log_token_metrics,
    )
    log.info("loss: %s", trainer.loss_path)
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
        "mfu": throughput.mfu(
            (tokens - tokens_before) / elapsed, trainer.throughput.flops_per_token, state.num_processes
        )
        if elapsed
        else None,
        "peak_mem_gb": round(throughput.peak_memory_gb(), 3),
        "peak_mem_kind": "cuda_allocated" if torch.cuda.is_available() else "cpu_max_rss",
        "trainable_params": trainable,
        "total_params": total,
        "packing": packing,
        "padding_free": padding_free,
        "padding_share": trainer.padding_share() if hasattr(trainer, "padding_share") else None,
        "loss_path": getattr(trainer, "loss_path", None),
        "data": data_stats | {"train_rows": len(train_rows), "eval_rows": len(eval_rows)},
    }

    # ------------------------------------------------------------------------------------------------------
    # Evaluate
    # ------------------------------------------------------------------------------------------------------
    if eval_rows:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    best = next((c.best for c in trainer.callback_handler.callbacks if isinstance(c, checkpoints.BestWeights)), None)
    if best is not None:
        metrics["best_step"], metrics["best_eval_loss"] = best["step"], best["eval_loss"]
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
    """Base (full precision, even after QLoRA) + adapter -> one plain model in out/merged (hub.merge_adapter: the
    one merge, shared with Hub pushes)."""
    from finetune import hub

    hub.merge_adapter(hub.describe(out), out / "merged", max_shard_size=cfg.hub.max_shard_size)
    log.info("merged model saved to %s", out / "merged")
    return out / "merged"


def cli() -> None:
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
