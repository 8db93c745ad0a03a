"""Config files and layering: YAML (or JSON) read with the line of every key, defaults < file < command-line
values < `--set` overrides, load_config and save_config."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from lorafit.config.base import field_checks
from lorafit.config.checks import Bad, Problem, show
from lorafit.config.sections import SECTIONS, DataConfig, RunConfig
from lorafit.errors import ConfigError
from lorafit.lora.files import not_regular, write_text_atomic

# Example configs shipped with lorafit (phi3-mini-lora.yaml, phi3-mini-qlora.yaml, sample_finetune.yaml).
SHIPPED_CONFIGS_DIR = Path(__file__).parents[1] / "resources" / "configs"


def _yaml_error_parts(e: yaml.YAMLError) -> tuple[str, str]:
    """(":line:column" or "", one-line message) of a YAML error."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        context = f" ({e.context})" if e.context else ""
        return f":{mark.line + 1}:{mark.column + 1}", f"{e.problem}{context}"
    return "", " ".join(str(e).split())


def _key_lines(node: Any, path: Path) -> tuple[dict[str, int], list[Problem]]:
    """Line of each section and section.key in a composed YAML document, and duplicate-key problems."""
    lines: dict[str, int] = {}
    problems: list[Problem] = []

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


MAX_YAML_VALUES = 100_000  # values a config may expand to through aliases; real configs have < 1,000


class YamlTooLarge(yaml.YAMLError):
    """A document whose aliases expand beyond MAX_YAML_VALUES (a "billion laughs" alias bomb)."""


def expanded_size(node: Any, limit: int = MAX_YAML_VALUES) -> int:
    """How many values `node` holds once every alias is expanded, counted without expanding anything
    (an alias is the same node object, so each node's size is computed once). Raises YamlTooLarge
    past `limit`."""
    sizes: dict[int, int] = {}

    def size(n: Any, depth: int) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if depth > 100:
            raise YamlTooLarge("the document nests more than 100 levels deep")
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in n.value)
        if total > limit:
            raise YamlTooLarge(
                f"its aliases (&anchor / *alias) expand to more than {limit:,} values; "
                "write the values out, or use fewer aliases"
            )
        sizes[id(n)] = total
        return total

    return size(node, 0) if node is not None else 0


def safe_load(text: str) -> Any:
    """yaml.safe_load, refusing documents whose aliases expand beyond MAX_YAML_VALUES."""
    return _compose(text)[1]


def _compose(text: str) -> tuple[Any, Any]:
    """(composed node, constructed data) of a single YAML document; alias bombs are refused before
    anything is built."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # PyYAML composes nested collections recursively
            raise YamlTooLarge("the document nests deeper than Python's stack; write it flatter") from None
        expanded_size(node)
        try:
            return node, (loader.construct_document(node) if node is not None else None)
        except ValueError as e:  # e.g. an integer of more digits than Python converts (4,300)
            raise yaml.YAMLError(f"a value Python cannot read: {str(e)[:200]}") from None
    finally:
        loader.dispose()


def _read_config_file(path: Path) -> tuple[Any, dict[str, int], list[Problem]]:
    """(data, {key: line}, duplicate-key problems) of a YAML or JSON config file."""
    problem = not_regular(path)
    if problem:
        raise ConfigError(f"{path}: {problem}. Fix: pass a .yaml or .json config file")
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
        except (ValueError, RecursionError) as e:  # a 5000-digit integer; nesting deeper than Python's stack
            what = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
            raise ConfigError(f"{path}: unreadable JSON: {what}. Fix: correct the config file") from None
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
    problems: list[Problem],
    layers: dict[str, int] | None = None,
    rank: int = 0,
) -> None:
    """Merge one layer (a file's or base's dict of sections) into `merged`, key by key; `layers[key]` is
    set to `rank` for every section.key the layer sets."""
    if layer is None:
        return
    if not isinstance(layer, Mapping):
        problems.append(
            ("", f"expected a mapping with sections {', '.join(SECTIONS)}, got {show(layer)}", origin_of(""))
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
                (name, f"expected a mapping of keys to values, got {show(body)}", origin_of(name))
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
    problems: list[Problem],
    layers: dict[str, int] | None = None,
    rank: int = 0,
) -> None:
    """Apply one --set section.key[.subkey]=value (value read as YAML) to `merged`."""
    where = f"--set {item if not isinstance(item, str) or len(item) <= 200 else item[:100] + '...'}"
    if not isinstance(item, str) or "=" not in item:
        problems.append(("", "expected section.key=value, e.g. training_config.learning_rate=1e-4", where))
        return
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        problems.append(("", "expected section.key=value, e.g. training_config.learning_rate=1e-4", where))
        return
    try:
        value = safe_load(text)
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
                    f"is {show(child)}, not a mapping; cannot set {'.'.join(parts)}",
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
        split = field_checks(DataConfig)["eval_split"](data.get("eval_split", 0.0))
    except Bad:
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
    problems: list[Problem] = []
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
            raise TypeError(f"base must be a dict of sections, got {show(base)}")
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


def config_text(cfg: RunConfig, path: str | os.PathLike[str]) -> str:
    """What save_config writes to `path`: YAML, or JSON when the name ends in .json."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"save_config needs a RunConfig, got {show(cfg)}")
    data = cfg.to_dict()
    if os.fspath(path).lower().endswith(".json"):
        return json.dumps(data, indent=2) + "\n"
    return _SAVE_HEADER + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_config(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config to `path` atomically (a temporary file, then os.replace): YAML, or JSON
    when the name ends in .json. Missing parent directories are created."""
    text = config_text(cfg, path)
    file = Path(os.path.expanduser(os.fspath(path)))
    file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(file, text)
