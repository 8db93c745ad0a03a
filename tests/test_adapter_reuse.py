"""Adapters used again on a tiny Phi-3: from another working directory, trained further (`--adapter`,
also adapters PEFT wrote), and as loralib exports in eval/generate/merge.

Run A trains 4 steps with a relative model path (`./tiny`) on slices (q_proj, v_proj) and o_proj.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafit.cli import main
from lorafit.demo import demo_data_dir
from lorafit.tiny import write_tiny_model

TARGETS = ["q_proj", "v_proj", "o_proj"]


@contextlib.contextmanager
def cwd(path: Path):
    old = os.getcwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("reuse")
    lines = (demo_data_dir() / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (d / "eval.jsonl").write_text("\n".join(lines[40:52]) + "\n")
    return d


def train_args(work: Path, model: str, out: str, *sets: str) -> list[str]:
    args = ["train", "--model", model, "--data", str(work / "train.jsonl"), "--eval-data", str(work / "eval.jsonl"),
            "--output-dir", out, "--no-progress", "--set", "training_config.max_seq_length=96",
            "--set", "training_config.learning_rate=5e-3", "--set", "training_config.per_device_train_batch_size=2"]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def run_a(work) -> dict:
    """Trained in work/a with --model ./tiny --output-dir out (both relative)."""
    with cwd(work / "a"):
        write_tiny_model(Path("tiny"))
        rc = main(train_args(work, "./tiny", "out", "training_config.max_steps=4", "peft_config.r=4",
                             "peft_config.lora_alpha=8", f"peft_config.target_modules=[{','.join(TARGETS)}]"))  # fmt: skip
    assert rc == 0
    out = work / "a" / "out"
    return {
        "out": out,
        "base": work / "a" / "tiny",
        "results": json.loads((out / "results.json").read_text()),
    }


def eval_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", "--data", "eval.jsonl", "--max-seq-length", "96", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def generated(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["generate", "--prompt", "417: even or odd?", "--max-new-tokens", "6", *map(str, args)]) == 0
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- the recorded base


def test_a_local_base_is_recorded_by_its_absolute_path(run_a):
    out, base = run_a["out"], str(run_a["base"].resolve())
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["name_or_path"] == base
    ckpt = sorted(out.glob("checkpoint-*"))[-1]
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == base


def test_generate_eval_and_merge_without_model_from_another_directory(run_a, work, capsys):
    with cwd(work / "elsewhere"):
        shutil.copy(work / "eval.jsonl", "eval.jsonl")
        assert generated(capsys, "--adapter", run_a["out"]).strip()
        got = eval_json(capsys, "--adapter", run_a["out"])
        assert got["eval_loss"] == pytest.approx(run_a["results"]["eval_loss"], rel=1e-5)
        assert main(["merge", "--adapter", str(run_a["out"]), "--output-dir", "merged"]) == 0
        assert (Path("merged") / "config.json").is_file()


def test_a_hub_id_stays_an_id():
    from lorafit.lora.peft_format import base_reference

    assert base_reference("microsoft/Phi-3-mini-4k-instruct") == "microsoft/Phi-3-mini-4k-instruct"


# ----------------------------------------------------------------------------- training further


def test_training_an_adapter_further_starts_from_its_eval_loss(run_a, work):
    out = work / "b"
    rc = main(train_args(work, str(run_a["base"]), str(out), "training_config.max_steps=2", "peft_config.r=4",
                         f"peft_config.target_modules=[{','.join(TARGETS)}]") + ["--adapter", str(run_a["out"])])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["eval_loss_before"] == pytest.approx(run_a["results"]["eval_loss"], rel=1e-6)
    assert res["eval_loss"] != res["eval_loss_before"]  # it trained
    a, b = load_file(run_a["out"] / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["adapter"] == str(run_a["out"].resolve())
    assert cfg["peft_config"]["r"] == 4 and cfg["peft_config"]["lora_alpha"] == 8
    assert cfg["peft_config"]["target_modules"] == sorted(TARGETS)
    a_cfg = json.loads((run_a["out"] / "adapter_config.json").read_text())
    b_cfg = json.loads((out / "adapter_config.json").read_text())
    assert {k: b_cfg[k] for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules")} == {
        k: a_cfg[k] for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules")
    }
    # resumable: the run's checkpoint continues with the adapter recorded in the config
    assert main(train_args(work, str(run_a["base"]), str(out), "training_config.max_steps=3")
                + ["--adapter", str(run_a["out"]), "--resume"]) == 0  # fmt: skip
    assert json.loads((out / "results.json").read_text())["steps"] == 3


def test_a_conflicting_peft_config_is_refused_before_anything_is_written(run_a, work, capsys):
    out = work / "conflict"
    rc = main(train_args(work, str(run_a["base"]), str(out), "training_config.max_steps=1", "peft_config.r=8")
              + ["--adapter", str(run_a["out"])])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "peft_config.r is 8, the adapter's rank is 4" in err and "Fix:" in err
    assert not out.exists()


def test_an_adapter_for_another_base_is_refused(run_a, work, capsys):
    other = write_tiny_model(work / "other", size="tiny")
    rc = main(train_args(work, str(other), str(work / "wrong-base"), "training_config.max_steps=1")
              + ["--adapter", str(run_a["out"])])  # fmt: skip
    assert rc == 2
    assert "model.adapter" in capsys.readouterr().err
    assert not (work / "wrong-base").exists()


def test_a_peft_adapter_trains_further_from_peft_eval_loss(run_a, work):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lorafit.attention import use_packed_sdpa
    from lorafit.data import load_conversations
    from lorafit.evaluation import eval_loss
    from lorafit.model import end_of_turn, load_tokenizer
    from lorafit.tokens import tokenize

    base = AutoModelForCausalLM.from_pretrained(run_a["base"], dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["qkv_proj", "down_proj"], rank_pattern={"down_proj": 2}
    )
    model = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(work / "peft-adapter")
    net = model.get_base_model().eval()
    use_packed_sdpa(net)
    tok = load_tokenizer(str(run_a["base"]))
    tokens, _ = tokenize(tok, load_conversations(work / "eval.jsonl"), max_seq_length=96, end_of_turn=end_of_turn(tok),
                         train_on="assistant")  # fmt: skip
    theirs = eval_loss(net, tokens, batch_size=4, max_seq_length=96, pad_id=tok.pad_token_id,
                       device=torch.device("cpu"), precision="no")["eval_loss"]  # fmt: skip

    out = work / "from-peft"
    rc = main(train_args(work, str(run_a["base"]), str(out), "training_config.max_steps=2", "training_config.bf16=false")
              + ["--adapter", str(work / "peft-adapter")])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["eval_loss_before"] == pytest.approx(theirs, rel=1e-5)
    assert res["eval_loss"] != res["eval_loss_before"]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4 and any(v == 2 for v in saved["rank_pattern"].values())
    assert yaml.safe_load((out / "config.yaml").read_text())["peft_config"]["target_modules"] == [
        "down_proj",
        "qkv_proj",
    ]


# ----------------------------------------------------------------------------- loralib exports


def test_loralib_export_folder_and_file_work_in_eval_generate_and_merge(run_a, work, capsys):
    lib = work / "lib"
    assert (
        main(["export", "--adapter", str(run_a["out"]), "--layout", "loralib", "--output-dir", str(lib)]) == 0
    )
    bare = work / "bare" / "ckpt_lora.pt"  # a plain loralib file: no JSON beside it
    bare.parent.mkdir()
    shutil.copy(lib / "adapter_lora.pt", bare)
    with cwd(work / "elsewhere-lib"):
        shutil.copy(work / "eval.jsonl", "eval.jsonl")
        want_loss = eval_json(capsys, "--adapter", run_a["out"])["eval_loss"]
        want_text = generated(capsys, "--adapter", run_a["out"])
        assert eval_json(capsys, "--adapter", lib)["eval_loss"] == want_loss
        assert eval_json(capsys, "--adapter", lib / "adapter_lora.pt")["eval_loss"] == want_loss
        assert generated(capsys, "--adapter", lib) == want_text
        got = eval_json(capsys, "--model", run_a["base"], "--adapter", bare, "--lora-alpha", "8",
                        "--target-modules", *TARGETS)["eval_loss"]  # fmt: skip
        assert got == want_loss
        capsys.readouterr()
        assert (
            main(["eval", "--data", "eval.jsonl", "--model", str(run_a["base"]), "--adapter", str(bare)]) == 2
        )
        assert "--lora-alpha" in capsys.readouterr().err
        assert main(["merge", "--adapter", str(lib), "--output-dir", "merged"]) == 0
        assert (Path("merged") / "config.json").is_file()
