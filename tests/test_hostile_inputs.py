"""Hostile inputs end in a message, never a traceback, a hang or a silent wrong result: endless data
paths (a FIFO, /dev/zero), one enormous record, JSON Python cannot read, malformed and non-finite
adapters, and JSON output with NaN in it. Through the CLI in this process where a command is involved
(`lorafit.cli.main([...])`, exit status 2, stderr captured with capsys), else through the library.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import lorafit_model, tree, write_jsonl
from safetensors.torch import load_file, save_file

from lorafit import lora, tokens
from lorafit.cli import dumps_json, main
from lorafit.data import load_conversations
from lorafit.errors import DataError
from lorafit.tokens import CHARS_PER_TOKEN, tokenize

GOOD = {
    "messages": [{"role": "user", "content": "2: even or odd?"}, {"role": "assistant", "content": "even"}]
}


def fails(capsys, args: list[str]) -> str:
    """Run the CLI, expect exit status 2 and return stderr (one message, no traceback)."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err[err.index("error: ") :]


# ----------------------------------------------------------------------------- endless data paths


def test_a_fifo_is_refused_before_it_is_opened(tiny_model, tmp_path, capsys):
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)  # opening it for reading would block: nothing writes to it
    err = fails(capsys, ["check-data", "--model", str(tiny_model), "--data", str(fifo)])
    assert f"{fifo}: is a FIFO (named pipe), not a regular file" in err
    assert "Fix: write the records to a .jsonl, .json or .parquet file" in err


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_link_to_an_endless_device_is_refused(tmp_path):
    link = tmp_path / "train.jsonl"
    link.symlink_to("/dev/zero")
    with pytest.raises(
        DataError, match=r"train\.jsonl: is a device \(it links to /dev/zero\), not a regular"
    ):
        load_conversations(link)


# ----------------------------------------------------------------------------- one enormous record

HUGE = 3_000_000  # characters of one assistant reply: one JSONL line of ~3 MB


def test_an_enormous_record_is_clipped_before_tokenizing(tmp_path, tok, monkeypatch):
    data = write_jsonl(
        tmp_path / "huge.jsonl",
        GOOD,
        {
            "messages": [
                {"role": "user", "content": "tell"},
                {"role": "assistant", "content": "ab " * (HUGE // 3)},
            ]
        },
    )
    seen = []
    real_encode = tokens.encode

    def spy(tokenizer, messages, **kw):
        seen.append(sum(len(m["content"]) for m in messages))
        return real_encode(tokenizer, messages, **kw)

    monkeypatch.setattr(tokens, "encode", spy)
    data_, stats = tokenize(tok, load_conversations(data), max_seq_length=64, end_of_turn="<|end|>")
    assert max(seen) <= CHARS_PER_TOKEN * 64  # what reached the tokenizer is bounded
    assert stats.clipped == 1 and stats.truncated == 1 and stats.examples == 2
    assert stats.to_dict()["clipped"] == 1
    assert data_.lengths.tolist()[1] == 64  # the clipped record still fills max_seq_length
    with pytest.raises(
        DataError, match=r"huge\.jsonl:2: more than 512 characters, far more than max_seq_length 64"
    ):
        tokenize(tok, load_conversations(data), max_seq_length=64, end_of_turn="<|end|>", truncation=False)


def test_clip_keeps_short_conversations_and_cuts_at_the_bound():
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokens.clip_messages(short, 2) == (short, False)
    long = [
        {"role": "user", "content": "x" * 10},
        {"role": "assistant", "content": "y" * 10},
        {"role": "user", "content": "z"},
    ]
    clipped, cut = tokens.clip_messages(long, 2)  # a bound of 16 characters
    assert cut and [m["content"] for m in clipped] == ["x" * 10, "y" * 6]


def test_check_data_reports_an_enormous_record_as_truncated(tiny_model, tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "huge.jsonl",
        GOOD,
        {"messages": [{"role": "user", "content": "q" * HUGE}, {"role": "assistant", "content": "a"}]},
    )
    capsys.readouterr()
    assert (
        main(
            [
                "check-data",
                "--model",
                str(tiny_model),
                "--data",
                str(data),
                "--max-seq-length",
                "64",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["clipped"] == 1 and report["truncated"] == 1


# ----------------------------------------------------------------------------- JSON Python cannot read

JSON_CASES = {
    "nested 100000 deep": ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
    "a 5000-digit integer": (
        '{"prompt": "a", "completion": "b", "n": ' + "9" * 5000 + "}",
        "unreadable JSON value",
    ),
    "a lone surrogate": (
        '{"prompt": "a \\ud800 b", "completion": "b"}',
        "prompt has a lone surrogate code point (U+D800) at character 2",
    ),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_json_python_cannot_read_is_a_data_error(tmp_path, case):
    line, message = JSON_CASES[case]
    data = write_jsonl(tmp_path / "d.jsonl", GOOD, line)
    with pytest.raises(DataError) as e:
        load_conversations(data)
    assert f"d.jsonl:2: {message}" in str(e.value)
    (tmp_path / "d.json").write_text("[" + json.dumps(GOOD) + ", " + line + "]")
    with pytest.raises(DataError, match=r"d\.json"):
        load_conversations(tmp_path / "d.json")


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_generate_needs_at_least_one_new_token(tiny_model, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tiny_model), "--prompt", "hi", "--max-new-tokens", value])
    assert e.value.code == 2
    assert "--max-new-tokens" in capsys.readouterr().err


# ----------------------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter (r=4, alpha=8, random B) for the tiny model, saved as a PEFT folder."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    out = tmp_path_factory.mktemp("hostile") / "adapter"
    lora.save_adapter(
        lorafit_model(base, ["qkv_proj", "o_proj"]), out, base_model_name_or_path=str(tiny_model)
    )
    return out


def _edit_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    path.write_text(edit(json.loads(path.read_text())))
    return path


CONFIG_CASES = {
    "a JSON list": (lambda c: json.dumps([c]), "the top level is a list, not a JSON object"),
    "a string lora_alpha": (
        lambda c: json.dumps({**c, "lora_alpha": "16"}),
        "lora_alpha is '16'; expected a finite number",
    ),
    "lora_alpha NaN": (
        lambda c: json.dumps({**c, "lora_alpha": math.nan}),
        "lora_alpha is nan; expected a finite number",
    ),
    "a rank_pattern of 2.5": (
        lambda c: json.dumps({**c, "rank_pattern": {"o_proj": 2.5}}),
        "rank_pattern['o_proj'] is 2.5; expected a positive integer",
    ),
    "an alpha_pattern list": (
        lambda c: json.dumps({**c, "alpha_pattern": [1]}),
        "alpha_pattern is a list; expected an object {module name: value}",
    ),
    "r of 0": (lambda c: json.dumps({**c, "r": 0}), "r is 0; expected a positive integer"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_malformed_adapter_config_is_named(adapter, tmp_path, case):
    edit, message = CONFIG_CASES[case]
    cfg = _edit_config(adapter, tmp_path / "bad", edit)
    with pytest.raises(lora.LoraError) as e:
        lora.read_adapter(tmp_path / "bad")
    assert f"{cfg}: {message}" in str(e.value) and "Fix: correct adapter_config.json" in str(e.value)


def test_malformed_adapter_config_through_eval(adapter, tiny_model, tmp_path, capsys):
    cfg = _edit_config(adapter, tmp_path / "bad", lambda c: json.dumps({**c, "lora_alpha": "16"}))
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    before = tree(tmp_path / "bad")
    err = fails(
        capsys, ["eval", "--model", str(tiny_model), "--adapter", str(tmp_path / "bad"), "--data", str(data)]
    )
    assert f"{cfg}: lora_alpha is '16'; expected a finite number" in err
    assert tree(tmp_path / "bad") == before


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_adapter_tensor_is_refused(adapter, tiny_model, tmp_path, capsys, value):
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    weights = bad / "adapter_model.safetensors"
    sd = load_file(weights)
    key = sorted(sd)[0]
    sd[key][0, 0] = value
    save_file(sd, weights)
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    err = fails(capsys, ["eval", "--model", str(tiny_model), "--adapter", str(bad), "--data", str(data)])
    assert (
        f"{weights}: tensor {key} holds NaN or infinite values" in err
        and "Fix: use an earlier checkpoint" in err
    )


def test_apply_refuses_non_finite_factors(tiny_model):
    from transformers import AutoModelForCausalLM

    from lorafit.lora.apply import apply_loras
    from lorafit.lora.peft_format import ModuleLora

    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    name = "model.layers.0.self_attn.o_proj"
    mod = model.get_submodule(name)
    a, b = torch.zeros(2, mod.in_features), torch.zeros(mod.out_features, 2)
    with pytest.raises(lora.LoraError, match=f"lora_alpha of {name} is nan, not a finite number"):
        apply_loras(model, {name: ModuleLora("linear", a, b, 2, math.nan)})
    b[0, 0] = math.inf
    with pytest.raises(lora.LoraError, match=f"{name}.lora_B holds NaN or infinite values"):
        apply_loras(model, {name: ModuleLora("linear", a, b, 2, 4.0)})
    assert not lora.lora_modules(model)  # nothing was injected


# ----------------------------------------------------------------------------- JSON output


def test_printed_json_is_standard():
    text = dumps_json({"eval_loss": math.nan, "ppl": [math.inf, -math.inf, 1.5], "steps": 3, "ok": True})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}")) == {
        "eval_loss": None,
        "ppl": [None, None, 1.5],
        "steps": 3,
        "ok": True,
    }


# ----------------------------------------------------------------------------- generate and chat


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from lorafit.generation import load

    return load(str(tiny_model), device="cpu")


def test_generate_refuses_text_that_is_not_utf8(tiny_model, capsys):
    prompt = b"caf\xe9 ok".decode("utf-8", "surrogateescape")  # what Python makes of a latin-1 argument
    err = fails(capsys, ["generate", "--model", str(tiny_model), "--prompt", prompt, "--device", "cpu"])
    assert "the user text (message 0) has a character that is not text at position 3 (U+DCE9" in err
    assert "Fix: type or pass it again as UTF-8 text" in err


def test_generate_refuses_a_prompt_beyond_the_context(tiny_model, capsys):
    err = fails(
        capsys, ["generate", "--model", str(tiny_model), "--prompt", "x y " * 4200, "--device", "cpu"]
    )
    assert "but the model reads at most 4,096 (max_position_embeddings), leaving no room for a reply" in err


def test_a_reply_is_limited_to_the_room_the_context_leaves():
    from types import SimpleNamespace

    from lorafit.errors import ConfigError
    from lorafit.generation import _fit_context

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=100))
    assert _fit_context(model, 10, 50) == 50
    with pytest.warns(UserWarning, match="the reply is limited to 10 tokens instead of max_new_tokens=50"):
        assert _fit_context(model, 90, 50) == 10
    with pytest.raises(ConfigError, match="max_new_tokens must be at least 1, got 0"):
        _fit_context(model, 10, 0)


def test_chat_says_what_is_wrong_with_a_line_and_goes_on(loaded):
    from lorafit.generation import chat

    model, tok = loaded
    lines = iter([b"\xff\xfe".decode("utf-8", "surrogateescape"), "/exit"])
    printed = []
    chat(model, tok, max_new_tokens=2, input_fn=lambda _: next(lines), print_fn=printed.append)
    assert any(
        p.startswith("error: the user text (message 0) has a character that is not text") for p in printed
    )


def test_malformed_slices_metadata_is_a_problem_not_a_traceback(tmp_path, tok):
    from safetensors import safe_open

    from lorafit.tiny import build_model

    model = lorafit_model(build_model(tok, "demo").eval(), ["q_proj", "v_proj"])
    lora.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = json.loads(f.metadata()["lorafit"])
    name = next(iter(meta["slices"]))
    meta["slices"][name]["split_sizes"] = "many"
    save_file(load_file(weights), weights, metadata={"lorafit": json.dumps(meta)})
    _, _, problems = lora.peft_format.parse_adapter(lora.read_adapter(tmp_path / "a"))
    assert problems == [
        f"malformed lorafit metadata (slices) for {name} in adapter_model.safetensors; Fix: copy the adapter again."
    ]
