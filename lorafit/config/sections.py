"""The run config's schema: the four section dataclasses and RunConfig, every field's type and default
(the annotation is the type check, see lorafit.config.base.option), and the checks across fields."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lorafit.config import checks
from lorafit.config.base import Section, config_error, option, warn, where
from lorafit.config.checks import DTYPE_ALIASES, Problem, show
from lorafit.config.hf_keys import (
    IGNORED_PEFT_KEYS,
    IGNORED_TRAINING_KEYS,
    QUIET_TRAINING_VALUES,
    UNSUPPORTED_PEFT_OPTIONS,
)
from lorafit.errors import ConfigError


@dataclass
class ModelConfig(Section):
    """Which base model to load and how."""

    SECTION = "model"

    # A Hugging Face Hub id or a local directory (recorded by its absolute path when training).
    name_or_path: str = option("microsoft/Phi-3-mini-4k-instruct", path=True)
    # Train further from this adapter (a PEFT or lorafit adapter folder, or a loralib export) instead of
    # a new one: its LoRA shape is used (see lorafit.adapters.continue_lora), the optimizer starts fresh.
    adapter: str | None = option(None, path=True)
    # Dtype of the base weights: auto (the checkpoint's own dtype, like transformers' dtype="auto"),
    # bf16, fp16 or fp32. bfloat16/float16/float32 are accepted and stored as bf16/fp16/fp32.
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", aliases=DTYPE_ALIASES)
    # Attention kernel: sdpa (torch's scaled_dot_product_attention; fast everywhere), eager,
    # flash_attention_2 (needs the flash-attn package and a recent NVIDIA GPU) or flex_attention
    # (torch's flex_attention, compiled: one call per layer for a packed batch; trains on CUDA only).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = option("sdpa")
    # auto picks cuda, then mps, then cpu.
    device: str = option("auto", check=checks.device)
    # Run model code downloaded from the Hub. Phi-3 is built into transformers and does not need it.
    trust_remote_code: bool = option(False)
    # Hub branch, tag or commit of the base model; null = the default branch.
    revision: str | None = option(None)
    # QLoRA: hold the base model's linear layers (all but lm_head) quantized, through bitsandbytes
    # (CUDA, or its CPU backend; `pip install 'lorafit[qlora]'`): none, nf4 (4-bit NormalFloat, QLoRA's
    # choice), fp4 (4-bit float) or int8 (LLM.int8). LoRA trains on top; see lorafit/quant.py.
    quantization: Literal["none", "nf4", "fp4", "int8"] = option("none", false_means="none")
    # 4-bit only: also quantize the per-block scales (~0.4 bit/parameter saved, QLoRA's "double quant").
    bnb_4bit_use_double_quant: bool = option(True)
    # 4-bit only: dtype the 4-bit weights are dequantized to for each matmul. auto: bf16 where it is
    # fast (CUDA compute capability >= 8, CPUs with AMX/AVX512-BF16), else fp16 on CUDA and fp32 on CPU.
    bnb_4bit_compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", aliases=DTYPE_ALIASES)


@dataclass
class DataConfig(Section):
    """Training and evaluation data."""

    SECTION = "data"

    # Training data: a .jsonl/.json/.parquet file or a datasets Hub id. null here means it must be given
    # another way (the command line); the command that trains checks that it is set.
    train: str | None = option(None, path=True)
    # Evaluation data, as train; or null.
    eval: str | None = option(None, path=True)
    # Fraction of train held out for evaluation when eval is null (0 = none).
    eval_split: float = option(0.0, ge=0, lt=1)
    # Split names used when train (or eval) is a datasets Hub id. eval_split_name: the split to evaluate on
    # (of eval if it is a Hub id, else of train); null = none.
    train_split: str = option("train")
    eval_split_name: str | None = option(None)
    # Which tokens get loss: assistant (the assistant's replies only) or all.
    train_on: Literal["assistant", "all"] = option("assistant")
    # true: a conversation longer than max_seq_length is truncated; false: it is an error.
    truncation: bool = option(True)
    # A system message on a model whose chat template does not render one (the real Phi-3-mini template
    # keeps only user and assistant turns; Gemma's and Mistral's raise). auto: kept where the template
    # renders it, else folded into the first user turn (system text, a blank line, the user text), with one
    # warning; fold: always folded; drop: always left out; error: stop when the template would lose it.
    system_message: Literal["auto", "fold", "drop", "error"] = option("auto")

    def _cross_checks(self) -> list[tuple[str, str]]:
        problems = []
        if self.eval_split > 0 and self.eval is not None:
            problems.append(("eval_split", "is only used when eval is null; set one of eval and eval_split"))
        if self.eval_split > 0 and self.eval_split_name is not None:
            problems.append(("eval_split", "and eval_split_name both choose eval data; set only one of them"))
        return problems


@dataclass
class TrainingConfig(Section):
    """Hugging Face TrainingArguments names; the keys lorafit acts on, with LoRA-friendly defaults."""

    SECTION = "training_config"
    ALIASES = {"evaluation_strategy": "eval_strategy", "max_length": "max_seq_length"}
    IGNORED = IGNORED_TRAINING_KEYS
    QUIET_VALUES = QUIET_TRAINING_VALUES

    # Peak learning rate. LoRA adapters train well at 1e-4..3e-4, much higher than full fine-tuning.
    learning_rate: float = option(2e-4, gt=0)
    # Sequences per optimizer micro-batch, for training and for evaluation.
    per_device_train_batch_size: int = option(4, ge=1)
    per_device_eval_batch_size: int = option(4, ge=1)
    # Micro-batches per optimizer step (effective batch = per_device_train_batch_size * this).
    gradient_accumulation_steps: int = option(1, ge=1)
    # Passes over the training data; fractions allowed. Used when max_steps is -1.
    num_train_epochs: float = option(1.0, gt=0)
    # Optimizer steps to train for; -1 = use num_train_epochs.
    max_steps: int = option(-1, ge=1, also=(-1,))
    # Learning-rate schedule after warmup.
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = option(
        "linear", why="; other transformers schedulers are not supported"
    )
    # Warmup as a fraction of all optimizer steps (0 = no warmup) ...
    warmup_ratio: float = option(0.0, ge=0, le=1)
    # ... or as a number of steps, which takes precedence when > 0. See warmup_steps_for().
    warmup_steps: int = option(0, ge=0)
    # AdamW weight decay; 0 suits LoRA's small adapters.
    weight_decay: float = option(0.0, ge=0)
    # AdamW hyperparameters (torch's defaults).
    adam_beta1: float = option(0.9, ge=0, lt=1)
    adam_beta2: float = option(0.999, ge=0, lt=1)
    adam_epsilon: float = option(1e-8, gt=0)
    # Gradient clipping by global norm; 0 = no clipping.
    max_grad_norm: float = option(1.0, ge=0)
    # Log the training loss every this many optimizer steps.
    logging_steps: int = option(10, ge=1)
    # Dashboards that get every metrics.jsonl line, Hugging Face's names: tensorboard, wandb, trackio, mlflow;
    # one name or a list; all (every one whose library is installed, as transformers does); none. Each needs
    # its library: pip install 'lorafit[tensorboard]' (etc.). Where each writes: lorafit/dashboards.py.
    report_to: str | list[str] = option("none", check=checks.report_to)
    # The run's name in wandb, trackio and mlflow; null = the output folder's name.
    run_name: str | None = option(None)
    # The project (wandb, trackio) or experiment (mlflow) the run goes to; null = WANDB_PROJECT or
    # MLFLOW_EXPERIMENT_NAME when set, else "lorafit".
    project: str | None = option(None)
    # When to evaluate: no, steps (every eval_every() steps) or epoch. Alias: evaluation_strategy.
    eval_strategy: Literal["no", "steps", "epoch"] = option("no", false_means="no")
    # Steps between evaluations when eval_strategy is steps; null = logging_steps.
    eval_steps: int | None = option(None, ge=1)
    # When to save an adapter checkpoint: steps (every save_steps), epoch or no.
    save_strategy: Literal["steps", "epoch", "no"] = option("steps", false_means="no")
    save_steps: int = option(500, ge=1)
    # Keep at most this many checkpoints, deleting the oldest; null = keep all.
    save_total_limit: int | None = option(None, ge=1)
    # Seeds LoRA initialization, data shuffling and dropout. At most 2**64 - 1: torch.manual_seed takes 64 bits,
    # numpy's generators (shuffling, eval_split) no negative seed.
    seed: int = option(42, ge=0, le=2**64 - 1, why=" (2**64 - 1 is the largest seed torch.manual_seed takes)")
    # bf16 autocast for compute. null = auto: on where the device runs bf16 fast (see lorafit.precision.mixed_precision).
    bf16: bool | None = option(None)
    # fp16 autocast with loss scaling, for GPUs without bf16. Not together with bf16: true.
    fp16: bool = option(False)
    # Recompute activations in the backward pass: much less memory for long sequences, ~30% slower.
    # auto: on when one micro-batch's activations would need more than half the free memory of the device
    # (estimated from the model's config: lorafit.memory), off otherwise; the choice is printed.
    gradient_checkpointing: bool | Literal["auto"] = option("auto", check=checks.true_false_or_auto)
    # Passed to torch.utils.checkpoint, e.g. {use_reentrant: false}; null = lorafit's choice.
    gradient_checkpointing_kwargs: dict[str, Any] | None = option(None, check=checks.mapping)
    # Where checkpoints, the final adapter and logs go.
    output_dir: str = option("lorafit-output", path=True)
    # Longest training sequence in tokens (and the packing length). Alias: max_length (TRL's name).
    max_seq_length: int = option(2048, ge=1)
    # Pack several short conversations into each max_seq_length sequence (no padding; faster).
    packing: bool = option(True)
    # A step whose loss or gradient norm is NaN/Inf stops the run (the last checkpoint stays good). With N > 0,
    # up to N such steps are skipped instead (no optimizer step; each one logged in metrics.jsonl).
    skip_nonfinite_batches: int = option(0, ge=0)
    # Give the memory a step frees back to the system (glibc on Linux: blocks of 1 MiB and more are mapped and
    # unmapped, lorafit.allocator), instead of malloc keeping it: lower private memory and peak RSS for a
    # few percent more CPU time (page faults); the README's "Memory" section has both figures.
    return_freed_memory: bool = option(False)
    # Shard the model across the processes of a torchrun launch with FSDP2 (each decoder layer, then the
    # rest), for base models that do not fit on one device; the LoRA weights train sharded too. One process
    # trains unsharded. Hugging Face's forms work: "full_shard" / "full_shard auto_wrap" = true, "" = false.
    fsdp: bool = option(False, check=checks.fsdp)
    # After training, check the saved adapter on a few held-out prompts (lorafit.adapter_check): replies
    # that never stop or are empty or repeat, merged == unmerged logits, the reloaded adapter's eval loss.
    # The report goes to results.json's "checks"; false skips it (`lorafit check-adapter` runs it later).
    post_check: bool = option(True)

    def _cross_checks(self) -> list[tuple[str, str]]:
        if self.bf16 and self.fp16:
            return [("fp16", "and bf16 are both true; choose one")]
        if self.fsdp and self.fp16:
            return [
                ("fp16", "fp16 loss scaling is not supported with fsdp (sharded gradients); use bf16 or fp32")
            ]
        return []

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup steps for a run of `total_steps` optimizer steps, as transformers computes them:
        warmup_steps if it is > 0, else ceil(total_steps * warmup_ratio) (without float noise:
        0.07 * 100 is 7, not 8)."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
            raise ValueError(f"total_steps must be an integer >= 0, got {total_steps!r}")
        if self.warmup_steps > 0:
            return self.warmup_steps
        return max(0, math.ceil(total_steps * self.warmup_ratio - 1e-9))

    def step_counts(self, batches_per_epoch: int) -> tuple[int, int]:
        """(optimizer steps per epoch, steps of the run) for `batches_per_epoch` micro-batches per epoch
        and rank: max_steps when set, else num_train_epochs epochs (a fraction rounded up)."""
        per_epoch = math.ceil(batches_per_epoch / self.gradient_accumulation_steps)
        if self.max_steps <= 0 and not math.isfinite(self.num_train_epochs * per_epoch):
            raise ConfigError(
                f"training_config.num_train_epochs: {self.num_train_epochs:g} epochs of {per_epoch} steps is more "
                "steps than can be counted. Fix: fewer epochs, or a number of steps with max_steps"
            )
        total = self.max_steps if self.max_steps > 0 else math.ceil(self.num_train_epochs * per_epoch)
        return per_epoch, total

    def eval_every(self) -> int | None:
        """Optimizer steps between evaluations when eval_strategy is steps (eval_steps, or logging_steps
        when that is null); None when evaluation is per epoch or off."""
        if self.eval_strategy != "steps":
            return None
        return self.eval_steps if self.eval_steps is not None else self.logging_steps


@dataclass
class PeftConfig(Section):
    """PEFT LoraConfig names: which modules get LoRA adapters and their shape."""

    SECTION = "peft_config"
    IGNORED = IGNORED_PEFT_KEYS
    UNSUPPORTED = UNSUPPORTED_PEFT_OPTIONS

    # LoRA rank.
    r: int = option(16, ge=1)
    # Scaling numerator: the update is (lora_alpha / r) * B @ A (lora_alpha / sqrt(r) with use_rslora).
    lora_alpha: int | float = option(32, gt=0)
    # Dropout on the adapter input. 0 by default: dropout costs speed (notably on CPU) and LoRA rarely
    # overfits in one epoch; 0.05 (Microsoft's sample) is a common choice for longer runs.
    lora_dropout: float = option(0.0, ge=0, lt=1)
    # Which biases train: none, all, or lora_only (biases of adapted modules).
    bias: Literal["none", "all", "lora_only"] = option("none")
    # lorafit fine-tunes causal LMs only.
    task_type: Literal["CAUSAL_LM"] = option(
        "CAUSAL_LM", why="; lorafit fine-tunes causal language models only"
    )
    # Modules to adapt: all-linear (every linear layer except the output head), a regular expression
    # matched against full module names, or a list of names matched as suffixes (e.g. [qkv_proj, o_proj]).
    target_modules: str | list[str] = option("all-linear", check=checks.target_modules)
    # Modules not to adapt, in the same forms; null = none.
    exclude_modules: str | list[str] | None = option(None, check=checks.exclude_modules)
    # Modules trained in full and saved with the adapter, e.g. [lm_head]; null = none.
    modules_to_save: list[str] | None = option(None, check=checks.modules_to_save)
    # Rank-stabilized LoRA: scale by lora_alpha / sqrt(r), better for large r.
    use_rslora: bool = option(False)
    # true: Kaiming-uniform A and zero B (the adapter starts as a no-op); gaussian: normal A and zero B.
    init_lora_weights: bool | str = option(True, check=checks.init_lora_weights)
    # dtype of the LoRA weights. auto = fp32 whatever the base dtype (stable updates with bf16 weights).
    lora_dtype: Literal["auto", "fp32", "bf16", "fp16"] = option("auto", aliases=DTYPE_ALIASES)


# Largest finite value of each LoRA weight dtype (lora_dtype auto = fp32), and fp32's smallest normal one.
_DTYPE_MAX = {"auto": 3.4028234663852886e38, "fp32": 3.4028234663852886e38, "bf16": 3.3895313892515355e38,
              "fp16": 65504.0}  # fmt: skip
_FP32_TINY = 1.1754943508222875e-38


def _numeric_range_checks(t: TrainingConfig, p: PeftConfig) -> list[tuple[str, str]]:
    """Numbers that are valid alone but do not fit the arithmetic they feed (as (key, message)).

    AdamW (torch) turns learning_rate / (1 - adam_beta1) (its first step's size), 1 - learning_rate *
    weight_decay and adam_epsilon into scalars of the LoRA weights' dtype: a value beyond that dtype's
    largest number stops training with "value cannot be converted to type float without overflow", and a
    learning rate or epsilon below fp32's smallest normal number rounds to 0 (no update; 0/0 = NaN on the
    first step, when lora_A's gradient is 0). LoRA's scale lora_alpha / r multiplies the adapter output.
    """
    name = "fp32" if p.lora_dtype == "auto" else p.lora_dtype
    top = _DTYPE_MAX[p.lora_dtype]
    beyond = f"beyond the largest {name} number ({top:.4g}) the LoRA weights and AdamW's state hold"
    problems = []
    lr, first_step = t.learning_rate, t.learning_rate / (1 - t.adam_beta1)
    if first_step > top:
        problems.append((
            "training_config.learning_rate",
            f"{lr:g} is too large: AdamW's first step is learning_rate / (1 - adam_beta1) = {first_step:.4g}, "
            f"{beyond}. Fix: a learning rate such as 2e-4 (LoRA trains well at 1e-4..3e-4)",
        ))  # fmt: skip
    elif lr < _FP32_TINY:
        problems.append((
            "training_config.learning_rate",
            f"{lr:g} is below the smallest normal fp32 number ({_FP32_TINY:.4g}), so the weights would not "
            "change. Fix: a learning rate such as 2e-4 (LoRA trains well at 1e-4..3e-4)",
        ))  # fmt: skip
    if first_step <= top and lr * t.weight_decay >= 1:
        problems.append((
            "training_config.weight_decay",
            f"{t.weight_decay:g} with learning_rate {lr:g} is too large: AdamW multiplies the weights by "
            f"1 - learning_rate * weight_decay = {1 - lr * t.weight_decay:.4g} every step (it must stay in "
            "(0, 1]). Fix: a weight decay such as 0.01, or 0 (the default; it suits LoRA)",
        ))  # fmt: skip
    if t.adam_epsilon > top or t.adam_epsilon < _FP32_TINY:
        where = (
            beyond if t.adam_epsilon > top else f"below the smallest normal fp32 number ({_FP32_TINY:.4g})"
        )
        problems.append((
            "training_config.adam_epsilon",
            f"{t.adam_epsilon:g} is {where}. Fix: 1e-8 (the default)",
        ))  # fmt: skip
    scale = p.lora_alpha / (math.sqrt(p.r) if p.use_rslora else p.r)
    if scale > top:
        formula = "lora_alpha / sqrt(r)" if p.use_rslora else "lora_alpha / r"
        problems.append((
            "peft_config.lora_alpha",
            f"{p.lora_alpha:g} is too large: LoRA's scale {formula} = {scale:.4g} is {beyond}. Fix: a lora_alpha "
            "such as 2 * r (32 for r = 16)",
        ))  # fmt: skip
    return problems


# The run config's sections, in order.
SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "training_config": TrainingConfig,
    "peft_config": PeftConfig,
}


@dataclass
class RunConfig:
    """A whole run config: the four sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training_config: TrainingConfig = field(default_factory=TrainingConfig)
    peft_config: PeftConfig = field(default_factory=PeftConfig)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"RunConfig.{name} must be a {cls.__name__}, got {show(getattr(self, name))}")
        problems = [(key, msg, None) for key, msg in self._cross_checks()]
        if problems:
            raise config_error(problems, "<RunConfig>", {})

    def _cross_checks(self) -> list[tuple[str, str]]:
        t, d = self.training_config, self.data
        if t.eval_strategy != "no" and d.eval is None and d.eval_split == 0 and d.eval_split_name is None:
            return [
                (
                    "training_config.eval_strategy",
                    f"is {t.eval_strategy!r} but there is no eval data: set data.eval, data.eval_split or "
                    "data.eval_split_name, or set eval_strategy to 'no'",
                )
            ]
        if t.fsdp and self.model.quantization != "none":
            return [
                (
                    "training_config.fsdp",
                    f"cannot shard a {self.model.quantization}-quantized base: FSDP2 shards plain tensors, not "
                    "bitsandbytes' packed weights. Set fsdp: false (each process then holds the whole "
                    "quantized base) or model.quantization: none",
                )
            ]
        return _numeric_range_checks(t, self.peft_config)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """A plain JSON-able dict of all four sections; from_dict() reads it back to an equal RunConfig."""
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "<dict>") -> RunConfig:
        """Build from a dict of sections (missing sections and keys take their defaults). `source` names
        the dict's origin (a file name) in errors and warnings."""
        return cls._from_dict(d, source, {}, [])

    @classmethod
    def _from_dict(
        cls,
        d: Any,
        source: str,
        origins: Mapping[str, str],
        problems: list[Problem],
        replaced: Iterable[str] = (),
    ) -> RunConfig:
        """`replaced`: one-line notes on values a higher layer replaced, warned when the config is valid."""
        problems = list(problems)
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            problems.append(
                ("", f"expected a mapping with sections {', '.join(SECTIONS)}, got {show(d)}", None)
            )
            raise config_error(problems, source, origins)
        for key in d:
            if key not in SECTIONS:
                close = difflib.get_close_matches(str(key), list(SECTIONS), n=1)
                guess = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(
                    (str(key), f"unknown section{guess}; valid sections: {', '.join(SECTIONS)}", None)
                )
        notes: list[tuple[str, str]] = []
        sections = {}
        for name, section_cls in SECTIONS.items():
            obj, section_problems, section_notes = section_cls._build(d.get(name))
            sections[name] = obj
            problems += section_problems
            notes += section_notes
        if not problems:
            try:
                cfg = cls(**sections)
            except ConfigError as e:
                problems += e.problems  # type: ignore[attr-defined]
        if problems:
            raise config_error(problems, source, origins)
        warn([f"{where(key, origins, source)}: {message}" for key, message in notes] + list(replaced))
        cfg._origins = {k: v for k, v in origins.items() if k}
        return cfg

    def origin(self, key: str) -> str:
        """Where the value of `key` ("model.device") came from: "file:line", "command line", "--set ...",
        or "default" (also for a RunConfig built directly)."""
        return where(key, getattr(self, "_origins", {}), "") or "default"
