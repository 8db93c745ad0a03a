"""Tiny Phi-3: a small Phi3ForCausalLM and a character-level tokenizer with Phi-3's chat format.

Used by `lorafit demo`, `lorafit tiny-model OUT`, the tests and the benchmarks, so that everything
runs offline. The model is the real transformers `Phi3ForCausalLM` (stacked `qkv_proj` and
`gate_up_proj`), only smaller; the tokenizer has Phi-3's special tokens and its official chat
template, over single characters instead of a SentencePiece vocabulary:

    <|system|>\\nBe brief.<|end|>\\n<|user|>\\nHi<|end|>\\n<|assistant|>\\nHello<|end|>\\n<|endoftext|>

Run `lorafit tiny-model OUT` to write one to a folder that `from_pretrained` reads.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from lorafit.checkpoint import atomic_dir
from lorafit.errors import LorafitError

# The official Phi-3-mini-4k-instruct template (after its mid-2024 update, with system turns).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-3's added tokens, in Phi-3's order (ids 32000.. in the real vocabulary).
PHI3_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]

# Model sizes by name. "tiny" and "small" are the benchmark configurations.
SIZES: dict[str, dict[str, int]] = {
    "demo": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=352),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688),
    "small": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, intermediate_size=2048),
    "medium": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, intermediate_size=5504),
}


def build_tokenizer():
    """A character-level fast tokenizer with Phi-3's special tokens and chat template.

    Ids: 0 `<unk>`, 1 `<s>`, 2 `</s>`, then printable ASCII and newline/tab, then Phi-3's eleven
    added tokens. The pad token is `<unk>`, as in Microsoft's sample_finetune.py: it must never be
    `<|end|>` or `<|endoftext|>`, or a collator that masks padding would hide the stop tokens.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["\n", "\t"] + list(string.printable[:95])  # digits, letters, punctuation, space
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<unk>",
        additional_special_tokens=PHI3_SPECIAL_TOKENS[1:],
        model_max_length=4096,
        padding_side="right",
    )
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    tok.chat_template = PHI3_CHAT_TEMPLATE
    return tok


def build_model(tokenizer, size: str = "demo", vocab_size: int | None = None, seed: int = 0, **overrides):
    """A randomly initialised `Phi3ForCausalLM` of a named size (see SIZES) for `tokenizer`.

    `vocab_size` defaults to the tokenizer's length rounded up to a multiple of 64 (Phi-3 pads its
    32,011 tokens to 32,064 the same way); the benchmarks pass 32064 to get Phi-3's real head cost.

    Weights are drawn with std 1/sqrt(hidden) (Phi-3-mini's 0.02 at hidden 3072 is about the same
    ratio), not transformers' fixed 0.02. This matters for a frozen random base: the final RMSNorm
    bounds |h| near sqrt(hidden), so with std 0.02 at hidden 128 no logit can exceed about 2.5, the
    softmax can never be confident, and LoRA training stalls at a loss near 2.4 whatever it learns.
    """
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(SIZES)}")
    dims = {**SIZES[size], **overrides}
    n = len(tokenizer)
    config = Phi3Config(
        vocab_size=vocab_size or (n + 63) // 64 * 64,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[
            tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>")
        ],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=dims["hidden_size"] ** -0.5,
        **dims,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def write_tiny_model(
    out_dir: str | Path, size: str = "demo", vocab_size: int | None = None, seed: int = 0
) -> Path:
    """Write a tiny Phi-3 model and its tokenizer to `out_dir` (safetensors, config, chat template).

    `out_dir` must be new, empty, or a tiny model written before (`check_tiny_output`): a real model
    folder given by mistake is never replaced. The folder is written beside and renamed into place.
    """
    out = Path(out_dir).expanduser()
    check_tiny_output(out)
    tok = build_tokenizer()
    model = build_model(tok, size=size, vocab_size=vocab_size, seed=seed)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


TINY_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                        "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"})  # fmt: skip


def check_tiny_output(out: Path) -> None:
    """Refuse an output folder that is not new, empty or a tiny model: how lorafit knows a tiny model
    is that the folder holds only TINY_FILES and its config.json is a Phi-3 of one of SIZES' shapes
    (no published model is that small). A link is refused: the folder is replaced by a rename."""
    fix = "Fix: choose a new folder for the tiny model"
    if out.is_symlink():
        raise LorafitError(f"{out} is a symbolic link; lorafit replaces no folder through a link. {fix}")
    if not out.exists():
        return
    if not out.is_dir():
        raise LorafitError(f"{out} is a file, not a folder. {fix}")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    other = [n for n in names if n not in TINY_FILES or not (out / n).is_file()]
    try:
        cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
        shape = {k: cfg.get(k) for k in SIZES["demo"]}
        tiny = cfg.get("model_type") == "phi3" and shape in SIZES.values()
    except (OSError, ValueError, AttributeError):
        tiny = False
    if other or not tiny:
        held = f"it holds {', '.join(other[:4])}" if other else "its config.json is not a tiny model's"
        raise LorafitError(
            f"{out} is not empty and not a tiny model written by lorafit ({held}); tiny-model replaces only "
            f"a previous tiny model, never a real model or other files. {fix}, or remove this one"
        )
