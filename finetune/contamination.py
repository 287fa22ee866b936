"""Contamination check: how many evaluation items share an n-gram with a text the model trains on (a pretraining or
CPT corpus, a fine-tuning set). English is compared in word n-grams (13, as GPT-3's decontamination), Japanese, which
has no spaces between words, in character n-grams. Written here because the study needs counts per corpus over
local caches; the decontamination tools around (lm-eval's, dolma's) index whole datasets for other purposes."""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")


def word_ngrams(text: str, n: int) -> set[str]:
    words = _WORD.findall(text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def char_ngrams(text: str, n: int) -> set[str]:
    text = _SPACE.sub("", text)
    return {text[i : i + n] for i in range(len(text) - n + 1)}


class Index:
    """The n-grams of the evaluation items, each mapped to the items that hold it."""

    def __init__(self, items: list[list[str]], word_n: int, char_n: int):
        self.word_n, self.char_n, self.size = word_n, char_n, len(items)
        self.words: dict[str, set[int]] = {}
        self.chars: dict[str, set[int]] = {}
        for i, texts in enumerate(items):
            for text in texts:
                for g in word_ngrams(text, word_n):
                    self.words.setdefault(g, set()).add(i)
                if _JAPANESE.search(text):
                    for g in char_ngrams(text, char_n):
                        self.chars.setdefault(g, set()).add(i)

    def items_in(self, text: str) -> set[int]:
        """The evaluation items sharing at least one n-gram with `text`."""
        found: set[int] = set()
        for g in word_ngrams(text, self.word_n) & self.words.keys():
            found |= self.words[g]
        if self.chars and _JAPANESE.search(text):
            for g in char_ngrams(text, self.char_n) & self.chars.keys():
                found |= self.chars[g]
        return found

    def hits(self, documents: Iterable[str]) -> set[int]:
        """The evaluation items sharing at least one n-gram with any of `documents`."""
        found: set[int] = set()
        for doc in documents:
            found |= self.items_in(doc)
        return found
