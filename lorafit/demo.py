"""`lorafit demo`: the whole pipeline offline in a few CPU minutes, with a pass/fail you can read.

1. builds a small random Phi-3 (`Phi3ForCausalLM`, stacked qkv_proj / gate_up_proj) and a tokenizer
   with Phi-3's special tokens and chat template (lorafit.tiny);
2. takes the chat dataset shipped in the package (lorafit/resources/demo/*.jsonl, made by
   `make_demo_data`): three small skills, each answered in one word,

       "417: even or odd?" -> "odd"      "417: over 500?" -> "no"      "Last letter of qwfa?" -> "a"

   half of them under a system message; the held-out prompts use numbers and words that never
   occur in training, so answering them needs the rule, not memory;
3. answers the held-out prompts greedily with the base model (random: ~0% right);
4. fine-tunes LoRA (r=16, all linear layers, loss on the assistant turns only);
5. answers them again through base + saved adapter and counts the right ones;
6. (during 4, at the end of training) the post-training check: 8 held-out replies stop at <|end|>,
   merged == unmerged logits, the saved adapter gives the training eval loss (lorafit.adapter_check).

Most answers right (at least 80%) and a passing check show that chat template, loss mask, packing, training, adapter
saving/loading and generation (stopping at <|end|>) all work together.
"""

from __future__ import annotations

import json
import random
import string
import time
from importlib import resources
from pathlib import Path

import yaml

from lorafit.errors import LorafitError
from lorafit.lora.files import write_json_atomic

# The pipeline (api, generation, tiny) is imported inside the functions, as in cli.py: an entry point.

TASKS = ("parity", "threshold", "last letter")
SYSTEM = "Answer in one word."
TRAINING_CONFIG = {
    "learning_rate": 5e-3,
    "max_steps": 400,
    "per_device_train_batch_size": 8,
    "max_seq_length": 256,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
    "logging_steps": 25,
    "eval_strategy": "steps",
    "eval_steps": 100,
    "save_steps": 200,
    "save_total_limit": 1,
    "seed": 0,
}
PEFT_CONFIG = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def _words(rng: random.Random, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7))))
    return sorted(out)


def _conversations(seed: int, n: int, words: list[str], numbers: list[int]) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = TASKS[i % 3]
        if task == "parity":
            x = rng.choice(numbers)
            q, a = f"{x}: even or odd?", "even" if x % 2 == 0 else "odd"
        elif task == "threshold":
            x = rng.choice(numbers)
            q, a = f"{x}: over 500?", "yes" if x >= 500 else "no"
        else:
            w = rng.choice(words)
            q, a = f"Last letter of {w}?", w[-1]
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if rng.random() < 0.5:
            msgs.insert(0, {"role": "system", "content": SYSTEM})
        rows.append({"messages": msgs, "task": task})
    return rows


def make_demo_data(out_dir: str | Path, n_train: int = 1500, n_eval: int = 60) -> tuple[Path, Path]:
    """Write the demo's train.jsonl and eval.jsonl (deterministic; the shipped files are this output)."""
    rng = random.Random(0)
    words = _words(rng, 700)
    rng.shuffle(words)
    numbers = list(range(100, 1000))
    rng.shuffle(numbers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (
        ("train.jsonl", _conversations(1, n_train, words[:600], numbers[:750])),
        ("eval.jsonl", _conversations(2, n_eval, words[600:], numbers[750:])),
    ):
        p = out / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths[0], paths[1]


def demo_data_dir() -> Path:
    return Path(str(resources.files("lorafit") / "resources" / "demo"))


def _answers(model, tokenizer, rows: list[dict]) -> list[str]:
    from lorafit.generation import generate_batch

    prompts = [r["messages"][:-1] for r in rows]
    out: list[str] = []
    for i in range(0, len(prompts), 32):
        out += generate_batch(model, tokenizer, prompts[i : i + 32], max_new_tokens=12)
    return out


def _score(rows: list[dict], answers: list[str]) -> dict:
    per = {t: [0, 0] for t in TASKS}
    for r, a in zip(rows, answers):
        per[r["task"]][1] += 1
        per[r["task"]][0] += int(a == r["messages"][-1]["content"])
    right = sum(v[0] for v in per.values())
    return {"right": right, "total": len(rows), "accuracy": right / len(rows), "per_task": per}


DEMO_NAMES = frozenset({"base-model", "adapter", "demo_results.json"})


def check_demo_output(out: Path) -> None:
    """Refuse an output folder that is not new, empty or a previous demo's, which the demo replaces.
    How lorafit knows a previous demo: the folder holds only DEMO_NAMES, and its adapter/ folder is
    empty or a run whose config.yaml trained OUT/base-model (base-model/ itself is checked by
    write_tiny_model). Anything else -- a user's training run in OUT/adapter -- is never replaced."""
    fix = "Fix: choose a new --output-dir for the demo"
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise LorafitError(f"demo output folder {out} is a symbolic link or a file. {fix}")
    if not out.exists():
        return
    other = sorted(p.name for p in out.iterdir() if p.name not in DEMO_NAMES)
    if other:
        raise LorafitError(f"{out} holds files the demo did not write ({', '.join(other[:4])}). {fix}")
    adapter = out / "adapter"
    if adapter.is_symlink() or (adapter.exists() and not adapter.is_dir()):
        raise LorafitError(f"{adapter} is a symbolic link or a file. {fix}")
    if adapter.is_dir() and any(adapter.iterdir()):
        try:
            recorded = (yaml.safe_load((adapter / "config.yaml").read_text(encoding="utf-8")) or {})["model"]
            ours = Path(recorded["name_or_path"]).resolve() == (out / "base-model").resolve()
        except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
            ours = False
        if not ours:
            raise LorafitError(
                f"{adapter} holds a training run that is not this demo's (its config.yaml does not train "
                f"{out / 'base-model'}); the demo never replaces it. {fix}"
            )


def run_demo(output_dir: str | Path = "lorafit-demo", *, progress: bool = True, say=print) -> dict:
    """Run the demo; returns a summary (also written to OUT/demo_results.json)."""
    from lorafit.api import finetune
    from lorafit.generation import load
    from lorafit.tiny import write_tiny_model

    t0 = time.perf_counter()
    out = Path(output_dir).expanduser()
    check_demo_output(out)
    base = write_tiny_model(out / "base-model", size="demo", seed=0)
    data = demo_data_dir()
    rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines() if line.strip()]
    say(f"lorafit demo: tiny Phi-3 in {base}, data {data}, {len(rows)} held-out prompts")

    model, tok = load(str(base))
    before = _answers(model, tok, rows)
    score_before = _score(rows, before)
    say(f"before training: {score_before['right']}/{score_before['total']} held-out answers right")

    t_train = time.perf_counter()
    res = finetune(
        model=str(base), train_data=data / "train.jsonl", eval_data=data / "eval.jsonl",
        training_config=TRAINING_CONFIG, peft_config=PEFT_CONFIG, output_dir=out / "adapter",
        overwrite=True, progress=progress,
    )  # fmt: skip
    train_sec = time.perf_counter() - t_train

    model, tok = load(str(base), adapter=out / "adapter")
    after = _answers(model, tok, rows)
    score = _score(rows, after)

    say("\n  prompt                                   expected   before     after")
    for r, b, a in list(zip(rows, before, after))[:9]:
        q, want = r["messages"][-2]["content"], r["messages"][-1]["content"]
        mark = "ok" if a == want else "WRONG"
        say(f"  {q:40.40} {want:10.10} {b[:10]!r:10.10} {a[:10]!r:10.10} {mark}")
    per = ", ".join(f"{t} {v[0]}/{v[1]}" for t, v in score["per_task"].items())
    say(
        f"\neval loss (assistant tokens): {res['eval_loss_before']:.3f} before -> {res['eval_loss']:.3f} after"
        f"\nheld-out answers right: {score['right']}/{score['total']} ({100 * score['accuracy']:.0f}%) [{per}]"
        f"\ntraining: {res['steps']} steps, {res['tokens']:,} tokens in {train_sec:.0f} s "
        f"({res['tokens'] / train_sec:,.0f} tokens/s); whole demo {time.perf_counter() - t0:.0f} s"
    )
    checks = res.get("checks") or {}
    say(f"post-training check: {checks.get('verdict_line', 'not run')}")
    verdict = "PASS" if score["accuracy"] >= 0.8 and checks.get("verdict") != "FAIL" else "FAIL"
    say(
        f"{verdict}: at least 80% of held-out answers must be right and the post-training check must pass. "
        f"Adapter: {out / 'adapter'}"
    )
    summary = {
        "accuracy_before": score_before["accuracy"],
        "accuracy_after": score["accuracy"],
        "right_after": score["right"],
        "total": score["total"],
        "per_task_after": score["per_task"],
        "eval_loss_before": res["eval_loss_before"],
        "eval_loss_after": res["eval_loss"],
        "train_seconds": round(train_sec, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "tokens": res["tokens"],
        "tokens_per_sec": round(res["tokens"] / train_sec, 1),
        "adapter": str(out / "adapter"),
        "check": checks.get("verdict"),
    }
    write_json_atomic(out / "demo_results.json", summary, sort_keys=False)
    return summary
