"""End to end on every model family (tests/families.py): a tiny random model of the real transformers
class with the family's real tokenizer and chat template, through train, eval, generate, chat, merge
and PEFT export/import.

Each family trains one short reply ("OK" after a fixed prompt with a system message) for 30 steps,
enough for the tiny model to answer it greedily, so generation is seen to stop at the end-of-turn
token the template writes. The real Phi-3-mini template (it renders no system message) gets the
issue's done-when checks: the system message is folded with one warning, `check-data` says so,
`chat --system` sends what training saw, and data.system_message=error writes nothing.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from families import FAMILIES, family_tokenizer, write_family_model

import lorafit
from lorafit.adapters import recorded_system_message
from lorafit.check import check_data, format_report
from lorafit.cli import build_parser, main, system_message_policy
from lorafit.errors import DataError
from lorafit.export import export_adapter
from lorafit.generation import build_messages, generate_batch, load, prompt_text
from lorafit.model import end_of_turn, load_tokenizer, stop_token_ids
from lorafit.templates import ChatTemplate, SystemMessageWarning, prepare, render
from lorafit.tokens import encode

SYSTEM, PROMPT, REPLY = "Answer in one word.", "Say OK", "OK"
CONV = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": PROMPT},
    {"role": "assistant", "content": REPLY},
]
END_OF_TURN = {"phi3": "<|end|>", "qwen2": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>",
               "gemma": "<end_of_turn>", "smollm2": "<|im_end|>"}  # fmt: skip
SYSTEM_ACTION = {"phi3": "folded", "qwen2": "kept", "llama3": "kept", "mistral": "folded", "gemma": "folded",
                 "smollm2": "kept"}  # fmt: skip
NAMED_TARGETS = {"phi3": ["qkv_proj", "o_proj"]}  # Phi-3's fused attention; the others have q_proj, v_proj
TRAINING = {"max_steps": 30, "learning_rate": 1e-2, "per_device_train_batch_size": 4, "save_strategy": "no",
            "logging_steps": 100, "lr_scheduler_type": "constant", "max_seq_length": 128}  # fmt: skip

peft = pytest.importorskip("peft")


def finetune(
    model: Path, data: Path, out: Path, *, targets="all-linear", eval_data=None, overrides=(), **train
):
    return lorafit.finetune(
        model=str(model), train_data=str(data), eval_data=eval_data and str(eval_data), overwrite=True,
        training_config={**TRAINING, "output_dir": str(out), **train}, overrides=list(overrides),
        peft_config={"r": 8, "lora_alpha": 16, "target_modules": targets}, progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, tmp_path_factory):
    """(family, model folder, data file, adapter folder, results) of 30 steps on the one reply."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model = write_family_model(name, root / "model")
    data = write_jsonl(root / "train.jsonl", *[{"messages": CONV}] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SystemMessageWarning)
        res = finetune(model, data, root / "out", eval_data=data, eval_strategy="steps", eval_steps=30)
    return name, model, data, root / "out", res


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


class Collect:
    """A generate() streamer that keeps the new token ids (the first put is the prompt)."""

    def __init__(self):
        self.puts: list[list[int]] = []

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        pass

    @property
    def new(self) -> list[int]:
        return [i for p in self.puts[1:] for i in p]


def test_the_end_of_turn_token_is_the_templates_is_trained_and_is_never_the_pad(run):
    name, model, _, _, _ = run
    tok = load_tokenizer(str(model))  # as training loads it
    eot = end_of_turn(tok)
    assert eot == END_OF_TURN[name] == ChatTemplate.probe(tok).end_of_turn
    eot_id = tok.convert_tokens_to_ids(eot)
    assert tok.pad_token_id is not None and tok.pad_token_id != eot_id and tok.pad_token != eot
    messages, _ = prepare(CONV, ChatTemplate.probe(tok))
    ids, sup = encode(tok, messages, end_of_turn=eot)
    trained = [i for i, s in zip(ids, sup) if s]
    assert trained[-1] == eot_id and tok.decode(trained[:-1]).strip() == REPLY


def test_training_learns_the_reply_and_generation_stops_at_the_end_of_turn(run):
    name, model, data, out, res = run
    net, tok = load(None, out, device="cpu")
    eot_id = tok.convert_tokens_to_ids(END_OF_TURN[name])
    assert eot_id in stop_token_ids(tok, net)
    streamer = Collect()
    reply = generate_batch(net, tok, [build_messages(PROMPT, SYSTEM)], max_new_tokens=8, streamer=streamer)[0]
    assert reply == REPLY
    assert streamer.new[-1] == eot_id and eot_id not in streamer.new[:-1]  # it stopped right there
    assert res["eval_loss"] < res["eval_loss_before"]
    again = lorafit.evaluate(str(model), data, str(out), device="cpu")
    assert again["eval_loss"] == pytest.approx(res["eval_loss"], rel=1e-3)


def test_a_system_message_is_kept_or_folded_per_family_and_inference_renders_what_training_did(run):
    name, model, _, _, res = run
    assert res["train_data"]["system_messages"] == {SYSTEM_ACTION[name]: 4}
    tok = load_tokenizer(str(model))
    trained, _ = prepare(CONV, ChatTemplate.probe(tok))
    training_text = render(tok, trained, add_generation_prompt=False)
    prompt = prompt_text(tok, CONV[:-1])
    assert training_text.startswith(prompt) and training_text[len(prompt) :].startswith(REPLY)
    assert SYSTEM in prompt  # never lost


def test_named_targets_of_the_family_train(run, tmp_path):
    name, model, data, _, _ = run
    targets = NAMED_TARGETS.get(name, ["q_proj", "v_proj"])
    res = finetune(model, data, tmp_path / "named", targets=targets, max_steps=2)
    assert res["adapted_modules"] == 2 * len(targets)  # two layers
    config = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == set(targets)


def test_merge_and_peft_export_and_import_give_the_adapters_logits(run, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    name, model, _, out, _ = run
    net, tok = load(str(model), out, device="cpu", dtype="fp32")
    ids = torch.tensor(
        [tok(prompt_text(tok, build_messages(PROMPT, SYSTEM)), add_special_tokens=False)["input_ids"]]
    )
    ours = logits_of(net, ids)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    assert (ours - logits_of(base, ids)).abs().max() > 1e-3  # the adapter does something

    merged = lorafit.merge_adapter(str(model), out, tmp_path / "merged", dtype="fp32")
    assert (logits_of(AutoModelForCausalLM.from_pretrained(merged).eval(), ids) - ours).abs().max() < 1e-4

    exported = lorafit.export_adapter(out, tmp_path / "exported", "fused", str(model))
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(exported)).eval()
    assert (logits_of(theirs, ids) - ours).abs().max() < 1e-4

    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    imported, _ = load(str(model), tmp_path / "peft", device="cpu", dtype="fp32")
    assert (logits_of(imported, ids) - logits_of(peft_model.eval(), ids)).abs().max() < 1e-4


# ----------------------------------------------------------------------------- the real Phi-3-mini template


@pytest.fixture(scope="module")
def phi3(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("phi3-real")
    return write_family_model("phi3", root / "model"), write_jsonl(
        root / "train.jsonl", *[{"messages": CONV}] * 3
    )


def test_phi3_default_training_folds_the_system_message_with_one_warning(phi3, tmp_path):
    model, data = phi3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = finetune(model, data, tmp_path / "out", max_steps=1)
    said = [str(w.message) for w in caught if issubclass(w.category, SystemMessageWarning)]
    assert len(said) == 1 and "3 of 3 conversations" in said[0] and "folded" in said[0]
    assert res["train_data"]["system_messages"] == {"folded": 3}


def test_phi3_system_message_error_stops_before_anything_is_written(phi3, tmp_path, capsys):
    model, data = phi3
    out = tmp_path / "out"
    rc = main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--no-progress",
               "--set", "data.system_message=error", "--set", "training_config.max_steps=1"])  # fmt: skip
    assert rc == 2
    assert "renders no system message" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_phi3_check_data_shows_the_fold_and_error_refuses(phi3):
    model, data = phi3
    report = check_data(str(model), data)
    assert report["system_messages"] == {"folded": 3} and not report["template_renders_system"]
    text = format_report(report)
    print(text)
    assert "folded into the first user turn: the template renders none" in text
    assert f"{SYSTEM}\n\n{PROMPT}" in report["example"]["text"]
    assert any("folded into the first user turn" in w for w in report["warnings"])
    with pytest.raises(DataError, match="renders no system message"):
        check_data(str(model), data, system_message="error")


def test_phi3_chat_with_a_system_prompt_sends_what_training_saw(phi3, tmp_path, capsys, monkeypatch):
    model, data = phi3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SystemMessageWarning)
        finetune(model, data, tmp_path / "out")
    tok = load_tokenizer(str(model))
    training_text = render(tok, prepare(CONV, ChatTemplate.probe(tok))[0], add_generation_prompt=False)
    assert training_text.startswith(prompt_text(tok, CONV[:-1]) + REPLY + "<|end|>")
    assert SYSTEM in prompt_text(tok, CONV[:-1])
    # the template alone would send no system text at all
    assert SYSTEM not in tok.apply_chat_template(CONV[:-1], tokenize=False, add_generation_prompt=True)

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPT}\n/exit\n"))
    capsys.readouterr()
    assert (
        main(["chat", "--adapter", str(tmp_path / "out"), "--system", SYSTEM, "--max-new-tokens", "8"]) == 0
    )
    assert REPLY in capsys.readouterr().out
    assert (
        main(["chat", "--adapter", str(tmp_path / "out"), "--system", SYSTEM, "--system-message", "error"])
        == 2
    )
    assert "renders no system message" in capsys.readouterr().err


def test_generate_and_chat_use_the_policy_the_adapter_records(phi3, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, data = phi3
    out = tmp_path / "out"
    finetune(model, data, out, max_steps=1, overrides=["data.system_message=drop"])
    assert recorded_system_message(out) == "drop"
    recorded = tmp_path / "recorded"
    shutil.copytree(out, recorded)
    weights = recorded / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta["lorafit"] = json.dumps({**json.loads(meta["lorafit"]), "system_message": "drop"})
    save_file(tensors, weights, metadata=meta)
    assert recorded_system_message(recorded) == "drop"

    parse = build_parser().parse_args
    assert system_message_policy(parse(["generate", "--adapter", str(recorded), "--prompt", "x"])) == "drop"
    given = ["chat", "--adapter", str(recorded), "--system-message", "fold"]
    assert system_message_policy(parse(given)) == "fold"
    assert system_message_policy(parse(["generate", "--model", str(model), "--prompt", "x"])) == "auto"
    tok = load_tokenizer(str(model))
    assert SYSTEM not in prompt_text(tok, CONV[:-1], system_message="drop")


def test_training_records_its_system_message_policy_in_the_adapter(phi3, tmp_path):
    model, data = phi3
    finetune(model, data, tmp_path / "out", max_steps=1, overrides=["data.system_message=drop"])
    assert recorded_system_message(tmp_path / "out") == "drop"
    for layout in ("split", "stacked"):  # a converted adapter keeps the record
        export_adapter(tmp_path / "out", tmp_path / layout, layout=layout)
        assert recorded_system_message(tmp_path / layout) == "drop"


def test_an_adapter_without_a_record_is_auto(tmp_path):
    assert recorded_system_message(tmp_path / "nothing-here") == "auto"
    assert family_tokenizer("phi3").chat_template  # the real template is what the module tests
