"""Tests of lorafit.config: defaults, checking, precedence, files, warnings, save/load."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Literal

import pytest
import yaml

from lorafit.config import (
    IGNORED_PEFT_KEYS,
    IGNORED_TRAINING_KEYS,
    SECTIONS,
    SHIPPED_CONFIGS_DIR,
    UNSUPPORTED_PEFT_OPTIONS,
    ConfigWarning,
    DataConfig,
    ModelConfig,
    PeftConfig,
    RunConfig,
    TrainingConfig,
    load_config,
    save_config,
)
from lorafit.config.base import Section, option
from lorafit.errors import ConfigError, LorafitError

# Microsoft's sample_finetune.py (Phi-3-mini-4k-instruct), verbatim.
training_config = {
    "bf16": True,
    "do_eval": False,
    "learning_rate": 5.0e-06,
    "log_level": "info",
    "logging_steps": 20,
    "logging_strategy": "steps",
    "lr_scheduler_type": "cosine",
    "num_train_epochs": 1,
    "max_steps": -1,
    "output_dir": "./checkpoint_dir",
    "overwrite_output_dir": True,
    "per_device_eval_batch_size": 4,
    "per_device_train_batch_size": 4,
    "remove_unused_columns": True,
    "save_steps": 100,
    "save_total_limit": 1,
    "seed": 0,
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.2,
}
peft_config = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": "all-linear",
    "modules_to_save": None,
}
SAMPLE_IGNORED = ["do_eval", "log_level", "logging_strategy", "overwrite_output_dir", "remove_unused_columns"]


def config_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ConfigWarning)]


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- defaults


def test_defaults_are_valid_and_documented_values():
    cfg = RunConfig()
    assert cfg.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"
    assert (
        cfg.model.dtype == "auto" and cfg.model.attn_implementation == "sdpa" and cfg.model.device == "auto"
    )
    assert cfg.data.train is None and cfg.data.train_on == "assistant" and cfg.data.truncation is True
    t = cfg.training_config
    assert (t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (2e-4, 4, 1)
    assert (t.num_train_epochs, t.max_steps, t.lr_scheduler_type) == (1.0, -1, "linear")
    assert (t.eval_strategy, t.save_strategy, t.save_steps, t.seed) == ("no", "steps", 500, 42)
    assert t.bf16 is None and t.fp16 is False and t.max_seq_length == 2048 and t.packing is True
    p = cfg.peft_config
    assert (p.r, p.lora_alpha, p.lora_dropout, p.bias) == (16, 32, 0.0, "none")
    assert (p.task_type, p.target_modules, p.init_lora_weights, p.lora_dtype) == (
        "CAUSAL_LM",
        "all-linear",
        True,
        "auto",
    )
    assert issubclass(ConfigError, LorafitError)


def test_construction_is_validated():
    with pytest.raises(ConfigError, match=r"training_config\.learning_rate: expected a float > 0, got -1"):
        TrainingConfig(learning_rate=-1)
    with pytest.raises(ConfigError, match="peft_config.r"):
        dataclasses.replace(PeftConfig(), r=0)
    with pytest.raises(ConfigError, match="model.device"):
        ModelConfig(device="gpu")
    with pytest.raises(TypeError):
        RunConfig(model={"name_or_path": "x"})


# ------------------------------------------------------------------------------- Microsoft's sample dicts


def test_sample_finetune_dicts_load_exactly_and_warn_once_per_ignored_key():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cfg = RunConfig.from_dict(
            {"training_config": training_config, "peft_config": peft_config}, source="sample_finetune.py"
        )
    for key, value in training_config.items():
        if key not in SAMPLE_IGNORED:
            assert getattr(cfg.training_config, key) == value, key
    for key, value in peft_config.items():
        assert getattr(cfg.peft_config, key) == value, key
    assert isinstance(cfg.training_config.num_train_epochs, float)
    messages = config_warnings(record)
    assert len(messages) == len(SAMPLE_IGNORED) == len(record)
    for key, message in zip(SAMPLE_IGNORED, messages):
        assert message.startswith(f"sample_finetune.py: training_config.{key} is ignored: ")
        assert "\n" not in message
    # the ignored keys are not part of the resolved config, so a round trip does not warn again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_sections_load_on_their_own():
    with pytest.warns(ConfigWarning) as record:
        t = TrainingConfig.from_dict(training_config, source="x.yaml")
    assert len(record) == len(SAMPLE_IGNORED)
    assert (
        t.learning_rate == 5e-6
        and t.warmup_ratio == 0.2
        and t.gradient_checkpointing_kwargs == {"use_reentrant": False}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = PeftConfig.from_dict(peft_config)
    assert p.lora_dropout == 0.05 and p.modules_to_save is None
    assert DataConfig.from_dict({"train": "t.jsonl"}).train == "t.jsonl"
    assert ModelConfig.from_dict(None) == ModelConfig()


def test_shipped_sample_finetune_yaml_is_microsofts_dicts():
    data = yaml.safe_load((SHIPPED_CONFIGS_DIR / "sample_finetune.yaml").read_text())
    assert data == {"training_config": training_config, "peft_config": peft_config}


# ---------------------------------------------------------------------------------------- error messages


def test_unknown_key_lists_valid_keys():
    message = error_of(RunConfig.from_dict, {"model": {"nme_or_path": "x"}}, source="cfg.yaml")
    assert message == (
        "invalid config: cfg.yaml: model.nme_or_path: unknown key (did you mean 'name_or_path'?); "
        "valid keys: adapter, attn_implementation, bnb_4bit_compute_dtype, bnb_4bit_use_double_quant, device, dtype, "
        "name_or_path, quantization, revision, trust_remote_code"
    )
    message = error_of(TrainingConfig.from_dict, {"learnig_rate": 1e-4})
    assert (
        "training_config.learnig_rate: unknown key (did you mean 'learning_rate'?); valid keys: " in message
    )
    assert "adam_beta1, adam_beta2, adam_epsilon, bf16, eval_steps, eval_strategy, fp16," in message
    message = error_of(RunConfig.from_dict, {"trainng_config": {}})
    assert message == (
        "invalid config: <dict>: trainng_config: unknown section (did you mean 'training_config'?); "
        "valid sections: model, data, training_config, peft_config"
    )


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("training_config", "learning_rate", "abc", "expected a float > 0, got 'abc' (str)"),
        ("training_config", "per_device_train_batch_size", True, "expected an integer >= 1, got True (bool)"),
        ("training_config", "num_train_epochs", True, "expected a float > 0, got True (bool)"),
        ("training_config", "max_steps", 10.5, "expected -1 or an integer >= 1, got 10.5 (float)"),
        ("training_config", "packing", "yes", "expected true or false, got 'yes' (str)"),
        ("training_config", "bf16", 1, "expected true, false or null (auto), got 1 (int)"),
        (
            "training_config",
            "lr_scheduler_type",
            "cosine_with_restarts",
            "expected one of 'linear', 'cosine'",
        ),
        ("training_config", "gradient_checkpointing_kwargs", [1], "expected a mapping"),
        ("model", "revision", 1.0, "expected a non-empty string or null, got 1.0 (float); quote it in YAML"),
        ("model", "device", 0, "for a GPU index write cuda:N"),
        ("data", "eval_split", 1.5, "expected a float in [0, 1), got 1.5 (float)"),
        ("peft_config", "lora_alpha", "big", "expected a number > 0, got 'big' (str)"),
        ("peft_config", "target_modules", [], "expected 'all-linear', a module name, a regular expression"),
        ("peft_config", "target_modules", "q_proj(", "'q_proj(' is not a valid regular expression"),
        ("peft_config", "modules_to_save", "lm_head", "write [lm_head]"),
    ],
)
def test_wrong_type_names_key_type_and_value(section, key, value, expected):
    message = error_of(RunConfig.from_dict, {section: {key: value}})
    assert f"{section}.{key}: " in message
    assert expected in message


def test_all_problems_are_reported_together(tmp_path):
    path = write(
        tmp_path / "bad.yaml",
        "model:\n"
        "  dtype: int8\n"
        "training_config:\n"
        "  learning_rate: fast\n"
        "  nosuchkey: 1\n"
        "peft_config:\n"
        "  r: 0\n"
        "  use_dora: true\n",
    )
    message = error_of(load_config, path, overrides=["data.eval_split=2"])
    assert message.startswith("invalid config (6 problems):\n")
    assert (
        f"  {path}:2: model.dtype: expected one of 'auto', 'bf16', 'fp16', 'fp32', got 'int8' (str)"
        in message
    )
    assert f"  {path}:4: training_config.learning_rate: expected a float > 0, got 'fast' (str)" in message
    assert f"  {path}:5: training_config.nosuchkey: unknown key" in message
    assert f"  {path}:7: peft_config.r: expected an integer >= 1, got 0 (int)" in message
    assert f"  {path}:8: peft_config.use_dora: DoRA is not supported" in message
    assert "  --set data.eval_split=2: data.eval_split: expected a float in [0, 1), got 2 (int)" in message


def test_cross_field_checks():
    assert "fp16: and bf16 are both true" in error_of(TrainingConfig, bf16=True, fp16=True)
    assert "data.eval_split: is only used when eval is null" in error_of(
        DataConfig, eval="e.jsonl", eval_split=0.1
    )
    message = error_of(RunConfig.from_dict, {"training_config": {"eval_strategy": "steps"}})
    assert "training_config.eval_strategy: is 'steps' but there is no eval data" in message
    cfg = RunConfig.from_dict({"training_config": {"eval_strategy": "steps"}, "data": {"eval_split": 0.1}})
    assert cfg.training_config.eval_every() == 10


# ---------------------------------------------------------------------------------------- coercion, aliases


def test_yaml_numeric_strings_and_bare_no(tmp_path):
    assert yaml.safe_load("x: 1e-4")["x"] == "1e-4"  # the PyYAML (YAML 1.1) behaviour worked around
    path = write(
        tmp_path / "c.yaml",
        "training_config:\n  learning_rate: 1e-4\n  adam_epsilon: 1E-6\n  eval_strategy: no\n  save_strategy: no\n",
    )
    t = load_config(path).training_config
    assert t.learning_rate == 1e-4 and isinstance(t.learning_rate, float)
    assert t.adam_epsilon == 1e-6
    assert (t.eval_strategy, t.save_strategy) == ("no", "no")
    t = load_config(
        overrides=["training_config.learning_rate=5e-6", "training_config.max_steps=100"]
    ).training_config
    assert (t.learning_rate, t.max_steps) == (5e-6, 100)


def test_aliases():
    t = TrainingConfig.from_dict({"evaluation_strategy": "epoch", "max_length": 512})
    assert (t.eval_strategy, t.max_seq_length) == ("epoch", 512)
    t = TrainingConfig.from_dict({"evaluation_strategy": "steps", "eval_strategy": "steps"})
    assert t.eval_strategy == "steps"
    message = error_of(TrainingConfig.from_dict, {"evaluation_strategy": "steps", "eval_strategy": "no"})
    assert "training_config.eval_strategy: given twice with different values" in message
    # a later layer's alias overrides an earlier layer's key
    cfg = load_config(
        base={"training_config": {"eval_strategy": "steps"}},
        overrides=["training_config.evaluation_strategy=no"],
    )
    assert cfg.training_config.eval_strategy == "no"
    m = ModelConfig(dtype="bfloat16")
    assert m.dtype == "bf16" and ModelConfig(dtype="Float32").dtype == "fp32"
    assert PeftConfig(task_type="causal_lm").task_type == "CAUSAL_LM"


def test_home_is_expanded_in_paths_and_nothing_else(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = RunConfig.from_dict(
        {
            "data": {"train": "~/d/train.jsonl", "eval": "$HOME/e.jsonl"},
            "training_config": {"output_dir": "~/out"},
        }
    )
    assert cfg.data.train == "/home/someone/d/train.jsonl"
    assert cfg.data.eval == "$HOME/e.jsonl"
    assert cfg.training_config.output_dir == "/home/someone/out"
    assert DataConfig(train=Path("x.jsonl")).train == "x.jsonl"


# ------------------------------------------------------------------------------ precedence and overrides


def test_precedence_defaults_file_base_overrides(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        "model:\n  name_or_path: from-file\n  dtype: fp32\n"
        "training_config:\n  learning_rate: 1.0e-3\n  seed: 1\n  logging_steps: 5\n",
    )
    cfg = load_config(
        path,
        overrides=["training_config.seed=3", "peft_config.target_modules=[qkv_proj, o_proj]"],
        base={"model": {"name_or_path": "from-flag", "revision": None}, "training_config": {"seed": 2}},
    )
    assert cfg.model.name_or_path == "from-flag"  # base beats file
    assert cfg.model.dtype == "fp32"  # file beats defaults
    assert cfg.model.revision is None  # None in base = flag not given
    assert cfg.training_config.learning_rate == 1e-3 and cfg.training_config.logging_steps == 5
    assert cfg.training_config.seed == 3  # overrides beat base
    assert cfg.training_config.max_steps == -1  # default
    assert cfg.peft_config.target_modules == ["qkv_proj", "o_proj"]


def test_override_values_are_yaml():
    cfg = load_config(
        overrides=[
            "data.eval=",  # empty = null
            "training_config.bf16=false",
            "training_config.gradient_checkpointing_kwargs={use_reentrant: false}",
            "training_config.gradient_checkpointing_kwargs.preserve_rng_state=true",
            "peft_config.modules_to_save=[lm_head]",
            "peft_config.target_modules=.*\\.(qkv_proj|o_proj)",
            "model.device=cuda:1",
        ]
    )
    assert cfg.data.eval is None and cfg.training_config.bf16 is False
    assert cfg.training_config.gradient_checkpointing_kwargs == {
        "use_reentrant": False,
        "preserve_rng_state": True,
    }
    assert cfg.peft_config.modules_to_save == ["lm_head"]
    assert cfg.peft_config.target_modules == ".*\\.(qkv_proj|o_proj)"
    assert cfg.model.device == "cuda:1"


def test_bad_overrides_are_named():
    message = error_of(load_config, overrides=["foo"])
    assert (
        message
        == "invalid config: --set foo: expected section.key=value, e.g. training_config.learning_rate=1e-4"
    )
    message = error_of(load_config, overrides=["nosuchsection.x=1"])
    assert message.startswith("invalid config: --set nosuchsection.x=1: nosuchsection: unknown section")
    message = error_of(load_config, overrides=["training_config.lr=1e-4", "model=x", "peft_config.r=[1"])
    assert message.startswith("invalid config (3 problems):")
    assert "--set training_config.lr=1e-4: training_config.lr: unknown key" in message
    assert "--set model=x: expected section.key=value" in message
    assert "--set peft_config.r=[1: peft_config.r: the value is not valid YAML" in message
    message = error_of(
        load_config, overrides=["training_config.seed.x=1"], base={"training_config": {"seed": 1}}
    )
    assert "--set training_config.seed.x=1: training_config.seed: is 1 (int), not a mapping" in message
    with pytest.raises(TypeError):
        load_config(overrides="training_config.seed=1")


# -------------------------------------------------------------------------------------------------- files


def test_yaml_and_json_files_load_the_same(tmp_path):
    data = {
        "model": {"name_or_path": "some/model", "dtype": "bf16"},
        "data": {"train": "train.jsonl", "eval_split": 0.1},
        "training_config": {"learning_rate": 1e-4, "eval_strategy": "epoch", "num_train_epochs": 2},
        "peft_config": {"r": 8, "lora_alpha": 16, "target_modules": ["qkv_proj"]},
    }
    from_yaml = load_config(write(tmp_path / "c.yml", yaml.safe_dump(data)))
    from_json = load_config(write(tmp_path / "c.json", json.dumps(data, indent=2)))
    assert from_yaml == from_json == RunConfig.from_dict(data)
    assert from_json.peft_config.r == 8 and from_json.training_config.num_train_epochs == 2.0


def test_file_errors(tmp_path):
    assert (
        error_of(load_config, tmp_path / "missing.yaml")
        == f"config file not found: {tmp_path / 'missing.yaml'}"
    )
    message = error_of(load_config, write(tmp_path / "bad.yaml", "model:\n  dtype: [bf16\n"))
    assert message.startswith(f"{tmp_path / 'bad.yaml'}:3:1: invalid YAML: ")
    message = error_of(load_config, write(tmp_path / "bad.json", '{"model": {"dtype": "bf16",}}'))
    assert message.startswith(f"{tmp_path / 'bad.json'}:1:28: invalid JSON: ")
    message = error_of(load_config, write(tmp_path / "list.yaml", "- model\n"))
    assert "expected a mapping with sections model, data, training_config, peft_config" in message
    message = error_of(load_config, write(tmp_path / "sec.yaml", "peft_config: 16\n"))
    assert (
        f"{tmp_path / 'sec.yaml'}:1: peft_config: expected a mapping of keys to values, got 16 (int)"
        in message
    )
    dup = write(tmp_path / "dup.yaml", "peft_config:\n  r: 8\n  r: 16\n")
    assert f"{dup}:3: peft_config.r: duplicate key (first on line 2)" in error_of(load_config, dup)
    dup = write(tmp_path / "dup.json", '{"peft_config": {"r": 8,\n "r": 16}}')
    assert f"{dup}:2: peft_config.r: duplicate key (first on line 1)" in error_of(load_config, dup)
    # empty file and empty sections are the defaults
    assert load_config(write(tmp_path / "empty.yaml", "")) == RunConfig()
    assert load_config(write(tmp_path / "empty2.yaml", "peft_config:\n")) == RunConfig()


def test_ignored_keys_warn_with_file_and_line(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        "training_config:\n  logging_dir: logs\n  optim: adamw_torch_fused\n  push_to_hub: false\n"
        "peft_config:\n  inference_mode: false\n  fan_in_fan_out: false\n",
    )
    with pytest.warns(ConfigWarning) as record:
        cfg = load_config(path, overrides=["training_config.optim=paged_adamw_8bit"])
    messages = [str(w.message) for w in record]
    assert messages == [
        f"{path}:2: training_config.logging_dir is ignored: {IGNORED_TRAINING_KEYS['logging_dir']}",
        f"--set training_config.optim=paged_adamw_8bit: training_config.optim='paged_adamw_8bit' is ignored: "
        f"{IGNORED_TRAINING_KEYS['optim']}",
        f"{path}:4: training_config.push_to_hub is ignored: {IGNORED_TRAINING_KEYS['push_to_hub']}",
        f"{path}:6: peft_config.inference_mode is ignored: {IGNORED_PEFT_KEYS['inference_mode']}",
        f"{path}:7: peft_config.fan_in_fan_out is ignored: {IGNORED_PEFT_KEYS['fan_in_fan_out']}",
    ]
    assert record[0].filename == __file__  # attributed to the caller, not to config.py
    assert "logging_dir" not in cfg.to_dict()["training_config"]
    # optim adamw_torch / adamw_torch_fused is what lorafit does: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainingConfig.from_dict({"optim": "adamw_torch"})


def test_ignored_and_valid_keys_do_not_overlap():
    for section, keys in (("training_config", IGNORED_TRAINING_KEYS), ("peft_config", IGNORED_PEFT_KEYS)):
        names = {f.name for f in dataclasses.fields(SECTIONS[section])}
        assert not names & set(keys), section
    assert not {f.name for f in dataclasses.fields(PeftConfig)} & set(UNSUPPORTED_PEFT_OPTIONS)


# ---------------------------------------------------------------------------------- unsupported PEFT options


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("use_dora", True, "peft_config.use_dora: DoRA is not supported by lorafit"),
        ("rank_pattern", {"qkv_proj": 8}, "peft_config.rank_pattern: per-module ranks are not supported yet"),
        (
            "alpha_pattern",
            {"o_proj": 8},
            "peft_config.alpha_pattern: per-module alphas are not supported yet",
        ),
        ("layers_to_transform", [0, 1], "peft_config.layers_to_transform: adapting only some layers"),
        (
            "fan_in_fan_out",
            True,
            "peft_config.fan_in_fan_out: fan_in_fan_out: true is for GPT-2 style Conv1D",
        ),
        (
            "task_type",
            "SEQ_CLS",
            "peft_config.task_type: expected one of 'CAUSAL_LM', got 'SEQ_CLS' (str); lorafit",
        ),
        ("init_lora_weights", False, "peft_config.init_lora_weights: false (random lora_B"),
        (
            "init_lora_weights",
            "pissa",
            "peft_config.init_lora_weights: initialization 'pissa' is not supported",
        ),
        ("peft_type", "IA3", "peft_config.peft_type: lorafit trains LoRA adapters only"),
    ],
)
def test_unsupported_peft_options_are_clear_errors(key, value, expected):
    assert expected in error_of(PeftConfig.from_dict, {key: value})


def test_unsupported_peft_options_accepted_when_off():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = PeftConfig.from_dict(
            {
                "use_dora": False,
                "rank_pattern": {},
                "alpha_pattern": {},
                "layers_to_transform": None,
                "peft_type": "LORA",
            }
        )
    assert p == PeftConfig()
    assert PeftConfig(init_lora_weights="gaussian").init_lora_weights == "gaussian"


# --------------------------------------------------------------------------------------- derived helpers


def test_warmup_steps_for():
    assert TrainingConfig().warmup_steps_for(1000) == 0
    assert TrainingConfig(warmup_ratio=0.2).warmup_steps_for(10) == 2
    assert TrainingConfig(warmup_ratio=0.07).warmup_steps_for(100) == 7  # not 8 from float noise
    assert TrainingConfig(warmup_ratio=0.1).warmup_steps_for(15) == 2  # ceil, like transformers
    assert (
        TrainingConfig(warmup_ratio=0.5, warmup_steps=3).warmup_steps_for(100) == 3
    )  # steps take precedence
    with pytest.raises(ValueError):
        TrainingConfig().warmup_steps_for(-1)


def test_eval_every():
    assert TrainingConfig().eval_every() is None
    assert TrainingConfig(eval_strategy="epoch").eval_every() is None
    assert TrainingConfig(eval_strategy="steps", logging_steps=7).eval_every() == 7
    assert TrainingConfig(eval_strategy="steps", eval_steps=50).eval_every() == 50


# ------------------------------------------------------------------------------------------------ fsdp


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True), (False, False), (None, False), ("", False), ("full_shard", True), ("FULL_SHARD", True),
        ("full_shard auto_wrap", True), (["full_shard", "auto_wrap"], True), ([], False),
    ],
)  # fmt: skip
def test_fsdp_takes_hugging_face_forms(value, expected):
    assert TrainingConfig.from_dict({"fsdp": value}).fsdp is expected
    assert TrainingConfig().fsdp is False


def test_fsdp_from_overrides_and_round_trip(tmp_path):
    assert load_config(overrides=["training_config.fsdp=full_shard"]).training_config.fsdp is True
    assert load_config(overrides=["training_config.fsdp="]).training_config.fsdp is False
    cfg = load_config(overrides=["training_config.fsdp=true"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").training_config.fsdp is True


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("full_shard offload", "'offload' is not supported (CPU offload is not implemented); use true"),
        ("shard_grad_op", "'shard_grad_op' is not supported (only full sharding is implemented)"),
        ("no_shard", "for plain data parallel training leave fsdp off (false)"),
        ("yes", "expected true, false, 'full_shard' or 'full_shard auto_wrap', got 'yes' (str)"),
        (2, "got 2 (int)"),
        (["auto_wrap"], "got ['auto_wrap'] (list)"),
    ],
)
def test_fsdp_bad_values_name_the_key_and_the_fix(value, expected):
    message = error_of(TrainingConfig.from_dict, {"fsdp": value})
    assert "training_config.fsdp: " in message and expected in message


def test_fsdp_with_fp16_is_refused():
    message = error_of(TrainingConfig.from_dict, {"fsdp": True, "fp16": True})
    assert (
        "training_config.fp16: fp16 loss scaling is not supported with fsdp" in message
        and "use bf16" in message
    )


def test_fsdp_config_is_ignored_with_a_warning():
    with pytest.warns(
        ConfigWarning, match=r"training_config.fsdp_config is ignored: lorafit shards each decoder"
    ):
        TrainingConfig.from_dict({"fsdp": "full_shard", "fsdp_config": {"min_num_params": 0}})


# --------------------------------------------------------------------------------------- save and load


def test_save_load_round_trip(tmp_path):
    cfg = RunConfig.from_dict(
        {
            "model": {"name_or_path": "some/model", "dtype": "bfloat16", "revision": "1.0"},
            "data": {"train": "t.jsonl", "eval": "e.jsonl", "train_on": "all"},
            "training_config": {
                "learning_rate": 3e-5,
                "adam_epsilon": 1e-10,
                "eval_strategy": "no",
                "gradient_checkpointing_kwargs": {"use_reentrant": False},
            },
            "peft_config": {
                "target_modules": ["qkv_proj", "o_proj"],
                "lora_alpha": 8.5,
                "modules_to_save": ["lm_head"],
            },
        }
    )
    for name in ("out/run.yaml", "out/run.json"):
        path = tmp_path / name
        save_config(cfg, path)
        assert load_config(path) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    text = (tmp_path / "out/run.yaml").read_text()
    assert text.startswith("# lorafit run config")
    assert "eval_strategy: 'no'" in text and "revision: '1.0'" in text
    save_config(RunConfig(), tmp_path / "out/run.yaml")  # replaces the file
    assert load_config(tmp_path / "out/run.yaml") == RunConfig()
    assert sorted(os.listdir(tmp_path / "out")) == ["run.json", "run.yaml"]  # no temporary files left


def test_shipped_configs_parse():
    paths = sorted(SHIPPED_CONFIGS_DIR.glob("*.yaml"))
    assert {p.name for p in paths} >= {"phi3-mini-lora.yaml", "sample_finetune.yaml"}
    for path in paths:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            cfg = load_config(path)
        assert isinstance(cfg, RunConfig)
        assert RunConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.model.device == "auto", path  # runs wherever it is: cuda, then mps, then cpu
    phi3 = load_config(SHIPPED_CONFIGS_DIR / "phi3-mini-lora.yaml")
    assert phi3.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct" and phi3.model.dtype == "bf16"
    assert (phi3.peft_config.r, phi3.peft_config.lora_alpha, phi3.peft_config.target_modules) == (
        16,
        32,
        "all-linear",
    )
    assert (phi3.training_config.learning_rate, phi3.training_config.max_seq_length) == (2e-4, 2048)
    assert phi3.training_config.packing and phi3.training_config.bf16


# ---------------------------------------------------------------------------------------- eval data by layer


def test_a_higher_layers_eval_data_replaces_the_files_eval_split(tmp_path):
    path = write(tmp_path / "run.yaml", "data:\n  train: t.jsonl\n  eval: null\n  eval_split: 0.05\n")
    with pytest.warns(ConfigWarning) as record:
        cfg = load_config(path, base={"data": {"eval": "e.jsonl"}})
    assert (cfg.data.eval, cfg.data.eval_split) == ("e.jsonl", 0.0)
    assert config_warnings(record) == [
        f"data.eval from the command line replaces data.eval_split=0.05 from {path}:4"
    ]
    # --set over the file, either way round
    with pytest.warns(ConfigWarning) as record:
        cfg = load_config(path, overrides=["data.eval=x.jsonl"])
    assert (cfg.data.eval, cfg.data.eval_split) == ("x.jsonl", 0.0)
    assert config_warnings(record) == [
        f"data.eval from --set data.eval=x.jsonl replaces data.eval_split=0.05 from {path}:4"
    ]
    named = write(tmp_path / "named.yaml", "data:\n  eval: e.jsonl\n")
    with pytest.warns(ConfigWarning) as record:
        cfg = load_config(named, overrides=["data.eval_split=0.1"])
    assert (cfg.data.eval, cfg.data.eval_split) == (None, 0.1)
    assert config_warnings(record) == [
        f"data.eval_split from --set data.eval_split=0.1 replaces data.eval='e.jsonl' from {named}:2"
    ]
    # eval_split_name is replaced the same way; eval_split=0 (off) replaces nothing
    with pytest.warns(
        ConfigWarning, match="data.eval_split_name from the command line replaces data.eval_split"
    ):
        cfg = load_config(path, base={"data": {"eval_split_name": "test"}})
    assert (cfg.data.eval_split_name, cfg.data.eval_split) == ("test", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(named, overrides=["data.eval_split=0"])
    assert (cfg.data.eval, cfg.data.eval_split) == ("e.jsonl", 0.0)


def test_eval_and_eval_split_in_the_same_layer_stay_an_error(tmp_path):
    path = write(tmp_path / "both.yaml", "data:\n  eval: e.jsonl\n  eval_split: 0.05\n")
    assert f"{path}:3: data.eval_split: is only used when eval is null" in error_of(load_config, path)
    message = error_of(load_config, None, overrides=["data.eval=e.jsonl", "data.eval_split=0.1"])
    assert "--set data.eval_split=0.1: data.eval_split: is only used when eval is null" in message
    message = error_of(load_config, None, base={"data": {"eval": "e.jsonl", "eval_split": 0.1}})
    assert "command line: data.eval_split: is only used when eval is null" in message
    # a bad eval_split is reported as such, not resolved
    message = error_of(load_config, None, base={"data": {"eval": "e.jsonl"}}, overrides=["data.eval_split=x"])
    assert "data.eval_split: expected a float in [0, 1), got 'x' (str)" in message


def test_shipped_configs_take_eval_data_from_the_command_line():
    from lorafit.api import build_config

    for name, line in (("phi3-mini-lora.yaml", 17), ("phi3-mini-qlora.yaml", 21)):
        path = SHIPPED_CONFIGS_DIR / name
        with pytest.warns(ConfigWarning) as record:
            cfg = build_config(config=path, model="m", train_data="t.jsonl", eval_data="e.jsonl",
                               source="command line")  # fmt: skip
        assert (cfg.data.eval, cfg.data.eval_split) == ("e.jsonl", 0.0)
        assert config_warnings(record) == [
            f"data.eval from the command line replaces data.eval_split=0.05 from {path}:{line}"
        ]


def test_python_api_values_are_named_by_their_argument():
    from lorafit.api import build_config

    with pytest.warns(ConfigWarning) as record:
        build_config(
            training_config={"do_eval": True, "learning_rate": 1e-4}, peft_config={"inference_mode": False}
        )
    assert config_warnings(record) == [
        f"finetune(training_config=...): training_config.do_eval is ignored: {IGNORED_TRAINING_KEYS['do_eval']}",
        f"finetune(peft_config=...): peft_config.inference_mode is ignored: {IGNORED_PEFT_KEYS['inference_mode']}",
    ]
    message = error_of(build_config, training_config={"max_steps": 0}, output_dir=" ")
    assert "finetune(training_config=...): training_config.max_steps: expected -1 or an integer" in message
    assert "finetune(output_dir=...): training_config.output_dir: expected a non-empty string" in message
    message = error_of(build_config, eval_data="e.jsonl", overrides=["data.eval_split=0.1", "data.eval=e2"])
    assert "--set data.eval_split=0.1: data.eval_split: is only used when eval is null" in message
    with pytest.warns(ConfigWarning) as record:
        build_config(training_config={"do_eval": True}, source="command line")
    assert config_warnings(record)[0].startswith("command line: training_config.do_eval is ignored")


def test_origin_of_a_value(tmp_path):
    path = write(tmp_path / "run.yaml", "model:\n  dtype: bf16\n  device: cuda\n")
    cfg = load_config(path, base={"model": {"name_or_path": "m"}}, overrides=["peft_config.r=4"])
    assert cfg.origin("model.device") == f"{path}:3"
    assert cfg.origin("model.name_or_path") == "command line"
    assert cfg.origin("peft_config.r") == "--set peft_config.r=4"
    assert cfg.origin("training_config.seed") == "default" and RunConfig().origin("model.device") == "default"


# ---------------------------------------------------------------------------------------- numbers that must fit


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["training_config.learning_rate=1e38"],
            "--set training_config.learning_rate=1e38: training_config.learning_rate: 1e+38 is too large: AdamW's "
            "first step is learning_rate / (1 - adam_beta1) = 1e+39, beyond the largest fp32 number (3.403e+38)",
        ),
        (
            ["training_config.learning_rate=1e4", "peft_config.lora_dtype=fp16"],
            "training_config.learning_rate: 10000 is too large: AdamW's first step is learning_rate / "
            "(1 - adam_beta1) = 1e+05, beyond the largest fp16 number (6.55e+04)",
        ),
        (
            ["training_config.learning_rate=1e-50"],
            "training_config.learning_rate: 1e-50 is below the smallest",
        ),
        (
            ["training_config.weight_decay=1e300"],
            "training_config.weight_decay: 1e+300 with learning_rate 0.0002 is too large: AdamW multiplies the "
            "weights by 1 - learning_rate * weight_decay = -2e+296 every step",
        ),
        (
            ["training_config.adam_epsilon=1e39"],
            "training_config.adam_epsilon: 1e+39 is beyond the largest fp32",
        ),
        (
            ["training_config.adam_epsilon=1e-45"],
            "training_config.adam_epsilon: 1e-45 is below the smallest normal",
        ),
        (
            ["peft_config.lora_alpha=1e39", "peft_config.r=1"],
            "peft_config.lora_alpha: 1e+39 is too large: LoRA's scale lora_alpha / r = 1e+39 is beyond",
        ),
        (["peft_config.lora_alpha=" + "9" * 400], "peft_config.lora_alpha: expected a number > 0, got 9999"),
        (
            ["training_config.learning_rate=" + "9" * 400],
            "training_config.learning_rate: expected a float > 0",
        ),
    ],
)
def test_numbers_that_do_not_fit_the_arithmetic_are_config_errors(overrides, expected):
    message = error_of(load_config, None, overrides=overrides)
    assert expected in message
    assert "Fix: " in message or "expected a" in message  # a type error says what is expected instead


def test_numbers_at_the_edge_still_fit():
    cfg = load_config(None, overrides=["training_config.learning_rate=3e37"])
    assert cfg.training_config.learning_rate == 3e37
    cfg = load_config(None, overrides=["training_config.learning_rate=9", "training_config.weight_decay=0.1"])
    assert cfg.training_config.weight_decay == 0.1  # 1 - 9 * 0.1 = 0.1 > 0
    cfg = load_config(None, overrides=["training_config.learning_rate=1e38", "training_config.adam_beta1=0"])
    assert cfg.training_config.learning_rate == 1e38
    assert load_config(None, overrides=["peft_config.lora_alpha=1e39"]).peft_config.lora_alpha == 1e39  # /16


# The message each field gives for a value of the wrong type (a list), as lorafit has always worded it.
WRONG_TYPE_MESSAGES = {
    "model.name_or_path": "expected a non-empty string, got [1, 2] (list)",
    "model.adapter": "expected a non-empty string or null, got [1, 2] (list)",
    "model.dtype": "expected one of 'auto', 'bf16', 'fp16', 'fp32', got [1, 2] (list)",
    "model.attn_implementation": (
        "expected one of 'sdpa', 'eager', 'flash_attention_2', 'flex_attention', got [1, 2] (list)"
    ),
    "model.device": "expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got [1, 2] (list)",
    "model.trust_remote_code": "expected true or false, got [1, 2] (list)",
    "model.revision": "expected a non-empty string or null, got [1, 2] (list)",
    "model.quantization": "expected one of 'none', 'nf4', 'fp4', 'int8', got [1, 2] (list)",
    "model.bnb_4bit_use_double_quant": "expected true or false, got [1, 2] (list)",
    "model.bnb_4bit_compute_dtype": "expected one of 'auto', 'bf16', 'fp16', 'fp32', got [1, 2] (list)",
    "data.train": "expected a non-empty string or null, got [1, 2] (list)",
    "data.eval": "expected a non-empty string or null, got [1, 2] (list)",
    "data.eval_split": "expected a float in [0, 1), got [1, 2] (list)",
    "data.train_split": "expected a non-empty string, got [1, 2] (list)",
    "data.eval_split_name": "expected a non-empty string or null, got [1, 2] (list)",
    "data.train_on": "expected one of 'assistant', 'all', got [1, 2] (list)",
    "data.truncation": "expected true or false, got [1, 2] (list)",
    "data.system_message": "expected one of 'auto', 'fold', 'drop', 'error', got [1, 2] (list)",
    "training_config.learning_rate": "expected a float > 0, got [1, 2] (list)",
    "training_config.per_device_train_batch_size": "expected an integer >= 1, got [1, 2] (list)",
    "training_config.per_device_eval_batch_size": "expected an integer >= 1, got [1, 2] (list)",
    "training_config.gradient_accumulation_steps": "expected an integer >= 1, got [1, 2] (list)",
    "training_config.num_train_epochs": "expected a float > 0, got [1, 2] (list)",
    "training_config.max_steps": "expected -1 or an integer >= 1, got [1, 2] (list)",
    "training_config.lr_scheduler_type": "expected one of 'linear', 'cosine', 'constant', 'constant_with_warmup', got [1, 2] (list); other transformers schedulers are not supported",
    "training_config.warmup_ratio": "expected a float in [0, 1], got [1, 2] (list)",
    "training_config.warmup_steps": "expected an integer >= 0, got [1, 2] (list)",
    "training_config.weight_decay": "expected a float >= 0, got [1, 2] (list)",
    "training_config.adam_beta1": "expected a float in [0, 1), got [1, 2] (list)",
    "training_config.adam_beta2": "expected a float in [0, 1), got [1, 2] (list)",
    "training_config.adam_epsilon": "expected a float > 0, got [1, 2] (list)",
    "training_config.max_grad_norm": "expected a float >= 0, got [1, 2] (list)",
    "training_config.logging_steps": "expected an integer >= 1, got [1, 2] (list)",
    "training_config.report_to": "expected 'none', 'all', a dashboard name or a list of them, got [1, 2] (list)",
    "training_config.run_name": "expected a non-empty string or null, got [1, 2] (list)",
    "training_config.project": "expected a non-empty string or null, got [1, 2] (list)",
    "training_config.eval_strategy": "expected one of 'no', 'steps', 'epoch', got [1, 2] (list)",
    "training_config.eval_steps": "expected an integer >= 1 or null, got [1, 2] (list)",
    "training_config.save_strategy": "expected one of 'steps', 'epoch', 'no', got [1, 2] (list)",
    "training_config.save_steps": "expected an integer >= 1, got [1, 2] (list)",
    "training_config.save_total_limit": "expected an integer >= 1 or null, got [1, 2] (list)",
    "training_config.seed": "expected an integer in [0, 18446744073709551615] (2**64 - 1 is the largest seed "
    "torch.manual_seed takes), got [1, 2] (list)",
    "training_config.bf16": "expected true, false or null (auto), got [1, 2] (list)",
    "training_config.fp16": "expected true or false, got [1, 2] (list)",
    "training_config.gradient_checkpointing": "expected true, false or auto, got [1, 2] (list)",
    "training_config.gradient_checkpointing_kwargs": "expected a mapping of string keys to values, or null, got [1, 2] (list)",
    "training_config.output_dir": "expected a non-empty string, got [1, 2] (list)",
    "training_config.max_seq_length": "expected an integer >= 1, got [1, 2] (list)",
    "training_config.packing": "expected true or false, got [1, 2] (list)",
    "training_config.return_freed_memory": "expected true or false, got [1, 2] (list)",
    "training_config.skip_nonfinite_batches": "expected an integer >= 0, got [1, 2] (list)",
    "training_config.fsdp": "expected true, false, 'full_shard' or 'full_shard auto_wrap', got [1, 2] (list)",
    "training_config.post_check": "expected true or false, got [1, 2] (list)",
    "peft_config.r": "expected an integer >= 1, got [1, 2] (list)",
    "peft_config.lora_alpha": "expected a number > 0, got [1, 2] (list)",
    "peft_config.lora_dropout": "expected a float in [0, 1), got [1, 2] (list)",
    "peft_config.bias": "expected one of 'none', 'all', 'lora_only', got [1, 2] (list)",
    "peft_config.task_type": "expected one of 'CAUSAL_LM', got [1, 2] (list); lorafit fine-tunes causal language models only",
    "peft_config.target_modules": "expected 'all-linear', a module name, a regular expression (string) or a non-empty list of module names, got [1, 2] (list)",
    "peft_config.exclude_modules": "expected null, a regular expression (string) or a list of module names, got [1, 2] (list)",
    "peft_config.modules_to_save": "expected null or a list of module names such as [lm_head], got [1, 2] (list)",
    "peft_config.use_rslora": "expected true or false, got [1, 2] (list)",
    "peft_config.init_lora_weights": "expected true or 'gaussian', got [1, 2] (list)",
    "peft_config.lora_dtype": "expected one of 'auto', 'fp32', 'bf16', 'fp16', got [1, 2] (list)",
}

# Fields that accept null (fsdp reads it as false).
NULLABLE = {
    "training_config.run_name",
    "training_config.project",
    "model.adapter",
    "model.revision",
    "data.train",
    "data.eval",
    "data.eval_split_name",
    "training_config.eval_steps",
    "training_config.save_total_limit",
    "training_config.bf16",
    "training_config.gradient_checkpointing_kwargs",
    "training_config.fsdp",
    "peft_config.exclude_modules",
    "peft_config.modules_to_save",
}


def test_every_field_names_its_type_when_given_a_wrong_one():
    every = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(WRONG_TYPE_MESSAGES) == every
    for key, message in WRONG_TYPE_MESSAGES.items():
        section, name = key.split(".")
        cls = SECTIONS[section]
        with pytest.raises(ConfigError) as e:
            cls(**{name: [1, 2]})
        assert str(e.value) == f"invalid config: <{cls.__name__}>: {key}: {message}"


def test_exactly_the_optional_fields_accept_null():
    accepted = set()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            try:
                cls(**{f.name: None})
                accepted.add(f"{section}.{f.name}")
            except ConfigError as e:
                assert str(e).endswith(
                    WRONG_TYPE_MESSAGES[f"{section}.{f.name}"].replace("[1, 2] (list)", "None (NoneType)")
                )
    assert accepted == NULLABLE


@dataclasses.dataclass
class Example(Section):
    SECTION = "example"

    n: int | None = option(None, ge=2)
    mode: Literal["on", "off"] = option("on", aliases={"yes": "on"}, false_means="off")
    scale: int | float = option(1, gt=0)


def test_a_field_is_checked_by_its_annotation_and_its_options():
    assert Example(n="3").n == 3 and Example().n is None
    assert Example(mode="YES").mode == "on" and Example(mode=False).mode == "off"
    assert Example(scale=2).scale == 2 and type(Example(scale=2).scale) is int
    assert Example(scale="0.5").scale == 0.5
    with pytest.raises(ConfigError) as e:
        Example(n=1, mode="auto", scale=0)
    assert str(e.value) == (
        "invalid config (3 problems):\n"
        "  <Example>: example.n: expected an integer >= 2 or null, got 1 (int)\n"
        "  <Example>: example.mode: expected one of 'on', 'off', got 'auto' (str)\n"
        "  <Example>: example.scale: expected a number > 0, got 0 (int)"
    )


def test_a_misdeclared_field_is_a_type_error():
    @dataclasses.dataclass
    class BoundOnAString(Section):
        name: str = option("a", ge=1)

    @dataclasses.dataclass
    class NoCheckForAList(Section):
        names: list[str] = option(None)

    with pytest.raises(TypeError, match=r"BoundOnAString.name: ge do not apply to <class 'str'>"):
        BoundOnAString()
    with pytest.raises(TypeError, match=r"NoCheckForAList.names: no check for list\[str\]; give check="):
        NoCheckForAList()


def test_the_distributed_keys_say_what_lorafit_does_instead():
    assert (
        IGNORED_TRAINING_KEYS["deepspeed"] == "not supported; lorafit uses DDP or FSDP (training_config.fsdp)"
    )
    assert IGNORED_TRAINING_KEYS["local_rank"].startswith("set by torchrun")
    assert not [key for key, why in IGNORED_TRAINING_KEYS.items() if "single device" in why]


def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    lines = ["peft_config:", "  target_modules: &a0 [q, q, q, q, q, q, q, q, q]"]
    lines += [f"  k{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml: .*aliases .* expand to more than 100,000 values"):
        load_config(path)


def test_anchors_and_aliases_of_ordinary_size_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("peft_config:\n  target_modules: &t [q_proj, v_proj]\n  modules_to_save: *t\n")
    cfg = load_config(path)
    assert cfg.peft_config.target_modules == ["q_proj", "v_proj"] == cfg.peft_config.modules_to_save


def test_a_huge_wrong_value_is_shown_as_a_short_preview():
    from lorafit.config.checks import show

    nested = [1] * 9
    for _ in range(8):
        nested = [nested] * 9
    text = show(nested)
    assert len(text) < 80 and text.endswith("(list)")
    assert show((1,)) == "(1,) (tuple)" and show([1, 2]) == "[1, 2] (list)"
