"""Evaluation throughput: a loss set and a generation set scored batched (the evaluation stage's way) and one example
at a time (the baseline), on the same model and items, in one run. A benchmark, not a test.

    python bench/eval_throughput.py                                  # outputs/pretrain-tiny, else builtin:tiny-llama
    python bench/eval_throughput.py --loss-examples 2000 --prompts 200 --batch-size 8
    python bench/eval_throughput.py --model TinyLlama/TinyLlama_v1.1 --batch-size 32   # on a GPU

Items: the bundled alpaca_en + dolly_ja (541 records, repeated to reach --loss-examples) in the Alpaca prompt.
Loss: response-token NLL (finetune/evaluation/loss.py); generation: greedy, --max-new-tokens, stopping at EOS
(finetune/evaluation/generation.py). Prints examples/s and tokens/s of each, the batched / one-at-a-time ratio, and
checks that batched greedy answers equal the one-at-a-time ones.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = (
        "outputs/pretrain-tiny" if (REPO / "outputs/pretrain-tiny/config.json").is_file() else "builtin:tiny-llama"
    )
    parser.add_argument("--model", default=default)
    parser.add_argument("--loss-examples", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--baseline-share", type=float, default=0.25, help="share of the items the baseline scores")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from finetune import config, modeling, throughput
    from finetune.config.eval import EvalRecipe
    from finetune.evaluation import data, generation, loss

    spec = [
        {"path": str(REPO / "data" / f), "format": fmt}
        for f, fmt in (("alpaca_en.jsonl", "alpaca"), ("dolly_ja.jsonl", "dolly"))
    ]
    cfg = config.build(
        EvalRecipe,
        {
            "model": args.model,
            "tasks": [
                {"name": "loss", "type": "loss", "datasets": spec},
                {
                    "name": "gen",
                    "type": "generation",
                    "datasets": spec,
                    "max_examples": args.prompts,
                    "max_new_tokens": args.max_new_tokens,
                },
            ],
        },
    )
    model, tokenizer, _ = modeling.load_for_inference(args.model)
    loss_task, gen_task = cfg.tasks
    render = data.rendering(loss_task, {})
    bundled = data.examples(loss_task, render, seed=0)
    loss_items = (bundled * (args.loss_examples // len(bundled) + 1))[: args.loss_examples]  # repeated to the size
    gen_items = data.examples(gen_task, render, seed=0)
    print(
        f"model {args.model} ({model.num_parameters():,} parameters, {model.dtype}), batch size {args.batch_size}; "
        f"the one-at-a-time baseline scores the first {args.baseline_share:.0%} of the items"
    )
    print(f"{'set':<12}{'mode':<14}{'items':>7}{'seconds':>9}{'items/s':>10}{'tokens/s':>10}")
    rates = {}
    answers = {}
    for name, items in (("loss", loss_items), ("generation", gen_items)):
        for mode, batch in (("batched", args.batch_size), ("one at a time", 1)):
            subset = items if batch > 1 else items[: max(1, int(len(items) * args.baseline_share))]
            started = time.perf_counter()
            if name == "loss":
                result = loss.score(model, tokenizer, subset, render, batch, name)
            else:
                result = generation.score(model, tokenizer, subset, render, gen_task, batch, seed=0)
                answers[mode] = result["predictions"]
            seconds = time.perf_counter() - started
            rates[(name, mode)] = result["n"] / seconds
            print(
                f"{name:<12}{mode:<14}{result['n']:>7}{seconds:>9.1f}{result['n'] / seconds:>10.1f}"
                f"{result['tokens_per_s']:>10.0f}"
            )
    for name in ("loss", "generation"):
        print(f"{name}: batched / one at a time = {rates[(name, 'batched')] / rates[(name, 'one at a time')]:.2f}x")
    n = len(answers["one at a time"])
    same = sum(a == b for a, b in zip(answers["batched"][:n], answers["one at a time"], strict=True))
    print(f"greedy answers equal batched and one at a time: {same} of {n}")
    print(f"peak memory {throughput.peak_memory_gb():.2f} GB")


if __name__ == "__main__":
    main()
