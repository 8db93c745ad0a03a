"""Where lorafit's training step spends its time: `python -m bench.profile SPEC.json`.

Runs the real `lorafit.finetune` (unchanged) under torch.profiler and looks at the steps after the
warm-up: the window is bounded by torch's own `Optimizer.step#AdamW.step` events. Every outermost
aten op in the window is put into one category by its name and input shapes:

    loss head        any input with the vocabulary dimension (lorafit's chunked logits/softmax/grad)
    attention        scaled_dot_product_* and their backward
    LoRA matmuls     linear/mm/addmm/matmul with a dimension equal to the LoRA rank
    linear matmuls   the other linear/mm/addmm/matmul (the frozen base projections)
    optimizer        inside Optimizer.step / zero_grad, and the _foreach_ ops of gradient clipping
    other ops        norms, activations, RoPE, residual adds, copies, mask building, ...

and into forward or backward (under an autograd engine event). Wall time of the window not covered
by any op is Python and framework overhead (batch collation included; collation is also timed on
its own). SPEC: the bench.workers spec of a lorafit run, plus "warmup", "profile_steps".
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

MATMUL = {"aten::linear", "aten::mm", "aten::addmm", "aten::matmul", "aten::bmm", "aten::baddbmm"}
CATEGORIES = ["linear matmuls", "LoRA matmuls", "attention", "loss head", "other ops", "optimizer"]


def _ancestors(e):
    p = e.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def _matmul_flops(name: str, shapes: list) -> float:
    """FLOPs of a matmul-like op from its input shapes (0 when they are not understood)."""
    try:
        if name == "aten::linear":
            x, w = shapes[0], shapes[1]
            rows = 1
            for d in x[:-1]:
                rows *= d
            return 2.0 * rows * w[0] * w[1]
        if name in ("aten::mm", "aten::matmul"):
            a, b = shapes[0], shapes[1]
            rows = 1
            for d in a[:-1]:
                rows *= d
            return 2.0 * rows * a[-1] * b[-1]
        if name == "aten::addmm":
            a, b = shapes[1], shapes[2]
            return 2.0 * a[0] * a[1] * b[1]
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = (
                shapes[-2] if name == "aten::baddbmm" else shapes[0],
                shapes[-1] if name == "aten::baddbmm" else shapes[1],
            )
            return 2.0 * a[0] * a[1] * a[2] * b[2]
    except (IndexError, TypeError):
        return 0.0
    return 0.0


def classify(e, r: int, vocab: int) -> str:
    names = [a.name for a in _ancestors(e)]
    if any(n.startswith(("Optimizer.step", "Optimizer.zero_grad")) for n in names) or "_foreach_" in e.name:
        return "optimizer"
    dims = {d for s in e.input_shapes or [] if isinstance(s, list) for d in s}
    if vocab in dims:
        return "loss head"
    if "scaled_dot_product" in e.name or "attention" in e.name:
        return "attention"
    if e.name in MATMUL:
        return "LoRA matmuls" if r in dims else "linear matmuls"
    return "other ops"


def analyse(prof, *, warmup: int, steps: int, r: int, vocab: int) -> dict:
    events = list(prof.events())
    opt_steps = sorted(
        (e for e in events if e.name.startswith("Optimizer.step#")), key=lambda e: e.time_range.start
    )
    if len(opt_steps) < warmup + steps:
        raise RuntimeError(
            f"expected {warmup + steps} optimizer steps in the profile, found {len(opt_steps)}"
        )
    lo = opt_steps[warmup - 1].time_range.end if warmup > 0 else min(e.time_range.start for e in events)
    hi = opt_steps[warmup + steps - 1].time_range.end
    wall_us = hi - lo
    table: dict[str, dict[str, float]] = {c: {"forward": 0.0, "backward": 0.0} for c in CATEGORIES}
    flops = {c: 0.0 for c in CATEGORIES}
    covered = 0.0
    top_ops: dict[str, float] = {}
    for e in events:
        if not e.name.startswith("aten::") or e.time_range.start < lo or e.time_range.end > hi:
            continue
        anc = list(_ancestors(e))
        if any(a.name.startswith("aten::") for a in anc):
            continue  # counted with its outermost aten op
        cat = classify(e, r, vocab)
        phase = "backward" if any(a.name.startswith("autograd::engine") for a in anc) else "forward"
        dur = e.time_range.elapsed_us()
        table[cat][phase] += dur
        covered += dur
        if e.name in MATMUL:
            flops[cat] += _matmul_flops(e.name, e.input_shapes or [])
        top_ops[e.name] = top_ops.get(e.name, 0.0) + dur
    per_step = 1e-3 / steps  # us over the window -> ms per step
    out = {
        "steps": steps,
        "wall_ms_per_step": wall_us * per_step,
        "categories": {
            c: {
                "forward_ms": v["forward"] * per_step,
                "backward_ms": v["backward"] * per_step,
                "total_ms": (v["forward"] + v["backward"]) * per_step,
                "share": (v["forward"] + v["backward"]) / wall_us,
                "matmul_gflops_per_s": flops[c] / ((v["forward"] + v["backward"]) * 1e-6) / 1e9
                if flops[c] and (v["forward"] + v["backward"])
                else None,
            }
            for c, v in table.items()
        },
        "python_overhead_ms": (wall_us - covered) * per_step,
        "python_overhead_share": (wall_us - covered) / wall_us,
        "top_ops_ms": {k: v * per_step for k, v in sorted(top_ops.items(), key=lambda kv: -kv[1])[:15]},
    }
    return out


def collate_ms(spec: dict, n_batches: int = 20) -> float:
    """Milliseconds lorafit.packing.collate takes for one batch of this run's packed rows."""
    from transformers import AutoTokenizer

    from lorafit.data import load_conversations
    from lorafit.packing import Batches, collate, pack
    from lorafit.tokens import tokenize

    tok = AutoTokenizer.from_pretrained(spec["model"])
    data, _ = tokenize(
        tok, load_conversations(spec["train"]), max_seq_length=spec["seq"], end_of_turn="<|end|>"
    )
    batches = Batches(pack(data, spec["seq"]), spec["batch"], seed=spec["seed"]).epoch_batches(0)[:n_batches]
    t = time.perf_counter()
    for b in batches:
        collate(data, b, tok.pad_token_id)
    return (time.perf_counter() - t) / len(batches) * 1e3


def main(argv: list[str] | None = None) -> None:
    from torch.profiler import ProfilerActivity, profile

    from bench.workers import Pacer, run_lorafit

    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    warmup, steps = spec["warmup"], spec["profile_steps"]
    spec = {**spec, "steps": warmup + steps}
    pacer = Pacer(None, pause=False)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run = run_lorafit(spec, pacer)
    res = analyse(prof, warmup=warmup, steps=steps, r=spec["r"], vocab=spec["vocab"])
    run.update(pacer.result())
    times = [b - a for a, b in zip(run["step_resume"], run["step_end"][1:])]
    res["unprofiled_note"] = "step times below are lorafit's own, measured while profiling"
    res["step_sec_while_profiling"] = times[warmup - 1 :]
    res["tokens_per_step"] = run["step_tokens"][warmup:]
    res["collate_ms_per_batch"] = collate_ms(spec)
    Path(spec["result"]).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
