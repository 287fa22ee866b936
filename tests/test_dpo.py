"""DPO (finetune/dpo.py, finetune/preferences.py): the reference is the SFT policy and never moves, DPO's token ids
are SFT's, every preference format loads, bad pairs are reported by record, QLoRA trains on CPU, a stopped run
resumes to the same loss, held-out reward accuracy and margin rise, every recipe parses."""

import json

import pytest
import torch

from finetune import config, dpo, prompts, sft
from finetune.config.dpo import DPORecipe, PreferenceData, PreferenceSpec
from finetune.errors import DataError
from finetune.preferences import load_pairs, to_pair, tokenize_pairs

from .conftest import sft_recipe, write_jsonl
from .test_sft import StopAt


def preference_records(n: int = 40) -> list[dict]:
    """LLaMA-Factory alpaca-style pairs with a signal a micro model can learn: the whole answer against it cut off."""
    return [
        {
            "instruction": f"Spell the number {i} in words.",
            "input": "",
            "chosen": f"The number {i} is written as word number {i}. That is all.",
            "rejected": f"The number {i} is",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def policy(micro_base, tmp_path_factory):
    """A short LoRA SFT run (ChatML) on the micro base: the policy DPO starts from."""
    tmp = tmp_path_factory.mktemp("policy")
    data = write_jsonl(
        tmp / "sft.jsonl",
        [
            {"instruction": f"Spell the number {i} in words.", "input": "", "output": f"Word number {i}."}
            for i in range(40)
        ],
    )
    cfg = sft_recipe(micro_base, data, tmp / "sft", "data.prompt_style=chatml", "training.max_steps=6")
    sft.train(cfg)
    return tmp / "sft"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", preference_records())


def dpo_recipe(model, pairs, out, *overrides):
    return config.load(
        [
            "recipe=dpo-quickstart",
            f"model.name_or_path={model}",
            f"data.datasets=[{{path: '{pairs}', format: alpaca}}]",
            "data.max_length=128",
            "data.eval_size=8",
            f"training.output_dir={out}",
            "training.micro_batch_size=4",
            "training.gradient_accumulation_steps=1",
            "training.max_steps=6",
            "training.learning_rate=1e-2",
            "training.warmup_ratio=0",
            "training.log_every=1",
            "training.eval_every=100",
            "training.save_every=100",
            "training.report_to=[]",
            "training.precision=fp32",
            *overrides,
        ],
        DPORecipe,
    )[0]


def completion_logps(model, batch) -> torch.Tensor:
    """Sum of log p over each row's completion tokens (TRL's collator: completion_mask), by hand, full logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def test_the_reference_is_the_sft_policy_and_training_never_moves_it(policy, pairs_file, micro_base, tmp_path):
    """The reference's log-probabilities, read through TRL's own reference path at the first and the last step,
    equal the SFT run's (loaded on its own) and not the raw base's; the policy's move away from them."""
    from transformers import TrainerCallback
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import use_adapter

    from finetune import generate, modeling
    from finetune.config.shared import ModelConfig

    cfg = dpo_recipe(policy, pairs_file, tmp_path / "dpo")
    tokenizer = modeling.load_tokenizer(ModelConfig(name_or_path=str(policy)))
    data = dpo.rendering(cfg, modeling.run_recipe(policy))
    rows = tokenize_pairs(load_pairs(data)[0][:4], data, tokenizer)[0]
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(rows)
    seen = {}

    class Read(TrainerCallback):
        def read(self, model, when):
            model.eval()
            with use_adapter(model, "ref"):  # as DPOTrainer reads its reference
                seen[f"ref {when}"] = completion_logps(model, batch)
            seen[f"policy {when}"] = completion_logps(model, batch)
            model.train()

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.read(model, "before")

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.read(model, "after")

    trainer, metrics = dpo.train(cfg, callbacks=[Read()])
    assert "frozen copy of the SFT adapter" in metrics["reference"]
    sft_policy = completion_logps(generate.load(policy)[0], batch)  # the SFT run as saved, loaded on its own
    raw_base = completion_logps(modeling.load_model(ModelConfig(name_or_path=str(micro_base))), batch)
    for key in ("ref before", "ref after", "policy before"):
        torch.testing.assert_close(seen[key], sft_policy, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(raw_base, sft_policy, atol=1e-2)  # so the reference is not the raw base
    assert not torch.allclose(seen["policy after"], sft_policy, atol=1e-2)  # while the policy moved
    # saved: the trained adapter, without the reference's copy of the SFT one
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file() and not (tmp_path / "dpo" / "ref").exists()


def test_held_out_reward_accuracy_and_margin_rise(policy, pairs_file, tmp_path):
    _, metrics = dpo.train(dpo_recipe(policy, pairs_file, tmp_path / "dpo", "training.max_steps=12"))
    before, after = metrics["held_out_before"], metrics["held_out_after"]
    assert before["reward_accuracy"] == 0.0 and before["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert after["reward_accuracy"] > 0.5 and after["reward_margin"] > 0.0
    saved = json.loads((tmp_path / "dpo" / "metrics.json").read_text())
    assert saved["held_out_after"] == after and saved["tokens_per_s"] > 0 and saved["peak_mem_gb"] > 0


def test_a_merged_model_trains_a_new_lora_against_itself(micro_base, pairs_file, tmp_path):
    trainer, metrics = dpo.train(dpo_recipe(micro_base, pairs_file, tmp_path / "dpo", "training.max_steps=2"))
    assert "with the new LoRA adapter disabled" in metrics["reference"]
    assert set(trainer.model.peft_config) == {"default"}


def test_qlora_dpo_trains_on_cpu(micro_base, tmp_path, pairs_file):
    data = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))} for i in range(2, 30)],
    )
    sft.train(
        sft_recipe(micro_base, data, tmp_path / "qlora", "quantization.load_in_4bit=true", "training.max_steps=3")
    )
    # no held-out pass: bitsandbytes 0.50 repacks 4-bit weights for CPU inference in eval mode, which needs layers
    # of a multiple of 32 outputs, and the micro model's MLP has 176
    cfg = dpo_recipe(tmp_path / "qlora", pairs_file, tmp_path / "dpo", "training.max_steps=3", "data.eval_size=0")
    trainer, metrics = dpo.train(cfg)
    assert "4-bit base" in metrics["reference"]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()


def test_a_stopped_run_resumes_to_the_same_final_loss(policy, pairs_file, tmp_path):
    whole, _ = dpo.train(dpo_recipe(policy, pairs_file, tmp_path / "whole", "training.save_every=2"))
    out = tmp_path / "split"
    dpo.train(dpo_recipe(policy, pairs_file, out, "training.save_every=2"), callbacks=[StopAt(3)])
    resumed, metrics = dpo.train(dpo_recipe(policy, pairs_file, out, "training.save_every=2", "resume=true"))
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (whole, resumed)]
    assert resumed.state.global_step == whole.state.global_step == 6
    assert losses[1][-1] == pytest.approx(losses[0][-1], rel=1e-4)
    assert metrics["held_out_before"] is not None  # kept from the first part of the run


# ----------------------------------------------------------------------------------------------------------
# Data: one rendering with SFT, every format, bad pairs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["alpaca", "chatml", "llama2"])
def test_dpo_ids_for_a_prompt_and_its_chosen_answer_are_sfts(tokenizer, style):
    pairs = [
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "日本の首都は？"},
                {"role": "assistant", "content": "東京です。"},
                {"role": "user", "content": "And of France?"},
            ],
            "chosen": "Paris.",
            "rejected": "London, I think.",
            "origin": "test record 0",
        }
    ]
    data = PreferenceData(datasets=[PreferenceSpec(path="x")], prompt_style=style, max_length=512)
    (row,), stats = tokenize_pairs(pairs, data, tokenizer)
    trained = prompts.encode(
        {"turns": [*pairs[0]["prompt"], {"role": "assistant", "content": "Paris."}]}, style, tokenizer
    )
    assert row["prompt_ids"] + row["chosen_ids"] == trained["input_ids"]
    assert row["prompt_ids"] == prompts.prompt_ids(pairs[0]["prompt"], style, tokenizer)  # what generation feeds
    n = len(row["prompt_ids"])
    learned = [t for t, label in zip(trained["input_ids"][n:], trained["labels"][n:], strict=True) if label != -100]
    assert learned == row["chosen_ids"]  # every chosen id is one SFT learns: the answer and its EOS
    assert stats["prompt_answer_seams"] == 0


def test_every_preference_format_loads(tmp_path):
    formats = {
        "alpaca": {  # LLaMA-Factory alpaca-style, with history and a system prompt
            "system": "Be kind.",
            "history": [["Hi", "Hello!"]],
            "instruction": "Name a fruit.",
            "input": "red",
            "chosen": "An apple.",
            "rejected": "A car.",
        },
        "sharegpt": {  # LLaMA-Factory ShareGPT-style: answers as turns, or as strings (llm-jp/hh-rlhf-12k-ja)
            "conversations": [{"from": "human", "value": "りんごの色は？"}],
            "chosen": {"from": "gpt", "value": "赤です。"},
            "rejected": "青です。",
        },
        "hh": {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: A car.",
        },
        "preference": {  # UltraFeedback: message lists that end with the answer
            "prompt": "Name a fruit.",
            "chosen": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}],
            "rejected": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A car."}],
        },
    }
    for fmt, record in formats.items():
        pair = to_pair(record, PreferenceSpec(path=f"{fmt}.jsonl", format=fmt), 0)
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"] and pair["rejected"], fmt
    alpaca = to_pair(formats["alpaca"], PreferenceSpec(path="a", format="alpaca"), 0)
    assert [t["role"] for t in alpaca["prompt"]] == ["system", "user", "assistant", "user"]
    assert alpaca["prompt"][-1] == {"role": "user", "content": "Name a fruit.", "input": "red"}
    hh = to_pair(formats["hh"], PreferenceSpec(path="h", format="hh"), 0)
    assert hh["prompt"][-1]["content"] == "Name a fruit." and (hh["chosen"], hh["rejected"]) == ("An apple.", "A car.")
    implicit = {k: v for k, v in formats["preference"].items() if k != "prompt"}  # TRL's implicit prompt
    pair = to_pair(implicit, PreferenceSpec(path="p", format="preference"), 0)
    assert pair["prompt"] == [{"role": "user", "content": "Name a fruit."}] and pair["chosen"] == "An apple."
    # a whole LLaMA-Factory file, held out and mixed
    path = write_jsonl(tmp_path / "lf.jsonl", [formats["alpaca"] | {"instruction": f"Fruit {i}?"} for i in range(10)])
    train, held = load_pairs(PreferenceData(datasets=[PreferenceSpec(path=str(path), format="alpaca")], eval_size=2))
    assert len(train) == 8 and len(held) == 2 and held[0]["origin"].startswith(f"dataset '{path}' record ")


def test_bad_pairs_are_reported_with_their_record(tmp_path, tokenizer):
    spec = PreferenceSpec(path="bad.jsonl", format="alpaca")
    with pytest.raises(DataError, match=r"dataset 'bad.jsonl': record 3 has no 'rejected'"):
        to_pair({"instruction": "x", "chosen": "y"}, spec, 3)
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"instruction": "fine", "chosen": "good answer", "rejected": "bad answer"},
            {"instruction": "empty", "chosen": "", "rejected": "bad answer"},
            {"instruction": "same", "chosen": "twice", "rejected": "twice"},
            {"instruction": "long " * 300, "chosen": "good", "rejected": "bad"},
            {"instruction": "cut", "chosen": "good " * 200, "rejected": "bad " * 200},
        ],
    )
    data = PreferenceData(
        datasets=[PreferenceSpec(path=str(path), format="alpaca")], prompt_style="alpaca", eval_size=0, max_length=128
    )
    pairs = load_pairs(data)[0]
    rows, stats = tokenize_pairs(pairs, data, tokenizer)
    assert len(rows) == 2 and stats["cut_to_max_length"] == 1
    dropped = {kind: [o.rsplit(" ", 1)[1] for o in origins] for kind, origins in stats["dropped"].items()}
    assert dropped == {"empty_answer": ["1"], "identical_answers": ["2"], "prompt_fills_max_length": ["3"]}
    cut = next(r for r in rows if len(r["chosen_ids"]) > 20)
    assert len(cut["prompt_ids"]) + len(cut["chosen_ids"]) <= 128
    long_answers = next(p for p in pairs if p["prompt"][-1]["content"] == "cut")
    whole = prompts.encode({"turns": long_answers["prompt"]}, "alpaca", tokenizer)["input_ids"]
    assert cut["prompt_ids"] == whole[-len(cut["prompt_ids"]) :]  # the prompt's end kept


@pytest.mark.parametrize("name", config.available("dpo"))
def test_every_dpo_recipe_parses(name):
    cfg, file = config.load([f"recipe={name}"], DPORecipe)
    assert cfg.data.datasets and file.parent.name == "dpo"
    assert f"finetune/dpo.py recipe={name}" in file.read_text().split("\n\n")[0]
