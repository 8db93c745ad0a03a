"""Tests of lorafit's LoRA layers on their own: identity at init, shapes, slices, dtypes, trainability.

Comparisons of a LoRA forward against a hand-written reference use atol=1e-6, rtol=1e-5 in fp32 (the
same products summed in a different order); identities that must hold exactly use torch.equal.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lorafit
from lorafit import lora

FP32_TOL = {"atol": 1e-6, "rtol": 1e-5}

# (id, constructor, input builder, base forward computed from the layer's own base weights)
LAYER_CASES = [
    (
        "linear",
        lambda: lora.Linear(10, 6, r=4, lora_alpha=8, lora_dropout=0.1),
        lambda: torch.randn(3, 5, 10),
        lambda m, x: F.linear(x, m.weight, m.bias),
    ),
    (
        "linear_fan_in_fan_out",
        lambda: lora.Linear(10, 6, r=4, fan_in_fan_out=True),
        lambda: torch.randn(4, 10),
        lambda m, x: F.linear(x, m.weight.T, m.bias),
    ),
    (
        "embedding",
        lambda: lora.Embedding(20, 6, r=4, lora_alpha=2, padding_idx=0),
        lambda: torch.randint(0, 20, (3, 7)),
        lambda m, x: F.embedding(x, m.weight, m.padding_idx),
    ),
    (
        "merged_linear",
        lambda: lora.MergedLinear(10, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]),
        lambda: torch.randn(4, 10),
        lambda m, x: F.linear(x, m.weight, m.bias),
    ),
    (
        "merged_linear_gqa",
        lambda: lora.MergedLinear(10, 14, r=2, enable_lora=[True, True, True], split_sizes=[8, 3, 3]),
        lambda: torch.randn(4, 10),
        lambda m, x: F.linear(x, m.weight, m.bias),
    ),
    (
        "conv1d",
        lambda: lora.Conv1d(4, 6, 3, r=2, lora_dropout=0.2, padding=1),
        lambda: torch.randn(2, 4, 9),
        lambda m, x: F.conv1d(x, m.conv.weight, m.conv.bias, padding=1),
    ),
    (
        "conv2d_tuple_kernel",
        lambda: lora.Conv2d(4, 6, (3, 2), r=2),
        lambda: torch.randn(2, 4, 7, 7),
        lambda m, x: F.conv2d(x, m.conv.weight, m.conv.bias),
    ),
    (
        "conv3d",
        lambda: lora.Conv3d(4, 6, 3, r=2, stride=2),
        lambda: torch.randn(2, 4, 6, 6, 6),
        lambda m, x: F.conv3d(x, m.conv.weight, m.conv.bias, stride=2),
    ),
]
IDS = [c[0] for c in LAYER_CASES]


@pytest.mark.parametrize("init", ["default", "gaussian"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=IDS)
def test_output_equals_base_at_init(case, init):
    _, make, make_x, base = case
    torch.manual_seed(0)
    layer = make()
    if init == "gaussian":
        layer.init_lora_weights = "gaussian"
        layer.reset_lora_parameters()
    x = make_x()
    for training in (True, False):
        layer.train(training)
        assert torch.equal(layer(x), base(layer, x))
    assert layer.delta_weight().abs().max() == 0


def test_r0_layers_are_plain():
    for layer in [
        lora.Linear(5, 3),
        lora.Embedding(9, 3),
        lora.MergedLinear(5, 6, r=4, enable_lora=[False, False]),
    ]:
        assert not any("lora_" in k for k in layer.state_dict())
        assert layer.delta_weight().abs().max() == 0
    conv = lora.Conv2d(2, 3, 3)
    assert sorted(conv.state_dict()) == ["conv.bias", "conv.weight"]
    x = torch.randn(2, 5)
    plain = lora.MergedLinear(5, 6, r=4, enable_lora=[False, False])
    assert torch.equal(plain(x), F.linear(x, plain.weight, plain.bias))
    assert plain.weight.requires_grad  # nothing to adapt, so nothing is frozen


def _randomize(layer):
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()


@pytest.mark.parametrize(
    ("cls", "kernel", "shape"),
    [
        (lora.Conv1d, 3, (2, 4, 11)),
        (lora.Conv1d, (5,), (2, 4, 11)),
        (lora.Conv2d, 3, (2, 4, 8, 8)),
        (lora.Conv2d, (3, 1), (2, 4, 8, 8)),
        (lora.Conv3d, 3, (2, 4, 5, 5, 5)),
        (lora.Conv3d, (1, 3, 2), (2, 4, 5, 5, 5)),
    ],
)
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_shapes_and_forward(cls, kernel, shape, groups):
    torch.manual_seed(0)
    r = 2
    layer = cls(4, 6, kernel, r=r, lora_alpha=3, groups=groups)
    ks = layer.conv.kernel_size
    assert layer.lora_A.shape == (r * ks[0], 4 * ks[0])
    assert layer.lora_B.shape == (6 // groups * math.prod(ks[1:]), r * ks[0])
    _randomize(layer)
    x = torch.randn(shape)
    delta = layer.delta_weight()
    assert delta.shape == layer.conv.weight.shape and delta.dtype == torch.float32
    ref = layer.conv._conv_forward(x, layer.conv.weight + delta, layer.conv.bias)
    out = layer(x)
    assert out.shape == layer.conv(x).shape
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_conv_dropout_is_applied():
    torch.manual_seed(0)
    layer = lora.Conv1d(4, 6, 3, r=2, lora_dropout=0.5, padding=1)
    _randomize(layer)
    x = torch.randn(2, 4, 9)
    conv, delta = layer.conv, layer.delta_weight()
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    ref = conv(x) + F.conv1d(dropped, delta, None, padding=1)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    without_dropout = conv._conv_forward(x, conv.weight + delta, conv.bias)
    assert not torch.allclose(out, without_dropout, atol=1e-3)
    layer.eval()  # dropout is identity in eval: one convolution with W + ΔW
    torch.testing.assert_close(layer(x), without_dropout, **FP32_TOL)


def test_merged_linear_unequal_slices_match_independent_linears():
    torch.manual_seed(0)
    d_in, sizes, r, alpha = 16, [8, 4, 4], 2, 4
    fused = lora.MergedLinear(
        d_in, sum(sizes), r=r, lora_alpha=alpha, enable_lora=[True, False, True], split_sizes=sizes
    )
    assert fused.lora_A.shape == (2 * r, d_in) and fused.lora_B.shape == (8 + 4, r)
    _randomize(fused)
    x = torch.randn(5, d_in)
    out = fused(x)
    base = F.linear(x, fused.weight, fused.bias)

    bounds = {"q": (0, 8, 0, 8, 0), "v": (12, 16, 8, 12, 1)}  # rows in W, rows in lora_B, index of A block
    for w0, w1, b0, b1, a in bounds.values():
        single = lora.Linear(d_in, w1 - w0, r=r, lora_alpha=alpha)
        single.load_state_dict(
            {
                "weight": fused.weight[w0:w1],
                "bias": fused.bias[w0:w1],
                "lora_A": fused.lora_A[a * r : (a + 1) * r],
                "lora_B": fused.lora_B[b0:b1],
            }
        )
        torch.testing.assert_close(out[:, w0:w1], single(x), **FP32_TOL)
    assert torch.equal(out[:, 8:12], base[:, 8:12])  # the disabled k slice is exactly the base

    delta = fused.delta_weight()
    assert torch.equal(delta[8:12], torch.zeros(4, d_in))
    torch.testing.assert_close(delta[0:8], fused.lora_B[0:8] @ fused.lora_A[0:2] * fused.scaling)


def test_merged_linear_bad_slices_raise():
    with pytest.raises(lora.LoraError, match="must divide out_features"):
        lora.MergedLinear(10, 10, r=2, enable_lora=[True, False, True])
    with pytest.raises(lora.LoraError, match="sum to out_features"):
        lora.MergedLinear(10, 10, r=2, enable_lora=[True, True], split_sizes=[4, 4])


def test_bad_options_raise():
    with pytest.raises(lora.LoraError, match="init_lora_weights"):
        lora.Linear(4, 4, r=2, init_lora_weights="pissa")
    with pytest.raises(lora.LoraError, match="r must be"):
        lora.Linear(4, 4, r=-1)
    with pytest.raises(lora.LoraError, match="bias must be"):
        lora.mark_only_lora_as_trainable(lora.Linear(4, 4, r=2), bias="some")


def test_scaling_rslora_and_gaussian_init():
    assert lora.Linear(8, 8, r=4, lora_alpha=8).scaling == 2.0
    assert lora.Linear(8, 8, r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
    torch.manual_seed(0)
    layer = lora.Linear(4096, 8, r=4, init_lora_weights="gaussian")
    assert torch.equal(layer.lora_B, torch.zeros(8, 4))
    assert abs(layer.lora_A.std().item() - 1 / 4) < 0.01
    emb = lora.Embedding(4096, 8, r=4, init_lora_weights="gaussian")
    assert torch.equal(emb.lora_B, torch.zeros(8, 4)) and abs(emb.lora_A.std().item() - 1 / 4) < 0.01


def _reference_fp32(layer, x):
    """The layer's output computed entirely in fp32 from its own tensors."""
    w, b = layer.weight.float(), None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), w + layer.delta_weight(), b)


def test_bf16_base_with_fp32_lora_without_autocast():
    torch.manual_seed(0)
    layer = lora.Linear(16, 8, r=4, lora_alpha=4, dtype=torch.bfloat16, lora_dtype=torch.float32)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    _randomize(layer)
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference_fp32(layer, x), atol=5e-2, rtol=2e-2)
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    assert layer.weight.grad is None

    emb = lora.Embedding(10, 8, r=2, dtype=torch.bfloat16, lora_dtype=torch.float32)
    _randomize(emb)
    assert emb(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16
    conv = lora.Conv2d(3, 4, 3, r=2, dtype=torch.bfloat16, lora_dtype=torch.float32)
    _randomize(conv)
    assert conv(torch.randn(1, 3, 5, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16
    fused = lora.MergedLinear(
        16, 12, r=2, enable_lora=[True, False, True], dtype=torch.bfloat16, lora_dtype=torch.float32
    )
    assert fused(x).dtype == torch.bfloat16


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16(base_dtype):
    torch.manual_seed(0)
    layer = lora.Linear(16, 8, r=4, dtype=base_dtype, lora_dtype=torch.float32)
    _randomize(layer)
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference_fp32(layer, x), atol=1e-1, rtol=3e-2)


def _small_model():
    model = nn.Module()
    model.emb = lora.Embedding(11, 8, r=2)
    model.fc = lora.Linear(8, 8, r=2)
    model.fc0 = lora.Linear(8, 8)  # r=0: a plain layer
    model.conv = lora.Conv1d(8, 8, 3, r=2, padding=1)
    model.plain = nn.Linear(8, 3)
    return model


def _small_forward(model, ids):
    h = model.fc0(model.fc(model.emb(ids)))
    h = model.conv(h.transpose(1, 2)).transpose(1, 2)
    return model.plain(h)


TRAINABLE = {
    "none": {"emb.lora_A", "emb.lora_B", "fc.lora_A", "fc.lora_B", "conv.lora_A", "conv.lora_B"},
    "all": {"fc.bias", "fc0.bias", "conv.conv.bias", "plain.bias"},
    "lora_only": {"fc.bias", "conv.conv.bias"},
}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable(bias):
    torch.manual_seed(0)
    model = _small_model()
    for p in model.parameters():  # lorafit sets LoRA params trainable even after an earlier freeze
        p.requires_grad = False
    lora.mark_only_lora_as_trainable(model, bias=bias)
    expected = TRAINABLE["none"] | (TRAINABLE[bias] if bias != "none" else set())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    _small_forward(model, torch.randint(0, 11, (2, 5))).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected
    # what trains is what gets saved
    assert set(lora.lora_state_dict(model, bias=bias)) == expected


def _big_model():
    class BigModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = lora.Linear(12, 16, r=16)
            self.fc2 = lora.Linear(16, 4, r=16)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    return BigModel()


def _public_modules():
    return [lora, lorafit]  # `import lorafit as lora` and `from lorafit import lora` both work


# The one library name lorafit's top level does not re-export: lorafit.merge_adapter is the pipeline's
# deprecated alias of lorafit.fuse (it writes files); lorafit.lora.merge_adapter merges in memory (PEFT).
SHADOWED = {"merge_adapter"}


def test_top_level_reexport():
    assert all(getattr(lorafit, name) is getattr(lora, name) for name in set(lora.__all__) - SHADOWED)
    assert (
        lorafit.merge_adapter is not lora.merge_adapter and lorafit.merge_adapter.__module__ == "lorafit.api"
    )


@pytest.mark.parametrize("api", _public_modules(), ids=lambda m: m.__name__)
def test_readme_snippet_runs(api, tmp_path):
    lora_ = api  # the snippet's `lora`
    torch.manual_seed(0)
    layer = lora_.Linear(12, 16, r=16)
    assert layer.lora_A.shape == (16, 12)
    model = _big_model()
    torch.save(model.state_dict(), tmp_path / "ckpt_pretrained.pt")
    lora_.mark_only_lora_as_trainable(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 12)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    torch.save(lora_.lora_state_dict(model), tmp_path / "ckpt_lora.pt")

    torch.manual_seed(1)
    fresh = _big_model()
    fresh.load_state_dict(torch.load(tmp_path / "ckpt_pretrained.pt"), strict=False)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt_lora.pt"), strict=False)
    assert torch.equal(fresh(x), model(x))
    assert not torch.equal(model.fc1.lora_B, torch.zeros_like(model.fc1.lora_B))  # training did happen
