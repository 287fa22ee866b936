"""The study (finetune/study.py): fits recover known laws, man-page pairs align, subsets are nested, the contamination
check finds a planted overlap, a killed study resumes without redoing finished cells, a changed key is refused, and
every study recipe parses. The manual pages here are written by the test (roff), in two languages."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from finetune import config, contamination, fits, grid, pairs
from finetune.config.study import StudyRecipe
from finetune.errors import RecipeError

from .conftest import REPO, write_jsonl

KANJI = "〇一二三四五六七八九"


def _ja_number(i: int) -> str:
    return "".join(KANJI[int(d)] for d in str(i))


def _page(name: str, summary: str, paragraph: str, options: list[tuple[str, str]]) -> bytes:
    """A roff manual page in section 1; its headings in the page's language."""
    lines = [f".TH {name.upper()} 1", ".SH NAME" if summary.isascii() else ".SH 名前", f"{name} \\- {summary}"]
    lines += [".SH DESCRIPTION" if paragraph.isascii() else ".SH 説明", paragraph]
    for flag, text in options:
        lines += [".TP", f".B {flag}", text]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def write_man_pages(root: Path, pages: int = 36) -> tuple[Path, Path]:
    """English and Japanese pages of `pages` commands, each with a NAME summary, one paragraph and two options whose
    texts name the command, so no two pages share a long n-gram."""
    en, ja = root / "man", root / "man" / "ja"
    for lang in (en, ja):
        (lang / "man1").mkdir(parents=True, exist_ok=True)
    for i in range(pages):
        w, j = f"tool{i}", _ja_number(i)
        english = _page(
            w,
            f"print the entries of store {w} in order",
            f"The program {w} reads store {w} and prints it.",
            [("\\-a", f"show every entry of {w} at once"), ("\\-q", f"print nothing while {w} runs")],
        )
        japanese = _page(
            w,
            f"{j}番の記録を順に表示する",
            f"{w}は{j}番の記録を読んで表示します。",
            [("\\-a", f"{j}番の項目をすべて表示する"), ("\\-q", f"{j}番の実行中は何も表示しない")],
        )
        (en / "man1" / f"{w}.1.gz").write_bytes(english)
        (ja / "man1" / f"{w}.1.gz").write_bytes(japanese)
    os.symlink(en / "man1" / "tool0.1.gz", en / "man1" / "alias0.1.gz")  # a link: the same page under another name
    os.symlink(ja / "man1" / "tool0.1.gz", ja / "man1" / "alias0.1.gz")
    return en, ja


# ----------------------------------------------------------------------------------------------------------
# Fits and crossovers
# ----------------------------------------------------------------------------------------------------------


def test_fits_recover_known_parameters_from_synthetic_points():
    n = np.array([50, 100, 300, 1000, 3000, 10000.0])
    truth = fits.PowerLaw(E=3.5, A=25.0, alpha=0.45)
    noisy = truth(n) * (1 + np.random.default_rng(0).normal(0, 0.002, len(n)))
    fitted = fits.fit_power_law(n, noisy)
    assert fitted.E == pytest.approx(3.5, rel=0.03)
    assert fitted.alpha == pytest.approx(0.45, rel=0.1)
    assert fitted.A == pytest.approx(25.0, rel=0.25)
    exact = fits.fit_power_law(n, truth(n))
    assert (exact.E, exact.A, exact.alpha) == (
        pytest.approx(3.5, rel=1e-3),
        pytest.approx(25, rel=1e-2),
        pytest.approx(0.45, rel=1e-3),
    )


def test_crossover_reports_within_beyond_never_and_no_effect():
    base = fits.PowerLaw(E=3.0, A=20.0, alpha=0.5)
    # the CPT arm: same floor, a smaller A: the gain 10/sqrt(N) falls below 0.05 at N = (10/0.05)^2 = 40,000
    c = fits.crossover(base, fits.PowerLaw(3.0, 10.0, 0.5), 0.05, 100, 100_000)
    assert c.status == "within" and c.n_star == pytest.approx(40_000, rel=0.01)
    assert fits.crossover(base, fits.PowerLaw(3.0, 10.0, 0.5), 0.05, 100, 3000).status == "extrapolated"
    never = fits.crossover(base, fits.PowerLaw(2.8, 10.0, 0.5), 0.05, 100, 3000)
    assert never.status == "never" and never.n_star is None and never.asymptote == pytest.approx(0.2)
    assert fits.crossover(base, base, 0.05, 100, 3000).status == "below-at-start"


# ----------------------------------------------------------------------------------------------------------
# Data: pairs, nested subsets, the swapped control, contamination
# ----------------------------------------------------------------------------------------------------------


def test_manual_pages_align_into_pairs_and_a_linked_page_counts_once(tmp_path):
    en, ja = write_man_pages(tmp_path, pages=4)
    assert pairs.common_pages(en, ja) == [f"man1/tool{i}.1.gz" for i in (0, 1, 2, 3)]  # alias0 is tool0
    found = {kind: (e, j) for kind, e, j in pairs.page_pairs("man1/tool3.1.gz", en, ja)}
    assert found["name"] == ("print the entries of store tool3 in order", "三番の記録を順に表示する")
    assert found["option -a"] == ("show every entry of tool3 at once", "三番の項目をすべて表示する")
    assert found["paragraph"] == (
        "The program tool3 reads store tool3 and prints it.",
        "tool3は三番の記録を読んで表示します。",
    )
    assert all(pairs.PairFilter().keep(e, j) for e, j in found.values())


@pytest.fixture(scope="module")
def man_roots(tmp_path_factory):
    return write_man_pages(tmp_path_factory.mktemp("pages"))


def study_args(out: Path, en: Path, ja: Path, base: Path, corpus: Path, *extra: str) -> list[str]:
    """A study small enough for CI: the micro base, 2 CPT steps on a tiny corpus, sizes 8 and 16 and 32."""
    corpora = f"[{{name: ja, path: '{corpus / 'ja.jsonl'}', weight: 0.8}}, {{name: en, path: '{corpus / 'en.jsonl'}'}}]"
    cpt = [
        f"data.corpora={corpora}",
        "data.seq_len=32",
        f"data.cache_dir={out / 'cache'}",
        "training.micro_batch_size=4",
        "training.global_batch_tokens=128",
        "training.warmup_steps=1",
        "training.eval_every=2",
        "training.eval_blocks=2",
        "training.save_every=2",
        "training.precision=fp32",
    ]
    sft = ["training.precision=fp32", "data.max_length=128", "training.gradient_accumulation_steps=2"]
    return [
        "recipe=study-quickstart",
        f"study.output_dir={out}",
        "study.executor=debug",
        f"base.path={base}",
        f"cpt.overrides={json.dumps(cpt)}",
        "cpt.steps=[2]",
        "cpt.control=false",
        f"data.en_root={en}",
        f"data.ja_root={ja}",
        "data.eval_pages=4",
        "data.dev_pages=2",
        "sft.sizes=[0,8,16,32]",
        "sft.examples_per_cell=32",
        "sft.min_epochs=1",
        "sft.max_epochs=2",
        "sft.evals_per_cell=2",
        f"sft.overrides={json.dumps(sft)}",
        "eval.generation_examples=4",
        "eval.max_new_tokens=4",
        "fit.bootstrap=20",
        "fit.starts=8",
        *extra,
    ]


def load_study(*argv):
    return config.load(list(argv), StudyRecipe)[0]


def test_subsets_are_nested_splits_by_page_and_the_swap_moves_every_source(tmp_path, man_roots, micro_base):
    en, ja = man_roots
    cfg = load_study(*study_args(tmp_path / "s", en, ja, micro_base, tmp_path))
    files = grid.prepare_data(cfg, tmp_path / "data")

    def read(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    subsets = [read(files.sizes[n]) for n in (8, 16, 32)]
    assert [len(s) for s in subsets] == [8, 16, 32]
    assert subsets[0] == subsets[1][:8] and subsets[1] == subsets[2][:16]  # each smaller set is part of the larger
    assert subsets[2] == read(files.folder / "train.jsonl")[:32]
    train, dev, evaluation = read(files.folder / "train.jsonl"), read(files.dev), read(files.eval)
    pages = {
        split: {r["page"] for r in records} for split, records in (("train", train), ("dev", dev), ("eval", evaluation))
    }
    assert len(pages["eval"]) == 4 and len(pages["dev"]) == 2
    assert (
        not (pages["eval"] & pages["train"])
        and not (pages["eval"] & pages["dev"])
        and not (pages["dev"] & pages["train"])
    )
    assert sorted(files.excluded_pages) == sorted(pages["eval"] | pages["dev"])
    swapped = read(files.eval_swapped)
    assert [r["output"] for r in swapped] == [r["output"] for r in evaluation]
    assert all(s["input"] != e["input"] for s, e in zip(swapped, evaluation, strict=True))
    assert sorted(r["input"] for r in swapped) == sorted(r["input"] for r in evaluation)
    again = grid.prepare_data(cfg, tmp_path / "data")  # kept: the same files
    assert again.sizes == files.sizes and read(again.eval) == evaluation


def test_the_contamination_check_finds_a_planted_overlap(tmp_path):
    items = [
        [
            "show every entry of the archive before it is sent to the printer queue",
            "記録をすべて表示してから印刷待ちの列に送ります",
        ]
    ]
    index = contamination.Index(items, word_n=13, char_n=20)
    clean = "A manual page about something else entirely, with none of those words in that order."
    planted_en = "Intro. Show every entry of the archive before it is sent to the printer queue, then stop."
    planted_ja = "説明：記録をすべて表示してから印刷待ちの列に送ります。"
    assert index.hits([clean]) == set()
    assert index.hits([clean, planted_en]) == {0}  # 13 words in a row
    assert index.hits([planted_ja]) == {0}  # 20 characters in a row, spaces ignored
    assert index.hits(["記録をすべて表示してから印刷"]) == set()  # 14 characters: below the n-gram
    # a text too short for an n-gram is looked for whole
    short = contamination.Index([["output version information and exit", "バージョン情報を表示して終了する"]], 13, 20)
    assert short.short_items == {0}
    assert short.hits(["--version\n  Output version information and exit."]) == {0}
    assert short.hits(["このバージョン情報を表示して終了する。"]) == {0}
    assert short.hits(["output version information"]) == set()
    assert short.hits(["--version output version information and exit"], whole=False) == set()
    # in a corpus, the planted document is excluded (and listed), the others kept
    corpus_dir = tmp_path / "docs"
    corpus_dir.mkdir()
    (corpus_dir / "clean.txt").write_text(clean + "\n" + "More unrelated words. " * 20)
    (corpus_dir / "other.txt").write_text("Unrelated documentation text, number two. " * 20)
    (corpus_dir / "planted.txt").write_text(planted_en)
    overrides = [
        f"data.corpora=[{{name: docs, path: '{corpus_dir}', weight: 1.0}}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.1",
    ]
    recipe = grid.pretraining_recipe("pretrain-tiny", overrides)
    found_overrides, found = grid.decontaminated(recipe, [], index, tmp_path)
    assert found["docs"]["overlapping_documents"] == ["planted.txt"]
    (override,) = found_overrides
    listed = Path(override.split("=", 1)[1])
    assert override.startswith("data.corpora.0.exclude_from=") and listed.read_text() == "planted.txt\n"
    cleaned = grid.pretraining_recipe("pretrain-tiny", [*overrides, override])
    texts = [t for _, t in grid.corpus_documents(cleaned.data.corpora[0], cleaned.data, [])]
    assert len(texts) == 2 and index.hits(texts) == set()  # what would be trained on no longer overlaps


# ----------------------------------------------------------------------------------------------------------
# The whole study: killed, resumed, re-run, refused
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt")
    write_jsonl(
        root / "ja.jsonl", [{"text": f"{_ja_number(i)}番目の文書は日本語で書かれています。" * 3} for i in range(40)]
    )
    write_jsonl(root / "en.jsonl", [{"text": f"Document {i} is written in English words. " * 3} for i in range(40)])
    return root


@pytest.mark.slow
def test_a_killed_study_resumes_without_redoing_finished_cells(tmp_path, man_roots, micro_base, tiny_corpus):
    en, ja = man_roots
    out = tmp_path / "study"
    argv = [sys.executable, str(REPO / "finetune" / "study.py"), *study_args(out, en, ja, micro_base, tiny_corpus)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    cells = out / "cells"
    deadline = time.time() + 400
    while time.time() < deadline and len(list(cells.glob("*/*/eval/results.json"))) < 2:
        assert first.poll() is None, first.stderr.read()[-3000:]
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the study and the job it was running, mid-study: some cells finished
    first.wait()
    finished = {p: p.stat().st_mtime_ns for p in cells.glob("*/*/eval/results.json")}
    assert len(finished) >= 2
    second = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    skipped = re.search(r"(\d+) finished earlier \(skipped\)", second.stderr)
    assert skipped and int(skipped.group(1)) >= len(finished), second.stderr[-3000:]  # the CPT job and those cells
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # finished cells were not run again
    assert len(list(cells.glob("*/*/eval/results.json"))) == 2 * 4  # base and CPT arms, N = 0, 8, 16, 32
    for name in ("results.csv", "results.json", "study.png", "report.md"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert {c["arm"] for c in results["cells"]} == {"base", "cpt-target-2"}
    assert results["contamination"]["fine-tuning set"]["items"] == 0
    gains = results["analysis"]["gains"]["cpt-target-2"]
    assert gains["crossover"]["status"] in ("within", "extrapolated", "never", "below-at-start")
    assert "## Answer" in (out / "report.md").read_text()

    # again: every job skipped, the analysis redone in seconds
    started = time.time()
    third = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "0 to run" in third.stderr, third.stderr[-3000:]
    assert time.time() - started < 120

    # a key that decides the finished cells' results, changed: refused, naming it
    changed = subprocess.run(argv + ["eval.max_new_tokens=5"], cwd=REPO, env=env, capture_output=True, text=True)
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert re.search(r"eval\.tasks\.2\.max_new_tokens was 4, now 5", changed.stderr), changed.stderr[-2000:]


def test_a_changed_key_is_named_and_a_harmless_one_is_not(tmp_path, man_roots, micro_base):
    from finetune.config.sft import SFTRecipe

    en, ja = man_roots
    cfg = load_study(*study_args(tmp_path / "s", en, ja, micro_base, tmp_path))
    cell = grid.cells(cfg, tmp_path / "s")[1]

    def keys(*sft_overrides):
        sft = config.to_dict(config.load(["recipe=study-sft", *sft_overrides], SFTRecipe)[0])
        return grid.cell_record(cell, sft, {"tasks": []}, {}, grid.data_keys(cfg))

    grid.record(cell, keys())
    cell.eval_dir.mkdir(parents=True)
    (cell.eval_dir / "results.json").write_text("{}")
    grid.check_finished([(cell, keys("training.log_every=3", "training.eval_batch_size=2"))])  # logging, batching
    with pytest.raises(RecipeError, match=r"sft\.training\.learning_rate was 0\.001, now 0\.002"):
        grid.check_finished([(cell, keys("training.learning_rate=2e-3"))])
    other = load_study(*study_args(tmp_path / "s", en, ja, micro_base, tmp_path, "data.eval_pages=5"))
    with pytest.raises(RecipeError, match=r"data\.data\.eval_pages was 4, now 5"):
        grid.check_data([cell], grid.data_keys(other))


def test_a_finished_pretraining_run_is_reused_only_under_its_recipe(tmp_path):
    import yaml

    recipe = grid.pretraining_recipe("pretrain-tiny", [f"training.output_dir={tmp_path}"])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config.to_dict(recipe)))
    (tmp_path / "metrics.json").write_text("{}")
    grid.check_pretrained("the base", tmp_path, grid.pretraining_recipe("pretrain-tiny", ["training.log_every=5"]))
    other = grid.pretraining_recipe("pretrain-tiny", ["data.corpora.1.exclude_from=/x/exclude-ja-123.txt"])
    with pytest.raises(RecipeError, match=r"the base .* data\.corpora\.1\.exclude_from was None, now '/x/exclude"):
        grid.check_pretrained("the base", tmp_path, other)


@pytest.mark.parametrize("name", config.available("study"))
def test_every_study_recipe_parses(name):
    cfg, file = config.load([f"recipe={name}"], StudyRecipe)
    assert file.parent.name == "study" and f"finetune/study.py recipe={name}" in file.read_text().split("\n\n")[0]
    assert cfg.sft.sizes and cfg.cpt.steps
    sft = config.load(
        [f"recipe={cfg.sft.recipe}", *cfg.sft.overrides],
        __import__("finetune.config.sft", fromlist=["SFTRecipe"]).SFTRecipe,
    )[0]
    assert sft.data.datasets


def test_the_scratch_arm_has_the_bases_shape_and_tokenizer_and_fresh_weights(micro_base, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.study import make_scratch

    make_scratch(str(micro_base), str(tmp_path / "scratch"), seed=123)
    base = AutoModelForCausalLM.from_pretrained(micro_base)
    scratch = AutoModelForCausalLM.from_pretrained(tmp_path / "scratch")
    assert scratch.config.to_dict() | {"_name_or_path": ""} == base.config.to_dict() | {"_name_or_path": ""}
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "scratch").get_vocab()
        == AutoTokenizer.from_pretrained(micro_base).get_vocab()
    )
    weight = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(scratch.state_dict()[weight], base.state_dict()[weight])
    assert json.loads((tmp_path / "scratch" / "lineage.json").read_text())["stage"] == "scratch"
