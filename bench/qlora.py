"""QLoRA benchmark: LoRA on an nf4 (4-bit) base against the same run on the bf16 base.

    python -m bench.qlora                          small config, 30 steps each; writes BENCHMARKS-qlora.md
    python -m bench.qlora --config small --config medium --steps 12
    python -m bench.qlora --quick                  smoke test (tiny config, 2 steps)

For each config (bench's model configs, `lorafit.tiny.SIZES`, with Phi-3's vocabulary of 32,064) a
random Phi-3 is written once as a bf16 checkpoint, like Phi-3's own. Then lorafit trains LoRA
(all-linear, r=16) on the same synthetic chat data (`bench/data.py`), same seed, same steps, once
per base -- `model.dtype: bf16` and `model.quantization: none | nf4` (+ double quant, bf16 compute) --
each in its own process (`python -m bench.qlora --worker SPEC`), so that peak RSS is that run's alone.

Measured per run: base-weight bytes (every tensor of the model's state_dict but LoRA factors: for
nf4 the packed 4-bit weights, their scales and lm_head/embeddings/norms in bf16), peak RSS
(getrusage), RSS after loading, training tokens/s (lorafit's own count, non-pad tokens per second
of training), and eval loss on held-out conversations before and after training (the same tokens
seen by both runs). Runs alternate base by base (bf16, nf4, bf16, nf4, ... with --rounds) because
the machine is shared.

The report also computes Phi-3-mini-4k's base-weight ratio from its shapes alone (no download):
bytes per quantized weight as measured here, times its linear layers, plus embeddings and lm_head in
bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 32064
# Phi-3-mini-4k-instruct's config.json (the shapes that matter for memory).
PHI3_MINI = dict(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32
)
STEPS = {"tiny": 2, "small": 30, "medium": 3}
EVAL_CONVERSATIONS = {"tiny": 8, "small": 32, "medium": 8}  # medium's eval forward is slow on 2 cores
BATCH, SEQ, LR, R = 4, 512, 2e-3, 16


# ----------------------------------------------------------------------------- worker (one training run)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bnb_missing() -> str | None:
    """None when bitsandbytes imports, else why not (the QLoRA benchmark and tests need it)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return f"bitsandbytes is not installed ({e}); pip install 'lorafit[qlora]' (bitsandbytes)"
    return None


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the base model's weights (everything in its state_dict but LoRA factors, each storage
    counted once): {"quantized": in bitsandbytes layers, with their scales, "other": the rest, "total"}."""
    import torch

    from lorafit import quant

    types = quant.quantized_types() if quant.is_quantized(model) else ()
    quantized_prefixes = tuple(f"{n}." for n, m in model.named_modules() if types and isinstance(m, types))
    seen: set[tuple[int, int]] = set()
    out = {"quantized": 0, "other": 0}
    for key, t in model.state_dict(keep_vars=True).items():
        if "lora_" in key or not torch.is_tensor(t):
            continue
        ident = (
            (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        )
        if ident in seen:
            continue
        seen.add(ident)
        size = t.numel() * t.element_size()
        out["quantized" if key.startswith(quantized_prefixes) else "other"] += size
    out["total"] = out["quantized"] + out["other"]
    return out


def worker(spec: dict) -> dict:
    """One lorafit run on spec["base"] ("bf16" or a quantization method); returns its measurements."""
    import torch

    from bench.memory import STATUS_KEYS, Sampler
    from lorafit.api import build_config
    from lorafit.job import prepare
    from lorafit.train import run

    sampler = Sampler()  # /proc/self/status every 50 ms: VmRSS, private (RssAnon), file-mapped, malloc's free
    sampler.start()
    rss_start = current_rss_mb()
    q = "none" if spec["base"] == "bf16" else spec["base"]
    cfg = build_config(
        model=spec["model"], train_data=spec["train"], eval_data=spec["eval"], output_dir=spec["out"],
        training_config={
            "max_steps": spec["steps"], "per_device_train_batch_size": BATCH, "max_seq_length": SEQ,
            "learning_rate": LR, "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1,
            "save_strategy": "no", "eval_strategy": "no", "per_device_eval_batch_size": BATCH,
            "seed": 0, "bf16": True, "gradient_checkpointing": spec["gradient_checkpointing"],
            "post_check": False,  # the replies after training are not part of the comparison
        },
        peft_config={"r": R, "lora_alpha": 2 * R, "target_modules": "all-linear"},
        overrides=[f"model.quantization={q}", "model.dtype=bf16", "model.device=cpu"],
    )  # fmt: skip
    job = prepare(cfg, overwrite=True)
    checkpointing = bool(getattr(job.model, "is_gradient_checkpointing", False))
    sampler.mark("train")
    loaded = {"rss_after_load_mb": current_rss_mb(), "peak_rss_after_load_mb": peak_rss_mb()}
    weights = weight_bytes(job.model)
    n_quantized = sum(
        m.in_features * m.out_features
        for m in job.model.modules()
        if type(m).__name__ in ("Linear4bit", "Linear8bitLt")
    )
    lora_bytes = sum(p.numel() * p.element_size() for n, p in job.model.named_parameters() if "lora_" in n)
    t0 = time.perf_counter()
    res = run(job, progress=False)
    wall = time.perf_counter() - t0
    sampler.stopped.set()
    sampler.join()
    t_train = sampler.marks[1][0]
    memory = {  # MiB, the largest sample of each figure while loading and while training
        phase: {k: max(x[i] for x in sampler.samples if (x[0] < t_train) == (phase == "load")) / 2**20
                for i, k in enumerate(STATUS_KEYS, start=1)}
        for phase in ("load", "train")
    }  # fmt: skip
    recs = [json.loads(line) for line in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    # per-step rates after the first step: their median resists bursts of load from other processes
    rates = sorted(r["tokens_per_sec"] for r in recs if "loss" in r and r["step"] > 1)
    return {
        "base": spec["base"],
        "label": spec.get("label", spec["base"]),
        "checkpointing": checkpointing,
        "size": spec["size"],
        "steps": res["steps"],
        "tokens": res["tokens"],
        "tokens_per_sec": res["tokens_per_sec"],
        "tokens_per_sec_median_step": rates[len(rates) // 2] if rates else res["tokens_per_sec"],
        "train_wall_sec": wall,
        "eval_loss_before": res["eval_loss_before"],
        "eval_loss": res["eval_loss"],
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "weight_bytes": weights,
        "quantized_weights": n_quantized,
        "lora_bytes": lora_bytes,
        "rss_start_mb": rss_start,
        **loaded,
        "peak_rss_mb": peak_rss_mb(),
        "memory": memory,
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- driver


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_model(size: str, out: Path) -> Path:
    """A random Phi-3 of bench's `size`, saved in bf16 (as Phi-3 ships), with lorafit's tiny tokenizer."""
    import torch

    from lorafit.tiny import build_model, build_tokenizer

    if (out / "config.json").is_file():
        return out
    tok = build_tokenizer()
    model = build_model(tok, size=size, vocab_size=VOCAB).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_worker(spec: dict, work: Path, reuse: bool = False) -> dict:
    path = work / f"spec-{Path(spec['out']).name}.json"
    result = path.with_suffix(".result.json")
    if reuse and result.is_file() and path.is_file() and json.loads(path.read_text()) == spec:
        say("  (reusing the result of an earlier run of this exact spec)")
        out = json.loads(result.read_text())
        if "tokens_per_sec_median_step" not in out:  # results from before that field existed
            recs = [json.loads(x) for x in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
            rates = sorted(r["tokens_per_sec"] for r in recs if "loss" in r and r["step"] > 1)
            out["tokens_per_sec_median_step"] = rates[len(rates) // 2]
        return out
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1])] + sys.path)}
    log = path.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.qlora", "--worker", str(path), "--result", str(result)],
            stdout=f, stderr=subprocess.STDOUT, env=env, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return json.loads(result.read_text())


def phi3_mini_estimate(bytes_per_quantized_weight: float) -> dict:
    """Base-weight bytes of Phi-3-mini-4k in bf16 and with nf4 linear layers, from its shapes alone."""
    h, i, v, n = (
        PHI3_MINI[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers")
    )
    linear = n * (h * 3 * h + h * h + h * 2 * i + i * h)  # qkv_proj, o_proj, gate_up_proj, down_proj
    other = 2 * v * h + (2 * n + 1) * h  # embed_tokens, lm_head (untied), RMSNorm weights
    bf16 = 2 * (linear + other)
    nf4 = bytes_per_quantized_weight * linear + 2 * other
    return {
        "linear_weights": linear,
        "other_weights": other,
        "bf16_bytes": bf16,
        "nf4_bytes": nf4,
        "ratio": nf4 / bf16,
        "bytes_per_quantized_weight": bytes_per_quantized_weight,
    }


def phi3_mini_peak_estimate(work: Path, train: str, gradient_checkpointing: bool) -> dict:
    """`lorafit estimate`'s peak for Phi-3-mini-4k's shapes (config.json only, nothing downloaded) with
    this benchmark's training settings, on the bf16 base and on the 4-bit one: its per-layer figures
    (activations per token and layer, the loss head, quantized bytes per weight) are the ones measured
    and checked against real runs in BENCHMARKS.md ("How accurate is `lorafit estimate`")."""
    from transformers import Phi3Config

    import lorafit
    from lorafit.tiny import build_tokenizer

    folder = work / "phi3-mini-shapes"
    if not (folder / "config.json").is_file():
        Phi3Config(**PHI3_MINI, num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False,
                   torch_dtype="bfloat16").save_pretrained(folder)  # fmt: skip
        build_tokenizer().save_pretrained(folder)
    out = {"gradient_checkpointing": gradient_checkpointing}
    for base in ("bf16", "nf4"):
        plan = lorafit.estimate(
            model=str(folder), train_data=train,
            training_config={"per_device_train_batch_size": BATCH, "max_seq_length": SEQ, "bf16": True,
                             "gradient_checkpointing": gradient_checkpointing},
            peft_config={"r": R, "lora_alpha": 2 * R, "target_modules": "all-linear"},
            overrides=[f"model.quantization={'none' if base == 'bf16' else base}", "model.dtype=bf16",
                       "model.device=cpu"],
        ).to_dict()  # fmt: skip
        m = plan["memory"]
        out[base] = {"peak_bytes": plan["peak_memory_bytes"], "tensor_peak_bytes": plan["tensor_peak_bytes"],
                     "train_peak_bytes": m["tensor_peak"] + m["overhead"] + m["runtime"],
                     "load_peak_bytes": m["load_peak"], "checkpointing": plan["gradient_checkpointing"]}  # fmt: skip
    for key in ("peak_bytes", "tensor_peak_bytes", "train_peak_bytes"):
        out[key.replace("bytes", "ratio")] = out["nf4"][key] / out["bf16"][key]
    return out


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _private(rs: list[dict], bf: list[dict]) -> str:
    """Peak private memory (RssAnon) while loading / training, malloc's free bytes, and the training
    figure against the bf16 run's."""
    if not all("memory" in r for r in rs + bf):
        return "-"
    load, train = (_mean([r["memory"][p]["RssAnon"] for r in rs]) for p in ("load", "train"))
    free = _mean([r["memory"]["train"]["HeapFree"] for r in rs])
    ref = _mean([r["memory"]["train"]["RssAnon"] for r in bf])
    return f"{load:,.0f} / {train:,.0f} ({train / ref:.2f}x) ({free:,.0f})"


def render_targets(results: dict) -> list[str]:
    """The issue's targets: on medium (else the largest config run), nf4 with lorafit's defaults against bf16
    with lorafit's defaults, and the Phi-3-mini-shaped estimate."""
    size = "medium" if "medium" in results["configs"] else list(results["configs"])[-1]
    by: dict = {}
    for r in results["configs"][size]:
        by.setdefault(r.get("label", r["base"]), []).append(r)
    bf = by["bf16"]
    mark = {True: "met", False: "**not met**"}
    lines = [f"## Targets ({size})", "", "| target | goal | measured | verdict |", "|---|---|---|---|"]
    for label, rs in by.items():
        if label == "bf16":
            continue
        ckpt = "on" if rs[0].get("checkpointing") else "off"
        label = label if "checkpointing" in label else f"{label} (checkpointing {ckpt})"
        rss = _mean([r["peak_rss_mb"] for r in rs]) / _mean([r["peak_rss_mb"] for r in bf])
        lines.append(f"| {label}: peak VmRSS vs bf16 | <= 0.6x | {rss:.2f}x | {mark[rss <= 0.6]} |")
        if all("memory" in r for r in rs + bf):
            priv = _mean([r["memory"]["train"]["RssAnon"] for r in rs])
            ref = _mean([r["memory"]["train"]["RssAnon"] for r in bf])
            lines.append(f"| {label}: peak private memory vs bf16 | below | {priv:,.0f} vs "
                         f"{ref:,.0f} MiB ({priv / ref:.2f}x) | {mark[priv < ref]} |")  # fmt: skip
    est = {e["gradient_checkpointing"]: e for e in results.get("phi3_mini_peak", [])}
    if True in est and False in est:  # lorafit's defaults where the activations fit: nf4 on, bf16 off
        r = est[True]["nf4"]["train_peak_bytes"] / est[False]["bf16"]["train_peak_bytes"]
        lines.append(f"| Phi-3-mini-shaped estimate, each base with lorafit's default (nf4: checkpointing on, bf16: "
                     f"off): training peak nf4 vs bf16 | <= 0.35x | {r:.2f}x | {mark[r <= 0.35]} |")  # fmt: skip
    for e in results.get("phi3_mini_peak", []):
        ck = "on" if e["gradient_checkpointing"] else "off"
        lines.append(f"| Phi-3-mini-shaped estimate, checkpointing {ck}: training peak nf4 vs bf16 | <= 0.35x | "
                     f"{e['train_peak_ratio']:.2f}x (tensors {e['tensor_peak_ratio']:.2f}x) | "
                     f"{mark[e['train_peak_ratio'] <= 0.35]} |")  # fmt: skip
    lines.append("")
    if results.get("phi3_mini_peak"):
        lines += ["Phi-3-mini-shaped estimates (`lorafit estimate` on Phi-3-mini-4k's config.json, this benchmark's "
                  "batch and data; GiB): training peak = tensors at the step's peak + the process's training "
                  "overhead + runtime; loading peak: a 4-bit load reads the bf16 checkpoint through a file mapping, "
                  "whose pages count in VmRSS while loading but are page cache the kernel can take back (private "
                  "memory while loading stays near the 4-bit model's size, see `peak private MiB: load` above).", "",
                  "| checkpointing | base | training peak | tensors | loading peak |", "|---|---|---|---|---|"]  # fmt: skip
        for e in results["phi3_mini_peak"]:
            for base in ("bf16", "nf4"):
                x = e[base]
                lines.append(f"| {'on' if e['gradient_checkpointing'] else 'off'} | {base} | "
                             f"{x['train_peak_bytes'] / 2**30:.2f} | {x['tensor_peak_bytes'] / 2**30:.2f} | "
                             f"{x['load_peak_bytes'] / 2**30:.2f} |")  # fmt: skip
        lines.append("")
    return lines


def render(results: dict) -> str:
    """BENCHMARKS-qlora.md: the command, one table per config, the Phi-3-mini estimate, notes."""
    m, st = results["machine"], results["settings"]
    lines = [
        "# QLoRA benchmark: LoRA on a 4-bit base vs the bf16 base",
        "",
        f"Command: `{results['command']}` ({results['date']}). Machine: {m['cpus']} CPUs (shared), "
        f"fast bf16: {m['fast_bf16']}, torch {m['torch']}, bitsandbytes {m['bitsandbytes']} (CPU backend), "
        f"load average at start {m['load_avg_start']:.1f}.",
        "",
        f"Same work for both bases: lorafit, LoRA r={st['r']} on all linear layers, batch {st['batch']} x "
        f"{st['seq']} tokens (packed), lr {st['lr']} constant, bf16 autocast, `gradient_checkpointing: "
        f"{st['gradient_checkpointing']}` (the column says what each run did; `auto`, lorafit's default, is on "
        f"for a 4-bit base); {results['data']['n_train']} synthetic "
        f"conversations (bench/data.py), eval loss on {results['data']['n_eval']} held-out ones. Base "
        f"weights: every tensor of the state_dict but LoRA factors (4-bit: packed weights + scales; "
        f"embeddings, lm_head, norms stay bf16). Each run is its own process (peak RSS = getrusage).",
        "",
    ]
    for size, runs in results["configs"].items():
        by = {}
        for r in runs:
            by.setdefault(r.get("label", r["base"]), []).append(r)
        ref = by["bf16"][0]
        steps, tokens = ref["steps"], ref["tokens"]
        lines += [
            f"## {size} ({steps} steps, {tokens:,} training tokens per run; eval on "
            f"{min(EVAL_CONVERSATIONS[size], results['data']['n_eval'])} conversations)",
            "",
            "| base | checkpointing | base weights MiB | vs bf16 | quantized layers MiB (vs bf16) | RSS after load MB | "
            "peak RSS MB | peak private MiB: load / train (malloc free) | tokens/s (median step) | eval loss before -> "
            "after | after vs bf16 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        bf = by["bf16"]
        bf_w = _mean([r["weight_bytes"]["total"] for r in bf])
        bf_loss = _mean([r["eval_loss"] for r in bf])
        for base, rs in by.items():
            w = _mean([r["weight_bytes"]["total"] for r in rs])
            qw = rs[0]["quantized_weights"]
            ql = (
                f"{_mib(rs[0]['weight_bytes']['quantized'])} ({rs[0]['weight_bytes']['quantized'] / (2 * qw):.3f}x)"
                if qw
                else "-"
            )
            loss = _mean([r["eval_loss"] for r in rs])
            lines.append(
                f"| {base} | {'on' if rs[0].get('checkpointing') else 'off'} | {_mib(w)} | {w / bf_w:.3f}x | {ql} | {_mean([r['rss_after_load_mb'] for r in rs]):,.0f} | "
                f"{_mean([r['peak_rss_mb'] for r in rs]):,.0f} ({_mean([r['peak_rss_mb'] for r in rs]) / _mean([r['peak_rss_mb'] for r in bf]):.2f}x) | "
                f"{_private(rs, bf)} | {_mean([r['tokens_per_sec'] for r in rs]):,.0f} "
                f"({_mean([r['tokens_per_sec_median_step'] for r in rs]):,.0f}) | "
                f"{_mean([r['eval_loss_before'] for r in rs]):.4f} -> {loss:.4f} | {100 * (loss / bf_loss - 1):+.2f}% |"
            )
        lines.append("")
    if "phi3_mini" in results:
        e = results["phi3_mini"]
        lines += [
            "## Phi-3-mini-4k from its shapes (no download)",
            "",
            f"Linear layers (qkv_proj, o_proj, gate_up_proj, down_proj x 32): {e['linear_weights'] / 1e9:.3f} B "
            f"weights; embeddings + lm_head + norms: {e['other_weights'] / 1e9:.3f} B. At the measured "
            f"{e['bytes_per_quantized_weight']:.4f} bytes per quantized weight (4 bits + double-quantized "
            f"scales) and bf16 for the rest: {e['nf4_bytes'] / 2**30:.2f} GiB against "
            f"{e['bf16_bytes'] / 2**30:.2f} GiB in bf16, **{e['ratio']:.3f}x**.",
            "",
        ]
    lines += render_targets(results)
    lines += [
        "## Reading the numbers",
        "",
        "- Base weights: only the linear layers are quantized (0.26x of their bf16 size: 4 bits + one 8-bit "
        "scale per 64 weights + one fp32 scale per 256 scales). Embeddings and lm_head (32,064 x hidden each) "
        "stay bf16, so the whole-model ratio falls with size: about 0.6x for small, 0.36x for medium, 0.30x "
        "for Phi-3-mini, where the linear layers are 95% of the weights.",
        "- RSS: the bf16 checkpoint is memory-mapped, so a bf16 base enters the RSS page by page as training "
        "first reads it (its RSS after load is low, its peak RSS includes it, as file pages); a 4-bit load reads "
        "every weight to quantize it (the mapping's pages count while loading), then holds the 4-bit copy, the "
        "bf16 embeddings/lm_head and bitsandbytes itself (~115 MB for its import) in private memory.",
        "- What sets the peak: without checkpointing, the activations of a 4 x 512-token step (~4 GB on medium) "
        "and the blocks malloc keeps after they are freed (the `malloc free` figure), the same for both bases; "
        "the 4-bit weights save ~1.1 GB of the bf16 base's 1.8 GB but are private where the bf16 weights are file "
        "pages. So `gradient_checkpointing: auto` is on for a 4-bit base (lorafit's default; PEFT's "
        "`prepare_model_for_kbit_training` does the same): the nf4 row. The `nf4, checkpointing off` row is the "
        "same 4-bit run under the bf16 run's setting. The 4-bit weights are dequantized into one reused buffer "
        "per weight shape (`lorafit.quant.DequantBuffers`), not a fresh tensor per matmul.",
        "- Private memory (RssAnon, sampled every 50 ms by bench.memory's sampler) is what the run cannot give "
        "back under pressure. malloc free: the bytes glibc held free at the training peak "
        '(`training_config.return_freed_memory: true` returns them, at a cost in speed: README, "Memory"). '
        "Phase by phase and per tensor: `python -m bench.memory --quantization nf4 --model-dtype bf16 "
        "--checkpoint-dtype bf16 --size medium [--tensors]`.",
        "- Speed on this CPU: bf16 matmuls are fast (AVX512-BF16), and bitsandbytes' CPU backend dequantizes "
        "each 4-bit weight to bf16 before every matmul (forward, and again in backward), so a 4-bit step "
        "costs more than a bf16 one. On CUDA the dequantization is a fused kernel. The machine is shared "
        "(load average noted above): the median step rate resists bursts of load better than the mean.",
        "- Eval loss: the same data, seed and steps; the difference is the quantization error of the base "
        "(the models are random, so its loss before training is ~ln(32064) = 10.4 for both).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.qlora", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", action="append", choices=["tiny", "small", "medium"], help="repeatable (default small)"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: per config)")
    p.add_argument("--rounds", type=int, default=1, help="repeat bf16/nf4 pairs (alternating)")
    p.add_argument("--method", default="nf4", choices=["nf4", "fp4", "int8"])
    p.add_argument(
        "--gradient-checkpointing",
        default="auto",
        choices=["auto", "on", "off"],
        help="training_config.gradient_checkpointing of every run (default auto: lorafit's default, on for "
        "a 4-bit base; with auto the 4-bit base also runs with it off, as the bf16 base does)",
    )
    p.add_argument("--workdir", default="/tmp/lorafit-bench-qlora")
    p.add_argument("--report", default=None, help="default: BENCHMARKS-qlora.md at the repository root")
    p.add_argument("--reuse", action="store_true", help="reuse results of earlier runs with the same spec")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny config, 2 steps, report in workdir")
    p.add_argument("--render", action="store_true", help="only rewrite the report from WORKDIR/results.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        out = worker(json.loads(Path(a.worker).read_text()))
        Path(a.result).write_text(json.dumps(out, indent=2))
        return 0

    if a.render:
        results = json.loads((Path(a.workdir) / "results.json").read_text())
        path = Path(a.report) if a.report else Path(__file__).resolve().parents[1] / "BENCHMARKS-qlora.md"
        path.write_text(render(results) + "\n")
        return 0
    if bnb_missing():
        print(f"bench.qlora needs bitsandbytes: {bnb_missing()}", file=sys.stderr)
        return 2
    configs = ["tiny"] if a.quick else (a.config or ["small"])
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    report_path = Path(a.report) if a.report else (work if a.quick else repo) / "BENCHMARKS-qlora.md"
    from bench.data import write_dataset

    data = write_dataset(work / "data", n_train=2000, n_eval=32)
    command = "python -m bench.qlora " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {
        "command": command.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": _machine(),
        "settings": {
            "batch": BATCH,
            "seq": SEQ,
            "lr": LR,
            "r": R,
            "method": a.method,
            "gradient_checkpointing": a.gradient_checkpointing,
            "rounds": a.rounds,
        },  # fmt: skip
        "data": {k: data[k] for k in ("n_train", "n_eval", "mean_len")},
        "configs": {},
    }
    for size in configs:
        model = write_model(size, work / "models" / size)
        steps = a.steps or STEPS[size]
        evals = data["eval"]
        if EVAL_CONVERSATIONS[size] < data["n_eval"]:
            evals = str(work / "data" / f"eval-{EVAL_CONVERSATIONS[size]}.jsonl")
            Path(evals).write_text(
                "".join(Path(data["eval"]).read_text().splitlines(True)[: EVAL_CONVERSATIONS[size]])
            )
        runs = []
        for rnd in range(a.rounds):
            ckpt = {"auto": "auto", "on": True, "off": False}[a.gradient_checkpointing]
            plans = [("bf16", ckpt, "bf16"), (a.method, ckpt, a.method)]
            if ckpt == "auto":  # the 4-bit base under the bf16 run's setting too (auto: off where it fits)
                plans.append((a.method, False, f"{a.method}, checkpointing off"))
            for base, gc, label in plans:
                say(f"{size}: round {rnd + 1}/{a.rounds}, {label} base, {steps} steps")
                tag = base if gc == ckpt else f"{base}-gc{int(gc)}"
                spec = dict(size=size, base=base, label=label, round=rnd, model=str(model), train=data["train"],
                            eval=evals, out=str(work / "runs" / f"{size}-{tag}-{rnd}"), steps=steps,
                            gradient_checkpointing=gc)  # fmt: skip
                r = run_worker(spec, work, a.reuse)
                say(
                    f"  weights {r['weight_bytes']['total'] / 2**20:.1f} MiB, peak RSS {r['peak_rss_mb']:.0f} MB, "
                    f"{r['tokens_per_sec']:.0f} tok/s, eval loss {r['eval_loss_before']:.4f} -> {r['eval_loss']:.4f}"
                )
                runs.append(r)
        results["configs"][size] = runs
    measured = [  # bytes per quantized weight (scales included), from the run with the most of them
        (r["quantized_weights"], r["weight_bytes"]["quantized"] / r["quantized_weights"])
        for runs in results["configs"].values()
        for r in runs
        if r["base"] == "nf4" and r["quantized_weights"]
    ]
    if measured:
        results["phi3_mini"] = phi3_mini_estimate(max(measured)[1])
    results["phi3_mini_peak"] = [phi3_mini_peak_estimate(work, data["train"], ckpt) for ckpt in (False, True)]
    (work / "results.json").write_text(json.dumps(results, indent=2))
    report_path.write_text(render(results) + "\n")
    say(f"wrote {report_path} (raw numbers: {work / 'results.json'})")
    return 0


def _machine() -> dict:
    import torch

    from lorafit.precision import cpu_has_fast_bf16

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitsandbytes": bnb,
        "cpus": os.cpu_count(),
        "fast_bf16": cpu_has_fast_bf16(),
        "load_avg_start": os.getloadavg()[0],
    }


if __name__ == "__main__":
    sys.exit(main())
