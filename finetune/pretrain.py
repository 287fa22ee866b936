"""Pretraining: a TinyLlama-style LLaMA from scratch, or continued pretraining of any LLaMA checkpoint.

One CPU, offline (English + Japanese manual pages from Debian's packages, a 7M-parameter model, minutes):
    accelerate launch finetune/pretrain.py recipe=pretrain-tiny
Continued pretraining on Japanese, from that base or any LLaMA (`model.base=meta-llama/Llama-2-7b-hf`):
    accelerate launch finetune/pretrain.py recipe=cpt-ja
One GPU:
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml finetune/pretrain.py recipe=pretrain-120m
Many GPUs (FSDP), TinyLlama 1.1B:
    accelerate launch --config_file recipes/accelerate/fsdp.yaml finetune/pretrain.py recipe=tinyllama-1b

`resume=true` continues exactly where the newest checkpoint left off (weights, optimiser, scheduler, data
position, RNG), e.g. after the process was killed. The output folder is a Hugging Face model + tokenizer
(`AutoModelForCausalLM.from_pretrained(output_dir)`) with lineage.json (base, corpora, tokens seen),
log.jsonl (one record per step) and metrics.json.

The training loop is written out here rather than handed to transformers' Trainer: a pretraining step is a
fixed number of packed blocks drawn from a weighted mixture whose position must be checkpointed exactly,
and the loop is short enough to read top to bottom (nanoGPT, litgpt). accelerate does the device placement,
mixed precision, FSDP and state saving; bench/pretrain_throughput.py compares it with the Trainer.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from finetune import config
from finetune.config.pretrain import PretrainRecipe
from finetune.errors import RecipeError, run_cli

log = logging.getLogger("finetune.pretrain")


def main(argv: list[str]) -> dict:
    cfg, recipe_file = config.load(argv, PretrainRecipe)
    if cfg.print_recipe:
        print(config.to_yaml(cfg), end="")
        return {}
    from finetune.offline import go_offline_if_unreachable, is_hub_id

    names = [cfg.model.base or "", cfg.tokenizer.name_or_path or ""] + [c.path for c in cfg.data.corpora]
    go_offline_if_unreachable([n for n in names if is_hub_id(n)])
    from finetune import hub

    hub.check_can_push(cfg.hub)  # before training, not after it
    return train(cfg, recipe_file)


class RunState:
    """What a checkpoint needs besides weights, optimiser, scheduler, RNG and the data position: progress. (Settings
    that must not change on resume are checked against the checkpoint's recipe by checkpoints.start.)"""

    def __init__(self):
        self.step, self.tokens, self.loss, self.initial_val = 0, 0, None, {}

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "loss": self.loss, "initial_val": self.initial_val}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens, self.loss = state["step"], state["tokens"], state["loss"]
        self.initial_val = state["initial_val"]


def batch_shape(cfg: PretrainRecipe, world: int) -> tuple[int, int]:
    """(gradient accumulation steps, tokens per optimiser step) that come closest to global_batch_tokens."""
    per_pass = cfg.training.micro_batch_size * cfg.data.seq_len * world
    accum = max(1, round(cfg.training.global_batch_tokens / per_pass))
    return accum, accum * per_pass


def new_model(cfg: PretrainRecipe, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # a multiple of 64: tensor-core friendly (TinyLlama: 32000)
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=cfg.data.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        rms_norm_eps=1e-5,
        tie_word_embeddings=m.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = m.attn_implementation
    torch.manual_seed(m.init_seed)
    return LlamaForCausalLM(config)


def load_base(cfg: PretrainRecipe, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.modeling import from_pretrained

    model = from_pretrained(
        "model",
        cfg.model.base,
        AutoModelForCausalLM.from_pretrained,
        dtype=torch.float32,
        attn_implementation=cfg.model.attn_implementation,
    )
    if len(tokenizer) > model.config.vocab_size:
        raise RecipeError(
            f"tokenizer has {len(tokenizer)} tokens but {cfg.model.base} only {model.config.vocab_size} "
            "embeddings: continue with the base's own tokenizer (tokenizer.name_or_path=null)"
        )
    return model


def loss_of(model, blocks, fused: bool = False):
    """Mean next-token loss of a batch of blocks (L+1 tokens each: inputs are the first L, targets the last L).
    Computed here rather than with `labels=`, which would shift again and drop each block's last target.
    `fused`: the decoder's hidden states go straight into the fused head + loss (finetune/fused_loss.py)."""
    import torch
    import torch.nn.functional as F

    inputs, targets = blocks[:, :-1], blocks[:, 1:].flatten()
    if fused and torch.is_grad_enabled():
        from finetune.fused_loss import fused_linear_cross_entropy

        hidden = model.get_decoder()(input_ids=inputs).last_hidden_state
        return fused_linear_cross_entropy(hidden.flatten(0, 1), model.get_output_embeddings().weight, targets)
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets)


def batch_of(blocks, pairs, device):
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([blocks[c][i] for c, i in pairs])).to(device, non_blocking=True)


def evaluate(model, corpora, cfg: PretrainRecipe, accelerator) -> dict:
    """Validation loss and perplexity per corpus (up to eval_blocks blocks each) and their mean."""
    import torch

    model.eval()
    world, micro = accelerator.num_processes, cfg.training.micro_batch_size
    out = {}
    with torch.no_grad():
        for c, (name, blocks) in enumerate(zip(corpora.names, corpora.val, strict=True)):
            n = min(len(blocks), cfg.training.eval_blocks)
            # every process runs the same number of batches (FSDP's collectives need it), wrapping round
            mine = [i % len(blocks) for i in range(-(-n // world) * world)][accelerator.process_index :: world]
            total = torch.zeros(2, device=accelerator.device)
            for start in range(0, len(mine), micro):
                pairs = [(c, i) for i in mine[start : start + micro]]
                total += torch.stack(
                    [
                        loss_of(model, batch_of(corpora.val, pairs, accelerator.device)) * len(pairs),
                        torch.tensor(float(len(pairs)), device=accelerator.device),
                    ]
                )
            total = accelerator.reduce(total, "sum")
            out[f"val_loss/{name}"] = round((total[0] / total[1]).item(), 4)
    losses = list(out.values())
    out["val_loss"] = round(sum(losses) / len(losses), 4)
    out.update({k.replace("loss", "ppl"): round(math.exp(min(v, 50)), 2) for k, v in list(out.items())})
    model.train()
    return out


def save_model(accelerator, model, tokenizer, out: Path, extra: dict[str, dict]) -> None:
    """The final model + tokenizer + JSON files into `out`, each file moved into place, config.json last, so a
    folder with a config.json always holds a whole model."""
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name, data in extra.items():
        (tmp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        f.replace(out / f.name)
    tmp.rmdir()


def train(cfg: PretrainRecipe, recipe_file: Path | None = None) -> dict:
    """Run the recipe; return its metrics (also written to output_dir/metrics.json)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from finetune import checkpoints, corpus, throughput
    from finetune.modeling import resolve_precision
    from finetune.throughput import mfu, peak_memory_gb

    t = cfg.training
    precision = resolve_precision(t.precision)
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision)
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # a line per file saved, at every checkpoint
    if accelerator.num_processes == 1:
        throughput.warn_if_cpu_threads_capped(log)
    out = Path(t.output_dir)
    recipe = config.to_dict(cfg)
    run_info = {"processes": accelerator.num_processes}  # with the recipe, decides which blocks each step reads
    latest = checkpoints.start(out, cfg.resume, recipe, run_info)  # refuses before anything is overwritten
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(config.to_yaml(cfg), encoding="utf-8")
        log.info("recipe %s -> %s", recipe_file or "(in code)", out)

    # ---------------------------------------------------------------------------------------------- Data
    tokenizer_source = cfg.tokenizer.name_or_path or cfg.model.base
    with accelerator.main_process_first():  # one process reads, tokenises and caches; the others open the cache
        corpora = corpus.prepare(cfg.data, cfg.tokenizer, tokenizer_source)
    tokenizer = corpora.tokenizer
    seq_len, world, micro = cfg.data.seq_len, accelerator.num_processes, t.micro_batch_size
    accum, step_tokens = batch_shape(cfg, world)
    total_steps = t.max_steps or max(1, round(t.max_tokens / step_tokens))
    for c in corpora.summary():
        log.info(
            "corpus %s: weight %g, %s training tokens (%.2f characters per token), %s validation tokens",
            c["name"],
            c["weight"],
            f"{c['train_tokens']:,}",
            c["chars_per_token"],
            f"{c['val_tokens']:,}",
        )

    # --------------------------------------------------------------------------------------------- Model
    set_seed(t.seed)
    model = load_base(cfg, tokenizer) if cfg.model.base else new_model(cfg, tokenizer)
    flops_per_token = throughput.flops_per_token(model, seq_len)
    n_params = model.num_parameters()
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    log.info(
        "model: %s, %s parameters, %d layers, hidden %d; %s",
        cfg.model.base or "new LLaMA",
        f"{n_params:,}",
        model.config.num_hidden_layers,
        model.config.hidden_size,
        precision,
    )
    log.info(
        "batch: %d blocks x %d tokens x %d accumulation x %d processes = %s tokens per step (asked %s); "
        "%d steps = %s tokens",
        micro,
        seq_len,
        accum,
        world,
        f"{step_tokens:,}",
        f"{t.global_batch_tokens:,}",
        total_steps,
        f"{total_steps * step_tokens:,}",
    )

    # ---------------------------------------------------------------------------------- Optimiser, schedule
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]  # RMSNorm weights: decaying them only hurts
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": t.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=t.learning_rate,
        betas=tuple(t.betas),
        fused=accelerator.device.type in ("cuda", "cpu"),
    )
    if t.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The fused head calls the decoder and the head's weight directly, which only a model that no wrapper
    # shards or synchronises allows (one process, not compiled); elsewhere the model's own head runs.
    # Under fp16 autocast its gradient (softmax / tokens, ~1e-9 per vocabulary entry) would underflow before the
    # loss scaler sees it, so fp16 (GPUs without bf16) uses the model's head too.
    fused = (
        t.fused_loss and accelerator.distributed_type == DistributedType.NO and not t.compile and precision != "fp16"
    )
    log.info("loss: %s", "fused output layer + cross-entropy" if fused else "the model's head, then cross-entropy")
    # The scheduler is stepped by us once per optimiser step, so it is not passed through prepare() (which
    # would step it once per process); it is still saved with the checkpoint.
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, min(t.warmup_steps, total_steps - 1), total_steps, min_lr_rate=t.min_lr_ratio
    )
    mixture = corpora.mixture(cfg.data.seed)
    state = RunState()
    accelerator.register_for_checkpointing(scheduler, mixture, state)
    if latest:
        accelerator.load_state(str(latest))
        log.info("resumed from %s: step %d, %s tokens seen", latest, state.step, f"{state.tokens:,}")

    # --------------------------------------------------------------------------------------------- Train
    log_file = out / "log.jsonl"
    if accelerator.is_main_process and not latest:
        log_file.write_text("")

    def record(row: dict) -> None:
        if accelerator.is_main_process:
            with log_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    if state.step == 0:
        state.initial_val = evaluate(model, corpora, cfg, accelerator)
        record({"step": 0, **state.initial_val})
        log.info("step 0 | val loss %s", _val_summary(state.initial_val, corpora.names))
    timed_tokens, timed_seconds = 0, 0.0
    model.train()
    last_val = state.initial_val
    while state.step < total_steps:
        start = time.perf_counter()
        pairs = mixture.draw(state.step, micro * accum * world)[accelerator.process_index :: world]
        loss_sum = torch.zeros((), device=accelerator.device)
        for k in range(accum):
            batch = batch_of(corpora.train, pairs[k * micro : (k + 1) * micro], accelerator.device)
            with accelerator.no_sync(model) if k < accum - 1 else nullcontext(), accelerator.autocast():
                loss = loss_of(model, batch, fused)
                accelerator.backward(loss / accum)
            loss_sum += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += step_tokens
        loss = state.loss = accelerator.reduce(loss_sum / accum, "mean").item()
        elapsed = time.perf_counter() - start
        timed_tokens, timed_seconds = timed_tokens + step_tokens, timed_seconds + elapsed
        row = {
            "step": state.step,
            "time": round(time.time(), 3),
            "loss": round(loss, 4),
            "lr": lr,
            "grad_norm": round(float(grad_norm), 4),
            "tokens_per_s": round(step_tokens / elapsed, 1),
            "peak_mem_gb": round(peak_memory_gb(), 3),
            "tokens": state.tokens,
        }
        if (used := mfu(step_tokens / elapsed, flops_per_token, world)) is not None:
            row["mfu"] = used
        if state.step % t.log_every == 0 or state.step == total_steps:
            log.info(
                "step %d/%d | loss %.4f | lr %.2e | grad norm %.2f | %s tok/s%s | peak %.2f GB | %s tokens",
                state.step,
                total_steps,
                loss,
                lr,
                row["grad_norm"],
                f"{row['tokens_per_s']:,.0f}",
                f" | MFU {row['mfu']:.1%}" if "mfu" in row else "",
                row["peak_mem_gb"],
                _short(state.tokens),
            )
        if (t.eval_every and state.step % t.eval_every == 0) or state.step == total_steps:
            last_val = evaluate(model, corpora, cfg, accelerator)
            row.update(last_val)
            log.info("step %d | val loss %s", state.step, _val_summary(last_val, corpora.names))
        record(row)
        if state.step % t.save_every == 0 or state.step == total_steps:
            checkpoints.save_state(accelerator, out, state.step, recipe, run_info, t.keep_checkpoints)
    if last_val is state.initial_val and state.step:  # resumed at the end: evaluate what was trained
        last_val = evaluate(model, corpora, cfg, accelerator)

    # ---------------------------------------------------------------------------------------------- Save
    seen = {name: count * seq_len for name, count in zip(corpora.names, mixture.consumed, strict=True)}
    lineage = {
        "built_by": "finetune.pretrain",
        "recipe": str(recipe_file) if recipe_file else None,
        "base": cfg.model.base,
        "base_lineage": _lineage_of(cfg.model.base),
        "tokenizer": tokenizer_source or f"byte-level BPE trained on the corpora, vocabulary {len(tokenizer)}",
        "corpora": [{**c, "tokens_seen": seen[c["name"]]} for c in corpora.summary()],
        "tokens_seen": state.tokens,
        "steps": state.step,
        "seq_len": seq_len,
    }
    metrics = {
        "steps": state.step,
        "tokens": state.tokens,
        "parameters": n_params,
        "initial_val": state.initial_val,
        "final_val": last_val,
        "final_train_loss": state.loss,
        "tokens_per_s": round(timed_tokens / timed_seconds, 1) if timed_seconds else None,
        "peak_mem_gb": round(peak_memory_gb(), 3),
    }
    save_model(accelerator, model, tokenizer, out, {"lineage.json": lineage, "metrics.json": metrics})
    speed = f"{metrics['tokens_per_s']:,.0f} tokens/s" if metrics["tokens_per_s"] else "no steps were left to train"
    log.info(
        "done: val loss %.4f -> %.4f (%s); %s, peak memory %.2f GB; model in %s",
        state.initial_val["val_loss"],
        last_val["val_loss"],
        ", ".join(
            f"{n} {state.initial_val[f'val_loss/{n}']:.3f} -> {last_val[f'val_loss/{n}']:.3f}" for n in corpora.names
        ),
        speed,
        metrics["peak_mem_gb"],
        out,
    )
    if cfg.hub.push_to_hub and accelerator.is_main_process:
        from finetune import hub

        hub.push(cfg.hub, out)
    accelerator.end_training()
    return metrics


def _lineage_of(base: str | None) -> dict | None:
    if base and (Path(base) / "lineage.json").exists():
        return json.loads((Path(base) / "lineage.json").read_text(encoding="utf-8"))
    return None


def _val_summary(val: dict, names: list[str]) -> str:
    per = ", ".join(f"{n} {val[f'val_loss/{n}']:.4f}" for n in names)
    return f"{val['val_loss']:.4f} (ppl {val['val_ppl']:,.1f}; {per})"


def _short(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def cli() -> None:
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
