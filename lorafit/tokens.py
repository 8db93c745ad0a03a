"""Conversations to tokens: render with the model's chat template, tokenize once, mark the loss mask.

    list[Conversation]            (lorafit.data)
        |  tokenize()             encode() each: apply data.system_message (lorafit.templates), render
        v                         with the tokenizer's own chat template, tokenize once, mark the
    TokenizedData, TokenStats     assistant tokens; truncate to max_seq_length; drop the untrainable
                                  (flat int32 tokens + bool mask + offsets; rows: lorafit.packing)

Nothing here writes files or touches the global RNGs.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lorafit import templates
from lorafit.data import TRAIN_ON, Conversation, Problems
from lorafit.errors import ConfigError, DataError, LorafitError
from lorafit.templates import SystemMessageWarning


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


# At most this many characters of a conversation's message text are tokenized per token of
# max_seq_length: far more than any tokenizer's average (about 4 for English text), so only text that
# would be truncated away anyway is clipped, and one enormous record cannot exhaust memory.
CHARS_PER_TOKEN = 8


def clip_messages(messages: list[dict], max_seq_length: int) -> tuple[list[dict], bool]:
    """`messages` with at most ``CHARS_PER_TOKEN * max_seq_length`` characters of content in all, and
    whether anything was cut: the message that crosses the bound is cut there and later ones are left
    out. Text beyond the bound lies past max_seq_length tokens, where truncation would cut it anyway."""
    budget = CHARS_PER_TOKEN * max_seq_length
    if sum(len(m["content"]) for m in messages) <= budget:
        return messages, False
    out: list[dict] = []
    for m in messages:
        if budget <= 0:
            break
        out.append(m if len(m["content"]) <= budget else {**m, "content": m["content"][:budget]})
        budget -= len(m["content"])
    return out, True


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
    # Conversations whose text was clipped to CHARS_PER_TOKEN * max_seq_length characters before
    # tokenizing (`clip_messages`); each is also counted in `truncated`.
    clipped: int = 0

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
            "clipped": self.clipped,
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
    problems = Problems()
    too_long = Problems()
    toks: list[np.ndarray] = []
    sups: list[np.ndarray] = []
    sources: list[str] = []
    truncated = dropped = clipped = 0
    template = templates.ChatTemplate.probe(tokenizer)
    system = Counter()
    for conv in conversations:
        messages, cut = clip_messages(conv.messages, max_seq_length)
        if cut and not truncation:
            too_long.add(
                conv.location,
                f"more than {CHARS_PER_TOKEN * max_seq_length:,} characters, far more than "
                f"max_seq_length {max_seq_length} tokens can hold",
            )
            continue
        try:
            messages, action = templates.prepare(messages, template, system_message)
            system.update([action] if action else [])
            ids, sup = encode(tokenizer, messages, end_of_turn=end_of_turn, train_on=train_on)
        except DataError as e:
            problems.add(conv.location, str(e))
            continue
        clipped += cut
        if len(ids) > max_seq_length or cut:
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
        clipped=clipped,
    )
    return data, stats


__all__ = [
    "CHARS_PER_TOKEN",
    "TokenStats",
    "TokenizedData",
    "assistant_spans",
    "clip_messages",
    "encode",
    "render_conversation",
    "tokenize",
]
