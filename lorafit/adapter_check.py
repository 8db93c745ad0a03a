"""`lorafit check-adapter`: is a trained adapter fit to ship? (Not `check-data`, lorafit/check.py.)

    report = check_adapter("base-model", "out", "eval.jsonl")
    print(format_report(report))              # its last line: "check: PASS" or "check: FAIL (...)"

`lorafit train` runs the same checks on the model it has just trained (training_config.post_check,
default true) and stores the report in OUT/results.json under "checks". Three checks:

1. replies -- greedy replies of base + adapter to `sample` (8) held-out prompts: the eval conversations
   (the training ones when there are none) cut before their last assistant turn, picked evenly spaced.
   * runaway: a reply that reaches the token limit without an end-of-turn or EOS token (the classic
     failure: a fine-tune that never learned to stop). The limit is `max_new_tokens`, by default twice
     the longest reference reply of the sample in tokens, at least 32 and at most 1024, so that a reply
     as long as the data's is never a runaway.
   * empty: a reply that stops with no text.
   * repetitive: a reply more than `repeat_ratio` (0.5) of whose token 4-grams repeat an earlier one.
     The longest token n-gram that occurs twice in a reply is reported too.
   Each fails when its share of the replies is above `max_runaway`, `max_empty`, `max_repetitive`
   (0.125 each: 1 reply in 8 passes, 2 fail).
2. merge -- the logits of the merged model (`lora.merge_adapter`: ΔW computed in fp32, added to each
   base weight in place, undone bit for bit afterwards) against base + adapter unmerged, on up to 3
   reference conversations: max |merged - unmerged| <= tolerance * max |unmerged logit|. The tolerance
   is 1e-3 with fp32 base weights and 5e-2 when they are bf16/fp16 (the merged weight is rounded once
   into that dtype, and the forward runs under autocast); `merge_tolerance` overrides it. This is what
   `lorafit fuse` writes, so a broken merge shows here. A quantized base cannot be merged: skipped.
3. reload -- the adapter as saved, loaded again from disk, evaluated on the eval data: its eval loss
   must be the training's final eval loss (results.json) within `loss_tolerance` (1%, relative).
   After `train`: the saved factors replace the trained ones in place (the trained ones are restored
   afterwards). `check-adapter`: a fresh base + the adapter, with the run's config.yaml settings; skipped
   when the folder has no results.json eval loss, or the training's was taken on other data.

Cost: one batch of 8 greedy replies, 6 forward passes for the merge check and one eval pass (as many
as training runs at each evaluation); the report says how many seconds it took (1.1 s in `lorafit demo`,
where the merge difference with bf16-held weights was 2.2e-2, and 2.2e-6 from `check-adapter` in fp32). Exit status of `check-adapter`: 0 every check passed (or was skipped),
1 a check failed, 2 bad input (a missing file, a broken adapter, a bad threshold).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from lorafit import lora
from lorafit.adapters import adapter_error, load_any_adapter, recorded_base, recorded_system_message
from lorafit.attention import use_packed_sdpa
from lorafit.config import load_config
from lorafit.data import load_conversations
from lorafit.errors import ConfigError, LorafitError
from lorafit.evaluation import eval_loss
from lorafit.generation import generate_tokens, load, prompt_text
from lorafit.model import end_of_turn, stop_token_ids
from lorafit.precision import autocast, mixed_precision
from lorafit.tokens import tokenize

EXAMPLES = 2  # replies shown per problem
SHOWN_CHARS = 160


@dataclass
class Thresholds:
    """What the checks accept; every field is a `check-adapter` flag (--max-runaway, ...)."""

    sample: int = 8  # held-out prompts to reply to
    max_new_tokens: int | None = None  # None: 2 x the longest reference reply, within [32, 1024]
    max_runaway: float = 0.125  # share of replies that may run to the limit
    max_empty: float = 0.125  # share of replies that may be empty
    max_repetitive: float = 0.125  # share of replies that may be repetitive
    repeat_ratio: float = 0.5  # a reply is repetitive above this share of repeated 4-grams
    merge_tolerance: float | None = None  # None: 1e-3 (fp32 weights), 5e-2 (bf16/fp16)
    loss_tolerance: float = 0.01  # relative difference of the reloaded eval loss

    def __post_init__(self):
        bad = []
        if self.sample < 1:
            bad.append(f"sample must be at least 1, got {self.sample}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            bad.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        for name in ("max_runaway", "max_empty", "max_repetitive", "repeat_ratio"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                bad.append(f"{name} is a share of replies, between 0 and 1; got {v}")
        for name in ("merge_tolerance", "loss_tolerance"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                bad.append(f"{name} must be a number >= 0, got {v}")
        if bad:
            raise ConfigError("check-adapter thresholds: " + "; ".join(bad))

    def to_dict(self) -> dict:
        return asdict(self)


THRESHOLD_NAMES = tuple(f.name for f in fields(Thresholds))


# ----------------------------------------------------------------------------- prompts


def pick_prompts(conversations, n: int) -> list[tuple[list[dict], str]]:
    """Up to `n` (messages before the last assistant turn, that turn's text), evenly spaced over the
    conversations whose last assistant turn follows a user turn."""
    usable = []
    for c in conversations:
        msgs = c.messages if hasattr(c, "messages") else c["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=0)
        if last > 0 and msgs[last - 1]["role"] == "user":
            usable.append((list(msgs[:last]), msgs[last]["content"]))
    picked = sorted({i * len(usable) // n for i in range(min(n, len(usable)))})
    return [usable[i] for i in picked]


# ----------------------------------------------------------------------------- 1. replies


def longest_repeat(ids: list[int]) -> int:
    """The length of the longest run of tokens that occurs at least twice in `ids` (overlaps count):
    0 when no token repeats. Binary search: if an n-gram repeats, so does its (n-1)-token prefix."""

    def repeats(n: int) -> bool:
        seen = set()
        for i in range(len(ids) - n + 1):
            g = tuple(ids[i : i + n])
            if g in seen:
                return True
            seen.add(g)
        return False

    lo, hi = 0, max(len(ids) - 1, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if repeats(mid) else (lo, mid - 1)
    return lo


def repeated_share(ids: list[int], n: int = 4) -> float:
    """The share of the n-grams of `ids` that repeat an earlier one (0 for fewer than n tokens)."""
    seen, repeated = set(), 0
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams) if grams else 0.0


def reply_limit(tokenizer, prompts, th: Thresholds) -> int:
    if th.max_new_tokens is not None:
        return th.max_new_tokens
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in prompts)
    return min(1024, max(32, 2 * longest))


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def reply_check(model, tokenizer, prompts, th: Thresholds, *, system_message: str, precision: str) -> dict:
    """Greedy replies to `prompts`: how many stop, run to the limit, are empty or repeat themselves."""
    device = next(model.parameters()).device
    stops = set(stop_token_ids(tokenizer, model))
    limit = reply_limit(tokenizer, prompts, th)
    with autocast(device, precision):
        new, used = generate_tokens(
            model, tokenizer, [p for p, _ in prompts], max_new_tokens=limit, system_message=system_message
        )
    replies = []
    for (msgs, _), row in zip(prompts, new.tolist()):
        end = next((i for i, t in enumerate(row) if t in stops), None)
        ids = row if end is None else row[:end]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        replies.append({"prompt": msgs[-1]["content"], "reply": text, "tokens": len(ids), "stopped": end is not None,
                        "longest_repeat": longest_repeat(ids), "repeated_4grams": repeated_share(ids)})  # fmt: skip
    n = len(replies)
    runaway = [r for r in replies if not r["stopped"]]
    empty = [r for r in replies if r["stopped"] and not r["reply"]]
    repetitive = [r for r in replies if r["repeated_4grams"] > th.repeat_ratio]
    failed = []
    if len(runaway) > th.max_runaway * n:
        failed.append(
            f"{len(runaway)}/{n} replies ran to the limit of {used} tokens without {end_of_turn(tokenizer)}"
        )
    if len(empty) > th.max_empty * n:
        failed.append(f"{len(empty)}/{n} replies are empty")
    if len(repetitive) > th.max_repetitive * n:
        failed.append(f"{len(repetitive)}/{n} replies repeat themselves")
    examples = [
        {"kind": kind, "prompt": _shown(r["prompt"]), "reply": _shown(r["reply"]), "tokens": r["tokens"]}
        for kind, group in (("runaway", runaway), ("empty", empty), ("repetitive", repetitive))
        for r in group[:EXAMPLES]
    ]
    return {
        "status": "fail" if failed else "pass",
        "failed": failed,
        "replies": n,
        "max_new_tokens": used,
        "end_of_turn": end_of_turn(tokenizer),
        "stopped": n - len(runaway),
        "runaway": len(runaway),
        "empty": len(empty),
        "repetitive": len(repetitive),
        "longest_repeat": max(r["longest_repeat"] for r in replies),
        "repeated_4grams_max": round(max(r["repeated_4grams"] for r in replies), 4),
        "mean_reply_tokens": round(sum(r["tokens"] for r in replies) / n, 1),
        "examples": examples,
    }


# ----------------------------------------------------------------------------- 2. merge


def _weight_dtypes(model) -> set[torch.dtype]:
    return {layer._base_weight().dtype for layer in lora.lora_modules(model).values()}


@torch.no_grad()
def merge_check(model, tokenizer, texts: list[str], th: Thresholds, *, precision: str) -> dict:
    """Merged against unmerged logits on `texts`; the model is left unmerged, as it came."""
    layers = lora.lora_modules(model)
    if not layers:
        return {"status": "skipped", "why": "the model has no LoRA layers"}
    if any(layer.merged for layer in layers.values()):
        return {"status": "skipped", "why": "the adapter is merged already"}
    dtypes = _weight_dtypes(model)
    full = dtypes == {torch.float32}
    tolerance = th.merge_tolerance if th.merge_tolerance is not None else (1e-3 if full else 5e-2)
    device = next(model.parameters()).device
    use = precision if not full else "no"  # bf16/fp16 weights refuse fp32 inputs outside autocast
    was_training = model.training
    model.eval()
    rows = [
        tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device) for t in texts
    ]

    def all_logits():
        with autocast(device, use):
            return [model(input_ids=r, use_cache=False).logits.float() for r in rows]

    try:
        unmerged = all_logits()
        try:
            lora.merge_adapter(model)
        except lora.LoraError as e:  # a quantized base layer cannot absorb the update
            return {"status": "skipped", "why": str(e).split(":")[0]}
        merged = all_logits()
    finally:
        lora.unmerge_adapter(model)
        model.train(was_training)
    diff = max(float((m - u).abs().max()) for m, u in zip(merged, unmerged))
    scale = max(float(u.abs().max()) for u in unmerged)
    same = sum(int((m.argmax(-1) == u.argmax(-1)).sum()) for m, u in zip(merged, unmerged))
    positions = sum(u.shape[1] for u in unmerged)
    relative = diff / scale if scale > 0 else diff
    ok = math.isfinite(relative) and relative <= tolerance
    return {
        "status": "pass" if ok else "fail",
        "failed": []
        if ok
        else [
            f"merged logits differ from base + adapter by {relative:.2g} of max |logit| "
            f"(tolerance {tolerance:g})"
        ],  # fmt: skip
        "prompts": len(rows),
        "positions": positions,
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "relative_diff": relative,
        "tolerance": tolerance,
        "weight_dtype": ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes)),
        "same_argmax": same / positions if positions else 1.0,
    }


# ----------------------------------------------------------------------------- 3. reload


def compare_loss(loss: float, training: float | None, th: Thresholds, why_not: str = "") -> dict:
    """The reloaded adapter's eval loss against training's final eval loss."""
    if training is None or not math.isfinite(training):
        return {
            "status": "skipped",
            "why": why_not or "no training eval loss to compare with",
            "eval_loss": loss,
        }
    diff = abs(loss - training)
    ok = math.isfinite(loss) and diff <= th.loss_tolerance * abs(training) + 1e-6
    return {
        "status": "pass" if ok else "fail",
        "failed": []
        if ok
        else [
            f"the reloaded adapter's eval loss is {loss:.4f}, training's {training:.4f} "
            f"(off by {diff / abs(training) if training else diff:.2%})"
        ],  # fmt: skip
        "eval_loss": loss,
        "training_eval_loss": training,
        "difference": diff,
        "tolerance": th.loss_tolerance,
    }


@torch.no_grad()
def reload_in_place(model, adapter: str | Path, evaluate) -> tuple[float | None, str]:
    """(eval loss, "") of `model` with the LoRA factors saved in `adapter` in place of its own, or (None,
    why) when they do not load. Every lora_B is zeroed first, so a module the file lacks shows; the
    model's own factors are put back afterwards. `evaluate()` returns the eval loss."""
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    try:
        for layer in lora.lora_modules(model).values():
            layer.lora_B.zero_()
        try:
            load_any_adapter(model, adapter, trainable=True)
        except Exception as e:  # a broken or incomplete file is the finding, not a crash
            return None, f"the saved adapter does not load: {e}"
        return evaluate(), ""
    finally:
        for n, t in saved.items():
            params[n].data.copy_(t)
            params[n].requires_grad_(True)


# ----------------------------------------------------------------------------- all three


def run_checks(model, tokenizer, prompts, th: Thresholds, *, system_message: str, precision: str,
               reload, prompts_from: str) -> dict:  # fmt: skip
    """The report: each check's result, the verdict and its line. `reload()` returns the reload dict."""
    t0 = time.perf_counter()
    if not prompts:
        replies = merge = {
            "status": "skipped",
            "why": "no conversation with an assistant turn after a user turn",
        }
    else:
        was_training = model.training  # after training: no dropout in the replies
        model.eval()
        try:
            replies = reply_check(
                model, tokenizer, prompts, th, system_message=system_message, precision=precision
            )
        finally:
            model.train(was_training)
        texts = [prompt_text(tokenizer, p, system_message=system_message) + ref for p, ref in prompts[:3]]
        merge = merge_check(model, tokenizer, texts, th, precision=precision)
    checks = {"replies": replies, "merge": merge, "reload": reload()}
    failed = [f for c in checks.values() for f in c.get("failed", [])]
    verdict = "FAIL" if failed else "PASS"
    return {
        "verdict": verdict,
        "verdict_line": f"check: {verdict}" + (f" ({'; '.join(failed)})" if failed else ""),
        "prompts_from": prompts_from,
        **checks,
        "thresholds": th.to_dict(),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def format_report(report: dict) -> str:
    """The report as a few lines, ending with the verdict line."""
    if report.get("verdict") is None:  # skipped as a whole
        return report["verdict_line"]
    r, m, ld = report["replies"], report["merge"], report["reload"]
    lines = []
    if r["status"] == "skipped":
        lines.append(f"  replies  skipped: {r['why']}")
    else:
        lines += [
            f"adapter check: {r['replies']} prompts from the {report['prompts_from']}, greedy, at most "
            f"{r['max_new_tokens']} new tokens; {report['seconds']:.1f} s",
            f"  replies  {r['stopped']}/{r['replies']} stopped at {r['end_of_turn']} (mean {r['mean_reply_tokens']} "
            f"tokens), {r['runaway']} ran to the limit, {r['empty']} empty, {r['repetitive']} repetitive "
            f"(longest repeated n-gram: {r['longest_repeat']} tokens)  {r['status']}",
        ]
        for ex in r["examples"]:
            lines.append(
                f"           {ex['kind']}: {ex['prompt']!r} -> {ex['reply']!r} ({ex['tokens']} tokens)"
            )
    if m["status"] == "skipped":
        lines.append(f"  merge    skipped: {m['why']}")
    else:
        lines.append(
            f"  merge    merged vs unmerged logits ({m['weight_dtype']} weights, {m['positions']} positions): "
            f"max |diff| {m['relative_diff']:.1e} of max |logit| (tolerance {m['tolerance']:g}), "
            f"same argmax {m['same_argmax']:.0%}  {m['status']}"
        )
    if ld["status"] == "skipped":
        lines.append(f"  reload   skipped: {ld['why']}")
    else:
        lines.append(
            f"  reload   eval loss {ld['eval_loss']:.4f} from the adapter on disk, training's "
            f"{ld['training_eval_loss']:.4f} (tolerance {ld['tolerance']:.0%})  {ld['status']}"
        )
    lines.append(report["verdict_line"])
    return "\n".join(lines)


def skipped(why: str) -> dict:
    """The report of checks not run at all."""
    return {"verdict": None, "verdict_line": f"check: skipped ({why})", "why": why}


def check_trained(model, tokenizer, conversations, adapter: str | Path, *, eval_data, eval_args: dict,
                  training_eval_loss: float | None, precision: str, system_message: str,
                  prompts_from: str, thresholds: Thresholds | None = None) -> dict:  # fmt: skip
    """The checks on a model just trained (`lorafit train`): replies and merge on `model` itself, and
    the factors saved in `adapter` loaded in place of its own for the reload check. `eval_args`:
    lorafit.evaluation.eval_loss's keyword arguments as training evaluates."""
    th = thresholds or Thresholds()
    prompts = pick_prompts(conversations, th.sample)

    def reload():
        if eval_data is None:
            return {"status": "skipped", "why": "no eval data (pass --eval-data or set data.eval_split)"}
        loss, why = reload_in_place(
            model, adapter, lambda: eval_loss(model, eval_data, **eval_args)["eval_loss"]
        )
        if loss is None:
            return {"status": "fail", "failed": [why]}
        return compare_loss(loss, training_eval_loss, th)

    try:
        return run_checks(model, tokenizer, prompts, th, system_message=system_message, precision=precision,
                          reload=reload, prompts_from=prompts_from)  # fmt: skip
    except lora.LoraError as e:
        raise adapter_error(e) from e


def _run_settings(adapter: Path) -> tuple[dict, float | None, int | None]:
    """(settings, training's final eval loss, its number of eval targets) from a training run's folder:
    config.yaml's max_seq_length, packing, eval batch size, train_on and system_message; {} and None
    for a folder that is only an adapter."""
    settings, loss, targets = {}, None, None
    if (adapter / "config.yaml").is_file():
        try:
            run = load_config(adapter / "config.yaml")
        except LorafitError:  # a config of another lorafit version: the defaults
            run = None
        if run is not None:
            t = run.training_config
            settings = {"max_seq_length": t.max_seq_length, "packing": t.packing,
                        "batch_size": t.per_device_eval_batch_size, "train_on": run.data.train_on,
                        "system_message": run.data.system_message}  # fmt: skip
    try:
        results = json.loads((adapter / "results.json").read_text())
        loss = results.get("eval_loss")
        targets = (results.get("eval_data") or {}).get("targets")
    except (OSError, ValueError, AttributeError):
        pass
    return settings, loss if isinstance(loss, (int, float)) else None, targets


def check_adapter(
    model: str | None,
    adapter: str | Path,
    data: str | Path,
    *,
    thresholds: Thresholds | None = None,
    dtype: str = "auto",
    device: str = "auto",
    quantization: str = "none",
    lora_alpha: float | None = None,
    target_modules: list[str] | None = None,
    system_message: str | None = None,
    max_seq_length: int | None = None,
    batch_size: int | None = None,
) -> dict:
    """Load base + adapter from disk and check them on the eval conversations in `data` (see the module
    docstring); returns the report (`format_report` prints it). `model=None`: the adapter's recorded base.

    Eval settings (max_seq_length, packing, eval batch size, train_on, system_message) are the run's
    config.yaml when `adapter` is a training run's folder, else lorafit's defaults; the arguments
    override them. Raises DataError/AdapterError/ConfigError for bad input; a failed check is not an
    exception but the report's verdict "FAIL".
    """
    th = thresholds or Thresholds()
    src = Path(adapter).expanduser()
    settings, training_loss, training_targets = _run_settings(src)
    system_message = system_message or settings.get("system_message") or recorded_system_message(src)
    max_seq_length = max_seq_length or settings.get("max_seq_length", 2048)
    convs = load_conversations(data)
    net, tok = load(model, src, dtype=dtype, device=device, quantization=quantization, lora_alpha=lora_alpha,
                    target_modules=target_modules)  # fmt: skip
    use_packed_sdpa(net)  # the attention training's eval uses, so both give the same eval loss
    dev = next(net.parameters()).device
    precision = mixed_precision(None, False, dev)  # auto, as training_config.bf16: null

    def reload():
        tokens, stats = tokenize(
            tok, convs, max_seq_length=max_seq_length, end_of_turn=end_of_turn(tok),
            train_on=settings.get("train_on", "assistant"), system_message=system_message,
        )  # fmt: skip
        loss = eval_loss(
            net, tokens, batch_size=batch_size or settings.get("batch_size", 4), max_seq_length=max_seq_length,
            pad_id=tok.pad_token_id, device=dev, precision=precision, packing=settings.get("packing", True),
        )["eval_loss"]  # fmt: skip
        why = ""
        if training_loss is not None and training_targets not in (None, stats.targets):
            why = (f"training's eval loss ({training_loss:.4f}) is over {training_targets:,} target tokens, "
                   f"this data has {stats.targets:,}: other eval data")  # fmt: skip
            return compare_loss(loss, None, th, why)
        return compare_loss(loss, training_loss, th, "" if training_loss is not None else
                            f"{src} has no results.json with an eval loss to compare with")  # fmt: skip

    report = run_checks(net, tok, pick_prompts(convs, th.sample), th, system_message=system_message,
                        precision=precision, reload=reload, prompts_from=f"data {data}")  # fmt: skip
    return {"model": model or recorded_base(src), "adapter": str(src), "data": str(data), **report}
