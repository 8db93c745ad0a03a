"""What a training run needs, prepared and checked before anything is written: a `Job`.

    prepare(run config) -> Job
        output directory checked (writable; not another run's unless --resume/--overwrite) and the
        checkpoint to resume from chosen -> device (and the torchrun group) -> precision
        -> tokenizer -> data (validated, tokenized; train/eval split) -> model + LoRA

Everything that can be refused is refused here, so a bad run fails in seconds with a message
naming the fix, and the output directory is untouched. train.run(job) is the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorafit import distributed, memory, quant
from lorafit.adapters import continue_lora
from lorafit.allocator import return_freed_memory
from lorafit.check import nothing_to_train
from lorafit.checkpoint import OutputDir, check_config_kept, decide_output_dir
from lorafit.config import RunConfig, config_text
from lorafit.dashboards import check_installed
from lorafit.data import load_conversations, split_eval
from lorafit.distributed import Dist
from lorafit.errors import ConfigError, DataError, LorafitError
from lorafit.evaluation import rows_for
from lorafit.gguf_files import BASE_GGUF_KEY
from lorafit.lora.peft_format import base_reference
from lorafit.model import (
    apply_lora,
    check_attention,
    end_of_turn,
    hold_frozen_linears_in,
    load_model,
    load_model_config,
    load_tokenizer,
    meta_model,
    module_name,
    resolve_device,
)
from lorafit.packing import Batches
from lorafit.precision import compute_dtype, mixed_precision, weight_dtype
from lorafit.templates import SystemMessageWarning
from lorafit.tokens import TokenizedData, TokenStats, tokenize

log = logging.getLogger("lorafit")


@dataclass(kw_only=True)
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
    output: OutputDir  # the output directory, and the checkpoint to resume from
    dist: Dist = field(default_factory=Dist)
    sharded: bool = False  # FSDP2 (training_config.fsdp under torchrun)
    checkpointing: str = ""  # what gradient checkpointing is and why, printed at the start
    # the conversations the post-training check takes prompts from: the eval ones, else the training ones
    check_conversations: list = field(default_factory=list)
    plan: memory.Plan | None = None  # the estimate printed before the model loaded (None: a model passed in)


def load_data(
    run: RunConfig, tokenizer
) -> tuple[TokenizedData, TokenStats, TokenizedData | None, TokenStats | None, list]:
    """Training and eval data, tokenized, and the conversations the post-training check prompts with."""
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
        system_message=d.system_message,
    )
    train_data, train_stats = tokenize(tokenizer, train, **kw)
    if len(train_data) == 0:
        raise DataError(
            nothing_to_train(d.train, train_stats, max_seq_length=t.max_seq_length, train_on=d.train_on)
        )
    eval_data = eval_stats = None
    if evals:
        with warnings.catch_warnings():  # one warning per run: the training data's (the eval counts are in
            warnings.simplefilter("ignore", SystemMessageWarning)  # results.json's eval_data.system_messages)
            eval_data, eval_stats = tokenize(tokenizer, evals, **kw)
    return train_data, train_stats, eval_data, eval_stats, evals or train


def prepare(
    run: RunConfig,
    *,
    model=None,
    tokenizer=None,
    resume: bool | str | None = None,
    overwrite: bool = False,
    config_file: str | Path | None = None,
) -> Job:
    """Load tokenizer, data and model, and put LoRA on it. Writes nothing.

    The output directory is checked first (writable; not another run's unless resume/overwrite; no
    input -- base model, data, adapter, `config_file` -- where the run writes or deletes) and the
    checkpoint to resume from chosen (Job.output), so a refused run fails in a second, before any
    model is loaded. A `config_file` that is OUT/config.yaml is checked last, once the resolved config
    is known: the run may write it again only with the same text.
    """
    t = run.training_config
    # a local base folder is recorded (adapter, config.yaml, checkpoints) by its absolute path, a hub id as is
    run.model.name_or_path = base_reference(run.model.name_or_path)
    output = decide_output_dir(
        Path(t.output_dir).expanduser(),
        resume=resume,
        overwrite=overwrite,
        inputs=[run.model.name_or_path, run.data.train, run.data.eval, run.model.adapter],
        config_file=config_file,
    )
    check_installed(t.report_to)  # a missing dashboard library fails now, not after loading the model
    device = resolve_device(run.model.device, "model.device", run.origin("model.device"))
    dist = distributed.init(device.type)  # one process: a no-op; under torchrun: join the group
    device = distributed.device_for(dist, device)
    precision = mixed_precision(t.bf16, t.fp16, device)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("training_config.fp16: fp16 mixed precision needs a CUDA GPU; use bf16 or fp32")
    check_attention(run.model.attn_implementation, device, training=True)  # before the data is read
    sharded = t.fsdp and dist.enabled
    if t.fsdp and not dist.enabled:
        log.warning(
            "warning: training_config.fsdp shards the model across processes, and this is one process: "
            "training unsharded. To shard, launch with torchrun --nproc_per_node N (or lorafit train --nproc N)"
        )
    if t.return_freed_memory:  # before the data and the model: their transients go back too
        return_freed_memory()
    m = run.model
    tokenizer = tokenizer or load_tokenizer(
        m.name_or_path, trust_remote_code=m.trust_remote_code, revision=m.revision
    )
    train_data, train_stats, eval_data, eval_stats, check_conversations = load_data(run, tokenizer)
    forecast = None
    if model is None:  # before the weights load: a run that will not fit says so first
        try:
            forecast = plan(run, tokenizer=tokenizer, data=(train_data, train_stats), processes=dist.world_size,
                            device=device)  # fmt: skip
        except LorafitError:
            raise
        except Exception as e:  # a model the estimate does not know (no hidden_size, ...) still trains
            if dist.main:
                log.warning(f"warning: no memory estimate for this model ({type(e).__name__}: {e})")
        if forecast is not None and dist.main:
            log.info(forecast.short())
    torch.manual_seed(t.seed)
    loaded_here = model is None  # a model passed in is not recast behind its owner's back
    if model is None:
        try:
            # sharded on GPUs: load on the CPU; fully_shard moves each rank's shards to its GPU
            model = load_model(
                m, device=torch.device("cpu") if sharded else device, training=True, runs_on=device
            )
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
    quant.dequantize_into_buffers(model)  # 4-bit layers: no fresh weight-sized tensor per matmul
    if loaded_here and precision in ("bf16", "fp16"):
        hold_frozen_linears_in(model, compute_dtype(precision, model))
    checkpointing, why = t.gradient_checkpointing, "on" if t.gradient_checkpointing else "off"
    if checkpointing == "auto":
        tokens = t.per_device_train_batch_size * t.max_seq_length
        checkpointing, why = memory.needs_checkpointing(
            model.config, tokens, compute_dtype(precision, model), device, quantized=m.quantization != "none"
        )
    if checkpointing:
        kwargs = t.gradient_checkpointing_kwargs or {"use_reentrant": False}
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5; the old name warns
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs.get("use_reentrant", True):  # reentrant checkpoints only backprop into inputs needing grad
            model.enable_input_require_grads()
    check_config_kept(config_file, output.path, config_text(run, output.path / "config.yaml"))
    return Job(
        run=run, model=model, tokenizer=tokenizer, device=device, precision=precision,
        train_data=train_data, train_stats=train_stats, eval_data=eval_data, eval_stats=eval_stats,
        adapted=adapted, output=output, dist=dist, sharded=sharded, checkpointing=f"gradient checkpointing: {why}",
        check_conversations=check_conversations,
        plan=forecast,
    )  # fmt: skip


def adapter_kwargs(job: Job) -> dict:
    p = job.run.peft_config
    return dict(
        base_model_name_or_path=job.run.model.name_or_path,
        lora_dropout=p.lora_dropout,
        bias=p.bias,
        modules_to_save=[module_name(job.model, n) for n in p.modules_to_save or []] or None,
        revision=job.run.model.revision,
        # the system-message policy the data was rendered with: generate/chat render prompts the same way
        extra_metadata={
            **(quantization_metadata(job.run.model, job.model) or {}),
            "system_message": job.run.data.system_message,
            # a GGUF base: which file (name, size, digest), so another file is refused at load
            **(
                {BASE_GGUF_KEY: job.model.lorafit_base_gguf}
                if hasattr(job.model, "lorafit_base_gguf")
                else {}
            ),
        },
    )


def quantization_metadata(m, model=None) -> dict | None:
    """What the adapter's base was quantized with, or None: the method and double quant, and for 4-bit
    what the loaded layers of `model` say (lorafit.quant.quantized_with: the dtype the weights were
    quantized from, compute dtype, blocksize). `lorafit fuse` quantizes the base again from these, and
    eval/generate/chat warn when the base is loaded otherwise."""
    if m.quantization == "none":
        return None
    double = m.bnb_4bit_use_double_quant if m.quantization != "int8" else None
    details = quant.quantized_with(model) if model is not None else {}
    return {"quantization": {"method": m.quantization, "double_quant": double, **details}}


def plan(
    run: RunConfig,
    *,
    tokenizer=None,
    data: tuple[TokenizedData, TokenStats] | None = None,
    processes: int = 1,
    device: torch.device | None = None,
    free: int | None = None,
    runtime: int | None = None,
) -> memory.Plan:
    """The memory, steps and tokens of `run`, from the model's config and the data's token counts: the
    base model is built on the meta device (no weights load) with LoRA put on it as training does.

    `processes`: plan for N processes (per-rank figures; with training_config.fsdp, sharded). `free`: the
    bytes to check the peak against (default: the device's free memory; on a CPU MemAvailable plus what this
    process holds, since a training process would hold that too). `runtime`: the bytes a process holds
    before the model loads (default: this process's resident memory on a CPU, a CUDA context on a GPU).
    """
    t, m = run.training_config, run.model
    device = device or resolve_device(m.device, "model.device", run.origin("model.device"))
    precision = mixed_precision(t.bf16, t.fp16, device)
    tokenizer = tokenizer or load_tokenizer(
        m.name_or_path, trust_remote_code=m.trust_remote_code, revision=m.revision
    )
    train_data, stats = data or load_data(run, tokenizer)[:2]
    if m.quantization != "none":
        quant.bnb_config(m.quantization)  # bitsandbytes installed? (and its import counted in the runtime)
    hf_config = load_model_config(m)
    file_dtype = getattr(hf_config, "dtype", None) or torch.float32
    if isinstance(file_dtype, str):
        file_dtype = getattr(torch, file_dtype)
    model = meta_model(m, hf_config, weight_dtype(m.dtype, device, file_dtype))
    peft = dataclasses.replace(run.peft_config)
    if m.adapter:
        continue_lora(model, peft, m.adapter)
    else:
        apply_lora(model, peft)
    cdtype = compute_dtype(precision, model)
    if precision in ("bf16", "fp16"):
        hold_frozen_linears_in(model, cdtype)
    rows = rows_for(train_data, t.max_seq_length, t.packing)
    lengths, supervised = train_data.lengths, np.add.reduceat(train_data.supervised, train_data.offsets[:-1])
    row_tokens = [int(sum(lengths[i] for i in r)) for r in rows]
    row_targets = sorted(int(sum(supervised[i] for i in r)) for r in rows)
    batch = min(t.per_device_train_batch_size, -(-len(rows) // processes))  # no more rows than there are
    batches = Batches(rows, t.per_device_train_batch_size, seed=t.seed, shuffle=False, world_size=processes)
    per_epoch, total = t.step_counts(batches.batches_per_epoch)
    seq = min(max(row_tokens), t.max_seq_length)
    checkpointing, why = t.gradient_checkpointing, "on" if t.gradient_checkpointing else "off"
    free_now = free
    if free_now is None:
        free_now = memory.free_bytes(device)
        if device.type == "cpu" and free_now is not None:
            free_now += memory.process_rss() or 0
    if checkpointing == "auto":
        checkpointing, why = memory.needs_checkpointing(
            hf_config, batch * seq, cdtype, device, free=free_now, quantized=m.quantization != "none"
        )
    if runtime is None:
        runtime = (memory.process_rss() or 0) if device.type == "cpu" else memory.CUDA_CONTEXT
    setup = memory.Setup(
        device=device.type, precision=precision, compute_dtype=cdtype, checkpoint_dtype=file_dtype,
        quantization=m.quantization, double_quant=m.bnb_4bit_use_double_quant, batch=batch, seq=seq,
        max_seq_length=t.max_seq_length, checkpointing=bool(checkpointing), attn_implementation=m.attn_implementation,
        lora_dropout=peft.lora_dropout, processes=processes, fsdp=t.fsdp, runtime=runtime,
        keeps_freed=not t.return_freed_memory,
    )  # fmt: skip
    targets = sum(row_targets[-batch:])
    mem = memory.estimate(model, hf_config, setup, targets=targets)
    fits = memory.fits(mem.peak, free_now, setup)
    advice = []
    if fits is False:
        peak_of = lambda changed: memory.estimate(model, hf_config, changed, targets=targets).peak  # noqa: E731
        advice = memory.advise(setup, t.gradient_accumulation_steps, peak_of, free_now)
    epochs = total / per_epoch
    return memory.Plan(
        memory=mem, setup=setup, free=free_now, fits=fits, advice=advice, model=m.name_or_path, device=str(device),
        checkpointing=why, conversations=stats.conversations, rows=len(rows), steps=total, steps_per_epoch=per_epoch,
        epochs=epochs, tokens=round(stats.tokens * epochs), targets=round(stats.targets * epochs),
    )  # fmt: skip
