"""Training data: read and validate conversations (tokens and the loss mask: `lorafit.tokens`).

Data flow (this module, then `lorafit.tokens`, then `lorafit.packing`)::

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
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorafit.errors import ConfigError, DataError
from lorafit.lora.files import not_regular

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


class Problems:
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
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"{label} has a lone surrogate code point (U+{ord(value[e.start]):04X}) at character {e.start}, "
            f"which is not text (an escaped half of a UTF-16 pair, such as \\ud83d); remove it or give the full pair"
        )
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


def _not_utf8(shown: str, path: Path, line: int, byte: int, offset: int) -> DataError:
    return DataError(
        f"{shown}:{line}: not valid UTF-8 (byte 0x{byte:02x} at byte offset {offset}). "
        f"Fix: re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {shown} > fixed{path.suffix}`"
    )


def _empty(shown: str) -> DataError:
    return DataError(f"{shown}: the file is empty. Fix: point to a file with training records ({LAYOUTS})")


def _read_text(path: Path, shown: str) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(shown, path, raw[: e.start].count(b"\n") + 1, raw[e.start], e.start) from None
    if not text.strip():
        raise _empty(shown)
    return text


MAX_LINE_BYTES = 256 << 20  # one JSONL line; a record that trains is far shorter (tokens.CHARS_PER_TOKEN)


def _jsonl_lines(path: Path, shown: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, read one line at a time: the file's text is never
    held whole (a .json file is: one JSON value is parsed at once). A line longer than MAX_LINE_BYTES
    is refused as soon as it is seen (a file without newlines would otherwise be one line, read whole)."""
    offset, seen = 0, False
    with open(path, "rb") as f:
        # binary lines split on b"\n" only, not on U+2028
        for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(
                    f"{shown}:{n}: a line longer than {MAX_LINE_BYTES >> 20} MiB (at byte offset {offset}); a record "
                    "that trains is far shorter, since text beyond what max_seq_length holds is clipped. Fix: check "
                    "that the file is JSON Lines (one record per line, each ending in a newline), or shorten the record"
                )
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                start = e.start + (3 if n == 1 and raw.startswith(b"\xef\xbb\xbf") else 0)
                raise _not_utf8(shown, path, n, raw[start], offset + start) from None
            offset += len(raw)
            if line.strip():
                seen = True
                yield n, line
    if not seen:
        raise _empty(shown)


def _unreadable_json(e: Exception) -> str:
    """The problem text for valid-looking JSON Python cannot read: nesting too deep, a huge integer."""
    if isinstance(e, RecursionError):
        return "JSON nested too deeply to read; flatten the record (messages are a list of {role, content} objects)"
    return f"unreadable JSON value ({str(e)[:120]}); give numbers of sensible size, or write them as strings"


def _jsonl_records(path: Path, shown: str, problems: Problems) -> Iterator[tuple[str, Any]]:
    for n, line in _jsonl_lines(path, shown):
        loc = f"{shown}:{n}"
        try:
            yield loc, json.loads(line)
        except json.JSONDecodeError as e:
            problems.add(
                loc, f"malformed JSON: {e.msg} (column {e.colno}); each line must be one complete JSON object"
            )
        except (ValueError, RecursionError) as e:
            problems.add(loc, _unreadable_json(e))


def _json_records(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    text = _read_text(path, shown)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "Fix: make the file one JSON list of records"
        if e.msg == "Extra data":
            hint = "This looks like JSON Lines (one object per line): rename the file to .jsonl"
        raise DataError(f"{shown}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno}). {hint}") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{shown}: {_unreadable_json(e)}") from None
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

    Cost: a path that is not a regular file (FIFO, device) is refused before it is opened; a .jsonl
    file is read one line at a time; one record is bounded later (`lorafit.tokens` clips its text to
    what max_seq_length can hold). The whole file is not capped -- a large dataset must keep working
    -- so memory follows the data: every record is held (about 3.4x the file's size for short chats,
    `python -m bench.data_memory`). A .json file is one JSON value and is parsed whole.
    """
    problems = Problems()
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
        _check_regular(path, shown)
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


def _check_regular(path: Path, shown: str) -> None:
    """Refuse a data path that is not (or does not link to) a regular file: a device such as /dev/zero,
    a FIFO or a socket would be read without end."""
    try:
        os.stat(path)
    except OSError as e:
        raise DataError(
            f"{shown}: cannot read ({e.strerror}). Fix: check the path and its permissions"
        ) from None
    problem = not_regular(path)
    if problem:
        raise DataError(
            f"{shown}: {problem}. Fix: write the records to a .jsonl, .json or .parquet file and give its path"
        )


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


__all__ = [
    "ROLES",
    "TRAIN_ON",
    "Conversation",
    "load_conversations",
    "record_to_messages",
    "split_eval",
]
