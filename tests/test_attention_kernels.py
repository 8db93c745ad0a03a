"""Attention over packed rows: lorafit_sdpa equals the masked reference (outputs and gradients, GQA,
sliding window), runs PyTorch's fused CPU kernel rather than the math path, and flash-attention gets
a packed batch as one row. Also: the loss picks its target rows from collate's host-side index."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import lora_grads
from torch.profiler import profile

from lorafit.attention import (
    PACKED_SDPA,
    attends_per_segment,
    flat_batch,
    needs_one_row,
    packed_sdpa,
    use_packed_sdpa,
)
from lorafit.data import Conversation
from lorafit.loss import loss_sum
from lorafit.packing import collate, one_row
from lorafit.tiny import build_model
from lorafit.tokens import tokenize

EOT = "<|end|>"
SEGMENTS = [[5, 9, 2], [12, 4]]  # two rows of 16: three conversations, then one and padding
FLASH_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH = "aten::_scaled_dot_product_attention_math"


def masked_reference(q, k, v, segments, window=None):
    """sdpa over whole rows with the block-diagonal causal (and sliding-window) mask transformers builds."""
    seg = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in segments])
    t = torch.arange(q.shape[2])
    d = t[:, None] - t[None, :]
    mask = (seg[:, :, None] == seg[:, None, :]) & (d >= 0)
    if window is not None:
        mask &= d < window
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.transpose(1, 2)


def qkv(kv_heads: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 16, 8), (2, kv_heads, 16, 8), (2, kv_heads, 16, 8)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def kernels(fn) -> set[str]:
    with profile() as p:
        fn()
    return {e.name for e in p.events()}


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [None, 3, 9, 100], ids=["no-window", "window-3", "window-9", "window-100"])
def test_per_conversation_sdpa_equals_the_masked_reference(kv_heads, window):
    q, k, v = qkv(kv_heads)
    got, _ = packed_sdpa(None, q, k, v, None, sliding_window=window, lorafit_segments=SEGMENTS)
    want = masked_reference(q, k, v, SEGMENTS, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    g_got = torch.autograd.grad((got * w).sum(), (q, k, v))
    g_want = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 3], ids=["causal", "window"])
def test_per_conversation_sdpa_runs_the_fused_cpu_kernel_not_the_math_path(dtype, window):
    q, k, v = qkv(2, dtype)
    ran = kernels(lambda: packed_sdpa(None, q, k, v, None, sliding_window=window, lorafit_segments=SEGMENTS)[0]
                  .sum().backward())  # fmt: skip
    assert FLASH_CPU in ran and FLASH_CPU + "_backward" in ran
    assert MATH not in ran
    # the control: the same call with 3-D (H, L, D) pieces is what falls back to the math path
    ran3 = kernels(lambda: F.scaled_dot_product_attention(q[0], k[0], v[0], is_causal=True, enable_gqa=True))
    assert MATH in ran3 and FLASH_CPU not in ran3


def chat(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


@pytest.fixture(scope="module")
def batch(tok):
    convs = [Conversation(chat(f"q{i} " * (i + 1), f"answer {i} " * (3 * i + 1)), f"t:{i}") for i in range(6)]
    data, _ = tokenize(tok, convs, max_seq_length=256, end_of_turn=EOT)
    return collate(data, [[0, 1, 2], [5], [3, 4]], pad_id=tok.pad_token_id)


def assert_same_training(a, b):
    (l0, g0), (l1, g1) = a, b
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        scale = float(g0[n].abs().max())
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=n: f"{n}: {m}")


def test_a_sliding_window_model_trains_as_under_its_mask(tok, batch):
    """Phi-3 has config.sliding_window; with one shorter than the conversations, lorafit_sdpa keeps
    the window exactly as transformers' sliding-window mask does (loss and LoRA gradients, with GQA)."""
    longest = max(n for row in batch["segments"] for n in row)
    dims = {"num_key_value_heads": 2, "sliding_window": longest // 3}
    assert_same_training(lora_grads(tok, batch, "sdpa", **dims), lora_grads(tok, batch, PACKED_SDPA, **dims))


def test_flash_attention_sees_packed_conversations_only_in_a_batch_of_one_row():
    """Why `flat_batch` exists: transformers derives flash-attention's varlen boundaries from the
    position_ids only when the batch is one row."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    assert not _is_packed_sequence(pos, batch_size=2)  # two rows: plain causal over each whole row
    one = flat_batch({"input_ids": pos, "position_ids": pos, "labels": pos})
    assert one["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1, 2]]
    assert _is_packed_sequence(one["position_ids"], batch_size=1)


def test_one_row_batch_trains_exactly_like_the_packed_batch(tok, batch):
    """flat_batch keeps every conversation (and padding run) a sequence of its own: the masked
    attention over one row gives the packed batch's loss and gradients."""
    one = flat_batch(batch)
    assert one["input_ids"].shape == (1, batch["input_ids"].numel())
    assert one["segments"] == [[n for row in batch["segments"] for n in row]]
    assert_same_training(lora_grads(tok, batch, "sdpa"), lora_grads(tok, one, "sdpa"))
    assert_same_training(lora_grads(tok, batch, PACKED_SDPA), lora_grads(tok, one, PACKED_SDPA))


def test_unpadded_one_row_trains_exactly_like_padded_rows(tok):
    """packing: false with attention per segment: the micro-batch's conversations go in end to end as
    one row with no padding (`one_row`), and give the padded rows' loss and LoRA gradients."""
    convs = [Conversation(chat(f"q{i} " * (i + 1), f"answer {i} " * (4 * i + 1)), f"t:{i}") for i in range(4)]
    data, _ = tokenize(tok, convs, max_seq_length=256, end_of_turn=EOT)
    rows = [[0], [1], [2], [3]]
    padded, flat = (
        collate(data, rows, pad_id=tok.pad_token_id),
        collate(data, one_row(rows), pad_id=tok.pad_token_id),
    )
    assert flat["input_ids"].shape == (1, int(sum(data.lengths)))
    assert flat["input_ids"].numel() < padded["input_ids"].numel()  # the padding is gone
    assert flat["segments"] == [[int(n) for n in data.lengths]]
    assert flat["num_targets"] == padded["num_targets"]
    for attn in ("sdpa", PACKED_SDPA):
        assert_same_training(lora_grads(tok, padded, attn), lora_grads(tok, flat, attn))


def test_only_attention_per_segment_takes_unpadded_rows():
    class Cfg:
        _attn_implementation = None

    class M:
        config = Cfg()

    for name, one in [("flash_attention_2", True), (PACKED_SDPA, True), ("lorafit_flex", True), ("sdpa", False),
                      ("eager", False), ("flex_attention", False)]:  # fmt: skip
        M.config._attn_implementation = name
        assert attends_per_segment(M) is one, name


def test_only_flash_attention_needs_one_row():
    class Cfg:
        _attn_implementation = None

    class M:
        config = Cfg()

    for name, one in [("flash_attention_2", True), ("flash_attention_3", True), ("sdpa", False),
                      (PACKED_SDPA, False), ("eager", False), ("flex_attention", False)]:  # fmt: skip
        M.config._attn_implementation = name
        assert needs_one_row(M) is one, name


def test_collate_knows_the_target_positions(batch):
    want = batch["labels"].reshape(-1).ne(-100).nonzero().squeeze(1)
    assert torch.equal(batch["target_index"], want)
    assert batch["num_targets"] == len(want) > 0


@pytest.mark.parametrize("fast_head", [True, False], ids=["chunked-head", "full-logits"])
def test_the_host_side_target_index_gives_bit_identical_loss_and_gradients(tok, batch, fast_head):
    model = build_model(tok)
    use_packed_sdpa(model)
    if not fast_head:
        model.get_output_embeddings().bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    results = []
    for b in (batch, {k: v for k, v in batch.items() if k != "target_index"}):
        model.zero_grad()
        loss = loss_sum(model, b)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1) and len(g0) == len(g1) > 0
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_the_loss_with_a_target_index_asks_the_device_for_no_positions(tok, batch):
    """No `nonzero` (a device -> host sync: its output size depends on the data) in the loss."""
    model = build_model(tok)
    use_packed_sdpa(model)
    assert "aten::nonzero" not in kernels(lambda: loss_sum(model, batch).backward())
    assert "aten::nonzero" in kernels(lambda: loss_sum(model, {**batch, "target_index": None}).backward())
