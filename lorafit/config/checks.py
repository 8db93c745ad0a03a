"""Value checks of config fields. A check takes the given value and returns it normalized, or raises Bad
whose message says what was expected and what was given."""

from __future__ import annotations

import copy
import datetime
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lorafit.dashboards import BACKENDS, missing

Check = Callable[[Any], Any]
# (dotted key, message, where the value came from or None to look it up)
Problem = tuple[str, str, "str | None"]


class Bad(Exception):
    """One bad value; the message says what was expected and what was given."""


def preview(value: Any, budget: int = 60) -> str:
    """repr(value) cut to about `budget` characters, built without repr-ing the whole of a huge value."""
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        items = (
            list(value.items())
            if isinstance(value, dict)
            else list(value)
            if isinstance(value, (set, frozenset))
            else value
        )
        brackets = {list: "[]", tuple: "()"}.get(type(value), "{}")
        parts, used = [], 2
        for item in items:
            if used > budget:
                break
            if isinstance(value, dict):
                piece = f"{preview(item[0], budget - used)}: {preview(item[1], budget - used)}"
            else:
                piece = preview(item, budget - used)
            parts.append(piece)
            used += len(piece) + 2
        more = (
            ", ..."
            if len(parts) < len(items)
            else ","
            if isinstance(value, tuple) and len(items) == 1
            else ""
        )
        text = brackets[0] + ", ".join(parts) + more + brackets[1]
    else:
        text = (
            repr(value)
            if not isinstance(value, str) or len(value) <= 4 * budget
            else repr(value[: 4 * budget])
        )
    return text if len(text) <= budget else text[: budget - 3] + "..."


def show(value: Any) -> str:
    return f"{preview(value)} ({type(value).__name__})"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def is_one_of(value: Any, allowed: Iterable[Any]) -> bool:
    return any(same(value, a) for a in allowed)


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


def integer(
    *,
    ge: int | None = None,
    le: int | None = None,
    allow_none: bool = False,
    also: tuple[int, ...] = (),
    why: str = "",
) -> Check:
    what = "an integer" + _range_text(ge, None, le, None) + why
    if also:
        what = " or ".join(str(a) for a in also) + " or " + what
    if allow_none:
        what += " or null"

    def check(value: Any) -> Any:
        if value is None and allow_none:
            return None
        v = value
        if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
            try:
                v = int(value.strip())
            except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
                pass
        if isinstance(v, int) and not isinstance(v, bool) and (v in also or _in_range(v, ge, None, le, None)):
            return v
        raise Bad(f"expected {what}, got {show(value)}")

    return check


def number(
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
        if is_number(v) and _finite(v) and _in_range(v, ge, gt, le, lt):
            return v if keep_int and isinstance(v, int) else float(v)
        raise Bad(f"expected {what}, got {show(value)}")

    return check


def _finite(v: float) -> bool:
    """A finite float, or an int that fits one (math.isfinite(10**400) raises OverflowError)."""
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def boolean(*, allow_none: bool = False) -> Check:
    what = "true, false or null (auto)" if allow_none else "true or false"

    def check(value: Any) -> Any:
        if isinstance(value, bool) or (value is None and allow_none):
            return value
        raise Bad(f"expected {what}, got {show(value)}")

    return check


def true_false_or_auto(value: Any) -> Any:
    """true, false, or "auto" (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    raise Bad(f"expected true, false or auto, got {show(value)}")


def choice(
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
        raise Bad(f"expected {what}, got {show(value)}{why}")

    return check


def string(*, allow_none: bool = False, path: bool = False) -> Check:
    what = "a non-empty string" + (" or null" if allow_none else "")

    def check(value: Any) -> Any:
        if value is None and allow_none:
            return None
        v = os.fspath(value) if path and isinstance(value, os.PathLike) else value
        if isinstance(v, str) and v.strip():
            return os.path.expanduser(v) if path and v.startswith("~") else v
        raise Bad(f"expected {what}, got {show(value)}{_yaml_hint(value)}")

    return check


# Custom checks, each named by one field's check=. A field annotated `X | None` never passes them None.


def mapping(value: Any) -> Any:
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return copy.deepcopy(dict(value))
    raise Bad(f"expected a mapping of string keys to values, or null, got {show(value)}")


_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(?::\d+)?")


def device(value: Any) -> Any:
    if isinstance(value, str) and _DEVICE_RE.fullmatch(value.strip().lower()):
        return value.strip().lower()
    hint = "; for a GPU index write cuda:N" if is_number(value) else ""
    raise Bad(f"expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {show(value)}{hint}")


def _module_names(value: Any) -> list[str] | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(x, str) and x.strip() for x in value):
        return list(value)
    return None


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise Bad(f"{value!r} is not a valid regular expression: {e}") from None
    return value


def target_modules(value: Any) -> Any:
    if isinstance(value, str) and value.strip():
        return "all-linear" if value.strip().lower() == "all-linear" else _regex(value)
    names = _module_names(value)
    if names is not None:
        return names
    raise Bad(
        f"expected 'all-linear', a module name, a regular expression (string) or a non-empty list of "
        f"module names, "
        f"got {show(value)}"
    )


def exclude_modules(value: Any) -> Any:
    if isinstance(value, str) and value.strip():
        return _regex(value)
    names = _module_names(value)
    if names is not None:
        return names
    raise Bad(f"expected null, a regular expression (string) or a list of module names, got {show(value)}")


def modules_to_save(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and not value:
        return None
    names = _module_names(value)
    if names is not None:
        return names
    hint = f"; write [{value}]" if isinstance(value, str) else ""
    raise Bad(f"expected null or a list of module names such as [lm_head], got {show(value)}{hint}")


def init_lora_weights(value: Any) -> Any:
    if value is True:
        return True
    if isinstance(value, str) and value.strip().lower() == "gaussian":
        return "gaussian"
    if value is False:
        raise Bad(
            "false (random lora_B, so the adapter changes the model before training) is for debugging "
            "and not supported; use true (the default: lora_B = 0) or 'gaussian'"
        )
    if isinstance(value, str):
        raise Bad(f"initialization {value!r} is not supported; use true (the default) or 'gaussian'")
    raise Bad(f"expected true or 'gaussian', got {show(value)}")


# training_config.fsdp, Hugging Face's spellings: "" / false = off, "full_shard" (+ "auto_wrap") / true = on.
_FSDP_ON = {"full_shard", "auto_wrap"}
_FSDP_OTHER = {
    "shard_grad_op": "only full sharding is implemented",
    "hybrid_shard": "only full sharding is implemented",
    "hybrid_shard_zero2": "only full sharding is implemented",
    "no_shard": "for plain data parallel training leave fsdp off (false)",
    "offload": "CPU offload is not implemented",
}


def fsdp(value: Any) -> Any:
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
            raise Bad(
                f"{other[0]!r} is not supported ({_FSDP_OTHER[other[0]]}); use true (= 'full_shard': "
                "the frozen base and the LoRA weights sharded across processes) or false"
            )
    raise Bad(f"expected true, false, 'full_shard' or 'full_shard auto_wrap', got {show(value)}")


def report_to(value: Any) -> Any:
    """Hugging Face's forms: "none", one name, a list of names, or "all" (the installed ones); a list out."""
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) and v.strip() for v in value)):
        raise Bad(f"expected 'none', 'all', a dashboard name or a list of them, got {show(value)}")
    names = list(dict.fromkeys(v.strip().lower() for v in value))
    if names in ([], ["none"]):
        return []
    if names == ["all"]:  # as TrainingArguments: every integration whose library is installed
        return [n for n in BACKENDS if not missing(n)]
    if "none" in names or "all" in names:
        raise Bad(f"'none' and 'all' stand alone, got {show(value)}")
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise Bad(
            f"{unknown[0]!r} is not a dashboard lorafit reports to; choose from {', '.join(BACKENDS)} (or none/all)"
        )
    return names


DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "torch.bfloat16": "bf16",
    "torch.float16": "fp16",
    "torch.float32": "fp32",
}
