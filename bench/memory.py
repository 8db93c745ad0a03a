"""Where a training run's memory goes, phase by phase: `python -m bench.memory ...`.

    python -m bench.memory --tool lorafit --tool trl --size small --workload long
    python -m bench.memory --tool lorafit --size medium --quantization nf4 --model-dtype bf16 --tensors
    python -m bench.memory --tool lorafit --tool peft --quantization nf4 ...   (PEFT + bitsandbytes)

Each tool runs one bench.workers training run (the same spec bench.run uses) in its own process,
one after the other (memory, not speed: nothing is interleaved). Inside that process a thread reads
``/proc/self/status`` every 50 ms:

    VmRSS    what `top` shows
    RssAnon  private memory: tensors the allocator got from the system, Python objects, libraries'
             heaps; it cannot be given back under pressure
    RssFile  pages mapped from files: a memory-mapped checkpoint's weights (and the shared libraries)

and glibc's own count of the bytes it holds free (``mallinfo2().fordblks``: memory the program
freed that the allocator keeps for reuse instead of returning it; it is part of RssAnon once
touched). The run is cut into phases at its own boundaries: ``start`` (imports), ``tokenize`` (the data),
``load`` (the model from its checkpoint), ``setup`` (LoRA, optimizer, until the first step begins),
``first step``, ``steady`` (the other steps), ``save`` (the adapter, the results) -- marked by
wrapping the tools' own load and tokenize functions in this process (measurement only) and by
torch's optimizer-step hook.

With ``--tensors`` the run is also under ``torch.profiler`` with ``profile_memory=True``: every
allocation and free of torch's CPU allocator, so the timeline gets the live tensor bytes (what a
GPU would have to hold), and the tensors alive at that peak are listed by the aten op that made
them (outermost op, its input shapes; ``bw`` = during backward). Tensors that are views of a
memory-mapped file (a bf16 checkpoint loaded as is) are not allocations and are not counted; the
parameters' bytes are reported beside. The profiler's own buffers add to the RSS of such a run, so
RSS figures come from a run without ``--tensors``.

Results: WORKDIR/memory-TOOL.json (every sample) and a markdown table on stdout (``--report`` writes it).
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.report import PHASES, STATUS_KEYS, phase_summary
from bench.run import VOCAB, WORKLOADS, _env


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def heap_free() -> int:
    """Bytes glibc's malloc holds free in its arenas (0 where mallinfo2 is missing: not glibc >= 2.33)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        return int(libc.mallinfo2().fordblks)
    except (OSError, AttributeError):
        return 0


# ----------------------------------------------------------------------------- inside the training process


class Sampler(threading.Thread):
    """Reads /proc/self/status every `period` s; `mark(phase)` cuts the timeline."""

    def __init__(self, period: float = 0.05):
        super().__init__(daemon=True)
        self.period = period
        self.t0 = time.perf_counter()
        self.samples: list[
            tuple[float, int, int, int, int]
        ] = []  # (s, VmRSS, RssAnon, RssFile, HeapFree) bytes
        self.marks: list[tuple[float, str]] = [(0.0, "start")]
        self.cpu: list[float] = [time.process_time()]
        self.stopped = threading.Event()
        self.profiling = False

    @staticmethod
    def read() -> tuple[int, int, int, int]:
        vals = {"HeapFree": heap_free()}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in STATUS_KEYS:
                    vals[key] = int(rest.split()[0]) * 1024
        return tuple(vals.get(k, 0) for k in STATUS_KEYS)

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append((time.perf_counter() - self.t0, *self.read()))
            time.sleep(self.period)

    def mark(self, phase: str) -> None:
        self.samples.append((time.perf_counter() - self.t0, *self.read()))
        self.marks.append((time.perf_counter() - self.t0, phase))
        self.cpu.append(
            time.process_time()
        )  # CPU seconds of the process: a cost that background load barely changes
        if self.profiling:
            import torch

            with torch.profiler.record_function(f"phase:{phase}"):
                pass

    def phase_of(self, t: float) -> str:
        k = bisect.bisect_right([m[0] for m in self.marks], t) - 1
        return self.marks[max(k, 0)][1]


def _around(owner, attr: str, sampler: Sampler, before: str, after: str | None) -> None:
    """Mark `before` when owner.attr is called and `after` when it returns (measurement only)."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapped(*a, **kw):
        sampler.mark(before)
        out = fn(*a, **kw)
        if after:
            sampler.mark(after)
        return out

    setattr(owner, attr, wrapped)


def instrument(tool: str, sampler: Sampler) -> None:
    """Phase marks at each tool's own load and tokenize calls."""
    if tool == "lorafit":
        import lorafit.job

        _around(lorafit.job, "load_data", sampler, "tokenize", "setup")
        _around(lorafit.job, "load_model", sampler, "load", "setup")
    elif tool == "peft":
        import transformers

        import lorafit.tokens

        _around(lorafit.tokens, "tokenize", sampler, "tokenize", "setup")
        _around(transformers.AutoModelForCausalLM, "from_pretrained", sampler, "load", "setup")
    elif tool == "trl":
        import trl.trainer.sft_trainer as sft

        _around(sft, "create_model_from_path", sampler, "load", "setup")
        _around(sft.SFTTrainer, "_prepare_dataset", sampler, "tokenize", "setup")


def child(spec: dict) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import bench.workers as workers

    sampler = Sampler(spec.get("period", 0.05))
    sampler.start()
    steps = {"n": 0}

    def on_step(*_):
        steps["n"] += 1
        sampler.mark("steady" if steps["n"] < spec["steps"] else "save")

    register_optimizer_step_post_hook(on_step)
    instrument(spec["tool"], sampler)
    pacer = workers.Pacer(None, pause=False)
    orig_start = pacer.start

    def start():  # setup done: the first step begins (lorafit's finetune calls it before loading)
        orig_start()
        if spec["tool"] != "lorafit":
            sampler.mark("first step")

    pacer.start = start
    if spec["tool"] == "lorafit":  # the first step begins when the loop's first batch is collated
        import lorafit.train

        first = {"done": False}
        orig = lorafit.train.collate

        def collate(*a, **kw):
            if not first["done"]:
                first["done"] = True
                sampler.mark("first step")
            return orig(*a, **kw)

        lorafit.train.collate = collate
    prof = None
    if spec.get("tensors"):
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True)
        prof.__enter__()
        sampler.profiling = True
    res = workers.TOOLS[spec["tool"]](spec, pacer)
    sampler.mark("end")
    sampler.stopped.set()
    sampler.join()
    out = {
        "tool": spec["tool"],
        "spec": {k: v for k, v in spec.items() if k not in ("result",)},
        "samples": sampler.samples,
        "marks": sampler.marks,
        "cpu": sampler.cpu,
        "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
        "losses": res.get("losses"),
        "step_tokens": res.get("step_tokens"),
        "torch_threads": torch.get_num_threads(),
    }
    if prof is not None:
        prof.__exit__(None, None, None)
        trace = Path(spec["result"]).with_suffix(".trace.json")
        prof.export_chrome_trace(str(trace))
        out["tensors"] = tensor_timeline(trace, spec.get("vocab", 0))
        if not spec.get("keep_trace"):
            trace.unlink()
    return out


# ----------------------------------------------------------------------------- the profiler's allocations


def tensor_timeline(trace_path: Path, vocab: int = 0, top: int = 12) -> dict:
    """Live tensor bytes over time from a chrome trace with memory events; what is alive at the peak.

    Replays every ``[memory]`` event (Addr, Bytes: + allocated, - freed) in time order. Each
    allocation is named by the outermost aten op around it on its thread (and ``bw`` when inside an
    autograd engine call), with that op's input shapes.
    """
    trace = json.loads(trace_path.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops: dict = {}
    phase_marks = []
    mem = []
    for e in events:
        name = e.get("name", "")
        if name == "[memory]":
            a = e.get("args", {})
            if a.get("Device Type", 0) == 0:
                mem.append((e["ts"], e.get("tid"), int(a["Addr"]), int(a["Bytes"])))
        elif e.get("ph") == "X":
            if name.startswith("phase:"):
                phase_marks.append((e["ts"], name[6:]))
            elif name.startswith(("aten::", "autograd::engine")):
                ops.setdefault(e.get("tid"), []).append(
                    (e["ts"], e["ts"] + e.get("dur", 0), name, e.get("args", {}))
                )
    # outermost aten op per thread: sorted by start; keep the intervals not inside an earlier aten op
    outer: dict = {}
    engine: dict = {}
    for tid, lst in ops.items():
        lst.sort(key=lambda x: (x[0], -x[1]))
        keep, eng, end = [], [], -1.0
        for s, f, n, a in lst:
            if n.startswith("autograd::engine"):
                eng.append((s, f))
                continue
            if s >= end:
                keep.append((s, f, n, a))
                end = f
        outer[tid] = (keep, [k[0] for k in keep])
        eng.sort()
        engine[tid] = eng
    phase_marks.sort()
    phase_ts = [p[0] for p in phase_marks]

    def label(ts, tid) -> str:
        keep, starts = outer.get(tid, ([], []))
        k = bisect.bisect_right(starts, ts) - 1
        if k >= 0 and keep[k][1] >= ts:
            s, f, n, a = keep[k]
            dims = a.get("Input Dims") or []
            dims = [d for d in dims if d][:3]
            bw = any(es <= ts <= ef for es, ef in engine.get(tid, [])[:]) if engine.get(tid) else False
            return f"{'bw ' if bw else ''}{n} {dims}"
        return "(outside any aten op)"

    def phase(ts) -> str:
        k = bisect.bisect_right(phase_ts, ts) - 1
        return phase_marks[k][1] if k >= 0 else "start"

    mem.sort()
    live: dict[int, tuple[int, float, int]] = {}
    total = peak = 0
    peak_ts = None
    by_phase: dict[str, int] = {}
    timeline = []
    for ts, tid, addr, nbytes in mem:
        if nbytes > 0:
            live[addr] = (nbytes, ts, tid)
            total += nbytes
        else:
            old = live.pop(addr, None)
            total -= old[0] if old else 0
        ph = phase(ts)
        by_phase[ph] = max(by_phase.get(ph, 0), total)
        if total > peak:
            peak, peak_ts = total, ts
            snapshot = dict(live)
        if not timeline or ts - timeline[-1][0] > 50_000:
            timeline.append((ts, total))
    groups: dict[str, list[int]] = {}
    for nbytes, ts, tid in snapshot.values() if peak else []:
        g = groups.setdefault(f"{phase(ts)}: {label(ts, tid)}", [0, 0])
        g[0] += nbytes
        g[1] += 1
    t0 = mem[0][0] if mem else 0
    return {
        "peak_bytes": peak,
        "peak_phase": phase(peak_ts) if peak_ts is not None else None,
        "peak_by_phase": by_phase,
        "top_at_peak": sorted(([k, b, n] for k, (b, n) in groups.items()), key=lambda x: -x[1])[:top],
        "timeline": [((ts - t0) / 1e6, b) for ts, b in timeline],
    }


# ----------------------------------------------------------------------------- driver


def render(results: list[dict]) -> str:
    lines = []
    for res in results:
        spec = res["spec"]
        what = (f"{res['tool']}: {Path(spec['model']).name}, {spec.get('workload', 'mixed')} workload, batch "
                f"{spec['batch']} x {spec['seq']}, packing {spec.get('packing', True)}, quantization "
                f"{spec.get('quantization', 'none')}, {spec['steps']} steps"
                + (", return_freed_memory on" if spec.get("return_freed_memory") and res["tool"] == "lorafit" else "")
                + (f", {' '.join(f'{k}={v}' for k, v in res['env'].items())}" if res.get("env") else ""))  # fmt: skip
        lines += [f"### {what}", "", "| phase | seconds | CPU s | VmRSS MiB | RssAnon MiB | RssFile MiB | malloc free MiB | live tensors MiB |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        tens = res.get("tensors", {})
        summ = phase_summary(res)
        for name in [p for p in PHASES if p in summ] + [p for p in summ if p not in PHASES]:
            ph = summ[name]
            tb = tens.get("peak_by_phase", {}).get(name)
            lines.append(
                f"| {name} | {ph['sec']:.1f} | {ph['cpu']:.1f} | {ph['VmRSS']:,.0f} | {ph['RssAnon']:,.0f} | {ph['RssFile']:,.0f} | "
                f"{ph['HeapFree']:,.0f} | " + (f"{tb / 2**20:,.0f} |" if tb is not None else "- |")
            )  # fmt: skip
        peak = {k: max(s[i] for s in res["samples"]) / 2**20 for i, k in enumerate(STATUS_KEYS, start=1)}
        lines += ["", f"Peak: VmRSS {peak['VmRSS']:,.0f} MiB, RssAnon {peak['RssAnon']:,.0f} MiB, RssFile "
                      f"{peak['RssFile']:,.0f} MiB, malloc free {peak['HeapFree']:,.0f} MiB"  # fmt: skip
                  + (f"; live tensors {tens['peak_bytes'] / 2**20:,.0f} MiB (in {tens['peak_phase']})" if tens else "")
                  + f". Losses: {', '.join(f'{x:.4f}' for x in res.get('losses') or [])}.", ""]  # fmt: skip
        if tens.get("top_at_peak"):
            lines += ["Alive at the live-tensor peak, by the op that allocated them:", "",
                      "| MiB | tensors | phase: op [input shapes] |", "|---|---|---|"]  # fmt: skip
            lines += [f"| {b / 2**20:,.1f} | {n} | `{k}` |" for k, b, n in tens["top_at_peak"]]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tool", action="append", choices=["lorafit", "peft", "trl"], help="repeatable")
    ap.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    ap.add_argument("--workload", default="mixed", choices=sorted(WORKLOADS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quantization", default="none", choices=["none", "nf4"])
    ap.add_argument("--model-dtype", default=None, help="lorafit model.dtype (default auto)")
    ap.add_argument("--checkpoint-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="dtype the model is written in (bench.run: fp32; bench.qlora: bf16)")  # fmt: skip
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="the peers' precision")
    ap.add_argument("--tensors", action="store_true", help="live tensor bytes via torch.profiler (slower)")
    ap.add_argument("--return-freed-memory", action="store_true",
                    help="lorafit with training_config.return_freed_memory=true (default false, as lorafit's: malloc "
                         "keeps what a step frees)")  # fmt: skip
    ap.add_argument("--env", action="append", default=[], help="VAR=VALUE for the training process")
    ap.add_argument("--tag", default="", help="added to the result file names (runs with other --env)")
    ap.add_argument("--workdir", default="/tmp/lorafit-bench-memory")
    ap.add_argument("--report", help="write the markdown here too")
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):  # bench.run's way: python -m bench.memory SPEC.json
        argv = ["--child", argv[0]]
    a = ap.parse_args(argv)
    if a.child:
        spec = json.loads(Path(a.child).read_text())
        Path(spec["result"]).write_text(json.dumps(child(spec)))
        return 0
    import torch

    from bench.data import write_dataset
    from lorafit.tiny import write_tiny_model

    work = Path(a.workdir)
    w = WORKLOADS[a.workload]
    lo, hi, batch, packing = w["min_tokens"], w["max_tokens"], w["batch"], w["packing"]
    data = work / f"data-{a.workload}"
    if not (data / "train.jsonl").is_file():
        write_dataset(data, 2000 if a.workload != "short" else 3000, 16, max_tokens=hi, min_tokens=lo)
    model = work / "models" / f"{a.size}-{a.checkpoint_dtype}"
    if not (model / "config.json").is_file():
        write_tiny_model(model, size=a.size, vocab_size=VOCAB)
        if a.checkpoint_dtype == "bf16":  # rewrite in bf16 (as Phi-3 ships)
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(model)
    results = []
    env = _env() | dict(kv.split("=", 1) for kv in a.env)
    for tool in a.tool or ["lorafit"]:
        name = (
            f"memory-{tool}-{a.size}-{a.workload}-{a.quantization}"
            + ("-tensors" if a.tensors else "")
            + ("-returned" if a.return_freed_memory else "")
            + (f"-{a.tag}" if a.tag else "")
        )
        spec = {"tool": tool, "model": str(model), "train": str(data / "train.jsonl"), "batch": batch, "seq": 512,
                "lr": 1e-3, "r": 16, "alpha": 32, "seed": 42, "vocab": VOCAB, "steps": a.steps,
                "precision": a.precision, "packing": packing, "quantization": a.quantization,
                "model_dtype": a.model_dtype, "workload": a.workload, "tensors": a.tensors,
                "return_freed_memory": a.return_freed_memory,
                "out": str(work / name), "result": str(work / f"{name}.json")}  # fmt: skip
        spec_path = work / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        subprocess.run([sys.executable, "-m", "bench.memory", "--child", str(spec_path)], check=True, env=env,
                       cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        results.append(json.loads(Path(spec["result"]).read_text()))
    text = render(results)
    print(text)
    if a.report:
        Path(a.report).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
