"""PEFT interop on the tiny Phi-3 (fp32): adapters lorafit saves load in PEFT 0.21 with the same logits,
whole-module and slice adapters alike; adapters PEFT trains load into lorafit with PEFT's logits and
train further; lorafit reads its own slice adapters back as MergedLinear slices.

Measured max |logit difference| on the demo model: 0.0 in every fp32 comparison here (the same
float operations run in the same order); the asserted tolerance is 1e-5 (rsLoRA's alpha*sqrt(k)
rescaling of a slice adapter is not bit-exact in general).
"""

import copy
import json
import warnings

import pytest
import torch
from conftest import SLICE_TARGETS, logits, lorafit_model

from lorafit import lora
from lorafit.tiny import build_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def base(tok):
    model = build_model(tok, "demo").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def max_diff(a, b):
    return (a - b).abs().max().item()


def peft_load(base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. "rank_pattern keys did not match any module"
        return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("targets", ["all-linear", SLICE_TARGETS], ids=["whole", "slices"])
def test_peft_reads_lorafit_adapters_with_the_same_logits(base, ids, tmp_path, targets, use_rslora):
    model = lorafit_model(base, targets, use_rslora=use_rslora)
    lora.save_adapter(model, tmp_path, base_model_name_or_path="tiny-phi3")
    ours, theirs = logits(model, ids), logits(peft_load(base, tmp_path), ids)
    assert max_diff(ours, logits(base, ids)) > 0.1  # the adapter does something
    assert max_diff(ours, theirs) <= TOL
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    if (
        targets == SLICE_TARGETS
    ):  # q+v of qkv_proj: rank 2r, scale kept by alpha*2 (alpha*sqrt(2) with rsLoRA)
        name = "model.layers.0.self_attn.qkv_proj"
        assert cfg["rank_pattern"][name] == 8 and cfg["r"] == 4
        assert cfg["alpha_pattern"][name] == pytest.approx(8 * (2**0.5 if use_rslora else 2))
    else:
        assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}


def test_peft_pattern_keys_pick_out_exactly_one_module():
    """PEFT 0.21 matches rank_pattern keys with re.match(rf"(.*\\.)?({key})$", name): full module names
    must not leak onto other layers (layers.1 vs layers.11) or other modules."""
    names = [f"model.layers.{i}.{m}" for i in range(12) for m in ("self_attn.qkv_proj", "self_attn.o_proj")]
    pattern = {"model.layers.1.self_attn.qkv_proj": 8, "model.layers.11.self_attn.qkv_proj": 16}
    got = {n: pattern.get(get_pattern_key(pattern.keys(), n), 4) for n in names}
    assert got == {n: pattern.get(n, 4) for n in names}


def test_lorafit_reads_its_slice_adapters_back_as_slices(base, ids, tmp_path):
    model = lorafit_model(base, SLICE_TARGETS)
    lora.save_adapter(model, tmp_path)
    again = copy.deepcopy(base)
    names = lora.load_adapter(again, tmp_path)
    mine, theirs = lora.lora_modules(model), lora.lora_modules(again)
    assert names == sorted(mine)
    qkv = theirs["model.layers.0.self_attn.qkv_proj"]
    assert isinstance(qkv, lora.MergedLinear) and qkv.enable_lora == [True, False, True]
    assert theirs["model.layers.0.mlp.gate_up_proj"].enable_lora == [True, False]
    assert type(theirs["model.layers.0.self_attn.o_proj"]) is lora.Linear
    for n, layer in mine.items():
        assert type(theirs[n]) is type(layer)
        assert torch.equal(theirs[n].lora_A, layer.lora_A) and torch.equal(theirs[n].lora_B, layer.lora_B)
    assert torch.equal(logits(again, ids), logits(model, ids))
    # onto a model that already has the same LoRA layers (resuming training): the factors are replaced
    resumed = lorafit_model(base, SLICE_TARGETS, seed=7)
    assert lora.load_adapter(resumed, tmp_path, trainable=True) == names
    assert all(
        torch.equal(layer.delta_weight(), mine[n].delta_weight())
        for n, layer in lora.lora_modules(resumed).items()
    )
    assert all(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)


PEFT_CONFIGS = {
    "all-linear": dict(target_modules="all-linear"),
    "patterns+embedding+lm_head": dict(
        target_modules=["qkv_proj", "o_proj", "embed_tokens"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"layers.1.self_attn.o_proj": 3},  # a regex-style key, PEFT's first-match rule
        modules_to_save=["lm_head"],
    ),
}


def peft_trained(base, ids, folder, **config):
    """A PEFT adapter: random factors, two Adam steps on the LM loss, save_pretrained."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, **config))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(folder))
    return model.eval()


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_lorafit_reads_peft_trained_adapters_and_trains_them_further(base, ids, tmp_path, name):
    theirs = peft_trained(base, ids, tmp_path, **PEFT_CONFIGS[name])
    model = copy.deepcopy(base)
    names = lora.load_adapter(model, tmp_path, trainable=True)
    expected = {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")
    }
    assert set(names) == expected
    assert max_diff(logits(model, ids), logits(theirs, ids)) <= TOL
    if name != "all-linear":  # the regex alpha_pattern key hit layer 1's o_proj only
        o_proj = lora.lora_modules(model)
        assert o_proj["model.layers.1.self_attn.o_proj"].scaling == 3 / 2
        assert o_proj["model.layers.0.self_attn.o_proj"].scaling == 8 / 2
        assert torch.equal(
            model.lm_head.weight, theirs.base_model.model.lm_head.modules_to_save.default.weight
        )

    # ... and it trains on: every LoRA factor gets a gradient, a few SGD steps lower the loss.
    lora.mark_only_lora_as_trainable(model)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params, lr=0.05)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
