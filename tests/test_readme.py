"""The README, executed: every shell command and Python block in README.md runs, in order, and must succeed.

The rules (also in the README's "Development" section):

- ```bash and ```python blocks run in order, in one fresh working directory that holds a tiny
  random Phi-3 model, `train.jsonl` / `eval.jsonl` (slices of the demo data) and `lorafit/`
  (this checkout's package, so `lorafit/resources/...` paths resolve as in a clone).
- One substitution: the hub id `microsoft/Phi-3-mini-4k-instruct` becomes the tiny model's folder.
- A ```yaml block whose first line is `# NAME` is written to NAME (after the substitution).
- A ```console block lists `$ command` lines, each followed by the output expected from it (in
  order; a line ending in `...` matches any line starting with the rest).
- `<!-- readme-test: skip: REASON -->` before a block skips it with that reason (GPUs, several
  machines, the install commands themselves); `<!-- readme-test: files NAME=PATH -->` runs the
  block in its own folder with the repository file PATH as NAME.
- Commands read "Hello" and then "/exit" from standard input (for `lorafit chat`).

Takes about two minutes on 2 CPU cores: each command starts a Python process, and the training
runs are a few steps on the tiny model.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HUB_ID = "microsoft/Phi-3-mini-4k-instruct"
STDIN = "Hello\n/exit\n"
RUNNABLE = ("bash", "python", "console", "yaml")


@dataclass
class Block:
    lang: str
    text: str
    line: int  # 1-based line of the opening fence
    directive: str | None  # the text of a `<!-- readme-test: ... -->` right before the fence

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.lang}"


def readme_blocks() -> list[Block]:
    blocks, lines = [], README.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        prev = lines[start - 1].strip() if start else ""
        d = re.fullmatch(r"<!-- readme-test: (.*) -->", prev)
        blocks.append(Block(m.group(1), "\n".join(body) + "\n", start + 1, d.group(1) if d else None))
        i += 1
    return [b for b in blocks if b.lang in RUNNABLE and (b.lang != "yaml" or b.text.startswith("# "))]


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from lorafit.tiny import write_tiny_model

    wd = tmp_path_factory.mktemp("readme")
    write_tiny_model(wd / "_tiny-phi3", size="tiny")
    demo = ROOT / "lorafit" / "resources" / "demo"
    (wd / "train.jsonl").write_text("".join(demo.joinpath("train.jsonl").read_text().splitlines(True)[:400]))
    (wd / "eval.jsonl").write_text("".join(demo.joinpath("eval.jsonl").read_text().splitlines(True)[:16]))
    (wd / "lorafit").symlink_to(ROOT / "lorafit", target_is_directory=True)
    return wd


def _substitute(text: str, wd: Path) -> str:
    return text.replace(HUB_ID, str(wd / "_tiny-phi3"))


def _run(argv: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["HF_HUB_OFFLINE"] = "1"  # a name the substitution missed fails at once instead of retrying the hub
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(
        argv, cwd=cwd, input=STDIN, stdout=subprocess.PIPE, text=True, env=env, timeout=600, **kw
    )


def _check_console(text: str, cwd: Path) -> None:
    steps: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    for command, expected in steps:
        out = _run(["bash", "-c", command], cwd, stderr=subprocess.STDOUT).stdout.splitlines()
        pos = 0
        for want in expected:
            prefix = want[:-3] if want.endswith("...") else None
            while pos < len(out) and not (out[pos].startswith(prefix) if prefix else out[pos] == want):
                pos += 1
            assert pos < len(out), f"$ {command}\nexpected the line {want!r} (in order) in:\n" + "\n".join(
                out
            )
            pos += 1


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block: Block, workdir: Path):
    directive = block.directive or ""
    if directive.startswith("skip"):
        pytest.skip(directive.partition(":")[2].strip() or "marked skip in the README")
    text = _substitute(block.text, workdir)
    cwd = workdir
    if directive.startswith("files "):
        cwd = workdir / f"block-{block.line}"
        cwd.mkdir(exist_ok=True)
        (cwd / "lorafit").symlink_to(ROOT / "lorafit", target_is_directory=True)
        for spec in directive.removeprefix("files ").split():
            name, _, src = spec.partition("=")
            shutil.copyfile(ROOT / src, cwd / name)
    if block.lang == "yaml":
        name, _, body = text.partition("\n")
        (cwd / name.removeprefix("# ").strip()).write_text(body)
        return
    if block.lang == "console":
        _check_console(text, cwd)
        return
    script = cwd / f"readme-{block.line}.{'py' if block.lang == 'python' else 'sh'}"
    script.write_text(text if block.lang == "python" else "set -euxo pipefail\n" + text)
    r = _run([sys.executable, script.name] if block.lang == "python" else ["bash", script.name], cwd)
    assert r.returncode == 0, (
        f"{block.id} failed (exit {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    )


def test_every_module_is_in_the_readmes_file_list():
    text = README.read_text()
    listing = text[text.index("## Development") :]
    for path in sorted((ROOT / "lorafit").glob("*.py")):
        if path.name not in ("__init__.py", "__main__.py"):
            assert path.name in listing, (
                f"README's Development file list does not mention lorafit/{path.name}"
            )


def test_ci_runs_the_readmes_test_command():
    command = "python -m pytest -q"
    assert command in README.read_text()
    assert command in (ROOT / ".ci" / "run").read_text()


def test_the_readme_has_blocks_to_run():
    langs = {b.lang for b in BLOCKS if not (b.directive or "").startswith("skip")}
    assert {"bash", "python", "console", "yaml"} <= langs
