"""The post-training check (lorafit/adapter_check.py, `lorafit check-adapter`, the end of `train`): a model
that stops passes; one that never emits end-of-turn, one that replies nothing, a broken merge and a saved
adapter that does not give training's eval loss each fail, with exit status 1 from check-adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import lorafit_model, write_jsonl
from torch import nn

import lorafit
from lorafit import adapter_check as ac
from lorafit import lora
from lorafit.cli import main
from lorafit.errors import ConfigError
from lorafit.generation import prompt_text
from lorafit.model import stop_token_ids
from lorafit.tiny import build_model

SYSTEM = "Answer in one word."


def conversation(i: int) -> dict:
    return {
        "messages": [{"role": "user", "content": f"Say ok to {i}."}, {"role": "assistant", "content": "ok"}]
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("check-data")
    return write_jsonl(d / "train.jsonl", *[conversation(i) for i in range(32)]), write_jsonl(
        d / "eval.jsonl", *[conversation(100 + i) for i in range(8)]
    )


@pytest.fixture(scope="module")
def trained(tiny_model, files, tmp_path_factory) -> tuple[Path, dict]:
    """A LoRA adapter that learned to answer "ok" and end its turn (a few seconds on the tiny model)."""
    out = tmp_path_factory.mktemp("run") / "out"
    res = lorafit.finetune(
        model=str(tiny_model), train_data=files[0], eval_data=files[1], output_dir=out, progress=False,
        training_config={"learning_rate": 2e-2, "max_steps": 12, "per_device_train_batch_size": 8,
                         "max_seq_length": 64, "save_strategy": "no", "logging_steps": 4},
        peft_config={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    )  # fmt: skip
    return out, res


def test_an_adapter_trained_to_end_its_turn_passes_and_train_records_the_report(trained):
    out, res = trained
    checks = res["checks"]
    assert checks["verdict"] == "PASS", ac.format_report(checks)
    assert checks["replies"]["stopped"] == checks["replies"]["replies"] == 8
    assert checks["merge"]["status"] == "pass" and checks["reload"]["status"] == "pass"
    assert checks["reload"]["training_eval_loss"] == res["eval_loss"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["checks"]["verdict_line"] == "check: PASS"


def test_check_adapter_passes_the_trained_adapter_and_prints_the_verdict(trained, files, capsys):
    out, _ = trained
    assert main(["check-adapter", "--adapter", str(out), "--data", str(files[1])]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().endswith("check: PASS") and "8/8 stopped at <|end|>" in text


def test_train_skips_the_check_when_post_check_is_false(tiny_model, files, tmp_path):
    res = lorafit.finetune(
        model=str(tiny_model), train_data=files[0], output_dir=tmp_path / "out", progress=False,
        training_config={"max_steps": 1, "max_seq_length": 64, "save_strategy": "no", "post_check": False},
    )  # fmt: skip
    assert "checks" not in res and "checks" not in json.loads((tmp_path / "out" / "results.json").read_text())


# ----------------------------------------------------------------------------- models that fail


def biased_head(model, token_ids: list[int], bias: float):
    """`model` with `bias` added to the logits of `token_ids` at every position (its head gets a bias)."""
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[token_ids] = bias
    model.lm_head = head
    return model


@pytest.fixture
def adapted(tok):
    """The tiny Phi-3 with LoRA (random nonzero B) on attention and MLP, and 8 prompts."""
    model = lorafit_model(build_model(tok, size="demo"), ["qkv_proj", "o_proj", "down_proj"])
    prompts = ac.pick_prompts([conversation(i) for i in range(20)], 8)
    return model, prompts


def test_a_model_that_never_emits_end_of_turn_fails_the_runaway_check(adapted, tok):
    model, prompts = adapted
    biased_head(model, stop_token_ids(tok, model), -1e4)
    r = ac.reply_check(
        model, tok, prompts, ac.Thresholds(max_new_tokens=12), system_message="auto", precision="no"
    )
    assert (r["status"], r["runaway"], r["stopped"], r["max_new_tokens"]) == ("fail", 8, 0, 12)
    assert r["failed"] == ["8/8 replies ran to the limit of 12 tokens without <|end|>"]
    assert [e["kind"] for e in r["examples"]].count("runaway") == 2 and r["examples"][0]["tokens"] == 12


def test_a_model_that_ends_its_turn_at_once_fails_the_empty_check(adapted, tok):
    model, prompts = adapted
    biased_head(model, [tok.convert_tokens_to_ids("<|end|>")], 1e4)
    r = ac.reply_check(model, tok, prompts, ac.Thresholds(), system_message="auto", precision="no")
    assert (r["runaway"], r["empty"], r["status"]) == (0, 8, "fail")
    assert r["failed"] == ["8/8 replies are empty"]
    # one empty reply in 8 is within the default share (0.125); none is allowed with max_empty=0
    assert ac.reply_check(model, tok, prompts[:1] * 8, ac.Thresholds(max_empty=1.0), system_message="auto",
                          precision="no")["status"] == "pass"  # fmt: skip


def test_repetition_measures():
    assert ac.longest_repeat([1, 2, 3, 1, 2, 3, 4]) == 3
    assert ac.longest_repeat([5, 5, 5, 5]) == 3  # overlapping occurrences count
    assert ac.longest_repeat([1, 2, 3]) == 0 and ac.longest_repeat([]) == 0
    assert ac.repeated_share([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(5 / 9)
    assert ac.repeated_share([1, 2, 3]) == 0.0


def test_a_model_that_repeats_one_token_fails_the_repetition_check(adapted, tok):
    model, prompts = adapted
    biased_head(model, [tok.convert_tokens_to_ids("ok")], 1e4)  # "ok ok ok ..." to the limit
    r = ac.reply_check(model, tok, prompts, ac.Thresholds(max_new_tokens=16, max_runaway=1.0),
                       system_message="auto", precision="no")  # fmt: skip
    assert (
        r["repetitive"] == 8
        and r["longest_repeat"] == 15
        and r["failed"] == ["8/8 replies repeat themselves"]
    )


def merge_texts(tok, prompts):
    return [prompt_text(tok, p) + ref for p, ref in prompts[:3]]


def test_the_merge_check_passes_an_exact_merge_and_leaves_the_model_unmerged(adapted, tok):
    model, prompts = adapted
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = ac.merge_check(model, tok, merge_texts(tok, prompts), ac.Thresholds(), precision="no")
    assert m["status"] == "pass" and m["relative_diff"] < 1e-5 and m["tolerance"] == 1e-3
    assert not any(layer.merged for layer in lora.lora_modules(model).values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_merge_check_catches_a_broken_merge(adapted, tok, monkeypatch):
    model, prompts = adapted
    for cls in {type(layer) for layer in lora.lora_modules(model).values()}:
        right = cls.delta_weight
        monkeypatch.setattr(
            cls, "delta_weight", lambda self, right=right: 2 * right(self)
        )  # ΔW counted twice
    m = ac.merge_check(model, tok, merge_texts(tok, prompts), ac.Thresholds(), precision="no")
    assert m["status"] == "fail" and m["relative_diff"] > 1e-2
    assert m["failed"][0].startswith("merged logits differ from base + adapter by")


def test_a_saved_adapter_that_does_not_give_the_training_eval_loss_fails_the_reload_check(
    adapted, tok, tmp_path
):
    model, _ = adapted
    lora.save_adapter(model, tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])

    def loss():
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    saved_loss = loss()
    assert ac.compare_loss(ac.reload_in_place(model, tmp_path / "adapter", loss)[0], saved_loss,
                           ac.Thresholds())["status"] == "pass"  # fmt: skip
    with torch.no_grad():  # the model in memory is no longer the one on disk
        for layer in lora.lora_modules(model).values():
            layer.lora_B.mul_(5)
    trained_b = {n: layer.lora_B.detach().clone() for n, layer in lora.lora_modules(model).items()}
    training_loss = loss()
    reloaded, why = ac.reload_in_place(model, tmp_path / "adapter", loss)
    r = ac.compare_loss(reloaded, training_loss, ac.Thresholds())
    assert why == "" and reloaded == pytest.approx(saved_loss) and r["status"] == "fail"
    assert r["failed"][0].startswith("the reloaded adapter's eval loss is")
    # the model's own factors are back afterwards
    assert all(torch.equal(layer.lora_B, trained_b[n]) for n, layer in lora.lora_modules(model).items())


def test_check_adapter_exits_1_on_a_failed_check_and_2_on_bad_input(trained, files, tmp_path, capsys):
    out, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml"):
        (run / name).write_bytes((out / name).read_bytes())
    results = json.loads((out / "results.json").read_text())
    results["eval_loss"] *= 1.5  # results.json says training ended elsewhere
    (run / "results.json").write_text(json.dumps(results))
    assert main(["check-adapter", "--adapter", str(run), "--data", str(files[1]), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "FAIL" and report["reload"]["status"] == "fail"
    assert report["verdict_line"].startswith("check: FAIL (the reloaded adapter's eval loss is")
    # a looser tolerance (a flag) passes it
    assert (
        main(["check-adapter", "--adapter", str(run), "--data", str(files[1]), "--loss-tolerance", "0.6"])
        == 0
    )
    capsys.readouterr()
    assert main(["check-adapter", "--adapter", str(run), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["check-adapter", "--adapter", str(run), "--data", str(files[1]), "--max-empty", "2"]) == 2
    assert "max_empty is a share of replies, between 0 and 1" in capsys.readouterr().err


def test_thresholds_are_validated():
    with pytest.raises(ConfigError, match="sample must be at least 1"):
        ac.Thresholds(sample=0)
    with pytest.raises(ConfigError, match="loss_tolerance must be a number >= 0"):
        ac.Thresholds(loss_tolerance=-1)


def test_prompts_are_the_conversations_up_to_their_last_assistant_turn():
    convs = [
        {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d"}]},
        {"messages": [{"role": "assistant", "content": "no user turn before"}]},
    ]  # fmt: skip
    assert ac.pick_prompts(convs, 8) == [(convs[0]["messages"][:4], "d")]
    spread = ac.pick_prompts([conversation(i) for i in range(16)], 4)
    assert [p[-1]["content"] for p, _ in spread] == [
        "Say ok to 0.",
        "Say ok to 4.",
        "Say ok to 8.",
        "Say ok to 12.",
    ]


def test_the_checks_reply_in_eval_mode_and_leave_a_training_model_training(adapted, tok):
    model, prompts = adapted
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    model.train()
    report = ac.run_checks(model, tok, prompts, ac.Thresholds(max_new_tokens=4), system_message="auto",
                           precision="no", reload=lambda: {"status": "skipped", "why": "-"}, prompts_from="test")  # fmt: skip
    assert seen and not any(seen) and model.training
    assert report["reload"]["status"] == "skipped" and report["verdict_line"].startswith("check: ")
