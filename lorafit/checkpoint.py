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

`trainer_state.json` is `TrainState.to_dict()`: the step (which fixes the data position), token
counters, the partial logging window, the skipped-step count, the training time so far, the config
and data fingerprint it was trained with, and the whole log history. `save_checkpoint` writes a
checkpoint from rank 0's view of everything (the collectives that gather it stay in train.py);
`load_checkpoint` reads and checks one and puts its adapter on the model, and
`restore_training_state` loads the rest once the optimizer exists.

The output-directory rules live here too, decided once before a run loads anything
(`decide_output_dir`): writable, not another run's unless resuming or overwriting, and which
checkpoint to resume from.

Longer than lorafit's ~500-line mark on purpose: this is the one home of everything a checkpoint is
(its folder, its files, its trainer-state format) and of the rules that pick the one a run resumes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lorafit import lora
from lorafit.distributed import shard_optimizer_state
from lorafit.errors import LorafitError
from lorafit.lora.files import fsync_dir, write_bytes_atomic

if TYPE_CHECKING:
    from lorafit.tokens import TokenizedData

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
COMPLETE = (STATE_FILE, TRAINING_STATE_FILE, ADAPTER_WEIGHTS)  # files every complete checkpoint has
LOCK_FILE = ".lorafit.lock"
# what a finished run leaves in its output directory (besides checkpoints); --overwrite removes them
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "results.json", "metrics.jsonl", "loss.png")


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
    remove_path(tmp)  # a stale folder, or a link planted at the name: removed, never followed
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            remove_path(old)
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
            remove_path(p)


def remove_path(p: Path) -> None:
    """Remove a file, a link (the link itself, never its target) or a folder tree, if there is one."""
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


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
    fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)
    f = os.fdopen(fd, "r+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = f.read(200).strip() or "another process"
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


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open a file lorafit writes inside an output folder, never through a link planted there.

    A symbolic link at `path` (or anything but a regular file) is refused with a LorafitError naming
    it: following it would write into whatever file the link points at.
    """
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK) or (os.path.islink(path)):
            raise LorafitError(
                f"{path} is a symbolic link; lorafit never writes through a link in its output folder. "
                "Fix: remove the link (rm), or choose another --output-dir."
            ) from None
        raise LorafitError(
            f"cannot open {path}: {e.strerror or e}. Fix: choose a writable --output-dir."
        ) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LorafitError(
            f"{path} is not a regular file; lorafit writes only regular files in its output folder. "
            "Fix: remove it, or choose another --output-dir."
        )
    return fd


def save_training_state(path: Path, state: dict) -> None:
    """torch.save, atomically (tensors, numbers, strings, containers only).

    Serialized in memory first (LoRA's optimizer state is small), then written with a plain write:
    torch's zip writer reports a full disk as "RuntimeError: ... unexpected pos", a plain write as
    OSError ENOSPC, which lorafit turns into a message (`is_disk_full`)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getbuffer())


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


# ----------------------------------------------------------------------------- trainer state


@dataclass
class Window:
    """The steps since the last log line: their summed loss, targets and tokens.

    Saved in every checkpoint, so a run resumed inside a logging window logs the same line.
    """

    loss: float = 0.0
    targets: int = 0
    tokens: int = 0
    started: float = field(default=0.0, compare=False)  # time.perf_counter() at its start; not saved

    def add(self, loss: float, targets: int, tokens: int) -> None:
        self.loss += loss
        self.targets += targets
        self.tokens += tokens

    def reset(self) -> None:
        self.loss, self.targets, self.tokens = 0.0, 0, 0
        self.started = time.perf_counter()

    def to_dict(self) -> dict:
        return {"loss": self.loss, "targets": self.targets, "tokens": self.tokens}


@dataclass
class TrainState:
    """Where a run is: everything a checkpoint's trainer_state.json holds (`to_dict`/`from_dict`).

    `total_steps`, `data_fingerprint` and `config` describe the run that wrote the state; a checkpoint
    from an older lorafit may lack them (None; `differences` then has nothing to compare).
    """

    total_steps: int | None
    data_fingerprint: str | None
    config: dict  # RunConfig.to_dict()
    step: int = 0
    tokens: int = 0  # tokens of the applied steps, every rank
    targets: int = 0  # target (trained) tokens of the applied steps, every rank
    skipped: int = 0  # steps skipped for a NaN/Inf loss or gradient
    eval_loss_before: float | None = None
    window: Window = field(default_factory=Window)
    # every metrics.jsonl line so far (None: a checkpoint without it; the caller takes metrics.jsonl)
    log_history: list[dict] | None = field(default_factory=list)
    # training time before this process started (None: a checkpoint of a lorafit that did not record it)
    elapsed_before: float | None = 0.0
    # this process only, never saved: where it started, and its clock (time.perf_counter())
    start_step: int = field(default=0, compare=False)
    start_tokens: int = field(default=0, compare=False)
    started: float | None = field(default=None, compare=False)

    def start_clock(self) -> None:
        """Start this process's training time and the logging window's (just before the first step)."""
        self.started = self.window.started = time.perf_counter()

    def elapsed(self) -> float | None:
        """Training time up to now, over every resume (None when a checkpoint did not record its part)."""
        if self.elapsed_before is None or self.started is None:
            return self.elapsed_before
        return self.elapsed_before + time.perf_counter() - self.started

    def run_time(self) -> tuple[float, int]:
        """(seconds, tokens) for the whole run's throughput: the time before the checkpoint resumed
        from plus this process's. A checkpoint without that time gives this process's time and tokens."""
        seconds = time.perf_counter() - self.started
        if self.elapsed_before is None:
            return seconds, self.tokens - self.start_tokens
        return seconds + self.elapsed_before, self.tokens

    def to_dict(self, steps_per_epoch: int) -> dict:
        """trainer_state.json (its keys and their order are the checkpoint format)."""
        return {
            "step": self.step, "total_steps": self.total_steps, "tokens": self.tokens, "targets": self.targets,
            "epoch": self.step / steps_per_epoch, "results": {"eval_loss_before": self.eval_loss_before},
            "window": self.window.to_dict(), "skipped": self.skipped, "data_fingerprint": self.data_fingerprint,
            "elapsed_sec": self.elapsed(),
            "config": self.config, "log_history": list(self.log_history or []),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict, *, source: Path, fix: str) -> TrainState:
        """Read `to_dict()`'s form (`source` names the file in errors; `fix` says what to do instead).

        Checkpoints of older lorafit versions lack some keys; they get the values that version meant.
        """
        missing = [k for k in ("step", "tokens", "targets") if not isinstance(d.get(k), int)]
        if missing:
            raise LorafitError(f"{source}: no valid {', '.join(missing)}; not a lorafit checkpoint. {fix}")
        window = {k: v for k, v in (d.get("window") or {}).items() if k in ("loss", "targets", "tokens")}
        return cls(
            total_steps=d.get("total_steps"),
            data_fingerprint=d.get("data_fingerprint"),
            config=d.get("config") or {},
            step=d["step"],
            tokens=d["tokens"],
            targets=d["targets"],
            skipped=d.get("skipped", 0),
            eval_loss_before=(d.get("results") or {}).get("eval_loss_before"),
            window=Window(**window),
            log_history=d.get("log_history"),
            elapsed_before=d.get("elapsed_sec"),
            start_step=d["step"],
            start_tokens=d["tokens"],
        )

    def differences(self, config: dict, fingerprint: str, total_steps: int) -> list[str]:
        """Warnings for resuming this state with another config, other data or another length."""
        warnings = [
            f"warning: resuming with a changed setting, {diff}; the run is no longer one run"
            for diff in config_differences(self.config, config)
        ]
        if self.data_fingerprint not in (None, fingerprint):
            warnings.append("warning: resuming on different training data than the checkpoint was trained on")
        if self.total_steps not in (None, total_steps):
            warnings.append(
                f"warning: the run now has {total_steps} steps, the checkpoint's had {self.total_steps}"
            )
        return warnings


def data_fingerprint(data: TokenizedData) -> str:
    """A short hash of the tokenized training data (tokens, loss mask, example boundaries)."""
    h = hashlib.sha256()
    for a in (data.tokens, data.supervised, data.offsets):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def config_differences(saved: dict, now: dict) -> list[str]:
    """'section.key: old -> new' for every setting that differs (output paths aside)."""
    diffs = []
    for section, body in now.items():
        for key, value in body.items():
            if (section, key) in (("training_config", "output_dir"),):
                continue
            old = (saved.get(section) or {}).get(key, value)
            if old != value:
                diffs.append(f"{section}.{key}: {old!r} -> {value!r}")
    return diffs


# ----------------------------------------------------------------------------- save and load


def save_checkpoint(
    out: Path,
    state: TrainState,
    *,
    steps_per_epoch: int,
    model: torch.nn.Module,
    values: dict[str, torch.Tensor],
    adapter_kwargs: dict,
    optimizer_state: dict,
    scheduler,
    scaler,
    rngs: list | None,
    limit: int | None,
    cuda_rngs: list | None = None,
) -> Path:
    """Write OUT/checkpoint-<step> (complete or absent), then keep the newest `limit` checkpoints.

    `values` are the whole trainable tensors and `optimizer_state` the whole optimizer state (gathered
    by the caller under FSDP); `rngs` every rank's CPU RNG state in a distributed run, else None;
    `cuda_rngs` every rank's CUDA RNG state (of its own GPU) in a distributed CUDA run.
    """
    final = out / f"checkpoint-{state.step}"
    with atomic_dir(final) as tmp:
        lora.save_adapter(model, tmp, values=values, **adapter_kwargs)
        ts = {
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if rngs is not None:
            ts["rng_cpu_ranks"] = rngs
        if torch.cuda.is_available():
            ts["rng_cuda"] = torch.cuda.get_rng_state_all()
        if cuda_rngs is not None:
            ts["rng_cuda_ranks"] = cuda_rngs
        if scaler is not None:
            ts["scaler"] = scaler.state_dict()
        save_training_state(tmp / TRAINING_STATE_FILE, ts)
        (tmp / STATE_FILE).write_text(json.dumps(state.to_dict(steps_per_epoch), indent=1) + "\n")
    rotate(out, limit, keep=final)
    return final


def load_checkpoint(ckpt: Path, model: torch.nn.Module) -> tuple[TrainState, dict]:
    """Read and check a checkpoint and put its adapter onto the (not yet sharded) model.

    Returns (trainer state, training state) for `restore_training_state`. Every file is read and
    checked before anything is applied, and nothing is written; a damaged checkpoint is a
    LorafitError naming the file and an older checkpoint to use instead.
    """
    fix = resume_fix(ckpt)
    state = TrainState.from_dict(read_trainer_state(ckpt, fix), source=ckpt / STATE_FILE, fix=fix)
    ts = load_training_state(ckpt / TRAINING_STATE_FILE, fix)
    try:
        lora.load_adapter(model, ckpt, trainable=True)
    except lora.LoraError as e:
        raise LorafitError(f"{ckpt}: cannot resume from this checkpoint: {e}\n{fix}") from e
    return state, ts


def restore_training_state(
    ckpt: Path, ts: dict, optimizer, scheduler, scaler, rank: int = 0, device: torch.device | None = None
) -> None:
    """Load a checkpoint's optimizer, scheduler and RNG states (`ts`, read by `load_checkpoint`).

    The optimizer state is saved whole; on sharded parameters each rank keeps its own rows of it.
    Each rank gets back its own CPU RNG state, and (CUDA) its own GPU's RNG state.
    """
    fix = resume_fix(ckpt)
    try:
        optimizer.load_state_dict(ts["optimizer"])
        shard_optimizer_state(optimizer)
        scheduler.load_state_dict(ts["scheduler"])
        ranks = ts.get("rng_cpu_ranks")  # a distributed run keeps every rank's RNG (dropout masks)
        torch.set_rng_state(ranks[rank] if ranks and rank < len(ranks) else ts["rng_cpu"])
        cuda_ranks = ts.get("rng_cuda_ranks")
        if cuda_ranks and device is not None and device.type == "cuda" and rank < len(cuda_ranks):
            torch.cuda.set_rng_state(cuda_ranks[rank], device)
        elif "rng_cuda" in ts and torch.cuda.is_available():  # one process (or a checkpoint of older lorafit)
            torch.cuda.set_rng_state_all(ts["rng_cuda"])
        if scaler is not None and "scaler" in ts:
            scaler.load_state_dict(ts["scaler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise LorafitError(
            f"{ckpt / TRAINING_STATE_FILE}: does not fit this run ({type(e).__name__}: {e}); was the "
            f"checkpoint written with other peft_config or optimizer settings? {fix}"
        ) from e


def is_disk_full(e: BaseException) -> bool:
    """A write that failed for lack of space: OSError ENOSPC/EDQUOT, or safetensors' error saying so."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return any(m in str(e) for m in ("No space left on device", "Disk quota exceeded"))


def disk_full_error(out: Path, what: str, saved: str = "") -> LorafitError:
    """The message for a disk that filled while writing `what` into `out`: what was and was not saved
    (`saved`: what this run did write; and the last complete checkpoint), and how to continue.
    Every writer removes its temporary file or folder on failure, so nothing half-written is left."""
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        have = f"the last complete checkpoint is {ckpt}"
        fix = "free disk space, then run the same command with --resume to continue from it"
    else:
        have = "there is no complete checkpoint to resume from"
        fix = "free disk space, then run the same command again with --overwrite"
    return LorafitError(
        f"no space left on device while writing {what} in {out}: it was not saved (nothing half-written "
        f"is left). {saved}{have}. Fix: {fix}."
    )


def resume_fix(ckpt: Path) -> str:
    """How to get past a damaged checkpoint: the next older one, or starting over."""
    others = [p for _, p in list_checkpoints(ckpt.parent) if p.resolve() != ckpt.resolve()]
    older = f"--resume {others[-1]}" if others else "--resume PATH with an older checkpoint"
    return f"Fix: resume from an older checkpoint ({older}), or start over with --overwrite."


# ----------------------------------------------------------------------------- the output directory


@dataclass(frozen=True)
class OutputDir:
    """The output directory and what a run does with it, decided once by `decide_output_dir`."""

    path: Path
    resume_from: Path | None = None  # the checkpoint to continue from
    resume: bool = False  # --resume was asked for (with no checkpoint yet, the run starts at step 0)
    overwrite: bool = False  # remove the previous run's files and checkpoints when the run starts


def decide_output_dir(
    out: Path,
    *,
    resume: bool | str | None,
    overwrite: bool,
    inputs: list[str | Path | None] = (),
    config_file: str | Path | None = None,
) -> OutputDir:
    """Check `out` (writable; not another run's unless resume/overwrite; replaces none of `inputs`)
    and pick the checkpoint to resume."""
    preflight_output_dir(out)
    check_inputs_kept(out, [*inputs, config_file], rewritten=config_file)
    ckpt = check_output_dir(out, resume=resume, overwrite=overwrite)
    return OutputDir(out, resume_from=ckpt, resume=bool(resume), overwrite=overwrite)


def check_inputs_kept(
    out: Path, inputs: list[str | Path | None], rewritten: str | Path | None = None
) -> None:
    """Refuse an output directory where the run would replace an input (the base model, the data, the
    config, the adapter), under any flag: an input that is `out` itself, or a file a run writes or
    deletes there (RUN_FILES, config.yaml, the lock, a leftover temporary, anything in a
    checkpoint-<step>/ folder). Hub ids are no paths.

    `rewritten` (the --config file) may be OUT/config.yaml: resuming with the config a run saved is
    common, and the run writes it again only when the text is the same (`check_config_kept`)."""
    o = out.expanduser().resolve()
    own = {o / f for f in (*RUN_FILES, "config.yaml", LOCK_FILE)}
    same_config = rewritten and Path(rewritten).expanduser().resolve() == o / "config.yaml"
    for given in inputs:
        if not given or not Path(given).expanduser().exists():
            continue
        p = Path(given).expanduser().resolve()
        if same_config and p == o / "config.yaml":
            continue
        inside = p.relative_to(o).parts if o in p.parents else ()
        stale = (
            len(inside) == 1 and inside[0].startswith(".") and (".tmp-" in inside[0] or ".old-" in inside[0])
        )
        if p == o or p in own or stale or (inside and CHECKPOINT_RE.match(inside[0])):
            raise LorafitError(
                f"--output-dir {out} holds the input {given}, which the run would replace; lorafit never "
                "replaces an input, even with --overwrite. Fix: choose another --output-dir (or move the input)."
            )


def check_config_kept(config_file: str | Path | None, out: Path, text: str) -> None:
    """Refuse a run whose --config is OUT/config.yaml when the resolved config it would write there
    (`text`) differs from the file: the run would replace an input."""
    if not config_file:
        return
    given = Path(config_file).expanduser()
    if given.resolve() != out.expanduser().resolve() / "config.yaml":
        return
    if given.read_bytes() != text.encode("utf-8"):
        raise LorafitError(
            f"--config {config_file} is where this run writes its resolved config, and the resolved config "
            "differs from it (other flags, --set or paths); lorafit never replaces an input, even with "
            f"--overwrite. Fix: copy it elsewhere (cp {config_file} run.yaml) and pass --config run.yaml."
        )


def preflight_output_dir(out: Path) -> None:
    """Refuse an output directory that cannot be created or written, before anything is loaded.

    Writes nothing: looks at the nearest existing ancestor. (make_output_dir still probes with a real
    write, which also catches what os.access cannot see, e.g. /proc for root.)
    """
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    if base == out and not out.is_dir():
        raise LorafitError(f"output directory {out} is a file. Fix: choose another --output-dir")
    if not base.is_dir():
        raise LorafitError(
            f"cannot write to output directory {out}: Not a directory ({base} is a file). "
            "Fix: choose a writable --output-dir"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise LorafitError(
            f"cannot write to output directory {out}: Permission denied ({base} is not writable). "
            "Fix: choose a writable --output-dir"
        )


def check_output_dir(out: Path, *, resume: bool | str | None, overwrite: bool) -> Path | None:
    """Refuse to mix runs; return the checkpoint to resume from (or None). Writes nothing.

    `resume=True` takes the newest complete checkpoint in `out`; when there is none yet (a run killed
    before its first checkpoint, or a new directory) the run starts from step 0, unless `out` holds a
    finished run, which is never replaced without --overwrite. `resume=PATH` takes that checkpoint
    folder (or the newest checkpoint inside PATH).
    """
    if resume and overwrite:
        raise LorafitError(
            "--resume continues the run in the output directory and --overwrite deletes it; pass only one"
        )
    if resume:
        if resume is True:
            ckpt = latest_checkpoint(out)
            if ckpt is None:
                finished = [f for f in ("results.json", "adapter_model.safetensors") if (out / f).exists()]
                if finished:
                    raise LorafitError(
                        f"{out} holds a finished run ({', '.join(finished)}) but no checkpoint-<step>/ folder to "
                        "resume from (save_strategy: no?). Fix: --overwrite to train again from the start, or "
                        "choose another --output-dir."
                    )
            if ckpt is not None:
                read_trainer_state(ckpt, resume_fix(ckpt))
            return ckpt
        ckpt = Path(resume).expanduser()
        if ckpt.is_dir() and not (ckpt / STATE_FILE).exists() and latest_checkpoint(ckpt) is not None:
            ckpt = latest_checkpoint(ckpt)  # an output directory: its newest checkpoint
        if not ckpt.is_dir():
            raise LorafitError(
                f"--resume {resume}: no such checkpoint folder. Fix: pass a checkpoint-<step>/ folder written by "
                "`lorafit train` (or its output directory), or --resume alone for the newest one in --output-dir."
            )
        read_trainer_state(ckpt, resume_fix(ckpt))
        return ckpt
    if out.exists() and not out.is_dir():
        raise LorafitError(f"output directory {out} is a file. Fix: choose another --output-dir")
    if out.exists() and not overwrite:
        existing = [p.name for _, p in list_checkpoints(out)] + [f for f in RUN_FILES if (out / f).exists()]
        if existing:
            raise LorafitError(
                f"{out} already holds another run ({', '.join(existing[:4])}). Fix: --resume to continue it, "
                "--overwrite to replace it, or choose another --output-dir."
            )
    return None


def make_output_dir(out: Path) -> None:
    """Create `out` and check that files can be written in it (the first write of a run)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        remove_path(probe)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644))
        probe.unlink()
    except OSError as e:
        raise LorafitError(
            f"cannot write to output directory {out}: {e.strerror or e}. Fix: choose a writable --output-dir"
        ) from e


def clean_output_dir(out: Path, overwrite: bool) -> None:
    """Remove what killed runs left half-written; with `overwrite`, the previous run's files too."""
    remove_stale_temporaries(out)
    if overwrite:
        for _, p in list_checkpoints(out):
            discard(p)
        for f in RUN_FILES:
            (out / f).unlink(missing_ok=True)
