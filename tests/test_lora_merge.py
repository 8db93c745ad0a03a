"""Explicit, exact merging: merged outputs equal unmerged ones, unmerge restores the original weight bit
for bit, mode changes never merge, and a merged model saves and loads its original base weights.
`merge_and_unload` leaves plain modules with the merged outputs; the deprecated `lora.merge`/`lora.unmerge`
still work and warn.

Tolerance for merged vs unmerged outputs in fp32: atol=1e-5, rtol=1e-5 (W + ΔW is rounded once to fp32,
so the merged product differs from the two-path sum by float rounding only).
"""

import copy

import pytest
import torch
import torch.nn as nn

from lorafit import lora

TOL = {"atol": 1e-5, "rtol": 1e-5}

LAYERS = {
    "linear": (lambda **kw: lora.Linear(12, 7, r=4, lora_alpha=8, **kw), lambda: torch.randn(5, 12)),
    "linear_fan_in_fan_out": (
        lambda **kw: lora.Linear(12, 7, r=4, fan_in_fan_out=True, **kw),
        lambda: torch.randn(5, 12),
    ),
    "embedding": (lambda **kw: lora.Embedding(30, 6, r=4, **kw), lambda: torch.randint(0, 30, (3, 5))),
    "merged_linear": (
        lambda **kw: lora.MergedLinear(
            12, 20, r=2, enable_lora=[True, False, True], split_sizes=[12, 4, 4], **kw
        ),
        lambda: torch.randn(5, 12),
    ),
    "conv1d": (lambda **kw: lora.Conv1d(4, 6, 3, r=2, padding=1, **kw), lambda: torch.randn(2, 4, 9)),
    "conv2d": (lambda **kw: lora.Conv2d(4, 6, 3, r=2, padding=1, **kw), lambda: torch.randn(2, 4, 7, 7)),
    "conv3d": (lambda **kw: lora.Conv3d(4, 6, (3, 1, 2), r=2, **kw), lambda: torch.randn(2, 4, 5, 5, 5)),
}


def _make(name, **kw):
    torch.manual_seed(0)
    make, make_x = LAYERS[name]
    layer = make(**kw)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    return layer, make_x()


def _weight(layer):
    return layer.conv.weight if isinstance(layer, lora.ConvLoRA) else layer.weight


def _weight_key(layer):
    return "conv.weight" if isinstance(layer, lora.ConvLoRA) else "weight"


@pytest.mark.parametrize("name", LAYERS)
def test_merged_output_equals_unmerged(name):
    layer, x = _make(name)
    layer.eval()
    unmerged = layer(x)
    original = _weight(layer).detach().clone()
    layer.merge()
    assert layer.merged
    expected_weight = original + layer.delta_weight()  # fp32: one rounding of W + ΔW
    assert torch.equal(_weight(layer), expected_weight)
    torch.testing.assert_close(layer(x), unmerged, **TOL)
    layer.unmerge()
    assert torch.equal(layer(x), unmerged)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", LAYERS)
def test_100_merge_unmerge_cycles_restore_weights_bit_exactly(name, dtype):
    layer, _ = _make(name, dtype=dtype)
    w = _weight(layer)
    original = w.detach().clone()
    merged_once = (original.float() + layer.delta_weight()).to(dtype)  # ΔW in fp32, rounded once
    assert not torch.equal(merged_once, original)
    for _ in range(100):
        layer.merge()
        assert torch.equal(w, merged_once)
        layer.unmerge()
        assert torch.equal(w, original)
    assert layer._unmerged_weight is None  # the kept copy is released on unmerge


@pytest.mark.parametrize("name", LAYERS)
def test_mode_changes_never_touch_weights(name):
    layer, x = _make(name)
    original = _weight(layer).detach().clone()
    train_out = layer(x)
    layer.eval()
    assert not layer.merged and torch.equal(_weight(layer), original)
    torch.testing.assert_close(layer(x), train_out, **TOL)  # no dropout here, so eval == train
    layer.train()
    assert torch.equal(_weight(layer), original)
    layer.merge()
    layer.train()  # loralib would unmerge here; lorafit leaves the layer merged
    assert layer.merged


@pytest.mark.parametrize("name", LAYERS)
def test_state_dict_of_merged_layer_holds_original_weight(name):
    layer, x = _make(name)
    expected = layer(x)
    original = _weight(layer).detach().clone()
    clean_sd = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.merge()
    sd = layer.state_dict()
    assert torch.equal(sd[_weight_key(layer)], original)
    assert not torch.equal(_weight(layer), original)  # the live weight is merged
    assert sd.keys() == clean_sd.keys()  # the kept copy is not saved

    fresh, _ = _make(name)
    with torch.no_grad():
        _weight(fresh).zero_()
    fresh.load_state_dict(sd)
    assert torch.equal(_weight(fresh), original)
    torch.testing.assert_close(fresh(x), expected, **TOL)


@pytest.mark.parametrize("name", LAYERS)
def test_loading_into_merged_layer_unmerges_loads_and_remerges(name):
    layer, x = _make(name)
    other, _ = _make(name)
    with torch.no_grad():
        other.lora_B.mul_(-2)
        _weight(other).add_(1)
    layer.merge()
    layer.load_state_dict(other.state_dict())
    assert layer.merged
    assert torch.equal(_weight(layer), _weight(other) + other.delta_weight())
    layer.unmerge()
    assert torch.equal(_weight(layer), _weight(other))
    assert torch.equal(layer(x), other(x))

    layer.merge()  # a partial (LoRA-only) load into a merged layer also re-merges with the new factors
    before = layer.state_dict()[_weight_key(layer)].clone()
    layer.load_state_dict(lora.lora_state_dict(_make(name)[0]), strict=False)
    assert layer.merged and torch.equal(layer.state_dict()[_weight_key(layer)], before)
    assert torch.equal(_weight(layer), before + layer.delta_weight())


def test_model_level_merge_unmerge_dtype_change_and_deepcopy():
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(8, 8, r=2), nn.ReLU(), lora.Linear(8, 8), lora.Linear(8, 4, r=2))
    for m in (model[0], model[3]):
        nn.init.normal_(m.lora_B)
    x = torch.randn(3, 8)
    expected = model(x)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    assert lora.merge_adapter(model) == ["0", "3"]  # the r=0 layer has nothing to merge
    assert lora.merge_adapter(model) == []
    torch.testing.assert_close(model(x), expected, **TOL)

    clone = copy.deepcopy(model)
    assert lora.unmerge_adapter(clone) == ["0", "3"]
    assert all(torch.equal(p, originals[n]) for n, p in clone.named_parameters() if n.endswith("weight"))

    model.to(torch.bfloat16)  # the kept original follows dtype changes along with the weight
    lora.unmerge_adapter(model)
    for n, p in model.named_parameters():
        if n.endswith("weight"):
            assert torch.equal(p, originals[n].to(torch.bfloat16))


def test_deprecated_merge_and_unmerge_warn_naming_the_new_names_and_still_work():
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(8, 8, r=2), nn.ReLU(), lora.Linear(8, 4, r=2))
    for m in (model[0], model[2]):
        nn.init.normal_(m.lora_B)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    with pytest.warns(DeprecationWarning, match="use lora.merge_adapter"):
        assert lora.merge(model) == ["0", "2"]
    assert all(m.merged for m in lora.lora_modules(model).values())
    with pytest.warns(DeprecationWarning, match="use lora.unmerge_adapter"):
        assert lora.unmerge(model) == ["0", "2"]
    assert all(torch.equal(p, originals[n]) for n, p in model.named_parameters() if n.endswith("weight"))
    import lorafit

    assert (
        lorafit.merge is lora.merge and lorafit.unmerge_adapter is lora.unmerge_adapter
    )  # loralib-style names
    assert lorafit.merge_adapter is not lora.merge_adapter  # the pipeline's deprecated alias of lorafit.fuse
    with pytest.raises(TypeError, match=r"lorafit.lora.merge_adapter\(model\)"):
        lorafit.merge_adapter(model, "adapter", "out")  # meant the in-memory merge: says where it is


class _Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("name", LAYERS)
def test_merge_and_unload_leaves_plain_modules_with_the_merged_output(name):
    layer, x = _make(name)
    model = _Holder(layer)
    expected = model(x)
    assert lora.merge_and_unload(model) == ["layer"]
    plain = model.layer
    assert not isinstance(plain, lora.LoRALayer)
    assert type(plain) in (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    assert not [k for k in model.state_dict() if "lora_" in k]
    torch.testing.assert_close(model(x), expected, **TOL)


def test_merge_and_unload_takes_a_wrapped_layers_float_base():
    torch.manual_seed(0)
    wrapped = lora.WrappedLinear(nn.Linear(12, 7), r=4, lora_alpha=8)
    nn.init.normal_(wrapped.lora_B)
    model, x = _Holder(wrapped), torch.randn(5, 12)
    expected = model(x)
    lora.merge_and_unload(model)
    assert type(model.layer) is nn.Linear
    torch.testing.assert_close(model(x), expected, **TOL)


def test_merged_layer_gives_lora_no_gradient():
    layer, x = _make("linear")
    layer.merge()
    layer(x).sum().backward()
    assert layer.lora_A.grad is None and layer.lora_B.grad is None
