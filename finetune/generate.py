"""Generate with a fine-tuned adapter (or merged/full model) from an SFT output folder.

    python -m finetune.generate outputs/quickstart "日本の首都はどこですか？"
    python -m finetune.generate outputs/quickstart "Give three tips for staying healthy." --max-new-tokens 64

The folder's recipe.yaml says which base to load, which prompt style to wrap the instruction in and whether
to NFKC-normalise it, so the model sees the prompt exactly as training showed it (the same token ids).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune.config.sft import SFTRecipe
from finetune.errors import RecipeError, run_cli


def load(run_dir: str | Path):
    """(model, tokenizer, recipe) from an SFT output folder: base + adapter, or a saved full model."""
    from finetune import modeling

    if modeling.run_recipe(run_dir) is None:
        raise RecipeError(f"{run_dir} has no SFT recipe.yaml: is it the output_dir of a finetune/sft.py run?")
    return modeling.load_for_inference(str(run_dir))


def stop_ids(model, tokenizer) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS and those the model's generation config names (an instruct
    model's end of turn, e.g. Llama 3's <|eot_id|>), which a chat template writes where a turn ends."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [] if configured is None else [configured]
    return list(dict.fromkeys([tokenizer.eos_token_id, *configured]))


def generate_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 1.0,
    batch_size: int = 8,
    progress=None,
) -> list[list[int]]:
    """New token ids for each prompt (token ids), in the prompts' order, each ending at its first stop token (kept:
    see stop_ids) or after max_new_tokens. Prompts of similar length are batched together, left-padded (the model's
    position ids follow the attention mask, so padding changes no prompt's ids or positions). `progress` is called
    with the number of prompts done after each batch."""
    import torch

    stops = stop_ids(model, tokenizer)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=top_p if do_sample else None,
                top_k=None,
                eos_token_id=stops,
                pad_token_id=pad,
            )[:, width:].tolist()
        for row, i in enumerate(batch):
            new = generated[row]
            end = next((k for k, t in enumerate(new) if t in stops), None)
            out[i] = new if end is None else new[: end + 1]
        if progress is not None:
            progress(len(batch))
    return out


def decode(tokenizer, style: str, ids: list[int]) -> str:
    """A generated answer's text: special tokens (its EOS) dropped, cut at the style's end of turn."""
    from finetune.prompts import answer

    return answer(style, tokenizer.decode(ids, skip_special_tokens=True))


def generate(
    model,
    tokenizer,
    cfg: SFTRecipe,
    instruction: str,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
) -> str:
    from finetune.prompts import prompt_ids

    ids = prompt_ids(
        [{"role": "user", "content": instruction}],
        cfg.data.prompt_style,
        tokenizer,
        cfg.data.system_prompt,
        nfkc=cfg.data.nfkc,
    )
    new = generate_ids(model, tokenizer, [ids], max_new_tokens, do_sample, temperature)[0]
    return decode(tokenizer, cfg.data.prompt_style, new)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="output_dir of an SFT run (adapter + recipe.yaml)")
    parser.add_argument("instruction", nargs="+", help="one or more instructions")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()

    def main():
        model, tokenizer, cfg = load(args.run_dir)
        for instruction in args.instruction:
            text = generate(model, tokenizer, cfg, instruction, args.max_new_tokens, args.sample, args.temperature)
            print(f">>> {instruction}\n{text}\n")

    run_cli(main)


if __name__ == "__main__":
    cli()
