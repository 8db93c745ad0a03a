"""The optimizer and learning-rate schedule of a run: AdamW over the trainable parameters, LambdaLR.

A module of its own so that train.py holds the loop only; nothing here depends on the loop. The
schedule is a function of the step number alone (a skipped step advances it too), which is what
lets a checkpoint's scheduler state resume it exactly.

    lr(step) = learning_rate * lr_lambda(kind, warmup, total)(step)

    warmup:   (step + 1) / (warmup + 1)               for step < warmup
    then      constant | linear to 0 | cosine to 0    over total - warmup steps
"""

from __future__ import annotations

import math

import torch

from lorafit.config import TrainingConfig


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)  # linear

    return f


def make_optimizer(
    model: torch.nn.Module, t: TrainingConfig, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (LoRA A/B) only, none on vectors (biases, norms).

    On CUDA the fused kernel (one launch for all parameters, what TrainingArguments calls
    adamw_torch_fused); elsewhere torch's default (foreach), so CPU results stay as they were.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        fused=True if device is not None and device.type == "cuda" else None,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, t: TrainingConfig, total_steps: int):
    """t.lr_scheduler_type with t's warmup over `total_steps`."""
    warmup = t.warmup_steps_for(total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_scheduler_type, warmup, total_steps))
