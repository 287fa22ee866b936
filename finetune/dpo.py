"""DPO (and TRL's other preference losses) on a fine-tuned model, with LoRA or QLoRA: TRL's DPOTrainer and PEFT.

One CPU, offline, after `make quickstart` (the quickstart's SFT adapter, bundled English and Japanese pairs):
    accelerate launch finetune/dpo.py recipe=dpo-quickstart
One GPU:
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml finetune/dpo.py recipe=dpo-ja
    accelerate launch finetune/dpo.py recipe=dpo-hh model.name_or_path=outputs/alpaca-merged
Many GPUs:
    accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 8 finetune/dpo.py recipe=dpo-hh

The policy is an SFT run's output folder (its adapter keeps training; a frozen copy of it, TRL's "ref" adapter, is
the reference; the base is loaded as the run loaded it, 4-bit included) or a merged or full model (a new LoRA is
trained; the reference is the model with it disabled). Never a raw base as the silent reference of an SFT adapter:
the log says which reference is used. Pairs are rendered with the run's prompt style into the token ids SFT and
generation use. `resume=true` continues from the newest complete checkpoint; `print_recipe=true` prints the
resolved recipe.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from finetune import config
from finetune.config.dpo import DPORecipe
from finetune.errors import run_cli

log = logging.getLogger("finetune.dpo")


def main(argv: list[str]) -> dict:
    cfg, recipe_file = config.load(argv, DPORecipe)
    if cfg.print_recipe:
        print(config.to_yaml(cfg), end="")
        return {}
    from finetune.offline import go_offline_if_unreachable, is_hub_id

    names = [cfg.model.name_or_path, cfg.model.tokenizer or ""] + [d.path for d in cfg.data.datasets]
    if (run := sft_run_of(cfg.model.name_or_path)) is not None:
        names.append(run.model.name_or_path)  # the base an SFT adapter is loaded on
    go_offline_if_unreachable([n for n in names if is_hub_id(n)])
    from finetune import hub

    hub.check_can_push(cfg.hub)  # before training, not after it
    return train(cfg, recipe_file)[1]


def sft_run_of(path: str):
    """The SFT recipe behind a policy: its own folder's, or (for `output_dir/merged`) the run's that merged it."""
    from finetune import modeling

    folder = Path(path)
    if not folder.is_dir():
        return None
    run = modeling.run_recipe(folder)
    if run is None and folder.name == "merged":
        run = modeling.run_recipe(folder.parent)
    return run


def load_policy(cfg: DPORecipe):
    """(model, tokenizer, peft_config for the trainer, SFT run or None, the reference in words)."""
    from finetune import modeling
    from finetune.config.shared import ModelConfig

    modeling.quiet_library_warnings()  # before peft imports bitsandbytes
    folder = Path(cfg.model.name_or_path)
    run = sft_run_of(cfg.model.name_or_path)
    if folder.is_dir() and (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        if run is not None:
            base_cfg, quant = run.model, run.quantization  # the base exactly as the adapter was trained on it
        else:
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
            base_cfg, quant = ModelConfig(name_or_path=base), cfg.quantization
        model = PeftModel.from_pretrained(modeling.load_model(base_cfg, quant), str(folder), is_trainable=True)
        tokenizer = modeling.load_tokenizer(ModelConfig(name_or_path=str(folder)))
        reference = (
            f"a frozen copy of the SFT adapter in {folder} (TRL's 'ref' adapter) on the same "
            f"{'4-bit ' if quant and quant.load_in_4bit else ''}base {base_cfg.name_or_path}"
        )
        return model, tokenizer, None, run, reference
    model = modeling.load_model(cfg.model, cfg.quantization)
    tokenizer = modeling.load_tokenizer(cfg.model)
    if cfg.lora.method == "lora":
        reference = f"{cfg.model.name_or_path} itself, with the new LoRA adapter disabled"
        return model, tokenizer, modeling.peft_config(cfg.lora), run, reference
    return model, tokenizer, None, run, f"a frozen copy of {cfg.model.name_or_path} (full fine-tuning)"


def rendering(cfg: DPORecipe, run):
    """The recipe's data section with the run's prompt style, system prompt and NFKC where the recipe leaves null."""
    import dataclasses

    sft = run.data if run is not None else None
    given = cfg.data
    return dataclasses.replace(
        given,
        prompt_style=given.prompt_style or (sft.prompt_style if sft else "alpaca"),
        system_prompt=given.system_prompt if given.system_prompt is not None else (sft.system_prompt if sft else None),
        nfkc=given.nfkc if given.nfkc is not None else (sft.nfkc if sft else False),
    )


def make_trainer_class():
    """TRL's DPOTrainer, given the suite's tokenisation, with tokens/s, MFU and peak memory in every log line."""
    from trl import DPOTrainer

    from finetune.throughput import Throughput

    class Trainer(DPOTrainer):
        throughput: Throughput | None = None

        def _prepare_dataset(self, dataset, *args, **kwargs):
            # The pairs arrive as prompt_ids / chosen_ids / rejected_ids from preferences.tokenize_pairs: SFT's
            # rendering, tokenised whole. TRL's own preparation would render and tokenise the strings again.
            return dataset

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if self.model.training and "loss" in logs and self.throughput is not None:
                logs.update(self.throughput.update(self.state.num_input_tokens_seen))
            super().log(logs, start_time)

    return Trainer


def train(cfg: DPORecipe, recipe_file: Path | None = None, callbacks: list | None = None):
    """Run the recipe; return (trainer, metrics)."""
    from finetune import modeling

    modeling.quiet_library_warnings()
    import datasets
    import torch
    from trl import DPOConfig

    from finetune import checkpoints, throughput
    from finetune.preferences import load_pairs, tokenize_pairs

    state, out, recipe, run_info, checkpoint = checkpoints.open_run(cfg, recipe_file, log)

    # ------------------------------------------------------------------------------------------------------
    # Policy, reference and data
    # ------------------------------------------------------------------------------------------------------
    model, tokenizer, peft_config, run, reference = load_policy(cfg)
    data = rendering(cfg, run)
    log.info(
        "reference: %s; prompts rendered as %s (%s)",
        reference,
        data.prompt_style,
        "the SFT run's" if run is not None and cfg.data.prompt_style is None else "the recipe's",
    )
    train_pairs, eval_pairs = load_pairs(data)
    train_rows, data_stats = tokenize_pairs(train_pairs, data, tokenizer, "train")
    eval_rows, eval_stats = tokenize_pairs(eval_pairs, data, tokenizer, "eval") if eval_pairs else ([], None)
    log.info("data: %d training and %d held-out pairs", len(train_rows), len(eval_rows))

    args = DPOConfig(
        **modeling.trainer_arguments(cfg.training, cfg.data.seed, out, evaluate=bool(eval_rows)),
        include_num_input_tokens_seen="non_padding",
        max_length=None,  # cut already, keeping the prompt's end (TRL keeps only a sequence's start)
        beta=cfg.dpo.beta,
        loss_type=list(cfg.dpo.loss_type),
        loss_weights=cfg.dpo.loss_weights,
        label_smoothing=cfg.dpo.label_smoothing,
        precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs,
    )
    building = time.perf_counter()
    trainer = make_trainer_class()(  # with precompute_ref_log_probs, TRL scores every pair with the reference here
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[checkpoints.CheckpointCallback(recipe, run_info, cfg.training.keep_checkpoints), *(callbacks or [])],
    )
    setup_s = time.perf_counter() - building
    if hasattr(trainer.model, "peft_config"):
        names = list(trainer.model.peft_config)
        frozen = "; the frozen reference: ref" if "ref" in names else ""
        log.info("adapters: %s (trained: default%s)", ", ".join(names), frozen)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    trainer.throughput = throughput.Throughput(
        throughput.flops_per_token(trainer.model, data.max_length), state.num_processes
    )

    # ------------------------------------------------------------------------------------------------------
    # Train, with the held-out reward accuracy and margin before and after
    # ------------------------------------------------------------------------------------------------------
    before = held_out(trainer) if eval_rows and checkpoint is None else None
    tokens_before = 0
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
        saved = json.loads((checkpoint / "trainer_state.json").read_text())
        tokens_before = saved.get("num_input_tokens_seen", 0)
        saved_before = out / "held_out_before.json"
        before = json.loads(saved_before.read_text()) if saved_before.is_file() else None
    elif before is not None and state.is_main_process:
        (out / "held_out_before.json").write_text(json.dumps(before, indent=2))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    elapsed = time.perf_counter() - started
    after = held_out(trainer) if eval_rows else None

    # ------------------------------------------------------------------------------------------------------
    # Save
    # ------------------------------------------------------------------------------------------------------
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(unwrapped, "peft_config", {}):  # the reference copy is the SFT adapter: not saved again
        unwrapped.delete_adapter("ref")
    trainer.save_model(str(out))  # the trained adapter (or the full model) and the tokenizer
    tokens = trainer.state.num_input_tokens_seen
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    metrics = {
        "reference": reference,
        "prompt_style": data.prompt_style,
        "held_out_before": before,
        "held_out_after": after,
        "train_loss": checkpoints.train_loss(trainer.state.log_history),
        "last_logged_loss": losses[-1] if losses else None,
        "global_step": trainer.state.global_step,
        "train_runtime_s": round(elapsed, 2),
        "trainer_setup_s": round(setup_s, 2),  # building the trainer: the reference's precompute pass, if any
        "train_tokens": tokens,
        "tokens_per_s": round((tokens - tokens_before) / elapsed, 1) if elapsed else None,
        "mfu": throughput.mfu((tokens - tokens_before) / elapsed, trainer.throughput.flops_per_token)
        if elapsed
        else None,
        "peak_mem_gb": round(throughput.peak_memory_gb(), 3),
        "peak_mem_kind": "cuda_allocated" if torch.cuda.is_available() else "cpu_max_rss",
        "trainable_params": trainable,
        "total_params": total,
        "precompute_ref_log_probs": cfg.dpo.precompute_ref_log_probs,
        "data": data_stats | {"train_rows": len(train_rows), "eval_rows": len(eval_rows)},
        "held_out_data": eval_stats,  # the held-out pairs' own counts: cut, dropped and why
    }
    if state.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        if cfg.hub.push_to_hub:
            from finetune import hub

            hub.push(cfg.hub, out)
    if before and after:
        for key in ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp"):
            log.info("held-out %s: %.4f before training, %.4f after", key.replace("_", " "), before[key], after[key])
    log.info(
        "done: %s tokens/s, peak memory %.2f GB; saved in %s", metrics["tokens_per_s"], metrics["peak_mem_gb"], out
    )
    return trainer, metrics


def held_out(trainer) -> dict:
    """The held-out pairs' reward accuracy and margin (rewards are beta x the policy's log-probability ratio to the
    reference) and the policy's mean log-probabilities of the chosen and rejected answers: TRL's evaluation."""
    found = trainer.evaluate()
    return {
        "reward_accuracy": found.get("eval_rewards/accuracies"),
        "reward_margin": found.get("eval_rewards/margins"),
        "chosen_logp": found.get("eval_logps/chosen"),
        "rejected_logp": found.get("eval_logps/rejected"),
        "loss": found.get("eval_loss"),
    }


def cli() -> None:
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
