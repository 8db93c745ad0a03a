"""Writing GGUF for llama.cpp and Ollama: a LoRA adapter (`adapter.gguf`) or a merged model (`model.gguf`).

Both are written with the `gguf` package (GGUFWriter, TensorNameMap, gguf.quants), the way llama.cpp's
own convert_lora_to_gguf.py and convert_hf_to_gguf.py write them, so llama.cpp reads exactly what its
converters would give:

- tensor names from `gguf.TensorNameMap` (`model.layers.3.self_attn.q_proj` -> `blk.3.attn_q.weight`);
- llama.cpp's transforms of the base weights, applied to a LoRA's B too (B's rows are the weight's
  rows): Llama and Mistral q/k rows are permuted for llama.cpp's RoPE layout (`permute_rows`, its
  LlamaModel.permute); Phi-3 keeps qkv and gate_up fused, so a LoRA on the q and v slices of qkv is
  written as one LoRA on the whole qkv (zero rows for k: `ModuleLora.whole`);
- an adapter has `general.type = adapter`, `adapter.type = lora` and one `adapter.lora.alpha`;
  llama.cpp scales each pair by alpha / rank (rank = rows of lora_a), so modules whose own scale
  differs (rank_pattern, alpha_pattern, rsLoRA, slices) get it folded into B;
- a model copies its tokenizer (tokens, merges, special ids, chat template) from the GGUF file it
  was read from, unchanged; from a Hugging Face folder it is built with the gguf package's vocab
  helpers (`gguf.vocab`), with llama.cpp's default pre-tokenizer.

Architectures are mapped one by one (ARCHS); any other is refused with the list.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from lorafit.errors import AdapterError
from lorafit.gguf_files import reader, require_gguf

# transformers model_type -> llama.cpp architecture, as llama.cpp's converter maps them
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi3": "phi3"}
PERMUTED = {"llama"}  # architectures whose q/k rows llama.cpp permutes for its RoPE layout
ADAPTER_TYPES = ("f32", "f16", "bf16")
MODEL_TYPES = ("f32", "f16", "bf16", "q8_0")


def arch_of(config) -> str:
    """llama.cpp's architecture name for a transformers config, or an AdapterError listing what is mapped."""
    arch = ARCHS.get(getattr(config, "model_type", None))
    if arch is None:
        mapped = ", ".join(f"{k} (as {v})" for k, v in ARCHS.items())
        raise AdapterError(
            f"GGUF export: lorafit cannot map the architecture {config.model_type!r} to llama.cpp's tensor "
            f"layout; it maps {mapped}. Fix: use --layout stacked (a PEFT adapter) or fuse without "
            "--format gguf, and convert with llama.cpp's own scripts"
        )
    return arch


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: within each head, rows (x0, x1, ..., y0, y1, ...) become interleaved
    (x0, y0, x1, y1, ...), for its RoPE on adjacent pairs. Works on a weight or on a LoRA B (rows first)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rows` (what transformers does reading a llama GGUF)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_cpp_rows(name: str, w: torch.Tensor, config, arch: str) -> torch.Tensor:
    """`w` (rows first: a weight, a bias or a LoRA B) of module `name` as llama.cpp stores its rows."""
    if arch not in PERMUTED:
        return w
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "q_proj":
        return permute_rows(w, config.num_attention_heads)
    if leaf == "k_proj":
        return permute_rows(w, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return w


def gguf_name(names, module: str, suffix: str = ".weight") -> str:
    """llama.cpp's name of `module`'s parameter (`suffix` .weight or .bias), or an AdapterError."""
    found = names.get_name(module + suffix, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise AdapterError(
            f"GGUF export: llama.cpp has no tensor for {module}{suffix}. Fix: adapt only the attention and MLP "
            "projections (or the output head) for a GGUF adapter"
        )
    return found


def _array(t: torch.Tensor, kind: str):
    """(numpy data, raw dtype or None) of `t` stored as `kind` (f32, f16, bf16, q8_0) by the gguf package."""
    gguf = require_gguf()
    a = t.detach().to(torch.float32).cpu().contiguous().numpy()
    if kind == "f32" or a.ndim < 2:
        return a, None
    if kind == "f16":
        return a.astype(np.float16), None
    if kind == "q8_0" and a.shape[-1] % 32:
        return a.astype(np.float16), None  # rows not in blocks of 32: as llama.cpp's converter does, f16
    qtype = gguf.GGMLQuantizationType.BF16 if kind == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(a, qtype), qtype


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------- adapter


def write_adapter_gguf(path: Path, loras: dict, full: dict, config, *, use_rslora: bool, kind: str = "f32",
                       name: str = "lorafit adapter") -> dict:  # fmt: skip
    """Write `loras` ({module name: ModuleLora}, on the model's own modules) as a llama.cpp LoRA adapter.
    Returns {"alpha", "tensors", "folded"}: the one alpha written, the tensor count, and how many
    modules had their scale folded into B."""
    gguf = require_gguf()
    if kind not in ADAPTER_TYPES:
        raise AdapterError(f"--gguf-type for an adapter must be one of {ADAPTER_TYPES}, got {kind!r}")
    arch = arch_of(config)
    if full:
        raise AdapterError(
            f"GGUF export: the adapter also trains whole tensors ({', '.join(sorted(full)[:3])}): a llama.cpp "
            "adapter holds LoRA pairs only. Fix: `lorafit fuse --format gguf` writes a merged model with them"
        )
    pairs = []
    for module, m in sorted(loras.items()):
        if m.kind != "linear":
            raise AdapterError(
                f"GGUF export: {module} is an embedding LoRA; lorafit writes llama.cpp adapters for linear "
                "layers only. Fix: `lorafit fuse --format gguf` writes a merged model"
            )
        a, b, r, alpha = m.whole(use_rslora)
        scale = alpha / (math.sqrt(r) if use_rslora else r)
        pairs.append((module, a.float(), b.float(), r, scale))
    if not pairs:
        raise AdapterError("GGUF export: the adapter has no LoRA layers")
    # llama.cpp's scale is alpha / rank: one alpha fits every module whose scale * rank is the same
    products = Counter(round(s * r, 6) for _, _, _, r, s in pairs)
    alpha_out = products.most_common(1)[0][0]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha_out))
    folded = 0
    for module, a, b, r, scale in pairs:
        if round(scale * r, 6) != alpha_out:
            b, folded = b * (scale * r / alpha_out), folded + 1
        target = gguf_name(names, module)
        b = _llama_cpp_rows(module, b, config, arch)
        for suffix, t in ((".lora_a", a), (".lora_b", b)):
            data, raw = _array(t, kind)
            writer.add_tensor(target + suffix, data, raw_dtype=raw)
    _write(writer)
    return {"alpha": alpha_out, "tensors": 2 * len(pairs), "folded": folded}


# ----------------------------------------------------------------------------- merged model


def _rope(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {}) or {
        "rope_theta": getattr(config, "rope_theta", 10000.0)
    }


def _hparams(writer, config, arch: str, kind: str) -> None:
    """The metadata llama.cpp's converter writes for these architectures (TextModel.set_gguf_parameters
    and the LlamaModel, Qwen2Model and Phi3MiniModel additions)."""
    gguf = require_gguf()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if arch == "phi3":
        rot = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        writer.add_rope_dimension_count(int(rot * config.hidden_size) // heads)
        orig = rope.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None
        )
        writer.add_rope_scaling_orig_ctx_len(orig or config.max_position_embeddings)
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
        if rope.get("long_factor"):
            raise AdapterError(
                "GGUF export: this Phi-3 uses long-context RoPE factors (longrope), which lorafit does not "
                "write. Fix: fuse without --format gguf and convert with llama.cpp's convert_hf_to_gguf.py"
            )
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[kind]))


def _copy_tokenizer(writer, source: Path, n_vocab: int) -> None:
    """Every `tokenizer.*` key of the GGUF file `source`, unchanged (padded with unused tokens up to the
    model's embedding rows, as llama.cpp's converter pads)."""
    gguf = require_gguf()
    for key, field in reader(source).fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            pad = n_vocab - len(value)
            if key == "tokenizer.ggml.tokens":
                value = value + [f"[PAD{i}]" for i in range(len(value), n_vocab)]
            elif pad > 0:
                value = value + [-1000.0 if key.endswith("scores") else int(gguf.TokenType.UNUSED)] * pad
        writer.add_key_value(key, value, vtype, sub_type=sub)


def _hf_tokenizer(writer, folder: Path, n_vocab: int) -> None:
    """The tokenizer of a Hugging Face folder through the gguf package's vocab helpers."""
    gguf = require_gguf()
    vocab, why = None, []
    for kind in (gguf.vocab.LlamaHfVocab, gguf.vocab.BpeVocab):  # SentencePiece-style BPE, then GPT-2 BPE
        try:
            vocab = kind(folder)
            break
        except (TypeError, ValueError, FileNotFoundError, KeyError) as e:
            why.append(str(e))
    if vocab is None:
        raise AdapterError(
            f"GGUF export: cannot read the tokenizer of {folder} with the gguf package ({'; '.join(why)}). Fix: "
            "fuse without --format gguf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(ttype))
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(
        writer
    )


def write_model_gguf(path: Path, model: torch.nn.Module, *, kind: str = "f16", tokenizer_gguf: Path | None = None,
                     tokenizer_dir: Path | None = None, name: str = "lorafit model") -> dict:  # fmt: skip
    """Write a (merged, LoRA-free) transformers causal LM as a complete llama.cpp GGUF model: metadata,
    weights in `kind` (norms and biases stay f32), and the tokenizer from `tokenizer_gguf` (copied) or
    `tokenizer_dir` (a Hugging Face folder). Returns {"arch", "tensors"}."""
    gguf = require_gguf()
    if kind not in MODEL_TYPES:
        raise AdapterError(f"--gguf-type for a model must be one of {MODEL_TYPES}, got {kind!r}")
    config = model.config
    arch = arch_of(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _hparams(writer, config, arch, kind)
    if tokenizer_gguf is not None:
        _copy_tokenizer(writer, Path(tokenizer_gguf), config.vocab_size)
    elif tokenizer_dir is not None:
        _hf_tokenizer(writer, Path(tokenizer_dir), config.vocab_size)
    else:
        raise AdapterError("GGUF export: no tokenizer source (a GGUF file or a model folder)")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    count = 0
    for key, t in model.state_dict().items():
        if "lora_" in key or (tied and key == "lm_head.weight"):
            continue  # a tied head is llama.cpp's token_embd (no output tensor)
        module, _, param = key.rpartition(".")
        target = gguf_name(names, module, "." + param)
        data, raw = _array(_llama_cpp_rows(module, t, config, arch), kind)
        writer.add_tensor(target, data, raw_dtype=raw)
        count += 1
    _write(writer)
    return {"arch": arch, "tensors": count}
