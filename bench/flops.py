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


def padded_width(batch: int, min_len: float, max_len: float) -> float:
    """Expected longest of `batch` conversation lengths drawn uniformly from [min_len, max_len]: the
    width a batch of unpacked conversations is padded to."""
    return min_len + (max_len - min_len) * batch / (batch + 1)


def executed_per_token(size: str, r: int, target_fraction: float, mean_context: float, seq: int, batch: int,
                       tool: str, vocab: int = 32064, *, packing: bool = True, mean_len: float | None = None,
                       min_len: float | None = None, max_len: float | None = None,
                       lorafit_pads: bool = True) -> dict:  # fmt: skip
    """FLOPs per (non-padding) token each tool's code path EXECUTES (an estimate from its code, not a
    measurement).

    Differences from `flops_per_token`:
    - attention: SDPA with an explicit (block-diagonal) mask computes every score of the row, so a
      token costs 12*L*d*T for a row of T tokens: the PEFT loop feeds rows of `seq` tokens, TRL's
      padding-free collator flattens the batch into ONE row of batch*seq tokens. lorafit
      (`lorafit.attention`) runs the causal kernel per conversation: the required causal work.
    - head: lorafit only at target positions (4HV*f); the PEFT loop at every position (4HV); TRL's
      fused head on CPU at every position, and its backward recomputes the logits (6HV).
    - unpacked (`packing=False`): every row is padded to the batch's longest conversation (W, see
      `padded_width`), and the peers' layers and head run on the padding too, a factor W / mean_len
      per real token; so does lorafit's unless `lorafit_pads` is false (padding-free batches).
    """
    d = dims(size, vocab)
    h, layers = d["hidden_size"], d["num_hidden_layers"]
    base = flops_per_token(size, r, target_fraction, mean_context, vocab)
    pad = 1.0
    if packing:
        row = seq * batch if tool == "trl" else seq
    else:
        row = padded_width(batch, min_len, max_len)
        if tool != "lorafit" or lorafit_pads:
            pad = row / mean_len
    attn = base["attention"] if tool == "lorafit" else 12 * layers * h * row * pad
    head = {
        "lorafit": 4 * h * vocab * target_fraction,
        "peft": 4 * h * vocab * pad,
        "trl": 6 * h * vocab * pad,
    }[tool]
    lin, lora = base["linear"] * pad, base["lora"] * pad
    total = lin + lora + attn + head
    return {"linear": lin, "lora": lora, "attention": attn, "head": head, "total": total}
