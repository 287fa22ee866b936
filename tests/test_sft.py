"""SFT end to end on CPU with a 2-layer LLaMA: loss falls (LoRA, QLoRA), outputs reload, packing is exact,
resume matches an uninterrupted run, bad input fails clearly."""

import json
import os
import subprocess
import sys

import pytest
import torch

from finetune import checkpoints, generate, sft
from finetune.checkpoints import COMPLETE
from finetune.errors import RecipeError

from .conftest import REPO, sft_recipe, write_jsonl


def logged_losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def assert_loss_falls(losses, by=0.3):
    """A clear fall, not noise: the last steps' mean loss is `by` nats under the first steps'."""
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - by, losses


def test_lora_loss_falls_and_outputs_reload_to_the_same_logits(micro_base, alpaca_file, tmp_path):
    out = tmp_path / "run"
    trainer, metrics = sft.train(sft_recipe(micro_base, alpaca_file, out))
    assert_loss_falls(logged_losses(trainer))
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml", "metrics.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["global_step"] == 12 and saved["tokens_per_s"] > 0 and saved["peak_mem_gb"] > 0
    assert saved["train_tokens"] > 0 and saved["packing"] is True
    assert any("tokens_per_s" in e and "peak_mem_gb" in e for e in trainer.state.log_history)

    model, tokenizer, cfg = generate.load(out)
    assert cfg.data.prompt_style == "alpaca"
    ids = torch.tensor([tokenizer("### Instruction:\nSpell 7.")["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=1e-5)
    text = generate.generate(model, tokenizer, cfg, "Spell the number 3 in words.", max_new_tokens=8)
    assert isinstance(text, str) and text.strip()


def test_sentencepiece_base_trains_and_saves_the_chat_template_of_its_style(micro_base_sp, tmp_path):
    """A LLaMA SentencePiece tokenizer end to end: Japanese chats with a system prompt train, the saved tokenizer
    renders the trained text, and generation's prompt is the training prefix, NFKC-normalised as in training."""
    from transformers import AutoTokenizer

    from finetune.instructions import load_examples
    from finetune.prompts import encode, prompt_ids

    out = tmp_path / "sp"
    system = "あなたは誠実で優秀な日本人のアシスタントです。"
    chats = write_jsonl(
        tmp_path / "chats.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": f"{i}は何ですか？"},
                    {"from": "gpt", "value": f"{i}は数字です。"},
                    {"from": "human", "value": "ほかには？"},
                    {"from": "gpt", "value": f"{i + 1}も数字です。"},
                ]
            }
            for i in range(48)
        ],
    )
    cfg = sft_recipe(
        micro_base_sp,
        chats,
        out,
        f"data.datasets=[{{path: '{chats}', format: conversations}}]",
        "data.prompt_style=llama2",
        f"data.system_prompt='{system}'",
        "data.nfkc=true",
        "training.max_steps=12",
    )
    trainer, _ = sft.train(cfg)
    assert_loss_falls(logged_losses(trainer))
    saved = AutoTokenizer.from_pretrained(out)
    example = load_examples(cfg.data)[0][0]
    text = saved.apply_chat_template(example["turns"], tokenize=False)
    assert text.startswith(f"<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n")
    row = encode(example, "llama2", saved, system)
    assert saved.decode(row["input_ids"]).replace("<s> [INST]", "<s>[INST]") == text  # ▁ of each document
    model, tokenizer, run_cfg = generate.load(out)
    assert run_cfg.data.nfkc and run_cfg.data.system_prompt == system
    ids = prompt_ids([{"role": "user", "content": "ＡＢＣ？"}], "llama2", tokenizer, system, nfkc=True)
    assert ids == prompt_ids([{"role": "user", "content": "ABC?"}], "llama2", tokenizer, system)
    assert generate.generate(model, tokenizer, run_cfg, "ＡＢＣ？", max_new_tokens=4) == generate.generate(
        model, tokenizer, run_cfg, "ABC?", max_new_tokens=4
    )


def test_print_example_shows_each_dataset_as_trained_and_trains_nothing(micro_base_sp, tmp_path, capsys):
    data = REPO / "data"
    sft.main(
        [
            "recipe=quickstart",
            f"model.name_or_path={micro_base_sp}",
            "print_example=true",
            f"training.output_dir={tmp_path / 'never'}",
            "data.prompt_style=alpaca-ja",
            f"data.datasets=[{{path: '{data / 'dolly_ja.jsonl'}', format: dolly}}, "
            f"{{path: '{data / 'alpaca_en.jsonl'}', format: alpaca}}]",
        ]
    )
    shown = capsys.readouterr().out
    assert shown.count("=== dataset") == 2 and "dolly_ja.jsonl', record 0 (format dolly" in shown
    assert "### 応答:\n再帰関数とは" in shown  # the rendered text
    pieces = shown.split("--- token pieces, learned ones inside [[ ]]\n")[1].splitlines()[0]
    assert pieces.startswith("<s>|▁|") and "|<0x0A>|[[" in pieces and pieces.endswith("</s>]]")
    assert not (tmp_path / "never").exists()


def test_qlora_loss_falls_on_a_4bit_base(micro_base, alpaca_file, tmp_path):
    import bitsandbytes as bnb

    trainer, _ = sft.train(
        sft_recipe(micro_base, alpaca_file, tmp_path / "q", "quantization.load_in_4bit=true", "training.max_steps=15")
    )
    linear4bit = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4bit and linear4bit[0].weight.quant_type == "nf4"
    assert_loss_falls(logged_losses(trainer))
    assert (tmp_path / "q" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_and_merged_adapter(micro_base, alpaca_file, tmp_path):
    trainer, _ = sft.train(
        sft_recipe(
            micro_base,
            alpaca_file,
            tmp_path / "f",
            "lora.method=full",
            "training.max_steps=6",
            "training.learning_rate=1e-3",
        )
    )
    assert logged_losses(trainer)[-1] < logged_losses(trainer)[0]
    assert (tmp_path / "f" / "model.safetensors").is_file()

    trainer, _ = sft.train(
        sft_recipe(micro_base, alpaca_file, tmp_path / "m", "training.max_steps=4", "training.merge_adapter=true")
    )
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "merged")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=1e-4)


def test_packed_batch_gives_the_same_loss_as_unpacked(micro_base, bpe_tokenizer, alpaca_file, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finetune.config.sft import DataConfig, DatasetSpec
    from finetune.instructions import load_examples
    from finetune.prompts import tokenize_examples

    tokenizer = bpe_tokenizer
    cfg = DataConfig(datasets=[DatasetSpec(str(alpaca_file), "alpaca")], max_length=256)
    rows = tokenize_examples(load_examples(cfg)[0][:6], cfg, tokenizer)[0]
    model = AutoModelForCausalLM.from_pretrained(micro_base, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking model: random weights would make every position alike
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(rows)
    packed_rows = list(pack_dataset(datasets.Dataset.from_list(rows), 2048, "bfd"))
    assert len(packed_rows) == 1  # all six examples share one sequence
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(packed_rows)
    assert packed["input_ids"].shape[0] == 1 and (packed["position_ids"] == 0).sum() == 6
    # Through the suite's trainer: its compute_loss turns the KV cache off, without which transformers skips
    # the packed-sequence mask and examples would attend to each other.
    from trl import SFTConfig

    trainer = sft.make_trainer_class()(
        model=model,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(rows),
        args=SFTConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True),
    )
    with torch.no_grad():
        loss_padded = trainer.compute_loss(model, dict(padded))
        loss_packed = trainer.compute_loss(model, dict(packed))
        # the same sequence without position resets lets examples attend to each other: the loss changes
        loss_leaky = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-5, abs=1e-6)
    assert abs(loss_leaky - loss_padded) > 1e-3

    # Attention per packed example (finetune/attention.py, the CPU default with packing): the same loss and gradients
    from finetune import attention

    grads = {}
    for impl in ("sdpa", attention.register()):
        model.set_attn_implementation(impl)
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(packed))
        loss.backward()
        grads[impl] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    assert model.config._attn_implementation == "sdpa_segments"
    for a, b in zip(*grads.values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert grads["sdpa"][0].item() == pytest.approx(loss_padded.item(), rel=1e-5, abs=1e-6)


class StopAt:
    """Stop training after `step` optimiser steps, as a killed job would (the schedule still targets max_steps)."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= step:
                    control.should_training_stop = True

        return _Stop()


# Pinned numerics (torchtune's regression tests): the first losses of a 2-layer fp32 LoRA run. A change that moves
# them changes what SFT computes: if that is meant, re-pin them and say why in the commit message.
PINNED_LOSSES = [6.9386, 6.7512, 6.5966, 6.5163]


def test_pinned_losses_of_a_2_layer_fp32_lora_run(micro_base, alpaca_file, tmp_path):
    trainer, _ = sft.train(sft_recipe(micro_base, alpaca_file, tmp_path / "run", "training.max_steps=4"))
    assert logged_losses(trainer) == pytest.approx(PINNED_LOSSES, abs=1e-4)
    assert trainer.model.config._attn_implementation == "sdpa_segments"  # packed, on the CPU


def test_resumed_run_ends_at_the_same_step_loss_weights_and_metrics(micro_base, alpaca_file, tmp_path):
    whole, whole_metrics = sft.train(sft_recipe(micro_base, alpaca_file, tmp_path / "whole", "training.save_every=4"))
    out = tmp_path / "split"
    first, _ = sft.train(sft_recipe(micro_base, alpaca_file, out, "training.save_every=4"), callbacks=[StopAt(6)])
    assert first.state.global_step == 6 and checkpoints.latest(out).name == "checkpoint-4"
    (out / "checkpoint-8").mkdir()  # a checkpoint a crash left half-written: no completion mark, so ignored
    resumed, metrics = sft.train(sft_recipe(micro_base, alpaca_file, out, "training.save_every=4", "resume=true"))
    assert resumed.state.global_step == whole.state.global_step == 12
    assert logged_losses(resumed)[-1] == pytest.approx(logged_losses(whole)[-1], rel=1e-4)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    for k in a:
        if "lora" in k:
            assert torch.allclose(a[k], b[k], atol=1e-5), k
    # metrics.json speaks for the whole run, not for the part after the resume
    assert metrics["train_tokens"] == whole_metrics["train_tokens"] > 0
    assert metrics["train_loss"] == pytest.approx(whole_metrics["train_loss"], abs=1e-5)
    assert metrics["global_step"] == 12
    assert json.loads((out / "metrics.json").read_text())["train_loss"] == metrics["train_loss"]
    # and the uninterrupted run's train loss is the Trainer's own mean over its steps
    assert whole_metrics["train_loss"] == pytest.approx(sum(logged_losses(whole)) / 12, abs=1e-6)


@pytest.mark.parametrize(
    "change",
    ["training.learning_rate=1e-3", "training.micro_batch_size=2", "data.max_length=256", "data.datasets.0.weight=2.0"],
)
def test_resume_with_other_data_or_batch_settings_is_refused_naming_the_key(micro_base, alpaca_file, tmp_path, change):
    out = tmp_path / "run"
    sft.train(sft_recipe(micro_base, alpaca_file, out, "training.save_every=4", "training.max_steps=4"))
    saved = (out / "recipe.yaml").read_text()
    key = change.partition("=")[0]
    with pytest.raises(RecipeError, match=rf"checkpoint-4 was written with other settings.*{key} was "):
        sft.train(
            sft_recipe(
                micro_base, alpaca_file, out, "training.save_every=4", "training.max_steps=4", "resume=true", change
            )
        )
    assert (out / "recipe.yaml").read_text() == saved  # the run's recipe is not overwritten by the refused one


def test_logging_and_checkpoint_cadence_may_change_on_resume(micro_base, alpaca_file, tmp_path):
    out = tmp_path / "run"
    sft.train(sft_recipe(micro_base, alpaca_file, out, "training.save_every=4"), callbacks=[StopAt(5)])
    trainer, _ = sft.train(
        sft_recipe(micro_base, alpaca_file, out, "training.save_every=3", "training.log_every=2", "resume=true")
    )
    assert trainer.state.global_step == 12


def test_rotation_never_leaves_zero_complete_checkpoints(micro_base, alpaca_file, tmp_path, monkeypatch):
    """A kill between the Trainer writing checkpoint-N and its completion mark must leave the older one: rotation
    runs only after the mark. Simulated by stopping the run at the moment the mark would be written."""
    out = tmp_path / "run"
    sft.train(
        sft_recipe(micro_base, alpaca_file, out, "training.save_every=2", "training.keep_checkpoints=1"),
        callbacks=[StopAt(2)],
    )
    assert [d.name for d in checkpoints.complete(out)] == ["checkpoint-2"]

    class Killed(Exception):
        pass

    def killed_before_the_mark(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(checkpoints, "mark_complete", killed_before_the_mark)
    with pytest.raises(Killed):
        sft.train(
            sft_recipe(
                micro_base, alpaca_file, out, "training.save_every=2", "training.keep_checkpoints=1", "resume=true"
            )
        )
    assert (out / "checkpoint-4").is_dir()  # written by the Trainer, not marked
    assert [d.name for d in checkpoints.complete(out)] == ["checkpoint-2"]  # still there to resume from
    monkeypatch.undo()
    trainer, _ = sft.train(
        sft_recipe(micro_base, alpaca_file, out, "training.save_every=2", "training.keep_checkpoints=1", "resume=true")
    )
    assert trainer.state.global_step == 12
    assert [d.name for d in out.glob("checkpoint-*")] == ["checkpoint-12"]  # rotated once a newer one was complete


def test_existing_checkpoints_are_never_overwritten_without_resume(micro_base, alpaca_file, tmp_path):
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-3" / COMPLETE).touch()
    with pytest.raises(RecipeError, match="already holds checkpoints .*add resume=true"):
        sft.train(sft_recipe(micro_base, alpaca_file, tmp_path / "run"))


def run_cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "finetune.sft", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )


def test_malformed_record_fails_through_the_cli_naming_index_and_field(micro_base, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    proc = run_cli(
        "recipe=quickstart",
        f"model.name_or_path={micro_base}",
        f"data.datasets=[{{path: '{bad}', format: alpaca}}]",
        f"training.output_dir={tmp_path / 'o'}",
    )
    assert proc.returncode == 2
    assert "bad.jsonl': record 1 has no 'output'" in proc.stderr and "Traceback" not in proc.stderr


def test_empty_dataset_fails_through_the_cli(micro_base, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_cli(
        "recipe=quickstart",
        f"model.name_or_path={micro_base}",
        f"data.datasets=[{{path: '{empty}', format: alpaca}}]",
        f"training.output_dir={tmp_path / 'o'}",
    )
    assert proc.returncode == 2 and "empty.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_lora_switches_reach_peft():
    from finetune.config.shared import LoraConfig
    from finetune.modeling import peft_config

    cfg = peft_config(LoraConfig(r=8, alpha=16, use_dora=True, use_rslora=True, target_modules=["q_proj"]))
    assert (cfg.r, cfg.lora_alpha, cfg.use_dora, cfg.use_rslora) == (8, 16, True, True)
    assert set(cfg.target_modules) == {"q_proj"}
    assert peft_config(LoraConfig(method="full")) is None


def test_dora_trains(micro_base, alpaca_file, tmp_path):
    trainer, _ = sft.train(
        sft_recipe(micro_base, alpaca_file, tmp_path / "d", "lora.use_dora=true", "training.max_steps=4")
    )
    assert any("lora_magnitude_vector" in n for n, _ in trainer.model.named_parameters())
    assert logged_losses(trainer)[-1] < logged_losses(trainer)[0]


def test_micro_batch_times_accumulation_gives_the_same_curve(micro_base, alpaca_file, tmp_path):
    runs = {}
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        trainer, _ = sft.train(
            sft_recipe(
                micro_base,
                alpaca_file,
                tmp_path / f"{micro}x{accum}",
                "training.max_steps=4",
                f"training.micro_batch_size={micro}",
                f"training.gradient_accumulation_steps={accum}",
                "data.max_length=256",
            )
        )
        runs[(micro, accum)] = logged_losses(trainer)
    reference = runs[(4, 1)]
    for key, losses in runs.items():
        assert losses == pytest.approx(reference, rel=2e-4), key


def test_the_learned_positions_loss_trains_as_trls_head_does_and_the_log_says_which(
    micro_base, alpaca_file, tmp_path, caplog
):
    """The suite's loss (learned positions only) against TRL's fused LM head (every position): same curve."""
    import logging

    caplog.set_level(logging.INFO, logger="finetune.sft")
    curves = {}
    for fused in (True, False):
        trainer, metrics = sft.train(
            sft_recipe(
                micro_base, alpaca_file, tmp_path / str(fused), "training.max_steps=4", f"training.fused_loss={fused}"
            )
        )
        curves[fused] = logged_losses(trainer)
        assert trainer.fused is fused and metrics["loss_path"] == trainer.loss_path
    assert curves[True] == pytest.approx(curves[False], abs=1e-4)
    assert curves[True] == pytest.approx(PINNED_LOSSES, abs=1e-4)
    assert "loss: output layer fused into the loss, on learned positions only" in caplog.text
    assert "loss: TRL's fused LM head inside the model's forward (training.fused_loss=false)" in caplog.text


@pytest.mark.parametrize("token_metrics", [True, False])
def test_entropy_and_token_accuracy_are_computed_on_logging_steps_only(
    micro_base, alpaca_file, tmp_path, monkeypatch, token_metrics
):
    from finetune import fused_loss

    calls = []
    real = fused_loss.learned_positions_loss

    def counting(model, inputs, num_items=None, stats=None):
        calls.append(stats is not None)
        return real(model, inputs, num_items, stats)

    monkeypatch.setattr(fused_loss, "learned_positions_loss", counting)
    trainer, _ = sft.train(
        sft_recipe(
            micro_base,
            alpaca_file,
            tmp_path / "run",
            "training.max_steps=6",
            "training.gradient_accumulation_steps=1",
            "training.log_every=3",
            f"training.log_token_metrics={token_metrics}",
        )
    )
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [1, 3, 6]  # logging_first_step, then every 3
    if token_metrics:
        assert calls == [True, False, True, False, False, True]  # one micro-batch per step
        for e in logged:
            assert 0 < e["entropy"] < 8 and 0 <= e["mean_token_accuracy"] <= 1, e
    else:
        assert calls == [False] * 6
        assert not any("entropy" in e or "mean_token_accuracy" in e for e in logged)


def test_padded_batches_log_their_padding_share_grouping_lowers_it_and_padding_free_trains_alike(
    micro_base, alpaca_file, tmp_path
):
    shares, curves = {}, {}
    for name, overrides in {
        "padded": ["data.padding_free=false"],
        "grouped": ["data.padding_free=false", "data.group_by_length=true"],
        "padding-free": [],  # the default without packing, micro_batch_size > 1
    }.items():
        trainer, metrics = sft.train(
            sft_recipe(
                micro_base, alpaca_file, tmp_path / name, "data.packing=false", "training.max_steps=6", *overrides
            )
        )
        curves[name] = logged_losses(trainer)
        shares[name] = metrics["padding_share"]
        logged = [e.get("padding_share") for e in trainer.state.log_history if "loss" in e]
        if name == "padding-free":
            assert metrics["padding_free"] and shares[name] is None and logged == [None] * 6
        else:
            assert not metrics["padding_free"] and len(logged) == 6 and all(0 <= s < 1 for s in logged)
            assert shares[name] == pytest.approx(sum(logged) / 6, abs=0.05)  # equal batches: about the mean
    assert 0 < shares["grouped"] < shares["padded"] / 2, shares
    # the same micro-batches joined into one row without padding: the same curve
    assert curves["padding-free"] == pytest.approx(curves["padded"], abs=1e-4)
    assert curves["grouped"] != pytest.approx(curves["padded"], abs=1e-4)  # another order of examples


def test_a_missing_local_model_path_is_named_not_reported_as_a_hub_failure(tmp_path):
    from finetune import modeling
    from finetune.config.shared import ModelConfig

    missing = tmp_path / "models" / "llama"
    with pytest.raises(RecipeError, match=rf"no tokenizer at '{missing}': that path does not exist"):
        modeling.load_tokenizer(ModelConfig(name_or_path=str(missing)))


def test_packed_cpu_runs_attend_per_example_through_the_models_forward(micro_base, alpaca_file, tmp_path, monkeypatch):
    from finetune import attention

    segmented = []
    real = attention.segment_attention

    def counting(module, query, key, value, attention_mask, **kwargs):
        segmented.append(kwargs.get("cu_seq_lens_q") is not None)
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(attention, "segment_attention", counting)
    trainer, _ = sft.train(sft_recipe(micro_base, alpaca_file, tmp_path / "run", "training.max_steps=1"))
    assert trainer.model.config._attn_implementation == "sdpa_segments"
    assert segmented == [True] * 2 * 4  # 2 layers x 4 micro-batches, each a packed row split per example


def test_bf16_autocast_reaches_the_learned_positions_loss(micro_base, alpaca_file, tmp_path, monkeypatch):
    """accelerate's mixed precision wraps model.forward, which the fused path bypasses: it must enter autocast
    itself, so a bf16 run trains as TRL's head would (in bf16), not silently in fp32."""
    from finetune import fused_loss

    autocast = []
    real = fused_loss.learned_positions_loss

    def recording(model, inputs, num_items=None, stats=None):
        autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(model, inputs, num_items, stats)

    monkeypatch.setattr(fused_loss, "learned_positions_loss", recording)
    curves = {}
    for fused in (True, False):
        trainer, _ = sft.train(
            sft_recipe(
                micro_base,
                alpaca_file,
                tmp_path / str(fused),
                "training.max_steps=3",
                "training.precision=bf16",
                f"training.fused_loss={fused}",
            )
        )
        curves[fused] = logged_losses(trainer)
    assert autocast == [True] * 3 * 4
    assert curves[True] == pytest.approx(curves[False], rel=1e-2)
    assert curves[True] != pytest.approx(PINNED_LOSSES[:3], abs=1e-4)  # bf16, not the fp32 curve


def test_keep_best_ends_with_the_weights_of_the_lowest_dev_loss(micro_base, alpaca_file, tmp_path):
    """A dev set given as its own file (data.eval_datasets); with a learning rate high enough to overfit 12 examples,
    keep_best ends with the weights of the lowest dev loss, not the last step's, and saves those."""
    dev = write_jsonl(
        tmp_path / "dev.jsonl",
        [{"instruction": f"Spell {i}.", "input": "", "output": f"Word number {i}."} for i in range(100, 108)],
    )
    out = tmp_path / "best"
    cfg = sft_recipe(
        micro_base,
        alpaca_file,
        out,
        "data.datasets.0.max_samples=12",
        f"data.eval_datasets=[{{path: '{dev}', format: alpaca}}]",
        "lora.method=full",
        "training.learning_rate=3e-2",
        "training.max_steps=16",
        "training.eval_every=2",
        "training.keep_best=true",
    )
    trainer, metrics = sft.train(cfg)
    evals = [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e][:-1]  # not the final
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert best_step < 16, evals  # the dev loss rose again: the last step is not the best
    assert (metrics["best_step"], metrics["best_eval_loss"]) == (best_step, pytest.approx(best_loss))
    assert metrics["eval_loss"] == pytest.approx(
        best_loss, abs=1e-5
    )  # the final evaluation scores the restored weights
    assert json.loads((out / "heldout.json").read_text())["count"] == 8
    reloaded = generate.load(out)[0]
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits)


def test_keep_best_needs_held_out_data_and_one_held_out_source(micro_base, alpaca_file, tmp_path):
    with pytest.raises(RecipeError, match="keep_best=true picks the weights of the best evaluation"):
        sft.train(sft_recipe(micro_base, alpaca_file, tmp_path / "x", "training.keep_best=true"))
    with pytest.raises(RecipeError, match="data.eval_size and data.eval_datasets both"):
        sft_recipe(
            micro_base,
            alpaca_file,
            tmp_path / "y",
            "data.eval_size=4",
            f"data.eval_datasets=[{{path: '{alpaca_file}', format: alpaca}}]",
        )
