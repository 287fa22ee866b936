"""Speed and memory: tokens/s, MFU on GPUs, peak memory; and checkpoints that resume only when complete."""

from __future__ import annotations

import os
import re
import resource
import time
from pathlib import Path

import torch

COMPLETE = ".complete"  # written after a checkpoint's last file: a checkpoint without it is ignored on resume

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
    """Turns the trainer's cumulative count of non-pad tokens into tokens/s (and MFU) between log calls.

    MFU counts 6 FLOPs per parameter per token (forward + backward, PaLM's convention), over all of the
    model's parameters, frozen ones included, since their activations' gradients are computed.
    """

    def __init__(self, n_params: int, world_size: int = 1):
        self.flops_per_token = 6 * n_params
        self.world_size = world_size
        self.last_time = time.perf_counter()
        self.last_tokens = None

    def update(self, logs: dict) -> dict:
        now = time.perf_counter()
        tokens = logs.get("num_tokens")
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


def train_flops_per_token(model, seq_len: int) -> int:
    """Training FLOPs per token, as in PaLM (appendix B) and TinyLlama's MFU: 6 per parameter that takes part
    in a matrix multiply (all but the input embedding, a lookup), plus attention's 12 x layers x hidden x
    seq_len (scores and weighted sum, forward and backward; the causal mask is not discounted)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    if not cfg.tie_word_embeddings:
        params -= model.get_input_embeddings().weight.numel()
    return 6 * params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def mark_complete(checkpoint_dir: str | os.PathLike) -> None:
    Path(checkpoint_dir, COMPLETE).touch()


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest `checkpoint-N` in output_dir that finished writing, or None."""
    found = []
    for d in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / COMPLETE).exists():
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None
