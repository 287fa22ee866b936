"""Speed and memory in every stage: tokens/s, FLOPs per token and MFU (GPUs), peak memory."""

from __future__ import annotations

import os
import resource
import time

import torch

# Dense bf16 peak FLOP/s for MFU, by substring of torch.cuda.get_device_name().
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def warn_if_cpu_threads_capped(log) -> None:
    """`accelerate launch` runs a CPU process with OMP_NUM_THREADS=1 unless given --num_cpu_threads_per_process:
    say so when torch uses fewer threads than the cores it may run on."""
    if torch.cuda.is_available():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.get_num_threads() < cores:
        log.warning(
            "torch computes on %d of %d CPU cores (OMP_NUM_THREADS=%s; accelerate launch sets 1 by default): "
            "add --num_cpu_threads_per_process %d to accelerate launch to use them all",
            torch.get_num_threads(),
            cores,
            os.environ.get("OMP_NUM_THREADS", "unset"),
            cores,
        )


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation over all devices, or None where the device's peak is unknown (CPU)."""
    peak = device_peak_flops()
    return round(tokens_per_s * flops_per_token / (peak * world_size), 4) if peak else None


class Throughput:
    """Turns a cumulative count of tokens (the Trainer's public `state.num_input_tokens_seen`) into tokens/s and MFU
    between log calls."""

    def __init__(self, flops_per_token: int, world_size: int = 1):
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.last_time = time.perf_counter()
        self.last_tokens = None

    def update(self, tokens: int | None) -> dict:
        now = time.perf_counter()
        out = {"peak_mem_gb": round(peak_memory_gb(), 3)}
        if tokens is not None:
            if self.last_tokens is not None and now > self.last_time:
                rate = (tokens - self.last_tokens) / (now - self.last_time)
                out["tokens_per_s"] = round(rate, 1)
                if (used := mfu(rate, self.flops_per_token, self.world_size)) is not None:
                    out["mfu"] = used
            self.last_tokens = tokens
        self.last_time = now
        return out


def _numel(p) -> int:
    """Parameters a tensor holds: a bitsandbytes 4-bit weight stores two per byte, its quant_state the true shape."""
    quant_state = getattr(p, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else p.numel()


def flops_per_token(model, seq_len: int) -> int:
    """Training FLOPs per token, the one formula for every stage (pretraining, SFT, DPO), so their MFU compare.

    PaLM's (appendix B) and TinyLlama's count, extended to frozen weights: a parameter in a matrix multiply costs 2
    FLOPs forward and, in the backward pass, 2 for its input's gradient and 2 more for its own if it is trained:
    6 x trainable + 4 x frozen (a LoRA base, 4-bit included). "In a matrix multiply" is every parameter but the input
    embedding (a lookup; counted when tied to the output head). Attention adds 12 x layers x hidden x seq_len
    (scores and weighted sum, forward and backward; the causal mask not discounted)."""
    cfg = model.config
    embedding = model.get_input_embeddings().weight
    skip = set() if getattr(cfg, "tie_word_embeddings", False) else {id(embedding)}
    trainable = frozen = 0
    for p in model.parameters():
        if id(p) in skip:
            continue
        if p.requires_grad:
            trainable += _numel(p)
        else:
            frozen += _numel(p)
    return 6 * trainable + 4 * frozen + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
