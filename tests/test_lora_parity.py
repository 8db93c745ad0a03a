"""Parity with loralib 0.1.2 (microsoft/LoRA): same weights give the same outputs, same state-dict keys,
and checkpoints cross-load both ways.

Tolerance for outputs: atol=1e-5, rtol=1e-5 in fp32 (lorafit scales the (N, r) intermediate instead of
the output and, in eval mode, does not merge; the products are the same up to rounding).
Dropout is 0 in every parity case, so both libraries are deterministic.
"""

import loralib
import pytest
import torch
import torch.nn as nn

from lorafit import lora

TOL = {"atol": 1e-5, "rtol": 1e-5}

# (id, constructor taking the library module, input builder)
CASES = [
    ("linear", lambda m: m.Linear(12, 7, r=4, lora_alpha=8), lambda: torch.randn(5, 12)),
    ("linear_no_bias", lambda m: m.Linear(12, 7, r=4, bias=False), lambda: torch.randn(2, 3, 12)),
    (
        "linear_fan_in_fan_out",
        lambda m: m.Linear(12, 7, r=2, fan_in_fan_out=True),
        lambda: torch.randn(5, 12),
    ),
    (
        "embedding",
        lambda m: m.Embedding(30, 6, r=4, lora_alpha=2, padding_idx=1),
        lambda: torch.randint(0, 30, (3, 5)),
    ),
    ("conv2d", lambda m: m.Conv2d(4, 6, 3, r=2, lora_alpha=4, padding=1), lambda: torch.randn(2, 4, 7, 7)),
    ("conv2d_groups", lambda m: m.Conv2d(4, 6, 3, r=2, groups=2), lambda: torch.randn(2, 4, 7, 7)),
    (
        "merged_linear",
        lambda m: m.MergedLinear(12, 18, r=2, lora_alpha=4, enable_lora=[True, False, True]),
        lambda: torch.randn(5, 12),
    ),
    (
        "merged_linear_fan_in_fan_out",
        lambda m: m.MergedLinear(12, 18, r=2, enable_lora=[False, True, True], fan_in_fan_out=True),
        lambda: torch.randn(5, 12),
    ),
]
IDS = [c[0] for c in CASES]


def _nonzero_lora(layer):
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_weights_same_outputs_train_and_eval(case):
    _, make, make_x = case
    torch.manual_seed(0)
    ref = _nonzero_lora(make(loralib))
    ours = make(lora)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in ref.state_dict().items()
    ]
    ours.load_state_dict(ref.state_dict())  # strict: the keys are identical
    x = make_x()
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    ours.eval()
    ref.eval()  # loralib merges here; lorafit does not, and its outputs still agree
    assert ref.merged and not ours.merged
    torch.testing.assert_close(ours(x), ref(x), **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_seed_same_initial_weights(case):
    _, make, _ = case
    torch.manual_seed(123)
    ref = make(loralib)
    torch.manual_seed(123)
    ours = make(lora)
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def _model(m):
    """A small model using every layer type loralib supports, from library ``m``."""
    model = nn.Module()
    model.emb = m.Embedding(20, 12, r=2)
    model.fc = m.Linear(12, 12, r=4, lora_alpha=8)
    model.fc0 = m.Linear(12, 12, r=0)
    model.qkv = m.MergedLinear(12, 36, r=2, enable_lora=[True, False, True])
    model.conv = m.Conv2d(3, 3, 3, r=2, padding=1)
    model.head = nn.Linear(12, 5)
    return model


def _forward(model, ids):
    h = model.fc0(model.fc(model.emb(ids)))  # (B, 4, 12)
    q, _, v = model.qkv(h).split(12, dim=-1)
    h = model.conv((q * v).view(-1, 3, 4, 4)).view_as(h)
    return model.head(h)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_lora_state_dict_keys_match_loralib(bias):
    ref_keys = set(loralib.lora_state_dict(_model(loralib), bias=bias))
    our_keys = set(lora.lora_state_dict(_model(lora), bias=bias))
    if bias == "lora_only":
        # On purpose: lorafit trains and saves the bias of a LoRA conv (loralib skips conv.bias in both).
        assert our_keys == ref_keys | {"conv.conv.bias"}
    else:
        assert our_keys == ref_keys


@pytest.mark.parametrize("bias", ["none", "all"])
def test_mark_only_lora_as_trainable_matches_loralib(bias):
    ref, ours = _model(loralib), _model(lora)
    loralib.mark_only_lora_as_trainable(ref, bias=bias)
    lora.mark_only_lora_as_trainable(ours, bias=bias)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in ref.named_parameters() if p.requires_grad
    }


def _train_lora(model, ids, mark):
    mark(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        _forward(model, ids).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("direction", ["loralib_to_lorafit", "lorafit_to_loralib"])
def test_checkpoints_cross_load(direction, tmp_path):
    src_lib, dst_lib = (loralib, lora) if direction == "loralib_to_lorafit" else (lora, loralib)
    ids = torch.randint(0, 20, (2, 4))
    torch.manual_seed(0)
    src = _model(src_lib)
    torch.save(src.state_dict(), tmp_path / "pretrained.pt")
    _train_lora(src, ids, src_lib.mark_only_lora_as_trainable)
    torch.save(src_lib.lora_state_dict(src), tmp_path / "lora.pt")
    torch.save(src.state_dict(), tmp_path / "full.pt")
    expected = _forward(src, ids)

    torch.manual_seed(1)
    dst = _model(dst_lib)
    result = dst.load_state_dict(torch.load(tmp_path / "pretrained.pt"), strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    result = dst.load_state_dict(torch.load(tmp_path / "lora.pt"), strict=False)
    assert not result.unexpected_keys
    torch.testing.assert_close(_forward(dst, ids), expected, **TOL)

    torch.manual_seed(2)
    dst_full = _model(dst_lib)
    dst_full.load_state_dict(torch.load(tmp_path / "full.pt"))  # strict
    torch.testing.assert_close(_forward(dst_full, ids), expected, **TOL)
    dst_full.eval()
    src.eval()
    torch.testing.assert_close(_forward(dst_full, ids), _forward(src, ids), **TOL)
