"""From each model's raw task results to metric rows (value per model, the difference model - compare with a paired
bootstrap 95% interval over the task's items), and the files: results.json, results.md, generations.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from finetune.evaluation import metrics as M

ROLES = ("model", "compare")


def _row(metric, n, values, stats, score, samples, seed, lower_is_better=False, note=None, difference=None) -> dict:
    """One metric: each model's value; with two models, the difference (by default of the values) and its interval
    over the paired items."""
    row = {"metric": metric, "n": n, "lower_is_better": lower_is_better} | dict(values)
    if len(values) == 2:
        row["difference"] = values["model"] - values["compare"] if difference is None else difference
        ci = M.paired_bootstrap(stats["model"], stats["compare"], score, samples, seed) if stats else None
        row["ci95"] = list(ci) if ci else None
    if note:
        row["note"] = note
    return row


def loss_rows(results: dict, samples: int, seed: int) -> list[dict]:
    common = sorted(set.intersection(*(set(r["items"]) for r in results.values())))
    stats = {}
    for role, r in results.items():
        where = {item: k for k, item in enumerate(r["items"])}
        stats[role] = r["stats"][[where[i] for i in common]]
    nll = {role: r["nll"] for role, r in results.items()}
    n = min(r["n"] for r in results.values())
    notes, difference = [], None
    if len(results) == 2:
        difference = M.ratio_score(stats["model"]) - M.ratio_score(stats["compare"])
        if any(len(r["items"]) != len(common) for r in results.values()):
            notes.append(f"the models kept different examples; the difference is over the {len(common)} both scored")
        if not np.array_equal(stats["model"][:, 1], stats["compare"][:, 1]):
            notes.append(
                "the two tokenizers split the responses into different tokens, so NLL per token does not compare "
                "between them"
            )
    note = "; ".join(notes) or None
    rows = [_row("nll", n, nll, stats, M.ratio_score, samples, seed, True, note, difference)]
    ppl = {role: math.exp(min(v, 50)) for role, v in nll.items()}
    rows.append(_row("perplexity", n, ppl, None, None, 0, seed, lower_is_better=True))
    return rows


def generation_rows(task, results: dict, samples: int, seed: int) -> tuple[list[dict], dict]:
    """Rows for the task's metrics, and how BLEU tokenised (language, tokenizer, a note on any fallback)."""
    references = next(iter(results.values()))["references"]
    language = task.language if task.language != "auto" else M.language_of(references)
    rows, info = [], {"language": language}
    n = len(references)
    for metric in task.metrics:
        if metric in ("exact_match", "char_f1"):
            per_item = getattr(M, metric)
            stats = {
                role: np.array([per_item(p, ref) for p, ref in zip(r["predictions"], references, strict=True)])
                for role, r in results.items()
            }
            values = {role: float(s.mean()) for role, s in stats.items()}
            rows.append(_row(metric, n, values, stats, M.mean_score, samples, seed))
            continue
        if metric == "chrf":
            from sacrebleu.metrics import CHRF

            scorer, note = CHRF(), None
        else:
            scorer, info["bleu_tokenizer"], note = M.bleu_metric(language)
            if note:
                info["bleu_note"] = note
        stats = {role: M.corpus_statistics(scorer, r["predictions"], references) for role, r in results.items()}
        values = {role: M.corpus_score(scorer, s) for role, s in stats.items()}
        rows.append(
            _row(metric, n, values, stats, lambda s, scorer=scorer: M.corpus_score(scorer, s), samples, seed, note=note)
        )
    return rows, info


def harness_rows(results: dict, samples: int, seed: int) -> list[dict]:
    rows = []
    for name in next(iter(results.values())):
        for metric in results["model"][name]["metrics"]:
            values = {role: r[name]["metrics"][metric] for role, r in results.items()}
            stats = {role: r[name]["samples"].get(metric) for role, r in results.items()}
            paired = all(s is not None for s in stats.values()) and len({len(s) for s in stats.values()}) == 1
            rows.append(
                _row(
                    f"{name}/{metric}",
                    results["model"][name]["n"],
                    values,
                    stats if paired else None,
                    M.mean_score,
                    samples,
                    seed,
                )
            )
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def markdown(results: dict) -> str:
    models = results["models"]
    two = "compare" in models
    title = f"{models['model']['path']}" + (f" vs {models['compare']['path']}" if two else "")
    lines = [f"# Evaluation: {title}", ""]
    for role, info in models.items():
        lines.append(f"- **{role}**: `{info['path']}` ({info['kind']})")
    lines.append("")
    for name, task in results["tasks"].items():
        header = f"## {name} ({task['type']}"
        if "n" in task:
            header += f", {task['n']} examples"
        if "rendering" in task:
            header += f", prompt style {task['rendering']['prompt_style']} from {task['rendering']['source']}"
        lines += [header + ")", ""]
        cols = ["metric", "model"] + (["compare", "model - compare (95% CI)"] if two else []) + ["n"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in task["rows"]:
            better = " (lower is better)" if row["lower_is_better"] else ""
            cells = [row["metric"] + better, _fmt(row["model"])]
            if two:
                ci = row.get("ci95")
                diff = _fmt(row["difference"]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
                cells += [_fmt(row["compare"]), diff]
            lines.append("| " + " | ".join(cells + [str(row["n"])]) + " |")
        speed = [
            f"{role} {run['examples_per_s']:.1f} examples/s, {run['tokens_per_s']:.0f} tokens/s"
            for role, run in task.get("runs", {}).items()
            if run.get("examples_per_s")
        ]
        notes = [row["note"] for row in task["rows"] if row.get("note")] + [
            v for k, v in task.get("scoring", {}).items() if k.endswith("note")
        ]
        if speed:
            lines += ["", "Speed: " + "; ".join(speed) + "."]
        for note in dict.fromkeys(notes):
            lines += ["", f"Note: {note}."]
        lines.append("")
    return "\n".join(lines)


def write(out: Path, results: dict, generations: list[dict], items: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    for name, rows in (("generations.jsonl", generations), ("items.jsonl", items)):
        with (out / name).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
