"""Tables for the terminal and BENCHMARKS.md, from the results dict of bench.run."""

from __future__ import annotations

import statistics

from bench.run import LABELS, TOOLS

TARGETS = {"tps_vs_trl": 4.0, "tps_vs_peft": 2.0, "rss_vs_trl": 0.5, "eval_vs_trl": 0.02, "mfu": 0.40}


def peak_gflops(results: dict) -> float:
    """The machine's best measured matmul throughput in this run (any precision, any measurement)."""
    return max(max(m["fp32"], m["bf16"]) for m in results["matmul"])


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
            " / ".join(f"{x:,.0f}" for x in s["tokens_per_sec_runs"]),
            f"{statistics.median(s['background_cores']):.2f}",
        ])  # fmt: skip
    return out


HEAD = ["tool", "precision", "tokens/s (median)", "vs lorafit", "best step tokens/s", "s/step", "peak RSS MB", "eval loss", "MFU",
        "tokens/s per round", "other load (cores)"]  # fmt: skip


def md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def text_table(head: list[str], body: list[list[str]]) -> str:
    w = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{n}}}" for i, n in enumerate(w))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * n for n in w))] + [fmt.format(*r) for r in body])


def ratios(results: dict, size: str) -> dict:
    t = results["configs"][size]["tools"]
    ev = results["configs"][size]["eval"]
    lf, trl, peft = t["lorafit"], t["trl"], t["peft"]
    return {
        "tps_vs_trl": lf["tokens_per_sec"] / trl["tokens_per_sec"],
        "tps_vs_peft": lf["tokens_per_sec"] / peft["tokens_per_sec"],
        "tps_vs_trl_best": lf["tokens_per_sec_best"] / trl["tokens_per_sec_best"],
        "tps_vs_peft_best": lf["tokens_per_sec_best"] / peft["tokens_per_sec_best"],
        "rss_vs_trl": lf["peak_rss_mb"] / trl["peak_rss_mb"],
        "eval_vs_trl": ev["lorafit"]["eval_loss"] / ev["trl"]["eval_loss"] - 1,
        "mfu": mfu(results, size, "lorafit"),
    }


def target_rows(results: dict, size: str) -> list[list[str]]:
    r = ratios(results, size)
    ok = {
        "tps_vs_trl": r["tps_vs_trl"] >= TARGETS["tps_vs_trl"],
        "tps_vs_peft": r["tps_vs_peft"] >= TARGETS["tps_vs_peft"],
        "rss_vs_trl": r["rss_vs_trl"] <= TARGETS["rss_vs_trl"],
        "eval_vs_trl": abs(r["eval_vs_trl"]) <= TARGETS["eval_vs_trl"],
        "mfu": r["mfu"] >= TARGETS["mfu"],
    }
    mark = {True: "met", False: "**not met**"}
    return [
        [
            "tokens/s vs TRL",
            ">= 4x",
            f"{r['tps_vs_trl']:.2f}x (best steps: {r['tps_vs_trl_best']:.2f}x)",
            mark[ok["tps_vs_trl"]],
        ],
        [
            "tokens/s vs plain PEFT loop",
            ">= 2x",
            f"{r['tps_vs_peft']:.2f}x (best steps: {r['tps_vs_peft_best']:.2f}x)",
            mark[ok["tps_vs_peft"]],
        ],
        ["peak RSS vs TRL", "<= 0.5x", f"{r['rss_vs_trl']:.2f}x", mark[ok["rss_vs_trl"]]],
        ["eval loss vs TRL", "within 2%", f"{100 * r['eval_vs_trl']:+.2f}%", mark[ok["eval_vs_trl"]]],
        ["MFU", "> 40% (aim)", f"{100 * r['mfu']:.1f}%", mark[ok["mfu"]]],
    ]


def print_tables(results: dict) -> None:
    print()
    for size in results["configs"]:
        print(f"== {size} ==")
        print(text_table(HEAD, rows(results, size)))
        ev = results["configs"][size]["eval"].get("base model")
        if ev:
            print(f"(base model eval loss {ev['eval_loss']:.4f})")
        print()
    if "small" in results["configs"]:
        print("== targets (small) ==")
        print(text_table(["target", "goal", "measured", ""], target_rows(results, "small")))
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
    add("## Machine")
    add("")
    add(f"- CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['physical_cores']} cores), "
        f"{m['ram_gb']} GB RAM; relevant flags: {', '.join(m['flags']) or 'none'} "
        f"(no AMX / AVX512-BF16 means bf16 matmuls are emulated); torch threads: {mm[0]['threads']}")  # fmt: skip
    meas = "; ".join(
        f"{tag}: fp32 {x['fp32']:.1f}, bf16 {x['bf16']:.2f}" for tag, x in zip(("start", "end"), mm)
    )
    add(f"- measured matmul throughput, GFLOP/s (best shape, best of repeats) -- {meas}. "
        f"Peak used for MFU: **{peak:.1f} GFLOP/s** (the best of these, fp32).")  # fmt: skip
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
    add(f"- **Work**: Phi-3 architecture (`Phi3ForCausalLM`, fused qkv / gate_up), configs from "
        f"`lorafit.tiny.SIZES`, vocabulary 32,064, random init, fp32 weights. LoRA r={plan['r']}, "
        f"alpha={plan['alpha']}, dropout 0, on every linear layer of the decoder (`all-linear`: qkv_proj, o_proj, "
        f"gate_up_proj, down_proj; not the output head). AdamW (weight decay 0), lr {plan['lr']:g} with linear "
        "decay to 0 and no warm-up, gradient clipping at 1.0, seed 42.")  # fmt: skip
    add(f"- **Data**: {d['n_train']:,} synthetic multi-turn chat conversations (`bench/data.py`: pseudo-words, "
        f"replies reuse the user's words), {d['min_len']}-{d['max_len']} tokens each (mean {d['mean_len']:.0f}), "
        f"{d['train_tokens']:,} tokens; {100 * d['target_fraction']:.1f}% of tokens are assistant targets. "
        f"Held-out eval set: {d['n_eval']} other conversations. Rows of {plan['seq']} tokens, packed "
        f"(best-fit decreasing), batch {plan['batch']} rows, one micro-batch per optimizer step.")  # fmt: skip
    add(f"- **Runs, interleaved step by step**: each tool trains in its own process, the same number of "
        f"optimizer steps ({plan['warmup']} warm-up + timed steps, below). The three processes start together; "
        "after every optimizer step each one stops itself (SIGSTOP, from torch's global optimizer-step hook) and "
        "`bench/run.py` continues them one step at a time, in turn: lorafit, PEFT loop, TRL, lorafit, PEFT loop, "
        "TRL, ... So consecutive steps of the three tools run within seconds of each other, under the same "
        "background load, and no two of them ever compete for the CPU. The warm-up steps run side by side and "
        f"are not timed. {plan['rounds']} round(s) of this.")  # fmt: skip
    add("- **lorafit**: `lorafit.finetune(...)` with packing, assistant-only loss (the reply and its `<|end|>`), "
        "`logging_steps=1` (per-step token counts from its `metrics.jsonl`), no eval or checkpoints during "
        "training, precision chosen by lorafit itself.")  # fmt: skip
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
        "one (least disturbed); \"per round\" is a round's total tokens / total time. \"Other load\": cores "
        "used by other processes during the tool's timed steps (all busy CPU time minus the tool's), median.")  # fmt: skip
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
        add(f"## {size} ({dims.get(size, '')}; {f['params_total'] / 1e6:.1f}M parameters)")
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
            add(f"TRL precision probe: TRL in {p['precision']} {what}, vs {p['reference_step_sec']:.2f} s per step "
                f"in {p['reference_precision']} (above) -> TRL is compared in {p['reference_precision']}.")  # fmt: skip
            add("")
    if "small" in results["configs"]:
        add("## Targets (small config)")
        add("")
        add(md_table(["target", "goal", "measured", ""], target_rows(results, "small")))
        add("")
    if "scaling" in results:
        add(render_scaling(results))
    if "profile" in results:
        add(render_profile(results))
    return "\n".join(L) + "\n"


def render_scaling(results: dict) -> str:
    s = results["scaling"]
    L = ["## lorafit scaling (small config)", ""]
    L.append(f"**Sequence length** at a fixed budget of {s['tokens_per_batch']} tokens per batch (rows x length), "
             f"on conversations of at most {results['data']['data_short']['max_len']} tokens (so the same "
             f"conversations fit every length; longer rows pack more of them), {s['steps_per_run']} steps "
             f"(1 warm-up), one run each, median over the timed steps:")  # fmt: skip
    L.append("")
    base = s["seq"].get("512") or s["seq"].get(512)
    body = []
    for seq, v in s["seq"].items():
        body.append([str(seq), str(v["batch"]), f"{v['step_sec_median']:.2f}",
                     f"{v['step_sec_median'] / base['step_sec_median']:.2f}x" if base else "-",
                     f"{v['tokens_per_sec']:,.0f}", _fmt_mb(v["peak_rss_mb"])])  # fmt: skip
    L.append(md_table(["seq", "rows", "s/step", "vs 512", "tokens/s", "peak RSS MB"], body))
    L.append("")
    one = results["configs"]["small"]["tools"]["lorafit"] if "small" in results["configs"] else None
    big = s["data_big"]
    L.append(f"**Dataset size**: the main small runs (1x, {results['data']['data']['n_train']:,} conversations) "
             f"vs one run on {big['conversations']:,} conversations (the same generator; its first "
             f"{results['data']['data']['n_train']:,} are the 1x set), same settings:")  # fmt: skip
    L.append("")
    body = []
    if one:
        body.append(["1x", f"{results['data']['data']['n_train']:,}", f"{one['tokens_per_sec']:,.0f}",
                     _fmt_mb(one["peak_rss_mb"]), f"{one['setup_sec']:.1f}"])  # fmt: skip
    body.append([f"{big['conversations'] // results['data']['data']['n_train']}x", f"{big['conversations']:,}",
                 f"{big['tokens_per_sec']:,.0f}", _fmt_mb(big["peak_rss_mb"]), f"{big['setup_sec']:.1f}"])  # fmt: skip
    L.append(
        md_table(
            ["data", "conversations", "tokens/s", "peak RSS MB", "setup s (load, tokenize, model)"], body
        )
    )
    L.append("")
    return "\n".join(L)


def render_profile(results: dict) -> str:
    p = results["profile"]
    L = ["## Where lorafit's step goes (small config, torch.profiler)", ""]
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
