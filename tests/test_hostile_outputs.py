"""Hostile output folders (tiny Phi-3, CPU), beyond what tests/test_guarantees.py checks for every
command (an input as the output folder, under any flag; planted links; exit 2 and inputs unchanged):

* what --overwrite may still replace: a previous export; a previous tiny model or demo; a run may
  resume with the config.yaml it saved (the same text), and is refused when it would change it;
* the lock, the metrics log and a checkpoint's temporary name never write through a planted link;
* No space left on device (OSError ENOSPC, or safetensors' error) at each write of a run: exit 2
  with what was saved and `--resume` as the fix, no temporary file left, and the run resumes; only
  loss.png failing is a warning and the run succeeds.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lorafit_model, train_argv
from safetensors import SafetensorError

from lorafit import checkpoint, lora
from lorafit.checkpoint import atomic_dir, list_checkpoints, output_lock
from lorafit.cli import main
from lorafit.demo import demo_data_dir
from lorafit.errors import LorafitError
from lorafit.lora.files import replace_atomic
from lorafit.metrics import MetricsLog


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def leftovers(out: Path) -> list[str]:
    """Temporary files or folders left behind (hidden names holding .tmp-)."""
    return sorted(p.name for p in out.rglob("*") if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def base_copy(tiny_model, tmp_path_factory) -> Path:
    """A copy of the tiny model folder (a failing test must not destroy the session's model)."""
    return Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("hostile") / "base"))


@pytest.fixture(scope="module")
def adapter(base_copy, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_copy, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("hostile") / "adapter"
    return lora.save_adapter(
        lorafit_model(base, "all-linear"), folder, base_model_name_or_path=str(base_copy)
    )


# ----------------------------------------------------------------------------- inputs are never replaced


def test_export_overwrite_replaces_a_previous_export(adapter, tmp_path, capsys):
    out = tmp_path / "export"
    assert run_cli("export", "--adapter", adapter, "--output-dir", out, "--layout", "split") == 0
    (out / "README.md").write_text("my notes\n")  # an adapter card next to it is still an export
    assert run_cli("export", "--adapter", adapter, "--output-dir", out) == 2  # no --overwrite
    assert run_cli("export", "--adapter", adapter, "--output-dir", out, "--overwrite") == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert any("qkv_proj" in m for m in cfg["target_modules"]) and not (out / "README.md").exists()
    assert leftovers(out.parent) == []


def test_tiny_model_and_demo_replace_their_own_previous_output(tmp_path):
    from lorafit.demo import check_demo_output
    from lorafit.tiny import write_tiny_model

    out = write_tiny_model(tmp_path / "demo" / "base-model", size="tiny")
    write_tiny_model(out)  # a tiny model of another size replaces it
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 128 and leftovers(out.parent) == []
    (out.parent / "adapter").mkdir()
    (out.parent / "adapter" / "config.yaml").write_text(f"model:\n  name_or_path: {out}\n")
    (out.parent / "demo_results.json").write_text("{}\n")
    check_demo_output(out.parent)  # a previous demo: replaced without a question
    (out.parent / "adapter" / "config.yaml").write_text("model:\n  name_or_path: /elsewhere\n")
    with pytest.raises(LorafitError, match="not this demo's"):
        check_demo_output(out.parent)


# ----------------------------------------------------------------------------- planted links


def test_a_link_planted_at_the_lock_file_is_refused_and_its_target_kept(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious\n")
    (out / ".lorafit.lock").symlink_to(victim)
    with pytest.raises(LorafitError, match=r"\.lorafit\.lock is a symbolic link.*Fix: remove the link"):
        with output_lock(out):
            pass
    assert victim.read_text() == "precious\n"
    (out / ".lorafit.lock").unlink()
    with output_lock(out):  # a plain lock file works, and is gone after the run
        assert (out / ".lorafit.lock").read_text().startswith("pid ")
    assert not (out / ".lorafit.lock").exists()


def test_metrics_are_never_appended_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    log = MetricsLog(tmp_path / "metrics.jsonl", [], write=True)
    with pytest.raises(LorafitError, match="symbolic link"):
        log.emit({"step": 1, "loss": 1.0})
    assert victim.read_text() == "precious\n"
    log.restart()  # the atomic rewrite replaces the link itself, never its target
    log.emit({"step": 2, "loss": 0.5})
    assert victim.read_text() == "precious\n" and not (tmp_path / "metrics.jsonl").is_symlink()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_link_planted_at_a_checkpoints_temporary_name_is_removed_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    final = tmp_path / "out" / "checkpoint-4"
    final.parent.mkdir()
    (final.parent / f".checkpoint-4.tmp-{os.getpid()}").symlink_to(target, target_is_directory=True)
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new" and not final.is_symlink()
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


# ----------------------------------------------------------------------------- disk full


def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def run_files(tiny_model, tmp_path):
    lines = (demo_data_dir() / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:16]) + "\n")
    sets = [
        "training_config.max_steps=4", "training_config.save_steps=2", "training_config.logging_steps=2",
        "training_config.eval_strategy=no", "training_config.per_device_train_batch_size=2",
        "training_config.max_seq_length=64", "peft_config.r=2",
    ]  # fmt: skip
    out = tmp_path / "out"
    return out, lambda *extra: train_argv(tiny_model, tmp_path / "train.jsonl", out, *extra, sets=sets)


def test_disk_full_during_a_checkpoint_is_a_message_and_the_run_resumes(run_files, monkeypatch, capsys):
    out, argv = run_files
    real_write, calls = checkpoint.write_bytes_atomic, []

    def half_a_file(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        enospc()

    def write_until_full(path, data):  # checkpoint-2 is written; checkpoint-4 fills the disk half-way
        calls.append(path)
        if len(calls) < 2:
            return real_write(path, data)
        replace_atomic(path, half_a_file)

    monkeypatch.setattr(checkpoint, "write_bytes_atomic", write_until_full)
    assert main(argv()) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no space left on device while writing checkpoint-4" in err
    assert "checkpoint-2" in err and "--resume" in err
    assert [s for s, _ in list_checkpoints(out)] == [2] and leftovers(out) == []
    monkeypatch.setattr(checkpoint, "write_bytes_atomic", real_write)
    assert main(argv("--resume")) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 4


def test_safetensors_disk_full_at_the_final_adapter_is_a_message(run_files, monkeypatch, capsys):
    out, argv = run_files
    real = lora.save_adapter

    def full_at_the_end(model, path, *a, **k):
        if Path(path) == out:
            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, message: "No space left on device" })'
            )
        return real(model, path, *a, **k)

    monkeypatch.setattr(lora, "save_adapter", full_at_the_end)
    assert main(argv()) == 2
    err = capsys.readouterr().err
    assert (
        "Traceback" not in err and "the final adapter" in err and "checkpoint-4" in err and "--resume" in err
    )
    assert not (out / "adapter_model.safetensors").exists() and leftovers(out) == []
    monkeypatch.setattr(lora, "save_adapter", real)
    assert main(argv("--resume")) == 0 and (out / "adapter_model.safetensors").exists()


def test_disk_full_at_results_says_the_adapter_was_saved(run_files, monkeypatch, capsys):
    out, argv = run_files
    monkeypatch.setattr("lorafit.train.write_json_atomic", enospc)
    assert main(argv()) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "results.json" in err and "final adapter was saved" in err
    assert (out / "adapter_model.safetensors").exists() and not (out / "results.json").exists()


def test_disk_full_at_the_plot_only_warns_and_the_run_succeeds(run_files, monkeypatch, capsys, caplog):
    from matplotlib.figure import Figure

    out, argv = run_files

    def half_png(self, fname, *a, **k):
        Path(fname).write_bytes(b"\x89PNG half")
        enospc()

    monkeypatch.setattr(Figure, "savefig", half_png)
    assert main(argv()) == 0
    assert "could not write" in caplog.text and "loss.png" in caplog.text
    assert (out / "adapter_model.safetensors").exists() and (out / "results.json").exists()
    assert not (out / "loss.png").exists() and leftovers(out) == []


def test_a_run_resumes_with_the_config_it_saved_and_never_changes_it(tiny_model, tmp_path, capsys):
    out, data = tmp_path / "out", tmp_path / "train.jsonl"
    data.write_text("".join((demo_data_dir() / "train.jsonl").read_text().splitlines(keepends=True)[:4]))
    sets = ["training_config.max_steps=1", "training_config.save_steps=1", "training_config.max_seq_length=32",
            "training_config.eval_strategy=no", "training_config.per_device_train_batch_size=1"]  # fmt: skip

    def argv(*extra):
        return train_argv(tiny_model, data, out, *extra, sets=sets)

    assert main(argv()) == 0
    saved = (out / "config.yaml").read_bytes()
    assert main(argv("--config", str(out / "config.yaml"), "--resume")) == 0  # the same text: allowed
    assert main(argv("--config", str(out / "config.yaml"), "--overwrite", "--set", "peft_config.r=4")) == 2
    err = capsys.readouterr().err
    assert "is where this run writes its resolved config" in err and "Fix: copy it elsewhere" in err
    assert (out / "config.yaml").read_bytes() == saved and (out / "results.json").exists()


def small_disk(folder: Path, size: str) -> Path:
    """Mount a tmpfs of `size` at `folder`: a real disk that fills (needs root and mount, else skip)."""
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("mounting a small tmpfs needs root")
    return folder


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs."""
    yield small_disk(tmp_path / "small", "64k")
    subprocess.run(["umount", str(tmp_path / "small")], check=True)


def test_a_real_full_disk_is_oserror_enospc_and_a_message(full_disk, tiny_model, capsys):
    """torch's zip writer reports a full disk as RuntimeError("... unexpected pos ..."), which no check
    recognized (a traceback under torchrun); training state is serialized in memory and written plainly."""
    state = {"exp_avg": torch.zeros(64 * 1024)}  # 256 KB
    with pytest.raises(OSError) as e:
        checkpoint.save_training_state(full_disk / "training_state.pt", state)
    assert checkpoint.is_disk_full(e.value) and leftovers(full_disk) == []
    assert run_cli("tiny-model", full_disk / "tiny") == 2  # a command without its own message: the CLI's
    err = capsys.readouterr().err
    assert (
        "error: no space left on device" in err and "Fix: free disk space" in err and "Traceback" not in err
    )
    assert not any(full_disk.iterdir())


@pytest.mark.slow
def test_a_full_disk_under_torchrun_is_a_message_and_the_run_resumes(tiny_model, tmp_path):
    """Two gloo processes writing to a 400 KiB tmpfs: checkpoint-2 (~260 KB) fits, checkpoint-4 does not.
    Exit 2 with the message, nothing half-written; with room again, --resume finishes the run."""
    disk = small_disk(tmp_path / "disk", "400k")
    try:
        lines = (demo_data_dir() / "train.jsonl").read_text().splitlines(keepends=True)
        (tmp_path / "train.jsonl").write_text("".join(lines[:64]))
        sets = ["training_config.max_steps=4", "training_config.save_steps=2", "training_config.max_seq_length=64",
                "training_config.eval_strategy=no", "peft_config.r=2", "training_config.per_device_train_batch_size=2"]  # fmt: skip
        cmd = [sys.executable, "-m", "lorafit", *train_argv(tiny_model, tmp_path / "train.jsonl", disk / "out",
                                                            "--nproc", "2", sets=sets)]  # fmt: skip
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert first.returncode == 2 and "Traceback" not in first.stderr, first.stderr[-3000:]
        assert (
            "no space left on device while writing checkpoint-4" in first.stderr
            and "--resume" in first.stderr
        )
        assert [s for s, _ in list_checkpoints(disk / "out")] == [2] and leftovers(disk) == []
        subprocess.run(["mount", "-o", "remount,size=2m", str(disk)], check=True)
        again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads((disk / "out" / "results.json").read_text())["steps"] == 4
    finally:
        subprocess.run(["umount", str(disk)], check=True)
