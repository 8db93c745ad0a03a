"""The training loop: LoRA fine-tuning of a causal LM on chat data, with lorafit's own loop.

One optimizer step = `gradient_accumulation_steps` micro-batches. The loss of a step is the mean
cross-entropy over ALL target tokens of its micro-batches (token-weighted): each micro-batch adds
`loss_sum / targets_in_step` to the gradient, so the result is the same however the step is split
into micro-batches (tested). Step s always reads the same micro-batches (epoch s // steps_per_epoch,
its slot within the epoch), which is what makes resume exact.

    job.prepare():  config -> output directory checked -> tokenizer -> data -> model + LoRA
                    (all checks happen here, before anything is written)
    run(job):       [checkpoint loaded] -> setup_loop -> [eval before] -> steps -> finish
                    (last checkpoint, adapter, results.json, loss.png, post-training check),
                    or stopped by a signal
    each step:      train_step (micro-batches, all ranks summed, clip, NaN/Inf guard)
                    -> apply_step or skip_step -> log_window / evaluate / save when due

The state a run carries from step to step is one `checkpoint.TrainState` (what trainer_state.json
holds); what it runs with is a `Loop` (batches, step counts, optimizer); its log is a
`metrics.MetricsLog`. The file is longer than lorafit's ~500-line mark on purpose: the loop and every
step it names stay together, so run() and what it calls read in one place (prepare is in job.py,
the optimizer and schedule in optim.py, checkpoint files in checkpoint.py).

Output directory:

    OUT/adapter_config.json, adapter_model.safetensors   the final adapter (PEFT format)
    OUT/config.yaml       the resolved run config        OUT/metrics.jsonl   every log line
    OUT/results.json      summary, "checks"              OUT/loss.png        train/eval loss plot
    OUT/checkpoint-<step>/                               adapter + optimizer/scheduler/RNG/data position
    OUT/runs/, OUT/wandb/, OUT/mlflow.db                 dashboards (training_config.report_to), when chosen

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
import logging
import math
import resource
import signal
import time
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lorafit import distributed, lora
from lorafit.adapter_check import check_trained, format_report, skipped
from lorafit.attention import attends_per_segment
from lorafit.checkpoint import (
    TrainState,
    clean_output_dir,
    data_fingerprint,
    disk_full_error,
    is_disk_full,
    latest_checkpoint,
    load_checkpoint,
    make_output_dir,
    output_lock,
    restore_training_state,
    save_checkpoint,
)
from lorafit.config import TrainingConfig, save_config
from lorafit.dashboards import Dashboards
from lorafit.distributed import Dist, all_sum
from lorafit.errors import LorafitError
from lorafit.evaluation import eval_loss, rows_for
from lorafit.job import Job, adapter_kwargs
from lorafit.lora.files import write_json_atomic
from lorafit.metrics import METRICS_FILE, MetricsLog, read_metrics
from lorafit.model import trainable_summary
from lorafit.optim import make_optimizer, make_scheduler
from lorafit.packing import Batches, collate, one_row, to_device
from lorafit.precision import autocast, compute_dtype

log = logging.getLogger("lorafit")


# ----------------------------------------------------------------------------- the loop's parts


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


def stopping(stop: Stop) -> bool:
    """A signal seen by any rank stops every rank at the same step boundary."""
    requested = stop.requested is not None
    return bool(all_sum(stop.dist, float(requested))[0]) if stop.dist.enabled else requested


class NonFiniteError(LorafitError):
    """The loss or the gradient became NaN or Inf (training diverged)."""


class Console:
    """What a run prints. Rank 0 only (every rank sees the same); next to a progress bar through
    tqdm.write, else through the "lorafit" logger. Evaluation lines always go to stdout."""

    def __init__(self, main: bool, progress: bool):
        self.main, self.progress = main, progress

    def say(self, message: str) -> None:
        if self.main:
            (tqdm.write if self.progress else log.info)(message)

    def warn(self, message: str) -> None:
        if self.main:
            log.warning(message)

    def eval_line(self, step: int, ev: dict) -> None:
        if self.main:
            tqdm.write(f"step {step}: eval_loss {ev['eval_loss']:.4f}  ppl {ev['eval_perplexity']:.2f}")

    def bar(self, total: int, initial: int) -> tqdm:
        disable = not (self.progress and self.main)
        return tqdm(total=total, initial=initial, disable=disable, dynamic_ncols=True, desc="train")


@dataclass
class Loop:
    """What the steps run with, set up from a Job: the data order, the step counts, the module that
    computes the loss (DDP/FSDP-wrapped under torchrun) and the optimizer, scheduler and scaler."""

    t: TrainingConfig
    batches: Batches
    rows: int  # rows of the training data (packed or not)
    steps_per_epoch: int
    total_steps: int
    loss_module: torch.nn.Module
    loss_scale: float  # the world size: DDP and FSDP average gradients over ranks, this undoes it
    params: list  # the trainable parameters (FSDP: their shards)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None  # fp16 only
    padding_free: bool = False  # unpacked rows go in end to end as one row (lorafit.packing.one_row)
    epoch: dict[int, list] = field(default_factory=dict)  # the current epoch's batches

    def step_batches(self, step: int) -> list:
        """The micro-batches of optimizer step `step` (of this rank): fixed by the step number alone."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch not in self.epoch:
            self.epoch.clear()
            self.epoch[epoch] = self.batches.epoch_batches(epoch)
        accum = self.t.gradient_accumulation_steps
        return self.epoch[epoch][j * accum : (j + 1) * accum]

    def collate(self, data, rows: list, pad_id: int) -> dict:
        """One micro-batch's tensors; unpacked rows as one row without padding where that is exact."""
        return collate(data, one_row(rows) if self.padding_free else rows, pad_id)

    def end_of_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def log_due(self, step: int) -> bool:
        return step % self.t.logging_steps == 0 or step == self.total_steps

    def eval_due(self, step: int) -> bool:
        every = self.t.eval_every()
        return bool(every and step % every == 0) or (
            self.t.eval_strategy == "epoch" and self.end_of_epoch(step)
        )

    def save_due(self, step: int) -> bool:
        t = self.t
        due = (t.save_strategy == "steps" and step % t.save_steps == 0) or (
            t.save_strategy == "epoch" and self.end_of_epoch(step)
        )
        return step < self.total_steps and due  # the last step is saved by finish()


def setup_loop(job: Job) -> Loop:
    """Batches and step counts; wrap the model (DDP/FSDP shard it here); optimizer and schedule."""
    t, d = job.run.training_config, job.dist
    rows = rows_for(job.train_data, t.max_seq_length, t.packing)
    batches = Batches(
        rows, t.per_device_train_batch_size, seed=t.seed, shuffle=True, rank=d.rank, world_size=d.world_size
    )
    steps_per_epoch, total_steps = t.step_counts(batches.batches_per_epoch)
    cdtype = compute_dtype(job.precision, job.model)
    loss_module, loss_scale = distributed.wrap(d, job.model, cdtype, device=job.device, fsdp=job.sharded)
    optimizer = make_optimizer(
        job.model, t, job.device
    )  # after wrap: FSDP replaced the parameters by their shards
    return Loop(
        t=t, batches=batches, rows=len(rows), steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        loss_module=loss_module, loss_scale=loss_scale, params=[p for p in job.model.parameters() if p.requires_grad],
        optimizer=optimizer, scheduler=make_scheduler(optimizer, t, total_steps),
        scaler=torch.amp.GradScaler(job.device.type) if job.precision == "fp16" else None,
        padding_free=not t.packing and attends_per_segment(job.model),
    )  # fmt: skip


def resumed_state(job: Job, loop: Loop, state: TrainState, console: Console) -> TrainState:
    """A checkpoint's state, continued by this run: warn about what changed, then record this run's."""
    if state.log_history is None:  # a checkpoint without its log history: take metrics.jsonl up to its step
        metrics = read_metrics(job.output.path / METRICS_FILE)
        state.log_history = [h for h in metrics if h.get("step", 0) <= state.step]
    config, fingerprint = job.run.to_dict(), data_fingerprint(job.train_data)
    for warning in state.differences(config, fingerprint, loop.total_steps):
        console.warn(warning)
    state.config, state.data_fingerprint, state.total_steps = config, fingerprint, loop.total_steps
    return state


def new_state(job: Job, loop: Loop) -> TrainState:
    return TrainState(
        total_steps=loop.total_steps,
        data_fingerprint=data_fingerprint(job.train_data),
        config=job.run.to_dict(),
    )


def say_setup(job: Job, loop: Loop, console: Console) -> None:
    """The lines a run starts with: what trains, on what data, for how many steps, where."""
    model, d, t = job.model, job.dist, loop.t
    console.say(trainable_summary(model, job.adapted))
    if job.checkpointing:
        console.say(job.checkpointing)
    if job.sharded:
        held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        console.say(
            f"sharded (FSDP2) over {d.world_size} processes: each holds {held:,} of the {total:,} parameters"
        )
    s, accum = job.train_stats, t.gradient_accumulation_steps
    console.say(
        f"data: {s.conversations} conversations, {s.tokens:,} tokens ({s.supervised_tokens:,} trained), "
        f"{s.truncated} truncated, {s.dropped} dropped; {loop.rows} rows of <= {t.max_seq_length} tokens"
        f"{' (packed)' if t.packing else ''}"
    )
    console.say(
        f"steps: {loop.total_steps} ({loop.total_steps / loop.steps_per_epoch:.3g} epochs of {loop.steps_per_epoch} "
        f"steps), effective batch {t.per_device_train_batch_size} x {accum} accumulation"
        + (f" x {d.world_size} processes" if d.enabled else "")
        + f" = {t.per_device_train_batch_size * accum * d.world_size} rows; "
        f"device {job.device}, compute {job.precision if job.precision != 'no' else 'fp32'}"
    )


def evaluate(job: Job, loop: Loop, metrics: MetricsLog, step: int) -> dict | None:
    """Eval loss at `step` (None without eval data), logged to metrics.jsonl."""
    if job.eval_data is None:
        return None
    t = loop.t
    res = eval_loss(
        job.model, job.eval_data, batch_size=t.per_device_eval_batch_size, max_seq_length=t.max_seq_length,
        pad_id=job.tokenizer.pad_token_id, device=job.device, precision=job.precision, packing=t.packing,
        dist=job.dist, module=loop.loss_module if job.sharded else None,
    )  # fmt: skip
    metrics.emit({"step": step, "epoch": round(step / loop.steps_per_epoch, 4), **res})
    return res


# ----------------------------------------------------------------------------- one optimizer step


@dataclass
class StepResult:
    loss: float  # summed cross-entropy of the step's targets, every rank
    targets: int  # target tokens of the step, every rank
    tokens: int  # tokens of the step, every rank
    grad_norm: float | None = None  # before clipping (None when the loss was already NaN/Inf)
    problem: str | None = None  # why the step must not be applied: a NaN/Inf loss or gradient norm


def train_step(job: Job, loop: Loop, step: int) -> StepResult:
    """Forward and backward over the step's micro-batches, then clip; the optimizer is not stepped.

    Each micro-batch adds loss_sum / (targets of the whole step, every rank) to the gradient, so the
    step's gradient is that of the token-weighted mean however the step is split. A NaN/Inf loss or
    gradient norm is reported in `problem` (with fp16, the GradScaler handles an Inf gradient itself).
    """
    data, d, scaler = job.train_data, job.dist, loop.scaler
    batches = loop.step_batches(step)
    micro = [loop.collate(data, b, job.tokenizer.pad_token_id) for b in batches]
    local_targets = sum(b.pop("num_targets") for b in micro)
    local_tokens = sum(int(data.lengths[i]) for b in batches for row in b for i in row)
    # the step's loss is the mean over the targets of ALL ranks' micro-batches
    n_targets, n_tokens = (int(x) for x in all_sum(d, local_targets, local_tokens))
    # summed on the device in float64 (as a Python float would be) and read once per step: no host sync per
    # micro-batch
    step_sum = torch.zeros((), dtype=torch.float64, device=job.device)
    for k, b in enumerate(micro):
        b = to_device(b, job.device)
        with distributed.sync_context(loop.loss_module, sync=k == len(micro) - 1):
            with autocast(job.device, job.precision):
                ls = loop.loss_module(
                    b["input_ids"], b["position_ids"], b["labels"], b["segments"], b["target_index"]
                )
            loss = ls * loop.loss_scale / max(n_targets, 1)
            (scaler.scale(loss) if scaler else loss).backward()
        step_sum += ls.detach().double()
    (step_loss,) = all_sum(d, float(step_sum))
    result = StepResult(step_loss, n_targets, n_tokens)
    if not math.isfinite(step_loss):
        result.problem = f"the loss is {step_loss}"
        return result
    if scaler:
        scaler.unscale_(loop.optimizer)
    max_norm = loop.t.max_grad_norm if loop.t.max_grad_norm > 0 else float("inf")
    result.grad_norm = distributed.grad_norm_value(torch.nn.utils.clip_grad_norm_(loop.params, max_norm))
    if not math.isfinite(result.grad_norm) and scaler is None:  # fp16: GradScaler skips and rescales
        result.problem = (
            f"the gradient norm is {result.grad_norm} (the loss is {step_loss / max(n_targets, 1):.4g})"
        )
    return result


def apply_step(loop: Loop, state: TrainState, result: StepResult) -> None:
    """The optimizer step, and the step's tokens counted."""
    if loop.scaler:
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    else:
        loop.optimizer.step()
    state.tokens += result.tokens
    state.targets += result.targets
    state.window.add(result.loss, result.targets, result.tokens)
    next_step(loop, state)


def skip_step(job: Job, loop: Loop, state: TrainState, problem: str) -> None:
    """Drop a NaN/Inf step's gradient; past training_config.skip_nonfinite_batches, stop the run."""
    loop.optimizer.zero_grad(set_to_none=True)
    if state.skipped >= loop.t.skip_nonfinite_batches:
        raise nonfinite_error(job, loop, state.step, problem)
    state.skipped += 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore", UserWarning)
        next_step(loop, state)  # the schedule stays a function of the step number


def next_step(loop: Loop, state: TrainState) -> None:
    """What every step ends with, applied or skipped: the schedule advances, the gradient is cleared."""
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    state.step += 1


def nonfinite_error(job: Job, loop: Loop, step: int, problem: str) -> NonFiniteError:
    t = loop.t
    sources = sorted({job.train_data.sources[i] for b in loop.step_batches(step) for row in b for i in row})
    shown = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
    last = latest_checkpoint(job.output.path)
    cause = (
        "fp16 overflow (use bf16 or fp32), " if job.precision == "fp16" else ""
    ) + f"a learning rate too high for this model and data ({t.learning_rate:g})"
    return NonFiniteError(
        f"step {step + 1}: {problem}, so training stopped before the optimizer step (the weights are unchanged "
        f"and no checkpoint of this step was written). The step's examples: {shown}. Likely cause: {cause}, "
        f"or a bad example. Fix: lower training_config.learning_rate, keep max_grad_norm > 0 (now "
        f"{t.max_grad_norm:g}), or set training_config.skip_nonfinite_batches=N to skip up to N bad steps. "
        f"Last good checkpoint: {last or 'none'}"
        + (" (continue from it with --resume after fixing)." if last else ".")
    )


def log_skip(loop: Loop, state: TrainState, problem: str, metrics: MetricsLog, console: Console) -> None:
    epoch = round(state.step / loop.steps_per_epoch, 4)
    metrics.emit({"step": state.step, "epoch": epoch, "skipped": problem, "skipped_steps": state.skipped})
    console.say(
        f"step {state.step}: {problem}; skipped this batch ({state.skipped} of at most {loop.t.skip_nonfinite_batches})"
    )


def log_window(loop: Loop, state: TrainState, grad_norm: float | None, metrics: MetricsLog) -> dict:
    """The training line of the steps since the last one (mean loss over their targets), and a new window."""
    w = state.window
    dt = time.perf_counter() - w.started
    record = {
        "step": state.step, "epoch": round(state.step / loop.steps_per_epoch, 4),
        "loss": w.loss / w.targets if w.targets else None,
        "lr": loop.scheduler.get_last_lr()[0],
        "grad_norm": grad_norm, "tokens_per_sec": w.tokens / dt if dt > 0 else 0.0,
        "tokens": state.tokens, "targets": state.targets,
    }  # fmt: skip
    metrics.emit(record)
    w.reset()
    return record


def save(job: Job, loop: Loop, state: TrainState) -> None:
    """checkpoint-<step>. Every rank calls it: RNG states and (FSDP) the whole tensors are gathered."""
    d, main = job.dist, job.dist.main
    rngs = distributed.gather_objects(d, torch.get_rng_state())
    on_gpus = d.enabled and job.device.type == "cuda"
    cuda_rngs = distributed.gather_objects(d, torch.cuda.get_rng_state(job.device)) if on_gpus else None
    values = distributed.full_values(job.model) if job.sharded or main else {}
    opt_state = (
        distributed.full_optimizer_state(loop.optimizer) if job.sharded else loop.optimizer.state_dict()
    )
    if not main:
        return
    bad = [n for n, v in values.items() if not bool(torch.isfinite(v).all())]
    if bad:  # never reached while the non-finite guard stands, but a NaN checkpoint is never written
        raise NonFiniteError(
            f"step {state.step}: {bad[0]} holds NaN/Inf values; not writing checkpoint-{state.step}"
        )
    try:
        save_checkpoint(
            job.output.path, state, steps_per_epoch=loop.steps_per_epoch, model=job.model, values=values,
            adapter_kwargs=adapter_kwargs(job), optimizer_state=opt_state, scheduler=loop.scheduler,
            scaler=loop.scaler, rngs=rngs if d.enabled else None, limit=loop.t.save_total_limit,
            cuda_rngs=cuda_rngs,
        )  # fmt: skip
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise disk_full_error(job.output.path, f"checkpoint-{state.step}") from None


# ----------------------------------------------------------------------------- the run


def run(job: Job, *, progress: bool = True) -> dict:
    """Train, evaluate, checkpoint and save. Returns the results dict (also written to results.json).

    Continues from job.output.resume_from (chosen by prepare) exactly where it stopped.
    If stopped by SIGINT/SIGTERM, returns {"stopped": signal name, "step", "output_dir"}.
    """
    d, out, ckpt = job.dist, job.output.path, job.output.resume_from
    console = Console(d.main, progress)  # only rank 0 writes files and prints
    # Everything a checkpoint restores is read and applied here, in memory, before anything is written:
    # the adapter onto the model before it is sharded, the training state after the optimizer exists.
    loaded = load_checkpoint(ckpt, job.model) if ckpt is not None else None
    loop = setup_loop(job)
    if loaded is not None:
        state, training_state = loaded
        restore_training_state(
            ckpt, training_state, loop.optimizer, loop.scheduler, loop.scaler, rank=d.rank, device=job.device
        )
        state = resumed_state(job, loop, state, console)
    else:
        state = new_state(job, loop)
    t = loop.t
    boards = None  # training_config.report_to: rank 0 only; started once the output directory is ready
    if d.main and t.report_to:
        name = t.run_name or out.resolve().name
        boards = Dashboards(t.report_to, out, job.run.to_dict(), state.step, name=name, project=t.project)
    metrics = MetricsLog(out / METRICS_FILE, state.log_history, write=d.main, dashboards=boards)

    # every rank has checked the output directory and the checkpoint before rank 0 writes the first byte
    # (DDP's constructor is a collective and met here anyway; FSDP's fully_shard is not)
    distributed.barrier(d)
    if d.main:
        make_output_dir(out)
    with (
        output_lock(out) if d.main else contextlib.nullcontext(),
        Stop(d) as stop,
        contextlib.ExitStack() as finally_,
    ):
        if d.main:
            clean_output_dir(out, job.output.overwrite)
            save_config(job.run, out / "config.yaml")
            metrics.restart()
        if boards is not None:  # finished on every way out: the end, an error, Ctrl-C, a signal
            finally_.enter_context(boards)
        distributed.barrier(d)
        if ckpt is not None:
            console.say(f"resuming from {ckpt} (step {state.step} of {loop.total_steps})")
        elif job.output.resume:
            console.say(f"no checkpoint in {out} yet: starting from step 0")
        say_setup(job, loop, console)
        if ckpt is None:
            ev = evaluate(job, loop, metrics, 0)
            state.eval_loss_before = ev["eval_loss"] if ev else None

        job.model.train()
        bar = console.bar(loop.total_steps, state.step)
        state.start_clock()
        saved = state.step
        while state.step < loop.total_steps and not stopping(stop):
            result = train_step(job, loop, state.step)
            if result.problem is None:
                apply_step(loop, state, result)
                bar.update(1)
            else:
                skip_step(job, loop, state, result.problem)  # NonFiniteError past skip_nonfinite_batches
                bar.update(1)
                log_skip(loop, state, result.problem, metrics, console)
            if loop.log_due(state.step):
                rec = log_window(loop, state, result.grad_norm, metrics)
                bar.set_postfix(loss=f"{rec['loss'] or float('nan'):.4f}", lr=f"{rec['lr']:.2e}",
                                tok_s=f"{rec['tokens_per_sec']:.0f}")  # fmt: skip
            if loop.eval_due(state.step) and (ev := evaluate(job, loop, metrics, state.step)):
                console.eval_line(state.step, ev)
            if loop.save_due(state.step):
                save(job, loop, state)
                saved = state.step
        bar.close()
        runtime, run_tokens = state.run_time()  # the training itself: before the last checkpoint and eval

        if state.step < loop.total_steps:  # stopped by a signal (whenever it came, the current step is saved)
            if boards is not None:
                boards.status = "killed"
            return stopped(job, loop, state, stop.requested or "a signal to another rank", saved, console)
        return finish(job, loop, state, metrics, runtime, run_tokens)


def stopped(job: Job, loop: Loop, state: TrainState, signal_name: str, saved: int, console: Console) -> dict:
    """After a signal: checkpoint the current step (unless just saved) and say how to continue."""
    out, ckpt = job.output.path, job.output.resume_from
    if state.step > state.start_step and saved != state.step:
        save(job, loop, state)
    where = (
        f"saved checkpoint-{state.step}"
        if state.step > state.start_step
        else f"no new step since {ckpt or 'the start'}"
    )
    console.say(f"{signal_name}: {where} in {out}; continue with `lorafit train ... --resume`")
    return {"stopped": signal_name, "step": state.step, "output_dir": str(out)}


def finish(
    job: Job, loop: Loop, state: TrainState, metrics: MetricsLog, runtime: float, run_tokens: int
) -> dict:
    """The last checkpoint and evaluation, then the adapter, results.json and loss.png (rank 0)."""
    d, out = job.dist, job.output.path
    if loop.t.save_strategy != "no":
        save(job, loop, state)
    last_eval = metrics.last_eval()
    if job.eval_data is not None and (last_eval is None or last_eval["step"] != state.step):
        last_eval = evaluate(job, loop, metrics, state.step)
    values = distributed.full_values(job.model) if job.sharded or d.main else {}  # collective under FSDP
    if not d.main:
        return {"rank": d.rank, "steps": state.step}
    results = summarize(job, loop, state, metrics, last_eval, runtime, run_tokens)
    try:
        lora.save_adapter(job.model, out, values=values, **adapter_kwargs(job))
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise disk_full_error(out, "the final adapter") from None
    try:
        write_json_atomic(out / "results.json", results)
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise disk_full_error(out, "results.json", "The final adapter was saved; ") from None
    try:  # the adapter and results.json are the run's output: a missing plot is a warning, not a failure
        metrics.plot(out / "loss.png")
    except OSError as e:
        Console(True, False).warn(f"warning: could not write {out / 'loss.png'} ({e.strerror or e}); "
                                  "the adapter and results.json are complete")  # fmt: skip
    post_check(job, loop, results, Console(True, False))
    return results


def post_check(job: Job, loop: Loop, results: dict, console: Console) -> None:
    """training_config.post_check: lorafit.adapter_check on the model just trained and the adapter just
    saved; the report is printed (always, like the eval lines) and added to results.json under "checks"
    (rewritten atomically). A failed check is reported, not an error: the run and its adapter are complete."""
    t = loop.t
    if not t.post_check:
        return
    if job.dist.enabled:
        report = skipped("not run under torchrun; run `lorafit check-adapter` on the output")
    else:
        eval_args = dict(batch_size=t.per_device_eval_batch_size, max_seq_length=t.max_seq_length,
                         pad_id=job.tokenizer.pad_token_id, device=job.device, precision=job.precision,
                         packing=t.packing)  # fmt: skip
        try:
            report = check_trained(
                job.model, job.tokenizer, job.check_conversations, job.output.path, eval_data=job.eval_data,
                eval_args=eval_args, training_eval_loss=results["eval_loss"], precision=job.precision,
                system_message=job.run.data.system_message,
                prompts_from="eval data" if job.eval_data is not None else "training data (no eval data)",
            )  # fmt: skip
        except LorafitError as e:  # e.g. no prompt fits the model's context: say so, keep the run
            report = skipped(str(e))
    results["checks"] = report
    tqdm.write(format_report(report))
    try:
        write_json_atomic(job.output.path / "results.json", results)
    except OSError as e:
        console.warn(f"warning: could not add the check to {job.output.path / 'results.json'} ({e})")


def summarize(
    job: Job,
    loop: Loop,
    state: TrainState,
    metrics: MetricsLog,
    last_eval: dict | None,
    runtime: float,
    tokens: int,
) -> dict:
    """results.json: losses, counts and throughput of the whole run (over every resume)."""
    losses = metrics.train_losses()
    results = {
        "train_loss": sum(losses) / len(losses) if losses else None,
        "final_train_loss": losses[-1] if losses else None,
        "eval_loss_before": state.eval_loss_before,
        "eval_loss": last_eval["eval_loss"] if last_eval else None,
        "eval_perplexity": last_eval["eval_perplexity"] if last_eval else None,
        "steps": state.step,
        "epochs": round(state.step / loop.steps_per_epoch, 4),
        "tokens": state.tokens,
        "targets": state.targets,
        "skipped_steps": state.skipped,
        "runtime_sec": round(runtime, 2),
        "tokens_per_sec": round(tokens / runtime, 1) if runtime > 0 else None,
        "trainable_params": sum(p.numel() for p in loop.params),
        "adapted_modules": len(job.adapted),
        "train_data": job.train_stats.to_dict(),
        "eval_data": job.eval_stats.to_dict() if job.eval_stats else None,
        "precision": job.precision if job.precision != "no" else "fp32",
        "device": str(job.device),
        "output_dir": str(job.output.path),
    }
    if job.output.resume_from is not None:
        results["resumed_from"] = str(job.output.resume_from)
    results["memory"] = {"estimated_peak_bytes": job.plan.memory.peak if job.plan else None,
                         "peak_rss_bytes": peak_memory(job.device)}  # fmt: skip
    return results


def peak_memory(device: torch.device) -> int:
    """What `lorafit estimate` predicts, measured: on a GPU the allocator's peak reserved bytes, else the
    process's peak resident memory (Linux: ru_maxrss in KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
