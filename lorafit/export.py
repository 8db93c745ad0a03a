"""Use an adapter elsewhere: fuse it into a plain Hugging Face model folder, or convert its layout.

    fuse(base, adapter, out)                         a merged model folder (no LoRA, no lorafit needed)
    export_adapter(adapter, out, layout="split")     q_proj/k_proj/v_proj/gate_proj/up_proj keys
    export_adapter(adapter, out, layout="stacked")   qkv_proj/gate_up_proj keys (PEFT on Phi-3)
    export_adapter(adapter, out, layout="loralib")   OUT/adapter_lora.pt with lora_state_dict keys
    export_adapter("ckpt_lora.pt", out, base_model=M)  a loralib checkpoint -> PEFT adapter folder

"fuse" is mlx-lm's word for writing the merged model (`mlx_lm.fuse`); the merging itself is the library's
`lora.merge_and_unload` (PEFT's name). All conversions are exact: factors are copied or cut, never
recomputed. Merging adds the fp32 delta (`delta_weight()`) to each base weight and rounds once into the
base dtype. Outputs are written to a
temporary folder and renamed into place.

No input is ever replaced: an output folder that is (or holds) the adapter or the base model is
refused under any flag, and `--overwrite` replaces only a previous output of the same command --
for an export, a folder holding nothing but adapter files (EXPORT_FILES), so never a model folder
(config.json + weights) or a training run; for fuse, a model folder, never one holding an adapter
or a training run (`_check_output`). transformers is imported inside the functions. Reading
adapters of every layout (and the loralib file format) is lorafit/adapters.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorafit import lora, quant
from lorafit.adapters import (
    adapter_error,
    adapter_quantization,
    load_any_adapter,
    loralib_file,
    loralib_sidecar,
    read_loralib,
    recorded_base,
    write_loralib,
)
from lorafit.checkpoint import CHECKPOINT_RE, atomic_dir
from lorafit.config import ModelConfig
from lorafit.errors import AdapterError
from lorafit.gguf_export import write_adapter_gguf, write_model_gguf
from lorafit.gguf_files import fingerprint, gguf_file, hf_source
from lorafit.lora.factors import split_loras, stack_loras
from lorafit.lora.peft_format import STACKED_LAYOUT_KEY, parse_adapter, write_adapter
from lorafit.model import load_model, stacked_layout, stacked_pieces
from lorafit.precision import DTYPES, parse_dtype

LAYOUTS = ("stacked", "split", "loralib", "gguf")
GGUF_ADAPTER = "adapter.gguf"
GGUF_MODEL = "model.gguf"
# What a training run recorded in its adapter's lorafit metadata that a converted adapter keeps: the
# quantization the base was trained with (fuse quantizes again from it) and the system-message policy.
CARRIED_METADATA = ("quantization", "system_message", "base_gguf")
# Older names of layouts, still accepted: "fused" was lorafit's word for "stacked" before fuse meant
# writing a merged model.
LAYOUT_ALIASES = {"fused": "stacked"}


# ----------------------------------------------------------------------------- layouts


def _meta_model(base: str, trust_remote_code: bool = False) -> nn.Module:
    """The base model's architecture on the 'meta' device (module types and shapes, no weights)."""
    from transformers import AutoModelForCausalLM

    cfg = _base_config(base, trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)


def _base_config(base: str, trust_remote_code: bool = False):
    """The transformers config of the base model (a folder, hub id or .gguf file)."""
    from transformers import AutoConfig

    source, gguf_kwargs = hf_source(base)
    try:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **gguf_kwargs)
    except (OSError, ValueError) as e:
        raise AdapterError(
            f"cannot read the config of base model {base!r}: {e}\n"
            "Fix: pass --base-model with a local model folder (or a reachable hub id)."
        ) from e
    return cfg


def _layout_for(loras: dict, recorded: dict, base: str | None, split: bool, trust_remote_code=False) -> dict:
    """The stacked layout a conversion needs: recorded in the adapter, from its slices, or from the base
    (only loaded when a stacked module must be split, or pieces stacked, without a recorded layout)."""
    pieces = stacked_pieces()
    layout = {k: (v["pieces"], v["split_sizes"]) for k, v in recorded.items()}
    for name, m in loras.items():
        leaf = name.rpartition(".")[2]
        if (
            m.slices
            and leaf in pieces
            and leaf not in layout
            and len(m.slices["split_sizes"]) == len(pieces[leaf])
        ):
            layout[leaf] = (pieces[leaf], m.slices["split_sizes"])
    covered = set(layout) | {p for f in layout for p in layout[f][0]}
    known = set(pieces) if split else {p for ps in pieces.values() for p in ps}
    need = sorted({n.rpartition(".")[2] for n in loras} & known - covered)
    if need:
        if not base:
            raise AdapterError(
                f"converting {need} needs the row sizes of the stacked modules; pass --base-model M"
            )
        layout = {**stacked_layout(_meta_model(base, trust_remote_code)), **layout}
    return layout


# What `export_adapter` writes, and so all an output folder it may replace with --overwrite may hold
# (README.md: the card a user or the hub adds next to an adapter). Anything else in the folder (a
# config.json and model weights, a training run's results.json or checkpoints, data) means it is not
# a previous export, and it is refused, --overwrite or not.
EXPORT_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "adapter_lora.pt", "adapter_lora.json",
                          "adapter.gguf", "README.md"})  # fmt: skip
# What marks a folder as an input of some lorafit command (an adapter, a training run): never a `fuse` output.
NOT_FUSED = ("adapter_config.json", "adapter_model.safetensors", "adapter_lora.pt", "results.json", "trainer_state.json",
             ".lorafit.lock")  # fmt: skip


def _check_output(out: Path, overwrite: bool, sources: list[Path], kind: str) -> None:
    """Refuse an output folder that would replace an input or something that is not this command's output.

    Never replaced, under any flag: an input (`sources`: the adapter, the base model) or a folder
    holding one, a file, a link. With --overwrite, `kind` "export" replaces only a folder holding
    nothing but EXPORT_FILES (a previous export: never a model folder, never a training run); `kind`
    "fuse" replaces a model folder, but never one holding an adapter or a training run (NOT_FUSED).
    """
    if out.is_symlink():
        raise AdapterError(
            f"--output-dir {out} is a symbolic link; lorafit replaces no folder through a link. "
            "Fix: pass the real folder, or choose another --output-dir"
        )
    if not out.exists():
        return
    for src in sources:
        if not src.exists():
            continue
        s, o = src.resolve(), out.resolve()
        if s == o or o in s.parents:
            raise AdapterError(
                f"--output-dir {out} holds the input {src}; lorafit never replaces an input, even with "
                "--overwrite. Fix: choose another output folder"
            )
    if out.is_file():
        raise AdapterError(f"{out} is a file. Fix: choose another --output-dir")
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    if not overwrite:
        raise AdapterError(f"{out} already exists. Fix: choose another --output-dir, or pass --overwrite")
    if kind == "export":
        other = sorted(n for n in names if n not in EXPORT_FILES or (out / n).is_dir())
        what = "an adapter export"
    else:
        other = sorted(n for n in names if n in NOT_FUSED or CHECKPOINT_RE.match(n))
        what = "a merged model"
    if other:
        raise AdapterError(
            f"{out} is not {what} written by lorafit (it holds {', '.join(other[:4])}); --overwrite replaces "
            f"only a previous output of the same command, never a model, an adapter or a training run. "
            "Fix: choose another --output-dir"
        )


def export_adapter(
    adapter: str | Path,
    output_dir: str | Path,
    layout: str = "stacked",
    base_model: str | None = None,
    *,
    lora_alpha: float | None = None,
    target_modules: list[str] | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    gguf_type: str = "f32",
) -> Path:
    """Convert an adapter folder or loralib checkpoint to `layout` in `output_dir`; returns the folder.

    "stacked": PEFT keys on the model's own modules (qkv_proj, gate_up_proj); "split": one LoRA per
    q/k/v/gate/up piece, for runtimes that load Phi-3 as Llama; "loralib": OUT/adapter_lora.pt;
    "gguf": OUT/adapter.gguf, a llama.cpp LoRA adapter in `gguf_type` (lorafit.gguf_export).
    "fused" is accepted for "stacked" (its name before). A loralib source needs `base_model` (module
    types and shapes), unless lorafit wrote it.
    """
    layout = LAYOUT_ALIASES.get(layout, layout)
    if layout not in LAYOUTS:
        raise AdapterError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    src, out = Path(adapter).expanduser(), Path(output_dir).expanduser()
    _check_output(out, overwrite, [src] + ([Path(base_model).expanduser()] if base_model else []), "export")
    src = loralib_file(src) or src
    cfg: dict = {}
    try:
        if src.is_file():
            base = base_model or loralib_sidecar(src).get("base_model")
            if not base:
                raise AdapterError(f"{src}: converting a loralib checkpoint needs --base-model M")
            net = _meta_model(base, trust_remote_code)
            loras, full, problems, info = read_loralib(
                src, net, lora_alpha=lora_alpha, target_modules=target_modules
            )
            use_rslora, recorded, carried = bool(info.get("use_rslora")), {}, {}
            named = dict(net.named_modules())
            shapes = {n: list(named[n].weight.shape) for n in loras if n in named}
        else:
            files = lora.read_adapter(src)
            loras, full, problems = parse_adapter(files)
            use_rslora, base, cfg = files.use_rslora, base_model or files.base_model, files.config
            recorded, shapes = files.meta.get(STACKED_LAYOUT_KEY, {}), files.meta.get("base_shapes")
            carried = {k: files.meta[k] for k in CARRIED_METADATA if k in files.meta}
        if problems:
            raise AdapterError(f"{src}: cannot convert:\n" + "\n".join(f"  - {p}" for p in problems))
        fl = _layout_for(loras, recorded, base, layout == "split", trust_remote_code)
        extra = dict(carried)
        if layout == "split":
            try:
                loras = split_loras(loras, fl)
            except lora.LoraError as e:
                raise lora.LoraError(f"{src}: {e}") from None
            extra[STACKED_LAYOUT_KEY] = {
                k: {"pieces": list(p), "split_sizes": list(s)} for k, (p, s) in fl.items()
            }
        else:
            loras, problems = stack_loras(loras, fl, use_rslora=use_rslora)
            if problems:
                raise AdapterError(f"{src}: cannot stack:\n" + "\n".join(f"  - {p}" for p in problems))
        if layout == "gguf":
            if not base:
                raise AdapterError(f"{src}: the adapter records no base model. Fix: pass --base-model M")
            config = _base_config(base, trust_remote_code)
            with atomic_dir(out) as tmp:
                write_adapter_gguf(tmp / GGUF_ADAPTER, loras, full, config, use_rslora=use_rslora, kind=gguf_type,
                                   name=f"lorafit adapter {src.name}")  # fmt: skip
            return out
        keep = {
            k: cfg[k]
            for k in ("lora_dropout", "bias", "modules_to_save", "task_type", "revision")
            if cfg.get(k)
        }
        with atomic_dir(out) as tmp:
            if layout == "loralib":
                write_loralib(tmp, loras, full, use_rslora=use_rslora, base_model=base, base_shapes=shapes)
            else:
                write_adapter(tmp, loras, full, use_rslora=use_rslora, base_model_name_or_path=base,
                              base_shapes=shapes, extra_metadata=extra, **keep)  # fmt: skip
    except lora.LoraError as e:
        raise adapter_error(e) from e
    return out


# ----------------------------------------------------------------------------- fusing


BASE_WEIGHTS = ("dequantized", "original")
FORMATS = ("hf", "gguf")
ERROR_REPORT = "quantization_error.json"


def fuse(
    model: str | None,
    adapter: str | Path,
    output_dir: str | Path,
    dtype: str = "auto",
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    double_quant: bool | None = None,
    base_weights: str = "dequantized",
    lora_alpha: float | None = None,
    target_modules: list[str] | None = None,
    format: str = "hf",
    gguf_type: str = "f16",
) -> Path:
    """Write base + adapter as one plain Hugging Face model folder (safetensors, config, tokenizer with
    its chat template, generation_config) that `AutoModelForCausalLM.from_pretrained` loads without
    lorafit. `dtype` "auto" keeps the base checkpoint's dtype. `model=None`: the adapter's recorded base.
    `adapter` may be any layout `load_any_adapter` reads (`lora_alpha`, `target_modules`: for a bare
    loralib checkpoint).

    An adapter trained on a quantized base (QLoRA; `quantization` nf4/fp4/int8, by default what the
    adapter records) is merged, by default (`base_weights="dequantized"`), into the base as it was
    trained on: quantized as in training (`_load_as_trained`), dequantized in fp32, LoRA added in fp32, written in bf16
    ("auto"). `base_weights="original"` merges into the unquantized checkpoint weights instead. Either
    way OUT/quantization_error.json gives the relative error of each dequantized base weight against
    the original (lorafit.quant.error_report): by that much the export differs from the original
    base + adapter ("dequantized"), or from the model that was trained ("original").

    `format="gguf"` writes OUT/model.gguf instead, a complete llama.cpp model in `gguf_type` (f32, f16,
    bf16, q8_0) merged in fp32 the same way, with the tokenizer of the base GGUF file (or of the base
    folder): lorafit.gguf_export.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if format not in FORMATS:
        raise AdapterError(f"format must be one of {FORMATS}, got {format!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise AdapterError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    if base_weights not in BASE_WEIGHTS:
        raise AdapterError(f"base_weights must be one of {BASE_WEIGHTS}, got {base_weights!r}")
    src, out = Path(adapter).expanduser(), Path(output_dir).expanduser()
    recorded = recorded_base(src)  # a broken adapter fails before the base model is loaded
    if model is None:
        model = recorded
        if not model:
            raise AdapterError(f"{src}: the adapter records no base model. Fix: pass --model BASE")
    _check_output(out, overwrite, [src, Path(model).expanduser()], "fuse")
    trained = adapter_quantization(src)
    method = quantization or trained.get("method") or "none"
    if double_quant is None:
        double_quant = bool(trained.get("double_quant", True))
    try:
        if method != "none" and base_weights == "dequantized":
            # what training recorded applies when merging with the method it trained with
            net = _load_as_trained(model, method, double_quant, trained if method == trained.get("method") else {},
                                   trust_remote_code)  # fmt: skip
        else:  # "original": the unquantized weights, merged in fp32, written in bf16
            load_dtype = (
                torch.float32 if method != "none" else "auto" if dtype == "auto" else parse_dtype(dtype)
            )
            source, gguf_kwargs = hf_source(model)  # a .gguf base: dequantized as training read it
            net = AutoModelForCausalLM.from_pretrained(
                source, trust_remote_code=trust_remote_code, dtype=load_dtype, **gguf_kwargs
            )
            if gguf_kwargs:
                net.lorafit_base_gguf = fingerprint(gguf_file(model))
        source, gguf_kwargs = hf_source(model)
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **gguf_kwargs)
    except (OSError, ValueError) as e:
        raise AdapterError(
            f"cannot load base model {model!r}: {e}\nFix: pass --model with a model folder"
        ) from e
    load_any_adapter(net, src, lora_alpha=lora_alpha, target_modules=target_modules)
    report = None
    if method != "none":
        report = _quantization_error(net, model, method, double_quant, base_weights)
        quant.dequantize(net)  # quantized layers -> nn.Linear in fp32 (nothing to do for "original")
    try:
        lora.merge_and_unload(net)
    except lora.LoraError as e:
        raise adapter_error(e) from e
    leftover = [k for k in net.state_dict() if "lora_" in k]
    if leftover:  # pragma: no cover - merge_and_unload replaces every LoRA layer
        raise AdapterError(f"merge left LoRA weights behind: {leftover[:3]}")
    if method != "none":
        net.to(torch.bfloat16 if dtype == "auto" else parse_dtype(dtype))
    net.config.use_cache = True
    if format == "gguf":
        with atomic_dir(out) as tmp:
            base_gguf = gguf_file(model)
            write_model_gguf(tmp / GGUF_MODEL, net, kind=gguf_type, tokenizer_gguf=base_gguf,
                             tokenizer_dir=None if base_gguf else Path(model), name=f"{Path(model).stem} + {src.name}")  # fmt: skip
            if report is not None:
                report["base_weights"] = base_weights
                (tmp / ERROR_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        return out
    with atomic_dir(out) as tmp:
        net.save_pretrained(tmp, max_shard_size="5GB")  # shards the size Phi-3's own repository uses
        tok.save_pretrained(tmp)
        if report is not None:
            report["base_weights"] = base_weights
            (tmp / ERROR_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return out


def _load_as_trained(model: str, method: str, double_quant: bool, trained: dict, trust_remote_code: bool):
    """The base quantized on the CPU exactly as training quantized it: through lorafit.model.load_model (the
    loader training uses), from the dtype the adapter records the weights were quantized from (an fp32
    checkpoint quantized from fp32 and from its bf16 rounding gives other 4-bit codes), with its double
    quant and compute dtype. An adapter that records none of this (trained before lorafit recorded it)
    gets what `model.dtype: auto` loads on this CPU. A blocksize other than the recorded one is an error."""
    cfg = ModelConfig(
        name_or_path=str(model), dtype=trained.get("dtype", "auto"), device="cpu", quantization=method,
        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=trained.get("compute_dtype", "auto"),
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    net = load_model(cfg, device=torch.device("cpu"), training=False)
    want, got = trained.get("blocksize"), quant.quantized_with(net).get("blocksize")
    if want is not None and got is not None and want != got:
        raise AdapterError(
            f"the adapter's base was quantized in blocks of {want} weights, and bitsandbytes here quantizes in "
            f"blocks of {got}: merging would not reproduce the trained model. Fix: merge where bitsandbytes "
            "uses the blocksize of training (the same bitsandbytes version and device type), or pass "
            "--base-weights original"
        )
    return net


def _quantization_error(
    net: nn.Module, model: str, method: str, double_quant: bool, base_weights: str
) -> dict:
    """The per-layer quantization error report: loaded quantized layers against the checkpoint, or (for
    base_weights="original") each linear weight but the output head quantized and dequantized again."""
    if base_weights == "dequantized":
        pairs = quant.dequantized_pairs(net, model)
    else:
        head = net.get_output_embeddings()
        linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear) and m is not head]
        pairs = (
            (n, m.weight, quant.roundtrip(m.weight, method, double_quant=double_quant)) for n, m in linears
        )
    return quant.error_report(pairs, method=method, double_quant=double_quant)
