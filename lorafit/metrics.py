"""A run's log: every line of OUT/metrics.jsonl, kept in memory too, and the OUT/loss.png plot.

One JSON object per line, in the order they happened:

    {"step": 0, "epoch": 0.0, "eval_loss": ..., "eval_perplexity": ...}              evaluation
    {"step": 3, "epoch": 0.3, "loss": ..., "lr": ..., "grad_norm": ..., "tokens_per_sec": ...,
     "tokens": ..., "targets": ...}                                                   training (per window)
    {"step": 6, "epoch": 0.6, "skipped": "the loss is nan", "skipped_steps": 1}      a skipped step

The history is also what every checkpoint carries (trainer_state.json's log_history), so a resumed
run starts by writing metrics.jsonl back to exactly the checkpoint's lines and appends from there.
Each record also goes to the run's dashboards (lorafit.dashboards), at the same step.
loss.png is drawn with matplotlib's object API (a Figure with its own Agg canvas), so plotting
never switches the process-wide pyplot backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorafit.checkpoint import disk_full_error, is_disk_full, open_nofollow
from lorafit.dashboards import Dashboards
from lorafit.lora.files import replace_atomic, write_bytes_atomic

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends records to `history` (a TrainState's log_history) and, when `write`, to metrics.jsonl.

    Under torchrun every rank keeps the history (checkpoints and results read it); rank 0 writes, and
    hands each record to its `dashboards` (training_config.report_to) right after the line is written.
    """

    def __init__(self, path: Path, history: list[dict], *, write: bool, dashboards: Dashboards | None = None):
        self.path, self.history, self.write = Path(path), history, write
        self.dashboards = dashboards

    def restart(self) -> None:
        """Write metrics.jsonl afresh with the history so far (a resumed run drops lines past its checkpoint)."""
        if self.write:
            write_bytes_atomic(self.path, "".join(json.dumps(h) + "\n" for h in self.history).encode())

    def emit(self, record: dict) -> None:
        self.history.append(record)
        if self.write:
            # appended through a descriptor opened without following links (restart() already replaced
            # whatever was planted at the name; this guards the rest of the run)
            fd = open_nofollow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                with os.fdopen(fd, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a line cut short is dropped by read_metrics; --resume rewrites the file
                if not is_disk_full(e):
                    raise
                raise disk_full_error(self.path.parent, f"a line of {self.path.name}") from None
        if self.dashboards is not None:
            self.dashboards.log(record)

    def last_eval(self) -> dict | None:
        evals = [h for h in self.history if "eval_loss" in h]
        return evals[-1] if evals else None

    def train_losses(self) -> list[float]:
        return [h["loss"] for h in self.history if h.get("loss") is not None]

    def plot(self, path: Path) -> None:
        plot_losses(self.history, path)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, up to the first line a crash cut short ([] if there is none)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash ends the trustworthy part
    return out


def plot_losses(history: list[dict], path: Path) -> None:
    """loss.png: train loss per logging step and eval loss per evaluation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib is slow to import: only here
    from matplotlib.figure import Figure

    tr = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    replace_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
