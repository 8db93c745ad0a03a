"""BENCHMARKS.md on NVIDIA GPUs: lorafit vs TRL SFTTrainer + PEFT, LoRA and QLoRA, 1 GPU and 2 with torchrun.

    bench/gpu.sh                                   everything; writes BENCHMARKS-cuda.md
    bench/gpu.sh --gpus 1 --modes lora             a part
    bench/gpu.sh --device cpu --dry-run            the plan (commands, specs), nothing run

Offline: a Phi-3-mini-shaped model with random weights (hidden 3072, 32 layers, 32 heads, MLP 8192,
vocabulary 32064, bf16; `--size small` for a 106M one) and the synthetic chat data of bench/data.py.
Every run is its own process (`torchrun --nproc_per_node N` for N > 1) executing `python -m bench.gpu
worker SPEC`: the same rows of `--seq` tokens, per-device batch, r=16 on all linear layers, learning rate
and steps for both tools, packing, gradient checkpointing on for both (Phi-3-mini's activations at
4 x 2048 tokens do not fit 80 GB without it). Each worker times its optimizer steps (torch's global
step hook, as bench/workers.py does), counts the non-pad tokens of every step on every rank, reads
`torch.cuda.max_memory_reserved()` and computes the eval loss of the trained adapter with its own tool.

    tokens/s = tokens of the timed steps (all ranks) / their wall time (rank 0's clock)

This file has not run on a GPU yet (none on the machine it was written on); `--device cpu` runs the
same code on the CPU (tests/test_gpu_bench.py runs the dry run and the report from made-up results).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32064
MINI = {"hidden_size": 3072, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 8192}
TOOLS = {"lorafit": "lorafit", "trl": "TRL SFTTrainer + PEFT"}


@dataclass
class Run:
    tool: str  # lorafit | trl
    mode: str  # lora | qlora
    nproc: int  # processes = GPUs

    @property
    def name(self) -> str:
        return f"{self.tool}-{self.mode}-{self.nproc}gpu"


def plan_runs(tools: list[str], modes: list[str], gpus: list[int]) -> list[Run]:
    """Every (tool, mode, GPU count), grouped so the tools run back to back on the same setting."""
    return [Run(t, m, n) for n in gpus for m in modes for t in tools]


def command(run: Run, spec_path: Path) -> list[str]:
    """The command line of one run: the worker, under torchrun for more than one process."""
    worker = ["-m", "bench.gpu", "worker", str(spec_path)]
    if run.nproc == 1:
        return [sys.executable, *worker]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={run.nproc}",
        *worker,
    ]


def spec_for(run: Run, args: argparse.Namespace, model: str, data: dict, work: Path) -> dict:
    return {
        **asdict(run), "device": args.device, "model": model, "train": data["train"], "eval": data["eval"],
        "seq": args.seq, "batch": args.batch, "steps": args.warmup + args.steps, "warmup": args.warmup,
        "r": 16, "alpha": 32, "lr": 1e-4, "seed": 42, "attn": args.attn,
        "out": str(work / run.name), "result": str(work / f"{run.name}.result.json"),
    }  # fmt: skip


# ----------------------------------------------------------------------------- worker (one process/rank)


def train_lorafit(spec: dict) -> tuple[list[int], float | None]:
    """(tokens per step over all ranks, eval loss) from lorafit.finetune's own metrics and results."""
    import lorafit

    res = lorafit.finetune(
        model=spec["model"], train_data=spec["train"], eval_data=spec["eval"],
        training_config={
            "max_steps": spec["steps"], "per_device_train_batch_size": spec["batch"], "max_seq_length": spec["seq"],
            "packing": True, "learning_rate": spec["lr"], "lr_scheduler_type": "linear", "warmup_steps": 0,
            "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": 1, "save_strategy": "no",
            "eval_strategy": "steps", "eval_steps": spec["steps"], "seed": spec["seed"],
            "gradient_checkpointing": True, "output_dir": spec["out"],
        },
        peft_config={"r": spec["r"], "lora_alpha": spec["alpha"], "lora_dropout": 0.0, "target_modules": "all-linear"},
        overrides=[f"model.device={spec['device']}", f"model.attn_implementation={spec['attn']}"]
        + (["model.quantization=nf4"] if spec["mode"] == "qlora" else []),
        overwrite=True, progress=False,
    )  # fmt: skip
    recs = [
        json.loads(x) for x in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]
    seen = [r["tokens"] for r in recs if "tokens" in r and "loss" in r]  # cumulative, all ranks
    return [b - a for a, b in zip([0, *seen[:-1]], seen)], res.get("eval_loss")


def train_trl(spec: dict) -> tuple[list[int], float | None]:
    """(tokens per step over all ranks, eval loss): SFTTrainer + PEFT, BFD packing, assistant-only loss."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bench.data import read_jsonl

    class TokenCount(TrainerCallback):
        def __init__(self):
            self.seen: list[int] = []

        def on_step_end(self, args, state, control, **kw):
            self.seen.append(int(state.num_input_tokens_seen))  # gathered over ranks by the Trainer

    cpu = spec["device"] == "cpu"
    init: dict = {"dtype": torch.bfloat16, "attn_implementation": spec["attn"]}
    if spec["mode"] == "qlora":
        init["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        if not cpu:  # each rank's quantized copy on its own GPU
            init["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    args = SFTConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        per_device_eval_batch_size=spec["batch"], learning_rate=spec["lr"], lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_length=spec["seq"], packing=True,
        packing_strategy="bfd", assistant_only_loss=True, gradient_checkpointing=True, bf16=True,
        use_cpu=cpu, model_init_kwargs=init, seed=spec["seed"], report_to="none", save_strategy="no",
        eval_strategy="no", logging_steps=1, disable_tqdm=True, include_num_input_tokens_seen="non_padding",
    )  # fmt: skip
    clock = TokenCount()
    trainer = SFTTrainer(
        model=spec["model"], args=args, processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        train_dataset=Dataset.from_list(read_jsonl(spec["train"])),
        eval_dataset=Dataset.from_list(read_jsonl(spec["eval"])), callbacks=[clock],
        peft_config=LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM"),
    )  # fmt: skip
    trainer.train()
    ev = trainer.evaluate()
    return [b - a for a, b in zip([0, *clock.seen[:-1]], clock.seen)], ev.get("eval_loss")


def worker(spec_path: str) -> None:
    """One rank of one run: train, then rank 0 writes the result (every rank reports its peak memory)."""
    import torch
    import torch.distributed as dist
    from torch.optim.optimizer import register_optimizer_step_post_hook

    spec = json.loads(Path(spec_path).read_text())
    ends: list[float] = []
    register_optimizer_step_post_hook(lambda *a: ends.append(time.perf_counter()))
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.reset_peak_memory_stats()
    step_tokens, eval_loss = (train_lorafit if spec["tool"] == "lorafit" else train_trl)(spec)
    peak = torch.cuda.max_memory_reserved() / 2**20 if cuda else None
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{spec['result']}.rank{rank}").write_text(json.dumps({"peak_reserved_mb": peak}))
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return
    w = max(spec["warmup"], 1)  # step k's time is ends[k] - ends[k - 1]: the first step has no start
    tokens, secs = sum(step_tokens[w:]), ends[-1] - ends[w - 1]
    peaks = [
        json.loads(Path(f"{spec['result']}.rank{r}").read_text())["peak_reserved_mb"]
        for r in range(spec["nproc"])
    ]
    Path(spec["result"]).write_text(json.dumps({
        **{k: spec[k] for k in ("tool", "mode", "nproc", "seq", "batch", "steps", "warmup")},
        "tokens_per_sec": tokens / secs, "step_tokens": step_tokens, "step_ends": ends,
        "peak_reserved_mb": max(peaks, default=None) if cuda else None, "eval_loss": eval_loss,
    }))  # fmt: skip


# ----------------------------------------------------------------------------- report


def render(results: list[dict], facts: dict) -> str:
    """BENCHMARKS-cuda.md from the runs' results (one table row per run)."""
    lines = [
        "# lorafit vs TRL + PEFT on NVIDIA GPUs",
        "",
        f"`{facts['command']}` on {facts['gpu']} (torch {facts['torch']}, transformers {facts['transformers']}, "
        f"{facts['date']}). A random Phi-3-shaped model ({facts['model']}), rows of {facts['seq']} tokens, per-GPU "
        f"batch {facts['batch']}, r=16 on all linear layers, bf16, gradient checkpointing, {facts['steps']} timed "
        "steps after the warm-up. tokens/s: non-pad tokens of the timed steps over all GPUs per second; memory: "
        "the largest `torch.cuda.max_memory_reserved()` of the ranks; eval loss: the trained adapter on the "
        "held-out conversations, by each tool.",
        "",
        "| mode | GPUs | tool | tokens/s | vs TRL | peak reserved (GiB) | eval loss |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r["mode"], r["nproc"], r["tool"]): r for r in results}
    for r in results:
        trl = by.get((r["mode"], r["nproc"], "trl"))
        ratio = f"{r['tokens_per_sec'] / trl['tokens_per_sec']:.2f}x" if trl and r["tool"] != "trl" else ""
        mem = f"{r['peak_reserved_mb'] / 1024:.1f}" if r.get("peak_reserved_mb") is not None else "-"
        loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-"
        lines.append(f"| {r['mode']} | {r['nproc']} | {TOOLS[r['tool']]} | {r['tokens_per_sec']:,.0f} | {ratio} "
                     f"| {mem} | {loss} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    ap.add_argument("--tools", default="lorafit,trl")
    ap.add_argument("--modes", default="lora,qlora", help="lora, qlora (nf4 base, needs bitsandbytes)")
    ap.add_argument("--gpus", default="1,2", help="process counts (one GPU each)")
    ap.add_argument(
        "--size",
        choices=["mini", "small", "demo"],
        default="mini",
        help="mini: Phi-3-mini's shape; small: hidden 768, 8 layers; demo: lorafit's tiny demo model",
    )
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4, help="rows per GPU per step")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation for both tools")
    ap.add_argument("--workdir", default="/tmp/lorafit-bench-gpu")
    ap.add_argument("--report", default=str(ROOT / "BENCHMARKS-cuda.md"))
    args = ap.parse_args(argv)
    args.tools = [t for t in args.tools.split(",") if t]
    args.modes = [m for m in args.modes.split(",") if m]
    args.gpus = [int(n) for n in args.gpus.split(",") if n]
    bad = [t for t in args.tools if t not in TOOLS] + [m for m in args.modes if m not in ("lora", "qlora")]
    if bad:
        ap.error(f"unknown tool or mode: {', '.join(bad)}")
    return args


def preflight(args: argparse.Namespace) -> list[str]:
    """Problems that would stop the runs, found before anything is built."""
    import importlib.util

    import torch

    problems = []
    if args.device == "cuda":
        if not torch.cuda.is_available():
            problems.append(
                "no CUDA device (torch.cuda.is_available() is False); --device cpu runs on the CPU"
            )
        elif torch.cuda.device_count() < max(args.gpus):
            problems.append(f"--gpus asks for {max(args.gpus)} GPUs, {torch.cuda.device_count()} visible")
    need = {"trl": "trl", "peft": "peft", "datasets": "datasets"} if "trl" in args.tools else {}
    if "qlora" in args.modes:
        need["bitsandbytes"] = "bitsandbytes"
    problems += [f"package {p} is missing (pip install -e '.[bench,qlora]')" for p in need
                 if importlib.util.find_spec(p) is None]  # fmt: skip
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    work = Path(args.workdir)
    runs = plan_runs(args.tools, args.modes, args.gpus)
    model_dir, data_dir = work / "models" / args.size, work / "data"
    data = {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl")}
    specs = [(r, spec_for(r, args, str(model_dir), data, work)) for r in runs]
    print(f"{len(runs)} runs, model {args.size} ({model_dir}), data {data_dir}, report {args.report}")
    for r, _ in specs:
        print(f"{r.name}: {' '.join(command(r, work / f'{r.name}.spec.json'))}")
    if args.dry_run:
        print(json.dumps([s for _, s in specs], indent=1))
        return 0
    problems = preflight(args)
    if problems:
        print("cannot run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    import torch
    import transformers

    from bench.data import write_dataset
    from lorafit.tiny import build_model, build_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    write_dataset(data_dir, n_train=3000, n_eval=64, max_tokens=min(args.seq - 12, 2000))
    if not (model_dir / "config.json").exists():
        tok = build_tokenizer()
        size, dims = ("small", MINI) if args.size == "mini" else (args.size, {})
        model = build_model(tok, size=size, vocab_size=VOCAB, **dims).to(torch.bfloat16)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    results = []
    for r, spec in specs:
        spec_path = work / f"{r.name}.spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        print(f"running {r.name}", flush=True)
        subprocess.run(command(r, spec_path), cwd=ROOT, env=env, check=True)
        results.append(json.loads(Path(spec["result"]).read_text()))
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    facts = {"command": "bench/gpu.sh " + " ".join(sys.argv[1:] if argv is None else argv), "gpu": gpu,
             "torch": torch.__version__, "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
             "model": {"mini": "Phi-3-mini's shape", "small": "hidden 768, 8 layers"}.get(args.size, args.size),
             "seq": args.seq,
             "batch": args.batch, "steps": args.steps}  # fmt: skip
    Path(args.report).write_text(render(results, facts))
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2])
    else:
        sys.exit(main())
