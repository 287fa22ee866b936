"""Evaluation (eval/evaluate.py, finetune/evaluation/): metrics on known strings, Japanese BLEU's tokenizer and its
fallback, perplexity by hand, SFT's tokenisation, generation (EOS, batching), lm-evaluation-harness run for real on a
local task YAML, the whole entry script on an SFT run against its base, and clear errors."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from finetune import config, modeling, prompts
from finetune.config.eval import EvalRecipe
from finetune.errors import DataError, RecipeError
from finetune.evaluation import data, harness, loss
from finetune.evaluation import metrics as M

from .conftest import REPO, sft_recipe, write_jsonl

EVAL = str(REPO / "eval" / "evaluate.py")


def run_eval(*argv, cwd=REPO, launcher=()):
    return subprocess.run(
        [*launcher, EVAL, *argv] if launcher else [sys.executable, EVAL, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "texts"),
    [
        ("en", ["The cat sat on the mat.", "Use the -r option to copy directories recursively."]),
        ("ja", ["日本で一番高い山は富士山です。", "lsコマンドはディレクトリの内容を一覧表示します。"]),
    ],
)
def test_identical_strings_score_chrf_100_bleu_100_and_exact_match_1(language, texts):
    from sacrebleu.metrics import CHRF

    bleu, name, note = M.bleu_metric(language)
    assert M.corpus_score(bleu, M.corpus_statistics(bleu, texts, texts)) == pytest.approx(100.0)
    assert M.corpus_score(CHRF(), M.corpus_statistics(CHRF(), texts, texts)) == pytest.approx(100.0)
    assert all(M.exact_match(t, t) == 1.0 and M.char_f1(t, t) == 1.0 for t in texts)
    assert M.language_of(texts) == language


def test_normalisation_and_partial_scores():
    assert M.exact_match("ＡＢＣ１２３  ｶﾅ", "ABC123 カナ") == 1.0  # NFKC and whitespace folding
    assert M.exact_match("富士山", "富士山です") == 0.0
    # 3 shared characters of 3 predicted and 5 referenced: P 1, R 0.6, F1 0.75
    assert M.char_f1("富士山", "富士山です") == pytest.approx(0.75)
    assert M.char_f1("", "x") == 0.0 and M.char_f1("", "") == 1.0


def test_japanese_bleu_uses_mecab_words_and_says_so_when_it_falls_back(monkeypatch):
    from sacrebleu.tokenizers import tokenizer_ja_mecab

    bleu, name, note = M.bleu_metric("ja")
    assert name == "ja-mecab" and note is None
    # MeCab splits into words: "富士山 です 。"; a hypothesis sharing the words scores what word n-grams say
    assert bleu.tokenizer("富士山です。") == "富士山 です 。"
    monkeypatch.setattr(tokenizer_ja_mecab, "MeCab", None)  # as on a machine without the `ja` extra
    bleu, name, note = M.bleu_metric("ja")
    assert name == "char" and "ja-mecab unavailable" in note and "finetune[ja]" in note
    assert M.bleu_metric("en")[1] == "13a"


def test_paired_bootstrap_interval_covers_a_known_difference():
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 0.5, 400)
    b = a - 0.3 + rng.normal(0, 0.05, 400)  # model - compare = 0.3, tightly paired
    low, high = M.paired_bootstrap(a, b, M.mean_score, 1000, seed=1)
    assert low < 0.3 < high and high - low < 0.05
    assert M.paired_bootstrap(a[:1], b[:1], M.mean_score, 1000, seed=1) is None


# ----------------------------------------------------------------------------------------------------------
# Loss: perplexity by hand, SFT's tokens
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro(micro_base):
    model, tokenizer, run = modeling.load_for_inference(str(micro_base), "float32")
    return model, tokenizer


def _examples(n=6):
    return [
        {"turns": [{"role": "user", "content": f"Count to {i}."}, {"role": "assistant", "content": "1 2 3 " * i}]}
        for i in range(1, n + 1)
    ]


def test_perplexity_is_exp_of_the_mean_response_token_nll_by_hand(micro):
    model, tokenizer = micro
    examples = _examples()
    render = data.Rendering("alpaca", None, False, 256, "test")
    result = loss.score(model, tokenizer, examples, render, batch_size=4, name="t")
    total, count = 0.0, 0
    for ex in examples:  # one example at a time, full logits, no padding: the plain definition
        row = prompts.encode(ex, "alpaca", tokenizer)
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
        with torch.no_grad():
            log_p = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        learned = labels != -100
        total -= log_p[learned].gather(1, labels[learned][:, None]).sum().item()
        count += int(learned.sum())
    assert result["tokens"] == count and result["n"] == len(examples)
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.fixture(scope="module")
def sft_run(micro_base, tmp_path_factory):
    """A short LoRA run on the micro base with a held-out split (chatml, English and Japanese files)."""
    from finetune import sft

    tmp = tmp_path_factory.mktemp("run")
    en = write_jsonl(
        tmp / "en.jsonl",
        [{"instruction": f"Spell {i}.", "input": "", "output": f"Number {i}. " * (1 + i % 3)} for i in range(40)],
    )
    ja = write_jsonl(
        tmp / "ja.jsonl",
        [{"instruction": f"{i}を書いて。", "context": "", "response": f"{i}です。" * (1 + i % 2)} for i in range(40)],
    )
    cfg = sft_recipe(
        micro_base,
        en,
        tmp / "out",
        f"data.datasets=[{{path: '{en}', format: alpaca}}, {{path: '{ja}', format: dolly}}]",
        "data.prompt_style=chatml",
        "data.eval_size=16",
        "data.nfkc=true",
        "training.max_steps=8",
    )
    sft.train(cfg)
    return tmp / "out", en, ja


def test_eval_scores_a_runs_heldout_examples_with_the_very_ids_sft_evaluated(micro_base_sp, tmp_path, monkeypatch):
    """On a SentencePiece LLaMA tokenizer: the rows sft.train built for its held-out split (captured as it ran) are
    the rows the evaluation's loss task scores for heldout_of that run."""
    from finetune import sft
    from finetune.evaluation import loss as eval_loss

    captured: dict[str, list] = {"sft": [], "eval": []}
    real = prompts.tokenize_examples
    phase = ["sft"]

    def spy(examples, cfg, tokenizer, name="train", kept=None):
        rows, stats = real(examples, cfg, tokenizer, name, kept)
        if name == "eval":
            captured[phase[0]].append(rows)
        return rows, stats

    chats = write_jsonl(
        tmp_path / "chats.jsonl",
        [
            {"messages": [{"role": "user", "content": f"{i}は？"}, {"role": "assistant", "content": f"{i}です。"}]}
            for i in range(30)
        ],
    )
    out = tmp_path / "run"
    cfg = sft_recipe(
        micro_base_sp,
        chats,
        out,
        f"data.datasets=[{{path: '{chats}', format: messages}}]",
        "data.prompt_style=llama2",
        "data.system_prompt='あなたは誠実です。'",
        "data.eval_size=8",
        "training.max_steps=2",
    )
    monkeypatch.setattr(prompts, "tokenize_examples", spy)
    sft.train(cfg)
    phase[0] = "eval"
    task = config.build(EvalRecipe, {"model": str(out), "tasks": [{"name": "h", "heldout_of": str(out)}]}).tasks[0]
    render = data.rendering(task, {str(out): modeling.run_recipe(out)})
    assert (render.prompt_style, render.system_prompt) == ("llama2", "あなたは誠実です。")
    model, tokenizer, _ = modeling.load_for_inference(str(out))
    eval_loss.score(model, tokenizer, data.examples(task, render, seed=0), render, 4, "eval")
    assert len(captured["sft"]) == 1 and len(captured["sft"][0]) == 8
    assert captured["eval"] == captured["sft"]


def test_a_heldout_split_that_no_longer_comes_out_the_same_is_refused(sft_run, tmp_path):
    import shutil

    out, en, ja = sft_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    recorded = json.loads((copy / "heldout.json").read_text())
    recorded["origins"][0] = "dataset 'elsewhere' record 0"  # as if the data had changed since training
    (copy / "heldout.json").write_text(json.dumps(recorded))
    task = config.build(EvalRecipe, {"model": str(copy), "tasks": [{"name": "h", "heldout_of": str(copy)}]}).tasks[0]
    with pytest.raises(DataError, match="comes out differently from the one the run recorded"):
        data.examples(task, data.rendering(task, {}), seed=0)


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------


def test_generation_stops_at_eos_and_batched_greedy_equals_one_at_a_time(micro):
    from finetune.generate import generate_ids

    model, tokenizer = micro
    prompts_ids = [
        prompts.prompt_ids([{"role": "user", "content": text}], "alpaca", tokenizer)
        for text in ("Hi.", "Name three colours of the rainbow, please.", "日本の首都は？", "Count.", "Why?")
    ]
    alone = [generate_ids(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts_ids]
    batched = generate_ids(model, tokenizer, prompts_ids, max_new_tokens=12, batch_size=3)
    assert batched == alone and all(len(a) == 12 for a in alone)
    # Make the third token the random model greedily picks the EOS: generation must stop there and keep it.
    free = alone[1]
    stop = next(t for k, t in enumerate(free) if k >= 2 and t not in free[:k])
    cut = free[: free.index(stop) + 1]
    eos = tokenizer.convert_ids_to_tokens(stop)
    original = tokenizer.eos_token
    try:
        tokenizer.eos_token = eos
        assert generate_ids(model, tokenizer, [prompts_ids[1]], max_new_tokens=12)[0] == cut
        again = generate_ids(model, tokenizer, prompts_ids, max_new_tokens=12, batch_size=5)
        assert again[1] == cut and all(stop not in a[:-1] for a in again)
    finally:
        tokenizer.eos_token = original


def test_a_chatml_answer_is_cut_at_its_end_of_turn():
    assert prompts.answer("chatml", "Paris.<|im_end|>\n<|im_start|>user") == "Paris."
    assert prompts.answer("alpaca", "Paris.<|im_end|>") == "Paris.<|im_end|>"


# ----------------------------------------------------------------------------------------------------------
# lm-evaluation-harness, for real, on a local task YAML
# ----------------------------------------------------------------------------------------------------------


def test_the_harness_runs_a_local_task_yaml_on_a_tiny_model(micro):
    model, tokenizer = micro
    task = config.build(
        EvalRecipe,
        {"model": "x", "tasks": [{"name": "h", "type": "harness", "harness_tasks": ["quickstart_mc_en"], "limit": 6}]},
    ).tasks[0]
    result = harness.score(model, tokenizer, task, batch_size=4, seed=0)
    row = result["quickstart_mc_en"]
    assert row["n"] == 6 and set(row["metrics"]) >= {"acc", "acc_norm"}
    per_item = row["samples"]["acc"]
    assert len(per_item) == 6 and set(per_item.tolist()) <= {0.0, 1.0}
    assert row["metrics"]["acc"] == pytest.approx(per_item.mean())
    # the local YAML's data path was resolved against eval/tasks/, not the working directory
    assert harness.local_task("quickstart_mc_en")["dataset_kwargs"]["data_files"]["test"].startswith("/")


def test_an_unknown_harness_task_is_named_with_the_closest_ones():
    with pytest.raises(RecipeError, match=r"unknown harness task 'quickstart_mc_fr'.*Did you mean.*quickstart_mc_"):
        harness.resolve(["quickstart_mc_fr"])
    with pytest.raises(RecipeError, match=r"unknown harness task 'hellaswagg'.*Did you mean hellaswag"):
        harness.resolve(["hellaswagg"])


# ----------------------------------------------------------------------------------------------------------
# The entry script, end to end
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_an_sft_run_against_its_base_writes_every_file(sft_run, micro_base, tmp_path):
    out, en, ja = sft_run
    tasks = (
        f"tasks=[{{name: loss, type: loss, heldout_of: '{out}'}},"
        f" {{name: gen, type: generation, heldout_of: '{out}', max_new_tokens: 8}},"
        f" {{name: text, type: loss, datasets: [{{path: '{REPO / 'data' / 'text_en.txt'}', format: text}}],"
        " max_examples: 5, max_length: 128},"
        " {name: mc, type: harness, harness_tasks: [quickstart_mc_ja], limit: 4}]"
    )
    proc = run_eval(
        "recipe=eval-quickstart",
        f"model={out}",
        f"compare={micro_base}",
        tasks,
        f"eval.output_dir={tmp_path / 'ev'}",
        "eval.bootstrap_samples=200",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["models"]["model"]["kind"] == "SFT run" and results["models"]["compare"]["kind"] == "model"
    assert results["models"]["model"]["lineage"]["stage"] == "sft"
    rows = {(name, r["metric"]): r for name, t in results["tasks"].items() for r in t["rows"]}
    nll = rows[("loss", "nll")]
    assert nll["n"] == 16 and nll["difference"] == pytest.approx(nll["model"] - nll["compare"])
    assert nll["ci95"][0] <= nll["difference"] <= nll["ci95"][1]
    assert nll["difference"] < 0  # the adapter has a lower loss on what its run held out than its base
    assert results["tasks"]["loss"]["rendering"]["prompt_style"] == "chatml"  # the run's, for the base too
    for metric in ("exact_match", "char_f1", "chrf", "bleu"):
        assert rows[("gen", metric)]["ci95"] is not None
    assert results["tasks"]["gen"]["scoring"]["language"] in ("en", "ja")
    assert rows[("text", "nll")]["n"] == 5
    assert rows[("mc", "quickstart_mc_ja/acc")]["n"] == 4
    generations = [json.loads(line) for line in (tmp_path / "ev" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 16 and {"prompt", "reference", "model", "compare"} <= set(generations[0])
    per_item = [json.loads(line) for line in (tmp_path / "ev" / "items.jsonl").read_text().splitlines()]
    model_nll = [r for r in per_item if r["task"] == "loss" and r["role"] == "model"]
    assert len(model_nll) == 16
    assert sum(r["nll"] for r in model_nll) / sum(r["tokens"] for r in model_nll) == pytest.approx(nll["model"])
    table = (tmp_path / "ev" / "results.md").read_text()
    assert "| nll (lower is better) |" in table and "model - compare (95% CI)" in table
    assert table in proc.stdout  # printed at the end


def test_bad_input_fails_with_one_clear_line(micro_base, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    loss_task = f"tasks=[{{name: l, type: loss, datasets: [{{path: '{empty}', format: alpaca}}]}}]"
    cases = [
        ([f"model={tmp_path / 'nowhere'}"], "no model at"),
        (
            [f"model={micro_base}", "tasks=[{name: h, type: harness, harness_tasks: [quickstart_mc_xx]}]"],
            "unknown harness task 'quickstart_mc_xx'",
        ),
        ([f"model={micro_base}", loss_task], "empty.jsonl"),
        (  # a Hub benchmark offline: one line saying so, and what runs offline
            [f"model={micro_base}", "tasks=[{name: h, type: harness, harness_tasks: [arc_easy], limit: 2}]"],
            "Offline, only local task YAMLs",
        ),
        ([f"model={micro_base}", "tasks=[{name: l, type: loss, max_new_tokens: 3, heldout_of: x}]"], "max_new_tokens"),
    ]
    for argv, expected in cases:
        proc = run_eval("recipe=eval-quickstart", "compare=null", f"eval.output_dir={tmp_path / 'e'}", *argv)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    proc = run_eval(f"model={tmp_path / 'nowhere'}", launcher=(accelerate, "launch", "--num_processes", "1"))
    assert proc.returncode == 2 and "no recipe given" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_a_heldout_selection_and_its_errors(sft_run, tmp_path):
    out, en, ja = sft_run
    task = config.build(
        EvalRecipe, {"model": str(out), "tasks": [{"name": "g", "heldout_of": str(out), "max_examples": 1}]}
    ).tasks[0]
    assert len(data.examples(task, data.rendering(task, {}), seed=0)) == 1
    with pytest.raises(RecipeError, match="did not train on"):
        bad = config.build(
            EvalRecipe, {"model": str(out), "tasks": [{"name": "g", "heldout_of": str(out), "only": ["x.jsonl"]}]}
        ).tasks[0]
        data.examples(bad, data.rendering(bad, {}), seed=0)
    # a generation task skips text documents (no prompt, no reference); with nothing left the set is empty
    text = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i}"} for i in range(3)])
    gen = config.build(
        EvalRecipe,
        {
            "model": "x",
            "tasks": [{"name": "g", "type": "generation", "datasets": [{"path": str(text), "format": "text"}]}],
        },
    ).tasks[0]
    with pytest.raises(DataError, match="task 'g': the eval set is empty"):
        data.examples(gen, data.rendering(gen, {}), seed=0)
    with pytest.raises(RecipeError, match="have a weight"):
        config.build(
            EvalRecipe,
            {"model": "x", "tasks": [{"name": "l", "datasets": [{"path": str(text), "format": "text", "weight": 2}]}]},
        )


@pytest.mark.parametrize("name", config.available("eval"))
def test_every_eval_recipe_parses(name):
    cfg, file = config.load([f"recipe={name}"], EvalRecipe)
    assert cfg.tasks and file.parent.name == "eval"
    assert f"eval/evaluate.py recipe={name}" in file.read_text().split("\n\n")[0]
