"""SDPA per packed conversation: 3-D (H, L, D) pieces (lorafit before 0.1.0: PyTorch's math path) vs
4-D (1, H, L, D) pieces (now: the fused flash kernel), forward + backward, one conversation.

    python -m bench.attention_kernels [--heads 12] [--length 300] [--dim 64] [--repeats 30]

Prints the machine, the kernel each form runs (torch.profiler) and the best time of each form over
`repeats` alternating runs, in bf16 and fp32.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F


def _step(q, k, v, four_d: bool) -> None:
    if four_d:
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.float().sum().backward()


def _kernel(q, k, v, four_d: bool) -> str:
    with torch.profiler.profile() as prof:
        _step(q, k, v, four_d)
    names = {e.name for e in prof.events()}
    return next((n for n in sorted(names) if n.startswith("aten::_scaled_dot_product")), "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--length", type=int, default=300)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args()
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"avx512_bf16: {'avx512_bf16' in flags}, amx: {'amx_bf16' in flags}, torch {torch.__version__}")  # fmt: skip
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        q, k, v = (torch.randn(a.heads, a.length, a.dim, dtype=dtype, requires_grad=True) for _ in range(3))
        best = {False: float("inf"), True: float("inf")}
        for _ in range(3):  # warm-up
            _step(q, k, v, False), _step(q, k, v, True)
        for _ in range(a.repeats):
            for four_d in (False, True):
                t = time.perf_counter()
                _step(q, k, v, four_d)
                best[four_d] = min(best[four_d], time.perf_counter() - t)
        for four_d, label in ((False, "3-D (H, L, D)"), (True, "4-D (1, H, L, D)")):
            print(f"{str(dtype)[6:]:>8} {label:<17} {1e3 * best[four_d]:7.1f} ms  {_kernel(q, k, v, four_d)}")
        print(f"{'':>8} 4-D speed-up: {best[False] / best[True]:.2f}x")


if __name__ == "__main__":
    main()
