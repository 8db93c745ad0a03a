"""Rows, packing and batches: from a TokenizedData to the tensors a training step feeds the model.

Data flow (after `lorafit.tokens.tokenize`)::

    TokenizedData --pack()/single_rows()--> rows: list[list[int]]     (example indices per row)
    rows --Batches.epoch_batches(epoch)--> micro-batches for this rank (lists of rows)
    batch --collate()--> {"input_ids", "position_ids", "labels", "num_targets", "target_index", "segments"}

A *row* is one line of the (B, T) batch. Packed mode puts several short examples in one row, so a
batch holds few padding tokens; padded mode puts one example per row (and, when the attention keeps
segments apart, a micro-batch's examples end to end in one row with no padding: `one_row`). All are
fed the same way:
``model(input_ids=..., position_ids=..., use_cache=False)`` with NO attention_mask, and the loss is
``cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100, reduction="sum") / num_targets``
(labels are already shifted).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lorafit.errors import ConfigError, DataError

if TYPE_CHECKING:
    from lorafit.tokens import TokenizedData

IGNORE_INDEX = -100


def pack(data: TokenizedData, max_seq_length: int) -> list[list[int]]:
    """Pack examples into rows of at most `max_seq_length` tokens with Best-Fit-Decreasing.

    Examples are taken longest first (ties by index) and each goes into the open row with the LEAST
    room that still fits it, or a new row. BFD needs at most 11/9 OPT + 6/9 rows, and it is
    deterministic: the same lengths always give the same rows. Every example appears in exactly one
    row; within a row, examples are in placement order::

        max_seq_length = 10, lengths a=7 b=5 c=4 d=3 e=1
        row 0: a a a a a a a d d d      (a, then d fits best)
        row 1: b b b b b c c c c e      (b, c, e)

    Cost is O(n log n): open rows are bucketed by their remaining room.
    """
    lengths = np.asarray(data.lengths)
    if len(lengths) and int(lengths.max()) > max_seq_length:
        i = int(lengths.argmax())
        raise DataError(
            f"example {i} ({data.sources[i] if i < len(data.sources) else '?'}) has {int(lengths[i])} tokens, "
            f"more than max_seq_length={max_seq_length}. Fix: tokenize with the same max_seq_length"
        )
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, then by index
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # remaining room -> heap of row ids with that room
    rooms: list[int] = []  # sorted keys of by_room
    for i in order.tolist():
        need = int(lengths[i])
        k = bisect_left(rooms, need)
        if k < len(rooms):
            room = rooms[k]
            heap = by_room[room]
            r = heapq.heappop(heap)
            if not heap:
                del by_room[room]
                rooms.pop(k)
            rows[r].append(i)
            left = room - need
        else:
            r = len(rows)
            rows.append([i])
            left = max_seq_length - need
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                insort(rooms, left)
            heapq.heappush(by_room[left], r)
    return rows


def single_rows(data: TokenizedData) -> list[list[int]]:
    """Padded mode: one example per row, in dataset order."""
    return [[i] for i in range(len(data))]


def one_row(rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """An unpacked micro-batch's rows laid end to end as ONE row, so nothing is padded::

        rows  [a] [b] [c]          padded (3, 4):  a0 a1 a2 a3 | b0 b1 p p | c0 c1 c2 p
        one_row -> [[a, b, c]]     (1, 10):        a0 a1 a2 a3 b0 b1 c0 c1 c2

    `collate` restarts the position_ids at every conversation and gives each its own segment, so a
    conversation computes exactly what it would in its own padded row (packing without reordering),
    and no layer runs on padding. Only for attention that keeps segments apart
    (`lorafit.attention.attends_per_segment`)."""
    return [[i for row in rows for i in row]]


def collate(
    data: TokenizedData, rows: Sequence[Sequence[int]], pad_id: int, pad_to: int | None = None
) -> dict:
    """Build the tensors of one micro-batch from `rows` (lists of example indices).

    * ``input_ids`` (B, T) long: each row's examples concatenated, right-padded with `pad_id` to
      T = the longest row (or `pad_to`, e.g. for fixed shapes).
    * ``position_ids`` (B, T) long: restart at 0 for every example, and again for the padding.
    * ``labels`` (B, T) long, ALREADY SHIFTED: ``labels[b, t] = input_ids[b, t+1]`` when token t+1
      is supervised and in the same example as t, else -100. So each example's first token is never
      a label, no label crosses an example boundary, and padding has none. Use
      ``cross_entropy(logits[b, t], labels[b, t])`` directly, without shifting again.
    * ``num_targets``: int, the number of labels != -100 (divide the summed loss by it).
    * ``target_index`` (num_targets,) long: the flat positions in B*T of those labels, ascending
      (`lorafit.loss` picks the target rows with it, known here on the host, so no device sync).
    * ``segments``: per row, the lengths of its examples and of its padding (summing to T), for
      `lorafit.attention` (attention per conversation instead of through a mask).

    Why no attention_mask: given ``attention_mask=None``, no cache (``use_cache=False`` -- Phi-3
    otherwise creates one, which disables this) and position_ids, transformers' mask builder
    (``find_packed_sequence_indices``) starts a new sequence wherever a position does not follow
    the previous one by 1, and makes the causal mask block-diagonal. RoPE sees each example's own
    positions. So a packed example computes exactly what it would alone; padding is just one more
    block that nobody attends to::

        input_ids     a0 a1 a2 b0 b1 p  p          (p = pad_id)
        position_ids   0  1  2  0  1 0  1
        labels        a1 a2  .  b1  . .  .         (. = -100; b0 and the pads are never targets)

        attention (row = query, X = may attend)
                a0 a1 a2 b0 b1 p  p
            a0  X
            a1  X  X
            a2  X  X  X
            b0           X
            b1           X  X
            p                  X
            p                  X  X

    The same holds for eager, sdpa and flex attention. flash_attention_2 reads the boundaries from
    the position_ids only for a batch of ONE row (otherwise a row's conversations attend to each
    other), so `lorafit.loss` feeds it the batch flattened to one row (`lorafit.attention.flat_batch`).
    """
    import torch

    if not rows:
        raise ValueError("collate needs at least one row")
    offsets = data.offsets
    row_lens = [sum(int(offsets[i + 1] - offsets[i]) for i in row) for row in rows]
    width = max(row_lens)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({width} tokens)")
        width = pad_to
    b = len(rows)
    input_ids = np.full((b, width), pad_id, dtype=np.int64)
    position_ids = np.zeros((b, width), dtype=np.int64)
    labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
    segments = []
    for r, row in enumerate(rows):
        cur = 0
        lengths = []
        for i in row:
            toks, sup = data.example(int(i))
            n = len(toks)
            input_ids[r, cur : cur + n] = toks
            position_ids[r, cur : cur + n] = np.arange(n)
            labels[r, cur : cur + n - 1] = np.where(sup[1:], toks[1:], IGNORE_INDEX)
            cur += n
            lengths.append(n)
        position_ids[r, cur:] = np.arange(width - cur)
        segments.append(lengths + ([width - cur] if width > cur else []))
    target_index = np.flatnonzero(labels != IGNORE_INDEX)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(position_ids),
        "labels": torch.from_numpy(labels),
        "num_targets": len(target_index),
        "target_index": torch.from_numpy(target_index.astype(np.int64)),
        "segments": segments,
    }


def to_device(batch: dict, device) -> dict:
    """A collated batch with its tensors on `device` (other entries as they are)."""
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


class Batches:
    """Micro-batches of rows for each epoch, shuffled reproducibly and sharded across ranks.

    For epoch e the rows are permuted with ``numpy.random.default_rng((seed, epoch))`` (never the
    global RNGs), cut into batches of `batch_size` rows (the last one smaller unless `drop_last`),
    and dealt round-robin: rank r gets batches r, r + world_size, r + 2 * world_size, ... Every rank
    must run the same number of steps (or the collective ops hang), so the total is cut to a multiple
    of world_size: up to world_size - 1 trailing batches are skipped each epoch -- different ones each
    epoch when shuffling. Ranks never share a row::

        rows (shuffled)  7 2 9 | 4 0 5 | 1 8 3 | 6      batch_size=3, world_size=2
        batches          B0      B1      B2      B3
        rank 0: B0 B2    rank 1: B1 B3
    """

    def __init__(
        self,
        rows: Sequence[Sequence[int]],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rows = [list(r) for r in rows]
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{len(self.rows)} rows make no full round of batches (batch_size={batch_size}, "
                f"world_size={world_size}, drop_last={drop_last}). Fix: add data or lower batch_size"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank gets per epoch (the same on every rank)."""
        n = len(self.rows)
        total = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return total // self.world_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches (each a list of rows) for `epoch`; the same for the same (seed, epoch)."""
        n = len(self.rows)
        order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
        per_rank = self.batches_per_epoch
        out = []
        for k in range(per_rank):
            start = (k * self.world_size + self.rank) * self.batch_size
            out.append([self.rows[j] for j in order[start : start + self.batch_size].tolist()])
        return out
