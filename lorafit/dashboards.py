"""Dashboards: training_config.report_to sends what metrics.jsonl gets to TensorBoard, W&B, Trackio or MLflow.

Hugging Face's names and forms (TrainingArguments.report_to): "none" (the default), one name, a list of
names, or "all" (every one of these four whose library is installed). Each backend is one small class over
its project's own library, installed as an extra (`pip install 'lorafit[tensorboard]'`); lorafit writes no
file format of its own here. All four have the same three calls:

    start(config, step)   open the run: the resolved run config as hyperparameters; `step` is the
                          step training starts from (0, or the checkpoint's step after --resume)
    log(record)           one metrics.jsonl line: its numbers at record["step"]
    finish(status)        "finished", "failed" (an error) or "killed" (a signal or Ctrl-C)

`Dashboards` holds the chosen ones; MetricsLog.emit hands it every record right after writing it to
metrics.jsonl, so a dashboard shows exactly the lines and steps the file holds. Only rank 0 of a torchrun
launch has dashboards. Names follow transformers' rewrite_logs: `eval_loss` -> `eval/loss`, every other
key `k` -> `train/k` (train/loss, train/lr, train/grad_norm, train/tokens_per_sec, train/epoch, ...).

Where each one writes (OUT = training_config.output_dir):

    tensorboard   OUT/runs/events.out.tfevents.*  (torch.utils.tensorboard.SummaryWriter). One folder for
                  every launch: a launch purges the events past its starting step, as metrics.jsonl drops
                  the lines past a checkpoint, so a resumed run continues the same curves.
    wandb         OUT/wandb/ (WANDB_DIR if set). Offline, never prompting, unless an API key is configured
                  and the W&B host answers; WANDB_MODE, when set, decides instead. `wandb sync` uploads later.
    trackio       trackio's own local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio); `trackio show`.
    mlflow        MLFLOW_TRACKING_URI if set, else sqlite:///OUT/mlflow.db (MLflow's own default backend:
                  MLflow 3.18 refuses its ./mlruns file store unless MLFLOW_ALLOW_FILE_STORE is set).

Each run is named training_config.run_name (default: the output folder's name) in the project
training_config.project (default: WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME when set, else "lorafit").
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from lorafit.errors import ConfigError

log = logging.getLogger("lorafit")


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's numbers under their dashboard names (transformers' rewrite_logs rule)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # the step is the x axis; None (no loss in a window of skipped steps) and text are not plotted
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = value
    return out


def flat(config: dict, prefix: str = "") -> dict[str, object]:
    """{"training_config": {"learning_rate": 2e-4}} -> {"training_config.learning_rate": 2e-4}."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class TensorBoard:
    """Event files in OUT/runs through torch.utils.tensorboard (which needs the tensorboard package)."""

    modules = ("tensorboard",)

    def __init__(self, out: Path, name: str, project: str | None):
        self.dir = out / "runs"

    def start(self, config: dict, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides earlier events at steps >= this one, as a resumed metrics.jsonl has
        # no lines past its checkpoint's step (and a fresh start, at 0, hides a replaced run's events)
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=step + 1 if step else 0)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", step)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()  # a line in metrics.jsonl is a point on the live dashboard

    def finish(self, status: str) -> None:
        self.writer.close()


def wandb_mode(wandb) -> tuple[str | None, str]:
    """(mode for wandb.init, why). WANDB_MODE decides when set (None lets wandb read it); otherwise
    online only with an API key (env, settings file or .netrc; found without prompting) and a W&B host
    that answers within 3 s, so a run never waits on a login prompt or on the network. (The probe connects
    directly: behind an HTTPS proxy, set WANDB_MODE=online.)"""
    if os.environ.get("WANDB_MODE"):
        return None, f"WANDB_MODE={os.environ['WANDB_MODE']}"
    if not wandb.login(prompt=False, verify=False):
        return "offline", "no W&B API key is configured"
    host = urlparse(wandb.Settings().base_url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        return "offline", f"{host} cannot be reached ({e.strerror or e})"
    return "online", f"logged in, {host} reachable"


class WandB:
    """A W&B run (offline unless a key and the network are there: see wandb_mode)."""

    modules = ("wandb",)

    def __init__(self, out: Path, name: str, project: str | None):
        self.out, self.name = out, name
        self.project = project or os.environ.get("WANDB_PROJECT") or "lorafit"

    def start(self, config: dict, step: int) -> None:
        import wandb

        mode, why = wandb_mode(wandb)
        log.info(f"wandb: {mode or os.environ.get('WANDB_MODE')} ({why})")
        self.out.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project, name=self.name, config=config, mode=mode, reinit="create_new",
            dir=None if os.environ.get("WANDB_DIR") else str(self.out),
        )  # fmt: skip

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def finish(self, status: str) -> None:
        self.run.finish(exit_code={"finished": 0, "failed": 1, "killed": 130}[status])


class Trackio:
    """A Trackio run in trackio's local store (or where TRACKIO_SPACE_ID / TRACKIO_SERVER_URL send it)."""

    modules = ("trackio",)

    def __init__(self, out: Path, name: str, project: str | None):
        self.name, self.project = name, project or "lorafit"

    def start(self, config: dict, step: int) -> None:
        import trackio

        self.run = trackio.init(
            project=self.project, name=self.name, config=config, embed=False, auto_log_cpu=False,
            auto_log_gpu=False,
        )  # fmt: skip

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def finish(self, status: str) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run through MlflowClient (no process-wide active run): params = the flattened config."""

    # the sqlite store needs sqlalchemy and alembic, which mlflow-skinny does not bring
    modules = ("mlflow", "sqlalchemy", "alembic")

    def __init__(self, out: Path, name: str, project: str | None):
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out.resolve() / 'mlflow.db'}"
        self.out, self.name = out, name
        self.experiment = project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lorafit"

    def start(self, config: dict, step: int) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.out.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        eid = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        self.run_id = self.client.create_run(eid, run_name=self.name).info.run_id
        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flat(config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, record["step"]) for k, v in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "failed": "FAILED",
                                                        "killed": "KILLED"}[status])  # fmt: skip


# training_config.report_to's names (Hugging Face's), each with its backend.
BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio, "mlflow": MLflow}


def missing(name: str) -> list[str]:
    """The Python modules `name`'s backend needs that are not installed."""
    return [m for m in BACKENDS[name].modules if importlib.util.find_spec(m) is None]


def check_installed(names: list[str]) -> None:
    """A ConfigError naming the pip command for every chosen dashboard whose library is missing (called
    before the model is loaded, so a run does not fail after minutes of loading)."""
    problems = [
        f"training_config.report_to: {n} needs {', '.join(missing(n))} (not installed). "
        f"Fix: pip install 'lorafit[{n}]', or remove {n} from report_to"
        for n in names
        if missing(n)
    ]
    if problems:
        raise ConfigError("\n".join(problems))


class Dashboards:
    """The chosen dashboards of a run, as one: `with Dashboards(...) as boards:` starts them and always
    finishes them, with "failed" on an error, "killed" on KeyboardInterrupt or when the run set
    `boards.status = "killed"` (stopped by a signal), else "finished"."""

    def __init__(
        self, names: list[str], out: Path, config: dict, step: int, *, name: str, project: str | None
    ):
        self.boards = [BACKENDS[n](out, name, project) for n in names]
        self.config, self.step, self.status = config, step, "finished"

    def __enter__(self) -> Dashboards:
        started = []
        try:
            for board in self.boards:
                board.start(self.config, self.step)
                started.append(board)
        except BaseException:
            self.boards = started
            self._finish("failed")
            raise
        return self

    def log(self, record: dict) -> None:
        for board in self.boards:
            board.log(record)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.status = "killed" if issubclass(exc_type, KeyboardInterrupt) else "failed"
        self._finish(self.status)

    def _finish(self, status: str) -> None:
        """Finish every one; a dashboard that fails to close is a warning, never the run's error."""
        for board in self.boards:
            try:
                board.finish(status)
            except Exception as e:  # the run's own outcome (and its exception, if any) stands
                log.warning(f"warning: could not finish the {type(board).__name__} dashboard: {e}")
