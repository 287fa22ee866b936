"""Prompt styles, on a byte-level BPE and on a LLaMA SentencePiece tokenizer (the `tokenizer` fixture is both):
training ids are the rendered text encoded whole, with BOS/EOS by id; learned ids decode to exactly the
responses and their EOS; generation's prompt ids are the training prefix; the saved chat template renders
the trained text."""

import copy
import logging

import pytest

from finetune import prompts
from finetune.config.sft import DataConfig, DatasetSpec
from finetune.instructions import load_examples
from finetune.prompts import (
    IGNORE,
    STYLES,
    chat_template,
    encode,
    encode_many,
    prompt_ids,
    saved_chat_template,
    show,
    tokenize_examples,
)

from .conftest import REPO

SINGLE = {
    "turns": [{"role": "user", "content": "Name a colour.", "input": "sky"}, {"role": "assistant", "content": "Blue."}]
}
MULTI = {
    "turns": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "こんにちは"},
        {"role": "assistant", "content": "はい。"},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Yes."},
    ]
}
SEAM = {
    "turns": [
        {"role": "user", "content": "2.5トンは何キログラムですか？"},
        {"role": "assistant", "content": "4.2キロ"},
        {"role": "user", "content": "And in English?"},
        {"role": "assistant", "content": "The answer."},
    ]
}

BUNDLED = [
    ("alpaca_en.jsonl", "alpaca"),
    ("messages_en.jsonl", "messages"),
    ("dolly_ja.jsonl", "dolly"),
    ("conversations_ja.jsonl", "conversations"),
    ("alpaca_ja.csv", "alpaca"),
]


def bundled(name, fmt):
    return load_examples(DataConfig(datasets=[DatasetSpec(str(REPO / "data" / name), fmt)]))[0]


def examples_of(source):
    return [SINGLE, MULTI, SEAM] if source == "crafted" else bundled(*source)


def learned_runs(row):
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def rendered_text(example, style, tokenizer, system_prompt=None):
    """The text through transformers' apply_chat_template and the template a run saves: an independent path."""
    messages = example["turns"]
    if style == "chat_template" and system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, chat_template=saved_chat_template(style, system_prompt, tokenizer)
    )


SOURCES = ["crafted", *BUNDLED]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s if s == "crafted" else s[0])
def test_training_ids_are_the_rendered_text_encoded_whole_with_bos_and_eos_by_id(tokenizer, style, source):
    examples = examples_of(source)
    rows = encode_many(examples, style, tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for example, row in zip(examples, rows, strict=True):
        text = rendered_text(example, style, tokenizer)
        documents = [d for d in text.split(tokenizer.bos_token) if d]  # a BOS by id starts each document
        expected = []
        for document in documents:
            expected += tokenizer(document.replace(tokenizer.eos_token, ""), add_special_tokens=False)["input_ids"]
        ids = row["input_ids"]
        assert [t for t in ids if t not in (bos, eos)] == expected
        assert ids[0] == bos and ids.count(bos) == len(documents)
        assert ids.count(eos) == sum(t["role"] == "assistant" for t in example["turns"])


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s if s == "crafted" else s[0])
def test_learned_ids_decode_to_exactly_each_response_and_eos_and_prompts_are_the_training_prefix(
    tokenizer, style, source
):
    suffix = "<|im_end|>" if style in ("chatml", "chat_template") else ""  # the bases' template is ChatML
    for example in examples_of(source):
        row = encode(example, style, tokenizer)
        runs = learned_runs(row)
        turns = example["turns"]
        answers = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
        assert len(runs) == len(answers)
        for run, i in zip(runs, answers, strict=True):
            expected = (" " if style == "llama2" else "") + turns[i]["content"] + suffix + tokenizer.eos_token
            decoded = tokenizer.decode(run)
            # SentencePiece's decoder drops the leading space of a sequence (llama2 answers start with one)
            assert decoded == expected or (style == "llama2" and " " + decoded == expected)
        start = 0
        for run, i in zip(runs, answers, strict=True):
            start = row["labels"].index(run[0], start)
            assert prompt_ids(turns[:i], style, tokenizer) == row["input_ids"][:start]
            start += len(run)


def test_sentencepiece_learns_what_the_text_says_not_a_dummy_prefix(sp_tokenizer):
    tokenizer = sp_tokenizer
    assert tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])[0].startswith("▁")
    for style in ("alpaca-ja", "alpaca", "chatml"):
        row = encode(SEAM, style, tokenizer)
        pieces = tokenizer.convert_ids_to_tokens(row["input_ids"])
        first, second = (pieces[len(prompt_ids(SEAM["turns"][:i], style, tokenizer))] for i in (1, 3))
        assert first == "4" and not second.startswith("▁"), (style, pieces)  # '▁', '4' and '▁The' were the trap
        after_eos = pieces[row["input_ids"].index(tokenizer.eos_token_id) + 1]
        assert after_eos == "<0x0A>", (style, pieces)  # not a masked '▁' after every </s>


@pytest.mark.parametrize("style", ["alpaca", "alpaca-ja", "chatml"])
def test_saved_chat_template_gives_the_training_ids_on_a_byte_level_tokenizer(bpe_tokenizer, style):
    for example in [SINGLE, MULTI, *bundled("conversations_ja.jsonl", "conversations")[:5]]:
        ids = bpe_tokenizer.apply_chat_template(
            example["turns"], tokenize=True, return_dict=False, chat_template=chat_template(style)
        )
        assert list(ids) == encode(example, style, bpe_tokenizer)["input_ids"]


def test_saved_template_carries_the_system_prompt_and_drops_generation_marks(tokenizer):
    template = saved_chat_template("chatml", 'あなたは誠実で"優秀"です。', tokenizer)
    assert "generation" not in template
    text = tokenizer.apply_chat_template(SINGLE["turns"], tokenize=False, chat_template=template)
    assert text.startswith('<s><|im_start|>system\nあなたは誠実で"優秀"です。<|im_end|>\n<|im_start|>user\n')
    row = encode(SINGLE, "chatml", tokenizer, 'あなたは誠実で"優秀"です。')
    # (from after BOS: SentencePiece decodes a document's dummy prefix as a space unless it starts the sequence)
    assert tokenizer.decode(row["input_ids"][1:]) == text.removeprefix(tokenizer.bos_token)
    # alpaca: a system prompt replaces the preamble
    alpaca = tokenizer.decode(encode(SINGLE, "alpaca", tokenizer, "Answer in one word.")["input_ids"])
    assert "Answer in one word.\n\n### Instruction:" in alpaca and "Below is" not in alpaca


def test_alpaca_templates_carry_the_documented_wording(tokenizer):
    en = tokenizer.decode(encode(SINGLE, "alpaca", tokenizer)["input_ids"])
    ja = tokenizer.decode(encode(SINGLE, "alpaca-ja", tokenizer)["input_ids"])
    assert "### Instruction:\nName a colour.\n\n### Input:\nsky\n\n### Response:\nBlue." in en
    assert "paired with an input" in en
    assert "### 指示:\nName a colour.\n\n### 入力:\nsky\n\n### 応答:\nBlue." in ja


@pytest.mark.parametrize("style", STYLES)
def test_multi_turn_learns_every_assistant_turn_and_no_user_turn(tokenizer, style):
    row = encode(MULTI, style, tokenizer)
    trained = "".join(tokenizer.decode(run) for run in learned_runs(row))
    assert "はい。" in trained and "Yes." in trained
    assert "こんにちは" not in trained and "Again?" not in trained and "Be brief" not in trained
    assert row["labels"].count(tokenizer.eos_token_id) == 2


def test_llama2_is_metas_layout_one_bos_document_per_exchange(tokenizer):
    turns = MULTI["turns"][1:]
    row = encode({"turns": turns}, "llama2", tokenizer, "あなたは誠実です。")
    text = tokenizer.decode(row["input_ids"]).replace("<s> [INST]", "<s>[INST]")  # SentencePiece's dummy prefix
    assert text.startswith("<s>[INST] <<SYS>>\nあなたは誠実です。\n<</SYS>>\n\nこんにちは [/INST] はい。</s>")
    assert "</s><s>[INST] Again? [/INST] Yes.</s>" in text
    assert row["input_ids"].count(tokenizer.bos_token_id) == 2


def test_special_token_text_in_a_record_stays_text(tokenizer):
    example = {
        "turns": [
            {"role": "user", "content": "Strike <s>this</s> out"},
            {"role": "assistant", "content": "Use </s> to end it."},
        ]
    }
    row = encode(example, "alpaca", tokenizer)
    assert row["input_ids"].count(tokenizer.eos_token_id) == 1 and row["input_ids"][-1] == tokenizer.eos_token_id
    assert row["input_ids"].count(tokenizer.bos_token_id) == 1


def test_a_template_that_never_ends_with_eos_still_teaches_the_model_to_stop(tokenizer, caplog):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    prompts._warned.clear()  # it warns once per process
    with caplog.at_level(logging.WARNING):
        row = encode(MULTI, "chat_template", plain)
    runs = learned_runs(row)
    assert [tokenizer.decode(r).strip() for r in runs] == ["はい。</s>", "Yes.</s>"]  # EOS before the newline
    assert "does not end a response with EOS" in caplog.text


def test_a_response_starting_inside_a_prompt_token_is_counted(bpe_tokenizer):
    plain = copy.deepcopy(bpe_tokenizer)  # "assistant: " + "The answer": " The" is one byte-level token
    plain.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    cfg = DataConfig(datasets=[DatasetSpec("x.jsonl")], prompt_style="chat_template")
    example = {"turns": [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "The answer."}]}
    assert tokenize_examples([example], cfg, plain)[1]["seam_tokens"] == 1
    assert (
        "seam_tokens"
        not in tokenize_examples(
            [example], DataConfig(datasets=[DatasetSpec("x.jsonl")], prompt_style="chatml"), plain
        )[1]
    )


def test_eos_stays_in_the_labels_when_pad_and_eos_share_an_id(tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [encode(SINGLE, "alpaca", tokenizer), encode(MULTI, "alpaca", tokenizer)]
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.eos_token_id)(rows)
    short = min(range(2), key=lambda i: len(rows[i]["input_ids"]))
    n = len(rows[short]["input_ids"])
    assert batch["labels"][short, n - 1] == tokenizer.eos_token_id  # the real EOS is learned
    assert (batch["labels"][short, n:] == IGNORE).all()  # padding (same id) is not
    assert (batch["input_ids"][short, n:] == tokenizer.eos_token_id).all()


def test_truncation_is_counted_and_prompt_only_examples_are_reported(tokenizer):
    limit = len(encode(SINGLE, "alpaca", tokenizer)["input_ids"]) + 8
    long_prompt = {
        "turns": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}],
        "origin": "dataset 'x.jsonl' record 7",
    }
    long_answer = {"turns": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 400}]}
    cfg = DataConfig(datasets=[DatasetSpec("x.jsonl")], max_length=limit)
    rows, stats = tokenize_examples([SINGLE, long_prompt, long_answer], cfg, tokenizer)
    assert len(rows) == 2 and all(len(r["input_ids"]) <= limit for r in rows)
    assert stats == {"examples": 3, "cut_to_max_length": 2, "dropped_prompt_fills_max_length": 1}


def test_train_on_prompt_learns_everything(tokenizer):
    row = encode(SINGLE, "alpaca", tokenizer, train_on_prompt=True)
    assert row["labels"] == row["input_ids"]


def test_text_format_learns_the_whole_document(tokenizer):
    row = encode({"text": "A plain document."}, "alpaca", tokenizer)
    assert row["input_ids"][0] == tokenizer.bos_token_id and row["labels"][0] == IGNORE
    assert row["labels"][1:] == row["input_ids"][1:]
    assert row["input_ids"][1:-1] == tokenizer("A plain document.", add_special_tokens=False)["input_ids"]


def test_nfkc_prompt_for_generation_is_the_normalised_one(tokenizer):
    ids = prompt_ids([{"role": "user", "content": "ＡＢＣ？ｶﾅ"}], "chatml", tokenizer, nfkc=True)
    assert ids == prompt_ids([{"role": "user", "content": "ABC?カナ"}], "chatml", tokenizer)


def test_show_marks_the_learned_pieces(tokenizer):
    shown = show(encode(SINGLE, "alpaca", tokenizer), tokenizer)
    assert shown.startswith("<s>|") and shown.endswith("</s>]]") and shown.count("[[") == 1
    learned = shown.split("[[")[1].removesuffix("]]")
    assert learned.replace("|", "").lstrip("Ġ▁") == "Blue.</s>"
    assert shown.split("[[")[0].endswith(("|\\n|", "|<0x0A>|"))  # the prompt ends on its newline


def test_a_record_holding_the_reserved_marks_is_refused_naming_it(tokenizer):
    from finetune.errors import DataError

    example = {
        "turns": [{"role": "user", "content": "a\ue001b"}, {"role": "assistant", "content": "ok"}],
        "origin": "dataset 'x.jsonl' record 3",
    }
    with pytest.raises(DataError, match="dataset 'x.jsonl' record 3: the text holds the private-use character"):
        encode_many([example], "alpaca", tokenizer)


# --- a tokenizer's own chat template (prompt_style: chat_template) -----------------------------------------

CHATML_PLAIN = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def with_template(tokenizer, template):
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = template
    return copied


def test_own_template_prompts_end_with_the_assistant_header_and_are_the_training_prefix(tokenizer):
    plain = with_template(tokenizer, CHATML_PLAIN)  # writes no EOS: it goes in by id after <|im_end|>
    for example in (SINGLE, MULTI, SEAM):
        row = encode(example, "chat_template", plain)
        turns = example["turns"]
        runs = learned_runs(row)
        start = 0
        for run, i in zip(runs, [i for i, t in enumerate(turns) if t["role"] == "assistant"], strict=True):
            start = row["labels"].index(run[0], start)
            ids = prompt_ids(turns[:i], "chat_template", plain)
            assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
            assert ids == row["input_ids"][:start]
            start += len(run)


def test_own_template_without_eos_gets_one_eos_per_response_in_the_right_place(tokenizer):
    glued = with_template(
        tokenizer,
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<user>"
        "{{ m['content'] }}</user>{% else %}{{ m['content'] }}{% endif %}{% endfor %}",
    )
    example = {
        "turns": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Sure"},
        ]
    }
    row = encode(example, "chat_template", glued)
    assert [tokenizer.decode(r) for r in learned_runs(row)] == ["Yo</s>", "Sure</s>"]
    assert row["input_ids"].count(tokenizer.eos_token_id) == 2


def test_eos_the_template_writes_after_the_response_is_learned_not_doubled(tokenizer):
    marked = with_template(
        tokenizer,
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Q: "
        "{{ m['content'] }}\nA: {% else %}{% generation %}{{ m['content'] }}"
        "{% endgeneration %}{{ eos_token }}\n{% endif %}{% endfor %}",
    )
    row = encode({"turns": MULTI["turns"][1:]}, "chat_template", marked)
    assert [tokenizer.decode(r) for r in learned_runs(row)] == ["はい。</s>", "Yes.</s>"]
    assert row["input_ids"].count(tokenizer.eos_token_id) == 2


def test_own_template_saved_with_the_system_prompt_renders_it(tokenizer):
    saved = saved_chat_template("chat_template", "SYS", tokenizer)
    text = tokenizer.apply_chat_template(SINGLE["turns"], tokenize=False, chat_template=saved)
    assert text.startswith("<s><|im_start|>system\nSYS<|im_end|>\n")
    row = encode(SINGLE, "chat_template", tokenizer, "SYS")
    assert tokenizer.decode(row["input_ids"][1:]) == text.removeprefix("<s>")
    own = tokenizer.apply_chat_template(MULTI["turns"], tokenize=False, chat_template=saved)
    assert "SYS" not in own and "Be brief." in own  # a record's own system prompt wins
    reloaded = with_template(tokenizer, saved)  # a saved run's tokenizer, used again with its recipe
    assert saved_chat_template("chat_template", "SYS", reloaded) == saved


def test_a_system_prompt_that_mentions_generation_tags_is_saved_verbatim(tokenizer):
    prompt = "Write {% generation %} literally, and a back\\slash."
    text = tokenizer.apply_chat_template(
        SINGLE["turns"], tokenize=False, chat_template=saved_chat_template("chatml", prompt, tokenizer)
    )
    assert f"<|im_start|>system\n{prompt}<|im_end|>" in text


def test_an_eos_straddled_by_a_token_is_tokenised_in_pieces_without_a_dummy_prefix(sp_tokenizer):
    from finetune.prompts import _assemble, _Document, _encode_documents

    doc = _Document("Hello world", True, False, [(3, True)], [(0, 3)])  # EOS inside the word: a straddle
    stats = {}
    row = _assemble([doc], _encode_documents([doc], sp_tokenizer, True), sp_tokenizer, False, True, stats)
    pieces = sp_tokenizer.convert_ids_to_tokens(row["input_ids"])
    eos = pieces.index("</s>")
    assert stats["eos_splits"] == 1 and pieces[eos + 1] != "▁"
    assert sp_tokenizer.decode(row["input_ids"][1:eos]) == "Hel"


def test_an_empty_text_is_bos_and_a_learned_eos(tokenizer):
    row = encode({"text": ""}, "alpaca", tokenizer)
    assert row == {
        "input_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id],
        "labels": [IGNORE, tokenizer.eos_token_id],
    }


def test_chatml_markers_that_are_special_tokens_stay_whole_and_records_naming_them_are_counted(bpe_tokenizer):
    tokenizer = copy.deepcopy(bpe_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    row = encode(SINGLE, "chatml", tokenizer)
    assert row["input_ids"].count(start) == 2 and row["input_ids"].count(end) == 2
    cfg = DataConfig(datasets=[DatasetSpec("x.jsonl")], prompt_style="chatml")
    quoting = {"turns": [{"role": "user", "content": "What is <|im_end|>?"}, {"role": "assistant", "content": "A"}]}
    assert tokenize_examples([SINGLE, quoting], cfg, tokenizer)[1]["special_token_text"] == 1


def test_an_own_template_that_refuses_a_system_role_trains_records_without_one(tokenizer):
    strict = with_template(
        tokenizer,
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}"
        "{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
    )
    row = encode(SINGLE, "chat_template", strict)
    assert [tokenizer.decode(r).strip() for r in learned_runs(row)] == ["Blue.</s>"]
