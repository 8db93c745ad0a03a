"""Adapter folders in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

This is the interchange format transformers, PEFT, vLLM and TGI read. Keys follow PEFT:

    base_model.model.<module path>.lora_A.weight        (r, in)     Linear / MergedLinear
    base_model.model.<module path>.lora_B.weight        (out, r)
    base_model.model.<module path>.lora_embedding_A     (r, num_embeddings)   Embedding
    base_model.model.<module path>.lora_embedding_B     (dim, r)
    base_model.model.<module path>.<param>              fully trained modules (modules_to_save)

A slice adapter (a `MergedLinear` adapting, say, q and v of a fused qkv_proj at rank r) is written
as the exactly equivalent whole-module LoRA of rank k*r, which PEFT can load:

    A = [A_q; A_v]                     (2r, in)
    B = [[B_q, 0  ],    rows of q      (out, 2r)   k's rows are zero, so k is untouched
         [0,   0  ],    rows of k
         [0,   B_v]]    rows of v

with `rank_pattern`/`alpha_pattern` entries giving PEFT that module's rank 2r and an alpha that
keeps the scale (alpha*2 for alpha/r, alpha*sqrt(2) with rsLoRA). The pattern keys are full module
names: PEFT 0.21 matches a key with `re.match(rf"(.*\\.)?({key})$", module_name)`, so a full name
picks out exactly that module. What was done is recorded in the safetensors header metadata
(`lorafit` key; PEFT ignores it), so lorafit reads its slices back as `MergedLinear` layers.

Split layout: runtimes that know Phi-3 only as a Llama model expect `q_proj`/`k_proj`/`v_proj` and
`gate_proj`/`up_proj` keys. :func:`split_loras` turns a fused module's LoRA into one LoRA per piece
(exact: A is shared or per slice, B's rows are cut), and :func:`fuse_loras` puts pieces back into one
fused-module LoRA (the slice form, or the shared-A whole-module form when every piece has the same A).
:func:`load_adapter` does the latter by itself when given the model's fused layout.

Torch, safetensors and json only. Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lorafit.lora.files import write_bytes_atomic, write_json_atomic
from lorafit.lora.inject import inject
from lorafit.lora.layers import Embedding, Linear, MergedLinear, WrappedLinear
from lorafit.lora.state import LoraError, LoRALayer, lora_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# fused leaf name -> (piece leaf names, row sizes), e.g. {"qkv_proj": (["q_proj", "k_proj", "v_proj"], [96, 32, 32])}
FusedLayout = Mapping[str, tuple[Sequence[str], Sequence[int]]]

__all__ = [
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "base_reference",
    "AdapterFiles",
    "ModuleLora",
    "model_loras",
    "parse_adapter",
    "write_adapter",
    "apply_loras",
    "split_loras",
    "fuse_loras",
]


@dataclass
class ModuleLora:
    """One module's LoRA factors in lorafit's form.

    kind "linear": A (r, in), B (out, r). With `slices` ({"split_sizes", "enable_lora"}, a MergedLinear)
    `r` and `alpha` are per slice, A (k*r, in) and B (sum of enabled sizes, r) stack the k enabled slices.
    kind "embedding": A (r, num_embeddings), B (dim, r).
    """

    kind: str
    A: torch.Tensor
    B: torch.Tensor
    r: int
    alpha: float
    slices: dict | None = None

    def whole(self, use_rslora: bool) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """(A, B, r, alpha) of the equivalent whole-module LoRA (block B, rank k*r, same scale)."""
        if self.slices is None:
            return self.A, self.B, self.r, self.alpha
        sizes, enable = self.slices["split_sizes"], self.slices["enable_lora"]
        k = sum(enable)
        factor = math.sqrt(k) if use_rslora else k
        return self.A, _block_b(self.B, self.r, sizes, enable), self.r * k, self.alpha * factor


def base_reference(name: str | os.PathLike | None) -> str | None:
    """How an adapter records its base model: an existing local folder (or file) as its absolute,
    resolved path, so the adapter finds its base from any working directory; anything else (a hub id
    such as ``microsoft/Phi-3-mini-4k-instruct``) unchanged. A leading ``~`` is expanded."""
    if name is None:
        return None
    path = Path(os.path.expanduser(os.fspath(name)))
    return str(path.resolve()) if path.exists() else os.fspath(name)


def _scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / (math.sqrt(r) if use_rslora else r)


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file as bytes, the same bytes for the same tensors and metadata in every process.

    safetensors writes its header metadata in hash-map order, which changes from process to process;
    here the header is rewritten with the metadata keys sorted (tensor entries and data stay as
    safetensors lays them out: sorted by dtype and name).
    """
    raw = safetensors_bytes(dict(tensors), metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def _block_b(b: torch.Tensor, r: int, sizes: Sequence[int], enable: Sequence[bool]) -> torch.Tensor:
    """The (out, r*k) block-diagonal B equivalent to per-slice B factors stacked as (sum enabled, r)."""
    out = b.new_zeros(sum(sizes), r * sum(enable))
    row, src, j = 0, 0, 0
    for size, on in zip(sizes, enable):
        if on:
            out[row : row + size, j * r : (j + 1) * r] = b[src : src + size]
            src += size
            j += 1
        row += size
    return out


def _slices_from_block(b: torch.Tensor, spec: dict) -> torch.Tensor | None:
    """Undo `_block_b`: the stacked per-slice B, or None if B is not block-structured (then whole-module)."""
    r = spec["r"]
    parts, row, j = [], 0, 0
    mask = torch.ones_like(b, dtype=torch.bool)
    for size, on in zip(spec["split_sizes"], spec["enable_lora"]):
        if on:
            parts.append(b[row : row + size, j * r : (j + 1) * r])
            mask[row : row + size, j * r : (j + 1) * r] = False
            j += 1
        row += size
    if b.shape != (row, j * r) or bool((b[mask] != 0).any()):
        return None
    return torch.cat(parts, 0)


# ----------------------------------------------------------------------------- model -> files


def model_loras(model: nn.Module, values: Mapping[str, torch.Tensor] | None = None) -> dict[str, ModuleLora]:
    """The LoRA factors of every LoRA layer of `model` (detached CPU tensors), by module name.

    `values` (parameter name -> tensor) are taken instead of the layers' own factors where given: whole
    tensors gathered from a model whose parameters are sharded across processes.
    """
    values = values or {}
    out: dict[str, ModuleLora] = {}
    for name, layer in lora_modules(model).items():
        if layer.merged:
            raise LoraError(f"{name} is merged; unmerge the model before saving an adapter")
        a = values.get(_join(name, "lora_A"), layer.lora_A).detach().cpu().contiguous()
        b = values.get(_join(name, "lora_B"), layer.lora_B).detach().cpu().contiguous()
        if _slices(layer) is not None:
            out[name] = ModuleLora("linear", a, b, layer.r, layer.lora_alpha, _slices(layer))
        elif isinstance(layer, (Linear, WrappedLinear)):
            if layer.fan_in_fan_out:
                raise LoraError(f"{name}: fan_in_fan_out layers are not written in PEFT format")
            out[name] = ModuleLora("linear", a, b, layer.r, layer.lora_alpha)
        elif isinstance(layer, Embedding):
            out[name] = ModuleLora("embedding", a, b, layer.r, layer.lora_alpha)
        else:
            raise LoraError(
                f"{name}: convolution LoRA uses loralib's factorisation, which PEFT's format cannot hold; "
                "save it with torch.save(lora.lora_state_dict(model), path) instead"
            )
    return out


def _slices(layer: nn.Module) -> dict | None:
    """{"split_sizes", "enable_lora"} of a LoRA layer that adapts slices of a fused module, else None."""
    if isinstance(layer, MergedLinear) or getattr(layer, "enable_lora", None) is not None:
        return {"split_sizes": list(layer.split_sizes), "enable_lora": list(layer.enable_lora)}
    return None


def _base_shape(module: nn.Module | None) -> list[int] | None:
    """The (out, in) shape of a linear layer's weight (also when it is stored quantized and packed), the
    weight's shape otherwise; None when there is no module or weight."""
    if isinstance(module, LoRALayer):
        module = module._base_module()
    if module is None or getattr(module, "weight", None) is None:
        return None
    if isinstance(module, nn.Linear) and not getattr(module, "fan_in_fan_out", False):
        return [module.out_features, module.in_features]
    return list(module.weight.shape)


def write_adapter(
    out_dir: str | Path,
    loras: Mapping[str, ModuleLora],
    full: Mapping[str, torch.Tensor] | None = None,
    *,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
    base_shapes: Mapping[str, list[int]] | None = None,
    lora_dropout: float = 0.0,
    bias: str = "none",
    modules_to_save: list[str] | None = None,
    task_type: str = "CAUSAL_LM",
    revision: str | None = None,
    extra_metadata: dict | None = None,
) -> Path:
    """Write LoRA factors (+ full parameters, keyed by parameter name) as a PEFT adapter folder.

    `base_model_name_or_path` is recorded through :func:`base_reference`: a local folder as its
    absolute path, a hub id as the id.
    """
    if not loras:
        raise LoraError("there are no LoRA layers to save; call lora.inject(...) first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_model_name_or_path = base_reference(base_model_name_or_path)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for name, m in loras.items():
        a, b, r, alpha = m.whole(use_rslora)
        names = (
            ("lora_embedding_A", "lora_embedding_B")
            if m.kind == "embedding"
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PREFIX}{name}.{names[0]}"] = a.detach().cpu().contiguous()
        tensors[f"{PREFIX}{name}.{names[1]}"] = b.detach().cpu().contiguous()
        ranks[name] = (r, alpha)
    for key, t in (full or {}).items():
        tensors[PREFIX + key] = t.detach().cpu().contiguous()
    # The most common rank and alpha are the defaults; every other module gets a full-name pattern entry.
    r = Counter(v[0] for v in ranks.values()).most_common(1)[0][0]
    alpha = Counter(v[1] for v in ranks.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": lora_dropout,
        "bias": bias,
        "target_modules": sorted(loras),
        "modules_to_save": modules_to_save or None,
        "rank_pattern": {n: v[0] for n, v in ranks.items() if v[0] != r},
        "alpha_pattern": {n: v[1] for n, v in ranks.items() if v[1] != alpha},
        "use_rslora": use_rslora,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    meta = {
        "format": "lorafit-adapter-1",
        "base_model": base_model_name_or_path,
        "base_shapes": dict(base_shapes or {}),
        "slices": {n: {**m.slices, "r": m.r, "lora_alpha": m.alpha} for n, m in loras.items() if m.slices},
        **(extra_metadata or {}),
    }
    data = _safetensors_bytes(tensors, {"format": "pt", "lorafit": json.dumps(meta, sort_keys=True)})
    write_bytes_atomic(out / WEIGHTS_NAME, data)
    write_json_atomic(out / CONFIG_NAME, config)
    return out


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    lora_dropout: float = 0.0,
    bias: str = "none",
    modules_to_save: list[str] | None = None,
    task_type: str = "CAUSAL_LM",
    revision: str | None = None,
    extra_metadata: dict | None = None,
    values: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's LoRA layers (+ the parameters of `modules_to_save`) as a PEFT adapter folder.

    With `bias="all"` or `"lora_only"` the trainable biases are written too, under their own names
    (`base_model.model.<module>.bias`), so the trained biases are not lost. `values` (parameter name ->
    tensor) replace the model's own parameters where given, e.g. whole tensors gathered from shards.
    """
    values = values or {}
    loras = model_loras(model, values)
    named = dict(model.named_modules())
    full = {}
    if bias != "none":
        for pname, p in model.named_parameters():
            if p.requires_grad and pname.rsplit(".", 1)[-1] == "bias" and "lora_" not in pname:
                full[pname] = values.get(pname, p)
    for mod_name in modules_to_save or []:
        for pname, p in named[mod_name].named_parameters():
            if "lora_" not in pname:  # LoRA factors inside a fully trained module are saved as LoRA
                key = f"{mod_name}.{pname}"
                full[key] = values.get(key, p)
    use_rslora = any(getattr(layer, "use_rslora", False) for layer in lora_modules(model).values())
    shapes = {n: _base_shape(named[n]) for n in loras}
    return write_adapter(
        out_dir, loras, full, use_rslora=use_rslora, base_model_name_or_path=base_model_name_or_path,
        base_shapes=shapes, lora_dropout=lora_dropout, bias=bias, modules_to_save=modules_to_save,
        task_type=task_type, revision=revision, extra_metadata=extra_metadata,
    )  # fmt: skip


# ----------------------------------------------------------------------------- files -> factors


class AdapterFiles:
    """An adapter folder read into memory: PEFT config, tensors and lorafit's metadata (if any)."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], meta: dict, path: Path):
        self.config, self.tensors, self.meta, self.path = config, tensors, meta, path

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))


def read_adapter(path: str | Path) -> AdapterFiles:
    """Read and sanity-check an adapter folder; every problem is a LoraError naming the file and fix.

    Only safetensors are read: a pickled `adapter_model.bin` is never loaded.
    """
    path = Path(path).expanduser()
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise LoraError(f"{path}: no such adapter folder. Fix: pass the folder holding {CONFIG_NAME}.")
    if not w_path.is_file():
        other = " (a pickled adapter_model.bin is never loaded; re-save it with PEFT's safetensors)" if (
            path / "adapter_model.bin").exists() else ""  # fmt: skip
        raise LoraError(f"{path}: missing {WEIGHTS_NAME}{other}")
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise LoraError(  # noqa: B904
            f"{cfg_path}: missing. Fix: an adapter folder needs {CONFIG_NAME} beside the weights."
        )
    except json.JSONDecodeError as e:
        raise LoraError(
            f"{cfg_path}: not valid JSON ({e}). Fix: restore the file from the run's output."
        ) from e
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(
            f"{cfg_path}: peft_type is {config.get('peft_type')!r}; lorafit reads LoRA adapters only"
        )
    for flag, what in (
        ("use_dora", "DoRA"),
        ("lora_bias", "LoRA bias"),
        ("fan_in_fan_out", "fan_in_fan_out"),
    ):
        if config.get(flag):
            raise LoraError(f"{cfg_path}: {flag} is true; lorafit cannot load {what} adapters")
    try:
        with safe_open(str(w_path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraError(
            f"{w_path}: corrupt or truncated safetensors file ({e}). "
            "Fix: copy the adapter again, or use an earlier checkpoint-<step>/ folder."
        ) from e
    try:
        meta = json.loads(raw_meta.get("lorafit", "{}"))
    except json.JSONDecodeError:
        meta = {}
    return AdapterFiles(config, tensors, meta, path)


def _pattern_value(patterns: Mapping, name: str, default):
    """PEFT 0.21's rule (`get_pattern_key`): the first key, in file order, with
    `re.match(rf"(.*\\.)?({key})$", name)` applies."""
    for key, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", name) is not None
        except re.error:
            hit = name == key or name.endswith("." + key)
        if hit:
            return value
    return default


_SUFFIXES = {
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}


def parse_adapter(files: AdapterFiles) -> tuple[dict[str, ModuleLora], dict[str, torch.Tensor], list[str]]:
    """(LoRA factors by module name, full parameters by parameter name, problems) of an adapter."""
    cfg = files.config
    groups: dict[str, dict] = {}
    full: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, t in files.tensors.items():
        if not key.startswith(PREFIX):
            problems.append(f"unexpected key {key} (PEFT keys start with {PREFIX!r})")
            continue
        # Old PEFT files keep the adapter name ("lora_A.default.weight"); PEFT saves a targeted
        # embedding's own weight as "<name>.base_layer.weight".
        body = (
            key[len(PREFIX) :].replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        )
        for suf, (which, kind) in _SUFFIXES.items():
            if body.endswith(suf):
                groups.setdefault(body[: -len(suf)], {"kind": kind})[which] = t
                break
        else:
            full[body.replace(".base_layer.", ".")] = t
    r0, a0 = int(cfg.get("r", 8)), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    slices_meta = files.meta.get("slices", {})
    loras: dict[str, ModuleLora] = {}
    for name, g in groups.items():
        if "A" not in g or "B" not in g:
            have, miss = ("A", "B") if "A" in g else ("B", "A")
            problems.append(f"missing key: {name} has lora_{have} but no lora_{miss}")
            continue
        a, b = g["A"], g["B"]
        r = int(_pattern_value(rank_pattern, name, r0))
        alpha = _pattern_value(alpha_pattern, name, a0)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            problems.append(
                f"wrong shape for {name}: {CONFIG_NAME} gives rank {r}, but lora_A is {tuple(a.shape)} "
                f"and lora_B is {tuple(b.shape)} (expected ({r}, in) and (out, {r}))"
            )
            continue
        spec = slices_meta.get(name)
        stacked = _slices_from_block(b, spec) if spec and g["kind"] == "linear" else None
        if stacked is not None:
            slices = {"split_sizes": list(spec["split_sizes"]), "enable_lora": list(spec["enable_lora"])}
            loras[name] = ModuleLora("linear", a, stacked, int(spec["r"]), spec["lora_alpha"], slices)
        else:
            loras[name] = ModuleLora(g["kind"], a, b, r, alpha)
    return loras, full, problems


# ----------------------------------------------------------------------------- fused <-> split


def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


def split_loras(loras: Mapping[str, ModuleLora], layout: FusedLayout) -> dict[str, ModuleLora]:
    """One LoRA per piece for every fused module in `layout` (exact: A copied or cut per slice, B's
    rows cut; a slice LoRA yields only its enabled pieces). Other modules are passed through."""
    out: dict[str, ModuleLora] = {}
    for name, m in loras.items():
        parent, _, leaf = name.rpartition(".")
        if leaf not in layout or m.kind != "linear":
            out[name] = m
            continue
        pieces, sizes = list(layout[leaf][0]), [int(s) for s in layout[leaf][1]]
        if m.slices is None:
            if m.B.shape[0] != sum(sizes):
                raise LoraError(
                    f"{name}: lora_B has {m.B.shape[0]} rows, but {leaf} splits into {dict(zip(pieces, sizes))} "
                    f"({sum(sizes)} rows). Fix: pass the base model the adapter was trained on."
                )
            for piece, rows in zip(pieces, m.B.split(sizes)):
                out[_join(parent, piece)] = ModuleLora("linear", m.A.clone(), rows.clone(), m.r, m.alpha)
            continue
        if list(m.slices["split_sizes"]) != sizes:
            raise LoraError(
                f"{name}: the adapter's slices {m.slices['split_sizes']} are not {leaf}'s pieces "
                f"{dict(zip(pieces, sizes))}. Fix: pass the base model the adapter was trained on."
            )
        row, j = 0, 0
        for piece, size, on in zip(pieces, sizes, m.slices["enable_lora"]):
            if on:
                a = m.A[j * m.r : (j + 1) * m.r].clone()
                out[_join(parent, piece)] = ModuleLora(
                    "linear", a, m.B[row : row + size].clone(), m.r, m.alpha
                )
                row += size
                j += 1
    return out


def _fuse(parts: dict[int, ModuleLora], sizes: list[int], use_rslora: bool) -> ModuleLora:
    ms = [parts[i] for i in sorted(parts)]
    first = ms[0]
    if len(ms) == len(sizes) and all(
        m.r == first.r and m.alpha == first.alpha and torch.equal(m.A, first.A) for m in ms
    ):  # a whole-module LoRA that was split: shared A, stacked B
        return ModuleLora("linear", first.A, torch.cat([m.B for m in ms]), first.r, first.alpha)
    # Slice form. Unequal ranks are padded with zero rows of A / columns of B (exact); the scale is that
    # of a highest-rank piece (the one whose scale most pieces share), and a piece with another scale has
    # its B rescaled (the only rounding).
    scales = Counter(_scale(m.alpha, m.r, use_rslora) for m in ms)
    top = [m for m in ms if m.r == max(m.r for m in ms)]
    ref = max(top, key=lambda m: scales[_scale(m.alpha, m.r, use_rslora)])
    r, scale = ref.r, _scale(ref.alpha, ref.r, use_rslora)
    a_parts, b_parts = [], []
    for m in ms:
        a, b = m.A, m.B
        if m.r < r:
            a = torch.cat([a, a.new_zeros(r - m.r, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], r - m.r)], 1)
        s = _scale(m.alpha, m.r, use_rslora)
        if s != scale:
            b = (b.float() * (s / scale)).to(b.dtype)
        a_parts.append(a)
        b_parts.append(b)
    slices = {"split_sizes": list(sizes), "enable_lora": [i in parts for i in range(len(sizes))]}
    return ModuleLora("linear", torch.cat(a_parts), torch.cat(b_parts), r, ref.alpha, slices)


def fuse_loras(
    loras: Mapping[str, ModuleLora],
    layout: FusedLayout,
    *,
    use_rslora: bool = False,
    want: Callable[[str, str], bool] | None = None,
) -> tuple[dict[str, ModuleLora], list[str]]:
    """Put per-piece LoRAs (`...q_proj`, `...v_proj`) back into one LoRA of their fused module.

    Exact: pieces with a shared A become the whole-module LoRA (A, stacked B), otherwise the slice form
    (stacked A, stacked B, rank = the pieces' rank each, i.e. a block-diagonal B of rank k*r; lower
    ranks are zero-padded). Only pieces whose alpha/r differs from the others get B rescaled (rounded).
    `want(fused_name, piece_name)` picks which pieces to fuse (default all). Returns (loras, problems).
    """
    piece_of = {p: (fused, i) for fused, (pieces, _) in layout.items() for i, p in enumerate(pieces)}
    out: dict[str, ModuleLora] = {}
    groups: dict[str, dict[int, ModuleLora]] = {}
    problems: list[str] = []
    for name, m in loras.items():
        parent, _, leaf = name.rpartition(".")
        hit = piece_of.get(leaf)
        fused_name = _join(parent, hit[0]) if hit else ""
        if hit is None or m.kind != "linear" or m.slices is not None or (want and not want(fused_name, name)):
            out[name] = m
            continue
        groups.setdefault(fused_name, {})[hit[1]] = m
    for fused_name, parts in groups.items():
        pieces, sizes = layout[fused_name.rpartition(".")[2]]
        sizes = [int(s) for s in sizes]
        bad = [
            f"{pieces[i]} has lora_B {tuple(m.B.shape)}, lora_A {tuple(m.A.shape)}"
            for i, m in parts.items()
            if m.B.shape[0] != sizes[i] or m.A.shape[1] != next(iter(parts.values())).A.shape[1]
        ]
        if fused_name in out:
            problems.append(f"{fused_name}: the adapter has a LoRA for it and for its pieces {sorted(parts)}")
        elif bad:
            problems.append(
                f"wrong shape for the pieces of {fused_name} (rows {dict(zip(pieces, sizes))}): "
                + "; ".join(bad)
            )
        else:
            out[fused_name] = _fuse(parts, sizes, use_rslora)
    return out, problems


# ----------------------------------------------------------------------------- factors -> model


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


def apply_loras(
    model: nn.Module,
    loras: Mapping[str, ModuleLora],
    full: Mapping[str, torch.Tensor] | None = None,
    *,
    use_rslora: bool = False,
    trainable: bool = False,
    dtype: torch.dtype | None = None,
    fused: FusedLayout | None = None,
    problems: Sequence[str] = (),
    source: str | Path = "adapter",
    base_model: str | None = None,
    base_shapes: Mapping[str, Sequence[int]] | None = None,
    lora_dropout: float = 0.0,
) -> list[str]:
    """Put LoRA factors onto `model`, injecting LoRA layers where needed; returns the adapted names.

    Everything is checked before the model is touched: a base model with other weight shapes than
    `base_shapes` is refused, then every missing, unexpected and wrong-shape key is reported at once in
    one LoraError. Pieces of fused modules (`fused`) whose own modules the model lacks are fused first.
    """
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
    if fused:
        loras, more_problems = fuse_loras(
            loras, fused, use_rslora=use_rslora, want=lambda f, piece: piece not in named and f in named
        )
        problems += more_problems
    existing = lora_modules(model)
    for name, m in sorted(loras.items()):
        mod = named.get(name)
        if mod is None:
            hint = (
                " (pieces of a fused module? convert with `lorafit export --layout fused --base-model M`)"
                if name.rpartition(".")[0] in named else ""
            )  # fmt: skip
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
    fused: FusedLayout | None = None,
    lora_dropout: float = 0.0,
) -> list[str]:
    """Put the adapter at `path` onto `model` (injecting LoRA layers as needed); returns adapted names.

    Strict: a different base model is refused, and every missing, unexpected and wrong-shape key is
    reported at once in one LoraError, before the model is changed. `dtype` is the LoRA weight dtype
    (default fp32), `lora_dropout` the dropout of the LoRA layers it injects (for training further).
    LoRA parameters train only if `trainable`. Split-layout adapters (`q_proj`, ...)
    load onto fused modules given `fused` (lorafit's own split exports record it in their metadata).
    """
    files = read_adapter(path)
    loras, full, problems = parse_adapter(files)
    layout = {k: (v["pieces"], v["split_sizes"]) for k, v in files.meta.get("fused", {}).items()}
    layout.update(fused or {})
    return apply_loras(
        model, loras, full, use_rslora=files.use_rslora, trainable=trainable, dtype=dtype, fused=layout,
        problems=problems, source=files.path, base_model=files.base_model, base_shapes=files.meta.get("base_shapes"),
        lora_dropout=lora_dropout,
    )  # fmt: skip
