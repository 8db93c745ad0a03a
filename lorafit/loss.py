"""The causal-LM loss, computed only where there is something to learn, in vocabulary chunks.

The usual path (`model(...).logits` then cross-entropy) multiplies EVERY position's hidden state by
the (vocab x hidden) output head and keeps the fp32 logits for backward: for Phi-3 that is
32,064 floats per token, and on a small model the head is most of the step. lorafit instead

1. runs the decoder only (`model.get_decoder()`), giving hidden states h (B, T, H);
2. keeps the rows whose label is a target (assistant tokens; labels come pre-shifted from
   `lorafit.packing.collate`), h_sel (N, H), usually a fraction of B*T;
3. computes, chunk by chunk of rows, logits (c, V) in fp32, the summed cross-entropy, and right
   there the gradient w.r.t. h (softmax - onehot) @ W, so no (N, V) tensor is ever kept for backward.

Backward then only scales the stored gradient. The result equals `F.cross_entropy(..., reduction=
"sum")` on the full logits (fp32 accumulation), tested in tests/test_train.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.attention import flat_batch, needs_one_row, segment_kwargs

CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, compute_dtype: torch.dtype
    ):
        n, vocab = h.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_BYTES // (4 * vocab))
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for i in range(0, n, chunk):
            hc, yc = h[i : i + chunk].to(compute_dtype), targets[i : i + chunk]
            logits = (hc @ w.T).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(len(yc), device=yc.device), yc] -= 1.0  # d loss / d logits
                g = probs.to(compute_dtype)
                if need_h:
                    grad_h[i : i + chunk] = (g @ w).to(h.dtype)
                if need_w:
                    grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.has = (need_h, need_w)
        ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.has
        gh = grad_h * grad_out.to(grad_h.dtype) if need_h else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if need_w else None
        return gh, gw, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """sum over rows of CE(h @ weight.T, targets), without keeping (N, V) logits. h (N, H), weight (V, H)."""
    if h.shape[0] == 0:
        return h.sum() * 0.0
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, compute_dtype or weight.dtype)


def fast_head_ok(model: nn.Module) -> bool:
    """Whether the chunked path computes exactly what the model's own forward would.

    It needs a plain bias-free Linear head and no logit post-processing (soft-capping, scaling).
    """
    head = model.get_output_embeddings()
    cfg = model.config
    return (
        type(head) is nn.Linear
        and head.bias is None
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", None) in (None, 1, 1.0)
        and hasattr(model, "get_decoder")
    )


def loss_sum(model: nn.Module, batch: dict, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Summed cross-entropy over the batch's targets (labels != -100, already shifted).

    The model gets input_ids and position_ids and no attention_mask, with use_cache=False: Phi-3 (and
    other transformers models) then build a block-diagonal causal mask from the restarting
    position_ids, so packed conversations never see each other. A model on ``lorafit_sdpa`` also
    gets the batch's ``segments`` and attends per conversation instead (`lorafit.attention`); a
    flash-attention model gets the batch as one row (`lorafit.attention.flat_batch`).

    The target positions come from the host: ``target_index`` (from `lorafit.packing.collate`, the
    flat positions in B*T where labels != -100, ascending) picks the same rows as ``labels != -100``
    would, in the same order, but without a data-dependent shape, so no device -> host sync per
    micro-batch. A batch without it (built by hand) falls back to the boolean mask.
    """
    if needs_one_row(model) and batch["input_ids"].shape[0] > 1:
        batch = flat_batch(batch)
    labels = batch["labels"]
    index = batch.get("target_index")
    if index is None:
        index = labels.reshape(-1).ne(-100).nonzero().squeeze(1)  # syncs: the count is data-dependent
    targets = labels.reshape(-1).index_select(0, index)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    inputs.update(segment_kwargs(model, batch))  # lorafit_sdpa: attention per packed conversation
    if fast_head_ok(model):
        hidden = model.get_decoder()(**inputs).last_hidden_state
        head = model.get_output_embeddings()
        return linear_cross_entropy(
            hidden.flatten(0, 1).index_select(0, index), head.weight, targets, compute_dtype
        )
    logits = model(**inputs).logits
    return F.cross_entropy(logits.flatten(0, 1).index_select(0, index).float(), targets, reduction="sum")
