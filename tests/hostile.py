"""The hostile-input driver behind tests/test_guarantees.py: every lorafit command against the hostile
inputs of tests/hostile_cases.py, all in one process.

    python tests/hostile.py WORKDIR          (run by the test under resource.setrlimit(RLIMIT_AS) and a timeout)
    HOSTILE_ONLY=train/alias python tests/hostile.py WORKDIR      (only the cases whose name holds this)

It writes the inputs under WORKDIR/in, runs each case through `lorafit.cli.main(argv)` in this process
(torch is imported once: a process per case would cost ~3 s each), and writes WORKDIR/results.json:
for each case its exit status, stderr, seconds, the files among its inputs that changed (sha256
before and after) and the temporary files left anywhere under WORKDIR. The test asserts; this file
only runs and records.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import stat
import sys
import time
import traceback
from pathlib import Path

from hostile_cases import PLANTED, Case, build_cases

CASE_SECONDS = 60  # one case running longer is a hang (SIGALRM ends it)
LEFTOVER_MARKS = (".tmp-", ".old-", ".write-test-")  # what an interrupted atomic write would leave


def sha_tree(path: Path) -> dict[str, str]:
    """sha256 of every regular file under `path` (a file: itself); a link, FIFO or device by its kind and
    target, never read."""
    out: dict[str, str] = {}
    paths = [path] if not path.is_dir() or path.is_symlink() else [path, *sorted(path.rglob("*"))]
    for p in paths:
        st = os.lstat(p) if os.path.lexists(p) else None
        if st is None:
            out[str(p)] = "missing"
        elif stat.S_ISLNK(st.st_mode):
            out[str(p)] = "link -> " + os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[str(p)] = h.hexdigest()
        elif not stat.S_ISDIR(st.st_mode):
            out[str(p)] = f"special {stat.S_IFMT(st.st_mode):o}"
    return out


def leftovers(root: Path) -> list[str]:
    keep = {str(p) for p in PLANTED}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if p not in keep and (any(m in name for m in LEFTOVER_MARKS) or name == ".lorafit.lock"):
                found.append(p)
    return sorted(found)


# ----------------------------------------------------------------------------- running


class _Alarm(BaseException):
    """Raised in the case by SIGALRM: the case ran past CASE_SECONDS (a BaseException: no `except
    Exception` in lorafit swallows it)."""


class _CurrentStderr(io.TextIOBase):
    """A stream that writes to whatever sys.stderr is now: logging's handler keeps its stream, and
    each case captures stderr anew."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)


def run_case(case: Case, root: Path) -> dict:
    from lorafit.cli import main

    before = {str(p): sha_tree(p) for p in case.inputs}
    err, out = io.StringIO(), io.StringIO()
    stdin = sys.stdin
    sys.stdin = io.StringIO(case.stdin)
    signal.alarm(CASE_SECONDS)
    t0 = time.perf_counter()
    escaped = ""
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(case.argv)
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 2
    except _Alarm:
        rc, escaped = None, f"still running after {CASE_SECONDS} s"
    except BaseException as e:  # noqa: BLE001 - anything that escapes main is what the suite looks for
        rc, escaped = None, "".join(traceback.format_exception(e))[-4000:]
    finally:
        signal.alarm(0)
        sys.stdin = stdin
    seconds = time.perf_counter() - t0
    changed = [p for p, h in before.items() if sha_tree(Path(p)) != h]
    return {
        "rc": rc,
        "stderr": err.getvalue()[-6000:],
        "stdout": out.getvalue()[-2000:],
        "escaped": escaped,
        "seconds": round(seconds, 2),
        "changed": changed,
        "leftovers": leftovers(root),
    }


def _vm_peak_mb() -> int | None:
    """The largest address space this process had (VmPeak, Linux), which RLIMIT_AS bounds."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def main(root: Path) -> None:
    import warnings

    def alarm(*_):
        raise _Alarm

    signal.signal(signal.SIGALRM, alarm)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=_CurrentStderr())
    os.environ.setdefault("TQDM_DISABLE", "1")
    t0 = time.perf_counter()
    import lorafit.cli  # noqa: F401 - the imports (torch, transformers) are not the cases' time
    import lorafit.export  # noqa: F401
    import lorafit.generation  # noqa: F401
    import lorafit.job  # noqa: F401

    imports = time.perf_counter() - t0
    cases = build_cases(root)
    setup = time.perf_counter() - t0
    everything = sha_tree(root / "in")
    results: dict = {}
    progress = root / "running.txt"
    only = os.environ.get("HOSTILE_ONLY")
    for name, case in cases.items():
        if only and only not in name:
            continue
        progress.write_text(name)  # a case that kills the process (an abort) is named here
        with warnings.catch_warnings():
            results[name] = {**run_case(case, root), "place": case.place, "fix": case.fix, "want": case.rc,
                             "says": case.says}  # fmt: skip
    progress.unlink()
    import resource

    report = {
        "cases": results,
        "import_seconds": round(imports, 1),
        "setup_seconds": round(setup - imports, 1),
        "inputs_changed": sorted(k for k, v in sha_tree(root / "in").items() if everything.get(k) != v),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "peak_vm_mb": _vm_peak_mb(),
    }
    (root / "results.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(Path(sys.argv[1]))
