"""QLoRA (model.quantization): LoRA on a base whose linear layers are quantized by bitsandbytes, on CPU.

The library part (lora.WrappedLinear around a linear-like layer) needs only torch. The rest is skipped
without bitsandbytes (`pip install 'lorafit[qlora]'`). One nf4 training run of the demo-size tiny
Phi-3 (bf16 base weights, fused-slice targets, gradient checkpointing) is shared by several tests.

Measured here (bitsandbytes 0.50.2, CPU backend): nf4 weight error ||W_q - W|| / ||W|| ~0.09 on
qkv_proj, and the layer output error on random inputs is the same (~0.09); int8 ~0.004.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from bench.qlora import bnb_missing, weight_bytes
from lorafit import lora, quant
from lorafit.config import ModelConfig, PeftConfig
from lorafit.errors import ConfigError
from lorafit.precision import bnb_compute_dtype, dtype_name

needs_bnb = pytest.mark.skipif(bnb_missing() is not None, reason=str(bnb_missing()))

SLICES = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


# ----------------------------------------------------------------------------- library (torch only)


class OwnForwardLinear(nn.Linear):
    """Stands for a quantized layer: an nn.Linear subclass with its own forward."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def _model(cls):
    torch.manual_seed(0)
    m = nn.Module()
    m.qkv = cls(16, 24)  # slices 8 + 8 + 8
    m.out = cls(24, 16)
    return m


def test_wrapped_linear_equals_linear_and_merged_linear():
    ref, wrapped = _model(nn.Linear), _model(OwnForwardLinear)
    kw = dict(
        r=4, lora_alpha=8, slices={"qkv": ([8, 8, 8], [True, False, True])}, init_lora_weights="gaussian"
    )
    assert lora.inject(ref, ["out"], **kw) == ["out", "qkv"]
    assert lora.inject(wrapped, ["out"], wrap=(OwnForwardLinear,), **kw) == ["out", "qkv"]
    assert isinstance(wrapped.qkv, lora.WrappedLinear) and wrapped.qkv.enable_lora == [True, False, True]
    assert isinstance(ref.qkv, lora.MergedLinear)
    with torch.no_grad():
        for a, b in ((ref.qkv, wrapped.qkv), (ref.out, wrapped.out)):
            b.lora_A.copy_(a.lora_A)
            b.lora_B.copy_(torch.randn_like(a.lora_B))
            a.lora_B.copy_(b.lora_B)
    x = torch.randn(3, 16)
    y = ref.out(ref.qkv(x))
    assert torch.allclose(wrapped.out(wrapped.qkv(x)), y, atol=1e-6)
    for a, b in ((ref.qkv, wrapped.qkv), (ref.out, wrapped.out)):
        assert torch.allclose(a.delta_weight(), b.delta_weight())
    # a float base merges exactly like any LoRA layer; a quantized one refuses
    lora.merge_adapter(wrapped)
    assert torch.allclose(wrapped.out(wrapped.qkv(x)), y, atol=1e-5)
    lora.unmerge_adapter(wrapped)
    fake = lora.WrappedLinear(OwnForwardLinear(16, 8), r=2)
    fake.base_layer.weight = nn.Parameter(torch.zeros(64, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(lora.LoraError, match="dequantize the base layer first"):
        fake.merge()


def test_without_wrap_quantized_layers_are_left_alone():
    m = _model(OwnForwardLinear)
    with pytest.raises(lora.LoraError, match="quantized linear layers need wrap="):
        lora.inject(m, "all-linear")
    assert lora.inject(m, "all-linear", wrap=(OwnForwardLinear,)) == ["out", "qkv"]


def test_config_quantization():
    assert ModelConfig(quantization="NF4").quantization == "nf4"
    assert ModelConfig().quantization == "none" and ModelConfig().bnb_4bit_use_double_quant is True
    assert ModelConfig(bnb_4bit_compute_dtype="bfloat16").bnb_4bit_compute_dtype == "bf16"
    with pytest.raises(ConfigError, match="model.quantization: expected one of 'none', 'nf4', 'fp4', 'int8'"):
        ModelConfig(quantization="int4")


# ----------------------------------------------------------------------------- bitsandbytes on CPU


def _load(tiny_model, method="nf4", training=True, **kw):
    from lorafit.model import load_model

    cfg = ModelConfig(name_or_path=str(tiny_model), quantization=method, device="cpu", **kw)
    return load_model(cfg, training=training)


@needs_bnb
@pytest.mark.parametrize("method, bound", [("nf4", 0.12), ("fp4", 0.15), ("int8", 0.01)])
def test_quantized_layer_output_within_its_weight_error(tiny_model, method, bound):
    from safetensors.torch import load_file

    name = "model.layers.0.self_attn.qkv_proj"
    w = load_file(str(tiny_model / "model.safetensors"))[f"{name}.weight"]
    layer = _load(tiny_model, method, training=False).get_submodule(name)
    weight_err = float((quant.dequantize_weight(layer) - w).norm() / w.norm())
    assert 0 < weight_err < bound
    x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = x @ w.T, layer(x).float()
    out_err = float((got - ref).norm() / ref.norm())
    # random inputs see the weight's relative error (+ bf16 compute rounding, ~0.4%, for 4-bit)
    assert out_err == pytest.approx(weight_err, rel=0.2, abs=0.006)


@needs_bnb
@pytest.mark.parametrize("method", ["fp4", "int8"])
def test_lora_gets_gradients_on_fp4_and_int8(tiny_model, method):
    from lorafit.model import apply_lora

    model = _load(tiny_model, method)
    apply_lora(model, PeftConfig(r=4, target_modules=SLICES, init_lora_weights="gaussian"))
    ids = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    grads = {n: p.grad for n, p in model.named_parameters() if n in trainable}
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B = 0 at start: A's grad is 0


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-checkpoint", "fp32-checkpoint"])
@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_4bit_layers_dequantized_into_buffers_compute_bitsandbytes_numbers(tiny_model, method, dtype):
    """lorafit's 4-bit forward (the weight dequantized into a reused buffer, quant.DequantBuffers) gives
    bitsandbytes' own outputs and gradients bit for bit, under autocast and without, in training and
    eval; one buffer per weight shape serves every layer."""
    from lorafit.model import apply_lora

    def run(buffered: bool, autocast: bool, grad: bool):
        model = _load(tiny_model, method, dtype=dtype_name(dtype))
        torch.manual_seed(0)
        apply_lora(model, PeftConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(
                        0, 0.1, generator=torch.Generator().manual_seed(len(n))
                    )  # LoRA in the logits too
        wrapped = [m for m in model.modules() if isinstance(m, lora.WrappedLinear)]
        if buffered:
            assert isinstance(quant.dequantize_into_buffers(model), quant.DequantBuffers)
        assert wrapped and all((m.base_forward is not None) == buffered for m in wrapped)
        ids = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(grad):
            out = model(input_ids=ids, labels=ids)
        if not grad:
            return out.logits, {}
        out.loss.backward()
        return out.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    for autocast, grad in [(True, True), (False, True), (True, False)]:
        (l0, g0), (l1, g1) = run(False, autocast, grad), run(True, autocast, grad)
        assert torch.equal(l0, l1), (autocast, grad)
        assert g0.keys() == g1.keys() and (g0 or not grad)
        for n in g0:
            assert torch.equal(g0[n], g1[n]), n


@needs_bnb
def test_dequant_buffers_hold_one_weight_per_shape(tiny_model):
    from lorafit.model import apply_lora

    model = _load(tiny_model, "nf4")
    apply_lora(model, PeftConfig(r=4, target_modules="all-linear"))
    wrapped = [m for m in model.modules() if isinstance(m, lora.WrappedLinear)]
    buffers = quant.dequantize_into_buffers(model)
    assert buffers.nbytes == 0
    ids = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    shapes = {(m.out_features, m.in_features) for m in wrapped}
    assert len(wrapped) > len(shapes)  # several layers share a buffer
    # per shape, a buffer in the compute dtype (bf16: forward) and one in the quantized weights' dtype
    # (backward; the same buffer when that is bf16 too)
    state = wrapped[0].base_layer.weight.quant_state
    per_weight = 2 + (0 if state.dtype == torch.bfloat16 else state.dtype.itemsize)
    assert buffers.nbytes == sum(per_weight * o * i for o, i in shapes)


def _parity_data(path):
    rows = [
        {"messages": [{"role": "user", "content": f"{n}: even or odd?"},
                      {"role": "assistant", "content": "odd" if n % 2 else "even"}]}
        for n in range(100, 164)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A short nf4 run: bf16 base weights, q/v slices of qkv_proj, gate slice, gradient checkpointing."""
    from lorafit.api import build_config
    from lorafit.data import load_conversations
    from lorafit.job import prepare
    from lorafit.train import run

    data = _parity_data(tmp_path_factory.mktemp("qdata") / "train.jsonl")
    assert len(load_conversations(data)) == 64
    out = tmp_path_factory.mktemp("qrun") / "out"
    cfg = build_config(
        model=str(tiny_model), train_data=data, eval_data=data, output_dir=out,
        training_config={"max_steps": 8, "learning_rate": 5e-3, "per_device_train_batch_size": 8,
                         "max_seq_length": 64, "logging_steps": 4, "eval_strategy": "no", "save_strategy": "no",
                         "gradient_checkpointing": True},
        peft_config={"r": 8, "lora_alpha": 16, "target_modules": SLICES},
        overrides=["model.quantization=nf4", "model.dtype=bf16", "model.device=cpu"],
    )  # fmt: skip
    job = prepare(cfg)
    before = {k: v.detach().clone() for k, v in job.model.state_dict().items()}
    res = run(job, progress=False)
    return job, before, res, out


@needs_bnb
def test_training_on_a_4bit_base_dequantizes_into_buffers_with_checkpointing_on_by_default(
    trained, tiny_model, tmp_path
):
    import lorafit

    job = trained[0]
    wrapped = [m for m in job.model.modules() if isinstance(m, lora.WrappedLinear)]
    assert wrapped and all(m.base_forward is not None for m in wrapped)
    plan = lorafit.estimate(
        model=str(tiny_model), train_data=_parity_data(tmp_path / "train.jsonl"),
        training_config={"max_seq_length": 64}, overrides=["model.quantization=nf4", "model.device=cpu"],
    ).to_dict()  # fmt: skip
    assert plan["gradient_checkpointing"] is True  # auto, the default: on for a quantized base
    assert plan["checkpointing_reason"].startswith("on (auto: a quantized base")


@needs_bnb
def test_nf4_training_lowers_loss_and_changes_only_lora(trained):
    job, before, res, _ = trained
    model = job.model
    assert res["eval_loss"] < res["eval_loss_before"] - 0.5
    qkv = model.get_submodule("model.layers.0.self_attn.qkv_proj")
    assert isinstance(qkv, lora.WrappedLinear) and qkv.enable_lora == [True, False, True]
    assert type(qkv.base_layer).__name__ == "Linear4bit"
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if "lora_B" in k or "lora_A" in k}
    # nothing up-cast: non-quantized base weights stay bf16, LoRA weights are fp32
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert dtypes["model.embed_tokens.weight"] == dtypes["lm_head.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.input_layernorm.weight"] == torch.bfloat16
    assert weight_bytes(model)["quantized"] < 0.3 * 2 * sum(  # bf16 would be 2 bytes per weight
        m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "Linear4bit"
    )


@needs_bnb
def test_adapter_reloads_and_merged_export_loads_in_transformers(trained, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorafit.export import ERROR_REPORT, fuse
    from lorafit.generation import load

    job, _, _, out = trained
    meta = lora.read_adapter(out).meta
    compute = dtype_name(bnb_compute_dtype("auto", torch.device("cpu")))
    assert meta["quantization"] == {
        "method": "nf4", "double_quant": True, "dtype": "bf16", "compute_dtype": compute, "blocksize": 64
    }  # fmt: skip
    ids = torch.randint(3, 90, (2, 20), generator=torch.Generator().manual_seed(1))
    job.model.eval()
    with torch.no_grad():
        want = job.model(input_ids=ids).logits.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error", quant.QuantizationWarning)  # loaded as trained: no warning
        reloaded, _ = load(str(tiny_model), out, dtype="bf16", device="cpu", quantization="nf4")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits.float(), want)
    # loading into existing wrapped layers (what --resume does) checks their slices and shapes
    assert lora.load_adapter(reloaded, out, trainable=True) == sorted(lora.lora_modules(reloaded))

    merged_dir = fuse(None, out, tmp_path / "merged")  # the adapter records base and quantization
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.bfloat16 and "quantization_config" not in merged.config.to_dict()
    assert not any("lora_" in k or "absmax" in k for k in merged.state_dict())
    with torch.no_grad():
        got = merged(input_ids=ids).logits.float()
    # the merged model is the trained one (4-bit base + adapter) up to bf16 rounding (~2% of the logits
    # here, weights and activations in bf16); the original base + adapter is further off (its weights
    # differ by the quantization error, ~6%)
    with pytest.warns(quant.QuantizationWarning, match="the base is loaded unquantized"):
        unquantized, _ = load(str(tiny_model), out, dtype="bf16", device="cpu")
    with torch.no_grad():
        far = unquantized(input_ids=ids).logits.float()
    near_err, far_err = float((got - want).norm() / want.norm()), float((far - want).norm() / want.norm())
    assert near_err < 0.04 and far_err > 2 * near_err, (near_err, far_err)
    report = json.loads((merged_dir / ERROR_REPORT).read_text())
    assert report["method"] == "nf4" and report["base_weights"] == "dequantized"
    assert report["summary"]["layers"] == 4 * 4  # qkv, o, gate_up, down in each of 4 layers
    assert 0.05 < report["summary"]["relative_error_overall"] < 0.3

    # --base-weights original: merged into the unquantized checkpoint, the error report computed by
    # quantizing each weight again (the same numbers as measured on the loaded 4-bit layers)
    original_dir = fuse(None, out, tmp_path / "original", base_weights="original")
    original = AutoModelForCausalLM.from_pretrained(original_dir)
    with torch.no_grad():
        # both are ~2% errors of the tiny random model (bf16 rounding of `far` vs the 4-bit codes); with SDPA's
        # fused CPU kernel (lorafit.attention) the trained adapter gave 0.0211 against near_err 0.0205: 10% slack
        assert float((original(input_ids=ids).logits.float() - far).norm() / far.norm()) < 1.1 * near_err
    again = json.loads((original_dir / ERROR_REPORT).read_text())
    assert again["base_weights"] == "original" and again["layers"].keys() == report["layers"].keys()
    for name, layer in report["layers"].items():
        assert again["layers"][name]["relative_error"] == pytest.approx(layer["relative_error"], rel=0.01)


@needs_bnb
def test_merge_of_an_fp32_checkpoint_is_the_trained_model(tiny_model, tmp_path):
    """The tiny checkpoint is fp32 and model.dtype is auto: training quantizes the fp32 weights, and so must
    merge (quantizing their bf16 rounding instead gives other 4-bit codes: 2% off, measured)."""
    from transformers import AutoModelForCausalLM

    from lorafit.api import build_config
    from lorafit.export import fuse
    from lorafit.job import prepare
    from lorafit.precision import autocast
    from lorafit.train import run

    out = tmp_path / "out"
    cfg = build_config(
        model=str(tiny_model), train_data=_parity_data(tmp_path / "train.jsonl"), output_dir=out,
        training_config={"max_steps": 4, "learning_rate": 5e-3, "per_device_train_batch_size": 8,
                         "max_seq_length": 64, "eval_strategy": "no", "save_strategy": "no"},
        peft_config={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        overrides=["model.quantization=nf4", "model.device=cpu"],
    )  # fmt: skip
    job = prepare(cfg)
    run(job, progress=False)
    recorded = lora.read_adapter(out).meta["quantization"]
    assert recorded["dtype"] == "fp32" and recorded["blocksize"] == 64 and recorded["double_quant"] is True
    assert recorded["compute_dtype"] == dtype_name(bnb_compute_dtype("auto", torch.device("cpu")))

    merged_dir = fuse(None, out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.bfloat16
    wrapped = {n: m for n, m in job.model.named_modules() if isinstance(m, lora.WrappedLinear)}
    assert len(wrapped) == 4 * 4
    for name, layer in wrapped.items():
        with torch.no_grad():
            want = quant.dequantize_weight(layer.base_layer) + layer.delta_weight().float()
        # the trained 4-bit weights + delta, rounded once to bf16 (the output dtype) and nothing else
        assert torch.equal(merged.get_submodule(name).weight, want.to(torch.bfloat16)), name

    # logits: the trained model (4-bit base + adapter, computed as training's eval computes it) and the
    # merged bf16 model agree within 4% relative (measured 2.1%: bf16 weights and activations throughout
    # the merged model; merging from the bf16-rounded checkpoint instead gave 10.7%)
    ids = torch.randint(3, 90, (2, 20), generator=torch.Generator().manual_seed(1))
    job.model.eval()
    with torch.no_grad(), autocast(job.device, job.precision):
        want = job.model(input_ids=ids).logits.float()
    with torch.no_grad():
        got = merged(input_ids=ids).logits.float()
    err = float((got - want).norm() / want.norm())
    assert err < 0.04, err


@needs_bnb
def test_a_qlora_adapter_run_on_another_base_warns_once(trained, tiny_model, recwarn):
    """eval/generate/chat and lorafit.load read the adapter's quantization: without --quantization, or with
    another one, one warning says that results differ from training and how to match it."""
    from lorafit.cli import main

    _, _, _, out = trained
    data = _parity_data(out.parent / "eval.jsonl")
    common = ["--model", str(tiny_model), "--adapter", str(out), "--device", "cpu"]
    runs = {
        "unquantized": ["generate", *common, "--prompt", "7: even or odd?", "--max-new-tokens", "2"],
        "quantized with fp4": ["eval", *common, "--data", str(data), "--quantization", "fp4"],
    }
    for loaded, argv in runs.items():
        recwarn.clear()
        assert main(argv) == 0
        said = [str(w.message) for w in recwarn.list if issubclass(w.category, quant.QuantizationWarning)]
        assert len(said) == 1, said
        assert f"trained on a base quantized with nf4 (QLoRA), and the base is loaded {loaded}" in said[0]
        assert "results will differ from training's" in said[0] and "pass --quantization nf4" in said[0]
