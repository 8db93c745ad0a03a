"""Machine facts and measured matmul throughput: `python -m bench.machine OUT.json`.

The matmul peak is measured, not looked up: for fp32 and bf16, torch.matmul on shapes like the
benchmark's (tokens x hidden x projection), best of several timed repeats. A CPU without AMX or
AVX512-BF16 emulates bf16 matmuls, so bf16 is usually far slower than fp32 there; the benchmark
uses whichever is faster as "the machine's best precision" and the best GFLOP/s as the MFU peak.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

# (M, K, N): x (M, K) @ w (K, N), the benchmark's projection shapes. bf16 gets the small ones only: where
# it is emulated, one 2048-row product takes seconds.
SHAPES = [(256, 768, 2304), (256, 2048, 768)]
BIG_FP32 = [(2048, 768, 2304), (2048, 768, 4096), (2048, 2048, 768)]


def _gflops(m: int, k: int, n: int, dtype, min_time: float = 0.25, repeats: int = 3) -> float:
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    a @ b  # warm-up
    t = time.perf_counter()
    a @ b
    one = max(time.perf_counter() - t, 1e-6)
    reps = max(1, int(min_time / one))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * m * k * n / best / 1e9


def matmul_throughput() -> dict:
    """{'fp32': GFLOP/s, 'bf16': GFLOP/s, 'by_shape': {...}}: the best over the shapes for each dtype."""
    import torch

    out: dict = {"by_shape": {}}
    for name, dtype, shapes in (
        ("fp32", torch.float32, SHAPES + BIG_FP32),
        ("bf16", torch.bfloat16, SHAPES),
    ):
        reps = 3 if dtype == torch.float32 else 2
        vals = {f"{m}x{k}x{n}": round(_gflops(m, k, n, dtype, repeats=reps), 2) for m, k, n in shapes}
        out["by_shape"][name] = vals
        out[name] = max(vals.values())
    out["threads"] = torch.get_num_threads()
    return out


def _cpuinfo() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", []
    model, flags = "unknown", []
    for line in text.splitlines():
        if line.startswith("model name") and model == "unknown":
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1].split()
    return model, flags


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    import subprocess

    try:
        root = Path(__file__).resolve().parent.parent
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "lorafit"], cwd=root, capture_output=True,
            text=True,
        )  # fmt: skip
        return r.stdout.strip() + (" (+ uncommitted changes in lorafit/)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def machine_facts() -> dict:
    import psutil

    model, flags = _cpuinfo()
    interesting = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "flags": [f for f in interesting if f in flags],
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            d: _version(d)
            for d in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "lorafit", "psutil")
        },
        "lorafit_commit": _git_commit(),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    what = argv[1] if len(argv) > 1 else "all"
    res: dict = {}
    if what in ("all", "facts"):
        res["facts"] = machine_facts()
    if what in ("all", "matmul"):
        res["matmul"] = matmul_throughput()
    Path(argv[0]).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
