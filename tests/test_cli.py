"""End to end through the CLI on a tiny Phi-3: train, files, eval after reload, generate, demo data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import train_argv
from safetensors import safe_open

from lorafit.cli import main
from lorafit.demo import demo_data_dir, make_demo_data


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> tuple[Path, dict]:
    """One short training run shared by the tests below."""
    out = tmp_path_factory.mktemp("run") / "out"
    data = demo_data_dir()
    rc = main(train_argv(tiny_model, data / "train.jsonl", out, eval_data=data / "eval.jsonl", sets=[
        "training_config.max_steps=6", "training_config.logging_steps=2", "training_config.save_steps=3",
        "training_config.max_seq_length=128", "training_config.learning_rate=5e-3", "peft_config.r=4",
        "peft_config.target_modules=[q_proj,v_proj,o_proj,gate_up_proj,down_proj]",
    ]))  # fmt: skip
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_train_writes_the_output_directory(trained):
    out, res = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl",
                 "results.json", "loss.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"].endswith("model")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in keys
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [2, 4, 6]
    assert res["steps"] == 6 and res["eval_loss"] < res["eval_loss_before"]
    assert res["tokens"] > 0 and res["tokens_per_sec"] > 0


def test_eval_after_reload_gives_the_training_eval_loss(trained, tiny_model, capsys):
    out, res = trained
    capsys.readouterr()
    rc = main(["eval", "--model", str(tiny_model), "--adapter", str(out), "--data",
               str(demo_data_dir() / "eval.jsonl"), "--max-seq-length", "128"])  # fmt: skip
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    assert got["eval_loss"] == pytest.approx(res["eval_loss"], rel=1e-5)
    assert got["eval_perplexity"] == pytest.approx(res["eval_perplexity"], rel=1e-5)


def test_generate_prints_a_reply(trained, capsys):
    out, _ = trained
    capsys.readouterr()
    rc = main(["generate", "--adapter", str(out), "--prompt", "417: even or odd?", "--max-new-tokens", "5"])
    assert rc == 0
    assert capsys.readouterr().out.strip("\n") != ""


def test_rerun_in_the_same_directory_is_refused(trained, tiny_model, capsys):
    out, _ = trained
    rc = main(["train", "--model", str(tiny_model), "--data", str(demo_data_dir() / "train.jsonl"),
               "--output-dir", str(out)])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "already holds another run" in err and "--resume" in err and "--overwrite" in err


def test_help_everywhere():
    for cmd in (["--help"], ["train", "--help"], ["eval", "--help"], ["generate", "--help"], ["chat", "--help"],
                ["tiny-model", "--help"], ["demo", "--help"]):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "lorafit", *cmd], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: lorafit" in r.stdout, cmd


def test_model_flag_help_says_it_defaults_to_the_adapters_base():
    for cmd in ("eval", "generate", "chat"):
        r = subprocess.run([sys.executable, "-m", "lorafit", cmd, "--help"], capture_output=True, text=True)
        text = " ".join(r.stdout.split())
        assert r.returncode == 0, cmd
        assert (
            "--model MODEL base model: hub id, local folder or .gguf file (default: the base model recorded in the adapter"
            in (text)
        ), cmd


def test_shipped_demo_data_is_the_generator_output(tmp_path):
    train, ev = make_demo_data(tmp_path)
    assert train.read_text() == (demo_data_dir() / "train.jsonl").read_text()
    assert ev.read_text() == (demo_data_dir() / "eval.jsonl").read_text()
    # held-out prompts share no number or word with training
    train_q = {json.loads(x)["messages"][-2]["content"] for x in train.read_text().splitlines()}
    eval_q = {json.loads(x)["messages"][-2]["content"] for x in ev.read_text().splitlines()}
    assert not train_q & eval_q


def test_sample_finetune_dicts_drive_finetune_config():
    """Microsoft's sample_finetune.py dicts, exactly as written, resolve through the Python API."""
    from lorafit.api import build_config

    training_config = {
        "bf16": True, "do_eval": False, "learning_rate": 5.0e-06, "log_level": "info", "logging_steps": 20,
        "logging_strategy": "steps", "lr_scheduler_type": "cosine", "num_train_epochs": 1, "max_steps": -1,
        "output_dir": "./checkpoint_dir", "overwrite_output_dir": True, "per_device_eval_batch_size": 4,
        "per_device_train_batch_size": 4, "remove_unused_columns": True, "save_steps": 100,
        "save_total_limit": 1, "seed": 0, "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False}, "gradient_accumulation_steps": 1,
        "warmup_ratio": 0.2,
    }  # fmt: skip
    peft_config = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM",
                   "target_modules": "all-linear", "modules_to_save": None}  # fmt: skip
    with pytest.warns(UserWarning):
        cfg = build_config(model="microsoft/Phi-3-mini-4k-instruct", train_data="x.jsonl",
                           training_config=training_config, peft_config=peft_config)  # fmt: skip
    assert cfg.training_config.learning_rate == 5e-6 and cfg.training_config.gradient_checkpointing
    assert cfg.peft_config.r == 16 and cfg.peft_config.target_modules == "all-linear"


def test_the_readme_train_command_with_the_shipped_config(tiny_model, tmp_path, capsys):
    """README's first command, as written (--eval-data over the shipped config's eval_split), trains."""
    from lorafit.config import SHIPPED_CONFIGS_DIR, ConfigWarning

    data, out = demo_data_dir(), tmp_path / "phi3-lora"
    config = SHIPPED_CONFIGS_DIR / "phi3-mini-lora.yaml"
    capsys.readouterr()
    with pytest.warns(ConfigWarning) as record:
        rc = main([
            "train", "--model", str(tiny_model), "--data", str(data / "train.jsonl"), "--eval-data", str(data / "eval.jsonl"),
            "--output-dir", str(out), "--config", str(config), "--no-progress",
            "--set", "training_config.max_steps=2", "--set", "training_config.max_seq_length=128",
            "--set", "training_config.per_device_train_batch_size=1", "--set", "training_config.gradient_accumulation_steps=1",
            "--set", "training_config.eval_steps=2", "--set", "training_config.gradient_checkpointing=false",
            "--set", "peft_config.r=2",
        ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert [str(w.message) for w in record if w.category is ConfigWarning] == [
        f"data.eval from the command line replaces data.eval_split=0.05 from {config}:17"
    ]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["data"]["eval"] == str(data / "eval.jsonl") and resolved["data"]["eval_split"] == 0.0
    assert resolved["model"]["device"] == "auto"
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 2 and res["eval_loss"] > 0
