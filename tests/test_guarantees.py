"""What lorafit promises on bad input (README, "Guarantees"), checked for every command at once.

tests/hostile_cases.py builds hostile inputs of every kind (broken and endless data, bad configs,
damaged adapters, planted links, output folders that are inputs, bad flags and text) and
tests/hostile.py runs each case through `lorafit.cli.main` in ONE subprocess -- under resource.setrlimit(RLIMIT_AS) and a timeout,
so that a case that exhausts memory or hangs fails here instead of taking the machine down. Then
each guarantee is one test over all the cases:

* exit status 2 and one `error:` message naming the place and the fix, no traceback;
* no input changed (sha256 of every input file before and after each case);
* nothing half-written (no temporary or lock file left anywhere);
* bounded time (each case, and the whole) and memory (the address-space limit).

To try one case by hand: `HOSTILE_ONLY=train/alias python tests/hostile.py /tmp/h` and read
/tmp/h/results.json, or run the `argv` a case lists with `python -m lorafit`.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import lorafit

DRIVER = Path(__file__).with_name("hostile.py")
MEMORY_LIMIT = (
    3 << 30
)  # address space of the driver; it peaks near 1.5 GB (torch), an alias bomb took > 2.7 GB
TOTAL_SECONDS = 300  # the whole run; ~40 s on 2 busy cores
CASE_SECONDS = 15  # any one case (the slowest, a 50 MB record, takes ~1 s)
COMMANDS = ("train", "check-data", "eval", "generate", "chat", "fuse", "export", "tiny-model", "demo")


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hostile") / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lorafit.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    try:
        proc = subprocess.run(
            [sys.executable, str(DRIVER), str(root)], env=env, preexec_fn=_limit_memory, capture_output=True,
            text=True, timeout=TOTAL_SECONDS,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        running = root / "running.txt"
        pytest.fail(
            f"the hostile cases ran past {TOTAL_SECONDS} s (in {running.read_text() if running.exists() else '?'})"
        )
    results = root / "results.json"
    if proc.returncode != 0 or not results.exists():
        running = root / "running.txt"
        case = running.read_text() if running.exists() else "setting up"
        pytest.fail(f"the driver died (status {proc.returncode}) in case {case}:\n{proc.stderr[-3000:]}")
    return json.loads(results.read_text())


def _failures(report: dict, check) -> list[str]:
    bad = []
    for name, case in report["cases"].items():
        problem = check(case)
        if problem:
            bad.append(f"{name}: {problem}")
    return bad


def _message(case: dict) -> str:
    err = case["stderr"]
    return err[err.find("error: ") :] if "error: " in err else ""


def test_every_case_ends_in_one_message_naming_the_place_and_the_fix(report):
    def check(c):
        if c["escaped"]:
            return f"escaped main():\n{c['escaped']}"
        if "Traceback" in c["stderr"]:
            return f"traceback on stderr:\n{c['stderr'][-2000:]}"
        if c["rc"] != c["want"]:
            return f"exit status {c['rc']}, expected {c['want']}; stderr: {c['stderr'][-800:]}"
        if c["want"] == 0:
            said = c["stdout"] + c["stderr"]
            return None if c["says"] in said else f"expected {c['says']!r} in the output: {said[-800:]}"
        msg = _message(c)
        if c["stderr"].count("error: ") != 1:
            return f"{c['stderr'].count('error: ')} error messages: {c['stderr'][-800:]}"
        if c["place"] not in msg or c["fix"] not in msg:
            return f"the message does not name {c['place']!r} and {c['fix']!r}: {msg[:800]}"
        return None

    assert not (bad := _failures(report, check)), "\n".join(bad)


def test_no_input_is_modified(report):
    assert not (bad := _failures(report, lambda c: c["changed"] and f"changed {c['changed']}")), "\n".join(
        bad
    )
    assert report["inputs_changed"] == []


def test_nothing_is_left_half_written(report):
    assert not (bad := _failures(report, lambda c: c["leftovers"] and f"left {c['leftovers']}")), "\n".join(
        bad
    )


def test_each_case_is_bounded_in_time_and_memory(report):
    slow = _failures(report, lambda c: c["seconds"] > CASE_SECONDS and f"took {c['seconds']} s")
    assert not slow, "\n".join(slow)
    assert report["peak_rss_mb"] < MEMORY_LIMIT >> 20


def test_every_command_meets_every_kind_of_hostile_input(report):
    """The suite's coverage: each command has cases, and each kind of input reaches every command
    that reads it."""
    names = set(report["cases"])
    assert {n.split("/")[0] for n in names} == set(COMMANDS)
    kinds = {
        ("train", "check-data", "eval"): ["malformed-jsonl", "wrong-role", "deep-json", "huge-int", "surrogate",
                                         "not-utf8", "fifo", "link-to-dev-zero"],
        ("eval", "generate", "chat", "fuse", "export", "train"): [
            "adapter-config-list", "adapter-alpha-nan", "adapter-weights-nan", "adapter-truncated-safetensors",
            "adapter-mismatched-shapes"],
        ("fuse", "export", "tiny-model"): ["output-dir-a-link"],
        ("generate", "chat"): ["max-new-tokens-0", "max-new-tokens--1"],
        ("train",): ["config-alias-bomb", "config-unknown-key", "config-seed-beyond-64-bits", "planted-lock-link",
                     "output-dir-is-the-base--overwrite", "config-is-OUT-config.yaml--overwrite"],
    }  # fmt: skip
    missing = [f"{c}/{k}" for cmds, ks in kinds.items() for c in cmds for k in ks if f"{c}/{k}" not in names]
    assert not missing
