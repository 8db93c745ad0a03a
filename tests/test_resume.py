"""Crash-safe training and exact resume on a tiny Phi-3 (CPU, fp32, fixed seed).

A run that is interrupted -- SIGKILL at any moment, also in the middle of a checkpoint write, or
SIGINT/SIGTERM -- and then continued with `--resume` must end with the same adapter BIT FOR BIT
(every safetensors tensor torch.equal, and the file byte for byte) and the same metrics.jsonl as one uninterrupted run. Compared
with timing fields left out: "tokens_per_sec" in metrics.jsonl, "runtime_sec"/"tokens_per_sec" and
the run-specific "resumed_from"/"output_dir" in results.json.

The reference run is in this process, the killed runs are subprocesses (`python -m lorafit train`),
so exactness holds across processes. Nothing had to be pinned for that on torch 2.13 CPU (MKL and
oneDNN, AVX2): 1 vs 2 threads and MKL_CBWR unset vs AVX2 gave identical results. The subprocesses
get OMP_NUM_THREADS equal to this process's thread count so that the comparison stays like for like
on machines with more cores.

The run: 12 steps of 2 micro-batches (gradient accumulation) with lora_dropout 0.1 (so the RNG
matters), checkpoints every 4 steps, loss logged every 3 (so a checkpoint falls inside a logging
window) and evaluation every 5, over 2.4 epochs (data order across epoch boundaries).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import train_argv, tree
from pause_in_checkpoint import PAUSED  # tests/pause_in_checkpoint.py
from safetensors.torch import load_file

import lorafit.distributed as loss_site  # where the training step calls loss_sum
from lorafit.checkpoint import STATE_FILE, atomic_dir, list_checkpoints, output_lock, rotate
from lorafit.cli import main
from lorafit.demo import demo_data_dir
from lorafit.errors import LorafitError

TIMING_METRICS = {"tokens_per_sec"}
RUN_SPECIFIC_RESULTS = {"runtime_sec", "tokens_per_sec", "resumed_from", "output_dir", "checks", "memory"}
STEPS = 12


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("resume")
    lines = (demo_data_dir() / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (d / "eval.jsonl").write_text("\n".join(lines[40:52]) + "\n")
    return {
        "model": tiny_model,
        "train": d / "train.jsonl",
        "eval": d / "eval.jsonl",
        "dir": d,
    }


def train_args(files, out: Path, *extra: str) -> list[str]:
    sets = [
        f"training_config.max_steps={STEPS}", "training_config.save_steps=4", "training_config.logging_steps=3",
        "training_config.eval_strategy=steps", "training_config.eval_steps=5",
        "training_config.per_device_train_batch_size=2", "training_config.gradient_accumulation_steps=2",
        "training_config.max_seq_length=96", "training_config.learning_rate=5e-3",
        "peft_config.r=4", "peft_config.lora_dropout=0.1",
    ]  # fmt: skip
    return train_argv(files["model"], files["train"], out, *extra, eval_data=files["eval"], sets=sets)


def snapshot(out: Path) -> dict:
    """What must be identical: adapter tensors, metrics (without timings), results (without timings)."""
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    return {
        "adapter": load_file(out / "adapter_model.safetensors"),
        "adapter_bytes": (out / "adapter_model.safetensors").read_bytes(),
        "metrics": [{k: v for k, v in m.items() if k not in TIMING_METRICS} for m in metrics],
        "results": {k: v for k, v in results.items() if k not in RUN_SPECIFIC_RESULTS},
        "checks": {
            k: v for k, v in results.get("checks", {}).items() if k != "seconds"
        },  # the post-check's timing
    }


def assert_same_run(out: Path, ref: dict) -> None:
    got = snapshot(out)
    assert got["adapter"].keys() == ref["adapter"].keys()
    differ = [k for k in ref["adapter"] if not torch.equal(got["adapter"][k], ref["adapter"][k])]
    assert not differ, f"{len(differ)} adapter tensors differ, e.g. {differ[0]}"
    assert got["adapter_bytes"] == ref["adapter_bytes"], "same tensors, but the adapter files differ in bytes"
    assert got["metrics"] == ref["metrics"]
    assert got["results"] == ref["results"]
    assert got["checks"] == ref["checks"]


@pytest.fixture(scope="module")
def reference(files) -> dict:
    out = files["dir"] / "reference"
    assert main(train_args(files, out)) == 0
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    snap = snapshot(out)
    steps = [m["step"] for m in snap["metrics"] if "loss" in m]
    assert steps == [3, 6, 9, 12] and [m["step"] for m in snap["metrics"] if "eval_loss" in m] == [
        0,
        5,
        10,
        12,
    ]
    return {**snap, "out": out}


def resume_copy(reference, files, name: str, ckpt: str) -> Path:
    """A fresh output directory holding only one of the reference run's checkpoints."""
    out = files["dir"] / name
    out.mkdir()
    shutil.copytree(reference["out"] / ckpt, out / ckpt)
    return out


def child_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env.pop("NO_COLOR", None)
    return env


PAUSER = Path(__file__).with_name("pause_in_checkpoint.py")


def start_child(files, out: Path, log: Path, *extra: str, pause: str | None = None) -> subprocess.Popen:
    """`python -m lorafit train ...` in a new process, its stderr appended to `log`; with `pause`
    ("checkpoint-8[:SECONDS]") it pauses inside that checkpoint's write (tests/pause_in_checkpoint.py)."""
    cmd = [sys.executable, "-m", "lorafit"] if pause is None else [sys.executable, str(PAUSER), pause]
    with open(log, "a") as err:
        return subprocess.Popen([*cmd, *train_args(files, out, *extra)], stdout=subprocess.DEVNULL, stderr=err,
                                env=child_env())  # fmt: skip


def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the training process ended (rc {proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def logged_steps(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and '"loss"' in line)


# ----------------------------------------------------------------------------- resume is exact


@pytest.mark.parametrize("ckpt", ["checkpoint-4", "checkpoint-8"])
def test_resume_from_a_checkpoint_is_bit_exact(reference, files, ckpt):
    """checkpoint-4 is inside a logging window (3..6) and checkpoint-8 is in the second epoch."""
    out = resume_copy(reference, files, f"from-{ckpt}", ckpt)
    assert main(train_args(files, out, "--resume")) == 0
    assert_same_run(out, reference)
    res = json.loads((out / "results.json").read_text())
    assert (
        res["resumed_from"] == str(out / ckpt)
        and res["eval_loss_before"] == reference["results"]["eval_loss_before"]
    )
    # the whole run's time and throughput: the checkpoint's training time carried over, plus the resumed part
    state = json.loads((reference["out"] / ckpt / STATE_FILE).read_text())
    assert state["elapsed_sec"] > 0 and state["tokens"] < res["tokens"]
    assert res["runtime_sec"] > state["elapsed_sec"]
    # runtime_sec is rounded to 0.01 s and tokens_per_sec to 0.1 from the unrounded runtime
    slowest, fastest = (
        res["tokens"] / (res["runtime_sec"] + 0.005),
        res["tokens"] / (res["runtime_sec"] - 0.005),
    )
    assert slowest - 0.05 <= res["tokens_per_sec"] <= fastest + 0.05


def test_resume_path_from_another_directory(reference, files):
    out = files["dir"] / "resume-path"
    assert main(train_args(files, out, "--resume", str(reference["out"] / "checkpoint-8"))) == 0
    assert_same_run(out, reference)


def test_sigkill_in_the_middle_of_a_checkpoint_write_then_resume_is_bit_exact(reference, files):
    """SIGKILL while checkpoint-8 is written (after its files, before the rename): checkpoint-8 is absent,
    checkpoint-4 complete, and --resume (from checkpoint-4) ends bit-identical to the uninterrupted run."""
    out, log = files["dir"] / "sigkill", files["dir"] / "sigkill.log"
    proc = start_child(files, out, log, pause="checkpoint-8")
    try:
        wait_for(lambda: PAUSED in log.read_text(), proc, "the pause inside the checkpoint-8 write")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill()
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-4" in names and "checkpoint-8" not in names
    assert any(n.startswith(".checkpoint-8.tmp-") for n in names)  # the half-done write, never trusted
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-4"]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "results.json").exists()

    assert main(train_args(files, out, "--resume")) == 0
    assert_same_run(out, reference)
    assert not [
        p for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.name == ".lorafit.lock"
    ]


def test_sigterm_checkpoints_at_the_next_step_and_exits_130(reference, files):
    """SIGTERM after the first logged steps: a checkpoint at the next step boundary, exit 130, and
    --resume ends bit-identical. (checkpoint-8 pauses 3 s, so the signal always lands before the end.)"""
    out, log = files["dir"] / "sigterm", files["dir"] / "sigterm.log"
    proc = start_child(files, out, log, pause="checkpoint-8:3")
    try:
        wait_for(lambda: logged_steps(out) >= 1, proc, "the first logged step")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130, log.read_text()[-2000:]
    finally:
        proc.kill()
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps and 3 <= steps[-1] <= 8
    assert f"SIGTERM: saved checkpoint-{steps[-1]}" in log.read_text()
    assert not (out / "adapter_model.safetensors").exists()
    assert main(train_args(files, out, "--resume")) == 0
    assert_same_run(out, reference)


def test_sigint_in_process_checkpoints_and_resume_is_exact(reference, files, monkeypatch, caplog):
    """Ctrl-C (SIGINT) during step 6: checkpoint-6 at the step boundary, exit code 130, then exact resume."""
    out = files["dir"] / "sigint"
    real, calls = loss_site.loss_sum, []

    def interrupting(*a, **k):
        calls.append(1)
        if len(calls) == 11:  # the first micro-batch of step 6 (2 per step)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(loss_site, "loss_sum", interrupting)
    caplog.set_level(logging.INFO, logger="lorafit")
    assert main(train_args(files, out)) == 130
    assert "SIGINT: saved checkpoint-6" in caplog.text
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]
    monkeypatch.setattr(loss_site, "loss_sum", real)
    assert main(train_args(files, out, "--resume")) == 0
    assert_same_run(out, reference)


@pytest.mark.slow
def test_killed_again_and_again_ends_bit_exact(reference, files):
    """SIGKILL at several points of one run -- after k logged steps, inside the checkpoint-8 write, inside the
    final checkpoint's write -- each time continued with `--resume` in a new process; the end is the same."""
    out = files["dir"] / "multikill"

    def kill_when(n: int, cond, pause: str | None = None):
        log = files["dir"] / f"multikill-{n}.log"
        proc = start_child(files, out, log, "--resume", pause=pause)
        try:
            wait_for(lambda: cond(log), proc, f"kill point {n}")
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            proc.kill()

    kill_when(1, lambda log: logged_steps(out) >= 1)  # mid-run, maybe before any checkpoint
    kill_when(2, lambda log: PAUSED in log.read_text(), pause="checkpoint-8")
    kill_when(3, lambda log: PAUSED in log.read_text(), pause=f"checkpoint-{STEPS}")
    assert [s for s, _ in list_checkpoints(out)] == [4, 8]
    args = [sys.executable, "-m", "lorafit", *train_args(files, out, "--resume")]
    r = subprocess.run(args, capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(out, reference)


# ----------------------------------------------------------------------------- output directory rules


def test_new_run_into_a_directory_with_checkpoints_is_refused(reference, files, capsys):
    out = reference["out"]
    before = tree(out)
    assert main(train_args(files, out)) == 2
    err = capsys.readouterr().err
    assert "already holds another run" in err and "checkpoint-4" in err
    assert "--resume" in err and "--overwrite" in err
    assert tree(out) == before


def test_resume_and_overwrite_together_are_refused(files, capsys):
    out = files["dir"] / "both"
    assert main(train_args(files, out, "--resume", "--overwrite")) == 2
    assert "pass only one" in capsys.readouterr().err and not out.exists()


def test_overwrite_replaces_the_previous_run(reference, files):
    out = files["dir"] / "overwrite"
    shutil.copytree(reference["out"], out)
    (out / "checkpoint-99").mkdir()  # not complete (no trainer_state.json): not a checkpoint, left alone
    assert main(train_args(files, out, "--overwrite", "--set", "training_config.max_steps=2")) == 0
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-2"]
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 2, 2]
    assert (out / "checkpoint-99").is_dir()


def test_resume_with_no_checkpoint_yet_starts_from_the_beginning(reference, files, caplog):
    """A run killed before its first checkpoint leaves metrics.jsonl and config.yaml; --resume starts over."""
    out = files["dir"] / "early-kill"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 5.0}\n{"step": 3, "lo')
    (out / ".checkpoint-4.tmp-12345").mkdir()
    caplog.set_level(logging.INFO, logger="lorafit")
    assert main(train_args(files, out, "--resume", "--set", "training_config.max_steps=2")) == 0
    assert "starting from step 0" in caplog.text
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 2, 2]
    assert metrics[0]["eval_loss"] == reference["metrics"][0]["eval_loss"]
    assert not (out / ".checkpoint-4.tmp-12345").exists()


def test_resume_of_a_finished_run_without_checkpoints_is_refused(files, capsys):
    out = files["dir"] / "finished-no-ckpt"
    no_ckpt = ["--set", "training_config.save_strategy=no", "--set", "training_config.max_steps=2"]
    assert main(train_args(files, out, *no_ckpt)) == 0
    before = tree(out)
    assert main(train_args(files, out, *no_ckpt, "--resume")) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--overwrite" in err
    assert tree(out) == before


def test_resume_with_a_changed_setting_warns(reference, files, caplog):
    out = resume_copy(reference, files, "changed", "checkpoint-8")
    assert main(train_args(files, out, "--resume", "--set", "training_config.learning_rate=1e-3")) == 0
    assert "training_config.learning_rate: 0.005 -> 0.001" in caplog.text


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_dir_is_complete_or_absent(tmp_path):
    final = tmp_path / "checkpoint-1"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("crash while rewriting")
    assert (final / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("new")
    assert (final / "a").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_rotation_deletes_old_checkpoints_only_after_the_new_one_is_complete(tmp_path):
    def ckpt(step):
        with atomic_dir(tmp_path / f"checkpoint-{step}") as tmp:
            for name in ("trainer_state.json", "training_state.pt", "adapter_model.safetensors"):
                (tmp / name).write_text("{}")

    ckpt(1)
    ckpt(2)
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "checkpoint-3"):
        raise RuntimeError("killed")
    rotate(tmp_path, 1)  # what run() does after a save: the failed save never got here
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    ckpt(3)
    rotate(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


def test_a_second_run_in_the_same_directory_is_refused_while_the_first_runs(tmp_path):
    with output_lock(tmp_path):
        with pytest.raises(LorafitError, match="in use by another lorafit run"):
            with output_lock(tmp_path):
                pass
    assert not (tmp_path / ".lorafit.lock").exists()


# ----------------------------------------------------------------------------- the numerical guard


def nan_at(monkeypatch, steps: set[int], where: str = "loss") -> None:
    """Make the first micro-batch of the given (1-based) steps produce a NaN loss or a NaN gradient."""
    real, calls = loss_site.loss_sum, []

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    def patched(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        if (len(calls) + 1) // 2 in steps and len(calls) % 2 == 1:  # 2 micro-batches per step
            return out * float("nan") if where == "loss" else NanGrad.apply(out)
        return out

    monkeypatch.setattr(loss_site, "loss_sum", patched)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_loss_or_gradient_stops_and_keeps_the_last_good_checkpoint(
    reference, files, monkeypatch, capsys, where
):
    out = files["dir"] / f"nan-{where}"
    nan_at(monkeypatch, {6}, where)
    assert main(train_args(files, out)) == 2
    err = capsys.readouterr().err
    what = "the loss is nan" if where == "loss" else "the gradient norm is nan"
    assert f"step 6: {what}" in err and "learning rate" in err and "skip_nonfinite_batches" in err
    assert f"Last good checkpoint: {out / 'checkpoint-4'}" in err and "train.jsonl:" in err
    assert [s for s, _ in list_checkpoints(out)] == [4]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "results.json").exists()
    # the checkpoint is the reference's (the guard never let a NaN reach the weights)
    a, b = (
        load_file(out / "checkpoint-4/adapter_model.safetensors"),
        load_file(reference["out"] / "checkpoint-4/adapter_model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    if where == "loss":  # ... and resuming from it (without the fault) gives the reference run
        monkeypatch.undo()
        assert main(train_args(files, out, "--resume")) == 0
        assert_same_run(out, reference)


def test_absurd_learning_rate_stops_with_a_message(files, capsys):
    out = files["dir"] / "lr-1e30"
    args = train_args(
        files, out, "--set", "training_config.learning_rate=1e30", "--set", "training_config.save_steps=1"
    )
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "so training stopped before the optimizer step" in err and "(1e+30)" in err
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps, "step 1 is still finite, so checkpoint-1 exists"
    last = out / f"checkpoint-{steps[-1]}"
    assert all(torch.isfinite(t).all() for t in load_file(last / "adapter_model.safetensors").values())
    assert f"Last good checkpoint: {last}" in err
    assert not (out / "adapter_model.safetensors").exists()


def test_skip_nonfinite_batches_skips_counts_and_logs(files, monkeypatch):
    out = files["dir"] / "skip"
    skip2 = ["--set", "training_config.skip_nonfinite_batches=2", "--set", "training_config.max_steps=8"]
    nan_at(monkeypatch, {2, 7})
    assert main(train_args(files, out, *skip2)) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [m for m in metrics if "skipped" in m]
    assert [(m["step"], m["skipped_steps"]) for m in skipped] == [(2, 1), (7, 2)]
    assert skipped[0]["skipped"].startswith("the loss is nan")
    assert json.loads((out / "results.json").read_text())["skipped_steps"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter_model.safetensors").values())
    # one more bad step than allowed stops the run
    monkeypatch.undo()
    nan_at(monkeypatch, {1, 2, 5})
    out2 = files["dir"] / "skip-too-many"
    assert main(train_args(files, out2, *skip2)) == 2
    assert [s for s, _ in list_checkpoints(out2)] == [4]
