"""Pretraining corpora: documents from local files, manual pages or Hub datasets (streamed), tokenised once
into a flat token stream on disk (EOS after every document), read back as packed fixed-length blocks
through a memory map; a held-out validation split per corpus; a deterministic, resumable mixture.

Three caches under `data.cache_dir`, each written to a temporary folder and renamed when complete:

    text/NAME-KEY/      train.jsonl, val.jsonl, meta.json   documents as text (source + split decided here)
    tokenizer/KEY/      a tokenizer trained on the corpora's training text (when the recipe trains one)
    tokens/NAME-KEY/    train.bin, val.bin, meta.json       token ids (uint16 below 65,536 ids, else uint32)

A key hashes what the cache was made from (paths, sizes and times of the files, the Hub dataset, the
tokenizer), so editing a corpus or switching tokenizer rebuilds only what changed; continued pretraining
with the base's tokenizer reuses the base's tokenised corpora.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from finetune.config.pretrain import CorpusConfig, CorpusSpec, TokenizerConfig
from finetune.errors import DataError, HubUnreachableError
from finetune.offline import is_hub_id

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".text"}
RECORD_SUFFIXES = {".jsonl", ".json", ".parquet"}
MAN_HINT = (
    "manual pages are read from the system, where Debian's packages put them: "
    "apt-get install manpages manpages-ja groff-base"
)
CHUNK = 256  # documents rendered / tokenised per batch
VERSION = 1  # part of every cache key: bump it when what a cache holds changes


# ----------------------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------------------


def local_files(spec: CorpusSpec) -> list[Path]:
    """The files a local corpus names (a file, a folder searched recursively, or a glob), sorted."""
    path = os.path.expanduser(spec.path)
    if glob.has_magic(path):
        files = [Path(f) for f in glob.glob(path, recursive=True)]
    elif Path(path).is_dir():
        files = list(Path(path).rglob("*"))
    else:
        files = [Path(path)] if Path(path).exists() else []
    return sorted(f for f in files if f.is_file())


def root_of(spec: CorpusSpec) -> Path:
    """The folder a corpus's documents are named relative to (so names, and the validation split chosen by
    them, don't depend on where the corpus is mounted)."""
    path = Path(os.path.expanduser(spec.path))
    if glob.has_magic(spec.path):
        parts = []
        for part in path.parts:
            if glob.has_magic(part):
                break
            parts.append(part)
        return Path(*parts)
    return path if path.is_dir() else path.parent


def file_format(spec: CorpusSpec, file: Path) -> str:
    if spec.format != "auto":
        return spec.format
    suffix = file.suffix.lower()
    if suffix == ".gz":
        suffix = Path(file.stem).suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in RECORD_SUFFIXES:
        return "records"
    if re.fullmatch(r"\.[1-9]\w*", suffix):  # ls.1.gz, printf.3p.gz
        return "man"
    raise DataError(
        f"corpus '{spec.name}': don't know how to read {file}: expected .txt/.md (one document), "
        ".jsonl/.json/.parquet (records) or a manual page (NAME.1-9[.gz]); or set its `format`"
    )


def groff_lines(file: Path) -> list[str] | None:
    """A roff manual page rendered by groff (the formatter man itself uses) as lines, indentation kept (section
    headings at column 0, text at 7, tagged paragraphs' bodies at 14), or None for an alias page (`.so other.1`),
    which only points at another page's text."""
    raw = file.read_bytes()
    if file.suffix == ".gz":
        raw = gzip.decompress(raw)
    if raw.lstrip().startswith(b".so "):
        return None
    try:  # -k: detect the input encoding (Japanese pages); wide lines, no hyphenation, ragged right
        out = subprocess.run(
            ["groff", "-k", "-Tutf8", "-man", "-P-cbou", "-rLL=150n", "-rHY=0", "-dAD=l"],
            input=raw,
            capture_output=True,
            timeout=60,
        ).stdout.decode("utf-8", "replace")
    except FileNotFoundError:
        raise DataError(f"groff is not installed, so manual page {file} can't be read; {MAN_HINT}") from None
    return out.splitlines()


def render_man(file: Path) -> str | None:
    """A roff manual page as plain text, or None for an alias page."""
    lines = groff_lines(file)
    if lines is None:
        return None
    body = [i for i, line in enumerate(lines) if line.strip()]
    if len(body) < 3:
        return ""
    lines = lines[body[0] + 1 : body[-1]]  # drop the running header and footer (NAME(1) ... NAME(1))
    text = "\n".join(
        re.sub(r"(?<=\S) {2,}", " ", line[7:] if line.startswith(" " * 7) else line.lstrip()) for line in lines
    )
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _records(spec: CorpusSpec, file: Path, name: str) -> Iterator[tuple[str, str]]:
    def text_of(record, index):
        value = record.get(spec.text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(
                f"corpus '{spec.name}', {file} record {index}: expected a string field "
                f"'{spec.text_field}' (set text_field), got {type(value).__name__}"
            )
        return value

    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(file)
            if spec.text_field not in table.column_names:
                raise DataError(
                    f"corpus '{spec.name}', {file}: no column '{spec.text_field}' (set text_field); "
                    f"columns: {', '.join(table.column_names)}"
                )
            for i, value in enumerate(table.column(spec.text_field).to_pylist()):
                yield f"{name}:{i}", text_of({spec.text_field: value}, i)
        elif suffix == ".json":
            records = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(records, list):
                raise DataError(f"corpus '{spec.name}', {file}: expected a JSON list of records")
            for i, record in enumerate(records):
                yield f"{name}:{i}", text_of(record, i)
        else:
            with file.open(encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"corpus '{spec.name}', {file} line {i + 1}: not JSON ({e})") from None
                        yield f"{name}:{i}", text_of(record, i)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"corpus '{spec.name}': could not read {file}: {e}") from None


def _hub_documents(spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    import datasets

    from finetune.offline import hub_message

    try:
        stream = datasets.load_dataset(
            spec.path, spec.hub_name, split=spec.split, revision=spec.revision, streaming=True
        )
        for i, record in enumerate(stream):
            value = record.get(spec.text_field)
            if not isinstance(value, str):
                raise DataError(
                    f"corpus '{spec.name}' ({spec.path}) record {i}: expected a string field "
                    f"'{spec.text_field}' (set text_field); fields: {', '.join(record)}"
                )
            yield str(i), value
    except (DataError, HubUnreachableError):
        raise
    except Exception as e:
        raise HubUnreachableError(hub_message(f"dataset '{spec.path}'", e)) from None


def documents(spec: CorpusSpec, seed: int, stats: dict) -> Iterator[tuple[str, str]]:
    """(name, text) of every document of a corpus, in a fixed order; counts what was skipped in `stats`."""
    if is_hub_id(spec.path):
        yield from _hub_documents(spec)
        return
    files = local_files(spec)
    if not files:
        hint = f"; {MAN_HINT}" if spec.format == "man" or "/man" in spec.path else ""
        raise DataError(f"corpus '{spec.name}': no files at '{spec.path}' (nothing matches){hint}")
    if spec.max_documents:  # a seeded random subset: shuffle the files, read until enough documents
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    formats = [file_format(spec, f) for f in files]
    root = root_of(spec)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(files), CHUNK):
            batch = list(zip(files[start : start + CHUNK], formats[start : start + CHUNK], strict=True))
            man = [f for f, fmt in batch if fmt == "man"]
            rendered = dict(zip(man, pool.map(render_man, man), strict=True))
            for file, fmt in batch:
                if fmt == "man":
                    if rendered[file] is None:
                        stats["alias_pages"] = stats.get("alias_pages", 0) + 1
                        continue
                    yield str(file.relative_to(root)), rendered[file]
                elif fmt == "text":
                    try:
                        yield str(file.relative_to(root)), file.read_text(encoding="utf-8")
                    except (OSError, UnicodeDecodeError) as e:
                        raise DataError(f"corpus '{spec.name}': could not read {file} as UTF-8 text: {e}") from None
                else:
                    yield from _records(spec, file, str(file.relative_to(root)))


def is_val(name: str, fraction: float) -> bool:
    """Held out by a hash of the document's name: the same documents in every run that reads this corpus."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) < fraction * 2**32


# ----------------------------------------------------------------------------------------------------------
# Caches
# ----------------------------------------------------------------------------------------------------------


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps([VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:12]


def _source_key(spec: CorpusSpec, cfg: CorpusConfig) -> str:
    source = [spec.path, spec.format, spec.text_field, spec.max_documents, cfg.nfkc, cfg.val_fraction, cfg.seed]
    if is_hub_id(spec.path):
        source += [spec.hub_name, spec.split, spec.revision]
    else:
        source += [(str(f), st.st_size, int(st.st_mtime)) for f in local_files(spec) for st in [f.stat()]]
    return _key(*source)


def _publish(tmp: Path, final: Path) -> Path:
    """Rename a finished cache into place; if another process got there first, keep theirs."""
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise
    return final


def _split_documents(spec: CorpusSpec, cfg: CorpusConfig, tmp: Path, stats: dict) -> None:
    """Write the corpus's documents into tmp/train.jsonl and tmp/val.jsonl, counting them in `stats`."""
    held_back = None  # the first training document, kept aside in case no other lands in the val split
    count = 0
    with (
        (tmp / "train.jsonl").open("w", encoding="utf-8") as train,
        (tmp / "val.jsonl").open("w", encoding="utf-8") as val,
    ):
        for name, text in documents(spec, cfg.seed, stats):
            if cfg.nfkc:
                text = unicodedata.normalize("NFKC", text)
            if not text.strip():
                stats["empty_documents"] += 1
                continue
            split = "val" if is_val(name, cfg.val_fraction) else "train"
            line = json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n"
            if held_back is None and split == "train":
                held_back = line
            else:
                (val if split == "val" else train).write(line)
                stats[f"{split}_documents"] += 1
            count += 1
            if spec.max_documents and count >= spec.max_documents:
                break
        if held_back is not None:
            split = "val" if stats["val_documents"] == 0 else "train"  # a tiny corpus still gets validation
            (val if split == "val" else train).write(held_back)
            stats[f"{split}_documents"] += 1


def extract_text(spec: CorpusSpec, cfg: CorpusConfig) -> Path:
    """Documents of one corpus as train.jsonl / val.jsonl, cached; their counts are logged on every run."""
    out = Path(cfg.cache_dir) / "text" / f"{spec.name}-{_source_key(spec, cfg)}"
    cached = (out / "meta.json").exists()
    if not cached:
        _build_text(spec, cfg, out)
    stats = json.loads((out / "meta.json").read_text())
    documents = stats["train_documents"] + stats["val_documents"]
    skipped = ", ".join(f"{stats[k]} {k.replace('_', ' ')}" for k in ("empty_documents", "alias_pages") if stats[k])
    log.info(
        "corpus %s: %d documents (%d training, %d validation) from %s%s%s",
        spec.name,
        documents,
        stats["train_documents"],
        stats["val_documents"],
        spec.path,
        f" (skipped: {skipped})" if skipped else "",
        " [cached]" if cached else "",
    )
    if spec.expect_documents and documents < spec.expect_documents:
        log.warning(
            "corpus %s has %d documents, far fewer than the %d expected (expect_documents): is the package "
            "that provides %s installed? (for manual pages: apt-get install manpages manpages-ja)",
            spec.name,
            documents,
            spec.expect_documents,
            spec.path,
        )
    return out


def _build_text(spec: CorpusSpec, cfg: CorpusConfig, out: Path) -> Path:
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    stats = {"train_documents": 0, "val_documents": 0, "empty_documents": 0, "alias_pages": 0}
    try:
        _split_documents(spec, cfg, tmp, stats)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a bad record mid-corpus leaves no half-written cache behind
        raise
    if stats["train_documents"] == 0:
        shutil.rmtree(tmp)
        found = stats["val_documents"] + stats["empty_documents"]
        raise DataError(
            f"corpus '{spec.name}' ({spec.path}) has {found} non-alias document(s), "
            f"{stats['empty_documents']} of them empty: it needs at least two non-empty documents "
            "(one is held out for validation)"
        )
    (tmp / "meta.json").write_text(json.dumps({"corpus": spec.name, "path": spec.path, **stats}, indent=2))
    return _publish(tmp, out)


def exclusions(spec: CorpusSpec) -> list[str]:
    """A corpus's `exclude` names and patterns, with those of its `exclude_from` file."""
    listed = list(spec.exclude)
    if spec.exclude_from:
        path = Path(spec.exclude_from)
        if not path.is_file():
            raise DataError(f"corpus '{spec.name}': exclude_from file {path} not found")
        listed += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(set(listed))


class _Excluded:
    """Names matched exactly through a set, patterns with wildcards one by one: lists of thousands of names cost
    one lookup per document."""

    def __init__(self, patterns):
        self.names = {p for p in patterns if not glob.has_magic(p)}
        self.patterns = [p for p in patterns if glob.has_magic(p)]

    def __call__(self, name: str) -> bool:
        return name in self.names or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)


def excluded(name: str, patterns: list[str]) -> bool:
    return _Excluded(patterns)(name)


def read_texts(text_dir: Path, split: str, exclude: list[str] = (), skipped: list | None = None) -> Iterator[str]:
    """The cached documents' texts, less those `exclude` names (each skipped name is appended to `skipped`)."""
    is_excluded = _Excluded(exclude)
    with (text_dir / f"{split}.jsonl").open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if exclude and is_excluded(record["name"]):
                if skipped is not None:
                    skipped.append(record["name"])
                continue
            yield record["text"]


def train_tokenizer(
    text_dirs: dict[str, Path],
    weights: dict[str, float],
    cfg: TokenizerConfig,
    cache_dir: str,
    exclude: dict[str, list[str]] | None = None,
):
    """Byte-level BPE (no character is ever unknown) trained on up to `train_chars` characters of the corpora's
    training text (less each corpus's `exclude`), shared by weight; cached."""
    from transformers import AutoTokenizer

    from finetune.tokenizer import train_bpe

    exclude = {n: sorted(p) for n, p in (exclude or {}).items() if p}
    total = sum(weights.values())
    budgets = {n: int(cfg.train_chars * w / total) for n, w in weights.items() if w > 0}
    parts = [cfg.vocab_size, budgets, {n: d.name for n, d in text_dirs.items()}] + ([exclude] if exclude else [])
    out = Path(cache_dir) / "tokenizer" / _key(*parts)
    if (out / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(out)

    def sample():
        for name, budget in budgets.items():
            for text in read_texts(text_dirs[name], "train", exclude.get(name, [])):
                yield text[:budget]
                budget -= len(text)
                if budget <= 0:
                    break

    log.info(
        "training a byte-level BPE tokenizer (vocabulary %d) on %s characters",
        cfg.vocab_size,
        f"{sum(budgets.values()):,}",
    )
    tokenizer = train_bpe(sample(), cfg.vocab_size)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    _publish(tmp, out)
    return AutoTokenizer.from_pretrained(out)


def tokenizer_key(tokenizer) -> str:
    return _key(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id)


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if len(tokenizer) <= 2**16 else np.dtype(np.uint32)


def tokenize(text_dir: Path, tokenizer, cfg: CorpusConfig, exclude: list[str] = ()) -> Path:
    """The corpus's documents (less `exclude`) as one token stream per split, EOS after each document; cached."""
    name = text_dir.name.rsplit("-", 1)[0]
    parts = [text_dir.name, tokenizer_key(tokenizer)] + ([sorted(exclude)] if exclude else [])
    out = Path(cfg.cache_dir) / "tokens" / f"{name}-{_key(*parts)}"
    if (out / "meta.json").exists():
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("excluded_documents"):
            log.info("corpus %s: %d documents excluded (exclude)", name, meta["excluded_documents"])
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    dtype, eos = token_dtype(tokenizer), tokenizer.eos_token_id
    meta = {"corpus": name, "dtype": dtype.name, "text": str(text_dir)}
    skipped: list[str] = []
    for split in ("train", "val"):
        chars = tokens = 0
        with (tmp / f"{split}.bin").open("wb") as f:
            texts = read_texts(text_dir, split, exclude, skipped)
            while batch := [t for _, t in zip(range(CHUNK), texts, strict=False)]:
                for text, ids in zip(batch, tokenizer(batch, add_special_tokens=False)["input_ids"], strict=True):
                    np.asarray(ids + [eos], dtype=dtype).tofile(f)
                    chars += len(text)
                    tokens += len(ids) + 1
        meta[f"{split}_tokens"] = tokens
        meta[f"{split}_chars_per_token"] = round(chars / max(tokens, 1), 3)
    if exclude:
        meta["excluded_documents"] = len(skipped)
        meta["exclude"] = sorted(exclude)
        log.info("corpus %s: %d documents excluded (exclude)", name, len(skipped))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info(
        "corpus %s: %s training and %s validation tokens, %.2f characters per token",
        name,
        f"{meta['train_tokens']:,}",
        f"{meta['val_tokens']:,}",
        meta["val_chars_per_token"],
    )
    return _publish(tmp, out)


# ----------------------------------------------------------------------------------------------------------
# Blocks and the mixture
# ----------------------------------------------------------------------------------------------------------


class Blocks:
    """Packed blocks over a token stream: block i is tokens [i*L, i*L + L + 1), so inputs are its first L
    tokens and targets its last L; every token is a target exactly once, and documents run across blocks,
    separated by EOS (as in LLaMA/TinyLlama pretraining: no padding, nothing thrown away but the tail)."""

    def __init__(self, path: Path, seq_len: int, dtype: str):
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r") if path.stat().st_size else np.zeros(0)
        self.seq_len = seq_len
        self.n = max(0, (len(self.tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return np.asarray(self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1], dtype=np.int64)


class Mixture:
    """Which block comes next: each position draws its corpus with probability proportional to its weight
    (seeded by step), and each corpus walks through a fixed random permutation of its blocks, a new one
    every epoch. Its state is one counter per corpus, so a checkpoint restores the data position exactly."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        self.sizes, self.seed = sizes, seed
        total = sum(weights)
        self.p = np.array([w / total for w in weights])
        self.consumed = [0] * len(sizes)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, corpus: int, epoch: int) -> np.ndarray:
        if (corpus, epoch) not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != corpus}  # one epoch per corpus in memory
            rng = np.random.default_rng([self.seed, corpus, epoch])
            self._perms[(corpus, epoch)] = rng.permutation(self.sizes[corpus])
        return self._perms[(corpus, epoch)]

    def draw(self, step: int, n: int) -> list[tuple[int, int]]:
        """The n (corpus, block) pairs of optimiser step `step`, the same on every process."""
        corpora = np.random.default_rng([self.seed, step]).choice(len(self.sizes), size=n, p=self.p)
        out = []
        for c in corpora.tolist():
            epoch, pos = divmod(self.consumed[c], self.sizes[c])
            out.append((c, int(self._perm(c, epoch)[pos])))
            self.consumed[c] += 1
        return out

    def state_dict(self) -> dict:
        return {"consumed": list(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = list(state["consumed"])


class Corpora:
    """The prepared corpora of a recipe: tokenizer, training and validation blocks per corpus, metadata."""

    def __init__(self, cfg: CorpusConfig, tokenizer, token_dirs: list[Path]):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.names = [c.name for c in cfg.corpora]
        self.weights = [c.weight for c in cfg.corpora]
        self.meta = [json.loads((d / "meta.json").read_text()) for d in token_dirs]
        self.train, self.val = [], []
        for name, d, meta in zip(self.names, token_dirs, self.meta, strict=True):
            for split, blocks in (("train", self.train), ("val", self.val)):
                blocks.append(Blocks(d / f"{split}.bin", cfg.seq_len, meta["dtype"]))
                if len(blocks[-1]) == 0:
                    more = " or raise data.val_fraction" if split == "val" else ""
                    raise DataError(
                        f"corpus '{name}': its {split} split has {meta[f'{split}_tokens']:,} tokens, fewer "
                        f"than one block of data.seq_len+1 = {cfg.seq_len + 1}: add documents{more} "
                        "or lower data.seq_len"
                    )

    def mixture(self, seed: int) -> Mixture:
        return Mixture([len(b) for b in self.train], self.weights, seed)

    def summary(self) -> list[dict]:
        return [
            {
                "name": n,
                "path": c.path,
                "weight": c.weight,
                "train_tokens": m["train_tokens"],
                "val_tokens": m["val_tokens"],
                "chars_per_token": m["val_chars_per_token"],
            }
            | ({"excluded_documents": m["excluded_documents"], "exclude": m["exclude"]} if m.get("exclude") else {})
            for n, c, m in zip(self.names, self.cfg.corpora, self.meta, strict=True)
        ]


def prepare(cfg: CorpusConfig, tok_cfg: TokenizerConfig, tokenizer_source: str | None) -> Corpora:
    """Read, split, (train a tokenizer,) tokenise and cache every corpus of a recipe; open them as blocks.
    `tokenizer_source`: a tokenizer to reuse (Hub ID or folder), or None to train one."""
    text_dirs = {spec.name: extract_text(spec, cfg) for spec in cfg.corpora}
    if tokenizer_source is None:
        weights, exclude = {c.name: c.weight for c in cfg.corpora}, {c.name: exclusions(c) for c in cfg.corpora}
        tokenizer = train_tokenizer(text_dirs, weights, tok_cfg, cfg.cache_dir, exclude)
    else:
        from transformers import AutoTokenizer

        from finetune.modeling import from_pretrained, with_eos_and_pad

        tokenizer = from_pretrained("tokenizer", tokenizer_source, AutoTokenizer.from_pretrained)
        tokenizer = with_eos_and_pad(tokenizer, tokenizer_source)
    if tokenizer.chat_template is None:  # so `prompt_style: chat_template` works on the model we train
        from finetune.tokenizer import CHAT_TEMPLATE

        tokenizer.chat_template = CHAT_TEMPLATE
        log.info("tokenizer %s has no chat template: the output gets ChatML's", tokenizer_source)
    token_dirs = [tokenize(text_dirs[spec.name], tokenizer, cfg, exclusions(spec)) for spec in cfg.corpora]
    return Corpora(cfg, tokenizer, token_dirs)
