"""LoRA layers: loralib's (microsoft/LoRA, ``loralib==0.1.2``) classes, signatures and parameter layout.

A LoRA layer computes ``base(x) + (dropout(x) @ A.T @ B.T) * scaling`` with ``A`` of shape (r, in) and ``B``
of shape (out, r), so code and checkpoints written for loralib work unchanged: the base layer keeps its
``weight``/``bias`` names and the factors are bare parameters ``lora_A``/``lora_B``.

What is deliberately different from loralib (every other behaviour matches it):

* ``eval()``/``train()`` never touch weights. loralib merges ΔW into the base weight on ``eval()``; here
  merging is something you ask for (:meth:`LoRALayer.merge`). ``merge_weights`` is accepted and ignored.
  Eval outputs are the same (up to float rounding) because the unmerged forward computes the same sum.
* Merging is exact and reversible: ``merge()`` adds ΔW in fp32 and rounds once into the base dtype, and
  keeps the original weight (one extra weight-sized tensor per merged layer, in the base dtype) so
  ``unmerge()`` restores it bit for bit instead of subtracting (loralib and PEFT drift in bf16/fp16).
* While merged, ``state_dict()`` writes the ORIGINAL base weight (loralib issue #190 writes the merged
  one, which then gets LoRA applied twice). Loading into a merged layer unmerges, loads, and re-merges,
  so the layer stays merged and its weight reflects the loaded tensors.
* ``MergedLinear`` never builds the dense (out, in) ΔW in forward (loralib issue #109) and accepts
  unequal ``split_sizes`` (grouped-query attention); ``Conv1d``/``Conv3d`` have working shapes (loralib
  issue #115), kernels may be tuples, and conv LoRA dropout is applied (loralib ignores it).
* Keyword-only extras on every layer: ``use_rslora``, ``init_lora_weights``, ``lora_dtype``.

A little over lorafit's ~500-line mark on purpose: every loralib layer class stays in this one file,
where loralib keeps them (``loralib/layers.py``), so code ported from loralib finds each one here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .state import LoraError, LoRALayer


def _transpose_if(w: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return w.transpose(0, 1) if fan_in_fan_out else w


class Linear(nn.Linear, LoRALayer):
    """``nn.Linear`` with LoRA: ``y = x @ W.T + b + (dropout(x) @ A.T) @ B.T * scaling``.

    Shapes: ``weight`` (out, in) — or (in, out) with ``fan_in_fan_out=True`` (GPT-2 Conv1D layout) —
    ``lora_A`` (r, in), ``lora_B`` (out, r). ``r=0`` gives a plain linear layer without LoRA parameters.
    The LoRA path multiplies by A first, so the intermediate is only (N, r).
    ``eval()`` does not merge (``merge_weights`` is accepted for compatibility); call :meth:`merge`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        *,
        use_rslora: bool = False,
        init_lora_weights: str = "default",
        lora_dtype: torch.dtype | None = None,
        **kwargs,
    ):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(
            self,
            r,
            lora_alpha,
            lora_dropout,
            merge_weights,
            use_rslora=use_rslora,
            init_lora_weights=init_lora_weights,
            lora_dtype=lora_dtype,
        )
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self._create_lora((r, in_features), (out_features, r))
        self.reset_parameters()  # same RNG sequence as loralib: same seed, same initial weights
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if getattr(self, "_active", False):
            self.reset_lora_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _transpose_if(self.weight, self.fan_in_fan_out)
        if not self._active or self.merged:
            return F.linear(x, weight, self.bias)
        return _linear_with_lora(
            x, weight, self.bias, self._lora_input(x), self.lora_A, self.lora_B, self.scaling
        )

    def delta_weight(self) -> torch.Tensor:
        if not self._active:
            return torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        delta = self.lora_B.float() @ self.lora_A.float() * self.scaling  # (out, in)
        return _transpose_if(delta, self.fan_in_fan_out)


def _linear_with_lora(x, weight, bias, lora_x, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """``x @ W.T + b + scaling * lora_x @ A.T @ B.T``.

    When everything is in one dtype (no autocast) the B product is accumulated into the base output by
    one in-place ``addmm_`` on 2-D views: no (N, out) temporary, no separate add or scaling pass.
    Otherwise (fp32 LoRA on a bf16 base, autocast) the LoRA output is cast and added.
    """
    lead = x.shape[:-1]
    result = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)  # (N, out), a fresh tensor
    h = F.linear(lora_x.reshape(-1, lora_x.shape[-1]), lora_A)  # (N, r)
    if h.dtype == result.dtype == lora_B.dtype and not torch.is_autocast_enabled(x.device.type):
        result.addmm_(h, lora_B.t(), alpha=scaling)
    else:
        result.add_(F.linear(h * scaling, lora_B).to(result.dtype))
    return result.view(*lead, result.shape[-1])


class Embedding(nn.Embedding, LoRALayer):
    """``nn.Embedding`` with LoRA: ``y = W[ids] + A.T[ids] @ B.T * scaling``.

    loralib's layout, reversed from Linear: ``lora_A`` (r, num_embeddings) starts at zero and ``lora_B``
    (embedding_dim, r) is normal-initialised. No LoRA dropout (token ids cannot be dropped out). The
    base ``max_norm`` is not applied to the LoRA lookup (loralib would renormalise ``lora_A`` in place).
    ``eval()`` does not merge (``merge_weights`` is accepted for compatibility); call :meth:`merge`.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = True,
        *,
        use_rslora: bool = False,
        init_lora_weights: str = "default",
        lora_dtype: torch.dtype | None = None,
        **kwargs,
    ):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(
            self,
            r,
            lora_alpha,
            0.0,
            merge_weights,
            use_rslora=use_rslora,
            init_lora_weights=init_lora_weights,
            lora_dtype=lora_dtype,
        )
        if r > 0:
            self._create_lora((r, num_embeddings), (embedding_dim, r))
        if kwargs.get("_weight") is None:
            self.reset_parameters()
        else:  # keep a weight the caller passed in (loralib would re-initialise it)
            self.reset_lora_parameters()

    def reset_parameters(self) -> None:
        nn.Embedding.reset_parameters(self)
        if getattr(self, "_active", False):
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """``"default"``: loralib's A = 0, B ~ N(0, 1). ``"gaussian"``: A ~ N(0, std=1/r), B = 0."""
        if not self._active:
            return
        if self.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.Embedding.forward(self, x)
        if self._active and not self.merged:
            after_a = F.embedding(
                x,
                self.lora_A.transpose(0, 1),
                self.padding_idx,
                None,
                self.norm_type,
                self.scale_grad_by_freq,
                self.sparse,
            )
            result = result.add_(F.linear(after_a * self.scaling, self.lora_B).to(result.dtype))
        return result

    def delta_weight(self) -> torch.Tensor:
        if not self._active:
            return torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        return (self.lora_B.float() @ self.lora_A.float()).transpose(0, 1) * self.scaling  # (num, dim)


class MergedLinear(nn.Linear, LoRALayer):
    """A stacked projection (e.g. qkv) whose output is split into slices, each with its own optional LoRA.

    ``split_sizes`` gives the slice widths (default: ``len(enable_lora)`` equal slices, as loralib);
    unequal slices serve grouped-query attention, where k and v are narrower than q. With k enabled
    slices: ``lora_A`` (r*k, in) stacks each slice's (r, in) factor, ``lora_B`` (sum of enabled widths,
    r) stacks each slice's (width, r) factor — loralib's layout. Disabled slices are exactly the base.

    Forward never forms the (out, in) ΔW (loralib issue #109): ``h = dropout(x) @ A.T`` is (N, r*k), and
    a block-diagonal (out, r*k) matrix of B slices (zero rows for disabled slices) maps it to (N, out).
    With ``r=0`` or no enabled slice the layer is a plain ``nn.Linear``.
    ``eval()`` does not merge (``merge_weights`` is accepted for compatibility); call :meth:`merge`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: Sequence[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        split_sizes: Sequence[int] | None = None,
        *,
        use_rslora: bool = False,
        init_lora_weights: str = "default",
        lora_dtype: torch.dtype | None = None,
        **kwargs,
    ):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(
            self,
            r,
            lora_alpha,
            lora_dropout,
            merge_weights,
            use_rslora=use_rslora,
            init_lora_weights=init_lora_weights,
            lora_dtype=lora_dtype,
        )
        enable_lora, split_sizes = _check_slices(out_features, enable_lora, split_sizes)
        self.enable_lora = enable_lora
        self.split_sizes = split_sizes
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0 and any(enable_lora):
            k = sum(enable_lora)
            self._create_lora((r * k, in_features), (sum(self._enabled_sizes()), r))
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    def _enabled_sizes(self) -> list[int]:
        return [s for s, e in zip(self.split_sizes, self.enable_lora) if e]

    @property
    def lora_ind(self) -> torch.Tensor:
        """Bool mask (out,) of the output features that have LoRA (loralib's attribute)."""
        flags = [torch.full((s,), e, dtype=torch.bool) for s, e in zip(self.split_sizes, self.enable_lora)]
        return torch.cat(flags).to(self.weight.device)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if getattr(self, "_active", False):
            self.reset_lora_parameters()

    def _b_block(self) -> torch.Tensor:
        return _b_block(self.lora_B, self.split_sizes, self.enable_lora)

    def merge_AB(self) -> torch.Tensor:
        """loralib's unscaled dense ΔW/scaling in the weight's layout (for compatibility; not used in forward)."""
        return _transpose_if(self._b_block() @ self.lora_A, self.fan_in_fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _transpose_if(self.weight, self.fan_in_fan_out)
        if not self._active or self.merged:
            return F.linear(x, weight, self.bias)
        return _linear_with_lora(
            x, weight, self.bias, self._lora_input(x), self.lora_A, self._b_block(), self.scaling
        )

    def delta_weight(self) -> torch.Tensor:
        if not self._active:
            return torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        delta = self._b_block().float() @ self.lora_A.float() * self.scaling  # (out, in)
        return _transpose_if(delta, self.fan_in_fan_out)


def _b_block(lora_B: torch.Tensor, split_sizes: Sequence[int], enable_lora: Sequence[bool]) -> torch.Tensor:
    """(out, r*k) block-diagonal matrix: slice i's B block at its output rows and its r columns of h."""
    pieces = iter(lora_B.split([s for s, e in zip(split_sizes, enable_lora) if e]))
    blocks = [next(pieces) if e else lora_B.new_zeros(s, 0) for s, e in zip(split_sizes, enable_lora)]
    return torch.block_diag(*blocks)


def _check_slices(out_features: int, enable_lora: Sequence[bool], split_sizes: Sequence[int] | None):
    """(enable_lora, split_sizes) as lists, checked against out_features (equal slices by default)."""
    enable_lora = [bool(e) for e in enable_lora]
    if not enable_lora:
        raise LoraError("enable_lora must have one flag per output slice, got an empty list")
    if split_sizes is None:
        if out_features % len(enable_lora):
            raise LoraError(
                f"len(enable_lora)={len(enable_lora)} must divide out_features={out_features}; "
                "pass split_sizes=[...] for unequal slices"
            )
        split_sizes = [out_features // len(enable_lora)] * len(enable_lora)
    split_sizes = [int(s) for s in split_sizes]
    if len(split_sizes) != len(enable_lora) or sum(split_sizes) != out_features or min(split_sizes) <= 0:
        raise LoraError(
            f"split_sizes={split_sizes} must be positive, one per enable_lora flag "
            f"({len(enable_lora)}), and sum to out_features={out_features}"
        )
    return enable_lora, split_sizes


class WrappedLinear(nn.Module, LoRALayer):
    """LoRA around any linear-like module: ``y = base_layer(x) + (dropout(x) @ A.T) @ B.T * scaling``.

    For layers whose forward LoRA must not re-implement: quantized linear layers (bitsandbytes
    ``Linear4bit``/``Linear8bitLt``, whose ``weight`` is packed 4-bit or int8 data, not an (out, in)
    float matrix). ``base_layer`` needs ``in_features``/``out_features`` and must compute
    ``x @ W.T + b`` for some (out, in) ``W``; it runs unchanged, the LoRA output is added to its output.
    Shapes are :class:`Linear`'s — ``lora_A`` (r, in), ``lora_B`` (out, r) — or, with ``enable_lora``
    (and ``split_sizes``), :class:`MergedLinear`'s slices of a stacked projection, so adapters and
    checkpoints do not depend on whether the base was quantized.

    The base module keeps its own state-dict format under ``base_layer.`` (for a 4-bit layer the packed
    weight and its quantization state); the LoRA factors are ``lora_A``/``lora_B`` as everywhere.
    LoRA factors default to fp32 when the base weight is not a float tensor.
    :meth:`merge` needs a float base weight: a quantized weight cannot absorb ΔW, so dequantize the
    base layer first (put a float ``nn.Linear`` holding the dequantized weight in its place).

    ``base_forward``: None (the base layer's own forward), or a function ``(base_layer, x) -> y`` that
    computes the same thing another way (lorafit.quant uses it to dequantize 4-bit weights into a
    reused buffer instead of a fresh tensor per matmul). Not saved; set it after construction.
    """

    base_forward = None

    _weight_key = "base_layer.weight"

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: Sequence[bool] | None = None,
        split_sizes: Sequence[int] | None = None,
        *,
        use_rslora: bool = False,
        init_lora_weights: str = "default",
        lora_dtype: torch.dtype | None = None,
    ):
        nn.Module.__init__(self)
        in_features, out_features = (
            getattr(base_layer, "in_features", None),
            getattr(base_layer, "out_features", None),
        )
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            raise LoraError(
                f"WrappedLinear needs a module with int in_features/out_features, got {base_layer!r}"
            )
        self.base_layer = base_layer
        w = self._base_weight()
        if lora_dtype is None and not w.is_floating_point():
            lora_dtype = torch.float32
        LoRALayer.__init__(
            self,
            r,
            lora_alpha,
            lora_dropout,
            True,
            use_rslora=use_rslora,
            init_lora_weights=init_lora_weights,
            lora_dtype=lora_dtype,
        )
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = False  # the base's own forward decides its layout
        self.enable_lora: list[bool] | None = None
        self.split_sizes: list[int] | None = None
        rows = out_features
        if enable_lora is not None:
            self.enable_lora, self.split_sizes = _check_slices(out_features, enable_lora, split_sizes)
            rows = sum(s for s, e in zip(self.split_sizes, self.enable_lora) if e)
        k = 1 if self.enable_lora is None else sum(self.enable_lora)
        if r > 0 and k > 0:
            self._create_lora((r * k, in_features), (rows, r))
            self.reset_lora_parameters()

    def _base_weight(self) -> nn.Parameter:
        return self.base_layer.weight

    def _base_module(self) -> nn.Module:
        return self.base_layer

    def _b(self) -> torch.Tensor:
        if self.enable_lora is None:
            return self.lora_B
        return _b_block(self.lora_B, self.split_sizes, self.enable_lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_forward
        result = self.base_layer(x) if base is None else base(self.base_layer, x)
        if not self._active or self.merged:
            return result
        h = F.linear(self._lora_input(x), self.lora_A)  # (..., r*k)
        return result + F.linear(h * self.scaling, self._b()).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        if not self._active:
            return torch.zeros((self.out_features, self.in_features), dtype=torch.float32)
        return self._b().float() @ self.lora_A.float() * self.scaling  # (out, in)

    def merge(self) -> None:
        w = self._base_weight()
        if self._active and not self.merged and not w.is_floating_point():
            raise LoraError(
                f"cannot merge LoRA into a quantized {type(self.base_layer).__name__} ({w.dtype} weight): "
                "dequantize the base layer first (replace it by a float nn.Linear), then merge"
            )
        LoRALayer.merge(self)


class ConvLoRA(nn.Module, LoRALayer):
    """A convolution ``self.conv`` plus LoRA; state-dict keys ``conv.weight``, ``conv.bias``, ``lora_A``,
    ``lora_B`` as loralib 0.1.2. Checkpoints of a plain conv (``weight``/``bias`` keys) also load.

    ΔW is ``(B @ A).view(conv.weight.shape) * scaling`` with, for kernel (k0, k1, ...):
    ``lora_A`` (r*k0, in*k0) and ``lora_B`` (out/groups * k1*k2*..., r*k0). For Conv2d with an int kernel
    this is exactly loralib's layout; unlike loralib it also has the right size for Conv1d and Conv3d
    (loralib issue #115; same as the proposed fix in microsoft/LoRA PR #157) and for tuple kernels.

    Forward adds ΔW to the kernel (one convolution, as loralib) when there is no dropout and the LoRA dtype
    is the base dtype; otherwise it runs ``conv(x, W, b) + conv(dropout(x), ΔW)`` so dropout is applied
    to the LoRA input (loralib ignores ``lora_dropout`` for convolutions).
    ``eval()`` does not merge (``merge_weights`` is accepted for compatibility); call :meth:`merge`.
    """

    _weight_key = "conv.weight"

    def __init__(
        self,
        conv_module: type[nn.Module],
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        *,
        use_rslora: bool = False,
        init_lora_weights: str = "default",
        lora_dtype: torch.dtype | None = None,
        **kwargs,
    ):
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(
            self,
            r,
            lora_alpha,
            lora_dropout,
            merge_weights,
            use_rslora=use_rslora,
            init_lora_weights=init_lora_weights,
            lora_dtype=lora_dtype,
        )
        self.register_load_state_dict_pre_hook(_accept_plain_conv_keys)
        ks = self.conv.kernel_size
        if r > 0:
            rest = math.prod(ks[1:])
            self._create_lora(
                (r * ks[0], in_channels * ks[0]), (out_channels // self.conv.groups * rest, r * ks[0])
            )
        self.reset_parameters()

    def _base_weight(self) -> nn.Parameter:
        return self.conv.weight

    def _base_module(self) -> nn.Module:
        return self.conv

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        self.reset_lora_parameters()

    def _delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if not self._active or self.merged:
            return conv(x)
        w = conv.weight
        delta = self._delta()
        if (self.lora_dropout_p == 0 or not self.training) and delta.dtype == w.dtype:
            return conv._conv_forward(x, w + delta, conv.bias)
        result = conv._conv_forward(x, w, conv.bias)
        return result.add_(conv._conv_forward(self._lora_input(x), delta, None).to(result.dtype))

    def delta_weight(self) -> torch.Tensor:
        w = self.conv.weight
        if not self._active:
            return torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        return (self.lora_B.float() @ self.lora_A.float()).view(w.shape) * self.scaling


def _accept_plain_conv_keys(module: ConvLoRA, state_dict, prefix: str, *args) -> None:
    """load pre-hook: map a plain conv's ``weight``/``bias`` keys (e.g. a checkpoint from before
    :func:`lorafit.lora.inject`) onto ``conv.weight``/``conv.bias``."""
    for name in ("weight", "bias"):
        old, new = prefix + name, prefix + "conv." + name
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)


class Conv1d(ConvLoRA):
    """``nn.Conv1d`` with LoRA: ``Conv1d(in_channels, out_channels, kernel_size, r=0, ...)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv2d(ConvLoRA):
    """``nn.Conv2d`` with LoRA, loralib's exact layout for int kernels."""

    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv3d(ConvLoRA):
    """``nn.Conv3d`` with LoRA: ``Conv3d(in_channels, out_channels, kernel_size, r=0, ...)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv3d, *args, **kwargs)
