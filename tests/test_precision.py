"""Tests for lorafit.precision: which dtype each `auto` picks, and when bf16 counts as fast."""

from __future__ import annotations

import pytest
import torch

from lorafit import precision
from lorafit.errors import ConfigError
from lorafit.precision import (
    autocast,
    bf16_is_fast,
    bnb_compute_dtype,
    compute_dtype,
    dtype_name,
    lora_dtype,
    mixed_precision,
    parse_dtype,
    weight_dtype,
)

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA GPU of a given compute capability, as torch reports it (no GPU needed)."""

    def install(major: int, minor: int = 0):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda *a, **k: True
        )  # what torch says on a T4 too

    return install


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Whether the CPU has AVX512-BF16/AMX, pretended."""

    def install(fast: bool):
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)

    return install


@pytest.mark.parametrize(
    ("capability", "fast"), [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)]
)
def test_bf16_is_fast_on_cuda_only_from_ampere_on_although_torch_says_supported(gpu, capability, fast):
    gpu(*capability)  # T4 is 7.5, V100 7.0: torch.cuda.is_bf16_supported() is True there by emulation
    assert bf16_is_fast(CUDA) is fast
    assert bf16_is_fast(torch.device("cuda:0")) is fast


def test_auto_on_a_t4_trains_in_fp32_and_dequantizes_4bit_to_fp16(gpu):
    gpu(7, 5)
    assert mixed_precision(None, False, CUDA) == "no"
    assert bnb_compute_dtype("auto", CUDA) == torch.float16
    gpu(8, 0)
    assert mixed_precision(None, False, CUDA) == "bf16"
    assert bnb_compute_dtype("auto", CUDA) == torch.bfloat16


def test_bf16_is_fast_on_cpu_follows_the_cpu_flags_and_never_on_mps(cpu_bf16):
    cpu_bf16(True)
    assert bf16_is_fast(CPU)
    cpu_bf16(False)
    assert not bf16_is_fast(CPU)
    assert not bf16_is_fast(MPS)


@pytest.mark.parametrize(
    ("bf16", "fp16", "fast", "expected"),
    [
        (None, False, True, "bf16"),
        (None, False, False, "no"),
        (False, False, True, "no"),
        (True, False, False, "bf16"),
        (None, True, True, "fp16"),
        (False, True, False, "fp16"),
    ],
)
def test_mixed_precision_fp16_wins_and_bf16_null_means_where_fast(cpu_bf16, bf16, fp16, fast, expected):
    cpu_bf16(fast)
    assert mixed_precision(bf16, fp16, CPU) == expected


def test_weight_dtype_auto_keeps_the_checkpoint_dtype_except_half_on_a_slow_cpu(cpu_bf16):
    cpu_bf16(False)
    assert weight_dtype("auto", CPU, torch.bfloat16) == torch.float32
    assert weight_dtype("auto", CPU, torch.float16) == torch.float32
    assert weight_dtype("auto", CPU, None) == torch.float32
    assert weight_dtype("bf16", CPU, torch.float32) == torch.bfloat16  # asked for: given
    cpu_bf16(True)
    assert weight_dtype("auto", CPU, torch.bfloat16) == torch.bfloat16
    assert weight_dtype("auto", MPS, torch.float16) == torch.float16


def test_lora_dtype_auto_is_fp32_and_bnb_compute_auto_on_cpu_follows_the_flags(cpu_bf16):
    assert lora_dtype("auto") == torch.float32
    assert lora_dtype("bf16") == torch.bfloat16
    cpu_bf16(False)
    assert bnb_compute_dtype("auto", CPU) == torch.float32
    cpu_bf16(True)
    assert bnb_compute_dtype("auto", CPU) == torch.bfloat16
    assert bnb_compute_dtype("fp16", CPU) == torch.float16


def test_dtype_names_round_trip_and_an_unknown_name_lists_the_valid_ones():
    for name in ("fp32", "bf16", "fp16"):
        assert dtype_name(parse_dtype(name)) == name
    with pytest.raises(ConfigError, match="fp32, bf16, fp16"):
        parse_dtype("float8")
    with pytest.raises(ConfigError):
        dtype_name(torch.int8)


def test_autocast_and_compute_dtype_follow_the_precision():
    head = torch.nn.Linear(4, 3).to(torch.float64)
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head
    assert compute_dtype("bf16", model) == torch.bfloat16
    assert compute_dtype("fp16", model) == torch.float16
    assert compute_dtype("no", model) == torch.float64  # fp32 runs: the head's own dtype
    x = torch.randn(2, 4)
    with autocast(CPU, "bf16"):
        assert torch.nn.functional.linear(x, torch.randn(3, 4)).dtype == torch.bfloat16
    with autocast(CPU, "no"):
        assert torch.nn.functional.linear(x, torch.randn(3, 4)).dtype == torch.float32


def test_a_base_loaded_on_the_cpu_for_gpus_keeps_its_bf16(tiny_model, tmp_path, cpu_bf16):
    """FSDP on GPUs loads the base on the CPU (each rank then moves its shards to its GPU). On a host
    CPU without fast bf16, `auto` used to pick fp32 for the LOAD device: the whole bf16 base upcast in
    host RAM on every rank, and fp32 shards on the GPUs. The dtype is now the computing device's."""
    from transformers import AutoModelForCausalLM

    from lorafit.config import ModelConfig
    from lorafit.model import load_model

    bf16_base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(bf16_base)
    cfg = ModelConfig(name_or_path=str(bf16_base))
    cpu_bf16(False)
    sharded_for_gpus = load_model(cfg, device=CPU, training=True, runs_on=CUDA)
    assert {p.dtype for p in sharded_for_gpus.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in sharded_for_gpus.parameters())
    on_this_cpu = load_model(
        cfg, device=CPU, training=True
    )  # computing here: fp32 is faster than emulated bf16
    assert {p.dtype for p in on_this_cpu.parameters()} == {torch.float32}
