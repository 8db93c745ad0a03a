"""The training loop: LoRA fine-tuning of a causal LM on chat data, with lorafit's own loop.

One optimizer step = `gradient_accumulation_steps` micro-batches. The loss of a step is the mean
cross-entropy over ALL target tokens of its micro-batches (token-weighted): each micro-batch adds
`loss_sum / targets_in_step` to the gradient, so the result is the same however the step is split
into micro-batches (tested). Step s always reads the same micro-batches (epoch s // steps_per_epoch,
its slot within the epoch), which is what makes resume exact.

    prepare():  config -> tokenizer -> data (validated, tokenized) -> model + LoRA
                (all checks happen here, before anything is written)
    run():      [eval before] -> steps (log, eval, checkpoint) -> adapter, results.json, loss.png

Output directory:

    OUT/adapter_config.json, adapter_model.safetensors   the final adapter (PEFT format)
    OUT/config.yaml       the resolved run config        OUT/metrics.jsonl   every log line
    OUT/results.json      summary                        OUT/loss.png        train/eval loss plot
    OUT/checkpoint-<step>/                               adapter + optimizer/scheduler/RNG/data position

Reliability (tests/test_resume.py, tests/test_bad_input.py):

* Everything that can be refused is refused before the output directory is touched: config, data,
  model, LoRA targets, the output directory itself, and -- with --resume -- the whole checkpoint
  (adapter, optimizer, scheduler, RNG) is read and applied in memory first.
* Exact resume: a checkpoint holds the LoRA weights (fp32 safetensors, exact), AdamW and LambdaLR
  state, the torch CPU RNG (dropout), the step (which fixes the data position: step s reads the
  same micro-batches in every process), the partial logging window, the skipped-step count, the
  whole log history and the training time so far (results.json's runtime_sec and tokens_per_sec
  cover the whole run after a resume). A run killed at any moment (SIGKILL included) and resumed ends with the same
  adapter, bit for bit, and the same metrics.jsonl (but for "tokens_per_sec", a timing) as an
  uninterrupted run, on the same machine and torch build (tested across processes on CPU).
  Nothing had to be pinned for that here (torch 2.13 CPU, MKL + oneDNN, AVX2): 1 or 2 threads and
  MKL_CBWR unset or AVX2 gave identical results, so lorafit sets no global numerics flags at
  start-up. CUDA kernels (atomics) are not bit-reproducible, so on GPUs resume is close, not exact.
* SIGINT/SIGTERM: a checkpoint at the next step boundary, then a clean exit (CLI: 130).
* A NaN/Inf loss or gradient norm stops the run before the optimizer step (the weights stay
  finite, the last checkpoint stays the last good one) unless
  training_config.skip_nonfinite_batches allows skipping that many bad steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorafit import distributed, lora
from lorafit.adapters import continue_lora
from lorafit.checkpoint import (
    STATE_FILE,
    TRAINING_STATE_FILE,
    atomic_dir,
    discard,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    output_lock,
    read_trainer_state,
    remove_stale_temporaries,
    rotate,
    save_training_state,
)
from lorafit.config import RunConfig, save_config
from lorafit.data import TokenizedData, TokenStats, load_conversations, split_eval, tokenize
from lorafit.distributed import Dist, all_sum
from lorafit.errors import ConfigError, DataError, LorafitError
from lorafit.evaluation import eval_loss, rows_for
from lorafit.lora.files import replace_atomic, write_bytes_atomic, write_json_atomic
from lorafit.lora.peft_format import base_reference
from lorafit.model import (
    apply_lora,
    end_of_turn,
    hold_frozen_linears_in,
    load_model,
    load_tokenizer,
    module_name,
    resolve_device,
    trainable_summary,
)
from lorafit.packing import Batches, collate, to_device
from lorafit.precision import autocast, bf16_is_fast, compute_dtype

log = logging.getLogger("lorafit")

RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "results.json", "metrics.jsonl", "loss.png")


@dataclass
class Job:
    """Everything a run needs, prepared and checked before the output directory is touched."""

    run: RunConfig
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    precision: str  # "bf16" | "fp16" | "no"
    train_data: TokenizedData
    train_stats: TokenStats
    eval_data: TokenizedData | None
    eval_stats: TokenStats | None
    adapted: list[str]
    dist: Dist = Dist()
    sharded: bool = False  # FSDP2 (training_config.fsdp under torchrun)


def load_data(
    run: RunConfig, tokenizer
) -> tuple[TokenizedData, TokenStats, TokenizedData | None, TokenStats | None]:
    d, t = run.data, run.training_config
    if not d.train:
        raise ConfigError(
            "data.train is not set. Fix: pass --data TRAIN.jsonl or set data.train in the config"
        )
    train = load_conversations(d.train, split=d.train_split)
    evals = None
    if d.eval:
        evals = load_conversations(d.eval, split=d.eval_split_name)
    elif d.eval_split_name:
        evals = load_conversations(d.train, split=d.eval_split_name)
    elif d.eval_split > 0:
        train, evals = split_eval(train, d.eval_split, t.seed)
    kw = dict(
        max_seq_length=t.max_seq_length,
        end_of_turn=end_of_turn(tokenizer),
        train_on=d.train_on,
        truncation=d.truncation,
    )
    train_data, train_stats = tokenize(tokenizer, train, **kw)
    if len(train_data) == 0:
        from lorafit.check import nothing_to_train

        raise DataError(
            nothing_to_train(d.train, train_stats, max_seq_length=t.max_seq_length, train_on=d.train_on)
        )
    eval_data = eval_stats = None
    if evals:
        eval_data, eval_stats = tokenize(tokenizer, evals, **kw)
    return train_data, train_stats, eval_data, eval_stats


def preflight_output_dir(out: Path) -> None:
    """Refuse an output directory that cannot be created or written, before anything is loaded.

    Writes nothing: looks at the nearest existing ancestor. (run() still probes with a real write,
    which also catches what os.access cannot see, e.g. /proc for root.)
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


def prepare(
    run: RunConfig, *, model=None, tokenizer=None, resume: bool | str | None = None, overwrite: bool = False
) -> Job:
    """Load tokenizer, data and model, and put LoRA on it. Writes nothing.

    The output directory is checked first (writable; not another run's unless resume/overwrite), so
    a refused run fails in a second, before any model is loaded.
    """
    t = run.training_config
    # a local base folder is recorded (adapter, config.yaml, checkpoints) by its absolute path, a hub id as is
    run.model.name_or_path = base_reference(run.model.name_or_path)
    preflight_output_dir(Path(t.output_dir).expanduser())
    check_output_dir(Path(t.output_dir).expanduser(), resume=resume, overwrite=overwrite)
    device = resolve_device(run.model.device, "model.device", run.origin("model.device"))
    dist = distributed.init(device.type)  # one process: a no-op; under torchrun: join the group
    device = distributed.device_for(dist, device)
    precision = t.mixed_precision(bf16_is_fast(device))
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("training_config.fp16: fp16 mixed precision needs a CUDA GPU; use bf16 or fp32")
    sharded = t.fsdp and dist.enabled
    if t.fsdp and not dist.enabled:
        log.warning(
            "warning: training_config.fsdp shards the model across processes, and this is one process: "
            "training unsharded. To shard, launch with torchrun --nproc_per_node N (or lorafit train --nproc N)"
        )
    m = run.model
    tokenizer = tokenizer or load_tokenizer(
        m.name_or_path, trust_remote_code=m.trust_remote_code, revision=m.revision
    )
    train_data, train_stats, eval_data, eval_stats = load_data(run, tokenizer)
    torch.manual_seed(t.seed)
    loaded_here = model is None  # a model passed in is not recast behind its owner's back
    if model is None:
        try:
            # sharded on GPUs: load on the CPU; fully_shard moves each rank's shards to its GPU
            model = load_model(m, device=torch.device("cpu") if sharded else device, training=True)
        except LorafitError:
            raise
        except Exception as e:  # e.g. a truncated or corrupt model.safetensors
            raise LorafitError(
                f"cannot load the base model {m.name_or_path!r}: {type(e).__name__}: {e}\n"
                "Fix: check the model folder (a damaged or partly downloaded *.safetensors file? download it "
                "again), or pass another --model."
            ) from e
    if m.adapter:  # train an existing adapter further: its LoRA shape, a fresh optimizer
        m.adapter = base_reference(m.adapter)
        adapted = continue_lora(model, run.peft_config, m.adapter)
    else:
        adapted = apply_lora(model, run.peft_config)
    if loaded_here and precision in ("bf16", "fp16"):
        hold_frozen_linears_in(model, compute_dtype(precision, model))
    if t.gradient_checkpointing:
        kwargs = t.gradient_checkpointing_kwargs or {"use_reentrant": False}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs.get("use_reentrant", True):  # reentrant checkpoints only backprop into inputs needing grad
            model.enable_input_require_grads()
    return Job(
        run,
        model,
        tokenizer,
        device,
        precision,
        train_data,
        train_stats,
        eval_data,
        eval_stats,
        adapted,
        dist,
        sharded,
    )


# ----------------------------------------------------------------------------- schedule


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)  # linear

    return f


def make_optimizer(model, t) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
    )


# ----------------------------------------------------------------------------- output directory


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
        probe.write_bytes(b"")
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


def resume_fix(ckpt: Path) -> str:
    """How to get past a damaged checkpoint: the next older one, or starting over."""
    others = [p for _, p in list_checkpoints(ckpt.parent) if p.resolve() != ckpt.resolve()]
    older = f"--resume {others[-1]}" if others else "--resume PATH with an older checkpoint"
    return f"Fix: resume from an older checkpoint ({older}), or start over with --overwrite."


# ----------------------------------------------------------------------------- the loop


class Stop:
    """SIGINT/SIGTERM ask the loop to checkpoint at the next step boundary and exit cleanly."""

    def __init__(self, dist: Dist | None = None):
        self.requested = None
        self.dist = dist or Dist()
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def adapter_kwargs(job: Job) -> dict:
    p = job.run.peft_config
    return dict(
        base_model_name_or_path=job.run.model.name_or_path,
        lora_dropout=p.lora_dropout,
        bias=p.bias,
        modules_to_save=[module_name(job.model, n) for n in p.modules_to_save or []] or None,
        revision=job.run.model.revision,
        extra_metadata=quantization_metadata(job.run.model, job.model),
    )


def quantization_metadata(m, model=None) -> dict | None:
    """What the adapter's base was quantized with, or None: the method and double quant, and for 4-bit
    what the loaded layers of `model` say (lorafit.quant.quantized_with: the dtype the weights were
    quantized from, compute dtype, blocksize). `lorafit merge` quantizes the base again from these, and
    eval/generate/chat warn when the base is loaded otherwise."""
    if m.quantization == "none":
        return None
    from lorafit import quant

    double = m.bnb_4bit_use_double_quant if m.quantization != "int8" else None
    details = quant.quantized_with(model) if model is not None else {}
    return {"quantization": {"method": m.quantization, "double_quant": double, **details}}


class NonFiniteError(LorafitError):
    """The loss or the gradient became NaN or Inf (training diverged)."""


def run(
    job: Job, *, resume: bool | str | None = None, overwrite: bool = False, progress: bool = True
) -> dict:
    """Train, evaluate, checkpoint and save. Returns the results dict (also written to results.json).

    With `resume`, continues from a checkpoint (see check_output_dir) exactly where it stopped.
    If stopped by SIGINT/SIGTERM, returns {"stopped": signal name, "step", "output_dir"}.
    """
    from tqdm.auto import tqdm

    t = job.run.training_config
    out = Path(t.output_dir).expanduser()
    ckpt = check_output_dir(out, resume=resume, overwrite=overwrite)
    model, device, data = job.model, job.device, job.train_data
    pad_id = job.tokenizer.pad_token_id
    rows = rows_for(data, t.max_seq_length, t.packing)
    d = job.dist
    main = d.main  # only rank 0 writes files and prints
    batches = Batches(
        rows, t.per_device_train_batch_size, seed=t.seed, shuffle=True, rank=d.rank, world_size=d.world_size
    )
    bpe = batches.batches_per_epoch
    accum = t.gradient_accumulation_steps
    steps_per_epoch = math.ceil(bpe / accum)
    if t.max_steps <= 0 and not math.isfinite(t.num_train_epochs * steps_per_epoch):
        raise ConfigError(
            f"training_config.num_train_epochs: {t.num_train_epochs:g} epochs of {steps_per_epoch} steps is more "
            "steps than can be counted. Fix: fewer epochs, or a number of steps with max_steps"
        )
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    warmup = t.warmup_steps_for(total_steps)
    # Everything a checkpoint restores is read and applied here, in memory, before anything is written:
    # the adapter onto the model before it is sharded, the training state after the optimizer exists.
    if ckpt is not None:
        state, training_state = restore_adapter(ckpt, model)
    cdtype = compute_dtype(job.precision, model)
    loss_module, loss_scale = distributed.wrap(d, model, cdtype, device=device, fsdp=job.sharded)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP: the shards (DTensors)
    optimizer = make_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.lr_scheduler_type, warmup, total_steps)
    )
    scaler = torch.amp.GradScaler(device.type) if job.precision == "fp16" else None
    eval_every = t.eval_every()
    max_skips = t.skip_nonfinite_batches
    fingerprint = data_fingerprint(data)
    say = (tqdm.write if progress else log.info) if main else (lambda *a, **k: None)
    warn = log.warning if main else (lambda *a, **k: None)  # every rank sees the same, rank 0 says it

    start_step, tokens_seen, targets_seen, skipped, history = 0, 0, 0, 0, []
    # training time of the steps before a resume (None: a checkpoint that does not record it)
    elapsed_before: float | None = 0.0
    window = {"loss": 0.0, "targets": 0, "tokens": 0}
    eval_before = None
    if ckpt is not None:
        restore_training_state(ckpt, training_state, optimizer, scheduler, scaler, rank=d.rank)
        start_step, tokens_seen, targets_seen = state["step"], state["tokens"], state["targets"]
        skipped = state.get("skipped", 0)
        elapsed_before = state.get("elapsed_sec")
        window = {**window, **state.get("window", {})}
        eval_before = state.get("results", {}).get("eval_loss_before")
        history = state.get("log_history")
        if history is None:  # a checkpoint without its log history: take metrics.jsonl up to its step
            history = [h for h in read_metrics(out / "metrics.jsonl") if h.get("step", 0) <= start_step]
        for diff in config_differences(state.get("config") or {}, job.run.to_dict()):
            warn(f"warning: resuming with a changed setting, {diff}; the run is no longer one run")
        if state.get("data_fingerprint", fingerprint) != fingerprint:
            warn("warning: resuming on different training data than the checkpoint was trained on")
        if state.get("total_steps", total_steps) != total_steps:
            warn(f"warning: the run now has {total_steps} steps, the checkpoint's had {state['total_steps']}")

    # every rank has checked the output directory and the checkpoint before rank 0 writes the first byte
    # (DDP's constructor is a collective and met here anyway; FSDP's fully_shard is not)
    distributed.barrier(d)
    if main:
        make_output_dir(out)
    with output_lock(out) if main else contextlib.nullcontext(), Stop(d) as stop:
        metrics_path = out / "metrics.jsonl"
        if main:
            clean_output_dir(out, overwrite)
            save_config(job.run, out / "config.yaml")
            write_bytes_atomic(metrics_path, "".join(json.dumps(h) + "\n" for h in history).encode())
        distributed.barrier(d)
        if ckpt is not None:
            say(f"resuming from {ckpt} (step {start_step} of {total_steps})")
        elif resume:
            say(f"no checkpoint in {out} yet: starting from step 0")

        def emit(record: dict) -> None:
            history.append(record)
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")

        def evaluate_now(step: int) -> dict | None:
            if job.eval_data is None:
                return None
            res = eval_loss(
                model, job.eval_data, batch_size=t.per_device_eval_batch_size, max_seq_length=t.max_seq_length,
                pad_id=pad_id, device=device, precision=job.precision, packing=t.packing, dist=d,
                module=loss_module if job.sharded else None,
            )  # fmt: skip
            emit({"step": step, "epoch": round(step / steps_per_epoch, 4), **res})
            return res

        say(trainable_summary(model, job.adapted))
        if job.sharded:
            held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
            total = sum(p.numel() for p in model.parameters())
            say(
                f"sharded (FSDP2) over {d.world_size} processes: each holds {held:,} of the {total:,} parameters"
            )
        s = job.train_stats
        say(
            f"data: {s.conversations} conversations, {s.tokens:,} tokens ({s.supervised_tokens:,} trained), "
            f"{s.truncated} truncated, {s.dropped} dropped; {len(rows)} rows of <= {t.max_seq_length} tokens"
            f"{' (packed)' if t.packing else ''}"
        )
        say(
            f"steps: {total_steps} ({total_steps / steps_per_epoch:.3g} epochs of {steps_per_epoch} steps), effective batch "
            f"{t.per_device_train_batch_size} x {accum} accumulation"
            + (f" x {d.world_size} processes" if d.enabled else "")
            + f" = {t.per_device_train_batch_size * accum * d.world_size} rows; "
            f"device {device}, compute {job.precision if job.precision != 'no' else 'fp32'}"
        )
        if ckpt is None:
            r = evaluate_now(0)
            eval_before = r["eval_loss"] if r else None

        model.train()
        epoch_cache: dict[int, list] = {}

        def step_batches(step: int) -> list:
            epoch, j = divmod(step, steps_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = batches.epoch_batches(epoch)
            return epoch_cache[epoch][j * accum : (j + 1) * accum]

        def save_checkpoint(step: int) -> Path:
            # collectives, which every rank calls: RNG states, and (FSDP) the whole LoRA and AdamW tensors
            rngs = distributed.gather_objects(d, torch.get_rng_state())
            values = distributed.full_values(model) if job.sharded or main else {}
            opt_state = distributed.full_optimizer_state(optimizer) if job.sharded else optimizer.state_dict()
            final = out / f"checkpoint-{step}"
            if not main:
                return final
            bad = [n for n, v in values.items() if not bool(torch.isfinite(v).all())]
            if bad:  # never reached while the non-finite guard stands, but a NaN checkpoint is never written
                raise NonFiniteError(
                    f"step {step}: {bad[0]} holds NaN/Inf values; not writing checkpoint-{step}"
                )
            with atomic_dir(final) as tmp:
                lora.save_adapter(model, tmp, values=values, **adapter_kwargs(job))
                ts = {
                    "optimizer": opt_state,
                    "scheduler": scheduler.state_dict(),
                    "rng_cpu": torch.get_rng_state(),
                }
                if d.enabled:
                    ts["rng_cpu_ranks"] = rngs
                if torch.cuda.is_available():
                    ts["rng_cuda"] = torch.cuda.get_rng_state_all()
                if scaler is not None:
                    ts["scaler"] = scaler.state_dict()
                save_training_state(tmp / TRAINING_STATE_FILE, ts)
                # training time up to this step, over every resume (results.json's runtime_sec after a resume)
                elapsed = None if elapsed_before is None else elapsed_before + time.perf_counter() - t_start
                state = {
                    "step": step, "total_steps": total_steps, "tokens": tokens_seen, "targets": targets_seen,
                    "epoch": step / steps_per_epoch, "results": {"eval_loss_before": eval_before},
                    "window": dict(window), "skipped": skipped, "data_fingerprint": fingerprint,
                    "elapsed_sec": elapsed,
                    "config": job.run.to_dict(), "log_history": list(history),
                }  # fmt: skip
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            rotate(out, t.save_total_limit, keep=final)
            return final

        def nonfinite(step: int, what: str) -> NonFiniteError:
            sources = sorted({data.sources[i] for b in step_batches(step) for row in b for i in row})
            shown = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
            last = latest_checkpoint(out)
            cause = (
                "fp16 overflow (use bf16 or fp32), " if job.precision == "fp16" else ""
            ) + f"a learning rate too high for this model and data ({t.learning_rate:g})"
            return NonFiniteError(
                f"step {step + 1}: {what}, so training stopped before the optimizer step (the weights are unchanged "
                f"and no checkpoint of this step was written). The step's examples: {shown}. Likely cause: {cause}, "
                f"or a bad example. Fix: lower training_config.learning_rate, keep max_grad_norm > 0 (now "
                f"{t.max_grad_norm:g}), or set training_config.skip_nonfinite_batches=N to skip up to N bad steps. "
                f"Last good checkpoint: {last or 'none'}"
                + (" (continue from it with --resume after fixing)." if last else ".")
            )

        bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (progress and main),
            dynamic_ncols=True,
            desc="train",
        )
        window_t0 = time.perf_counter()
        t_start = time.perf_counter()
        step = saved = start_step
        while step < total_steps and not stopping(stop):
            micro = [collate(data, b, pad_id) for b in step_batches(step)]
            local_targets = sum(b.pop("num_targets") for b in micro)
            local_tokens = sum(int(data.lengths[i]) for b in step_batches(step) for row in b for i in row)
            # the step's loss is the mean over the targets of ALL ranks' micro-batches
            n_targets, step_tokens = (int(x) for x in all_sum(d, local_targets, local_tokens))
            step_loss = 0.0
            for k, b in enumerate(micro):
                b = to_device(b, device)
                with distributed.sync_context(loss_module, sync=k == len(micro) - 1):
                    with autocast(device, job.precision):
                        ls = loss_module(
                            b["input_ids"], b["position_ids"], b["labels"], b["segments"], b["target_index"]
                        )
                    loss = ls * loss_scale / max(n_targets, 1)
                    (scaler.scale(loss) if scaler else loss).backward()
                step_loss += float(ls.detach())
            (step_loss,) = all_sum(d, step_loss)
            problem, grad_norm = None, None
            if not math.isfinite(step_loss):
                problem = f"the loss is {step_loss}"
            else:
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = distributed.grad_norm_value(
                    torch.nn.utils.clip_grad_norm_(
                        params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
                    )
                )
                if not math.isfinite(grad_norm) and scaler is None:  # fp16: GradScaler skips and rescales
                    problem = (
                        f"the gradient norm is {grad_norm} (the loss is {step_loss / max(n_targets, 1):.4g})"
                    )
            if problem is not None:
                optimizer.zero_grad(set_to_none=True)
                if skipped >= max_skips:
                    raise nonfinite(step, problem)
                skipped += 1
                with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()  # the schedule stays a function of the step number
                step += 1
                bar.update(1)
                emit({"step": step, "epoch": round(step / steps_per_epoch, 4), "skipped": problem,
                      "skipped_steps": skipped})  # fmt: skip
                say(f"step {step}: {problem}; skipped this batch ({skipped} of at most {max_skips})")
            else:
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += step_tokens
                targets_seen += n_targets
                window["loss"] += step_loss
                window["targets"] += n_targets
                window["tokens"] += step_tokens
                bar.update(1)
            if step % t.logging_steps == 0 or step == total_steps:
                dt = time.perf_counter() - window_t0
                rec = {
                    "step": step, "epoch": round(step / steps_per_epoch, 4),
                    "loss": window["loss"] / window["targets"] if window["targets"] else None,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm, "tokens_per_sec": window["tokens"] / dt if dt > 0 else 0.0,
                    "tokens": tokens_seen, "targets": targets_seen,
                }  # fmt: skip
                emit(rec)
                bar.set_postfix(loss=f"{rec['loss'] or float('nan'):.4f}", lr=f"{rec['lr']:.2e}",
                                tok_s=f"{rec['tokens_per_sec']:.0f}")  # fmt: skip
                window = {"loss": 0.0, "targets": 0, "tokens": 0}
                window_t0 = time.perf_counter()
            end_of_epoch = step % steps_per_epoch == 0
            if (eval_every and step % eval_every == 0) or (t.eval_strategy == "epoch" and end_of_epoch):
                ev = evaluate_now(step)
                if ev and main:
                    bar.write(
                        f"step {step}: eval_loss {ev['eval_loss']:.4f}  ppl {ev['eval_perplexity']:.2f}"
                    )
            save_now = (t.save_strategy == "steps" and step % t.save_steps == 0) or (
                t.save_strategy == "epoch" and end_of_epoch
            )
            if step < total_steps and save_now:
                save_checkpoint(step)
                saved = step
        bar.close()
        runtime = time.perf_counter() - t_start
        # the whole run: the training time before the checkpoint resumed from, plus this process's. A
        # checkpoint without it (older lorafit) gives this process's time and tokens only.
        run_tokens = tokens_seen
        if elapsed_before is None:
            run_tokens -= state["tokens"]
        else:
            runtime += elapsed_before
        if step < total_steps:  # stopped by a signal (whenever it came, the current step is saved)
            stopped = stop.requested or "a signal to another rank"
            if step > start_step and saved != step:
                save_checkpoint(step)
            where = (
                f"saved checkpoint-{step}"
                if step > start_step
                else f"no new step since {ckpt or 'the start'}"
            )
            say(f"{stopped}: {where} in {out}; continue with `lorafit train ... --resume`")
            return {"stopped": stopped, "step": step, "output_dir": str(out)}

        if t.save_strategy != "no":
            save_checkpoint(step)
        evals = [h for h in history if "eval_loss" in h]
        last_eval = evals[-1] if evals else None
        if job.eval_data is not None and (last_eval is None or last_eval["step"] != step):
            last_eval = evaluate_now(step)
        values = distributed.full_values(model) if job.sharded or main else {}  # collective under FSDP
        if not main:
            return {"rank": d.rank, "steps": step}
        lora.save_adapter(model, out, values=values, **adapter_kwargs(job))
        train_losses = [h for h in history if h.get("loss") is not None]
        results = {
            "train_loss": sum(h["loss"] for h in train_losses) / len(train_losses) if train_losses else None,
            "final_train_loss": train_losses[-1]["loss"] if train_losses else None,
            "eval_loss_before": eval_before,
            "eval_loss": last_eval["eval_loss"] if last_eval else None,
            "eval_perplexity": last_eval["eval_perplexity"] if last_eval else None,
            "steps": step,
            "epochs": round(step / steps_per_epoch, 4),
            "tokens": tokens_seen,
            "targets": targets_seen,
            "skipped_steps": skipped,
            "runtime_sec": round(runtime, 2),
            "tokens_per_sec": round(run_tokens / runtime, 1) if runtime > 0 else None,
            "trainable_params": sum(p.numel() for p in params),
            "adapted_modules": len(job.adapted),
            "train_data": job.train_stats.to_dict(),
            "eval_data": job.eval_stats.to_dict() if job.eval_stats else None,
            "precision": job.precision if job.precision != "no" else "fp32",
            "device": str(device),
            "output_dir": str(out),
        }
        if ckpt is not None:
            results["resumed_from"] = str(ckpt)
        write_json_atomic(out / "results.json", results)
        plot_losses(history, out / "loss.png")
        return results


def stopping(stop: Stop) -> bool:
    """A signal seen by any rank stops every rank at the same step boundary."""
    requested = stop.requested is not None
    return bool(all_sum(stop.dist, float(requested))[0]) if stop.dist.enabled else requested


def restore_adapter(ckpt: Path, model) -> tuple[dict, dict]:
    """Read and check a checkpoint and put its adapter onto the (not yet sharded) model.

    Returns (trainer state, training state) for `restore_training_state`. Every file is read and
    checked before anything is applied, and nothing is written; a damaged checkpoint is a
    LorafitError naming the file and an older checkpoint to use instead.
    """
    fix = resume_fix(ckpt)
    state = read_trainer_state(ckpt, fix)
    missing = [k for k in ("step", "tokens", "targets") if not isinstance(state.get(k), int)]
    if missing:
        raise LorafitError(
            f"{ckpt / STATE_FILE}: no valid {', '.join(missing)}; not a lorafit checkpoint. {fix}"
        )
    ts = load_training_state(ckpt / TRAINING_STATE_FILE, fix)
    try:
        lora.load_adapter(model, ckpt, trainable=True)
    except lora.LoraError as e:
        raise LorafitError(f"{ckpt}: cannot resume from this checkpoint: {e}\n{fix}") from e
    return state, ts


def restore_training_state(ckpt: Path, ts: dict, optimizer, scheduler, scaler, rank: int = 0) -> None:
    """Load a checkpoint's optimizer, scheduler and RNG states (`ts`, read by `restore_adapter`).

    The optimizer state is saved whole; on sharded parameters each rank keeps its own rows of it.
    """
    fix = resume_fix(ckpt)
    try:
        optimizer.load_state_dict(ts["optimizer"])
        distributed.shard_optimizer_state(optimizer)
        scheduler.load_state_dict(ts["scheduler"])
        ranks = ts.get("rng_cpu_ranks")  # a distributed run keeps every rank's RNG (dropout masks)
        torch.set_rng_state(ranks[rank] if ranks and rank < len(ranks) else ts["rng_cpu"])
        if "rng_cuda" in ts and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ts["rng_cuda"])
        if scaler is not None and "scaler" in ts:
            scaler.load_state_dict(ts["scaler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise LorafitError(
            f"{ckpt / TRAINING_STATE_FILE}: does not fit this run ({type(e).__name__}: {e}); was the "
            f"checkpoint written with other peft_config or optimizer settings? {fix}"
        ) from e


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash ends the trustworthy part
    return out


def plot_losses(history: list[dict], path: Path) -> None:
    """loss.png: train loss per logging step and eval loss per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    replace_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
