"""Scores of generated text against references, and the paired bootstrap that puts an interval on a difference.

- exact_match, char_f1: per example, after NFKC normalisation (full-width ＡＢＣ１ = ABC1) and whitespace folding;
  char_f1 is the character-overlap F1 that Japanese QA uses (JSQuAD), where words have no spaces between them.
- chrF and BLEU: sacrebleu's, at corpus level. BLEU tokenises Japanese with MeCab and the IPA dictionary
  (`ja-mecab`, the `ja` extra), English with `13a` (sacrebleu's default, as WMT reports); chrF needs no tokenizer.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable

import numpy as np

_SPACE = re.compile(r"\s+")
# Hiragana, katakana (half-width folds into them under NFKC) and CJK ideographs
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def char_f1(prediction: str, reference: str) -> float:
    """F1 of the characters the two share (as multisets), spaces ignored."""
    pred, ref = (Counter(normalise(t).replace(" ", "")) for t in (prediction, reference))
    common = sum((pred & ref).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def language_of(references: list[str]) -> str:
    """`ja` when at least a fifth of the references' non-space characters are kana or kanji, else `en`."""
    text = "".join(references).replace(" ", "")
    return "ja" if text and len(_JAPANESE.findall(text)) >= 0.2 * len(text) else "en"


def bleu_metric(language: str):
    """(sacrebleu BLEU, tokenizer name, note): Japanese gets `ja-mecab`; without MeCab and its IPA dictionary
    (pip install 'finetune[ja]') BLEU falls back to characters, and the note says so."""
    from sacrebleu.metrics import BLEU

    if language != "ja":
        return BLEU(tokenize="13a"), "13a", None
    try:
        return BLEU(tokenize="ja-mecab"), "ja-mecab", None
    except (RuntimeError, ImportError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        note = (
            f"ja-mecab unavailable ({first}; pip install 'finetune[ja]' for mecab-python3 and ipadic): "
            "Japanese BLEU computed on characters instead, not comparable with published ja-mecab scores"
        )
        return BLEU(tokenize="char"), "char", note


def corpus_statistics(metric, predictions: list[str], references: list[str]) -> np.ndarray:
    """Per-example sufficient statistics of a sacrebleu metric (n-gram matches and totals), so that a corpus score
    of any subset is a sum and one call. These are the private methods sacrebleu's own paired bootstrap
    (sacrebleu.significance) uses; sacrebleu has no public per-example statistics."""
    return np.asarray(metric._extract_corpus_statistics(predictions, [references]))


def corpus_score(metric, statistics: np.ndarray) -> float:
    return float(metric._compute_score_from_stats(statistics.sum(0)).score)


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, score: Callable[[np.ndarray], float], samples: int, seed: int
) -> tuple[float, float] | None:
    """95% interval of score(a) - score(b) over resamples of the items (rows, the same rows for both: the two models
    answered the same items), percentile method. None with fewer than 2 items or 0 samples."""
    if samples <= 0 or len(a) < 2:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(samples, len(a)))
    diffs = np.array([score(a[p]) - score(b[p]) for p in picks])
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def mean_score(statistics: np.ndarray) -> float:
    return float(statistics.mean())


def ratio_score(statistics: np.ndarray) -> float:
    """Column 0 summed over column 1 summed: a token-weighted mean (NLL per token)."""
    return float(statistics[:, 0].sum() / max(statistics[:, 1].sum(), 1))
