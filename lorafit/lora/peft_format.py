"""Adapter folders in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

This is the interchange format transformers, PEFT, vLLM and TGI read. Keys follow PEFT:

    base_model.model.<module path>.lora_A.weight        (r, in)     Linear / MergedLinear
    base_model.model.<module path>.lora_B.weight        (out, r)
    base_model.model.<module path>.lora_embedding_A     (r, num_embeddings)   Embedding
    base_model.model.<module path>.lora_embedding_B     (dim, r)
    base_model.model.<module path>.<param>              fully trained modules (modules_to_save)

A slice adapter (a `MergedLinear` adapting, say, q and v of a stacked qkv_proj at rank r) is written
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

    model_loras(model) -> {name: ModuleLora} -> write_adapter(out, loras)    save_adapter does both
    read_adapter(path) -> AdapterFiles -> parse_adapter(files) -> ({name: ModuleLora}, full, problems)

Converting between stacked and split layouts is :mod:`lorafit.lora.factors`; putting factors onto a
model is :mod:`lorafit.lora.apply`. Torch, safetensors and json only. Files are written to a
temporary name and renamed into place (:mod:`lorafit.lora.files`); the same tensors give the same
bytes in every process.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lorafit.lora.files import not_regular, write_bytes_atomic, write_json_atomic
from lorafit.lora.layers import Embedding, Linear, MergedLinear, WrappedLinear
from lorafit.lora.state import LoraError, LoRALayer, lora_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# The fix a corrupt weights file names (a caller that keeps older copies can add where they are).
CORRUPT_FIX = "Fix: copy the adapter again."
# The fix a non-finite adapter names: the weights are unusable (training diverged, or the file was damaged).
NONFINITE_FIX = (
    "The adapter cannot be used. Fix: use an earlier checkpoint, or train again (with a lower learning rate "
    "if the loss diverged)."
)
# The metadata key (in the `lorafit` JSON of the safetensors header) of the stacked layout a split
# adapter was cut from, {stacked leaf: {"pieces", "split_sizes"}}. Still "fused", the word lorafit used
# before it said "stacked": older lorafit reads only this key, and files it wrote must keep loading.
STACKED_LAYOUT_KEY = "fused"

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PREFIX",
    "CORRUPT_FIX",
    "NONFINITE_FIX",
    "STACKED_LAYOUT_KEY",
    "ModuleLora",
    "base_reference",
    "model_loras",
    "write_adapter",
    "save_adapter",
    "AdapterFiles",
    "read_adapter",
    "check_config",
    "parse_adapter",
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


def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


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
    """{"split_sizes", "enable_lora"} of a LoRA layer that adapts slices of a stacked module, else None."""
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
    for f in (cfg_path, w_path):
        if problem := not_regular(f):
            raise LoraError(f"{f}: {problem}. Fix: copy the adapter folder again.")
    if not w_path.is_file():
        other = " (a pickled adapter_model.bin is never loaded; re-save it with PEFT's safetensors)" if (
            path / "adapter_model.bin").exists() else ""  # fmt: skip
        raise LoraError(
            f"{path}: missing {WEIGHTS_NAME}{other}. Fix: copy the whole adapter folder again, or pass the folder "
            f"that holds {WEIGHTS_NAME} and {CONFIG_NAME}."
        )
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
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise LoraError(
            f"{cfg_path}: not a readable JSON file ({type(e).__name__}). Fix: restore the file from the run's output."
        ) from None
    check_config(config, cfg_path)
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
        raise LoraError(f"{w_path}: corrupt or truncated safetensors file ({e}). {CORRUPT_FIX}") from e
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LoraError(f"{w_path}: tensor {key} holds NaN or infinite values. {NONFINITE_FIX}")
    try:
        meta = json.loads(raw_meta.get("lorafit", "{}"))
    except (json.JSONDecodeError, RecursionError):
        meta = {}
    return AdapterFiles(config, tensors, meta if isinstance(meta, dict) else {}, path)


def _kind(value) -> str:
    """The JSON name of `value`'s type, for messages."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config(config, cfg_path: Path) -> None:
    """Refuse an adapter config lorafit cannot read safely: a LoraError naming the file, the key and what
    was expected. Checked: the top level is an object; `r` and the `rank_pattern` values are positive
    integers; `lora_alpha` and the `alpha_pattern` values are finite numbers (NaN or Infinity, which
    Python's json accepts, are refused); the two patterns are objects."""
    fix = f"Fix: correct {CONFIG_NAME} (or restore it from the run's output)."
    if not isinstance(config, dict):
        raise LoraError(f"{cfg_path}: the top level is a {_kind(config)}, not a JSON object. {fix}")
    checks = (("r", _is_rank, "a positive integer"), ("lora_alpha", _is_finite, "a finite number"))
    for key, ok, want in checks:
        if key in config and not ok(config[key]):
            raise LoraError(f"{cfg_path}: {key} is {_preview(config[key])}; expected {want}. {fix}")
    for key, ok, want in (
        ("rank_pattern", _is_rank, "a positive integer"),
        ("alpha_pattern", _is_finite, "a finite number"),
    ):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise LoraError(
                f"{cfg_path}: {key} is a {_kind(patterns)}; expected an object {{module name: value}}. {fix}"
            )
        for name, value in patterns.items():
            if not ok(value):
                raise LoraError(
                    f"{cfg_path}: {key}[{_preview(name)}] is {_preview(value)}; expected {want}. {fix}"
                )


def _preview(value, limit: int = 60) -> str:
    """A bounded repr of a config value for a message."""
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else f"a {_kind(value)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _good_slices(spec) -> bool:
    """Whether the slices metadata of one module is what `write_adapter` records."""
    if not isinstance(spec, dict) or not _is_rank(spec.get("r")) or not _is_finite(spec.get("lora_alpha")):
        return False
    sizes, enable = spec.get("split_sizes"), spec.get("enable_lora")
    return (
        isinstance(sizes, list)
        and isinstance(enable, list)
        and len(sizes) == len(enable)
        and all(_is_rank(n) for n in sizes)
        and all(isinstance(e, bool) for e in enable)
    )


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
        spec = slices_meta.get(name) if isinstance(slices_meta, dict) else None
        if spec is not None and not _good_slices(spec):
            problems.append(
                f"malformed lorafit metadata (slices) for {name} in {WEIGHTS_NAME}; {CORRUPT_FIX}"
            )
            continue
        stacked = _slices_from_block(b, spec) if spec and g["kind"] == "linear" else None
        if stacked is not None:
            slices = {"split_sizes": list(spec["split_sizes"]), "enable_lora": list(spec["enable_lora"])}
            loras[name] = ModuleLora("linear", a, stacked, int(spec["r"]), spec["lora_alpha"], slices)
        else:
            loras[name] = ModuleLora(g["kind"], a, b, r, alpha)
    return loras, full, problems
