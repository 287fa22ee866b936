"""Prompt styles: loss only on responses, EOS learned (even when pad == eos), generation sees the same prompt."""

import pytest

from finetune.prompts import IGNORE, encode, prompt_ids, segments_for, tokenize_examples
from finetune.recipe import DataConfig, DatasetSpec

SINGLE = {"turns": [{"role": "user", "content": "Name a colour.", "input": "sky"},
                    {"role": "assistant", "content": "Blue."}]}
MULTI = {"turns": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "はい。"},
                   {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}]}


def trained_text(tokenizer, row):
    return tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE])


@pytest.mark.parametrize("style", ["alpaca", "alpaca-ja", "llama2", "chatml", "chat_template"])
def test_labels_are_masked_up_to_the_response_and_end_with_eos(tokenizer, style):
    row = encode(segments_for(SINGLE, style, tokenizer), tokenizer)
    labels, ids = row["labels"], row["input_ids"]
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert all(lab == IGNORE for lab in labels[:first])
    assert labels[first:] == ids[first:]
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    assert trained_text(tokenizer, row).startswith(("Blue.", " Blue."))
    # what generation is fed is exactly the masked prefix
    assert prompt_ids(SINGLE["turns"][:1], style, tokenizer) == ids[:first]


def test_alpaca_templates_carry_the_documented_wording(tokenizer):
    en = tokenizer.decode(encode(segments_for(SINGLE, "alpaca", tokenizer), tokenizer)["input_ids"])
    ja = tokenizer.decode(encode(segments_for(SINGLE, "alpaca-ja", tokenizer), tokenizer)["input_ids"])
    assert "### Instruction:\nName a colour.\n\n### Input:\nsky\n\n### Response:\nBlue." in en
    assert "paired with an input" in en
    assert "### 指示:\nName a colour.\n\n### 入力:\nsky\n\n### 応答:\nBlue." in ja


@pytest.mark.parametrize("style", ["alpaca", "llama2", "chatml", "chat_template"])
def test_multi_turn_learns_every_assistant_turn_and_no_user_turn(tokenizer, style):
    row = encode(segments_for(MULTI, style, tokenizer, system_prompt=None), tokenizer)
    trained = trained_text(tokenizer, row)
    assert "はい。" in trained and "Yes." in trained
    assert "こんにちは" not in trained and "Again?" not in trained and "Be brief" not in trained
    assert row["labels"].count(tokenizer.eos_token_id) == 2


def test_llama2_puts_the_system_prompt_in_the_first_turn(tokenizer):
    turns = MULTI["turns"][1:]
    text = tokenizer.decode(encode(segments_for({"turns": turns}, "llama2", tokenizer, "あなたは誠実です。"),
                                   tokenizer)["input_ids"])
    assert "[INST] <<SYS>>\nあなたは誠実です。\n<</SYS>>\n\nこんにちは [/INST] はい。" in text


def test_eos_stays_in_the_labels_when_pad_and_eos_share_an_id(tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [encode(segments_for(SINGLE, "alpaca", tokenizer), tokenizer),
            encode(segments_for(MULTI, "alpaca", tokenizer), tokenizer)]
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.eos_token_id)(rows)
    short = min(range(2), key=lambda i: len(rows[i]["input_ids"]))
    n = len(rows[short]["input_ids"])
    assert batch["labels"][short, n - 1] == tokenizer.eos_token_id  # the real EOS is learned
    assert (batch["labels"][short, n:] == IGNORE).all()  # padding (same id) is not
    assert (batch["input_ids"][short, n:] == tokenizer.eos_token_id).all()


def test_truncation_is_counted_and_prompt_only_examples_are_reported(tokenizer):
    limit = len(encode(segments_for(SINGLE, "alpaca", tokenizer), tokenizer)["input_ids"]) + 8
    long_prompt = {"turns": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    long_answer = {"turns": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 400}]}
    cfg = DataConfig(datasets=[DatasetSpec("x.jsonl")], max_length=limit)
    rows, stats = tokenize_examples([SINGLE, long_prompt, long_answer], cfg, tokenizer)
    assert len(rows) == 2 and all(len(r["input_ids"]) <= limit for r in rows)
    assert stats == {"examples": 3, "cut_to_max_length": 2, "dropped_prompt_fills_max_length": 1}


def test_train_on_prompt_learns_everything_but_bos(tokenizer):
    row = encode(segments_for(SINGLE, "alpaca", tokenizer), tokenizer, train_on_prompt=True)
    assert row["labels"] == row["input_ids"]


def test_text_format_learns_the_whole_document(tokenizer):
    row = encode(segments_for({"text": "A plain document."}, "alpaca", tokenizer), tokenizer)
    assert row["input_ids"][0] == tokenizer.bos_token_id and row["labels"][0] == IGNORE
    assert row["labels"][1:] == row["input_ids"][1:]
