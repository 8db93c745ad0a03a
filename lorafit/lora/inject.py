"""Put LoRA into an existing model: swap matched layers in place for their LoRA versions.

The new layers reuse the original ``weight``/``bias`` Parameter objects (no copy, no re-initialisation),
so parameter names stay the same and the original checkpoint still loads — for convolutions the base
keys become loralib's ``X.conv.weight``, and plain ``X.weight`` keys are still accepted on load.
Quantized linear layers (``wrap=``) are not rebuilt but wrapped whole in a ``WrappedLinear``: their
own state-dict format (packed weight + quantization state) moves under ``X.base_layer.``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from .layers import Conv1d, Conv2d, Conv3d, ConvLoRA, Embedding, Linear, MergedLinear, WrappedLinear
from .state import LoraError, LoRALayer

__all__ = ["inject", "target_names"]

_CONVS = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
_SUPPORTED = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
TargetSpec = str | Sequence[str] | None


def _supported(m: nn.Module) -> bool:
    """A plain layer of a supported type: subclasses that override forward (quantized or custom layers)
    would not run our forward's arithmetic on their weight, so they are left alone."""
    return any(isinstance(m, base) and type(m).forward is base.forward for base in _SUPPORTED)


def _adaptable(model: nn.Module, wrap: tuple[type[nn.Module], ...] = ()) -> dict[str, nn.Module]:
    """Layers LoRA can be put into, by name: supported plain layers and instances of the ``wrap`` types.
    Skips existing LoRA layers and anything inside them, and the insides of nn.MultiheadAttention (it
    reads ``out_proj.weight`` directly, never calling its forward)."""
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        if isinstance(m, (LoRALayer, nn.MultiheadAttention)):
            skip.append(name + ".")
        elif name and (_supported(m) or isinstance(m, wrap)):
            found[name] = m
    return found


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


def target_names(spec: TargetSpec) -> list[str] | None:
    """The module names a target spec lists, or None when it is ``"all-linear"``, a regex or None.

    A string made only of name characters and dots (``"qkv_proj"``, ``"self_attn.o_proj"``) is a module
    name, matched like a one-entry list: the full name or a dotted-name suffix. Any other string is a
    regex fullmatched against full names. (PEFT fullmatches every string as a regex, so its
    ``target_modules="qkv_proj"`` matches nothing; here it matches every ``...qkv_proj``.)
    """
    if spec is None or (isinstance(spec, str) and spec == "all-linear"):
        return None
    if isinstance(spec, str):
        return [spec] if _PLAIN_NAME.fullmatch(spec) else None
    return list(spec)


def _name_matches(name: str, entry: str) -> bool:
    """A list entry matches a full dotted name exactly or as a dotted-name suffix."""
    return name == entry or name.endswith("." + entry)


def _tied_to_input(model: nn.Module, layers: Mapping[str, nn.Module]) -> set[str]:
    """Names of Linear layers that are the output head or share their weight with an nn.Embedding."""
    emb = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    ptrs = {w.data_ptr() for w in emb if w.device.type != "meta"}
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    out = set()
    for name, m in layers.items():
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight
        tied = any(w is e for e in emb) or (w.device.type != "meta" and w.data_ptr() in ptrs)
        if name.rsplit(".", 1)[-1] == "lm_head" or m is head or tied:
            out.add(name)
    return out


def _matcher(
    spec: TargetSpec, what: str, model: nn.Module, layers, wrap: tuple[type[nn.Module], ...] = ()
) -> Callable[[str, nn.Module], bool]:
    if spec is None:
        return lambda name, m: False
    if spec == "all-linear":
        heads = _tied_to_input(model, layers)
        return lambda name, m: isinstance(m, (nn.Linear, *wrap)) and name not in heads
    if isinstance(spec, str) and target_names(spec) is None:
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise LoraError(f"{what}={spec!r} is not a valid regular expression: {e}") from None
        return lambda name, m: rx.fullmatch(name) is not None
    entries = target_names(spec)
    if not all(isinstance(e, str) for e in entries):
        raise LoraError(
            f"{what} must be a str (a module name, a regex or 'all-linear') or a list of module names, "
            f"got {spec!r}"
        )
    return lambda name, m: any(_name_matches(name, e) for e in entries)


def _collapse(name: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _layer_listing(layers: Mapping[str, nn.Module], limit: int = 60) -> str:
    seen: dict[str, str] = {}
    for name, m in layers.items():
        seen.setdefault(_collapse(name), type(m).__name__)
    lines = [f"  {n} ({t})" for n, t in list(seen.items())[:limit]]
    if len(seen) > limit:
        lines.append(f"  ... and {len(seen) - limit} more")
    return "\n".join(lines)


def _no_match_error(target: TargetSpec, exclude: TargetSpec, layers: Mapping[str, nn.Module]) -> LoraError:
    if not layers:
        return LoraError(
            f"inject(): target_modules={target!r} matched nothing: this model has no layer LoRA can adapt "
            "(nn.Linear, nn.Embedding, nn.Conv1d/2d/3d; quantized linear layers need wrap=(their type,))."
        )
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers if isinstance(layers[n], nn.Linear)))
    suffixes = suffixes[:2] or [next(iter(layers)).rsplit(".", 1)[-1]]
    after = f" after exclude_modules={exclude!r}" if exclude else ""
    regex = ".*\\.(" + "|".join(suffixes) + ")"
    hint = ""
    if isinstance(target, str) and target_names(target) is None and target != "all-linear":
        as_suffix = rf".*\.(?:{target})"
        hits = [n for n in layers if re.fullmatch(as_suffix, n)]
        if hits:
            hint = (
                f"A regex is fullmatched against full names such as {next(iter(layers))!r}; "
                f'r"{as_suffix}" would match {len(hits)} layers (e.g. {hits[0]!r}).\n'
            )
    return LoraError(
        f"inject(): target_modules={target!r} matched no layer LoRA can adapt{after}.\n"
        f"{hint}"
        f"Layers in this model (layer indices collapsed to *):\n{_layer_listing(layers)}\n"
        f"Fix: pass target_modules as a list of full names or dotted-name suffixes from this list "
        f'(e.g. {suffixes!r}), as one regex fullmatched against full names (e.g. r"{regex}"), '
        f"or as 'all-linear'."
    )


def _build(
    m: nn.Module,
    spec: tuple[list[int], list[bool]] | None,
    lora_kw: dict,
    wrap: tuple[type[nn.Module], ...] = (),
) -> LoRALayer:
    """A LoRA layer built around ``m``'s own Parameters (the module is created on 'meta' first so no
    full-size weight is allocated or initialised, then the originals are put in); a ``wrap`` type is
    wrapped whole in a :class:`WrappedLinear`."""
    if isinstance(m, wrap):
        sizes, enable = spec if spec is not None else (None, None)
        wrapped = WrappedLinear(m, enable_lora=enable, split_sizes=sizes, **lora_kw)
        m.weight.requires_grad = False
        wrapped.train(m.training)
        return wrapped
    w = m.weight
    kw = {**lora_kw, "device": "meta", "dtype": w.dtype}
    if spec is not None:
        sizes, enable = spec
        new = MergedLinear(
            m.in_features,
            m.out_features,
            enable_lora=enable,
            split_sizes=sizes,
            bias=m.bias is not None,
            **kw,
        )
    elif isinstance(m, nn.Linear):
        new = Linear(m.in_features, m.out_features, bias=m.bias is not None, **kw)
    elif isinstance(m, nn.Embedding):
        del kw["lora_dropout"]  # token ids get no dropout
        new = Embedding(
            m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx, max_norm=m.max_norm,
            norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse, **kw,
        )  # fmt: skip
    else:
        cls = next(c for base, c in _CONVS.items() if isinstance(m, base))
        new = cls(m.in_channels, m.out_channels, m.kernel_size, groups=m.groups, **kw)
    if isinstance(new, ConvLoRA):
        new.conv = m
    else:
        new.weight = m.weight
        if isinstance(m, nn.Linear):
            new.bias = m.bias
    w.requires_grad = False  # loralib freezes the pretrained weight of a LoRA layer
    if new._active:
        new._materialize_lora(w.device)
    new.train(m.training)
    return new


def _check_slices(slices: Mapping, layers: Mapping[str, nn.Module]) -> None:
    for key, value in slices.items():
        try:
            sizes, enable = value
            sizes, enable = [int(s) for s in sizes], [bool(e) for e in enable]
        except (TypeError, ValueError):
            raise LoraError(
                f"slices[{key!r}] must be (split_sizes: list[int], enable_lora: list[bool]), got {value!r}"
            ) from None
        hits = [n for n in layers if _name_matches(n, key)]
        if not hits:
            raise LoraError(
                f"inject(): slices key {key!r} matches no layer. Layers in this model "
                f"(layer indices collapsed to *):\n{_layer_listing(layers)}"
            )
        for n in hits:
            m = layers[n]
            out = getattr(m, "out_features", None)
            if isinstance(m, nn.Embedding) or sum(sizes) != out or len(sizes) != len(enable):
                raise LoraError(
                    f"inject(): slices[{key!r}] = ({sizes}, {enable}) does not fit {n} ({m!r}): it must be a "
                    "linear layer whose out_features equals sum(split_sizes), with one enable flag per slice"
                )


def inject(
    model: nn.Module,
    target_modules: TargetSpec,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    exclude_modules: TargetSpec = None,
    *,
    slices: Mapping[str, tuple[Iterable[int], Iterable[bool]]] | None = None,
    use_rslora: bool = False,
    init_lora_weights: str = "default",
    lora_dtype: torch.dtype | None = None,
    wrap: tuple[type[nn.Module], ...] = (),
) -> list[str]:
    """Replace the matched ``nn.Linear``/``nn.Embedding``/``nn.Conv1d/2d/3d`` of ``model`` in place by
    LoRA layers and return the replaced module names, sorted.

    ``target_modules``: ``"all-linear"`` (every nn.Linear except the output head — a module named
    ``lm_head``, ``model.get_output_embeddings()``, or a Linear whose weight is tied to an nn.Embedding),
    a list matches each entry as an exact full name or a dotted-name suffix (``"qkv_proj"`` matches
    ``model.layers.0.self_attn.qkv_proj``), a str of name characters and dots is such a name, and any
    other str is a regex fullmatched against the full dotted module name (see :func:`target_names`).
    ``exclude_modules`` uses the same rules and wins.

    ``slices``: ``{name_or_suffix: (split_sizes, enable_lora)}`` turns a matched Linear into a
    :class:`MergedLinear` adapting only the enabled output slices, e.g. Phi-3's stacked qkv_proj with
    ``{"qkv_proj": ([3072, 3072, 3072], [True, False, True])}``. A layer named in ``slices`` is targeted
    even if ``target_modules`` does not name it. Embeddings get no dropout.

    The base weights are frozen (as loralib's constructors do); biases and all other parameters are left
    as they are — call :func:`mark_only_lora_as_trainable` next. LoRA parameters are created on the base
    weight's device, in ``lora_dtype`` or else the base weight's dtype.

    ``wrap``: linear-like module types (``in_features``/``out_features``, forward ``x @ W.T + b``) whose
    forward LoRA must not replace, such as quantized layers (bitsandbytes ``Linear4bit``,
    ``Linear8bitLt``): a matched instance is wrapped in a :class:`WrappedLinear`, slices included, and
    ``"all-linear"`` matches them too. Without ``wrap`` such subclasses of nn.Linear are left alone.

    Raises :class:`LoraError` when nothing matches (the message lists the model's layers, with layer
    indices collapsed to ``*``), when a ``slices`` key matches no layer, or when a slice spec does not fit.
    """
    wrap = tuple(wrap)
    layers = _adaptable(model, wrap)
    target = _matcher(target_modules, "target_modules", model, layers, wrap)
    exclude = _matcher(exclude_modules, "exclude_modules", model, layers, wrap)
    slices = dict(slices or {})
    _check_slices(slices, layers)

    chosen: dict[str, tuple[list[int], list[bool]] | None] = {}
    for name, m in layers.items():
        key = next((k for k in slices if _name_matches(name, k)), None)
        if (key is not None or target(name, m)) and not exclude(name, m):
            chosen[name] = (list(slices[key][0]), list(slices[key][1])) if key is not None else None
    if not chosen:
        raise _no_match_error(target_modules, exclude_modules, layers)

    lora = {
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "use_rslora": use_rslora,
        "init_lora_weights": init_lora_weights, "lora_dtype": lora_dtype,
    }  # fmt: skip
    # The same module object may sit under several names; replace it under all of them.
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((parent, child_name))
    for name, spec in chosen.items():
        old = layers[name]
        new = _build(old, spec, lora, wrap)
        for parent, child_name in parents.get(id(old), []):
            setattr(parent, child_name, new)
    return sorted(chosen)
