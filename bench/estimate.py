"""How close is `lorafit estimate`? Its predicted peak against the measured peak of the same run.

    python -m bench.estimate                      every config below; prints a markdown table
    python -m bench.estimate --config small-bf16 --config small-fsdp2 --report PATH

For each config a random Phi-3 of a `lorafit.tiny.SIZES` shape (Phi-3's 32,064-token vocabulary,
saved in bf16 as Phi-3 ships) trains LoRA r=16 on all linear layers over the synthetic chat data of
`bench/data.py`, 4 packed rows of 512 tokens per device (2 per rank for 2 x FSDP), CPU:

1. `python -m lorafit estimate ... --json` (its own process, as a user runs it): the predicted peak
   resident memory per process (`peak_memory_bytes`) and its tensor part (`tensor_peak_bytes`);
2. `python -m bench.estimate --worker SPEC` (under torchrun for 2 ranks) trains `--steps` steps with
   lorafit's `prepare` + `run`, and measures
     peak RSS     VmRSS of every rank's process, sampled by this process every 50 ms from
                  /proc/PID/status (RssAnon, the anonymous part, is reported too), the rank's
                  maximum over the whole run (loading included); the largest over ranks
     tensor peak  the tensor bytes a rank holds at its peak inside the last training step:
                  parameters, gradients, buffers and AdamW state tallied at the start of the step,
                  plus the largest rise of the bytes glibc's malloc has handed out (mallinfo2, polled
                  every millisecond in the rank; every CPU tensor's storage comes from malloc) during
                  the step: what a GPU's allocator would count as allocated. (torch.profiler's memory
                  events agree: 1,030,976,608 bytes against mallinfo2's 1,032,898,880 on small-bf16, but
                  slow a step twenty-fold.)

Error = estimated / measured - 1. The configs run one after another (2 cores).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32064
SEQ, BATCH = 512, 4
# name -> (size, quantization, processes, fsdp, gradient checkpointing)
CONFIGS = {
    "small-bf16": ("small", "none", 1, False, False),
    "small-bf16-ckpt": ("small", "none", 1, False, True),
    "small-nf4": ("small", "nf4", 1, False, False),
    "small-fsdp2": ("small", "none", 2, True, False),
    "medium-bf16": ("medium", "none", 1, False, False),
    "medium-nf4": ("medium", "nf4", 1, False, False),
}


def train_args(spec: dict) -> list[str]:
    """The `lorafit train` / `lorafit estimate` arguments of a spec (the same for both)."""
    sets = {
        "training_config.max_steps": spec["steps"],
        "training_config.per_device_train_batch_size": spec["per_device"],
        "training_config.max_seq_length": SEQ,
        "training_config.learning_rate": 1e-3,
        "training_config.logging_steps": 1,
        "training_config.save_strategy": "no",
        "training_config.bf16": "true",
        "training_config.gradient_checkpointing": str(spec["checkpointing"]).lower(),
        "training_config.fsdp": str(spec["fsdp"]).lower(),
        "peft_config.r": 16,
        "peft_config.lora_alpha": 32,
        "model.quantization": spec["quantization"],
        "model.device": "cpu",
    }
    args = ["--model", spec["model"], "--data", spec["train"], "--output-dir", spec["out"], "--overwrite"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


# ----------------------------------------------------------------------------- worker (one rank)


def tensor_tally(model, optimizer) -> int:
    """Bytes of the tensors a training step starts with: parameters (a DTensor: its shard), their
    gradients, buffers, and the optimizer's state."""
    import torch

    def nbytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size() if t.device.type != "meta" else 0

    seen, total = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += nbytes(p)
        if p.grad is not None:
            total += nbytes(p.grad)
    for state in optimizer.state.values():
        total += sum(nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip


def malloc_in_use() -> int:
    """Bytes glibc's malloc has handed out and not taken back (mallinfo2: uordblks + hblkhd). On the CPU
    every tensor's storage comes from malloc; Python's small objects do not (pymalloc maps its own)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


class InUsePeak(threading.Thread):
    """The largest `malloc_in_use()`, polled every millisecond until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = malloc_in_use(), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, malloc_in_use())
            time.sleep(0.001)


def worker(spec_path: str) -> int:
    """Train spec["steps"] steps; measure the last step's tensor peak; write rank<R>.json."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from lorafit import distributed
    from lorafit.api import build_config
    from lorafit.job import prepare
    from lorafit.train import run

    spec = json.loads(Path(spec_path).read_text())
    cli = train_args(spec)
    sets = [cli[i + 1] for i, a in enumerate(cli) if a == "--set"]
    cfg = build_config(model=spec["model"], train_data=spec["train"], output_dir=spec["out"], overrides=sets)
    state = {"steps": 0, "poll": None, "start": 0, "rise": 0}
    last = spec["steps"]

    def hook(optimizer, args, kwargs) -> None:  # after each optimizer step, before zero_grad frees the grads
        state["steps"] += 1
        if state["steps"] == last - 1:  # measure the last step (the optimizer state exists from step 2 on)
            grads = sum(p.grad.numel() * p.grad.element_size() for g in optimizer.param_groups for p in g["params"]
                        if p.grad is not None)  # fmt: skip
            state["start"] = tensor_tally(job.model, optimizer) - grads
            state["base"] = malloc_in_use() - grads  # what malloc will hold once zero_grad freed them
            state["poll"] = InUsePeak()
            state["poll"].start()
        elif state["steps"] == last:
            poll, state["poll"] = state["poll"], None
            poll.done.set()
            poll.join()
            state["rise"] = poll.peak - state["base"]

    register_optimizer_step_post_hook(hook)
    try:
        job = prepare(cfg, overwrite=True)
        run(job, progress=False)
        out = {"rank": job.dist.rank, "tensor_start": state["start"], "tensor_rise": state["rise"],
               "tensor_peak": state["start"] + state["rise"], "threads": torch.get_num_threads()}  # fmt: skip
        (Path(spec["out"]) / f"rank{job.dist.rank}.json").write_text(json.dumps(out))
    finally:
        distributed.shutdown()
    return 0


# ----------------------------------------------------------------------------- driver


def _status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process in KiB, (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon")))
        return int(fields["VmRSS"].split()[0]), int(fields["RssAnon"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


class Sampler(threading.Thread):
    """Every 50 ms: VmRSS and RssAnon of a process and of all its descendants (the ranks under torchrun),
    the maximum per process."""

    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every, self.done = pid, every, threading.Event()
        self.series: dict[int, list[tuple[float, int, int]]] = {}

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.done.is_set():
            try:
                pids = [self.pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.Error:
                pids = [self.pid]
            now = time.time()
            for pid in pids:
                rss, anon = _status_kb(pid)
                if rss:
                    self.series.setdefault(pid, []).append((now, rss * 1024, anon * 1024))
            time.sleep(self.every)

    def peaks(self, before: float | None = None) -> list[tuple[int, int]]:
        """(VmRSS, RssAnon) peak in bytes of each process, largest first, over the samples taken before
        `before` (a time.time()); the torchrun agent, which holds no model, comes last."""
        out = []
        for samples in self.series.values():
            kept = [s for s in samples if before is None or s[0] < before] or samples
            out.append((max(s[1] for s in kept), max(s[2] for s in kept)))
        return sorted(out, reverse=True)


def _env(threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore"}  # fmt: skip


def measure(name: str, spec: dict, out: Path, env: dict, reuse: bool) -> dict:
    """Train the spec in its own process(es), sampling their RSS; with `reuse`, an earlier measurement of
    the same spec (out/measured.json) is read instead."""
    cache = out / "measured.json"
    if reuse and cache.is_file() and json.loads(cache.read_text())["spec"] == spec:
        print(f"[estimate] {name}: reusing {cache}", file=sys.stderr, flush=True)
        return json.loads(cache.read_text())
    nproc = spec["nproc"]
    cmd = [sys.executable, "-m", "bench.estimate", "--worker", str(out / "spec.json")]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *cmd[1:],
        ]
    print(f"[estimate] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.done.set()
        sampler.join()
    if code != 0:
        raise RuntimeError(f"{name} failed (exit {code}); see {out / 'log.txt'}")
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(nproc)]
    result = {"spec": spec, "ranks": ranks, "rank_rss": sampler.peaks()[:nproc],  # the ranks, not torchrun's agent
              "seconds": time.perf_counter() - t0}  # fmt: skip
    cache.write_text(json.dumps(result))
    return result


def run_config(name: str, a: argparse.Namespace, work: Path, inputs: dict) -> dict:
    size, quantization, nproc, fsdp, checkpointing = CONFIGS[name]
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    spec = {"model": inputs[size], "train": inputs["train"], "out": str(out), "steps": a.steps,
            "per_device": BATCH // nproc, "quantization": quantization, "fsdp": fsdp,
            "checkpointing": checkpointing, "nproc": nproc}  # fmt: skip
    (out / "spec.json").write_text(json.dumps(spec))
    env = _env(max(1, (os.cpu_count() or 1) // nproc))
    est_cmd = [
        sys.executable,
        "-m",
        "lorafit",
        "estimate",
        *train_args(spec),
        "--json",
        "--nproc",
        str(nproc),
    ]
    est = subprocess.run(est_cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if est.returncode not in (0, 3):
        raise RuntimeError(f"{name}: lorafit estimate failed ({est.returncode}):\n{est.stderr[-3000:]}")
    estimate = json.loads(est.stdout)
    measured = measure(name, spec, out, env, reuse=a.reuse)
    ranks, peaks = measured["ranks"], measured["rank_rss"]
    return {
        "config": name, "size": size, "quantization": quantization, "nproc": nproc, "fsdp": fsdp,
        "checkpointing": checkpointing, "seconds": measured["seconds"],
        "estimated_peak": estimate["peak_memory_bytes"], "estimated_tensor_peak": estimate["tensor_peak_bytes"],
        "estimate": estimate,
        "measured_rss": max(p[0] for p in peaks), "measured_anon": max(p[1] for p in peaks),
        "measured_tensor_peak": max(r["tensor_peak"] for r in ranks), "ranks": ranks, "rank_rss": peaks,
        "estimate_command": "lorafit estimate " + " ".join(est_cmd[4:]),
    }  # fmt: skip


def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def _err(est: float, real: float) -> str:
    return f"{100 * (est / real - 1):+.1f}%"


def report(results: list[dict], a: argparse.Namespace) -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
        bf16 = "avx512_bf16" in open("/proc/cpuinfo").read()
    except (OSError, StopIteration):
        bf16 = False
    import torch

    lines = [
        f"`python -m bench.estimate {' '.join(a.argv)}` on {cpu} ({os.cpu_count()} cores, AVX512-BF16 "
        f"{'yes' if bf16 else 'no'}), torch {torch.__version__}; {a.steps} steps per run, {BATCH} rows of {SEQ} "
        "tokens per step (2 per rank with 2 processes), LoRA r=16 all-linear, bf16 autocast, CPU.",
        "",
        "| config | processes | estimated peak RSS MiB | measured peak RSS MiB (RssAnon) | error | "
        "estimated tensor peak MiB | measured tensor peak MiB | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['nproc']} | {_mb(r['estimated_peak'])} | {_mb(r['measured_rss'])} "
            f"({_mb(r['measured_anon'])}) | {_err(r['estimated_peak'], r['measured_rss'])} "
            f"| {_mb(r['estimated_tensor_peak'])} | {_mb(r['measured_tensor_peak'])} "
            f"| {_err(r['estimated_tensor_peak'], r['measured_tensor_peak'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.estimate", description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", choices=sorted(CONFIGS), help="default: all")
    p.add_argument(
        "--steps", type=int, default=3, help="optimizer steps per run (>= 3; the last is measured)"
    )
    p.add_argument("--workdir", default="/tmp/lorafit-bench-estimate")
    p.add_argument("--report", default=None, help="also write the markdown table to this file")
    p.add_argument(
        "--reuse", action="store_true", help="reuse earlier measurements of the same spec (estimate again)"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    a.argv = argv
    sys.path.insert(0, str(ROOT))
    from bench.data import make_conversations
    from bench.qlora import write_model

    work = Path(a.workdir)
    names = a.config or list(CONFIGS)
    inputs = {"train": str(work / "train.jsonl")}
    for size in sorted({CONFIGS[n][0] for n in names}):
        inputs[size] = str(write_model(size, work / "models" / size))
    if not Path(inputs["train"]).exists():
        Path(inputs["train"]).write_text(
            "".join(json.dumps(c) + "\n" for c in make_conversations(400, seed=0))
        )
    results = []
    for name in names:
        results.append(run_config(name, a, work, inputs))
        (work / "results.json").write_text(json.dumps(results, indent=1))
        print(report(results, a), flush=True)
    text = report(results, a)
    if a.report:
        Path(a.report).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
