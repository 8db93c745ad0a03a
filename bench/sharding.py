"""What sharding buys: 1 process vs 2 x DDP vs 2 x FSDP (training_config.fsdp) on a Phi-3-shaped model.

    python -m bench.sharding --size small --steps 4          (prints a markdown report; --report PATH writes it)

The same work in every mode: a random Phi-3 model of a `lorafit.tiny.SIZES` shape with Phi-3's
32,064-token vocabulary, the synthetic chat data of `bench/data.py`, LoRA r=16 on all linear layers,
the same global batch (`--batch` rows per step: one process takes them all, each of 2 ranks half)
and precision (auto: bf16 autocast where the CPU runs it fast). The cores are split evenly: one
process gets all of `--threads` threads, each rank of 2 gets half.

Per rank it reports

    parameter MB   bytes of the parameters this rank holds after setup (a DTensor counts its shard)
    peak RSS MB    getrusage ru_maxrss at the end (includes loading: every rank loads the whole base
                   on the CPU before it is sharded)
    RSS in steps   the largest resident set sampled after each timed optimizer step
    private MB     the same samples, counting only pages no other process maps (RSS also counts
                   shared pages -- libraries, a file mapped by several ranks -- in every rank)

and for the run, tokens/s: all ranks' tokens of the timed steps (after `--warmup` steps) over the wall
time from the end of the last warm-up step to the end of the last step, on rank 0.

Each mode runs `python -m bench.sharding --worker SPEC.json` (under torchrun for 2 ranks), which calls
lorafit's `prepare` + `run` and writes one JSON per rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32064
MODES = [("1 process", 1, False), ("2 x DDP", 2, False), ("2 x FSDP", 2, True)]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _private_mb() -> float:
    """Memory only this process maps (Private_Clean + Private_Dirty of /proc/self/smaps_rollup)."""
    kb = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                kb += int(line.split()[1])
    return kb / 1024


def worker(spec_path: str) -> int:
    """One rank of one mode: train, then write this rank's numbers to SPEC["out"]/rank<R>.json."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from lorafit import distributed
    from lorafit.api import build_config
    from lorafit.job import prepare
    from lorafit.train import run

    spec = json.loads(Path(spec_path).read_text())
    ends: list[float] = []
    rss: list[float] = []
    private: list[float] = []

    def hook(*args) -> None:
        ends.append(time.perf_counter())
        rss.append(_rss_mb())
        private.append(_private_mb())

    register_optimizer_step_post_hook(hook)
    cfg = build_config(
        model=spec["model"], train_data=spec["train"], output_dir=spec["out"],
        training_config={
            "max_steps": spec["warmup"] + spec["steps"], "per_device_train_batch_size": spec["per_device"],
            "max_seq_length": spec["seq"], "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
            "eval_strategy": "no", "seed": 42, "fsdp": spec["fsdp"],
        },
        peft_config={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    )  # fmt: skip
    try:
        job = prepare(cfg, overwrite=True)
        res = run(job, progress=False)

        def local_bytes(p) -> int:
            t = p.to_local() if hasattr(p, "to_local") else p
            return t.numel() * t.element_size()

        params = list(job.model.parameters())
        rank = job.dist.rank
        out = {
            "rank": rank,
            "param_mb": sum(local_bytes(p) for p in params) / 2**20,
            "trainable_mb": sum(local_bytes(p) for p in params if p.requires_grad) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_in_steps_mb": max(rss[spec["warmup"] :]),
            "private_in_steps_mb": max(private[spec["warmup"] :]),
            "step_ends": ends,
            "precision": job.precision,
            "threads": torch.get_num_threads(),
        }
        if rank == 0:
            recs = [json.loads(x) for x in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in recs if "loss" in r and "tokens" in r]
            out["step_tokens"] = [
                b["tokens"] - a for a, b in zip([0] + [r["tokens"] for r in steps[:-1]], steps)
            ]
            out["losses"] = [r["loss"] for r in steps]
            out["results"] = res
        (Path(spec["out"]) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        distributed.shutdown()
    return 0


def run_mode(label: str, nproc: int, fsdp: bool, a: argparse.Namespace, inputs: dict, work: Path) -> dict:
    out = work / label.replace(" ", "")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    spec = {**inputs, "out": str(out), "fsdp": fsdp, "per_device": a.batch // nproc, "seq": a.seq,
            "steps": a.steps, "warmup": a.warmup}  # fmt: skip
    (out / "spec.json").write_text(json.dumps(spec))
    threads = str(max(1, a.threads // nproc))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}  # fmt: skip
    cmd = [sys.executable, "-m", "bench.sharding", "--worker", str(out / "spec.json")]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *cmd[1:],
        ]
    print(f"[sharding] {label}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    log = out / "log.txt"
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {r.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(nproc)]
    r0 = ranks[0]
    w = a.warmup
    seconds = r0["step_ends"][-1] - r0["step_ends"][w - 1] if w > 0 else None
    tokens = sum(r0["step_tokens"][w:])
    times = [b - c for c, b in zip(r0["step_ends"][w - 1 : -1], r0["step_ends"][w:])] if w > 0 else []
    return {
        "mode": label, "nproc": nproc, "ranks": ranks, "tokens": tokens, "seconds": seconds,
        "tokens_per_sec": tokens / seconds if seconds else None,
        "s_per_step": statistics.median(times) if times else None, "losses": r0["losses"],
        "precision": r0["precision"], "threads": r0["threads"],
    }  # fmt: skip


def _mbs(ranks: list[dict], key: str) -> str:
    return " / ".join(f"{r[key]:,.0f}" for r in ranks)


def report(results: list[dict], a: argparse.Namespace, inputs: dict) -> str:
    cmd = "python -m bench.sharding " + " ".join(a.argv)
    lines = [
        f"`{cmd}` on {os.cpu_count()} CPU cores (load average before: {inputs['load']}), torch {inputs['torch']}, "
        f"model `{a.size}` ({inputs['params'] / 1e6:.1f}M parameters, vocab {VOCAB}), seq {a.seq}, "
        f"{a.batch} rows per step, {a.warmup} warm-up + {a.steps} timed steps, compute "
        f"{results[0]['precision'].replace('no', 'fp32')}.",
        "",
        "| mode | threads per rank | parameter MB per rank | of which LoRA | tokens/s | s/step (median) "
        "| peak RSS MB per rank | RSS in steps MB per rank | private MB in steps per rank | loss at the last step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['threads']} | {_mbs(r['ranks'], 'param_mb')} | {_mbs(r['ranks'], 'trainable_mb')} "
            f"| {r['tokens_per_sec']:,.0f} | {r['s_per_step']:.2f} | {_mbs(r['ranks'], 'peak_rss_mb')} "
            f"| {_mbs(r['ranks'], 'rss_in_steps_mb')} | {_mbs(r['ranks'], 'private_in_steps_mb')} "
            f"| {r['losses'][-1]:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.sharding", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small", help="a lorafit.tiny.SIZES name (default small)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (>= 1)")
    p.add_argument("--seq", type=int, default=512, help="sequence length (packing)")
    p.add_argument("--batch", type=int, default=4, help="rows per optimizer step, all ranks together (even)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads, split over the ranks")
    p.add_argument("--workdir", default="/tmp/lorafit-bench-sharding")
    p.add_argument("--report", default=None, help="also write the markdown report to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    if a.batch % 2 or a.warmup < 1:
        p.error("--batch must be even and --warmup at least 1")
    a.argv = argv
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.data import make_conversations
    from lorafit.tiny import write_tiny_model

    work = Path(a.workdir)
    model = work / "models" / a.size
    if not (model / "config.json").exists():
        write_tiny_model(model, size=a.size, vocab_size=VOCAB)
    train = work / "train.jsonl"
    if not train.exists():
        train.write_text("".join(json.dumps(c) + "\n" for c in make_conversations(400, seed=0)))
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    inputs = {"model": str(model), "train": str(train), "params": params, "torch": torch.__version__,
              "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}  # fmt: skip
    results = [run_mode(label, n, fsdp, a, inputs, work) for label, n, fsdp in MODES]
    text = report(results, a, inputs)
    print(text)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    if a.report:
        Path(a.report).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
