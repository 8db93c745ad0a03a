"""lorafit.allocator: what a step frees goes back to the system instead of staying in malloc's free lists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import ctypes, sys, torch
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "on":
    from lorafit.allocator import return_freed_memory
    assert return_freed_memory()
keep = []
for _ in range(3):
    big = torch.ones(2**21)  # 8 MiB, freed at once: an activation of a step
    keep.append(torch.ones(100))  # a small block after it, so the freed space is not at the heap's top
    del big
print(libc.mallinfo2().fordblks)
"""


def _free_bytes(mode: str) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_large_tensors_leave_the_process_instead_of_staying_in_malloc():
    kept = _free_bytes("off")  # glibc raised its mmap threshold after the first 8 MiB block: the rest is heap
    returned = _free_bytes("on")
    assert kept >= 8 * 2**20
    assert returned < 4 * 2**20


def test_return_freed_memory_is_off_by_default_and_can_be_turned_on():
    from lorafit.config import TrainingConfig

    # off by default: on a quiet CPU it cost ~45% of the training throughput (README, "Memory")
    assert TrainingConfig().return_freed_memory is False
    assert TrainingConfig(return_freed_memory=True).return_freed_memory is True
