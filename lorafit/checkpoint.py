"""Checkpoints: atomic folders, rotation, and finding the one to resume from.

A checkpoint is complete or absent. It is written into a temporary sibling folder
(`.checkpoint-40.tmp-<pid>`), every file flushed and fsynced, and only then renamed to
`checkpoint-40`; a crash mid-write leaves a `.tmp` folder that nothing trusts and the next save
removes. `save_total_limit` deletes old checkpoints only after the new one is in place.

    OUT/
      checkpoint-40/  adapter_config.json  adapter_model.safetensors  trainer_state.json  training_state.pt
      checkpoint-80/  ...

`training_state.pt` holds the optimizer, scheduler and RNG states: tensors and plain containers
only, loaded back with `torch.load(weights_only=True)`, never unpickled.

Deleting is the reverse: a checkpoint is first renamed to a hidden `.checkpoint-40.old-<pid>` name
(one atomic step, after which nothing takes it for a checkpoint) and only then removed.

One training process at a time may use an output directory: `output_lock` takes an exclusive
`flock` on `OUT/.lorafit.lock` (released by the kernel even on SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.lora.files import fsync_dir, replace_atomic

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
COMPLETE = (STATE_FILE, TRAINING_STATE_FILE, ADAPTER_WEIGHTS)  # files every complete checkpoint has
LOCK_FILE = ".lorafit.lock"


def fsync_tree(path: Path) -> None:
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def discard(path: Path) -> None:
    """Delete a folder so that it is never seen half-deleted: rename it to a hidden .old name, then remove it."""
    path = Path(path)
    if not path.exists():
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `final` in one rename, on error it is removed.

    If `final` already exists (a rerun writing the same step), it is moved aside first and deleted
    after the rename, so at every moment either the old or the new complete folder is in place.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (folders checkpoint-<step> holding all of COMPLETE), oldest first."""
    out = []
    if not Path(output_dir).is_dir():
        return out
    for p in Path(output_dir).iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in COMPLETE):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def remove_stale_temporaries(output_dir: Path) -> None:
    """Delete half-written folders and files left by a killed run (names start with '.' and hold '.tmp-')."""
    if not Path(output_dir).is_dir():
        return
    for p in Path(output_dir).iterdir():
        if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def rotate(output_dir: Path, limit: int | None, keep: Path | None = None) -> None:
    """Keep the newest `limit` checkpoints (and `keep`, e.g. the best or the one just written)."""
    if not limit:
        return
    ckpts = list_checkpoints(output_dir)
    for _, p in ckpts[:-limit]:
        if keep is None or p.resolve() != Path(keep).resolve():
            discard(p)


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` (which must exist) while training into it.

    A second `lorafit train` into the same folder fails at once with a message instead of mixing
    two runs' checkpoints and metrics. Without fcntl (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(output_dir) / LOCK_FILE
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = f.read().strip() or "another process"
            raise LorafitError(
                f"{output_dir} is in use by another lorafit run ({who}). "
                "Fix: wait for it to finish (or stop it), or choose another --output-dir."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        f.close()


def save_training_state(path: Path, state: dict) -> None:
    """torch.save, atomically (tensors, numbers, strings, containers only)."""
    replace_atomic(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: Path, fix: str | None = None) -> dict:
    """The optimizer/scheduler/RNG states of a checkpoint, read with torch.load(weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/truncated file, or one that would need unpickling
        raise LorafitError(
            f"{path}: cannot read the training state ({type(e).__name__}: {e}). "
            + (
                fix
                or "Fix: resume from an older checkpoint with --resume PATH, or start over with --overwrite."
            )
        ) from e


def read_trainer_state(ckpt: Path, fix: str | None = None) -> dict:
    """A checkpoint's trainer_state.json (step, counters, log history)."""
    try:
        state = json.loads((Path(ckpt) / STATE_FILE).read_text())
        if not isinstance(state, dict):
            raise ValueError(f"expected a JSON object, got {type(state).__name__}")
        return state
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LorafitError(
            f"{ckpt}: not a readable lorafit checkpoint ({STATE_FILE}: {e}). "
            + (fix or "Fix: pass a checkpoint-<step> folder written by `lorafit train`.")
        ) from e
