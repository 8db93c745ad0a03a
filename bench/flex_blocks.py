"""How much of a packed row each attention route computes, on bench/gpu.py's data (machine-independent).

    python -m bench.flex_blocks [--seq 2048] [--conversations 3000] [--rows 200]

Packs the synthetic conversations of `bench.data` (the ones `bench/gpu.sh` trains on) into rows of
`seq` tokens with lorafit's packer, builds lorafit_flex's BlockMask for each row (`PackedMasks`,
128 x 128 blocks) and counts, as a share of the row's full T x T score grid:

- masked sdpa over the whole row (transformers' sdpa with a block-diagonal mask): all of it;
- causal over the whole row (a causal kernel that ignores conversation boundaries): about half;
- flex_attention with the document-causal block mask: the blocks it computes (partial + full);
- per conversation (lorafit_sdpa, flash-attention varlen): the causal triangle of each conversation.

Counts scores, not time: what a kernel does per score differs (partial blocks also evaluate the mask).
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import torch

from bench.data import make_conversations, n_tokens
from lorafit.attention import PackedMasks
from lorafit.packing import pack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--conversations", type=int, default=3000)
    ap.add_argument("--rows", type=int, default=200, help="rows measured (drawn at random, seed 0)")
    a = ap.parse_args()
    convs = make_conversations(a.conversations, seed=0, max_tokens=min(a.seq - 12, 2000))  # as bench/gpu.py
    lengths = np.array([n_tokens(c["messages"]) for c in convs])
    packed = pack(SimpleNamespace(lengths=lengths, sources=[]), a.seq)  # longest conversations first
    pick = np.random.default_rng(0).choice(len(packed), min(a.rows, len(packed)), replace=False)
    rows = [packed[i] for i in sorted(pick)]
    grid = flex = full = exact = causal = 0
    for row in rows:
        seg = [int(lengths[i]) for i in row]
        if sum(seg) < a.seq:
            seg.append(a.seq - sum(seg))  # padding: one more block of its own, as collate makes it
        bm = PackedMasks([seg], torch.device("cpu")).block_mask(None)
        rb, cb = bm.BLOCK_SIZE
        computed = int(bm.kv_num_blocks.sum()) + int(bm.full_kv_num_blocks.sum())
        flex += computed * rb * cb
        full += int(bm.full_kv_num_blocks.sum()) * rb * cb
        grid += a.seq * a.seq
        causal += a.seq * (a.seq + 1) // 2
        exact += sum(n * (n + 1) // 2 for n in seg[: len(row)])
    n_conv = sum(len(r) for r in rows)
    print(f"{len(rows)} of {len(packed)} rows of {a.seq} tokens, {n_conv / len(rows):.1f} conversations per row "
          f"(bench.data, {a.conversations} conversations packed; torch {torch.__version__})")  # fmt: skip
    for label, n in (("masked sdpa, whole row", grid), ("causal, whole row", causal),
                     ("flex_attention, block mask", flex), ("per conversation", exact)):  # fmt: skip
        print(f"  {label:<28} {100 * n / grid:5.1f}% of the T x T scores")
    print(f"  flex blocks that need no mask evaluation (full): {100 * full / flex:.1f}% of those it computes")


if __name__ == "__main__":
    main()
