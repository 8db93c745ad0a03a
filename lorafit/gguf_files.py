"""GGUF files as a base model: where transformers reads them from, what they are, which one it was.

A base model given as a `.gguf` file (llama.cpp's and Ollama's format) is read through transformers'
own GGUF support (`from_pretrained(folder, gguf_file=NAME)`): weights, config and tokenizer with its
chat template. transformers dequantizes quantized weights (Q4_1, Q8_0, ...) once, at load; lorafit
trains on those dequantized weights and says so (`describe`).

An adapter trained on a GGUF base records the file (`fingerprint`: name, size, and the sha256 of
its header and tensor index, which name every tensor, its type, shape and offset: the same digest
for the same file, computed without reading the weights), so loading it onto another GGUF is
refused (`check_same_base`) rather than silently giving other answers: two quantizations of one
model have the same shapes and different weights.

The `gguf` package is the optional extra `lorafit[gguf]`; without it a GGUF base is a clear error.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from pathlib import Path

from lorafit.errors import AdapterError, LorafitError

INSTALL = "pip install 'lorafit[gguf]' (the gguf package)"
# The key under which an adapter's lorafit metadata records its GGUF base.
BASE_GGUF_KEY = "base_gguf"


def gguf_file(name_or_path: str | Path | None) -> Path | None:
    """The GGUF file `name_or_path` names (an existing file ending in .gguf), else None."""
    if name_or_path is None:
        return None
    path = Path(str(name_or_path)).expanduser()
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def hf_source(name_or_path: str) -> tuple[str, dict]:
    """(what to pass to `from_pretrained`, extra keyword arguments): a GGUF file becomes its folder and
    `gguf_file=NAME`; anything else is passed on unchanged."""
    path = gguf_file(name_or_path)
    if path is None:
        return str(name_or_path), {}
    require_gguf()
    return str(path.resolve().parent), {"gguf_file": path.name}


def require_gguf():
    """The `gguf` module, or a LorafitError saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise LorafitError(f"reading or writing GGUF files needs the gguf package. Fix: {INSTALL}") from e
    return gguf


def reader(path: Path):
    """A GGUFReader of `path` (parsed once per version of the file: parsing a vocabulary takes a second)."""
    path = Path(path)
    stat = path.stat()
    return _reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _reader(path: str, mtime_ns: int, size: int):
    gguf = require_gguf()
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise LorafitError(
            f"{path}: not a readable GGUF file ({e}). Fix: copy the file again, or pass another --model"
        ) from e


def fingerprint(path: str | Path) -> dict:
    """{"name", "size", "sha256"} of a GGUF file; the digest covers the header and tensor index (all
    bytes before the tensor data), which fix the file's metadata and where every weight lies."""
    path = Path(path)
    offset = reader(path).data_offset
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(offset)).hexdigest()
    return {"name": path.name, "size": path.stat().st_size, "sha256": digest}


def weight_types(path: str | Path) -> str:
    """The storage types of the file's matrices, most common first, e.g. "Q4_1" or "Q4_1 + Q6_K"."""
    counts = Counter(t.tensor_type.name for t in reader(Path(path)).tensors if len(t.shape) >= 2)
    return " + ".join(name for name, _ in counts.most_common()) or "none"


def describe(path: str | Path, model) -> str:
    """What loading a GGUF base did, e.g. "dequantized from Q4_1, 103 MB file -> 540 MB in float32"."""
    path = Path(path)
    types = weight_types(path)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    verb = "read" if set(types.split(" + ")) <= {"F32", "F16", "BF16"} else "dequantized"
    return f"{path.name}: {verb} from {types}, {path.stat().st_size / 1e6:.0f} MB file -> {size / 1e6:.0f} MB in {dtype}"


def check_same_base(model, recorded: dict | None, source: str | Path) -> None:
    """Refuse an adapter trained on one GGUF file loaded onto a model read from another."""
    here = getattr(model, "lorafit_base_gguf", None)
    if not recorded or not here or recorded.get("sha256") == here.get("sha256"):
        return
    raise AdapterError(
        f"{source}: the adapter was trained on the GGUF file {recorded.get('name')} "
        f"({recorded.get('size')} bytes, sha256 {str(recorded.get('sha256'))[:12]}...), and this base is "
        f"{here['name']} ({here['size']} bytes, sha256 {here['sha256'][:12]}...): another file (another "
        "quantization or model) gives other answers. Fix: pass --model with the GGUF file it was trained on"
    )
