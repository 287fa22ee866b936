"""The fused output layer + loss (finetune/fused_loss.py): the same loss and gradients as logits -> cross-entropy,
for the kernel alone and for SFT's learned-positions loss on a real model: fp32 and bf16 autocast, packed and padded
batches, a plain model, LoRA and a 4-bit base."""

import pytest
import torch
import torch.nn.functional as F

from finetune.fused_loss import fused_linear_cross_entropy, fused_loss_unsupported, learned_positions_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_head_and_loss_match_the_unfused_ones(dtype):
    """Same loss and gradients as logits -> cross-entropy, fp32 and under bf16 autocast, across chunk edges."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    grads = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if fused:
                loss = fused_linear_cross_entropy(hidden, weight, targets, chunk=8)
            else:
                loss = F.cross_entropy((hidden @ weight.T).float(), targets)
        (loss * 3).backward()
        grads.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, **tol)


def test_a_divisor_a_frozen_head_the_log_statistics_and_no_grad():
    torch.manual_seed(1)
    hidden = torch.randn(21, 8, requires_grad=True)
    weight = torch.randn(30, 8)  # frozen: no gradient asked for, none computed
    targets = torch.randint(0, 30, (21,))
    stats = {}
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk=4, divisor=50, stats=stats)
    loss.backward()
    logits = hidden.detach() @ weight.T
    reference = hidden.detach().clone().requires_grad_()
    F.cross_entropy(reference @ weight.T, targets, reduction="sum").div(50).backward()
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits, targets, reduction="sum") / 50)
    torch.testing.assert_close(hidden.grad, reference.grad)
    log_p = logits.log_softmax(-1)
    torch.testing.assert_close(stats["entropy_sum"], -(log_p.exp() * log_p).sum())
    assert stats["top1"].item() == (logits.argmax(-1) == targets).sum().item()
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(
            fused_linear_cross_entropy(hidden, weight, targets, chunk=4), F.cross_entropy(logits, targets)
        )


@pytest.fixture(scope="module")
def batches(micro_base, bpe_tokenizer, tmp_path_factory):
    """A padded batch (prompt tokens and padding masked) and the same examples packed padding-free."""
    import datasets
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finetune.config.sft import DataConfig, DatasetSpec
    from finetune.instructions import load_examples
    from finetune.prompts import tokenize_examples

    from .conftest import write_jsonl

    data = write_jsonl(
        tmp_path_factory.mktemp("data") / "a.jsonl",
        [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))} for i in range(3, 9)],
    )
    cfg = DataConfig(datasets=[DatasetSpec(str(data), "alpaca")], max_length=256)
    rows = tokenize_examples(load_examples(cfg)[0], cfg, bpe_tokenizer)[0]
    pad = bpe_tokenizer.pad_token_id
    padded = DataCollatorForLanguageModeling(pad_token_id=pad)(rows)
    packed_rows = list(pack_dataset(datasets.Dataset.from_list(rows), 2048, "bfd"))
    packed = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(packed_rows)
    assert (padded["attention_mask"] == 0).any() and (padded["labels"] == -100).sum() > padded["attention_mask"].eq(
        0
    ).sum()
    return {"padded": dict(padded), "packed": dict(packed)}


def _model(micro_base, kind):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"attn_implementation": "sdpa", "dtype": torch.float32}
    if kind == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(micro_base, **kwargs)
    torch.manual_seed(0)
    if kind == "plain":
        with torch.no_grad():  # a trained-looking model: random weights would make every position alike
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return model
    model = get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    )
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("kind", ["plain", "lora", "4bit"])
def test_the_learned_positions_loss_equals_the_models_own_loss_and_gradients(micro_base, batches, kind, layout, dtype):
    model = _model(micro_base, kind)
    assert fused_loss_unsupported(model) is None
    inputs = batches[layout]
    trained = [p for p in model.parameters() if p.requires_grad]
    results = []
    for ours in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if ours:
                loss = learned_positions_loss(model, inputs)
            else:
                loss = model(**inputs, use_cache=False).loss  # transformers' loss over the full logits
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in trained])
        model.zero_grad()
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-3}
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, **tol)
    assert results[0][0].item() > 1.0  # a loss a model could still lower, not a degenerate zero


def test_a_head_the_fused_loss_cannot_stand_in_for_is_named(micro_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(micro_base)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert fused_loss_unsupported(model) == "the output layer is a peft.tuners.lora.layer.Linear"
