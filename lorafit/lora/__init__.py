"""lorafit's LoRA layer library: loralib's API (``loralib==0.1.2``) in plain torch, with exact merging.

Code written for loralib runs with ``import lorafit as lora`` or ``from lorafit import lora``::

    layer = lora.Linear(in_features, out_features, r=16)
    lora.mark_only_lora_as_trainable(model)          # bias="none" | "all" | "lora_only"
    torch.save(lora.lora_state_dict(model), "ckpt_lora.pt")

and loralib checkpoints load into lorafit layers (and back) with the same outputs. On top of loralib:
:func:`inject` puts LoRA into an existing model; :func:`merge_adapter`/:func:`unmerge_adapter` merge
explicitly and exactly, in place and reversibly (``eval()`` never merges; a layer's own ``merge()``/
``unmerge()`` keep loralib's names), :func:`merge_and_unload` merges and leaves plain modules, and every
layer has ``delta_weight()`` for export. ``merge``/``unmerge`` are deprecated aliases (one release).
:class:`WrappedLinear` adds LoRA around any linear-like module, e.g. a quantized one (QLoRA). See
:mod:`lorafit.lora.layers` for what differs from loralib on purpose.

:func:`save_adapter`/:func:`load_adapter` read and write PEFT's adapter folder format
(:mod:`~lorafit.lora.peft_format` the files, :mod:`~lorafit.lora.factors` exact stacked <-> split
conversions, :mod:`~lorafit.lora.apply` fit checks and putting factors onto a model).

This package imports only torch and safetensors, never transformers or the rest of lorafit.
"""

from .apply import load_adapter
from .inject import inject
from .layers import Conv1d, Conv2d, Conv3d, ConvLoRA, Embedding, Linear, MergedLinear, WrappedLinear
from .peft_format import read_adapter, save_adapter
from .state import (
    LoraError,
    LoRALayer,
    lora_modules,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge,
    merge_adapter,
    merge_and_unload,
    unmerge,
    unmerge_adapter,
)

__all__ = [
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "LoRALayer",
    "Linear",
    "MergedLinear",
    "WrappedLinear",
    "Embedding",
    "ConvLoRA",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "LoraError",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "lora_modules",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "merge",
    "unmerge",
    "inject",
]
