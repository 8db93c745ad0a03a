"""The demo end to end (slow: about 2.5 minutes on 2 CPU cores), and the chat loop."""

from __future__ import annotations

import pytest

from lorafit.generation import chat
from lorafit.tiny import build_model, build_tokenizer


@pytest.mark.slow
def test_demo_answers_most_held_out_prompts(tmp_path):
    from lorafit.demo import run_demo

    res = run_demo(tmp_path / "demo", progress=False, say=lambda *a: None)
    assert res["accuracy_before"] < 0.1
    assert res["accuracy_after"] >= 0.8
    assert res["eval_loss_after"] < res["eval_loss_before"]
    assert res["check"] == "PASS"


def test_chat_loop_keeps_history_and_commands():
    tok = build_tokenizer()
    model = build_model(tok).eval()
    lines = iter(["hello", "/reset", "", "again", "/exit"])
    printed: list[str] = []
    seen_prompts: list[int] = []
    real_apply = tok.apply_chat_template

    def spy(conversation, **kw):
        if not any("lorafitprobe" in m["content"] for m in conversation):  # not ChatTemplate.probe's
            seen_prompts.append(len(conversation))
        return real_apply(conversation, **kw)

    tok.apply_chat_template = spy
    chat(
        model,
        tok,
        system="Be brief.",
        max_new_tokens=3,
        input_fn=lambda _: next(lines),
        print_fn=printed.append,
    )
    # system + user, then after /reset again system + user (history cleared); blank line ignored
    assert seen_prompts == [2, 2]
    assert "/reset" in printed[0]
