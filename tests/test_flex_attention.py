"""attn_implementation: flex_attention -> lorafit_flex: one flex_attention call per layer for a packed
batch, with a document-causal BlockMask built from collate's segments.

PyTorch has no flex_attention backward on a CPU (pinned below), so what this machine can show is: the
BlockMask stands for exactly the reference mask and skips only blocks nobody attends to; the forward
(eager and compiled kernels) equals the masked reference with GQA and a sliding window; the wiring
through a model (mask per layer window, GQA, layout, no mask built by transformers) gives sdpa's loss
AND gradients when the kernel is replaced by a dense stand-in that applies the BlockMask; and
training on a CPU is refused with the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import lora_grads, train_argv
from test_attention_kernels import SEGMENTS, assert_same_training, chat, masked_reference, qkv
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from lorafit import attention
from lorafit.attention import PACKED_FLEX, PackedMasks, packed_flex, segment_kwargs
from lorafit.cli import main
from lorafit.data import Conversation
from lorafit.demo import demo_data_dir
from lorafit.errors import ConfigError
from lorafit.model import check_attention
from lorafit.packing import collate
from lorafit.tiny import build_model
from lorafit.tokens import tokenize

NO_CPU_BACKWARD = "FlexAttention does not support backward on CPU"
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def eager_flex(query, key, value, **kwargs):
    """The flex kernel without torch.compile (same results; no compile per shape in the tests)."""
    return flex_attention(query, key, value, **kwargs)


def represented(block_mask) -> torch.Tensor:
    """The (B, Q, KV) boolean mask a BlockMask stands for: its computed blocks (partial or full),
    token by token, where the mask_mod allows (full blocks are all allowed by construction)."""
    b, _, q, kv = block_mask.shape
    rows, cols = block_mask.BLOCK_SIZE
    blocks = block_mask.to_dense()[:, 0].bool()
    blocks = blocks.repeat_interleave(rows, 1).repeat_interleave(cols, 2)[:, :q, :kv]
    bi, qi, ki = torch.meshgrid(torch.arange(b), torch.arange(q), torch.arange(kv), indexing="ij")
    return blocks & block_mask.mask_mod(bi, torch.zeros_like(bi), qi, ki)


def reference_mask(segments, window=None) -> torch.Tensor:
    seg = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in segments])
    t = torch.arange(seg.shape[1])
    d = t[:, None] - t[None, :]
    mask = (seg[:, :, None] == seg[:, None, :]) & (d >= 0)
    return mask & (d < window) if window is not None else mask


def test_flex_attention_has_no_backward_on_cpu():
    """The fact lorafit's refusal rests on (torch 2.13): any flex_attention call whose inputs need
    gradients raises on a CPU, eager or compiled. If this starts failing, torch gained a CPU backward:
    lift the refusal in lorafit.model.check_attention."""
    q, k, v = qkv(4)
    with pytest.raises(NotImplementedError, match=NO_CPU_BACKWARD):
        flex_attention(q, k, v)
    with torch.no_grad():  # even with gradients off: the check is on the inputs' requires_grad
        with pytest.raises(NotImplementedError, match=NO_CPU_BACKWARD):
            flex_attention(q, k, v)
    assert flex_attention(q.detach(), k.detach(), v.detach()).shape == q.shape  # the forward alone runs


@pytest.mark.parametrize("window", [None, 40, 129], ids=["causal", "window-40", "window-129"])
@pytest.mark.parametrize("block", [None, 16], ids=["blocks-128", "blocks-16"])
def test_the_block_mask_is_the_reference_mask_and_skips_only_empty_blocks(window, block):
    segments = [[300, 100, 112], [128, 256, 100, 28]]  # 512-token rows; the last pieces are padding runs
    bm = PackedMasks(segments, torch.device("cpu"), block_size=block).block_mask(window)
    want = reference_mask(segments, window)
    assert torch.equal(represented(bm), want)
    rows, cols = bm.BLOCK_SIZE
    per_block = want.unflatten(1, (-1, rows)).unflatten(3, (-1, cols)).any(4).any(2)  # (B, nq, nk)
    assert torch.equal(bm.to_dense()[:, 0].bool(), per_block)  # a block is computed iff someone attends in it
    if block == 16:  # the skipped share: what one call per row saves over a dense masked row
        assert per_block.float().mean() < 0.5


def test_a_window_no_shorter_than_the_rows_is_the_plain_document_mask():
    masks = PackedMasks(SEGMENTS, torch.device("cpu"))
    assert masks.block_mask(16) is masks.block_mask(None) is masks.block_mask(100)
    assert masks.block_mask(3) is not masks.block_mask(None)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [None, 3, 9], ids=["no-window", "window-3", "window-9"])
def test_one_flex_call_equals_the_masked_reference(monkeypatch, kv_heads, window):
    monkeypatch.setattr(attention, "flex_kernel", eager_flex)
    q, k, v = (t.detach() for t in qkv(kv_heads))
    with torch.no_grad():
        got, _ = packed_flex(None, q, k, v, None, sliding_window=window,
                             lorafit_masks=PackedMasks(SEGMENTS, q.device))  # fmt: skip
    torch.testing.assert_close(got, masked_reference(q, k, v, SEGMENTS, window), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_compiled_kernel_and_compiled_mask_equal_the_masked_reference():
    """What runs on CUDA: the compiled flex_attention kernel, and create_block_mask compiled (and
    compiled, the kernel refuses gradients on a CPU just the same)."""
    with pytest.raises(NotImplementedError, match=NO_CPU_BACKWARD):
        torch.compile(flex_attention)(*qkv(4))
    q, k, v = (t.detach() for t in qkv(2))
    masks = PackedMasks(SEGMENTS, q.device)
    mod = attention.document_mask_mod(masks.doc, 3)
    masks._masks[3] = create_block_mask(mod, 2, None, 16, 16, device="cpu", _compile=True)
    assert torch.equal(represented(masks._masks[3]), reference_mask(SEGMENTS, 3))
    with torch.no_grad():
        got, _ = packed_flex(None, q, k, v, None, sliding_window=3, lorafit_masks=masks)
    torch.testing.assert_close(got, masked_reference(q, k, v, SEGMENTS, 3), rtol=1e-5, atol=1e-5)


def dense_stand_in(query, key, value, block_mask, scale=None, enable_gqa=False):
    """What flex_attention computes, done densely by SDPA: its CPU backward is missing, so the model
    wiring's gradients are checked through this (the mask is the BlockMask's own, token by token)."""
    mask = represented(block_mask)[:, None]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, enable_gqa=enable_gqa
    )


@pytest.fixture(scope="module")
def batch(tok):
    convs = [Conversation(chat(f"q{i} " * (i + 1), f"answer {i} " * (3 * i + 1)), f"t:{i}") for i in range(6)]
    data, _ = tokenize(tok, convs, max_seq_length=256, end_of_turn="<|end|>")
    return collate(data, [[0, 1, 2], [5], [3, 4]], pad_id=tok.pad_token_id)


@pytest.mark.parametrize(
    "dims", [{}, {"num_key_value_heads": 2, "sliding_window": 20}], ids=["mha", "gqa-window"]
)
def test_a_model_on_lorafit_flex_trains_as_under_sdpa(monkeypatch, tok, batch, dims):
    """Through the model: the BlockMask goes in as the attention mask (transformers builds none of its
    own and never looks for packed sequences), each layer gets its window's mask, and loss and LoRA
    gradients equal sdpa's block-diagonal mask (kernel: the dense stand-in above)."""
    import transformers.masking_utils as mu

    def no_search(*a, **k):
        raise AssertionError("transformers searched the position_ids for packed sequences")

    monkeypatch.setattr(mu, "find_packed_sequence_indices", no_search)
    monkeypatch.setattr(attention, "flex_kernel", dense_stand_in)
    flex = lora_grads(tok, batch, PACKED_FLEX, **dims)
    monkeypatch.undo()
    assert_same_training(lora_grads(tok, batch, "sdpa", **dims), flex)


def test_the_forward_with_the_real_kernel_gives_sdpas_loss(monkeypatch, tok, batch):
    """No stand-in: eval (no gradients) of a GQA + sliding-window model with flex_attention itself."""
    from lorafit.loss import loss_sum

    monkeypatch.setattr(attention, "flex_kernel", eager_flex)
    losses = {}
    for attn in ("sdpa", PACKED_FLEX):
        model = build_model(tok, num_key_value_heads=2, sliding_window=20).eval()
        attention.register()
        model.set_attn_implementation(attn)
        assert bool(segment_kwargs(model, batch)) is (attn == PACKED_FLEX)
        with torch.no_grad():
            losses[attn] = loss_sum(model, batch)
    torch.testing.assert_close(losses[PACKED_FLEX], losses["sdpa"], rtol=1e-5, atol=1e-5)


def test_training_with_flex_attention_off_cuda_is_refused(tiny_model, tmp_path, capsys):
    with pytest.raises(
        ConfigError, match="flex_attention trains only on a CUDA GPU.*attn_implementation=sdpa"
    ):
        check_attention("flex_attention", torch.device("cpu"), training=True)
    check_attention("flex_attention", torch.device("cpu"), training=False)  # eval and generation run
    check_attention("flex_attention", torch.device("cuda"), training=True)
    data = demo_data_dir() / "train.jsonl"
    args = train_argv(tiny_model, data, tmp_path / "out", sets=["model.attn_implementation=flex_attention"])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert NO_CPU_BACKWARD in err and "Traceback" not in err


def test_fsdp_on_gpus_loads_a_flex_model_on_the_cpu(tiny_model):
    """FSDP loads the base on the CPU for GPUs: the attention is checked against the device that
    computes (`runs_on`), so flex_attention (and flash_attention_2) are not refused there."""
    from lorafit.config import ModelConfig
    from lorafit.model import load_model

    cfg = ModelConfig(name_or_path=str(tiny_model), attn_implementation="flex_attention", dtype="fp32")
    model = load_model(cfg, device=torch.device("cpu"), training=True, runs_on=torch.device("cuda"))
    assert model.config._attn_implementation == PACKED_FLEX
    with pytest.raises(ConfigError, match="flex_attention trains only on a CUDA GPU"):
        load_model(cfg, device=torch.device("cpu"), training=True)
