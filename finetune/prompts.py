"""Prompt styles: canonical turns -> text -> token ids and labels, with loss only on responses.

One rendering serves training, generation, evaluation and DPO (`encode`, `encode_many`, `prompt_ids`):

1. **Render to text once.** Every style is a Jinja chat template (`chat_template(style)`), rendered with
   transformers' own renderer; `{% generation %}` blocks mark what is learned (each response and its EOS).
   The same template, without those marks, is saved with the run's tokenizer, so `apply_chat_template`
   renders exactly the text the model was trained on.
2. **Tokenise whole.** BOS starts a document and EOS ends each response; both go in *by id*, and a record's
   own `</s>` stays text (unless the template itself writes special tokens as text, e.g. ChatML's
   `<|im_start|>` where a tokenizer has it as one: then they are parsed, and such records are counted). The
   text between BOS ids is tokenised in one call, as pretraining tokenised documents, so a SentencePiece
   tokenizer's dummy prefix `▁` appears once, at the document's start, never at the prompt/response seam or
   after an EOS. Encoding prompt and response separately, as many tools do, teaches `▁The` where the text has
   `The`. (transformers' `apply_chat_template(tokenize=True)` reads `<s>` as text and so puts no `▁` after it;
   the text it renders is the trained text, and `prompt_ids` gives the trained ids.)
3. **Label by character.** A token is learned when its characters (offsets from the tokenizer) overlap a
   learned span; padding is masked by the collator by position, never by comparing ids, so an EOS that
   shares the pad id is still learned.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from dataclasses import dataclass

from finetune.errors import DataError

log = logging.getLogger(__name__)

IGNORE = -100

ALPACA = {
    "preamble": "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    "preamble_input": "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.",
    "instruction": "### Instruction:\n",
    "input": "### Input:\n",
    "response": "### Response:\n",
}
# The Japanese Alpaca-style prompt used by Japanese instruction-tuned LLaMA derivatives.
ALPACA_JA = {
    "preamble": "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。",
    "preamble_input": "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。"
    "要求を適切に満たす応答を書きなさい。",
    "instruction": "### 指示:\n",
    "input": "### 入力:\n",
    "response": "### 応答:\n",
}
# A common Japanese system prompt for Llama-2-chat style models (ELYZA's); set data.system_prompt to use it.
LLAMA2_JA_SYSTEM = "あなたは誠実で優秀な日本人のアシスタントです。"

# Private-use characters stand in for BOS and EOS while rendering, so they can be put in by id afterwards.
BOS_MARK, EOS_MARK = "\ue000", "\ue001"
_MARKS = re.compile(f"[{BOS_MARK}{EOS_MARK}]")
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")

# ----------------------------------------------------------------------------------------------------------
# Styles as chat templates
# ----------------------------------------------------------------------------------------------------------

# A user turn's text: its content, then its `input` (alpaca/dolly context) after a blank line.
_USER_TEXT = "{%- set text = m['content'] + ('\\n\\n' + m['input'] if m['input'] is defined and m['input'] else '') -%}"
_HEAD = (
    "{%- set ns = namespace(system=SYSTEM, turn=0) -%}{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}"
)

_ALPACA = _HEAD + (
    "{%- elif m['role'] == 'user' -%}"
    "{%- if ns.turn == 0 -%}"
    "{{- (ns.system if ns.system else (PREAMBLE_INPUT if m['input'] is defined and m['input'] else PREAMBLE))"
    " + '\\n\\n' -}}"
    "{%- else -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{{- INSTRUCTION + m['content'] + '\\n\\n' -}}"
    "{%- if m['input'] is defined and m['input'] -%}{{- INPUT + m['input'] + '\\n\\n' -}}{%- endif -%}"
    "{{- RESPONSE -}}{%- set ns.turn = ns.turn + 1 -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- generation -%}{{- m['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- endif -%}{%- endfor -%}"
)
# Meta's Llama 2 chat layout: every exchange is its own BOS document, the system prompt inside the first.
_LLAMA2 = _HEAD + (
    "{%- elif m['role'] == 'user' -%}"
    + _USER_TEXT
    + "{{- bos_token + '[INST] ' + ('<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' if ns.turn == 0 and ns.system"
    " else '') + text + ' [/INST]' -}}{%- set ns.turn = ns.turn + 1 -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ' ' + m['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- endif -%}{%- endfor -%}"
)
# ChatML; `<|im_end|>` is text for LLaMA tokenizers, so EOS follows it (by id) to teach the model to stop.
_CHATML = _HEAD + (
    "{%- elif m['role'] == 'user' -%}" + _USER_TEXT + "{%- if ns.turn > 0 -%}{{- '\\n' -}}"
    "{%- elif ns.system -%}{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>user\\n' + text + '<|im_end|>\\n<|im_start|>assistant\\n' -}}"
    "{%- set ns.turn = ns.turn + 1 -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- generation -%}{{- m['content'] + '<|im_end|>' + eos_token -}}{%- endgeneration -%}"
    "{%- endif -%}{%- endfor -%}"
)
_STYLES = {
    "alpaca": (_ALPACA, ALPACA),
    "alpaca-ja": (_ALPACA, ALPACA_JA),
    "llama2": (_LLAMA2, {}),
    "chatml": (_CHATML, {}),
}
STYLES = (*_STYLES, "chat_template")
# Text a style writes after each response, before its EOS; a generated answer ends there.
END_OF_TURN = {"chatml": "<|im_end|>"}


def _literal(value: str | None) -> str:
    # Jinja string literals take Python's backslash escapes; JSON (non-ASCII kept as is) writes a subset of them.
    return "none" if value is None else json.dumps(value, ensure_ascii=False)


def chat_template(style: str, system_prompt: str | None = None, marked: bool = False) -> str:
    """The Jinja chat template of a built-in style, with `system_prompt` as the default system message.

    `marked=True` keeps the `{% generation %}` blocks that say what is learned; the template saved with a run
    drops them (they change nothing in the text, and not every chat-template engine knows them)."""
    if style not in _STYLES:
        raise DataError(f"unknown prompt style '{style}', expected one of {', '.join(STYLES)}")
    body, words = _STYLES[style]
    if not marked:  # from the body only: a system prompt that mentions {% generation %} stays as it is
        body = _GENERATION_TAG.sub("", body)
    header = f"{{%- set SYSTEM = {_literal(system_prompt)} -%}}"
    header += "".join(f"{{%- set {k.upper()} = {_literal(v)} -%}}" for k, v in words.items())
    return header + ("" if style == "llama2" else "{{- bos_token -}}") + body


def own_template(tokenizer, system_prompt: str | None = None) -> str:
    """The tokenizer's own chat template; with `system_prompt`, one that adds it where a conversation has none."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError("data.prompt_style=chat_template, but the tokenizer has no chat template")
    if not system_prompt:
        return template
    default = (
        "{%- if not messages or messages[0]['role'] != 'system' -%}{%- set messages = [{'role': 'system', "
        f"'content': {_literal(system_prompt)}}}] + messages -%}}{{%- endif %}}"
    )
    return template if template.startswith(default) else default + template  # a saved run's has it already


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    """An example as text, with BOS_MARK/EOS_MARK where those ids go, and the learned character spans."""

    text: str
    learned: list[tuple[int, int]]


_ROLE_ORDER = "the order is: an optional system turn, then user and assistant turns alternating, user first"


def check_turns(turns: list[dict]) -> None:
    """Refuse a conversation whose turns are out of order; names the turn."""
    for t, turn in enumerate(turns):
        expected = (
            ("system", "user")
            if t == 0
            else ("user",)
            if turns[t - 1]["role"] in ("system", "assistant")
            else ("assistant",)
        )
        if turn["role"] not in expected:
            raise DataError(
                f"turn {t} is a {turn['role']} turn where a {' or '.join(expected)} turn belongs ({_ROLE_ORDER})"
            )


def _specials(tokenizer) -> dict[str, str]:
    """Template variables: the tokenizer's special tokens, BOS and EOS as marks."""
    values = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    values["bos_token"] = BOS_MARK if tokenizer.bos_token_id is not None else ""
    values["eos_token"] = EOS_MARK
    return values


def _render_template(template: str, messages: list[dict], tokenizer, generation_prompt: bool = False):
    """(text, learned spans): the spans come from `{% generation %}` blocks, none where a template has none."""
    from transformers.utils.chat_template_utils import render_jinja_template

    marked = bool(_GENERATION_TAG.search(template))
    texts, spans = render_jinja_template(
        [messages],
        chat_template=template,
        return_assistant_tokens_mask=marked,
        add_generation_prompt=generation_prompt,
        **_specials(tokenizer),
    )
    return texts[0], spans[0] if marked else []


def _render_own_template(messages: list[dict], tokenizer, template: str) -> Rendered:
    """The tokenizer's own chat template. Without `{% generation %}` blocks, each response is what rendering
    the conversation up to it adds to the prompt rendered with the generation prompt."""
    asks = messages[-1]["role"] == "user"  # a prompt for generation ends with the assistant's header
    text, learned = _render_template(template, messages, tokenizer, generation_prompt=asks)
    if not _GENERATION_TAG.search(template):
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, _ = _render_template(template, messages[:i], tokenizer, generation_prompt=True)
            upto, _ = _render_template(template, messages[: i + 1], tokenizer)
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise DataError(
                    "the tokenizer's chat template renders a conversation so that its prompt is not a "
                    "prefix of the whole; choose another data.prompt_style"
                )
            learned.append((len(prompt), len(upto)))
    # A response must end with EOS, or the model never learns to stop: EOS written by the template just after
    # the response is learned with it; where the template writes none, EOS is put in by id.
    eos_text = tokenizer.eos_token
    for n in range(len(learned)):
        start, end = learned[n]
        answer = text[start:end].rstrip()
        if answer.endswith(EOS_MARK) or (eos_text and answer.endswith(eos_text)):
            continue
        after = text[end:]
        gap = len(after) - len(after.lstrip())
        written = next((m for m in (EOS_MARK, eos_text) if m and after[gap:].startswith(m)), None)
        if written:
            learned[n] = (start, end + gap + len(written))
            continue
        cut = start + len(answer)
        text = text[:cut] + EOS_MARK + text[cut:]
        learned = [(s + (s >= cut), e + (e >= cut)) for s, e in learned]
        learned[n] = (start, cut + 1)
        _warn_once(
            "the tokenizer's chat template does not end a response with EOS: EOS is appended by id "
            "so the model learns to stop (the template itself does not render it)"
        )
    return Rendered(text, learned)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def template_for(style: str, tokenizer, system_prompt: str | None = None, marked: bool = True) -> str:
    """The template a style renders with (`marked`: its `{% generation %}` blocks kept)."""
    if style == "chat_template":
        return own_template(tokenizer, system_prompt)
    return chat_template(style, system_prompt, marked=marked)


def _texts(example: dict) -> list[str]:
    return [example["text"]] if "text" in example else [v for t in example["turns"] for v in t.values()]


def render(
    example: dict, style: str, tokenizer, system_prompt: str | None = None, template: str | None = None
) -> Rendered:
    """An example ({"turns": [...]} or {"text": ...}) as text with BOS/EOS marks and learned spans."""
    if any(_MARKS.search(v) for v in [*_texts(example), system_prompt or ""]):
        raise DataError(
            "the text holds the private-use character U+E000 or U+E001, which the suite reserves to "
            "mark BOS and EOS while rendering"
        )
    if "text" in example:
        bos = _specials(tokenizer)["bos_token"]
        return Rendered(bos + example["text"] + EOS_MARK, [(len(bos), len(bos) + len(example["text"]) + 1)])
    turns = example["turns"]
    check_turns(turns)
    template = template or template_for(style, tokenizer, system_prompt)
    if style == "chat_template":
        return _render_own_template(turns, tokenizer, template)
    text, learned = _render_template(template, turns, tokenizer)
    return Rendered(text, learned)


def _writes_special_tokens(template: str, tokenizer) -> list[str]:
    """Special tokens (other than BOS and EOS, which go in by id) that a template writes as text itself, such
    as `<|im_start|>` where a tokenizer has it as a special token: those must be parsed, not split."""
    # no system turn: many templates (Mistral's, Gemma's) refuse one
    probe, _ = _render_template(
        template, [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], tokenizer
    )
    skip = {tokenizer.bos_token, tokenizer.eos_token}
    return [t for t in tokenizer.all_special_tokens if t not in skip and t in probe]


# ----------------------------------------------------------------------------------------------------------
# Tokenising
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Document:
    """Text between two BOS ids, with where EOS ids go (positions in `text`) and which characters are learned."""

    text: str
    bos: bool
    bos_learned: bool
    eos: list[tuple[int, bool]]  # (position in text, learned)
    learned: list[tuple[int, int]]  # spans in text


def _documents(rendered: Rendered) -> list[_Document]:
    starts = [s for s, _ in rendered.learned]

    def is_learned(pos: int) -> bool:
        i = bisect.bisect_right(starts, pos) - 1
        return i >= 0 and pos < rendered.learned[i][1]

    docs: list[_Document] = []
    doc = _Document("", False, False, [], [])
    pieces: list[str] = []
    length = 0
    pos = 0
    for match in [*_MARKS.finditer(rendered.text), None]:
        end = match.start() if match else len(rendered.text)
        if end > pos:  # a run of text: [pos, end) in the rendered string, [length, length + end - pos) in doc
            for s, e in rendered.learned:
                lo, hi = max(s, pos), min(e, end)
                if lo < hi:
                    doc.learned.append((length + lo - pos, length + hi - pos))
            pieces.append(rendered.text[pos:end])
            length += end - pos
        if match is None:
            break
        if match.group() == EOS_MARK:
            doc.eos.append((length, is_learned(match.start())))
        else:
            doc.text = "".join(pieces)
            docs.append(doc)
            doc, pieces, length = _Document("", True, is_learned(match.start()), [], []), [], 0
        pos = match.end()
    doc.text = "".join(pieces)
    docs.append(doc)
    return [d for d in docs if d.bos or d.text or d.eos]


def _encode_documents(docs: list[_Document], tokenizer, split_special: bool):
    """(ids, character offsets) of each document's text, in one batched call."""
    texts = [d.text for d in docs]
    out = [([], []) for _ in docs]
    todo = [i for i, t in enumerate(texts) if t]
    if todo:
        enc = tokenizer(
            [texts[i] for i in todo],
            add_special_tokens=False,
            return_offsets_mapping=True,
            split_special_tokens=split_special,
        )
        for j, i in enumerate(todo):
            out[i] = (enc["input_ids"][j], [tuple(o) for o in enc["offset_mapping"][j]])
    return out


def _positions(offsets, eos):
    """Token starts and ends (a lone dummy prefix, with no characters, gets its first one) and, for each EOS
    position, the index of the first token starting at or after it: where that EOS goes."""
    import numpy as np

    span = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = span[:, 0], np.maximum(span[:, 1], span[:, 0] + 1)
    return starts, ends, np.searchsorted(starts, eos, side="left")


def _assemble(
    docs, encoded, tokenizer, train_on_prompt: bool, split_special: bool, stats: dict
) -> dict[str, list[int]]:
    """One row from its documents' tokens: BOS/EOS ids put in, each token labelled by its characters."""
    import numpy as np

    input_ids: list[int] = []
    learned: list[bool] = []
    for doc, (ids, offsets) in zip(docs, encoded, strict=True):
        if doc.bos:
            input_ids.append(tokenizer.bos_token_id)
            learned.append(doc.bos_learned)
        eos = np.asarray([p for p, _ in doc.eos], dtype=np.int64)
        starts, ends, at = _positions(offsets, eos)
        if len(starts) and ((at > 0) & (ends[np.maximum(at - 1, 0)] > eos)).any():
            # A token runs across an EOS: tokenise the pieces between EOS ids apart (never seen with LLaMA's
            # SentencePiece or byte-level BPE, whose pieces end at a newline; counted where a tokenizer does it).
            stats["eos_splits"] = stats.get("eos_splits", 0) + 1
            cuts = [0, *eos.tolist(), len(doc.text)]
            ids, spans = [], []
            for a, b in zip(cuts, cuts[1:], strict=False):
                if b > a:
                    enc = tokenizer(
                        doc.text[a:b],
                        add_special_tokens=False,
                        return_offsets_mapping=True,
                        split_special_tokens=split_special,
                    )
                    piece_ids, piece_spans = enc["input_ids"], enc["offset_mapping"]
                    if (
                        a
                        and piece_ids
                        and tokenizer.convert_ids_to_tokens(piece_ids[0]) == "▁"
                        and not doc.text[a].isspace()
                    ):  # a SentencePiece dummy prefix: not in the text
                        piece_ids, piece_spans = piece_ids[1:], piece_spans[1:]
                    ids += piece_ids
                    spans += [(s + a, e + a) for s, e in piece_spans]
            starts, ends, at = _positions(spans, eos)
        # A token is learned when any of its characters is: the last learned span starting before its end
        # reaches past its start.
        hit = np.zeros_like(starts, dtype=bool)
        if doc.learned:
            spans_learned = np.asarray(doc.learned, dtype=np.int64)
            i = np.searchsorted(spans_learned[:, 0], ends - 1, side="right") - 1
            span = spans_learned[np.maximum(i, 0)]
            hit = (i >= 0) & (span[:, 1] > starts)
            # the token holds the prompt's last characters and the response's first: it is learned, and a prompt
            # cut before the response ends on a different token (counted, reported)
            seams = int((hit & (starts < span[:, 0])).sum())
            if seams:
                stats["seam_tokens"] = stats.get("seam_tokens", 0) + seams
        doc_ids, doc_learned = list(ids), hit.tolist()
        for k in range(len(eos) - 1, -1, -1):
            doc_ids.insert(int(at[k]), tokenizer.eos_token_id)
            doc_learned.insert(int(at[k]), doc.eos[k][1])
        input_ids += doc_ids
        learned += doc_learned
    labels = input_ids[:] if train_on_prompt else [t if m else IGNORE for t, m in zip(input_ids, learned, strict=True)]
    return {"input_ids": input_ids, "labels": labels}


def encode_many(
    examples: list[dict],
    style: str,
    tokenizer,
    system_prompt: str | None = None,
    train_on_prompt: bool = False,
    stats: dict | None = None,
) -> list[dict[str, list[int]]]:
    """Examples -> {"input_ids", "labels"} rows; the text of all of them is tokenised in one batched call.

    A DataError names the example's `origin` (dataset and record) where it has one."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} gives no character offsets (not a fast "
            "tokenizer): the suite needs them to label responses exactly"
        )
    stats = {} if stats is None else stats
    template = template_for(style, tokenizer, system_prompt)
    # Text is tokenised with special-token strings split (a record's `</s>` stays text), unless the template
    # writes special tokens itself; then they are parsed, and records holding one are counted.
    written = _writes_special_tokens(template, tokenizer)
    all_docs = []
    for i, example in enumerate(examples):
        try:
            all_docs.append(_documents(render(example, style, tokenizer, system_prompt, template)))
        except DataError as e:
            raise DataError(f"{example.get('origin', f'example {i}')}: {e}") from None
        if written and any(t in v for t in tokenizer.all_special_tokens for v in _texts(example)):
            stats["special_token_text"] = stats.get("special_token_text", 0) + 1
    flat = [d for docs in all_docs for d in docs]
    encoded = iter(_encode_documents(flat, tokenizer, not written))
    return [
        _assemble(docs, [next(encoded) for _ in docs], tokenizer, train_on_prompt, not written, stats)
        for docs in all_docs
    ]


def encode(
    example: dict, style: str, tokenizer, system_prompt: str | None = None, train_on_prompt: bool = False
) -> dict[str, list[int]]:
    """One example ({"turns": [...]} or {"text": ...}) -> {"input_ids", "labels"}."""
    return encode_many([example], style, tokenizer, system_prompt, train_on_prompt)[0]


def prompt_ids(
    turns: list[dict], style: str, tokenizer, system_prompt: str | None = None, nfkc: bool = False
) -> list[int]:
    """Token ids of a conversation that ends on a user turn, ready for `generate`: the same ids that precede
    the response in training. `nfkc` applies the run's `data.nfkc` to the prompt, as training did."""
    if turns[-1]["role"] != "user":
        raise ValueError("the last turn of a prompt must be the user's")
    if nfkc:
        from finetune.instructions import nfkc as normalise

        turns = normalise({"turns": turns})["turns"]
    return encode({"turns": turns}, style, tokenizer, system_prompt)["input_ids"]


def answer(style: str, generated: str) -> str:
    """A generated continuation cut to the response: at the style's end-of-turn text (ChatML's `<|im_end|>`, which
    LLaMA tokenizers hold as text, so skipping special tokens leaves it), else as it is."""
    end = END_OF_TURN.get(style)
    return generated.split(end, 1)[0] if end else generated


def saved_chat_template(style: str, system_prompt: str | None, tokenizer) -> str:
    """The chat template to save with a run: the one that renders the text its style trained on."""
    return template_for(style, tokenizer, system_prompt, marked=False)


def show(row: dict[str, list[int]], tokenizer) -> str:
    """Token pieces of a row, separated by `|`, learned runs inside `[[ ]]`: what `print_example` prints.

    SentencePiece pieces are shown as they are (`▁The`, `<0x0A>`); byte-level BPE pieces as the text their bytes
    spell (a space as `Ġ`), or as `<0x..>` bytes where a piece holds part of a character."""
    from itertools import groupby

    from tokenizers import decoders
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_level = isinstance(getattr(tokenizer.backend_tokenizer, "decoder", None), decoders.ByteLevel)
    to_byte = {c: b for b, c in bytes_to_unicode().items()}

    def visible(piece: str) -> str:
        if byte_level and all(c in to_byte for c in piece):
            raw = bytes(to_byte[c] for c in piece)
            try:
                piece = raw.decode("utf-8").replace(" ", "Ġ")
            except UnicodeDecodeError:
                return "".join(f"<0x{b:02X}>" for b in raw)
        return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in piece)

    pieces = zip(tokenizer.convert_ids_to_tokens(row["input_ids"]), row["labels"], strict=True)
    runs = []
    for learned, run in groupby(pieces, key=lambda p: p[1] != IGNORE):
        text = "|".join(visible(piece) for piece, _ in run)
        runs.append(f"[[{text}]]" if learned else text)
    return "|".join(runs)


def tokenize_examples(
    examples: list[dict], cfg, tokenizer, name: str = "train", kept: list[int] | None = None
) -> tuple[list[dict], dict]:
    """Tokenise canonical examples with data config `cfg`; cut to max_length. Returns rows and counts.

    An example whose prompt alone fills max_length has nothing left to learn; it is dropped, and counted. `kept`, a
    list, receives the index of each row's example (evaluation pairs two models' scores by it).
    """
    counts: dict = {}
    encoded = encode_many(examples, cfg.prompt_style, tokenizer, cfg.system_prompt, cfg.train_on_prompt, counts)
    rows, cut, dropped = [], 0, []
    for i, row in enumerate(encoded):
        if len(row["input_ids"]) > cfg.max_length:
            cut += 1
            row = {k: v[: cfg.max_length] for k, v in row.items()}
        if all(label == IGNORE for label in row["labels"][1:]):
            dropped.append(examples[i].get("origin", f"example {i}"))
            continue
        rows.append(row)
        if kept is not None:
            kept.append(i)
    stats = {"examples": len(examples), "cut_to_max_length": cut, "dropped_prompt_fills_max_length": len(dropped)}
    if counts.get("eos_splits"):
        stats["eos_splits"] = counts["eos_splits"]
        log.warning(
            "%s: in %d examples a token ran across an EOS; the text around it was tokenised in pieces",
            name,
            counts["eos_splits"],
        )
    if counts.get("special_token_text"):
        stats["special_token_text"] = counts["special_token_text"]
        log.warning(
            "%s: %d examples hold a special token's text (e.g. '%s') in a turn; the prompt template writes "
            "special tokens as text, so these are read as the special tokens themselves",
            name,
            counts["special_token_text"],
            tokenizer.eos_token,
        )
    if counts.get("seam_tokens"):
        stats["seam_tokens"] = counts["seam_tokens"]
        log.warning(
            "%s: %d responses start inside a token that also holds the end of the prompt (the prompt style "
            "ends its prompt mid-word, e.g. with a space); that token is learned, and generation's prompt "
            "ends on a different token than training's",
            name,
            counts["seam_tokens"],
        )
    if cut or dropped:
        log.warning(
            "%s: %d of %d examples were cut to data.max_length=%d; %d dropped because the prompt alone fills it%s",
            name,
            cut,
            len(examples),
            cfg.max_length,
            len(dropped),
            f" ({'; '.join(dropped[:5])})" if dropped else "",
        )
    if not rows:
        raise DataError(f"{name}: no example has a response within data.max_length={cfg.max_length}")
    return rows, stats
