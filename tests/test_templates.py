"""lorafit.templates on real chat templates (llama.cpp's vocab files, SmolLM2) and published ones."""

from __future__ import annotations

import pytest
from families import family_tokenizer

from lorafit.check import example_segments, marked
from lorafit.errors import DataError
from lorafit.model import end_of_turn
from lorafit.templates import FOLD_SEPARATOR, ChatTemplate, missing_content, prepare, render
from lorafit.tokens import encode

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
]


def family(name: str):
    return family_tokenizer({"phi-3": "phi3"}.get(name, name))


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


# Multi-turn, with whitespace the templates treat differently: Llama 3 and Gemma trim content, Mistral
# writes the reply right after "[/INST]", Phi-3 and ChatML keep it as it is.
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How are you?"},
    {"role": "user", "content": " What is 2+2? "},
    {"role": "assistant", "content": "4, of course.\n"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": " You're welcome."},
]
TRIMS = {"llama3", "gemma"}  # `| trim` in the template


@pytest.mark.parametrize("name", ["phi-3", "qwen2", "llama3", "mistral", "gemma", "smollm2"])
def test_the_trained_tokens_are_exactly_each_assistant_turn_and_its_end_of_turn(name):
    tok = family(name)
    eot = end_of_turn(tok)
    messages, _ = prepare(MULTI_TURN, ChatTemplate.probe(tok))
    segments, _ = example_segments(tok, messages, max_seq_length=4096, end_of_turn=eot, train_on="assistant")
    print(f"{name}: end of turn {eot!r}\n{marked(segments)}")
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [(r.strip() if name in TRIMS else r) + eot for r in replies]
    trained = [text for text, is_trained in segments if is_trained]
    # a token's text may carry the whitespace before it (SentencePiece's "▁You"); nothing else is trained
    assert [t.lstrip(" ") for t in trained] == [e.lstrip(" ") for e in expected]
    ids, sup = encode(tok, messages, end_of_turn=eot)
    runs, current = [], []
    for i, s in zip(ids, sup):
        if s:
            current.append(i)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    decoded = [tok.decode(r) for r in runs]
    assert [d.strip() for d in decoded] == [e.strip() for e in expected]
    assert all(tok.convert_tokens_to_ids(eot) == r[-1] for r in runs)
