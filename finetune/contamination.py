"""Contamination check: which evaluation items share text with what a model trains on (a pretraining or CPT corpus,
a fine-tuning set). English is compared in word n-grams (13, as GPT-3's decontamination), Japanese, which has no
spaces between words, in character n-grams. A text too short for its n-gram is looked for whole, as a substring:
"output version information and exit" has 5 words, and a corpus of coreutils pages holds it many times over.
Written here because the study needs counts per corpus over local caches; the decontamination tools around
(lm-eval's, dolma's) index whole datasets for other purposes."""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def word_ngrams(text: str, n: int) -> set[str]:
    found = words(text)
    return {" ".join(found[i : i + n]) for i in range(len(found) - n + 1)}


def char_ngrams(text: str, n: int) -> set[str]:
    text = _SPACE.sub("", text)
    return {text[i : i + n] for i in range(len(text) - n + 1)}


class Index:
    """The evaluation items' n-grams, each mapped to the items that hold it; and each text too short for an n-gram,
    whole (its words joined by single spaces; Japanese without spaces)."""

    def __init__(self, items: list[list[str]], word_n: int, char_n: int):
        self.word_n, self.char_n, self.size = word_n, char_n, len(items)
        self.words: dict[str, set[int]] = {}
        self.chars: dict[str, set[int]] = {}
        self.short_words: dict[str, set[int]] = {}
        self.short_chars: dict[str, set[int]] = {}
        for i, texts in enumerate(items):
            for text in texts:
                if _JAPANESE.search(text):
                    table = self.chars if len(_SPACE.sub("", text)) >= char_n else self.short_chars
                    grams = char_ngrams(text, char_n) or {_SPACE.sub("", text)}
                else:
                    table = self.words if len(words(text)) >= word_n else self.short_words
                    grams = word_ngrams(text, word_n) or {" ".join(words(text))}
                for g in grams:
                    if g:
                        table.setdefault(g, set()).add(i)

    @property
    def short_items(self) -> set[int]:
        """Items with a text too short for its n-gram (checked whole instead)."""
        return {i for table in (self.short_words, self.short_chars) for items in table.values() for i in items}

    def items_in(self, text: str, whole: bool = True) -> set[int]:
        """The evaluation items sharing an n-gram with `text` (and, with `whole`, whose short texts it contains)."""
        found: set[int] = set()
        for g in word_ngrams(text, self.word_n) & self.words.keys():
            found |= self.words[g]
        japanese = bool(_JAPANESE.search(text))
        if self.chars and japanese:
            for g in char_ngrams(text, self.char_n) & self.chars.keys():
                found |= self.chars[g]
        if whole and self.short_words:
            joined = " " + " ".join(words(text)) + " "
            for g, items in self.short_words.items():
                if f" {g} " in joined:
                    found |= items
        if whole and self.short_chars and japanese:
            squeezed = _SPACE.sub("", text)
            for g, items in self.short_chars.items():
                if g in squeezed:
                    found |= items
        return found

    def hits(self, documents: Iterable[str], whole: bool = True) -> set[int]:
        """The evaluation items sharing text with any of `documents`."""
        found: set[int] = set()
        for doc in documents:
            found |= self.items_in(doc, whole)
        return found
