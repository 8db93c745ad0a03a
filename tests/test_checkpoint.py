"""trainer_state.json as TrainState's file form, and loss.png without a process-wide backend switch.

The whole-run guarantees (bit-exact resume after SIGKILL, SIGTERM, NaN) are in tests/test_resume.py;
these pin the format itself, including checkpoints written before some keys existed.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import torch

from lorafit.checkpoint import TrainState, Window
from lorafit.errors import LorafitError
from lorafit.metrics import plot_losses, read_metrics

KEYS = [
    "step", "total_steps", "tokens", "targets", "epoch", "results", "window", "skipped",
    "data_fingerprint", "elapsed_sec", "config", "log_history",
]  # fmt: skip


def saved_state() -> dict:
    return {
        "step": 8, "total_steps": 12, "tokens": 900, "targets": 300, "epoch": 8 / 5,
        "results": {"eval_loss_before": 2.5}, "window": {"loss": 41.5, "targets": 20, "tokens": 60},
        "skipped": 1, "data_fingerprint": "0123456789abcdef", "elapsed_sec": 3.25,
        "config": {"training_config": {"learning_rate": 0.001}},
        "log_history": [{"step": 0, "epoch": 0.0, "eval_loss": 2.5}, {"step": 6, "epoch": 1.2, "loss": 2.0}],
    }  # fmt: skip


def test_trainer_state_reads_and_writes_back_the_same_json():
    d = saved_state()
    state = TrainState.from_dict(json.loads(json.dumps(d)), source="s.json", fix="Fix: x")
    assert list(state.to_dict(steps_per_epoch=5)) == KEYS
    assert json.dumps(state.to_dict(steps_per_epoch=5), indent=1) == json.dumps(d, indent=1)


def test_a_checkpoint_from_before_the_newer_keys_resumes_with_their_old_meaning():
    old = {"step": 4, "tokens": 100, "targets": 40, "epoch": 0.8}
    state = TrainState.from_dict(old, source="s.json", fix="Fix: x")
    assert (state.skipped, state.window, state.eval_loss_before) == (0, Window(), None)
    assert state.log_history is None  # the caller takes metrics.jsonl up to step 4
    assert state.elapsed_before is None  # results then give the resumed part's time and tokens/s only
    assert state.differences({"training_config": {"seed": 1}}, "f" * 16, 12) == []


def test_resuming_with_other_settings_data_or_length_warns_for_each():
    state = TrainState.from_dict(saved_state(), source="s.json", fix="Fix: x")
    warnings = state.differences({"training_config": {"learning_rate": 0.002}}, "other", 20)
    assert warnings == [
        "warning: resuming with a changed setting, training_config.learning_rate: 0.001 -> 0.002; "
        "the run is no longer one run",
        "warning: resuming on different training data than the checkpoint was trained on",
        "warning: the run now has 20 steps, the checkpoint's had 12",
    ]


@pytest.mark.parametrize("bad", [{"step": "8"}, {"tokens": None}, {"targets": 1.5}])
def test_a_trainer_state_without_integer_counters_is_refused(bad):
    d = {**saved_state(), **bad}
    with pytest.raises(LorafitError) as e:
        TrainState.from_dict(d, source="ckpt/trainer_state.json", fix="Fix: resume from an older one.")
    key = next(iter(bad))
    assert (
        str(e.value)
        == f"ckpt/trainer_state.json: no valid {key}; not a lorafit checkpoint. Fix: resume from an older one."
    )


def test_loss_plot_is_a_png_and_leaves_the_matplotlib_backend_alone(tmp_path):
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # an application's own choice, which plotting must not change
    try:
        (tmp_path / "metrics.jsonl").write_text(
            "".join(json.dumps(h) + "\n" for h in saved_state()["log_history"]) + '{"step": 9, "lo'
        )
        history = read_metrics(tmp_path / "metrics.jsonl")
        assert [h["step"] for h in history] == [0, 6]  # the line cut by a crash ends the file
        plot_losses(history, tmp_path / "loss.png")
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_each_rank_restores_its_own_gpu_rng_state(monkeypatch):
    from lorafit.checkpoint import restore_training_state

    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(("all", states)))
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ranks = [torch.tensor([0], dtype=torch.uint8), torch.tensor([1], dtype=torch.uint8)]
    ts = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
        "rng_cuda": [ranks[0]], "rng_cuda_ranks": ranks,
    }  # fmt: skip
    gpu1 = torch.device("cuda", 1)
    restore_training_state(Path("checkpoint-2"), ts, optimizer, scheduler, None, rank=1, device=gpu1)
    assert calls == [(ranks[1], gpu1)]  # its own state, on its own GPU; not rank 0's on every GPU
