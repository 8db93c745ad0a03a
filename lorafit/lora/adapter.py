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
keeps the scale (alpha*2 for alpha/r, alpha*sqrt(2) with rsLoRA). What was done is recorded in the
safetensors header metadata (`lorafit` key; PEFT ignores it), so lorafit reads its slices back.
The adapter config holds only PEFT's own keys, so PEFT loads it without warnings.

Torch, safetensors and json only. Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorafit.lora.inject import inject
from lorafit.lora.layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, MergedLinear
from lorafit.lora.state import LoraError, LoRALayer, lora_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

__all__ = ["save_adapter", "load_adapter", "read_adapter", "adapter_tensors", "AdapterFiles"]


def _replace_atomic(write, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _block_b(layer: MergedLinear) -> torch.Tensor:
    """The (out, r*k) block-diagonal B equivalent to a MergedLinear's per-slice B factors."""
    r = layer.r
    k = sum(layer.enable_lora)
    out = torch.zeros(layer.out_features, r * k, dtype=layer.lora_B.dtype)
    row, src, j = 0, 0, 0
    for size, on in zip(layer.split_sizes, layer.enable_lora):
        if on:
            out[row : row + size, j * r : (j + 1) * r] = layer.lora_B.detach()[src : src + size].cpu()
            src += size
            j += 1
        row += size
    return out


def adapter_tensors(model: nn.Module, extra_modules: list[str] | None = None) -> tuple[dict, dict]:
    """PEFT-keyed tensors of the model's LoRA layers (+ fully trained modules) and per-module facts.

    Returns (tensors, modules) where modules maps module name -> {"kind", "r", "alpha", "slices"?}.
    """
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for name, layer in lora_modules(model).items():
        if layer.merged:
            raise LoraError(f"{name} is merged; unmerge the model before saving an adapter")
        key = PREFIX + name
        if isinstance(layer, MergedLinear):
            k = sum(layer.enable_lora)
            tensors[f"{key}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
            tensors[f"{key}.lora_B.weight"] = _block_b(layer).contiguous()
            factor = math.sqrt(k) if layer.use_rslora else k
            modules[name] = {
                "kind": "linear", "r": layer.r * k, "alpha": layer.lora_alpha * factor,
                "slices": {"split_sizes": layer.split_sizes, "enable_lora": layer.enable_lora, "r": layer.r,
                           "lora_alpha": layer.lora_alpha},
            }  # fmt: skip
        elif isinstance(layer, Linear):
            if layer.fan_in_fan_out:
                raise LoraError(f"{name}: fan_in_fan_out layers are not written in PEFT format")
            tensors[f"{key}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
            tensors[f"{key}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
            modules[name] = {"kind": "linear", "r": layer.r, "alpha": layer.lora_alpha}
        elif isinstance(layer, Embedding):
            tensors[f"{key}.lora_embedding_A"] = layer.lora_A.detach().cpu().contiguous()
            tensors[f"{key}.lora_embedding_B"] = layer.lora_B.detach().cpu().contiguous()
            modules[name] = {"kind": "embedding", "r": layer.r, "alpha": layer.lora_alpha}
        elif isinstance(layer, Conv1d | Conv2d | Conv3d):
            raise LoraError(
                f"{name}: convolution LoRA uses loralib's factorisation, which PEFT's format cannot hold; "
                "save it with torch.save(lora.lora_state_dict(model), path) instead"
            )
    for mod_name in extra_modules or []:
        mod = dict(model.named_modules())[mod_name]
        for pname, p in mod.named_parameters():
            tensors[f"{PREFIX}{mod_name}.{pname}"] = p.detach().cpu().contiguous()
    return tensors, modules


def _base_shapes(model: nn.Module, names) -> dict[str, list[int]]:
    mods = lora_modules(model)
    shapes = {}
    for n in names:
        w = mods[n]._base_weight() if hasattr(mods[n], "_base_weight") else mods[n].weight
        shapes[n] = list(w.shape)
    return shapes


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
) -> Path:
    """Write the model's LoRA layers as a PEFT adapter folder; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, modules = adapter_tensors(model, modules_to_save)
    if not modules:
        raise LoraError("the model has no LoRA layers to save; call lora.inject(...) first")
    ranks = {m["r"] for m in modules.values()}
    alphas = {m["alpha"] for m in modules.values()}
    plain = [m for m in modules.values() if "slices" not in m]
    r = plain[0]["r"] if plain else min(ranks)
    alpha = plain[0]["alpha"] if plain else min(alphas)
    rank_pattern = {n: m["r"] for n, m in modules.items() if m["r"] != r}
    alpha_pattern = {n: m["alpha"] for n, m in modules.items() if m["alpha"] != alpha}
    # PEFT matches list targets by exact name or ".name" suffix; full module names are always exact.
    use_rslora = any(getattr(layer, "use_rslora", False) for layer in lora_modules(model).values())
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": lora_dropout,
        "bias": bias,
        "target_modules": sorted(modules),
        "modules_to_save": modules_to_save or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
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
        "base_shapes": _base_shapes(model, modules),
        "slices": {n: m["slices"] for n, m in modules.items() if "slices" in m},
        **(extra_metadata or {}),
    }
    _replace_atomic(lambda p: save_file(tensors, str(p), metadata={"format": "pt", "lorafit": json.dumps(meta)}),
                    out / WEIGHTS_NAME)  # fmt: skip
    _replace_atomic(
        lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"), out / CONFIG_NAME
    )
    return out


class AdapterFiles:
    """An adapter folder read into memory: PEFT config, tensors and lorafit's metadata (if any)."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], meta: dict, path: Path):
        self.config, self.tensors, self.meta, self.path = config, tensors, meta, path

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def read_adapter(path: str | Path) -> AdapterFiles:
    """Read and sanity-check an adapter folder; every problem is a LoraError naming the file and fix."""
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


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: a pattern key applies when the module name ends with it (as a dotted suffix)."""
    for key in sorted(patterns, key=len, reverse=True):
        if name == key or name.endswith("." + key):
            return patterns[key]
    return default


def _group_keys(
    files: AdapterFiles,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], list]:
    """Split adapter tensors into per-module LoRA factors and full parameters; collect bad keys."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    unexpected = []
    suffixes = {
        ".lora_A.weight": "A",
        ".lora_B.weight": "B",
        ".lora_embedding_A": "A",
        ".lora_embedding_B": "B",
    }
    for key, t in files.tensors.items():
        if not key.startswith(PREFIX):
            unexpected.append(key)
            continue
        body = key[len(PREFIX) :]
        # PEFT may keep an adapter name ("lora_A.default.weight") in files saved by old versions.
        body = body.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        for suf, which in suffixes.items():
            if body.endswith(suf):
                lora.setdefault(body[: -len(suf)], {})[which] = t
                lora[body[: -len(suf)]]["kind"] = "embedding" if "embedding" in suf else "linear"
                break
        else:
            full[body] = t
    return lora, full, unexpected


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
    if b.shape[1] != j * r or bool((b[mask] != 0).any()):
        return None
    return torch.cat(parts, 0)


def load_adapter(model: nn.Module, path: str | Path, *, trainable: bool = False, dtype=None) -> list[str]:
    """Put the adapter at `path` onto `model` (injecting LoRA layers as needed); returns adapted names.

    Strict: every missing, unexpected and wrong-shape key is reported at once in one LoraError.
    `dtype` is the LoRA weight dtype (default fp32). LoRA parameters train only if `trainable`.
    """
    files = read_adapter(path)
    cfg = files.config
    lora_groups, full, unexpected = _group_keys(files)
    slices_meta = files.meta.get("slices", {})
    named = dict(model.named_modules())
    problems: list[str] = [f"unexpected key {k} (not a LoRA factor of this model)" for k in unexpected]
    existing = lora_modules(model)
    r0, a0 = int(cfg.get("r", 8)), cfg.get("lora_alpha", 8)
    for name, parts in sorted(lora_groups.items()):
        if name not in named:
            problems.append(f"unexpected key {PREFIX}{name}.lora_A/B: the model has no module {name!r}")
            continue
        if "A" not in parts or "B" not in parts:
            problems.append(f"missing key: {name} has only lora_{'A' if 'A' in parts else 'B'}")
            continue
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, name, r0))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, a0)
        a, b = parts["A"], parts["B"]
        spec = slices_meta.get(name)
        b_sliced = _slices_from_block(b, spec) if spec else None
        if name not in existing:
            kw = dict(use_rslora=bool(cfg.get("use_rslora")), lora_dtype=dtype or torch.float32)
            try:
                if b_sliced is not None:
                    inject(model, [name], r=spec["r"], lora_alpha=spec["lora_alpha"],
                           slices={name: (spec["split_sizes"], spec["enable_lora"])}, **kw)  # fmt: skip
                else:
                    inject(model, [name], r=r, lora_alpha=alpha, **kw)
            except LoraError as e:
                problems.append(f"{name}: {e}")
                continue
            existing = lora_modules(model)
        layer = existing[name]
        if isinstance(layer, MergedLinear) and b_sliced is not None:
            b = b_sliced
        if tuple(layer.lora_A.shape) != tuple(a.shape) or tuple(layer.lora_B.shape) != tuple(b.shape):
            problems.append(
                f"wrong shape for {name}: adapter has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; "
                f"the model's layer needs {tuple(layer.lora_A.shape)}, {tuple(layer.lora_B.shape)}"
            )
            continue
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    for name in lora_modules(model):
        if name not in lora_groups:
            problems.append(f"missing key: the model's LoRA layer {name} has no weights in the adapter")
    params = dict(model.named_parameters())
    for key, t in full.items():
        if key not in params:
            problems.append(f"unexpected key {PREFIX}{key}: the model has no parameter {key!r}")
        elif tuple(params[key].shape) != tuple(t.shape):
            problems.append(
                f"wrong shape for {key}: adapter {tuple(t.shape)}, model {tuple(params[key].shape)}"
            )
        else:
            with torch.no_grad():
                params[key].copy_(t)
    if problems:
        base = files.base_model or "an unrecorded base model"
        mine = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        head = (
            f"adapter {files.path} (trained on {base}) does not fit this model ({mine}): "
            f"{len(problems)} problem(s):"
        )
        listing = "\n".join(f"  - {p}" for p in problems[:30])
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise LoraError(
            f"{head}\n{listing}{more}\nFix: load it onto the base model it was trained on ({base})."
        )
    for layer in lora_modules(model).values():
        for p in (layer.lora_A, layer.lora_B):
            p.requires_grad_(trainable)
    return sorted(lora_groups)


def is_lora_layer(m: nn.Module) -> bool:
    return isinstance(m, LoRALayer)
