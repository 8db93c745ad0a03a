"""What a data file costs in memory: peak RSS of reading a .jsonl file (lorafit.data.load_conversations)
and of tokenizing part of it (lorafit.tokens.tokenize, tiny Phi-3 tokenizer). The README's "Guarantees"
figures come from this script.

    python -m bench.data_memory [--mb 200] [--tokenize-mb 20] [--workdir /tmp/lorafit-data-memory]

Each measurement runs in a fresh process (peak RSS is per process). The file holds short chats (a
40-word question, a 50-word answer) like the demo's, one per line.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

WORDS = ["alpha", "beta", "gamma", "delta", "tree", "house", "river", "number", "seven", "blue"]


def write_data(path: Path, megabytes: int) -> int:
    """Write about `megabytes` MB of chat records; returns how many."""
    rng, n = random.Random(0), 0
    with open(path, "w") as f:
        while f.tell() < megabytes * 1_000_000:
            user = " ".join(rng.choice(WORDS) for _ in range(40))
            reply = " ".join(rng.choice(WORDS) for _ in range(50))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": reply}]}) + "\n")  # fmt: skip
            n += 1
    return n


def measure(path: str, tokenize: bool) -> dict:
    """In this process: read (and tokenize) `path`; peak RSS in MB after each step."""
    from lorafit.data import load_conversations

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

    t0 = time.perf_counter()
    convs = load_conversations(path)
    out = {"records": len(convs), "read_seconds": round(time.perf_counter() - t0, 1), "read_peak_mb": peak()}
    if tokenize:
        from lorafit.tiny import build_tokenizer
        from lorafit.tokens import tokenize as tok_data

        data, _ = tok_data(build_tokenizer(), convs, max_seq_length=2048, end_of_turn="<|end|>")
        out |= {"tokens": int(data.lengths.sum()), "tokenize_peak_mb": peak()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=200, help="size of the file that is read")
    p.add_argument("--tokenize-mb", type=int, default=20, help="size of the file that is also tokenized")
    p.add_argument("--workdir", default="/tmp/lorafit-data-memory")
    p.add_argument("--measure", nargs=2, metavar=("PATH", "TOKENIZE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure[0], a.measure[1] == "1")))
        return
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for mb, tok in ((a.mb, "0"), (a.tokenize_mb, "1")):
        path = work / f"chats-{mb}mb.jsonl"
        if not path.exists():
            write_data(path, mb)
        cmd = [sys.executable, "-m", "bench.data_memory", "--measure", str(path), tok]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(f"{path.name} ({path.stat().st_size / 1e6:.0f} MB): {json.dumps(res)}")


if __name__ == "__main__":
    main()
