"""Pretraining throughput: this suite's loop (finetune/pretrain.py) against the plain Hugging Face Trainer on
the same model, data and token batch. A benchmark, not a test.

    python bench/pretrain_throughput.py                                       # pretrain-tiny, CPU
    python bench/pretrain_throughput.py recipe=pretrain-120m --steps 30       # on a GPU (MFU printed too)

Both sides start from the same initial weights and train on the same packed blocks (the recipe's corpora and
mixture) with the same micro-batch x accumulation, AdamW(0.9, 0.95) with the fused kernel, weight decay,
clipping, warmup + cosine, fp32 on CPU and bf16 autocast on GPU, each in its own process. Tokens/s comes
from the wall-clock time between consecutive optimiser steps, after the first --skip steps (warm-up); the
ratio is ours / Trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rate(times: list[float], step_tokens: int, skip: int) -> float:
    """Tokens/s over the steps after `skip`, from the time each step ended."""
    times = times[skip:]
    return step_tokens * (len(times) - 1) / (times[-1] - times[0])


def baseline(argv: list[str], steps: int, skip: int, result: Path) -> None:
    """The same run through transformers' Trainer (in this process)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from finetune import config, corpus, pretrain
    from finetune.config.pretrain import PretrainRecipe
    from finetune.modeling import resolve_precision
    from finetune.throughput import flops_per_token, mfu, peak_memory_gb

    cfg = config.load(argv, PretrainRecipe)[0]
    t = cfg.training
    corpora = corpus.prepare(cfg.data, cfg.tokenizer, cfg.tokenizer.name_or_path or cfg.model.base)
    model = pretrain.load_base(cfg, corpora.tokenizer) if cfg.model.base else pretrain.new_model(cfg, corpora.tokenizer)
    model.config.use_cache = False
    accum, step_tokens = pretrain.batch_shape(cfg, 1)
    mixture = corpora.mixture(cfg.data.seed)
    pairs = [p for step in range(steps) for p in mixture.draw(step, t.micro_batch_size * accum)]

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(pairs)

        def __getitem__(self, i):
            c, b = pairs[i]
            return torch.from_numpy(corpora.train[c][b])

    def collate(blocks):
        ids = torch.stack(blocks)[:, :-1]  # the same seq_len tokens per block as our loop (the model shifts)
        return {"input_ids": ids, "labels": ids}

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    precision = resolve_precision(t.precision)  # the rule finetune/pretrain.py follows
    args = TrainingArguments(
        output_dir=str(result.parent / "hf"),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
        warmup_steps=min(t.warmup_steps, steps - 1),
        weight_decay=t.weight_decay,
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch_fused",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        torch_compile=t.compile,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), data_collator=collate, callbacks=[Clock()])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    tokens_per_s = rate(ends, step_tokens, skip)
    result.write_text(
        json.dumps(
            {
                "tokens_per_s": tokens_per_s,
                "mfu": mfu(tokens_per_s, flops_per_token(model, cfg.data.seq_len)),
                "peak_mem_gb": peak_memory_gb(),
                "step_tokens": step_tokens,
                "first_loss": losses[0],
                "last_loss": losses[-1],
            }
        )
    )


def ours(argv: list[str], skip: int, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, str(REPO / "finetune" / "pretrain.py"), *argv, f"training.output_dir={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"finetune/pretrain.py failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    if len(rows) < skip + 2:
        return {}
    step_tokens = rows[0]["tokens"]
    tokens_per_s = rate([r["time"] for r in rows], step_tokens, skip)
    last = rows[-1]  # MFU is proportional to tokens/s: scale the logged step's to the timed window's rate
    return {
        "tokens_per_s": tokens_per_s,
        "step_tokens": step_tokens,
        "mfu": last["mfu"] * tokens_per_s / last["tokens_per_s"] if "mfu" in last else None,
        "peak_mem_gb": last["peak_mem_gb"],
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternated")
    parser.add_argument("--baseline-into", type=Path, help=argparse.SUPPRESS)  # internal: run the Trainer side
    args, overrides = parser.parse_known_args()
    if not any(o.startswith("recipe=") for o in overrides):
        overrides.insert(0, "recipe=pretrain-tiny")
    quiet = ["training.eval_every=1000000", "training.save_every=1000000", "training.log_every=1000000"]
    argv = [*overrides, f"training.max_steps={args.steps}", *quiet]
    if args.baseline_into:
        baseline(argv, args.steps, args.skip, args.baseline_into)
        return

    def trainer(tmp: Path) -> dict:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                *overrides,
                f"--steps={args.steps}",
                f"--skip={args.skip}",
                f"--baseline-into={tmp / 'hf.json'}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1")),
        )
        if proc.returncode != 0:
            sys.exit(f"the Trainer baseline failed:\n{proc.stderr[-3000:]}")
        return json.loads((tmp / "hf.json").read_text())

    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # an untimed run first: builds the corpus caches (and the tokenizer), so neither side pays for them
        ours([*overrides, "training.max_steps=1", "training.eval_blocks=1", *quiet], args.skip, tmp / "warmup")
        # On a shared 2-core machine one run's speed drifts by ~10%: alternate the sides (A B B A ...) and
        # compare medians.
        for rep in range(args.repeats):
            for side in ("ours", "hf") if rep % 2 == 0 else ("hf", "ours"):
                out = tmp / f"{side}{rep}"
                runs[side].append(ours(argv, args.skip, out) if side == "ours" else trainer(out.mkdir() or out))
                print(f"  run {rep + 1} {side:>5}: {runs[side][-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)

    mine, hf = (sorted(runs[k], key=lambda r: r["tokens_per_s"])[len(runs[k]) // 2] for k in ("ours", "hf"))
    print(
        f"{' '.join(overrides)}: {args.steps} steps of {mine['step_tokens']:,} tokens, timed after {args.skip}, "
        f"median of {args.repeats} runs each"
    )
    print(f"{'loop':<22}{'tokens/s':>10}{'MFU':>8}{'peak GB':>9}{'loss first -> last':>22}")
    for name, r in (("finetune/pretrain.py", mine), ("transformers Trainer", hf)):
        used = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        print(
            f"{name:<22}{r['tokens_per_s']:>10,.0f}{used:>8}{r['peak_mem_gb']:>9.2f}"
            f"{r['first_loss']:>12.4f} -> {r['last_loss']:.4f}"
        )
    print(f"ratio (ours / Trainer): {mine['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
