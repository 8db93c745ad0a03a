"""Reading an adapter for the pipeline: every layout lorafit writes or reads, in one place.

    load_any_adapter(model, path)      a PEFT folder (stacked or split keys), a loralib .pt file, or the
                                       folder `lorafit export --layout loralib` writes
    recorded_base(path)                the base model the adapter records (adapter_base: or an error)
    adapter_quantization(path)         the quantization a QLoRA adapter was trained with
    recorded_system_message(path)      the data.system_message policy it was trained with ("auto" if none)
    read_loralib / write_loralib       loralib `lora_state_dict` files + lorafit's JSON beside them
    continue_lora(model, peft, path)   an adapter onto the model to train further (--adapter)

PEFT folders are read by the library (lorafit.lora), which is told the model's stacked layout
(lorafit.model.stacked_layout). Every LoraError becomes an AdapterError (`adapter_error`), with the
library's advice said as lorafit commands.
"""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lorafit import lora
from lorafit.config import PeftConfig
from lorafit.errors import AdapterError, ConfigError
from lorafit.gguf_files import BASE_GGUF_KEY, check_same_base
from lorafit.lora.apply import PIECES_FIX, apply_loras
from lorafit.lora.files import write_json_atomic
from lorafit.lora.peft_format import CORRUPT_FIX, WEIGHTS_NAME, ModuleLora, base_reference
from lorafit.model import stacked_layout, stacked_pieces, train_only_lora
from lorafit.precision import lora_dtype
from lorafit.templates import SYSTEM_MESSAGE

LORALIB_NAME = "adapter_lora.pt"
LORALIB_FORMAT = "lorafit-loralib-1"

# The library's advice (in library terms) -> the same advice for a lorafit user.
_CLI_FIXES = {
    CORRUPT_FIX: "Fix: copy the adapter again, or use an earlier checkpoint-<step>/ folder.",
    PIECES_FIX: "convert with `lorafit export --layout stacked --base-model M`",
}


def adapter_error(e: lora.LoraError) -> AdapterError:
    """The AdapterError the CLI prints for a LoraError from reading or applying an adapter."""
    text = str(e)
    for library, cli in _CLI_FIXES.items():
        text = text.replace(library, cli)
    return AdapterError(text)


# ----------------------------------------------------------------------------- which adapter, which base


def loralib_file(path: str | Path) -> Path | None:
    """The loralib checkpoint an adapter path stands for: the .pt file itself, or the `adapter_lora.pt`
    in a folder written by `lorafit export --layout loralib`; None for a PEFT adapter folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and not (path / WEIGHTS_NAME).exists() and (path / LORALIB_NAME).is_file():
        return path / LORALIB_NAME
    return None


def recorded_base(adapter: str | Path) -> str | None:
    """The base model an adapter records (PEFT folder: adapter_config.json; loralib: the JSON beside the .pt)."""
    pt = loralib_file(adapter)
    try:
        return loralib_sidecar(pt).get("base_model") if pt else lora.read_adapter(adapter).base_model
    except lora.LoraError as e:
        raise adapter_error(e) from e


def adapter_base(adapter: str | Path) -> str:
    """The base model an adapter (any layout lorafit reads) records; an AdapterError if it records none."""
    base = recorded_base(adapter)
    if not base:
        raise AdapterError(f"{adapter}: the adapter records no base model. Fix: pass --model BASE")
    return base


def adapter_quantization(src: Path) -> dict:
    """The quantization a lorafit adapter was trained with ({} when none or not recorded)."""
    if loralib_file(src) is not None:
        return {}
    try:
        return dict(lora.read_adapter(src).meta.get("quantization") or {})
    except lora.LoraError:
        return {}


def recorded_system_message(adapter: str | Path) -> str:
    """The `data.system_message` policy (auto | fold | drop | error) the adapter was trained with, from
    the "system_message" entry of its lorafit metadata (the safetensors header of a PEFT folder, the
    JSON beside a loralib file), so generate and chat treat a system prompt as training did. "auto"
    (the default policy) when the adapter records none: PEFT's own adapters, exports, older adapters."""
    path = Path(adapter).expanduser()
    pt = loralib_file(path)
    try:
        meta = loralib_sidecar(pt) if pt else lora.read_adapter(path).meta
    except (lora.LoraError, AdapterError):
        return "auto"
    policy = meta.get("system_message")
    return policy if policy in SYSTEM_MESSAGE else "auto"


# ----------------------------------------------------------------------------- loralib checkpoints


def loralib_sidecar(pt: Path) -> dict:
    """What lorafit recorded beside a loralib file (`adapter_lora.json`: base, ranks, alphas, slices); {} if none."""
    side = pt.with_suffix(".json")
    try:
        info = json.loads(side.read_text()) if side.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{side}: unreadable ({e}). Fix: delete it and pass --lora-alpha.") from e
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise AdapterError(
            f"{side}: unreadable ({type(e).__name__}). Fix: delete it and pass --lora-alpha."
        ) from e
    return info if isinstance(info, dict) and info.get("format") == LORALIB_FORMAT else {}


def _guess_slices(name, a, b, r, mod, layout, target_modules) -> tuple[dict | None, str | None]:
    """(slices, problem) for loralib factors on a plain Linear: whole module or which pieces of a stacked module."""
    if a.shape[0] == r and b.shape[0] == mod.out_features:
        return None, None
    leaf = name.rpartition(".")[2]
    if leaf not in layout or a.shape[0] % r:
        return None, f"wrong shape for {name}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} on {mod}"
    pieces, sizes = layout[leaf]
    k = a.shape[0] // r
    if target_modules and any(p in target_modules for p in pieces):
        options = [tuple(i for i, p in enumerate(pieces) if p in target_modules)]
    else:
        options = list(itertools.combinations(range(len(pieces)), k))
    options = [o for o in options if len(o) == k and sum(sizes[i] for i in o) == b.shape[0]]
    if len(options) != 1:
        what = " or ".join("+".join(pieces[i] for i in o) for o in options) or "no combination of pieces"
        return (
            None,
            f"{name}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} fit {what}; pass --target-modules",
        )
    return {"split_sizes": list(sizes), "enable_lora": [i in options[0] for i in range(len(pieces))]}, None


def read_loralib(
    path: str | Path, model: nn.Module, *, lora_alpha: float | None = None, target_modules=None
) -> tuple[dict[str, ModuleLora], dict[str, torch.Tensor], list[str], dict]:
    """A `lora_state_dict` checkpoint as (loras, full params, problems, sidecar info).

    Read with `torch.load(weights_only=True)` only. loralib files hold no rank, alpha or slices: r is
    read off lora_B, the slices of a stacked module off the factor shapes and the model's stacked layout
    (`target_modules` disambiguates), and alpha comes from the `adapter_lora.json` written beside
    lorafit's exports, or from `lora_alpha`.
    """
    path = Path(path).expanduser()
    if path.suffix == ".bin":
        raise AdapterError(
            f"{path}: pickled .bin files are never loaded. Fix: use a safetensors adapter folder."
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or would need unpickling arbitrary objects
        raise AdapterError(
            f"{path}: not a readable loralib checkpoint ({type(e).__name__}: {e}). "
            "Fix: pass a file written by torch.save(lora.lora_state_dict(model), path), or an adapter folder."
        ) from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise AdapterError(f"{path}: not a lora_state_dict (a dict of tensors by parameter name)")
    info = loralib_sidecar(path)
    named, layout = dict(model.named_modules()), stacked_layout(model)
    groups: dict[str, dict] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        stem, _, which = key.rpartition(".")
        if which in ("lora_A", "lora_B"):
            groups.setdefault(stem, {})[which[-1]] = t
        else:
            full[key] = t
    loras, problems = {}, []
    for name, g in sorted(groups.items()):
        spec, mod = info.get("modules", {}).get(name), named.get(name)
        if "A" not in g or "B" not in g:
            problems.append(f"missing key: {name} has only lora_{'A' if 'A' in g else 'B'}")
            continue
        a, b = g["A"], g["B"]
        if spec:
            slices = {k: spec[k] for k in ("split_sizes", "enable_lora")} if "split_sizes" in spec else None
            loras[name] = ModuleLora(spec["kind"], a, b, spec["r"], spec["lora_alpha"], slices)
            continue
        if lora_alpha is None:
            raise AdapterError(
                f"{path}: a loralib checkpoint does not record lora_alpha. "
                "Fix: pass --lora-alpha with the value used in training (loralib's default is 1)."
            )
        r = b.shape[1]
        if isinstance(mod, lora.MergedLinear):
            slices = {"split_sizes": list(mod.split_sizes), "enable_lora": list(mod.enable_lora)}
            loras[name] = ModuleLora("linear", a, b, r, lora_alpha, slices)
        elif isinstance(mod, nn.Embedding):
            loras[name] = ModuleLora("embedding", a, b, a.shape[0], lora_alpha)
        elif isinstance(mod, nn.Linear):
            slices, problem = _guess_slices(name, a, b, r, mod, layout, target_modules)
            if problem:
                problems.append(problem)
            else:
                loras[name] = ModuleLora("linear", a, b, r, lora_alpha, slices)
        else:
            what = "no module" if mod is None else f"a {type(mod).__name__}"
            problems.append(f"unexpected key {name}.lora_A/B: the model has {what} named {name!r}")
    return loras, full, problems, info


def write_loralib(
    out_dir: Path, loras: dict, full: dict, *, use_rslora: bool, base_model, base_shapes
) -> Path:
    """OUT/adapter_lora.pt (`lora_state_dict` keys) + OUT/adapter_lora.json (rank, alpha, slices)."""
    sd = {f"{n}.lora_{w}": t.contiguous() for n, m in loras.items() for w, t in (("A", m.A), ("B", m.B))}
    sd.update({k: t.contiguous() for k, t in full.items()})
    buf = (
        io.BytesIO()
    )  # written by a plain write: a full disk is OSError ENOSPC, not torch's "unexpected pos"
    torch.save(sd, buf)
    (out_dir / LORALIB_NAME).write_bytes(buf.getbuffer())
    modules = {
        n: {"kind": m.kind, "r": m.r, "lora_alpha": m.alpha, **(m.slices or {})} for n, m in loras.items()
    }
    info = {"format": LORALIB_FORMAT, "base_model": base_reference(base_model), "use_rslora": use_rslora,
            "base_shapes": base_shapes or {}, "modules": modules}  # fmt: skip
    write_json_atomic((out_dir / LORALIB_NAME).with_suffix(".json"), info, sort_keys=False)
    return out_dir / LORALIB_NAME


# ----------------------------------------------------------------------------- loading


def load_any_adapter(
    model: nn.Module, adapter: str | Path, *, trainable: bool = False, dtype=None, lora_alpha=None,
    target_modules=None, lora_dropout: float = 0.0,
) -> list[str]:  # fmt: skip
    """Load an adapter of any layout onto `model`: a PEFT folder (stacked or split keys), a loralib file, or
    the folder `lorafit export --layout loralib` writes (its adapter_lora.json gives alpha, ranks and base;
    a bare loralib file needs `lora_alpha`). `lora_dropout` is the dropout of the injected layers."""
    path = Path(adapter).expanduser()
    try:
        pt = loralib_file(path)
        if pt is None:
            check_same_base(model, lora.read_adapter(path).meta.get(BASE_GGUF_KEY), path)
            return lora.load_adapter(model, path, trainable=trainable, dtype=dtype, stacked=stacked_layout(model),
                                     lora_dropout=lora_dropout)  # fmt: skip
        loras, full, problems, info = read_loralib(
            pt, model, lora_alpha=lora_alpha, target_modules=target_modules
        )
        return apply_loras(
            model, loras, full, use_rslora=bool(info.get("use_rslora")), trainable=trainable, dtype=dtype,
            problems=problems, source=pt, base_model=info.get("base_model"), base_shapes=info.get("base_shapes"),
            lora_dropout=lora_dropout,
        )  # fmt: skip
    except lora.LoraError as e:
        raise adapter_error(e) from e


# ----------------------------------------------------------------------------- training further


def _adapter_targets(model, layers: dict) -> list[str]:
    """The target_modules that describe LoRA layers: leaf names, and piece names (q_proj, ...) for slices."""
    pieces = stacked_pieces()
    out = set()
    for name, layer in layers.items():
        leaf = name.rpartition(".")[2]
        enable = getattr(layer, "enable_lora", None)
        if enable is not None and len(pieces.get(leaf, [])) == len(enable):
            out |= {p for p, on in zip(pieces[leaf], enable) if on}
        else:
            out.add(leaf)
    return sorted(out)


def continue_lora(model, peft: PeftConfig, adapter: str) -> list[str]:
    """Put the adapter at `adapter` onto the model to train it further; freeze everything else.

    `adapter` is any layout lorafit reads (a PEFT or lorafit folder, stacked or split keys, slice adapters,
    a loralib export). The LoRA shape is the adapter's: its ranks and alphas (rank_pattern/alpha_pattern
    included), rsLoRA, and which modules and slices it adapts. peft_config's r, lora_alpha, use_rslora,
    target_modules and exclude_modules describe a new adapter: left at their defaults they are not
    used; set to anything else they must agree with the adapter (target_modules as the leaf names it
    adapts, e.g. [q_proj, v_proj, o_proj]), else this is a ConfigError (exclude_modules is always one).
    init_lora_weights is not used. lora_dropout, bias, modules_to_save and lora_dtype apply as for a new
    adapter. Afterwards `peft` holds the adapter's r, lora_alpha (the most common ones), use_rslora and
    target_modules, so the saved config.yaml describes what trains. Returns the adapted module names.
    """
    try:
        names = load_any_adapter(
            model, adapter, trainable=True, dtype=lora_dtype(peft.lora_dtype), lora_dropout=peft.lora_dropout
        )
    except AdapterError as e:
        raise AdapterError(f"model.adapter (--adapter) {adapter}: {e}") from e
    layers = {n: layer for n, layer in lora.lora_modules(model).items() if n in names}
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.lora_alpha for layer in layers.values()).most_common(1)[0][0]
    rslora = any(getattr(layer, "use_rslora", False) for layer in layers.values())
    targets = _adapter_targets(model, layers)
    default = PeftConfig()
    wrong = []
    if peft.r != default.r and peft.r != r:
        wrong.append(f"peft_config.r is {peft.r}, the adapter's rank is {r}")
    if peft.lora_alpha != default.lora_alpha and peft.lora_alpha != alpha:
        wrong.append(f"peft_config.lora_alpha is {peft.lora_alpha}, the adapter's is {alpha}")
    if peft.use_rslora != default.use_rslora and peft.use_rslora != rslora:
        wrong.append(f"peft_config.use_rslora is {peft.use_rslora}, the adapter's is {rslora}")
    given = peft.target_modules
    if given != default.target_modules and not (
        isinstance(given, list) and sorted({t.rpartition(".")[2] for t in given}) == targets
    ):
        wrong.append(f"peft_config.target_modules is {given!r}, the adapter adapts {targets}")
    if peft.exclude_modules != default.exclude_modules:
        wrong.append("peft_config.exclude_modules is set, but the adapter decides which modules are adapted")
    if wrong:
        raise ConfigError(
            f"model.adapter {adapter}: the adapter fixes the LoRA shape, and the config disagrees: "
            + "; ".join(wrong)
            + ". Fix: remove these peft_config keys (they are taken from the adapter), or train a new adapter "
            "without --adapter."
        )
    peft.r, peft.lora_alpha, peft.use_rslora, peft.target_modules = r, alpha, rslora, targets
    train_only_lora(model, peft)
    return names
