"""Training data: read and validate conversations, turn them into tokens and a loss mask.

Data flow (this module, then `lorafit.packing`)::

    file.jsonl / .json / .parquet / hub id
        |  load_conversations()   read, detect the layout of each record, validate ALL records,
        v                         raise one DataError listing every problem (file:line + fix)
    list[Conversation]            {"role", "content"} messages + where they came from
        |  split_eval()           deterministic held-out fraction
        v
        |  tokenize()             encode() each: render with the tokenizer's chat template, tokenize once,
        v                         mark the assistant tokens; truncate to max_seq_length; drop the untrainable
    TokenizedData, TokenStats     flat int32 tokens + bool mask + offsets
        |  pack() / single_rows() rows of example indices (lorafit.packing)
        |  Batches                shuffled per (seed, epoch), sharded across ranks
        v
        |  collate()              input_ids, position_ids (restarting per example), labels already shifted
    dict of torch tensors         -> model(input_ids=..., position_ids=..., use_cache=False), no attention_mask

Nothing here writes files or touches the global RNGs.

Accepted record layouts (auto-detected per record; other keys such as "prompt_id" are ignored):

* chat (ultrachat_200k, OpenAI): ``{"messages": [{"role": "user", "content": "..."}, ...]}``
* prompt/completion: ``{"prompt": "...", "completion": "..."}`` -> one user turn, one assistant turn
* TRL conversational prompt/completion: ``{"prompt": [messages], "completion": [messages]}``
  -> the two lists concatenated (every assistant turn is trained on, also one inside "prompt")
* Alpaca: ``{"instruction": "...", "input": "..." (optional), "output": "..."}``
  -> user = instruction + "\\n\\n" + input (when input is not empty), assistant = output
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorafit import templates
from lorafit.errors import ConfigError, DataError, LorafitError
from lorafit.templates import SystemMessageWarning

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("assistant", "all")
MAX_SHOWN = 20  # problems listed in one DataError; the rest are counted

LAYOUTS = (
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}, '
    '{"prompt": "...", "completion": "..."}, '
    '{"instruction": "...", "input": "...", "output": "..."}'
)
_FIX_HINT = (
    "Fix: correct or delete these records and run again. Each record must be a JSON object in one of "
    "these layouts: " + LAYOUTS
)
_ROLE_ALIASES = {
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "ai": "assistant",
}
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class Conversation:
    """One validated training conversation.

    `messages` are plain ``{"role", "content"}`` dicts (roles from ROLES, non-empty string content, at
    least one assistant turn, a system turn only first). `location` says where it came from, as used
    in error messages: ``path:LINE`` for JSONL, ``path:record N`` (0-based) for JSON, Parquet and hub
    datasets.
    """

    messages: list[dict]
    location: str


# --------------------------------------------------------------------------------------------------
# Problem collection: every problem of a file goes into one DataError.


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for messages a user can act on."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _Problems:
    """Collects (location, message) pairs and raises them together, the first MAX_SHOWN listed."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.records: set[str] = set()

    def add(self, location: str, message: str) -> None:
        self.items.append((location, message))
        self.records.add(location)

    def __bool__(self) -> bool:
        return bool(self.items)

    def error(self, what: str, hint: str) -> DataError:
        n, m = len(self.items), len(self.records)
        lines = [f"{what}: {n} problem{'s' * (n != 1)} in {m} record{'s' * (m != 1)}:"]
        lines += [f"  {loc}: {msg}" for loc, msg in self.items[:MAX_SHOWN]]
        if n > MAX_SHOWN:
            lines.append(f"  ... and {n - MAX_SHOWN} more problems ({m} records affected)")
        lines.append(hint)
        return DataError("\n".join(lines))

    def raise_if_any(self, what: str, hint: str) -> None:
        if self.items:
            raise self.error(what, hint)


# --------------------------------------------------------------------------------------------------
# Records -> messages.


def _text_problem(label: str, value: Any) -> str | None:
    if not isinstance(value, str):
        return f"{label} is a {_json_type(value)}, not a string; give it text"
    if not value.strip():
        return f"{label} is empty; give it text or remove it"
    return None


def _check_messages(items: list[tuple[str, Any]]) -> tuple[list[dict], list[str]]:
    """Validate labelled messages; return the clean {"role", "content"} list and the problems."""
    problems: list[str] = []
    clean: list[dict] = []
    for label, msg in items:
        if not isinstance(msg, dict):
            problems.append(f"{label} is a {_json_type(msg)}, not an object with 'role' and 'content'")
            continue
        role = msg.get("role")
        if "role" not in msg:
            problems.append(f"{label} has no 'role'; add one of: {', '.join(ROLES)}")
        elif role not in ROLES:
            alias = _ROLE_ALIASES.get(str(role).lower()) if isinstance(role, str) else None
            hint = f" (use {alias!r})" if alias else ""
            problems.append(f"{label} has unknown role {role!r}{hint}; valid roles: {', '.join(ROLES)}")
        if "content" not in msg:
            problems.append(f"{label} has no 'content'; add the message text")
        else:
            p = _text_problem(f"{label} content", msg["content"])
            if p:
                problems.append(p)
        clean.append({"role": role, "content": msg.get("content")})
    roles = [m["role"] for m in clean]
    if items and all(r in ROLES for r in roles) and "assistant" not in roles:
        problems.append(
            "no assistant turn, so nothing to train on; add an assistant reply or drop the record"
        )
    for (label, _), role in zip([it for it in items if isinstance(it[1], dict)], roles):
        if role == "system" and label != items[0][0]:
            problems.append(
                f"{label} is a system message after the first turn; a system message may only come first"
            )
    return clean, problems


def record_to_messages(record: Any) -> tuple[list[dict] | None, list[str]]:
    """Detect the layout of one record and turn it into validated messages.

    Returns ``(messages, [])`` for a good record and ``(None, problems)`` otherwise; each problem is a
    sentence that names the field and says what to do.
    """
    if not isinstance(record, dict):
        return None, [f"is a {_json_type(record)}, not a JSON object; expected one of: {LAYOUTS}"]
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list):
            return None, [f"'messages' is a {_json_type(msgs)}, not a list of {{role, content}} objects"]
        if not msgs:
            return None, ["'messages' is empty; give at least a user and an assistant message"]
        items = [(f"messages[{i}]", m) for i, m in enumerate(msgs)]
    elif "prompt" in record or "completion" in record:
        if "prompt" not in record or "completion" not in record:
            have, miss = ("prompt", "completion") if "prompt" in record else ("completion", "prompt")
            return None, [f"has {have!r} but no {miss!r}; a prompt/completion record needs both"]
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            items = [(f"prompt[{i}]", m) for i, m in enumerate(prompt)]
            items += [(f"completion[{i}]", m) for i, m in enumerate(completion)]
            if not completion:
                return None, ["'completion' is an empty list; give the assistant message(s) to train on"]
        elif isinstance(prompt, list) or isinstance(completion, list):
            return None, ["'prompt' and 'completion' must both be strings or both lists of messages"]
        else:
            problems = [
                p for p in (_text_problem("prompt", prompt), _text_problem("completion", completion)) if p
            ]
            if problems:
                return None, problems
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], []
    elif "instruction" in record or "output" in record:
        if "instruction" not in record or "output" not in record:
            miss = "output" if "instruction" in record else "instruction"
            return None, [
                f"Alpaca record without {miss!r}; it needs 'instruction' and 'output' ('input' is optional)"
            ]
        instruction, inp, output = record["instruction"], record.get("input"), record["output"]
        problems = [
            p for p in (_text_problem("instruction", instruction), _text_problem("output", output)) if p
        ]
        if inp is not None and not isinstance(inp, str):
            problems.append(f'input is a {_json_type(inp)}, not a string; give text, "" or leave it out')
        if problems:
            return None, problems
        user = instruction + ("\n\n" + inp if inp and inp.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}], []
    else:
        keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        return None, [f"no recognized layout (keys: {keys}); expected one of: {LAYOUTS}"]
    clean, problems = _check_messages(items)
    return (None, problems) if problems else (clean, [])


# --------------------------------------------------------------------------------------------------
# Sources.


def _read_text(path: Path, shown: str) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{shown}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start}). "
            f"Fix: re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {shown} > fixed{path.suffix}`"
        ) from None
    if not text.strip():
        raise DataError(f"{shown}: the file is empty. Fix: point to a file with training records ({LAYOUTS})")
    return text


def _jsonl_records(path: Path, shown: str, problems: _Problems) -> Iterator[tuple[str, Any]]:
    # split on "\n" only: str.splitlines() would also split on U+2028 etc., legal inside JSON strings
    for n, line in enumerate(_read_text(path, shown).split("\n"), start=1):
        if not line.strip():
            continue
        loc = f"{shown}:{n}"
        try:
            yield loc, json.loads(line)
        except json.JSONDecodeError as e:
            problems.add(
                loc, f"malformed JSON: {e.msg} (column {e.colno}); each line must be one complete JSON object"
            )


def _json_records(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    text = _read_text(path, shown)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "Fix: make the file one JSON list of records"
        if e.msg == "Extra data":
            hint = "This looks like JSON Lines (one object per line): rename the file to .jsonl"
        raise DataError(f"{shown}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno}). {hint}") from None
    if not isinstance(data, list):
        keys = f" with keys {', '.join(repr(k) for k in list(data)[:8])}" if isinstance(data, dict) else ""
        raise DataError(
            f"{shown}: the top level is a {_json_type(data)}{keys}, not a list of records. Fix: make the file "
            f"a JSON list [{{...}}, {{...}}] (move the records out of any wrapper object), or use .jsonl"
        )
    for i, rec in enumerate(data):
        yield f"{shown}:record {i}", rec


def _parquet_records(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{shown}: reading Parquet needs pyarrow. Fix: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid & co. for a bad file
        raise DataError(
            f"{shown}: cannot read as Parquet ({e}). Fix: check the file or convert it to .jsonl"
        ) from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"{shown}:record {i}", rec


def _hub_records(source: str, split: str | None) -> Iterator[tuple[str, Any]]:
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source!r} is not a file here, so it was taken as a Hugging Face dataset id, but the `datasets` "
            f"package is not installed. Fix: pip install datasets, or give the path of a .jsonl, .json or "
            f".parquet file (relative paths are from {os.getcwd()})"
        ) from None
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # network, unknown id, unknown split...
        raise DataError(
            f"{source}[{split}]: cannot load the Hugging Face dataset ({type(e).__name__}: {e}). Fix: check the "
            f"dataset id and split name (ultrachat_200k uses split='train_sft'), or use a local file"
        ) from None
    for i, rec in enumerate(ds):
        yield f"{source}[{split}]:record {i}", rec


def load_conversations(source: str | Path, *, split: str | None = None) -> list[Conversation]:
    """Read every record of `source`, validate all of them, and return the conversations.

    `source` is a ``.jsonl``/``.ndjson`` file (one object per line, blank lines skipped), a ``.json``
    file (one top-level list of objects), a ``.parquet`` file, or -- when no such file exists -- a
    Hugging Face dataset id loaded with ``datasets.load_dataset(source, split=split or "train")``.
    `split` is only used for hub datasets and ignored for local files.

    Validation, per record: it is a JSON object in one of the accepted layouts (module docstring);
    every message is an object with a role in ROLES and non-empty string content; there is at least
    one assistant turn; a system turn appears only first. A conversation whose first non-system turn
    is the assistant's, or that ends on a user turn, is accepted (those turns are simply not trained
    on). The whole file is checked in one pass and all problems are raised as ONE DataError, listing
    the first 20 with their ``path:line`` (or ``path:record N``) and the fix.
    """
    problems = _Problems()
    if isinstance(source, Path) or Path(source).expanduser().exists() or _looks_like_path(str(source)):
        path = Path(source).expanduser()
        shown = str(source)
        if not path.exists():
            raise DataError(
                f"{shown}: no such file. Fix: check the path (relative paths are from {os.getcwd()})"
            )
        if path.is_dir():
            raise DataError(
                f"{shown}: is a directory. Fix: give the .jsonl, .json or .parquet file inside it"
            )
        kind = _SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(
                f"{shown}: unknown data file type {path.suffix!r}. Fix: use .jsonl (one JSON object per line), "
                f".json (a list of objects) or .parquet"
            )
        if kind == "jsonl":
            records: Iterable[tuple[str, Any]] = _jsonl_records(path, shown, problems)
        elif kind == "json":
            records = _json_records(path, shown)
        else:
            records = _parquet_records(path, shown)
    else:
        shown = str(source)
        records = _hub_records(shown, split)

    convs: list[Conversation] = []
    seen = 0
    for loc, rec in records:
        seen += 1
        messages, found = record_to_messages(rec)
        for p in found:
            problems.add(loc, p)
        if messages is not None:
            convs.append(Conversation(messages, loc))
    problems.raise_if_any(shown, _FIX_HINT)
    if not seen:
        raise DataError(f"{shown}: contains no records. Fix: add training records ({LAYOUTS})")
    return convs


def _looks_like_path(s: str) -> bool:
    """A string that cannot be a hub id: it has a data-file suffix or starts like a path."""
    return (
        Path(s).suffix.lower() in _SUFFIXES or s.startswith(("/", "./", "../", "~", "\\")) or s.count("/") > 1
    )


def split_eval(convs: Sequence[Conversation], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of `convs` for evaluation: ``(train, eval)``, both in the original order.

    Deterministic in (len(convs), fraction, seed) and independent of the global RNGs. With
    ``fraction > 0`` and at least 2 conversations, eval gets at least 1 and train keeps at least 1.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"eval fraction must be in [0, 1), got {fraction}")
    n = len(convs)
    n_eval = 0
    if fraction > 0 and n >= 2:
        n_eval = min(max(1, round(n * fraction)), n - 1)
    held = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    train = [c for i, c in enumerate(convs) if i not in held]
    evals = [c for i, c in enumerate(convs) if i in held]
    return train, evals


# --------------------------------------------------------------------------------------------------
# Tokens and the loss mask.


def render_conversation(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """`messages` as text through the tokenizer's own chat template (what training tokenizes); a
    template that cannot render them is a DataError."""
    return templates.render(tokenizer, messages, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], text: str, end_of_turn: str) -> list[tuple[int, int]]:
    """Character spans of `text` (the full render of `messages`) to train on: each assistant turn's
    content plus the `end_of_turn` string that closes it.

    Template-agnostic: the render of ``messages[:i]`` with the generation prompt must be a prefix of
    the full render, and assistant message i's content is the first occurrence of it from there (or of
    its stripped form, for templates that trim). Whitespace between the content and `end_of_turn` is
    included. ``end_of_turn=""`` trains on the content only.
    """
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render_conversation(tokenizer, messages[:i], add_generation_prompt=True)
        if not text.startswith(prefix):
            raise DataError(
                f"the chat template is not prefix-stable: rendering messages[:{i}] with the generation prompt "
                f"does not give the beginning of the full conversation, so assistant turns cannot be located. "
                f"Fix: use train_on='all', or a chat template that renders earlier turns the same way"
            )
        content = msg["content"]
        start = text.find(content, len(prefix))
        if start < 0:
            content = content.strip()
            start = text.find(content, len(prefix))
        if start < 0:
            raise DataError(
                f"the content of assistant messages[{i}] does not appear verbatim in the chat template's "
                f"output, so it cannot be masked. Fix: use train_on='all', or a template that keeps content"
            )
        end = start + len(content)
        if end_of_turn:
            after = end
            while after < len(text) and text[after].isspace():
                after += 1
            if not text.startswith(end_of_turn, after):
                raise DataError(
                    f"end_of_turn {end_of_turn!r} does not follow assistant messages[{i}] in the chat template's "
                    f"output (it is followed by {text[end : end + 20]!r}). Fix: set end_of_turn to the token that "
                    f"closes assistant turns in this template (Phi-3: '<|end|>'), or '' to train on content only"
                )
            end = after + len(end_of_turn)
        spans.append((start, end))
    return spans


def encode(
    tokenizer, messages: list[dict], *, end_of_turn: str, train_on: str = "assistant"
) -> tuple[list[int], list[bool]]:
    """Tokenize one conversation and say which tokens are training targets.

    The conversation is rendered with the tokenizer's OWN chat template and tokenized once, with
    ``add_special_tokens=False`` -- exactly what ``apply_chat_template(tokenize=True)`` does at
    generation time, so training and inference see the same tokens. ``supervised[t]`` is True when
    token t is a target (predicted from tokens < t). With ``train_on="assistant"`` the targets are
    exactly the tokens overlapping an assistant turn's content or the `end_of_turn` token closing it
    (so the model learns to stop); never the role headers, the prompt, the newline after
    ``<|end|>`` or the final ``<|endoftext|>``. ``train_on="all"`` makes every token a target. For
    Phi-3 (X = supervised)::

         <|user|> \\n H i <|end|> \\n <|assistant|> \\n H e l l o <|end|> \\n <|endoftext|>
            .     .  . .    .     .       .        .  X X X X X    X     .      .

    A token is supervised if its character span overlaps a supervised span, so a token straddling
    the header and the content (SentencePiece's "\\nH") counts as content.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    text = render_conversation(tokenizer, messages, add_generation_prompt=False)
    missing = templates.missing_content(text, messages)
    if missing:
        raise DataError(templates.describe_missing(missing))
    try:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    except NotImplementedError:
        raise LorafitError(
            "the loss mask needs a fast (Rust) tokenizer with offset mapping; load it with use_fast=True"
        ) from None
    ids = list(enc["input_ids"])
    if train_on == "all":
        return ids, [True] * len(ids)
    spans = assistant_spans(tokenizer, messages, text, end_of_turn)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    sup = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        sup |= (offsets[:, 0] < b) & (offsets[:, 1] > a) & (offsets[:, 1] > offsets[:, 0])
    return ids, sup.tolist()


# --------------------------------------------------------------------------------------------------
# The tokenized dataset.


@dataclass
class TokenizedData:
    """All examples as three flat arrays, so that a large dataset is one memory-mappable block.

    Example i is ``tokens[offsets[i]:offsets[i+1]]`` with mask ``supervised[offsets[i]:offsets[i+1]]``::

        tokens      [ a a a a | b b b | c c c c c ]    int32
        supervised  [ . . X X | . X X | . . . X X ]    bool
        offsets     [ 0,       4,      7,         12 ] int64, len(data) + 1
        sources     [ "f.jsonl:1", "f.jsonl:2", "f.jsonl:5" ]
    """

    tokens: np.ndarray
    supervised: np.ndarray
    offsets: np.ndarray
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], self.supervised[a:b]


@dataclass
class TokenStats:
    """What tokenization did. `supervised_tokens` counts every supervised token; `targets` leaves out
    each example's first token (nothing precedes it, so it is never a label) and is the number of
    tokens the loss is taken over in one epoch."""

    conversations: int
    examples: int
    tokens: int
    supervised_tokens: int
    targets: int
    truncated: int
    dropped: int
    max_len: int
    mean_len: float
    lengths: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=np.int64))
    # What happened to system messages: counts of "kept", "folded", "dropped" (see lorafit.templates).
    system_messages: dict[str, int] = field(default_factory=dict)

    def histogram(self, bins: int = 10) -> list[tuple[int, int, int]]:
        """Example lengths in `bins` equal integer bins: ``(lo, hi, count)`` with ``lo <= length < hi``."""
        if not len(self.lengths):
            return []
        width = max(1, math.ceil((self.max_len + 1) / bins))
        counts = np.bincount(np.asarray(self.lengths) // width, minlength=bins)
        return [(k * width, (k + 1) * width, int(c)) for k, c in enumerate(counts)]

    def to_dict(self) -> dict:
        return {
            "conversations": self.conversations,
            "examples": self.examples,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
            "targets": self.targets,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "max_len": self.max_len,
            "mean_len": self.mean_len,
            "system_messages": dict(self.system_messages),
        }


def tokenize(
    tokenizer,
    conversations: Sequence[Conversation],
    *,
    max_seq_length: int,
    end_of_turn: str,
    train_on: str = "assistant",
    truncation: bool = True,
    system_message: str = "auto",
) -> tuple[TokenizedData, TokenStats]:
    """Encode every conversation (see `encode`) into one TokenizedData.

    System messages follow `system_message` (see `lorafit.templates`): with "auto", a template that
    renders no system message gets its text folded into the first user turn, counted in
    ``stats.system_messages`` and reported in one SystemMessageWarning naming the data.

    Truncation: an example longer than `max_seq_length` keeps its first `max_seq_length` tokens and is
    counted in ``stats.truncated`` (its last reply may lose its end token); with ``truncation=False``
    every over-long example is listed in one DataError instead. An example left with no target (no
    supervised token after its first) is dropped and counted in ``stats.dropped``. Encoding problems
    (a template that cannot render a conversation, content not found) are also raised together.
    """
    if max_seq_length < 2:
        raise ConfigError(f"max_seq_length must be at least 2, got {max_seq_length}")
    problems = _Problems()
    too_long = _Problems()
    toks: list[np.ndarray] = []
    sups: list[np.ndarray] = []
    sources: list[str] = []
    truncated = dropped = 0
    template = templates.ChatTemplate.probe(tokenizer)
    system = Counter()
    for conv in conversations:
        try:
            messages, action = templates.prepare(conv.messages, template, system_message)
            system.update([action] if action else [])
            ids, sup = encode(tokenizer, messages, end_of_turn=end_of_turn, train_on=train_on)
        except DataError as e:
            problems.add(conv.location, str(e))
            continue
        if len(ids) > max_seq_length:
            if not truncation:
                too_long.add(conv.location, f"{len(ids)} tokens > max_seq_length {max_seq_length}")
                continue
            ids, sup = ids[:max_seq_length], sup[:max_seq_length]
            truncated += 1
        if not any(sup[1:]):
            dropped += 1
            continue
        toks.append(np.asarray(ids, dtype=np.int32))
        sups.append(np.asarray(sup, dtype=bool))
        sources.append(conv.location)
    problems.raise_if_any(
        "tokenization",
        "Fix: change the chat template, train_on, end_of_turn or data.system_message as said above",
    )
    if system_message == "auto" and system["folded"]:
        where = conversations[0].location.rsplit(":", 1)[0] if conversations else "the data"
        warnings.warn(
            f"{where}: {system['folded']} of {len(conversations)} conversations have a system message that this "
            f"model's chat template does not render; its text was folded into the first user turn (system text, a "
            f"blank line, then the user text). Set data.system_message to drop or error to change this",
            SystemMessageWarning,
            stacklevel=2,
        )
    too_long.raise_if_any(
        f"examples longer than max_seq_length={max_seq_length}",
        "Fix: raise max_seq_length, shorten these conversations, or allow truncation",
    )
    lengths = np.asarray([len(t) for t in toks], dtype=np.int64)
    offsets = np.zeros(len(toks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = TokenizedData(
        tokens=np.concatenate(toks) if toks else np.zeros(0, dtype=np.int32),
        supervised=np.concatenate(sups) if sups else np.zeros(0, dtype=bool),
        offsets=offsets,
        sources=sources,
    )
    n_sup = int(data.supervised.sum())
    first_sup = int(data.supervised[offsets[:-1]].sum()) if len(toks) else 0
    stats = TokenStats(
        conversations=len(conversations),
        examples=len(toks),
        tokens=int(lengths.sum()),
        supervised_tokens=n_sup,
        targets=n_sup - first_sup,
        truncated=truncated,
        dropped=dropped,
        max_len=int(lengths.max()) if len(lengths) else 0,
        mean_len=float(lengths.mean()) if len(lengths) else 0.0,
        lengths=lengths,
        system_messages=dict(system),
    )
    return data, stats


__all__ = [
    "ROLES",
    "TRAIN_ON",
    "Conversation",
    "TokenStats",
    "TokenizedData",
    "assistant_spans",
    "encode",
    "load_conversations",
    "record_to_messages",
    "render_conversation",
    "split_eval",
    "tokenize",
]
