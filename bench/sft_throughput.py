"""SFT throughput: packed vs padded batches, and peak memory of LoRA vs QLoRA. A benchmark, not a test.

    python bench/sft_throughput.py                      # built-in tiny LLaMA, bundled Japanese data, CPU
    python bench/sft_throughput.py --model TinyLlama/TinyLlama_v1.1 --steps 50   # on a GPU

Every configuration trains the same model on the same data for the same number of steps, each in its own
process (so peak memory is that run's alone), through `finetune/sft.py`. Effective tokens are the non-pad
tokens the model learned from; the ratio is packed / padded effective tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JA_DATA = "[{path: data/dolly_ja.jsonl, format: dolly}, {path: data/conversations_ja.jsonl, format: conversations}]"


def run(name: str, out: Path, model: str, steps: int, max_length: int, extra: list[str]) -> dict:
    argv = [
        sys.executable,
        "-m",
        "finetune.sft",
        "recipe=quickstart",
        f"model.name_or_path={model}",
        f"data.datasets={JA_DATA}",
        "data.eval_size=0",
        f"data.max_length={max_length}",
        f"training.output_dir={out / name}",
        f"training.max_steps={steps}",
        "training.report_to=[]",
        "training.save_every=100000",
        *extra,
    ]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / name / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--padded-batch", type=int, default=8, help="examples per padded micro-batch")
    parser.add_argument("--packed-batch", type=int, default=2, help="packed blocks of max-length per micro-batch")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        common = (out, args.model, args.steps, args.max_length)
        # one untimed run first, so building the built-in base and warming caches burden neither side
        run("warmup", out, args.model, 2, args.max_length, ["data.packing=true"])
        padded = run("padded", *common, ["data.packing=false", f"training.micro_batch_size={args.padded_batch}"])
        packed = run("packed", *common, ["data.packing=true", f"training.micro_batch_size={args.packed_batch}"])
        qlora = run(
            "packed-qlora",
            *common,
            ["data.packing=true", f"training.micro_batch_size={args.packed_batch}", "quantization.load_in_4bit=true"],
        )

    print(
        f"model {args.model}, {args.steps} steps, max_length {args.max_length}, bundled Japanese data (dolly_ja + "
        f"conversations_ja), LoRA r=16 all-linear; memory is {packed['peak_mem_kind']}"
    )
    print(f"{'run':<14}{'micro-batch':>14}{'eff. tokens':>13}{'seconds':>10}{'eff. tok/s':>12}{'peak GB':>9}")
    for name, m, batch in (
        ("padded", padded, f"{args.padded_batch} examples"),
        ("packed", packed, f"{args.packed_batch}x{args.max_length}"),
        ("packed-qlora", qlora, f"{args.packed_batch}x{args.max_length}"),
    ):
        print(
            f"{name:<14}{batch:>14}{m['train_tokens']:>13}{m['train_runtime_s']:>10.1f}{m['tokens_per_s']:>12.1f}"
            f"{m['peak_mem_gb']:>9.3f}"
        )
    print(f"packed/padded effective tokens/s: {packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x")
    print(f"QLoRA/LoRA peak memory: {qlora['peak_mem_gb'] / packed['peak_mem_gb']:.2f}x")


if __name__ == "__main__":
    main()
