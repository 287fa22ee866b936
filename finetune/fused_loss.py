"""Next-token loss with the output layer fused in: logits are made chunk by chunk and their gradient is taken
in the same pass, so the full (tokens x vocabulary) logits never exist. Pretraining scores every position;
SFT passes only the positions whose label is learned (prompt and padding never reach the head).

Written here rather than taken from a library: Liger Kernel and Apple's cut-cross-entropy do this in Triton,
on CUDA only, and TRL's fused LM head scores every position off Triton devices and recomputes each logits tile
in the backward pass; this is the same idea in plain PyTorch, so it runs on CPU too. With a 32,000-token
vocabulary and 16 x 2,048 tokens per micro-batch, the fp32 logits and their gradient would take 8 GiB; on the
CPU the step is ~10% faster (one softmax pass instead of log-softmax forward and backward).
"""

from __future__ import annotations

import torch

CHUNK = 512  # positions per chunk: 512 x vocabulary floats at a time


def _chunked(hidden, weight, targets, chunk, divisor, grad_hidden, grad_weight, stats):
    """The loop both paths share: sum of CE over chunks / divisor; fills grad_hidden / grad_weight (when given)
    with the gradient of that value, and `stats` (when given) with the entropy sum and the top-1 count."""
    device = hidden.device.type
    # Under autocast the head multiplies in the autocast dtype (bf16 on GPU), as the unfused model would.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    with torch.autocast(device, enabled=False):
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk].to(dtype), targets[start : start + chunk]
            logits = (h @ w.T).float()
            rows = torch.arange(len(y), device=y.device)
            target = logits[rows, y]
            if stats is not None:
                correct += (logits.argmax(dim=-1) == y).sum()
            # One exp pass over the chunk serves the loss and the softmax: exp(logits - max), its row sums give
            # logsumexp, and scaling the rows by 1 / (sum x divisor) gives the gradient (torch.logsumexp would
            # exponentiate once more, and a separate softmax and division would each pass over the chunk again).
            top = logits.amax(dim=-1, keepdim=True)
            shifted = logits.sub_(top)  # in place: no second vocabulary-wide buffer
            if stats is not None:
                shifted_copy = shifted.clone()
            p = shifted.exp_()
            sums = p.sum(dim=-1)
            lse = top.squeeze(1) + sums.log()
            total += (lse - target).sum()
            if stats is not None:  # entropy = lse - sum(p * logits) = log(sums) - sum(p * (logits - max))
                entropy += (sums.log() - (p * shifted_copy).sum(dim=-1) / sums).sum()
            if grad_hidden is None:
                continue
            grad = p.mul_((1.0 / (sums * divisor))[:, None])  # softmax / divisor, in place
            grad[rows, y] -= 1.0 / divisor
            grad = grad.to(dtype)
            grad_hidden[start : start + chunk] = (grad @ w).to(grad_hidden.dtype)
            if grad_weight is None:  # a frozen head (LoRA): a vocabulary x hidden matmul per chunk saved
                continue
            if grad_weight.dtype == dtype:
                grad_weight.addmm_(grad.T, h)
            else:
                grad_weight += (grad.T @ h).to(grad_weight.dtype)
    if stats is not None:
        stats["entropy_sum"], stats["top1"] = entropy, correct
    return total / divisor


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, targets_i) / divisor, with d/dhidden and, when the head is trained, d/dweight
    computed in the forward pass and scaled by the incoming gradient in the backward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, divisor, stats):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        loss = _chunked(hidden, weight, targets, chunk, divisor, grad_hidden, grad_weight, stats)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else grad_weight * grad_output
        return grad_hidden * grad_output, grad_weight, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = CHUNK,
    divisor: float | torch.Tensor | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` (hidden: tokens x dim) against `targets` (tokens), summed and divided
    by `divisor` (default: the number of tokens, i.e. the mean). `stats`, a dict, receives `entropy_sum` and `top1`
    (the count of targets that are the most likely token), detached, for the log. Without gradients (evaluation)
    no gradient is computed."""
    divisor = hidden.shape[0] if divisor is None else divisor
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk, divisor, stats)
    return _chunked(hidden, weight, targets, chunk, divisor, None, None, stats)


def _causal_lm(model):
    """The causal LM under a PEFT wrapper (LoRA layers live inside its modules, so calling it trains them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fused_loss_unsupported(model) -> str | None:
    """Why the learned-positions loss can't stand in for this model's own head, or None when it can: it
    multiplies by the head's weight alone, so a head with a bias, an adapter or a wrapper, or logits that the
    model scales or soft-caps after the head (Gemma 2, Cohere, Granite), need the model's own forward."""
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        return f"the output layer is a {kind}{' with a bias' if kind == 'torch.nn.modules.linear.Linear' else ''}"
    text = lm.config.get_text_config()
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier"):
        if getattr(text, key, None) not in (None, 1, 1.0):
            return f"the model scales its logits ({key}={getattr(text, key)})"
    return None


def learned_positions_loss(model, inputs: dict, num_items: int | torch.Tensor | None = None, stats: dict | None = None):
    """The SFT next-token loss of a collated batch (`labels` -100 where nothing is learned), with only the learned
    positions passed to the output layer: prompt tokens and padding never reach it.

    Equal to the model's own loss (`model(**inputs).loss`) and its gradients: the sum over learned tokens of
    -log p(label), divided by `num_items` (the Trainer's count over the accumulated micro-batches) or, when None,
    by this batch's learned tokens. `model` is a causal LM or a PEFT model around one; call it unwrapped (one
    process): the decoder and the head's weight are used directly. `stats` receives entropy_sum, top1 and count."""
    lm = _causal_lm(model)
    # without the KV cache: with it, transformers skips the packed-sequence mask (examples would attend to each other)
    kwargs = {k: v for k, v in inputs.items() if k != "labels"} | {"use_cache": False}
    hidden = lm.get_decoder()(**kwargs).last_hidden_state[:, :-1]
    targets = inputs["labels"][:, 1:].to(hidden.device)
    learned = targets != -100
    count = learned.sum()
    # clamped: a micro-batch (or accumulation window) with nothing learned contributes a finite zero, not 0 / 0
    divisor = (count if num_items is None else torch.as_tensor(num_items, device=count.device)).clamp(min=1)
    loss = fused_linear_cross_entropy(
        hidden[learned], lm.get_output_embeddings().weight, targets[learned], divisor=divisor, stats=stats
    )
    if stats is not None:
        stats["count"] = count
    return loss


def learned_token_nll(model, inputs: dict, chunk: int = CHUNK) -> torch.Tensor:
    """-log p(label) at every learned position of a collated batch (`labels` -100 where nothing is learned), as a
    (batch, length - 1) float32 tensor holding 0 elsewhere; no gradient. Evaluation's per-example loss: as in
    training, only learned positions reach the output layer, chunk by chunk; a head this can't stand in for (see
    fused_loss_unsupported) runs in the model's own forward instead."""
    import torch.nn.functional as F

    lm = _causal_lm(model)
    targets = inputs["labels"][:, 1:]
    learned = targets != -100
    kwargs = {k: v for k, v in inputs.items() if k != "labels"} | {"use_cache": False}
    out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    with torch.no_grad():
        if fused_loss_unsupported(model):
            logits = model(**kwargs).logits[:, :-1][learned].float()
            out[learned] = F.cross_entropy(logits, targets[learned], reduction="none")
            return out
        hidden = lm.get_decoder()(**kwargs).last_hidden_state[:, :-1][learned]
        weight = lm.get_output_embeddings().weight
        wanted = targets[learned]
        out[learned] = torch.cat(
            [
                F.cross_entropy(
                    (hidden[s : s + chunk].to(weight.dtype) @ weight.T).float(), wanted[s : s + chunk], reduction="none"
                )
                for s in range(0, len(wanted), chunk)
            ]
            or [torch.zeros(0, device=out.device)]
        )
    return out
