"""Precision: dtype names and every choice of dtype, in one place (torch only).

Config files name dtypes `fp32`, `bf16` and `fp16` (:data:`DTYPES`), or `auto`. What `auto` means
depends on whether the device multiplies bf16 matrices in hardware (:func:`bf16_is_fast`):

    choice                              auto resolves to                       function
    training_config.bf16/fp16           bf16 autocast if fast, else fp32      mixed_precision
    model.dtype (frozen base weights)   the checkpoint's dtype; fp32 for a    weight_dtype
                                        half-precision checkpoint on a CPU
                                        without fast bf16
    peft_config.lora_dtype              fp32 (optimizer quality)              lora_dtype
    model.bnb_4bit_compute_dtype        bf16 if fast, fp16 on CUDA, else fp32  bnb_compute_dtype

Emulated bf16 is slow: a bf16 matmul on a CPU without AVX512-BF16/AMX runs several times slower
than fp32, and a GPU before Ampere (T4, V100: compute capability 7.x) has no bf16 tensor cores,
although ``torch.cuda.is_bf16_supported()`` says True there. `auto` never picks bf16 on those.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from lorafit.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("bf16", "fp16", "no")  # the autocast a run computes under; "no" is fp32


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config name (fp32, bf16, fp16)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The config name (fp32, bf16, fp16) of a torch dtype."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ConfigError(f"no lorafit dtype name for {dtype}")


# ----------------------------------------------------------------------------- is bf16 fast here?


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16).

    Without them PyTorch emulates bf16 and a bf16 matmul is several times SLOWER than fp32, so
    bf16 compute on such a CPU is never chosen automatically.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cuda_has_fast_bf16(device: torch.device) -> bool:
    """True when the GPU has bf16 tensor cores: compute capability 8.0 or newer (Ampere, e.g. A100).

    Not ``torch.cuda.is_bf16_supported()``: that is True on a T4 or V100 (7.x) too, where bf16 runs
    emulated, slower than fp16 (the check Unsloth makes as well).
    """
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def bf16_is_fast(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls in hardware (what `auto` asks before choosing bf16)."""
    if device.type == "cuda":
        return cuda_has_fast_bf16(device)
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


# ----------------------------------------------------------------------------- the choices


def mixed_precision(bf16: bool | None, fp16: bool, device: torch.device) -> str:
    """'bf16', 'fp16' or 'no': the autocast to compute under (training_config.bf16/fp16). fp16 wins;
    bf16 None (auto) is bf16 where the device runs it fast, else fp32."""
    if fp16:
        return "fp16"
    if bf16 is None:
        return "bf16" if bf16_is_fast(device) else "no"
    return "bf16" if bf16 else "no"


def weight_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the frozen base weights are held in (model.dtype `name`).

    `auto`: the checkpoint's own dtype (Phi-3 ships bf16), except that bf16/fp16 weights on a CPU
    without fast bf16 are loaded as fp32, which is faster there than emulated half precision.
    """
    if name != "auto":
        return parse_dtype(name)
    dtype = checkpoint_dtype or torch.float32
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_fast_bf16():
        return torch.float32
    return dtype


def lora_dtype(name: str) -> torch.dtype:
    """The dtype of the LoRA weights (peft_config.lora_dtype `name`): `auto` is fp32 (optimizer
    quality) whatever the base dtype."""
    return torch.float32 if name == "auto" else parse_dtype(name)


def bnb_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype 4-bit weights are dequantized to for each matmul (model.bnb_4bit_compute_dtype `name`).
    `auto`: bf16 where it is fast, else fp16 on CUDA and fp32 elsewhere."""
    if name != "auto":
        return parse_dtype(name)
    if bf16_is_fast(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast for the forward pass, or nothing for fp32 (precision "no")."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(precision))


def compute_dtype(precision: str, model=None) -> torch.dtype:
    """The dtype matmuls run in under `precision`: bf16 or fp16 under autocast; for "no", the dtype
    of `model`'s output head (the loss head computes in it)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if model is None:
        raise ValueError("compute_dtype: precision 'no' needs the model (its head's dtype)")
    return model.get_output_embeddings().weight.dtype
