"""training_config.report_to: each dashboard gets exactly the numbers of metrics.jsonl, read back with
its own library's reader (TensorBoard's EventAccumulator, W&B's protobuf records, MlflowClient, Trackio's
SQLiteStorage); the config forms are Hugging Face's; a missing library fails before the model loads;
dashboards are finished however the run ends.

The four libraries are in the `test` extra; a test whose library is missing is skipped with the reason.
One tiny run (a subprocess, so wandb's and trackio's process-wide state and TRACKIO_DIR stay out of
pytest's process) reports to every installed dashboard at once. W&B's reader is `wandb leet inspect
--json` (wandb 0.31 has no Python reader of .wandb files; its Go core writes, reads and syncs them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_argv

from lorafit import dashboards
from lorafit.cli import main
from lorafit.config import TrainingConfig
from lorafit.dashboards import BACKENDS, Dashboards, missing
from lorafit.demo import demo_data_dir

REPO = Path(__file__).resolve().parents[1]
STEPS = [
    "training_config.max_steps=4", "training_config.logging_steps=2", "training_config.eval_strategy=steps",
    "training_config.max_seq_length=128", "training_config.save_strategy=no", "peft_config.r=4",
]  # fmt: skip

# what each metrics.jsonl key is called on a dashboard (transformers' rewrite_logs rule)
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "tokens_per_sec": "train/tokens_per_sec", "eval_loss": "eval/loss"}  # fmt: skip


def expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    """{dashboard tag: [(step, value)]} straight from metrics.jsonl."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {tag: [(x["step"], x[key]) for x in lines if x.get(key) is not None] for key, tag in TAGS.items()}


# ----------------------------------------------------------------------------- config and plumbing (no libraries)


def test_report_to_takes_hugging_faces_forms():
    assert TrainingConfig().report_to == []
    assert TrainingConfig(report_to="none").report_to == TrainingConfig(report_to=["none"]).report_to == []
    assert TrainingConfig(report_to="TensorBoard").report_to == ["tensorboard"]
    assert TrainingConfig(report_to=["wandb", "mlflow", "wandb"]).report_to == ["wandb", "mlflow"]
    assert TrainingConfig(report_to="all").report_to == [n for n in BACKENDS if not missing(n)]
    for bad, says in [("comet_ml", "choose from tensorboard, wandb, trackio, mlflow"),
                      (["all", "wandb"], "stand alone"), (3, "expected 'none', 'all'")]:  # fmt: skip
        with pytest.raises(Exception, match=says):
            TrainingConfig(report_to=bad)


def test_dashboard_names_follow_transformers_rewrite_logs():
    rec = {
        "step": 4,
        "epoch": 0.5,
        "loss": 2.0,
        "lr": 1e-4,
        "grad_norm": None,
        "eval_loss": 1.5,
        "skipped": "x",
    }
    assert dashboards.scalars(rec) == {
        "train/epoch": 0.5,
        "train/loss": 2.0,
        "train/lr": 1e-4,
        "eval/loss": 1.5,
    }


def test_a_missing_library_is_a_config_error_naming_pip_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dashboards.TensorBoard, "modules", ("lorafit_no_such_module",))
    argv = train_argv(tmp_path / "no-model", demo_data_dir() / "train.jsonl", tmp_path / "out",
                      sets=["training_config.report_to=tensorboard"])  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "training_config.report_to: tensorboard needs lorafit_no_such_module" in err
    assert "pip install 'lorafit[tensorboard]'" in err and "no-model" not in err


class FakeWandb:
    """wandb's two calls wandb_mode makes: login (never prompting) and the host from its settings."""

    def __init__(self, key: bool, host: str):
        self.key, self.host = key, host

    def login(self, *, prompt: bool, verify: bool) -> bool:
        assert prompt is False and verify is False  # no prompt, no network for the login itself
        return self.key

    def Settings(self):  # noqa: N802 (wandb's name)
        return type("S", (), {"base_url": f"https://{self.host}"})()


def test_wandb_goes_offline_without_a_key_or_network_and_wandb_mode_decides_when_set(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert dashboards.wandb_mode(FakeWandb(False, "api.wandb.ai"))[0] == "offline"
    mode, why = dashboards.wandb_mode(FakeWandb(True, "host.invalid"))  # .invalid never resolves (RFC 2606)
    assert mode == "offline" and "host.invalid cannot be reached" in why
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert dashboards.wandb_mode(FakeWandb(True, "host.invalid")) == (None, "WANDB_MODE=disabled")


class Recorder:
    """A dashboard that remembers its calls (stands in for a library in the tests below)."""

    modules = ("json",)  # always installed
    calls: list = []

    def __init__(self, out, name, project):
        self.calls.append(("init", name, project))

    def start(self, config, step):
        self.calls.append(("start", config, step))

    def log(self, record):
        self.calls.append(("log", dict(record)))

    def finish(self, status):
        self.calls.append(("finish", status))


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(Recorder, "calls", [])
    monkeypatch.setitem(BACKENDS, "tensorboard", Recorder)
    return Recorder.calls


def test_a_dashboard_gets_every_metrics_line_and_the_config_and_is_finished(recorder, tiny_model, tmp_path):
    out = tmp_path / "out"
    data = demo_data_dir()
    argv = train_argv(tiny_model, data / "train.jsonl", out, eval_data=data / "eval.jsonl",
                      sets=[*STEPS, "training_config.report_to=tensorboard", "training_config.project=p"])  # fmt: skip
    assert main(argv) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recorder[0] == ("init", "out", "p")
    kind, config, step = recorder[1]
    assert kind == "start" and step == 0 and config["training_config"]["report_to"] == ["tensorboard"]
    assert [c[1] for c in recorder[2:-1]] == lines  # the same records, in the same order
    assert recorder[-1] == ("finish", "finished")


def test_dashboards_are_finished_failed_or_killed_when_the_run_ends_otherwise(recorder, tmp_path):
    for exc, status in [(ValueError, "failed"), (KeyboardInterrupt, "killed")]:
        recorder.clear()
        with pytest.raises(exc):
            with Dashboards(["tensorboard"], tmp_path, {}, 0, name="n", project=None):
                raise exc()
        assert recorder[-1] == ("finish", status)


# ----------------------------------------------------------------------------- one run, every installed library


@pytest.fixture(scope="module")
def reported(request, tmp_path_factory) -> tuple[Path, Path]:
    """(output dir, trackio dir) of one tiny run that reports to every installed dashboard."""
    names = [n for n in BACKENDS if not missing(n)]
    if not names:
        pytest.skip(
            "no dashboard library is installed (they are in the test extra: pip install -e '.[test]')"
        )
    tiny_model = request.getfixturevalue("tiny_model")  # built only when a library is there
    root = tmp_path_factory.mktemp("dash")
    out, data = root / "out", demo_data_dir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
    # HOME: no W&B key from the user's ~/.netrc, so wandb must choose offline by itself
    env.update(HOME=str(root), TRACKIO_DIR=str(root / "trackio"), PYTHONPATH=str(REPO))
    sets = [*STEPS, f"training_config.report_to=[{','.join(names)}]"]
    argv = train_argv(tiny_model, data / "train.jsonl", out, eval_data=data / "eval.jsonl", sets=sets)
    r = subprocess.run(
        [sys.executable, "-m", "lorafit", *argv], capture_output=True, text=True, env=env, cwd=root
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, root / "trackio"


def test_tensorboard_event_files_hold_the_metrics_jsonl_values(reported):
    pytest.importorskip(
        "tensorboard", reason="report_to: tensorboard needs pip install 'lorafit[tensorboard]'"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = reported
    acc = EventAccumulator(str(out / "runs"))
    acc.Reload()
    for tag, want in expected(out).items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag  # stored as float32
    assert "learning_rate" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_wandb_runs_offline_without_a_key_and_its_history_holds_the_metrics_jsonl_values(reported):
    pytest.importorskip("wandb", reason="report_to: wandb needs pip install 'lorafit[wandb]'")
    out, _ = reported
    (run,) = (out / "wandb").glob("offline-run-*")  # offline: no key in HOME, none in the environment
    # wandb's own reader of a run's .wandb log: one JSON record per line
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HOME": str(out.parent)})
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    rows = [
        (x["history"]["step"].get("num", 0), x["history"]["item"]) for x in records if x["type"] == "history"
    ]
    for tag, want in expected(out).items():
        assert [(step, item[tag]) for step, item in rows if tag in item] == want, tag  # exact float64 (JSON)
    (config,) = [x["run"]["config"]["update"] for x in records if x["type"] == "run"]
    assert config["training_config"]["learning_rate"] == 2e-4


def test_mlflow_store_holds_the_metrics_jsonl_values_and_the_config(reported):
    pytest.importorskip("mlflow", reason="report_to: mlflow needs pip install 'lorafit[mlflow]'")
    from mlflow import MlflowClient

    out, _ = reported
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lorafit").experiment_id])
    assert run.info.run_name == "out" and run.info.status == "FINISHED"
    for tag, want in expected(out).items():
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)] == want, tag
    assert run.data.params["training_config.learning_rate"] == "0.0002"


def test_trackio_store_holds_the_metrics_jsonl_values_and_the_config(reported, monkeypatch):
    pytest.importorskip("trackio", reason="report_to: trackio needs pip install 'lorafit[trackio]'")
    from trackio import sqlite_storage

    out, store = reported
    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", store)  # trackio reads TRACKIO_DIR once, at import
    logs = sqlite_storage.SQLiteStorage.get_logs("lorafit", "out")
    for tag, want in expected(out).items():
        assert [(x["step"], x[tag]) for x in logs if tag in x] == want, tag
    config = sqlite_storage.SQLiteStorage.get_run_config("lorafit", "out")
    assert config["training_config"]["learning_rate"] == 2e-4


def test_a_resumed_run_continues_the_tensorboard_curves_as_metrics_jsonl_does(tiny_model, tmp_path):
    pytest.importorskip(
        "tensorboard", reason="report_to: tensorboard needs pip install 'lorafit[tensorboard]'"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, data = tmp_path / "out", demo_data_dir()
    sets = [s for s in STEPS if not any(k in s for k in ("save_strategy", "eval_strategy", "logging_steps"))]
    sets += [
        "training_config.logging_steps=1",
        "training_config.save_steps=2",
        "training_config.report_to=tensorboard",
    ]
    argv = train_argv(tiny_model, data / "train.jsonl", out, sets=sets)
    assert main(argv) == 0
    shutil.rmtree(out / "checkpoint-4")  # as if killed after step 4's log line, before its checkpoint
    assert main([*argv, "--resume"]) == 0  # from checkpoint-2: metrics.jsonl drops steps 3-4 and redoes them
    raw = EventAccumulator(str(out / "runs"), purge_orphaned_data=False)
    raw.Reload()  # the files keep the first run's steps 3-4: the resumed run's start hides them
    assert [e.step for e in raw.Scalars("train/loss")] == [1, 2, 3, 4, 3, 4]
    acc = EventAccumulator(str(out / "runs"))
    acc.Reload()
    for tag, want in expected(out).items():
        if tag.startswith("eval/"):
            continue  # no eval data here
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4], tag  # steps 3-4 once, not twice
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag  # the resumed values
