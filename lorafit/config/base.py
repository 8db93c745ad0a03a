"""What the four section dataclasses share: fields whose check comes from their annotation, checking,
from_dict/to_dict, and the wording of config errors and warnings (each line says where the value came from)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

from lorafit.config.checks import (
    Bad,
    Check,
    Problem,
    boolean,
    choice,
    integer,
    is_one_of,
    number,
    same,
    show,
    string,
)
from lorafit.errors import ConfigError


class ConfigWarning(UserWarning):
    """A config key that lorafit accepts but does not act on. The message is one line."""


# --------------------------------------------------------------------------------------------------------
# Fields: the annotation gives the type check, option() the rest.


@dataclasses.dataclass(frozen=True)
class _Options:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple[int, ...] = ()
    aliases: Mapping[str, str] | None = None
    false_means: str | None = None
    why: str = ""
    path: bool = False
    check: Check | None = None


def option(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    also: tuple[int, ...] = (),
    aliases: Mapping[str, str] | None = None,
    false_means: str | None = None,
    why: str = "",
    path: bool = False,
    check: Check | None = None,
) -> Any:
    """A section field: its default and what its annotation does not say.

    The annotation chooses the check: int, float, bool, str; `int | float` (a number that stays an int
    when given one, as PEFT's lora_alpha); `Literal[...]` (one of these strings, case-insensitive);
    `X | None` also accepts null. Numbers take bounds (ge/gt/le/lt; `also`: ints allowed outside them);
    a Literal takes `aliases` (other spellings), `false_means` (the choice YAML 1.1's bare `no` reads as)
    and `why` (added to its error); a str takes `path` (`~` expanded, os.PathLike accepted). `check`
    replaces the annotation's check for types it cannot express.
    """
    options = _Options(ge, gt, le, lt, also, aliases, false_means, why, path, check)
    return dataclasses.field(default=default, metadata={"options": options})


_UNION = (typing.Union, types.UnionType)  # `Optional[X]` and `X | None`

# Options each kind of field takes (numbers: bounds; a choice: other spellings; a str: path).
_TAKES = {
    "int": {"ge", "le", "also", "why"},
    "float": {"ge", "gt", "le", "lt"},
    "bool": set(),
    "str": {"path"},
    "choice": {"aliases", "false_means", "why"},
}


def _base_check(hint: Any, nullable: bool, o: _Options) -> tuple[Check, str] | None:
    """(check, kind) for an annotation without its None; None when there is no check for it."""
    if hint is bool:
        return boolean(allow_none=nullable), "bool"
    if hint is int:
        return integer(ge=o.ge, le=o.le, also=o.also, allow_none=nullable, why=o.why), "int"  # type: ignore[arg-type]
    if hint is str:
        return string(allow_none=nullable, path=o.path), "str"
    if nullable:  # a number or a choice would not say "or null" in its error; teach it when a field needs it
        return None
    if hint is float:
        return number(ge=o.ge, gt=o.gt, le=o.le, lt=o.lt), "float"
    if typing.get_origin(hint) in _UNION and set(typing.get_args(hint)) == {int, float}:
        return number(ge=o.ge, gt=o.gt, le=o.le, lt=o.lt, keep_int=True), "float"
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return choice(choices, aliases=o.aliases, false_means=o.false_means, why=o.why), "choice"
    return None


def _or_none(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


@functools.cache
def field_checks(cls: type) -> dict[str, Check]:
    """The check of each field of a section dataclass, from its annotation and option(), in field order.
    A misdeclared field (a type with no check and no check=, an option its type does not take) is a
    TypeError on the section's first use."""
    hints = typing.get_type_hints(cls)
    checks: dict[str, Check] = {}
    for f in dataclasses.fields(cls):
        o: _Options = f.metadata["options"]
        hint, args = hints[f.name], typing.get_args(hints[f.name])
        nullable = typing.get_origin(hint) in _UNION and type(None) in args
        if nullable:
            rest = [a for a in args if a is not type(None)]
            hint = rest[0] if len(rest) == 1 else None  # several types and None: only a check= can say
        given = {g.name for g in dataclasses.fields(o) if getattr(o, g.name) != g.default} - {"check"}
        if o.check is not None:
            if given:
                raise TypeError(f"{cls.__name__}.{f.name}: check= replaces {', '.join(sorted(given))}")
            checks[f.name] = _or_none(o.check) if nullable else o.check
            continue
        base = _base_check(hint, nullable, o)
        if base is None:
            raise TypeError(f"{cls.__name__}.{f.name}: no check for {hints[f.name]}; give check=")
        check, kind = base
        if given - _TAKES[kind]:
            wrong = ", ".join(sorted(given - _TAKES[kind]))
            raise TypeError(f"{cls.__name__}.{f.name}: {wrong} do not apply to {hints[f.name]}")
        checks[f.name] = _or_none(check) if nullable else check
    return checks


# --------------------------------------------------------------------------------------------------------
# Sections


_S = TypeVar("_S", bound="Section")


class Section:
    """Shared machinery of the four section dataclasses: checking, from_dict, to_dict."""

    SECTION: ClassVar[str] = ""
    ALIASES: ClassVar[Mapping[str, str]] = {}
    IGNORED: ClassVar[Mapping[str, str]] = {}
    QUIET_VALUES: ClassVar[Mapping[str, tuple[Any, ...]]] = {}
    UNSUPPORTED: ClassVar[Mapping[str, tuple[tuple[Any, ...], str]]] = {}

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise config_error(problems, f"<{type(self).__name__}>", {})

    def _problems(self) -> list[Problem]:
        """Check and normalize every field in place; the problems found."""
        problems: list[Problem] = []
        for name, check in field_checks(type(self)).items():
            try:
                setattr(self, name, check(getattr(self, name)))
            except Bad as e:
                problems.append((f"{self.SECTION}.{name}", str(e), None))
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
            raise config_error(problems, source, {})
        warn([f"{where(key, {}, source)}: {message}" for key, message in notes])
        return obj

    @classmethod
    def _field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def _canonical(cls, d: Mapping[Any, Any]) -> tuple[dict[str, Any], dict[str, str], list[Problem]]:
        """Aliases replaced by their key: (dict, {key: key as written}, problems)."""
        out: dict[str, Any] = {}
        written: dict[str, str] = {}
        problems: list[Problem] = []
        for key, value in d.items():
            if not isinstance(key, str):
                problems.append((f"{cls.SECTION}.{key!r}", "keys must be strings", None))
                continue
            name = cls.ALIASES.get(key, key)
            if name in out and not same(out[name], value):
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
    def _build(cls, d: Any) -> tuple[Any, list[Problem], list[tuple[str, str]]]:
        """(instance or None, problems, ignored-key warnings as (key, message))."""
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            return None, [(cls.SECTION, f"expected a mapping of keys to values, got {show(d)}", None)], []
        d, _, problems = cls._canonical(d)
        notes: list[tuple[str, str]] = []
        kwargs: dict[str, Any] = {}
        names = set(cls._field_names())
        for key, value in d.items():
            qkey = f"{cls.SECTION}.{key}"
            if key in names:
                kwargs[key] = value
            elif key in cls.UNSUPPORTED and not is_one_of(value, cls.UNSUPPORTED[key][0]):
                problems.append((qkey, cls.UNSUPPORTED[key][1], None))
            elif key in cls.IGNORED:
                quiet = cls.QUIET_VALUES.get(key)
                if quiet is None:
                    notes.append((qkey, f"{qkey} is ignored: {cls.IGNORED[key]}"))
                elif not is_one_of(value, quiet):
                    notes.append((qkey, f"{qkey}={value!r} is ignored: {cls.IGNORED[key]}"))
            elif key not in cls.UNSUPPORTED:
                problems.append((qkey, cls._unknown_key(key), None))
        try:
            obj = cls(**kwargs)
        except ConfigError as e:
            obj = None
            problems += getattr(e, "problems", [(cls.SECTION, str(e), None)])
        return obj, problems, notes


# --------------------------------------------------------------------------------------------------------
# Errors and warnings


def where(key: str, origins: Mapping[str, str], source: str) -> str:
    """Where the value at `key` came from: its own origin, its section's, or the source."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        origin = origins.get(".".join(parts[:i]))
        if origin:
            return origin
    return origins.get("", source)


def config_error(problems: list[Problem], source: str, origins: Mapping[str, str]) -> ConfigError:
    """One ConfigError listing every problem, each line prefixed with where its value came from."""
    lines = []
    for key, msg, at in problems:
        lines.append(": ".join(p for p in (at or where(key, origins, source), key, msg) if p))
    if len(lines) == 1:
        text = f"invalid config: {lines[0]}"
    else:
        text = f"invalid config ({len(lines)} problems):\n" + "\n".join(f"  {line}" for line in lines)
    error = ConfigError(text)
    error.problems = list(problems)  # type: ignore[attr-defined]
    return error


_PACKAGE = __name__.rpartition(".")[0]  # lorafit.config


def _in_package(module: str) -> bool:
    return module == _PACKAGE or module.startswith(_PACKAGE + ".")


def warn(messages: Iterable[str]) -> None:
    """One ConfigWarning per message, attributed to the first caller outside lorafit.config."""
    frame, level = sys._getframe(), 1
    while frame is not None and _in_package(frame.f_globals.get("__name__", "")):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    for message in messages:
        warnings.warn(message, ConfigWarning, stacklevel=level)
