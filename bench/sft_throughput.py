"""SFT throughput as a user would compare tools: the suite's trainer against TRL's SFTTrainer with its defaults and
against the Trainer's standard loss, on the same model, data, batches and steps; packed and unpacked, LoRA and QLoRA.
A benchmark, not a test.

    python bench/sft_throughput.py                      # built-in tiny LLaMA (5M), bundled EN + JA data, CPU
    python bench/sft_throughput.py --repeats 3          # each run three times, alternated; medians
    python bench/sft_throughput.py --model TinyLlama/TinyLlama_v1.1 --steps 50   # on a GPU (MFU printed)

Every run goes through `finetune/sft.py`'s `train()` (same data order, adapter init, optimiser, schedule), each
in its own process so peak memory is that run's alone; only the Trainer class differs:
- `suite`:    finetune.sft's Trainer: only learned positions reach the output layer (fused into the loss),
              diagnostics on logging steps only;
- `trl`:      TRL's SFTTrainer as it comes (its fused LM head: every position off Triton devices; entropy and
              token accuracy on every micro-batch);
- `standard`: `transformers.Trainer.compute_loss`, the model's own forward with labels (full logits, then
              cross-entropy), on TRL's batches.
Effective tokens are the non-pad tokens trained on. Ratios are suite / baseline, run by run in the same process
tree, so a machine that drifts in speed moves both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Alpaca-style records (recipe=alpaca's format and prompt), English and Japanese, as bundled
DATA = "[{path: data/alpaca_en.jsonl, format: alpaca}, {path: data/dolly_ja.jsonl, format: dolly}]"
TRAINERS = ("suite", "trl", "standard")
# unpacked: packing off, each contender as it comes: the suite joins a micro-batch's examples into one row without
# padding (its default), TRL's SFTTrainer and the Trainer pad them (theirs). The like-for-like controls: padded (every
# contender pads) and padding-free (every contender joins). LoRA dropout draws masks of the batch's shape, so
# `unpacked` compares losses only without dropout (--lora-dropout 0, PEFT's default).
LAYOUTS = ("packed", "unpacked", "padded", "padding-free")
DEFAULT_LAYOUTS = "packed,unpacked"
BASES = ("lora", "qlora")


def trainer_class(name: str):
    """The Trainer class of each contender. Baselines accept (and ignore) the suite's two extra arguments."""
    from finetune import sft

    if name == "suite":
        return sft.make_trainer_class()
    from transformers import Trainer
    from trl import SFTTrainer

    class TRLDefault(SFTTrainer):
        loss_path = "TRL SFTTrainer.compute_loss (its defaults)"

        def __init__(self, *args, fused_loss=True, token_metrics=True, **kwargs):
            super().__init__(*args, **kwargs)

    class StandardLoss(TRLDefault):
        loss_path = "transformers.Trainer.compute_loss (full logits, the model's cross-entropy)"

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # the KV cache off, as TRL does: with it on, transformers drops the packed-sequence mask
            inputs = {**inputs, "use_cache": False}
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return TRLDefault if name == "trl" else StandardLoss


def worker(name: str, overrides: list[str]) -> None:
    """One run, in this process: the quickstart recipe with `overrides`, trained by `name`'s Trainer."""
    from finetune import config, sft
    from finetune.config.sft import SFTRecipe

    cfg = config.load(["recipe=quickstart", *overrides], SFTRecipe)[0]
    sft.train(cfg, trainer_class=trainer_class(name))


def run(name: str, out: Path, args, layout: str, base: str) -> dict:
    folder = out / f"{name}-{layout}-{base}"
    micro = args.packed_batch if layout == "packed" else args.padded_batch
    overrides = [
        f"model.name_or_path={args.model}",
        f"data.datasets={DATA}",
        "data.prompt_style=alpaca",
        "data.eval_size=0",
        f"data.max_length={args.max_length}",
        f"data.packing={layout == 'packed'}",
        # null: the suite's default (padding-free without packing); TRL's SFTTrainer's default is padded
        f"data.padding_free={'null' if layout == 'unpacked' and name == 'suite' else layout == 'padding-free'}",
        f"training.micro_batch_size={micro}",
        f"training.output_dir={folder}",
        f"training.max_steps={args.steps}",
        "training.report_to=[]",
        "training.save_every=100000",
        f"quantization.load_in_4bit={base == 'qlora'}",
        f"lora.dropout={args.lora_dropout}",
    ]
    argv = [sys.executable, __file__, "--worker", name, "--", *overrides]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode != 0:
        sys.exit(f"{folder.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads((folder / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per run (4 micro-batches each)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--padded-batch", type=int, default=2, help="examples per padded micro-batch")
    parser.add_argument("--packed-batch", type=int, default=1, help="packed blocks of max-length per micro-batch")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration, alternated")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="PEFT's default; the recipes use 0.05")
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"any of {','.join(LAYOUTS)}")
    parser.add_argument("--bases", default=",".join(BASES))
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first run (smoke tests)")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.overrides)

    configs = [(layout, base) for layout in args.layouts.split(",") for base in args.bases.split(",")]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # one untimed run first, so building the built-in base and warming caches burden no contender
        if not args.no_warmup:
            run("suite", out / "warmup", argparse.Namespace(**{**vars(args), "steps": 1}), "packed", "lora")
        for repeat in range(args.repeats):
            for layout, base in configs:
                for name in TRAINERS:
                    m = run(name, out / str(repeat), args, layout, base)
                    results.setdefault((layout, base, name), []).append(m)

    first = next(iter(results.values()))[0]
    print(
        f"model {args.model}, {args.steps} steps x 4 micro-batches, max_length {args.max_length}, bundled "
        f"alpaca_en + dolly_ja in the Alpaca prompt, LoRA r=16 all-linear (dropout {args.lora_dropout}), "
        f"{args.repeats} run(s) each, medians; memory is {first['peak_mem_kind']}"
    )
    print(
        f"{'layout':<13}{'base':<7}{'trainer':<10}{'eff. tokens':>12}{'eff. tok/s':>12}{'MFU':>7}{'peak GB':>9}"
        f"{'padding':>9}{'final loss':>12}{'train loss':>12}"
    )

    def median(ms, key):
        values = [m[key] for m in ms if m.get(key) is not None]
        return statistics.median(values) if values else None

    for layout, base in configs:
        for name in TRAINERS:
            ms = results[(layout, base, name)]
            mfu = median(ms, "mfu")
            pad = median(ms, "padding_share")
            print(
                f"{layout:<13}{base:<7}{name:<10}{ms[0]['train_tokens']:>12}{median(ms, 'tokens_per_s'):>12.1f}"
                f"{'-' if mfu is None else f'{mfu:.3f}':>7}{median(ms, 'peak_mem_gb'):>9.3f}"
                f"{'-' if pad is None else f'{pad:.3f}':>9}{ms[0]['last_logged_loss']:>12.4f}"
                f"{ms[0]['train_loss']:>12.4f}"
            )
    print("ratios, suite / baseline (median of the runs' ratios):")
    for layout, base in configs:
        ours = results[(layout, base, "suite")]
        for name in ("trl", "standard"):
            theirs = results[(layout, base, name)]
            speed = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, theirs, strict=True))
            memory = statistics.median(a["peak_mem_gb"] / b["peak_mem_gb"] for a, b in zip(ours, theirs, strict=True))
            loss = abs(ours[0]["last_logged_loss"] - theirs[0]["last_logged_loss"])
            print(
                f"  {layout} {base} vs {name}: {speed:.2f}x tokens/s, {memory:.2f}x peak memory, "
                f"final loss differs by {loss:.1e}"
            )


if __name__ == "__main__":
    main()
