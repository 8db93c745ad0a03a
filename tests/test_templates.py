"""lorafit.templates on real chat templates (llama.cpp's vocab files, SmolLM2) and published ones."""

from __future__ import annotations

import functools

import pytest
from real_files import real_tokenizer, smollm2_tokenizer

from lorafit.errors import DataError
from lorafit.templates import FOLD_SEPARATOR, ChatTemplate, missing_content, prepare, render

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
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
]


@functools.cache
def family(name: str):
    """A real tokenizer per family; the llama.cpp vocab files of Llama 3 and Mistral carry no
    template, so theirs is set to the published one; Gemma's markers are added to the SPM vocab."""
    if name == "smollm2":
        return smollm2_tokenizer()
    vocab = {
        "phi-3": "phi-3",
        "qwen2": "qwen2",
        "llama3": "llama-bpe",
        "mistral": "llama-spm",
        "gemma": "llama-spm",
    }
    tok = real_tokenizer(vocab[name])
    if name == "gemma":
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = {"llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA}.get(name, tok.chat_template)
    return tok


@pytest.mark.parametrize(
    ("name", "renders_system", "end_of_turn"),
    [
        ("phi-3", False, "<|end|>"),  # the real Phi-3-mini template keeps only user and assistant turns
        ("qwen2", True, "<|im_end|>"),
        ("smollm2", True, "<|im_end|>"),
        ("llama3", True, "<|eot_id|>"),
        ("mistral", False, "</s>"),  # raises: roles must alternate
        ("gemma", False, "<end_of_turn>"),  # raises: System role not supported
    ],
)
def test_probe_finds_what_each_family_template_does(name, renders_system, end_of_turn):
    template = ChatTemplate.probe(family(name))
    assert (template.renders_system, template.end_of_turn) == (renders_system, end_of_turn)


@pytest.mark.parametrize("name", ["phi-3", "mistral", "gemma"])
def test_auto_folds_the_system_text_into_the_first_user_turn_where_the_template_drops_it(name):
    tok = family(name)
    messages, action = prepare(CHAT, ChatTemplate.probe(tok))
    assert action == "folded"
    assert messages[0] == {"role": "user", "content": "Be brief." + FOLD_SEPARATOR + "Hi there"}
    text = render(tok, messages, add_generation_prompt=False)
    assert "Be brief.\n\nHi there" in text
    assert missing_content(text, messages) == []


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_auto_keeps_a_system_message_the_template_renders(name):
    tok = family(name)
    messages, action = prepare(CHAT, ChatTemplate.probe(tok))
    assert (messages, action) == (CHAT, "kept")
    assert missing_content(render(tok, messages, add_generation_prompt=False), messages) == []


def test_the_real_phi3_template_silently_drops_a_system_message_which_missing_content_catches():
    tok = family("phi-3")
    text = render(tok, CHAT, add_generation_prompt=False)
    assert "Be brief." not in text
    assert missing_content(text, CHAT) == [(0, "system")]


def test_policies_drop_fold_and_error():
    phi3 = ChatTemplate.probe(family("phi-3"))
    assert prepare(CHAT, phi3, "drop") == (CHAT[1:], "dropped")
    with pytest.raises(DataError, match="renders no system message.*data.system_message"):
        prepare(CHAT, phi3, "error")
    gemma = ChatTemplate.probe(family("gemma"))
    with pytest.raises(DataError, match="raises: System role not supported"):
        prepare(CHAT, gemma, "error")
    qwen = ChatTemplate.probe(family("qwen2"))
    assert prepare(CHAT, qwen, "error") == (CHAT, "kept")
    folded, action = prepare(CHAT, qwen, "fold")
    assert action == "folded" and [m["role"] for m in folded] == ["user", "assistant"]
    assert prepare(CHAT[1:], phi3, "error") == (CHAT[1:], None)


def test_a_system_message_with_no_user_turn_after_it_cannot_be_folded():
    with pytest.raises(DataError, match="no user turn after it"):
        prepare([{"role": "system", "content": "x"}], ChatTemplate(False, None, "<|end|>"))


def test_missing_content_names_a_role_the_template_ignores_and_allows_trimmed_content():
    tok = family("phi-3")
    messages = [*CHAT[1:], {"role": "tool", "content": "42"}, {"role": "user", "content": "ok"}]
    assert missing_content(render(tok, messages, add_generation_prompt=False), messages) == [(2, "tool")]
    padded = [{"role": "user", "content": "  Hi there  "}, {"role": "assistant", "content": "Hello!"}]
    assert missing_content(render(family("llama3"), padded, add_generation_prompt=False), padded) == []
