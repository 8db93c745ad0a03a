"""Loading the base model and tokenizer, and putting LoRA on it. The one file that knows Phi-3.

What is Phi-3-specific lives here and nowhere else:

- Phi-3 stacks q, k and v into one `self_attn.qkv_proj` (rows `[Q | K | V]`, each of
  `heads * head_dim` / `kv_heads * head_dim`) and gate and up into one `mlp.gate_up_proj`
  (rows `[gate | up]`); vLLM calls these stacked parameters. `target_modules` may name the stacked
  modules (PEFT semantics: one LoRA over the whole output), or the split names
  `q_proj k_proj v_proj gate_proj up_proj`, which adapt only those slices of the stacked module
  (loralib `MergedLinear` semantics). PEFT cannot express the latter: on Phi-3, `["q_proj", "v_proj"]`
  silently matches nothing in PEFT. `stacked_layout(model)` (from `STACKED_SLICES` and the config's
  sizes) is the one description of these pieces that adapters.py and export.py use to split and stack
  adapters.
- The end of an assistant turn is `<|end|>`; generation stops at `<|end|>` or `<|endoftext|>`.

Everything else is any Hugging Face causal LM through the Auto classes.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from lorafit import lora, quant
from lorafit.attention import use_packed_attention
from lorafit.config import ModelConfig, PeftConfig
from lorafit.errors import ConfigError, DataError, LorafitError
from lorafit.gguf_files import describe, fingerprint, gguf_file, hf_source
from lorafit.lora.inject import target_names
from lorafit.precision import (
    bnb_compute_dtype,
    lora_dtype,
    weight_dtype,
)
from lorafit.templates import ChatTemplate

log = logging.getLogger("lorafit")

# End-of-turn markers of common chat templates, most specific first. The first one the tokenizer
# knows closes an assistant turn; it is the token the model must learn to emit to stop.
END_OF_TURN_CANDIDATES = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|eot|>")

# Split names that address a slice of a stacked Phi-3 projection: name -> (stacked module, slice index).
STACKED_SLICES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

# ----------------------------------------------------------------------------- devices


def device_missing(name: str) -> str | None:
    """Why the device `name` ("cpu", "cuda", "cuda:N", "mps") is not there on this machine, or None."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            return "this PyTorch was built without CUDA"
        count = torch.cuda.device_count()
        if count == 0:
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        if device.index is not None and device.index >= count:
            return f"there {'is 1 CUDA GPU' if count == 1 else f'are {count} CUDA GPUs'} (cuda:0..cuda:{count - 1})"
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_built():
            return "this PyTorch was built without MPS (Apple GPU) support"
        if not mps.is_available():
            return "MPS (Apple GPU) is not available on this machine"
    return None


def resolve_device(name: str = "auto", key: str = "model.device", where: str | None = None) -> torch.device:
    """`auto` is cuda if available, then mps, then cpu. A device that is not there (cuda without CUDA,
    cuda:3 with 2 GPUs, mps off a Mac) is a ConfigError naming `key` (and `where` it was set), before
    anything is loaded."""
    if name != "auto":
        missing = device_missing(name)
        if missing:
            place = f"{where}: " if where and where != "default" else ""
            raise ConfigError(
                f"{place}{key}: {name!r} is not available: {missing}. Fix: set {key} to 'auto' (uses cuda, "
                f"then mps, then cpu: whichever this machine has) or 'cpu'"
                + (f", e.g. --set {key}=auto" if key == "model.device" else "")
            )
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ----------------------------------------------------------------------------- tokenizer


def end_of_turn(tokenizer) -> str:
    """The token that closes an assistant turn, read from the tokenizer's own chat template: the
    special token the template writes right after an assistant reply (`<|end|>` for Phi-3,
    `<|im_end|>` for ChatML models, `<|eot_id|>` for Llama 3, `</s>` for Mistral, `<end_of_turn>`
    for Gemma). Without a template, or when the template writes none, a known end-of-turn token in
    the vocabulary, else the EOS token."""
    if getattr(tokenizer, "chat_template", None):
        with contextlib.suppress(DataError):
            found = ChatTemplate.probe(tokenizer).end_of_turn
            if found:
                return found
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_CANDIDATES:
        if tok in vocab:
            return tok
    return tokenizer.eos_token


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Ids that end generation: the end-of-turn token, EOS, and the model's generation_config EOS."""
    ids = {tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None and i >= 0)


def fix_pad_token(tokenizer) -> None:
    """Make sure the pad token is never a stop token.

    Phi-3 ships `pad_token = <|endoftext|>`, SmolLM2 `pad_token = <|im_end|>` (its end of turn). A pad
    that equals the end-of-turn or end-of-text token is dangerous: any code that masks labels by pad id
    would never train the model to stop, and it generates forever. lorafit builds labels by position,
    but `generate` and other tools still pad by id, so the pad becomes `<unk>` (as Microsoft's
    sample_finetune.py does) or else an unused token the vocabulary already has (a pad, reserved or
    placeholder token: Llama 3's `<|reserved_special_token_0|>`, Qwen2's padding entries); only as a
    last resort a new `<|pad|>` token is added (whose id may then lie past the model's embeddings).
    """
    stops = {tokenizer.eos_token, end_of_turn(tokenizer)}
    if tokenizer.pad_token is not None and tokenizer.pad_token not in stops:
        return
    vocab = tokenizer.get_vocab()
    for cand in (tokenizer.unk_token, "<|placeholder6|>", "<|finetune_right_pad_id|>", "<pad>"):
        if cand and cand in vocab and cand not in stops:
            tokenizer.pad_token = cand
            return
    added = sorted(tokenizer.get_added_vocab().items(), key=lambda kv: kv[1])
    for word in ("pad", "reserved", "placeholder"):
        for cand, _ in added:
            if word in cand.lower() and cand not in stops:
                tokenizer.pad_token = cand
                return
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    source, gguf_kwargs = hf_source(name_or_path)  # a .gguf file: its tokenizer and chat template
    try:
        tok = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, revision=revision, **gguf_kwargs
        )
    except (OSError, ValueError) as e:
        raise LorafitError(
            f"cannot load a tokenizer from {name_or_path!r}: {e}\n"
            "Fix: pass a local model directory (with tokenizer files) or a Hugging Face hub id; "
            "`lorafit tiny-model OUT` writes a small offline one."
        ) from e
    if not getattr(tok, "chat_template", None):
        raise LorafitError(
            f"the tokenizer of {name_or_path!r} has no chat template; lorafit renders conversations with the "
            "model's own template. Fix: use an instruct/chat model, or add a chat_template to its tokenizer_config."
        )
    fix_pad_token(tok)
    tok.padding_side = "right"
    return tok


# ----------------------------------------------------------------------------- model


def load_model_config(cfg: ModelConfig):
    """The base model's transformers config (config.json only, or a .gguf file's metadata: no weights)."""
    from transformers import AutoConfig

    source, gguf_kwargs = hf_source(cfg.name_or_path)
    try:
        return AutoConfig.from_pretrained(
            source, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, **gguf_kwargs
        )
    except (OSError, ValueError) as e:
        raise LorafitError(
            f"cannot load a model config from {cfg.name_or_path!r}: {e}\n"
            "Fix: pass a local model directory or a Hugging Face hub id (model.name_or_path / --model)."
        ) from e


def meta_model(cfg: ModelConfig, hf_config, dtype: torch.dtype):
    """The model of `hf_config` on the meta device (shapes and dtypes, no memory), as `load_model` builds
    it for training, attention implementation included: what `lorafit estimate` counts."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            hf_config,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    model.config.use_cache = False
    return model


def check_attention(attn: str, device: torch.device, training: bool) -> None:
    """Refuse an attention implementation the device cannot run (model.attn_implementation), before loading.

    flex_attention: PyTorch (2.13 included) has flex_attention's backward only on GPUs; on a CPU any
    call with inputs that need gradients raises "FlexAttention does not support backward on CPU",
    eager or compiled. Training is refused there rather than moved to sdpa behind the user's back (a
    run asked to measure flex would measure something else); its forward (eval, generation) runs.
    """
    if attn == "flash_attention_2" and device.type != "cuda":
        raise ConfigError(
            "model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa (the default)"
        )
    if attn == "flex_attention" and training and device.type != "cuda":
        raise ConfigError(
            f"model.attn_implementation: flex_attention trains only on a CUDA GPU: PyTorch has no flex_attention "
            f'backward on {device.type} ("FlexAttention does not support backward on CPU"). Fix: use sdpa (the '
            "default; it attends per packed conversation with the fused kernel and gives the same result), "
            "e.g. --set model.attn_implementation=sdpa"
        )


def load_model(
    cfg: ModelConfig,
    *,
    device: torch.device | None = None,
    training: bool = True,
    runs_on: torch.device | None = None,
):
    """Load a causal LM with transformers' Auto classes onto `device`.

    `runs_on`: the device it will compute on when that is not `device` (FSDP on GPUs loads on the CPU
    and moves each rank's shards to its GPU); what the attention needs is checked against it.
    use_cache is off while training (a KV cache is useless there and, with packed rows, it would
    switch off the block-diagonal attention mask). For training, sdpa becomes ``lorafit_sdpa`` and
    flex_attention ``lorafit_flex`` (`lorafit.attention`): packed rows attend per conversation,
    everything else is unchanged. trust_remote_code stays off unless asked. A `.gguf` file is read through
    transformers' GGUF support (lorafit.gguf_files): its weights are dequantized once, the log says from
    what, and the model remembers the file's fingerprint (`model.lorafit_base_gguf`) for the adapter to record.
    """
    from transformers import AutoModelForCausalLM

    device = device or resolve_device(cfg.device)
    runs_on = runs_on or device
    check_attention(cfg.attn_implementation, runs_on, training)
    source, gguf_kwargs = hf_source(cfg.name_or_path)
    if gguf_kwargs and cfg.quantization != "none":
        raise ConfigError(
            f"model.quantization: {cfg.quantization} quantizes a checkpoint with bitsandbytes; the GGUF file "
            f"{cfg.name_or_path} is read dequantized. Fix: set model.quantization to none for a GGUF base"
        )
    hf_config = load_model_config(cfg)
    # the dtypes are those of the device that computes: a bf16 base loaded on a CPU for FSDP on GPUs
    # stays bf16 (fp32 would double the host RAM of every rank, then the GPUs' share)
    dtype = weight_dtype(cfg.dtype, runs_on, getattr(hf_config, "dtype", None))
    attn = cfg.attn_implementation
    quantized = {}
    if cfg.quantization != "none":  # see lorafit/quant.py; lm_head and embeddings keep `dtype`
        compute = bnb_compute_dtype(cfg.bnb_4bit_compute_dtype, runs_on)
        quantized = {
            "quantization_config": quant.bnb_config(
                cfg.quantization, double_quant=cfg.bnb_4bit_use_double_quant, compute=compute
            ),
            "device_map": {"": device},  # quantized weights are placed on load, never moved after
        }
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            **quantized,
            **gguf_kwargs,
        )
    except (ImportError, ValueError) as e:  # flash-attn not installed, or not for this model/GPU
        if attn in ("sdpa", "eager") or "attention" not in str(e).lower():
            raise
        raise LorafitError(
            f"model.attn_implementation: {attn} cannot be used: {e}\n"
            "Fix: install its package (flash_attention_2: pip install flash-attn, for NVIDIA GPUs of compute "
            "capability 8.0 or newer), or use sdpa (the default), which needs no extra package."
        ) from e
    if gguf_kwargs:
        path = gguf_file(cfg.name_or_path)
        model.lorafit_base_gguf = fingerprint(path)
        log.info("base model %s", describe(path, model))
    model.config.use_cache = not training
    if training:
        use_packed_attention(
            model
        )  # sdpa/flex_attention -> lorafit_sdpa/lorafit_flex: per packed conversation
    if quantized:
        quant.keep_packed_layout(model)
        quant.release_checkpoint(model)
    else:
        model.to(device)
    return model


# ----------------------------------------------------------------------------- LoRA targets


@dataclass
class LoraPlan:
    """What to adapt: plain targets, and stacked modules whose slices are adapted separately."""

    target_modules: str | list[str]
    slices: dict[str, tuple[list[int], list[bool]]]


def stacked_split_sizes(model) -> dict[str, list[int]]:
    """Row sizes of the stacked projections this model has, from its config (GQA-aware)."""
    cfg = model.config
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    sizes: dict[str, list[int]] = {}
    if "qkv_proj" in names and hasattr(cfg, "num_attention_heads"):
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        sizes["qkv_proj"] = [cfg.num_attention_heads * head_dim, kv * head_dim, kv * head_dim]
    if "gate_up_proj" in names and hasattr(cfg, "intermediate_size"):
        sizes["gate_up_proj"] = [cfg.intermediate_size, cfg.intermediate_size]
    return sizes


def stacked_pieces() -> dict[str, list[str]]:
    """{stacked leaf: its piece leaves in row order}, STACKED_SLICES read the other way round:
    {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}."""
    out: dict[str, list[str]] = {}
    for piece, (stacked, _) in sorted(STACKED_SLICES.items(), key=lambda kv: kv[1][1]):
        out.setdefault(stacked, []).append(piece)
    return out


def stacked_layout(model) -> dict[str, tuple[list[str], list[int]]]:
    """{stacked leaf: (piece leaves, row sizes)} of the stacked projections this model has, e.g. Phi-3's
    {"qkv_proj": (["q_proj", "k_proj", "v_proj"], [3072, 1024, 1024]), ...}: the layout
    lorafit.lora's split_loras/stack_loras/load_adapter take."""
    pieces = stacked_pieces()
    return {f: (pieces[f], sizes) for f, sizes in stacked_split_sizes(model).items() if f in pieces}


def plan_lora(model, target_modules: str | list[str]) -> LoraPlan:
    """Translate split names (q_proj, v_proj, ...) into slices of stacked modules where needed.

    A model that really has a `q_proj` module keeps normal matching; only names that do not exist
    but address a slice of an existing stacked module are translated.
    """
    names = target_names(target_modules)
    if names is None:
        return LoraPlan(target_modules, {})
    target_modules = names
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    sizes = stacked_split_sizes(model)
    plain: list[str] = []
    enabled: dict[str, list[bool]] = {}
    for name in target_modules:
        stacked = STACKED_SLICES.get(name)
        if name in leaf_names or stacked is None or stacked[0] not in sizes:
            plain.append(name)
            continue
        stacked_name, idx = stacked
        if stacked_name in target_modules:
            raise ConfigError(
                f"peft_config.target_modules names both {stacked_name!r} and its slice {name!r}; "
                f"use {stacked_name!r} for one LoRA over the whole stacked module, or the slice names alone"
            )
        enabled.setdefault(stacked_name, [False] * len(sizes[stacked_name]))[idx] = True
    slices = {stacked_name: (sizes[stacked_name], flags) for stacked_name, flags in enabled.items()}
    return LoraPlan(plain, slices)


def apply_lora(model, peft: PeftConfig) -> list[str]:
    """Put LoRA layers on the model as `peft` asks; freeze everything else. Returns adapted names."""
    plan = plan_lora(model, peft.target_modules)
    # quantized linear layers get LoRA around them (lora.WrappedLinear), see lorafit/quant.py
    wrap = quant.quantized_types() if quant.is_quantized(model) else ()
    try:
        names = lora.inject(
            model,
            plan.target_modules if (plan.target_modules or not plan.slices) else [],
            r=peft.r,
            lora_alpha=peft.lora_alpha,
            lora_dropout=peft.lora_dropout,
            exclude_modules=peft.exclude_modules,
            slices=plan.slices or None,
            use_rslora=peft.use_rslora,
            init_lora_weights="gaussian" if peft.init_lora_weights == "gaussian" else "default",
            lora_dtype=lora_dtype(peft.lora_dtype),
            wrap=wrap,
        )
    except lora.LoraError as e:
        raise ConfigError(f"peft_config.target_modules: {e}") from e
    train_only_lora(model, peft)
    return names


def train_only_lora(model, peft: PeftConfig) -> None:
    """Train the LoRA factors, the biases `peft.bias` asks for and `peft.modules_to_save`; freeze the rest."""
    lora.mark_only_lora_as_trainable(model, bias=peft.bias)
    for name in peft.modules_to_save or []:
        module = find_module(model, name)
        for p in module.parameters():
            p.requires_grad_(True)


def hold_frozen_linears_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen fp32 weights (and biases) of linear layers in `dtype`; returns the bytes saved.

    Under ``dtype`` autocast every linear layer casts its fp32 weight to ``dtype`` on each call and
    keeps that copy for the backward pass, so an fp32 base costs 6 bytes per weight and a cast per
    step. The cast is the same rounding done once, so training computes bit for bit what it did:
    the LoRA weights, embeddings and norms (not autocast) stay as they are. Only for training under
    autocast: a linear layer held in bf16 refuses fp32 inputs outside it.
    """
    # a head tied to the input embedding stays: the embedding lookup is not autocast
    elsewhere = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(False)}
    saved = 0
    cast: set[int] = set()  # the parameters now held in `dtype`
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        for name in ("weight", "bias"):
            p = getattr(module, name, None)
            if (
                isinstance(p, nn.Parameter)
                and not p.requires_grad
                and p.dtype == torch.float32
                and id(p) not in elsewhere
            ):
                saved += p.numel() * (p.element_size() - torch.finfo(dtype).bits // 8)
                cast.add(id(p))
                p.data = p.data.to(dtype)
    _own_memory(model, cast)
    return saved


@torch.no_grad()
def _own_memory(model: nn.Module, cast: set[int]) -> None:
    """Copy every frozen CPU parameter and buffer that was not just cast (`cast`: their ids) into memory of
    its own, so nothing keeps the checkpoint's memory alive.

    transformers loads a checkpoint's tensors as views of the file: of one block read into memory, or
    (transformers 5, safetensors) each a storage of its own inside the file's memory mapping. Once the
    linear weights are held in another dtype, the embeddings and norms are all that still use it, and
    they keep it whole: on the benchmark's small fp32 model the 404 MB mapping stayed resident through
    training (bench/memory.py: the live tensors at the peak, /proc/self/maps). With their own copies
    (the embeddings and norms: a few % of the model) the block or mapping is released.
    """
    if not cast:
        return
    for m in model.modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is None or id(t) in cast or t.requires_grad or t.device.type != "cpu":
                continue
            if name in m._parameters:
                t.data = t.data.clone()
            else:
                m._buffers[name] = t.clone()


def module_name(model: nn.Module, name: str) -> str:
    """The full dotted name of a module given by full name or unique suffix (modules_to_save: ["lm_head"])."""
    hits = [n for n, _ in model.named_modules() if n == name or n.endswith("." + name)]
    if len(hits) != 1:
        what = "no module" if not hits else f"{len(hits)} modules ({', '.join(hits[:3])}...)"
        raise ConfigError(f"peft_config.modules_to_save: {what} named {name!r}; give a full module name")
    return hits[0]


def find_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(module_name(model, name))


def trainable_summary(model: nn.Module, adapted: list[str]) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():  # a quantized layer's weight is packed: count the weights it stands for
        w = getattr(m, "weight", None)
        if quant.is_quantized_layer(m) and w is not None:
            total += m.in_features * m.out_features - w.numel()
    groups: dict[str, int] = {}
    for name in adapted:
        key = ".".join("*" if part.isdigit() else part for part in name.split("."))
        groups[key] = groups.get(key, 0) + 1
    mods = ", ".join(f"{k} (x{v})" if v > 1 else k for k, v in sorted(groups.items()))
    return (
        f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)\n"
        f"adapted modules ({len(adapted)}): {mods}"
    )
