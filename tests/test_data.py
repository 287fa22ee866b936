"""Dataset specs: every format and file type loads; bad records fail naming dataset, index and field."""

import csv
import json
import logging

import pytest

from finetune.config.sft import DataConfig, DatasetSpec
from finetune.errors import DataError
from finetune.instructions import load_examples, to_example

from .conftest import REPO, write_jsonl


def cfg(*specs, **kw):
    return DataConfig(datasets=list(specs), **kw)


def test_alpaca_dolly_and_chat_formats_become_turns(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "1 2", "output": "3"}])
    d = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "要約して", "context": "長い文", "response": "短い文"}])
    c = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                ]
            }
        ],
    )
    m = write_jsonl(
        tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    )
    t = tmp_path / "t.txt"
    t.write_text("First document.\nStill first.\n\nSecond document.\n")
    train, _ = load_examples(
        cfg(
            DatasetSpec(str(a), "alpaca"),
            DatasetSpec(str(d), "dolly"),
            DatasetSpec(str(c), "conversations"),
            DatasetSpec(str(m), "messages"),
            DatasetSpec(str(t), "text"),
        )
    )
    assert len(train) == 6
    train = [{k: v for k, v in e.items() if k != "origin"} for e in train]
    assert {
        "turns": [{"role": "user", "content": "Add.", "input": "1 2"}, {"role": "assistant", "content": "3"}]
    } in train
    assert {
        "turns": [
            {"role": "user", "content": "要約して", "input": "長い文"},
            {"role": "assistant", "content": "短い文"},
        ]
    } in train
    assert {
        "turns": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    } in train
    assert sum("text" in e for e in train) == 2  # paragraphs are documents


def test_csv_parquet_and_json_files_load(tmp_path):
    rows = [{"instruction": f"i{i}", "input": "", "output": f"o{i}"} for i in range(3)]
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    for name in ("a.csv", "a.json", "a.parquet"):
        train, _ = load_examples(cfg(DatasetSpec(str(tmp_path / name), "alpaca")))
        assert sorted(e["turns"][1]["content"] for e in train) == ["o0", "o1", "o2"], name


def test_column_mapping(tmp_path):
    f = write_jsonl(tmp_path / "k.jsonl", [{"instruction": "指示", "input": "", "output": "応答"}])
    train, _ = load_examples(cfg(DatasetSpec(str(f), "dolly", columns={"context": "input", "response": "output"})))
    assert train[0]["turns"][1]["content"] == "応答"


def test_malformed_record_names_dataset_index_and_field(tmp_path):
    records = [{"instruction": "ok", "input": "", "output": "fine"}] * 3
    records.append({"instruction": "broken", "input": ""})
    f = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError, match=r"dataset '.*bad.jsonl': record 3 has no 'output'.*instruction, output"):
        load_examples(cfg(DatasetSpec(str(f), "alpaca")))


def test_malformed_turn_names_the_turn(tmp_path):
    f = write_jsonl(
        tmp_path / "c.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "?"}]}]
    )
    with pytest.raises(DataError, match=r"record 0, turn 1: unknown from 'bot'"):
        load_examples(cfg(DatasetSpec(str(f), "conversations")))


def test_empty_and_missing_datasets_fail_clearly(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_examples(cfg(DatasetSpec(str(empty), "alpaca")))
    with pytest.raises(DataError, match="file not found"):
        load_examples(cfg(DatasetSpec(str(tmp_path / "nope.jsonl"), "alpaca")))


def test_max_samples_weights_and_held_out_split(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "y"} for i in range(10)])
    train, held = load_examples(
        cfg(
            DatasetSpec(str(a), "alpaca", max_samples=8, weight=0.5),
            DatasetSpec(str(b), "alpaca", weight=2.0),
            eval_size=3,
            seed=1,
        )
    )
    names = lambda ex: [e["turns"][0]["content"] for e in ex]  # noqa: E731
    held_names = set(names(held))
    assert len(held) == 3 and not held_names & set(names(train))
    n_a = sum(n.startswith("a") for n in names(train))
    n_b = sum(n.startswith("b") for n in names(train))
    held_a = sum(n.startswith("a") for n in held_names)
    assert n_a == round(0.5 * (8 - held_a))
    assert n_b == 2 * (10 - (3 - held_a))
    again, _ = load_examples(
        cfg(
            DatasetSpec(str(a), "alpaca", max_samples=8, weight=0.5),
            DatasetSpec(str(b), "alpaca", weight=2.0),
            eval_size=3,
            seed=1,
        )
    )
    assert names(again) == names(train)  # deterministic for a seed


def test_nfkc_normalises_full_width_and_half_width_kana(tmp_path):
    f = write_jsonl(tmp_path / "j.jsonl", [{"instruction": "ＡＢＣ１２３", "output": "ｶﾀｶﾅ"}])
    train, _ = load_examples(cfg(DatasetSpec(str(f), "alpaca"), nfkc=True))
    assert train[0]["turns"][0]["content"] == "ABC123" and train[0]["turns"][1]["content"] == "カタカナ"


def test_to_example_requires_an_assistant_turn():
    with pytest.raises(DataError, match="record 7: has no assistant turn"):
        to_example({"messages": [{"role": "user", "content": "hi"}]}, DatasetSpec("x.jsonl", "messages"), 7)


def test_every_example_knows_its_dataset_and_record(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(5)])
    train, _ = load_examples(cfg(DatasetSpec(str(f), "alpaca"), nfkc=True))
    assert sorted(e["origin"] for e in train) == [f"dataset '{f}' record {i}" for i in range(5)]
    assert all(e["turns"][0]["content"] == "i" + e["origin"][-1] for e in train)


def test_a_bad_turn_order_names_the_file_and_its_record(tmp_path):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    bad = {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "human", "value": "Hello?"},
            {"from": "gpt", "value": "Yes"},
        ]
    }
    f = write_jsonl(tmp_path / "chats.jsonl", [good] * 13 + [bad] + [good] * 5)
    with pytest.raises(
        DataError,
        match=r"dataset '.*chats.jsonl': record 13: turn 1 is a user turn where an? "
        r"assistant turn belongs",
    ):
        load_examples(cfg(DatasetSpec(str(f), "conversations")))


# --- LLaMA-Factory's layouts (data/README.md of hiyouga/LLaMA-Factory): every field used or refused ---------


def test_llama_factory_sharegpt_system_and_alpaca_history_are_trained_on(tmp_path, tokenizer):
    from finetune.prompts import encode

    sharegpt = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": "ユーザーの質問"},
                    {"from": "gpt", "value": "モデルの回答"},
                ],
                "system": "システムプロンプト",
                "tools": "",
            }
        ],
    )
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {
                "instruction": "Current question",
                "input": "context",
                "output": "Current answer",
                "system": "You are terse.",
                "history": [["First question", "First answer"], ["Second question", "Second answer"]],
            }
        ],
    )
    (s,), _ = load_examples(cfg(DatasetSpec(str(sharegpt), "conversations")))
    (a,), _ = load_examples(cfg(DatasetSpec(str(alpaca), "alpaca")))
    assert s["turns"][0] == {"role": "system", "content": "システムプロンプト"}
    assert [t["content"] for t in a["turns"]] == [
        "You are terse.",
        "First question",
        "First answer",
        "Second question",
        "Second answer",
        "Current question",
        "Current answer",
    ]
    chat = tokenizer.decode(encode(s, "chatml", tokenizer)["input_ids"])
    assert "<|im_start|>system\nシステムプロンプト<|im_end|>" in chat
    row = encode(a, "alpaca", tokenizer)
    text = tokenizer.decode(row["input_ids"])
    assert (
        text.index("You are terse.")
        < text.index("First question")
        < text.index("Second answer")
        < text.index("### Input:\ncontext")
        < text.index("Current answer")
    )
    learned = tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100])
    assert learned == "First answer</s>Second answer</s>Current answer</s>"


def test_a_kto_file_is_refused_naming_its_label(tmp_path):
    f = write_jsonl(
        tmp_path / "kto.jsonl",
        [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "label": False}],
    )
    with pytest.raises(DataError, match=r"record 0 has 'label' \(False\): a KTO label .* bad answers as good"):
        load_examples(cfg(DatasetSpec(str(f), "messages")))


@pytest.mark.parametrize(
    ("fmt", "record", "mapping"),
    [
        ("alpaca", {"instruction": "Q", "input": "", "chosen": "good", "rejected": "bad"}, "output: chosen"),
        (
            "messages",
            {
                "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
                "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
            },
            "messages: chosen",
        ),
    ],
)
def test_a_preference_file_fed_to_sft_names_chosen_rejected_and_dpo(tmp_path, fmt, record, mapping):
    f = write_jsonl(tmp_path / "pairs.jsonl", [record])
    with pytest.raises(DataError, match=rf"record 0 has 'chosen' and 'rejected'.*DPO.*{mapping}.*ignore_fields"):
        load_examples(cfg(DatasetSpec(str(f), fmt)))
    # following the message's advice trains on the preferred answers
    column = mapping.split(":")[0]
    train, _ = load_examples(cfg(DatasetSpec(str(f), fmt, columns={column: "chosen"}, ignore_fields=["rejected"])))
    assert train[0]["turns"][-1]["content"] == "good"


def test_images_are_refused_or_ignored_only_when_asked_and_counted(tmp_path, caplog):
    records = [
        {
            "messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A cat."}],
            "images": ["cat.png"],
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "images": []},
    ]
    f = write_jsonl(tmp_path / "mllm.jsonl", records)
    with pytest.raises(DataError, match=r"record 0 has 'images': .*text-only.*ignore_fields: \[images\]"):
        load_examples(cfg(DatasetSpec(str(f), "messages")))
    with caplog.at_level(logging.WARNING):
        train, _ = load_examples(cfg(DatasetSpec(str(f), "messages", ignore_fields=["images"])))
    assert len(train) == 2
    assert "ignore_fields dropped 'images' from 1 of 2 records" in caplog.text


def test_tool_calls_and_content_part_lists_are_refused(tmp_path):
    tool = write_jsonl(
        tmp_path / "tool.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": "Weather?"},
                    {"from": "function_call", "value": "{}"},
                    {"from": "observation", "value": "sunny"},
                    {"from": "gpt", "value": "Sunny."},
                ]
            }
        ],
    )
    with pytest.raises(DataError, match=r"record 0, turn 1: a tool call or tool result \(from 'function_call'\)"):
        load_examples(cfg(DatasetSpec(str(tool), "conversations")))
    parts = write_jsonl(
        tmp_path / "parts.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                    {"role": "assistant", "content": "Hello"},
                ]
            }
        ],
    )
    with pytest.raises(DataError, match=r"record 0, turn 0: 'content' is a list of content parts"):
        load_examples(cfg(DatasetSpec(str(parts), "messages")))


def test_a_system_field_beside_a_system_turn_is_refused(tmp_path):
    f = write_jsonl(
        tmp_path / "both.jsonl",
        [
            {
                "system": "A",
                "messages": [
                    {"role": "system", "content": "B"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "R"},
                ],
            }
        ],
    )
    with pytest.raises(DataError, match="record 0 has both a 'system' field and a system turn"):
        load_examples(cfg(DatasetSpec(str(f), "messages")))


def test_unused_columns_are_named_in_the_log(caplog):
    with caplog.at_level(logging.INFO):
        load_examples(cfg(DatasetSpec(str(REPO / "data" / "dolly_ja.jsonl"), "dolly")))
    assert "column(s) not used by format 'dolly': category" in caplog.text


BUNDLED = [
    ("alpaca_en.jsonl", "alpaca"),
    ("messages_en.jsonl", "messages"),
    ("text_en.txt", "text"),
    ("dolly_ja.jsonl", "dolly"),
    ("conversations_ja.jsonl", "conversations"),
    ("alpaca_ja.csv", "alpaca"),
]


@pytest.mark.parametrize(("name", "fmt"), BUNDLED)
def test_bundled_data_loads_in_its_format(name, fmt):
    train, _ = load_examples(cfg(DatasetSpec(str(REPO / "data" / name), fmt)))
    assert len(train) >= 30


def test_bundled_data_has_200_english_and_200_japanese_examples():
    def count(name, fmt):
        return len(load_examples(cfg(DatasetSpec(str(REPO / "data" / name), fmt)))[0])

    assert count("alpaca_en.jsonl", "alpaca") >= 200
    assert count("dolly_ja.jsonl", "dolly") >= 200


def test_turn_numbers_are_the_records_own_when_a_system_field_is_put_in_front(tmp_path):
    f = write_jsonl(
        tmp_path / "s.jsonl",
        [{"system": "S", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]}],
    )
    with pytest.raises(DataError, match=r"record 0: turn 0 is a assistant turn where a system or user turn"):
        load_examples(cfg(DatasetSpec(str(f), "conversations")))


def test_an_openai_turn_of_weight_0_is_refused_or_learned_when_asked(tmp_path, caplog):
    f = write_jsonl(
        tmp_path / "w.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "bad", "weight": 0},
                    {"role": "user", "content": "Q2"},
                    {"role": "assistant", "content": "good", "weight": 1},
                ]
            }
        ],
    )
    with pytest.raises(DataError, match=r"record 0, turn 1 has weight 0 .*ignore_fields: \[weight\]"):
        load_examples(cfg(DatasetSpec(str(f), "messages")))
    with caplog.at_level(logging.WARNING):
        train, _ = load_examples(cfg(DatasetSpec(str(f), "messages", ignore_fields=["weight"])))
    assert [t["content"] for t in train[0]["turns"]] == ["Q", "bad", "Q2", "good"]
    assert "ignore_fields dropped 'weight' from 1 turns" in caplog.text


def test_llama_factorys_empty_tools_string_is_no_tool(tmp_path):
    f = write_jsonl(
        tmp_path / "t.jsonl",
        [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "tools": "[]"}],
    )
    assert len(load_examples(cfg(DatasetSpec(str(f), "conversations")))[0]) == 1
