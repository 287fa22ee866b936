"""Shared fixtures: a 2-layer LLaMA the suite builds itself, small data files, offline Hub."""

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory) -> Path:
    """builtin micro-llama (2 layers, hidden 64), tokenizer trained on the bundled data."""
    from finetune import builtin

    return builtin.build(tmp_path_factory.mktemp("base") / "micro-llama", "micro-llama", vocab_size=1024)


@pytest.fixture(scope="session")
def micro_base_sp(tmp_path_factory) -> Path:
    """micro-llama with a LLaMA-style SentencePiece tokenizer (BPE, byte fallback, dummy prefix), as Llama 2,
    TinyLlama and ELYZA have, trained offline on the bundled data."""
    from finetune import builtin

    return builtin.build(
        tmp_path_factory.mktemp("base-sp") / "micro-llama-sp", "micro-llama", vocab_size=3000, tokenizer="sentencepiece"
    )


@pytest.fixture(scope="session")
def bpe_tokenizer(micro_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_base)


@pytest.fixture(scope="session")
def sp_tokenizer(micro_base_sp):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_base_sp)


# The data layer is tested on both kinds of tokenizer: byte-level BPE has no dummy prefix, SentencePiece has one.
@pytest.fixture(scope="session", params=["bpe", "sentencepiece"])
def tokenizer(request):
    from finetune import modeling
    from finetune.config.shared import ModelConfig

    base = request.getfixturevalue("micro_base" if request.param == "bpe" else "micro_base_sp")
    return modeling.load_tokenizer(ModelConfig(name_or_path=str(base)))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    records = [
        {
            "instruction": f"Spell the number {i} in words.",
            "input": "" if i % 3 else "English",
            "output": f"The number {i} is written as word number {i}." + " It is a number." * (i % 5),
        }
        for i in range(48)
    ]
    return write_jsonl(tmp_path / "alpaca.jsonl", records)


def sft_recipe(base: Path, data: Path, out: Path, *overrides: str):
    """A small, fast, deterministic SFT recipe on the micro base (fp32, CPU)."""
    from finetune import config
    from finetune.config.sft import SFTRecipe

    argv = [
        "recipe=quickstart",
        f"model.name_or_path={base}",
        f"data.datasets=[{{path: '{data}', format: alpaca}}]",
        "data.prompt_style=alpaca",
        "data.max_length=512",
        "data.eval_size=0",
        "data.nfkc=false",
        f"training.output_dir={out}",
        "training.micro_batch_size=4",
        "training.max_steps=12",
        "training.learning_rate=5e-3",
        "training.warmup_ratio=0",
        "training.log_every=1",
        "training.report_to=[]",
        "lora.dropout=0.0",
        "training.precision=fp32",  # pinned numerics: fp32 on a GPU machine too, not auto's bf16
        *overrides,
    ]
    return config.load(argv, SFTRecipe)[0]
