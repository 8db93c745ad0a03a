"""`python -m lorafit ARGS` that pauses inside one checkpoint write, so a test can kill it there.

    python tests/pause_in_checkpoint.py checkpoint-8[:SECONDS] train --model ... --output-dir OUT

When the temporary folder of `checkpoint-8` is complete (every file written and fsynced) and before it
is renamed into place, this prints one line starting with PAUSED to stderr and sleeps SECONDS
(default 60). Test code only: it wraps `lorafit.checkpoint.fsync_tree`, the last call `atomic_dir`
makes before the rename, in this process; lorafit itself has no hook for it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lorafit.checkpoint
from lorafit.cli import main

PAUSED = "paused inside a checkpoint write"


def pause_before_rename(name: str, seconds: float) -> None:
    """After `atomic_dir` has fsynced the temporary folder of checkpoint `name`, sleep `seconds`."""
    fsync_tree = lorafit.checkpoint.fsync_tree

    def fsync_then_pause(path: Path) -> None:
        fsync_tree(path)
        if Path(path).name.startswith(f".{name}.tmp-"):
            print(f"{PAUSED}: {path} is complete; pausing {seconds:g}s before renaming it to {name}",
                  file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(seconds)

    lorafit.checkpoint.fsync_tree = fsync_then_pause


if __name__ == "__main__":
    name, _, seconds = sys.argv[1].partition(":")
    pause_before_rename(name, float(seconds or 60))
    sys.exit(main(sys.argv[2:]))
