"""Tokenizer training: byte-level BPE (what pretraining trains on its corpora when no tokenizer is named, and the
built-in bases use), and a LLaMA-style SentencePiece tokenizer (what Llama 2, TinyLlama, ELYZA and Swallow use),
which the tests train offline to check the data layer against real LLaMA tokenisation."""

from __future__ import annotations

from finetune.prompts import chat_template

# The chatml style's template, so `prompt_style: chat_template` works on the suite's own tokenizers too.
CHAT_TEMPLATE = chat_template("chatml")


def train_bpe(texts, vocab_size: int = 4096):
    """Byte-level BPE with <pad>, <s>, </s>, returned as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def train_sentencepiece(texts, vocab_size: int = 3000):
    """A LLaMA tokenizer trained with Meta's settings (sentencepiece BPE, byte fallback, dummy prefix `▁`, digits
    split, no normalisation, `<unk>` `<s>` `</s>` = 0 1 2), returned as a transformers LlamaTokenizer."""
    import tempfile

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    # LLaMA's corpus went in line by line, so no piece holds a newline: "\n" is the byte token <0x0A>.
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=f"{tmp}/tokenizer",
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            add_dummy_prefix=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
