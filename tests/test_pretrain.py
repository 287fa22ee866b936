"""Pretraining: corpora, tokenizer, packing, the mixture, the loop, exact resume after SIGKILL, continued
pretraining, and the errors a user meets first."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune import checkpoints, config, corpus
from finetune.builtin import bundled_texts
from finetune.config.pretrain import CorpusConfig, CorpusSpec, PretrainRecipe, TokenizerConfig
from finetune.errors import DataError, RecipeError

from .conftest import REPO, write_jsonl

EN = [t for t in bundled_texts() if t.isascii() and len(t) > 40]
JA = [t for t in bundled_texts() if not t.isascii() and len(t) > 20]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """English documents as .txt files (one per file), Japanese ones as JSONL records."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "en").mkdir()
    for i in range(0, len(EN) - 3, 4):
        (root / "en" / f"doc{i:04d}.txt").write_text("\n".join(EN[i : i + 4]), encoding="utf-8")
    write_jsonl(root / "ja.jsonl", [{"text": "\n".join(JA[i : i + 3])} for i in range(0, len(JA) - 2, 3)])
    return root


def pretrain_args(corpus_dir: Path, out: Path, *overrides: str) -> list[str]:
    """A 2-layer, hidden-64 LLaMA on the small corpus: fast, fp32, deterministic."""
    return [
        "recipe=pretrain-tiny",
        f"data.corpora=[{{name: en, path: '{corpus_dir / 'en'}', weight: 0.7}}, "
        f"{{name: ja, path: '{corpus_dir / 'ja.jsonl'}', weight: 0.3}}]",
        "data.seq_len=32",
        "data.val_fraction=0.1",
        f"data.cache_dir={out.parent / 'cache'}",
        "tokenizer.vocab_size=512",
        "model.hidden_size=64",
        "model.intermediate_size=176",
        "model.num_layers=2",
        "model.num_heads=4",
        "model.num_kv_heads=2",
        f"training.output_dir={out}",
        "training.micro_batch_size=4",
        "training.global_batch_tokens=256",
        "training.max_steps=32",
        "training.learning_rate=1e-2",
        "training.warmup_steps=2",
        "training.eval_every=16",
        "training.eval_blocks=8",
        "training.save_every=8",
        "training.precision=fp32",  # pinned numerics: fp32 on a GPU machine too, not auto's bf16
        *overrides,
    ]


def load(argv: list[str]) -> PretrainRecipe:
    return config.load(argv, PretrainRecipe)[0]


# ----------------------------------------------------------------------------------------------------------
# Tokenizer, corpora, packing
# ----------------------------------------------------------------------------------------------------------


def test_trained_tokenizer_round_trips_english_and_japanese_with_no_unknown_token(tmp_path, corpus_dir):
    cfg = CorpusConfig(
        corpora=[
            CorpusSpec(name="en", path=str(corpus_dir / "en")),
            CorpusSpec(name="ja", path=str(corpus_dir / "ja.jsonl")),
        ],
        seq_len=16,
        cache_dir=str(tmp_path),
    )
    tokenizer = corpus.prepare(cfg, TokenizerConfig(vocab_size=512), None).tokenizer
    assert tokenizer.unk_token is None and {"bos_token", "eos_token", "pad_token"} <= set(tokenizer.special_tokens_map)
    # text it never saw, rare kanji and emoji included: byte-level BPE falls back to bytes, never to <unk>
    samples = [
        "Pack the blocks, then shuffle them.",
        "富士山は日本で一番高い山です。",
        "鬱 𠮷野家 🍣 ｶﾀｶﾅ",
        "tab\tand\nnewline",
    ]
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": "こんにちは"}], tokenize=False, add_generation_prompt=True
    ).endswith("<|im_start|>assistant\n")


def test_a_corpus_far_smaller_than_expected_is_reported_on_every_run(tmp_path, corpus_dir, caplog):
    import logging

    n = len(list((corpus_dir / "en").glob("*.txt")))
    small = CorpusConfig(
        corpora=[CorpusSpec(name="en", path=str(corpus_dir / "en"), expect_documents=n + 1)], cache_dir=str(tmp_path)
    )
    for cached in (False, True):  # the count is logged from the cache too, where nothing is read again
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="finetune.corpus"):
            corpus.extract_text(small.corpora[0], small)
        assert f"corpus en: {n} documents" in caplog.text and ("[cached]" in caplog.text) == cached
        assert f"far fewer than the {n + 1} expected" in caplog.text
    caplog.clear()
    enough = CorpusSpec(name="en", path=str(corpus_dir / "en"), expect_documents=n)
    with caplog.at_level(logging.INFO, logger="finetune.corpus"):
        corpus.extract_text(enough, small)
    assert "far fewer" not in caplog.text


def test_documents_are_packed_into_blocks_with_eos_between_them(tmp_path, corpus_dir):
    cfg = CorpusConfig(
        corpora=[CorpusSpec(name="ja", path=str(corpus_dir / "ja.jsonl"))], seq_len=16, cache_dir=str(tmp_path)
    )
    prepared = corpus.prepare(cfg, TokenizerConfig(vocab_size=400), None)
    tok, eos = prepared.tokenizer, prepared.tokenizer.eos_token_id
    text_dir = next((tmp_path / "text").glob("ja-*"))
    docs = list(corpus.read_texts(text_dir, "train"))
    expected = [i for d in docs for i in tok(d, add_special_tokens=False)["input_ids"] + [eos]]
    blocks = prepared.train[0]
    stream = np.asarray(blocks.tokens)
    assert stream.tolist() == expected  # every document, in order, each followed by one EOS
    assert (stream == eos).sum() == len(docs)
    assert len(blocks) == (len(expected) - 1) // 16
    for i in range(len(blocks)):  # inputs are tokens [16i, 16i+16), targets one further: each token a target once
        assert blocks[i].tolist() == expected[16 * i : 16 * i + 17]
    assert blocks[1][0] == blocks[0][-1]
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_excluded_documents_are_left_out_of_training_validation_and_the_tokenizer(tmp_path, corpus_dir):
    """`exclude` (the study's evaluation pages) drops documents by name when the cached text is tokenised: the text
    is not read again, and the tokens, the tokenizer and the counts change with it."""
    spec = {"name": "en", "path": str(corpus_dir / "en")}
    cfg = CorpusConfig(corpora=[CorpusSpec(**spec)], seq_len=16, val_fraction=0.1, cache_dir=str(tmp_path))
    whole = corpus.prepare(cfg, TokenizerConfig(vocab_size=300), None)
    text_dir = next((tmp_path / "text").glob("en-*"))
    names = [json.loads(line)["name"] for line in (text_dir / "train.jsonl").read_text().splitlines()]
    gone = names[:3]
    exclude = [gone[0], gone[1][:-4] + "*"]  # a name, and a glob pattern
    cut = CorpusConfig(
        corpora=[CorpusSpec(**spec, exclude=exclude)], seq_len=16, val_fraction=0.1, cache_dir=str(tmp_path)
    )
    part = corpus.prepare(cut, TokenizerConfig(vocab_size=300), None)
    assert len(list((tmp_path / "text").glob("en-*"))) == 1  # one text cache: nothing was rendered again
    kept = [t for n, t in zip(names, corpus.read_texts(text_dir, "train"), strict=True) if n not in gone[:2]]
    tok, eos = part.tokenizer, part.tokenizer.eos_token_id
    assert np.asarray(part.train[0].tokens).tolist() == [
        i for d in kept for i in tok(d, add_special_tokens=False)["input_ids"] + [eos]
    ]
    assert part.meta[0]["excluded_documents"] == 2 and part.summary()[0]["excluded_documents"] == 2
    assert part.meta[0]["train_tokens"] < whole.meta[0]["train_tokens"]
    assert tok.backend_tokenizer.to_str() != whole.tokenizer.backend_tokenizer.to_str()  # trained without them


def test_validation_documents_are_chosen_by_name_and_never_trained_on(tmp_path, corpus_dir):
    spec = CorpusSpec(name="en", path=str(corpus_dir / "en"))
    dirs = [
        corpus.extract_text(spec, CorpusConfig(corpora=[spec], val_fraction=0.2, cache_dir=str(tmp_path / k)))
        for k in ("a", "b")
    ]
    names = [
        {s: {json.loads(x)["name"] for x in (d / f"{s}.jsonl").read_text().splitlines()} for s in ("train", "val")}
        for d in dirs
    ]
    assert names[0] == names[1] and names[0]["val"]  # the same held-out documents in every run
    assert not names[0]["train"] & names[0]["val"]
    assert len(names[0]["train"]) + len(names[0]["val"]) == len(list((corpus_dir / "en").glob("*.txt")))


def test_the_mixture_follows_weights_covers_each_epoch_and_restores_exactly():
    mix = corpus.Mixture([50, 10], [0.75, 0.25], seed=3)
    drawn = [p for step in range(40) for p in mix.draw(step, 10)]
    share = sum(c == 1 for c, _ in drawn) / len(drawn)
    assert 0.18 < share < 0.32
    first_epoch = [i for c, i in drawn if c == 0][:50]
    assert sorted(first_epoch) == list(range(50))  # a permutation: every block once per epoch
    state = mix.state_dict()
    after = [mix.draw(step, 10) for step in range(40, 45)]
    again = corpus.Mixture([50, 10], [0.75, 0.25], seed=3)
    again.load_state_dict(state)
    assert [again.draw(step, 10) for step in range(40, 45)] == after


def test_a_missing_corpus_names_the_path(tmp_path):
    cfg = CorpusConfig(
        corpora=[CorpusSpec(name="en", path=str(tmp_path / "nowhere" / "*.txt"))], cache_dir=str(tmp_path)
    )
    with pytest.raises(DataError, match=r"corpus 'en': no files at '.*nowhere/\*\.txt'"):
        corpus.prepare(cfg, TokenizerConfig(vocab_size=300), None)
    man = CorpusConfig(
        corpora=[CorpusSpec(name="ja", path=str(tmp_path / "man/ja/man1/*"), format="man")], cache_dir=str(tmp_path)
    )
    with pytest.raises(DataError, match="apt-get install manpages manpages-ja"):
        corpus.prepare(man, TokenizerConfig(vocab_size=300), None)


def test_an_empty_corpus_fails_with_a_clear_message(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text("  \n\n" if i else "")
    cfg = CorpusConfig(corpora=[CorpusSpec(name="notes", path=str(tmp_path / "docs"))], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"corpus 'notes' .* has 3 non-alias document\(s\), 3 of them empty"):
        corpus.prepare(cfg, TokenizerConfig(vocab_size=300), None)


def test_a_record_without_text_names_the_file_and_record(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"text": "also fine"}, {"body": "no text field"}])
    cfg = CorpusConfig(corpora=[CorpusSpec(name="c", path=str(path))], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"corpus 'c', .*c\.jsonl record 2: expected a string field 'text'"):
        corpus.prepare(cfg, TokenizerConfig(vocab_size=300), None)
    assert not list((tmp_path / "cache" / "text").iterdir())  # no half-written cache left behind


def test_a_corpus_smaller_than_one_block_says_what_to_change(tmp_path, corpus_dir):
    cfg = CorpusConfig(
        corpora=[CorpusSpec(name="ja", path=str(corpus_dir / "ja.jsonl"))], seq_len=100_000, cache_dir=str(tmp_path)
    )
    with pytest.raises(DataError, match=r"fewer than one block of data.seq_len\+1 = 100001.*lower data.seq_len"):
        corpus.prepare(cfg, TokenizerConfig(vocab_size=300), None)


@pytest.mark.skipif(
    not list(Path("/usr/share/man/man1").glob("ls.1*")) or not shutil.which("groff"),
    reason="needs English manual pages and groff (apt-get install manpages groff-base)",
)
def test_manual_pages_render_to_plain_text():
    page = corpus.render_man(next(Path("/usr/share/man/man1").glob("ls.1*")))
    assert "list directory contents" in page and "\\f" not in page and ".TH" not in page
    assert not page.splitlines()[0].startswith("LS(1)")  # running header dropped


def test_alias_manual_pages_are_skipped_and_counted(tmp_path):
    (tmp_path / "man1").mkdir()
    (tmp_path / "man1" / "alias.1").write_text(".so man1/real.1\n")
    assert corpus.render_man(tmp_path / "man1" / "alias.1") is None


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def test_mfu_counts_tinyllamas_flops():
    """TinyLlama reports 24k tokens/s per A100-40G at 56% MFU: our FLOP count must give the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.throughput import flops_per_token

    cfg = load(["recipe=tinyllama-1b"])
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=cfg.model.hidden_size,
        intermediate_size=cfg.model.intermediate_size,
        num_hidden_layers=cfg.model.num_layers,
        num_attention_heads=cfg.model.num_heads,
        num_key_value_heads=cfg.model.num_kv_heads,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert 1.0e9 < model.num_parameters() < 1.2e9
    mfu = 24_000 * flops_per_token(model, cfg.data.seq_len) / 312e12
    assert mfu == pytest.approx(0.56, abs=0.01)
    assert cfg.training.global_batch_tokens == 2**21 and cfg.data.seq_len == 2048


def test_one_flops_formula_counts_trained_weights_at_six_and_frozen_at_four():
    """SFT's LoRA (a frozen base) and pretraining (all trained) count with the same formula, so their MFU compare."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.throughput import flops_per_token

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    matmul = model.num_parameters() - 64 * 32  # all but the input embedding (a lookup)
    attention = 12 * 2 * 32 * 128
    assert flops_per_token(model, 128) == 6 * matmul + attention
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    assert flops_per_token(model, 128) == 6 * 64 * 32 + 4 * (matmul - 64 * 32) + attention


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory):
    """One pretraining run on the small corpus, shared by the tests that read its output."""
    from finetune import pretrain

    out = tmp_path_factory.mktemp("pretrain") / "run"
    metrics = pretrain.train(load(pretrain_args(corpus_dir, out)))
    return out, metrics


def test_pretraining_lowers_validation_loss_and_writes_a_loadable_model(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, metrics = trained
    assert metrics["final_val"]["val_loss"] < metrics["initial_val"]["val_loss"] - 0.8  # perplexity / 2.2
    assert metrics["initial_val"]["val_loss"] == pytest.approx(math.log(512), abs=0.3)  # starts near uniform
    assert metrics["tokens_per_s"] > 0 and metrics["peak_mem_gb"] > 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 33))
    assert {"lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "tokens"} <= set(steps[0])
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 16, 32]
    assert max(r["lr"] for r in steps) == pytest.approx(1e-2)
    assert steps[-1]["lr"] == pytest.approx(1e-3, rel=0.2)  # cosine down to 10% of the peak

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["base"] is None and lineage["steps"] == 32
    assert lineage["tokens_seen"] == 32 * 256 == sum(c["tokens_seen"] for c in lineage["corpora"])
    assert [c["name"] for c in lineage["corpora"]] == ["en", "ja"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-24", "checkpoint-32"]


# Pinned numerics (torchtune's regression tests): the fixed 2-layer fp32 run's validation loss before training and
# its first losses. A change that moves them changes what the loop computes: if that is meant, re-pin them and say
# why in the commit message.
PINNED_INITIAL_VAL = 6.2731
PINNED_LOSSES = [6.2587, 6.2335, 6.2186, 6.0795]


def test_pinned_losses_of_the_2_layer_fp32_run(trained):
    out, metrics = trained
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r][:4]
    assert metrics["initial_val"]["val_loss"] == pytest.approx(PINNED_INITIAL_VAL, abs=1e-4)
    assert losses == pytest.approx(PINNED_LOSSES, abs=1e-4)


def test_gradient_accumulation_gives_the_same_step_as_one_big_batch(corpus_dir, tmp_path):
    from finetune import pretrain

    losses = []
    for micro in (8, 2):  # 8 x 1 and 2 x 4: the same 8 blocks per step
        out = tmp_path / f"m{micro}"
        pretrain.train(
            load(
                pretrain_args(
                    corpus_dir,
                    out,
                    f"training.micro_batch_size={micro}",
                    "training.max_steps=3",
                    "training.eval_every=100",
                )
            )
        )
        losses.append([json.loads(r)["loss"] for r in (out / "log.jsonl").read_text().splitlines() if '"loss"' in r])
    assert losses[0] == pytest.approx(losses[1], abs=2e-4)


def test_a_second_run_into_the_same_folder_is_refused_without_resume(trained, corpus_dir):
    from finetune import pretrain

    out, _ = trained
    with pytest.raises(RecipeError, match="already holds checkpoints .*resume=true"):
        pretrain.train(load(pretrain_args(corpus_dir, out)))


def test_resume_refuses_changed_batch_settings(trained, corpus_dir, tmp_path):
    import shutil

    from finetune import pretrain

    out = tmp_path / "changed"
    shutil.copytree(trained[0] / "checkpoint-32", out / "checkpoint-32")
    with pytest.raises(RecipeError, match="training.global_batch_tokens was 256, now 512"):
        pretrain.train(
            load(
                pretrain_args(
                    corpus_dir, out, "resume=true", "training.global_batch_tokens=512", "training.max_steps=40"
                )
            )
        )


def _run(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "finetune" / "pretrain.py"), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_run_killed_mid_training_resumes_to_the_same_loss_and_weights(corpus_dir, tmp_path):
    from safetensors.torch import load_file

    steps = ["training.max_steps=40", "training.save_every=5", "training.eval_every=100"]
    straight = tmp_path / "straight"
    assert _run(pretrain_args(corpus_dir, straight, *steps)).wait() == 0

    killed = tmp_path / "killed"
    proc = _run(pretrain_args(corpus_dir, killed, *steps))
    deadline = time.time() + 120
    while not (killed / "checkpoint-10").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "config.json").exists(), "the run finished before it could be killed"
    done = [p.name for p in checkpoints.complete(killed)]
    assert done and int(done[-1].split("-")[1]) < 40

    resumed = _run(pretrain_args(corpus_dir, killed, *steps, "resume=true"))
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert f"resumed from {killed / done[-1]}" in output

    a, b = json.loads((straight / "metrics.json").read_text()), json.loads((killed / "metrics.json").read_text())
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], abs=1e-5)
    assert b["final_val"]["val_loss"] == pytest.approx(a["final_val"]["val_loss"], abs=1e-4)
    wa, wb = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    lineage = json.loads((killed / "lineage.json").read_text())
    assert lineage["tokens_seen"] == 40 * 256


def test_continued_pretraining_lowers_japanese_loss_and_records_its_lineage(trained, corpus_dir, tmp_path):
    from finetune import pretrain

    base, _ = trained
    out = tmp_path / "cpt"
    cfg = load(
        [
            "recipe=cpt-ja",
            f"model.base={base}",
            f"data.corpora=[{{name: ja, path: '{corpus_dir / 'ja.jsonl'}', weight: 0.8}}, "
            f"{{name: en, path: '{corpus_dir / 'en'}', weight: 0.2}}]",
            "data.seq_len=32",
            "data.val_fraction=0.1",
            f"data.cache_dir={base.parent / 'cache'}",
            f"training.output_dir={out}",
            "training.micro_batch_size=4",
            "training.global_batch_tokens=256",
            "training.max_steps=40",
            "training.learning_rate=2e-3",
            "training.warmup_steps=2",
            "training.eval_every=100",
            "training.eval_blocks=8",
        ]
    )
    metrics = pretrain.train(cfg)
    assert metrics["initial_val"]["val_loss/ja"] == pytest.approx(
        json.loads((base / "metrics.json").read_text())["final_val"]["val_loss/ja"], abs=1e-4
    )  # starts at the base
    assert metrics["final_val"]["val_loss/ja"] < metrics["initial_val"]["val_loss/ja"] - 0.1
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["base"] == str(base) and lineage["base_lineage"]["tokens_seen"] == 32 * 256
    assert lineage["tokenizer"] == str(base)
    assert {c["name"]: c["weight"] for c in lineage["corpora"]} == {"ja": 0.8, "en": 0.2}


def test_cli_reports_a_missing_corpus_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "finetune" / "pretrain.py"),
            "recipe=pretrain-tiny",
            f"data.corpora=[{{name: ja, path: '{tmp_path}/man/ja/man*/*', format: man}}]",
            f"data.cache_dir={tmp_path}/cache",
            f"training.output_dir={tmp_path}/out",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: corpus 'ja': no files at")
    assert "Traceback" not in proc.stderr


def test_an_sft_recipe_given_to_pretrain_says_which_script_it_is_for():
    with pytest.raises(
        RecipeError, match=r"'quickstart' is a recipe of the sft stage .*finetune/sft\.py recipe=quickstart"
    ):
        load(["recipe=quickstart"])


def test_fine_tuning_before_the_base_is_pretrained_says_what_to_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.sft", "recipe=quickstart", f"training.output_dir={tmp_path}/out"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: no tokenizer in 'outputs/pretrain-tiny' yet: it is what "
        "`accelerate launch finetune/pretrain.py recipe=pretrain-tiny` writes; run that first"
    )


def test_a_pretraining_run_stages_for_the_hub_as_a_full_model(trained):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    from finetune import hub
    from finetune.config.shared import HubConfig

    out, metrics = trained
    ((repo, folder),) = hub.stage(HubConfig(model_id="me/tiny-base"), out)
    assert repo == "me/tiny-base" and not any(p.name.startswith("checkpoint") for p in folder.iterdir())
    model, saved = AutoModelForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values(), strict=True))
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "pretrain" in card.data.tags
    assert card.data.language == ["en", "ja"]  # the corpora: en and ja
    assert f"{32 * 256:,}" in card.text and f"validation {metrics['final_val']['val_loss']:.4f}" in card.text
