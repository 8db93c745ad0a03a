"""QLoRA: the base model's linear layers held quantized (bitsandbytes), LoRA trained on top.

    model.quantization: nf4 | fp4 | int8      (none, the default, is off)
    model.bnb_4bit_use_double_quant: true     model.bnb_4bit_compute_dtype: auto

Loading (:func:`bnb_config`): transformers reads the checkpoint through a ``BitsAndBytesConfig``,
quantizing tensor by tensor, so the full-precision base never sits in memory whole. Every
``nn.Linear`` but ``lm_head`` becomes a bitsandbytes ``Linear4bit`` (4-bit codes in blocks of 64
weights with one absmax scale each; double quant stores those scales in 8 bits, ~0.52 bytes per
weight in all) or ``Linear8bitLt`` (int8 rows, one fp32 scale per row). Embeddings, norms and
``lm_head`` stay in the model dtype: on a small vocab-heavy model they are most of the memory
(BENCHMARKS-qlora.md). On CPU this is bitsandbytes' own CPU backend (checked with 0.50.2: nf4, fp4
and int8 forward and backward; a 4-bit matmul dequantizes to the compute dtype and calls torch).
bitsandbytes rather than torchao's NF4 tensor: one library and one code path (transformers'
BitsAndBytesConfig) for CUDA and CPU, with fp4 and int8 as well as nf4, and nothing written by hand.

Training: :func:`lorafit.model.apply_lora` passes :func:`quantized_types` to ``lora.inject`` as
``wrap``, so each targeted quantized layer is wrapped in a ``lora.WrappedLinear``
(``y = base(x) + B A x * scaling``), the stacked-projection slices (q/k/v of qkv_proj, gate/up of
gate_up_proj) included. The quantized weights are uint8/int8 tensors that never require grad, so
only LoRA weights train. Nothing is up-cast: PEFT's ``prepare_model_for_kbit_training`` casts every
non-quantized weight (embeddings, norms, lm_head) to fp32; lorafit keeps them in the model dtype and
trains under autocast, as for an unquantized base, with fp32 LoRA weights.

Export (:func:`dequantize`, used by ``lorafit.export.fuse``): the base is loaded quantized as in
training (the adapter records :func:`quantized_with`: the dtype the weights were quantized from, compute
dtype, blocksize), the quantized layers become ``nn.Linear`` with the dequantized weights in fp32, LoRA is merged in fp32, and the model is written
in bf16. The merged model is the trained model (4-bit base + adapter) up to bf16 rounding; it
differs from the ORIGINAL base + adapter by the quantization error, which :func:`error_report`
measures layer by layer against the checkpoint's own weights (``quantization_error.json``).

bitsandbytes is imported inside the functions: lorafit works without it while quantization is none.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.errors import ConfigError
from lorafit.precision import dtype_name

METHODS = ("nf4", "fp4", "int8")
INSTALL_HINT = "pip install 'lorafit[qlora]' (bitsandbytes)"


class QuantizationWarning(UserWarning):
    """An adapter is run on a base quantized otherwise than the base it was trained on."""


def check_adapter_quantization(recorded: dict, quantization: str, adapter) -> None:
    """Warn (once) when an adapter trained on a quantized base (`recorded`: what its metadata says, {} for
    none) is run on a base loaded with another `quantization`: its results differ from training's."""
    method = recorded.get("method")
    if not method or method == quantization:
        return
    loaded = "unquantized" if quantization == "none" else f"quantized with {quantization}"
    warnings.warn(
        f"{adapter} was trained on a base quantized with {method} (QLoRA), and the base is loaded {loaded}: "
        f"results will differ from training's. To run it as trained, pass --quantization {method} "
        f'(Python: quantization="{method}")',
        QuantizationWarning,
        stacklevel=3,
    )


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError(
            f"model.quantization needs the bitsandbytes package, which is not installed ({e}). Fix: "
            f"{INSTALL_HINT}, or set model.quantization to none"
        ) from None
    return bitsandbytes


def bnb_config(method: str, *, double_quant: bool = True, compute: torch.dtype = torch.bfloat16):
    """transformers' BitsAndBytesConfig for `method` (nf4, fp4 or int8); lm_head is never quantized.
    `compute`: the 4-bit compute dtype, as lorafit.precision.bnb_compute_dtype chooses it."""
    if method not in METHODS:
        raise ConfigError(f"model.quantization: expected one of none, {', '.join(METHODS)}, got {method!r}")
    _bnb()
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def quantized_types() -> tuple[type[nn.Module], ...]:
    """bitsandbytes' quantized linear layer classes (what lora.inject must wrap rather than replace)."""
    bnb = _bnb()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def keep_packed_layout(model: nn.Module) -> None:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    On such a CPU, a Linear4bit called in eval mode on an input that does not require grad rewrites its
    weight in place into another layout: the double-quantized scales are expanded and rounded to bf16
    (more memory, other numbers than in training), later matmuls in that layout have no autograd (so
    training after an evaluation would stop back-propagating through the base), and in_features that
    are not a multiple of 64 make it fail outright. Every forward here uses the layout the weights
    were loaded in, which bitsandbytes dequantizes for a torch matmul, in training and eval alike.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


class DequantBuffers:
    """One buffer per (shape, dtype, device) that 4-bit weights are dequantized into for their matmul.

    bitsandbytes' CPU path dequantizes a 4-bit weight into a NEW full-size tensor before every matmul,
    forward and backward, and frees it right after. The sizes differ by projection (qkv, o, gate_up,
    down), so glibc's heap, which keeps what is freed, holds holes of those sizes between the
    activations kept for backward. Layers run one at a time, so one buffer per shape serves every layer
    of that shape: a few weights' worth of memory, allocated once. Measured on the bench's medium model
    (README, "Memory"): 158 MiB less private memory in the steady steps, the same losses; the rest of
    the heap's free space there is the activations' (checkpointing is what shrinks it).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def dequantize(self, packed: torch.Tensor, state, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight of 4-bit `packed` with bitsandbytes' `state`, in `dtype` (default
        ``state.dtype``), written into this shape's buffer (valid until the next call for the same shape)."""
        dtype = dtype or state.dtype
        key = (tuple(state.shape), dtype, packed.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(key[0], dtype=dtype, device=packed.device)
        if not _dequantize_4bit_into(packed, state, buf):
            if dtype != state.dtype:
                state = copy.copy(state)
                state.dtype = dtype
            buf.copy_(_bnb().functional.dequantize_4bit(packed.view(-1, 1), state))
        return buf


def _dequantize_4bit_into(packed: torch.Tensor, state, out: torch.Tensor) -> bool:
    """Write the dequantized 4-bit weight into `out` with bitsandbytes' own CPU kernel, the one its
    ``dequantize_4bit`` op calls (which has no ``out=`` variant on the CPU); False, and nothing written,
    where that op would not use the kernel (odd widths, blocks of 2048+ on AVX512, a build without it)."""
    import ctypes

    bnb = _bnb()
    try:
        from bitsandbytes.cextension import lib
    except ImportError:
        return False
    kind = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(out.dtype)
    fn = getattr(lib, f"cdequantize_blockwise_cpu_{state.quant_type}_{kind}", None)
    shape = tuple(state.shape)
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    if fn is None or out.device.type != "cpu" or shape[-1] % 2 or (avx512 and state.blocksize >= 2048):
        return False
    absmax = state.absmax
    if state.nested:  # the block scales are themselves 8-bit: dequantize them as bitsandbytes does
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float()
    n, m = shape[-1], math.prod(shape[:-1])
    codes = packed.view(torch.uint8).reshape(m, n // 2)
    ptr = bnb.functional.get_ptr
    fn(ptr(codes), ptr(absmax), ptr(out), ctypes.c_longlong(state.blocksize), ctypes.c_longlong(m),
       ctypes.c_longlong(n))  # fmt: skip
    return True


class _Linear4bitInto(torch.autograd.Function):
    """y = x @ W.T + b with W dequantized into a `DequantBuffers` buffer, in forward and again in backward
    (as bitsandbytes' MatMul4Bit: nothing but the packed weight is kept for backward)."""

    @staticmethod
    def forward(ctx, x, packed, bias, state, buffers: DequantBuffers):
        ctx.packed, ctx.state, ctx.buffers = packed, state, buffers
        # as bitsandbytes: forward dequantizes straight to x's dtype, backward to the state's, then casts
        return F.linear(x, buffers.dequantize(packed, state, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad @ ctx.buffers.dequantize(ctx.packed, ctx.state).to(grad.dtype)
        if ctx.needs_input_grad[2]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, None, gb, None, None


def linear4bit_forward(buffers: DequantBuffers):
    """A ``WrappedLinear.base_forward`` for bitsandbytes ``Linear4bit`` on the CPU: its own forward (input
    cast to the compute dtype, output back to the input's dtype) with the weight dequantized into
    `buffers`. Other devices (CUDA has fused 4-bit kernels and a caching allocator) and layers whose
    weights bitsandbytes repacked for inference take the layer's own forward."""

    def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        state = getattr(layer.weight, "quant_state", None)
        if x.device.type != "cpu" or state is None or getattr(state, "packing_format_for_cpu", False):
            return layer(x)
        dtype = x.dtype
        if layer.compute_dtype is not None:
            x = x.to(layer.compute_dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return _Linear4bitInto.apply(x, layer.weight.data, bias, state, buffers).to(dtype)

    return forward


def dequantize_into_buffers(model: nn.Module) -> DequantBuffers | None:
    """Make every LoRA-wrapped 4-bit layer of `model` dequantize into shared buffers (`DequantBuffers`,
    `linear4bit_forward`); returns them, or None when there is no such layer. The same numbers as
    bitsandbytes' own forward and backward (tested bit for bit), without a fresh weight-sized tensor per
    matmul."""
    bnb_linear4 = _bnb().nn.Linear4bit if is_quantized(model) else None
    layers = [
        m for m in model.modules()
        if bnb_linear4 is not None and isinstance(getattr(m, "base_layer", None), bnb_linear4)
        and hasattr(m, "base_forward")
    ]  # fmt: skip
    if not layers:
        return None
    buffers = DequantBuffers()
    forward = linear4bit_forward(buffers)
    for m in layers:
        m.base_forward = forward
    return buffers


@torch.no_grad()
def release_checkpoint(model: nn.Module) -> None:
    """Copy the weights that stay unquantized (embeddings, lm_head, norms, biases) into memory of their own.

    transformers leaves them as views of the memory-mapped checkpoint file, which keeps the whole
    mapping alive: every page read while quantizing stays resident, so a 4-bit model would hold the
    full bf16 file in its RSS (medium bench model: 2.4 GB after loading, 1.1 GB after this copy).
    Tensors on a GPU were copied there already and are left alone.
    """
    seen: set[int] = set()
    for m in model.modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is None or id(t) in seen or not t.is_floating_point() or t.device.type != "cpu":
                continue
            seen.add(id(t))
            if name in m._parameters:
                t.data = t.data.clone()
            else:
                m._buffers[name] = t.clone()


def quantized_with(model: nn.Module) -> dict:
    """How `model`'s 4-bit layers were quantized, read from the first one: ``dtype``, the dtype of the
    weights bitsandbytes quantized (what model.dtype loaded the checkpoint as: the same checkpoint
    quantized from fp32 or from its bf16 rounding gives other 4-bit codes), ``compute_dtype`` and
    ``blocksize``. {} when there is no 4-bit layer (int8 always quantizes from fp16)."""
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if is_quantized_layer(m) and state is not None:
            return {
                "dtype": dtype_name(state.dtype),
                "compute_dtype": dtype_name(m.compute_dtype or state.dtype),
                "blocksize": int(state.blocksize),
            }
    return {}


def is_quantized_layer(m: nn.Module) -> bool:
    """A bitsandbytes quantized linear layer (checked by name: a model cannot hold one unless
    bitsandbytes is imported already, and otherwise this must not import it)."""
    return type(m).__name__ in ("Linear4bit", "Linear8bitLt") and "bitsandbytes" in type(m).__module__


def is_quantized(model: nn.Module) -> bool:
    """True when any module of `model` is a bitsandbytes quantized linear layer."""
    return any(is_quantized_layer(m) for m in model.modules())


def _dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """fp32 values of 4-bit codes (a copy of the quant state asks for fp32 output; double-quant scales
    are dequantized by bitsandbytes)."""
    bnb = _bnb()
    state = copy.copy(state)
    state.dtype = torch.float32
    return bnb.functional.dequantize_4bit(packed, state)


@torch.no_grad()
def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes Linear4bit/Linear8bitLt, dequantized in fp32."""
    bnb = _bnb()
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return _dequantize_4bit(w.data, w.quant_state)
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(w.data, scb.float()).float()


@torch.no_grad()
def roundtrip(weight: torch.Tensor, method: str, *, double_quant: bool = True) -> torch.Tensor:
    """`weight` quantized as bitsandbytes stores it (from fp16 for int8, bf16 for 4-bit, as transformers
    loads a bf16 checkpoint) and dequantized again, in fp32."""
    bnb = _bnb()
    w = weight.detach()
    if method == "int8":
        q, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
        return bnb.functional.int8_vectorwise_dequant(q, scb).float()
    packed, state = bnb.functional.quantize_4bit(
        w.to(torch.bfloat16), blocksize=64, compress_statistics=double_quant, quant_type=method
    )
    return _dequantize_4bit(packed, state)


def _quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    types = quantized_types()
    for name, m in model.named_modules():
        if isinstance(m, types):
            yield name, m


@torch.no_grad()
def dequantize(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes layer of `model` (also inside a lora.WrappedLinear) by an nn.Linear with
    its dequantized fp32 weight, in place, one layer at a time; and drop transformers' record of the
    quantization, so `save_pretrained` writes a plain model. Returns the replaced layers' names."""
    names = []
    for name, layer in list(_quantized_layers(model)):
        bias = layer.bias
        plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
        plain.weight = nn.Parameter(dequantize_weight(layer), requires_grad=False)
        if bias is not None:
            plain.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        model.set_submodule(name, plain)
        names.append(name)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return names


def _checkpoint_tensors(name_or_path: str, revision: str | None = None) -> Iterator[tuple[str, object]]:
    """(key, safe_open handle) of every tensor in the checkpoint's safetensors files (local folder or the
    Hugging Face cache the base was just loaded from)."""
    from safetensors import safe_open

    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                name_or_path, revision=revision, allow_patterns=["*.safetensors"], local_files_only=True
            )
        )
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield key, f


def _rel(err_sq: float, ref_sq: float) -> float:
    return math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0


def error_report(
    pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]], *, method: str, double_quant: bool
) -> dict:
    """Relative quantization error ||W_q - W|| / ||W|| (Frobenius) per layer and in summary, from
    (name, original weight, dequantized weight) triples."""
    layers, err_total, ref_total = {}, 0.0, 0.0
    for name, original, deq in pairs:
        w = original.float()
        err_sq = float((deq.float() - w).pow(2).sum())
        ref_sq = float(w.pow(2).sum())
        layers[name] = {
            "relative_error": _rel(err_sq, ref_sq),
            "max_abs_error": float((deq.float() - w).abs().max()),
        }
        err_total, ref_total = err_total + err_sq, ref_total + ref_sq
    rel = [v["relative_error"] for v in layers.values()]
    summary = {
        "layers": len(rel),
        "relative_error_overall": _rel(err_total, ref_total),
        "relative_error_mean": sum(rel) / len(rel) if rel else 0.0,
        "relative_error_max": max(rel) if rel else 0.0,
        "worst_layer": max(layers, key=lambda n: layers[n]["relative_error"]) if layers else None,
    }
    return {
        "method": method,
        "double_quant": double_quant if method != "int8" else None,
        "what": "relative error ||W_dequantized - W_original||_F / ||W_original||_F of each quantized base "
        "weight; the merged model differs from the original base + adapter by this much",
        "summary": summary,
        "layers": layers,
    }


def dequantized_pairs(
    model: nn.Module, name_or_path: str, revision: str | None = None
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, original weight from the checkpoint, dequantized weight) for each quantized layer of
    `model`, read one tensor at a time."""
    layers = {}
    for name, layer in _quantized_layers(model):
        key = name.replace(".base_layer", "")  # inside a lora.WrappedLinear
        layers[f"{key}.weight"] = (key, layer)
    for key, f in _checkpoint_tensors(name_or_path, revision):
        if key in layers:
            name, layer = layers[key]
            yield name, f.get_tensor(key), dequantize_weight(layer)
