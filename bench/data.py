"""A deterministic synthetic chat dataset of mixed lengths, for the benchmarks.

Conversations are made of pseudo-words (syllable strings drawn with a Zipf law), so a character-level
model has something to learn (spelling, word frequencies, and replies that reuse the user's words) and
the loss keeps falling over the few steps a benchmark runs. Every conversation, rendered with Phi-3's
chat template by the character-level tokenizer of `lorafit.tiny`, is between `MIN_TOKENS` and
`MAX_TOKENS` tokens long (roughly uniform), so nothing is truncated at a sequence length of 512.

Token count of a conversation under that tokenizer (one token per character, one per special token):
sum over messages of (len(content) + 4) [`<|role|>`, `\\n`, `<|end|>`, `\\n`] + 1 [`<|endoftext|>`].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MIN_TOKENS = 30
MAX_TOKENS = 500
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["ch", "sh", "th", "qu", "x"]
SYSTEMS = ["Be brief.", "You are a helpful assistant.", "Answer in plain words.", "Reply like a poet."]


def _lexicon(rng: np.random.Generator, n: int = 3000) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        k = int(rng.integers(1, 4))
        words.add("".join(SYLLABLES[int(i)] for i in rng.integers(0, len(SYLLABLES), size=k)))
    out = sorted(words)
    rng.shuffle(out)  # frequency rank independent of spelling
    return out


class _Words:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.words = _lexicon(rng)
        p = 1.0 / np.arange(1, len(self.words) + 1) ** 1.1  # Zipf
        self.cdf = np.cumsum(p / p.sum())

    def text(self, chars: int, reuse: list[str] | None = None) -> str:
        """About `chars` characters of words (at least one word); half of them from `reuse` if given."""
        out: list[str] = []
        n = 0
        while n < chars or not out:
            if reuse and self.rng.random() < 0.5:
                w = reuse[int(self.rng.integers(0, len(reuse)))]
            else:
                w = self.words[min(int(np.searchsorted(self.cdf, self.rng.random())), len(self.words) - 1)]
            out.append(w)
            n += len(w) + 1
        s = " ".join(out)
        return s[0].upper() + s[1:] + "."


def n_tokens(messages: list[dict]) -> int:
    """Tokens of `messages` under lorafit.tiny's character-level Phi-3 tokenizer (see module doc)."""
    return sum(len(m["content"]) + 4 for m in messages) + 1


def n_targets(messages: list[dict]) -> int:
    """Loss targets of `messages` for lorafit's assistant-only masking: each reply's characters and its <|end|>."""
    return sum(len(m["content"]) + 1 for m in messages if m["role"] == "assistant")


def conversation(
    rng: np.random.Generator, words: _Words, max_tokens: int = MAX_TOKENS, min_tokens: int = MIN_TOKENS
) -> dict:
    target = int(rng.integers(min_tokens, max_tokens + 1))
    turns = int(rng.integers(1, 1 + max(1, min(4, target // 90))))
    msgs: list[dict] = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": SYSTEMS[int(rng.integers(0, len(SYSTEMS)))]})
    overhead = n_tokens(msgs) + 8 * turns  # headers of the turns to come
    budget = max(2 * turns * 6, target - overhead)
    for t in range(turns):
        share = budget // (turns - t)
        budget -= share
        u = max(3, int(share * rng.uniform(0.25, 0.5)))
        user = words.text(u)
        reply = words.text(max(3, share - len(user)), reuse=user.lower().rstrip(".").split())
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    while n_tokens(msgs) > max_tokens:  # trim the last reply to the limit, keeping at least one word
        last = msgs[-1]["content"].rstrip(".").split()
        if len(last) <= 1:
            break
        msgs[-1]["content"] = " ".join(last[:-1]) + "."
    return {"messages": msgs}


def make_conversations(
    n: int, seed: int, max_tokens: int = MAX_TOKENS, min_tokens: int = MIN_TOKENS
) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = _Words(np.random.default_rng(1234))  # one lexicon for every split and size
    return [conversation(rng, words, max_tokens, min_tokens) for _ in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_dataset(
    out: Path,
    n_train: int,
    n_eval: int,
    seed: int = 0,
    max_tokens: int = MAX_TOKENS,
    min_tokens: int = MIN_TOKENS,
    row: int | None = None,
) -> dict:
    """train.jsonl (n_train conversations) and eval.jsonl (n_eval, a different seed) in `out`, each
    conversation of `min_tokens` to `max_tokens` tokens (roughly uniform), in 1-4 turns. With `row`,
    ``mean_context`` counts a conversation longer than a row as cut to it (as training sees it)."""
    train = make_conversations(n_train, seed, max_tokens, min_tokens)
    evals = make_conversations(n_eval, seed + 10_000, max_tokens, min_tokens)
    lengths = np.array([n_tokens(c["messages"]) for c in train], dtype=np.int64)
    targets = sum(n_targets(c["messages"]) for c in train)
    seen = lengths if row is None else np.minimum(lengths, row)
    return {
        "train": str(write_jsonl(out / "train.jsonl", train)),
        "eval": str(write_jsonl(out / "eval.jsonl", evals)),
        "n_train": n_train,
        "n_eval": n_eval,
        "train_tokens": int(lengths.sum()),
        "min_len": int(lengths.min()),
        "max_len": int(lengths.max()),
        "mean_len": float(lengths.mean()),
        # fraction of tokens that are loss targets (assistant content + its <|end|>)
        "target_fraction": targets / int(lengths.sum()),
        # mean number of keys a token attends to (causal, within its own conversation)
        "mean_context": float((seen * (seen + 1) // 2).sum() / seen.sum()),
    }


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
