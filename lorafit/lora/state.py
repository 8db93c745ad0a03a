"""LoRA state: the ``LoRALayer`` mixin (hyper-parameters, exact merge/unmerge, what a merged layer saves
and loads) and the model-level utilities built on it — which parameters train, what gets saved, merging.

Merging, model-wide, under PEFT's names (a layer's own methods keep loralib's ``merge()``/``unmerge()``):

    merge_adapter(model)      W += ΔW in every LoRA layer, in place; the original W is kept aside
    unmerge_adapter(model)    put the original W back, bit for bit
    merge_and_unload(model)   merge, then replace each LoRA layer by a plain module: no LoRA left

``merge``/``unmerge`` are deprecated aliases of the first two (warn, then call them).

``mark_only_lora_as_trainable`` and ``lora_state_dict`` keep loralib's names, arguments and state-dict
keys (a parameter is LoRA when ``"lora_"`` is in its name), so loralib checkpoints load unchanged.
The concrete layers are in :mod:`lorafit.lora.layers`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

__all__ = [
    "LoraError",
    "LoRALayer",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "lora_modules",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "merge",
    "unmerge",
]

_INITS = ("default", "gaussian")


class LoraError(ValueError):
    """A bad argument to the LoRA library (unknown option, target list that matches nothing, ...).

    A ValueError so generic callers can catch it; the message says what was wrong and how to fix it.
    """


class LoRALayer:
    """Mixin holding the LoRA hyper-parameters and the merge machinery shared by all layers.

    Subclasses own a base weight (``self.weight`` or, for convolutions, ``self.conv.weight``) and the
    factors ``lora_A``/``lora_B``; they implement ``delta_weight()`` and ``reset_lora_parameters()``.

    ``lora_dropout == 0`` means no dropout call at all in forward (``self.lora_dropout`` is then an
    ``nn.Identity`` kept for attribute compatibility, not a lambda, so layers stay picklable).
    ``scaling`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
    ``merge_weights`` is accepted for loralib compatibility but ignored: mode changes never merge.
    """

    _weight_key = "weight"  # state-dict key of the base weight, relative to the layer

    def __init__(
        self,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        merge_weights: bool,
        *,
        use_rslora: bool = False,
        init_lora_weights: str = "default",
        lora_dtype: torch.dtype | None = None,
    ):
        if not isinstance(r, int) or r < 0:
            raise LoraError(f"r must be an int >= 0 (0 means no LoRA), got {r!r}")
        if init_lora_weights not in _INITS:
            raise LoraError(f"init_lora_weights must be one of {_INITS}, got {init_lora_weights!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise LoraError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout_p = float(lora_dropout)
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        self.use_rslora = use_rslora
        self.init_lora_weights = init_lora_weights
        self.lora_dtype = lora_dtype
        self.scaling = (lora_alpha / (math.sqrt(r) if use_rslora else r)) if r > 0 else 0.0
        self._active = False  # True once lora_A/lora_B exist
        # The original base weight while merged; a non-persistent buffer so .to()/.half() keep it in step
        # with the weight and it never appears in state_dict().
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.register_state_dict_post_hook(_save_original_weight)
        self.register_load_state_dict_pre_hook(_unmerge_before_load)
        self.register_load_state_dict_post_hook(_remerge_after_load)

    # -- construction helpers -------------------------------------------------------------------
    def _base_weight(self) -> nn.Parameter:
        return self.weight

    def _base_module(self) -> nn.Module:
        """The module owning the base ``weight``/``bias`` (``self``, or ``self.conv`` for convolutions)."""
        return self

    def _create_lora(self, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> None:
        """Create ``lora_A``/``lora_B`` on the base weight's device, in ``lora_dtype`` or the base dtype,
        and freeze the base weight (as loralib)."""
        w = self._base_weight()
        dtype = self.lora_dtype or w.dtype
        self.lora_A = nn.Parameter(torch.zeros(a_shape, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=w.device))
        w.requires_grad = False
        self._active = True

    def _materialize_lora(self, device: torch.device) -> None:
        """Re-create the LoRA factors on ``device`` and initialise them (used after building on 'meta')."""
        for name in ("lora_A", "lora_B"):
            p = self._parameters[name]
            setattr(self, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device)))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """``"default"``: loralib's init, A kaiming-uniform (a=sqrt(5)) and B = 0, so ΔW = 0 at start.
        ``"gaussian"``: A ~ N(0, std=1/r) (PEFT's convention) and B = 0."""
        if not self._active:
            return
        if self.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # -- forward helpers ------------------------------------------------------------------------
    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` for the LoRA path: cast to the LoRA dtype (unless autocast does the casting), then dropout."""
        dtype = self.lora_A.dtype
        if x.dtype != dtype and x.is_floating_point() and not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)
        if self.lora_dropout_p > 0:
            x = self.lora_dropout(x)
        return x

    # -- merging --------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The scaled update ΔW = B @ A * scaling in fp32, in the base weight's shape and layout."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight: computed in fp32, rounded once into the base dtype.

        The original weight is kept aside (one extra weight-sized tensor in the base dtype) until
        :meth:`unmerge`, which puts it back bit for bit. While merged, forward uses the merged weight only,
        so the LoRA factors get no gradients. No-op if already merged or if the layer has no LoRA.
        """
        if not self._active or self.merged:
            return
        w = self._base_weight()
        original = w.detach().clone()
        w.copy_((w.detach().float() + self.delta_weight().to(w.device)).to(w.dtype))
        self._unmerged_weight = original
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original base weight kept by :meth:`merge` (no subtraction, no drift)."""
        if not self.merged:
            return
        self._base_weight().copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False


def _save_original_weight(module: LoRALayer, state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: a merged layer saves its original base weight, never the merged one."""
    if module.merged and module._unmerged_weight is not None:
        state_dict[prefix + module._weight_key] = module._unmerged_weight


def _unmerge_before_load(module: LoRALayer, state_dict, prefix: str, *args) -> None:
    """load pre-hook: load into the unmerged representation; remember to re-merge afterwards."""
    module._remerge = module.merged
    module.unmerge()


def _remerge_after_load(module: LoRALayer, incompatible_keys) -> None:
    if getattr(module, "_remerge", False):
        module._remerge = False
        module.merge()


_BIAS_MODES = ("none", "all", "lora_only")


def _check_bias(bias: str) -> None:
    if bias not in _BIAS_MODES:
        raise LoraError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")


def lora_modules(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer of ``model`` that has LoRA parameters (r > 0), by dotted module name.

    Plain layers built with ``r=0`` (or a MergedLinear with no enabled slice) are left out: their
    ``delta_weight()`` is zero.
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer) and m._active}


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze everything except LoRA parameters (names containing ``lora_``) and the chosen biases.

    ``bias="none"``: no bias trains. ``"all"``: every parameter with ``bias`` in its name trains (as
    loralib). ``"lora_only"``: the biases of layers that have LoRA parameters train — including a
    convolution's ``conv.bias``, which loralib misses, and excluding ``r=0`` layers, whose biases loralib
    would train but never save; this way exactly the biases ``lora_state_dict(bias="lora_only")`` saves
    are the ones that train. Unlike loralib, LoRA parameters are set trainable explicitly rather than
    relying on their default, so the call also undoes an earlier freeze.
    """
    _check_bias(bias)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    if bias == "all":
        for n, p in model.named_parameters():
            if "bias" in n:
                p.requires_grad = True
    elif bias == "lora_only":
        for m in lora_modules(model).values():
            b = getattr(m._base_module(), "bias", None)
            if b is not None:
                b.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The LoRA part of ``model.state_dict()``, with loralib's keys (e.g. ``layer.lora_A``).

    ``bias`` selects the biases saved along, matching :func:`mark_only_lora_as_trainable`: ``"all"``
    adds every key containing ``bias``; ``"lora_only"`` adds the bias of each layer with LoRA parameters
    (``X.bias``, or ``X.conv.bias`` for convolutions — loralib omits the latter). Load the result with
    ``model.load_state_dict(sd, strict=False)`` on top of the pretrained weights.
    """
    _check_bias(bias)
    sd = model.state_dict()
    if bias == "none":
        return {k: v for k, v in sd.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in sd.items() if "lora_" in k or "bias" in k}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if "lora_" in k:
            out[k] = v
            stem = k.split("lora_")[0]
            for bias_key in (stem + "bias", stem + "conv.bias", stem + "base_layer.bias"):
                if bias_key in sd:
                    out[bias_key] = sd[bias_key]
    return out


def merge_adapter(model: nn.Module) -> list[str]:
    """Merge every LoRA layer in place (see :meth:`LoRALayer.merge`); returns the names of the layers
    merged now. PEFT's name for the same operation.

    Each merged layer keeps its original base weight until :func:`unmerge_adapter` (one extra weight-sized
    tensor per layer), which makes unmerging bit-exact.
    """
    done = []
    for name, m in lora_modules(model).items():
        if not m.merged:
            m.merge()
            done.append(name)
    return done


def unmerge_adapter(model: nn.Module) -> list[str]:
    """Restore the original base weights of every merged LoRA layer; returns the names unmerged now."""
    done = []
    for name, m in lora_modules(model).items():
        if m.merged:
            m.unmerge()
            done.append(name)
    return done


def _plain(layer: LoRALayer) -> nn.Module:
    """The plain module holding a merged LoRA layer's weight and bias: a wrapped layer's (or a
    convolution's) own base module, else a new nn.Linear / nn.Embedding sharing the layer's tensors
    (a ``fan_in_fan_out`` weight, stored (in, out), is transposed into nn.Linear's (out, in))."""
    base = layer._base_module()
    if base is not layer:  # WrappedLinear (merged: its base is a float nn.Linear), ConvLoRA
        return base
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        new.bias = layer.bias
    elif isinstance(layer, nn.Embedding):
        new = nn.Embedding(
            layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx, max_norm=layer.max_norm,
            norm_type=layer.norm_type, scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse,
            device="meta",
        )  # fmt: skip
    else:
        raise LoraError(f"cannot merge a {type(layer).__name__} into a plain module")
    w = layer.weight
    if getattr(layer, "fan_in_fan_out", False):
        w = nn.Parameter(w.detach().transpose(0, 1).contiguous(), requires_grad=w.requires_grad)
    new.weight = w
    new.train(layer.training)
    return new


def merge_and_unload(model: nn.Module) -> list[str]:
    """Merge every LoRA layer (fp32 delta, rounded once into the base dtype) and replace it by a plain
    module (nn.Linear, nn.Embedding, a wrapped layer's base, a convolution's ``conv``) holding the merged
    weight, so the model has no LoRA left; returns the names of the replaced layers. PEFT's name.

    Not reversible. One layer at a time: the copy of the original weight that ``merge()`` keeps is
    dropped with the layer. A quantized wrapped base cannot absorb ΔW: dequantize it first.
    """
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((parent, child_name))
    names = []
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LoRALayer):
            layer.merge()
            plain = _plain(layer)
            for parent, child_name in parents[id(layer)]:
                setattr(parent, child_name, plain)
            names.append(name)
    return names


def merge(model: nn.Module) -> list[str]:
    """Deprecated alias of :func:`merge_adapter` (PEFT's name), kept for one release."""
    warnings.warn(
        "lorafit.lora.merge is deprecated; use lora.merge_adapter", DeprecationWarning, stacklevel=2
    )
    return merge_adapter(model)


def unmerge(model: nn.Module) -> list[str]:
    """Deprecated alias of :func:`unmerge_adapter` (PEFT's name), kept for one release."""
    warnings.warn(
        "lorafit.lora.unmerge is deprecated; use lora.unmerge_adapter", DeprecationWarning, stacklevel=2
    )
    return unmerge_adapter(model)
