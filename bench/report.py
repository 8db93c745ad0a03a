"""Tables for the terminal and BENCHMARKS.md, from the results dict of bench.run."""

from __future__ import annotations

import statistics

# bench.memory's samples of /proc/self/status (+ malloc's free bytes) and the phases it cuts a run into
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "HeapFree")
PHASES = ["start", "tokenize", "load", "setup", "first step", "steady", "save"]
TOOLS = ["lorafit", "peft", "trl"]  # the tools bench.run runs side by side, in this order
LABELS = {"lorafit": "lorafit", "peft": "plain PEFT loop", "trl": "TRL SFTTrainer + PEFT"}

# the targets of each workload on the small config: (key, label, goal text, bound, "min" | "max" | "abs")
TARGETS = {
    "mixed": [
        ("tps_vs_trl", "tokens/s vs TRL", ">= 4x", 4.0, "min"),
        ("tps_vs_peft", "tokens/s vs plain PEFT loop", ">= 2x", 2.0, "min"),
        ("rss_vs_trl", "peak RSS vs TRL", "<= 0.5x", 0.5, "max"),
        ("eval_vs_trl", "eval loss vs TRL", "within 2%", 0.02, "abs"),
        ("mfu", "MFU", "> 40% (aim)", 0.40, "min"),
    ],
    "long": [
        ("tps_vs_trl", "tokens/s vs TRL", ">= 4x", 4.0, "min"),
        ("rss_vs_trl", "peak RSS vs TRL", "<= 0.6x", 0.6, "max"),
        ("tensors_vs_trl", "peak live tensor bytes vs TRL", "<= 0.5x", 0.5, "max"),
        ("eval_vs_trl", "eval loss vs TRL", "within 2%", 0.02, "abs"),
    ],
    "short": [
        ("tps_vs_trl", "tokens/s vs TRL", ">= 1.5x", 1.5, "min"),
    ],
}


def peak_gflops(results: dict) -> float:
    """The machine's best measured matmul throughput in this run (any precision, any measurement)."""
    return max(max(m["fp32"], m["bf16"]) for m in results["matmul"])


def small_sections(results: dict) -> list[str]:
    """The report sections of the small config, one per workload ("small", "small-long", ...)."""
    return [k for k, c in results["configs"].items() if c.get("size", k) == "small"]


def workload(results: dict, name: str) -> str:
    return results["configs"][name].get("workload", results["plan"].get("workload", "mixed"))


def mfu(results: dict, size: str, tool: str) -> float:
    c = results["configs"][size]
    return c["tools"][tool]["tokens_per_sec"] * c["flops"]["total"] / (peak_gflops(results) * 1e9)


def rows(results: dict, size: str) -> list[list[str]]:
    c = results["configs"][size]
    lf = c["tools"]["lorafit"]
    out = []
    for tool in TOOLS:
        s = c["tools"][tool]
        ev = c["eval"].get(tool, {}).get("eval_loss")
        out.append([
            LABELS[tool],
            s["precision"] or "?",
            f"{s['tokens_per_sec']:,.0f}",
            f"{s['tokens_per_sec'] / lf['tokens_per_sec']:.2f}x",
            f"{s['tokens_per_sec_best']:,.0f}",
            f"{s['step_sec_median']:.2f}",
            f"{s['peak_rss_mb']:,.0f}",
            f"{ev:.4f}" if ev is not None else "-",
            f"{100 * mfu(results, size, tool):.1f}%",
            f"{s['tokens_per_sec_quiet']:,.0f} ({s['quiet_steps']})" if s.get("tokens_per_sec_quiet") else "- (0)",
            f"{statistics.median(s['background_cores']):.2f}",
        ])  # fmt: skip
    return out


HEAD = ["tool", "precision", "tokens/s (median)", "vs lorafit", "best step tokens/s", "s/step", "peak RSS MB", "eval loss", "MFU",
        "quiet steps: tokens/s (n)", "other load (cores)"]  # fmt: skip


def md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def text_table(head: list[str], body: list[list[str]]) -> str:
    w = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{n}}}" for i, n in enumerate(w))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * n for n in w))] + [fmt.format(*r) for r in body])


def paired(results: dict, size: str, a: str, b: str) -> float:
    """Median over the interleaving cycles of tool a's tokens/s over tool b's in the same cycle."""
    t = results["configs"][size]["tools"]
    return statistics.median(
        x / y for x, y in zip(t[a]["tokens_per_sec_steps"], t[b]["tokens_per_sec_steps"])
    )


def live_tensors(results: dict, size: str, tool: str) -> int | None:
    """Peak live tensor bytes of `tool` on section `size` from the bench.memory run, if there was one."""
    mem = results.get("memory", {}).get(size, {})
    return mem.get(tool, {}).get("tensors", {}).get("peak_bytes")


def ratios(results: dict, size: str) -> dict:
    t = results["configs"][size]["tools"]
    ev = results["configs"][size]["eval"]
    lf, trl, peft = t["lorafit"], t["trl"], t["peft"]
    lt, tt = live_tensors(results, size, "lorafit"), live_tensors(results, size, "trl")
    return {
        "tensors_vs_trl": lt / tt if lt and tt else None,
        "tps_vs_trl": lf["tokens_per_sec"] / trl["tokens_per_sec"],
        "tps_vs_peft": lf["tokens_per_sec"] / peft["tokens_per_sec"],
        "tps_vs_trl_paired": paired(results, size, "lorafit", "trl"),
        "tps_vs_peft_paired": paired(results, size, "lorafit", "peft"),
        "tps_vs_trl_best": lf["tokens_per_sec_best"] / trl["tokens_per_sec_best"],
        "tps_vs_peft_best": lf["tokens_per_sec_best"] / peft["tokens_per_sec_best"],
        "rss_vs_trl": lf["peak_rss_mb"] / trl["peak_rss_mb"],
        "eval_vs_trl": ev["lorafit"]["eval_loss"] / ev["trl"]["eval_loss"] - 1,
        "mfu": mfu(results, size, "lorafit"),
    }


TARGET_HEAD = ["target", "goal", "measured (medians)", "paired per-cycle median", "best steps", "verdict"]


def target_rows(results: dict, size: str) -> list[list[str]]:
    """The targets of the section's workload (`TARGETS`); the verdict uses the medians, the paired and
    best-step columns check their robustness."""
    r = ratios(results, size)
    x = "{:.2f}x".format
    out = []
    for key, label, goal, bound, kind in TARGETS.get(workload(results, size), []):
        v = r[key]
        if v is None:
            out.append([label, goal, "not measured", "", "", "-"])
            continue
        ok = v >= bound if kind == "min" else (v <= bound if kind == "max" else abs(v) <= bound)
        shown = f"{100 * v:+.2f}%" if kind == "abs" else (f"{100 * v:.1f}%" if key == "mfu" else x(v))
        paired = best = ""
        if key in ("tps_vs_trl", "tps_vs_peft"):
            paired, best = x(r[key + "_paired"]), x(r[key + "_best"])
        verdict = "met" if ok else "**not met**"
        if kind == "abs" and v < -bound:
            verdict += " (lorafit's is lower)"
        out.append([label, goal, shown, paired, best, verdict])
    return out


def print_tables(results: dict) -> None:
    print()
    for size in results["configs"]:
        print(f"== {size} ==")
        print(text_table(HEAD, rows(results, size)))
        ev = results["configs"][size]["eval"].get("base model")
        if ev:
            print(f"(base model eval loss {ev['eval_loss']:.4f})")
        print()
    for name in small_sections(results):
        print(f"== targets ({name}) ==")
        print(text_table(TARGET_HEAD, target_rows(results, name)))
        print()


# ----------------------------------------------------------------------------- markdown


def _fmt_mb(x: float) -> str:
    return f"{x:,.0f}"


def render(results: dict) -> str:
    m = results["machine"]
    mm = results["matmul"]
    plan = results["plan"]
    peak = peak_gflops(results)
    L: list[str] = []
    add = L.append
    add("# Benchmarks: lorafit vs TRL + PEFT vs a plain PEFT loop")
    add("")
    add("Produced by one run of")
    add("")
    add(f"    {results['command']}")
    add("")
    add(f"started {results['started']}, took {results['duration_min']:.1f} min. Every number below comes from "
        "that run (raw data: `results.json` in the run's workdir). How to run it: [bench/README.md](bench/README.md).")  # fmt: skip
    add("")
    add("Other benchmarks, each from its own command: several processes (`python -m bench.sharding`, "
        "[BENCHMARKS-sharding.md](BENCHMARKS-sharding.md)) and a 4-bit base (`python -m bench.qlora`, "
        "[BENCHMARKS-qlora.md](BENCHMARKS-qlora.md)), and the accuracy of `lorafit estimate` "
        "(`python -m bench.estimate`, the last section below, added by hand from that command's output).")  # fmt: skip
    add("")
    add("## Machine")
    add("")
    fast = results["precision"] == "bf16"
    bf16_note = (
        "bf16 matmuls run natively, faster than fp32"
        if fast
        else "no AMX / AVX512-BF16 means bf16 matmuls are emulated"
    )
    add(f"- CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['physical_cores']} cores), "
        f"{m['ram_gb']} GB RAM; relevant flags: {', '.join(m['flags']) or 'none'} "
        f"({bf16_note}); torch threads: {mm[0]['threads']}")  # fmt: skip
    meas = "; ".join(
        f"{tag}: fp32 {x['fp32']:.1f}, bf16 {x['bf16']:.2f}" for tag, x in zip(("start", "end"), mm)
    )
    add(f"- measured matmul throughput, GFLOP/s (best shape, best of repeats) -- {meas}. "
        f"Peak used for MFU: **{peak:.1f} GFLOP/s** (the best of these, {'bf16' if fast else 'fp32'}).")  # fmt: skip
    add(f"- best precision on this machine: **{results['precision']}** (bf16 / fp32 matmul speed = "
        f"{mm[0]['bf16'] / mm[0]['fp32']:.3f}); lorafit picks it by itself, the peers are told.")  # fmt: skip
    v = m["versions"]
    add(f"- Python {m['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"trl {v['trl']}, accelerate {v['accelerate']}, datasets {v['datasets']}; lorafit {v['lorafit']} "
        f"at commit {m['lorafit_commit']}")  # fmt: skip
    bg = [x for c in results["configs"].values() for t in c["tools"].values() for x in t["background_cores"]]
    add(f"- the CPU is shared with other work: during the timed steps, other processes kept "
        f"{min(bg):.2f}-{max(bg):.2f} cores busy (per step: all busy CPU time minus the step's own, over its "
        f"wall time; median {statistics.median(bg):.2f}). That is why the tools are interleaved step by step "
        "and figures are medians.")  # fmt: skip
    add("")
    add("## What is compared")
    add("")
    d = results["data"]["data"]
    add(f"- **Work**: Phi-3 architecture (`Phi3ForCausalLM`, stacked qkv / gate_up), configs from "
        f"`lorafit.tiny.SIZES`, vocabulary 32,064, random init, fp32 weights. LoRA r={plan['r']}, "
        f"alpha={plan['alpha']}, dropout 0, on every linear layer of the decoder (`all-linear`: qkv_proj, o_proj, "
        f"gate_up_proj, down_proj; not the output head). AdamW (weight decay 0), lr {plan['lr']:g} with linear "
        "decay to 0 and no warm-up, gradient clipping at 1.0, seed 42.")  # fmt: skip
    add(f"- **Data**: {d['n_train']:,} synthetic multi-turn chat conversations (`bench/data.py`: pseudo-words, "
        f"replies reuse the user's words), {d['min_len']}-{d['max_len']} tokens each (mean {d['mean_len']:.0f}), "
        f"{d['train_tokens']:,} tokens; {100 * d['target_fraction']:.1f}% of tokens are assistant targets. "
        f"Held-out eval set: {d['n_eval']} other conversations. Rows of {plan['seq']} tokens, "
        + ("packed (best-fit decreasing; a longer conversation is cut to a row)" if plan.get("packing", True)
           else "one conversation per row, padded to the batch's longest (no packing)")
        + f", batch {plan['batch']} rows, one micro-batch per optimizer step"
        + (f" (workload `--workload {plan['workload']}`)." if plan.get("workload", "mixed") != "mixed" else "."))  # fmt: skip
    add(f"- **Runs, interleaved step by step**: each tool trains in its own process, the same number of "
        f"optimizer steps ({plan['warmup']} warm-up + timed steps, below). The three processes start together; "
        "after every optimizer step each one stops itself (SIGSTOP, from torch's global optimizer-step hook) and "
        "`bench/run.py` continues them one step at a time, in turn: lorafit, PEFT loop, TRL, lorafit, PEFT loop, "
        "TRL, ... So consecutive steps of the three tools run within seconds of each other, under the same "
        "background load, and no two of them ever compete for the CPU. The warm-up steps run side by side and "
        f"are not timed. {plan['rounds']} round(s) of this.")  # fmt: skip
    add("- **lorafit**: `lorafit.finetune(...)` with packing, assistant-only loss (the reply and its `<|end|>`), "
        "`logging_steps=1` (per-step token counts from its `metrics.jsonl`), no eval or checkpoints during "
        "training, no post-training check (`post_check: false`: its greedy replies are not training), precision "
        "chosen by lorafit itself.")  # fmt: skip
    add(f"- **TRL**: `SFTTrainer` + `peft.LoraConfig`, `SFTConfig(packing=True, packing_strategy='bfd', "
        f"assistant_only_loss=True, max_length={plan['seq']}, activation_checkpointing=False, "
        f"bf16={results['precision'] == 'bf16'}, report_to='none', logging only at the end, "
        "include_num_input_tokens_seen='non_padding')`. The tokenizer's template is the official Phi-3 one, so "
        "TRL swaps in its shipped Phi-3 training template (`trl/chat_templates/phi3_training.jinja`, "
        "`{% generation %}` markers) for the assistant mask; that mask also covers the newline after each "
        "`<|end|>` and the final `<|endoftext|>`, a few more targets than lorafit's. BFD packing makes TRL "
        "padding-free: the batch is one flattened row with restarting `position_ids`. TRL's default "
        "`activation_checkpointing=True` (SFTConfig's `gradient_checkpointing`) is turned off: it only "
        "costs time here, and lorafit does not checkpoint either. Token counts: transformers' own counter, read "
        "by a `TrainerCallback`.")  # fmt: skip
    add("- **plain PEFT loop**: `get_peft_model` + AdamW over lorafit's packed batches (same rows, same order "
        "as lorafit), `model(input_ids, position_ids).logits` (no attention mask, so the attention is "
        "block-diagonal per conversation) and `cross_entropy` on the assistant targets.")  # fmt: skip
    add("")
    add("Definitions, the same for every tool:")
    add("")
    add("- **tokens/s**: input tokens of the step excluding padding, divided by the step's wall time, from the "
        "previous `optimizer.step()` returning to this one returning (the rest of the previous step -- scheduler, "
        "zero_grad, the tool's logging -- then batch fetch and collation, forward, backward, clipping, optimizer; "
        "the time stopped between turns is excluded). Median over all timed steps; \"best step\" is the fastest "
        "one (least disturbed); \"quiet steps\": the median over the steps during which other processes used "
        "less than 0.25 cores, and how many there were. \"Other load\": cores used by other processes during the "
        "tool's timed steps (all busy CPU time minus the tool's), median.")  # fmt: skip
    add("- **peak RSS**: `getrusage(RUSAGE_SELF).ru_maxrss` of the tool's process at its end (model load, "
        "tokenization and training included; the three processes are alive together, each is measured on its "
        "own); median over rounds.")  # fmt: skip
    add("- **eval loss**: the round-1 adapter of every tool, loaded by one evaluator (`bench/evaluate.py`: "
        "transformers + `PeftModel.from_pretrained`, no tool code), token-weighted cross-entropy over the "
        "assistant tokens (reply + `<|end|>`) of the held-out conversations (unpacked, padded batches with an "
        "attention mask). Every tool has trained the same number of steps on ~the same number of tokens.")  # fmt: skip
    add("- **MFU**: model FLOP/s / peak matmul FLOP/s measured above. Model FLOPs per input token "
        "(`bench/flops.py`), LoRA on frozen weights, so no weight gradient for the base:")  # fmt: skip
    add("")
    add("      F = 4*N_lin                      linear: forward 2N + backward to the input 2N")
    add("        + 6*r*(in+out) per projection  LoRA: forward, input grad, A and B grads")
    add("        + 12*L*d*c                     attention: QK^T and PV, forward and backward; c = mean keys")
    add("                                       per query, causal within the token's own conversation")
    add("        + 4*H*V*f                      output head where a loss is taken; f = targets / tokens")
    add("")
    add("  Work beyond this (logits at non-target positions, attention across packed neighbours, recomputation) "
        "is not counted.")  # fmt: skip
    add("")
    for size, c in results["configs"].items():
        f = c["flops"]
        dims = {
            "tiny": "hidden 256, 4 layers, 4 heads, MLP 688",
            "small": "hidden 768, 8 layers, 12 heads, MLP 2048",
        }
        wl = workload(results, size)
        title = {"mixed": "", "long": ", long conversations", "short": ", short chats without packing"}[wl]
        add(
            f"## {size} ({dims.get(c.get('size', size), '')}; {f['params_total'] / 1e6:.1f}M parameters{title})"
        )
        add("")
        if c.get("data_key", "data") != "data":
            add(describe_workload(results, size))
            add("")
        add(f"{c['steps_per_run']} optimizer steps per run ({c['warmup']} warm-up + "
            f"{c['steps_per_run'] - c['warmup']} timed), {plan['rounds']} rounds. Model FLOPs per token: "
            f"{f['total'] / 1e6:.1f}M (linear {f['linear'] / 1e6:.1f}M, LoRA {f['lora'] / 1e6:.2f}M, attention "
            f"{f['attention'] / 1e6:.2f}M, head {f['head'] / 1e6:.1f}M).")  # fmt: skip
        add("")
        add(md_table(HEAD, rows(results, size)))
        add("")
        base = c["eval"].get("base model")
        if base:
            add(f"Eval loss of the base model before training: {base['eval_loss']:.4f} "
                f"({base['targets']:,} target tokens).")  # fmt: skip
            add("")
        p = c.get("trl_precision_probe")
        if p:
            if p.get("failed"):
                what = f"failed ({p['failed']})"
            elif p["capped"]:
                what = (f"did not finish {plan['warmup'] + 1} steps in {p['cap_sec']:.0f} s of training, i.e. more "
                        f"than {p['step_sec_lower_bound']:.1f} s per step")  # fmt: skip
            else:
                what = f"took {p['step_sec']:.2f} s for its timed step"
            add(f"TRL precision probe: TRL in {p['precision']} {what}, vs {p['reference_step_sec']:.2f} s for its fastest step "
                f"in {p['reference_precision']} (above) -> TRL is compared in {p['reference_precision']}.")  # fmt: skip
            add("")
        if c.get("size", size) == "small":
            add(
                f"**Targets ({size})**"
                + (": peak live tensor bytes from the memory runs below." if wl == "long" else "")
            )
            add("")
            add(md_table(TARGET_HEAD, target_rows(results, size)))
            add("")
    if "scaling" in results:
        add(render_scaling(results))
    if "profile" in results:
        add(render_profile(results))
    for name in results.get("profiles", {}):
        add(render_profile(results, name))
    if "memory" in results:
        add(render_memory(results))
    add(render_findings(results))
    return "\n".join(L) + "\n"


def describe_workload(results: dict, name: str) -> str:
    """The data and batching of a section whose workload is not the main one."""
    c = results["configs"][name]
    d = results["data"][c["data_key"]]
    rows = (f"rows of {results['plan']['seq']} tokens, packed (best-fit decreasing; a conversation longer than a "
            "row is cut to the row, by every tool)" if c["packing"] else
            "one conversation per row, padded to the batch's longest, no packing (TRL: `packing=False`)")  # fmt: skip
    return (f"Workload `{c['workload']}`: {d['n_train']:,} synthetic conversations of {d['min_len']}-{d['max_len']} "
            f"tokens (mean {d['mean_len']:.0f}), {d['train_tokens']:,} tokens, {100 * d['target_fraction']:.1f}% "
            f"assistant targets; {d['n_eval']} held-out conversations; {rows}; batch {c['batch']} rows. Everything "
            "else as above.")  # fmt: skip


def render_memory(results: dict) -> str:
    """Live tensor bytes beside the RSS figures, per tool and phase (bench/memory.py runs, small config)."""
    L = ["## Where the memory goes (small config, `bench/memory.py`)", ""]
    L.append("Each tool once more, alone, under torch.profiler with `profile_memory=True` (every allocation and "
             "free of torch's CPU allocator), and /proc/self/status sampled every 50 ms. Peak live tensor bytes is "
             "what a GPU would have to hold; RSS is what the process held (the profiler's buffers add to it here: "
             "the RSS columns of the tables above come from the runs without it). The checkpoint file, mapped by "
             "transformers, counts as one allocation made while loading (404 MiB `load: (outside any aten op)`) "
             "for as long as a weight uses it; lorafit's training releases it once its linears are held in bf16 "
             "(README, \"Memory\"). Phases: `start` (imports), "
             "`tokenize`, `load` (the model), `setup` (LoRA, optimizer), `first step`, `steady` (the other steps), "
             "`save`.")  # fmt: skip
    L.append("")
    for name, mem in results["memory"].items():
        L += [f"### {name}", ""]
        head = ["tool", "peak live tensors MiB", "vs TRL", "in phase", "peak VmRSS MiB", "peak private MiB",
                "malloc free MiB"]  # fmt: skip
        ref = mem.get("trl", {}).get("tensors", {}).get("peak_bytes")
        body = []
        for tool in TOOLS:
            r = mem.get(tool)
            if not r:
                continue
            t = r.get("tensors", {})
            peak = {
                k: max(x[i] for x in r["samples"]) / 2**20
                for i, k in enumerate(["VmRSS", "RssAnon", "RssFile", "HeapFree"], 1)
            }
            body.append([LABELS[tool], f"{t.get('peak_bytes', 0) / 2**20:,.0f}",
                         f"{t['peak_bytes'] / ref:.2f}x" if ref and t.get("peak_bytes") else "-",
                         t.get("peak_phase") or "-", f"{peak['VmRSS']:,.0f}", f"{peak['RssAnon']:,.0f}",
                         f"{peak['HeapFree']:,.0f}"])  # fmt: skip
        L += [md_table(head, body), ""]
        L += ["Timeline, per phase: peak private memory (RssAnon) MiB / peak live tensors MiB.", ""]
        phases = [p for p in PHASES if any(p in phase_summary(r) for r in mem.values())]
        body = []
        for tool in TOOLS:
            r = mem.get(tool)
            if not r:
                continue
            summ, by = phase_summary(r), r.get("tensors", {}).get("peak_by_phase", {})
            body.append([LABELS[tool]] + [
                f"{summ[p]['RssAnon']:,.0f} / {by[p] / 2**20:,.0f}" if p in summ and p in by else
                (f"{summ[p]['RssAnon']:,.0f} / -" if p in summ else "-") for p in phases])  # fmt: skip
        L += [md_table(["tool"] + phases, body), ""]
        for tool in TOOLS:
            top = mem.get(tool, {}).get("tensors", {}).get("top_at_peak") or []
            if top:
                L.append(f"{LABELS[tool]}, alive at its peak (MiB, tensors, phase: allocating op [input shapes]): "
                         + "; ".join(f"{b / 2**20:,.0f} ({n}) `{k}`" for k, b, n in top[:6]))  # fmt: skip
                L.append("")
    return "\n".join(L)


def render_scaling(results: dict) -> str:
    s = results["scaling"]
    L = ["## lorafit scaling (small config)", ""]
    L.append(f"**Sequence length** at a fixed budget of {s['tokens_per_batch']} tokens per batch (rows x length), "
             f"on {results['data']['data_scaling']['n_train']:,} conversations of at most "
             f"{results['data']['data_scaling']['max_len']} tokens (so the same conversations fit every length; "
             f"longer rows pack more of them). The four runs are interleaved step by step; {s['steps_per_run']} "
             "steps each (1 warm-up), median over the timed steps. The last packed rows of an epoch can be short, "
             "so compare tokens/s rather than seconds per step:")  # fmt: skip
    L.append("")
    seqs = {int(k): v for k, v in s["seq"].items()}
    base = seqs.get(512)
    body = []
    for seq, v in sorted(seqs.items()):
        body.append([str(seq), str(v["batch"]), f"{v['tokens_per_sec']:,.0f}", f"{1e6 / v['tokens_per_sec']:,.0f}",
                     f"{base['tokens_per_sec'] / v['tokens_per_sec']:.2f}x" if base else "-",
                     _fmt_mb(v["peak_rss_mb"])])  # fmt: skip
    L.append(md_table(["seq", "rows per batch", "tokens/s", "ms per 1k tokens", "time vs seq 512", "peak RSS MB"],
                      body))  # fmt: skip
    L.append("")
    n1 = results["data"]["data"]["n_train"]
    L.append(f"**Dataset size**: {n1:,} conversations (1x, the main dataset) vs "
             f"{results['data']['data_big']['n_train']:,} (the same generator; its first {n1:,} are the 1x set), "
             "seq 512 x 4 rows, two runs interleaved step by step:")  # fmt: skip
    L.append("")
    body = []
    for name, v in s["data"].items():
        body.append([name.split("_")[1], f"{v['conversations']:,}", f"{v['tokens_per_sec']:,.0f}",
                     _fmt_mb(v["peak_rss_mb"]), _fmt_mb(v["rss_between_steps_mb"])])  # fmt: skip
    L.append(md_table(["data", "conversations", "tokens/s", "peak RSS MB", "RSS between steps MB"], body))
    L.append("")
    return "\n".join(L)


def render_profile(results: dict, name: str = "small") -> str:
    p = results["profile"] if name == "small" else results["profiles"][name]
    L = [f"## Where lorafit's step goes ({name}, torch.profiler)", ""]
    L.append(f"`lorafit.finetune` (unchanged) run under `torch.profiler` with input shapes; {p['steps']} steps after "
             f"the warm-up, {p['wall_ms_per_step']:,.0f} ms per step while profiling (profiler overhead "
             f"included). Outermost aten ops by category (`bench/profile.py`):")  # fmt: skip
    L.append("")
    body = []
    for cat, v in p["categories"].items():
        g = v["matmul_gflops_per_s"]
        body.append([cat, f"{v['forward_ms']:,.0f}", f"{v['backward_ms']:,.0f}", f"{v['total_ms']:,.0f}",
                     f"{100 * v['share']:.1f}%", f"{g:.1f}" if g else "-"])  # fmt: skip
    body.append(["Python / framework (no op running)", "", "", f"{p['python_overhead_ms']:,.0f}",
                 f"{100 * p['python_overhead_share']:.1f}%", "-"])  # fmt: skip
    L.append(md_table(["category", "forward ms", "backward ms", "ms/step", "share", "matmul GFLOP/s"], body))
    L.append("")
    L.append(f"Batch collation (`lorafit.packing.collate`, timed on its own): {p['collate_ms_per_batch']:.1f} ms "
             "per batch.")  # fmt: skip
    L.append("")
    top = ", ".join(f"`{k}` {v:,.0f}" for k, v in list(p["top_ops_ms"].items())[:10])
    L.append(f"Largest outermost ops, ms per step: {top}.")
    L.append("")
    return "\n".join(L)


def why_ratios(results: dict, name: str) -> list[str]:
    """Model vs executed FLOPs per tool on one small section, and the speed-up bound at 100% MFU."""
    from bench.flops import executed_per_token, padded_width

    c = results["configs"][name]
    t = c["tools"]
    f = c["flops"]
    d = results["data"][c.get("data_key", "data")]
    plan = results["plan"]
    batch, packing = c.get("batch", plan["batch"]), c.get("packing", plan.get("packing", True))
    peak = peak_gflops(results) * 1e9
    L = [f"### Why the speed ratios are what they are ({name})", ""]
    ex = {
        tool: executed_per_token(
            "small",
            plan["r"],
            d["target_fraction"],
            d["mean_context"],
            plan["seq"],
            batch,
            tool,
            packing=packing,
            mean_len=d["mean_len"],
            min_len=d["min_len"],
            max_len=d["max_len"],
            lorafit_pads=c.get("lorafit_pads", True),
        )  # fmt: skip
        for tool in TOOLS
    }
    body = []
    for tool in TOOLS:
        e = ex[tool]
        body.append([LABELS[tool], f"{f['total'] / 1e6:.0f}M", f"{e['total'] / 1e6:.0f}M",
                     f"{e['attention'] / 1e6:.0f}M", f"{e['head'] / 1e6:.0f}M",
                     f"{e['total'] / ex['lorafit']['total']:.2f}x",
                     f"{100 * e['total'] * t[tool]['tokens_per_sec_best'] / peak:.0f}%",
                     f"{t['lorafit']['tokens_per_sec'] / t[tool]['tokens_per_sec']:.2f}x / "
                     f"{t['lorafit']['tokens_per_sec_best'] / t[tool]['tokens_per_sec_best']:.2f}x"])  # fmt: skip
    L.append(md_table(["tool", "model FLOPs/token", "executed FLOPs/token (estimate)", "of which attention",
                       "of which head", "executed vs lorafit", "executed FLOP/s / peak, best step",
                       "lorafit speed-up, median / best steps"], body))  # fmt: skip
    L.append("")
    bound = peak / f["total"]
    prec = "bf16" if results["precision"] == "bf16" else "fp32"
    rows = (f"{plan['seq']} tokens for the PEFT loop; TRL's padding-free collator makes the whole batch one row of "
            f"{plan['seq'] * batch}" if packing else
            f"here each row is one conversation padded to the batch's longest, about {padded_width(batch, d['min_len'], d['max_len']):.0f} "
            "tokens, and the layers run on the padding too")  # fmt: skip
    L.append(
        "Executed FLOPs are estimated from each code path (`bench/flops.py: executed_per_token`): masked SDPA "
        f"computes every score of a row ({rows}), while lorafit attends per "
        "conversation with the causal kernel (`lorafit.attention`); the PEFT loop applies the "
        "output head at every position, and TRL's fused CPU head does too and recomputes the logits in backward. "
        f"All three spend most of their time in the same frozen-weight {prec} GEMMs, which run near the machine's peak "
        "whoever calls them, so the speed-up lorafit can show is roughly the ratio of executed FLOPs (plus "
        "TRL's element-wise overheads). "
        f"Even at 100% MFU (the model's FLOPs at the measured peak) lorafit would process {bound:,.0f} tokens/s: "
        f"{bound / t['peft']['tokens_per_sec_best']:.2f}x the PEFT loop's and "
        f"{bound / t['trl']['tokens_per_sec_best']:.2f}x TRL's best (least disturbed) steps"
        f" ({bound / t['peft']['tokens_per_sec']:.2f}x and {bound / t['trl']['tokens_per_sec']:.2f}x their "
        "medians, which background load depressed more). Where that bound is below 2x (PEFT loop) or 4x (TRL), "
        f"no {prec} implementation of the same model work can meet the target on this CPU: the targets assume "
        "peers that lose much more to memory traffic, as on a GPU, than GEMM-bound peers on a CPU do."
    )
    L.append("")
    return L


def render_findings(results: dict) -> str:
    """Why the ratios are what they are, and what the profile says to do next (small config)."""
    from lorafit.tiny import SIZES

    if "small" not in results["configs"]:
        return ""
    L = ["## Findings", ""]
    for name in small_sections(results):
        L += why_ratios(results, name)
    c = results["configs"]["small"]
    t = c["tools"]
    f = c["flops"]
    plan = results["plan"]
    peak = peak_gflops(results) * 1e9
    if "profile" not in results:
        return "\n".join(L)
    p = results["profile"]
    cat = p["categories"]
    tok = statistics.median(p["tokens_per_step"])

    def at_peak(flops_per_token: float) -> float:  # ms per step if run at the measured peak
        return tok * flops_per_token / peak * 1e3

    def share(name: str) -> str:
        return f"{cat[name]['total_ms']:,.0f} ms ({100 * cat[name]['share']:.0f}%)"

    lin, lora_, att, head = cat["linear matmuls"], cat["LoRA matmuls"], cat["attention"], cat["loss head"]
    top = p["top_ops_ms"]
    L += ["### lorafit's step: findings and recommendations", ""]
    L.append(f"From the profile above ({tok:,.0f} tokens per step, peak {peak / 1e9:.1f} GFLOP/s):")
    L.append("")
    L.append(f"1. **Frozen linear GEMMs: {share('linear matmuls')}, at {lin['matmul_gflops_per_s']:.1f} GFLOP/s "
             f"({100 * lin['matmul_gflops_per_s'] * 1e9 / peak:.0f}% of peak).** The model's own work, done at "
             f"close to peak (the required {f['linear'] / 1e6:.0f}M FLOPs/token take {at_peak(f['linear']):,.0f} ms "
             "at peak). Nothing to win here except by doing less: "
             + ("these already run in bf16 from weights held in bf16 (`lorafit.model.hold_frozen_linears_in`), "
                if results["precision"] == "bf16" else
                "precision (bf16 is emulated on this CPU, so fp32 stays right), ")
             + "or fewer layers with LoRA.")  # fmt: skip
    seqs = {int(k): v for k, v in results.get("scaling", {}).get("seq", {}).items()}
    seq_note = ""
    if 512 in seqs and max(seqs) > 512:
        hi = max(seqs)
        seq_note = (f" The sequence-length runs show what is left growing with the row: at seq {hi} a token "
                    f"costs {seqs[512]['tokens_per_sec'] / seqs[hi]['tokens_per_sec']:.2f}x what it costs at 512, "
                    "for the same conversations.")  # fmt: skip
    dims = SIZES["small"]
    dense = 12 * dims["num_hidden_layers"] * dims["hidden_size"] * plan["seq"]  # every score of the row
    L.append(f"2. **Attention: {share('attention')}**, backward {att['backward_ms'] / max(att['forward_ms'], 1):.1f}x "
             f"forward. lorafit already attends per conversation with the causal kernel (`lorafit.attention`): the "
             f"required attention FLOPs would take {at_peak(f['attention']):,.0f} ms at peak, against "
             f"{at_peak(dense):,.0f} ms for every score of {plan['seq']}-token rows through a mask (the peers' "
             f"path).{seq_note} What remains is the CPU flash kernel's efficiency on short pieces; on CUDA, "
             "flash-attention's variable-length kernel does the same split.")  # fmt: skip
    L.append(f"3. **Output head (chunked, targets only): {share('loss head')}**, matmuls included at "
             f"{head['matmul_gflops_per_s']:.1f} GFLOP/s over the whole category. The required head FLOPs take "
             f"{at_peak(f['head']):,.0f} ms at peak; the rest is the soft-max passes over each (chunk x 32,064) "
             f"logits block (`logsumexp` {top.get('aten::logsumexp', 0):,.0f} ms, then subtract, exp, scatter, "
             "copy). Recommendation: fuse them (one pass for max and sum-exp, then write the gradient in place), "
             "and size chunks to stay in cache; about "
             f"{head['total_ms'] - at_peak(f['head']):,.0f} ms per step to win at most.")  # fmt: skip
    L.append(f"4. **LoRA matmuls: {share('LoRA matmuls')} at {lora_['matmul_gflops_per_s']:.1f} GFLOP/s**, "
             f"{lora_['matmul_gflops_per_s'] / lin['matmul_gflops_per_s']:.2f}x the base GEMMs' rate: "
             f"rank-{plan['r']} products are thin and memory-bound (the required "
             f"LoRA FLOPs take {at_peak(f['lora']):,.0f} ms at peak). Recommendation: fuse A into the frozen "
             "projection -- one GEMM of x with [W; A] (out + r columns) in forward, and one of [grad_out, "
             "grad_h] with [W; A] for the input gradient in backward -- so x and grad_out are read once; "
             f"~{lora_['total_ms'] - at_peak(f['lora']):,.0f} ms per step.")  # fmt: skip
    L.append(f"5. **Other ops: {share('other ops')}** (RMSNorm, SiLU x up, RoPE, residual adds, and the "
             f"backward of slicing the stacked qkv / gate_up outputs: `slice_backward` "
             f"{top.get('aten::slice_backward', 0):,.0f} ms, `cat` {top.get('aten::cat', 0):,.0f} ms). The "
             "slices' backward allocates and zero-fills a full-width gradient per slice (transformers' Phi-3 "
             "code); a custom split whose backward writes the three gradients into one buffer would remove it.")  # fmt: skip
    small = cat["optimizer"]["total_ms"] + p["python_overhead_ms"]
    L.append(f"6. **Optimizer, Python and data: {small:,.0f} ms per step "
             f"({100 * small / p['wall_ms_per_step']:.1f}%)**; collating a batch takes "
             f"{p['collate_ms_per_batch']:.1f} ms. No work needed there.")  # fmt: skip
    lf = t["lorafit"]
    weights = f["params_total"] * 4 / 2**20
    in_steps = lf.get("rss_in_steps_mb") or lf["peak_rss_mb"]
    mem = (f"7. **Memory: lorafit's peak RSS is {lf['peak_rss_mb']:,.0f} MB** (TRL {t['trl']['peak_rss_mb']:,.0f} MB, "
           f"PEFT loop {t['peft']['peak_rss_mb']:,.0f} MB): at most {in_steps:,.0f} MB sampled during the timed "
           f"steps, {lf['rss_between_steps_mb']:,.0f} MB right after an optimizer step; the weights as loaded (fp32) are "
           f"{weights:,.0f} MB. So about {in_steps - lf['rss_between_steps_mb']:,.0f} MB is a step's transient: the "
           "activations kept for backward (per token and layer: the norms' inputs and outputs, qkv, the "
           "attention output, gate/up and the SiLU product; bf16 where autocast made them so, else fp32) and the "
           "head's chunk buffers; what stays is the "
           "runtime, weights, gradients, optimizer state and data. Recommendations: recompute "
           "the cheap element-wise activations in backward (RMSNorm, SiLU x up) instead of keeping them, or "
           "checkpoint the MLP only (the most memory per FLOP). Part of the peak is freed memory that glibc's "
           "allocator keeps for reuse (see the README's Memory notes for the trade-off of returning it).")  # fmt: skip
    data = results.get("scaling", {}).get("data")
    if data and len(data) == 2:
        (n1, v1), (n2, v2) = data.items()
        mem += (f" Data size barely matters: {v2['conversations']:,} conversations instead of "
                f"{v1['conversations']:,} add {v2['peak_rss_mb'] - v1['peak_rss_mb']:,.0f} MB of peak RSS, and "
                f"tokens/s stays at {v2['tokens_per_sec'] / v1['tokens_per_sec']:.2f}x.")  # fmt: skip
    L.append(mem)
    L.append("")
    return "\n".join(L)


def phase_summary(res: dict) -> dict[str, dict[str, float]]:
    """Per phase: the largest VmRSS / RssAnon / RssFile sampled (MiB) and its duration."""
    marks = res["marks"]
    out: dict[str, dict[str, float]] = {}
    for k, (t, name) in enumerate(marks):
        if name == "end":
            continue
        t_end = marks[k + 1][0] if k + 1 < len(marks) else float("inf")
        inside = [s for s in res["samples"] if t <= s[0] <= t_end]
        ph = out.setdefault(name, {"sec": 0.0, "cpu": 0.0, **dict.fromkeys(STATUS_KEYS, 0.0)})
        ph["sec"] += max(0.0, min(t_end, res["samples"][-1][0]) - t)
        if "cpu" in res and k + 1 < len(res["cpu"]):
            ph["cpu"] += res["cpu"][k + 1] - res["cpu"][k]
        for i, key in enumerate(STATUS_KEYS, start=1):
            ph[key] = max([ph[key]] + [s[i] / 2**20 for s in inside])
    return out
