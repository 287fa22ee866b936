"""`builtin:tiny-llama`: a small, randomly initialised LLaMA the suite builds in a second, for tests and
benchmarks (`builtin:micro-llama`, 2 layers, for the tests). Its tokenizer (finetune/tokenizer.py: byte-level BPE,
or LLaMA's SentencePiece kind for testing the data layer against real LLaMA tokenisation) is trained on the bundled
data.

Its tokenizer is trained on the bundled data in `data/` (English and Japanese), so no character is ever
unknown; the weights are freshly initialised (seeded, so every build is identical). A pretrained base comes
from `finetune/pretrain.py` (`recipe=pretrain-tiny` on CPU), which the quickstart fine-tunes.

    python -m finetune.builtin outputs/base/tiny-llama
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from finetune import shipped_dir
from finetune.tokenizer import train_bpe, train_sentencepiece

log = logging.getLogger(__name__)

REPO_DATA = shipped_dir("data")
DEFAULT_DIR = Path("outputs/base/tiny-llama")

SIZES = {
    # hidden, intermediate, layers, heads, kv heads: TinyLlama's shape (GQA 4:1 -> here 2:1), scaled down
    "tiny-llama": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ),
    "micro-llama": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}


def bundled_texts(data_dir: Path = REPO_DATA):
    """Every string in the bundled data files: the tokenizer's training corpus."""
    import csv

    def strings(obj):
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)

    for path in sorted(data_dir.glob("*")):
        if path.name.startswith("preferences_"):
            continue  # DPO pairs re-use the instruction files' texts: the tokenizer and pinned losses stay as they were
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    yield from strings(json.loads(line))
        elif path.suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                for row in csv.DictReader(f):
                    yield from strings(row)
        elif path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")


TOKENIZERS = {"bpe": train_bpe, "sentencepiece": train_sentencepiece}


def build(
    out_dir: Path = DEFAULT_DIR, size: str = "tiny-llama", seed: int = 0, vocab_size: int = 4096, tokenizer: str = "bpe"
) -> Path:
    """Build the tokenizer (`bpe`: byte-level; `sentencepiece`: LLaMA's kind) and a freshly initialised
    LlamaForCausalLM into `out_dir`; return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    kind = tokenizer
    tokenizer = TOKENIZERS[kind](bundled_texts(), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "lineage.json").write_text(
        json.dumps(
            {
                "built_by": "finetune.builtin",
                "size": size,
                "seed": seed,
                "weights": "random init",
                "tokenizer": f"{'byte-level BPE' if kind == 'bpe' else 'SentencePiece BPE'}, vocab {len(tokenizer)}, "
                f"trained on {REPO_DATA.name}/",
            },
            indent=2,
        )
    )
    if out_dir.exists():  # another process built it meanwhile: keep theirs
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(out_dir)  # atomic: a half-written base is never picked up
    log.info("built %s (%s parameters) in %s", size, f"{model.num_parameters():,}", out_dir)
    return out_dir


def ensure(name: str) -> Path:
    """Path of built-in base `name` (e.g. `tiny-llama`), building it on first use."""
    if name not in SIZES:
        from finetune.errors import RecipeError

        raise RecipeError(
            f"unknown built-in model 'builtin:{name}', expected one of " + ", ".join(f"builtin:{s}" for s in SIZES)
        )
    out = DEFAULT_DIR.with_name(name)
    if not (out / "config.json").exists():
        log.info("building the built-in base builtin:%s into %s (first use)", name, out)
        build(out, name)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR)
