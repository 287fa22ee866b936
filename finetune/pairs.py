"""English -> Japanese translation pairs from manual pages: Debian's `manpages` (English) and `manpages-ja` (their
Japanese translations) describe the same commands, so a page present in both yields aligned text:

- options matched by their flag (`-a, --all` -> its description in each language);
- the NAME line's summary (`ls - list directory contents` / `ls - ディレクトリの内容をリスト表示する`);
- DESCRIPTION paragraphs aligned by order, where both pages have as many.

Pairs are filtered (the Japanese side mostly Japanese, lengths and their ratio within bounds), deduplicated, and
split by page, so no evaluation page contributes a training or dev pair: the study's task, read at run time from the
installed packages, nothing copied into the repository. Written here because no library aligns manual pages.
"""

from __future__ import annotations

import logging
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import DataError

log = logging.getLogger(__name__)

EN_ROOT, JA_ROOT = Path("/usr/share/man"), Path("/usr/share/man/ja")
SECTIONS = "man[1-8]/*"
HEADINGS = {"name": ("NAME", "名前"), "description": ("DESCRIPTION", "説明")}
INSTRUCTION = "Translate into Japanese."
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")
_FLAG = re.compile(r"-{1,2}[A-Za-z0-9][\w-]*")
_TABLE = re.compile(r"\btab\(|\bT\{|\bT\}")


@dataclass
class PairFilter:
    min_japanese_share: float = 0.2
    min_source_words: int = 3
    max_source_words: int = 60
    max_target_chars: int = 300
    min_ratio: float = 0.15
    max_ratio: float = 2.0
    """Bounds on (Japanese characters) / (English characters): a translation is shorter in characters, never ten
    times shorter or twice as long."""

    def keep(self, en: str, ja: str) -> bool:
        if _TABLE.search(en) or _TABLE.search(ja):  # tbl source that groff printed raw: a layout, not prose
            return False
        words = len(en.split())
        chars = ja.replace(" ", "")
        if not self.min_source_words <= words <= self.max_source_words:
            return False
        if not 4 <= len(chars) <= self.max_target_chars:
            return False
        if len(_JAPANESE.findall(chars)) < self.min_japanese_share * len(chars):
            return False
        return self.min_ratio <= len(chars) / len(en.replace(" ", "")) <= self.max_ratio


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def parse(lines: list[str]) -> dict:
    """A rendered page's NAME summary, DESCRIPTION paragraphs and options ({flag: description}). groff puts section
    headings at column 0, text at 7, an option's tag at 7 and its description at 14 (on the tag's line after two
    spaces when the tag is short)."""
    out: dict = {"name": None, "paragraphs": [], "options": {}}
    described: dict[str, int] = {}
    heading, option, paragraph = None, None, None
    paragraphs: list[list[str]] = []

    def close_section():
        texts = [_clean(" ".join(p)) for p in paragraphs]
        if heading in HEADINGS["name"] and texts:
            parts = re.split(r"\s[-\u2010-\u2015\u2212]\s", texts[0], maxsplit=1)
            out["name"] = parts[1] if len(parts) == 2 else None
        if heading in HEADINGS["description"]:
            out["paragraphs"] = texts

    for line in lines[1:-1]:  # the running header and footer
        text, indent = line.strip(), _indent(line)
        if not text:
            paragraph = None
            continue
        if indent == 0:
            close_section()
            heading, option, paragraph, paragraphs = text, None, None, []
        elif indent <= 7 and _FLAG.match(text):
            flag = _FLAG.match(text).group()
            option, paragraph = [flag, re.split(r"\s{2,}", text, maxsplit=1)[1:]], None
            described[flag] = described.get(flag, 0) + 1
            out["options"][flag] = option
        elif indent >= 14 and option is not None:
            option[1].append(text)
        else:
            option = None
            if paragraph is None:
                paragraph = []
                paragraphs.append(paragraph)
            paragraph.append(text)
    close_section()
    # a flag described twice on one page can't be aligned; nor can a tag with no description
    out["options"] = {f: _clean(" ".join(o[1])) for f, o in out["options"].items() if described[f] == 1 and o[1]}
    return out


def align(en: dict, ja: dict) -> list[tuple[str, str, str]]:
    """(kind, English, Japanese) pairs of one page."""
    pairs = []
    if en["name"] and ja["name"]:
        pairs.append(("name", en["name"], ja["name"]))
    for flag, text in en["options"].items():
        if flag in ja["options"]:
            pairs.append((f"option {flag}", text, ja["options"][flag]))
    if en["paragraphs"] and len(en["paragraphs"]) == len(ja["paragraphs"]):
        pairs += [("paragraph", e, j) for e, j in zip(en["paragraphs"], ja["paragraphs"], strict=True)]
    return pairs


def common_pages(en_root: Path = EN_ROOT, ja_root: Path = JA_ROOT) -> list[str]:
    """Pages (`man1/ls.1.gz`) installed in both languages, sorted; a page that is a link to another (Debian links
    `domainname.1` to `hostname.1`) counts once, as the page it links to."""
    ja = {str(p.relative_to(ja_root)) for p in ja_root.glob(SECTIONS) if p.is_file()}
    found, seen = [], set()
    for page in sorted(ja, key=lambda p: ((ja_root / p).is_symlink(), p)):  # real files first
        if not (en_root / page).is_file():
            continue
        real = ((ja_root / page).resolve(), (en_root / page).resolve())
        if real not in seen:
            seen.add(real)
            found.append(page)
    return sorted(found)


def page_pairs(page: str, en_root: Path = EN_ROOT, ja_root: Path = JA_ROOT) -> list[tuple[str, str, str]]:
    from finetune.corpus import groff_lines

    en, ja = groff_lines(en_root / page), groff_lines(ja_root / page)
    if not en or not ja:  # an alias page in either language
        return []
    return align(parse(en), parse(ja))


def build(
    eval_pages: int,
    dev_pages: int,
    seed: int,
    keep: PairFilter,
    en_root: Path = EN_ROOT,
    ja_root: Path = JA_ROOT,
) -> dict:
    """{"train", "dev", "eval": [pair records], "pages": {split: [page names]}, "stats": counts}. Pages are split
    first (seeded), then pairs deduplicated: within a split by English text, and any training or dev pair whose
    English or Japanese text is also an evaluation pair's is dropped (counted)."""
    pages = common_pages(en_root, ja_root)
    if not pages:
        raise DataError(
            f"no manual page is installed in both {en_root} and {ja_root}: the study's translation pairs come from "
            "Debian's manpages and manpages-ja (apt-get install manpages manpages-ja groff-base)"
        )
    with ThreadPoolExecutor(max_workers=4) as pool:  # groff runs as a subprocess: threads overlap them
        found = dict(zip(pages, pool.map(lambda p: page_pairs(p, en_root, ja_root), pages), strict=True))
    stats = {"pages_in_both": len(pages), "pairs_aligned": sum(len(v) for v in found.values())}
    kept = {
        page: [{"page": page, "kind": k, "en": en, "ja": ja} for k, en, ja in pairs if keep.keep(en, ja) and en != ja]
        for page, pairs in found.items()
    }
    useful = sorted(p for p, pairs in kept.items() if pairs)
    stats["pairs_after_filter"] = sum(len(v) for v in kept.values())
    stats["pages_with_pairs"] = len(useful)
    if len(useful) < eval_pages + dev_pages + 1:
        raise DataError(
            f"only {len(useful)} pages yield translation pairs; the study asks for {eval_pages} evaluation and "
            f"{dev_pages} dev pages and some for training"
        )
    order = useful[:]
    random.Random(seed).shuffle(order)
    split_pages = {
        "eval": sorted(order[:eval_pages]),
        "dev": sorted(order[eval_pages : eval_pages + dev_pages]),
        "train": sorted(order[eval_pages + dev_pages :]),
    }
    out: dict = {"pages": split_pages, "stats": stats}
    held: set[str] = set()
    for split in ("eval", "dev", "train"):
        seen: set[str] = set()
        records, dropped = [], 0
        for page in split_pages[split]:
            for r in kept[page]:
                if r["en"] in seen:
                    continue
                if split != "eval" and (r["en"] in held or r["ja"] in held):
                    dropped += 1
                    continue
                seen.add(r["en"])
                records.append(r)
        if split == "eval":
            held = {r["en"] for r in records} | {r["ja"] for r in records}
        else:
            stats[f"{split}_pairs_dropped_as_evaluation_text"] = dropped
        out[split] = records
        stats[f"{split}_pairs"] = len(records)
        stats[f"{split}_pages"] = len(split_pages[split])
    log.info(
        "translation pairs from %d pages in both languages: %d train (%d pages), %d dev (%d), %d eval (%d)",
        len(pages),
        stats["train_pairs"],
        stats["train_pages"],
        stats["dev_pairs"],
        stats["dev_pages"],
        stats["eval_pairs"],
        stats["eval_pages"],
    )
    return out


def as_instruction(record: dict, source: str | None = None) -> dict:
    """A pair as an Alpaca record (instruction, input, output); `source` replaces the English input (the study's
    swapped-source control)."""
    return {"instruction": INSTRUCTION, "input": source or record["en"], "output": record["ja"], "page": record["page"]}
