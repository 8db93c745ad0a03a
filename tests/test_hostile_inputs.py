"""Hostile inputs, at the library level: what tests/test_guarantees.py (every command against every kind
of hostile input, through the CLI) does not show -- that an enormous record is clipped before the
tokenizer sees it, the same unreadable JSON in a .json file, each malformed adapter_config.json, non-finite
factors refused before injection, standard JSON output, the room a reply gets in the context.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import lorafit_model, write_jsonl
from hostile_cases import ADAPTER_CONFIGS, DATA_LINES, GOOD
from safetensors.torch import load_file, save_file

from lorafit import lora, tokens
from lorafit.cli import dumps_json
from lorafit.data import load_conversations
from lorafit.errors import DataError
from lorafit.tokens import CHARS_PER_TOKEN, tokenize

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


# ----------------------------------------------------------------------------- JSON Python cannot read


@pytest.mark.parametrize("case", ["deep-json", "huge-int", "surrogate"])
def test_json_python_cannot_read_is_a_data_error_in_a_json_file_too(tmp_path, case):
    """tests/test_guarantees.py runs these lines as JSONL through every command; here as one .json list."""
    line, _, _ = DATA_LINES[case]
    (tmp_path / "d.json").write_text("[" + json.dumps(GOOD) + ", " + line + "]")
    with pytest.raises(DataError, match=r"d\.json"):
        load_conversations(tmp_path / "d.json")


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


@pytest.mark.parametrize("case", list(ADAPTER_CONFIGS))
def test_malformed_adapter_config_is_named(adapter, tmp_path, case):
    edit, message = ADAPTER_CONFIGS[case]
    cfg = _edit_config(adapter, tmp_path / "bad", edit)
    with pytest.raises(lora.LoraError) as e:
        lora.read_adapter(tmp_path / "bad")
    assert f"{cfg}: {message}" in str(e.value) and "Fix: correct adapter_config.json" in str(e.value)


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
