"""Evaluation: token-weighted loss and perplexity of a model on tokenized conversations.

The loss is the mean cross-entropy over every target token of the set (assistant tokens by
default), not a mean of per-batch means, so it does not depend on the batch size or packing.
"""

from __future__ import annotations

import math

import torch

from lorafit.attention import attends_per_segment
from lorafit.distributed import all_sum
from lorafit.loss import loss_sum
from lorafit.packing import collate, one_row, pack, single_rows, to_device
from lorafit.precision import autocast, compute_dtype
from lorafit.tokens import TokenizedData


def rows_for(data: TokenizedData, max_seq_length: int, packing: bool) -> list[list[int]]:
    return pack(data, max_seq_length) if packing else single_rows(data)


@torch.no_grad()
def eval_loss(
    model,
    data: TokenizedData,
    *,
    batch_size: int,
    max_seq_length: int,
    pad_id: int,
    device: torch.device,
    precision: str = "no",
    packing: bool = True,
    dist=None,
    module=None,
) -> dict:
    """{"eval_loss", "eval_perplexity", "eval_tokens", "eval_targets"} over all of `data`.

    With several processes (`dist`, a lorafit.distributed.Dist) each rank evaluates every
    world_size-th batch and the sums are added up across ranks, so every rank gets the same result.

    `module` is the model's FSDP-sharded loss module (lorafit.distributed.LossModule), called instead
    of `model`. Its forward is a collective (each layer is all-gathered), so every rank must run as
    many forwards: a rank with fewer batches, or with a batch that has no targets, runs a padding
    batch (the first one) and discards the result. 5 batches on 2 ranks:

        rank 0:  B0  B2  B4
        rank 1:  B1  B3  B0 (padding, discarded)
    """
    was_training = model.training
    model.eval()
    every = rows_for(data, max_seq_length, packing)
    padding_free = not packing and attends_per_segment(model)  # as training does (lorafit.packing.one_row)
    rows = every
    if dist is not None and dist.enabled:
        starts = range(dist.rank * batch_size, len(every), batch_size * dist.world_size)
        rows = [r for i in starts for r in every[i : i + batch_size]]
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    rounds = len(batches)
    if module is not None and dist is not None and dist.enabled:
        rounds = math.ceil(math.ceil(len(every) / batch_size) / dist.world_size)  # rank 0's count, the most
    total = 0.0
    targets = 0
    tokens = 0
    cdtype = compute_dtype(precision, model)
    try:
        for k in range(rounds):
            padding = k >= len(batches)
            picked = every[:batch_size] if padding else batches[k]
            batch = collate(data, one_row(picked) if padding_free else picked, pad_id)
            n = batch.pop("num_targets")
            if (n == 0 or padding) and module is None:
                continue
            batch = to_device(batch, device)
            with autocast(device, precision):
                if module is not None:
                    ls = module(
                        batch["input_ids"],
                        batch["position_ids"],
                        batch["labels"],
                        batch["segments"],
                        batch["target_index"],
                    )
                else:
                    ls = loss_sum(model, batch, cdtype)
            if n == 0 or padding:
                continue
            total += float(ls)
            targets += n
            tokens += sum(int(data.lengths[j]) for row in picked for j in row)
    finally:
        model.train(was_training)
        if module is not None and hasattr(module, "reshard"):
            module.reshard()  # the root group stays gathered after a forward without backward
    if dist is not None and dist.enabled:
        total, targets, tokens = all_sum(dist, total, targets, tokens)
        targets, tokens = int(targets), int(tokens)
    loss = total / targets if targets else float("nan")
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(loss) if loss < 50 else float("inf"),
        "eval_tokens": tokens,
        "eval_targets": targets,
    }
