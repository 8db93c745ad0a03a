"""Memory estimates made before training, from the model's config alone.

Today: the activations a training step keeps for the backward pass, which decide
`training_config.gradient_checkpointing: auto`. Without checkpointing, one decoder layer keeps
about ``16 * hidden + 6 * intermediate`` values per token (attention and MLP inputs, norm inputs in
fp32, the gate/up products, dropout masks), in the compute dtype: measured 52 KB per token per layer
against 49 KB predicted on a Phi-3-shaped model (hidden 768, intermediate 2048, bf16 autocast; RssAnon
after the forward pass of 4 x 512 tokens). With checkpointing a layer keeps its input only (about 14 KB
measured there, the rest being the step's own working set), at the cost of a second forward pass.
"""

from __future__ import annotations

import torch

AUTO_LIMIT = 0.5  # checkpointing goes on when activations would need more than this share of free memory


def activation_bytes(config, tokens: int, compute_dtype: torch.dtype) -> int:
    """Bytes of activations kept for backward by `tokens` tokens through every decoder layer."""
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    per_value = torch.empty((), dtype=compute_dtype).element_size()
    return tokens * int(config.num_hidden_layers) * (16 * hidden + 6 * intermediate) * per_value


def free_bytes(device: torch.device) -> int | None:
    """Memory free for this process's tensors: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def needs_checkpointing(
    config, tokens: int, compute_dtype: torch.dtype, device: torch.device
) -> tuple[bool, str]:
    """(on?, the reason in one line) for gradient_checkpointing: auto, for micro-batches of `tokens` tokens."""
    need = activation_bytes(config, tokens, compute_dtype)
    free = free_bytes(device)
    gib = 2**30
    if free is None:
        return False, f"off (auto: activations ~{need / gib:.1f} GiB per micro-batch; free memory unknown)"
    on = need > AUTO_LIMIT * free
    return on, (
        f"{'on' if on else 'off'} (auto: activations ~{need / gib:.1f} GiB per micro-batch of {tokens:,} tokens "
        f"without it, {free / gib:.1f} GiB free on {device.type})"
    )
