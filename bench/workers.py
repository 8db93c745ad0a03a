"""One training run of one tool, in its own process: `python -m bench.workers SPEC.json`.

SPEC is a JSON object written by bench.run (tool, model, data, hyperparameters, out, result). The
worker trains, saves the adapter (PEFT format) to `out`, and writes `result`. Optional keys:
"packing" (default true; false = one conversation per row, padded to the batch's longest),
"quantization" ("none" or "nf4": the base's linear layers in 4 bits, lorafit's model.quantization
or, for the PEFT loop, transformers' BitsAndBytesConfig + PEFT's prepare_model_for_kbit_training),
"model_dtype" (lorafit's model.dtype, default auto), "return_freed_memory" (lorafit's training_config
key, default false). Result:

    step_end     perf_counter time at the end of every optimizer step
    step_resume  perf_counter time the step after it started (see pacing)
    step_tokens  non-pad input tokens of every step
    peak_rss_mb  the process's peak resident set size (getrusage ru_maxrss)

Step boundaries come from torch's global optimizer hook (`register_optimizer_step_post_hook`),
which fires after every `optimizer.step()` whoever calls it, so the three tools are timed the same
way without touching their code. Step k's time is step_end[k] - step_resume[k-1]: the rest of step
k-1 (scheduler, zero_grad, the tool's logging) and all of step k (fetching and collating the batch,
forward, backward, clipping, optimizer).

Pacing (SPEC "pause": true): after each optimizer step the worker stops itself (SIGSTOP) until
bench.run continues it (SIGCONT). bench.run uses that to run the tools' steps one at a time, in
turn (A, B, C, A, B, C, ...), so that every tool meets the same background load; the stopped time is
in no step's time.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path


class Pacer:
    """Records optimizer-step boundaries; with `pause`, stops the process after each step."""

    def __init__(self, progress: str | None, pause: bool):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.progress, self.pause = progress, pause
        self.ends: list[float] = []
        self.resumes: list[float] = []
        self.rss: list[float] = []  # resident set size after each step
        self.t0 = time.perf_counter()
        register_optimizer_step_post_hook(self._hook)

    def note(self, event: str, t: float) -> None:
        if self.progress:
            with open(self.progress, "a") as f:
                f.write(json.dumps({"event": event, "time": time.time(), "perf": t}) + "\n")

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.note("train_begin", self.t0)

    def _hook(self, optimizer, args, kwargs) -> None:
        t = time.perf_counter()
        self.ends.append(t)
        self.rss.append(current_rss_mb())
        self.note("step", t)
        if self.pause:
            os.kill(os.getpid(), signal.SIGSTOP)  # bench.run sends SIGCONT when it is this tool's turn
        self.resumes.append(time.perf_counter())

    def result(self) -> dict:
        return {
            "step_end": self.ends,
            "step_resume": self.resumes,
            "t_train_start": self.t0,
            "step_rss_mb": self.rss,
        }


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- lorafit


def run_lorafit(spec: dict, pacer: Pacer) -> dict:
    """lorafit.finetune with packing; per-step tokens from its own metrics.jsonl (logging_steps=1)."""
    import lorafit

    out = Path(spec["out"])
    quantization = spec.get("quantization", "none")
    overrides = [f"model.quantization={quantization}"]
    if spec.get("model_dtype"):
        overrides.append(f"model.dtype={spec['model_dtype']}")
    pacer.start()  # finetune also loads and tokenizes; the first step (warm-up) absorbs that
    res = lorafit.finetune(
        model=spec["model"],
        train_data=spec["train"],
        training_config={
            "max_steps": spec["steps"],
            "per_device_train_batch_size": spec["batch"],
            "max_seq_length": spec["seq"],
            "packing": spec.get("packing", True),
            "learning_rate": spec["lr"],
            "lr_scheduler_type": "linear",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "logging_steps": 1,
            "save_strategy": "no",
            "eval_strategy": "no",
            "seed": spec["seed"],
            "bf16": None,  # auto: lorafit picks bf16 only where the device runs it fast
            "output_dir": str(out),
            "return_freed_memory": spec.get("return_freed_memory", False),
            "post_check": False,  # greedy replies after training: not part of the training compared here
        },
        peft_config={
            "r": spec["r"],
            "lora_alpha": spec["alpha"],
            "lora_dropout": 0.0,
            "target_modules": "all-linear",
        },
        overrides=overrides,
        overwrite=True,
        progress=False,
    )
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "tokens" in r and "loss" in r]
    if [r["step"] for r in steps] != list(range(1, spec["steps"] + 1)):
        raise RuntimeError("lorafit's metrics.jsonl has no per-step record; it is needed for step tokens")
    tokens = [b["tokens"] - a for a, b in zip([0] + [r["tokens"] for r in steps[:-1]], steps)]
    return {
        "step_tokens": tokens,
        "losses": [r["loss"] for r in steps],
        "precision": res.get("precision"),
        "lorafit_tokens_per_sec": res.get("tokens_per_sec"),
    }


# ----------------------------------------------------------------------------- plain PEFT loop


def run_peft_loop(spec: dict, pacer: Pacer) -> dict:
    """The honest simple loop: PEFT model, AdamW, lorafit's packed batches, logits + cross-entropy."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.data import load_conversations
    from lorafit.packing import Batches, collate, pack, single_rows
    from lorafit.tokens import tokenize

    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    convs = load_conversations(spec["train"])
    data, _ = tokenize(tok, convs, max_seq_length=spec["seq"], end_of_turn="<|end|>")
    rows = pack(data, spec["seq"]) if spec.get("packing", True) else single_rows(data)
    batches = Batches(rows, spec["batch"], seed=spec["seed"]).epoch_batches(0)
    if spec.get("quantization", "none") != "none":  # the usual PEFT QLoRA recipe
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec["quantization"],
                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16, quantization_config=bnb,
                                                     device_map={"": "cpu"})  # fmt: skip
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.config.use_cache = False
    cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules="all-linear",
                     task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    total = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    use_bf16 = spec["precision"] == "bf16"
    tokens, losses = [], []
    pacer.start()
    for step in range(total):
        rows_b = batches[step % len(batches)]
        b = collate(data, rows_b, tok.pad_token_id)
        n = b.pop("num_targets")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), b["labels"].view(-1), ignore_index=-100, reduction="sum"
        ) / max(n, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        tokens.append(sum(int(data.lengths[i]) for row in rows_b for i in row))
    model.save_pretrained(spec["out"])
    return {"step_tokens": tokens, "losses": losses, "precision": spec["precision"]}


# ----------------------------------------------------------------------------- TRL


def run_trl(spec: dict, pacer: Pacer) -> dict:
    """TRL SFTTrainer + PEFT LoraConfig: BFD packing, assistant-only loss (TRL's Phi-3 training template)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bench.data import read_jsonl

    class TokenCount(TrainerCallback):
        """Non-pad input tokens after every step (transformers' own counter); starts the pacer's clock."""

        def __init__(self):
            self.seen = []

        def on_train_begin(self, args, state, control, **kw):
            pacer.start()

        def on_step_end(self, args, state, control, **kw):
            self.seen.append(int(state.num_input_tokens_seen))

    tok = AutoTokenizer.from_pretrained(spec["model"])
    train = Dataset.from_list(read_jsonl(spec["train"]))
    bf16 = spec["precision"] == "bf16"
    args = SFTConfig(
        output_dir=spec["out"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=spec["seq"],
        packing=spec.get("packing", True),
        packing_strategy="bfd",
        assistant_only_loss=True,
        activation_checkpointing=spec.get("activation_checkpointing", False),  # transformers 5 name
        bf16=bf16,
        fp16=False,
        use_cpu=True,  # transformers refuses bf16 on a CPU-only machine without it
        model_init_kwargs={"dtype": "float32"},
        seed=spec["seed"],
        report_to="none",
        logging_strategy="steps",
        logging_steps=max(1, spec["steps"]),
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )
    clock = TokenCount()
    peft_cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")  # fmt: skip
    trainer = SFTTrainer(
        model=spec["model"], args=args, train_dataset=train, processing_class=tok, peft_config=peft_cfg,
        callbacks=[clock],
    )  # fmt: skip
    if trainer.chat_template is None:
        raise RuntimeError(
            "TRL did not switch to a training chat template; assistant_only_loss would be wrong"
        )
    out = trainer.train()
    trainer.save_model(spec["out"])
    tokens = [b - a for a, b in zip([0] + clock.seen[:-1], clock.seen)]
    return {
        "step_tokens": tokens,
        "losses": [out.training_loss],
        "precision": "bf16" if bf16 else "fp32",
        "torch_threads": torch.get_num_threads(),
    }


TOOLS = {"lorafit": run_lorafit, "peft": run_peft_loop, "trl": run_trl}


def main(argv: list[str] | None = None) -> None:
    t_main = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    pacer = Pacer(spec.get("progress"), bool(spec.get("pause")))
    res = TOOLS[spec["tool"]](spec, pacer)
    res.update(pacer.result())
    if len(res["step_end"]) != spec["steps"] or len(res["step_tokens"]) != spec["steps"]:
        raise RuntimeError(f"expected {spec['steps']} optimizer steps, saw {len(res['step_end'])}")
    res["wall_sec"] = time.perf_counter() - t
    res["t_main"] = t_main
    res["peak_rss_mb"] = peak_rss_mb()
    res["threads"] = torch.get_num_threads()
    ok = all(math.isfinite(x) for x in res["losses"])
    res["finite"] = ok
    Path(spec["result"]).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
