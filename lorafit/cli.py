"""The `lorafit` command line. Thin: each subcommand parses flags and calls one public function.

    lorafit train --model M --data TRAIN.jsonl [--eval-data EVAL.jsonl] [--output-dir OUT] [--adapter DIR]
                  [--config run.yaml] [--set section.key=value ...] [--resume [PATH]] [--overwrite]
    lorafit estimate [the arguments of train] [--nproc N] [--json] [--probe [STEPS]] [--free-memory SIZE]
                     (will it fit? memory per device, steps, tokens; weights are not loaded unless --probe)
    lorafit check-data --model M --data FILE [--max-seq-length N] [--train-on assistant|all] [--json]
                       [--no-color]    (trained tokens in [[...]]; coloured on a terminal)
    lorafit eval [--model M] [--adapter A] --data FILE          prints JSON
                 (eval, generate, chat: --model defaults to the adapter's recorded base model;
                  [--quantization nf4|fp4|int8] for a QLoRA adapter's base)
    lorafit generate [--model M] [--adapter A] --prompt TEXT [--system TEXT] [--max-new-tokens N]
    lorafit chat [--model M] [--adapter A] [--system TEXT]
                 (eval, generate, chat: [--system-message auto|fold|drop|error], default: what the adapter
                  records, i.e. what training did with system messages)
    lorafit tiny-model OUT [--size demo|tiny|small|medium]
    lorafit demo [--output-dir OUT]
    lorafit fuse [--model BASE] --adapter A --output-dir OUT [--dtype auto|bf16|fp16|fp32]
                 [--quantization nf4|fp4|int8] [--base-weights dequantized|original]
                 [--format hf|gguf] [--gguf-type f32|f16|bf16|q8_0]
                 (writes the merged model; `lorafit merge` is the same command)
    lorafit export --adapter A --output-dir OUT [--layout stacked|split|loralib|gguf] [--base-model M]
                   [--gguf-type f32|f16|bf16]
    lorafit check-adapter [--model M] --adapter A --data EVAL [--sample N] [--max-runaway F] ... [--json]

Exit status: 0 success; 2 bad input or a failed run, with a one-paragraph message on stderr (no
traceback) -- data errors list every bad record with its file:line, and nothing was written;
1 from `check-adapter` (and `demo`) when a check failed;
3 `estimate`: the run would not fit in the free memory (what to change is printed);
130 stopped by Ctrl-C/SIGTERM (`train` saves a checkpoint first: continue with --resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings

# lorafit's own modules are imported inside each command (an entry point): `lorafit --help` stays fast.


def _finite(value):
    """`value` with every NaN or infinite float replaced by None, so that it is standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps_json(value) -> str:
    """What lorafit prints as JSON: standard JSON (RFC 8259), a NaN or infinite number printed as null."""
    return json.dumps(_finite(value), indent=2, allow_nan=False)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _one_line_warnings() -> None:
    def fmt(message, category, filename, lineno, line=None):
        return f"warning: {message}\n"

    warnings.formatwarning = fmt


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    what = "base model: hub id, local folder or .gguf file"
    if not required:
        what += " (default: the base model recorded in the adapter, adapter_config.json's base_model_name_or_path)"
    p.add_argument("--model", required=required, help=what)
    p.add_argument("--adapter", help="adapter folder (PEFT format, stacked or split keys), a loralib .pt file, or "
                   "the folder `lorafit export --layout loralib` writes; without it the base model alone runs")  # fmt: skip
    _loralib_args(p)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--quantization", default="none", choices=["none", "nf4", "fp4", "int8"],
                   help="load the base quantized (bitsandbytes), as a QLoRA adapter was trained")  # fmt: skip
    p.add_argument("--system-message", default=None, choices=["auto", "fold", "drop", "error"],
                   help="what to do with a system message the chat template does not render (data.system_message; "
                   "default: what the adapter records, else auto)")  # fmt: skip


def _loralib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora-alpha", type=float,
                   help="lora_alpha of a bare loralib .pt checkpoint (it does not record it)")  # fmt: skip
    p.add_argument("--target-modules", nargs="+", metavar="NAME",
                   help="which stacked pieces a bare loralib checkpoint adapts, e.g. q_proj v_proj")  # fmt: skip


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """`lorafit train --nproc N ...` = `torchrun --standalone --nproc_per_node N -m lorafit train ...`,
    run in this process; its exit status is the first failed rank's."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    cmd = ["--standalone", f"--nproc_per_node={nproc}", "-m", "lorafit", *rest]
    print("launching: torchrun " + " ".join(cmd), file=sys.stderr)
    # The ranks print their own errors; torchrun's agent would add a traceback and exit 1 over them.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(cmd))
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c > 0), 1)  # a rank's own status (2: bad input); killed: 1
    return 0


def cmd_train(a) -> int:
    from lorafit import distributed
    from lorafit.api import finetune

    if a.nproc and a.nproc > 1 and not distributed.launched_by_torchrun():
        return launch_torchrun(a.nproc, a.argv)
    clean = False
    try:
        res = finetune(
            model=a.model, train_data=a.data, eval_data=a.eval_data, output_dir=a.output_dir, config=a.config,
            overrides=a.set or [], resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress,
            adapter=a.adapter,
            source="command line",
        )  # fmt: skip
        clean = True
    finally:
        distributed.shutdown(clean)
    if res.get("stopped"):
        return 130
    if "output_dir" not in res:  # ranks other than 0 print nothing
        return 0
    shown = {k: v for k, v in res.items() if k in ("train_loss", "eval_loss_before", "eval_loss", "eval_perplexity",
                                                 "steps", "tokens", "runtime_sec", "tokens_per_sec", "output_dir")}  # fmt: skip
    if res.get("checks"):
        shown["check"] = res["checks"]["verdict_line"]
    print(dumps_json(shown))
    return 0


def cmd_estimate(a) -> int:
    from lorafit.api import estimate

    plan = estimate(
        model=a.model, train_data=a.data, eval_data=a.eval_data, output_dir=a.output_dir, config=a.config,
        overrides=a.set or [], adapter=a.adapter, processes=a.nproc, free_memory=a.free_memory, probe=a.probe,
        source="command line",
    )  # fmt: skip
    print(dumps_json(plan.to_dict()) if a.json else plan.report())
    return 3 if plan.fits is False else 0


def byte_size(text: str) -> int:
    """An argparse type: a number of bytes, e.g. 24GiB, 80GB, 512MiB, 1e9."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
             "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # fmt: skip
    t = text.strip().lower()
    number = t.rstrip("kmgtib")
    try:
        value = float(number) * units[t[len(number) :].strip()]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; write e.g. 24GiB, 80GB or 512MiB"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return int(value)


def cmd_check_data(a) -> int:
    import os

    from lorafit.check import check_data, format_report

    report = check_data(
        a.model, a.data, max_seq_length=a.max_seq_length, train_on=a.train_on, truncation=not a.no_truncation,
        example=a.example, system_message=a.system_message,
    )  # fmt: skip
    if a.json:
        print(dumps_json(report))
    else:
        print(format_report(report, color=use_color(sys.stdout, a.no_color, os.environ)))
    return 0


def use_color(stream, no_color: bool, environ) -> bool:
    """Colour only on a terminal, and not with --no-color or a non-empty NO_COLOR (no-color.org)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not no_color and not environ.get("NO_COLOR")


def cmd_eval(a) -> int:
    from lorafit.api import evaluate

    res = evaluate(
        a.model, a.data, a.adapter, max_seq_length=a.max_seq_length, batch_size=a.batch_size, dtype=a.dtype,
        device=a.device, quantization=a.quantization, lora_alpha=a.lora_alpha, target_modules=a.target_modules,
        system_message=a.system_message,
    )  # fmt: skip
    print(dumps_json(res))
    return 0


def system_message_policy(a) -> str:
    """--system-message, else the policy the adapter was trained with ("auto" without an adapter)."""
    from lorafit.adapters import recorded_system_message

    return a.system_message or (recorded_system_message(a.adapter) if a.adapter else "auto")


def cmd_generate(a) -> int:
    from lorafit.generation import generate, load

    model, tok = load(a.model, a.adapter, dtype=a.dtype, device=a.device, quantization=a.quantization,
                      lora_alpha=a.lora_alpha, target_modules=a.target_modules)  # fmt: skip
    print(
        generate(
            model, tok, a.prompt, system=a.system, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
            system_message=system_message_policy(a),
        )
    )  # fmt: skip
    return 0


def cmd_chat(a) -> int:
    from lorafit.generation import chat, load

    model, tok = load(a.model, a.adapter, dtype=a.dtype, device=a.device, quantization=a.quantization,
                      lora_alpha=a.lora_alpha, target_modules=a.target_modules)  # fmt: skip
    chat(model, tok, system=a.system, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
         system_message=system_message_policy(a))  # fmt: skip
    return 0


def cmd_check_adapter(a) -> int:
    from lorafit.adapter_check import THRESHOLD_NAMES, format_report
    from lorafit.api import check_adapter
    from lorafit.errors import AdapterError

    if not a.adapter:
        raise AdapterError(
            "check-adapter needs --adapter A (an adapter folder or a training run's output folder)"
        )
    report = check_adapter(
        a.model, a.adapter, a.data, dtype=a.dtype, device=a.device, quantization=a.quantization,
        lora_alpha=a.lora_alpha, target_modules=a.target_modules, system_message=a.system_message,
        max_seq_length=a.max_seq_length, batch_size=a.batch_size, **{k: getattr(a, k) for k in THRESHOLD_NAMES},
    )  # fmt: skip
    print(dumps_json(report) if a.json else format_report(report))
    return 0 if report["verdict"] == "PASS" else 1


def cmd_tiny_model(a) -> int:
    from lorafit.tiny import write_tiny_model

    out = write_tiny_model(a.out, size=a.size, vocab_size=a.vocab_size, seed=a.seed)
    print(f"wrote a tiny Phi-3 ({a.size}) model and tokenizer to {out}")
    return 0


def cmd_demo(a) -> int:
    from lorafit.demo import run_demo

    res = run_demo(a.output_dir, progress=not a.no_progress)
    return 0 if res["accuracy_after"] >= 0.8 and res["check"] != "FAIL" else 1


def cmd_fuse(a) -> int:
    from lorafit.export import fuse

    out = fuse(
        a.model, a.adapter, a.output_dir, a.dtype, overwrite=a.overwrite, quantization=a.quantization,
        base_weights=a.base_weights, lora_alpha=a.lora_alpha, target_modules=a.target_modules,
        format=a.format, gguf_type=a.gguf_type or "f16",
    )  # fmt: skip
    print(f"wrote the merged model to {out / 'model.gguf' if a.format == 'gguf' else out}")
    report = out / "quantization_error.json"
    if report.is_file():
        s = json.loads(report.read_text())["summary"]
        print(
            f"quantized base: relative weight error {s['relative_error_overall']:.4f} overall, "
            f"max {s['relative_error_max']:.4f} ({s['worst_layer']}); per layer in {report}"
        )
    return 0


def cmd_export(a) -> int:
    from lorafit.export import LAYOUT_ALIASES, export_adapter

    out = export_adapter(
        a.adapter, a.output_dir, a.layout, a.base_model, lora_alpha=a.lora_alpha,
        target_modules=a.target_modules, overwrite=a.overwrite, gguf_type=a.gguf_type or "f32",
    )  # fmt: skip
    where = out / "adapter.gguf" if a.layout == "gguf" else out
    print(f"wrote the {LAYOUT_ALIASES.get(a.layout, a.layout)} adapter to {where}")
    return 0


def _train_args(
    t: argparse.ArgumentParser,
    nproc_help: str = "train on N processes: launches torchrun --standalone --nproc_per_node N",
) -> None:
    """The arguments of `train`, which `estimate` takes too."""
    t.add_argument("--model", help="base model: hub id, local folder or .gguf file (model.name_or_path)")
    t.add_argument("--data", help="training data: .jsonl/.json/.parquet or a datasets hub id (data.train)")
    t.add_argument("--eval-data", help="evaluation data (data.eval)")
    t.add_argument(
        "--output-dir", help="where the adapter, checkpoints and metrics go (training_config.output_dir)"
    )
    t.add_argument("--adapter", metavar="DIR",
                   help="train this adapter further (PEFT or lorafit folder, or loralib export; model.adapter): "
                   "its LoRA shape is used, the optimizer starts fresh")  # fmt: skip
    t.add_argument("--config", help="YAML or JSON run config with model, data, training_config, peft_config")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set training_config.learning_rate=1e-4 (repeatable)")  # fmt: skip
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from the newest checkpoint in the output directory (from the start if there is "
                   "none yet), or from the checkpoint folder PATH")  # fmt: skip
    t.add_argument("--overwrite", action="store_true", help="replace a previous run in the output directory")
    t.add_argument("--nproc", type=int, default=None, metavar="N", help=nproc_help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorafit", description="LoRA fine-tuning for Phi-3 and other causal LMs."
    )
    p.add_argument("--version", action="version", version=f"lorafit {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model with LoRA on chat data")
    _train_args(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    t.set_defaults(func=cmd_train)

    es = sub.add_parser(
        "estimate", help="will it fit? memory per device, steps and tokens of a `train` run, without loading weights",
        description="The same arguments as `train`: the memory per device of that run (base weights, LoRA, "
        "gradients, AdamW, activations, loss head, runtime), from the model's config alone and the data's token "
        "counts, checked against the free memory, with what to change when it does not fit. Exit status 0 when "
        "it fits (or the free memory is unknown), 3 when it does not, 2 on bad input.",
    )  # fmt: skip
    _train_args(es, nproc_help="plan for N processes (torchrun); with training_config.fsdp, per-rank figures")
    es.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    es.add_argument("--probe", type=positive_int, nargs="?", const=3, default=0, metavar="STEPS",
                    help="also train STEPS steps (default 3) on the real model and estimate the run's time")  # fmt: skip
    es.add_argument("--free-memory", type=byte_size, metavar="SIZE",
                    help="check against SIZE free (e.g. 24GiB, 80GB) instead of this device's free memory")  # fmt: skip
    es.set_defaults(func=cmd_estimate)

    cd = sub.add_parser(
        "check-data",
        help="validate a dataset and show token statistics and the trained tokens, without training",
        description="Validate a dataset with the model's tokenizer (no weights load) and show token statistics "
        "and one conversation with its trained tokens marked: in [[...]] when the output is not a terminal "
        "(a pipe or a file), with --no-color, or when NO_COLOR is set; coloured (bold green) on a terminal. "
        "Exit status 2 when the data is invalid or no example would train.",
    )  # fmt: skip
    cd.add_argument(
        "--model", required=True, help="model (or tokenizer) folder or hub id; only the tokenizer loads"
    )
    cd.add_argument("--data", required=True, help="chat data: .jsonl/.json/.parquet or a datasets hub id")
    cd.add_argument("--max-seq-length", type=int, default=2048, help="training_config.max_seq_length")
    cd.add_argument("--train-on", default="assistant", choices=["assistant", "all"], help="data.train_on")
    cd.add_argument("--system-message", default="auto", choices=["auto", "fold", "drop", "error"],
                    help="data.system_message: what to do with a system message the chat template does not render")  # fmt: skip
    cd.add_argument("--no-truncation", action="store_true",
                    help="an over-long conversation is an error (data.truncation=false)")  # fmt: skip
    cd.add_argument("--example", type=int, default=0, help="which conversation to show (0-based)")
    cd.add_argument("--json", action="store_true", help="print the statistics as JSON")
    cd.add_argument("--no-color", action="store_true",
                    help="mark the trained tokens with [[...]] even on a terminal (also: NO_COLOR=1)")  # fmt: skip
    cd.set_defaults(func=cmd_check_data)

    e = sub.add_parser(
        "eval", help="eval loss and perplexity of base (+ adapter) on a data file; prints JSON"
    )
    _model_args(e, required=False)
    e.add_argument("--data", required=True, help="chat data file to evaluate on")
    e.add_argument("--max-seq-length", type=int, default=2048)
    e.add_argument("--batch-size", type=int, default=4)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="reply to one prompt with base (+ adapter)")
    _model_args(g, required=False)
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", help="optional system message")
    g.add_argument("--max-new-tokens", type=positive_int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with base (+ adapter)")
    _model_args(c, required=False)
    c.add_argument("--system", help="optional system message")
    c.add_argument("--max-new-tokens", type=positive_int, default=512)
    c.add_argument("--temperature", type=float, default=0.0)
    c.set_defaults(func=cmd_chat)

    ca = sub.add_parser(
        "check-adapter", help="check a trained adapter: replies that stop, merged == unmerged, reload gives the eval loss",
        description="Greedy replies of base + adapter to held-out prompts (the eval conversations up to their last "
        "assistant turn): how many run to the token limit without the end-of-turn token, are empty or repeat "
        "themselves; the merged model's logits against base + adapter; the adapter reloaded from disk against "
        "training's eval loss (results.json of a training run's folder). `lorafit train` runs the same checks at "
        "its end (training_config.post_check). Exit status: 0 all checks pass, 1 a check failed, 2 bad input.",
    )  # fmt: skip
    _model_args(ca, required=False)
    ca.add_argument("--data", required=True, help="held-out chat data (the run's eval data)")
    ca.add_argument("--max-seq-length", type=positive_int, default=None,
                    help="for the eval loss (default: the run's config.yaml, else 2048)")  # fmt: skip
    ca.add_argument(
        "--batch-size", type=positive_int, default=None, help="eval batch size (default: the run's)"
    )
    ca.add_argument("--sample", type=positive_int, default=8, help="held-out prompts to reply to (default 8)")
    ca.add_argument("--max-new-tokens", type=positive_int, default=None,
                    help="the reply limit (default: 2 x the longest reference reply, within 32..1024)")  # fmt: skip
    ca.add_argument("--max-runaway", type=float, default=0.125, metavar="SHARE",
                    help="largest share of replies that may run to the limit (default 0.125: 1 in 8)")  # fmt: skip
    ca.add_argument("--max-empty", type=float, default=0.125, metavar="SHARE",
                    help="largest share of empty replies (default 0.125)")  # fmt: skip
    ca.add_argument("--max-repetitive", type=float, default=0.125, metavar="SHARE",
                    help="largest share of repetitive replies (default 0.125)")  # fmt: skip
    ca.add_argument("--repeat-ratio", type=float, default=0.5, metavar="SHARE",
                    help="a reply is repetitive above this share of repeated token 4-grams (default 0.5)")  # fmt: skip
    ca.add_argument("--merge-tolerance", type=float, default=None, metavar="REL",
                    help="max |merged - unmerged logit| / max |logit| (default 1e-3 fp32 weights, 5e-2 bf16/fp16)")  # fmt: skip
    ca.add_argument("--loss-tolerance", type=float, default=0.01, metavar="REL",
                    help="relative difference of the reloaded eval loss from training's (default 0.01)")  # fmt: skip
    ca.add_argument("--json", action="store_true", help="print the report as JSON")
    ca.set_defaults(func=cmd_check_adapter)

    tm = sub.add_parser(
        "tiny-model", help="write a small random Phi-3 model + tokenizer for tests and smoke runs"
    )
    tm.add_argument("out", help="output folder")
    tm.add_argument("--size", default="demo", choices=["demo", "tiny", "small", "medium"])
    tm.add_argument("--vocab-size", type=int, default=None, help="embedding rows (default: tokenizer size)")
    tm.add_argument("--seed", type=int, default=0)
    tm.set_defaults(func=cmd_tiny_model)

    d = sub.add_parser(
        "demo", help="offline end-to-end demo: tiny Phi-3, shipped chat data, before/after answers"
    )
    d.add_argument("--output-dir", default="lorafit-demo")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    mg = sub.add_parser(
        "fuse", aliases=["merge"],
        help="merge an adapter into the base weights and write a plain Hugging Face model folder",
        description="Write base + adapter as one model (safetensors, config, tokenizer, generation_config) that "
        "transformers, vLLM and TGI load without lorafit. The delta is computed in fp32 and rounded once. "
        "`lorafit merge` is the same command (fuse is mlx-lm's name for it).",
    )  # fmt: skip
    mg.add_argument(
        "--model",
        help="base model: hub id, local folder or .gguf file (default: the adapter's recorded base)",
    )
    mg.add_argument("--adapter", required=True,
                    help="adapter folder (stacked or split keys), loralib .pt file or loralib export folder")  # fmt: skip
    _loralib_args(mg)
    mg.add_argument("--output-dir", required=True, help="folder for the merged model")
    mg.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="dtype of the merged weights (auto: the base checkpoint's)")  # fmt: skip
    mg.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    mg.add_argument(
        "--quantization",
        default=None,
        choices=["none", "nf4", "fp4", "int8"],
        help="how the base was quantized in training (default: what the adapter records)",
    )
    mg.add_argument("--base-weights", default="dequantized", choices=["dequantized", "original"],
                    help="QLoRA: merge into the dequantized base the adapter was trained on (default; "
                    "written in bf16), or into the original unquantized weights")  # fmt: skip
    mg.add_argument("--format", default="hf", choices=["hf", "gguf"],
                    help="hf: a Hugging Face model folder (default); gguf: OUT/model.gguf for llama.cpp and Ollama")  # fmt: skip
    mg.add_argument("--gguf-type", choices=["f32", "f16", "bf16", "q8_0"],
                    help="weight type of model.gguf (default f16)")  # fmt: skip
    mg.set_defaults(func=cmd_fuse)

    x = sub.add_parser(
        "export", help="convert an adapter: stacked or split PEFT keys, or a loralib checkpoint",
        description="stacked: PEFT keys on qkv_proj/gate_up_proj (PEFT on Phi-3). split: q_proj/k_proj/v_proj/"
        "gate_proj/up_proj keys, for runtimes that load Phi-3 as Llama (vLLM). loralib: OUT/adapter_lora.pt with "
        "lora_state_dict keys. --adapter may also be a loralib .pt file (then --base-model is needed).",
    )  # fmt: skip
    x.add_argument("--adapter", required=True,
                   help="adapter folder, a loralib lora_state_dict .pt file, or a loralib export folder")  # fmt: skip
    x.add_argument("--output-dir", required=True, help="folder for the converted adapter")
    x.add_argument("--layout", default="stacked", choices=["stacked", "split", "loralib", "gguf", "fused"],
                   help="stacked (default), split, loralib, or gguf (OUT/adapter.gguf, a llama.cpp/Ollama LoRA "
                   "adapter); fused: the old name of stacked, still accepted")  # fmt: skip
    x.add_argument(
        "--gguf-type", choices=["f32", "f16", "bf16"], help="tensor type of adapter.gguf (default f32)"
    )
    x.add_argument("--base-model", help="base model folder or hub id (default: the adapter's recorded base)")
    x.add_argument(
        "--lora-alpha", type=float, help="lora_alpha of a loralib checkpoint (it does not record it)"
    )
    x.add_argument("--target-modules", nargs="+", metavar="NAME",
                   help="which stacked pieces a loralib checkpoint adapts, e.g. q_proj v_proj")  # fmt: skip
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    x.set_defaults(func=cmd_export)
    return p


def _version() -> str:
    from lorafit import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    from lorafit.errors import LorafitError
    from lorafit.lora import LoraError

    _one_line_warnings()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (LorafitError, LoraError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk in a command without its own message (train has one)
        from lorafit.checkpoint import is_disk_full

        if not is_disk_full(e):
            raise
        print(
            f"error: no space left on device ({e}); the output was not written (lorafit writes under a temporary "
            "name, removed on failure). Fix: free disk space, or choose an --output-dir on another disk, and run "
            "the command again.",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
