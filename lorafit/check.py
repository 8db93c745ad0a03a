"""`lorafit check-data`: validate a dataset and show what training would see, without training.

    report = check_data("microsoft/Phi-3-mini-4k-instruct", "train.jsonl", max_seq_length=2048)
    print(format_report(report))

Only the tokenizer is loaded (no model weights). The data goes through exactly the code training
uses (`load_conversations` then `tokenize`), so the same problems are found -- all of them in one
pass, as one DataError listing up to 20 with their file:line -- and the same token counts come out.
The report has the token statistics (conversations, tokens, supervised tokens, truncated, dropped,
a length histogram) and one conversation rendered with the model's chat template, its trained
tokens marked::

    <|user|>
    756: even or odd?<|end|>
    <|assistant|>
    [[even<|end|>]]
    <|endoftext|>

`[[...]]` marks the supervised spans in plain text; on a terminal they are coloured instead.
"""

from __future__ import annotations

import math
import warnings as warnings_module
from pathlib import Path

import numpy as np

from lorafit.data import load_conversations
from lorafit.errors import ConfigError, DataError
from lorafit.model import end_of_turn, load_tokenizer
from lorafit.templates import ChatTemplate, SystemMessageWarning, prepare
from lorafit.tokens import clip_messages, encode, render_conversation, tokenize

OPEN, CLOSE = "[[", "]]"
COLOR_ON, COLOR_OFF = "\x1b[1;32m", "\x1b[0m"  # bold green


def example_segments(
    tokenizer, messages: list[dict], *, max_seq_length: int, end_of_turn: str, train_on: str
) -> tuple[list[tuple[str, bool]], str]:
    """(segments, cut): the rendered conversation as (text, trained) runs, and the text past max_seq_length.

    Each token's text runs from the end of the previous token to its own end (so whitespace a
    tokenizer folds into a token stays with it); neighbouring segments with the same flag are merged.
    """
    text = render_conversation(tokenizer, messages, add_generation_prompt=False)
    ids, sup = encode(tokenizer, messages, end_of_turn=end_of_turn, train_on=train_on)
    offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    segments: list[tuple[str, bool]] = []
    prev = 0
    for i in range(min(len(ids), max_seq_length)):
        end = max(prev, int(offsets[i][1]))
        piece = text[prev:end]
        prev = end
        if not piece:
            continue
        if segments and segments[-1][1] == sup[i]:
            segments[-1] = (segments[-1][0] + piece, sup[i])
        else:
            segments.append((piece, bool(sup[i])))
    cut = text[prev:] if len(ids) > max_seq_length else ""
    if not cut and prev < len(text):  # trailing characters that belong to no token
        segments.append((text[prev:], False))
    return segments, cut


def histogram(lengths, bins: int = 10) -> list[dict]:
    """Example lengths in up to `bins` equal integer bins from the shortest to the longest:
    [{"lo", "hi", "count"}] with lo <= length <= hi."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return []
    lo, hi = int(lengths.min()), int(lengths.max())
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = np.bincount((lengths - lo) // width, minlength=math.ceil((hi - lo + 1) / width))
    return [
        {"lo": lo + k * width, "hi": lo + (k + 1) * width - 1, "count": int(c)} for k, c in enumerate(counts)
    ]


def check_data(
    model: str,
    data: str | Path,
    *,
    max_seq_length: int = 2048,
    train_on: str = "assistant",
    truncation: bool = True,
    example: int = 0,
    split: str | None = None,
    bins: int = 10,
    tokenizer=None,
    system_message: str = "auto",
) -> dict:
    """Validate `data` for `model`'s tokenizer and return the statistics and one rendered example.

    Raises DataError (every problem of the file, with file:line) when the data is not valid, and
    ConfigError for bad arguments. Writes nothing.
    """
    if max_seq_length < 2:
        raise ConfigError(f"--max-seq-length must be at least 2, got {max_seq_length}")
    if example < 0:
        raise ConfigError(f"--example must be >= 0, got {example}")
    tok = tokenizer or load_tokenizer(str(model))
    convs = load_conversations(data, split=split)
    eot = end_of_turn(tok)
    with warnings_module.catch_warnings():  # reported below, as one of the report's warnings
        warnings_module.simplefilter("ignore", SystemMessageWarning)
        _, stats = tokenize(
            tok, convs, max_seq_length=max_seq_length, end_of_turn=eot, train_on=train_on, truncation=truncation,
            system_message=system_message,
        )  # fmt: skip
    if stats.examples == 0:
        raise DataError(nothing_to_train(data, stats, max_seq_length=max_seq_length, train_on=train_on))
    warnings = []
    if stats.truncated:
        warnings.append(
            f"{stats.truncated} conversation(s) are longer than max_seq_length={max_seq_length} and are cut there; "
            "the cut part is not trained. Fix: a larger --max-seq-length, or data.truncation=false to make "
            "this an error"
        )
    if stats.dropped:
        warnings.append(
            f"{stats.dropped} conversation(s) have no trained token left (after truncation) and are skipped"
        )
    template = ChatTemplate.probe(tok)
    folded, dropped = stats.system_messages.get("folded", 0), stats.system_messages.get("dropped", 0)
    if folded:
        why = "" if system_message == "fold" else " (this model's chat template renders no system message)"
        warnings.append(
            f"{folded} conversation(s) have a system message folded into the first user turn{why}: the system "
            "text, a blank line, then the user text. Set data.system_message to drop or error to change this"
        )
    if dropped:
        warnings.append(
            f"{dropped} conversation(s) have their system message left out (data.system_message=drop)"
        )
    idx = min(example, len(convs) - 1)
    messages, _ = prepare(clip_messages(convs[idx].messages, max_seq_length)[0], template, system_message)
    segments, cut = example_segments(
        tok, messages, max_seq_length=max_seq_length, end_of_turn=eot, train_on=train_on
    )
    return {
        "model": str(model),
        "data": str(data),
        "max_seq_length": max_seq_length,
        "train_on": train_on,
        "end_of_turn": eot,
        "system_message": system_message,
        "template_renders_system": template.renders_system,
        **stats.to_dict(),
        "supervised_fraction": stats.supervised_tokens / stats.tokens if stats.tokens else 0.0,
        "histogram": histogram(stats.lengths, bins),
        "warnings": warnings,
        "example": {
            "index": idx,
            "source": convs[idx].location,
            "text": marked(segments),
            "segments": [[text, trained] for text, trained in segments],
            "truncated_text": cut,
        },
    }


def nothing_to_train(data, stats, *, max_seq_length: int, train_on: str) -> str:
    """The message for data of which no example would train: every conversation dropped, and why.

    A conversation is dropped when it has no trained token after its first one: its assistant replies
    were all cut off at max_seq_length (it is counted as truncated too), or it has none to train on.
    """
    n = stats.conversations
    reasons = []
    if stats.truncated:
        reasons.append(
            f"{stats.truncated} are longer than max_seq_length={max_seq_length} and their trained tokens "
            "(the assistant replies) come after the cut"
        )
    rest = stats.dropped - stats.truncated
    if rest > 0:
        reasons.append(f"{rest} have no token to train on with train_on={train_on!r}")
    fixes = []
    if stats.truncated:
        fixes.append("a larger max_seq_length (--max-seq-length, training_config.max_seq_length)")
    if rest > 0:
        fixes.append("an assistant reply in each conversation, or train_on='all'")
    return (
        f"{data}: no example would train: all {n} conversation(s) are dropped: " + "; ".join(reasons) + ". "
        "Fix: " + " or ".join(fixes)
    )


def system_summary(report: dict) -> str:
    """What happened to system messages, e.g. "12 folded into the first user turn: the template renders none"."""
    counts = report["system_messages"]
    if not counts:
        return "none in the data" + (
            "" if report["template_renders_system"] else "; the template renders none"
        )
    said = {"kept": "kept", "folded": "folded into the first user turn", "dropped": "left out"}
    parts = ", ".join(f"{n:,} {said[k]}" for k, n in sorted(counts.items()))
    return parts + ("" if report["template_renders_system"] else ": the template renders none")


def marked(segments: list[tuple[str, bool]], color: bool = False) -> str:
    """The example text with its trained spans in [[...]] (or coloured)."""
    on, off = (COLOR_ON, COLOR_OFF) if color else (OPEN, CLOSE)
    return "".join(f"{on}{text}{off}" if trained else text for text, trained in segments)


def format_report(report: dict, color: bool = False) -> str:
    """A human-readable report of check_data's result."""
    r = report
    n_conv = r["conversations"]
    lines = [
        f"{r['data']}: valid ({r['model']} tokenizer, max_seq_length {r['max_seq_length']}, "
        f"train_on {r['train_on']})",
        f"  conversations     {n_conv:>10,}",
        f"  examples          {r['examples']:>10,}   ({r['dropped']} dropped: no trained token)",
        f"  tokens            {r['tokens']:>10,}   (mean {r['mean_len']:.1f}, max {r['max_len']} per example)",
        f"  supervised tokens {r['supervised_tokens']:>10,}   ({100 * r['supervised_fraction']:.1f}% of tokens get "
        f"loss; {r['targets']:,} targets)",
        f"  truncated         {r['truncated']:>10,}   (longer than {r['max_seq_length']} tokens)",
        f"  system messages   {sum(r['system_messages'].values()):>10,}   ({system_summary(r)})",
        "",
        "length histogram (tokens per example):",
    ]
    hist = r["histogram"]
    top = max((h["count"] for h in hist), default=0)
    width = len(str(hist[-1]["hi"])) if hist else 1
    for h in hist:
        bar = "#" * (round(40 * h["count"] / top) if top else 0)
        label = f"{h['lo']}-{h['hi']}" if h["hi"] > h["lo"] else f"{h['lo']}"
        lines.append(f"  {label:>{2 * width + 1}} | {bar:<40} {h['count']}")
    ex = r["example"]
    how = "highlighted" if color else f"in {OPEN}...{CLOSE}"
    lines += ["", f"example {ex['index']} ({ex['source']}), the trained tokens {how}:", ""]
    lines.append(marked([(text, trained) for text, trained in ex["segments"]], color))
    cut = ex["truncated_text"]
    if cut:
        shown = repr(cut if len(cut) <= 120 else cut[:120] + "...")
        lines.append(f"... cut at max_seq_length {r['max_seq_length']} (not trained): {shown}")
    for w in r["warnings"]:
        lines += ["", f"warning: {w}"]
    return "\n".join(lines)
