"""`lorafit check-data`: validation without training, token statistics, and the trained tokens shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from lorafit.check import check_data, format_report, histogram
from lorafit.cli import main
from lorafit.data import load_conversations
from lorafit.tokens import tokenize

CONVS = [
    {"messages": [{"role": "user", "content": "2: even or odd?"}, {"role": "assistant", "content": "even"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye!"},
        ]
    },  # fmt: skip
    {"prompt": "7: over 5?", "completion": "yes"},
    {"messages": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "long"}]},
]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", *CONVS)


def run_check_data(model: Path, data: Path, *args: str) -> int:
    """`lorafit check-data --model MODEL --data DATA ARGS...`, run in this process; its exit status."""
    return main(["check-data", "--model", str(model), "--data", str(data), *args])


def test_report_shows_statistics_and_the_trained_tokens(tiny_model, data, capsys):
    assert run_check_data(tiny_model, data, "--max-seq-length", "64", "--example", "1") == 0
    out = capsys.readouterr().out
    assert f"{data}: valid" in out
    assert "conversations              4" in out and "truncated                  1" in out
    assert "length histogram" in out
    # conversation 1, rendered with the chat template; the assistant replies and their <|end|> are trained
    assert "example 1 (" in out and "chat.jsonl:2), the trained tokens in [[...]]" in out
    assert (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n[[Hello<|end|>]]\n"
        "<|user|>\nBye<|end|>\n<|assistant|>\n[[Bye!<|end|>]]\n<|endoftext|>"
    ) in out
    assert "warning: 1 conversation(s) are longer than max_seq_length=64" in out


def test_json_statistics_are_what_training_sees(tiny_model, data, tok, capsys):
    assert run_check_data(tiny_model, data, "--max-seq-length", "64", "--json") == 0
    got = json.loads(capsys.readouterr().out)
    _, stats = tokenize(tok, load_conversations(data), max_seq_length=64, end_of_turn="<|end|>")
    for key, value in stats.to_dict().items():
        assert got[key] == value, key
    assert got["conversations"] == 4 and got["truncated"] == 1 and got["dropped"] == 1  # "long" is cut off
    assert sum(h["count"] for h in got["histogram"]) == got["examples"] == 3
    assert got["example"]["text"] == (
        "<|user|>\n2: even or odd?<|end|>\n<|assistant|>\n[[even<|end|>]]\n<|endoftext|>"
    )


def test_train_on_all_marks_everything(tiny_model, data):
    report = check_data(str(tiny_model), data, max_seq_length=256, train_on="all")
    assert report["supervised_tokens"] == report["tokens"] and report["truncated"] == 0
    text = report["example"]["text"]
    assert text.startswith("[[<|user|>") and text.endswith("<|endoftext|>]]") and text.count("[[") == 1


def test_truncated_example_shows_what_is_cut(tiny_model, data):
    report = check_data(str(tiny_model), data, max_seq_length=64, example=3)
    ex = report["example"]
    assert ex["source"].endswith("chat.jsonl:4") and "[[" not in ex["text"]
    assert ex["truncated_text"].endswith("<|assistant|>\nlong<|end|>\n<|endoftext|>")
    assert "cut at max_seq_length 64 (not trained)" in format_report(report)


def test_color_on_a_terminal(tiny_model, data):
    report = check_data(str(tiny_model), data, max_seq_length=256)
    colored = format_report(report, color=True)
    assert "\x1b[1;32meven<|end|>\x1b[0m" in colored and "[[" not in colored


def test_invalid_data_exits_2_with_every_problem(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(CONVS[0]) + "\n{nope\n" + json.dumps({"messages": [{"role": "user", "content": "q"}]})
    )
    assert run_check_data(tiny_model, bad) == 2
    err = capsys.readouterr().err
    assert "2 problems in 2 records" in err and "bad.jsonl:2: malformed JSON" in err
    assert "bad.jsonl:3: no assistant turn" in err


def test_no_truncation_makes_long_conversations_an_error(tiny_model, data, capsys):
    assert run_check_data(tiny_model, data, "--max-seq-length", "64", "--no-truncation") == 2
    assert "chat.jsonl:4:" in capsys.readouterr().err


def test_histogram_bins():
    assert histogram([]) == []
    assert histogram([5, 5, 5]) == [{"lo": 5, "hi": 5, "count": 3}]
    h = histogram([10, 11, 19, 30], bins=3)
    assert [(b["lo"], b["hi"], b["count"]) for b in h] == [(10, 16, 2), (17, 23, 1), (24, 30, 1)]


def test_no_example_would_train_exits_2_and_says_why(tiny_model, tmp_path, capsys):
    """Every conversation cut before its assistant reply: check-data fails as train would, naming the cause."""
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(CONVS[3]) + "\n" + json.dumps(CONVS[3]) + "\n")
    assert run_check_data(tiny_model, data, "--max-seq-length", "16") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"error: {data}: no example would train: all 2 conversation(s) are dropped: 2 are longer than "
        "max_seq_length=16 and their trained tokens (the assistant replies) come after the cut. "
        "Fix: a larger max_seq_length (--max-seq-length, training_config.max_seq_length)\n"
    )
    assert run_check_data(tiny_model, data, "--max-seq-length", "16", "--json") == 2
    assert capsys.readouterr().out == ""


def test_nothing_to_train_names_every_reason():
    from lorafit.check import nothing_to_train
    from lorafit.tokens import TokenStats

    stats = TokenStats(conversations=5, examples=0, tokens=0, supervised_tokens=0, targets=0, truncated=2,
                       dropped=5, max_len=0, mean_len=0.0)  # fmt: skip
    message = nothing_to_train("d.jsonl", stats, max_seq_length=64, train_on="assistant")
    assert message.startswith(
        "d.jsonl: no example would train: all 5 conversation(s) are dropped: 2 are longer"
    )
    assert "; 3 have no token to train on with train_on='assistant'. Fix: a larger max_seq_length" in message
    assert message.endswith("or an assistant reply in each conversation, or train_on='all'")


@pytest.mark.parametrize(
    ("tty", "args", "env", "colored"),
    [
        (False, [], {}, False),  # a pipe or a file: [[...]]
        (True, [], {}, True),  # a terminal: colour
        (True, ["--no-color"], {}, False),
        (True, [], {"NO_COLOR": "1"}, False),
        (True, [], {"NO_COLOR": ""}, True),  # no-color.org: only a non-empty value counts
    ],
)
def test_color_only_on_a_terminal(tiny_model, data, capsys, monkeypatch, tty, args, env, colored):
    import sys

    monkeypatch.delenv("NO_COLOR", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    assert run_check_data(tiny_model, data, *args) == 0
    out = capsys.readouterr().out
    assert ("\x1b[1;32meven<|end|>\x1b[0m" in out) is colored
    assert ("[[even<|end|>]]" in out) is not colored
    assert ("the trained tokens highlighted" in out) is colored


def test_check_data_help_says_how_tokens_are_marked():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "lorafit", "check-data", "--help"], capture_output=True, text=True
    )
    text = " ".join(r.stdout.split())
    assert r.returncode == 0
    assert (
        "in [[...]] when the output is not a terminal" in text
        and "coloured (bold green) on a terminal" in text
    )
    assert "--no-color" in text and "NO_COLOR" in text
