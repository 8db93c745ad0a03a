"""Model FLOPs per trained token: one formula for every tool (see BENCHMARKS.md, "MFU").

LoRA on every linear layer of the decoder, base weights frozen. Per input token:

    linear    4 * N_lin                 forward 2N + backward to the input 2N; no weight gradient
                                        (N_lin = sum of in*out over the adapted projections)
    LoRA      6 * r * (in + out)        per adapted projection: forward, input gradient and the
                                        A/B weight gradients, each 2r(in+out)
    attention 12 * L * d * c            L layers, d = heads * head_dim, c = mean keys per query
                                        (causal, inside its own conversation): QK^T and PV forward
                                        (4dc), their four backward products (8dc)
    head      4 * H * V * f             only where a loss is taken (f = targets / tokens): logits
                                        forward and the gradient to the hidden state

Work a tool does beyond this (logits at non-target positions, attention across padding or across
packed neighbours, recomputation) is not counted: MFU measures useful work.
"""

from __future__ import annotations

from lorafit.tiny import SIZES


def dims(size: str, vocab: int = 32064) -> dict:
    d = dict(SIZES[size])
    d["vocab_size"] = vocab
    return d


def flops_per_token(
    size: str, r: int, target_fraction: float, mean_context: float, vocab: int = 32064
) -> dict:
    d = dims(size, vocab)
    h, inter, layers = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"]
    # Phi-3 projections (no GQA in these configs): qkv (h -> 3h), o (h -> h), gate_up (h -> 2i), down (i -> h)
    projections = [(h, 3 * h), (h, h), (h, 2 * inter), (inter, h)]
    n_lin = layers * sum(i * o for i, o in projections)
    lin = 4 * n_lin
    lora = layers * sum(6 * r * (i + o) for i, o in projections)
    attn = 12 * layers * h * mean_context
    head = 4 * h * vocab * target_fraction
    return {
        "linear": lin,
        "lora": lora,
        "attention": attn,
        "head": head,
        "total": lin + lora + attn + head,
        "n_lin": n_lin,
        "params_total": n_lin + 2 * h * vocab + (2 * layers + 1) * h,
    }
