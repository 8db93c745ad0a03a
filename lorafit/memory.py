"""What a training run will need, known before it loads a weight: memory per device, steps, tokens.

The figures come from the model's config (a model built on the meta device, with LoRA put on it
exactly as training does, so every parameter count and dtype is the real one), the data's token
counts (tokenizer only) and the run config. `lorafit.job.plan` gathers these; this module turns
them into bytes. Per device (per rank with N processes):

    base weights    frozen parameters in the dtype they are held in (fp32 linear weights held in the
                    compute dtype under autocast, `model.hold_frozen_linears_in`); bitsandbytes
                    layers: 4-bit = numel/2 packed bytes + an absmax per block of 64 (fp32, or with
                    double quant uint8 + an fp32 absmax per 256 blocks + the two code tables);
                    int8 = numel bytes + an fp32 scale per output row
    LoRA, gradients, optimizer      trainable parameters; as many gradient bytes; AdamW's two moments
    activations     kept for backward: per token and decoder layer about 12 * hidden + 5 * intermediate
                    values in the compute dtype (the norms' inputs, q/k/v, the attention output, gate/up
                    and their product; bf16 autocast, sdpa: 39 KB and 104 KB predicted against 42 KB and
                    101 KB measured with malloc's counters on Phi-3 shapes of hidden 768 / intermediate
                    2048 and 2048 / 5504, bench/estimate.py); eager attention adds heads * T^2
                    probabilities per row; with gradient checkpointing each layer keeps its input only
                    and one layer's activations exist again while it is recomputed
    backward        one decoder layer's activations as the working set of its backward pass
    head            lorafit's chunked loss (`lorafit.loss`): fp32 logits of at most 64 MiB at a time
                    plus their compute-dtype gradient, and the hidden-state gradient of the targets; a
                    head the chunked path cannot take keeps the micro-batch's logits, fp32, for backward
    FSDP            base, LoRA, gradients and AdamW state divided by N; the root group (embeddings,
                    head, final norm) and two decoder layers gathered whole at a time
    runtime         CPU: the resident memory of the process before the model loads (Python, torch,
                    transformers, the tokenizer, the data), measured; GPU: the CUDA context
    overhead        CPU: what a process adds once it trains besides tensors (thread pools, malloc's
                    arenas, the freed blocks glibc keeps): CPU_TRAINING_OVERHEAD + CPU_ALLOCATOR_KEEPS
                    of a step's transient tensors, fitted to measured runs

The peak per device is the larger of the training step's peak and loading's (a CPU process maps the
checkpoint file and, when the held dtype differs from the file's, holds a converted copy too). On a
CPU it is the peak resident memory of the process; on a GPU the allocator's reserved bytes. Accuracy
against measured runs: BENCHMARKS.md, "How accurate is `lorafit estimate`".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafit.loss import CHUNK_BYTES, fast_head_ok

AUTO_LIMIT = 0.5  # checkpointing goes on when activations would need more than this share of free memory
CUDA_CONTEXT = 500 * 2**20  # a CUDA context with torch's kernels loaded, typically 300-600 MiB
# A CPU process that trains holds more than before its model loaded, besides its live tensors: the thread
# pools and their malloc arenas, oneDNN's kernel caches, and, when glibc's malloc keeps the blocks a step
# frees for reuse (training_config.return_freed_memory: false), a share of what a step allocates and frees.
# CPU_ALLOCATOR_KEEPS was fitted with glibc keeping freed blocks (small-bf16-ckpt and medium-bf16 of
# bench/estimate.py); with return_freed_memory on those blocks go back to the system and only
# CPU_TRAINING_OVERHEAD remains, which the rerun with it on bears out (BENCHMARKS.md, "How accurate is
# `lorafit estimate`").
CPU_TRAINING_OVERHEAD = 240 * 2**20
CPU_ALLOCATOR_KEEPS = 0.2  # of a step's transient tensors: activations, the head's or backward's working set
BLOCK_4BIT = 64  # bitsandbytes' 4-bit block size (quantize_4bit's default)
GIB = 2**30


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def activation_bytes(config, tokens: int, compute_dtype: torch.dtype) -> int:
    """Bytes of activations kept for backward by `tokens` tokens through every decoder layer."""
    return int(config.num_hidden_layers) * layer_activation_bytes(config, tokens, compute_dtype)


def layer_activation_bytes(config, tokens: int, compute_dtype: torch.dtype) -> int:
    """One decoder layer's activations kept for backward (sdpa attention), for `tokens` tokens."""
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    return tokens * (12 * hidden + 5 * intermediate) * _size(compute_dtype)


def _proc_kib(path: str, key: str) -> int | None:
    """The ``key:  N kB`` line of a /proc file (Linux) in bytes, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_bytes(device: torch.device) -> int | None:
    """Memory free for this process's tensors: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return _proc_kib("/proc/meminfo", "MemAvailable")


def process_rss() -> int | None:
    """This process's resident memory in bytes (Linux), or None."""
    return _proc_kib("/proc/self/status", "VmRSS")


def needs_checkpointing(
    config,
    tokens: int,
    compute_dtype: torch.dtype,
    device: torch.device,
    free: int | None = None,
    quantized: bool = False,
) -> tuple[bool, str]:
    """(on?, the reason in one line) for gradient_checkpointing: auto, for micro-batches of `tokens` tokens.

    On for a quantized base whatever the free memory: QLoRA is chosen to save memory, and without
    checkpointing the activations, not the weights, set its peak (BENCHMARKS-qlora.md), so the 4-bit base
    would save little; PEFT's ``prepare_model_for_kbit_training`` turns it on for the same reason."""
    need = activation_bytes(config, tokens, compute_dtype)
    if quantized:
        return True, (f"on (auto: a quantized base, memory first; activations ~{need / GIB:.1f} GiB per "
                      f"micro-batch of {tokens:,} tokens without it)")  # fmt: skip
    free = free_bytes(device) if free is None else free
    if free is None:
        return False, f"off (auto: activations ~{need / GIB:.1f} GiB per micro-batch; free memory unknown)"
    on = need > AUTO_LIMIT * free
    return on, (
        f"{'on' if on else 'off'} (auto: activations ~{need / GIB:.1f} GiB per micro-batch of {tokens:,} tokens "
        f"without it, {free / GIB:.1f} GiB free on {device.type})"
    )


# ----------------------------------------------------------------------------- inputs and result


@dataclass
class Setup:
    """What decides a run's memory besides the model's shapes: resolved from the run config and the data."""

    device: str  # "cpu" | "cuda" | "mps"
    precision: str  # "bf16" | "fp16" | "no" (autocast)
    compute_dtype: torch.dtype
    checkpoint_dtype: torch.dtype  # the dtype of the weights in the checkpoint files
    quantization: str = "none"  # none | nf4 | fp4 | int8
    double_quant: bool = True
    batch: int = 4  # rows per micro-batch
    seq: int = 2048  # tokens per row: the longest row, at most max_seq_length
    max_seq_length: int = 2048
    checkpointing: bool = False
    attn_implementation: str = "sdpa"
    lora_dropout: float = 0.0
    processes: int = 1
    fsdp: bool = False
    runtime: int = 0  # bytes the process holds before the model loads (CPU) or the CUDA context (GPU)
    keeps_freed: bool = (
        False  # glibc keeps the blocks a step frees (training_config.return_freed_memory false)
    )

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def sharded(self) -> bool:
        return self.fsdp and self.processes > 1


@dataclass
class Memory:
    """Bytes per device (per rank), by component; `peak` is what the device must hold at the worst moment."""

    base_weights: int
    lora_weights: int
    gradients: int
    optimizer: int
    activations: int
    backward: int
    head: int
    gathered: int  # FSDP: groups gathered whole at a time
    overhead: int  # CPU: what training adds besides tensors (thread pools, malloc's arenas and kept blocks)
    runtime: int
    load_peak: int  # the process while it loads the base model
    tensor_peak: int  # tensors alone at the training step's peak
    peak: int
    parts: dict = field(default_factory=dict)  # counts behind the bytes (parameters, layers, ...)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("parts"))
        return d


def quantized_linears(model: nn.Module) -> set[str]:
    """Names of the linear layers bitsandbytes quantizes: every nn.Linear but the output head."""
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def quantized_bytes(numel: int, out_features: int, method: str, double_quant: bool) -> int:
    """Bytes bitsandbytes holds for one quantized weight of `numel` values: the packed data and its
    quantization state (4-bit: absmax per block, with double quant its own absmax, offset and the two
    code tables; int8: one fp32 scale per output row)."""
    if method == "int8":
        return numel + 4 * out_features
    blocks = math.ceil(numel / BLOCK_4BIT)
    packed = math.ceil(numel / 2)
    code = 16 * 4  # the 16-value nf4/fp4 table, fp32
    if double_quant:  # absmax as uint8 + per 256 of them an fp32 absmax, an fp32 offset, a 256-value table
        return packed + blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4 + code
    return packed + 4 * blocks + code


def _layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def weight_bytes(model: nn.Module, s: Setup) -> tuple[int, int, int]:
    """(frozen base bytes, trainable bytes, base bytes in the checkpoint's dtype) of a model with LoRA on it,
    as held in memory (quantized layers by `quantized_bytes`)."""
    quantized = quantized_linears(model) if s.quantization != "none" else set()
    done: set[int] = set()
    base = trainable = on_disk = 0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in done:
                continue
            done.add(id(p))
            if p.requires_grad:
                trainable += p.numel() * p.element_size()
                continue
            on_disk += p.numel() * _size(s.checkpoint_dtype)
            if name in quantized and pname == "weight":
                base += quantized_bytes(p.numel(), p.shape[0], s.quantization, s.double_quant)
            elif name in quantized:  # a quantized layer's bias stays in the compute dtype
                base += p.numel() * _size(s.compute_dtype)
            else:
                base += p.numel() * p.element_size()
    return base, trainable, on_disk


def estimate(model: nn.Module, config, s: Setup, *, targets: int | None = None) -> Memory:
    """The memory of one training step per device, for `model` (meta device, LoRA on, frozen linears
    held as training holds them) and `config` (its transformers config). `targets`: the most loss
    targets in one micro-batch (default: every token)."""
    base, trainable, on_disk = weight_bytes(model, s)
    cbytes = _size(s.compute_dtype)
    tokens, layers = s.tokens, int(config.num_hidden_layers)
    one_layer = layer_activation_bytes(config, tokens, s.compute_dtype)
    heads = int(getattr(config, "num_attention_heads", 1))
    if s.attn_implementation == "eager":  # softmax probabilities (B, heads, T, T), and their fp32 scores
        one_layer += s.batch * heads * s.seq * s.seq * (cbytes + 4)
    if s.lora_dropout > 0:  # each adapted linear keeps its dropped-out input (and the mask)
        adapted_in = sum(m.in_features for m in _lora_layers(model)) // max(layers, 1)
        one_layer += tokens * adapted_in * (cbytes + 1)
    hidden = int(config.hidden_size)
    if s.checkpointing:  # each layer keeps its input; one layer is recomputed at a time in backward
        activations = layers * tokens * hidden * cbytes + one_layer
    else:
        activations = layers * one_layer
    backward = one_layer
    vocab = int(config.vocab_size)
    n = min(tokens, targets if targets is not None else tokens)
    if fast_head_ok(model):
        rows = min(n, max(1, CHUNK_BYTES // (4 * vocab)))
        head = rows * vocab * (4 + cbytes) + 2 * n * hidden * cbytes + tokens * hidden * cbytes
        w = model.get_output_embeddings().weight
        if w.dtype != s.compute_dtype:
            head += w.numel() * cbytes  # the head's weight cast once per micro-batch
    else:  # logits of the micro-batch (compute dtype), the targets' in fp32, log-softmax and its gradient
        head = tokens * vocab * cbytes + 3 * n * vocab * 4
    gradients, optimizer = trainable, 2 * trainable
    gathered = 0
    if s.sharded:
        blocks = _layers(model)
        in_layers = sum(_held(p) for b in blocks for p in b.parameters())
        per_layer = in_layers // max(len(blocks), 1)
        root = base + trainable - in_layers
        gathered = root + 2 * per_layer - (root + 2 * per_layer) // s.processes
        base, gradients = base // s.processes, gradients // s.processes
        optimizer, trainable = optimizer // s.processes, trainable // s.processes
    transient = activations + max(head, backward)
    step = base + trainable + gradients + optimizer + gathered + transient
    kept = int(CPU_ALLOCATOR_KEEPS * transient) if s.keeps_freed else 0
    overhead = CPU_TRAINING_OVERHEAD + kept if s.device == "cpu" else 0
    runtime = s.runtime
    load_extra = 0
    if s.device == "cpu":  # the checkpoint's pages are mapped while loading; a held dtype other than the
        held_full = weight_bytes(model, s)[0]  # file's (or quantized) is a copy next to them
        same = s.quantization == "none" and _held_dtype(model) == s.checkpoint_dtype
        load_extra = on_disk if same else on_disk + held_full
    load_peak = runtime + load_extra
    return Memory(
        base_weights=base, lora_weights=trainable, gradients=gradients, optimizer=optimizer,
        activations=activations, backward=backward, head=head, gathered=gathered, overhead=overhead,
        runtime=runtime, load_peak=load_peak, tensor_peak=step, peak=max(runtime + step + overhead, load_peak),
        parts={"parameters": sum(p.numel() for p in model.parameters()),
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "decoder_layers": layers, "tokens_per_micro_batch": tokens},
    )  # fmt: skip


def _held(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def _held_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most frozen bytes are held in."""
    by: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if not p.requires_grad:
            by[p.dtype] = by.get(p.dtype, 0) + p.numel()
    return max(by, key=by.get) if by else torch.float32


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "in_features")]


# ----------------------------------------------------------------------------- fit and advice


def fits(peak: int, free: int | None, s: Setup) -> bool | None:
    """Whether `peak` per device fits `free` bytes (None: unknown). N processes on one CPU host share it."""
    if free is None:
        return None
    per_host = peak * (s.processes if s.device == "cpu" else 1)
    return per_host <= free


def changes(s: Setup, accumulation: int) -> list[tuple[str, dict, Setup]]:
    """What to try when a run does not fit, each as (what to set, its config overrides, the changed setup)."""
    out = []
    if s.batch > 1:
        b = max(1, s.batch // 2)
        acc = accumulation * s.batch // b
        out.append((f"per_device_train_batch_size {b} with gradient_accumulation_steps {acc} (same effective batch)",
                    {"training_config.per_device_train_batch_size": b,
                     "training_config.gradient_accumulation_steps": acc},
                    dataclasses.replace(s, batch=b)))  # fmt: skip
    if s.seq > 128:
        m = max(128, s.max_seq_length // 2)
        out.append((f"max_seq_length {m}", {"training_config.max_seq_length": m},
                    dataclasses.replace(s, seq=min(s.seq, m), max_seq_length=m)))  # fmt: skip
    if not s.checkpointing:
        out.append(("gradient checkpointing on (about 30% slower)",
                    {"training_config.gradient_checkpointing": True}, dataclasses.replace(s, checkpointing=True)))  # fmt: skip
    if s.quantization == "none":
        out.append(("nf4 quantization of the base (QLoRA; needs bitsandbytes)", {"model.quantization": "nf4"},
                    dataclasses.replace(s, quantization="nf4", double_quant=True)))  # fmt: skip
    if s.device == "cuda":
        n = s.processes * 2
        out.append((f"{n} GPUs with FSDP (lorafit train --nproc {n} --set training_config.fsdp=true)",
                    {"training_config.fsdp": True}, dataclasses.replace(s, processes=n, fsdp=True)))  # fmt: skip
    return out


def advise(s: Setup, accumulation: int, peak_of, free: int | None) -> list[Advice]:
    """The changes of `changes` that lower the peak (`peak_of(setup)`), each alone; when none fits alone,
    also the smallest set that does, picked greedily (the change that lowers the peak most, then the next)."""
    now = peak_of(s)
    alone = []
    for what, overrides, changed in changes(s, accumulation):
        peak = peak_of(changed)
        if peak < now:
            alone.append(Advice(what, overrides, peak, fits(peak, free, changed)))
    if not alone or any(a.fits for a in alone):
        return alone
    current, acc, taken, whats, overrides, peak = s, accumulation, set(), [], {}, now
    while True:
        options = [(peak_of(c), w, o, c) for w, o, c in changes(current, acc) if tuple(o) not in taken]
        if not options or min(options, key=lambda x: x[0])[0] >= peak:
            break
        peak, what, over, current = min(options, key=lambda x: x[0])
        taken.add(tuple(over))
        whats.append(what.split(" (")[0])
        overrides.update(over)
        acc = over.get("training_config.gradient_accumulation_steps", acc)
        if fits(peak, free, current):
            break
    if len(whats) > 1:
        alone.append(Advice("together: " + "; ".join(whats), overrides, peak, fits(peak, free, current)))
    return alone


def mib(b: int) -> str:
    return f"{b / 2**20:,.0f} MiB" if b < GIB else f"{b / GIB:,.2f} GiB"


@dataclass
class Advice:
    """One change that lowers the peak: what to set, as config overrides, and the peak after it."""

    change: str
    overrides: dict
    peak: int
    fits: bool | None


@dataclass
class Plan:
    """A run's estimate: memory per device, whether it fits, what to change if not, steps, tokens, time."""

    memory: Memory
    setup: Setup
    free: int | None  # bytes free for the run on the device (CPU: MemAvailable + this process's RSS)
    fits: bool | None
    advice: list[Advice]
    model: str
    device: str
    checkpointing: str  # on/off and why
    conversations: int
    rows: int
    steps: int
    steps_per_epoch: int
    epochs: float
    tokens: int  # tokens trained over the run (all processes), counting each epoch's rows
    targets: int  # loss targets over the run
    probe: dict | None = None  # measured by --probe: tokens_per_sec, step_sec, peak_rss_bytes, seconds

    def to_dict(self) -> dict:
        m, s = self.memory, self.setup
        return {
            "peak_memory_bytes": m.peak,
            "tensor_peak_bytes": m.tensor_peak,
            "free_memory_bytes": self.free,
            "fits": self.fits,
            "memory": m.to_dict(),
            "device": self.device, "processes": s.processes, "fsdp": s.sharded, "precision": s.precision,
            "compute_dtype": str(s.compute_dtype).removeprefix("torch."), "quantization": s.quantization,
            "gradient_checkpointing": s.checkpointing, "checkpointing_reason": self.checkpointing,
            "attn_implementation": s.attn_implementation, "micro_batch": s.batch, "row_tokens": s.seq,
            "model": self.model, "conversations": self.conversations, "rows": self.rows, "steps": self.steps,
            "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "tokens": self.tokens,
            "targets": self.targets,
            "advice": [dataclasses.asdict(a) for a in self.advice],
            "probe": self.probe,
        }  # fmt: skip

    def verdict(self) -> str:
        m, where = (
            self.memory,
            "per process" if self.setup.device == "cpu" else f"per {self.setup.device} device",
        )
        head = f"peak ~{mib(m.peak)} {where}"
        if self.free is None:
            return head + " (free memory unknown)"
        n = self.setup.processes if self.setup.device == "cpu" else 1
        need = f"{n} x {mib(m.peak)}" if n > 1 else mib(m.peak)
        return head + (f", {mib(self.free)} free: fits" if self.fits else
                       f", {mib(self.free)} free: does NOT fit (needs {need})")  # fmt: skip

    def short(self) -> str:
        """The line `lorafit train` starts with."""
        m = self.memory
        line = (
            f"estimate: {self.verdict()} (weights {mib(m.base_weights)}, LoRA + gradients + AdamW "
            f"{mib(m.lora_weights + m.gradients + m.optimizer)}, activations {mib(m.activations)}, "
            f"runtime {mib(m.runtime)}); {_n(self.steps, 'step')}, {self.tokens:,} tokens"
        )
        if self.fits is False and self.advice:
            best = next((a for a in self.advice if a.fits), min(self.advice, key=lambda a: a.peak))
            line += f". To fit: {best.change} (~{mib(best.peak)}); see `lorafit estimate`"
        return line

    def report(self) -> str:
        """What `lorafit estimate` prints."""
        m, s = self.memory, self.setup
        procs = (
            f", {s.processes} processes" + (" (FSDP: figures per rank)" if s.sharded else "")
            if s.processes > 1
            else ""
        )
        rows = [
            ("base weights", m.base_weights,
             f"{s.quantization}" if s.quantization != "none" else "frozen, as held in memory"),
            ("LoRA weights", m.lora_weights, f"{m.parts['trainable_parameters']:,} trainable parameters"),
            ("gradients", m.gradients, ""),
            ("AdamW state", m.optimizer, "two moments per trainable parameter"),
            ("activations", m.activations, f"{s.batch} x {s.seq} tokens, {m.parts['decoder_layers']} layers, "
             f"{s.attn_implementation}, checkpointing {'on' if s.checkpointing else 'off'}"),
            ("backward working set", m.backward, "one decoder layer"),
            ("loss head", m.head, "chunked fp32 logits"),
        ]  # fmt: skip
        if m.gathered:
            rows.append(("FSDP gathered", m.gathered, "root group and two decoder layers, whole"))
        if m.overhead:
            rows.append(("training overhead", m.overhead, "threads, malloc arenas and kept blocks"))
        rows.append(
            ("runtime", m.runtime, "process before the model loads" if s.device == "cpu" else "CUDA context")
        )
        w = max(len(r[0]) for r in rows)
        lines = [
            f"model {self.model}: {m.parts['parameters']:,} parameters; device {self.device}{procs}, "
            f"compute {s.precision if s.precision != 'no' else 'fp32'}",
            f"data: {self.conversations:,} conversations -> {self.rows:,} rows of <= {s.max_seq_length} tokens; "
            f"{_n(self.steps, 'step')} ({self.epochs:.3g} epoch{'' if self.epochs == 1 else 's'} of {self.steps_per_epoch}), "
            f"{self.tokens:,} tokens ({self.targets:,} trained)",
            f"gradient checkpointing: {self.checkpointing}",
            "",
            "memory per " + ("process" if s.device == "cpu" and not s.sharded else "device" if not s.sharded else "rank"),
        ]  # fmt: skip
        lines += [f"  {name:<{w}}  {mib(b):>11}  {note}".rstrip() for name, b, note in rows]
        lines.append(f"  {'peak (training step)':<{w}}  {mib(m.runtime + m.tensor_peak + m.overhead):>11}  "
                     f"of which tensors {mib(m.tensor_peak)}")  # fmt: skip
        lines.append(f"  {'peak (loading)':<{w}}  {mib(m.load_peak):>11}")
        lines += ["", self.verdict()]
        if self.probe:
            p = self.probe
            lines.append(
                f"probe: {p['steps']} steps on the real model, {p['tokens_per_sec']:,.0f} tokens/s "
                f"(measured peak RSS {mib(p['peak_rss_bytes'])}) -> about {_duration(p['seconds'])} for "
                f"{self.steps} steps" + (" (one process measured)" if s.processes > 1 else "")
            )
        if self.fits is False:
            lines.append("to fit, change one of (estimated peak after the change):")
            for a in self.advice:
                lines.append(f"  {'fits:' if a.fits else 'not enough:':<11} {a.change}: ~{mib(a.peak)}")
            lines.append("  (each as --set KEY=VALUE; see `lorafit estimate --json` for the keys)")
        return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _duration(sec: float) -> str:
    if sec < 120:
        return f"{sec:.0f} s"
    if sec < 7200:
        return f"{sec / 60:.0f} min"
    return f"{sec / 3600:.1f} h"
