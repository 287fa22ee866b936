"""Attention for padding-free packed batches without a variable-length kernel (CPU): each packed example attends
causally within itself, one `scaled_dot_product_attention(is_causal=True)` call per example.

Written here because no library has it for the CPU: flash-attn's varlen kernels are CUDA-only, and sdpa on a packed
row needs a (length x length) block-diagonal mask, so it computes every pair of positions in the row, across
examples and above the diagonal, and masks most of them away. Per example the work is sum(L_i^2) / 2 instead of
(sum L_i)^2. Registered with transformers as `sdpa_segments` (an attention function and, for batches that are not
packed, sdpa's mask), so it runs inside the model's own forward, LoRA and gradient checkpointing included.
"""

from __future__ import annotations

import torch

NAME = "sdpa_segments"


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature. A packed row (batch 1 with `cu_seq_lens_q`, which TRL's
    padding-free collator passes) runs example by example; anything else is plain sdpa with its mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = kwargs.get("cu_seq_lens_q")
    plain = all(kwargs.get(k) is None for k in ("sliding_window", "softcap", "position_bias", "s_aux"))
    if starts is None or not plain or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    bounds = starts.tolist()
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            dropout_p=dropout if module.training else 0.0,
            is_causal=True,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        if b > a
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `sdpa_segments` a valid `attn_implementation`; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
