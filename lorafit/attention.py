"""Attention over packed rows, one conversation at a time.

A packed row holds several conversations. transformers' sdpa path keeps them apart with a
block-diagonal causal mask built from the restarting position_ids (see `lorafit.packing.collate`),
so every score of the row is computed and most are thrown away: a 2,048-token row of eight
256-token conversations does eight times the needed attention work, and a masked kernel cannot
take the fast causal path.

`packed_sdpa` is registered with transformers as the attention implementation ``lorafit_sdpa``.
Given the segment lengths of each row (``lorafit_segments``, from `collate`'s ``segments``), it
splits q, k and v at the conversation boundaries and calls `scaled_dot_product_attention` with
``is_causal=True`` on each piece, so only the scores that are used are computed::

    row:   a0 a1 a2 b0 b1 p p       segments [3, 2, 2]
    sdpa(a0..a2, causal) | sdpa(b0 b1, causal) | sdpa(p p, causal)

It gives the masked result (tested to 1e-5). Without ``lorafit_segments`` (generation, a batch
with an attention mask) it IS transformers' sdpa: the same mask function and the same kernel, so a
model set to ``lorafit_sdpa`` behaves exactly like ``sdpa`` everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_SDPA = "lorafit_sdpa"


def packed_sdpa(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    lorafit_segments: list[list[int]] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, T, H, D)."""
    if lorafit_segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = key.shape[1] != query.shape[1]
    rows = []
    # unbind/split (not indexing): their backward is one stack/cat, not a zero-filled copy per piece
    for q, k, v, lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), lorafit_segments):
        pieces = zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))
        out = [
            F.scaled_dot_product_attention(
                qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
            )
            for qs, ks, vs in pieces
        ]
        rows.append(out[0] if len(out) == 1 else torch.cat(out, 1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``lorafit_sdpa`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def use_packed_sdpa(model) -> bool:
    """Switch a model that uses sdpa to ``lorafit_sdpa``; returns whether it did."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(PACKED_SDPA)
    return True


def segment_kwargs(model, batch: dict) -> dict:
    """The extra forward kwargs that let ``lorafit_sdpa`` attend per conversation."""
    segments = batch.get("segments")
    if segments is None or getattr(model.config, "_attn_implementation", None) != PACKED_SDPA:
        return {}
    return {"lorafit_segments": segments}
