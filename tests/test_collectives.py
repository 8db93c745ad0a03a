"""Collectives run on the process group's device (nccl: the GPU), FSDP is refused with a quantized base,
and an attention implementation whose package is missing says so. CPU only: the backends are mocked."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from lorafit import distributed
from lorafit.config import ModelConfig, RunConfig
from lorafit.distributed import Dist
from lorafit.errors import ConfigError, LorafitError


class Reduced(Exception):
    """Raised by the mocked nccl all_reduce once it has seen its tensor."""


def test_all_sum_hands_nccl_a_tensor_on_this_ranks_gpu(monkeypatch):
    """An nccl group has no CPU backend: a CPU tensor reaching it fails on every multi-GPU run. Fake
    tensors stand in for the GPU (no CUDA here), so the mocked all_reduce can check the device."""
    seen = []

    def all_reduce(t, group=None):
        seen.append(t.device)
        raise Reduced

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(Reduced):
        distributed.all_sum(Dist(rank=1, world_size=2, local_rank=1), 3.0, 4.0)
    assert seen == [torch.device("cuda", 1)]


def test_all_sum_on_gloo_stays_on_the_cpu_and_returns_the_sum(monkeypatch):
    def all_reduce(t, group=None):
        assert t.device.type == "cpu" and t.dtype == torch.float64
        t.mul_(2)  # two ranks with the same values

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert distributed.all_sum(Dist(rank=0, world_size=2), 3.0, 2.0**53) == [6.0, 2.0**54]
    assert distributed.all_sum(Dist(), 3.0) == [3.0]  # one process: no collective at all


def test_a_collective_brings_its_result_back_to_the_callers_device(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    t = torch.tensor([1.0, 2.0])
    out = distributed.collective(lambda x, group=None: x.add_(1), t)
    assert out.tolist() == [2.0, 3.0] and out.device == t.device


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_fsdp_with_a_quantized_base_is_a_config_error(quantization):
    with pytest.raises(ConfigError, match="training_config.fsdp: cannot shard a .*quantized base"):
        RunConfig.from_dict(
            {
                "model": {"quantization": quantization},
                "training_config": {"fsdp": True, "eval_strategy": "no"},
            }
        )
    RunConfig.from_dict({"model": {"quantization": quantization}, "training_config": {"eval_strategy": "no"}})


def test_a_missing_flash_attention_package_is_named(tiny_model):
    """Not "damaged safetensors?": the error names the attention implementation and the fix. (The
    flash-attn package is not installed here; transformers refuses before touching the device.)"""
    from lorafit.model import load_model

    cfg = ModelConfig(name_or_path=str(tiny_model), attn_implementation="flash_attention_2", dtype="fp32")
    with pytest.raises(
        LorafitError,
        match="(?s)attn_implementation: flash_attention_2 cannot be used.*pip install flash-attn",
    ):
        load_model(cfg, device=torch.device("cuda"))
