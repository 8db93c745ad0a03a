"""Atomic file writes: a file is complete or absent, never half-written.

Every file lorafit writes goes through `replace_atomic`: the content is written to a hidden
temporary name in the same folder (`.NAME.tmp-<pid>`), flushed and fsynced, then renamed over the
target in one step, and the folder is fsynced so the rename survives a power cut. The temporary
name is created fresh (`O_CREAT | O_EXCL | O_NOFOLLOW`): a link planted under that name is removed,
never written through. On any error the temporary file is removed and the old target is untouched.

This module is the lowest layer (standard library only), so the LoRA library and the pipeline
share it. It also holds the one reading rule they share: `not_regular`, a file that would be read
without end (a FIFO, a device such as /dev/zero, or a link to one) is named, never opened.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "fsync_dir",
    "not_regular",
    "replace_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def not_regular(path: str | os.PathLike[str]) -> str | None:
    """Why an existing `path` must not be read, or None for a regular file (or one that is missing:
    the caller's own message says so): "is a FIFO (named pipe), not a regular file, ..." -- a FIFO
    blocks, a device such as /dev/zero is read without end."""
    try:
        mode = os.stat(path).st_mode  # follows links: what would be read
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    what = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(
        mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"  # fmt: skip
    linked = f" (it links to {os.path.realpath(path)})" if os.path.islink(path) else ""
    return f"is {what}{linked}, not a regular file, and would be read without end"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder so that renames inside it are durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fresh(tmp: Path) -> None:
    """Create `tmp` as a new empty regular file; whatever was there (a stale file, a link) is removed first."""
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    os.close(fd)


def replace_atomic(
    path: str | os.PathLike[str], write: Callable[[Path], None], *, mode: int | None = None
) -> None:
    """Write `path` in one step: `write(tmp)` fills a temporary sibling, which is fsynced and renamed.

    `write` receives the temporary path and may open it by name (safetensors, torch.save and
    matplotlib's savefig all do); it must not be a link target. `mode` sets the permission bits of
    the result (default: those of the file being replaced, else 0o644).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            mode = 0o644
    try:
        _fresh(tmp)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    replace_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj, *, indent: int = 2, sort_keys: bool = True) -> None:
    """Write `obj` as JSON (with a final newline) to `path` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
