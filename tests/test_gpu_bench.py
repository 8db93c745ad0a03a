"""bench/gpu.sh, the CUDA benchmark: what can run without a GPU runs here (the plan, the commands, the
report, and -- slow -- a real lorafit run of the worker on the CPU, 1 and 2 processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import Run, command, plan_runs, render

ROOT = Path(__file__).resolve().parent.parent


def test_the_dry_run_plans_every_tool_mode_and_gpu_count_and_runs_nothing(tmp_path):
    work = tmp_path / "work"
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--dry-run", "--workdir", str(work)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("8 runs")
    names = [x.split(":")[0] for x in lines[1:9]]
    assert names == [f"{t}-{m}-{n}gpu" for n in (1, 2) for m in ("lora", "qlora") for t in ("lorafit", "trl")]
    assert all(("--nproc_per_node=2" in x) == ("-2gpu:" in x) for x in lines[1:9])
    specs = json.loads("\n".join(lines[9:]))
    assert {(s["tool"], s["mode"], s["nproc"]) for s in specs} == {
        (t, m, n) for t in ("lorafit", "trl") for m in ("lora", "qlora") for n in (1, 2)
    }
    # the same work for both tools
    same = {k for k in specs[0] if k not in ("tool", "mode", "nproc", "out", "result")}
    assert all(s[k] == specs[0][k] for s in specs for k in same)
    assert not work.exists()  # nothing written


def test_commands_run_the_worker_under_torchrun_for_several_gpus(tmp_path):
    one, two = (
        command(Run("lorafit", "lora", 1), tmp_path / "s.json"),
        command(Run("trl", "qlora", 2), tmp_path / "s.json"),
    )
    assert one == [sys.executable, "-m", "bench.gpu", "worker", str(tmp_path / "s.json")]
    assert two[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert two[-4:] == one[-4:]
    assert [r.name for r in plan_runs(["lorafit"], ["qlora"], [2])] == ["lorafit-qlora-2gpu"]


def test_the_report_compares_each_run_with_trl_on_the_same_setting():
    results = [
        {"tool": "lorafit", "mode": "lora", "nproc": 1, "tokens_per_sec": 3000.0, "peak_reserved_mb": 20480.0,
         "eval_loss": 2.5},
        {"tool": "trl", "mode": "lora", "nproc": 1, "tokens_per_sec": 2000.0, "peak_reserved_mb": 30720.0,
         "eval_loss": 2.51},
        {"tool": "lorafit", "mode": "qlora", "nproc": 2, "tokens_per_sec": 1000.0, "peak_reserved_mb": None,
         "eval_loss": None},
    ]  # fmt: skip
    facts = {"command": "bench/gpu.sh", "gpu": "NVIDIA A100", "torch": "2.13", "transformers": "5.25",
             "date": "2026-12-04", "model": "Phi-3-mini's shape", "seq": 2048, "batch": 4, "steps": 20}  # fmt: skip
    md = render(results, facts)
    assert "| lora | 1 | lorafit | 3,000 | 1.50x | 20.0 | 2.5000 |" in md
    assert "| lora | 1 | TRL SFTTrainer + PEFT | 2,000 |  | 30.0 | 2.5100 |" in md
    assert "| qlora | 2 | lorafit | 1,000 |  | - | - |" in md  # no TRL run to compare with
    assert "NVIDIA A100" in md


@pytest.mark.slow
def test_the_lorafit_worker_runs_on_the_cpu_with_one_and_two_processes(tmp_path):
    report = tmp_path / "B.md"
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--size", "demo", "--seq", "128", "--batch", "2",
         "--steps", "1", "--warmup", "1", "--tools", "lorafit", "--modes", "lora", "--workdir", str(tmp_path / "w"),
         "--report", str(report)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    md = report.read_text()
    assert "| lora | 1 | lorafit |" in md and "| lora | 2 | lorafit |" in md
