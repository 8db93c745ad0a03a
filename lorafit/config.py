"""Run configuration: typed dataclasses with every default in one place, validated on construction.

A run config has four sections. ``training_config`` and ``peft_config`` use the key names of Hugging Face
``TrainingArguments`` and PEFT ``LoraConfig``, so the two dicts of Microsoft's "Fine-tuning Phi-3 with LoRA"
guide (``sample_finetune.py``) load as written. ``model`` and ``data`` are lorafit's own::

    model:            ModelConfig     which base model, dtype, attention kernel, device
    data:             DataConfig      train/eval data and which tokens get loss
    training_config:  TrainingConfig  optimizer, schedule, batch sizes, logging/eval/save cadence
    peft_config:      PeftConfig      LoRA rank, alpha, dropout, target modules

Precedence, lowest first (see :func:`load_config`): the defaults below < the config file (YAML, or JSON
when its name ends in ``.json``) < ``base`` (values of command-line flags) < ``--set section.key=value``
overrides, whose values are read as YAML (``--set peft_config.target_modules=[qkv_proj,o_proj]``).

Checking:

* An unknown key is an error that lists the valid keys; a value of the wrong type or out of range is an error
  naming the key, the expected type and the value. Every problem found in one config is reported together,
  in one :class:`~lorafit.errors.ConfigError`, each line prefixed with where the value came from
  (``file:line``, ``command line`` or ``--set ...``).
* Keys that Hugging Face users copy but lorafit does not act on (:data:`IGNORED_TRAINING_KEYS`,
  :data:`IGNORED_PEFT_KEYS`) are accepted with one one-line :class:`ConfigWarning` each.
  PEFT options lorafit does not implement (:data:`UNSUPPORTED_PEFT_OPTIONS`) are accepted only at their
  "off" value (``use_dora: false``); anything else is an error.
* Aliases: ``evaluation_strategy`` = ``eval_strategy`` and ``max_length`` = ``max_seq_length``.
* PyYAML reads YAML 1.1, so two gotchas are handled: ``1e-4`` (no dot) is read as a *string*, so numeric
  strings are accepted for number fields; and a bare ``no`` is read as ``false``, so ``eval_strategy: no``
  and ``save_strategy: no`` work.

Paths (``model.name_or_path``, ``model.adapter``, ``data.train``, ``data.eval``, ``training_config.output_dir``): a leading
``~`` is expanded and nothing else (no environment variables, no globbing). A relative path is relative to
the current working directory, not to the config file's directory, as with any command-line tool.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lorafit.errors import ConfigError
from lorafit.lora.files import write_text_atomic

__all__ = [
    "IGNORED_PEFT_KEYS",
    "IGNORED_TRAINING_KEYS",
    "SECTIONS",
    "SHIPPED_CONFIGS_DIR",
    "UNSUPPORTED_PEFT_OPTIONS",
    "ConfigWarning",
    "DataConfig",
    "ModelConfig",
    "PeftConfig",
    "RunConfig",
    "TrainingConfig",
    "load_config",
    "save_config",
]

# Example configs shipped with lorafit (phi3-mini-lora.yaml, phi3-mini-qlora.yaml, sample_finetune.yaml).
SHIPPED_CONFIGS_DIR = Path(__file__).parent / "resources" / "configs"


class ConfigWarning(UserWarning):
    """A config key that lorafit accepts but does not act on. The message is one line."""


# --------------------------------------------------------------------------------------------------------
# Accepted-but-ignored keys and unsupported options. Each ignored key gets one ConfigWarning saying why.

# TrainingArguments keys that lorafit accepts and ignores: those of Microsoft's sample_finetune.py that
# lorafit does not act on, plus keys commonly copied from Trainer scripts. lorafit runs its own training
# loop on one device (it does not use transformers.Trainer), which is why most of them have no meaning here.
IGNORED_TRAINING_KEYS: dict[str, str] = {
    # in Microsoft's sample_finetune.py
    "do_eval": "evaluation is controlled by eval_strategy",
    "log_level": "lorafit does not change transformers' logging level",
    "logging_strategy": "lorafit logs every logging_steps optimizer steps",
    "overwrite_output_dir": "lorafit has no such option (transformers 5 removed it too)",
    "remove_unused_columns": "lorafit builds the model inputs itself",
    # flags of Hugging Face example scripts
    "do_train": "the lorafit command decides what runs",
    "do_predict": "the lorafit command decides what runs",
    "log_level_replica": "lorafit trains on a single device",
    "logging_first_step": "lorafit logs every logging_steps optimizer steps",
    # reporting and the Hub
    "report_to": "lorafit does not use transformers.Trainer's reporting integrations",
    "run_name": "it only names runs in transformers.Trainer's reporting integrations",
    "logging_dir": "it only configures transformers.Trainer's TensorBoard integration",
    "disable_tqdm": "lorafit's progress display is not configured in training_config",
    "push_to_hub": "lorafit does not upload to the Hugging Face Hub",
    "hub_model_id": "lorafit does not upload to the Hugging Face Hub",
    "hub_strategy": "lorafit does not upload to the Hugging Face Hub",
    "hub_private_repo": "lorafit does not upload to the Hugging Face Hub",
    "hub_token": "lorafit does not upload to the Hugging Face Hub (and a token does not belong in a config file)",
    # optimizer, precision, speed
    "optim": "lorafit always uses torch AdamW (adamw_torch)",
    "tf32": "lorafit does not change torch's TF32 setting",
    "torch_compile": "lorafit does not torch.compile the model",
    "bf16_full_eval": "evaluation runs in the same precision as training",
    "fp16_full_eval": "evaluation runs in the same precision as training",
    "auto_find_batch_size": "set per_device_train_batch_size explicitly",
    "group_by_length": "lorafit batches examples in order; packing avoids padding instead",
    # data loading
    "dataloader_num_workers": "lorafit's data loading has no worker processes to configure",
    "dataloader_pin_memory": "lorafit's data loading is not configured in training_config",
    "dataloader_drop_last": "lorafit's data loading is not configured in training_config",
    # checkpoints
    "save_safetensors": "lorafit always writes safetensors",
    "load_best_model_at_end": "lorafit does not track a best checkpoint",
    "metric_for_best_model": "lorafit does not track a best checkpoint",
    "greater_is_better": "lorafit does not track a best checkpoint",
    # devices and distribution
    "use_cpu": "choose the device with model.device",
    "no_cuda": "choose the device with model.device",
    "local_rank": "lorafit trains on a single device",
    "ddp_find_unused_parameters": "lorafit trains on a single device",
    "ddp_backend": "lorafit trains on a single device",
    "deepspeed": "lorafit trains on a single device",
    "fsdp_config": "lorafit shards each decoder layer with FSDP2 itself (training_config.fsdp)",
}

# Ignored keys that are accepted without a warning at these values (lorafit does that anyway).
_QUIET_TRAINING_VALUES: dict[str, tuple[Any, ...]] = {"optim": ("adamw_torch", "adamw_torch_fused")}

# LoraConfig keys that lorafit accepts and ignores.
IGNORED_PEFT_KEYS: dict[str, str] = {
    "inference_mode": "the lorafit command decides whether the adapter is trained",
    "fan_in_fan_out": "lorafit adapts nn.Linear layers, whose weights are never stored fan-in-fan-out",
    "revision": "the base model's revision is model.revision",
    "base_model_name_or_path": "the base model is model.name_or_path",
}

# LoraConfig options lorafit does not implement: key -> (values that mean "off" and are accepted, error).
UNSUPPORTED_PEFT_OPTIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_dora": ((False, None), "DoRA is not supported by lorafit; remove use_dora or set it to false"),
    "fan_in_fan_out": (
        (False, None),
        "fan_in_fan_out: true is for GPT-2 style Conv1D layers, which lorafit does not adapt; remove it",
    ),
    "layers_to_transform": (
        (None,),
        "adapting only some layers is not supported; remove it and select modules with a regex in "
        "target_modules or exclude_modules instead",
    ),
    "layers_pattern": (
        (None,),
        "adapting only some layers is not supported; remove it and select modules with a regex in "
        "target_modules or exclude_modules instead",
    ),
    "rank_pattern": (
        (None, {}),
        "per-module ranks are not supported yet; remove it (every adapted module uses r)",
    ),
    "alpha_pattern": (
        (None, {}),
        "per-module alphas are not supported yet; remove it (every adapted module uses lora_alpha)",
    ),
    "lora_bias": ((False, None), "lora_bias is not supported; remove it or set it to false"),
    "loftq_config": ((None, {}), "LoftQ initialization is not supported; remove loftq_config"),
    "layer_replication": ((None, []), "layer_replication is not supported; remove it"),
    "target_parameters": (
        (None, []),
        "target_parameters is not supported; adapt modules with target_modules",
    ),
    "trainable_token_indices": ((None, [], {}), "trainable_token_indices is not supported; remove it"),
    "peft_type": (("LORA",), "lorafit trains LoRA adapters only; remove peft_type or set it to LORA"),
}

# --------------------------------------------------------------------------------------------------------
# Value checks. A check takes the given value and returns it normalized, or raises _Bad.

Check = Callable[[Any], Any]
# (dotted key, message, where the value came from or None to look it up)
_Problem = tuple[str, str, "str | None"]


class _Bad(Exception):
    """One bad value; the message says what was expected and what was given."""


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _is_one_of(value: Any, allowed: Iterable[Any]) -> bool:
    return any(_same(value, a) for a in allowed)


def _yaml_hint(value: Any) -> str:
    """For a string field given a YAML-typed scalar (`revision: 1.0`, `revision: 2024-05-01`)."""
    if isinstance(value, (bool, int, float, datetime.date)):
        return "; quote it in YAML to make it a string"
    return ""


def _range_text(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    low = f"[{ge}" if ge is not None else (f"({gt}" if gt is not None else None)
    high = f"{le}]" if le is not None else (f"{lt})" if lt is not None else None)
    if low and high:
        return f" in {low}, {high}"
    parts = [f">= {ge}" if ge is not None else "", f"> {gt}" if gt is not None else ""]
    parts += [f"<= {le}" if le is not None else "", f"< {lt}" if lt is not None else ""]
    return "".join(f" {p}" for p in parts if p)


def _in_range(v: float, ge: float | None, gt: float | None, le: float | None, lt: float | None) -> bool:
    return (
        (ge is None or v >= ge)
        and (gt is None or v > gt)
        and (le is None or v <= le)
        and (lt is None or v < lt)
    )


_INT_RE = re.compile(r"[-+]?\d+")
_FLOAT_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _int(*, ge: int | None = None, allow_none: bool = False, also: tuple[int, ...] = ()) -> Check:
    what = "an integer" + _range_text(ge, None, None, None)
    if also:
        what = " or ".join(str(a) for a in also) + " or " + what
    if allow_none:
        what += " or null"

    def check(value: Any) -> Any:
        if value is None and allow_none:
            return None
        v = int(value.strip()) if isinstance(value, str) and _INT_RE.fullmatch(value.strip()) else value
        if isinstance(v, int) and not isinstance(v, bool) and (v in also or ge is None or v >= ge):
            return v
        raise _Bad(f"expected {what}, got {_show(value)}")

    return check


def _float(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    keep_int: bool = False,
) -> Check:
    """A float (ints are accepted and converted; with keep_int they stay ints, as PEFT's lora_alpha)."""
    what = ("a number" if keep_int else "a float") + _range_text(ge, gt, le, lt)

    def check(value: Any) -> Any:
        v = value
        if isinstance(v, str):
            text = v.strip()
            if keep_int and _INT_RE.fullmatch(text):
                v = int(text)
            elif _FLOAT_RE.fullmatch(text):
                v = float(text)
        if _is_number(v) and _finite(v) and _in_range(v, ge, gt, le, lt):
            return v if keep_int and isinstance(v, int) else float(v)
        raise _Bad(f"expected {what}, got {_show(value)}")

    return check


def _finite(v: float) -> bool:
    """A finite float, or an int that fits one (math.isfinite(10**400) raises OverflowError)."""
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _bool(*, allow_none: bool = False) -> Check:
    what = "true, false or null (auto)" if allow_none else "true or false"

    def check(value: Any) -> Any:
        if isinstance(value, bool) or (value is None and allow_none):
            return value
        raise _Bad(f"expected {what}, got {_show(value)}")

    return check


def _choice(
    choices: tuple[str, ...],
    *,
    aliases: Mapping[str, str] | None = None,
    false_means: str | None = None,
    why: str = "",
) -> Check:
    """One of `choices`, case-insensitive; `aliases` map other spellings to a choice."""
    lookup = {c.lower(): c for c in choices}
    lookup.update({a.lower(): c for a, c in (aliases or {}).items()})
    what = "one of " + ", ".join(repr(c) for c in choices)

    def check(value: Any) -> Any:
        if value is False and false_means is not None:  # YAML 1.1 reads a bare `no` as false
            return false_means
        if isinstance(value, str) and value.strip().lower() in lookup:
            return lookup[value.strip().lower()]
        raise _Bad(f"expected {what}, got {_show(value)}{why}")

    return check


def _str(*, allow_none: bool = False, path: bool = False) -> Check:
    what = "a non-empty string" + (" or null" if allow_none else "")

    def check(value: Any) -> Any:
        if value is None and allow_none:
            return None
        v = os.fspath(value) if path and isinstance(value, os.PathLike) else value
        if isinstance(v, str) and v.strip():
            return os.path.expanduser(v) if path and v.startswith("~") else v
        raise _Bad(f"expected {what}, got {_show(value)}{_yaml_hint(value)}")

    return check


def _mapping(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return copy.deepcopy(dict(value))
    raise _Bad(f"expected a mapping of string keys to values, or null, got {_show(value)}")


_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(?::\d+)?")


def _device(value: Any) -> Any:
    if isinstance(value, str) and _DEVICE_RE.fullmatch(value.strip().lower()):
        return value.strip().lower()
    hint = "; for a GPU index write cuda:N" if _is_number(value) else ""
    raise _Bad(f"expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {_show(value)}{hint}")


def _module_names(value: Any) -> list[str] | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(x, str) and x.strip() for x in value):
        return list(value)
    return None


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise _Bad(f"{value!r} is not a valid regular expression: {e}") from None
    return value


def _target_modules(value: Any) -> Any:
    if isinstance(value, str) and value.strip():
        return "all-linear" if value.strip().lower() == "all-linear" else _regex(value)
    names = _module_names(value)
    if names is not None:
        return names
    raise _Bad(
        f"expected 'all-linear', a module name, a regular expression (string) or a non-empty list of "
        f"module names, "
        f"got {_show(value)}"
    )


def _exclude_modules(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return _regex(value)
    names = _module_names(value)
    if names is not None:
        return names
    raise _Bad(f"expected null, a regular expression (string) or a list of module names, got {_show(value)}")


def _modules_to_save(value: Any) -> Any:
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    names = _module_names(value)
    if names is not None:
        return names
    hint = f"; write [{value}]" if isinstance(value, str) else ""
    raise _Bad(f"expected null or a list of module names such as [lm_head], got {_show(value)}{hint}")


def _init_lora_weights(value: Any) -> Any:
    if value is True:
        return True
    if isinstance(value, str) and value.strip().lower() == "gaussian":
        return "gaussian"
    if value is False:
        raise _Bad(
            "false (random lora_B, so the adapter changes the model before training) is for debugging "
            "and not supported; use true (the default: lora_B = 0) or 'gaussian'"
        )
    if isinstance(value, str):
        raise _Bad(f"initialization {value!r} is not supported; use true (the default) or 'gaussian'")
    raise _Bad(f"expected true or 'gaussian', got {_show(value)}")


# training_config.fsdp, Hugging Face's spellings: "" / false = off, "full_shard" (+ "auto_wrap") / true = on.
_FSDP_ON = {"full_shard", "auto_wrap"}
_FSDP_OTHER = {
    "shard_grad_op": "only full sharding is implemented",
    "hybrid_shard": "only full sharding is implemented",
    "hybrid_shard_zero2": "only full sharding is implemented",
    "no_shard": "for plain data parallel training leave fsdp off (false)",
    "offload": "CPU offload is not implemented",
}


def _fsdp(value: Any) -> Any:
    """true/false; Hugging Face's "full_shard" / "full_shard auto_wrap" / ["full_shard"] mean true, "" false."""
    if value is None or isinstance(value, bool):
        return bool(value)
    words = value.split() if isinstance(value, str) else value
    if isinstance(words, (list, tuple)) and all(isinstance(w, str) for w in words):
        words = [w.strip().lower() for w in words if w.strip()]
        if not words or words == ["false"]:
            return False
        if words == ["true"] or ("full_shard" in words and set(words) <= _FSDP_ON):
            return True
        other = [w for w in words if w in _FSDP_OTHER]
        if other:
            raise _Bad(
                f"{other[0]!r} is not supported ({_FSDP_OTHER[other[0]]}); use true (= 'full_shard': "
                "the frozen base and the LoRA weights sharded across processes) or false"
            )
    raise _Bad(f"expected true, false, 'full_shard' or 'full_shard auto_wrap', got {_show(value)}")


_DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "torch.bfloat16": "bf16",
    "torch.float16": "fp16",
    "torch.float32": "fp32",
}


def _opt(default: Any, check: Check) -> Any:
    """A dataclass field with its check."""
    return field(default=default, metadata={"check": check})


# --------------------------------------------------------------------------------------------------------
# Sections


_S = TypeVar("_S", bound="_Section")


class _Section:
    """Shared machinery of the four section dataclasses: checking, from_dict, to_dict."""

    SECTION = ""
    ALIASES: Mapping[str, str] = {}
    IGNORED: Mapping[str, str] = {}
    QUIET_VALUES: Mapping[str, tuple[Any, ...]] = {}
    UNSUPPORTED: Mapping[str, tuple[tuple[Any, ...], str]] = {}

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise _config_error(problems, f"<{type(self).__name__}>", {})

    def _problems(self) -> list[_Problem]:
        """Check and normalize every field in place; the problems found."""
        problems: list[_Problem] = []
        for f in fields(self):  # type: ignore[arg-type]
            try:
                setattr(self, f.name, f.metadata["check"](getattr(self, f.name)))
            except _Bad as e:
                problems.append((f"{self.SECTION}.{f.name}", str(e), None))
        if not problems:
            problems += [(f"{self.SECTION}.{key}", msg, None) for key, msg in self._cross_checks()]
        return problems

    def _cross_checks(self) -> list[tuple[str, str]]:
        """Problems involving more than one field, as (key, message); run when every field is valid."""
        return []

    def to_dict(self) -> dict[str, Any]:
        """This section as a plain JSON-able dict."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_S], d: Mapping[str, Any] | None, source: str = "<dict>") -> _S:
        """Build this section from a dict of its keys; `source` names where the dict came from in errors."""
        obj, problems, notes = cls._build(d)
        if problems:
            raise _config_error(problems, source, {})
        _warn_ignored(notes, source, {})
        return obj

    @classmethod
    def _field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def _canonical(cls, d: Mapping[Any, Any]) -> tuple[dict[str, Any], dict[str, str], list[_Problem]]:
        """Aliases replaced by their key: (dict, {key: key as written}, problems)."""
        out: dict[str, Any] = {}
        written: dict[str, str] = {}
        problems: list[_Problem] = []
        for key, value in d.items():
            if not isinstance(key, str):
                problems.append((f"{cls.SECTION}.{key!r}", "keys must be strings", None))
                continue
            name = cls.ALIASES.get(key, key)
            if name in out and not _same(out[name], value):
                problems.append(
                    (
                        f"{cls.SECTION}.{name}",
                        f"given twice with different values: {written[name]}={out[name]!r} and "
                        f"{key}={value!r} ({'/'.join(sorted({written[name], key}))} are the same key)",
                        None,
                    )
                )
                continue
            out[name] = value
            written.setdefault(name, key)
        return out, written, problems

    @classmethod
    def _unknown_key(cls, key: str) -> str:
        names = sorted(cls._field_names())
        close = difflib.get_close_matches(key, names + list(cls.ALIASES), n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{guess}; valid keys: {', '.join(names)}"

    @classmethod
    def _build(cls, d: Any) -> tuple[Any, list[_Problem], list[tuple[str, str]]]:
        """(instance or None, problems, ignored-key warnings as (key, message))."""
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            return None, [(cls.SECTION, f"expected a mapping of keys to values, got {_show(d)}", None)], []
        d, _, problems = cls._canonical(d)
        notes: list[tuple[str, str]] = []
        kwargs: dict[str, Any] = {}
        names = set(cls._field_names())
        for key, value in d.items():
            qkey = f"{cls.SECTION}.{key}"
            if key in names:
                kwargs[key] = value
            elif key in cls.UNSUPPORTED and not _is_one_of(value, cls.UNSUPPORTED[key][0]):
                problems.append((qkey, cls.UNSUPPORTED[key][1], None))
            elif key in cls.IGNORED:
                quiet = cls.QUIET_VALUES.get(key)
                if quiet is None:
                    notes.append((qkey, f"{qkey} is ignored: {cls.IGNORED[key]}"))
                elif not _is_one_of(value, quiet):
                    notes.append((qkey, f"{qkey}={value!r} is ignored: {cls.IGNORED[key]}"))
            elif key not in cls.UNSUPPORTED:
                problems.append((qkey, cls._unknown_key(key), None))
        try:
            obj = cls(**kwargs)
        except ConfigError as e:
            obj = None
            problems += getattr(e, "problems", [(cls.SECTION, str(e), None)])
        return obj, problems, notes


@dataclass
class ModelConfig(_Section):
    """Which base model to load and how."""

    SECTION = "model"

    # A Hugging Face Hub id or a local directory (recorded by its absolute path when training).
    name_or_path: str = _opt("microsoft/Phi-3-mini-4k-instruct", _str(path=True))
    # Train further from this adapter (a PEFT or lorafit adapter folder, or a loralib export) instead of
    # a new one: its LoRA shape is used (see lorafit.model.continue_lora), the optimizer starts fresh.
    adapter: str | None = _opt(None, _str(allow_none=True, path=True))
    # Dtype of the base weights: auto (the checkpoint's own dtype, like transformers' dtype="auto"),
    # bf16, fp16 or fp32. bfloat16/float16/float32 are accepted and stored as bf16/fp16/fp32.
    dtype: str = _opt("auto", _choice(("auto", "bf16", "fp16", "fp32"), aliases=_DTYPE_ALIASES))
    # Attention kernel: sdpa (torch's scaled_dot_product_attention; fast everywhere), eager, or
    # flash_attention_2 (needs the flash-attn package and a recent NVIDIA GPU).
    attn_implementation: str = _opt("sdpa", _choice(("sdpa", "eager", "flash_attention_2")))
    # auto picks cuda, then mps, then cpu.
    device: str = _opt("auto", _device)
    # Run model code downloaded from the Hub. Phi-3 is built into transformers and does not need it.
    trust_remote_code: bool = _opt(False, _bool())
    # Hub branch, tag or commit of the base model; null = the default branch.
    revision: str | None = _opt(None, _str(allow_none=True))
    # QLoRA: hold the base model's linear layers (all but lm_head) quantized, through bitsandbytes
    # (CUDA, or its CPU backend; `pip install 'lorafit[qlora]'`): none, nf4 (4-bit NormalFloat, QLoRA's
    # choice), fp4 (4-bit float) or int8 (LLM.int8). LoRA trains on top; see lorafit/quant.py.
    quantization: str = _opt("none", _choice(("none", "nf4", "fp4", "int8"), false_means="none"))
    # 4-bit only: also quantize the per-block scales (~0.4 bit/parameter saved, QLoRA's "double quant").
    bnb_4bit_use_double_quant: bool = _opt(True, _bool())
    # 4-bit only: dtype the 4-bit weights are dequantized to for each matmul. auto: bf16 where it is
    # fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else fp16 on CUDA and fp32 on CPU.
    bnb_4bit_compute_dtype: str = _opt(
        "auto", _choice(("auto", "bf16", "fp16", "fp32"), aliases=_DTYPE_ALIASES)
    )


@dataclass
class DataConfig(_Section):
    """Training and evaluation data."""

    SECTION = "data"

    # Training data: a .jsonl/.json/.parquet file or a datasets Hub id. null here means it must be given
    # another way (the command line); the command that trains checks that it is set.
    train: str | None = _opt(None, _str(allow_none=True, path=True))
    # Evaluation data, as train; or null.
    eval: str | None = _opt(None, _str(allow_none=True, path=True))
    # Fraction of train held out for evaluation when eval is null (0 = none).
    eval_split: float = _opt(0.0, _float(ge=0, lt=1))
    # Split names used when train (or eval) is a datasets Hub id. eval_split_name: the split to evaluate on
    # (of eval if it is a Hub id, else of train); null = none.
    train_split: str = _opt("train", _str())
    eval_split_name: str | None = _opt(None, _str(allow_none=True))
    # Which tokens get loss: assistant (the assistant's replies only) or all.
    train_on: str = _opt("assistant", _choice(("assistant", "all")))
    # true: a conversation longer than max_seq_length is truncated; false: it is an error.
    truncation: bool = _opt(True, _bool())

    def _cross_checks(self) -> list[tuple[str, str]]:
        problems = []
        if self.eval_split > 0 and self.eval is not None:
            problems.append(("eval_split", "is only used when eval is null; set one of eval and eval_split"))
        if self.eval_split > 0 and self.eval_split_name is not None:
            problems.append(("eval_split", "and eval_split_name both choose eval data; set only one of them"))
        return problems


@dataclass
class TrainingConfig(_Section):
    """Hugging Face TrainingArguments names; the keys lorafit acts on, with LoRA-friendly defaults."""

    SECTION = "training_config"
    ALIASES = {"evaluation_strategy": "eval_strategy", "max_length": "max_seq_length"}
    IGNORED = IGNORED_TRAINING_KEYS
    QUIET_VALUES = _QUIET_TRAINING_VALUES

    # Peak learning rate. LoRA adapters train well at 1e-4..3e-4, much higher than full fine-tuning.
    learning_rate: float = _opt(2e-4, _float(gt=0))
    # Sequences per optimizer micro-batch, for training and for evaluation.
    per_device_train_batch_size: int = _opt(4, _int(ge=1))
    per_device_eval_batch_size: int = _opt(4, _int(ge=1))
    # Micro-batches per optimizer step (effective batch = per_device_train_batch_size * this).
    gradient_accumulation_steps: int = _opt(1, _int(ge=1))
    # Passes over the training data; fractions allowed. Used when max_steps is -1.
    num_train_epochs: float = _opt(1.0, _float(gt=0))
    # Optimizer steps to train for; -1 = use num_train_epochs.
    max_steps: int = _opt(-1, _int(ge=1, also=(-1,)))
    # Learning-rate schedule after warmup.
    lr_scheduler_type: str = _opt(
        "linear",
        _choice(
            ("linear", "cosine", "constant", "constant_with_warmup"),
            why="; other transformers schedulers are not supported",
        ),
    )
    # Warmup as a fraction of all optimizer steps (0 = no warmup) ...
    warmup_ratio: float = _opt(0.0, _float(ge=0, le=1))
    # ... or as a number of steps, which takes precedence when > 0. See warmup_steps_for().
    warmup_steps: int = _opt(0, _int(ge=0))
    # AdamW weight decay; 0 suits LoRA's small adapters.
    weight_decay: float = _opt(0.0, _float(ge=0))
    # AdamW hyperparameters (torch's defaults).
    adam_beta1: float = _opt(0.9, _float(ge=0, lt=1))
    adam_beta2: float = _opt(0.999, _float(ge=0, lt=1))
    adam_epsilon: float = _opt(1e-8, _float(gt=0))
    # Gradient clipping by global norm; 0 = no clipping.
    max_grad_norm: float = _opt(1.0, _float(ge=0))
    # Log the training loss every this many optimizer steps.
    logging_steps: int = _opt(10, _int(ge=1))
    # When to evaluate: no, steps (every eval_every() steps) or epoch. Alias: evaluation_strategy.
    eval_strategy: str = _opt("no", _choice(("no", "steps", "epoch"), false_means="no"))
    # Steps between evaluations when eval_strategy is steps; null = logging_steps.
    eval_steps: int | None = _opt(None, _int(ge=1, allow_none=True))
    # When to save an adapter checkpoint: steps (every save_steps), epoch or no.
    save_strategy: str = _opt("steps", _choice(("steps", "epoch", "no"), false_means="no"))
    save_steps: int = _opt(500, _int(ge=1))
    # Keep at most this many checkpoints, deleting the oldest; null = keep all.
    save_total_limit: int | None = _opt(None, _int(ge=1, allow_none=True))
    # Seeds LoRA initialization, data shuffling and dropout.
    seed: int = _opt(42, _int(ge=0))
    # bf16 autocast for compute. null = auto: on where the device runs bf16 fast (see mixed_precision()).
    bf16: bool | None = _opt(None, _bool(allow_none=True))
    # fp16 autocast with loss scaling, for GPUs without bf16. Not together with bf16: true.
    fp16: bool = _opt(False, _bool())
    # Recompute activations in the backward pass: much less memory for long sequences, ~30% slower.
    gradient_checkpointing: bool = _opt(False, _bool())
    # Passed to torch.utils.checkpoint, e.g. {use_reentrant: false}; null = lorafit's choice.
    gradient_checkpointing_kwargs: dict[str, Any] | None = _opt(None, _mapping)
    # Where checkpoints, the final adapter and logs go.
    output_dir: str = _opt("lorafit-output", _str(path=True))
    # Longest training sequence in tokens (and the packing length). Alias: max_length (TRL's name).
    max_seq_length: int = _opt(2048, _int(ge=1))
    # Pack several short conversations into each max_seq_length sequence (no padding; faster).
    packing: bool = _opt(True, _bool())
    # A step whose loss or gradient norm is NaN/Inf stops the run (the last checkpoint stays good). With N > 0,
    # up to N such steps are skipped instead (no optimizer step; each one logged in metrics.jsonl).
    skip_nonfinite_batches: int = _opt(0, _int(ge=0))
    # Shard the model across the processes of a torchrun launch with FSDP2 (each decoder layer, then the
    # rest), for base models that do not fit on one device; the LoRA weights train sharded too. One process
    # trains unsharded. Hugging Face's forms work: "full_shard" / "full_shard auto_wrap" = true, "" = false.
    fsdp: bool = _opt(False, _fsdp)

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

    def eval_every(self) -> int | None:
        """Optimizer steps between evaluations when eval_strategy is steps (eval_steps, or logging_steps
        when that is null); None when evaluation is per epoch or off."""
        if self.eval_strategy != "steps":
            return None
        return self.eval_steps if self.eval_steps is not None else self.logging_steps

    def mixed_precision(self, bf16_fast: bool) -> str:
        """'bf16', 'fp16' or 'no': the autocast to train with, given whether the device runs bf16 fast
        (resolves bf16: null = auto)."""
        if self.fp16:
            return "fp16"
        if self.bf16 is None:
            return "bf16" if bf16_fast else "no"
        return "bf16" if self.bf16 else "no"


@dataclass
class PeftConfig(_Section):
    """PEFT LoraConfig names: which modules get LoRA adapters and their shape."""

    SECTION = "peft_config"
    IGNORED = IGNORED_PEFT_KEYS
    UNSUPPORTED = UNSUPPORTED_PEFT_OPTIONS

    # LoRA rank.
    r: int = _opt(16, _int(ge=1))
    # Scaling numerator: the update is (lora_alpha / r) * B @ A (lora_alpha / sqrt(r) with use_rslora).
    lora_alpha: float = _opt(32, _float(gt=0, keep_int=True))
    # Dropout on the adapter input. 0 by default: dropout costs speed (notably on CPU) and LoRA rarely
    # overfits in one epoch; 0.05 (Microsoft's sample) is a common choice for longer runs.
    lora_dropout: float = _opt(0.0, _float(ge=0, lt=1))
    # Which biases train: none, all, or lora_only (biases of adapted modules).
    bias: str = _opt("none", _choice(("none", "all", "lora_only")))
    # lorafit fine-tunes causal LMs only.
    task_type: str = _opt(
        "CAUSAL_LM", _choice(("CAUSAL_LM",), why="; lorafit fine-tunes causal language models only")
    )
    # Modules to adapt: all-linear (every linear layer except the output head), a regular expression
    # matched against full module names, or a list of names matched as suffixes (e.g. [qkv_proj, o_proj]).
    target_modules: str | list[str] = _opt("all-linear", _target_modules)
    # Modules not to adapt, in the same forms; null = none.
    exclude_modules: str | list[str] | None = _opt(None, _exclude_modules)
    # Modules trained in full and saved with the adapter, e.g. [lm_head]; null = none.
    modules_to_save: list[str] | None = _opt(None, _modules_to_save)
    # Rank-stabilized LoRA: scale by lora_alpha / sqrt(r), better for large r.
    use_rslora: bool = _opt(False, _bool())
    # true: Kaiming-uniform A and zero B (the adapter starts as a no-op); gaussian: normal A and zero B.
    init_lora_weights: bool | str = _opt(True, _init_lora_weights)
    # dtype of the LoRA weights. auto = fp32 whatever the base dtype (stable updates with bf16 weights).
    lora_dtype: str = _opt("auto", _choice(("auto", "fp32", "bf16", "fp16"), aliases=_DTYPE_ALIASES))


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
SECTIONS: dict[str, type[_Section]] = {
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
                raise TypeError(
                    f"RunConfig.{name} must be a {cls.__name__}, got {_show(getattr(self, name))}"
                )
        problems = [(key, msg, None) for key, msg in self._cross_checks()]
        if problems:
            raise _config_error(problems, "<RunConfig>", {})

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
        problems: list[_Problem],
        replaced: Iterable[str] = (),
    ) -> RunConfig:
        """`replaced`: one-line notes on values a higher layer replaced, warned when the config is valid."""
        problems = list(problems)
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            problems.append(
                ("", f"expected a mapping with sections {', '.join(SECTIONS)}, got {_show(d)}", None)
            )
            raise _config_error(problems, source, origins)
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
            raise _config_error(problems, source, origins)
        _warn([f"{_where(key, origins, source)}: {message}" for key, message in notes] + list(replaced))
        cfg._origins = {k: v for k, v in origins.items() if k}
        return cfg

    def origin(self, key: str) -> str:
        """Where the value of `key` ("model.device") came from: "file:line", "command line", "--set ...",
        or "default" (also for a RunConfig built directly)."""
        return _where(key, getattr(self, "_origins", {}), "") or "default"


# --------------------------------------------------------------------------------------------------------
# Errors and warnings


def _where(key: str, origins: Mapping[str, str], source: str) -> str:
    """Where the value at `key` came from: its own origin, its section's, or the source."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        origin = origins.get(".".join(parts[:i]))
        if origin:
            return origin
    return origins.get("", source)


def _config_error(problems: list[_Problem], source: str, origins: Mapping[str, str]) -> ConfigError:
    lines = []
    for key, msg, where in problems:
        lines.append(": ".join(p for p in (where or _where(key, origins, source), key, msg) if p))
    if len(lines) == 1:
        text = f"invalid config: {lines[0]}"
    else:
        text = f"invalid config ({len(lines)} problems):\n" + "\n".join(f"  {line}" for line in lines)
    error = ConfigError(text)
    error.problems = list(problems)  # type: ignore[attr-defined]
    return error


def _warn_ignored(notes: list[tuple[str, str]], source: str, origins: Mapping[str, str]) -> None:
    """One ConfigWarning per ignored key, prefixed with where it came from."""
    _warn([f"{_where(key, origins, source)}: {message}" for key, message in notes])


def _warn(messages: Iterable[str]) -> None:
    """One ConfigWarning per message, attributed to the first caller outside this module."""
    frame, level = sys._getframe(), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    for message in messages:
        warnings.warn(message, ConfigWarning, stacklevel=level)


# --------------------------------------------------------------------------------------------------------
# Files, command-line values, overrides


def _yaml_error_parts(e: yaml.YAMLError) -> tuple[str, str]:
    """(":line:column" or "", one-line message) of a YAML error."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        context = f" ({e.context})" if e.context else ""
        return f":{mark.line + 1}:{mark.column + 1}", f"{e.problem}{context}"
    return "", " ".join(str(e).split())


def _key_lines(node: Any, path: Path) -> tuple[dict[str, int], list[_Problem]]:
    """Line of each section and section.key in a composed YAML document, and duplicate-key problems."""
    lines: dict[str, int] = {}
    problems: list[_Problem] = []

    def walk(mapping: yaml.MappingNode, prefix: str, depth: int) -> None:
        for key_node, value_node in mapping.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = prefix + key_node.value
            line = key_node.start_mark.line + 1
            if key in lines:
                problems.append((key, f"duplicate key (first on line {lines[key]})", f"{path}:{line}"))
            else:
                lines[key] = line
            if depth == 0 and isinstance(value_node, yaml.MappingNode):
                walk(value_node, key + ".", 1)

    if isinstance(node, yaml.MappingNode):
        walk(node, "", 0)
    return lines, problems


def _compose(text: str) -> tuple[Any, Any]:
    """(composed node, constructed data) of a single YAML document."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def _read_config_file(path: Path) -> tuple[Any, dict[str, int], list[_Problem]]:
    """(data, {key: line}, duplicate-key problems) of a YAML or JSON config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; give the config file (.yaml or .json)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        try:  # JSON is (nearly) YAML: compose it for line numbers and duplicate keys, best effort
            node, _ = _compose(text)
        except yaml.YAMLError:
            return data, {}, []
    else:
        try:
            node, data = _compose(text)
        except yaml.YAMLError as e:
            where, msg = _yaml_error_parts(e)
            raise ConfigError(f"{path}{where}: invalid YAML: {msg}") from None
    lines, problems = _key_lines(node, path)
    return data, lines, problems


def _merge_layer(
    merged: dict[Any, Any],
    layer: Any,
    origin_of: Callable[[str], str],
    origins: dict[str, str],
    problems: list[_Problem],
    layers: dict[str, int] | None = None,
    rank: int = 0,
) -> None:
    """Merge one layer (a file's or base's dict of sections) into `merged`, key by key; `layers[key]` is
    set to `rank` for every section.key the layer sets."""
    if layer is None:
        return
    if not isinstance(layer, Mapping):
        problems.append(
            ("", f"expected a mapping with sections {', '.join(SECTIONS)}, got {_show(layer)}", origin_of(""))
        )
        return
    for section, body in layer.items():
        name = str(section)
        if section not in SECTIONS:  # reported as an unknown section later
            merged[section] = copy.deepcopy(body)
            origins[name] = origin_of(name)
            continue
        if body is None:  # `peft_config:` with nothing under it
            continue
        if not isinstance(body, Mapping):
            problems.append(
                (name, f"expected a mapping of keys to values, got {_show(body)}", origin_of(name))
            )
            continue
        body, written, alias_problems = SECTIONS[section]._canonical(body)
        problems += [(k, m, origin_of(k)) for k, m, _ in alias_problems]
        target = merged.setdefault(section, {})
        for key, value in body.items():
            target[key] = copy.deepcopy(value)
            origins[f"{section}.{key}"] = origin_of(f"{section}.{written[key]}")
            if layers is not None:
                layers[f"{section}.{key}"] = rank


def _apply_override(
    item: Any,
    merged: dict[Any, Any],
    origins: dict[str, str],
    problems: list[_Problem],
    layers: dict[str, int] | None = None,
    rank: int = 0,
) -> None:
    """Apply one --set section.key[.subkey]=value (value read as YAML) to `merged`."""
    where = f"--set {item}"
    if not isinstance(item, str) or "=" not in item:
        problems.append(("", "expected section.key=value, e.g. training_config.learning_rate=1e-4", where))
        return
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        problems.append(("", "expected section.key=value, e.g. training_config.learning_rate=1e-4", where))
        return
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problems.append((key.strip(), f"the value is not valid YAML: {_yaml_error_parts(e)[1]}", where))
        return
    section = parts[0]
    if section in SECTIONS:
        parts[1] = SECTIONS[section].ALIASES.get(parts[1], parts[1])
    else:
        origins[section] = where
    node: dict[Any, Any] = merged
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            problems.append(
                (
                    ".".join(parts[: i + 1]),
                    f"is {_show(child)}, not a mapping; cannot set {'.'.join(parts)}",
                    where,
                )
            )
            return
        node = child
    node[parts[-1]] = value
    origins[".".join(parts[:2])] = where
    if layers is not None:
        layers[".".join(parts[:2])] = rank


# Layers of a config, lowest first: the defaults, the file, command-line flags (base), --set overrides.
_FILE, _BASE, _SET = 1, 2, 3

# data keys that choose the eval data in ways that exclude each other: eval_split holds part of train out,
# eval / eval_split_name name the eval data. (eval and eval_split_name go together: a split of a Hub id.)
_EVAL_SPLIT, _EVAL_NAMED = "data.eval_split", ("data.eval", "data.eval_split_name")


def _eval_source_precedence(
    merged: dict[Any, Any], origins: dict[str, str], layers: Mapping[str, int]
) -> list[str]:
    """Let the higher layer choose the eval data; the notes on what it replaced.

    data.eval_split and data.eval (or data.eval_split_name) both choose the eval data. Given in different
    layers (`--eval-data` over a file's `eval_split: 0.05`), the higher layer's wins and the other key goes
    back to its default, with a note. Given in the same layer they stay an error (DataConfig's cross-check).
    """
    data = merged.get("data")
    if not isinstance(data, dict):
        return []
    try:
        split = _float(ge=0, lt=1)(data.get("eval_split", 0.0))
    except _Bad:
        return []  # reported as a bad value
    named = [k for k in _EVAL_NAMED if data.get(k.split(".")[1]) is not None]
    if not split or not named:
        return []
    split_layer = layers.get(_EVAL_SPLIT, 0)
    top = max(layers.get(k, 0) for k in named)
    if top > split_layer:
        losers, winner = [_EVAL_SPLIT], max(named, key=lambda k: layers.get(k, 0))
    elif all(layers.get(k, 0) < split_layer for k in named):
        losers, winner = named, _EVAL_SPLIT
    else:
        return []

    def named_by(origin: str) -> str:
        return "the command line" if origin == "command line" else origin

    notes = []
    for key in losers:
        name = key.split(".")[1]
        notes.append(
            f"{winner} from {named_by(origins.get(winner, 'command line'))} replaces "
            f"{key}={data[name]!r} from {named_by(origins.get(key, 'command line'))}"
        )
        del data[name]
        origins.pop(key, None)
    return notes


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
    base_origin: str | Mapping[str, str] = "command line",
) -> RunConfig:
    """Load a run config: defaults < the file at `path` < `base` < `overrides`.

    path: a YAML file, or JSON when the name ends in .json; None = defaults only.
    base: values from command-line flags, as a dict of sections, e.g.
        {"model": {"name_or_path": "..."}, "data": {"train": "..."}}; a None value means "flag not given"
        and is skipped (set null with an override instead).
    base_origin: how errors and warnings name where a `base` value came from: one label, or a dict from
        "section.key" or "section" to a label (missing ones: "command line"), e.g.
        {"training_config": "finetune(training_config=...)"}.
    overrides: "section.key=value" strings (--set); the value is read as YAML, so 1e-4, true, null,
        [q_proj,v_proj] and {use_reentrant: false} work; "section.key.subkey=value" sets one key of a
        dict value such as gradient_checkpointing_kwargs.

    A higher layer's choice of eval data replaces a lower one's: data.eval (or data.eval_split_name) and
    data.eval_split exclude each other, and when they come from different layers the higher one wins and
    a ConfigWarning says what it replaced (`--eval-data` over a file's `eval_split: 0.05`). Both in the same
    layer is an error.

    Raises ConfigError listing every problem, each with where the value came from.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'section.key=value' strings, not one string")
    problems: list[_Problem] = []
    origins: dict[str, str] = {}
    layers: dict[str, int] = {}
    merged: dict[Any, Any] = {}
    source = "command line"
    if path is not None:
        file = Path(os.path.expanduser(os.fspath(path)))
        source = str(file)
        data, lines, problems = _read_config_file(file)

        def file_origin(key: str) -> str:
            line = lines.get(key) or lines.get(key.split(".")[0])
            return f"{file}:{line}" if line else str(file)

        _merge_layer(merged, data, file_origin, origins, problems, layers, _FILE)
    if base is not None:
        if not isinstance(base, Mapping):
            raise TypeError(f"base must be a dict of sections, got {_show(base)}")
        given = {
            s: ({k: v for k, v in body.items() if v is not None} if isinstance(body, Mapping) else body)
            for s, body in base.items()
        }
        labels = {"": base_origin} if isinstance(base_origin, str) else dict(base_origin)

        def base_origin_of(key: str) -> str:
            return labels.get(key) or labels.get(key.split(".")[0]) or labels.get("") or "command line"

        _merge_layer(merged, given, base_origin_of, origins, problems, layers, _BASE)
    for item in overrides:
        _apply_override(item, merged, origins, problems, layers, _SET)
    replaced = _eval_source_precedence(merged, origins, layers)
    return RunConfig._from_dict(merged, source, origins, problems, replaced)


_SAVE_HEADER = "# lorafit run config, resolved (defaults < config file < command line < --set)\n"


def save_config(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config to `path` atomically (a temporary file, then os.replace): YAML, or JSON
    when the name ends in .json. Missing parent directories are created."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"save_config needs a RunConfig, got {_show(cfg)}")
    file = Path(os.path.expanduser(os.fspath(path)))
    data = cfg.to_dict()
    if file.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = _SAVE_HEADER + yaml.safe_dump(
            data, sort_keys=False, default_flow_style=False, allow_unicode=True
        )
    file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(file, text)
