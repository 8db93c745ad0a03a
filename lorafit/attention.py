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

Each piece goes to SDPA as a 4-D ``(1, H, L, D)`` batch of one: PyTorch's fused kernels (flash and
memory-efficient on CUDA, ``_scaled_dot_product_flash_attention_for_cpu`` on the CPU) only take 4-D
input, and a 3-D ``(H, L, D)`` call silently runs the math path (fp32 scores, an L x L mask per
call, H x L x L probabilities kept for backward). Grouped-query attention (fewer k/v heads) goes
through ``enable_gqa``, so k and v are never repeated. A model with a sliding window (Phi-3:
``config.sliding_window``; a query sees itself and the ``window - 1`` keys before it) gets the
window as a boolean mask on the pieces longer than it; shorter pieces are plain causal, as they
are under transformers' mask. Dropout sends a piece to the math path (no fused CPU kernel has it).

It gives the masked result (tested to 1e-5, with GQA and a window, outputs and gradients; tests/
test_attention_kernels.py also checks the kernel that runs). Without ``lorafit_segments``
(generation, a batch with an attention mask) it IS transformers' sdpa: the same mask function and
the same kernel, so a model set to ``lorafit_sdpa`` behaves exactly like ``sdpa`` everywhere else.

``lorafit_flex`` (``attn_implementation: flex_attention``) is the one-call route, as in torchtune:
ONE `flex_attention` call per layer for the whole packed batch, with a document-causal BlockMask
built once per micro-batch from the same segments (`PackedMasks`), so the kernel skips the blocks
of the row's T x T grid that cross conversations (or lie beyond the sliding window) instead of
computing and masking them::

    doc ids   0 0 0 1 1 2 2          mask_mod(q, kv) = doc[q] == doc[kv] and kv <= q
                                                       (and q - kv < window)

GQA goes through ``enable_gqa``; flex has no dropout. PyTorch runs flex_attention's backward only
on GPUs (torch 2.13 on a CPU: "FlexAttention does not support backward on CPU", eager and compiled),
so training with it is refused off CUDA (`lorafit.model.check_attention`); its forward runs
everywhere and is tested on CPU against the masked reference.

flash_attention_2 attends per conversation by itself, from the position_ids, but only when the
batch is ONE row (transformers' ``_is_packed_sequence``); `flat_batch` makes it one row.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

PACKED_SDPA = "lorafit_sdpa"
PACKED_FLEX = "lorafit_flex"


def _window_mask(n: int, window: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool, True where query i may attend key j: causal and i - window < j (transformers'
    ``sliding_window_causal_mask_function``)."""
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def packed_sdpa(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    lorafit_segments: list[list[int]] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, T, H, D)."""
    if lorafit_segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, **kwargs,
        )  # fmt: skip
    gqa = key.shape[1] != query.shape[1]
    rows = []
    # unbind/split (not indexing): their backward is one stack/cat, not a zero-filled copy per piece
    for q, k, v, lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), lorafit_segments):
        pieces = zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))
        out = []
        for (qs, ks, vs), n in zip(pieces, lengths):
            windowed = sliding_window is not None and n > sliding_window
            o = F.scaled_dot_product_attention(
                qs[None], ks[None], vs[None],  # 4-D (1, H, L, D): the fused kernels' layout
                attn_mask=_window_mask(n, sliding_window, q.device) if windowed else None,
                dropout_p=dropout, is_causal=not windowed, scale=scaling, enable_gqa=gqa,
            )  # fmt: skip
            out.append(o[0])
        rows.append(out[0] if len(out) == 1 else torch.cat(out, 1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------- flex_attention


def document_mask_mod(doc: torch.Tensor, window: int | None = None):
    """flex_attention mask_mod of packed rows: query q may see key kv when both are in the same
    conversation of the row (``doc`` (B, T): the conversation number of each token; padding is one more)
    and kv <= q, and, with a sliding `window`, q - kv < window (transformers' sliding-window rule)."""

    def mask_mod(b, h, q, kv):
        same = (doc[b, q] == doc[b, kv]) & (q >= kv)
        return same if window is None else same & (q - kv < window)

    return mask_mod


class PackedMasks:
    """The block masks of one packed micro-batch, one per sliding window, built on first use.

    Built once per micro-batch (in `segment_kwargs`) and shared by every layer: each layer asks for
    its own window (Phi-3: ``config.sliding_window`` on all layers; models with mixed layers ask for
    two). A window no shorter than the rows is no window, so it reuses the plain document mask.
    """

    def __init__(self, segments: list[list[int]], device: torch.device, block_size: int | None = None):
        rows = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in segments]
        self.doc = torch.stack(rows).to(device, non_blocking=True)
        self.block_size = block_size
        self._masks: dict = {}

    def block_mask(self, window: int | None = None):
        if window is not None and window >= self.doc.shape[1]:
            window = None
        if window not in self._masks:
            from torch.nn.attention.flex_attention import create_block_mask

            b, t = self.doc.shape
            size = {"BLOCK_SIZE": self.block_size} if self.block_size else {}
            # compiled on CUDA, so the (B, T, T) grid is never materialized there; on the CPU
            # (forward only: no flex backward there) a compile per row length would cost more
            self._masks[window] = create_block_mask(
                document_mask_mod(self.doc, window), b, None, t, t, device=self.doc.device,
                _compile=self.doc.device.type == "cuda", **size,
            )  # fmt: skip
        return self._masks[window]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_kernel(query, key, value, **kwargs):
    """torch's flex_attention, compiled (once per process; new row lengths may recompile): eager
    flex_attention is an unfused reference that materializes the scores."""
    return _compiled_flex()(query, key, value, **kwargs)


def packed_flex(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    lorafit_masks: PackedMasks | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface for ``lorafit_flex``: q (B, H, T, D), k/v (B, Hkv, T, D) ->
    (B, T, H, D), ONE flex_attention call for the whole packed batch, with the document-causal block
    mask of `lorafit_masks` (and the layer's sliding window). Blocks of the (T x T) grid that no
    query may see (across conversations, beyond the window) are skipped, not computed and masked.
    Without `lorafit_masks` it is transformers' flex_attention."""
    if lorafit_masks is None:
        from transformers.integrations.flex_attention import flex_attention_forward

        return flex_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if dropout:
        raise ValueError(
            "lorafit_flex: flex_attention has no attention dropout; set the model's attention_dropout to 0"
        )
    out = flex_kernel(
        query, key, value, block_mask=lorafit_masks.block_mask(sliding_window), scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``lorafit_sdpa`` and ``lorafit_flex`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    AttentionInterface.register(PACKED_FLEX, packed_flex)
    AttentionMaskInterface.register(PACKED_FLEX, flex_attention_mask)


def use_packed_sdpa(model) -> bool:
    """Switch a model that uses sdpa to ``lorafit_sdpa``; returns whether it did."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(PACKED_SDPA)
    return True


def use_packed_attention(model) -> str | None:
    """sdpa -> ``lorafit_sdpa``, flex_attention -> ``lorafit_flex``; returns the new name, or None when
    the model's attention stays as it is (eager, flash-attention)."""
    packed = {"sdpa": PACKED_SDPA, "flex_attention": PACKED_FLEX}.get(
        getattr(model.config, "_attn_implementation", None)
    )
    if packed is None:
        return None
    register()
    model.set_attn_implementation(packed)
    return packed


def segment_kwargs(model, batch: dict) -> dict:
    """The extra forward kwargs that let ``lorafit_sdpa`` / ``lorafit_flex`` attend per conversation.

    ``lorafit_flex`` also gets its block mask as the model's ``attention_mask``: transformers takes a
    ready 4-D mask as it is, so it neither builds a second one from the position_ids nor syncs to find
    the packed sequences in them.
    """
    segments = batch.get("segments")
    impl = getattr(model.config, "_attn_implementation", None)
    if segments is None or impl not in (PACKED_SDPA, PACKED_FLEX):
        return {}
    if impl == PACKED_SDPA:
        return {"lorafit_segments": segments}
    masks = PackedMasks(segments, batch["input_ids"].device)
    return {
        "lorafit_masks": masks,
        "attention_mask": masks.block_mask(getattr(model.config, "sliding_window", None)),
    }


def attends_per_segment(model) -> bool:
    """Whether the model's attention never computes scores across the conversations of a row
    (``lorafit_sdpa``, ``lorafit_flex``, flash-attention), so conversations can share a row at no cost
    in attention work: then an unpacked batch goes in as one row without padding (`lorafit.packing.one_row`).
    With eager or plain sdpa attention a longer row costs quadratically more, so they keep padded rows."""
    impl = str(getattr(model.config, "_attn_implementation", None) or "")
    return impl in (PACKED_SDPA, PACKED_FLEX) or "flash" in impl


def needs_one_row(model) -> bool:
    """Whether the model's attention separates packed conversations only within a batch of one row.

    transformers' flash-attention path (flash_attention_2/3, hub kernels) derives the variable-length
    boundaries from the position_ids only when the batch has ONE row (``_is_packed_sequence`` in
    ``modeling_flash_attention_utils``); with more rows it runs plain causal attention over each whole
    row and packed conversations attend to each other. sdpa, eager and flex build a mask per row.
    """
    return "flash" in str(getattr(model.config, "_attn_implementation", None) or "")


def flat_batch(batch: dict) -> dict:
    """A packed (B, T) batch as ONE row (1, B*T), for flash-attention (see `needs_one_row`)::

        row 0:  a0 a1 b0 p        position_ids 0 1 0 0        one row:  a0 a1 b0 p c0 c1 c2 c3
        row 1:  c0 c1 c2 c3       position_ids 0 1 2 3        position_ids 0 1 0 0 0 1 2 3

    Every row starts at position 0 and its padding restarts at 0, so each conversation (and each
    padding run) stays a sequence of its own; labels are already shifted per conversation, and
    ``target_index`` (flat positions in B*T) stays valid. TRL flattens its padding-free batches the same way.
    """
    out = dict(batch)
    for k in ("input_ids", "position_ids", "labels"):
        out[k] = batch[k].reshape(1, -1)
    if batch.get("segments") is not None:
        out["segments"] = [[n for row in batch["segments"] for n in row]]
    return out
