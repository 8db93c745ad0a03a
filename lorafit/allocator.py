"""Memory that a training step frees goes back to the system (glibc's malloc, on Linux).

torch's CPU tensors come from malloc. glibc serves a block of at least M_MMAP_THRESHOLD bytes
(128 KiB at start) with its own mmap and unmaps it when freed; a smaller block comes from the heap,
whose freed space is kept for reuse. But glibc raises the threshold each time such a mapped block is
freed, up to 32 MiB: after the first training step nearly every activation, gradient, logits chunk
and (QLoRA) dequantized weight comes from the heap. Their sizes and lifetimes differ from step to
step, the heap fragments, and the freed space stays in the process's private memory. Measured with
``bench/memory.py`` (``mallinfo2().fordblks``, the bytes malloc holds free): about 1 GB of a 1.8 GB
QLoRA run on the small bench model was such free space, and 2.5 GB on long conversations.

:func:`return_freed_memory` fixes the threshold (which also stops glibc raising it): blocks of at
least that size are always mapped and unmapped, so what a step frees leaves the process. The cost is
the page faults of mapping fresh memory for each large tensor (see the README's "Memory" section for
the measured figures). Elsewhere (macOS, musl, Windows) it does nothing. It sets process-wide
allocator state, so it is called once, by the training loop, when ``training_config.return_freed_memory``
asks for it; the environment variable ``MALLOC_MMAP_THRESHOLD_`` does the same from outside.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h); setting it also stops the raising
THRESHOLD = 1 << 20  # blocks of 1 MiB and more: activations, gradients, logits chunks, dequantized weights


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc (and musl) have it; a missing one raises here
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Serve blocks of `threshold` bytes and more by mmap, returned to the system when freed (what
    ``MALLOC_MMAP_THRESHOLD_=threshold`` in the environment does). True if glibc took the setting."""
    libc = _libc()
    if libc is None:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
