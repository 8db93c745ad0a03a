"""Bad input never hurts: every case below ends with exit status 2, a message that names the file and
line (or the key) and says how to fix it, and NO output directory created or changed.

All through the CLI in this process (`lorafit.cli.main([...])`), stderr captured with capsys.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import train_argv, tree, write_jsonl

from lorafit.cli import main
from lorafit.demo import demo_data_dir
from lorafit.errors import ConfigError

GOOD = {
    "messages": [{"role": "user", "content": "2: even or odd?"}, {"role": "assistant", "content": "even"}]
}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model) -> Path:
    """A real 2-step run: its output directory (final adapter + checkpoint-1, checkpoint-2)."""
    out = tmp_path_factory.mktemp("bad") / "trained"
    args = train(tiny_model, demo_data_dir() / "train.jsonl", out, "--set", "training_config.save_steps=1")
    assert main(args) == 0
    return out


def train(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    sets = ["training_config.max_steps=2", "training_config.max_seq_length=64", "peft_config.r=2"]
    return train_argv(model, data, out, *extra, sets=sets)


def fails(capsys, args: list[str]) -> str:
    """Run the CLI, expect exit status 2 and return stderr (one message, no traceback)."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err[err.index("error: ") :]  # (transformers may have drawn a progress bar before)


# ----------------------------------------------------------------------------- data files

DATA_CASES = {
    "malformed JSON line": (
        [GOOD, '{"messages": [{"role": "user", "content": "hi"}'],
        ["train.jsonl:2: malformed JSON", "each line must be one complete JSON object"],
    ),
    "row without messages": (
        [GOOD, {"text": "Hello there"}],
        ["train.jsonl:2: no recognized layout (keys: 'text')", '{"messages": [{"role": "user"'],
    ),
    "unknown role": (
        [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
        [
            "train.jsonl:1: messages[0] has unknown role 'human' (use 'user')",
            "valid roles: system, user, assistant",
        ],
    ),
    "empty content": (
        [GOOD, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}],
        ["train.jsonl:2: messages[1] content is empty; give it text or remove it"],
    ),
    "no assistant turn": (
        [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}],
        [
            "train.jsonl:1: no assistant turn, so nothing to train on; add an assistant reply or drop the record"
        ],
    ),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_record(tiny_model, tmp_path, capsys, case):
    records, expected = DATA_CASES[case]
    out = tmp_path / "out"
    err = fails(capsys, train(tiny_model, write_jsonl(tmp_path / "train.jsonl", *records), out))
    for text in expected:
        assert text in err
    assert "Fix: correct or delete these records" in err
    assert not out.exists()


def test_non_utf8_file(tiny_model, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(json.dumps(GOOD).encode() + b'\n{"messages": "caf\xe9"}\n')
    err = fails(capsys, train(tiny_model, data, tmp_path / "out"))
    assert "train.jsonl:2: not valid UTF-8 (byte 0xe9" in err and "re-save the file as UTF-8" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_data_file(tiny_model, tmp_path, capsys, content):
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    err = fails(capsys, train(tiny_model, data, tmp_path / "out"))
    assert "train.jsonl: the file is empty. Fix: point to a file with training records" in err
    assert not (tmp_path / "out").exists()


def test_missing_data_file(tiny_model, tmp_path, capsys):
    err = fails(capsys, train(tiny_model, tmp_path / "nope.jsonl", tmp_path / "out"))
    assert "nope.jsonl: no such file. Fix: check the path" in err
    assert not (tmp_path / "out").exists()


def test_too_long_conversation_without_truncation(tiny_model, tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]}
    data = write_jsonl(tmp_path / "train.jsonl", GOOD, long, GOOD)
    err = fails(capsys, train(tiny_model, data, tmp_path / "out", "--set", "data.truncation=false"))
    assert "examples longer than max_seq_length=64: 1 problem in 1 record" in err
    assert "train.jsonl:2: 2" in err and "tokens > max_seq_length 64" in err
    assert "Fix: raise max_seq_length, shorten these conversations, or allow truncation" in err
    assert not (tmp_path / "out").exists()


def test_all_data_errors_are_reported_together(tiny_model, tmp_path, capsys):
    """One pass over the file: the first 20 problems with their lines, and the count of the rest."""
    bad = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "bot", "content": ""}]}
        for i in range(12)
    ]
    data = write_jsonl(tmp_path / "train.jsonl", GOOD, *bad, "{oops", GOOD)
    err = fails(capsys, train(tiny_model, data, tmp_path / "out"))
    assert "train.jsonl: 25 problems in 13 records:" in err
    assert "train.jsonl:2: messages[1] has unknown role 'bot' (use 'assistant')" in err
    assert "train.jsonl:2: messages[1] content is empty" in err
    listed = [line for line in err.splitlines() if line.startswith("  ") and "train.jsonl:" in line]
    assert len(listed) == 20 and "... and 5 more problems (13 records affected)" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- config


def test_unknown_config_key(tiny_model, tmp_path, capsys):
    err = fails(capsys, train(tiny_model, demo_data_dir() / "train.jsonl", tmp_path / "out",
                              "--set", "training_config.learning_rat=1e-4"))  # fmt: skip
    assert "training_config.learning_rat: unknown key (did you mean 'learning_rate'?)" in err
    assert "--set training_config.learning_rat=1e-4" in err
    assert not (tmp_path / "out").exists()


def test_wrong_value_type(tiny_model, tmp_path, capsys):
    err = fails(capsys, train(tiny_model, demo_data_dir() / "train.jsonl", tmp_path / "out",
                              "--set", "training_config.max_steps=ten"))  # fmt: skip
    assert "training_config.max_steps: expected -1 or an integer >= 1, got 'ten' (str)" in err
    assert not (tmp_path / "out").exists()


def test_wrong_value_in_a_config_file_names_its_line(tiny_model, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("training_config:\n  max_steps: 2\n  learning_rate: fast\npeft_config:\n  r: 2\n")
    err = fails(capsys, ["train", "--model", str(tiny_model), "--data", str(demo_data_dir() / "train.jsonl"),
                         "--config", str(cfg), "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert f"{cfg}:3: training_config.learning_rate: expected a float > 0, got 'fast' (str)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["-1", "two"])
def test_skip_nonfinite_batches_is_validated(tiny_model, tmp_path, capsys, value):
    err = fails(capsys, train(tiny_model, demo_data_dir() / "train.jsonl", tmp_path / "out",
                              "--set", f"training_config.skip_nonfinite_batches={value}"))  # fmt: skip
    assert "training_config.skip_nonfinite_batches: expected an integer >= 0" in err
    assert not (tmp_path / "out").exists()


def test_target_modules_that_match_nothing(tiny_model, tmp_path, capsys):
    err = fails(capsys, train(tiny_model, demo_data_dir() / "train.jsonl", tmp_path / "out",
                              "--set", "peft_config.target_modules=[q_projection]"))  # fmt: skip
    assert "peft_config.target_modules: inject(): target_modules=['q_projection'] matched no layer" in err
    assert "model.layers.*.self_attn.qkv_proj (Linear)" in err and "Fix: pass target_modules" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- models, adapters, checkpoints


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_adapter_for_another_base_model(adapter, other_tiny_model, capsys, command):
    before = tree(adapter)
    extra = ["--data", str(demo_data_dir() / "eval.jsonl")] if command == "eval" else ["--prompt", "hi"]
    err = fails(capsys, [command, "--model", str(other_tiny_model), "--adapter", str(adapter), *extra])
    assert (
        f"adapter {adapter} was trained on base model" in err
        and f"not on this model ({other_tiny_model})" in err
    )
    assert "16 adapted weight(s) have other shapes" in err and "Fix: load it onto" in err
    assert tree(adapter) == before


def test_corrupt_adapter_safetensors(adapter, tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad-adapter"
    shutil.copytree(adapter / "checkpoint-2", bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = fails(capsys, ["eval", "--model", str(tiny_model), "--adapter", str(bad), "--data",
                         str(demo_data_dir() / "eval.jsonl")])  # fmt: skip
    assert f"{weights}: corrupt or truncated safetensors file" in err and "Fix: copy the adapter again" in err


def test_corrupt_base_model_safetensors(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_model, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = fails(capsys, train(bad, demo_data_dir() / "train.jsonl", tmp_path / "out"))
    assert f"cannot load the base model {str(bad)!r}: SafetensorError" in err and "download it again" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage",
    ["adapter_model.safetensors", "training_state.pt", "trainer_state.json"],
)
def test_resume_from_a_corrupt_checkpoint_changes_nothing(adapter, tiny_model, tmp_path, capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(adapter, out)
    target = out / "checkpoint-2" / damage
    target.write_bytes(target.read_bytes()[:100])
    before = tree(out)
    err = fails(capsys, train(tiny_model, demo_data_dir() / "train.jsonl", out, "--resume",
                              "--set", "training_config.save_steps=1"))  # fmt: skip
    assert str(out / "checkpoint-2") in err
    if damage != "trainer_state.json":
        assert f"Fix: resume from an older checkpoint (--resume {out / 'checkpoint-1'})" in err
    assert tree(out) == before


# ----------------------------------------------------------------------------- output directory


def test_output_directory_beneath_a_regular_file(tiny_model, tmp_path, capsys):
    """The read-only case that also holds for root (tests run as root here, where chmod 0o555 does not
    stop writes): a path whose parent is a regular file cannot be created."""
    parent = tmp_path / "a-file"
    parent.write_text("not a folder")
    err = fails(capsys, train(tiny_model, demo_data_dir() / "train.jsonl", parent / "out"))
    assert f"cannot write to output directory {parent / 'out'}: Not a directory" in err
    assert "Fix: choose a writable --output-dir" in err
    assert parent.read_text() == "not a folder"


def test_output_directory_under_proc(tiny_model, capsys):
    err = fails(capsys, train(tiny_model, demo_data_dir() / "train.jsonl", Path("/proc/lorafit-test-out")))
    assert "cannot write to output directory /proc/lorafit-test-out" in err
    assert not Path("/proc/lorafit-test-out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder; see the beneath-a-file test")
def test_output_directory_in_a_read_only_folder(tiny_model, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = fails(capsys, train(tiny_model, demo_data_dir() / "train.jsonl", ro / "out"))
        assert "cannot write to output directory" in err and "Permission denied" in err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_output_directory_that_is_a_file(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("mine")
    err = fails(capsys, train(tiny_model, demo_data_dir() / "train.jsonl", out))
    assert f"output directory {out} is a file" in err and out.read_text() == "mine"


# ----------------------------------------------------------------------------- devices


def test_a_device_that_is_not_there_fails_before_anything_loads(tiny_model, tmp_path, capsys, monkeypatch):
    import lorafit.job

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the device was checked")

    monkeypatch.setattr(lorafit.job, "load_model", must_not_load)
    monkeypatch.setattr(lorafit.job, "load_tokenizer", must_not_load)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  dtype: bf16\n  device: cuda:99\n")
    err = fails(
        capsys, train(tiny_model, demo_data_dir() / "train.jsonl", tmp_path / "out", "--config", str(cfg))
    )
    assert err.startswith(f"error: {cfg}:3: model.device: 'cuda:99' is not available: ")
    assert "Fix: set model.device to 'auto'" in err and "or 'cpu', e.g. --set model.device=auto" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_device_missing_says_why(monkeypatch):
    import torch

    from lorafit.model import device_missing, resolve_device

    assert device_missing("cpu") is None
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    assert device_missing("cuda") == "this PyTorch was built without CUDA"
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert device_missing("cuda:0").startswith("no CUDA GPU is visible")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_missing("cuda") is None and device_missing("cuda:1") is None
    assert device_missing("cuda:3") == "there are 2 CUDA GPUs (cuda:0..cuda:1)"
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device_missing("mps") == "MPS (Apple GPU) is not available on this machine"
    with pytest.raises(
        ConfigError, match=r"^--set model.device=cuda:3: model.device: 'cuda:3' is not available"
    ):
        resolve_device("cuda:3", "model.device", "--set model.device=cuda:3")
    assert resolve_device("cpu") == torch.device("cpu")


def test_generate_on_a_device_that_is_not_there(tiny_model, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    err = fails(capsys, ["generate", "--model", str(tiny_model), "--device", "cuda", "--prompt", "hi"])
    assert err.startswith("error: device: 'cuda' is not available: this PyTorch was built without CUDA.")
    assert "Fix: set device to 'auto'" in err


# ----------------------------------------------------------------------------- numbers and empty training sets


def test_a_learning_rate_that_overflows_is_a_config_error(tiny_model, tmp_path, capsys):
    err = fails(capsys, train(tiny_model, demo_data_dir() / "train.jsonl", tmp_path / "out",
                              "--set", "training_config.learning_rate=1e38"))  # fmt: skip
    assert err.startswith(
        "error: invalid config: --set training_config.learning_rate=1e38: training_config.learning_rate: 1e+38 is "
        "too large: AdamW's first step is learning_rate / (1 - adam_beta1) = 1e+39"
    )
    assert "Fix: a learning rate such as 2e-4" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_training_data_of_which_nothing_would_train(tiny_model, tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "even"}]}
    data = write_jsonl(tmp_path / "long.jsonl", long, long, long)
    err = fails(capsys, train(tiny_model, data, tmp_path / "out"))  # max_seq_length 64
    assert err.startswith(
        f"error: {data}: no example would train: all 3 conversation(s) are dropped: 3 are longer than "
        "max_seq_length=64 and their trained tokens (the assistant replies) come after the cut. Fix: a larger"
    )
    assert not (tmp_path / "out").exists()


def test_more_epochs_than_steps_can_count(tiny_model, tmp_path, capsys):
    args = train(tiny_model, demo_data_dir() / "train.jsonl", tmp_path / "out")
    args[args.index("training_config.max_steps=2")] = "training_config.num_train_epochs=1e308"
    err = fails(capsys, args)
    assert err.startswith("error: training_config.num_train_epochs: 1e+308 epochs of ")
    assert "is more steps than can be counted. Fix: fewer epochs, or a number of steps with max_steps" in err
    assert not (tmp_path / "out").exists()
