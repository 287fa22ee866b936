"""Generate with a fine-tuned adapter (or merged/full model) from an SFT output folder.

    python -m finetune.generate outputs/quickstart "日本の首都はどこですか？"
    python -m finetune.generate outputs/quickstart "Give three tips for staying healthy." --max-new-tokens 64

The folder's recipe.yaml says which base to load, which prompt style to wrap the instruction in and whether
to NFKC-normalise it, so the model sees the prompt exactly as training showed it (the same token ids).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from finetune import config
from finetune.config.checking import RENAMED
from finetune.config.sft import SFTRecipe
from finetune.errors import RecipeError, run_cli


def load(run_dir: str | Path):
    """(model, tokenizer, recipe) from an SFT output folder: base + adapter, or a saved full model."""
    from finetune import modeling

    modeling.quiet_library_warnings()  # before peft imports bitsandbytes
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise RecipeError(f"{run_dir} has no recipe.yaml: is it the output_dir of a finetune/sft.py run?")
    saved = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    training = saved.get("training") or {}  # a run saved before the knobs were renamed still loads
    saved["training"] = {RENAMED.get(k, k): v for k, v in training.items()}
    cfg = config.build(SFTRecipe, saved)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    if (run_dir / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(modeling.load_model(cfg.model, cfg.quantization), run_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(run_dir)
    return model.eval(), tokenizer, cfg


def generate(
    model,
    tokenizer,
    cfg: SFTRecipe,
    instruction: str,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
) -> str:
    import torch

    from finetune.prompts import prompt_ids

    ids = prompt_ids(
        [{"role": "user", "content": instruction}],
        cfg.data.prompt_style,
        tokenizer,
        cfg.data.system_prompt,
        nfkc=cfg.data.nfkc,
    )
    input_ids = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=None,
            top_k=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


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
