"""Putting LoRA factors onto a model: check that they fit, inject LoRA layers, copy the factors.

:func:`apply_loras` checks everything before it touches the model (a different base model is
refused; every missing, unexpected and wrong-shape key is reported at once in one LoraError), then
injects LoRA layers where the model has none and copies the factors in. :func:`load_adapter` reads a
PEFT adapter folder (:mod:`lorafit.lora.peft_format`) and applies it; pieces of stacked modules are
stacked first (:mod:`lorafit.lora.factors`) when the model has the stacked module instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from lorafit.lora.factors import StackedLayout, stack_loras
from lorafit.lora.inject import inject
from lorafit.lora.layers import Embedding
from lorafit.lora.peft_format import (
    NONFINITE_FIX,
    PREFIX,
    STACKED_LAYOUT_KEY,
    ModuleLora,
    _base_shape,
    _slices,
    parse_adapter,
    read_adapter,
)
from lorafit.lora.state import LoraError, LoRALayer, lora_modules

__all__ = ["PIECES_FIX", "apply_loras", "load_adapter"]

# What to do with LoRAs of pieces (q_proj, ...) of a stacked module (qkv_proj) the model has.
PIECES_FIX = "pass their stacked layout to load_adapter(..., stacked={stacked leaf: (pieces, row sizes)})"


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or type(model).__name__


def _fit_problems(name: str, m: ModuleLora, mod: nn.Module, use_rslora: bool) -> list[str]:
    """Why `m` cannot go onto module `mod` (empty if it fits)."""
    shapes = f"lora_A {tuple(m.A.shape)}, lora_B {tuple(m.B.shape)}"
    if isinstance(mod, LoRALayer) and mod._active:  # a LoRA layer already there (e.g. resuming training)
        mine = _slices(mod)
        if mine is not None:
            if m.slices != mine:
                return [
                    f"{name}: the model's layer adapts slices {mine}, the adapter has {m.slices or 'the whole module'}"
                ]
            a, b = m.A, m.B
        else:
            a, b = m.whole(use_rslora)[:2]
        if (m.kind == "embedding") != isinstance(mod, Embedding) or (
            tuple(a.shape) != tuple(mod.lora_A.shape) or tuple(b.shape) != tuple(mod.lora_B.shape)
        ):
            return [
                f"wrong shape for {name}: adapter has {shapes}; the model's {type(mod).__name__} needs "
                f"lora_A {tuple(mod.lora_A.shape)}, lora_B {tuple(mod.lora_B.shape)}"
            ]
        return []
    if m.kind == "embedding":
        if not isinstance(mod, nn.Embedding):
            return [
                f"{name}: the adapter has an embedding LoRA, but the model's module is a {type(mod).__name__}"
            ]
        n_in, n_out = mod.num_embeddings, mod.embedding_dim
    else:
        if not isinstance(mod, nn.Linear) or isinstance(mod, LoRALayer):
            return [
                f"{name}: the adapter has a linear LoRA, but the model's module is a {type(mod).__name__}"
            ]
        n_in, n_out = mod.in_features, mod.out_features
    if m.slices is not None:
        sizes, enable = m.slices["split_sizes"], m.slices["enable_lora"]
        want_a = (m.r * sum(enable), n_in)
        want_b = (sum(s for s, e in zip(sizes, enable) if e), m.r)
        if sum(sizes) != n_out:
            return [
                f"wrong shape for {name}: adapter slices {sizes} cover {sum(sizes)} rows, the model's has {n_out}"
            ]
    else:
        want_a, want_b = (m.r, n_in), (n_out, m.r)
    if tuple(m.A.shape) != want_a or tuple(m.B.shape) != want_b:
        return [
            f"wrong shape for {name}: adapter has {shapes}; the model's {type(mod).__name__} "
            f"({n_in} -> {n_out}) needs lora_A {want_a}, lora_B {want_b}"
        ]
    return []


def _check_finite(loras: Mapping[str, ModuleLora], full: Mapping[str, torch.Tensor] | None, source) -> None:
    """Refuse NaN or infinite factors, alphas and full parameters: a LoraError naming the first one."""
    bad = None
    for name, m in sorted(loras.items()):
        if not isinstance(m.alpha, (int, float)) or isinstance(m.alpha, bool) or not math.isfinite(m.alpha):
            bad = f"lora_alpha of {name} is {m.alpha!r}, not a finite number"
        for which, t in (("lora_A", m.A), ("lora_B", m.B)):
            if bad is None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = f"{name}.{which} holds NaN or infinite values"
        if bad:
            break
    for key, t in sorted((full or {}).items()):
        if bad is None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = f"{key} holds NaN or infinite values"
    if bad:
        raise LoraError(f"adapter {source}: {bad}. {NONFINITE_FIX}")


def apply_loras(
    model: nn.Module,
    loras: Mapping[str, ModuleLora],
    full: Mapping[str, torch.Tensor] | None = None,
    *,
    use_rslora: bool = False,
    trainable: bool = False,
    dtype: torch.dtype | None = None,
    stacked: StackedLayout | None = None,
    problems: Sequence[str] = (),
    source: str | Path = "adapter",
    base_model: str | None = None,
    base_shapes: Mapping[str, Sequence[int]] | None = None,
    lora_dropout: float = 0.0,
) -> list[str]:
    """Put LoRA factors onto `model`, injecting LoRA layers where needed; returns the adapted names.

    Everything is checked before the model is touched: a base model with other weight shapes than
    `base_shapes` is refused, then every missing, unexpected and wrong-shape key is reported at once in
    one LoraError. Pieces of stacked modules (`stacked`) whose own modules the model lacks are stacked first.
    """
    _check_finite(loras, full, source)
    named = dict(model.named_modules())
    base = base_model or "an unrecorded base model"
    mine = _model_name(model)
    diffs = [
        f"{n}: adapter {list(s)}, model {_base_shape(named[n])}"
        for n, s in (base_shapes or {}).items()
        if _base_shape(named.get(n)) is not None and _base_shape(named[n]) != list(s)
    ]
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise LoraError(
            f"adapter {source} was trained on base model {base}, not on this model ({mine}): "
            f"{len(diffs)} adapted weight(s) have other shapes, e.g. {'; '.join(diffs[:3])}{more}. "
            f"Fix: load it onto {base}."
        )
    problems = list(problems)
    if stacked:
        loras, more_problems = stack_loras(
            loras, stacked, use_rslora=use_rslora, want=lambda f, piece: piece not in named and f in named
        )
        problems += more_problems
    existing = lora_modules(model)
    for name, m in sorted(loras.items()):
        mod = named.get(name)
        if mod is None:
            hint = f" (pieces of a stacked module? {PIECES_FIX})" if name.rpartition(".")[0] in named else ""
            problems.append(f"unexpected key {PREFIX}{name}.lora_A/B: the model has no module {name!r}{hint}")
        else:
            problems += _fit_problems(name, m, mod, use_rslora)
    problems += [
        f"missing key: the model's LoRA layer {n} has no weights in the adapter"
        for n in existing
        if n not in loras
    ]
    params = dict(model.named_parameters())
    for key, t in (full or {}).items():
        if key not in params:
            problems.append(f"unexpected key {PREFIX}{key}: the model has no parameter {key!r}")
        elif tuple(params[key].shape) != tuple(t.shape):
            problems.append(
                f"wrong shape for {key}: adapter {tuple(t.shape)}, model {tuple(params[key].shape)}"
            )
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems[:30])
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise LoraError(
            f"adapter {source} (trained on {base}) does not fit this model ({mine}): {len(problems)} "
            f"problem(s):\n{listing}{more}\nFix: load it onto the base model it was trained on ({base})."
        )
    # The adapter names its modules, so a named nn.Linear subclass with its own forward (a quantized
    # layer, e.g. bitsandbytes' Linear4bit) is adapted by wrapping it (lora.WrappedLinear).
    wrap = tuple(
        {
            type(mod)
            for n in loras
            if isinstance(mod := named.get(n), nn.Linear)
            and not isinstance(mod, LoRALayer)
            and type(mod).forward is not nn.Linear.forward
        }
    )
    by_shape: dict[tuple, list[str]] = {}
    for name, m in loras.items():
        if name not in existing:
            by_shape.setdefault((m.r, m.alpha), []).append(name)
    for (r, alpha), names in by_shape.items():
        slices = {
            n: (loras[n].slices["split_sizes"], loras[n].slices["enable_lora"])
            for n in names
            if loras[n].slices
        }
        inject(model, [n for n in names if n not in slices], r=r, lora_alpha=alpha, lora_dropout=lora_dropout,
               slices=slices or None, use_rslora=use_rslora, lora_dtype=dtype or torch.float32, wrap=wrap)  # fmt: skip
    layers = lora_modules(model)
    with torch.no_grad():
        for name, m in loras.items():
            layer = layers[name]
            a, b = (m.A, m.B) if _slices(layer) is not None else m.whole(use_rslora)[:2]
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        for key, t in (full or {}).items():
            params[key].copy_(t)
    for layer in layers.values():
        for p in (layer.lora_A, layer.lora_B):
            p.requires_grad_(trainable)
    return sorted(loras)


def load_adapter(
    model: nn.Module,
    path: str | Path,
    *,
    trainable: bool = False,
    dtype: torch.dtype | None = None,
    stacked: StackedLayout | None = None,
    lora_dropout: float = 0.0,
    fused: StackedLayout | None = None,
) -> list[str]:
    """Put the adapter at `path` onto `model` (injecting LoRA layers as needed); returns adapted names.

    Strict: a different base model is refused, and every missing, unexpected and wrong-shape key is
    reported at once in one LoraError, before the model is changed. `dtype` is the LoRA weight dtype
    (default fp32), `lora_dropout` the dropout of the LoRA layers it injects (for training further).
    LoRA parameters train only if `trainable`. Split-layout adapters (`q_proj`, ...)
    load onto stacked modules given `stacked` (lorafit's own split exports record it in their metadata).
    `fused` is the deprecated name of `stacked` (it warns).
    """
    if fused is not None:
        warnings.warn(
            "load_adapter(fused=...) is deprecated; pass stacked=...", DeprecationWarning, stacklevel=2
        )
        stacked = {**fused, **(stacked or {})}
    files = read_adapter(path)
    loras, full, problems = parse_adapter(files)
    layout = {k: (v["pieces"], v["split_sizes"]) for k, v in files.meta.get(STACKED_LAYOUT_KEY, {}).items()}
    layout.update(stacked or {})
    return apply_loras(
        model, loras, full, use_rslora=files.use_rslora, trainable=trainable, dtype=dtype, stacked=layout,
        problems=problems, source=files.path, base_model=files.base_model, base_shapes=files.meta.get("base_shapes"),
        lora_dropout=lora_dropout,
    )  # fmt: skip
