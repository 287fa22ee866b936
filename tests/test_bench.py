"""Each benchmark runs end to end (a few steps on a 2-layer model) and prints what it promises; the timings
themselves are the benchmarks' business, never a test's."""

import os
import re
import subprocess
import sys

from .conftest import REPO
from .test_pretrain import corpus_dir, pretrain_args  # noqa: F401  (corpus_dir is a fixture)


def bench(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


def test_sft_benchmark_runs_each_trainer_and_prints_its_ratios():
    out = bench(
        "bench/sft_throughput.py",
        *(
            "--model",
            "builtin:micro-llama",
            "--steps",
            "2",
            "--max-length",
            "128",
            "--bases",
            "qlora",
            "--no-warmup",
            "--layouts",
            "packed,unpacked",
        ),
    )
    rows = {tuple(line.split()[:3]): line.split() for line in out.splitlines() if re.match(r"(unpacked|packed) ", line)}
    expected = {(layout, "qlora", name) for layout in ("packed", "unpacked") for name in ("suite", "trl", "standard")}
    assert set(rows) == expected, out
    assert all(int(r[3]) > 0 and float(r[4]) > 0 and float(r[6]) > 0 for r in rows.values()), out  # tokens, tok/s, GB
    # same batches, same weights: the three losses agree (unpacked: the suite without padding, the others padded)
    for layout in ("packed", "unpacked"):
        losses = [float(rows[(layout, "qlora", name)][8]) for name in ("suite", "trl", "standard")]
        assert max(losses) - min(losses) < 1e-4, out
        for name in ("trl", "standard"):
            assert re.search(rf"{layout} qlora vs {name}: \d+\.\d\dx tokens/s, \d+\.\d\dx peak memory", out), out


def test_pretrain_benchmark_runs_both_loops_from_the_same_weights(corpus_dir, tmp_path):  # noqa: F811
    argv = pretrain_args(corpus_dir, tmp_path / "x")
    out = bench("bench/pretrain_throughput.py", *argv, "--steps", "4", "--skip", "1", "--repeats", "1")
    losses = {
        name: (float(m.group(1)), float(m.group(2)))
        for name in ("finetune/pretrain.py", "transformers Trainer")
        if (m := re.search(rf"{re.escape(name)}.*?(\d+\.\d+) -> (\d+\.\d+)$", out, re.MULTILINE))
    }
    assert len(losses) == 2, out
    ours, trainer = losses.values()
    # same weights, same first batch; the Trainer's model shifts labels inside each block, so it scores one target
    # fewer per block than our loop: close, not equal
    assert abs(ours[0] - trainer[0]) < 1e-2, out
    assert re.search(r"ratio \(ours / Trainer\): \d+\.\d\dx tokens/s", out), out


def test_eval_benchmark_scores_both_ways_and_compares_the_answers(micro_base):
    out = bench(
        "bench/eval_throughput.py",
        *("--model", str(micro_base), "--loss-examples", "16", "--prompts", "8", "--max-new-tokens", "4"),
        *("--baseline-share", "0.5"),
    )
    rows = {tuple(line.split()[:2]) for line in out.splitlines() if re.match(r"(loss|generation) ", line)}
    assert {("loss", "batched"), ("loss", "one"), ("generation", "batched"), ("generation", "one")} <= rows, out
    assert re.search(r"loss: batched / one at a time = \d+\.\d\dx", out), out
    assert "greedy answers equal batched and one at a time: 4 of 4" in out, out


def test_dpo_benchmark_runs_both_reference_modes_to_the_same_loss(micro_base):
    out = bench(
        "bench/dpo_throughput.py",
        *("--model", str(micro_base), "--pairs", "4", "--batch", "2", "--max-length", "96"),
    )
    lines = [line for line in out.splitlines() if re.match(r"(per step|precomputed) +\d", line)]
    rows = {("per step" if line.startswith("per step") else "precomputed"): line.split() for line in lines}
    assert set(rows) == {"per step", "precomputed"}, out
    # the same pairs, the same reference values: the same loss either way
    assert abs(float(rows["per step"][-1]) - float(rows["precomputed"][-1])) < 1e-4, out
    assert re.search(r"precomputed / per step: \d+\.\d\dx pairs/s", out), out
