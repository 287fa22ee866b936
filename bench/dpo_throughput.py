"""DPO throughput with and without precomputed reference log-probabilities, on the same model and pairs (one epoch), in
one run. A benchmark, not a test.

    python bench/dpo_throughput.py                       # built-in tiny LLaMA + a new LoRA, bundled pairs, CPU
    python bench/dpo_throughput.py --model outputs/quickstart --pairs 80 --repeats 3
    python bench/dpo_throughput.py --model TinyLlama/TinyLlama_v1.1 --max-length 1024   # on a GPU (MFU printed)

Each run goes through finetune/dpo.py's train() in its own process (so peak memory is that run's): `per step`
computes the reference's log-probabilities in every step (one more forward pass of the pair batch), `precomputed`
scores every pair with the reference once before training (counted in the run's time) and trains without it.
Tokens/s and pairs/s are over the whole run (building the trainer, where TRL precomputes, and training); tokens
are the non-pad tokens of the pairs trained on; the ratio is precomputed / per step, run by run.
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
DATA = (
    "[{{path: data/preferences_en.jsonl, format: alpaca, max_samples: {n}}}, "
    "{{path: data/preferences_ja.jsonl, format: sharegpt, max_samples: {n}}}]"
)
MODES = {"per step": "false", "precomputed": "true"}


def worker(overrides: list[str]) -> None:
    from finetune import config, dpo
    from finetune.config.dpo import DPORecipe

    dpo.train(config.load(["recipe=dpo-quickstart", *overrides], DPORecipe)[0])


def run(out: Path, args, precompute: str) -> dict:
    folder = out / f"precompute-{precompute}"
    overrides = [
        f"model.name_or_path={args.model}",
        f"data.datasets={DATA.format(n=args.pairs // 2)}",
        "data.prompt_style=alpaca" if args.model.startswith("builtin:") else "data.prompt_style=null",
        "data.eval_size=0",
        f"data.max_length={args.max_length}",
        f"dpo.precompute_ref_log_probs={precompute}",
        f"training.output_dir={folder}",
        "training.num_epochs=1",  # one pass: the reference scores each pair once either way
        f"training.micro_batch_size={args.batch}",
        "training.gradient_accumulation_steps=1",
        "training.report_to=[]",
        "training.save_every=100000",
        "lora.dropout=0.0",
    ]
    argv = [sys.executable, __file__, "--worker", "--", *overrides]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode != 0:
        sys.exit(f"{folder.name} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((folder / "metrics.json").read_text())
    # the whole run's time: TRL's precompute pass runs while the trainer is built, before trainer.train()
    metrics["run_s"] = metrics["trainer_setup_s"] + metrics["train_runtime_s"]
    metrics["pairs_per_s"] = metrics["data"]["train_rows"] / metrics["run_s"]
    metrics["run_tokens_per_s"] = metrics["train_tokens"] / metrics["run_s"]
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--pairs", type=int, default=48, help="pairs drawn per run (half English, half Japanese)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode, alternated")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.overrides)

    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode, flag in MODES.items():
                results[mode].append(run(Path(tmp) / str(repeat), args, flag))
    print(
        f"model {args.model}, one epoch of {results['per step'][0]['data']['train_rows']} pairs, {args.batch} a step, "
        f"max_length {args.max_length}, bundled English and Japanese pairs, {args.repeats} run(s) each, medians; "
        f"memory is {results['per step'][0]['peak_mem_kind']}"
    )
    print(f"{'reference':<14}{'tokens':>9}{'tok/s':>9}{'pairs/s':>9}{'MFU':>7}{'peak GB':>9}{'final loss':>12}")
    for mode, runs in results.items():
        mfu = statistics.median(m["mfu"] for m in runs) if runs[0]["mfu"] is not None else None
        print(
            f"{mode:<14}{runs[0]['train_tokens']:>9}{statistics.median(m['run_tokens_per_s'] for m in runs):>9.1f}"
            f"{statistics.median(m['pairs_per_s'] for m in runs):>9.2f}{'-' if mfu is None else f'{mfu:.3f}':>7}"
            f"{statistics.median(m['peak_mem_gb'] for m in runs):>9.3f}{runs[0]['last_logged_loss']:>12.4f}"
        )
    pairs = zip(results["precomputed"], results["per step"], strict=True)
    ratios = [(a["pairs_per_s"] / b["pairs_per_s"], a["peak_mem_gb"] / b["peak_mem_gb"]) for a, b in pairs]
    speed, memory = (statistics.median(r[i] for r in ratios) for i in (0, 1))
    print(f"precomputed / per step: {speed:.2f}x pairs/s (the precompute pass included), {memory:.2f}x peak memory")


if __name__ == "__main__":
    main()
