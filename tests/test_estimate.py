"""`lorafit estimate`: the parts that are exact are exact, the CLI answers, and a run that does not fit
is told what to change (the free memory is injected, so nothing depends on this machine)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_jsonl
from safetensors import safe_open

from lorafit import memory
from lorafit.api import build_config, estimate
from lorafit.cli import main
from lorafit.demo import demo_data_dir
from lorafit.job import plan as make_plan
from lorafit.model import apply_lora, load_model
from lorafit.tiny import build_model, build_tokenizer

GIB = 2**30


def run_config(model, data, *sets: str, target_modules="all-linear"):
    return build_config(
        model=model, train_data=data, peft_config={"r": 4, "target_modules": target_modules},
        overrides=["training_config.max_seq_length=128", "model.device=cpu", *sets],
    )  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64 demo conversations."""
    lines = (demo_data_dir() / "train.jsonl").read_text().splitlines()[:64]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", *lines)


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """The demo-size tiny Phi-3 saved in bf16, as Phi-3 ships."""
    out = tmp_path_factory.mktemp("bf16") / "model"
    tok = build_tokenizer()
    build_model(tok).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "down_proj"], ["qkv_proj"]])
def test_lora_parameters_are_those_of_the_real_injected_model(tiny_model, data, targets):
    plan = estimate(tiny_model, data, peft_config={"r": 4, "target_modules": targets},
                    overrides=["training_config.max_seq_length=128", "model.device=cpu"], free_memory=GIB)  # fmt: skip
    cfg = run_config(tiny_model, data, target_modules=targets)
    real = load_model(cfg.model, device=torch.device("cpu"))
    apply_lora(real, cfg.peft_config)
    trainable = [p for p in real.parameters() if p.requires_grad]
    assert plan.memory.parts["trainable_parameters"] == sum(p.numel() for p in trainable)
    assert plan.memory.lora_weights == sum(p.numel() * p.element_size() for p in trainable)
    assert (
        plan.memory.gradients == plan.memory.lora_weights
        and plan.memory.optimizer == 2 * plan.memory.lora_weights
    )
    assert plan.memory.parts["parameters"] == sum(p.numel() for p in real.parameters())


def test_base_weight_bytes_are_the_checkpoints_tensor_bytes_for_bf16(bf16_model, data):
    plan = estimate(bf16_model, data, peft_config={"r": 4},
                    overrides=["training_config.max_seq_length=128", "model.device=cpu", "model.dtype=bf16",
                               "training_config.bf16=true"], free_memory=GIB)  # fmt: skip
    with safe_open(str(bf16_model / "model.safetensors"), "pt") as f:
        on_disk = sum(math.prod(f.get_slice(k).get_shape()) * 2 for k in f.keys())
    assert plan.memory.base_weights == on_disk


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_4bit_bytes_are_what_bitsandbytes_holds(method, double_quant):
    functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(352, 128, dtype=torch.bfloat16)
    packed, state = functional.quantize_4bit(
        w, blocksize=64, quant_type=method, compress_statistics=double_quant
    )
    held = [packed, state.absmax, state.code]
    if state.nested:
        held += [state.offset, state.state2.absmax, state.state2.code]
    real = sum(t.numel() * t.element_size() for t in held)
    assert memory.quantized_bytes(w.numel(), w.shape[0], method, double_quant) == real


def test_int8_bytes_are_what_bitsandbytes_holds():
    functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(352, 128, dtype=torch.float16)
    q, scales, _ = functional.int8_vectorwise_quant(w)
    real = q.numel() * q.element_size() + scales.numel() * scales.element_size()
    assert memory.quantized_bytes(w.numel(), w.shape[0], "int8", False) == real


def test_estimate_json_from_the_command_line(tiny_model, data, tmp_path, capsys):
    rc = main(["estimate", "--model", str(tiny_model), "--data", str(data),
               "--output-dir", str(tmp_path / "out"), "--set", "training_config.max_seq_length=128",
               "--set", "model.device=cpu", "--free-memory", "64GiB", "--json"])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    m = res["memory"]
    assert res["fits"] is True and res["free_memory_bytes"] == 64 * GIB
    step = m["runtime"] + res["tensor_peak_bytes"] + m["overhead"]
    assert res["peak_memory_bytes"] == max(step, m["load_peak"])
    parts = ("base_weights", "lora_weights", "gradients", "optimizer", "activations", "gathered")
    assert res["tensor_peak_bytes"] == sum(m[k] for k in parts) + max(m["head"], m["backward"])
    assert res["steps"] > 0 and res["tokens"] > 0 and res["advice"] == []
    assert not (tmp_path / "out").exists()  # an estimate writes nothing


def test_a_run_that_does_not_fit_says_what_to_change(tiny_model, data, capsys):
    sets = ["training_config.max_seq_length=512", "training_config.per_device_train_batch_size=8",
            "training_config.gradient_checkpointing=false", "model.device=cpu"]  # fmt: skip
    cfg = build_config(model=tiny_model, train_data=data, overrides=sets)
    need = make_plan(cfg, free=0, runtime=0).memory.peak
    plan = make_plan(cfg, free=need - 1, runtime=0)  # one byte short
    assert plan.fits is False
    keys = {k for a in plan.advice for k in a.overrides}
    assert {"training_config.per_device_train_batch_size", "training_config.max_seq_length",
            "training_config.gradient_checkpointing"} <= keys  # fmt: skip
    assert all(a.peak < need for a in plan.advice) and any(a.fits for a in plan.advice)
    assert "does NOT fit" in plan.report() and "To fit:" in plan.short()
    argv = ["estimate", "--model", str(tiny_model), "--data", str(data), "--free-memory", "1MiB"]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 3  # exit 3: does not fit
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "to fit, change one of" in out and "per_device_train_batch_size" in out


def test_more_processes_on_one_cpu_need_more_of_its_memory(tiny_model, data):
    sets = ["training_config.max_seq_length=128", "model.device=cpu", "training_config.fsdp=true"]
    one = estimate(tiny_model, data, overrides=sets, free_memory=GIB)
    two = estimate(tiny_model, data, overrides=sets, free_memory=GIB, processes=2)
    assert two.memory.base_weights == one.memory.base_weights // 2  # FSDP shards the base ...
    assert two.memory.gathered > 0  # ... and gathers groups back whole while they compute
    assert two.steps == math.ceil(one.steps / 2) or two.steps == one.steps // 2
    assert (
        memory.fits(two.memory.peak, 2 * two.memory.peak - 1, two.setup) is False
    )  # two processes, one host


def test_checkpointing_keeps_a_layers_input_per_layer(tiny_model, data):
    off = estimate(tiny_model, data, overrides=["training_config.gradient_checkpointing=false", "model.device=cpu"],
                   free_memory=GIB)  # fmt: skip
    on = estimate(tiny_model, data, overrides=["training_config.gradient_checkpointing=true", "model.device=cpu"],
                  free_memory=GIB)  # fmt: skip
    s, m = off.setup, off.memory
    layers = m.parts["decoder_layers"]
    size = torch.empty((), dtype=s.compute_dtype).element_size()
    assert on.memory.activations == layers * s.tokens * 128 * size + m.activations // layers  # hidden 128
    assert on.memory.activations < m.activations


def test_train_starts_with_the_estimate(tiny_model, tmp_path, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", *[
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
        for i in range(8)
    ])  # fmt: skip
    caplog.set_level("INFO", logger="lorafit")
    rc = main(["train", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(tmp_path / "out"),
               "--no-progress", "--set", "training_config.max_steps=1", "--set", "model.device=cpu"])  # fmt: skip
    assert rc == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("estimate: peak ~")]
    assert len(lines) == 1 and "; 1 step, " in lines[0]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["memory"]["estimated_peak_bytes"] > 0 and res["memory"]["peak_rss_bytes"] > 0


def test_probe_trains_a_few_steps_and_times_the_run(tiny_model, data, tmp_path):
    plan = estimate(tiny_model, data, output_dir=tmp_path / "out", free_memory=GIB, probe=2,
                    overrides=["training_config.max_seq_length=128", "model.device=cpu"])  # fmt: skip
    p = plan.probe
    assert p["steps"] == 2 and p["tokens_per_sec"] > 0 and p["peak_rss_bytes"] > 0
    assert p["seconds"] == pytest.approx(plan.steps * p["step_sec"])
    assert "probe: 2 steps on the real model" in plan.report()
    assert not (tmp_path / "out").exists()  # the probe trains in a temporary folder
