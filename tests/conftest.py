"""What several test files share: the tiny Phi-3 (folders and tokenizer), input ids, LoRA models with
random factors, and the small functions for JSONL files, `lorafit train` arguments and folder contents.

Fixtures are found by pytest; the plain functions and constants are imported (`from conftest import
...`). The session-scoped model folders are written once per test run and only read: a test that
damages a model copies it first.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from lorafit import lora
from lorafit.attention import PACKED_FLEX, PACKED_SDPA, register, use_packed_sdpa
from lorafit.loss import loss_sum
from lorafit.model import plan_lora
from lorafit.tiny import build_model, build_tokenizer, write_tiny_model

SLICE_TARGETS = ["q_proj", "v_proj", "gate_proj", "o_proj"]  # q, v of qkv_proj, gate of gate_up_proj


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The demo-size tiny Phi-3 (seed 0) and its tokenizer, as a Hugging Face folder named `model`."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> Path:
    """A tiny Phi-3 of another size (other shapes): an adapter of `tiny_model` does not fit it."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "other", size="tiny")


@pytest.fixture(scope="session")
def tok():
    """The tiny Phi-3 tokenizer (Phi-3's chat template and special tokens). A test that changes a
    tokenizer builds its own."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def ids() -> torch.Tensor:
    """Two rows of 12 token ids, the same in every run."""
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def lorafit_model(base, targets, *, use_rslora: bool = False, seed: int = 1):
    """A copy of `base` with lorafit LoRA (r=4, alpha=8) on `targets` (split names become slices) and
    random nonzero B, in eval mode."""
    model = copy.deepcopy(base)
    plan = plan_lora(model, targets)
    lora.inject(model, plan.target_modules if (plan.target_modules or not plan.slices) else [], r=4, lora_alpha=8,
                slices=plan.slices or None, use_rslora=use_rslora)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_modules(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def write_jsonl(path: Path, *records: dict | str) -> Path:
    """One line per record: a dict as JSON, a string as it is (to write broken lines)."""
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8"
    )
    return path


def train_argv(
    model: Path, data: Path, out: Path, *extra: str, eval_data: Path | None = None, sets: Iterable[str] = ()
) -> list[str]:
    """`lorafit train` arguments without a progress bar: each of `sets` as `--set KEY=VALUE`, then `extra`."""
    args = ["train", "--model", str(model), "--data", str(data)]
    if eval_data is not None:
        args += ["--eval-data", str(eval_data)]
    args += ["--output-dir", str(out), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return args + list(extra)


def tree(path: Path) -> dict[Path, bytes]:
    """Every file under `path` with its bytes (to show a folder was not changed)."""
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def lora_grads(tok, batch, attn: str, **dims):
    """(loss, LoRA gradients) of the tiny Phi-3 with the same random LoRA weights for every `attn`."""
    model = build_model(tok, **dims)
    torch.manual_seed(0)
    lora.inject(model, ["qkv_proj", "o_proj"], r=4, lora_alpha=8)
    lora.mark_only_lora_as_trainable(model)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    if attn == PACKED_SDPA:
        assert use_packed_sdpa(model)
    else:
        if attn == PACKED_FLEX:
            register()
        model.set_attn_implementation(attn)
    loss = loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
